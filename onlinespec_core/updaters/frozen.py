"""frozen: the offline-trained draft, never updated (baseline)."""
from __future__ import annotations

from typing import Any

from ..drafts.base import Draft
from ..errors import require
from ..feedback import Round
from .base import Update, Updater
from .losses import online_loss


class FrozenUpdater(Updater):
    name = "frozen"
    feedback_rows = "none"

    def __init__(self, **options: Any) -> None:
        require(not options, f"updater 'frozen' takes no options, got {sorted(options)}")
        self.draft: Draft | None = None

    def attach(self, draft: Draft) -> None:
        self.draft = draft

    def observe(self, rnd: Round) -> Update:
        # f_t(w_t) from the proposal logits: no extra forward (none for a one-hot lookup draft)
        return Update(False, online_loss(rnd) if self.draft is not None and self.draft.trainable else None)

    def detach(self) -> None:
        pass

    def load_state(self, tensors: dict, meta: dict[str, Any]) -> None:
        pass
