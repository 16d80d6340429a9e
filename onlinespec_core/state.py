"""The saved-state format (engine.save_state / load_state, export-draft): one folder written by
atomic.write_dir_atomically with

    state.json         version, config, round_index, updater {name, options, state}, draft_kind,
                       pair, sources, fingerprint {target, target_sample, draft}, metrics
    draft.safetensors  the deployed draft weights (tied weights stored once)
    state.safetensors  updater tensors ("updater.*") and the RNG state ("rng")
    onlinespec_manifest.json   sizes + sha256 of the three, written last

read_state returns all three from one complete save, parsed and checked (types, version)."""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file, save_model

from .atomic import read_dir, write_dir_atomically
from .errors import OnlineSpecError, require
from .options import json_default

STATE_VERSION = 2
KIND = "state"
META, DRAFT, TENSORS = "state.json", "draft.safetensors", "state.safetensors"
FILES = (META, DRAFT, TENSORS)
FIX = "save it again with engine.save_state(path), or pick the folder save_state wrote"
_SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer",
               "num_attention_heads", "n_head", "num_key_value_heads", "intermediate_size", "n_inner",
               "max_position_embeddings", "n_positions", "head_dim", "rope_theta", "tie_word_embeddings")


@dataclass
class SavedState:
    path: Path
    meta: dict[str, Any]
    draft: dict[str, torch.Tensor] | None  # draft weights by name
    tensors: dict[str, torch.Tensor] | None  # updater.* and rng


# ---- identity of a pair ----------------------------------------------------------------
def target_fingerprint(model: Any) -> str:
    """Architecture and shapes of a target (not its dtype or path)."""
    cfg = model.config.to_dict()
    keep = {k: cfg[k] for k in _SHAPE_KEYS if k in cfg}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def target_sample(model: Any) -> list[float]:
    """A few input-embedding values: tells apart targets with equal shapes, any dtype."""
    try:
        w = model.get_input_embeddings().weight
        rows = torch.linspace(0, w.shape[0] - 1, 8).long().to(w.device)
        return [round(float(v), 6) for v in w.detach()[rows, :4].float().reshape(-1).cpu()]
    except Exception:  # offloaded / meta weights: shapes only
        return []


def draft_fingerprint(draft: Any) -> str:
    """Kind, parameter names and shapes of a draft (its weights evolve; its shape does not)."""
    shapes = sorted((k, list(v.shape)) for k, v in draft.module.state_dict().items())
    return hashlib.sha256(json.dumps([draft.kind, shapes]).encode()).hexdigest()[:16]


def same_sample(a: list[float], b: list[float]) -> bool:
    if not a or not b:
        return True
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=2e-2, abs_tol=2e-3) for x, y in zip(a, b))


# ---- write -----------------------------------------------------------------------------
def write_state(path: str | os.PathLike, meta: dict[str, Any], module: torch.nn.Module,
                tensors: dict[str, torch.Tensor]) -> Path:
    def write(tmp: Path) -> None:
        save_model(module, str(tmp / DRAFT))
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / TENSORS))
        (tmp / META).write_text(json.dumps({"version": STATE_VERSION, **meta}, indent=2, default=json_default))
    return write_dir_atomically(path, write, KIND)


