"""Folders written atomically and read back verified: a save or a crash never loses a user's
files, never leaves a half-written folder in place, and a reader sees exactly one complete save.

Protocol (all under one lock on the parent folder, shared by threads and processes):
- write: clean/recover debris, refuse to replace a folder that is neither empty nor ours, write
  into `.NAME.tmp-X`, add the manifest (sizes + sha256 of every file) last, fsync, then swap it
  in (`NAME` -> `.NAME.old-X`, tmp -> `NAME`, remove old).
- read: recover `NAME` from `.NAME.old-X` / a complete `.NAME.tmp-X` when a crash left it only
  there, clean debris, return the bytes of the requested files checked against the manifest.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

from .errors import OnlineSpecError, require

try:
    import fcntl
except ImportError:  # Windows: the in-process lock only
    fcntl = None  # type: ignore[assignment]

MANIFEST = "onlinespec_manifest.json"
FORMAT = 1
# files that mark folders written by OnlineSpec before manifests existed
LEGACY_MARKERS: dict[str, tuple[str, ...]] = {"state": ("state.json", "draft.safetensors"),
                                              "export": ("onlinespec_export.json",)}
LEGACY_FILES = {"state": ("state.json", "draft.safetensors", "state.safetensors")}  # all a v1 state held
WHAT = {"state": "an OnlineSpec saved state", "export": "an OnlineSpec draft export"}
LABEL = {"state": "saved state", "export": "draft export"}
_local = threading.RLock()


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Exclusive lock on a folder (flock on its fd where available)."""
    with _local:
        fd = None
        if fcntl is not None:
            try:
                fd = os.open(folder, os.O_RDONLY)
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                if fd is not None:
                    os.close(fd)
                fd = None
        try:
            yield
        finally:
            if fd is not None:
                os.close(fd)  # releases the flock


def _debris_re(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-[A-Za-z0-9_]+$")


def debris(out: Path) -> list[Path]:
    """Left-over temp/old folders of out (from a crash), oldest first."""
    if not out.parent.is_dir():
        return []
    pat = _debris_re(out.name)
    found = [p for p in out.parent.iterdir() if pat.match(p.name)]
    return sorted(found, key=lambda p: (_mtime(p), p.name))


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. directories on Windows
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root).as_posix()) for p in root.rglob("*") if p.is_file())


def write_manifest(folder: Path, kind: str) -> None:
    """Sizes and sha256 of every file in folder; written (and fsynced) last."""
    files = {}
    for rel in _files(folder):
        if rel != MANIFEST:
            data = (folder / rel).read_bytes()
            files[rel] = {"size": len(data), "sha256": _sha256(data)}
    tmp = folder / (MANIFEST + ".part")
    tmp.write_text(json.dumps({"format": FORMAT, "kind": kind, "files": files}, indent=1))
    _fsync(tmp)
    os.replace(tmp, folder / MANIFEST)


def read_manifest(folder: Path) -> dict | None:
    """The manifest, or None when missing or unreadable."""
    try:
        m = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    ok = (isinstance(m, dict) and isinstance(m.get("files"), dict) and isinstance(m.get("kind"), str)
          and all(isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
                  for v in m["files"].values()))
    return m if ok else None


def is_complete(folder: Path, kind: str) -> bool:
    """folder holds a manifest of this kind and every listed file matches it."""
    m = read_manifest(folder)
    if m is None or m["kind"] != kind:
        return False
    for rel, info in m["files"].items():
        try:
            data = (folder / rel).read_bytes()
        except OSError:
            return False
        if len(data) != info["size"] or _sha256(data) != info["sha256"]:
            return False
    return True


def owner(folder: Path) -> str | None:
    """'state' / 'export' when folder was written by OnlineSpec, else None."""
    m = read_manifest(folder)
    if m is not None:
        return m["kind"]
    for kind, names in LEGACY_MARKERS.items():
        if all((folder / n).is_file() for n in names):
            return kind
    return None


def _rmtree(p: Path) -> None:
    with contextlib.suppress(OSError):
        (p / MANIFEST).unlink()  # a half-removed folder never looks complete
    shutil.rmtree(p, ignore_errors=True)


