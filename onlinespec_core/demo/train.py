"""Tokenised data, model configs and a resumable CPU training loop for the demo pair.

Checkpoints are safetensors only (model weights and AdamW moments) plus a JSON sidecar with
the step, tokens seen and accumulated training seconds; the data order is a pure function of
(seed, step), so a resumed run continues exactly where the last checkpoint left it.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .corpus import read_split


# ------------------------------------------------------------------------------------- tokenise
def tokenize_corpus(corpus_dir: str | Path, tokenizer, out_dir: str | Path, sets, splits=("train", "heldout"),
                    log: Callable[[str], None] = print) -> dict:
    """Encode every document as ``<bos> prompt+completion <eos>`` into one uint16 array per split."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stats = {}
    for topic in sets:
        for split in splits:
            docs = read_split(corpus_dir, topic, split)
            texts = [d["prompt"] + d["completion"] for d in docs]
            ids: list[int] = []
            for i in range(0, len(texts), 512):
                enc = tokenizer(texts[i:i + 512], add_special_tokens=False)["input_ids"]
                for e in enc:
                    ids.append(bos)
                    ids.extend(e)
                    ids.append(eos)
            arr = np.asarray(ids, dtype=np.uint16)
            np.save(out / f"{topic}.{split}.npy", arr)
            stats[f"{topic}.{split}"] = int(arr.size)
        log(f"tokens {topic}: train {stats[f'{topic}.train']:,} heldout {stats.get(f'{topic}.heldout', 0):,}")
    (out / "token_stats.json").write_text(json.dumps(stats, indent=2))
    return stats


# --------------------------------------------------------------------------------------- models
def llama_config(vocab_size: int, hidden: int, layers: int, ffn: int, heads: int, kv_heads: int,
                 max_pos: int = 1024, bos: int = 1, eos: int = 2, pad: int = 0):
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_pos,
        tie_word_embeddings=True, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
        rms_norm_eps=1e-5, rope_theta=10000.0)


# ----------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    mix: dict = field(default_factory=dict)  # set name -> sampling weight
    seq_len: int = 256
    batch_size: int = 16
    lr: float = 1.5e-3
    min_lr_frac: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    max_tokens: int = 20_000_000
    max_minutes: float = 1e9  # training seconds budget, cumulative over resumes
    deadline: float | None = None  # unix time: hard stop (checkpoint + finish)
    ckpt_every_s: float = 300.0
    seed: int = 0
    bf16: bool = True
    threads: int = 2
    eval_every: int = 0  # steps; 0 = only at the end
    compile: bool = False  # torch.compile the training forward (~1.2x tokens/s on the 2-core CPU)
    init_from: str | None = None  # checkpoint dir whose weights start a fresh run (continued training)


class Batcher:
    """Random windows of ``seq_len + 1`` tokens; batch ``step`` is a pure function of the seed.

    A mix entry ``"copy:SET"`` makes repeat rows: a window of SET followed by the same window again.
    Predicting the second half is pure in-context copying, the signal that grows induction heads;
    natural code needs that skill (identifiers recur within a function) but teaches it slowly.
    """

    def __init__(self, data_dir: str | Path, mix: dict, seq_len: int, batch_size: int, seed: int,
                 split: str = "train"):
        self.arrays = {}
        for name in mix:
            src = name.split(":", 1)[1] if name.startswith("copy:") else name
            a = np.load(Path(data_dir) / f"{src}.{split}.npy", mmap_mode="r")
            if a.size > seq_len + 1:
                self.arrays[name] = a
        names = sorted(self.arrays)
        w = np.array([mix[n] for n in names], dtype=np.float64)
        self.names, self.p = names, w / w.sum()
        self.seq_len, self.bs, self.seed = seq_len, batch_size, seed

    def batch(self, step: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, step])
        which = rng.choice(len(self.names), size=self.bs, p=self.p)
        rows = []
        for w in which:
            name, a = self.names[w], self.arrays[self.names[w]]
            n = self.seq_len + 1
            if name.startswith("copy:"):
                half = (n + 1) // 2
                off = int(rng.integers(0, a.size - half))
                win = np.asarray(a[off: off + half], dtype=np.int64)
                rows.append(np.concatenate([win, win])[:n])
            else:
                off = int(rng.integers(0, a.size - n))
                rows.append(np.asarray(a[off: off + n], dtype=np.int64))
        return torch.from_numpy(np.stack(rows))


