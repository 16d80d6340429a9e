"""`onlinespec bench`: side-by-side runs on the same prompts, in one process, interleaved.

Runs (each repetition starts every draft from the same initial weights):
  target_ar         plain autoregressive decoding through the engine (k = 0): the baseline
  hf_assisted       Hugging Face assisted generation, target.generate(assistant_model=draft), with
                    HF's own schedule (num_assistant_tokens=20, heuristic/dynamic adjustments)
  hf_assisted_k     the same pinned to k: num_assistant_tokens=k, constant schedule, no
                    confidence early stop
  hf_prompt_lookup  HF prompt lookup decoding, target.generate(prompt_lookup_num_tokens=k)
                    (n-gram match against the current prompt + output only, no draft model)
  ngram             the engine with the ngram draft: suffix match against the current sequence
                    and an index of every earlier sequence in the stream (grows online, no
                    gradient; --ngram-option KEY=VALUE sets its options)
  ngram_arctic      the same with the stream part on arctic-inference's SuffixDecoding suffix
                    tree (frequency-ranked continuations; needs `pip install arctic-inference`)
  frozen            the engine with the offline draft, never updated
  <updater>         the engine with each registered online updater
Prompt i is run by every method before prompt i+1 (the order rotates per prompt), so a noisy
machine slows all methods alike; warm-up runs are excluded from timing.

Per run: tau, tokens/s (median, min, max over repetitions), speedup vs target_ar and vs
hf_assisted (per repetition, then median), update_fraction = update time / wall time,
per-topic tau and speedup, target forwards per token, and the analytic bound
tau / (1 + k*c) with c = draft/target per-token decode cost (measured here).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from .errors import require
from .sampling import SamplingConfig
from .options import DecodeSettings, dumps, parse_options, parse_scoped_options
from .runner import add_pair_args, load_items, load_pair_from_args, machine_info

COST_K = "+cost_k"  # method suffix: the updater with EngineConfig.cost_k
AR, HF, HF_AR = "target_ar", "hf_assisted", "hf_target_only"
HF_K, HF_PL, NGRAM, NGRAM_ARCTIC = "hf_assisted_k", "hf_prompt_lookup", "ngram", "ngram_arctic"
EXTRA_METHODS = (HF_AR, NGRAM_ARCTIC)  # only when asked for with --methods
HF_METHODS = (HF, HF_K, HF_PL, HF_AR)
QUICK = {"limit": 1, "max_new_tokens": 32, "reps": 1, "warmup_tokens": 8}  # --quick
DEFAULTS = {"limit": 2, "max_new_tokens": 64, "reps": 2, "warmup_tokens": 16}  # a few minutes


@dataclass
class BenchConfig(DecodeSettings):
    max_new_tokens: int = 64
    reps: int = 3
    warmup_tokens: int = 16
    methods: list[str] | None = None  # None: target_ar, hf_assisted, then every registered updater
    updater_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    engine_options: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields, every engine run
    cost_tokens: int = 48  # decode steps per cost measurement (c)
    bookkeeping_prompts: int = 4  # prompts for the target-as-its-own-draft overhead run (0: skip)
    progress: bool = True  # (DecodeSettings: temperature 0 = greedy; > 0: every method samples)
    ngram_options: dict[str, Any] = field(default_factory=dict)  # NgramDraft options for 'ngram'
    desc: str = ""  # progress bar label


@dataclass
class PromptResult:
    """One method on one prompt."""
    topic: str
    token_ids: list[int]
    wall_s: float
    forwards: int  # target forward passes
    drafted: int = 0  # draft forward passes (= drafted tokens for an lm draft; 0 for lookups)
    tau_sum: int = 0  # tokens emitted (= sum of accepted + 1 over rounds, less any cut at EOS)
    update_s: float = 0.0
    bookkeeping_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    proposed: int = 0  # draft tokens sent to the target for verification
    accepted: int = 0  # of those, accepted


class Method(Protocol):
    name: str

    def run(self, ids: list[int], max_new_tokens: int) -> PromptResult: ...


# ---- methods -----------------------------------------------------------------------------------
def clone_pair(pair):
    """The same pair with its own deep copy of the draft (the target and tokenizer are shared)."""
    if pair.draft is None:
        return pair
    pair.draft.reset()
    memo: dict[int, Any] = {id(pair.target): pair.target, id(pair.tokenizer): pair.tokenizer}
    for t in (*pair.target.modules(), *pair.target.parameters(), *pair.target.buffers()):
        memo[id(t)] = t
    return dataclasses.replace(pair, draft=copy.deepcopy(pair.draft, memo))


class EngineMethod:
    """The engine with an updater (or target-only when target_only)."""

    def __init__(self, name: str, pair, k: int, seed: int, updater: str = "frozen",
                 options: dict[str, Any] | None = None, target_only: bool = False,
                 engine_options: dict[str, Any] | None = None) -> None:
        from .engine import Engine
        self.name, self.target_only = name, target_only
        self.engine = Engine(pair if target_only else clone_pair(pair), k=k, seed=seed,
                             updater=updater, updater_options=options or {}, **(engine_options or {}))

    def run(self, ids: list[int], max_new_tokens: int) -> PromptResult:
        t0 = time.perf_counter()
        out = self.engine.generate(ids, max_new_tokens, target_only=self.target_only)
        wall = time.perf_counter() - t0
        rs = out.rounds
        proposed = sum(r.k for r in rs)
        lookup = getattr(self.engine.draft, "trainable", True) is False  # no draft forwards
        return PromptResult("", out.token_ids, wall, len(rs), 0 if lookup else proposed,
                            len(out.token_ids), sum(r.update_s for r in rs),
                            sum(r.bookkeeping_s for r in rs), sum(r.draft_s for r in rs),
                            sum(r.verify_s for r in rs), proposed, sum(r.accepted for r in rs))


def ngram_pair(pair, options: dict[str, Any] | None = None):
    """The pair with an ngram draft (fresh, empty index) in place of its draft."""
    from .drafts.ngram import load_ngram_draft
    return dataclasses.replace(pair, draft=load_ngram_draft(pair.target, **(options or {})),
                               draft_kind="ngram", draft_source=None)


class _Counter:
    def __init__(self, module: torch.nn.Module) -> None:
        self.n = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, *_: Any) -> None:
        self.n += 1


class _CandidateCounter:
    """Counts the candidate tokens HF's candidate generators propose and the matches it reports
    (get_candidates / update_candidate_strategy), for the acceptance rate."""

    def __init__(self) -> None:
        from transformers.generation import candidate_generator as cg
        self.classes = [c for c in (cg.CandidateGenerator, getattr(cg, "AssistedCandidateGenerator", None),
                                    getattr(cg, "PromptLookupCandidateGenerator", None)) if c is not None]
        self.proposed = self.accepted = 0
        self.saved: list[tuple[type, str, Any]] = []

    def __enter__(self) -> "_CandidateCounter":
        for cls in self.classes:
            for attr in ("get_candidates", "update_candidate_strategy"):
                if attr in vars(cls):
                    self.saved.append((cls, attr, vars(cls)[attr]))
                    setattr(cls, attr, self._wrap(attr, vars(cls)[attr]))
        return self

    def _wrap(self, attr: str, fn: Callable) -> Callable:
        counter = self

        def get_candidates(gen, input_ids, *a, **kw):
            out = fn(gen, input_ids, *a, **kw)
            counter.proposed += int(out[0].shape[-1] - input_ids.shape[-1])
            return out

        def update_candidate_strategy(gen, input_ids, scores, num_matches, *a, **kw):
            counter.accepted += int(num_matches)
            return fn(gen, input_ids, scores, num_matches, *a, **kw)
        return get_candidates if attr == "get_candidates" else update_candidate_strategy

    def __exit__(self, *exc: Any) -> None:
        for cls, attr, fn in reversed(self.saved):
            setattr(cls, attr, fn)
        self.saved = []


class HFMethod:
    """target.generate, greedy or sampling: with an assistant model (HF's schedule, or pinned to
    k with a constant schedule), with prompt lookup (k tokens), or target-only."""

    def __init__(self, name: str, pair, assisted: bool, k: int = 4, pinned: bool = False,
                 prompt_lookup: bool = False, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0) -> None:
        self.name, self.pair = name, pair
        self.assistant = None
        self.seed, self.calls = seed, 0
        if assisted:
            model = getattr(pair.draft, "model", None)
            require(isinstance(model, torch.nn.Module) and hasattr(model, "generate"),
                    f"hf_assisted needs a draft that is a Hugging Face causal LM (draft kind 'lm'); "
                    f"this pair's draft is {getattr(pair.draft, 'kind', None)!r}: leave hf_assisted "
                    "out of --methods")
            self.assistant = clone_pair(pair).draft.model  # its own copy: HF adapts its settings
            if pinned:  # the same k as the engine: constant schedule, no confidence early stop
                gc = self.assistant.generation_config = copy.deepcopy(self.assistant.generation_config)
                gc.num_assistant_tokens = k
                gc.num_assistant_tokens_schedule = "constant"
                gc.assistant_confidence_threshold = 0.0
        tok = pair.tokenizer
        eos = pair.target.generation_config.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else (
            eos[0] if isinstance(eos, (list, tuple)) else eos)
        self.kw: dict[str, Any] = dict(num_beams=1, pad_token_id=pad, eos_token_id=eos)
        if temperature > 0:  # the engine's sampling: temperature, top-p, no top-k
            self.kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            self.kw.update(do_sample=False)
        if prompt_lookup:
            self.kw["prompt_lookup_num_tokens"] = k

    @torch.inference_mode()
    def run(self, ids: list[int], max_new_tokens: int) -> PromptResult:
        x = torch.tensor([ids], device=self.pair.device)
        kw = dict(self.kw, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens)
        if self.assistant is not None:
            kw["assistant_model"] = self.assistant
        if self.kw.get("do_sample"):
            torch.manual_seed(self.seed * 1_000_003 + self.calls)  # reproducible samples
        self.calls += 1
        tc = _Counter(self.pair.target)
        dc = _Counter(self.assistant) if self.assistant is not None else None
        try:
            with _CandidateCounter() as cc:
                t0 = time.perf_counter()
                out = self.pair.target.generate(x, **kw)
                wall = time.perf_counter() - t0
        finally:
            tc.handle.remove()
            if dc is not None:
                dc.handle.remove()
        new = out[0, len(ids):].tolist()
        return PromptResult("", new, wall, tc.n, dc.n if dc else 0, len(new),
                            proposed=cc.proposed, accepted=cc.accepted)


def default_methods(pair) -> list[str]:
    from .updaters import available_updaters
    names = [AR]
    if pair.draft is not None and hasattr(pair.draft, "model"):
        names += [HF, HF_K]
    names += [HF_PL]
    if getattr(pair.draft, "kind", None) != "ngram":
        names.append(NGRAM)
    ups = available_updaters()
    if pair.draft is None:
        return names
    if getattr(pair.draft, "trainable", True) is False:  # a lookup draft: nothing to update
        return names + ["frozen"]
    return names + (["frozen"] if "frozen" in ups else []) + [u for u in ups if u != "frozen"]


def check_methods(names: list[str]) -> None:
    from .updaters import available_updaters
    known = [AR, HF, HF_K, HF_PL, NGRAM, *EXTRA_METHODS, *available_updaters()]
    if NGRAM_ARCTIC in names:
        from .drafts.ngram import _ArcticStream
        _ArcticStream(4, 16)  # a clear error now when arctic-inference is missing
    for n in names:
        base = n[: -len(COST_K)] if n.endswith(COST_K) else n
        require(n in known or base in available_updaters(),
                f"unknown bench method {n!r}; choose from {', '.join(known)} "
                f"(an updater name + {COST_K!r} runs it with the cost-aware draft length)")


def make_method(name: str, pair, cfg: BenchConfig) -> Method:
    eopts = {**cfg.engine_options, "temperature": cfg.temperature, "top_p": cfg.top_p}
    if name == AR:
        return EngineMethod(name, pair, cfg.k, cfg.seed, target_only=True, engine_options=eopts)
    if name in HF_METHODS:
        return HFMethod(name, pair, assisted=name in (HF, HF_K), k=cfg.k, pinned=name == HF_K,
                        prompt_lookup=name == HF_PL, temperature=cfg.temperature, top_p=cfg.top_p,
                        seed=cfg.seed)
    if name in (NGRAM, NGRAM_ARCTIC):
        opts = {**cfg.ngram_options, **({"backend": "arctic"} if name == NGRAM_ARCTIC else {})}
        return EngineMethod(name, ngram_pair(pair, opts), cfg.k, cfg.seed, engine_options=eopts)
    if name.endswith(COST_K):  # e.g. frozen+cost_k: k chosen per round from measured costs
        base = name[: -len(COST_K)]
        return EngineMethod(name, pair, cfg.k, cfg.seed, updater=base,
                            options=cfg.updater_options.get(base, {}),
                            engine_options={**eopts, "cost_k": True, "k_max": max(cfg.k, 8)})
    return EngineMethod(name, pair, cfg.k, cfg.seed, updater=name,
                        options=cfg.updater_options.get(name, {}), engine_options=eopts)


# ---- measurements outside the runs --------------------------------------------------------------
@torch.inference_mode()
def decode_cost_s(model: torch.nn.Module, prompt: list[int], n: int) -> float:
    """Seconds per single-token cached forward (greedy), after a prefill."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    out = model(input_ids=torch.tensor([prompt], device=model.device), cache=cache, use_cache=True,
                logits_to_keep=1)
    x = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(n):
        x = model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / n