# ---- read ------------------------------------------------------------------------------
def read_state(path: str | os.PathLike, names: tuple[str, ...] = FILES, fix: str = FIX) -> SavedState:
    """The files of one complete save, verified and parsed; OnlineSpecError otherwise."""
    p = Path(path)
    where = f"saved state {str(p)!r}"
    data = read_dir(p, KIND, tuple(dict.fromkeys((META, *names))), fix)
    try:
        meta = json.loads(data[META].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise OnlineSpecError(f"{where} is corrupt (state.json: {e}); {fix}") from e
    check_meta(meta, where, fix)
    parsed: dict[str, dict[str, torch.Tensor]] = {}
    for n in (DRAFT, TENSORS):
        if n in data:
            try:
                parsed[n] = load_bytes(data[n])
            except Exception as e:
                raise OnlineSpecError(f"{where} is corrupt ({n}: {str(e)[:200]}); {fix}") from e
    return SavedState(p, meta, parsed.get(DRAFT), parsed.get(TENSORS))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_meta(meta: Any, where: str, fix: str = FIX) -> None:
    """Types of every field load_state reads (a tampered state.json gives a clear error)."""
    require(isinstance(meta, dict), f"{where} is corrupt (state.json is not an object); {fix}")
    v = meta.get("version")
    require(_is_int(v), f"{where} has version {v!r} ({type(v).__name__}), expected the number "
                        f"{STATE_VERSION}: state.json was edited or not written by OnlineSpec; {fix}")
    require(v == STATE_VERSION, f"{where} has format version {v}, this OnlineSpec reads version "
                                f"{STATE_VERSION}; {fix} with this version")

    def need(cond: bool, field: str, want: str) -> None:
        require(cond, f"{where} is corrupt (state.json field {field!r} must be {want}, "
                      f"got {_short(meta, field)}); {fix}")
    need(isinstance(meta.get("config"), dict), "config", "an object")
    need(_is_int(meta.get("round_index")) and meta["round_index"] >= 0, "round_index", "an integer >= 0")
    u = meta.get("updater")
    need(isinstance(u, dict) and isinstance(u.get("name"), str) and isinstance(u.get("options"), dict)
         and isinstance(u.get("state"), dict), "updater", "an object with name, options and state")
    need(isinstance(meta.get("draft_kind"), str), "draft_kind", "a string")
    fp = meta.get("fingerprint")
    need(isinstance(fp, dict) and isinstance(fp.get("target"), str) and isinstance(fp.get("draft"), str)
         and isinstance(fp.get("target_sample", []), list), "fingerprint", "an object with target and draft")
    need(isinstance(meta.get("metrics", {}), dict), "metrics", "an object")


def _short(meta: dict[str, Any], field: str) -> str:
    return repr(meta.get(field))[:80]


def check_pair(meta: dict[str, Any], target: Any, draft: Any, where: str) -> None:
    """The state was saved for this pair (same draft kind and shapes, same target)."""
    fix = "load it into an engine built from the same model pair"
    require(draft is not None, f"{where} holds a draft, but this engine has none; {fix}")
    require(meta["draft_kind"] == draft.kind, f"{where} is for a {meta['draft_kind']!r} draft, this engine "
                                              f"has {draft.kind!r}; {fix}")
    fp = meta["fingerprint"]
    src = meta.get("target_source")
    require(fp["target"] == target_fingerprint(target) and same_sample(fp.get("target_sample", []),
                                                                         target_sample(target)),
            f"{where} was saved for a different target model"
            + (f" ({src})" if isinstance(src, str) else "") + f"; {fix}")
    require(fp["draft"] == draft_fingerprint(draft),
            f"{where} was saved for a draft of another architecture or size; {fix}")


def load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor], where: str, fix: str) -> None:
    """Check names and shapes of saved weights against module, then copy them in (nothing is
    written unless everything fits). Tied weights may be stored under one of their names."""
    from safetensors.torch import _remove_duplicate_names
    own = module.state_dict()
    dup = {n for names in _remove_duplicate_names(own, preferred_names=list(weights)).values() for n in names}
    want = set(own) - dup
    missing, extra = sorted(want - set(weights)), sorted(set(weights) - set(own))
    bad = [k for k in weights if k in own and tuple(weights[k].shape) != tuple(own[k].shape)]
    require(not (missing or extra or bad), (
        f"saved draft weights in {where} do not fit this draft (missing {missing[:3]}, unexpected "
        f"{extra[:3]}, other shapes {bad[:3]}); {fix}"))
    require(all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point()),
            f"saved draft weights in {where} contain NaN or inf; {fix}")
    with torch.no_grad():
        for k, v in weights.items():
            own[k].copy_(v.to(own[k].device, own[k].dtype))
