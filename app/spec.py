"""What a run is made of (Qt-free): the pair, the engine config, the stream, compare configs, and
the engines a Start assembles from them (build_run)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import onlinespec_core as osc
from onlinespec_core.compare import CompareConfig, CompareRunner
from onlinespec_core.driver import RunControl
from onlinespec_core.errors import OnlineSpecError
from onlinespec_core.options import (DecodeSettings, expected_type, field_defaults, format_options,
                                     parse_options)
from onlinespec_core.streams import StreamItem, bundled_streams, from_text, load_stream
from onlinespec_core.updaters import REGISTRY, updater_class

__all__ = ["PairSpec", "StreamSpec", "RunSpec", "Run", "build_run", "default_stream", "parse_options",
           "format_options", "updater_fields", "check_updater"]

FALLBACK_PROMPTS = ("def add(a, b):\nSELECT name FROM users WHERE\n"
                    "Tom has 3 apples and buys 4 more. How many apples")


@dataclass(frozen=True)
class PairSpec:
    source: str = "demo"  # demo | dirs | hub
    target: str = ""
    draft: str = ""
    draft_kind: str = "lm"
    device: str = "cpu"
    dtype: str = "float32"
    fast: bool = True  # the fast decode path (CPU); False = plain Hugging Face forward

    def load_kwargs(self) -> dict[str, Any]:
        fast = None if self.fast else False
        if self.source == "demo":
            return {"target": "demo", "draft_kind": self.draft_kind, "device": self.device,
                    "dtype": self.dtype, "fast": fast}
        if not self.target.strip():
            raise OnlineSpecError("no target model given; type a model directory or hub id in "
                                  "'Target', or choose the demo pair")
        return {"target": self.target.strip(), "draft": self.draft.strip() or None,
                "draft_kind": self.draft_kind, "device": self.device, "dtype": self.dtype, "fast": fast}


@dataclass(frozen=True)
class StreamSpec:
    kind: str = "bundled"  # bundled | file | text
    value: str = ""  # stream name, JSONL path, or the typed prompts (one per line)

    def load(self) -> list[StreamItem]:
        if self.kind == "text":
            return from_text(self.value)
        if self.kind == "file":
            if not self.value.strip():
                raise OnlineSpecError("no JSONL file chosen; pick one with 'Browse...' or choose a "
                                      "bundled stream")
            return load_stream(self.value.strip())
        names = bundled_streams()
        if not names:  # no streams installed yet: a tiny built-in stream
            return from_text(FALLBACK_PROMPTS, topic="builtin")
        return load_stream(self.value if self.value in names else default_stream())


@dataclass(kw_only=True)
class RunSpec(DecodeSettings):
    pair: PairSpec = field(default_factory=PairSpec)
    stream: StreamSpec = field(default_factory=StreamSpec)
    updater: str = "frozen"
    updater_options: dict[str, Any] = field(default_factory=dict)
    dynamic_k: bool = False
    max_new_tokens: int = 64
    compare: list[CompareConfig] = field(default_factory=list)  # empty = a single run
    share_target: bool = True
    baseline: bool = True  # measure target-only tokens/s on the first prompt
    reset_draft: bool = True  # start from the pair's initial draft weights


@dataclass
class Run:
    """What a Start assembles: the engines (config 0 first), their names, the compare runner."""
    engines: list[osc.Engine]
    names: list[str]
    compare: CompareRunner | None = None


def build_run(spec: RunSpec, pair: osc.ModelPair, control: RunControl,
              loaded: osc.Engine | None = None) -> Run:
    """The engines of a run: a compare runner's (sharing the target), or one engine; loaded =
    an engine restored by load_state, continued with its own state and the spec's k/sampling."""
    sampling = dict(temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p, seed=spec.seed)
    if spec.compare:
        compare = CompareRunner(pair, spec.compare, share_target=spec.share_target, control=control, **sampling)
        return Run(compare.engines, [c.name for c in spec.compare], compare)
    if loaded is not None:
        loaded.set_k(spec.k, dynamic=spec.dynamic_k)
        loaded.set_sampling(spec.temperature, spec.top_k, spec.top_p)
        return Run([loaded], [loaded.updater_name])
    eng = osc.Engine(pair, k=spec.k, updater=spec.updater, updater_options=spec.updater_options,
                     dynamic_k=spec.dynamic_k, **sampling)
    return Run([eng], [eng.updater_name])


def default_stream() -> str:
    names = list(bundled_streams())
    for pref in ("shift", "mixed", "demo"):
        if pref in names:
            return pref
    return names[0] if names else ""


def updater_fields(name: str) -> dict[str, Any]:
    """The updater's option fields with their defaults (from its Config dataclass), if any."""
    if name not in REGISTRY:
        return {}
    try:
        cfg = getattr(updater_class(name), "Config", None)
    except Exception:  # noqa: BLE001 -- a broken member: no fields to offer
        return {}
    return field_defaults(cfg) if cfg is not None and dataclasses.is_dataclass(cfg) else {}


def check_updater(name: str, options: dict[str, Any]) -> None:
    """Raise OnlineSpecError naming the first bad option ("lr must be a finite number, got 'fast'"), then
    let the library build the updater once (its own checks); any other error it raises is turned
    into an OnlineSpecError too, so every mistake reaches the dialog."""
    if name not in REGISTRY:
        raise OnlineSpecError(f"unknown updater {name!r}; choose one of {', '.join(REGISTRY)}")
    fields = updater_fields(name)
    if fields:
        bad = sorted(set(options) - set(fields))
        if bad:
            raise OnlineSpecError(f"updater {name!r} has no option {', '.join(map(repr, bad))}; "
                                  f"its options: {', '.join(fields)}")
        for key, v in options.items():
            want = expected_type(fields[key], v)
            if want is not None:
                raise OnlineSpecError(f"{key} must be {want}, got {v!r} (updater {name!r})")
    from onlinespec_core.updaters import make_updater
    try:
        make_updater(name, **options)
    except OnlineSpecError:
        raise
    except Exception as e:  # noqa: BLE001 -- whatever the library raises, the user sees it
        raise OnlineSpecError(f"updater {name!r} rejects its options ({format_options(options)}): "
                              f"{type(e).__name__}: {e}") from e
