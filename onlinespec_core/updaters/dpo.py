"""dpo (Online-LR): online preference learning for the draft.

A preference pair from each rejection: prompt = the accepted context, chosen c = the target's
token there, rejected r = the draft's proposal. Loss (beta = 0.1):
  -log sigmoid(beta * [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))])
ref = a snapshot of the draft taken at the start of each chunk (chunk cadence) or every
`ref_every` observed rounds (rounds cadence). mode="sft": the online SFT baseline, CE on the
target's tokens (accepted path + correction)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import require
from ..feedback import Round
from .gradient import (GradConfig, GradientUpdater, fp32_copy, load_list, load_optim, make_optimizer,
                       optim_json, optim_tensors, optimizer_step, write_params)
from .losses import dpo_loss, preference_pair, sft_loss


@dataclass
class DPOConfig(GradConfig):
    mode: str = "dpo"  # dpo | sft
    beta: float = 0.1
    lr: float = 3e-4  # 1e-3 wrecked the warmed demo draft (proxy tau 1.07 vs frozen 1.32)
    optimizer: str = "adam"
    ref_every: int = 32  # rounds cadence: refresh the reference every N observed rounds
    sft_weight: float = 1.0  # dpo mode: + w * CE on the target's tokens along the path (every verified
    #                          position, not only the first rejection: the RPO-style regulariser)

    def validate(self, name: str) -> None:
        super().validate(name)
        require(self.mode in ("dpo", "sft"), f"{name}: mode must be 'dpo' or 'sft', got {self.mode!r}")
        require(self.beta > 0, f"{name}: beta must be > 0, got {self.beta!r}")
        require(isinstance(self.ref_every, int) and self.ref_every >= 1, f"{name}: ref_every must be an integer >= 1")
        require(self.sft_weight >= 0, f"{name}: sft_weight must be >= 0")


class DPOUpdater(GradientUpdater):
    name = "dpo"
    Config = DPOConfig

    def init_weights(self) -> None:
        c = self.cfg
        self.master = fp32_copy(self.params)
        self.opt = make_optimizer(c.optimizer, self.master, c.lr, c.momentum, c.weight_decay)
        self.ref = fp32_copy(self.master)
        self.ref_round = self.observed  # when the reference was taken
        self.ref_current = True  # ref == master (skip the reference forward)
        self.pairs = 0

    def deployed(self) -> list[torch.Tensor]:
        return self.master

    def refresh_reference(self) -> None:
        self.ref = fp32_copy(self.master)
        self.ref_round = self.observed
        self.ref_current = True

    def on_chunk_start(self) -> None:
        self.refresh_reference()  # ref = the draft as it was at the start of this chunk

    def batch_losses(self, batch: list[Round]) -> torch.Tensor:
        if self.cfg.mode == "sft":
            return torch.stack([sft_loss(lg, r) for lg, r in zip(self.batch_logits(batch), batch)])
        pairs = [preference_pair(r) for r in batch]
        dev = self.params[0].device
        idx = [None if pp is None else torch.tensor([pp[1], pp[2]], device=dev) for pp in pairs]

        def logps(lgs: list[torch.Tensor]) -> torch.Tensor:  # [P, 2]: log pi(c), log pi(r) at each first rejection
            return torch.stack([F.log_softmax(lg[pp[0]].float(), -1)[i]
                                for lg, pp, i in zip(lgs, pairs, idx) if pp is not None])
        ref = None
        if not self.ref_current:  # reference forward with the snapshot weights, before the graph
            write_params(self.params, self.ref)
            with torch.no_grad():
                ref = logps(self.batch_logits(batch))
            write_params(self.params, self.master)
        lgs = self.batch_logits(batch)
        cur = logps(lgs)
        ref = cur.detach() if ref is None else ref
        self.pairs += cur.shape[0]
        losses = torch.stack([dpo_loss(a[0], a[1], b[0], b[1], self.cfg.beta) for a, b in zip(cur, ref)])
        if self.cfg.sft_weight > 0:  # one term per pair-less round too: mean over the batch
            sft = torch.stack([sft_loss(lg, r) for lg, r in zip(lgs, batch)])
            return torch.cat([losses, self.cfg.sft_weight * sft])
        return losses

    def step(self, batch: list[Round], n_new: int) -> bool | None:
        c = self.cfg
        if c.cadence == "rounds" and self.observed - self.ref_round >= c.ref_every:
            self.refresh_reference()
        if c.mode == "dpo" and all(preference_pair(r) is None for r in batch):
            return None  # no rejection in this batch: no preference pair
        _, grads = self.losses_and_grads(batch)
        if grads is None:
            return False
        optimizer_step(self.opt, self.master, grads)
        self.pull_to_offline(self.master)
        self.ref_current = False
        write_params(self.params, self.master)
        return True

    def extra_snapshot(self) -> dict[str, Any]:
        return {"mode": self.cfg.mode, "beta": self.cfg.beta, "pairs": self.pairs,
                "ref_round": self.ref_round}

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        t = {f"master.{i}": m for i, m in enumerate(self.master)}
        t.update({f"ref.{i}": m for i, m in enumerate(self.ref)})
        t.update(optim_tensors(self.opt, "opt"))
        return t

    def extra_json(self) -> dict[str, Any]:
        return {"opt": optim_json(self.opt), "ref_round": self.ref_round,
                "ref_current": self.ref_current, "pairs": self.pairs}

    def load_extra(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        c = self.cfg
        self.master = load_list(tensors, "master", self.master)
        self.ref = load_list(tensors, "ref", self.ref)
        self.opt = make_optimizer(c.optimizer, self.master, c.lr, c.momentum, c.weight_decay)
        load_optim(self.opt, tensors, meta["opt"], "opt")
        self.ref_round, self.ref_current, self.pairs = meta["ref_round"], meta["ref_current"], meta["pairs"]
