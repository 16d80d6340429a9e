"""Options and settings: one `key=value` syntax, one parser into the config dataclasses, the
decoding settings every run shares, and one JSON encoder.

Syntax (CLI flags, the app's option fields, bench's UPDATER:key=value): each value is read as
JSON when it parses (`3`, `1e-3`, `true`, `[1, 2]`), else as a Python literal (`True`,
`[1e-4, 2e-4]`), else as a bare string (`hedge=discounted`). A text of several options splits
on the commas outside brackets: `lr=1e-3, lrs=[1e-4, 2e-4], hedge=discounted`.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, TypeVar

import torch

from .errors import OnlineSpecError, require
from .sampling import SamplingConfig

C = TypeVar("C")


# ---- the one key=value syntax ---------------------------------------------------------------
def parse_value(text: str) -> Any:
    """'3' -> 3, '1e-3' -> 0.001, 'true'/'True' -> True, '[1,2]' -> [1, 2], 'adam' -> 'adam'."""
    s = text.strip()
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return s


def split_options(text: str) -> list[str]:
    """'a=1, b=[1, 2]' -> ['a=1', 'b=[1, 2]'] (commas inside brackets are kept)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += 1 if ch in "[({" else (-1 if ch in "])}" else 0)
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_options(items: str | Iterable[str] | None, what: str = "option") -> dict[str, Any]:
    """A text ('lr=1e-3, every=4') or a list of 'key=value' items -> {key: value}."""
    if items is None:
        return {}
    parts = split_options(items) if isinstance(items, str) else [str(p) for p in items]
    out: dict[str, Any] = {}
    for p in parts:
        key, sep, value = p.partition("=")
        require(bool(sep), f"{what} {p!r} is not key=value; write e.g. 'lr=1e-3, every=4'")
        require(bool(key.strip()), f"{what} {p!r} has an empty key; write key=value (e.g. lr=1e-3)")
        out[key.strip()] = parse_value(value)
    return out


def parse_scoped_options(items: Iterable[str] | None, what: str = "--updater-option") -> dict[str, dict[str, Any]]:
    """['ensemble:lrs=[1e-4,2e-4]'] -> {'ensemble': {'lrs': [...]}} (one scope per name)."""
    out: dict[str, dict[str, Any]] = {}
    for p in items or []:
        head, sep, value = p.partition("=")
        name, colon, key = head.partition(":")
        require(bool(sep and colon and name.strip() and key.strip()),
                f"{what} {p!r} must look like UPDATER:key=value (e.g. ogd:lr=1e-3)")
        out.setdefault(name.strip(), {})[key.strip()] = parse_value(value)
    return out


def format_options(options: dict[str, Any]) -> str:
    """The inverse of parse_options for a text field: 'lr=0.001, hedge=discounted'."""
    return ", ".join(f"{k}={v}" if isinstance(v, str) else f"{k}={v!r}" for k, v in options.items())


# ---- options -> dataclass, typed errors ------------------------------------------------------
def expected_type(default: Any, v: Any) -> str | None:
    """What an option's value must be, judged by its default's type, or None when v fits."""
    if isinstance(default, bool):
        return None if isinstance(v, bool) else "True or False"
    if isinstance(default, int):
        return None if isinstance(v, int) and not isinstance(v, bool) else "an integer"
    if isinstance(default, float):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return None if ok else "a finite number"
    if isinstance(default, str):
        return None if isinstance(v, str) else "a string"
    if isinstance(default, (list, tuple)):
        return None if isinstance(v, (list, tuple)) else "a list, e.g. [1e-4, 3e-4]"
    return None


def field_defaults(cls: type) -> dict[str, Any]:
    """A config dataclass's fields with their defaults (required fields left out)."""
    out = {}
    for f in fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def build(cls: type[C], options: dict[str, Any], where: str, base: dict[str, Any] | None = None) -> C:
    """cls(**base, **options), refusing unknown names and wrongly typed values with an
    OnlineSpecError that names the option; then cls.validate(where) when it has one."""
    require(isinstance(options, dict), f"{where}: options must be a dict of name -> value; got {options!r}")
    names = [f.name for f in fields(cls)]
    bad = sorted(set(options) - set(names))
    require(not bad, f"{where} has no option(s) {bad}; valid options: {', '.join(names)}")
    defaults = field_defaults(cls)
    for key, v in options.items():
        if key in defaults:
            want = expected_type(defaults[key], v)
            require(want is None, f"{where}: {key} must be {want}, got {v!r}")
    try:
        cfg = cls(**{**(base or {}), **options})
    except TypeError as e:
        raise OnlineSpecError(f"{where}: bad options ({e})") from e
    check = getattr(cfg, "validate", None)
    if callable(check):
        check(where)
    return cfg


# ---- the decoding settings every run shares ----------------------------------------------------
def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class DecodeSettings:
    """What every run decodes with: draft length and the sampling rule (same on both sides)."""
    k: int = 4  # draft length (0 = target-only decoding)
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p)  # validates

    def decode_settings(self) -> "DecodeSettings":
        return DecodeSettings(self.k, self.temperature, self.top_k, self.top_p, self.seed)

    def validate_decode(self, k_max: int) -> None:
        require(is_int(self.k) and 0 <= self.k <= k_max,
                f"k must be an integer in 0..{k_max} (0 = target-only decoding); got {self.k!r}")
        require(is_int(self.seed) and 0 <= self.seed < 2 ** 63,
                f"seed must be an integer in 0..2**63-1; got {self.seed!r}")
        _ = self.sampling


# ---- one JSON encoder ------------------------------------------------------------------------
def json_default(o: Any) -> Any:
    """json.dumps(default=...) for what JSON lacks: tensors -> lists, paths -> str,
    dataclasses -> dicts; anything else is a TypeError (a saved state must not guess)."""
    if isinstance(o, torch.Tensor):
        return o.detach().cpu().tolist()
    if isinstance(o, Path):
        return str(o)
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def to_jsonable(o: Any) -> Any:
    """Plain JSON values (json_default's conversions, recursively; other objects -> repr),
    non-finite floats -> None: what the UI, metrics files and reports hold."""
    if o is None or isinstance(o, (bool, int, str)):
        return o
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): to_jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [to_jsonable(v) for v in o]
    try:
        return to_jsonable(json_default(o))
    except TypeError:
        return repr(o)


def dumps(o: Any, indent: int | None = 2) -> str:
    return json.dumps(to_jsonable(o), indent=indent)
