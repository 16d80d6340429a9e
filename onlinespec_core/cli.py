"""`onlinespec <command> ...`: each command lives in its own module with its own argparse."""
from __future__ import annotations

import importlib
import sys

from .errors import OnlineSpecError

COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("onlinespec_core.runner:main", "headless run over a prompt stream (metrics JSON, CSV, PNG)"),
    "bench": ("onlinespec_core.bench:main", "side-by-side benchmark: target-only, HF assisted, updaters"),
    "gui": ("app.main:main", "open the desktop playground"),
    "train-demo": ("onlinespec_core.demo.recipe:main", "rebuild the embedded demo pair from scratch"),
    "train-draft": ("onlinespec_core.training:main", "warm-up training of an lm/eagle/hydra draft"),
    "export-draft": ("onlinespec_core.export:main", "write an evolved draft as a Hugging Face model dir"),
    "study": ("onlinespec_core.studies.stream_study:main", "learning study on a long shift stream (per-visit tau)"),
    "shift-bench": ("onlinespec_core.studies.shift_bench:main", "updaters before/after one topic shift"),
}


def usage() -> str:
    lines = ["usage: onlinespec <command> [options]   (onlinespec <command> --help for details)", "",
             "commands:"]
    lines += [f"  {name:<13} {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"onlinespec: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, fn = COMMANDS[cmd][0].split(":")
    try:
        entry = getattr(importlib.import_module(module), fn)
    except ImportError as e:
        print(f"onlinespec {cmd}: not available ({e})", file=sys.stderr)
        return 2
    try:
        return int(entry(rest) or 0)
    except OnlineSpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
