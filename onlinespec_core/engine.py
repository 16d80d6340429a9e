"""Engine: owns the pair, the draft's state and the updater; runs rounds; emits events;
applies control requests between rounds only; saves and restores its state."""
from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch

from . import state as state_fmt
from .decoding import DecodeState, new_target_cache, run_round
from .driver import Driver, Event, RunControl
from .errors import OnlineSpecError, require
from .feedback import Round
from .metrics import Metrics
from .models import ModelPair
from .options import DecodeSettings, is_int
from .sampling import SamplingConfig
from .updaters import REGISTRY, make_updater

K_MAX = 32
STATE_VERSION = state_fmt.STATE_VERSION
MAX_NEW_TOKENS = 1 << 20
MAX_PROMPT_CHARS = 1 << 20  # longer text is refused before tokenising
DEFAULT_CONTEXT = 1 << 17  # bound when a model declares no maximum positions
T = TypeVar("T")


@dataclass
class EngineConfig(DecodeSettings):
    dynamic_k: bool = False  # HF's heuristic: +2 after a fully accepted round, -1 otherwise
    cost_k: bool = False  # per round, the k in 0..k_max with the most expected tokens/s (kpolicy)
    k_min: int = 1
    k_max: int = 16
    feedback_window: int = 256  # context ids kept in each Round for the draft's online loss
    keep_distributions: bool = False  # keep logits in out.rounds (memory grows with rounds)
    refresh_draft_cache: bool = True  # re-read the context after an update (stale KV otherwise)

    def validate(self, has_draft: bool) -> None:
        self.validate_decode(K_MAX)
        for name in ("k_min", "k_max"):
            v = getattr(self, name)
            require(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= K_MAX,
                    f"{name} must be an integer in 0..{K_MAX} (0 = target-only decoding); got {v!r}")
        require(self.k_min <= self.k_max, f"k_min ({self.k_min}) must be <= k_max ({self.k_max})")
        require(has_draft or self.k == 0,
                "this pair has no draft; use k=0 (target-only) or load a pair with a draft")
        require(is_int(self.feedback_window) and self.feedback_window >= 0,
                f"feedback_window must be an integer >= 0; got {self.feedback_window!r}")
        require(not (self.dynamic_k and self.cost_k), "pick one of dynamic_k and cost_k")
        for name in ("dynamic_k", "cost_k", "keep_distributions", "refresh_draft_cache"):
            require(isinstance(getattr(self, name), bool),
                    f"{name} must be True or False; got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: "EngineConfig", has_draft: bool, where: str) -> "EngineConfig":
        names = {f.name for f in fields(cls)}
        bad = sorted(set(d) - names)
        require(not bad, f"{where}: unknown engine option(s) {bad}; valid: {', '.join(sorted(names))}")
        cfg = cls(**{**asdict(base), **d})
        cfg.validate(has_draft)
        return cfg


@dataclass
class GenerateOutput:
    token_ids: list[int]
    text: str
    rounds: list[Round]
    stats: dict[str, Any]


class Engine:
    def __init__(self, pair: ModelPair, k: int = 4, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, updater: str = "frozen",
                 updater_options: dict[str, Any] | None = None,
                 verify_fn: Callable[..., Any] | None = None, **config: Any) -> None:
        self.pair = pair
        # verify_fn(target, state, drafted, cfg, need_hidden) -> decoding.Verification; None =
        # one real target forward (compare mode may plug in a shared greedy target trace)
        self.verify_fn = verify_fn
        self.config = EngineConfig(k=k, temperature=temperature, top_k=top_k, top_p=top_p,
                                   seed=seed, **config)
        self.config.validate(pair.draft is not None)
        require(isinstance(updater, str), f"updater must be a name (one of {', '.join(REGISTRY)}); got {updater!r}")
        require(updater_options is None or isinstance(updater_options, dict),
                f"updater_options must be a dict of option -> value; got {updater_options!r}")
        self.device = pair.device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.round_index = 0
        self._costk = None  # kpolicy.CostK when config.cost_k (built at the first round)
        self.metrics = Metrics()  # lifetime totals (all prompts)
        self.updater_name = updater
        self.updater_options = dict(updater_options or {})
        self.updater = make_updater(updater, **self.updater_options)
        if pair.draft is not None:
            self.updater.attach(pair.draft)
        self._requests: queue.SimpleQueue[Callable[[], Event | None]] = queue.SimpleQueue()
        self._lock = threading.RLock()  # held while a request applies; guards _running/_runner
        self._running = False
        self._runner: int | None = None  # thread iterating the running stream
        self.control = RunControl()  # pause/step/stop/shift; a Driver shares its own

    # ---- sampling / config -------------------------------------------------------------
    @property
    def draft(self):
        return self.pair.draft

    @property
    def k(self) -> int:
        return self.config.k

    @property
    def sampling(self) -> SamplingConfig:
        return self.config.sampling

    # ---- control requests: applied between rounds --------------------------------------
    def _request(self, fn: Callable[[], Event | None]) -> Event | None:
        """While a stream runs: queue fn for its next drain (between rounds). Idle: apply now,
        under the lock a starting stream takes first, so no round can overlap it."""
        with self._lock:
            if self._running:
                self._requests.put(fn)
                self.control.wake()  # a paused stream drains too
                return None
            return fn()

    def _call(self, fn: Callable[[], T], timeout: float | None) -> T:
        """fn() between rounds (at once when idle or when called from the stream's own thread,
        which is then between rounds); waits for and returns its result or exception."""
        fut: Future = Future()

        def job() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # delivered to the caller
                    fut.set_exception(e)
        with self._lock:
            queued = self._running and threading.get_ident() != self._runner
            if queued:
                self._requests.put(job)
                self.control.wake()
            else:
                job()
        try:
            return fut.result(timeout if queued else None)
        except FutureTimeout:
            if fut.cancel():
                raise OnlineSpecError(
                    f"the running generate did not reach the end of a round within {timeout} s, so "
                    "the request was dropped; try again, pass a longer timeout, or stop the run first") from None
            return fut.result()

    def _drain_requests(self) -> list[Event]:
        """Apply the requests queued before this call; later ones wait for the next drain."""
        events = []
        for _ in range(self._requests.qsize()):
            try:
                fn = self._requests.get_nowait()
            except queue.Empty:
                break
            with self._lock:
                ev = fn()
            if ev is not None:
                events.append(ev)
        return events

    def set_k(self, k: int, dynamic: bool | None = None) -> None:
        new = EngineConfig(**{**asdict(self.config), "k": k,
                              "dynamic_k": self.config.dynamic_k if dynamic is None else dynamic})
        new.validate(self.draft is not None)

        def apply() -> Event:
            self.config.k, self.config.dynamic_k = new.k, new.dynamic_k
            return Event("config", data={"k": new.k, "dynamic_k": new.dynamic_k})
        self._request(apply)

    def set_sampling(self, temperature: float, top_k: int | None = None, top_p: float | None = None) -> None:
        cfg = SamplingConfig(temperature, self.config.top_k if top_k is None else top_k,
                             self.config.top_p if top_p is None else top_p)

        def apply() -> Event:
            self.config.temperature, self.config.top_k, self.config.top_p = \
                cfg.temperature, cfg.top_k, cfg.top_p
            return Event("config", data=asdict(cfg))
        self._request(apply)

    def set_temperature(self, temperature: float) -> None:
        self.set_sampling(temperature)

    def set_updater(self, name: str, **options: Any) -> None:
        """Switch the online algorithm; the deployed weights carry over."""
        new = make_updater(name, **options)  # validate now, in the caller's thread

        def apply() -> Event:
            old = self.updater_name
            if self.draft is not None:
                self.updater.detach()
                self.draft.invalidate()
                new.attach(self.draft)
            self.updater, self.updater_name, self.updater_options = new, name, dict(options)
            return Event("updater", data={"from": old, "to": name, "options": dict(options),
                                          "round": self.round_index})
        self._request(apply)

    # ---- decoding ----------------------------------------------------------------------
    def encode(self, prompt: str | list[int] | torch.Tensor) -> torch.Tensor:
        kinds = "a string, a list of token ids or a 1-D integer tensor"
        if isinstance(prompt, str):
            require(len(prompt) <= MAX_PROMPT_CHARS, f"the prompt has {len(prompt)} characters, more than "
                                                     f"{MAX_PROMPT_CHARS}; shorten it")
            limit = self.context_limit()  # a token covers at most the longest vocab entry's characters
            require(len(prompt) <= limit * self._max_token_chars(),
                    f"the prompt ({len(prompt)} characters) cannot fit the model's {limit} positions; "
                    "shorten the prompt")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise OnlineSpecError(f"the prompt contains {prompt[e.start:e.end]!r} at character {e.start}, "
                                      "which is not valid text (a lone surrogate); remove it or fix the "
                                      "escape that produced it") from e
            ids = self.pair.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, torch.Tensor):
            require(not prompt.is_floating_point() and not prompt.is_complex() and prompt.dtype != torch.bool,
                    f"prompt tensor has dtype {prompt.dtype}; token ids must be integers (torch.long)")
            ids = prompt.reshape(-1).tolist()
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            bad_t = [i for i in ids if not is_int(i)]
            require(not bad_t, f"prompt ids must be integers; got {bad_t[:3]!r}; encode the prompt with "
                               "the pair's tokenizer")
        else:
            raise OnlineSpecError(f"the prompt must be {kinds}; got {type(prompt).__name__}")
        require(len(ids) > 0, "the prompt is empty; give at least one token of text")
        vocab = self.pair.target.config.vocab_size
        if self.draft is not None and getattr(self.draft, "kind", None) == "lm":
            vocab = min(vocab, self.draft.module.get_input_embeddings().num_embeddings)
        bad = [i for i in ids if not (0 <= int(i) < vocab)]
        require(not bad, f"prompt ids {bad[:5]} are outside the vocabulary (0..{vocab - 1}); "
                         "encode the prompt with the pair's tokenizer")
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def _max_token_chars(self) -> int:
        if getattr(self, "_token_chars", None) is None:
            try:
                self._token_chars = max(1, max(len(t) for t in self.pair.tokenizer.get_vocab()))
            except Exception:  # no vocab listing: no cheap bound
                self._token_chars = MAX_PROMPT_CHARS
        return self._token_chars

    def context_limit(self) -> int:
        """Positions the target (and an lm draft) can attend to."""
        limits = []
        for m in (self.pair.target, getattr(self.draft, "module", None)):
            cfg = getattr(m, "config", None)
            for name in ("n_positions", "max_position_embeddings"):
                v = getattr(cfg, name, None)
                if is_int(v) and v > 0:
                    limits.append(v)
                    break
        return min(limits) if limits else DEFAULT_CONTEXT

    def check_lengths(self, prompt_len: int, max_new_tokens: Any) -> None:
        require(is_int(max_new_tokens) and 1 <= max_new_tokens <= MAX_NEW_TOKENS,
                f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS}; got {max_new_tokens!r}")
        limit = self.context_limit()
        require(prompt_len + max_new_tokens <= limit,
                f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) exceed the "
                f"model's {limit} positions; shorten the prompt or lower max_new_tokens")

    def stream(self, prompt: str | list[int] | torch.Tensor, max_new_tokens: int = 64,
               topic: str | None = None, prompt_index: int | None = None,
               target_only: bool = False, in_run: bool = False,
               cut_on_shift: bool = False) -> Iterator[Event]:
        """Yield an event per round (plus config/updater/pause events) for one prompt. in_run:
        a Driver runs it (its stop request stands; cut_on_shift: a topic shift ends it)."""
        require(is_int(max_new_tokens) and max_new_tokens >= 1,
                f"max_new_tokens must be a positive integer; got {max_new_tokens!r}")
        seq = self.encode(prompt)
        self.check_lengths(seq.numel(), max_new_tokens)
        state = DecodeState(seq=seq, prompt_len=seq.numel(), cache=new_target_cache(self.pair.target))
        draft = None if target_only else self.draft
        eos = self.pair.eos_ids
        with self._lock:  # from here on requests queue (none can be mid-apply: they hold the lock)
            self._running = True
            self._runner = threading.get_ident()
            if not in_run:
                self.control.reset()
        metrics = Metrics()
        try:
            if draft is not None:
                draft.reset()
            yield Event("start", data={"prompt_len": state.prompt_len, "topic": topic,
                                       "prompt_index": prompt_index, "target_only": target_only})
            for ev in self._drain_requests():
                yield ev
            ctl = self.control
            while True:
                yield from ctl.hold(self._drain_requests, self.round_index)
                if ctl.stopping or (cut_on_shift and ctl.shifting):
                    break
                budget = max_new_tokens - (state.seq.numel() - state.prompt_len)
                k = self.config.k if draft is not None else 0
                prefill = state.cache.get_seq_length() == 0
                if draft is not None and self.config.cost_k:
                    k = self._cost_k().best_k()
                if draft is not None and draft.needs_hidden and prefill:
                    k = 0  # feature drafts need the target's hidden states: round 0 is the prefill
                rnd = run_round(self.pair.target, draft, state, k, self.sampling, self.generator,
                                self.round_index, eos, budget, self.config.feedback_window,
                                self.verify_fn, topic=topic, prompt_index=prompt_index)
                self.round_index += 1
                if draft is not None and self.config.cost_k:
                    self._cost_k().observe(rnd, prefill)
                if draft is not None and rnd.k > 0:
                    t0 = time.perf_counter()
                    upd = self.updater.observe(rnd)
                    # the round record, assembled once: decode part + what the updater did
                    rnd = replace(rnd, updated=upd.changed, loss=upd.loss,
                                  update_s=time.perf_counter() - t0)
                    if upd.changed and self.config.refresh_draft_cache:
                        draft.invalidate()
                    if self.config.dynamic_k:
                        step = 2 if rnd.accepted == rnd.k else -1
                        self.config.k = max(self.config.k_min, min(self.config.k_max, self.config.k + step))
                if not self.config.keep_distributions:
                    rnd.release()
                metrics.add(rnd)
                self.metrics.add(rnd)
                yield Event("round", round=rnd, updater=self.updater.snapshot())
                for ev in self._drain_requests():
                    yield ev
                done = budget - len(rnd.emitted) <= 0 or (rnd.emitted and rnd.emitted[-1] in eos)
                if done:
                    break
        finally:
            with self._lock:  # requests that arrived during the last round; later ones apply at once
                self._running, self._runner = False, None
                tail = self._drain_requests()
        for ev in tail:
            yield ev
        if draft is not None:
            draft.observe_sequence(state.seq)  # drafts that index what they have seen (ngram)
        new = state.new_tokens
        kind = "stopped" if self.control.stopping else "done"
        yield Event(kind, data={"token_ids": new, "stats": self._stats(metrics),
                                "topic": topic, "prompt_index": prompt_index})

    def _cost_k(self):
        from .kpolicy import CostK
        c = self.config
        if self._costk is None or self._costk.k_max != c.k_max:
            self._costk = CostK(k_max=c.k_max, k_min=0)
        return self._costk

    def _stats(self, m: Metrics) -> dict[str, Any]:
        d = m.as_dict()
        d["updater"] = self.updater_name
        d["k"] = self.config.k
        return d

    def generate(self, prompt: str | list[int] | torch.Tensor, max_new_tokens: int = 64,
                 target_only: bool = False) -> GenerateOutput:
        rounds: list[Round] = []
        final: dict[str, Any] = {}
        for ev in self.stream(prompt, max_new_tokens, target_only=target_only):
            if ev.kind == "round":
                rounds.append(ev.round)
            elif ev.kind in ("done", "stopped"):
                final = ev.data
        ids = final.get("token_ids", [])
        text = self.pair.tokenizer.decode(ids, skip_special_tokens=True)
        return GenerateOutput(ids, text, rounds, final.get("stats", {}))

    def generate_target_only(self, prompt: str | list[int] | torch.Tensor,
                             max_new_tokens: int = 64) -> GenerateOutput:
        """The baseline: plain autoregressive decoding through the same code path."""
        return self.generate(prompt, max_new_tokens, target_only=True)

    def run_stream(self, prompts: Iterable[Any], max_new_tokens: int = 64) -> Iterator[Event]:
        """Run a prompt stream (items with .topic/.prompt or (topic, prompt) or str) through the
        driver; a shift_topic() request skips the rest of the current topic."""
        for _, ev in Driver([self], self.control).run(prompts, max_new_tokens):
            yield ev

    # ---- state -------------------------------------------------------------------------
    def save_state(self, path: str | os.PathLike, timeout: float | None = 60.0) -> Path:
        """Evolved draft + updater state + config + RNG, atomically (onlinespec_core.state).
        During a generate in another thread it runs between rounds (waits up to timeout s)."""
        require(self.draft is not None, "nothing to save: this engine has no draft")
        return self._call(lambda: self._save_now(path), timeout)

    def _save_now(self, path: str | os.PathLike) -> Path:
        draft = self.draft
        self.updater.detach()  # the deployed weights are in draft.module
        tensors = {f"updater.{k}": v for k, v in self.updater.state_tensors().items()}
        tensors.update({f"draft.{k}": v for k, v in draft.state_tensors().items()})
        tensors["rng"] = self.generator.get_state()
        meta = {
            "config": asdict(self.config), "round_index": self.round_index,
            "updater": {"name": self.updater_name, "options": self.updater_options,
                        "state": self.updater.state_json()},
            "draft_kind": draft.kind, "pair": self.pair.name,
            "draft_source": self.pair.draft_source, "target_source": self.pair.target_source,
            "fingerprint": {"target": state_fmt.target_fingerprint(self.pair.target),
                            "target_sample": state_fmt.target_sample(self.pair.target),
                            "draft": state_fmt.draft_fingerprint(draft)},
            "metrics": self.metrics.as_dict(),
        }
        return state_fmt.write_state(path, meta, draft.module, tensors)

    def load_state(self, path: str | os.PathLike, timeout: float | None = 60.0) -> None:
        """All or nothing: everything is checked before the engine changes. During a generate in
        another thread it runs between rounds (waits up to timeout s)."""
        self._call(lambda: self._load_now(path), timeout)

    def _load_now(self, path: str | os.PathLike) -> None:
        fix = state_fmt.FIX
        st = state_fmt.read_state(path)
        meta, where = st.meta, f"saved state {str(st.path)!r}"
        state_fmt.check_pair(meta, self.pair.target, self.draft, where)
        try:
            cfg = EngineConfig.from_dict(meta["config"], self.config, True, where)
        except (TypeError, ValueError) as e:
            raise OnlineSpecError(f"{where} has a bad config ({e}); {fix}") from e
        u = meta["updater"]
        require(u["name"] in REGISTRY, f"{where} uses updater {u['name']!r}, which this OnlineSpec does "
                                       f"not have (available: {', '.join(REGISTRY)}); {fix}")
        try:
            updater = make_updater(u["name"], **u["options"])
        except OnlineSpecError as e:
            raise OnlineSpecError(f"{where} has bad updater options: {e}") from e
        tensors = st.tensors or {}
        rng = tensors.get("rng")
        require(rng is not None and rng.dtype == torch.uint8 and rng.dim() == 1,
                f"{where} is corrupt (no valid RNG state in state.safetensors); {fix}")
        try:
            torch.Generator(device=self.device).set_state(rng.cpu())
        except (RuntimeError, TypeError) as e:
            raise OnlineSpecError(f"{where} is corrupt (RNG state: {e}); {fix}") from e
        assert st.draft is not None
        draft = self.draft
        self.updater.detach()
        backup = {k: v.detach().clone() for k, v in draft.module.state_dict().items()}
        utensors = {k[len("updater."):]: v.to(self.device) for k, v in tensors.items() if k.startswith("updater.")}
        dtensors = {k[len("draft."):]: v for k, v in tensors.items() if k.startswith("draft.")}
        before = draft.state_tensors()
        try:
            state_fmt.load_weights(draft.module, st.draft, where, fix)  # checks before writing
            if before or dtensors:  # a kind that learns outside its weights: the saved state (empty if none)
                draft.load_state_tensors(dtensors or {k: v[:0] for k, v in before.items()})
            updater.attach(draft)
            try:
                updater.load_state(utensors, u["state"])
            except OnlineSpecError:
                raise
            except Exception as e:
                raise OnlineSpecError(f"{where}: the updater state is corrupt or from another version "
                                      f"({type(e).__name__}: {str(e)[:200]}); {fix}") from e
        except BaseException:
            with torch.no_grad():  # roll back
                for k, v in draft.module.state_dict().items():
                    v.copy_(backup[k])
            if before:
                draft.load_state_tensors(before)
            draft.invalidate()
            raise
        self.config, self.round_index = cfg, meta["round_index"]
        self.updater, self.updater_name, self.updater_options = updater, u["name"], dict(u["options"])
        self.generator.set_state(rng.cpu())
        draft.invalidate()

