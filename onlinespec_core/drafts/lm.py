"""Draft kind "lm": a separate small causal LM with its own KV cache."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import DynamicCache, PreTrainedModel

from .. import fast
from ..feedback import Round
from ..sampling import SamplingConfig, greedy, logits_to_probs, sample
from .base import Draft, Proposal, crop_cache, pad_vocab


class LMDraft(Draft):
    kind = "lm"
    merges_rounds = True  # every round of a sequence: one causal forward (updaters.gradient)
    supports_logit_cache = True

    def __init__(self, model: PreTrainedModel, vocab_size: int | None = None,
                 train_window: int = 128) -> None:
        self.model = model
        self.module = model
        self.vocab_size = vocab_size or model.config.vocab_size  # the target's vocab size
        self.train_window = train_window  # context tokens re-read when computing the online loss
        self.cache: DynamicCache | fast.KVCache | None = None
        self.cached: torch.Tensor | None = None  # the sequence the cache was filled from
        self.cache_version: int | None = None  # weights_version() when the cache was (re)filled
        self.reuse_cache = True  # train_logits: attend to the proposal's cached context K/V
        # train_logits on the fast path: False = the context's K/V are constants of the step
        # (the proposal's cache, or a no-grad re-read), only the rounds' rows run with grad;
        # True = HF's gradient, through the whole re-read tail (updaters' option context_grad)
        self.context_grad = False
        self.logit_cache = None  # set by an updater (options cache_lr / bigram_lr)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def reset(self) -> None:
        self.cache = None
        self.cached = None
        self.cache_version = None
        lean = self.lean
        if lean is not None:
            lean.forget_mirrors()

    def invalidate(self) -> None:
        """Weights changed: cached keys/values no longer match the model."""
        self.reset()

    @property
    def lean(self) -> fast.LeanLM | None:
        """The fast path's forward over the live weights (fast.enable(model, frozen=False))."""
        return fast.lean_of(self.model)

    def _forward(self, ids: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """fused: the proposal copies are current (propose synced them once)."""
        if isinstance(self.cache, fast.KVCache):
            lean = self.lean
            logits = None
            # a few tokens: through the fused step, one C call each (None: it does not apply
            # here, and then the plain forward takes them all)
            if fused and ids.numel() <= 4:
                got = lean.draft_steps(ids.tolist(), self.cache, 1)
                logits = None if got is None else got[1][0]
            if logits is None:
                logits = lean.forward(ids, self.cache, 1)[0][-1]
        else:
            logits = self.model(input_ids=ids[None], cache=self.cache, use_cache=True,
                                logits_to_keep=1).logits[0, -1]
        logits = pad_vocab(logits, self.vocab_size)
        if self.logit_cache is not None:  # the updaters' fast unigram/bigram correction
            logits = self.logit_cache.apply(logits, int(ids[-1]))
        return logits

    @torch.inference_mode()
    def propose(self, seq: torch.Tensor, k: int, cfg: SamplingConfig,
                generator: torch.Generator | None) -> Proposal:
        if self.cache is None:
            lean = self.lean
            self.cache = lean.new_cache() if lean is not None else fast.full_cache()
            self.cache_version = lean.weights_version() if lean is not None else None
        self.cached = seq
        n_cached = self.cache.get_seq_length()
        pending = seq[n_cached:]
        tokens, logits, probs = [], [], []
        lean = self.lean
        fused = lean is not None and isinstance(self.cache, fast.KVCache) and lean.sync_mirrors()
        if fused and cfg.greedy and self.logit_cache is None and 1 <= pending.numel() <= 4:
            got = lean.draft_steps(pending.tolist(), self.cache, k)  # the whole proposal in one go
            if got is not None:
                toks, lg = got
                lg = pad_vocab(lg, self.vocab_size)
                return Proposal(torch.tensor(toks, dtype=torch.long, device=seq.device), lg,
                                logits_to_probs(lg, cfg))
        for _ in range(k):
            last = self._forward(pending, fused)
            if cfg.greedy:  # argmax of the logits; the k softmaxes as one call at the end
                x = greedy(last)
            else:
                q = logits_to_probs(last, cfg)
                x = sample(q, generator)
                probs.append(q)
            tokens.append(x)
            logits.append(last)
            pending = x.reshape(1)
        stacked = torch.stack(logits)
        return Proposal(torch.stack(tokens), stacked,
                        logits_to_probs(stacked, cfg) if cfg.greedy else torch.stack(probs))

    def commit(self, valid_len: int, target_hidden: torch.Tensor | None = None,
               hidden_start: int = 0) -> None:
        crop_cache(self.cache, valid_len)

    def _context_state(self, rnd: Round) -> str | None:
        """Is this round's context (positions < context_len - 1) in the proposal cache?
        'fresh': yes, computed with the current weights; 'stale': the same sequence, but the
        weights changed since (e.g. an ensemble expert's); None: another sequence or no cache."""
        c, tail, lean = self.cache, rnd.context_tail, self.lean
        if not (self.reuse_cache and isinstance(c, fast.KVCache) and lean is not None
                and self.cached is not None and tail is not None and tail.numel() > 0):
            return None
        L = rnd.context_len
        if c.length < L - 1 or self.cached.numel() < L:
            return None
        if not torch.equal(self.cached[L - tail.numel():L].to(tail.device), tail):
            return None
        return "fresh" if self.cache_version == lean.weights_version() else "stale"

    def _cached_context(self, rnd: Round) -> bool:
        return self._context_state(rnd) == "fresh"

    def train_logits(self, rnd: Round) -> torch.Tensor:
        # q_i conditions on context + x_1..x_{i-1}: feed the context tail and drafted[:-1]
        hidden = self.train_hidden(rnd)
        return self._hf_train_logits(rnd) if hidden is None else self.train_head(hidden)

    def train_hidden(self, rnd: Round) -> torch.Tensor | None:
        """The round's final-norm states [k, H] on the fast path (train_head gives the logits),
        or None where only HF's forward applies (no fast path, reuse_cache off)."""
        assert rnd.context_tail is not None
        state, lean = self._context_state(rnd), self.lean
        if state is None and not (lean is not None and self.reuse_cache and rnd.context_tail.numel() > 0):
            return None
        drafted = torch.tensor(rnd.drafted[:-1], dtype=torch.long, device=self.device)
        if self.context_grad:  # HF's computation (the tail re-read, grad through all of it) on the lean forward
            ids = torch.cat([rnd.context_tail.to(self.device), drafted])
            start = rnd.context_len - rnd.context_tail.numel()  # same positions as at drafting time
            return lean._layers(ids, 0, lambda li, k, v: (k, v), start)[-rnd.k:]
        ids = torch.cat([rnd.context_tail[-1:].to(self.device), drafted])
        if state == "fresh":  # the proposal's own K/V: only the drafted rows run, with grad
            return lean.hidden_after(ids, self.cache, rnd.context_len - 1)
        # stale (another expert's weights) or another sequence (a batch spanning prompts, chunk
        # cadence, a restore): the tail's K/V under the current weights, no grad, then the same
        # form as fresh - the context is a constant of the step, as in the proposal's cache (a
        # grad through the whole re-read tail cost ~6 ms for one 1-row round of a 109-token tail)
        tail = rnd.context_tail.to(self.device)
        ctx = lean.new_cache(capacity=tail.numel() + ids.numel())
        if tail.numel() > 1:  # F.linear on the live weights: not lean.forward, whose no-grad
            # form re-packs the proposal copies (~2.5 ms) for weights that are about to move
            n = tail.numel() - 1
            ctx.reserve(n)
            with torch.no_grad():
                lean._layers(tail[:-1], 0, ctx.write, rnd.context_len - tail.numel())
            ctx.length = n
        return lean.hidden_after(ids, ctx, ctx.length, pos=rnd.context_len - 1)

    def train_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [n, V] (the target's vocab) of train_hidden rows: one lm_head over every row
        of a batch (one dense [V, H] head gradient per step, not one per sequence)."""
        return pad_vocab(self._train_head(self.lean, hidden), self.vocab_size)

    def _hf_train_logits(self, rnd: Round) -> torch.Tensor:
        """No fast path (or reuse_cache off): HF's forward re-reads the tail, grad through all."""
        drafted = torch.tensor(rnd.drafted[:-1], dtype=torch.long, device=rnd.context_tail.device)
        ids = torch.cat([rnd.context_tail, drafted])[None].to(self.device)
        start = rnd.context_len - rnd.context_tail.numel()  # same positions as at drafting time
        pos = torch.arange(start, start + ids.shape[1], device=self.device)[None]
        logits = self.model(input_ids=ids, position_ids=pos, use_cache=False,
                            logits_to_keep=rnd.k).logits[0]
        return pad_vocab(logits, self.vocab_size)

    def collect_embedding_rows(self, on: bool) -> list | None:
        """Tied embedding, fast path: while on, every training forward's input lookup is a leaf
        x = W[ids] (no grad into W through it) and (ids, x) is collected, so the updater adds
        d x into the head's dense gradient of W in place (GradientUpdater.losses_and_grads).
        Returns the list (None where this does not apply: untied, no fast path)."""
        lean = self.lean
        if lean is None or not lean.tied:
            return None
        lean.embed_rows = [] if on else None
        return lean.embed_rows

    @property
    def embedding_weight(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    # -- the training head (updaters' option head_rows) --
    # train_support = (token ids, n): the output head's gradient reaches only the rows of those
    # tokens and of the draft's own top-n at each row (sparse, like the tied embedding's input
    # side); the logits and every other gradient (hidden states, layers) stay the full ones.
    train_support: tuple[torch.Tensor, int] | None = None

    def _train_head(self, lean: fast.LeanLM, hidden: torch.Tensor) -> torch.Tensor:
        sup = self.train_support
        head = lean.lm_head.mod
        if sup is None or not torch.is_grad_enabled() or not isinstance(head, torch.nn.Linear):
            return lean.lm_head(hidden)
        tokens, n = sup
        w = head.weight
        logits = torch.nn.functional.linear(hidden, w.detach(), head.bias)  # grad -> hidden (all columns)
        rows = [tokens.to(logits.device)]
        if n > 0:
            with torch.no_grad():
                rows.append(logits.topk(min(n, logits.shape[-1]), -1).indices.reshape(-1))
        rows_t = torch.unique(torch.cat(rows))
        ws = torch.nn.functional.embedding(rows_t, w, sparse=True)  # [S, H], sparse grad into w
        part = hidden.detach() @ ws.t()  # value 0 below; its gradient: d logits[:, S]^T hidden
        return logits.index_add(1, rows_t, part - part.detach())

    def offline_loss(self, ids: torch.Tensor, feats: torch.Tensor | None, target_logits: torch.Tensor,
                     generator: torch.Generator | None = None,
                     max_positions: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Warm-up: soft CE(p_t, q_t) at every position of the window."""
        logits = pad_vocab(self.model(input_ids=ids, use_cache=False).logits.float(), self.vocab_size)
        logq = torch.log_softmax(logits, -1)
        p = torch.softmax(target_logits.float(), -1)
        ce = -(p * logq.clamp_min(-1e4)).sum(-1).mean()
        return ce, {"ce": ce.item(), "top1": (logq.argmax(-1) == p.argmax(-1)).float().mean().item()}

    def save(self, path: str | Path) -> None:
        self.model.save_pretrained(str(path), safe_serialization=True)


def load_lm_draft(target: PreTrainedModel, source, tokenizer, device="cpu", dtype="float32",
                  trust_remote_code: bool = False, train_window: int = 256) -> LMDraft:
    """source: a directory / hub id, or an already-built PreTrainedModel."""
    from ..models import load_causal_lm

    if isinstance(source, PreTrainedModel):
        model = source.to(device).eval()
    else:
        model = load_causal_lm(str(source), "draft", device, dtype, None, trust_remote_code)
    model.requires_grad_(True)  # updaters train it; inference runs under inference_mode
    return LMDraft(model, vocab_size=target.config.vocab_size, train_window=train_window)
