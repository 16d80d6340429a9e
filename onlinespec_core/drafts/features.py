"""Shared parts of the feature-level drafts (eagle, hydra).

- Readout: the target's frozen token embeddings and lm_head (+ final norm when the hidden
  states the engine hands over are pre-norm). In transformers 5.x, out.hidden_states[-1] of
  Llama / Qwen2 / GPT-2 is AFTER the final norm (lm_head(h) == logits), so feature drafts
  predict post-norm features and read tokens with lm_head alone (EAGLE-1's choice); the check
  runs once per target, so a family whose last hidden state is pre-norm gets norm + lm_head.
- family_body: one decoder layer of the target's own family (an HF base model with 1 layer,
  no token embeddings, no final norm), so masks, rotary and KV caching are HF's own code.
- FeatureSeq: the target's features of the sequence being decoded (positions 0..n-1).
- RecordBook: what each proposal was computed from, so train_logits(round) can recompute the
  same logits with grad later (updaters may buffer rounds across prompts).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, PreTrainedModel

from ..errors import OnlineSpecError, require
from .base import Draft, pad_vocab

CONFIG_NAME = "draft_config.json"
WEIGHTS_NAME = "model.safetensors"
NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f")


def plain(t: torch.Tensor) -> torch.Tensor:
    """Tensors made under inference_mode cannot be saved for backward: copy them out."""
    return t.clone() if t.is_inference() else t


def final_norm(model: nn.Module) -> nn.Module | None:
    base = getattr(model, "base_model", model)
    for name in NORM_NAMES:
        m = getattr(base, name, None)
        if isinstance(m, nn.Module):
            return m
    return None


class Readout:
    """Frozen target parts, held outside draft.module so updaters never train them.

    Tokens are read through the target's lm_head: its fast-path form (W^T stored once) when the
    target has one, or, with a reduced draft vocabulary (EAGLE-3), only the rows of the N most
    frequent tokens: z = f W_S^T scattered into [V] with -inf elsewhere (q(x) = 0 outside S,
    which rejection sampling handles exactly)."""

    def __init__(self, target: PreTrainedModel) -> None:
        self.target = target
        self.embed = target.get_input_embeddings()
        self.lm_head = target.get_output_embeddings()
        self.vocab_size = target.config.vocab_size
        self.norm = None if features_are_normed(target) else final_norm(target)
        self.subset: torch.Tensor | None = None  # draft vocabulary (sorted target ids) or None
        self._sub: Any = None
        # proposals (no grad) read tokens through an int8 copy of the frozen lm_head (rows of the
        # subset), made once, where the CPU has the kernel; int8 = False: fp32 always
        self.int8 = True
        self._int8: tuple[Any, torch.Tensor | None] | None = None

    def set_vocab(self, ids: torch.Tensor | None) -> None:
        from ..fast import PackedLinear
        if ids is None:
            self.subset = self._sub = None
            return
        ids = torch.as_tensor(ids, dtype=torch.long).unique().to(self.lm_head.weight.device)
        require(ids.numel() > 0 and int(ids.min()) >= 0 and int(ids.max()) < self.vocab_size,
                f"draft vocabulary ids must be in 0..{self.vocab_size - 1}")
        b = self.lm_head.bias
        self.subset = ids
        self._sub = PackedLinear(self.lm_head.weight.detach()[ids], None if b is None else b.detach()[ids])
        self._int8 = None

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def embed_ids(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.embed(ids).to(dtype)

    def logits(self, feat: torch.Tensor) -> torch.Tensor:
        """[..., H] predicted features -> [..., V] fp32 logits (norm only when features are pre-norm)."""
        x = feat.to(self.lm_head.weight.device, self.dtype)
        if self.norm is not None:
            x = self.norm(x)
        z = self._int8_logits(x)
        if z is not None:
            if self.subset is None:
                return pad_vocab(z, self.vocab_size)
            full = z.new_full((*z.shape[:-1], self.vocab_size), float("-inf"))
            return full.index_copy(-1, self.subset, z)
        if self.subset is not None:
            z = self._sub(x).float()
            full = z.new_full((*z.shape[:-1], self.vocab_size), float("-inf"))
            return full.index_copy(-1, self.subset, z)
        from ..fast import lean_of
        lean = lean_of(self.target)
        head = lean.lm_head if lean is not None else self.lm_head
        return pad_vocab(head(x).float(), self.vocab_size)


    def _int8_logits(self, x: torch.Tensor) -> torch.Tensor | None:
        """A proposal's readout (no grad, fp32, CPU, one thread, few rows) through the int8
        kernel: 3.2 MB read per token instead of the demo target's 12.6 MB fp32 lm_head. A draft's logits only choose what it proposes (the target checks
        every token), so this changes no output; the training form (grad) keeps the fp32
        readout. None: not applicable."""
        from .. import fast
        if (not self.int8 or torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu"
                or torch.get_num_threads() != 1):
            return None
        ks = fast.draft_kernels()
        rows = x.numel() // x.shape[-1]
        if ks is None or rows > fast.DRAFT_MAX_ROWS:
            return None
        if self._int8 is None:
            w, b = self.lm_head.weight.detach(), self.lm_head.bias
            if self.subset is not None:
                w, b = w[self.subset], None if b is None else b.detach()[self.subset]
            self._int8 = (fast.pack_i8(ks, w), None if b is None else b.detach().float().contiguous())
        w8, b = self._int8
        y = fast._gemm_i8(ks, x.reshape(rows, x.shape[-1]).contiguous(), w8, b)
        return y.view(*x.shape[:-1], w8.n)


def top_tokens(tokens: torch.Tensor, n: int, vocab_size: int, always: tuple[int, ...] = ()) -> torch.Tensor:
    """The n most frequent ids of a token stream (EAGLE-3's reduced draft vocabulary), plus
    `always` (e.g. EOS), sorted."""
    require(isinstance(n, int) and 1 <= n <= vocab_size, f"draft_vocab must be in 1..{vocab_size}; got {n!r}")
    counts = torch.bincount(tokens.reshape(-1).long().clamp(0, vocab_size - 1), minlength=vocab_size)
    ids = counts.topk(n).indices
    extra = torch.tensor([a for a in always if 0 <= a < vocab_size], dtype=torch.long)
    return torch.cat([ids, extra]).unique()


@torch.inference_mode()
def features_are_normed(target: PreTrainedModel) -> bool:
    """True when lm_head(out.hidden_states[-1]) reproduces the logits (post-norm features)."""
    cached = getattr(target, "_onlinespec_features_normed", None)
    if cached is not None:
        return cached
    dev = target.get_input_embeddings().weight.device
    ids = torch.tensor([[0, 1, 2]], device=dev) % target.config.vocab_size
    out = target(input_ids=ids, output_hidden_states=True, use_cache=False)
    h, lm, want = out.hidden_states[-1], target.get_output_embeddings(), out.logits.float()
    ok = torch.allclose(lm(h).float(), want, atol=1e-3, rtol=1e-3)
    norm = final_norm(target)
    if not ok and (norm is None or not torch.allclose(lm(norm(h)).float(), want, atol=1e-3, rtol=1e-3)):
        warnings.warn(f"{type(target).__name__}: logits are not lm_head(last hidden state) "
                      "(softcapping/scaling?); the feature draft stays lossless but reads tokens "
                      "approximately", stacklevel=2)
    target._onlinespec_features_normed = ok
    return ok


def family_body(target_config: Any, trust_remote_code: bool = False) -> nn.Module:
    """A 1-layer base model of the target's family: inputs_embeds -> one decoder layer -> out."""
    cfg = copy.deepcopy(target_config)
    cfg.num_hidden_layers = 1
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = list(cfg.layer_types[:1])
    cfg.vocab_size = 1  # inputs are fed as embeddings; the token table stays in the target
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if hasattr(cfg, name):
            setattr(cfg, name, None)
    for name, v in list(vars(cfg).items()):  # no dropout: training must see what inference sees
        if isinstance(v, float) and ("dropout" in name or name.endswith("pdrop")):
            setattr(cfg, name, 0.0)
    cfg.use_cache = True
    try:
        body = AutoModel.from_config(cfg, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise OnlineSpecError(
            f"cannot build a decoder layer of the target's family ({cfg.model_type}: {e}); "
            "feature drafts need a model type AutoModel knows (pass trust_remote_code=True only if "
            "you trust the model's code)") from e
    for name in ("embed_tokens", "wte", "embed_in", "word_embeddings"):
        if isinstance(getattr(body, name, None), nn.Embedding):
            setattr(body, name, None)
    for name in NORM_NAMES:
        if isinstance(getattr(body, name, None), nn.Module):
            setattr(body, name, nn.Identity())
    return body


def run_body(body: nn.Module, x: torch.Tensor, start: int, cache: Any = None) -> torch.Tensor:
    """x [n, H] at sequence positions start..start+n-1 -> [n, H] (cache extended when given)."""
    pos = torch.arange(start, start + x.shape[0], device=x.device)[None]
    out = body(inputs_embeds=x[None], position_ids=pos, cache=cache, use_cache=cache is not None)
    return out.last_hidden_state[0]


class FeatureSeq:
    """Target features of one sequence, positions 0..n-1, in a growing buffer. Views [:n] handed
    out earlier stay valid: positions below n are never overwritten in place."""

    def __init__(self, hidden: int, device: torch.device, dtype: torch.dtype) -> None:
        self.buf = torch.empty(64, hidden, device=device, dtype=dtype)
        self.n = 0

    def put(self, start: int, hidden: torch.Tensor) -> None:
        if start > self.n:  # a gap: positions n..start-1 unknown; keep what is contiguous
            return
        end = start + hidden.shape[0]
        if start < self.n or end > self.buf.shape[0]:  # copy-on-write / grow (x2)
            new = torch.empty(max(end, 2 * self.buf.shape[0]), self.buf.shape[1],
                              device=self.buf.device, dtype=self.buf.dtype)
            new[:start] = self.buf[:start]
            self.buf = new
        with torch.inference_mode(self.buf.is_inference()):  # write in the buffer's own mode
            self.buf[start:end] = hidden.to(self.buf.device, self.buf.dtype)
        self.n = end

    def view(self, n: int | None = None) -> torch.Tensor:
        return self.buf[: self.n if n is None else n]


@dataclass
class Record:
    """What one proposal read: the sequence, real features, and the (predicted) inputs fed
    after them, so the same logits can be recomputed with grad later. Positions are
    absolute: seq holds positions offset..L-1, feats positions offset..offset+n-1."""
    seq: torch.Tensor  # [L - offset] ids at proposal time
    feats: torch.Tensor  # [n, H] real target features (a view)
    extra: torch.Tensor  # [m, H] draft-side inputs after the real ones (eagle) / base state (hydra)
    drafted: tuple[int, ...]
    offset: int = 0

    @property
    def context_len(self) -> int:
        return self.offset + self.seq.numel()


class RecordBook:
    """Bounded map (context_len, drafted) -> records; the context tail disambiguates."""

    def __init__(self, max_records: int = 1024) -> None:
        self.max_records = max_records
        self.book: OrderedDict[tuple, list[Record]] = OrderedDict()
        self.count = 0

    def add(self, rec: Record) -> None:
        key = (rec.context_len, rec.drafted)
        self.book.setdefault(key, []).append(rec)
        self.book.move_to_end(key)
        self.count += 1
        while self.count > self.max_records:
            _, recs = self.book.popitem(last=False)
            self.count -= len(recs)

    def find(self, context_len: int, drafted: list[int], tail: torch.Tensor | None) -> Record | None:
        for rec in reversed(self.book.get((context_len, tuple(drafted)), [])):
            n = min(rec.seq.numel(), tail.numel()) if tail is not None else 0
            if tail is None or torch.equal(rec.seq[rec.seq.numel() - n:].cpu(), tail[tail.numel() - n:].cpu()):
                return rec
        return None

    def clear(self) -> None:
        self.book.clear()
        self.count = 0


@torch.no_grad()
def tail_features(target: PreTrainedModel, rnd: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Fallback when a proposal is unknown (e.g. rounds an updater restored with load_state):
    re-read the round's context tail with the target -> (ids, features of positions
    offset..L-2, offset). Exact when the whole context fits in the tail."""
    tail = rnd.context_tail
    if tail is None or tail.numel() < 1:
        raise OnlineSpecError("this round's proposal is unknown to the draft and the round has no "
                              "context_tail; keep context_tail in rounds handed to train_logits")
    dev = target.get_input_embeddings().weight.device
    off = rnd.context_len - tail.numel()
    ids = tail.to(dev)
    pos = torch.arange(off, rnd.context_len, device=dev)[None]
    out = target(input_ids=ids[None], position_ids=pos, output_hidden_states=True, use_cache=False)
    return ids, out.hidden_states[-1][0, :-1].float(), off


def save_head(module: nn.Module, path: str | Path, config: dict[str, Any],
              dtype: torch.dtype | None = None) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
          for k, v in module.state_dict().items()}
    save_file(sd, str(path / WEIGHTS_NAME), metadata={"format": "pt", "kind": config["kind"]})
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2))


def read_head_config(path: str | Path, kind: str) -> dict[str, Any]:
    p = Path(path).expanduser()
    fix = f"train one with `onlinespec train-draft --kind {kind} --target DIR --data FILE --out DIR`, " \
          f"or pass draft=None for a freshly initialised {kind} head"
    if not p.is_dir():
        raise OnlineSpecError(f"{kind} draft directory {str(path)!r} does not exist; {fix}")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (p / name).is_file():
            raise OnlineSpecError(f"{kind} draft directory {str(path)!r} has no {name}; {fix}")
    try:
        cfg = json.loads((p / CONFIG_NAME).read_text())
    except Exception as e:
        raise OnlineSpecError(f"{p / CONFIG_NAME} is not valid JSON ({e}); {fix}") from e
    if cfg.get("kind") != kind:
        raise OnlineSpecError(f"{str(path)!r} holds a {cfg.get('kind')!r} draft, not {kind!r}; "
                              f"load it with draft_kind={cfg.get('kind')!r}")
    return cfg


def check_target(cfg: dict[str, Any], target: PreTrainedModel, path: str | Path) -> None:
    want = cfg.get("target", {})
    have = target_fingerprint(target)
    bad = [k for k in ("hidden_size", "vocab_size", "model_type") if k in want and want[k] != have[k]]
    if bad:
        raise OnlineSpecError(
            f"the {cfg['kind']} head in {str(path)!r} was trained for a different target "
            f"({', '.join(f'{k}={want[k]} vs {have[k]}' for k in bad)}); load it with the target it "
            "was trained on, or warm up a new head with `onlinespec train-draft`")


def load_weights(module: nn.Module, path: str | Path) -> None:
    sd = load_file(str(Path(path) / WEIGHTS_NAME))
    own = module.state_dict()
    try:
        module.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in sd.items()},
                               strict=True)
    except RuntimeError as e:
        raise OnlineSpecError(f"weights in {str(path)!r} do not fit this head ({str(e)[:300]}); "
                              "the config and weights come from different heads: save it again") from e


def target_fingerprint(target: PreTrainedModel) -> dict[str, Any]:
    c = target.config
    return {"model_type": c.model_type, "hidden_size": c.hidden_size, "vocab_size": c.vocab_size}


class FeatureDraft(Draft):
    """What the eagle and hydra drafts share: the target's frozen readout (embeddings, final norm,
    lm_head), the book of proposals for train_logits, and the target's real features."""
    needs_hidden = True
    supports_logit_cache = True  # propose adds the updaters' logit tables (drafts.logit_cache)

    def __init__(self, target: PreTrainedModel, module: nn.Module, cfg: Any) -> None:
        self.module = module
        self.cfg = cfg
        self.readout = Readout(target)
        self.target = target  # frozen; only read when a proposal must be rebuilt
        self.target_info = target_fingerprint(target)
        self.hidden_size = target.config.hidden_size
        self.records = RecordBook(cfg.max_records)
        self.feats: FeatureSeq | None = None
        self.cache: Any = None

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def vocab_size(self) -> int:
        return self.readout.vocab_size

    def corrected(self, z: torch.Tensor, prev: int) -> torch.Tensor:
        """z [V] plus the logit tables of an updater's cache_lr / bigram_lr, if any."""
        return z if self.logit_cache is None else self.logit_cache.apply(z, prev)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.readout.embed_ids(ids.to(self.readout.embed.weight.device), self.dtype).to(self.device)

    def set_vocab(self, ids: torch.Tensor | None) -> None:
        """Draft only over these target ids (None = the full vocabulary); saved with the head."""
        self.readout.set_vocab(ids)

    @property
    def vocab_ids(self) -> list[int] | None:
        s = self.readout.subset
        return None if s is None else s.tolist()

    def save(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        config = {"kind": self.kind, "format": 1, "target": self.target_info,
                  "head": dataclasses.asdict(self.cfg)}
        if self.vocab_ids is not None:
            config["vocab_ids"] = self.vocab_ids
        save_head(self.module, path, config, dtype)


def saved_head_options(source: Any, kind: str, target: PreTrainedModel) -> dict[str, Any]:
    """The head options stored by save() in source (checked against this target); {} for None."""
    if source is None:
        return {}
    info = read_head_config(source, kind)
    check_target(info, target, source)
    return info.get("head", {})


RUNTIME = {"train_window", "max_records"}


def subset(n: int, k: int | None, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Indices of k random rows out of n (all rows when k is None or >= n)."""
    if k is None or k >= n:
        return torch.arange(n, device=device)
    return torch.randperm(n, generator=generator)[:k].to(device)


def head_config(kind: str, cls: type, saved: dict[str, Any], kw: dict[str, Any]):
    """The head's config: saved architecture fields, then the caller's options (checked)."""
    names = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(kw) - names)
    if bad:
        raise OnlineSpecError(f"unknown {kind} draft option(s) {bad}; valid: {', '.join(sorted(names))}")
    keep = names - RUNTIME  # a saved head fixes its architecture, not these runtime knobs
    return cls(**{**{k: v for k, v in saved.items() if k in keep}, **kw})


def build_module(cls: type, target: PreTrainedModel, cfg: Any, device: Any, dtype: Any,
                 trust_remote_code: bool) -> nn.Module:
    from ..models import parse_dtype
    dt = parse_dtype(dtype)
    dt = torch.float32 if dt in (None, "auto") else dt
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        module = cls(target.config, cfg, trust_remote_code)
    return module.to(device=device, dtype=dt)


def load_head(kind: str, draft_cls: type, cfg_cls: type, module_cls: type, target: PreTrainedModel,
              source: Any, device: Any, dtype: Any, trust_remote_code: bool, kw: dict[str, Any]) -> Any:
    """A feature draft: a fresh head for this target (source None) or draft.save's output."""
    saved = saved_head_options(source, kind, target)
    cfg = head_config(kind, cfg_cls, saved, kw)
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()
    module = build_module(module_cls, target, cfg, device, dtype, trust_remote_code)
    if source is not None:
        load_weights(module, source)
    module.eval().requires_grad_(True)
    draft = draft_cls(target, module, cfg)
    if source is not None:
        draft.set_vocab(read_head_config(source, kind).get("vocab_ids"))  # reduced vocabulary, if saved
    return draft
