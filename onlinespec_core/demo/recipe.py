"""`onlinespec train-demo`: reproduce the embedded demo pair from scratch.

Stages (run in order; each can be run alone with ``--stages``):

  corpus     deterministic corpus (code / math / sql / prose topics + general warm-up set)
  tokenizer  byte-level BPE (8192 entries), HF format
  data       tokenised uint16 arrays per set and split
  streams    assets-style prompt streams from the held-out splits
  target     Llama target (~17M params), first phase on the broad mix, resumable, checkpoints every 5 min
  anneal     second target phase from the first one's weights: code-heavy mix with 15% copy rows
             (a window of code followed by itself) on a fresh cosine schedule; resumable
  draft      Llama draft (~1.2M params), warmed up on the general set only
  draft_warm the paper's protocol: the general draft continued on general text plus a small
             per-topic warm-up set (``warm_docs`` documents per topic from the TRAIN split, never
             the held-out one), so frozen tau starts ~1.4-2 per topic and the stream has room to
             teach; exported in preference to the general-only draft when present
  export     bf16 safetensors model dirs (target from its latest checkpoint, even mid-training)
  eval       held-out loss per topic (target and draft), decode cost ratio, greedy samples

Output layout under ``--out``: corpus/, tokenizer/, data/, target_work/ckpt, target_anneal_work/ckpt
(exported in preference to the first phase when present), draft_work/ckpt,
models/target, models/draft, streams/, report.json. ``--install DIR`` copies models to
DIR/models/demo/{target,draft} and the streams to DIR/streams (DIR = the repo's assets/).

Run time on the 2-core CPU dev box (torch 2.13, bf16 autocast), measured for the shipped pair:
  corpus ~30-60 s, tokenizer ~5 s, data ~10 s, streams < 1 s.
  target (16.9M params, seq 256, batch 16): ~1.7k tokens/s with 2 threads on an idle box, ~2.1k
  with --compile, but 2 OpenMP threads collapse to 0.2-0.4k tokens/s when other processes share
  the cores; 1 thread held 0.75-1.1k tokens/s there. The shipped target: phase 1, 1,567 steps =
  6.4M tokens in 123 training minutes (wall-clock deadline, mostly --threads 1 on a shared box);
  anneal, 3,417 steps = 14.0M tokens in 110 minutes (--threads 2 --compile, idle box).
  draft (1.25M params): 6 min, 222 steps = 0.9M tokens of the general set. export + eval: ~1 min.
  draft_warm: 120 steps = 0.49M tokens (half general, half the 100-doc-per-topic warm-up sets:
  code 12.7k, math 6.4k, sql 7.1k, prose 9.6k tokens), 6.0 train-min with 1 thread on a busy box.
  (20 docs x 60 steps left frozen tau at 1.09-1.30 per topic; 100 x 120: 1.07 / 1.47 / 1.35 / 1.92.
  A code-heavier variant, ``--warm-docs 100,code=400 --warm-weights code=3 --warm-steps 160``, 2.5
  min on an idle core: frozen tau 1.34 -> 1.48 on the first 40 prompts of each shift_long visit,
  code only 1.06 -> 1.17, and online learning gained less on it; not shipped.)
  ``--tiny``: about 10-20 s end to end (used by tests/test_demo_recipe.py).

Example (what produced the shipped assets)::

  python -m onlinespec_core.demo.recipe --out work_demo/full --threads 1 --deadline 15:50 --install assets
  python -m onlinespec_core.demo.recipe --out work_demo/full --stages anneal --threads 2 --compile \
      --deadline 18:25 --anneal-minutes 120 --anneal-tokens 14000000
  python -m onlinespec_core.demo.recipe --out work_demo/full --stages export,eval --install assets
  # the shipped draft: the general-only draft (as shipped before) warmed by the paper's protocol
  python -m onlinespec_core.demo.recipe --out work_demo/full --stages draft_warm,export --threads 1 \
      --warm-init <general-only draft dir, e.g. git show 5e34947:assets/models/demo/draft>
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ALL_STAGES = ("corpus", "tokenizer", "data", "streams", "target", "anneal", "draft", "draft_warm", "export", "eval")

PRESETS = {
    "full": {
        "corpus": {},
        "vocab_size": 8192,
        "target": dict(hidden=384, layers=8, ffn=1152, heads=6, kv_heads=2),
        "draft": dict(hidden=128, layers=1, ffn=384, heads=2, kv_heads=1),
        "seq_len": 256, "batch_size": 16, "lr": 2e-3, "max_tokens": 6_418_432, "warmup": 100,
        "draft_batch": 16, "draft_lr": 3e-3, "draft_minutes": 6.0, "draft_max_tokens": 3_000_000,
        "streams": dict(n_single=40, n_shift=25, n_shift_short=8, n_long=100, n_long_return=30),
        "eval_tokens": 60_000,
        "anneal": dict(lr=1.2e-3, warmup=50, max_tokens=14_000_000, minutes=1e9, eval_every=200),
        "draft_warm": dict(warm_docs=100, general_weight=0.5, lr=1e-3, warmup=10, steps=120, minutes=15.0),
    },
    "tiny": {
        "corpus": dict(n_math=400, n_sql=400, n_prose=300, n_general=400, max_code_functions=250, max_code_extra=200,
                       max_code_files=60,
                       max_pydoc_paragraphs=100, min_heldout=30),
        "vocab_size": 512,
        "target": dict(hidden=64, layers=2, ffn=128, heads=2, kv_heads=1),
        "draft": dict(hidden=32, layers=1, ffn=64, heads=2, kv_heads=1),
        "seq_len": 64, "batch_size": 8, "lr": 3e-3, "max_tokens": 8 * 64 * 40, "warmup": 5,
        "draft_batch": 8, "draft_lr": 3e-3, "draft_minutes": 0.5, "draft_max_tokens": 8 * 64 * 20,
        "streams": dict(n_single=6, n_shift=3, n_shift_short=2, n_long=5, n_long_return=2),
        "eval_tokens": 4_000,
        "anneal": dict(lr=2e-3, warmup=2, max_tokens=8 * 64 * 10, minutes=2.0, eval_every=5),
        "draft_warm": dict(warm_docs=5, general_weight=0.5, lr=2e-3, warmup=2, steps=5, minutes=1.0),
    },
}

TARGET_MIX = {"code": 0.30, "math": 0.20, "sql": 0.12, "prose": 0.20, "general": 0.18}
# Second phase: continue from the first phase's weights on a fresh cosine schedule with a code-heavy mix
# (real code is by far the hardest topic; the templated math/sql/prose generators are learned early).
# The first phase grew no induction heads (random tokens repeated once: no lower loss the second
# time), so 15% of the rows are "copy:code" repeats (see train.Batcher) to teach in-context copying.
ANNEAL_MIX = {"code": 0.50, "copy:code": 0.15, "math": 0.08, "sql": 0.05, "prose": 0.11, "general": 0.11}
DRAFT_MIX = {"general": 1.0}


def per_topic(s: str) -> dict[str, float]:
    """'100' -> {'*': 100}; '100,code=400' -> {'*': 100, 'code': 400} (a value per topic)."""
    out: dict[str, float] = {}
    for part in s.split(","):
        key, _, val = part.rpartition("=")
        try:
            out[key.strip() or "*"] = float(val)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected N or N,topic=N,...; got {s!r}") from None
    return out


def topic_value(spec: Any, topic: str, default: float) -> float:
    """A per-topic setting: a number for every topic, or per_topic's dict ('*' = the rest)."""
    if isinstance(spec, dict):
        return float(spec.get(topic, spec.get("*", default)))
    return float(spec)


