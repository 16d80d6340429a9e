"""Warm-up (offline) training of any draft kind against a target, and `onlinespec train-draft`.

Each step: a batch of token windows [B, T] from the data -> one target forward without grad
(logits p, and last hidden states f for feature drafts) -> the draft's loss -> AdamW step.
  lm:    soft CE(p_t, q_t) of the separate LM on the same window (distillation)
  eagle: SmoothL1(f^_{t+1}, f_{t+1}) + 0.1 CE(p_{t+1}, q) from (f_t, x_{t+1})  (drafts/eagle.py)
  hydra: mean_i CE(p_{t+i}, q_i) from (h_t, x_{t+1..t+i})                      (drafts/hydra.py)
lr: linear warm-up, then cosine to 10% over the run (by steps or wall time, whichever ends first).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import OnlineSpecError, require
from .models import ModelPair


@dataclass
class WarmupConfig:
    steps: int | None = None  # optimizer steps; None with minutes=None -> 200
    minutes: float | None = None  # wall-time limit (whichever of steps/minutes comes first)
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    target_bf16: bool = False  # CPU/GPU autocast for the (no-grad) target pass: ~2x faster on CPU
    max_positions: int | None = None  # feature drafts: token loss on a random subset of positions

    def validate(self) -> None:
        require(self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        require(self.minutes is None or self.minutes > 0, f"minutes must be > 0, got {self.minutes}")
        require(self.batch_size >= 1 and self.seq_len >= 4,
                f"batch_size must be >= 1 and seq_len >= 4 (got {self.batch_size}, {self.seq_len})")
        require(self.lr > 0, f"lr must be > 0, got {self.lr}")


@dataclass
class WarmupResult:
    kind: str
    steps: int
    tokens: int
    seconds: float
    first_loss: float
    final_loss: float  # mean of the last log_every steps
    log: list[dict[str, float]] = field(default_factory=list)


# ---- data -------------------------------------------------------------------------------
def _texts_from_file(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise OnlineSpecError(f"{path}:{i + 1} is not JSON ({e}); give one JSON object per "
                                      'line with "text" or "prompt" (+ optional "completion")') from e
            text = obj.get("text") if isinstance(obj, dict) else None
            if text is None and isinstance(obj, dict) and "prompt" in obj:
                text = obj["prompt"] + obj.get("completion", "")
            require(isinstance(text, str), f'{path}:{i + 1} has no "text" or "prompt" string field')
            out.append(text)
        return out
    text = path.read_text(encoding="utf-8", errors="replace")
    return [p for p in text.split("\n\n") if p.strip()]  # paragraphs: tokenizes fast, keeps order


def load_tokens(data: Any, tokenizer: Any = None) -> torch.Tensor:
    """data: a path (.txt, .jsonl with text/prompt(+completion), .npy token ids), a list of
    strings, a prompt stream (items with .prompt), or token ids -> [N] long."""
    if isinstance(data, (str, Path)) and not (isinstance(data, str) and "\n" in data):
        path = Path(data).expanduser()
        require(path.is_file(), f"training data {str(data)!r} does not exist; pass a .txt, .jsonl "
                                "(text / prompt+completion per line) or .npy (token ids) file")
        if path.suffix == ".npy":
            return torch.from_numpy(np.load(path).astype(np.int64))
        texts = _texts_from_file(path)
    elif isinstance(data, str):
        texts = [data]
    elif isinstance(data, (np.ndarray, torch.Tensor)):
        return torch.as_tensor(np.asarray(data), dtype=torch.long).reshape(-1)
    else:
        items = list(data)
        if items and isinstance(items[0], int):
            return torch.tensor(items, dtype=torch.long)
        texts = [getattr(x, "prompt", x) if not isinstance(x, dict) else
                 x.get("text", x.get("prompt", "") + x.get("completion", "")) for x in items]
    require(tokenizer is not None, "text data needs the pair's tokenizer")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t)["input_ids"] + ([eos] if eos is not None else [])
    require(len(ids) >= 8, "the training data is (almost) empty; give at least a few sentences")
    return torch.tensor(ids, dtype=torch.long)


def batches(tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """Endless random windows [B, T] (T shrinks to fit a short corpus)."""
    T = min(seq_len, tokens.numel())
    hi = tokens.numel() - T + 1
    while True:
        starts = torch.randint(0, hi, (batch_size,), generator=generator)
        yield torch.stack([tokens[s:s + T] for s in starts.tolist()])


# ---- losses -----------------------------------------------------------------------------
@torch.no_grad()
def target_pass(target: Any, ids: torch.Tensor, need_hidden: bool,
                bf16: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = target(input_ids=ids, use_cache=False, output_hidden_states=need_hidden)
    feats = out.hidden_states[-1].float() if need_hidden else None
    return feats, out.logits


def lr_at(cfg: WarmupConfig, step: int, frac: float) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0))))


# ---- the loop ---------------------------------------------------------------------------
def warm_up(pair: ModelPair, data: Any, cfg: WarmupConfig | None = None, progress: bool = False,
            **overrides: Any) -> WarmupResult:
    """Train pair.draft (any kind) toward pair.target on data; returns the loss log."""
    cfg = replace(cfg or WarmupConfig(), **overrides)
    cfg.validate()
    require(pair.draft is not None, "warm_up needs a pair with a draft (load_pair(..., draft_kind=...))")
    steps = cfg.steps if cfg.steps is not None or cfg.minutes is not None else 200
    draft, target = pair.draft, pair.target
    device = pair.device
    tokens = load_tokens(data, pair.tokenizer)
    g = torch.Generator().manual_seed(cfg.seed)
    params = [p for p in draft.module.parameters() if p.requires_grad]
    require(params, "the draft has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, unit="step", desc=f"warm-up {draft.kind}", dynamic_ncols=True)
    was_training = draft.module.training
    draft.module.train()
    t0 = time.perf_counter()
    log: list[dict[str, float]] = []
    recent: list[float] = []
    first = None
    step = n_tok = 0
    try:
        for ids in batches(tokens, cfg.batch_size, cfg.seq_len, g):
            elapsed = time.perf_counter() - t0
            frac = max(step / steps if steps else 0.0, elapsed / (60 * cfg.minutes) if cfg.minutes else 0.0)
            if (steps is not None and step >= steps) or (cfg.minutes is not None and step and elapsed >= 60 * cfg.minutes):
                break
            ids = ids.to(device)
            feats, tlogits = target_pass(target, ids, draft.needs_hidden, cfg.target_bf16)
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step, frac)
            loss, stats = draft.offline_loss(ids, feats, tlogits, generator=g, max_positions=cfg.max_positions)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            n_tok += ids.numel()
            v = loss.item()
            first = v if first is None else first
            recent = (recent + [v])[-cfg.log_every:]
            if step % cfg.log_every == 0 or step == 1:
                log.append({"step": step, "loss": v, "lr": opt.param_groups[0]["lr"],
                            "seconds": time.perf_counter() - t0, **stats})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{v:.3f}", top1=f"{stats.get('top1', 0):.2f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
        draft.module.train(was_training)
        draft.reset()
        draft.invalidate()
    require(step > 0, "no training step ran (minutes too small?)")
    return WarmupResult(draft.kind, step, n_tok, time.perf_counter() - t0, first,
                        sum(recent) / len(recent), log)


# ---- fresh lm drafts --------------------------------------------------------------------
def small_lm(target: Any, hidden: int = 128, layers: int = 1, seed: int = 0):
    """A small causal LM of the target's family (same vocab) to warm up as an lm draft."""
    from transformers import AutoModelForCausalLM
    cfg = copy.deepcopy(target.config)
    heads = max(1, hidden // 64)
    cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads = layers, hidden, heads
    for name, value in (("num_key_value_heads", 1), ("head_dim", hidden // heads),
                        ("intermediate_size", 3 * hidden)):
        if hasattr(cfg, name):
            setattr(cfg, name, value)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types[:layers])
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(cfg).eval()
    except Exception as e:
        raise OnlineSpecError(f"cannot make a small {cfg.model_type} draft ({e}); pass --init DIR "
                              "with an existing small model that shares the target's tokenizer") from e


def load_for_training(kind: str, target: str, init: str | None = None, device: str = "cpu",
                      dtype: str = "float32", hidden: int = 128, layers: int = 1, seed: int = 0,
                      **draft_options: Any) -> ModelPair:
    from .models import load_causal_lm, load_pair, load_tokenizer
    if kind == "lm" and init is None:
        tgt = load_causal_lm(target, "target", device, dtype)
        tok = load_tokenizer(target)
        return load_pair(target=tgt, draft=small_lm(tgt, hidden, layers, seed), tokenizer=tok,
                         draft_kind="lm", device=device)
    return load_pair(target=target, draft=init, draft_kind=kind, device=device, dtype=dtype, **draft_options)


def save_draft(pair: ModelPair, out: str | Path, save_dtype: str | None = None) -> Path:
    from .models import parse_dtype
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dt = parse_dtype(save_dtype) if save_dtype else None
    if pair.draft.kind == "lm":
        model = copy.deepcopy(pair.draft.model).to(dt) if dt is not None else pair.draft.model
        model.save_pretrained(str(out), safe_serialization=True)
        pair.tokenizer.save_pretrained(str(out))  # load_pair checks the draft's tokenizer
    else:
        pair.draft.save(out, dtype=dt)
    return out


# ---- CLI --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onlinespec train-draft",
                                description="Warm-up training of an lm / eagle / hydra draft against a target.")
    p.add_argument("--kind", choices=("lm", "eagle", "hydra"), required=True)
    p.add_argument("--target", required=True, help="target model directory (or hub id when online)")
    p.add_argument("--data", required=True, help=".txt, .jsonl (text or prompt+completion) or .npy token ids")
    p.add_argument("--out", required=True, help="output directory (loads with load_pair(draft=OUT, draft_kind=KIND))")
    p.add_argument("--init", default=None, help="start from this saved draft instead of a fresh one")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--minutes", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="target/draft dtype while training")
    p.add_argument("--save-dtype", default=None, help="e.g. bfloat16 to halve the file (default: as trained)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--target-bf16", action="store_true", help="bf16 autocast for the target pass (faster)")
    p.add_argument("--max-positions", type=int, default=None,
                   help="eagle/hydra: token loss on at most this many random positions per batch")
    g = p.add_argument_group("fresh lm draft")
    g.add_argument("--hidden", type=int, default=128)
    g.add_argument("--layers", type=int, default=1)
    g = p.add_argument_group("heads")
    g.add_argument("--n-heads", type=int, default=None, help="hydra heads (default 4)")
    g.add_argument("--head-layers", type=int, default=None, help="hydra residual blocks per head (default 1)")
    g.add_argument("--prefix", action="store_true", help="hydra: add the prefix decoder layer (Hydra++)")
    g.add_argument("--feature-noise", type=float, default=None, help="eagle: uniform input-feature noise")
    g.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                   help="eagle/hydra: after training, draft only over the N most frequent tokens of "
                        "--data (EAGLE-3's reduced vocabulary; saved with the head)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    opts: dict[str, Any] = {}
    if args.kind == "hydra":
        opts = {k: v for k, v in (("n_heads", args.n_heads), ("n_layers", args.head_layers)) if v is not None}
        if args.prefix:
            opts["prefix"] = True
    if args.kind == "eagle" and args.feature_noise is not None:
        opts["feature_noise"] = args.feature_noise
    hydra_opts = args.n_heads is not None or args.head_layers is not None or args.prefix
    if (hydra_opts and args.kind != "hydra") or (args.feature_noise is not None and args.kind != "eagle"):
        raise OnlineSpecError("--n-heads/--head-layers/--prefix are hydra options, --feature-noise is eagle's")
    cfg = WarmupConfig(steps=args.steps, minutes=args.minutes, batch_size=args.batch_size,
                       seq_len=args.seq_len, lr=args.lr, seed=args.seed, target_bf16=args.target_bf16,
                       max_positions=args.max_positions)
    cfg.validate()
    pair = load_for_training(args.kind, args.target, args.init, args.device, args.dtype,
                             args.hidden, args.layers, args.seed, **opts)
    if args.draft_vocab is not None and args.kind == "lm":
        raise OnlineSpecError("--draft-vocab is for eagle/hydra heads (they read the target's lm_head)")
    res = warm_up(pair, args.data, cfg, progress=not args.quiet)
    if args.draft_vocab is not None:
        from .drafts.features import top_tokens
        pair.draft.set_vocab(top_tokens(load_tokens(args.data, pair.tokenizer), args.draft_vocab,
                                        pair.target.config.vocab_size, tuple(pair.eos_ids)))
    out = save_draft(pair, args.out, args.save_dtype)
    n_params = sum(p.numel() for p in pair.draft.module.parameters() if p.requires_grad)
    report = {"kind": args.kind, "target": args.target, "data": args.data, "params": n_params,
              "config": asdict(cfg), **{k: v for k, v in asdict(res).items() if k != "log"}, "log": res.log}
    (out / "training.json").write_text(json.dumps(report, indent=2))
    print(f"{args.kind} draft ({n_params / 1e6:.2f}M trainable params): {res.steps} steps, "
          f"{res.tokens} tokens, {res.seconds:.0f}s, loss {res.first_loss:.3f} -> {res.final_loss:.3f}; "
          f"saved to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
