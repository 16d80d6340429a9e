"""Work around a PySide6 6.12 reference-count bug on CPython 3.11.

PySide6 6.12 wheels return None from void methods (insertText, setValue, start, ...) without
taking a new reference, which is harmless on CPython >= 3.12 where None is immortal (PEP 683).
On 3.11 every such call drops None's refcount by one until the interpreter aborts with
"none_dealloc: deallocating None" -- a long-running GUI dies within minutes (measured: -1 per
call; a fresh interpreter holds ~5k references). None is never freed anyway, so we give it a
refcount that no run can exhaust. No-op on 3.12+ and on other interpreters.
"""
from __future__ import annotations

import sys

BOOST = 1 << 60  # ob_refcnt is a Py_ssize_t: far from overflow, unreachable by decrements


def immortalize_none() -> bool:
    if sys.version_info >= (3, 12) or sys.implementation.name != "cpython":
        return False
    import ctypes
    ref = ctypes.c_ssize_t.from_address(id(None))  # PyObject.ob_refcnt is the first field
    if ref.value < BOOST // 2:
        ref.value += BOOST
    return True
