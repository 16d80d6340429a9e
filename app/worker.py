"""EngineWorker: the thread adapter between the UI and the run driver (superqt's shape).

A QObject with no parent, moved to a QThread. Requests go in as thread-safe calls: run
control (pause / step / stop / shift_topic) on the driver's RunControl, updater switches on
the engine, and anything that must touch engine state (save/load) queued and run by the
worker between rounds, while paused, or when idle. Events come out as batched signals.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import queue
import sys
import threading
import time
import traceback
from typing import Any, Callable

import torch
from PySide6.QtCore import QObject, Qt, Signal, Slot

import onlinespec_core as osc
from onlinespec_core.driver import Driver, RunControl
from onlinespec_core.errors import OnlineSpecError
from onlinespec_core.options import to_jsonable

from .records import UiEvent
from .spec import PairSpec, RunSpec, build_run

try:  # imported here, in the UI thread at start-up: the first run's lazy imports of these ran in
    # the worker and held the UI up for 0.3-0.5 s (module bodies under the GIL)
    import psutil  # noqa: F401
    import transformers.generation.utils  # noqa: F401
    import transformers.masking_utils  # noqa: F401
    import transformers.modeling_utils  # noqa: F401
except Exception:  # noqa: BLE001 -- an optional warm-up
    pass

log = logging.getLogger(__name__)
FLUSH_S = 0.04  # batch round events for at most 40 ms before handing them to the UI
BASELINE_FIRST = 4  # a target-only sample after each of the first prompts ...
BASELINE_EVERY = 3  # ... then after every third: paired per prompt with the run, as the bench does


class EngineWorker(QObject):
    events = Signal(list)  # list[UiEvent]
    error = Signal(str)  # a message for the user (OnlineSpecError text, or the exception)
    state = Signal(str)  # loading | running | paused | idle
    message = Signal(str)  # status-bar notes (saved, loaded, baseline ...)
    loaded = Signal(object)  # dict: path, updater, round, options -- what the next Start continues
    _start = Signal(object)
    _poke = Signal()

    def __init__(self) -> None:
        super().__init__()  # no parent: moved to a QThread
        self.pair: osc.ModelPair | None = None
        self.pair_key: PairSpec | None = None
        self.initial_draft: dict[str, torch.Tensor] | None = None
        self.engine: osc.Engine | None = None  # config 0's engine (save/load/switch)
        self.engines: list[osc.Engine] = []
        self.control = RunControl()  # the run's pause / step / stop / shift, read between rounds
        self.control.idle = self._drain  # queued calls (save ...) still run while paused
        self.loaded_state = False  # next Start continues the loaded state
        self.running = False
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._stopping = False
        self._pending: list[UiEvent] = []
        self._last_flush = 0.0
        self._texts: dict[int, str] = {}
        self._base_engine: osc.Engine | None = None
        self._base_samples: list[float] = []
        self._base_by_prompt: dict[int, float] = {}
        self._start.connect(self._run, Qt.ConnectionType.QueuedConnection)
        self._poke.connect(self._drain, Qt.ConnectionType.QueuedConnection)

    # ---- thread-safe requests (any thread) ---------------------------------------------
    def start(self, spec: RunSpec) -> None:
        self._stopping = False
        self.control.clear()
        self._start.emit(spec)

    def stop(self) -> None:
        self._stopping = True
        self.control.resume()
        self.control.stop()
        base = self._base_engine
        if base is not None:
            base.control.stop()  # a target-only baseline sample runs under its own control

    def set_updater(self, name: str, options: dict[str, Any]) -> None:
        """Switch config 0's updater at the next round (raises OnlineSpecError on bad input)."""
        if self.engine is None:
            raise OnlineSpecError("no run yet: press Start first (the updater in the setup panel "
                                  "is used from the first round)")
        self.engine.set_updater(name, **options)  # validates (OnlineSpecError) before queueing
        if not self.running:
            self._emit([UiEvent("updater", 0, {"from": "", "to": name, "options": options})])

    def submit(self, fn: Callable[[], None]) -> None:
        """Run fn in the worker thread: between rounds while running, at once when idle."""
        self._calls.put(fn)
        self._poke.emit()

    def save_state(self, path: str) -> None:
        self.submit(lambda: self._save(path))

    def load_state(self, path: str, spec: RunSpec) -> None:
        self.submit(lambda: self._load(path, spec))

    # ---- worker thread -----------------------------------------------------------------
    @Slot()
    def _drain(self) -> None:
        while True:
            try:
                fn = self._calls.get_nowait()
            except queue.Empty:
                return
            self._guard(fn)

    def _guard(self, fn: Callable[[], None]) -> bool:
        try:
            fn()
            return True
        except OnlineSpecError as e:
            self.error.emit(str(e))
        except Exception as e:  # keep the app alive; show what happened
            log.error("worker error:\n%s", traceback.format_exc())
            self.error.emit(f"{type(e).__name__}: {e}")
        return False

    def _save(self, path: str) -> None:
        if self.engine is None:
            raise OnlineSpecError("nothing to save yet: start a run first")
        self.engine.save_state(path)
        self.message.emit(f"saved state to {path}")

    def _load(self, path: str, spec: RunSpec) -> None:
        if self.running:
            raise OnlineSpecError("stop the run before loading a saved state")
        pair = self._ensure_pair(spec.pair)
        eng = osc.Engine(pair, k=spec.k, updater=spec.updater, updater_options=spec.updater_options)
        eng.load_state(path)
        self.engine, self.engines = eng, [eng]
        self.loaded_state = True
        self.message.emit(f"loaded state from {path} (round {eng.round_index}, updater "
                          f"{eng.updater_name}); Start continues it")
        self.loaded.emit({"path": str(path), "updater": eng.updater_name, "round": eng.round_index,
                          "options": dict(getattr(eng, "updater_options", {}) or {})})

    def _ensure_pair(self, ps: PairSpec) -> osc.ModelPair:
        if self.pair is None or self.pair_key != ps:
            self.pair, self.pair_key = None, None
            pair = osc.load_pair(**ps.load_kwargs())
            self.initial_draft = ({k: v.detach().clone() for k, v in pair.draft.module.state_dict().items()}
                                  if pair.draft is not None else None)
            self.pair, self.pair_key, self.loaded_state = pair, ps, False
        return self.pair

    def _text(self, tok: int) -> str:
        t = self._texts.get(tok)
        if t is None:
            t = self.pair.tokenizer.decode([tok]) if self.pair is not None else str(tok)
            self._texts[tok] = t
        return t

    def _emit(self, evs: list[UiEvent]) -> None:
        self.events.emit(evs)

    def _flush(self) -> None:
        if self._pending:
            self.events.emit(self._pending)
            self._pending = []
        self._last_flush = time.perf_counter()

    def _push(self, ev: UiEvent, urgent: bool = False) -> None:
        self._pending.append(ev)
        if urgent or time.perf_counter() - self._last_flush >= FLUSH_S:
            self._flush()

    @Slot(object)
    def _run(self, spec: RunSpec) -> None:
        self.running = True
        _lower_priority()
        self._texts = {}
        self.state.emit("loading")
        ok = False
        try:
            ok = self._guard(lambda: self._run_inner(spec))
        finally:
            self._pending.append(UiEvent("end", -1, {"reason": "stopped" if self._stopping
                                                     else ("done" if ok else "error")}))
            self._flush()
            self.running = False
            self._drain()
            self.state.emit("idle")

    def _run_inner(self, spec: RunSpec) -> None:
        items = spec.stream.load()
        if self.pair_key != spec.pair:
            self.loaded_state = False
        pair = self._ensure_pair(spec.pair)
        gc.collect()
        gc.freeze()  # long-lived objects (models, modules) out of the collector's way: no GC stalls
        if self._stopping:
            return
        if self.pair_key is not None and pair.draft is not None and spec.reset_draft \
                and not self.loaded_state and self.initial_draft is not None:
            pair.draft.module.load_state_dict(self.initial_draft)
            pair.draft.invalidate()
        run = build_run(spec, pair, self.control, self.engine if self.loaded_state else None)
        self.loaded_state = False
        self.engines, names, compare = run.engines, run.names, run.compare
        self.engine = self.engines[0]
        events = Driver(self.engines, self.control).run(items, spec.max_new_tokens)
        shared = bool(spec.compare) and spec.share_target and spec.temperature == 0.0
        self._emit([UiEvent("run", -1, {"names": names, "n_prompts": len(items),
                                        "greedy": spec.temperature == 0.0, "shared": shared})])
        self._base_engine, self._base_samples, self._base_by_prompt, done = None, [], {}, 0
        baseline = spec.baseline and pair.draft is not None
        if baseline:
            self._baseline(pair, items[0], spec, 0, warm=True)
        if self._stopping:
            return
        self.state.emit("running")
        for ci, ev in events:
            self._push(self._convert(ci, ev), urgent=ev.kind not in ("round", "start", "done"))
            if ev.kind == "round":
                self._drain()  # queued calls, between rounds
            elif ev.kind in ("paused", "resumed"):
                self.state.emit("paused" if ev.kind == "paused" else "running")
            elif ev.kind == "done" and ci == 0:
                done += 1
                p = ev.data.get("prompt_index")
                if baseline and p is not None and p not in self._base_by_prompt and not self._stopping \
                        and (done <= BASELINE_FIRST or done % BASELINE_EVERY == 0):
                    self._flush()
                    self._baseline(pair, items[p], spec, p)  # the prompt just run, under the same load
            if self._stopping:
                self.control.stop()
        if compare is not None and compare.shared is not None:
            self._push(UiEvent("share", -1, compare.shared.stats.as_dict()))

    def _baseline(self, pair: osc.ModelPair, item: Any, spec: RunSpec, prompt_index: int,
                  warm: bool = False) -> None:
        """One target-only sample (tokens/s, the same rounds' accounting as the run) on a prompt
        of the stream: prompt 0 before the run starts, then each prompt just run among the first
        BASELINE_FIRST and every BASELINE_EVERY-th after -- interleaved with the run as the bench
        does, so each pair (run, target-only) on a prompt sees the same machine load. The UI's
        speedup is the median of these per-prompt ratios."""
        eng = self._base_engine
        if eng is None:
            eng = self._base_engine = osc.Engine(pair, k=1, temperature=spec.temperature, top_k=spec.top_k,
                                                 top_p=spec.top_p, seed=spec.seed)
        if warm:  # kernels, allocator: the first forwards of a process are slow
            eng.generate_target_only(item.prompt, min(8, spec.max_new_tokens))
        out = eng.generate_target_only(item.prompt, spec.max_new_tokens)  # stop() reaches it
        tps = out.stats.get("tokens_per_s", 0.0)
        if not tps or not math.isfinite(tps) or self._stopping:
            return
        self._base_samples.append(float(tps))
        self._base_by_prompt[prompt_index] = float(tps)
        v = sorted(self._base_samples)
        med = v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])
        self._emit([UiEvent("baseline", -1, {"tokens_per_s": med, "samples": list(self._base_samples),
                                             "by_prompt": dict(self._base_by_prompt),
                                             "tokens": len(out.token_ids)})])
        self.message.emit(f"target-only baseline: {med:.1f} tokens/s (median of {len(v)}, "
                          f"{v[0]:.1f}\u2013{v[-1]:.1f})")

    def _convert(self, ci: int, ev: osc.Event) -> UiEvent:
        if ev.kind != "round":
            data = {k: v for k, v in ev.data.items() if k not in ("token_ids",)}
            return UiEvent(ev.kind, ci, data)
        r, snap = ev.round, ev.updater
        return UiEvent("round", ci, {
            "round": r.index, "k": r.k, "accepted": r.accepted, "kind": r.kind, "origins": r.origins,
            "emitted": list(r.emitted), "texts": [self._text(t) for t in r.emitted],
            "drafted": list(r.drafted), "drafted_texts": [self._text(t) for t in r.drafted],
            "draft_p": list(r.draft_p), "target_p": list(r.target_p),
            "topic": r.topic, "prompt_index": r.prompt_index, "wall_s": r.wall_s,
            "update_s": r.update_s, "updated": r.updated, "loss": to_jsonable(r.loss),
            "updater": snap.name, "updater_state": snap,
        })


def _lower_priority() -> None:
    """Let the UI thread win the CPU when the machine is busy (Linux: per-thread nice)."""
    nice = int(os.environ.get("ONLINESPEC_WORKER_NICE", "0"))
    if nice and hasattr(os, "setpriority") and sys.platform.startswith("linux"):
        try:
            tid = threading.get_native_id()
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError:
            pass
