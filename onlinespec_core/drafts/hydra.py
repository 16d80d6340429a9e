"""Draft kind "hydra": sequentially dependent heads on the target's last hidden state
(Hydra, Ankner et al. 2024).

With h_t the target's last hidden state at t (it produced x_{t+1}), head i (1..n, default 4)
predicts x_{t+1+i} from [h_t; e(x_{t+1}); ...; e(x_{t+i})], the embeddings of the tokens before
it (drafted ones at inference), and reads tokens through the target's frozen lm_head. Drafting
k > n reuses the last head on the last n embeddings. Optional prefix layer (Hydra++): one
decoder layer of the target's family over h_0..h_t first. Loss: soft CE vs the target's p.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from ..errors import OnlineSpecError
from ..fast import full_cache
from ..feedback import Round
from ..sampling import SamplingConfig, greedy, logits_to_probs, sample
from .base import Proposal, crop_cache
from .features import (FeatureDraft, FeatureSeq, Record, family_body, load_head, plain, subset,
                       run_body, tail_features)


@dataclass
class HydraConfig:
    n_heads: int = 4
    n_layers: int = 1  # residual SiLU blocks per head after its input projection
    prefix: bool = False  # one decoder layer of the target's family over the features first
    train_window: int = 512  # features re-read by train_logits when prefix=True
    max_records: int = 1024  # proposals remembered for train_logits (older ones: re-read the tail)
    seed: int = 0

    def validate(self) -> None:
        if self.n_heads < 1:
            raise OnlineSpecError(f"n_heads must be >= 1, got {self.n_heads}")


class ResBlock(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.linear = nn.Linear(h, h)
        nn.init.zeros_(self.linear.weight)  # starts as the identity (Medusa/Hydra init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class HydraHeads(nn.Module):
    def __init__(self, target_config: Any, cfg: HydraConfig, trust_remote_code: bool = False) -> None:
        super().__init__()
        h = target_config.hidden_size
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear((i + 2) * h, h), *[ResBlock(h) for _ in range(cfg.n_layers)])
            for i in range(cfg.n_heads))
        self.prefix = family_body(target_config, trust_remote_code) if cfg.prefix else None

    def base(self, feats: torch.Tensor, start: int = 0, cache: Any = None) -> torch.Tensor:
        """h_t: the features themselves, or the prefix layer over them ([n, H] or [B, T, H])."""
        if self.prefix is None:
            return feats
        if feats.dim() == 3:
            return self.prefix(inputs_embeds=feats, use_cache=False).last_hidden_state
        return run_body(self.prefix, feats, start, cache)

    def forward(self, h: torch.Tensor, embs: list[torch.Tensor]) -> torch.Tensor:
        """[h; e_1..e_i] -> the feature whose lm_head gives x_{t+1+i} (last head for i > n)."""
        embs = embs[-len(self.heads):]
        return self.heads[len(embs) - 1](torch.cat([h, *embs], dim=-1))


class HydraDraft(FeatureDraft):
    kind = "hydra"
    batches_rounds = True  # train_rows: every round of a batch in one pass

    def __init__(self, target: PreTrainedModel, module: HydraHeads, cfg: HydraConfig) -> None:
        super().__init__(target, module, cfg)  # self.cache: prefix layer only, real positions
        self.last: tuple[int, torch.Tensor] | None = None  # (n, h_{n-1}) from the prefix layer

    def reset(self) -> None:
        self.feats, self.cache, self.last = None, None, None

    def invalidate(self) -> None:
        self.cache, self.last = None, None

    def _base_state(self, feats: torch.Tensor) -> torch.Tensor:
        n = feats.shape[0]
        if n == 0:
            return torch.zeros(self.hidden_size, device=self.device, dtype=self.dtype)
        if self.module.prefix is None:
            return feats[-1].to(self.dtype)
        if self.last is not None and self.last[0] == n:
            return self.last[1]
        c = self.cache.get_seq_length() if self.cache is not None else 0
        c = min(c, n - 1)
        if self.cache is None or c == 0:
            self.cache, c = full_cache(), 0
        crop_cache(self.cache, c)
        h = self.module.base(feats[c:].to(self.dtype), c, self.cache)[-1]
        self.last = (n, h)
        return h

    @torch.inference_mode()
    def propose(self, seq: torch.Tensor, k: int, cfg: SamplingConfig,
                generator: torch.Generator | None) -> Proposal:
        L = seq.numel()
        n = min(self.feats.n if self.feats is not None else 0, L - 1)
        feats = self.feats.view(n) if n else seq.new_empty(0, self.hidden_size, dtype=torch.float32)
        h = self._base_state(feats)  # h_{n-1} (zeros without features)
        embs = list(self._embed(seq[max(n, L - len(self.module.heads)):]))  # e(x_n..x_{L-1})
        tokens, logits, probs = [], [], []
        for _ in range(k):
            z = self.corrected(self.readout.logits(self.module(h, embs)), int(tokens[-1] if tokens else seq[-1]))
            q = logits_to_probs(z, cfg)
            x = greedy(q) if cfg.greedy else sample(q, generator)
            tokens.append(x)
            logits.append(z)
            probs.append(q)
            embs.append(self._embed(x.reshape(1))[0])
        out = Proposal(torch.stack(tokens).to(seq.device), torch.stack(logits), torch.stack(probs))
        self.records.add(Record(seq, feats, h[None], tuple(out.tokens.tolist())))
        return out

    def commit(self, valid_len: int, target_hidden: torch.Tensor | None = None,
               hidden_start: int = 0) -> None:
        if target_hidden is not None and target_hidden.numel():
            if self.feats is None:
                self.feats = FeatureSeq(self.hidden_size, self.device, torch.float32)
            self.feats.put(hidden_start, target_hidden)
            if self.cache is not None:
                crop_cache(self.cache, min(hidden_start, valid_len))
                self.last = None
        if self.feats is not None:
            self.feats.n = min(self.feats.n, valid_len)

    # ---- learning ----------------------------------------------------------------------
    def train_logits(self, rnd: Round) -> torch.Tensor:
        """[k, V] logits of the round's drafted positions, recomputed with grad from the same
        base state (or, with the prefix layer, the same features) and the same token inputs."""
        rec = self.records.find(rnd.context_len, rnd.drafted, rnd.context_tail) or self._rebuild(rnd)
        L, n = rec.seq.numel(), rec.feats.shape[0]  # relative to rec.offset
        if self.module.prefix is not None and n:
            s = max(0, n - self.cfg.train_window)
            h = self.module.base(plain(rec.feats[s:]).to(self.dtype), rec.offset + s)[-1]
        else:
            h = plain(rec.extra[0]).to(self.dtype)
        drafted = torch.tensor(rec.drafted, dtype=torch.long, device=rec.seq.device)
        embs = list(self._embed(torch.cat([rec.seq[max(n, L - len(self.module.heads)):], drafted])))
        first = len(embs) - len(rec.drafted)
        feats = [self.module(h, embs[:first + i]) for i in range(len(rec.drafted))]
        return self.readout.logits(torch.stack(feats))

    def train_rows(self, rounds: list[Round], ms: list[int]) -> torch.Tensor:
        """The first ms[j] rows of train_logits(rounds[j]) for every round, stacked
        [sum(ms), V], in one pass: per head ONE matmul over every row it produces (each row's
        input is that round's own [h; e ...], as in train_logits), then ONE lm_head read of the
        rows a loss uses (not the k - m drafted after the first rejection). Same values as
        train_logits (up to summation order), a fraction of the small-op overhead."""
        nh = len(self.module.heads)
        hs, embs_of, firsts = [], [], []
        ids = []
        for rnd, m in zip(rounds, ms):
            rec = self.records.find(rnd.context_len, rnd.drafted, rnd.context_tail) or self._rebuild(rnd)
            L, n = rec.seq.numel(), rec.feats.shape[0]
            if self.module.prefix is not None and n:
                s = max(0, n - self.cfg.train_window)
                hs.append(self.module.base(plain(rec.feats[s:]).to(self.dtype), rec.offset + s)[-1])
            else:
                hs.append(plain(rec.extra[0]).to(self.dtype))
            drafted = torch.tensor(rec.drafted[:max(m - 1, 0)], dtype=torch.long, device=rec.seq.device)
            toks = torch.cat([rec.seq[max(n, L - nh):], drafted])
            firsts.append(toks.numel() - max(m - 1, 0))
            ids.append(toks)
        e_all = self._embed(torch.cat(ids)) if ids else None
        pos = 0
        rows: dict[int, list[tuple[int, torch.Tensor]]] = {}  # head -> (row index, input)
        out_row = 0
        for j, (m, first) in enumerate(zip(ms, firsts)):
            e = e_all[pos:pos + ids[j].numel()]
            pos += ids[j].numel()
            for i in range(m):
                use = e[max(0, first + i - nh):first + i]
                rows.setdefault(use.shape[0] - 1, []).append((out_row, torch.cat([hs[j], use.reshape(-1)])))
                out_row += 1
        if not out_row:
            return torch.zeros(0, self.readout.vocab_size, device=self.device)
        ys, order = [], []
        for head in sorted(rows):
            ys.append(self.module.heads[head](torch.stack([x for _, x in rows[head]])))
            order += [r for r, _ in rows[head]]
        inv = torch.empty(out_row, dtype=torch.long)
        inv[torch.tensor(order)] = torch.arange(out_row)
        return self.readout.logits(torch.cat(ys).index_select(0, inv.to(self.device)))

    def _rebuild(self, rnd: Round) -> Record:
        """Unknown proposal (e.g. restored rounds): target features from the context tail."""
        ids, feats, off = tail_features(self.target, rnd)
        feats = feats.to(self.device)
        h = feats[-1:].to(self.dtype) if feats.shape[0] else feats.new_zeros(1, self.hidden_size)
        return Record(ids.to(self.device), feats, h, tuple(rnd.drafted), off)

    def offline_loss(self, ids: torch.Tensor, feats: torch.Tensor, target_logits: torch.Tensor,
                     generator: torch.Generator | None = None,
                     max_positions: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Warm-up loss: head i reads h_t and e(x_{t+1..t+i}) and is scored against p_{t+i}
        (the target's distribution of x_{t+i+1}); mean over heads of the soft CE, each on at
        most max_positions random positions."""
        B, T = ids.shape
        h = self.module.base(feats.to(self.dtype))
        e = self._embed(ids)
        losses, accs = [], []
        for i in range(1, len(self.module.heads) + 1):
            if T - i <= 0:
                break
            n = B * (T - i)
            idx = subset(n, max_positions, generator, h.device)
            flat = lambda x: x.reshape(n, -1)[idx]  # noqa: E731  rows (b, t) of a [B, T-i, .] slice
            embs = [flat(e[:, j:T - i + j]) for j in range(1, i + 1)]
            logq = torch.log_softmax(self.readout.logits(self.module(flat(h[:, :T - i]), embs)), -1)
            p = torch.softmax(flat(target_logits[:, i:]).float(), -1)
            losses.append(-(p * logq.clamp_min(-1e4)).sum(-1).mean())
            accs.append((logq.argmax(-1) == p.argmax(-1)).float().mean())
        loss = torch.stack(losses).mean()
        return loss, {"ce": loss.item(), "top1": accs[0].item(), "top1_last": accs[-1].item()}


def load_hydra_draft(target: PreTrainedModel, source: Any, tokenizer: Any, device: Any = "cpu",
                     dtype: Any = "float32", trust_remote_code: bool = False, **kw: Any) -> HydraDraft:
    """source None -> freshly initialised heads for this target; a directory -> draft.save's output."""
    return load_head("hydra", HydraDraft, HydraConfig, HydraHeads, target, source, device, dtype,
                     trust_remote_code, kw)
