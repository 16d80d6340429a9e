"""Benchmark of the online updaters (not a test): update time as a fraction of wall time, and
tau before/after a topic change, on one pair and a two-topic stream (topic A, then topic B).

  python -m onlinespec_core.studies.shift_bench --pair demo --stream shift --json out.json
  python -m onlinespec_core.studies.shift_bench --tiny     # tiny random pair (tests/tiny.py)

Per updater: tau over the whole stream, update_fraction = sum(update_s) / sum(round wall_s),
tau of the first/last `window` rounds of each topic (A_first, A_last, B_first, B_last), and for
the ensemble its Hedge weights at the end of each topic. Every updater starts from the same
draft (the pair is reloaded per run).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..options import parse_options

DEFAULT_RUNS = ["frozen", "ogd", "optimistic", "optimistic:form=momentum", "ensemble", "dpo", "dpo:mode=sft",
                "ogd:cadence=chunk,chunk_prompts=2,epochs=2"]


@dataclass
class ShiftBenchConfig:
    k: int = 4
    max_new_tokens: int = 48
    per_topic: int = 8  # prompts of topic A, then of topic B
    window: int = 24  # rounds averaged at each end of a topic
    seed: int = 0
    runs: list[str] = field(default_factory=lambda: list(DEFAULT_RUNS))


def parse_run(spec: str) -> tuple[str, dict[str, Any]]:
    """'name' or 'name:key=value,key=value' (options.parse_options' syntax)."""
    name, _, rest = spec.partition(":")
    return name, parse_options(rest, f"run {spec!r}: option")


def two_topics(items: list[Any], per_topic: int, topics: list[str] | None = None) -> list[Any]:
    """First `per_topic` prompts of topic A, then of topic B (default: the stream's first two)."""
    if not topics:
        topics = []
        for it in items:
            if it.topic not in topics:
                topics.append(it.topic)
    if len(topics) < 2:
        raise SystemExit("the stream needs at least two topics for a topic change")
    a = [it for it in items if it.topic == topics[0]][:per_topic]
    b = [it for it in items if it.topic == topics[1]][:per_topic]
    return a + b


def _mean_tau(rounds: list[Any]) -> float | None:
    return sum(r.tau for r in rounds) / len(rounds) if rounds else None


def run_one(load: Callable[[], Any], spec: str, items: list[Any], cfg: ShiftBenchConfig) -> dict[str, Any]:
    import onlinespec_core as osc
    name, opts = parse_run(spec)
    pair = load()
    eng = osc.Engine(pair, k=cfg.k, seed=cfg.seed, updater=name, updater_options=opts)
    topic_a = items[0].topic
    rounds, weights = [], {}
    t0 = time.perf_counter()
    for ev in eng.run_stream(items, max_new_tokens=cfg.max_new_tokens):
        if ev.kind == "round":
            rounds.append(ev.round)
        elif ev.kind == "topic" and ev.data.get("prompt_index") == len(items) // 2:
            weights["A_end"] = eng.updater.stats().get("weights")
    elapsed = time.perf_counter() - t0
    eng.updater.flush()  # chunk cadence: the last, partial chunk
    weights["B_end"] = eng.updater.stats().get("weights")
    a = [r for r in rounds if r.topic == topic_a]
    b = [r for r in rounds if r.topic != topic_a]
    w = cfg.window
    m = eng.metrics.as_dict()
    st = eng.updater.stats()
    out = {"name": spec, "updater": name, "options": opts, "tau": m["tau"],
           "update_fraction": m["update_fraction"], "tokens_per_s": m["tokens_per_s"],
           "update_s": m["update_s"], "wall_s": m["wall_s"], "elapsed_s": elapsed, "rounds": m["rounds"],
           "updates": st.get("updates", 0), "skipped": st.get("skipped", 0),
           "tau_A_first": _mean_tau(a[:w]), "tau_A_last": _mean_tau(a[-w:]),
           "tau_B_first": _mean_tau(b[:w]), "tau_B_last": _mean_tau(b[-w:]),
           "tau_A": _mean_tau(a), "tau_B": _mean_tau(b)}
    if st["weights"]:
        out.update({"lrs": st["step_sizes"], "weights_A_end": weights.get("A_end"), "weights_B_end": weights["B_end"]})
    return out


def table(results: list[dict[str, Any]]) -> str:
    f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    lines = ["| run | tau | A first | A last | B first | B last | update % | tok/s | updates |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {f(r['tau'])} | {f(r['tau_A_first'])} | {f(r['tau_A_last'])} | "
                     f"{f(r['tau_B_first'])} | {f(r['tau_B_last'])} | {100 * r['update_fraction']:.1f} | "
                     f"{r['tokens_per_s']:.1f} | {r['updates']} |")
    return "\n".join(lines)


def tiny_pair_dirs(root: Path) -> tuple[str, str]:
    """A tiny random llama target and an unrelated tiny draft (the tests' far pair)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.tiny import build_tokenizer, far_pair_dirs
    return far_pair_dirs(root, build_tokenizer())


def tiny_stream() -> list[Any]:
    from ..streams import StreamItem
    code = ["def add(a, b):", "def sub(a, b):", "def mul(x, y):", "def f(a):", "def g(b):",
            "def add(x, y):", "def h(a, b):", "def k(x):"]
    math_ = ["Tom has 3 apples", "Tom has 4 apples", "Tom buys 3 more", "How many apples does he have?",
             "3 + 4 = 7.", "Tom has 7 apples", "He buys 4 more", "How many does Tom have?"]
    return [StreamItem("code", p) for p in code] + [StreamItem("math", p) for p in math_]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m onlinespec_core.studies.shift_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="demo", help="'demo' or a target model dir")
    ap.add_argument("--draft", default=None, help="draft model dir (default: the demo draft)")
    ap.add_argument("--draft-kind", default="lm", choices=("lm", "eagle", "hydra"))
    ap.add_argument("--tiny", action="store_true", help="tiny random pair and stream (no demo needed)")
    ap.add_argument("--stream", default="shift", help="bundled stream name or JSONL (>= 2 topics)")
    ap.add_argument("--topics", default=None, help="A,B: the two topics to use (default: the first two)")
    ap.add_argument("--runs", default=";".join(DEFAULT_RUNS),
                    help="';'-separated runs: updater or updater:key=value,key=value")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--per-topic", type=int, default=8)
    ap.add_argument("--window", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onlinespec_core as osc
    cfg = ShiftBenchConfig(k=args.k, max_new_tokens=args.max_new_tokens, per_topic=args.per_topic,
                           window=args.window, runs=[r for r in args.runs.split(";") if r])
    tmp = None
    if args.tiny:
        tmp = tempfile.TemporaryDirectory()
        target, draft = tiny_pair_dirs(Path(tmp.name))
        load = lambda: osc.load_pair(target=target, draft=draft)  # noqa: E731
        items = tiny_stream()[:cfg.per_topic] + tiny_stream()[8:8 + cfg.per_topic]
        pair_name = "tiny (llama 64x2 target, unrelated 32x1 draft)"
    else:
        kw = dict(draft_kind=args.draft_kind)
        load = (lambda: osc.load_pair("demo", draft=args.draft, **kw)) if args.pair == "demo" else \
            (lambda: osc.load_pair(target=args.pair, draft=args.draft, **kw))
        items = two_topics(osc.load_stream(args.stream), cfg.per_topic,
                           args.topics.split(",") if args.topics else None)
        pair_name = args.pair
    results = []
    for spec in cfg.runs:
        r = run_one(load, spec, items, cfg)
        results.append(r)
        print(f"{spec}: tau {r['tau']:.2f}  A {r['tau_A_first']:.2f}->{r['tau_A_last']:.2f}  "
              f"B {r['tau_B_first']:.2f}->{r['tau_B_last']:.2f}  update {100 * r['update_fraction']:.1f}%",
              file=sys.stderr, flush=True)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"pair": pair_name, "config": asdict(cfg),
                                               "topics": [items[0].topic, items[-1].topic],
                                               "threads": args.threads, "runs": results}, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
