"""ogd: plain online gradient descent on the round loss, w <- w - eta * grad f_t(w)
(SGD, or Adam by option). With loss = fkl | rkl | jsd this is the OSD baseline family."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..feedback import Round
from .gradient import (GradConfig, GradientUpdater, adopt_masters, load_list, load_optim, make_optimizer,
                       master_weights, optim_json, optim_tensors, optimizer_step, write_params)


@dataclass
class OGDConfig(GradConfig):
    lr: float = 2e-3  # with the anchor: learns from a random draft, and stays near a warmed one
    optimizer: str = "adam"
    anchor: float = 0.04  # equilibrium drift ~ lr / anchor per coordinate


class OGDUpdater(GradientUpdater):
    name = "ogd"
    sparse_rows_ok = True  # option head_rows
    Config = OGDConfig

    def init_weights(self) -> None:
        c = self.cfg
        self.master = master_weights(self.params)  # fp32 params: the params themselves
        self.opt = make_optimizer(c.optimizer, self.master, c.lr, c.momentum, c.weight_decay)

    def deployed(self) -> list[torch.Tensor]:
        return self.master

    def step(self, batch: list[Round], n_new: int) -> bool:
        _, grads = self.losses_and_grads(batch, clip=False)  # clipped inside the optimizer's kernel
        if grads is None:
            return False
        self.stepped_rows = optimizer_step(self.opt, self.master, grads, self.clip_scale)
        self.pull_to_offline(self.master)
        write_params(self.params, self.master)  # (a no-op where the masters are the params)
        return True

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"master.{i}": m for i, m in enumerate(self.master)}, **optim_tensors(self.opt, "opt")}

    def extra_json(self) -> dict[str, Any]:
        return {"opt": optim_json(self.opt)}

    def load_extra(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        c = self.cfg
        self.master = adopt_masters(self.params, load_list(tensors, "master", self.master))
        self.opt = make_optimizer(c.optimizer, self.master, c.lr, c.momentum, c.weight_decay)
        load_optim(self.opt, tensors, meta["opt"], "opt")