def parse_deadline(s: str | None) -> float | None:
    """'HH:MM' (UTC, today), an ISO timestamp, or unix seconds -> unix seconds."""
    if s is None:
        return None
    try:
        return float(s)
    except ValueError:
        pass
    if len(s) <= 5 and ":" in s:
        hh, mm = s.split(":")
        now = _dt.datetime.now(_dt.timezone.utc)
        t = now.replace(hour=int(hh), minute=int(mm), second=0, microsecond=0)
        return t.timestamp()
    t = _dt.datetime.fromisoformat(s)
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return t.timestamp()


def _log_to(path: Path):
    def log(msg: str) -> None:
        line = f"[{_dt.datetime.now(_dt.timezone.utc).strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    return log


def _new_model(P: dict, which: str, tok):
    from transformers import LlamaForCausalLM
    from .train import llama_config
    cfg = llama_config(len(tok), max_pos=1024, bos=tok.bos_token_id, eos=tok.eos_token_id,
                       pad=tok.pad_token_id, **P[which])
    return LlamaForCausalLM(cfg)


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def decode_ms(model, n: int = 40, prompt_len: int = 20, reps: int = 3) -> float:
    """Median-of-reps mean single-token decode time (ms) with a DynamicCache at batch 1."""
    import torch
    from transformers import DynamicCache
    model.eval()
    times = []
    with torch.no_grad():
        for r in range(reps):
            ids = torch.randint(3, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(r))
            cache = DynamicCache()
            out = model(input_ids=ids, cache=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            t0 = None
            for i in range(n + 5):
                if i == 5:
                    t0 = time.perf_counter()
                out = model(input_ids=tok, cache=cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
            times.append((time.perf_counter() - t0) / n * 1000)
    return sorted(times)[len(times) // 2]


def build_argparser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="onlinespec train-demo",
                                 description="Reproduce the embedded demo pair (corpus, tokenizer, target, "
                                             "draft, streams) from scratch on CPU.")
    ap.add_argument("--out", default="work_demo/demo", help="output/work directory (default: %(default)s)")
    ap.add_argument("--stages", default=",".join(ALL_STAGES),
                    help=f"comma-separated subset of {','.join(ALL_STAGES)} (default: all)")
    ap.add_argument("--tiny", action="store_true", help="minutes-long toy configuration (CI)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                    help="resume training from checkpoints in --out (default: on)")
    ap.add_argument("--deadline", default=None,
                    help="wall-clock stop for target training: 'HH:MM' UTC today, ISO time or unix seconds")
    ap.add_argument("--max-minutes", type=float, default=None, help="target training-time budget (cumulative)")
    ap.add_argument("--max-tokens", type=int, default=None, help="target token budget")
    ap.add_argument("--anneal-minutes", type=float, default=None,
                    help="budget of the code-heavy second target phase (default: the preset's)")
    ap.add_argument("--anneal-tokens", type=int, default=None, help="token budget of the second target phase")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training forward (faster, slow start)")
    ap.add_argument("--draft-minutes", type=float, default=None, help="draft warm-up time budget")
    ap.add_argument("--warm-init", default=None,
                    help="draft_warm: HF model dir to start from when --out has no draft checkpoint "
                         "(e.g. assets/models/demo/draft as shipped before the warm stage)")
    ap.add_argument("--warm-docs", type=per_topic, default=None,
                    help="draft_warm: train documents per topic, e.g. 100 or 100,code=400")
    ap.add_argument("--warm-weights", type=per_topic, default=None,
                    help="draft_warm: relative sampling weight of each topic's warm-up set within the "
                         "topics' share, e.g. code=2 (default: 1 each)")
    ap.add_argument("--warm-steps", type=int, default=None, help="draft_warm: optimizer steps")
    ap.add_argument("--ckpt-every", type=float, default=300.0, help="seconds between checkpoints")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: 2, --tiny: 1); on a shared 2-core box 1 is often faster")
    ap.add_argument("--no-bf16", action="store_true", help="train in float32 instead of bf16 autocast")
    ap.add_argument("--install", default=None,
                    help="copy models to DIR/models/demo/{target,draft} and streams to DIR/streams")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_argparser().parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in ALL_STAGES]
    if bad:
        print(f"unknown stage(s) {bad}; choose from {ALL_STAGES}", file=sys.stderr)
        return 2
    P = PRESETS["tiny" if args.tiny else "full"]
    if args.threads is None:
        args.threads = 1 if args.tiny else 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = _log_to(out / "recipe.log")
    t_all = time.time()
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    report["preset"] = "tiny" if args.tiny else "full"

    import torch
    torch.set_num_threads(args.threads)

    from .corpus import ALL_SETS, TOPICS, CorpusConfig, build_corpus, read_split
    corpus_dir, tok_dir, data_dir = out / "corpus", out / "tokenizer", out / "data"

    if "corpus" in stages:
        t = time.time()
        report["corpus"] = build_corpus(corpus_dir, CorpusConfig(seed=args.seed, **P["corpus"]), log=log)
        report.setdefault("times_s", {})["corpus"] = round(time.time() - t, 1)

    tok = None
    if "tokenizer" in stages:
        from .tokenizer import train_tokenizer
        t = time.time()
        texts = (d["prompt"] + d["completion"] for s in ALL_SETS for d in read_split(corpus_dir, s, "train"))
        tok = train_tokenizer(texts, tok_dir, vocab_size=P["vocab_size"])
        log(f"tokenizer: {len(tok)} entries in {time.time() - t:.1f}s")
        report.setdefault("times_s", {})["tokenizer"] = round(time.time() - t, 1)

    def get_tok():
        nonlocal tok
        if tok is None:
            from .tokenizer import load_tokenizer
            tok = load_tokenizer(tok_dir)
        return tok

    if "data" in stages:
        from .train import tokenize_corpus
        t = time.time()
        report["tokens"] = tokenize_corpus(corpus_dir, get_tok(), data_dir, ALL_SETS, log=log)
        report.setdefault("times_s", {})["data"] = round(time.time() - t, 1)

    if "streams" in stages:
        from .streams import write_streams
        report["streams"] = write_streams(corpus_dir, out / "streams", seed=args.seed, **P["streams"])
        log(f"streams: {report['streams']}")

    _save_report(report_path, report)

    from .train import TrainConfig, eval_loss, export_model, load_ckpt_weights, train_lm
    bf16 = not args.no_bf16
    if "target" in stages:
        model = _new_model(P, "target", get_tok())
        log(f"target params: {_n_params(model) / 1e6:.2f}M")
        cfg = TrainConfig(mix=TARGET_MIX, seq_len=P["seq_len"], batch_size=P["batch_size"], lr=P["lr"],
                          warmup_steps=P["warmup"], max_tokens=args.max_tokens or P["max_tokens"],
                          max_minutes=args.max_minutes if args.max_minutes is not None else 1e9,
                          deadline=parse_deadline(args.deadline), ckpt_every_s=args.ckpt_every,
                          seed=args.seed, bf16=bf16, threads=args.threads, compile=args.compile)
        meta = train_lm(model, data_dir, out / "target_work", cfg, resume=args.resume, log=log)
        report["target_train"] = {k: meta[k] for k in ("step", "tokens", "train_s", "last_loss", "stop_reason")
                                  if k in meta}
        _save_report(report_path, report)

    if "anneal" in stages:
        A = P["anneal"]
        src = out / "target_work" / "ckpt"
        if not (src / "ckpt.json").exists():
            log("anneal: no first-phase target checkpoint yet, skipped")
        else:
            model = _new_model(P, "target", get_tok())
            cfg = TrainConfig(mix=ANNEAL_MIX, seq_len=P["seq_len"], batch_size=P["batch_size"], lr=A["lr"],
                              warmup_steps=A["warmup"], max_tokens=args.anneal_tokens or A["max_tokens"],
                              max_minutes=args.anneal_minutes if args.anneal_minutes is not None else A["minutes"],
                              deadline=parse_deadline(args.deadline), ckpt_every_s=args.ckpt_every,
                              seed=args.seed + 2, bf16=bf16, threads=args.threads, compile=args.compile,
                              eval_every=A["eval_every"], init_from=str(src))
            meta = train_lm(model, data_dir, out / "target_anneal_work", cfg, resume=args.resume, log=log,
                            eval_sets=["code", "math", "general"])
            report["target_anneal"] = {k: meta[k] for k in ("step", "tokens", "train_s", "last_loss", "stop_reason")
                                       if k in meta}
            _save_report(report_path, report)

    if "draft" in stages:
        model = _new_model(P, "draft", get_tok())
        log(f"draft params: {_n_params(model) / 1e6:.2f}M")
        cfg = TrainConfig(mix=DRAFT_MIX, seq_len=P["seq_len"], batch_size=P["draft_batch"], lr=P["draft_lr"],
                          warmup_steps=P["warmup"], max_tokens=P["draft_max_tokens"],
                          max_minutes=args.draft_minutes if args.draft_minutes is not None else P["draft_minutes"],
                          ckpt_every_s=args.ckpt_every, seed=args.seed + 1, bf16=bf16, threads=args.threads)
        meta = train_lm(model, data_dir, out / "draft_work", cfg, resume=args.resume, log=log)
        report["draft_train"] = {k: meta[k] for k in ("step", "tokens", "train_s", "last_loss", "stop_reason")
                                 if k in meta}
        _save_report(report_path, report)

    if "draft_warm" in stages:
        W = dict(P["draft_warm"])
        if args.warm_docs is not None:
            W["warm_docs"] = args.warm_docs
        if args.warm_steps is not None:
            W["steps"] = args.warm_steps
        if args.warm_weights is not None:
            W["topic_weights"] = args.warm_weights
        model = _new_model(P, "draft", get_tok())
        src = out / "draft_work" / "ckpt"
        if (src / "ckpt.json").exists():
            load_ckpt_weights(model, src)
            init = str(src)
        elif args.warm_init:
            from transformers import AutoModelForCausalLM
            model.load_state_dict(AutoModelForCausalLM.from_pretrained(args.warm_init, dtype=torch.float32).state_dict())
            init = args.warm_init
        else:
            init = None
            log("draft_warm: no general draft (draft stage checkpoint or --warm-init), skipped")
        if init is not None:
            report["draft_warm_sets"] = write_warm_sets(corpus_dir, data_dir, get_tok(), W["warm_docs"],
                                                        seed=args.seed)
            tw = {t: topic_value(W.get("topic_weights", 1.0), t, 1.0) for t in TOPICS}
            mix = {"general": W["general_weight"]}
            mix.update({f"{t}_warm": (1 - W["general_weight"]) * tw[t] / sum(tw.values()) for t in TOPICS})
            cfg = TrainConfig(mix=mix, seq_len=P["seq_len"], batch_size=P["draft_batch"], lr=W["lr"],
                              warmup_steps=W["warmup"], max_tokens=W["steps"] * P["draft_batch"] * P["seq_len"],
                              max_minutes=W["minutes"], ckpt_every_s=args.ckpt_every, seed=args.seed + 3,
                              bf16=bf16, threads=args.threads)
            meta = train_lm(model, data_dir, out / "draft_warm_work", cfg, resume=args.resume, log=log)
            report["draft_warm"] = {"init": init, **W, **{k: meta[k] for k in ("step", "tokens", "train_s", "last_loss",
                                                                               "stop_reason") if k in meta}}
            _save_report(report_path, report)

    if "export" in stages:
        for which in ("target", "draft"):
            ck = out / f"{which}_work" / "ckpt"
            if which == "target" and (out / "target_anneal_work" / "ckpt" / "ckpt.json").exists():
                ck = out / "target_anneal_work" / "ckpt"  # the second phase supersedes the first
            if which == "draft" and (out / "draft_warm_work" / "ckpt" / "ckpt.json").exists():
                ck = out / "draft_warm_work" / "ckpt"  # the topic warm-up supersedes the general draft
            if not (ck / "ckpt.json").exists():
                log(f"export: no {which} checkpoint yet, skipped")
                continue
            model = _new_model(P, which, get_tok())
            meta = load_ckpt_weights(model, ck)
            export_model(model, get_tok(), out / "models" / which)
            (out / "models" / which / "training.json").write_text(json.dumps(
                {k: meta.get(k) for k in ("step", "tokens", "train_s", "last_loss", "stop_reason", "done", "init_from")}, indent=2))
            log(f"export {which}: step {meta['step']} ({meta['tokens']:,} tokens) -> {out / 'models' / which}")

    if "eval" in stages:
        report["eval"] = evaluate(out, P, log=log, bf16=bf16, n_samples=1 if args.tiny else 2,
                                  gen_tokens=12 if args.tiny else 64, decode_tokens=10 if args.tiny else 40)
        _save_report(report_path, report)

    if args.install:
        inst = Path(args.install)
        for which in ("target", "draft"):
            src = out / "models" / which
            if src.exists():
                dst = inst / "models" / "demo" / which
                if dst.exists():
                    shutil.rmtree(dst)
                shutil.copytree(src, dst)
                log(f"installed {src} -> {dst}")
        if (out / "streams").exists():
            (inst / "streams").mkdir(parents=True, exist_ok=True)
            for f in sorted((out / "streams").glob("*.jsonl")):
                shutil.copy2(f, inst / "streams" / f.name)
            log(f"installed streams -> {inst / 'streams'}")
        if report_path.exists() and (inst / "models" / "demo").is_dir():
            _save_report(report_path, report)
            shutil.copy2(report_path, inst / "models" / "demo" / "report.json")

    report.setdefault("times_s", {})["last_invocation_total"] = round(time.time() - t_all, 1)
    _save_report(report_path, report)
    log(f"done in {time.time() - t_all:.1f}s")
    return 0


def write_warm_sets(corpus_dir: Path, data_dir: Path, tok, n_docs: Any, seed: int = 0) -> dict:
    """``{topic}_warm.train.npy``: ``n_docs`` seeded documents per topic (a number, or per_topic's
    dict) from its TRAIN split (the
    paper's small per-domain warm-up set; the held-out split, where the streams come from, is
    never read), encoded like tokenize_corpus. Returns tokens per set."""
    import random

    import numpy as np
    from .corpus import TOPICS, read_split
    stats = {}
    for t in TOPICS:
        docs = sorted(read_split(corpus_dir, t, "train"), key=lambda d: d["id"])
        random.Random(f"{seed}:warm:{t}").shuffle(docs)
        ids: list[int] = []
        for d in docs[:int(topic_value(n_docs, t, 100))]:
            ids += [tok.bos_token_id] + tok(d["prompt"] + d["completion"], add_special_tokens=False)["input_ids"]
            ids.append(tok.eos_token_id)
        np.save(Path(data_dir) / f"{t}_warm.train.npy", np.asarray(ids, dtype=np.uint16))
        stats[t] = len(ids)
    return stats


def _save_report(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2))


