"""`onlinespec export-draft`: write an evolved draft as a plain Hugging Face model directory.

An `lm` draft becomes a folder AutoModelForCausalLM.from_pretrained can load (config +
safetensors + tokenizer), so it can serve as the assistant/draft model of other engines.
Library: export_draft(state_dir, out_dir) from a save_state folder, export_engine_draft(engine,
out_dir) from a live engine."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from .atomic import write_dir_atomically
from .errors import require
from .state import DRAFT, META, load_weights, read_state


PROVENANCE = "onlinespec_export.json"


def _save_tokenizer(base: str | None, tokenizer: Any, tmp: Path) -> None:
    if tokenizer is None and base is not None and (Path(base) / "tokenizer_config.json").is_file():
        from .models import load_tokenizer
        tokenizer = load_tokenizer(base)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))


READ_FIX = "pass the folder engine.save_state(path) wrote (it holds state.json and draft.safetensors)"


def export_draft(state_dir: str | os.PathLike, out_dir: str | os.PathLike, base: str | None = None,
                 dtype: str = "float32") -> Path:
    """Evolved lm draft of a saved state -> HF model dir. base: the draft the run started from
    (config + tokenizer); default: the one recorded in the state, or the demo draft."""
    from .models import DEMO_DIR, load_causal_lm
    state_dir = Path(state_dir)
    saved = read_state(state_dir, (META, DRAFT), READ_FIX)  # the weights only: no RNG/updater needed
    meta = saved.meta
    kind = meta.get("draft_kind")
    require(kind == "lm", f"the saved draft is an {kind!r} head, not a causal LM: only 'lm' drafts export as "
                          "a Hugging Face model dir; use engine.draft.save(path) for eagle/hydra heads")
    if base is None:
        base = meta.get("draft_source") or (str(DEMO_DIR / "draft") if meta.get("pair") == "demo" else None)
    require(base is not None, "this state does not record which draft it started from; pass "
                              "--base DRAFT_DIR (the draft model dir given to load_pair)")
    model = load_causal_lm(str(base), "draft", "cpu", dtype)
    assert saved.draft is not None
    load_weights(model, saved.draft, f"{str(state_dir)!r} (base draft {str(base)!r})",
                 "pass --base with the draft the run was started from")

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        _save_tokenizer(str(base), None, tmp)
        info = {"base": str(base), "state": str(state_dir), "round_index": meta.get("round_index"),
                "updater": meta.get("updater", {}).get("name"), "tau": meta.get("metrics", {}).get("tau")}
        (tmp / PROVENANCE).write_text(json.dumps(info, indent=2))
    return write_dir_atomically(out_dir, write, kind="export")


def export_engine_draft(engine: Any, out_dir: str | os.PathLike, timeout: float | None = 60.0) -> Path:
    """The live engine's deployed draft -> HF model dir (lm) or the draft's own format (heads)."""
    require(engine.draft is not None, "nothing to export: this engine has no draft")

    def now() -> Path:  # between rounds when a generate runs in another thread
        engine.updater.detach()  # the deployed weights are in draft.module
        return write_dir_atomically(out_dir, write, kind="export")

    def write(tmp: Path) -> None:
        if engine.draft.kind == "lm":
            engine.draft.module.save_pretrained(str(tmp), safe_serialization=True)
            _save_tokenizer(None, engine.pair.tokenizer, tmp)
        else:
            engine.draft.save(tmp)
        info = {"base": engine.pair.draft_source, "round_index": engine.round_index,
                "updater": engine.updater_name, "tau": engine.metrics.tau}
        (tmp / PROVENANCE).write_text(json.dumps(info, indent=2))
    return engine._call(now, timeout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="onlinespec export-draft", description=(
        "Write the evolved draft of a saved state (engine.save_state / the app's 'save') as a "
        "plain Hugging Face model directory loadable by AutoModelForCausalLM.from_pretrained."))
    ap.add_argument("state_dir", help="folder written by engine.save_state")
    ap.add_argument("--out", required=True, help="output model directory (replaced atomically)")
    ap.add_argument("--base", default=None, help="the draft model dir the run started from "
                    "(default: the one recorded in the state, or the demo draft)")
    ap.add_argument("--dtype", default="float32", help="float32 (default) | bfloat16 | float16")
    args = ap.parse_args(argv)
    out = export_draft(args.state_dir, args.out, args.base, args.dtype)
    print(f"exported the evolved draft to {out}")
    return 0
