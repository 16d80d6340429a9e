"""UI-stall tracing for long demos: ONLINESPEC_STALL_TRACE=FILE makes a watchdog thread write every
thread's stack to FILE whenever the UI thread's heartbeat is more than a second late (what held
it up: a slow slot, the GIL, a lock). Off by default; costs one sleeping thread when on."""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback

LATE_S = float(os.environ.get("ONLINESPEC_STALL_TRACE_MS", "1000")) / 1000.0  # report stalls longer than this


class StallTrace:
    def __init__(self, path: str) -> None:
        self.path = path
        self.main = threading.get_ident()
        self.last = time.perf_counter()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, name="stall-trace", daemon=True)
        self._t.start()

    def beat(self) -> None:  # called by the UI thread's heartbeat
        self.last = time.perf_counter()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        reported = 0.0
        while not self._stop.wait(min(0.25, LATE_S / 3)):
            late = time.perf_counter() - self.last
            if late < LATE_S or self.last == reported:
                continue
            reported = self.last
            lines = [f"=== UI thread {late * 1000:.0f} ms late at {time.strftime('%H:%M:%S')}"]
            for tid, fr in sys._current_frames().items():
                if tid == threading.get_ident():
                    continue
                name = "UI" if tid == self.main else next(
                    (t.name for t in threading.enumerate() if t.ident == tid), str(tid))
                lines.append(f"--- {name}\n" + "".join(traceback.format_stack(fr)[-12:]))
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write("\n".join(lines) + "\n")
            except OSError:
                pass


def from_env() -> StallTrace | None:
    path = os.environ.get("ONLINESPEC_STALL_TRACE")
    return StallTrace(path) if path else None
