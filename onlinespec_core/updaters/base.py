"""The Updater protocol: turns each round's verification feedback into draft updates."""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from ..drafts.base import Draft
from ..feedback import Round


@runtime_checkable
class Updater(Protocol):
    name: str

    def attach(self, draft: Draft) -> None:
        """Start driving this draft; its current weights are the starting point."""

    def observe(self, rnd: Round) -> bool:
        """Take one round's feedback; update now or buffer it. True when the draft's weights changed."""

    def detach(self) -> None:
        """Leave the deployed weights in draft.module (called before a switch or a save)."""

    def stats(self) -> dict[str, Any]:
        """JSON-able live state for plots (e.g. ensemble weights, step sizes, last loss)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors to save (optimizer moments, hints, expert weights, reference model...)."""

    def state_json(self) -> dict[str, Any]:
        """JSON-able scalars to save (options, counters, Hedge losses...)."""

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what state_tensors/state_json wrote, so a restored run continues exactly."""