def measure_c(pair, prompt: list[int], n: int, reps: int = 5) -> dict[str, Any]:
    """c = draft/target per-token decode cost, interleaved repetitions, medians."""
    model = getattr(pair.draft, "model", None)
    if not isinstance(model, torch.nn.Module):
        return {"c": None, "note": "draft is not a standalone LM; see c_in_engine"}
    decode_cost_s(pair.target, prompt, 4)
    decode_cost_s(model, prompt, 4)  # warm-up
    t, d = [], []
    for _ in range(reps):
        t.append(decode_cost_s(pair.target, prompt, n))
        d.append(decode_cost_s(model, prompt, n))
    tm, dm = statistics.median(t), statistics.median(d)
    return {"c": dm / tm, "target_ms_per_token": tm * 1e3, "draft_ms_per_token": dm * 1e3}


def measure_bookkeeping(pair, prompts: list[list[int]], cfg: BenchConfig) -> dict[str, Any]:
    """The target as its own draft (every token accepted): per-round engine overhead."""
    from .drafts.lm import LMDraft
    from .engine import Engine
    self_pair = dataclasses.replace(pair, draft=LMDraft(pair.target, vocab_size=pair.target.config.vocab_size))
    eng = Engine(self_pair, k=cfg.k, seed=cfg.seed)
    eng.generate(prompts[0], cfg.warmup_tokens)
    wall = bk = rounds_wall = 0.0
    rounds = tokens = 0
    for ids in prompts:
        t0 = time.perf_counter()
        out = eng.generate(ids, cfg.max_new_tokens)
        wall += time.perf_counter() - t0
        bk += sum(r.bookkeeping_s for r in out.rounds)
        rounds_wall += sum(r.wall_s for r in out.rounds)
        rounds += len(out.rounds)
        tokens += len(out.token_ids)
    return {"bookkeeping_fraction": bk / wall, "outside_rounds_fraction": 1 - rounds_wall / wall,
            "bookkeeping_ms_per_round": bk / rounds * 1e3, "tau": tokens / rounds, "rounds": rounds,
            "prompts": len(prompts)}


