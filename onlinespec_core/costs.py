"""The cost table of `onlinespec bench`: what one round costs on the fast path and on plain HF,
measured side by side in one process (interleaved repetitions, medians).

  t(n)        target forward of n new tokens after a real prompt (ms), the n's taking turns on
              one cache; v(n) = t(n) / t(1)
  draft step  one drafted token (ms) as the engine drafts it; c = draft step / t(1)
  update step one ogd step (Adam) on a batch of feedback rows (ms), and the draft's context
              re-read the next propose pays after an update
  round       propose k + verify k+1 + accept (ms, frozen draft, real prompts)
  break-even  tau at which speculation matches target-only decoding = round / AR ms per token
  AR tok/s    target-only decoding through the engine on each path, and HF `generate`
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import torch

from .decoding import new_target_cache, target_forward
from .models import ModelPair, set_fast

PATHS = ("fast", "hf")
N_TOKENS = (1, 2, 5, 9)


def _median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


@torch.inference_mode()
def target_ms(pair: ModelPair, prompt: list[int], n: int, iters: int = 8) -> float:
    """Median ms of a target forward of n tokens appended after prompt (cache cropped back)."""
    return target_ms_all(pair, prompt, (n,), iters)[n]


@torch.inference_mode()
def target_ms_all(pair: ModelPair, prompt: list[int], ns: tuple[int, ...] = N_TOKENS,
                  iters: int = 8) -> dict[int, float]:
    """Median ms of a target forward of n tokens after prompt, for every n in ns, the n's taking
    turns on one cache (cropped back each time): v(n) = t(n) / t(1) is then a ratio of times
    measured under the same machine state (blocks of one n at a time drift with the load)."""
    ids = torch.tensor(prompt, device=pair.device)
    cache = new_target_cache(pair.target)
    target_forward(pair.target, ids, cache, 1, False)
    news = {n: ids[:n] if ids.numel() >= n else ids.repeat(n)[:n] for n in ns}
    ts: dict[int, list[float]] = {n: [] for n in ns}
    for it in range(iters):
        for n in (ns if it % 2 == 0 else ns[::-1]):
            t0 = time.perf_counter()
            target_forward(pair.target, news[n], cache, n, False)
            ts[n].append(time.perf_counter() - t0)
            cache.crop(-n)
    return {n: _median_ms(v) for n, v in ts.items()}


def draft_step_ms(pair: ModelPair, prompt: list[int], k: int, iters: int = 8) -> float | None:
    """Median ms per drafted token: propose k after the prompt, then roll the draft back."""
    from .sampling import SamplingConfig
    d = pair.draft
    if d is None or d.needs_hidden:
        return None  # feature drafts need the target's features: see round ms instead
    seq = torch.tensor(prompt, device=pair.device)
    cfg = SamplingConfig()
    d.reset()
    d.propose(seq, 1, cfg, None)
    d.commit(seq.numel() - 1)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        d.propose(seq, k, cfg, None)
        ts.append((time.perf_counter() - t0) / k)
        d.commit(seq.numel() - 1)
    d.reset()
    return _median_ms(ts)


def _rounds(pair: ModelPair, prompts: list[list[int]], k: int, max_new_tokens: int):
    from .engine import Engine
    eng = Engine(pair, k=k, keep_distributions=True)
    out = []
    for ids in prompts:
        o = eng.generate(ids, max_new_tokens)
        out.append((list(ids) + o.token_ids, [r for r in o.rounds if r.k > 0]))
    return out


def round_ms(pair: ModelPair, prompts: list[list[int]], k: int, max_new_tokens: int) -> dict[str, float]:
    """Frozen draft on real prompts: median ms per round, split into draft / verify / rest."""
    rs = [r for _, seq in _rounds(pair, prompts, k, max_new_tokens) for r in seq]
    tot = [r.draft_s + r.verify_s + r.bookkeeping_s for r in rs]
    return {"round_ms": _median_ms(tot), "draft_ms": _median_ms([r.draft_s for r in rs]),
            "verify_ms": _median_ms([r.verify_s for r in rs]),
            "tau": sum(len(r.emitted) for r in rs) / max(1, len(rs))}


def update_ms(pair: ModelPair, prompts: list[list[int]], k: int, rows: int,
              iters: int = 7, warmup: int = 8) -> dict[str, Any] | None:
    """One ogd step on the most recent feedback rounds holding about `rows` rows (path
    positions), as the engine would buffer them: the last prompt's rounds first, then earlier
    prompts' (those re-read their context: the draft's cache holds only the current sequence).
    In steady state, as a run takes its hundreds of steps: `warmup` untimed steps first (a run's
    first steps create the optimizer state and grow the allocator's heap: 64 rows measured
    32, 24, 20, 18 ms for steps 1-4 and 14-16 ms from about the 8th on)."""
    from .bench import clone_pair
    from .sampling import SamplingConfig
    from .updaters import make_updater
    from .updaters.losses import n_positions
    if pair.draft is None:
        return None
    p = clone_pair(pair)
    runs = _rounds(p, prompts, k, 64)
    batch: list = []
    for _, rounds in reversed(runs):
        for r in reversed(rounds):
            if sum(n_positions(x, "path") for x in batch) >= rows:
                break
            batch.insert(0, r)
    full, last = runs[-1]
    end = last[-1].context_len + len(last[-1].emitted)
    seq = torch.tensor(full[:end], device=pair.device)
    up = make_updater("ogd", batch=len(batch), every=10**6)
    up.attach(p.draft)
    steps, rereads = [], []
    for it in range(warmup + iters):
        t0 = time.perf_counter()
        p.draft.reset()  # after an update the next propose re-reads the context
        p.draft.propose(seq, 1, SamplingConfig(), None)
        p.draft.commit(seq.numel())
        t1 = time.perf_counter()
        up._guarded_step(batch, len(batch))
        t2 = time.perf_counter()
        if it >= warmup:
            rereads.append(t1 - t0)
            steps.append(t2 - t1)
    up.detach()
    return {"rows": sum(n_positions(x, "path") for x in batch), "rounds": len(batch),
            "update_ms": _median_ms(steps), "reread_ms": _median_ms(rereads)}


@torch.inference_mode()
def ar_tokens_per_s(pair: ModelPair, prompts: list[list[int]], max_new_tokens: int) -> float:
    from .engine import Engine
    eng = Engine(pair, k=0)
    t0, n = time.perf_counter(), 0
    for ids in prompts:
        n += len(eng.generate(ids, max_new_tokens, target_only=True).token_ids)
    return n / (time.perf_counter() - t0)


@torch.inference_mode()
def hf_generate_tokens_per_s(pair: ModelPair, prompts: list[list[int]], max_new_tokens: int) -> float:
    """Plain HF greedy `generate` (the pair must be on the plain path)."""
    t0, n = time.perf_counter(), 0
    for ids in prompts:
        x = torch.tensor([ids], device=pair.device)
        out = pair.target.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                   max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                   pad_token_id=pair.tokenizer.pad_token_id or 0)
        n += out.shape[1] - x.shape[1]
    return n / (time.perf_counter() - t0)


def cost_table(pair: ModelPair, prompts: list[list[int]], k: int = 4, reps: int = 3,
               max_new_tokens: int = 32, update_rows: tuple[int, ...] = (8, 64)) -> dict[str, Any]:
    """Every quantity on both paths, repetitions interleaved (fast, hf, fast, hf, ...)."""
    was = pair.fast
    raw: dict[str, dict[str, list]] = {p: {} for p in PATHS}
    raw_hf_gen: list[float] = []

    def add(path: str, key: str, v: Any) -> None:
        raw[path].setdefault(key, []).append(v)
    try:
        for _ in range(reps):
            for path in PATHS:
                if set_fast(pair, path == "fast") != (path == "fast"):
                    continue  # no fast path on this device
                for n, t in target_ms_all(pair, prompts[0], N_TOKENS, iters=16).items():
                    add(path, f"t{n}_ms", t)
                add(path, "draft_step_ms", draft_step_ms(pair, prompts[0], k))
                for key, v in round_ms(pair, prompts, k, max_new_tokens).items():
                    add(path, key, v)
                for rows in update_rows:
                    u = update_ms(pair, prompts, k, rows)
                    if u is not None:
                        add(path, f"update{rows}_ms", u["update_ms"])
                        add(path, f"update{rows}_rows", u["rows"])
                        add(path, "reread_ms", u["reread_ms"])
                add(path, "ar_tok_s", ar_tokens_per_s(pair, prompts, max_new_tokens))
                if path == "hf":
                    raw_hf_gen.append(hf_generate_tokens_per_s(pair, prompts, max_new_tokens))
    finally:
        set_fast(pair, was)
    from . import fast
    out: dict[str, Any] = {"k": k, "reps": reps, "prompts": len(prompts), "max_new_tokens": max_new_tokens,
                           "kernels": fast.kernels() is not None, "threads": torch.get_num_threads()}
    for path in PATHS:
        if not raw[path]:
            continue
        m = {key: (statistics.median(vs) if all(v is not None for v in vs) else None)
             for key, vs in raw[path].items()}
        t1 = m["t1_ms"]
        m.update({f"v{n}": m[f"t{n}_ms"] / t1 for n in N_TOKENS})
        if m.get("draft_step_ms") is not None:
            m["c"] = m["draft_step_ms"] / t1
        m["ar_ms_per_token"] = 1e3 / m["ar_tok_s"]
        m["break_even_tau"] = m["round_ms"] / m["ar_ms_per_token"]
        out[path] = m
    if raw_hf_gen:
        out["hf_generate_tok_s"] = statistics.median(raw_hf_gen)
    if "fast" in out and "hf" in out:
        f, h = out["fast"], out["hf"]
        out["ratios"] = {
            "ar_fast_vs_hf_generate": f["ar_tok_s"] / out["hf_generate_tok_s"],
            "ar_fast_vs_ar_hf": f["ar_tok_s"] / h["ar_tok_s"],
            "t1_hf_over_fast": h["t1_ms"] / f["t1_ms"],
            "t5_hf_over_fast": h["t5_ms"] / f["t5_ms"],
            "v5_fast_vs_hf_step": f["t5_ms"] / h["t1_ms"],
            "draft_step_hf_over_fast": (h["draft_step_ms"] / f["draft_step_ms"]
                                        if f.get("draft_step_ms") and h.get("draft_step_ms") else None),
        }
    return out


def format_cost_table(t: dict[str, Any]) -> str:
    paths = [p for p in PATHS if p in t]
    rows = [("target t(1) / t(2) / t(5) / t(9) ms", lambda m: " / ".join(f"{m[f't{n}_ms']:.2f}" for n in N_TOKENS)),
            ("v(2) / v(5) / v(9)", lambda m: " / ".join(f"{m[f'v{n}']:.2f}" for n in N_TOKENS[1:])),
            ("draft step ms (c)", lambda m: "-" if m.get("draft_step_ms") is None
             else f"{m['draft_step_ms']:.3f} ({m['c']:.3f})"),
            (f"round ms at k={t['k']} (draft + verify)", lambda m: f"{m['round_ms']:.2f} ({m['draft_ms']:.2f} + {m['verify_ms']:.2f})"),
            ("update step ms (rows)", lambda m: ", ".join(
                f"{m[k]:.1f} ({m[k.replace('_ms', '_rows')]:.0f})" for k in m if k.startswith("update") and k.endswith("_ms"))),
            ("context re-read after an update ms", lambda m: f"{m['reread_ms']:.2f}" if "reread_ms" in m else "-"),
            ("target-only AR tok/s (ms/token)", lambda m: f"{m['ar_tok_s']:.1f} ({m['ar_ms_per_token']:.2f})"),
            ("break-even tau = round / AR ms per token", lambda m: f"{m['break_even_tau']:.2f}")]
    w = max(len(r[0]) for r in rows)
    lines = [f"{'cost':<{w}} | " + " | ".join(paths), "-" * (w + 3 + 24 * len(paths))]
    lines += [f"{name:<{w}} | " + " | ".join(fn(t[p]) for p in paths) for name, fn in rows]
    if "hf_generate_tok_s" in t:
        lines.append(f"{'HF generate tok/s (plain)':<{w}} | {t['hf_generate_tok_s']:.1f}")
    if "kernels" in t:
        lines.append(f"{'fast path: compiled kernels / threads':<{w}} | "
                     f"{'on' if t['kernels'] else 'off (torch ops)'} / {t['threads']}")
    for key, v in (t.get("ratios") or {}).items():
        if v is not None:
            lines.append(f"{key:<{w}} | {v:.2f}x")
    return "\n".join(lines)
