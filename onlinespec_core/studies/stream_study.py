"""Long-stream study of the online updaters (a benchmark, not a test): per topic visit, tau over
the first and the last `window` prompts, per run the update fraction and (ensemble) the Hedge
weights and leader at the end of every visit.

  python -m onlinespec_core.studies.stream_study --stream shift_long --out runs/study \\
      --runs "frozen;ogd;optimistic;ensemble;dpo"
  python -m onlinespec_core.studies.stream_study --summary runs/study     # table of finished runs

Each run writes OUT/<run>.json after every prompt (a killed study keeps what it measured and
--resume skips finished runs). tau = tokens emitted / target forwards (accepted + 1 per round).
A visit is a maximal run of prompts of one topic; a topic seen again is a return visit.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .shift_bench import parse_run


def visits_of(items: list[Any]) -> list[tuple[str, int, int]]:
    """(topic, start, end) of each maximal run of one topic."""
    out: list[tuple[str, int, int]] = []
    for i, it in enumerate(items):
        if out and out[-1][0] == it.topic:
            out[-1] = (it.topic, out[-1][1], i + 1)
        else:
            out.append((it.topic, i, i + 1))
    return out


def tau_of(prompts: list[dict]) -> float | None:
    r = sum(p["rounds"] for p in prompts)
    return sum(p["tokens"] for p in prompts) / r if r else None


def summarise(res: dict, window: int) -> dict:
    ps = res["prompts"]
    out: dict[str, Any] = {"name": res["name"], "done": res.get("done", False), "prompts": len(ps),
                           "tau": tau_of(ps)}
    upd = sum(p["update_s"] for p in ps)
    wall = sum(p["wall_s"] for p in ps)
    out["update_fraction"] = upd / wall if wall else None
    out["tokens_per_s"] = sum(p["tokens"] for p in ps) / wall if wall else None
    vis = []
    seen: dict[str, int] = {}
    for topic, a, b in res["visits"]:
        got = [p for p in ps if a <= p["i"] < b]
        if not got:
            break
        n = seen.get(topic, 0)
        seen[topic] = n + 1
        v = {"topic": topic, "visit": n, "prompts": len(got), "tau": tau_of(got),
             "first": tau_of(got[:window]), "last": tau_of(got[-window:]) if len(got) >= window else None}
        if got[-1].get("weights"):
            w = got[-1]["weights"]
            v["weights_end"] = w
            v["leader_end"] = max(range(len(w)), key=w.__getitem__)
        vis.append(v)
    out["visits"] = vis
    return out


def run_one(load, spec: str, items: list[Any], args, out_path: Path) -> dict:
    import onlinespec_core as osc
    name, opts = parse_run(spec)
    pair = load()
    eng = osc.Engine(pair, k=args.k, seed=args.seed, updater=name, updater_options=opts)
    w0 = [p.detach().float().clone() for p in pair.draft.module.parameters()] if pair.draft is not None else []
    res = {"name": spec, "updater": name, "options": opts, "k": args.k, "max_new_tokens": args.max_new_tokens,
           "stream": args.stream, "draft": args.draft, "draft_kind": args.draft_kind, "threads": args.threads,
           "visits": visits_of(items), "prompts": []}
    t0 = time.time()
    leaders = []
    for i, it in enumerate(items):
        rounds = []
        for ev in eng.stream(it.prompt, args.max_new_tokens, topic=it.topic, prompt_index=i, in_run=True):
            if ev.kind == "round":
                rounds.append(ev.round)
        st = eng.updater.stats()
        rec = {"i": i, "topic": it.topic, "rounds": len(rounds), "tokens": sum(len(r.emitted) for r in rounds),
               "drafted_rounds": sum(1 for r in rounds if r.k > 0),
               "update_s": sum(r.update_s for r in rounds), "wall_s": sum(r.wall_s for r in rounds),
               "loss": (lambda ls: sum(ls) / len(ls) if ls else None)([r.loss for r in rounds if r.loss is not None])}
        if st.get("weights"):
            rec["weights"] = [round(float(x), 5) for x in st["weights"]]
            leaders.append(max(range(len(rec["weights"])), key=rec["weights"].__getitem__))
        res["prompts"].append(rec)
        res["elapsed_s"] = time.time() - t0
        st_json = {k: v for k, v in st.items() if isinstance(v, (int, float, str, list, type(None)))}
        res["stats"] = st_json
        if w0:
            res["travel_l2"] = float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(p.detach().float() - q) for p, q in zip(pair.draft.module.parameters(), w0)])))
        if leaders:
            res["leader_changes"] = sum(1 for a, b in zip(leaders, leaders[1:]) if a != b)
        if i % 5 == 4 or i == len(items) - 1:
            out_path.write_text(json.dumps(res))
        if args.progress:
            print(f"{spec} {i + 1}/{len(items)} {it.topic} tau {rec['tokens'] / max(rec['rounds'], 1):.2f}",
                  file=sys.stderr, flush=True)
    res["done"] = True
    out_path.write_text(json.dumps(res))
    return res


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(summaries: list[dict], frozen: dict | None) -> str:
    if not summaries:
        return "(no runs)"
    heads = [f"{v['topic']}{' (return)' if v['visit'] else ''}" for v in summaries[0]["visits"]]
    lines = ["| run | prompts | tau (x frozen) | " + " | ".join(f"{h} first / last" for h in heads) +
             " | update % | leader changes |",
             "|---|---|---|" + "---|" * len(heads) + "---|---|"]
    for s in summaries:
        ratio = (f" ({s['tau'] / frozen['tau']:.2f}x)" if frozen and frozen.get("tau") and s["tau"] else "")
        cells = []
        for j, v in enumerate(s["visits"]):
            fr = frozen["visits"][j]["tau"] if frozen and j < len(frozen["visits"]) else None
            rv = f" [{v['tau'] / fr:.2f}x]" if fr and v["tau"] else ""
            cells.append(f"{fmt(v['first'])} / {fmt(v['last'])}{rv}")
        cells += ["-"] * (len(heads) - len(cells))
        uf = s["update_fraction"]
        lines.append(f"| {s['name']} | {s['prompts']} | {fmt(s['tau'])}{ratio} | " + " | ".join(cells) +
                     f" | {'-' if uf is None else f'{100 * uf:.1f}'} | {s.get('leader_changes', '-')} |")
    return "\n".join(lines)


def plot_runs(path: str | Path, runs: list[dict], window: int = 10, size: tuple[int, int] = (1100, 460)) -> Path:
    """Rolling tau per prompt (mean over `window` prompts) of each run, topic bands behind."""
    from ..plots_png import LINE_COLOURS, _bands, _export, _pg, _window, rolling_mean
    pg, app = _pg()
    win = _window(pg, size)
    plot = win.addPlot(title=f"tau per prompt, rolling mean over {window} prompts")
    plot.setLabel("bottom", "prompt")
    plot.setLabel("left", "tau (tokens per target forward)")
    plot.showGrid(x=True, y=True, alpha=0.2)
    # one row while the names fit; long option strings get a row each (they overflowed the plot)
    cols = len(runs) if sum(len(r["name"]) for r in runs) <= 120 else 1
    legend = plot.addLegend(offset=(10, 5), colCount=cols)
    topics = [p["topic"] for p in runs[0]["prompts"]]
    taus = {r["name"]: [p["tokens"] / max(p["rounds"], 1) for p in r["prompts"]] for r in runs}
    rows = -(-len(runs) // cols)
    y_top = max(max(rolling_mean(t, window)) for t in taus.values()) + 0.3 + 0.3 * rows
    _bands(pg, plot, topics, y_top)
    for i, r in enumerate(runs):
        t = taus[r["name"]]
        plot.plot(list(range(len(t))), rolling_mean(t, window), name=r["name"],
                  pen=pg.mkPen(LINE_COLOURS[i % len(LINE_COLOURS)], width=2))
    legend.setZValue(10)
    plot.setYRange(0.9, y_top + 0.2)
    plot.setXRange(-0.5, len(topics) - 0.5, padding=0)
    return _export(pg, app, win, Path(path), size[0])


def slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec)


def load_summaries(out: Path, window: int) -> tuple[list[dict], dict | None]:
    sums, frozen = [], None
    for f in sorted(out.glob("*.json")):
        res = json.loads(f.read_text())
        if "prompts" not in res:
            continue
        s = summarise(res, window)
        s["leader_changes"] = res.get("leader_changes", "-")
        s["travel_l2"] = res.get("travel_l2")
        if res["name"] == "frozen":
            frozen = s
        sums.append(s)
    sums.sort(key=lambda s: (s["name"] != "frozen", s["name"]))
    return sums, frozen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m onlinespec_core.studies.stream_study", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="demo")
    ap.add_argument("--draft", default=None, help="draft dir (default: the pair's)")
    ap.add_argument("--draft-kind", default="lm", choices=("lm", "eagle", "hydra"))
    ap.add_argument("--stream", default="shift_long")
    ap.add_argument("--runs", default="frozen;ogd;optimistic;ensemble;dpo")
    ap.add_argument("--per-visit", type=int, default=None, help="only the first N prompts of each visit")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--window", type=int, default=10, help="prompts at each end of a visit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--resume", action="store_true", help="skip runs whose json says done")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--summary", default=None, help="print the table of the runs in this folder and exit")
    ap.add_argument("--plot", default=None, help="with --summary: PNG of rolling tau per prompt of these runs")
    ap.add_argument("--plot-runs", default=None, help="';'-separated run names for --plot (default: all)")
    args = ap.parse_args(argv)
    if args.summary:
        sums, frozen = load_summaries(Path(args.summary), args.window)
        print(table(sums, frozen))
        for s in sums:
            print(json.dumps({k: s[k] for k in ("name", "tau", "update_fraction", "tokens_per_s", "leader_changes",
                                                "travel_l2")}))
            for v in s["visits"]:
                if "weights_end" in v:
                    print("   ", v["topic"], v["visit"], "weights", v["weights_end"])
        if args.plot:
            want = args.plot_runs.split(";") if args.plot_runs else None
            runs = [json.loads(f.read_text()) for f in sorted(Path(args.summary).glob("*.json"))]
            runs = [r for r in runs if "prompts" in r and r.get("done") and (want is None or r["name"] in want)]
            if want:
                runs.sort(key=lambda r: want.index(r["name"]))
            print(plot_runs(args.plot, runs, args.window))
        return 0
    torch.set_num_threads(args.threads)
    import onlinespec_core as osc
    items = osc.load_stream(args.stream)
    if args.per_visit:
        items = [it for t, a, b in visits_of(items) for it in items[a:a + args.per_visit]]
    kw = dict(draft_kind=args.draft_kind)
    load = (lambda: osc.load_pair("demo", draft=args.draft, **kw)) if args.pair == "demo" else \
        (lambda: osc.load_pair(target=args.pair, draft=args.draft, **kw))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for spec in [r for r in args.runs.split(";") if r]:
        path = out / f"{slug(spec)}.json"
        if args.resume and path.exists() and json.loads(path.read_text()).get("done"):
            continue
        run_one(load, spec, items, args, path)
        s = summarise(json.loads(path.read_text()), args.window)
        print(f"{spec}: tau {fmt(s['tau'])} update {100 * (s['update_fraction'] or 0):.1f}% "
              + " ".join(f"{v['topic']}{v['visit']}:{fmt(v['first'])}/{fmt(v['last'])}" for v in s["visits"]),
              file=sys.stderr, flush=True)
    sums, frozen = load_summaries(out, args.window)
    print(table(sums, frozen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
