"""Shared machinery of the gradient updaters (ogd, optimistic, ensemble, dpo).

- fp32 master weights; the draft module only ever holds the deployed weights (cast once).
- Cadence: "rounds" = one step every `every` observed rounds on the last `batch` rounds;
  "chunk" = test-then-train: after every `chunk_prompts` prompts, `epochs` passes over the
  chunk's rounds in minibatches of `batch` (the paper's released protocol).
- Guard: a non-finite loss or gradient skips the step and rewrites the last good (deployed)
  weights into the module; counted in snapshot().skipped.
- State: masters, optimizer moments, buffered rounds and counters round-trip through
  state_tensors/state_json/load_state.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from .. import fast
from ..drafts.base import Draft
from ..drafts.logit_cache import LogitCache
from ..errors import require
from ..feedback import Round
from ..options import build
from .base import Update, Updater, UpdaterSnapshot
from .losses import (DISTILL_LOSSES, POSITIONS, distill_rows, n_positions, online_loss,
                     round_distill_loss)

ROUND_TENSORS = ("context_tail", "target_logits", "target_hidden")  # what train_logits may read
ROUND_DROP = ("draft_logits",)  # not needed for training


@dataclass
class GradConfig:
    lr: float = 1e-3
    optimizer: str = "adam"  # sgd | adam
    momentum: float = 0.0  # sgd only
    weight_decay: float = 0.0
    loss: str = "fkl"  # fkl | ce | rkl | jsd  (OSD family)
    positions: str = "path"  # path = accepted + first rejected | all = every drafted position
    temperature: float = 1.0  # distillation temperature on both sides
    cadence: str = "rounds"  # rounds | chunk
    every: int = 8  # rounds cadence: one step per `every` observed rounds (update cost ~ 1/every)
    batch: int = 8  # rounds per step (the most recent ones)
    chunk_prompts: int = 25  # chunk cadence: train after every K prompts ...
    epochs: int = 2  # ... for E passes over the chunk
    max_grad_norm: float = 1.0  # clip the step's gradient norm (0 = off)
    merge: bool = True  # lm drafts, path positions: one forward per sequence for all its rounds
    feature_weight: float = 0.0  # feature drafts: + w * SmoothL1(f^, f) (EAGLE's recipe: 10 = 1 : 0.1)
    seed: int = 0  # minibatch order in chunk cadence
    anchor: float = 0.02  # after each step pull the weights toward the offline draft: w -= anchor * (w - w0)
    #                       (0 = off; measured on the warmed demo draft: less forgetting across topics)
    train: str = "all"  # all | layers = every weight but the vocabulary matrices (input embedding,
    #                     output head: [V, H] each, most of an lm draft's weights and of a step's cost)
    #                     | none = no gradient step at all (only the logit cache learns, if on)
    context_grad: str = "auto"  # lm drafts, fast path: on = the gradient flows through the re-read
    #                     context tail too (HF's); off = the context's K/V are constants (the proposal's
    #                     cache; ~6 ms less per re-read tail, the same tau on shift_long); auto = on for
    #                     chunk cadence (finished sequences, one re-read per block), off for rounds
    cache_lr: float = 0.0  # lm drafts: step size of the fast unigram logit table (drafts.logit_cache;
    #                        one OGD step per round from the round's own logits, no backward; 0 = off)
    bigram_lr: float = 0.0  # ... of the fast bigram logit table B[previous token] (0 = off)
    cache_decay: float = 0.05  # per round, both tables: u <- (1 - decay) u (a short memory)
    head_rows: int = 0  # lm drafts, ogd/dpo: 0 = the exact gradient; N > 0 = the output head learns on
    #                     the rows of the batch's tokens and of the draft's top-N at each position only
    #                     (sparse rows, lazy Adam on them, the anchor on them; logits and the hidden
    #                     states' gradient stay exact): a step no longer passes over the [V, H] matrix

    def validate(self, name: str) -> None:
        require(self.optimizer in ("sgd", "adam"), f"{name}: optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        require(self.loss in DISTILL_LOSSES, f"{name}: loss must be one of {DISTILL_LOSSES}, got {self.loss!r}")
        require(self.positions in POSITIONS, f"{name}: positions must be one of {POSITIONS}, got {self.positions!r}")
        require(self.cadence in ("rounds", "chunk"), f"{name}: cadence must be 'rounds' or 'chunk', got {self.cadence!r}")
        for f in ("every", "batch", "chunk_prompts", "epochs"):
            v = getattr(self, f)
            require(isinstance(v, int) and v >= 1, f"{name}: {f} must be an integer >= 1, got {v!r}")
        require(self.lr > 0, f"{name}: lr must be > 0, got {self.lr!r}")
        require(self.temperature > 0, f"{name}: temperature must be > 0, got {self.temperature!r}")
        require(self.max_grad_norm >= 0, f"{name}: max_grad_norm must be >= 0 (0 = off)")
        require(self.feature_weight >= 0, f"{name}: feature_weight must be >= 0")
        require(0 <= self.anchor < 1, f"{name}: anchor must be in [0, 1) (a fraction per step; 0 = off)")
        require(self.cache_lr >= 0 and self.bigram_lr >= 0, f"{name}: cache_lr and bigram_lr must be >= 0 (0 = off)")
        require(0 <= self.cache_decay < 1, f"{name}: cache_decay must be in [0, 1) (a fraction per round)")
        require(self.context_grad in ("auto", "on", "off"),
                f"{name}: context_grad must be 'auto', 'on' or 'off', got {self.context_grad!r}")
        require(self.train in ("all", "layers", "none"),
                f"{name}: train must be 'all', 'layers' or 'none', got {self.train!r}")
        require(isinstance(self.head_rows, int) and self.head_rows >= 0,
                f"{name}: head_rows must be an integer >= 0 (0 = the exact gradient)")


# ---- tensors ---------------------------------------------------------------------------
def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    ps = [p for p in module.parameters() if p.requires_grad]
    require(bool(ps), "this draft has no trainable parameters; online updaters need a trainable draft "
                      "(use updater='frozen')")
    return ps


def vocab_matrices(module: torch.nn.Module) -> list[torch.Tensor]:
    """The module's input embedding and output head weights (one if tied), where it has them."""
    out = []
    for get in ("get_input_embeddings", "get_output_embeddings"):
        f = getattr(module, get, None)
        m = f() if callable(f) else None
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and not any(w is x for x in out):
            out.append(w)
    return out


