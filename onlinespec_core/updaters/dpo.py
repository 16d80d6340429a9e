"""dpo (Online-LR): online preference learning for the draft.

A preference pair from each rejection: prompt = the accepted context, chosen c = the target's
token there, rejected r = the draft's proposal. Loss (beta = 0.1):
  -log sigmoid(beta * [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))])
ref = a snapshot of the draft taken at the start of each chunk (chunk cadence) or every
`ref_every` observed rounds (rounds cadence). mode="sft": the online SFT baseline, CE on the
target's tokens (accepted path + correction)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from ..errors import require
from ..feedback import Round
from .gradient import (GradConfig, GradientUpdater, adopt_masters, aliased, fp32_copy, load_list, load_optim,
                       make_optimizer, master_weights, optim_json, optim_tensors, optimizer_step, write_params)
from .losses import dpo_loss, n_positions, preference_pair, sft_loss


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
    sparse_rows_ok = True  # option head_rows
    Config = DPOConfig

    def init_weights(self) -> None:
        c = self.cfg
        self.master = master_weights(self.params)  # fp32 params: the params themselves
        self.opt = make_optimizer(c.optimizer, self.master, c.lr, c.momentum, c.weight_decay)
        self.ref = fp32_copy(self.master)
        self.ref_round = self.observed  # when the reference was taken
        self.ref_current = True  # ref == master (skip the reference forward)
        self.pairs = 0

    def deployed(self) -> list[torch.Tensor]:
        return self.master

    @property
    def reads_target_logits(self) -> bool:  # pairs and labels are tokens: no [m, V] copy per round
        return self.cfg.feature_weight > 0  # (feature drafts' train_terms may read them)

    def refresh_reference(self) -> None:
        if len(self.ref) == len(self.master) and all(r.shape == m.shape for r, m in zip(self.ref, self.master)):
            torch._foreach_copy_(self.ref, self.master)  # into the buffers it has (no new 4 MB blocks)
        else:
            self.ref = fp32_copy(self.master)
        self.ref_round = self.observed
        self.ref_current = True

    def on_chunk_start(self) -> None:
        self.refresh_reference()  # ref = the draft as it was at the start of this chunk

    def batch_losses(self, batch: list[Round]) -> torch.Tensor:
        c = self.cfg
        if c.merge and c.positions == "path" and self.draft.merges_rounds:
            return self.merged_dpo_losses(batch)
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
            with self.reference_weights(), torch.no_grad():
                ref = logps(self.batch_logits(batch))
        lgs = self.batch_logits(batch)
        cur = logps(lgs)
        ref = cur.detach() if ref is None else ref
        self.pairs += cur.shape[0]
        losses = torch.stack([dpo_loss(a[0], a[1], b[0], b[1], self.cfg.beta) for a, b in zip(cur, ref)])
        if self.cfg.sft_weight > 0:  # one term per pair-less round too: mean over the batch
            sft = torch.stack([sft_loss(lg, r) for lg, r in zip(lgs, batch)])
            return torch.cat([losses, self.cfg.sft_weight * sft])
        return losses

    def merged_dpo_losses(self, batch: list[Round]) -> torch.Tensor:
        """batch_losses for lm drafts on the path, the same terms as the per-round form: the
        batch's rows from one forward per sequence (merged_rows), ONE log-softmax over them, the
        pair and label log-probabilities gathered from it (per-round slices and softmaxes each
        cost a full-size [T, V] zero tensor in backward)."""
        c, dev = self.cfg, self.params[0].device
        sft_on = c.mode == "sft" or c.sft_weight > 0
        pairs = [None if c.mode == "sft" else preference_pair(r) for r in batch]
        offs, o = [], 0
        ms = [min(n_positions(r, c.positions), r.k) for r in batch]
        for m in ms:
            offs.append(o)
            o += m
        pr = [(offs[i] + pp[0], pp[1], pp[2]) for i, pp in enumerate(pairs) if pp is not None]
        if pr:
            p_rows = torch.tensor([x[0] for x in pr], device=dev)
            p_cols = torch.tensor([[x[1], x[2]] for x in pr], device=dev)
        ref = None
        if pr and not self.ref_current:  # reference forward with the snapshot weights, before the graph
            with self.reference_weights(), torch.no_grad():
                rows, _ = self.merged_rows(batch)
                ref = F.log_softmax(rows.index_select(0, p_rows).float(), -1).gather(1, p_cols)
        rows, _ = self.merged_rows(batch)
        logq = F.log_softmax(rows.float(), -1)
        parts = []
        if pr:
            cur = logq.index_select(0, p_rows).gather(1, p_cols)  # [P, 2]: log pi(c), log pi(r)
            ref = cur.detach() if ref is None else ref
            self.pairs += cur.shape[0]
            margin = (cur[:, 0] - ref[:, 0]) - (cur[:, 1] - ref[:, 1])
            parts.append(-F.logsigmoid(c.beta * margin))
        if sft_on:  # CE on the target's tokens emitted[:n], n = min(len(emitted), k, rows), per round
            s_rows, s_lab, s_of = [], [], []
            for i, (r, m) in enumerate(zip(batch, ms)):
                n = min(len(r.emitted), r.k, m)
                s_rows += range(offs[i], offs[i] + n)
                s_lab += r.emitted[:n]
                s_of += [i] * n
            s_of_t = torch.tensor(s_of, device=dev, dtype=torch.long)
            nll = -logq.index_select(0, torch.tensor(s_rows, device=dev, dtype=torch.long)).gather(
                1, torch.tensor(s_lab, device=dev, dtype=torch.long)[:, None])[:, 0]
            counts = torch.bincount(s_of_t, minlength=len(batch)).to(nll.dtype)
            sft = torch.zeros(len(batch), device=dev, dtype=nll.dtype).index_add(0, s_of_t, nll) / counts
            parts.append(sft if c.mode == "sft" else c.sft_weight * sft)
        if not parts:
            return logq.sum(-1)[:0]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @contextlib.contextmanager
    def reference_weights(self) -> Iterator[None]:
        """The module holds the reference weights inside. Where the masters are the parameters
        (fp32), the parameters' storage is swapped to the reference tensors and back (no copy, and
        the live weights' versions do not move, so the proposal cache stays fresh for the main
        forward; an lm draft is told its cache does not hold the reference's K/V meanwhile).
        Otherwise the reference is written in and the masters written back."""
        d = self.draft
        if not aliased(self.params, self.master):
            write_params(self.params, self.ref)
            try:
                yield
            finally:
                write_params(self.params, self.master)
            return
        live = [p.data for p in self.params]
        lm = hasattr(d, "cache_version")
        saved = d.cache_version if lm else None
        try:
            if lm:
                d.cache_version = None  # -> the stale form: the tail's K/V under the reference
            for p, r in zip(self.params, self.ref):
                p.data = r
            yield
        finally:
            for p, w in zip(self.params, live):
                p.data = w
            if lm:
                d.cache_version = saved

    def step(self, batch: list[Round], n_new: int) -> bool | None:
        c = self.cfg
        if c.cadence == "rounds" and self.observed - self.ref_round >= c.ref_every and c.mode == "dpo":
            self.refresh_reference()  # (sft reads no reference: no copy of every weight)
        if c.mode == "dpo" and all(preference_pair(r) is None for r in batch):
            return None  # no rejection in this batch: no preference pair
        _, grads = self.losses_and_grads(batch, clip=False)  # clipped inside the optimizer's kernel
        if grads is None:
            return False
        self.stepped_rows = optimizer_step(self.opt, self.master, grads, self.clip_scale)
        self.pull_to_offline(self.master)
        self.ref_current = False
        write_params(self.params, self.master)  # (a no-op where the masters are the params)
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
        self.master = adopt_masters(self.params, load_list(tensors, "master", self.master))
        self.ref = load_list(tensors, "ref", self.ref)
        self.opt = make_optimizer(c.optimizer, self.master, c.lr, c.momentum, c.weight_decay)
        load_optim(self.opt, tensors, meta["opt"], "opt")
        self.ref_round, self.ref_current, self.pairs = meta["ref_round"], meta["ref_current"], meta["pairs"]
