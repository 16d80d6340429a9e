"""frozen: the offline-trained draft, never updated (baseline)."""
from __future__ import annotations

from typing import Any

import torch

from ..drafts.base import Draft
from ..feedback import Round
from .losses import online_loss


class FrozenUpdater:
    name = "frozen"

    def __init__(self, **options: Any) -> None:
        if options:
            from ..errors import OnlineSpecError
            raise OnlineSpecError(f"updater 'frozen' takes no options, got {sorted(options)}")
        self.draft: Draft | None = None

    def attach(self, draft: Draft) -> None:
        self.draft = draft

    def observe(self, rnd: Round) -> bool:
        # f_t(w_t) from the proposal logits: no extra forward (none for a one-hot lookup draft)
        rnd.loss = online_loss(rnd) if getattr(self.draft, "trainable", True) else None
        return False

    def detach(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {"name": self.name}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def state_json(self) -> dict[str, Any]:
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        pass
