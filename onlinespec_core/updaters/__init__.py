"""Updaters by name. Each file holds one algorithm behind the Updater protocol."""
from __future__ import annotations

import importlib
from typing import Any

from ..errors import OnlineSpecError
from .base import Updater

# name -> "module:Class" (a module of this package, or else an importable module path);
# imported lazily so one broken member never breaks the rest. Adding an updater: one file
# with a class that subclasses Updater (or GradientUpdater), and its line here.
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
    return updater_class(name)(**options)


def updater_class(name: str) -> type:
    module, cls = REGISTRY[name].split(":")
    try:
        mod = importlib.import_module(f"{__name__}.{module}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{module}":
            raise
        mod = importlib.import_module(module)  # a module outside this package (a plug-in)
    return getattr(mod, cls)


__all__ = ["Updater", "REGISTRY", "available_updaters", "make_updater", "updater_class"]
