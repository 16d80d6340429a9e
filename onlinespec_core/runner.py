"""`onlinespec run`: one headless run over a prompt stream.

Writes into --out: metrics.json (totals, per topic, per prompt, machine), rounds.csv (one row
per round) and PNG plots (tau over time with topic bands; ensemble weights when the updater
has them in its snapshot). A tqdm bar shows tokens, tau and tokens/s while it runs.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .driver import Driver
from .errors import OnlineSpecError, require
from .metrics import Metrics
from .options import DecodeSettings, dumps, parse_options, to_jsonable
from .updaters.base import UpdaterSnapshot

# ---- shared CLI pieces (bench uses them too) -----------------------------------------------
def add_pair_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--pair", default="demo", help="'demo' (embedded pair) or a target model DIR / hub id")
    ap.add_argument("--draft", default=None, help="draft model DIR / hub id (default: the demo draft)")
    ap.add_argument("--draft-kind", default="lm", choices=("lm", "eagle", "hydra", "ngram"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--stream", default="shift", help="bundled stream name (e.g. shift) or a JSONL file")
    ap.add_argument("--limit", type=int, default=None, help="use at most N prompts per topic")
    ap.add_argument("--k", type=int, default=4, help="draft length (0 = target-only)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is fastest for small models on a shared machine)")
    ap.add_argument("--no-fast", dest="fast", action="store_false",
                    help="run the plain Hugging Face forward instead of the fast decode path (CPU)")


def load_pair_from_args(args: argparse.Namespace):
    from .models import load_pair
    kw = dict(draft_kind=args.draft_kind, device=args.device, dtype=args.dtype,
              fast=None if getattr(args, "fast", True) else False)
    if args.pair == "demo":
        return load_pair("demo", draft=args.draft, **kw)
    return load_pair(target=args.pair, draft=args.draft, **kw)


def load_items(stream: str, limit: int | None):
    """The prompt stream, keeping at most `limit` prompts per topic (order preserved)."""
    from .streams import load_stream
    items = load_stream(stream)
    require(limit is None or limit >= 1, f"--limit must be >= 1; got {limit}")
    if limit is None:
        return items
    seen: dict[str, int] = {}
    out = []
    for it in items:
        seen[it.topic] = seen.get(it.topic, 0) + 1
        if seen[it.topic] <= limit:
            out.append(it)
    return out


def machine_info() -> dict[str, Any]:
    import transformers
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "cpu_count": os.cpu_count(), "cpu": cpu, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def ensemble_weights(snap: UpdaterSnapshot) -> tuple[list[float], list[str]] | None:
    """(weights, labels) of an ensemble updater's experts, from its snapshot."""
    if not snap.weights:
        return None
    w = list(snap.weights)
    labels = ([f"step size {x:g}" for x in snap.step_sizes] if len(snap.step_sizes) == len(w)
              else [f"expert {i}" for i in range(len(w))])
    return w, labels


# ---- the run ---------------------------------------------------------------------------------
@dataclass(kw_only=True)
class RunConfig(DecodeSettings):
    out: Path
    updater: str = "frozen"
    updater_options: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 64
    plots: bool = True
    progress: bool = True
    rolling: int = 16  # rounds in the rolling-tau window of the plot


CSV_FIELDS = ["round", "prompt_index", "topic", "updater", "k", "accepted", "tau", "n_emitted", "kind",
              "draft_s", "verify_s", "update_s", "bookkeeping_s", "updated", "loss", "elapsed_s"]


def round_row(r, updater: str, elapsed: float) -> dict[str, Any]:
    return {"round": r.index, "prompt_index": r.prompt_index, "topic": r.topic, "updater": updater,
            "k": r.k, "accepted": r.accepted, "tau": r.tau, "n_emitted": len(r.emitted), "kind": r.kind,
            "draft_s": f"{r.draft_s:.6f}", "verify_s": f"{r.verify_s:.6f}", "update_s": f"{r.update_s:.6f}",
            "bookkeeping_s": f"{r.bookkeeping_s:.6f}", "updated": int(r.updated),
            "loss": "" if r.loss is None else f"{r.loss:.6f}", "elapsed_s": f"{elapsed:.4f}"}


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, unit="prompt", disable=not enabled, dynamic_ncols=True, leave=True)


def run_engine(engine, items, cfg: RunConfig) -> Iterator[tuple[str, Any]]:
    """Drive the engine over the stream; yields ("round", (round, row, weights)) and
    ("prompt", record) for the writers."""
    t_start = time.perf_counter()
    t_prompt = t_start
    for _, ev in Driver([engine], engine.control).run(items, cfg.max_new_tokens):
        if ev.kind == "start":
            t_prompt = time.perf_counter()
        elif ev.kind == "round":
            row = round_row(ev.round, ev.updater.name, time.perf_counter() - t_start)
            yield "round", (ev.round, row, ensemble_weights(ev.updater))
        elif ev.kind in ("done", "stopped"):
            s = ev.data["stats"]
            yield "prompt", {"prompt_index": ev.data["prompt_index"], "topic": ev.data["topic"],
                             "tokens": len(ev.data["token_ids"]), "tau": s["tau"], "rounds": s["rounds"],
                             "wall_s": time.perf_counter() - t_prompt, "update_s": s["update_s"]}


