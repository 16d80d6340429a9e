"""Write a folder atomically: a crash mid-write never leaves a half-written folder in place."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from .errors import require


def write_dir_atomically(out_dir: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """write(tmp_dir) into a temp folder next to out_dir, then rename it into place."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    require(not out.exists() or out.is_dir(), f"{str(out)!r} is a file; pick a folder path")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
