"""Draft kind "eagle": a feature-level head (EAGLE, Li et al. 2024).

Position t reads fc([e(x_{t+1}); f_t]) -> one decoder layer of the target's family -> f^_{t+1},
and q(x_{t+2}) = softmax(lm_head(f^_{t+1})) through the target's frozen lm_head (f are the
target's last hidden states, post-norm in transformers 5.x). Drafting is autoregressive over the
head's own predictions: (f^_{t+1}, x^_{t+2}) -> f^_{t+2} -> ... with its own KV cache.
Loss: SmoothL1(f^, f) + 0.1 * CE(p_target, q). Training feeds exactly what inference feeds:
the feature at t with the token at t+1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from ..fast import full_cache
from ..feedback import Round
from ..sampling import SamplingConfig, greedy, logits_to_probs, sample
from .base import Proposal, crop_cache
from .features import (FeatureDraft, FeatureSeq, Record, family_body, load_head, plain, subset,
                       run_body, tail_features)


@dataclass
class EagleConfig:
    fc_bias: bool = True
    ce_weight: float = 0.1  # loss = SmoothL1(features) + ce_weight * soft CE(tokens)
    feature_noise: float = 0.0  # warm-up only: f + U(-a, a) * rms(f) on the input features
    train_window: int = 512  # real positions re-read by train_logits (exact when context <= this)
    max_records: int = 1024  # proposals remembered for train_logits (older ones: re-read the tail)
    seed: int = 0  # fresh initialisation


class EagleHead(nn.Module):
    """fc([e(x_{t+1}); f_t]) -> decoder layer -> f^_{t+1}. All trainable; no token tables."""

    def __init__(self, target_config: Any, cfg: EagleConfig, trust_remote_code: bool = False) -> None:
        super().__init__()
        h = target_config.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=cfg.fc_bias)
        self.body = family_body(target_config, trust_remote_code)

    def forward(self, emb: torch.Tensor, feat: torch.Tensor, start: int = 0, cache: Any = None) -> torch.Tensor:
        """emb = e(x_{t+1}), feat = f_t at positions start.. ([n, H], or [B, T, H] from 0) -> f^_{t+1}."""
        x = self.fc(torch.cat([emb, feat], dim=-1))
        if x.dim() == 3:
            return self.body(inputs_embeds=x, use_cache=False).last_hidden_state
        return run_body(self.body, x, start, cache)


class EagleDraft(FeatureDraft):
    kind = "eagle"
    has_train_terms = True  # + SmoothL1 on the predicted features (train_terms)

    def __init__(self, target: PreTrainedModel, module: EagleHead, cfg: EagleConfig) -> None:
        super().__init__(target, module, cfg)
        self.cache_real = 0  # cached positions computed from real target features

    def reset(self) -> None:
        self.feats, self.cache, self.cache_real = None, None, 0

    def invalidate(self) -> None:
        """Weights changed: the KV cache is stale; the target's features stay valid."""
        self.cache, self.cache_real = None, 0

    @torch.inference_mode()
    def propose(self, seq: torch.Tensor, k: int, cfg: SamplingConfig,
                generator: torch.Generator | None) -> Proposal:
        L = seq.numel()
        n = min(self.feats.n if self.feats is not None else 0, L - 1)  # real features f_0..f_{n-1}
        feats = self.feats.view(n) if n else seq.new_empty(0, self.hidden_size, dtype=torch.float32)
        c = min(self.cache_real, max(n - 1, 0))  # re-feed >= 1 real position to get its output
        if self.cache is None or c == 0:
            self.cache, c = full_cache(), 0
        crop_cache(self.cache, c)
        emb_next = self._embed(seq[1:])  # e(x_{t+1}) for t = 0..L-2
        if n:
            f = self.module(emb_next[c:n], feats[c:n].to(self.dtype), c, self.cache)[-1]  # f^_n
        else:
            f = torch.zeros(self.hidden_size, device=self.device, dtype=self.dtype)
        self.cache_real = n
        extra = []  # inputs fed at positions >= n: predicted features
        for p in range(n, L - 1):  # known tokens without target features yet (not in the engine)
            extra.append(f)
            f = self.module(emb_next[p:p + 1], f[None], p, self.cache)[0]
        tokens, logits, probs = [], [], []
        for i in range(k):
            z = self.corrected(self.readout.logits(f), int(tokens[-1] if tokens else seq[-1]))  # q(x_{L+i})
            q = logits_to_probs(z, cfg)
            x = greedy(q) if cfg.greedy else sample(q, generator)
            tokens.append(x)
            logits.append(z)
            probs.append(q)
            if i < k - 1:
                extra.append(f)
                f = self.module(self._embed(x.reshape(1)), f[None], L - 1 + i, self.cache)[0]
        out = Proposal(torch.stack(tokens).to(seq.device), torch.stack(logits), torch.stack(probs))
        ex = torch.stack(extra) if extra else feats.new_empty(0, self.hidden_size)
        self.records.add(Record(seq, feats, ex, tuple(out.tokens.tolist())))
        return out

    def commit(self, valid_len: int, target_hidden: torch.Tensor | None = None,
               hidden_start: int = 0) -> None:
        keep = min(self.cache_real, valid_len)
        if target_hidden is not None and target_hidden.numel():
            if self.feats is None:
                self.feats = FeatureSeq(self.hidden_size, self.device, torch.float32)
            self.feats.put(hidden_start, target_hidden)
            keep = min(keep, hidden_start)
        if self.feats is not None:
            self.feats.n = min(self.feats.n, valid_len)  # beyond valid_len nothing is final
        crop_cache(self.cache, keep)  # drop positions fed with predicted features
        self.cache_real = keep

    # ---- learning ----------------------------------------------------------------------
    def train_features(self, rnd: Round) -> torch.Tensor:
        """[k, H] predicted features f^_{L-1..L+k-2} of the round's drafted positions, recomputed
        WITH grad from the inputs the proposal used (real features, then its own predictions)."""
        rec = self.records.find(rnd.context_len, rnd.drafted, rnd.context_tail) or self._rebuild(rnd)
        return self._unrolled(rec, rec.extra)

    def _unrolled(self, rec: Record, extra: torch.Tensor) -> torch.Tensor:
        """One causal pass over positions s..L+k-3 fed (f_t, x_{t+1}): real f below off+n, then
        extra (the fed-back predictions); rows of the outputs at L-2.. are f^_{L-1..L+k-2}."""
        off, L, k, n = rec.offset, rec.context_len, len(rec.drafted), rec.feats.shape[0]
        drafted = torch.tensor(rec.drafted, dtype=torch.long, device=rec.seq.device)
        nxt = torch.cat([rec.seq[1:], drafted[:-1]])  # x_{t+1}, t = off..L+k-3
        feats = torch.cat([plain(rec.feats).to(self.dtype), plain(extra).to(self.dtype)])[: nxt.numel()]
        nxt = nxt[: feats.shape[0]]  # (a partial extra while rebuilding)
        s = max(off, L - 1 - self.cfg.train_window)
        out = self.module(self._embed(nxt[s - off:]), feats[s - off:], s) if nxt.numel() > s - off else feats[:0]
        if L - 2 >= s:
            return out[L - 2 - s:]
        return torch.cat([feats.new_zeros(1, self.hidden_size), out])  # f^ := 0 without context

    @torch.no_grad()
    def _rebuild(self, rnd: Round) -> Record:
        """Unknown proposal: target features from the context tail, then the head's own
        predictions under the current weights as the fed-back inputs."""
        ids, feats, off = tail_features(self.target, rnd)
        rec = Record(ids.to(self.device), feats.to(self.device), feats[:0], tuple(rnd.drafted), off)
        extra = feats.new_zeros(0, self.hidden_size)
        for _ in range(len(rnd.drafted) - 1):
            extra = torch.cat([extra, self._unrolled(rec, extra)[extra.shape[0]: extra.shape[0] + 1].float()])
        rec.extra = extra
        return rec

    def train_logits(self, rnd: Round) -> torch.Tensor:
        return self.readout.logits(self.train_features(rnd))

    def train_terms(self, rnd: Round) -> dict[str, torch.Tensor]:
        """logits [k, V] (for the updater's token loss) and, when the round carries the target's
        hidden states, feature_loss = SmoothL1(f^, f) at the drafted positions (EAGLE's other term)."""
        pred = self.train_features(rnd)
        out = {"logits": self.readout.logits(pred)}
        if rnd.target_hidden is not None:
            h = rnd.target_hidden
            first = rnd.context_len - 1 - (rnd.context_len + rnd.k - h.shape[0])  # row of f_{L-1}
            tgt = plain(h[first:first + rnd.k]).to(self.device, self.dtype)
            out["feature_loss"] = F.smooth_l1_loss(pred, tgt)
        return out

    def offline_loss(self, ids: torch.Tensor, feats: torch.Tensor, target_logits: torch.Tensor,
                     generator: torch.Generator | None = None,
                     max_positions: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Warm-up loss on a batch: ids [B, T], target features f [B, T, H] and logits [B, T, V].
        Position t feeds (f_t, x_{t+1}) and is scored against f_{t+1} and p_{t+1} (alignment);
        the token term on at most max_positions random positions (the lm_head dominates)."""
        f_in = feats[:, :-1].to(self.dtype)
        if self.cfg.feature_noise > 0:
            rms = f_in.pow(2).mean(-1, keepdim=True).sqrt()
            u = torch.rand(f_in.shape, generator=generator, device="cpu").to(f_in.device, f_in.dtype)
            f_in = f_in + (2 * u - 1) * self.cfg.feature_noise * rms
        pred = self.module(self._embed(ids[:, 1:]), f_in)
        feat_loss = F.smooth_l1_loss(pred, feats[:, 1:].to(self.dtype))
        pred, tl = pred.reshape(-1, pred.shape[-1]), target_logits[:, 1:].reshape(pred.shape[0] * pred.shape[1], -1)
        idx = subset(pred.shape[0], max_positions, generator, pred.device)
        p = torch.softmax(tl[idx].float(), -1)
        logq = torch.log_softmax(self.readout.logits(pred[idx]), -1)
        ce = -(p * logq.clamp_min(-1e4)).sum(-1).mean()
        acc = (logq.argmax(-1) == p.argmax(-1)).float().mean()
        return feat_loss + self.cfg.ce_weight * ce, {"feature_loss": feat_loss.item(), "ce": ce.item(),
                                                     "top1": acc.item()}


def load_eagle_draft(target: PreTrainedModel, source: Any, tokenizer: Any, device: Any = "cpu",
                     dtype: Any = "float32", trust_remote_code: bool = False, **kw: Any) -> EagleDraft:
    """source None -> a freshly initialised head for this target; a directory -> draft.save's output."""
    return load_head("eagle", EagleDraft, EagleConfig, EagleHead, target, source, device, dtype,
                     trust_remote_code, kw)
