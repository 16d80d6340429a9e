"""optimistic (Opt-Hydra): optimistic online gradient descent with two states.

  w_t       = w^_t - eta * h_t        deployed draft, moved by the hint
  w^_{t+1}  = w^_t - eta * g_t        shadow state, g_t = grad f_t(w_t)
  h_{t+1}   = g_t                     hint = last gradient (consecutive rounds look alike)
so w_{t+1} = w_t - eta * (2 g_t - g_{t-1}).
precondition="adam" (default): the same two states on the Adam direction (optimistic Adam,
Daskalakis et al. 2018) d_t = m^_t / (sqrt(v^_t) + 1e-8), m_t = b1 m_{t-1} + (1 - b1) g_t,
v_t = b2 v_{t-1} + (1 - b2) g_t^2 (bias-corrected). With b1 = 0 (sign-like steps on every
coordinate) the warmed demo draft collapsed (long-stream tau 0.76x frozen); b1 = 0.9 is default. The raw step eta * g moved the weights very little (pre-clip gradient norms of
9-56 against max_grad_norm = 1), the preconditioned one makes every coordinate move about eta.
precondition="none": the paper's plain form (lr 0.05).
form="momentum": the authors' released code instead (SGD, momentum 0.9, lr 0.1; the momentum
buffer persists across updates and is saved with the state)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import require
from ..feedback import Round
from .gradient import (GradConfig, GradientUpdater, fp32_copy, load_list, load_optim, make_optimizer,
                       optim_json, optim_tensors, optimizer_step, write_params)


@dataclass
class OptimisticConfig(GradConfig):
    form: str = "paper"  # paper (two-state optimistic OGD) | momentum (released code)
    precondition: str = "adam"  # paper form: adam (optimistic step on g / sqrt(v)) | none (raw g)
    beta1: float = 0.9  # precondition="adam": first-moment decay (0 = no momentum)
    beta2: float = 0.999  # precondition="adam": second-moment decay
    lr: float | None = None  # default: 2e-3 (paper form, adam), 0.05 (paper, none), 0.1 (momentum, as released)
    optimizer: str = "sgd"
    momentum: float = 0.9  # form="momentum" only
    anchor: float = 0.04  # equilibrium drift ~ lr / anchor per coordinate

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = 0.1 if self.form == "momentum" else (2e-3 if self.precondition == "adam" else 0.05)

    def validate(self, name: str) -> None:
        super().validate(name)
        require(self.form in ("paper", "momentum"), f"{name}: form must be 'paper' or 'momentum', got {self.form!r}")
        require(self.precondition in ("adam", "none"),
                f"{name}: precondition must be 'adam' or 'none', got {self.precondition!r}")
        require(0 < self.beta2 < 1, f"{name}: beta2 must be in (0, 1), got {self.beta2!r}")
        require(0 <= self.beta1 < 1, f"{name}: beta1 must be in [0, 1), got {self.beta1!r}")


@torch.no_grad()
def optimistic_step(shadow: list[torch.Tensor], hint: list[torch.Tensor], grad: list[torch.Tensor],
                    lr: float) -> list[torch.Tensor]:
    """In place: w^ <- w^ - lr*g; h <- g. Returns the new deployed w = w^ - lr*h."""
    torch._foreach_add_(shadow, grad, alpha=-lr)
    for h, g in zip(hint, grad):
        h.copy_(g)
    return deployed_weights(shadow, hint, lr)


@torch.no_grad()
def precondition_(m: list[torch.Tensor], v: list[torch.Tensor], grad: list[torch.Tensor], t: int,
                  beta1: float, beta2: float) -> list[torch.Tensor]:
    """Adam's moments (in place) and its direction m^ / (sqrt(v^) + 1e-8); m unused when beta1 = 0."""
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, grad, grad, value=1 - beta2)
    denom = torch._foreach_sqrt(torch._foreach_div(v, 1 - beta2 ** t))
    torch._foreach_add_(denom, 1e-8)
    if beta1 > 0:
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, grad, alpha=1 - beta1)
        num = torch._foreach_div(m, 1 - beta1 ** t)
    else:
        num = grad
    return torch._foreach_div(num, denom)


def deployed_weights(shadow: list[torch.Tensor], hint: list[torch.Tensor], lr: float) -> list[torch.Tensor]:
    return torch._foreach_add(shadow, hint, alpha=-lr)