def run(pair, items, cfg: RunConfig) -> dict[str, Any]:
    """Run the stream, write metrics.json, rounds.csv and PNG plots into cfg.out; return metrics."""
    from .engine import Engine
    out = Path(cfg.out)
    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    engine = Engine(pair, k=cfg.k, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                    seed=cfg.seed, updater=cfg.updater, updater_options=cfg.updater_options)
    total, by_topic = Metrics(), {}
    prompts: list[dict[str, Any]] = []
    taus: list[int] = []
    topics: list[str | None] = []
    weights: list[tuple[int, list[float]]] = []
    labels: list[str] = []
    bar = _progress(len(items), cfg.progress)
    t0 = time.perf_counter()
    with open(out / "rounds.csv", "w", newline="", encoding="utf-8") as f:
        writer = None
        for kind, payload in run_engine(engine, items, cfg):
            if kind == "round":
                rnd, row, w = payload
                total.add(rnd)
                by_topic.setdefault(rnd.topic, Metrics()).add(rnd)
                taus.append(rnd.tau)
                topics.append(rnd.topic)
                if w is not None:
                    weights.append((len(taus) - 1, w[0]))
                    labels = w[1]
                    row.update({f"w{i}": f"{x:.6f}" for i, x in enumerate(w[0])})
                if writer is None:  # columns fixed by the first round (+ weights if any)
                    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS + [c for c in row if c not in CSV_FIELDS],
                                            extrasaction="ignore", restval="")
                    writer.writeheader()
                writer.writerow(row)
            else:
                prompts.append(payload)
                bar.update(1)
                el = time.perf_counter() - t0
                bar.set_postfix(tokens=total.tokens, tau=f"{total.tau:.2f}",
                                tok_s=f"{total.tokens / el:.1f}" if el > 0 else "-")
        if writer is None:
            csv.writer(f).writerow(CSV_FIELDS)
    wall = time.perf_counter() - t0
    bar.close()
    metrics = {
        "config": {**to_jsonable(asdict(cfg)),
                   "pair": pair.name, "target": pair.target_source, "draft": pair.draft_source,
                   "draft_kind": pair.draft_kind},
        "totals": {**total.as_dict(), "wall_s_end_to_end": wall,
                   "tokens_per_s_end_to_end": total.tokens / wall if wall > 0 else 0.0,
                   "update_fraction_end_to_end": total.update_s / wall if wall > 0 else 0.0},
        "per_topic": {str(t): {"tau": m.tau, "tokens": m.tokens, "rounds": m.rounds,
                               "acceptance_rate": m.acceptance_rate, "update_s": m.update_s}
                      for t, m in by_topic.items()},
        "prompts": prompts,
        "updater_stats": engine.updater.snapshot().as_dict(),
        "machine": machine_info(),
        "files": ["metrics.json", "rounds.csv"],
    }
    if cfg.plots and taus:
        from .plots_png import tau_png, weights_png
        tau_png(out / "tau.png", taus, topics, window=cfg.rolling,
                title=f"tau per round: {cfg.updater}, k={cfg.k}")
        metrics["files"].append("tau.png")
        if weights:
            weights_png(out / "weights.png", [i for i, _ in weights], [w for _, w in weights], labels,
                        topics, title=f"ensemble weights: {cfg.updater}")
            metrics["files"].append("weights.png")
    (out / "metrics.json").write_text(dumps(metrics))
    return metrics


def build_argparser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="onlinespec run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pair_args(ap)
    ap.add_argument("--updater", default="frozen", help="frozen | ogd | optimistic | ensemble | dpo ...")
    ap.add_argument("--updater-option", action="append", metavar="KEY=VALUE", default=[],
                    help="updater option (repeatable), value parsed as JSON when it can be")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def check_out_dir(out: Path) -> None:
    """--out must be (or become) a folder: not a file, no parent that is a file."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise OnlineSpecError(f"--out {str(out)!r}: {str(p)!r} is a file, not a folder; "
                                      "pick a folder path for the results")
            break


def main(argv: list[str] | None = None) -> int:
    args = build_argparser().parse_args(argv)
    from .updaters import make_updater
    opts = parse_options(args.updater_option, "--updater-option")
    make_updater(args.updater, **opts)  # unknown name / bad options: fail before loading models
    items = load_items(args.stream, args.limit)  # bad stream: fail before loading models
    check_out_dir(Path(args.out))
    if args.threads:
        torch.set_num_threads(args.threads)
    pair = load_pair_from_args(args)
    cfg = RunConfig(out=Path(args.out), updater=args.updater, updater_options=opts, k=args.k,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                    max_new_tokens=args.max_new_tokens, plots=not args.no_plots,
                    progress=not args.no_progress)
    m = run(pair, items, cfg)
    t = m["totals"]
    print(f"{t['tokens']} tokens, tau {t['tau']:.3f}, {t['tokens_per_s_end_to_end']:.1f} tokens/s, "
          f"update fraction {t['update_fraction_end_to_end']:.3f} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