def evaluate(out: Path, P: dict, log=print, bf16: bool = True, n_samples: int = 2, gen_tokens: int = 64,
             decode_tokens: int = 40) -> dict:
    """Held-out loss per topic for the exported target and draft, decode ratio, greedy samples."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from .corpus import ALL_SETS, TOPICS, read_split
    from .train import copy_probe_loss, eval_loss
    res: dict = {}
    models = {}
    for which in ("target", "draft"):
        d = out / "models" / which
        if not (d / "config.json").exists():
            continue
        m = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
        models[which] = m
        res[f"{which}_params"] = _n_params(m)
        res[f"{which}_heldout_loss"] = eval_loss(m, out / "data", ALL_SETS, P["seq_len"],
                                                 max_tokens=P["eval_tokens"], bf16=bf16)
        log(f"{which} held-out loss: {res[f'{which}_heldout_loss']}")
        res[f"{which}_copy_probe"] = copy_probe_loss(m)
        log(f"{which} copy probe (random tokens, first pass vs repeat): {res[f'{which}_copy_probe']}")
    if "target" in models and "draft" in models:
        tm, dm = decode_ms(models["target"], n=decode_tokens), decode_ms(models["draft"], n=decode_tokens)
        res["decode_ms"] = {"target": round(tm, 3), "draft": round(dm, 3), "ratio": round(tm / dm, 2)}
        log(f"decode ms/token: {res['decode_ms']}")
    if "target" in models:
        tok = AutoTokenizer.from_pretrained(str(out / "models" / "target"))
        samples = []
        for topic in TOPICS:
            for d in read_split(out / "corpus", topic, "heldout")[:n_samples]:
                enc = tok(d["prompt"], return_tensors="pt")
                with torch.no_grad():
                    g = models["target"].generate(**enc, max_new_tokens=gen_tokens, do_sample=False,
                                                  pad_token_id=tok.pad_token_id)
                text = tok.decode(g[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                samples.append({"topic": topic, "prompt": d["prompt"], "continuation": text,
                                "reference": d["completion"][:400]})
        res["samples"] = samples
    return res


if __name__ == "__main__":
    raise SystemExit(main())
