"""The Updater protocol: turns each round's verification feedback into draft updates.

An updater is one file with a class that subclasses Updater (capabilities and no-op hooks
come with defaults) and one line in updaters.REGISTRY. What it did in a round is its
`observe` result (Update); its state, for every reader (plots, CLI, app), is `snapshot()`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from ..drafts.base import Draft
from ..feedback import Round

FEEDBACK_ROWS = ("none", "path", "all")


@dataclass(frozen=True)
class Update:
    """What an updater did with one round."""
    changed: bool = False  # the draft's weights changed (the engine refreshes the draft's cache)
    loss: float | None = None  # online loss f_t(w_t) of this round, before any update


@dataclass(frozen=True)
class UpdaterSnapshot:
    """The updater's state after a round, typed: what plots, the CLI and the app read."""
    name: str
    observed: int = 0  # rounds seen
    updates: int = 0  # optimizer steps taken
    skipped: int = 0  # steps refused by the non-finite guard (weights restored)
    lr: float | None = None  # step size (None: no gradient steps)
    last_loss: float | None = None  # training loss of the last step
    online_loss: float | None = None  # f_t(w_t) of the last observed round
    buffered: int = 0  # rounds waiting for the next step
    weights: tuple[float, ...] = ()  # Hedge weights over experts (ensemble), sum 1
    step_sizes: tuple[float, ...] = ()  # each expert's step size, aligned with weights
    extra: dict[str, Any] = field(default_factory=dict)  # algorithm-specific JSON-able values

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        d["weights"], d["step_sizes"] = list(self.weights), list(self.step_sizes)
        return {**d, **extra}


@runtime_checkable
class Updater(Protocol):
    name: ClassVar[str]
    # capabilities: which target rows observe() reads. "none": none (frozen); "path": the
    # accepted positions and the first rejected one (greedy-path rows); "all": every verified
    # row, including rows conditioned on rejected draft tokens.
    feedback_rows: ClassVar[str] = "path"

    def attach(self, draft: Draft) -> None:
        """Start driving this draft; its current weights are the starting point."""

    def observe(self, rnd: Round) -> Update:
        """Take one round's feedback; update now or buffer it."""

    def flush(self) -> bool:
        """Train on feedback still buffered (end of a stream); True when the weights changed."""
        return False

    def detach(self) -> None:
        """Leave the deployed weights in draft.module (called before a switch or a save)."""

    def snapshot(self) -> UpdaterSnapshot:
        """Its state now (cheap: called after every round)."""
        return UpdaterSnapshot(self.name)

    def stats(self) -> dict[str, Any]:
        """snapshot() as a flat JSON-able dict (metrics files)."""
        return self.snapshot().as_dict()

    def reads_offpath_rows(self, draft: Draft | None) -> bool:
        """Does observe() read target rows past the first rejection? Those rows are conditioned
        on rejected draft tokens, so only a real target forward has them (compare mode replays
        the greedy path otherwise). A feature draft trains on every hidden row it was fed."""
        if self.feedback_rows == "none":
            return False
        return self.feedback_rows == "all" or bool(draft is not None and draft.needs_hidden)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors to save (optimizer moments, hints, expert weights, reference model...)."""
        return {}

    def state_json(self) -> dict[str, Any]:
        """JSON-able scalars to save (options, counters, Hedge losses...)."""
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what state_tensors/state_json wrote, so a restored run continues exactly."""