class OptimisticUpdater(GradientUpdater):
    name = "optimistic"
    Config = OptimisticConfig

    @property
    def hint(self) -> list[torch.Tensor]:
        """h_t (the last step direction); the fused Adam path holds -lr * h_t (self.step_buf)."""
        if self.fused:
            return [d / -self.cfg.lr for d in self.step_buf]
        return self._hint

    @hint.setter
    def hint(self, value: list[torch.Tensor]) -> None:
        if self.fused:
            self.step_buf = [h * -self.cfg.lr for h in value]
        else:
            self._hint = value

    @property
    def fused(self) -> bool:
        """precondition='adam' with momentum: the moments and the step in ONE fused Adam kernel
        (torch._fused_adam_, the same m^ / (sqrt(v^) + 1e-8) direction) run on a zeroed buffer,
        which then holds -lr * h: w^ += it, and the deployed w = w^ + it is written straight into
        the module; 5 passes over the weights per step instead of ~17."""
        return self.adam and self.cfg.beta1 > 0

    def init_weights(self) -> None:
        c = self.cfg
        self.shadow = fp32_copy(self.params)  # w^_1 = current draft, h_1 = 0  ->  w_1 = w^_1
        self.hint = [torch.zeros_like(s) for s in self.shadow]
        self.v = [torch.zeros_like(s) for s in self.shadow] if self.adam else []  # second moment
        self.m = [torch.zeros_like(s) for s in self.shadow] if self.adam and c.beta1 > 0 else []
        self.t = 0
        self._hint_norm: tuple[int, float] | None = None  # (updates, ||h||) for the snapshot
        self.opt = (make_optimizer("sgd", self.shadow, c.lr, c.momentum, c.weight_decay)
                    if c.form == "momentum" else None)
        self._deployed = self.shadow if self.opt else self._deploy()

    def _deploy(self) -> list[torch.Tensor]:
        """w = w^ - lr * h (fresh tensors)."""
        if self.fused:
            return torch._foreach_add(self.shadow, self.step_buf)
        return deployed_weights(self.shadow, self.hint, self.cfg.lr)

    @torch.no_grad()
    def _fused_step(self, grads: list[torch.Tensor], scale: float) -> None:
        c = self.cfg
        self.t += 1
        torch._foreach_zero_(self.step_buf)
        step = torch.tensor(float(self.t))
        torch._fused_adam_(self.step_buf, grads, self.m, self.v, [], [step] * len(grads), lr=c.lr,
                           beta1=c.beta1, beta2=c.beta2, weight_decay=0.0, eps=1e-8, amsgrad=False,
                           maximize=False, grad_scale=torch.tensor(scale) if scale != 1.0 else None,
                           found_inf=None)  # step_buf = -lr * d_t: the new hint (times -lr)
        torch._foreach_add_(self.shadow, self.step_buf)  # w^ <- w^ - lr d_t
        self.pull_to_offline(self.shadow)
        for p, s, d in zip(self.params, self.shadow, self.step_buf):  # w = w^ - lr h, into the module
            if p.dtype == torch.float32:  # in place on p itself: its version counter moves,
                torch.add(s, d, out=p)  # which is how caches of the weights see the step
            else:
                p.copy_(s + d)
        self._deployed = None  # deployed() recomputes it when asked

    @property
    def adam(self) -> bool:
        return self.cfg.form == "paper" and self.cfg.precondition == "adam"

    def deployed(self) -> list[torch.Tensor]:
        if self._deployed is None:
            self._deployed = self._deploy()
        return self._deployed

    def step(self, batch: list[Round], n_new: int) -> bool:
        if self.fused:
            _, grads = self.losses_and_grads(batch, clip=False)  # g_t at the deployed w_t
            if grads is None:
                return False
            self._fused_step(grads, self.clip_scale)
            return True
        _, grads = self.losses_and_grads(batch)  # g_t at the deployed w_t
        if grads is None:
            return False
        if self.opt is not None:
            optimizer_step(self.opt, self.shadow, grads)
            self._deployed = self.shadow
        else:
            if self.adam:
                self.t += 1
                grads = precondition_(self.m, self.v, grads, self.t, self.cfg.beta1, self.cfg.beta2)
            self._deployed = optimistic_step(self.shadow, self.hint, grads, self.cfg.lr)
            if self.cfg.anchor > 0:
                self.pull_to_offline(self.shadow)
                self._deployed = self._deploy()
        if self.opt is not None:
            self.pull_to_offline(self.shadow)
        write_params(self.params, self._deployed)
        return True

    def extra_snapshot(self) -> dict[str, Any]:
        s: dict[str, Any] = {"form": self.cfg.form}
        if self.opt is None:  # ||h||, computed once per step (snapshot() is read every round)
            if self._hint_norm is None or self._hint_norm[0] != self.updates:
                norm = torch.linalg.vector_norm(torch.stack([h.norm() for h in self.hint]))
                self._hint_norm = (self.updates, float(norm))
            s["hint_norm"] = self._hint_norm[1]
        return s

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        t = {f"shadow.{i}": s for i, s in enumerate(self.shadow)}
        if self.fused:  # -lr * h as held (bit-exact restore)
            t.update({f"step.{i}": d for i, d in enumerate(self.step_buf)})
        else:
            t.update({f"hint.{i}": h for i, h in enumerate(self.hint)})
        t.update({f"v.{i}": v for i, v in enumerate(self.v)})
        t.update({f"m.{i}": m for i, m in enumerate(self.m)})
        if self.opt is not None:
            t.update(optim_tensors(self.opt, "opt"))
        return t

    def extra_json(self) -> dict[str, Any]:
        return {"opt": optim_json(self.opt)} if self.opt is not None else {"t": self.t}

    def load_extra(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        c = self.cfg
        self.shadow = load_list(tensors, "shadow", self.shadow)
        if self.fused and "step.0" in tensors:
            self.step_buf = load_list(tensors, "step", self.step_buf)
        else:
            self.hint = load_list(tensors, "hint", self.hint)
        if self.adam:
            self.v = load_list(tensors, "v", self.v)
            if self.m:
                self.m = load_list(tensors, "m", self.m)
        self.t = meta.get("t", 0)
        self._hint_norm = None
        if self.opt is not None:
            self.opt = make_optimizer("sgd", self.shadow, c.lr, c.momentum, c.weight_decay)
            load_optim(self.opt, tensors, meta["opt"], "opt")
            self._deployed = self.shadow
        else:
            self._deployed = self._deploy()
