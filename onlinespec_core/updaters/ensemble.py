"""ensemble (Ens-Eagle): N experts on a geometric step-size grid, combined by Hedge.

Experts start equal (the current draft); expert i runs OGD/Adam with lr_i = lr * ratio^i;
frozen_expert=True (default) adds expert 0 with step size 0 (the offline draft, never trained),
so the ensemble can always fall back to frozen. Each expert's loss l_i on new feedback is
measured BEFORE it updates on it. loss_scale="relative" (default) feeds Hedge l_i / max_j l_j
(in (0, 1] whatever the topic's loss level in nats: a hard topic no longer decides the weights
for the rest of the stream); "raw" feeds nats. Hedge:
  fixed_share L: p <- (1 - share) * normalise(p * exp(-eps * l)) + share / N   (default; the
              floor share / N lets a trailing expert take the lead within a few steps of a shift;
              L_i = -log(p_i) / eps is stored)
  cumulative  L_i <- L_i + l_i
  discounted  L_i <- gamma * L_i + l_i
  last        L_i <- l_i                (released code: softmax(-loss / T), eps = 1/T)
  p_i = exp(-eps * L_i) / sum_j exp(-eps * L_j)
Deployed draft = sum_i p_i w_i, averaged in fp32 and cast once into the module.
restart="merged": every expert restarts from the deployed average after each Hedge update
(the released code, per chunk); "none" (default) keeps the experts independent."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..errors import require
from ..feedback import Round
from .base import UpdaterSnapshot
from .gradient import (GradConfig, GradientUpdater, fp32_copy, load_list, load_optim, make_optimizer,
                       optim_json, optim_tensors, optimizer_step, write_params)

HEDGE_MODES = ("fixed_share", "cumulative", "discounted", "last")
LOSS_SCALES = ("relative", "raw")


@dataclass
class EnsembleConfig(GradConfig):
    lr: float = 3e-4  # smallest step size of the grid: 3e-4, 9e-4, 2.7e-3
    optimizer: str = "adam"
    n_experts: int = 3  # learning experts (the frozen one comes on top)
    ratio: float = 3.0  # geometric grid: lr * ratio^i
    lrs: list[float] = field(default_factory=list)  # explicit grid (overrides lr/ratio/n_experts; 0 = frozen)
    frozen_expert: bool = True  # + an expert with step size 0: the offline draft
    hedge: str = "fixed_share"
    hedge_lr: float = 4.0  # eps (per step, on the loss_scale)
    share: float = 0.05  # hedge="fixed_share": weight mixed back toward uniform each step
    loss_scale: str = "relative"  # relative (l_i / max_j l_j) | raw (nats)
    discount: float = 0.9  # hedge="discounted"
    restart: str = "none"  # none | merged

    def validate(self, name: str) -> None:
        super().validate(name)
        require(self.hedge in HEDGE_MODES, f"{name}: hedge must be one of {HEDGE_MODES}, got {self.hedge!r}")
        require(self.restart in ("none", "merged"), f"{name}: restart must be 'none' or 'merged'")
        require(self.loss_scale in LOSS_SCALES, f"{name}: loss_scale must be one of {LOSS_SCALES}, got {self.loss_scale!r}")
        require(0 <= self.share < 1, f"{name}: share must be in [0, 1), got {self.share!r}")
        require(isinstance(self.n_experts, int) and 1 <= self.n_experts <= 16,
                f"{name}: n_experts must be an integer in 1..16, got {self.n_experts!r}")
        require(self.ratio > 0 and self.hedge_lr >= 0 and 0 <= self.discount <= 1,
                f"{name}: ratio must be > 0, hedge_lr >= 0, discount in [0, 1]")
        require(all(x >= 0 for x in self.lrs), f"{name}: every lr in lrs must be >= 0 (0 = a frozen expert)")

    @property
    def grid(self) -> list[float]:
        if self.lrs:
            return [float(x) for x in self.lrs]
        return [0.0] * self.frozen_expert + [self.lr * self.ratio ** i for i in range(self.n_experts)]


@dataclass
class Hedge:
    """Exponential weights over N experts from their (pre-update) losses."""
    n: int
    eps: float = 1.0
    mode: str = "cumulative"
    discount: float = 0.9
    L: list[float] = field(default_factory=list)
    share: float = 0.0  # mode="fixed_share"

    def __post_init__(self) -> None:
        self.L = list(self.L) or [0.0] * self.n

    def update(self, losses: list[float]) -> None:
        if self.mode == "cumulative":
            self.L = [a + b for a, b in zip(self.L, losses)]
        elif self.mode == "fixed_share":
            if self.eps <= 0:
                return
            z = [-self.eps * (a + b) for a, b in zip(self.L, losses)]
            top = max(z)
            e = [math.exp(v - top) for v in z]
            tot = sum(e)
            p = [(1 - self.share) * v / tot + self.share / self.n for v in e]
            self.L = [-math.log(max(v, 1e-300)) / self.eps for v in p]
        elif self.mode == "discounted":
            self.L = [self.discount * a + b for a, b in zip(self.L, losses)]
        else:
            self.L = list(losses)

    def weights(self) -> list[float]:
        z = [-self.eps * x for x in self.L]
        top = max(z)
        e = [math.exp(v - top) for v in z]
        s = sum(e)
        return [v / s for v in e]


@torch.no_grad()
def weighted_average(experts: list[list[torch.Tensor]], weights: list[float]) -> list[torch.Tensor]:
    """sum_i p_i w_i per parameter, accumulated in fp32."""
    out = [torch.zeros_like(t, dtype=torch.float32) for t in experts[0]]
    for w, p in zip(experts, weights):
        torch._foreach_add_(out, [t.float() for t in w], alpha=p)
    return out


class EnsembleUpdater(GradientUpdater):
    name = "ensemble"
    Config = EnsembleConfig

    def init_weights(self) -> None:
        c = self.cfg
        self.lrs = c.grid
        self.experts = [fp32_copy(self.params) for _ in self.lrs]
        self.opts = self._make_opts()
        self.hedge = Hedge(len(self.lrs), c.hedge_lr, c.hedge, c.discount, share=c.share)
        self.pending: list[list[float]] = []  # pre-update losses on new feedback, per step
        self.last_expert_losses: list[float | None] = [None] * len(self.lrs)
        self._deployed = fp32_copy(self.params)

    def _make_opts(self) -> list[torch.optim.Optimizer | None]:
        c = self.cfg  # a step size 0 expert has no optimizer (it stays the offline draft)
        return [make_optimizer(c.optimizer, e, lr, c.momentum, c.weight_decay) if lr > 0 else None
                for e, lr in zip(self.experts, self.lrs)]

    @property
    def weights(self) -> list[float]:
        return self.hedge.weights()

    def deployed(self) -> list[torch.Tensor]:
        return self._deployed

    def step(self, batch: list[Round], n_new: int) -> bool:
        measured, results = [], []
        new = slice(len(batch) - n_new, len(batch))
        for e, lr in zip(self.experts, self.lrs):
            write_params(self.params, e)
            if lr == 0:  # frozen expert: its loss only
                if not n_new:
                    results.append(None)
                    measured.append(None)
                    continue
                with torch.no_grad():
                    losses = self.batch_losses(batch[new])
                if not bool(torch.isfinite(losses).all()):
                    return False
                measured.append(float(losses.mean()))
                results.append(None)
                continue
            losses, grads = self.losses_and_grads(batch)
            if grads is None:  # guard: one bad expert skips the whole step
                return False
            # l_i on new feedback, at the expert's weights before it trains on it
            measured.append(float(losses[new].mean()) if n_new else None)
            results.append(grads)
        for e, opt, grads in zip(self.experts, self.opts, results):
            if opt is not None:
                optimizer_step(opt, e, grads)
                self.pull_to_offline(e)
        if n_new:
            self.pending.append(self._scaled(measured))
        if self.cfg.cadence == "rounds":
            return True  # after_feedback() deploys
        write_params(self.params, self._deployed)  # chunk: deploy once the chunk is done
        return True

    def _scaled(self, losses: list[float]) -> list[float]:
        if self.cfg.loss_scale == "raw":
            return losses
        top = max(losses)
        return [x / top for x in losses] if top > 0 else [0.0] * len(losses)

    def after_feedback(self) -> None:
        """Hedge update from the pending pre-update losses, then deploy the average."""
        if self.pending:
            n = len(self.pending)
            losses = [sum(p[i] for p in self.pending) / n for i in range(len(self.lrs))]
            self.pending = []
            self.hedge.update(losses)
            self.last_expert_losses = losses
        self._deployed = weighted_average(self.experts, self.weights)
        if self.cfg.restart == "merged":
            for e, lr in zip(self.experts, self.lrs):
                if lr == 0:
                    continue  # the offline expert stays offline
                for t, v in zip(e, self._deployed):
                    t.copy_(v)
        write_params(self.params, self._deployed)

    def snapshot(self) -> UpdaterSnapshot:
        return replace(super().snapshot(), weights=tuple(float(w) for w in self.weights),
                       step_sizes=tuple(float(x) for x in self.lrs))

    def extra_snapshot(self) -> dict[str, Any]:
        return {"hedge": self.cfg.hedge, "hedge_losses": list(self.hedge.L),
                "expert_losses": list(self.last_expert_losses)}

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        t = {}
        for j, (e, opt) in enumerate(zip(self.experts, self.opts)):
            t.update({f"expert{j}.{i}": w for i, w in enumerate(e)})
            if opt is not None:
                t.update(optim_tensors(opt, f"opt{j}"))
        return t

    def extra_json(self) -> dict[str, Any]:
        return {"L": list(self.hedge.L), "opts": [None if o is None else optim_json(o) for o in self.opts],
                "last_expert_losses": self.last_expert_losses}

    def load_extra(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        c = self.cfg
        self.experts = [load_list(tensors, f"expert{j}", e) for j, e in enumerate(self.experts)]
        self.opts = self._make_opts()
        for j, (opt, m) in enumerate(zip(self.opts, meta["opts"])):
            if opt is not None:
                load_optim(opt, tensors, m, f"opt{j}")
        self.hedge.L = list(meta["L"])
        self.last_expert_losses = list(meta["last_expert_losses"])
        self._deployed = weighted_average(self.experts, self.weights)