def recover(out: Path, kind: str) -> None:
    """Under the lock: when a crash left out only in a temp/old folder, move the newest complete
    one back into place; then remove every other left-over folder. Best effort (read-only dirs)."""
    left = debris(out)
    if not left:
        return
    try:
        if not out.exists():
            # a complete tmp is the newer save (finished writing); else the previous one (old)
            ranked = sorted(left, key=lambda p: (".tmp-" in p.name, _mtime(p)), reverse=True)
            for cand in ranked:
                if is_complete(cand, kind):
                    os.replace(cand, out)
                    _fsync(out.parent)
                    left.remove(cand)
                    break
        for p in left:
            _rmtree(p)
        _fsync(out.parent)
    except OSError:
        pass


def _check_target(out: Path, kind: str) -> None:
    require(not out.exists() or out.is_dir(), f"{str(out)!r} is a file; pick a folder path")
    if not out.is_dir() or not any(out.iterdir()):
        return
    found = owner(out)
    require(found == kind, (
        f"refusing to replace {str(out)!r}: it is not empty and is not {WHAT[kind]}"
        + (f" (it holds {WHAT[found]})" if found else "")
        + "; pick a new or empty folder, or move its files away first"))
    m = read_manifest(out)
    known = set(m["files"]) if m is not None else set(LEGACY_FILES.get(kind, ()))
    extra = sorted(set(_files(out)) - known - {MANIFEST}) if m is not None or kind in LEGACY_FILES else []
    require(not extra, f"refusing to replace {str(out)!r}: besides {WHAT[kind]} it holds other files "
                       f"({', '.join(extra[:3])}); move them away or pick another folder")


def _mkparent(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise OnlineSpecError(f"cannot create {str(out)!r}: a parent path is a file ({e.filename}); "
                              "pick a folder path whose parents are folders") from e
    except OSError as e:
        raise OnlineSpecError(f"cannot create the folder for {str(out)!r} ({e.strerror}); "
                              "pick a writable location") from e


def write_dir_atomically(out_dir: str | os.PathLike, write: Callable[[Path], None],
                         kind: str = "state") -> Path:
    """write(tmp_dir) into a temp folder next to out_dir, add the manifest, swap it into place."""
    out = Path(out_dir)
    require(out.name not in ("", ".", ".."), f"{str(out_dir)!r} is not a usable folder name; "
                                             "pass a path that ends in a folder name")
    _mkparent(out)
    with locked(out.parent):
        recover(out, kind)
        _check_target(out, kind)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            write(tmp)
            write_manifest(tmp, kind)
            for rel in _files(tmp):
                _fsync(tmp / rel)
            for d in {(tmp / rel).parent for rel in _files(tmp)} | {tmp}:
                _fsync(d)
            if out.exists():
                old = out.with_name(f".{out.name}.old-{secrets.token_hex(6)}")
                os.replace(out, old)
                os.replace(tmp, out)
                _fsync(out.parent)
                _rmtree(old)
            else:
                os.replace(tmp, out)
            _fsync(out.parent)
        except BaseException:
            _rmtree(tmp)
            raise
    return out


def read_dir(path: str | os.PathLike, kind: str, names: tuple[str, ...], fix: str) -> dict[str, bytes]:
    """The bytes of names in a folder written by write_dir_atomically, each checked against the
    manifest (so they all come from one complete save); OnlineSpecError with fix otherwise."""
    p = Path(path)
    where = f"{LABEL[kind]} {str(p)!r}"
    with locked(p.parent) if p.parent.is_dir() else contextlib.nullcontext():
        recover(p, kind)
        require(p.is_dir(), f"{where} does not exist or is not a folder; {fix}")
        m = read_manifest(p)
        if m is None:
            legacy = owner(p) == kind
            raise OnlineSpecError(
                f"{where} is incomplete or corrupt ({MANIFEST} missing or unreadable"
                + (", written by an older OnlineSpec" if legacy else "") + f"); {fix}")
        require(m["kind"] == kind, f"{where} holds {WHAT.get(m['kind'], m['kind'])}, not {WHAT[kind]}; {fix}")
        out = {}
        for n in names:
            info = m["files"].get(n)
            require(info is not None and (p / n).is_file(), f"{where} is incomplete ({n} missing); {fix}")
            data = (p / n).read_bytes()
            require(len(data) == info["size"] and _sha256(data) == info["sha256"],
                    f"{where} is corrupt ({n} does not match its manifest: changed or truncated); {fix}")
            out[n] = data
    return out