@torch.no_grad()
def copy_probe_loss(model, vocab_lo: int = 100, n: int = 48, rows: int = 4, seed: int = 0) -> dict:
    """Loss on random tokens seen once vs the same tokens repeated: a model with induction heads
    drives the repeat loss far below the first (about log(vocab) when nothing can be predicted)."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    r = torch.randint(vocab_lo, vocab, (rows, n), generator=g)
    bos = model.config.bos_token_id if model.config.bos_token_id is not None else 0
    x = torch.cat([torch.full((rows, 1), bos), r, r], 1)
    lp = torch.log_softmax(model(input_ids=x).logits.float(), -1)
    nll = -lp[:, :-1].gather(2, x[:, 1:, None])[..., 0]
    if was_training:
        model.train()
    return {"first": round(float(nll[:, :n].mean()), 3), "repeat": round(float(nll[:, n + 1:].mean()), 3)}


def _save_ckpt(model, opt, meta: dict, ckpt_dir: Path) -> None:
    from safetensors.torch import save_file
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    name_of = {id(p): n for n, p in model.named_parameters()}
    for n, t in model.state_dict().items():
        tensors[f"model.{n}"] = t.detach().contiguous().clone()
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if not st:
                continue
            n = name_of[id(p)]
            tensors[f"opt.exp_avg.{n}"] = st["exp_avg"].contiguous()
            tensors[f"opt.exp_avg_sq.{n}"] = st["exp_avg_sq"].contiguous()
            meta.setdefault("opt_step", float(st["step"]))
    # model.state_dict() may alias tied weights; safetensors refuses shared storage -> clone above
    tmp = ckpt_dir / "ckpt.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, ckpt_dir / "ckpt.safetensors")
    (ckpt_dir / "ckpt.json.tmp").write_text(json.dumps(meta, indent=2))
    os.replace(ckpt_dir / "ckpt.json.tmp", ckpt_dir / "ckpt.json")


def load_ckpt_weights(model, ckpt_dir: str | Path) -> dict:
    from safetensors.torch import load_file
    t = load_file(str(Path(ckpt_dir) / "ckpt.safetensors"))
    sd = {k[len("model."):]: v for k, v in t.items() if k.startswith("model.")}
    model.load_state_dict(sd, strict=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return json.loads((Path(ckpt_dir) / "ckpt.json").read_text())


def _load_ckpt(model, opt, ckpt_dir: Path) -> dict:
    from safetensors.torch import load_file
    t = load_file(str(ckpt_dir / "ckpt.safetensors"))
    meta = json.loads((ckpt_dir / "ckpt.json").read_text())
    sd = {k[len("model."):]: v for k, v in t.items() if k.startswith("model.")}
    model.load_state_dict(sd, strict=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    params = dict(model.named_parameters())
    for n, p in params.items():
        if f"opt.exp_avg.{n}" in t:
            opt.state[p] = {"step": torch.tensor(float(meta.get("opt_step", meta["step"]))),
                            "exp_avg": t[f"opt.exp_avg.{n}"].clone(),
                            "exp_avg_sq": t[f"opt.exp_avg_sq.{n}"].clone()}
    return meta


@torch.no_grad()
def eval_loss(model, data_dir: str | Path, sets, seq_len: int, split: str = "heldout",
              max_tokens: int = 60_000, bf16: bool = True) -> dict:
    """Mean next-token loss per set on contiguous non-overlapping windows of the split."""
    was_training = model.training
    model.eval()
    res = {}
    for name in sets:
        path = Path(data_dir) / f"{name}.{split}.npy"
        if not path.exists():
            continue
        a = np.load(path)[: max_tokens + 1]
        n = (a.size - 1) // seq_len
        if n == 0:
            continue
        tot, cnt = 0.0, 0
        for i in range(0, n, 8):
            rows = [a[j * seq_len: j * seq_len + seq_len + 1].astype(np.int64) for j in range(i, min(i + 8, n))]
            x = torch.from_numpy(np.stack(rows))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=x[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)),
                                                     x[:, 1:].reshape(-1), reduction="sum")
            tot += float(loss)
            cnt += x[:, 1:].numel()
        res[name] = round(tot / cnt, 4)
    if was_training:
        model.train()
    return res


def train_lm(model, data_dir: str | Path, work_dir: str | Path, cfg: TrainConfig, resume: bool = True,
             log: Callable[[str], None] = print, eval_sets=None) -> dict:
    """Train ``model`` on the mixture; checkpoint every ``ckpt_every_s``; stop at the first of
    max_tokens, max_minutes (cumulative) or deadline. Returns the final meta dict."""
    from tqdm.auto import tqdm

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    work = Path(work_dir)
    ckpt_dir = work / "ckpt"
    batcher = Batcher(data_dir, cfg.mix, cfg.seq_len, cfg.batch_size, cfg.seed)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    meta = {"step": 0, "tokens": 0, "train_s": 0.0, "config": asdict(cfg), "log": []}
    if resume and (ckpt_dir / "ckpt.json").exists():
        meta = _load_ckpt(model, opt, ckpt_dir)
        log(f"resumed from step {meta['step']} ({meta['tokens']:,} tokens, {meta['train_s'] / 60:.1f} min)")
        if meta.get("done"):
            log("checkpoint is already final")
            return meta
    elif cfg.init_from:
        src = load_ckpt_weights(model, cfg.init_from)
        meta["init_from"] = {"dir": str(cfg.init_from), "step": src.get("step"), "tokens": src.get("tokens")}
        log(f"initialised from {cfg.init_from} (step {src.get('step')}, {src.get('tokens', 0):,} tokens)")
    tokens_per_step = cfg.batch_size * cfg.seq_len
    total_steps_tok = max(1, cfg.max_tokens // tokens_per_step)
    budget_s = cfg.max_minutes * 60.0
    if cfg.deadline is not None:
        budget_s = min(budget_s, meta["train_s"] + max(0.0, cfg.deadline - time.time()))
    model.train()
    forward = torch.compile(model) if cfg.compile else model  # shares the parameters with `model`
    t_last_ckpt = time.time()
    t_seg = time.time()
    train_s0 = meta["train_s"]
    step = meta["step"]
    pbar = tqdm(total=total_steps_tok, initial=step, desc="train", unit="step", mininterval=10,
                disable=os.environ.get("ONLINESPEC_NO_TQDM") == "1")
    ema = None
    stop_reason = "max_tokens"
    while True:
        elapsed = train_s0 + (time.time() - t_seg)
        if step >= total_steps_tok:
            stop_reason = "max_tokens"
            break
        if elapsed >= budget_s:
            stop_reason = "deadline" if cfg.deadline is not None and time.time() >= cfg.deadline - 1 else "max_minutes"
            break
        frac = max(step / total_steps_tok, elapsed / budget_s if budget_s < 1e12 else 0.0)
        if step < cfg.warmup_steps:
            lr = cfg.lr * (step + 1) / cfg.warmup_steps
        else:
            lr = cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        x = batcher.batch(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            logits = forward(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        lv = float(loss.detach())
        ema = lv if ema is None else 0.98 * ema + 0.02 * lv
        pbar.update(1)
        if step % 20 == 0:
            el = train_s0 + (time.time() - t_seg)
            pbar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.2e}", tok_s=f"{(step - meta['step'] + 1) * tokens_per_step / max(time.time() - t_seg, 1e-6):.0f}")
            if step % 100 == 0:
                log(f"step {step} tokens {step * tokens_per_step:,} loss {ema:.4f} lr {lr:.2e} "
                    f"train_min {el / 60:.1f} frac {frac:.3f}")
        if cfg.eval_every and eval_sets and step % cfg.eval_every == 0:
            log(f"eval step {step}: {eval_loss(model, data_dir, eval_sets, cfg.seq_len, bf16=cfg.bf16, max_tokens=20000)} "
                f"copy probe {copy_probe_loss(model)}")
        if time.time() - t_last_ckpt >= cfg.ckpt_every_s:
            m = dict(meta, step=step, tokens=step * tokens_per_step,
                     train_s=train_s0 + (time.time() - t_seg), last_loss=ema)
            m["log"] = meta.get("log", []) + [{"step": step, "loss": ema, "lr": lr}]
            meta["log"] = m["log"]
            _save_ckpt(model, opt, m, ckpt_dir)
            log(f"checkpoint at step {step}")
            t_last_ckpt = time.time()
    pbar.close()
    meta.update(step=step, tokens=step * tokens_per_step, train_s=train_s0 + (time.time() - t_seg),
                last_loss=ema, done=True, stop_reason=stop_reason)
    _save_ckpt(model, opt, meta, ckpt_dir)
    log(f"training finished: {stop_reason} at step {step}, {meta['tokens']:,} tokens, "
        f"{meta['train_s'] / 60:.1f} train-min")
    return meta


def export_model(model, tokenizer, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> None:
    """Save an HF model dir (config.json, model.safetensors, tokenizer files)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    m = model.to(dtype)
    m.config.use_cache = True
    m.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    model.to(torch.float32)
