"""The one exception type users see. Every message says what went wrong and how to fix it."""
from __future__ import annotations


class OnlineSpecError(Exception):
    """A problem the user can fix (bad path, mismatched tokenizers, bad k, corrupt state, ...)."""


def require(cond: bool, message: str) -> None:
    if not cond:
        raise OnlineSpecError(message)
