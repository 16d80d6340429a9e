"""A fast online correction of an lm draft's logits: a unigram and a bigram logit table learned
from every round's verification (a cache LM in the sense of Kuhn & De Mori / Grave et al., and
dynamic evaluation's fast adaptation, on the draft's own online loss).

The draft proposes with   z'(x_<i) = z(x_<i) + u + B[x_{i-1}] ,
u [V] and B[prev] [V] (rows only for the previous tokens seen), and after each round the
gradient updaters (option cache_lr / bigram_lr) take one OGD step on the round's fkl loss at
the deployed logits, whose gradient in u and B[prev_i] is the row's q_i - p_i:
  u <- (1 - rho) u - eta_u sum_i (q_i - p_i),   B[prev_i] <- (1 - rho) B[prev_i] - eta_b (q_i - p_i).
No backward pass: both come from the logits the round already holds (q from the proposal,
p from the verify). The decay rho makes the tables a short memory (a topic's habits fade after
the topic); B's rows decay lazily (a row remembers the round it was last written). A draft's
logits only steer which tokens it proposes, so the output stays the target's own.
"""
from __future__ import annotations

import torch


class LogitCache:
    def __init__(self, vocab: int, decay: float, device: torch.device | str = "cpu") -> None:
        self.vocab, self.decay = vocab, decay
        self.unigram = torch.zeros(vocab, device=device)
        self.rows: dict[int, tuple[torch.Tensor, int]] = {}  # prev token -> (row [V], round written)
        self.now = 0  # rounds observed
        self.uses_unigram = False  # u stays 0 until a step with lr_unigram > 0 (skip the add)

    def _row(self, prev: int) -> torch.Tensor | None:
        got = self.rows.get(prev)
        if got is None:
            return None
        row, at = got
        if at != self.now:  # lazy decay: (1 - rho)^(rounds since it was written)
            row.mul_((1.0 - self.decay) ** (self.now - at))
            self.rows[prev] = (row, self.now)
        return row

    def apply(self, logits: torch.Tensor, prev: int) -> torch.Tensor:
        """z + u + B[prev] for the logits [V] of the position after token prev."""
        row = self._row(prev)
        out = logits + self.unigram if self.uses_unigram else logits
        return out if row is None else out + row

    @torch.no_grad()
    def step(self, grads: torch.Tensor, prevs: list[int], lr_unigram: float, lr_bigram: float) -> None:
        """One round: grads [m, V] = q_i - p_i at the deployed logits, prevs [m] the token each
        row's position follows."""
        self.now += 1
        if self.uses_unigram:
            self.unigram.mul_(1.0 - self.decay)
        if lr_unigram > 0:
            self.unigram.sub_(grads.sum(0), alpha=lr_unigram)
            self.uses_unigram = True
        if lr_bigram > 0:
            for g, prev in zip(grads, prevs):
                row = self._row(prev)  # decayed up to this round
                if row is None:
                    row = torch.zeros_like(self.unigram)
                self.rows[prev] = (row.sub_(g, alpha=lr_bigram), self.now)

    # -- state (saved with the draft: LMDraft.state_tensors) --
    def state_tensors(self) -> dict[str, torch.Tensor]:
        t = {"unigram": self.unigram, "meta": torch.tensor([float(self.now), self.decay], dtype=torch.float64)}
        if self.rows:
            keys = sorted(self.rows)
            t["prev"] = torch.tensor(keys, dtype=torch.long)
            t["at"] = torch.tensor([self.rows[k][1] for k in keys], dtype=torch.long)
            t["rows"] = torch.stack([self.rows[k][0] for k in keys])
        return t

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor]) -> "LogitCache":
        u, meta = tensors["unigram"], tensors["meta"]
        c = cls(u.numel(), float(meta[1]), u.device)
        c.unigram, c.now = u.clone().float(), int(meta[0])
        c.uses_unigram = bool(c.unigram.any())
        if "prev" in tensors:
            for k, at, row in zip(tensors["prev"].tolist(), tensors["at"].tolist(), tensors["rows"]):
                c.rows[int(k)] = (row.clone().float(), int(at))
        return c
