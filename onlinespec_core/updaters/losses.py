"""Online losses from one Round's feedback (shared by every gradient updater).

Distillation toward the target at the verified positions i (p_i target, q_i draft, both
softmax(logits / T) in fp32):
  fkl  KL(p || q) = sum p (log p - log q)        (= CE - H(p): same gradient as ce)
  ce   -sum p log q
  rkl  KL(q || p) = sum q (log q - log p)
  jsd  0.5 KL(p || m) + 0.5 KL(q || m),  m = (p + q) / 2
Preference (DPO) at the first rejection, chosen c = the target's token, rejected r = the draft's:
  -log sigmoid(beta * [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))])
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..feedback import Round

DISTILL_LOSSES = ("fkl", "ce", "rkl", "jsd")
POSITIONS = ("path", "all")  # path = accepted positions + the first rejected one


def n_positions(rnd: Round, positions: str = "path") -> int:
    """Verified positions that carry feedback: accepted + first rejected (path) or all k."""
    return rnd.k if positions == "all" else min(rnd.accepted + 1, rnd.k)


def _finite_columns(draft_logits: torch.Tensor, target_logits: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop vocabulary columns the draft cannot emit (pad_vocab filled them with -inf)."""
    if math.isfinite(float(draft_logits[0].detach().sum())):  # one reduction: no inf column (usual)
        return draft_logits, target_logits
    drop = torch.isinf(draft_logits[0])  # +-inf only: a NaN column stays, so NaN must surface
    if not bool(drop.any()):
        return draft_logits, target_logits
    keep = ~drop
    return draft_logits[:, keep], target_logits[:, keep]


def distill_rows(draft_logits: torch.Tensor, target_logits: torch.Tensor, kind: str = "fkl",
                 temperature: float = 1.0) -> torch.Tensor:
    """Per-row divergence [m] between target and draft distributions ([m, V] each)."""
    if kind == "fkl" and temperature == 1.0 and draft_logits.requires_grad:
        from ..fast import kl_rows_grad  # the default training loss: one compiled pass, fwd + grad
        per = kl_rows_grad(draft_logits, target_logits.float())
        if per is not None:
            return per
    d, t = _finite_columns(draft_logits.float(), target_logits.float())
    if temperature != 1.0:
        d, t = d / temperature, t / temperature
    logq = F.log_softmax(d, -1)
    logp = F.log_softmax(t, -1)
    if kind == "fkl":  # p (log p - log q) in one kernel (online_loss runs it every round)
        per = F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)
    elif kind == "ce":
        per = -(logp.exp() * logq).sum(-1)
    elif kind == "rkl":
        per = (logq.exp() * (logq - logp)).sum(-1)
    elif kind == "jsd":
        logm = torch.logsumexp(torch.stack([logp, logq]), 0) - math.log(2.0)
        per = 0.5 * (logp.exp() * (logp - logm)).sum(-1) + 0.5 * (logq.exp() * (logq - logm)).sum(-1)
    else:
        raise ValueError(f"unknown loss {kind!r}; choose one of {DISTILL_LOSSES}")
    return per


def distill_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, kind: str = "fkl",
                 temperature: float = 1.0) -> torch.Tensor:
    """Mean over rows of the divergence between target and draft distributions. [m, V] each."""
    return distill_rows(draft_logits, target_logits, kind, temperature).mean()


def round_distill_loss(draft_logits: torch.Tensor, rnd: Round, kind: str = "fkl",
                       positions: str = "path", temperature: float = 1.0) -> torch.Tensor:
    """Round loss f_t(w): draft_logits [k, V] (with or without grad) vs the round's target."""
    m = min(n_positions(rnd, positions), draft_logits.shape[0])
    assert rnd.target_logits is not None
    return distill_loss(draft_logits[:m], rnd.target_logits[:m].to(draft_logits.device), kind, temperature)


@torch.no_grad()
def online_loss(rnd: Round, kind: str = "fkl", positions: str = "path",
                temperature: float = 1.0) -> float | None:
    """f_t(w_t) at the deployed weights, for free: from the logits the draft proposed with."""
    if rnd.k == 0 or rnd.draft_logits is None or rnd.target_logits is None:
        return None
    if kind == "fkl" and temperature == 1.0:  # the default: one compiled pass (fast.kl_rows)
        from ..fast import kl_rows
        m = min(n_positions(rnd, positions), rnd.draft_logits.shape[0])
        per = kl_rows(rnd.draft_logits[:m].detach(), rnd.target_logits[:m])
        if per is not None:
            return float(per.mean())
    return float(round_distill_loss(rnd.draft_logits, rnd, kind, positions, temperature))


def sft_loss(draft_logits: torch.Tensor, rnd: Round) -> torch.Tensor:
    """Online SFT on the target's tokens: CE with hard labels emitted[i] at positions 0..n."""
    m = min(len(rnd.emitted), rnd.k, draft_logits.shape[0])
    labels = torch.tensor(rnd.emitted[:m], dtype=torch.long, device=draft_logits.device)
    return F.cross_entropy(draft_logits[:m].float(), labels)


def preference_pair(rnd: Round) -> tuple[int, int, int] | None:
    """(position, chosen, rejected) at the round's first rejection, or None (all accepted,
    EOS before the rejection, or a sampled correction equal to the drafted token)."""
    n = rnd.accepted
    if n >= rnd.k or len(rnd.emitted) <= n:
        return None
    c, r = int(rnd.emitted[n]), int(rnd.drafted[n])
    return None if c == r else (n, c, r)


def dpo_loss(logp_c: torch.Tensor, logp_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
             beta: float = 0.1) -> torch.Tensor:
    """-log sigmoid(beta * [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))]), mean."""
    margin = (logp_c - ref_c) - (logp_r - ref_r)
    return -F.logsigmoid(beta * margin).mean()
