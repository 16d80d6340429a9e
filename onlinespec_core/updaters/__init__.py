"""Updaters by name. Each file holds one algorithm behind the Updater protocol."""
from __future__ import annotations

import importlib
from typing import Any

from ..errors import OnlineSpecError
from .base import Updater

# name -> "module:Class"; imported lazily so one broken member never breaks the rest
REGISTRY: dict[str, str] = {
    "frozen": "frozen:FrozenUpdater",
    "ogd": "ogd:OGDUpdater",
    "optimistic": "optimistic:OptimisticUpdater",
    "ensemble": "ensemble:EnsembleUpdater",
    "dpo": "dpo:DPOUpdater",
}


def available_updaters() -> list[str]:
    return list(REGISTRY)


def make_updater(name: str, **options: Any) -> Updater:
    if name not in REGISTRY:
        raise OnlineSpecError(f"unknown updater {name!r}; choose one of {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)(**options)


__all__ = ["Updater", "REGISTRY", "available_updaters", "make_updater"]