def fp32_copy(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().to(torch.float32, copy=True) for t in ts]


def master_weights(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """fp32 master weights for an updater whose deployed weights are its masters (ogd, dpo): the
    parameters themselves (detached aliases: same storage and version counter, so an optimizer
    step writes the module directly, with no copy) when every one is fp32, else fp32 copies."""
    if all(p.dtype == torch.float32 for p in params):
        return [p.detach() for p in params]
    return fp32_copy(params)


def adopt_masters(params: list[torch.nn.Parameter], values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Loaded master values -> the masters master_weights would hold (written into the aliased
    parameters, or kept as the copies)."""
    if all(p.dtype == torch.float32 for p in params):
        write_params(params, values)
        return [p.detach() for p in params]
    return values


def aliased(params: list[torch.nn.Parameter], values: list[torch.Tensor]) -> bool:
    return all(p.data_ptr() == v.data_ptr() and p.shape == v.shape for p, v in zip(params, values))


@torch.no_grad()
def write_params(params: list[torch.nn.Parameter], values: list[torch.Tensor]) -> None:
    """Deploy fp32 values into the module's parameters (one cast, in place); a value that is the
    parameter's own storage (master_weights) is skipped."""
    for p, v in zip(params, values):
        if p.data_ptr() == v.data_ptr() and p.shape == v.shape and p.stride() == v.stride():
            continue
        p.copy_(v)


def all_finite(ts: list[torch.Tensor]) -> bool:
    return bool(torch.stack([torch.isfinite(t).all() for t in ts]).all())


def clip_(grads: list[torch.Tensor], max_norm: float) -> float | None:
    """Scale grads to norm <= max_norm in place; the pre-clip norm, or None if non-finite."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if not bool(torch.isfinite(norm)):
        return None
    if max_norm > 0 and float(norm) > max_norm:
        torch._foreach_mul_(grads, max_norm / (float(norm) + 1e-6))
    return float(norm)


@torch.no_grad()
def anchor_(tensors: list[torch.Tensor], ref: list[torch.Tensor], rate: float) -> None:
    """Decoupled pull toward the offline weights, in place: w <- w - rate * (w - w0)."""
    if rate > 0:
        torch._foreach_lerp_(tensors, ref, min(rate, 1.0))


def make_optimizer(kind: str, tensors: list[torch.Tensor], lr: float, momentum: float = 0.0,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(tensors, lr=lr, momentum=momentum, weight_decay=weight_decay)
    # fused: one kernel over all tensors (the per-tensor loop was ~1/4 of an update step here)
    return torch.optim.Adam(tensors, lr=lr, weight_decay=weight_decay, fused=True)


@torch.no_grad()
def sparse_rows_step(opt: torch.optim.Optimizer, master: torch.Tensor, grad: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """The optimizer's step on the rows a sparse (coalesced) gradient touches; the others keep
    their values and moments (lazy Adam, as torch's SparseAdam: bias correction by the tensor's
    own step count). The state lives in opt.state[master] under Adam's names, so the saved
    state round-trips. Returns the rows."""
    idx, vals = grad.indices()[0], grad.values()
    if scale != 1.0:
        vals = vals / scale
    group = opt.param_groups[0]
    lr = group["lr"]
    if not isinstance(opt, torch.optim.Adam):  # sgd (momentum ignored on lazy rows)
        master.index_add_(0, idx, vals, alpha=-lr)
        return idx
    b1, b2 = group["betas"]
    eps = group["eps"]
    st = opt.state[master]
    if not st:
        st["step"] = torch.tensor(0.0)
        st["exp_avg"] = torch.zeros_like(master)
        st["exp_avg_sq"] = torch.zeros_like(master)
    st["step"] += 1
    t = float(st["step"])
    m = st["exp_avg"].index_select(0, idx).mul_(b1).add_(vals, alpha=1 - b1)
    v = st["exp_avg_sq"].index_select(0, idx).mul_(b2).addcmul_(vals, vals, value=1 - b2)
    st["exp_avg"].index_copy_(0, idx, m)
    st["exp_avg_sq"].index_copy_(0, idx, v)
    upd = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt_().add_(eps))
    master.index_add_(0, idx, upd, alpha=-lr)
    return idx


def optimizer_step(opt: torch.optim.Optimizer, masters: list[torch.Tensor], grads: list[torch.Tensor],
                   scale: float = 1.0) -> dict[int, torch.Tensor]:
    """One step on grads / scale (scale: losses_and_grads(clip=False)'s clip divisor). Fused Adam
    divides inside its kernel (grad_scale): no separate pass over the gradients to clip them.
    Sparse gradients (option head_rows) step only their rows: {index: rows} of those."""
    rows: dict[int, torch.Tensor] = {}
    if any(g.is_sparse for g in grads):
        for i, (m, g) in enumerate(zip(masters, grads)):
            if g.is_sparse:
                rows[i] = sparse_rows_step(opt, m, g, scale)
        dense = [(m, g) for m, g in zip(masters, grads) if not g.is_sparse]
        masters, grads = [m for m, _ in dense], [g for _, g in dense]
        if not masters:
            return rows
    fused = bool(opt.defaults.get("fused"))
    if scale != 1.0:
        if fused:
            opt.grad_scale = torch.tensor(scale, dtype=torch.float32, device=grads[0].device)
        else:
            torch._foreach_div_(grads, scale)
    for m, g in zip(masters, grads):
        m.grad = g
    try:
        opt.step()
    finally:
        if fused:
            opt.grad_scale = None
        for m in masters:
            m.grad = None
    return rows


def optim_tensors(opt: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{i}.{k}": v for i, st in opt.state_dict()["state"].items()
            for k, v in st.items() if isinstance(v, torch.Tensor)}


def optim_json(opt: torch.optim.Optimizer) -> dict[str, Any]:
    sd = opt.state_dict()
    return {"param_groups": sd["param_groups"],
            "scalars": {str(i): {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
                        for i, st in sd["state"].items()}}


def load_optim(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
               prefix: str) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            i, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(i), {})[name] = v
    for i, d in meta.get("scalars", {}).items():
        state.setdefault(int(i), {}).update(d)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def load_list(tensors: dict[str, torch.Tensor], prefix: str, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for i, t in enumerate(like):
        v = tensors[f"{prefix}.{i}"]
        require(v.shape == t.shape, f"saved {prefix}.{i} has shape {tuple(v.shape)}, expected {tuple(t.shape)}")
        out.append(v.to(device=t.device, dtype=torch.float32).clone())
    return out


def round_means(per_row: torch.Tensor, ms: list[int]) -> torch.Tensor:
    """[sum(ms)] per-row losses -> [len(ms)] per-round means, as one segment sum (a split and a
    mean per round cost ~60 autograd nodes on a 64-row step of 1-row rounds)."""
    seg = torch.repeat_interleave(torch.arange(len(ms), device=per_row.device),
                                  torch.tensor(ms, device=per_row.device))
    sums = per_row.new_zeros(len(ms)).index_add(0, seg, per_row)
    return sums / torch.tensor(ms, dtype=per_row.dtype, device=per_row.device)


# ---- rounds in the buffer ---------------------------------------------------------------
def training_copy(rnd: Round, logit_rows: int | None = None) -> Round:
    """A training copy of a round: own (autograd-usable) tensors, independent of release();
    only the first logit_rows target rows are kept (the positions a loss reads)."""
    c = dataclasses.replace(rnd)
    for f in ROUND_TENSORS:
        t = getattr(rnd, f)
        if f == "target_logits" and t is not None and logit_rows is not None:
            t = t[:logit_rows]
        setattr(c, f, None if t is None else t.detach().clone())
    for f in ROUND_DROP:
        setattr(c, f, None)
    return c


def rounds_to_state(rounds: list[Round], prefix: str) -> tuple[dict[str, torch.Tensor], list[dict]]:
    tensors, meta = {}, []
    for j, r in enumerate(rounds):
        d = {}
        for f in fields(Round):
            v = getattr(r, f.name)
            if f.name in ROUND_TENSORS:
                if v is not None:
                    tensors[f"{prefix}.{j}.{f.name}"] = v.detach().contiguous()
            elif f.name not in ROUND_DROP:
                d[f.name] = v
        meta.append(d)
    return tensors, meta


def rounds_from_state(tensors: dict[str, torch.Tensor], meta: list[dict], prefix: str,
                      device: torch.device) -> list[Round]:
    out = []
    for j, d in enumerate(meta):
        r = Round(**d)
        for f in ROUND_TENSORS:
            t = tensors.get(f"{prefix}.{j}.{f}")
            setattr(r, f, None if t is None else t.to(device).clone())
        out.append(r)
    return out


def contiguous_groups(batch: list[Round]) -> list[list[int]]:
    """Runs of rounds where each continues the previous one's sequence."""
    groups: list[list[int]] = []
    for i, r in enumerate(batch):
        if groups:
            p = batch[groups[-1][-1]]
            e = len(p.emitted)
            tail = r.context_tail
            if (r.context_len == p.context_len + e and tail is not None and tail.numel() >= e
                    and tail[tail.numel() - e:].tolist() == list(p.emitted)):
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups


def sequence_round(rounds: list[Round], m_last: int) -> Round:
    """One Round covering consecutive rounds of a sequence. On the path (accepted + first
    rejected), round t's draft logits condition on context_t + emitted_t[:i]: all inside the
    final sequence, so a single causal forward gives every round's training logits."""
    first, last = rounds[0], rounds[-1]
    toks = [t for r in rounds[:-1] for t in r.emitted] + list(last.drafted[:m_last - 1]) + [0]  # last never fed
    return Round(index=first.index, context_len=first.context_len, k=len(toks), drafted=toks,
                 accepted=len(toks), emitted=toks, kind="merged", context_tail=first.context_tail)


# ---- the base updater -------------------------------------------------------------------
class GradientUpdater(Updater):
    """Cadence, buffer, guard and state shared by every gradient updater. Subclasses give
    init_weights() (from the draft's current weights), deployed() (fp32 values the module
    must hold), step(batch, n_new) (one update on a batch whose last n_new rounds are new
    feedback) and optionally extra_tensors/extra_json/load_extra/on_chunk_start/after_feedback."""
    name: ClassVar[str] = "gradient"
    Config: ClassVar[type] = GradConfig

    def __init__(self, **options: Any) -> None:
        self.cfg = build(self.Config, options, f"updater {self.name!r}")
        self.draft: Draft | None = None
        self.params: list[torch.nn.Parameter] = []
        self.buffer: list[Round] = []
        self.since = 0  # observed rounds since the last step (rounds cadence)
        self.chunk_key: int | None = None
        self.chunks = 0
        self.seq_counter = 0  # prompt counter for rounds without a prompt_index
        self.last_end: int | None = None
        self.observed = self.updates = self.skipped = 0
        self.last_loss: float | None = None  # training loss of the last step
        self.last_online_loss: float | None = None  # f_t(w_t) of the last observed round

    # -- protocol --
    def attach(self, draft: Draft) -> None:
        params = trainable(draft.module)
        if self.cfg.train == "layers":
            vocab = vocab_matrices(draft.module)
            params = [p for p in params if not any(p is v for v in vocab)]
            require(bool(params), f"{self.name}: train='layers' leaves no trainable weight in this draft")
        require(all_finite(params), f"{self.name}: the draft's weights contain NaN or inf, so the guard "
                                    "would restore broken weights; reload the draft before training it")
        self.draft, self.params = draft, params
        self.offline = fp32_copy(params) if self.cfg.anchor > 0 else []  # w0 for the anchor
        self.cache = None  # the draft's logit tables, when this updater trains them
        if self.cfg.cache_lr > 0 or self.cfg.bigram_lr > 0:
            require(getattr(draft, "supports_logit_cache", False),
                    f"{self.name}: cache_lr / bigram_lr apply to lm, eagle and hydra drafts (this draft is "
                    f"{getattr(draft, 'kind', '?')!r}); set them to 0")
            c = draft.logit_cache  # the draft's own (learnt state, saved with it): kept across updaters
            if c is None or c.vocab != draft.vocab_size:
                c = draft.logit_cache = LogitCache(draft.vocab_size, self.cfg.cache_decay, params[0].device)
            c.decay = self.cfg.cache_decay
            self.cache = c
        self.init_weights()

    def detach(self) -> None:
        if self.draft is not None:
            write_params(self.params, self.deployed())

    @torch.no_grad()
    def cache_step(self, rnd: Round) -> float | None:
        """The logit cache's OGD step on this round: grad of the fkl loss at the deployed logits
        (the proposal's, which include the cache) in u and B[prev] = q_i - p_i per path row.
        Returns the round's online loss f_t(w_t) when the same pass gave it (fkl, T = 1)."""
        if rnd.k == 0 or rnd.draft_logits is None or rnd.target_logits is None or rnd.context_tail is None:
            return None
        m = min(n_positions(rnd, self.cfg.positions), rnd.draft_logits.shape[0])
        d, t = rnd.draft_logits[:m].float(), rnd.target_logits[:m].float().to(rnd.draft_logits.device)
        both = fast.kl_rows_and_grad(d, t)  # one compiled pass: KL per row and q - p
        if both is None:
            loss, g = None, torch.softmax(d, -1) - torch.softmax(t, -1)
            finite = bool(torch.isfinite(g).all())
        else:  # a finite KL comes from finite logits, whose q - p is finite too
            loss, g = float(both[0].mean()), both[1]
            finite = math.isfinite(loss)
        if finite:
            prevs = [int(rnd.context_tail[-1])] + [int(x) for x in rnd.drafted[:m - 1]]
            self.cache.step(g.to(self.cache.unigram.device), prevs, self.cfg.cache_lr, self.cfg.bigram_lr)
        same = self.cfg.loss == "fkl" and self.cfg.temperature == 1.0
        return loss if same else None

    @property
    def feedback_rows(self) -> str:  # type: ignore[override]  (the config decides)
        return self.cfg.positions

    def observe(self, rnd: Round) -> Update:
        c = self.cfg
        self.observed += 1
        loss = self.cache_step(rnd) if self.cache is not None else None
        if loss is None:
            loss = online_loss(rnd, c.loss, c.positions, c.temperature)
        self.last_online_loss = loss
        if c.train == "none":  # nothing to buffer: no gradient step will read it
            return Update(False, loss)
        rows = n_positions(rnd, c.positions) if self.reads_target_logits else 0
        return Update(self._take(training_copy(rnd, rows)), loss)

    @property
    def reads_target_logits(self) -> bool:
        """Does a step read the buffered rounds' target logits (dpo/sft: the tokens only)?"""
        return True

    def _take(self, item: Round) -> bool:
        """Buffer one round; step when the cadence says so. True when the weights changed."""
        c = self.cfg
        if c.cadence == "rounds":
            self.buffer.append(item)
            del self.buffer[:-c.batch]
            self.since += 1
            if self.since < c.every:
                return False
            n_new = min(self.since, len(self.buffer))
            self.since = 0
            changed = self._guarded_step(self.buffer, n_new)
            self.after_feedback()
            return changed
        key = self._prompt_of(item) // c.chunk_prompts
        changed = False
        if self.chunk_key is not None and key != self.chunk_key and self.buffer:
            changed = self.train_chunk(self.buffer)
            self.buffer = []
        self.chunk_key = key
        self.buffer.append(item)
        return changed

    def flush(self) -> bool:
        """Chunk cadence: train on the rounds buffered so far (e.g. at the end of a stream)."""
        if self.cfg.cadence != "chunk" or not self.buffer or self.cfg.train == "none":
            return False
        changed = self.train_chunk(self.buffer)
        self.buffer = []
        return changed

    def train_chunk(self, rounds: list[Round]) -> bool:
        c = self.cfg
        self.on_chunk_start()
        changed = False
        blocks = [rounds[s:s + c.batch] for s in range(0, len(rounds), c.batch)]  # contiguous: one forward each
        for epoch in range(c.epochs):
            order = list(range(len(blocks)))
            if epoch > 0:  # first pass in stream order (Hedge measures before training)
                random.Random(f"{c.seed}/{self.chunks}/{epoch}").shuffle(order)
            for i in order:
                changed |= self._guarded_step(blocks[i], len(blocks[i]) if epoch == 0 else 0)
        self.chunks += 1
        self.after_feedback()
        return changed

    def _prompt_of(self, rnd: Round) -> int:
        if rnd.prompt_index is not None:
            return rnd.prompt_index
        if self.last_end is not None and rnd.context_len != self.last_end:
            self.seq_counter += 1  # not a continuation of the last round: a new sequence
        self.last_end = rnd.context_len + len(rnd.emitted)
        return self.seq_counter

    def _guarded_step(self, batch: list[Round], n_new: int) -> bool:
        ok = self.step(batch, n_new)
        if ok is None:  # nothing to learn from in this batch
            return False
        if ok:
            self.updates += 1
        else:  # guard: restore the last good weights
            self.skipped += 1
            write_params(self.params, self.deployed())
        return True  # the module was (re)written either way

    # -- helpers for subclasses --
    def pull_to_offline(self, tensors: list[torch.Tensor]) -> None:
        """The anchor (option `anchor`, a fraction per step): w <- w - anchor * (w - w0), w0 = the
        draft as attached (the offline weights): bounds how far a run of one topic can drift."""
        if self.cfg.anchor > 0 and self.offline:
            rows = getattr(self, "stepped_rows", None) or {}
            if not rows:
                anchor_(tensors, self.offline, self.cfg.anchor)
                return
            with torch.no_grad():  # sparse rows: the pull on the rows that moved
                for i, (t, r) in enumerate(zip(tensors, self.offline)):
                    if i in rows:
                        idx = rows[i]
                        t.index_copy_(0, idx, t.index_select(0, idx).lerp_(r.index_select(0, idx), self.cfg.anchor))
                    else:
                        t.lerp_(r, self.cfg.anchor)

    def item_loss(self, rnd: Round) -> torch.Tensor:
        c = self.cfg
        if c.feature_weight > 0 and self.draft.has_train_terms:
            t = self.draft.train_terms(rnd)  # feature drafts: logits and SmoothL1 on features
            loss = round_distill_loss(t["logits"], rnd, c.loss, c.positions, c.temperature)
            return loss + c.feature_weight * t["feature_loss"] if "feature_loss" in t else loss
        return round_distill_loss(self.draft.train_logits(rnd), rnd, c.loss, c.positions, c.temperature)

    def batch_logits(self, batch: list[Round]) -> list[torch.Tensor]:
        """Per round: draft logits [m_r, V] at its feedback positions, from the inputs it was
        proposed with (merged into one forward per sequence for lm drafts on the path)."""
        c = self.cfg
        ms = [n_positions(r, c.positions) for r in batch]
        if self.draft.batches_rounds:  # hydra: every round's rows in one pass
            ms = [min(m, r.k) for m, r in zip(ms, batch)]
            return list(self.draft.train_rows(batch, ms).split(ms))
        if not (c.merge and c.positions == "path" and self.draft.merges_rounds):
            return [self.draft.train_logits(r)[:m] for r, m in zip(batch, ms)]
        out: list[torch.Tensor] = [None] * len(batch)  # type: ignore[list-item]
        for g in contiguous_groups(batch):
            first = batch[g[0]]
            logits = self.draft.train_logits(sequence_round([batch[i] for i in g], ms[g[-1]]))
            for i in g:
                off = batch[i].context_len - first.context_len
                out[i] = logits[off:off + ms[i]]
        return out

    def batch_losses(self, batch: list[Round]) -> torch.Tensor:
        c = self.cfg
        if c.feature_weight > 0 and self.draft.has_train_terms:
            return torch.stack([self.item_loss(r) for r in batch])
        if c.merge and c.positions == "path" and self.draft.merges_rounds:
            return self.merged_losses(batch)
        if self.draft.batches_rounds:  # hydra: one pass, one divergence over all rows
            ms = [min(n_positions(r, c.positions), r.k) for r in batch]
            rows = self.draft.train_rows(batch, ms)
            targets = torch.cat([r.target_logits[:m].to(rows.device) for r, m in zip(batch, ms)])
            per = distill_rows(rows, targets, c.loss, c.temperature)
            return round_means(per, ms)
        return torch.stack([round_distill_loss(lg, r, c.loss, c.positions, c.temperature)
                            for lg, r in zip(self.batch_logits(batch), batch)])

    def merged_losses(self, batch: list[Round]) -> torch.Tensor:
        """batch_losses for lm drafts on the path: one forward per sequence, then ONE divergence
        over every feedback row of the batch (per-round slices of [T, V] logits each cost a
        full-size zero tensor in backward: ~60% of a 64-row step), averaged back per round."""
        c = self.cfg
        rows, ms = self.merged_rows(batch)
        targets = torch.cat([r.target_logits[:m].to(rows.device) for r, m in zip(batch, ms)])
        return round_means(distill_rows(rows, targets, c.loss, c.temperature), ms)

    def merged_rows(self, batch: list[Round]) -> tuple[torch.Tensor, list[int]]:
        """lm drafts on the path: every round's feedback rows in batch order, [sum(ms), V] from one
        forward per sequence (contiguous_groups are runs of consecutive rounds, so the groups'
        rows concatenated are in batch order), and ms (rows per round)."""
        ms = [min(n_positions(r, self.cfg.positions), r.k) for r in batch]
        rows, heads = [], True  # heads: the draft gives states (train_hidden): one head at the end
        for g in contiguous_groups(batch):
            first = batch[g[0]]
            merged = sequence_round([batch[i] for i in g], ms[g[-1]])
            out = self.draft.train_hidden(merged) if heads and hasattr(self.draft, "train_hidden") else None
            if out is None:
                if heads and rows:  # a group without states: the earlier groups' logits now
                    rows = [self.draft.train_head(h) for h in rows]
                heads = False
                out = self.draft.train_logits(merged)
            idx = [o for i in g for o in range(batch[i].context_len - first.context_len,
                                                 batch[i].context_len - first.context_len + ms[i])]
            rows.append(out.index_select(0, torch.tensor(idx, device=out.device)))
        rows_t = rows[0] if len(rows) == 1 else torch.cat(rows)
        return (self.draft.train_head(rows_t) if heads else rows_t), ms

    def losses_and_grads(self, batch: list[Round], clip: bool = True
                         ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Per-round losses [B] (detached) at the module's current weights and the clipped fp32
        gradient of their mean; grads None when the loss or gradient is non-finite. clip=False:
        the gradient unscaled and self.clip_scale = the divisor that clipping would apply
        (for a fused optimizer kernel that divides by it itself: one pass less)."""
        sup = self.head_support(batch)
        cg = self.cfg.context_grad
        cg_on = cg == "on" or (cg == "auto" and self.cfg.cadence == "chunk")
        has_cg = hasattr(self.draft, "context_grad")
        # tied embedding on the fast path, dense head gradient: the input side's rows are added
        # into the head's gradient in place (LMDraft.collect_embedding_rows)
        wi = None
        if sup is None and hasattr(self.draft, "collect_embedding_rows"):
            w = self.draft.embedding_weight
            wi = next((i for i, p in enumerate(self.params) if p is w), None)
        rows = self.draft.collect_embedding_rows(True) if wi is not None else None
        try:
            if sup is not None:
                self.draft.train_support = sup
            if has_cg:
                self.draft.context_grad = cg_on
            with torch.enable_grad():
                losses = self.batch_losses(batch)
                total = losses.mean()
                if not bool(torch.isfinite(total)):
                    return losses.detach(), None
                leaves = [x for _, x in rows] if rows else []
                gs = torch.autograd.grad(total, [*self.params, *leaves], allow_unused=True)
        finally:
            if sup is not None:
                self.draft.train_support = None
            if has_cg:
                self.draft.context_grad = False
            if rows is not None:
                self.draft.collect_embedding_rows(False)
        if rows:
            gs, gx = list(gs[:len(self.params)]), gs[len(self.params):]
            g = gs[wi]
            if g is None or g.is_sparse:
                g = torch.zeros_like(self.params[wi]) if g is None else g.to_dense()
            for (ids, _), d in zip(rows, gx):
                if d is not None:
                    g.index_add_(0, ids, d)
            gs[wi] = g
            gs = tuple(gs)
        if sup is not None:  # the head's rows (+ the tied embedding's input rows): one sparse gradient
            gs = tuple(g.coalesce() if g is not None and g.is_sparse else g for g in gs)
        else:
            gs = tuple(g.to_dense() if g is not None and g.is_sparse else g for g in gs)
        if not clip:  # unused parameters: one zero buffer each, kept (read-only to the caller)
            if getattr(self, "_zero_grads", None) is None:
                self._zero_grads = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
            grads = [z if g is None else g.float() for g, z in zip(gs, self._zero_grads)]
        else:
            grads = [torch.zeros_like(p, dtype=torch.float32) if g is None else g.float()
                     for g, p in zip(gs, self.params)]
        if not clip:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.values() if g.is_sparse else g)
                                                         for g in grads]))
            if not bool(torch.isfinite(norm)):
                return losses.detach(), None
            mx = self.cfg.max_grad_norm
            self.clip_scale = (float(norm) + 1e-6) / mx if mx > 0 and float(norm) > mx else 1.0
        elif clip_(grads, self.cfg.max_grad_norm) is None:
            return losses.detach(), None
        self.last_loss = float(total.detach())
        return losses.detach(), grads

    sparse_rows_ok: ClassVar[bool] = False  # step() takes sparse gradients (optimizer_step rows)

    def head_support(self, batch: list[Round]) -> tuple[torch.Tensor, int] | None:
        """Option head_rows: the tokens whose output-head rows this step trains (every token the
        batch emitted or drafted, and for a distillation loss the target's top head_rows at each
        feedback row) plus the draft's own top head_rows (train_support of the lm draft)."""
        n = self.cfg.head_rows
        if n <= 0:
            return None
        require(self.sparse_rows_ok and getattr(self.draft, "kind", None) == "lm",
                f"{self.name}: head_rows applies to ogd and dpo on an lm draft")
        toks = {int(t) for r in batch for t in (*r.emitted, *r.drafted)}
        rows = [torch.tensor(sorted(toks), dtype=torch.long)]
        if self.name != "dpo":
            for r in batch:
                m = min(n_positions(r, self.cfg.positions), r.k)
                if r.target_logits is not None and m > 0:
                    t = r.target_logits[:m]
                    rows.append(t.topk(min(n, t.shape[-1]), -1).indices.reshape(-1).cpu())
        return torch.unique(torch.cat(rows)), n

    # -- hooks --
    def init_weights(self) -> None:
        raise NotImplementedError

    def deployed(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def step(self, batch: list[Round], n_new: int) -> bool | None:
        """True: stepped; False: guard tripped (non-finite); None: nothing to learn here."""
        raise NotImplementedError

    def after_feedback(self) -> None:
        pass

    def on_chunk_start(self) -> None:
        pass

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def extra_json(self) -> dict[str, Any]:
        return {}

    def load_extra(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        pass

    # -- snapshot / state --
    def snapshot(self) -> UpdaterSnapshot:
        return UpdaterSnapshot(self.name, self.observed, self.updates, self.skipped, self.cfg.lr,
                               self.last_loss, self.last_online_loss, len(self.buffer),
                               extra={"cadence": self.cfg.cadence, **self.extra_snapshot()})

    def extra_snapshot(self) -> dict[str, Any]:
        """Algorithm-specific JSON-able values for UpdaterSnapshot.extra."""
        return {}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        t, _ = rounds_to_state(self.buffer, "buf")
        t.update({f"offline.{i}": w for i, w in enumerate(getattr(self, "offline", []))})
        return {**t, **self.extra_tensors()}

    def state_json(self) -> dict[str, Any]:
        _, rounds = rounds_to_state(self.buffer, "buf")
        return {"config": dataclasses.asdict(self.cfg), "buffer": rounds,
                "counters": {k: getattr(self, k) for k in ("since", "chunk_key", "chunks", "seq_counter",
                                                           "last_end", "observed", "updates", "skipped",
                                                           "last_loss", "last_online_loss")},
                "extra": self.extra_json()}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        require(self.draft is not None, "attach the updater to a draft before load_state")
        device = self.params[0].device
        self.buffer = rounds_from_state(tensors, meta["buffer"], "buf", device)
        for k, v in meta["counters"].items():
            setattr(self, k, v)
        if self.cfg.anchor > 0 and "offline.0" in tensors:
            self.offline = load_list(tensors, "offline", self.offline)
        self.load_extra({k: v.to(device) for k, v in tensors.items()}, meta["extra"])
        write_params(self.params, self.deployed())