# ---- the benchmark ----------------------------------------------------------------------------
def run_bench(pair, items, cfg: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    names = cfg.methods or default_methods(pair)
    check_methods(names)
    require(cfg.reps >= 1, f"--reps must be >= 1; got {cfg.reps}")
    require(AR in names, f"the bench needs {AR!r} among the methods (the baseline)")
    encode = lambda s: pair.tokenizer(s)["input_ids"]  # noqa: E731
    prompts = [encode(it.prompt) for it in items]
    require(all(prompts), "a prompt in the stream encodes to no tokens; remove empty prompts")
    machine = machine_info()

    log(f"warm-up: {', '.join(names)}")
    for name in names:  # throwaway instances: kernels, allocator, first autograd pass
        m = make_method(name, pair, cfg)
        for ids in prompts[:2]:
            m.run(ids, cfg.warmup_tokens)
    cost = measure_c(pair, prompts[0], cfg.cost_tokens)

    results: dict[str, list[list[PromptResult]]] = {n: [] for n in names}  # name -> rep -> prompts
    from tqdm.auto import tqdm
    bar = tqdm(total=cfg.reps * len(prompts) * len(names), unit="run", disable=not cfg.progress,
               dynamic_ncols=True, desc=cfg.desc or None,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} runs [{elapsed}, ETA {remaining}{postfix}]")
    for rep in range(cfg.reps):
        methods = {n: make_method(n, pair, cfg) for n in names}  # fresh drafts each repetition
        for n in names:
            results[n].append([])
        for i, (item, ids) in enumerate(zip(items, prompts)):
            s = (i + rep) % len(names)
            for n in names[s:] + names[:s]:  # rotate the order: no method always runs first
                r = methods[n].run(ids, cfg.max_new_tokens)
                r.topic = item.topic
                results[n][rep].append(r)
                bar.update(1)
        bar.set_postfix(rep=rep + 1)
    bar.close()
    longest = sorted(range(len(prompts)), key=lambda i: -len(results[AR][0][i].token_ids))  # no EOS-at-once prompts
    bk = (measure_bookkeeping(pair, [prompts[i] for i in sorted(longest[: cfg.bookkeeping_prompts])], cfg)
          if cfg.bookkeeping_prompts > 0 and pair.draft is not None else None)
    runs = summarize(results, names, cfg, cost.get("c"))
    machine["loadavg_end"] = machine_info()["loadavg"]
    return {"runs": runs, "machine": machine, "cost": cost, "bookkeeping_target_as_draft": bk,
            "topics": _topics(items), "n_prompts": len(items),
            "config": {**dataclasses.asdict(cfg), "methods": names, "pair": pair.name,
                       "target": pair.target_source, "draft": pair.draft_source,
                       "draft_kind": pair.draft_kind, "fast": getattr(pair, "fast", False)}}


def _topics(items) -> list[str]:
    out: list[str] = []
    for it in items:
        if it.topic not in out:
            out.append(it.topic)
    return out


@dataclass
class Totals:
    tokens: int = 0
    wall_s: float = 0.0
    forwards: int = 0
    drafted: int = 0
    tau_sum: int = 0
    update_s: float = 0.0
    bookkeeping_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    proposed: int = 0
    accepted: int = 0

    def add(self, r: PromptResult) -> None:
        self.tokens += len(r.token_ids)
        self.wall_s += r.wall_s
        self.forwards += r.forwards
        self.drafted += r.drafted
        self.tau_sum += r.tau_sum
        self.update_s += r.update_s
        self.bookkeeping_s += r.bookkeeping_s
        self.draft_s += r.draft_s
        self.verify_s += r.verify_s
        self.proposed += r.proposed
        self.accepted += r.accepted

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def tau(self) -> float:
        """Tokens per target forward (accepted + 1 per round, as emitted: a round cut at EOS
        counts the tokens it emitted), the same definition for the engine and for HF."""
        return self.tau_sum / self.forwards if self.forwards else 0.0


def _totals(rs: list[PromptResult], topic: str | None = None, skip_topic: str | None = None) -> Totals:
    t = Totals()
    for r in rs:
        if (topic is None or r.topic == topic) and (skip_topic is None or r.topic != skip_topic):
            t.add(r)
    return t


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def summarize(results: dict[str, list[list[PromptResult]]], names: list[str], cfg: BenchConfig,
              c: float | None) -> list[dict[str, Any]]:
    reps = range(cfg.reps)
    topics = _topics(results[names[0]][0])
    first = topics[0] if topics else None

    def tps(name: str, rep: int, topic: str | None = None) -> float:
        return _totals(results[name][rep], topic).tokens_per_s

    ar_ids = [r.token_ids for r in results[AR][0]]
    frozen_after = _totals(results["frozen"][0], skip_topic=first).tau if "frozen" in results else None
    ar_verify = _totals(results[AR][0])
    ar_s_per_forward = ar_verify.verify_s / ar_verify.forwards if ar_verify.forwards else None
    runs = []
    for n in names:
        tot = [_totals(results[n][rep]) for rep in reps]
        t0 = tot[0]
        run: dict[str, Any] = {
            "name": n,
            "tau": statistics.mean(t.tau for t in tot),
            "tokens_per_s": statistics.median(t.tokens_per_s for t in tot),
            "tokens_per_s_reps": _stats([t.tokens_per_s for t in tot]),
            "speedup_vs_ar": statistics.median(tps(n, r) / tps(AR, r) for r in reps),
            "speedup_vs_ar_reps": _stats([tps(n, r) / tps(AR, r) for r in reps]),
            "update_fraction": statistics.median(t.update_s / t.wall_s for t in tot),
            "target_forwards_per_token": t0.forwards / t0.tokens if t0.tokens else 0.0,
            "tokens": t0.tokens, "wall_s": [t.wall_s for t in tot],
            "drafted_per_forward": t0.drafted / t0.forwards if t0.forwards else 0.0,
            "proposed_per_forward": statistics.mean(t.proposed / t.forwards if t.forwards else 0.0 for t in tot),
            "acceptance": (statistics.mean(t.accepted / t.proposed for t in tot)
                           if all(t.proposed for t in tot) else None),
            # greedy: output identical to target_ar's; sampling: None (tests check the distribution)
            "matches_target": [r.token_ids for r in results[n][0]] == ar_ids if cfg.temperature == 0 else None,
        }
        if HF in results:
            run["speedup_vs_hf_assisted"] = statistics.median(tps(n, r) / tps(HF, r) for r in reps)
        if n not in (AR, HF_AR):
            if n not in HF_METHODS:
                run["bookkeeping_fraction"] = statistics.median(t.bookkeeping_s / t.wall_s for t in tot)
            if c is not None:  # the ideal speedup for this tau and this many drafts per forward
                run["bound"] = run["tau"] / (1 + run["drafted_per_forward"] * c)
                run["fraction_of_bound"] = run["speedup_vs_ar"] / run["bound"]
            if n not in HF_METHODS and t0.proposed and ar_s_per_forward:
                run["c_in_engine"] = (t0.draft_s / t0.proposed) / ar_s_per_forward
                run["verify_cost_vs_ar_forward"] = (t0.verify_s / t0.forwards) / ar_s_per_forward
                # the same bound with the costs as measured in the engine: a verify of k+1 tokens
                # costs v target steps (not 1) and a drafted token c_in_engine of one (for a
                # lookup draft: its lookup time per proposed token)
                run["bound_measured_costs"] = run["tau"] / (run["verify_cost_vs_ar_forward"] +
                                                            t0.proposed / t0.forwards * run["c_in_engine"])
        after = [_totals(results[n][r], skip_topic=first).tau for r in reps]
        if len(topics) > 1:
            run["tau_after_shift"] = statistics.mean(after)
            if frozen_after and n not in (AR, HF_AR):
                run["tau_after_shift_vs_frozen"] = run["tau_after_shift"] / frozen_after
        run["per_topic"] = {
            tp: {"tau": statistics.mean(_totals(results[n][r], tp).tau for r in reps),
                 "tokens_per_s": statistics.median(tps(n, r, tp) for r in reps),
                 "speedup_vs_ar": statistics.median(tps(n, r, tp) / tps(AR, r, tp) for r in reps)}
            for tp in topics}
        runs.append(run)
    return runs


# ---- output ----------------------------------------------------------------------------------
def _f(x: Any, fmt: str = ".2f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{fmt}}{suffix}"


def markdown_tables(report: dict[str, Any]) -> str:
    runs, topics = report["runs"], report["topics"]
    cfg, cost, m = report["config"], report["cost"], report["machine"]
    temp = cfg.get("temperature") or 0.0
    mode = "greedy" if not temp else f"sampling (temperature {temp:g}, top-p {cfg.get('top_p', 1.0):g})"
    lines = [f"k = {cfg['k']}, {report['n_prompts']} prompts x {cfg['max_new_tokens']} new tokens, {mode}, "
             f"{cfg['reps']} repetitions (median; min..max), {m['torch_threads']} torch thread(s) on "
             f"{m['cpu_count']} cores; c = {_f(cost.get('c'), '.3f')} "
             f"(draft {_f(cost.get('draft_ms_per_token'))} ms / target {_f(cost.get('target_ms_per_token'))} ms "
             "per token)", "",
             "| method | tau | acceptance | tokens/s | speedup vs AR | vs HF assisted | bound tau/(1+kc) "
             "| % of bound | bound tau/(v+kc') | update fraction | lossless |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        tr = r["tokens_per_s_reps"]
        frac = r.get("fraction_of_bound")
        lossless = {True: "yes", False: "NO", None: "-"}[r.get("matches_target")]
        lines.append(
            f"| {r['name']} | {r['tau']:.2f} | {_f(r.get('acceptance'), '.2f')} "
            f"| {r['tokens_per_s']:.1f} ({tr['min']:.1f}..{tr['max']:.1f}) "
            f"| {r['speedup_vs_ar']:.2f}x | {_f(r.get('speedup_vs_hf_assisted'), '.2f', 'x')} "
            f"| {_f(r.get('bound'), '.2f', 'x')} | {_f(None if frac is None else 100 * frac, '.0f', '%')} "
            f"| {_f(r.get('bound_measured_costs'), '.2f', 'x')} | {r['update_fraction']:.3f} | {lossless} |")
    lines += ["", "tau / speedup vs AR per topic (in stream order):", "",
              "| method | " + " | ".join(topics) + " | after first shift |",
              "|---|" + "---|" * (len(topics) + 1)]
    for r in runs:
        cells = [f"{r['per_topic'][t]['tau']:.2f} / {r['per_topic'][t]['speedup_vs_ar']:.2f}x" for t in topics]
        after = r.get("tau_after_shift")
        rel = r.get("tau_after_shift_vs_frozen")
        cells.append("-" if after is None else f"{after:.2f}" + ("" if rel is None else f" ({rel:.2f}x frozen)"))
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += ["", "acceptance = accepted / proposed draft tokens. v = cost of one verify (k+1 tokens) / one "
                  "target-only step and c' = cost of one drafted token / one target-only step, both as "
                  "measured inside the engine runs (c = 0 for lookup methods: no draft model)."]
    b = report.get("bookkeeping_target_as_draft")
    if b:
        lines += ["", f"Target as its own draft (tau {b['tau']:.2f}): bookkeeping {100 * b['bookkeeping_fraction']:.1f}% "
                      f"of wall ({b['bookkeeping_ms_per_round']:.2f} ms/round), outside rounds "
                      f"{100 * b['outside_rounds_fraction']:.1f}%."]
    return "\n".join(lines)


def sampling_table(report: dict[str, Any]) -> str:
    """tau / acceptance / speedup per method, one column group per sampling run (report["sampling"])."""
    runs = report.get("sampling") or []
    if not runs:
        return ""
    heads = [f"T={s['config']['temperature']:g}, top-p {s['config']['top_p']:g}" for s in runs]
    lines = ["| method | " + " | ".join(f"{h}: tau / acceptance / speedup vs AR" for h in heads) + " |",
             "|---|" + "---|" * len(runs)]
    for name in runs[0]["config"]["methods"]:
        cells = []
        for s in runs:
            r = next((x for x in s["runs"] if x["name"] == name), None)
            cells.append("-" if r is None else
                         f"{r['tau']:.2f} / {_f(r.get('acceptance'), '.2f')} / {r['speedup_vs_ar']:.2f}x")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    s0 = runs[0]
    lines += ["", f"{s0['n_prompts']} prompts x {s0['config']['max_new_tokens']} new tokens, "
                  f"{s0['config']['reps']} repetition(s) per setting; the same seeds for every method."]
    return "\n".join(lines)


def build_argparser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="onlinespec bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_args(ap)
    ap.set_defaults(limit=None, max_new_tokens=None)  # filled from the preset (see --quick)
    ap.add_argument("--methods", default=None,
                    help=f"comma-separated runs (default: {AR},{HF},{HF_K},{HF_PL},{NGRAM},frozen,"
                         f"<every registered updater>; also {', '.join(EXTRA_METHODS)})")
    ap.add_argument("--quick", action="store_true",
                    help="smoke preset: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items())
                         + " (explicit flags win). Without it: "
                         + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEFAULTS.items())
                         + "; --limit 0 = every prompt")
    ap.add_argument("--ngram-option", action="append", metavar="KEY=VALUE", default=[],
                    help="ngram draft option for the 'ngram' run: max_n, min_n, max_index_tokens, "
                         "use_stream, backend (python|arctic)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="main run: 0 = greedy (the lossless check), > 0 = sampling for every method")
    ap.add_argument("--top-p", type=float, default=1.0, help="top-p for the sampling runs")
    ap.add_argument("--sampling-temperatures", default=None, metavar="T1,T2",
                    help="extra sampling runs after the main run (e.g. 0.7,1.0 with --top-p 0.95): "
                         "tau / acceptance / speedup per method in one more table")
    ap.add_argument("--sampling-reps", type=int, default=1, help="repetitions of each sampling run")
    ap.add_argument("--updater-option", action="append", metavar="UPDATER:KEY=VALUE", default=[])
    ap.add_argument("--engine-option", action="append", metavar="KEY=VALUE", default=[],
                    help="EngineConfig field for every engine run, e.g. refresh_draft_cache=false")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of the whole stream")
    ap.add_argument("--warmup-tokens", type=int, default=None)
    ap.add_argument("--json", default=None, metavar="FILE", help="write the full report as JSON")
    ap.add_argument("--table", action="store_true", help="print paper-style Markdown tables")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--costs", choices=("on", "off", "only"), default="on",
                    help="the cost table (fast path vs plain HF, same run): on (default), off, or only it")
    ap.add_argument("--cost-reps", type=int, default=3, help="interleaved repetitions of the cost table")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_argparser().parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.limit == 0:
        args.limit = None  # every prompt of the stream
    temps = [float(t) for t in args.sampling_temperatures.split(",") if t.strip()] \
        if args.sampling_temperatures else []
    for t in [args.temperature, *temps]:
        SamplingConfig(t, 0, args.top_p)  # validates
    require(all(t > 0 for t in temps), "--sampling-temperatures must all be > 0 (the main run is the greedy one)")
    nopts = parse_options(args.ngram_option, "--ngram-option")
    if nopts:
        from .drafts.ngram import make_ngram_draft
        make_ngram_draft(2, **nopts)  # bad options fail before the models load
    from .updaters import make_updater
    opts = parse_scoped_options(args.updater_option)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    if methods:
        check_methods(methods)
        require(AR in methods, f"the bench needs {AR!r} among the methods (the baseline)")
    for name, o in opts.items():
        check_methods([name])
        make_updater(name, **o)  # bad options fail before the models load
    eopts = parse_options(args.engine_option, "--engine-option")
    from .engine import EngineConfig
    fields = [f.name for f in dataclasses.fields(EngineConfig) if f.name not in ("k", "seed")]
    for key in eopts:
        require(key in fields, f"--engine-option {key!r} is not an engine setting; use one of {', '.join(fields)}")
    items = load_items(args.stream, args.limit)
    if args.threads:
        torch.set_num_threads(args.threads)
    pair = load_pair_from_args(args)
    cfg = BenchConfig(k=args.k, max_new_tokens=args.max_new_tokens, reps=args.reps,
                      warmup_tokens=args.warmup_tokens, seed=args.seed, methods=methods,
                      updater_options=opts, engine_options=eopts,
                      progress=not args.no_progress, temperature=args.temperature, top_p=args.top_p,
                      ngram_options=nopts, desc="greedy" if args.temperature == 0 else f"T={args.temperature:g}")
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    costs = None
    if args.costs != "off":
        from .costs import cost_table, format_cost_table
        log("cost table: fast path vs plain HF, interleaved")
        cost_prompts = [pair.tokenizer(it.prompt)["input_ids"] for it in items[:: max(1, len(items) // 4)][:4]]
        costs = cost_table(pair, cost_prompts, k=args.k, reps=args.cost_reps,
                           max_new_tokens=min(32, args.max_new_tokens))
        print(format_cost_table(costs))
        if args.costs == "only":
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(dumps({"costs": costs, "machine": machine_info()}))
            return 0
    report = run_bench(pair, items, cfg, log=log)
    report["costs"] = costs
    report["sampling"] = []
    for t in temps:
        scfg = dataclasses.replace(cfg, temperature=t, reps=args.sampling_reps, bookkeeping_prompts=0,
                                   desc=f"T={t:g}")
        report["sampling"].append(run_bench(pair, items, scfg, log=log))
    report["command"] = "onlinespec bench " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(dumps(report))
    if args.table:
        print(markdown_tables(report))
        if report["sampling"]:
            print("\nSampling runs:\n")
            print(sampling_table(report))
    else:
        for r in report["runs"]:
            print(f"{r['name']:>16}: tau {r['tau']:.2f}  {r['tokens_per_s']:.1f} tok/s  "
                  f"{r['speedup_vs_ar']:.2f}x vs AR  update {r['update_fraction']:.3f}")
        for srep in report["sampling"]:
            c = srep["config"]
            for r in srep["runs"]:
                print(f"{r['name']:>16} (T={c['temperature']:g}, top-p {c['top_p']:g}): tau {r['tau']:.2f}  "
                      f"acceptance {_f(r.get('acceptance'))}  {r['speedup_vs_ar']:.2f}x vs AR")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
