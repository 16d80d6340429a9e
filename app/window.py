"""MainWindow: setup panel | controls + token view + live plots; the engine lives in a worker."""
from __future__ import annotations

import functools
import logging
import time
import traceback
from pathlib import Path

from PySide6.QtCore import QSettings, Qt, QThread, QTimer, Signal
from PySide6.QtGui import QAction, QKeySequence, QShortcut
from PySide6.QtWidgets import (QApplication, QFileDialog, QLabel, QMainWindow, QMessageBox,
                               QScrollArea, QSplitter, QTabWidget, QToolBar, QWidget)

from onlinespec_core.errors import OnlineSpecError

from .diag import from_env as stall_trace
from .records import RunLog, UiEvent
from .spec import check_updater
from .views.controls import ControlBar, SetupPanel
from .views.plots import PlotsView
from .views.tokens import TokenView
from .worker import EngineWorker

HEARTBEAT_MS = 20  # UI-stall probe: a tick later than this is a stall of the UI thread
TOKENS_MS = 50  # token view flush period
PLOTS_MS = 250  # plot refresh period (half the plots per tick: each updates at 2 Hz)
log = logging.getLogger(__name__)


def guarded(fn):
    """A UI action: any error it raises becomes the dialog (never a traceback on stderr only)."""
    @functools.wraps(fn)
    def wrapper(self, *a, **kw):
        try:
            return fn(self, *a, **kw)
        except OnlineSpecError as e:
            self.show_error(str(e))
        except Exception as e:  # noqa: BLE001 -- the app stays up; the user sees what happened
            log.error("UI action %s failed:\n%s", fn.__name__, traceback.format_exc())
            self.show_error(f"{type(e).__name__}: {e}")
    return wrapper


class MainWindow(QMainWindow):
    rounds_changed = Signal(int)
    error_shown = Signal(str)

    def __init__(self, settings: QSettings | None = None) -> None:
        super().__init__()
        self.setWindowTitle("OnlineSpec Playground")
        self.settings = settings or QSettings("OnlineSpec", "Playground")
        self.log = RunLog()
        self.state = "idle"
        self.rounds_seen = 0
        self.kinds_seen: list[str] = []  # every event kind, in order (tests, screenshot mode)
        self.outputs: dict[tuple[int, int], list[int]] = {}  # (config, prompt) -> emitted ids
        self.max_stall_ms = 0.0
        self.error_box: QMessageBox | None = None
        self.errors: list[str] = []
        self._pending_tokens: dict[int, list] = {}
        self._plots_dirty = False
        self._plot_group = 0
        self._closing = False

        # views
        self.setup = SetupPanel()
        scroll = QScrollArea()
        scroll.setWidget(self.setup)
        scroll.setWidgetResizable(True)
        scroll.setMinimumWidth(300)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.controls = ControlBar()
        bar = QToolBar("Controls", self)
        bar.setObjectName("controls")
        bar.setMovable(False)
        bar.addWidget(self.controls)
        self.addToolBar(bar)
        self.token_tabs = QTabWidget()
        self.token_views: list[TokenView] = []
        self.plots = PlotsView()
        right = QSplitter(Qt.Orientation.Vertical)
        right.addWidget(self.token_tabs)
        right.addWidget(self.plots)
        right.setStretchFactor(0, 2)
        right.setStretchFactor(1, 3)
        right.setSizes([300, 420])
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(scroll)
        split.addWidget(right)
        split.setStretchFactor(1, 1)
        split.setSizes([330, 950])
        self.setCentralWidget(split)
        self._reset_views(["run"])
        self.status = QLabel("idle")
        self.stats_label = self.plots.readout  # above the plots: the status bar keeps room for messages
        self.stall_label = QLabel("UI stall max: 0 ms")
        self.statusBar().addWidget(self.status)
        self.statusBar().addPermanentWidget(self.stall_label)
        self._menus()

        # worker thread
        self.thread = QThread(self)
        self.thread.setObjectName("engine")
        self.worker = EngineWorker()
        self.worker.moveToThread(self.thread)
        self.worker.events.connect(self._on_events)
        self.worker.error.connect(self.show_error)
        self.worker.state.connect(self._on_state)
        self.worker.message.connect(self._on_message)
        self.worker.loaded.connect(self._on_loaded)
        self.thread.start()

        c = self.controls
        c.start.connect(self.start)
        c.pause.connect(self.toggle_pause)
        c.step.connect(self.step)
        c.stop.connect(self.stop)
        c.shift.connect(self.shift_topic)
        c.switch.connect(self.switch_updater)
        for keys, fn in ((("Space", "Shift+Space"), self.space), (("S", "Shift+S"), self.step),
                         (("T", "Shift+T"), self.shift_topic)):
            for key in keys:  # S and Shift+S both step: the README says "S"
                QShortcut(QKeySequence(key), self, activated=fn)

        self._beat_last = time.perf_counter()
        self._stall_trace = stall_trace()  # ONLINESPEC_STALL_TRACE=FILE: stacks of long stalls
        self.heartbeat = QTimer(self, interval=HEARTBEAT_MS, timeout=self._beat)
        self.heartbeat.start()
        self.token_timer = QTimer(self, interval=TOKENS_MS, timeout=self.flush_tokens)
        self.token_timer.start()
        self.plot_timer = QTimer(self, interval=PLOTS_MS, timeout=self.refresh_plots)
        self.plot_timer.start()
        first_launch = self.settings.value("setup/updater") is None
        self.setup.load_settings(self.settings)
        if first_launch:
            self.setup.apply_demo_preset()  # open on a run that shows learning
        self.setup.demo.clicked.connect(self.setup.apply_demo_preset)
        geo = self.settings.value("window/geometry")
        if geo is not None:
            self.restoreGeometry(geo)
        else:
            self.resize(1280, 800)
        self._fitted = False

    def _menus(self) -> None:
        m = self.menuBar().addMenu("&File")
        for text, fn, key in (("Save state\u2026", self.save_state_dialog, "Ctrl+S"),
                              ("Load state\u2026", self.load_state_dialog, "Ctrl+O"),
                              (None, None, None),
                              ("Export plots as PNG\u2026", self.export_png_dialog, "Ctrl+E"),
                              ("Export metrics as CSV\u2026", self.export_csv_dialog, None),
                              ("Export metrics as JSON\u2026", self.export_json_dialog, None),
                              (None, None, None),
                              ("Quit", self.close, "Ctrl+Q")):
            if text is None:
                m.addSeparator()
                continue
            a = QAction(text, self)
            if key:
                a.setShortcut(QKeySequence(key))
            a.triggered.connect(fn)
            m.addAction(a)

    # ---- actions -----------------------------------------------------------------------
    @guarded
    def start(self) -> None:
        if self.state != "idle":
            return
        spec = self.setup.spec()  # malformed options raise: the dialog names them
        for name, opts in ([(c.updater, c.updater_options) for c in spec.compare] if spec.compare
                           else [(spec.updater, spec.updater_options)]):
            check_updater(name, opts)  # before any model loads: a bad option is a dialog at once
        self.setup.save_settings(self.settings)
        if self.worker.loaded_state:
            self.statusBar().showMessage("continuing the loaded state", 6000)
        self.setup.set_loaded(None)
        self.max_stall_ms = 0.0
        self._on_state("loading")
        self.worker.start(spec)

    def space(self) -> None:
        self.start() if self.state == "idle" else self.toggle_pause()

    def toggle_pause(self) -> None:
        if self.state == "idle":
            return
        if self.worker.control.paused:
            self.worker.control.resume()
        else:
            self.worker.control.pause()

    def step(self) -> None:
        if self.state == "paused":
            self.worker.control.step()
        elif self.state == "running":
            self.statusBar().showMessage("Step runs one round while paused: press Space to pause", 3000)

    def stop(self) -> None:
        self.worker.stop()

    def shift_topic(self) -> None:
        if self.state in ("running", "paused"):
            self.worker.control.shift_topic()
            self.statusBar().showMessage("shifting to the next topic\u2026", 3000)

    @guarded
    def switch_updater(self) -> None:
        name, opts = self.controls.switch_to.value()
        check_updater(name, opts)
        self.worker.set_updater(name, opts)
        self.statusBar().showMessage(f"switching to {name} at the next round", 4000)

    def show_error(self, message: str) -> None:
        """Non-modal: the app stays usable and tests can find the box."""
        self.errors.append(message)
        if self.error_box is None:
            self.error_box = QMessageBox(QMessageBox.Icon.Critical, "OnlineSpec", "", parent=self)
            self.error_box.setWindowModality(Qt.WindowModality.NonModal)
        self.error_box.setText(message)
        self.error_box.show()
        self.error_shown.emit(message)

    # ---- files -------------------------------------------------------------------------
    @guarded
    def save_state_dialog(self) -> None:
        if self.worker.engine is None:
            raise OnlineSpecError("nothing to save yet: start a run first")
        d = QFileDialog.getSaveFileName(self, "Save state (a folder)", "runs/state")[0]
        if d:
            self.worker.save_state(d)

    @guarded
    def load_state_dialog(self) -> None:
        if self.state != "idle":  # say it before the user picks a folder
            raise OnlineSpecError("stop the run before loading a saved state (Stop, then File > Load state)")
        d = QFileDialog.getExistingDirectory(self, "Load state folder", "runs")
        if d:
            self.load_state(d)

    @guarded
    def load_state(self, path: str) -> None:
        if self.state != "idle":
            raise OnlineSpecError("stop the run before loading a saved state")
        self.worker.load_state(path, self.setup.spec())

    def _on_loaded(self, info: dict) -> None:
        """A state was loaded: the panel shows what Start will run."""
        self.setup.set_loaded(info)

    @guarded
    def export_png_dialog(self) -> None:
        p = QFileDialog.getSaveFileName(self, "Export plots", "plots.png", "PNG (*.png)")[0]
        if p:
            self.export_png(p)

    @guarded
    def export_csv_dialog(self) -> None:
        p = QFileDialog.getSaveFileName(self, "Export metrics", "metrics.csv", "CSV (*.csv)")[0]
        if p:
            self.export_metrics(p)

    @guarded
    def export_json_dialog(self) -> None:
        p = QFileDialog.getSaveFileName(self, "Export metrics", "metrics.json", "JSON (*.json)")[0]
        if p:
            self.export_metrics(p)

    def export_png(self, path: str) -> Path:
        self.refresh_plots(force=True)
        return self.plots.export_png(path)

    def export_metrics(self, path: str) -> Path:
        self.log.max_stall_ms = self.max_stall_ms
        return self.log.write_json(path) if str(path).endswith(".json") else self.log.write_csv(path)

    # ---- worker events -----------------------------------------------------------------
    def _reset_views(self, names: list[str], shared: bool = False) -> None:
        self._shared = shared
        self.token_tabs.clear()
        self.token_views = []
        for n in names:
            tv = TokenView()
            self.token_views.append(tv)
            self.token_tabs.addTab(tv, f"Tokens \u2014 {n}")
        self.token_tabs.tabBar().setVisible(len(names) > 1)
        self.plots.reset(names, shared)
        self.log.reset(names, shared)
        self.controls.set_running_updater(" | ".join(names) if names != ["run"] else "")
        self._pending_tokens = {i: [] for i in range(len(names))}

    def _on_events(self, evs: list[UiEvent]) -> None:
        for ev in evs:
            self.kinds_seen.append(ev.kind)
            if ev.kind == "run":
                self._reset_views(ev.data["names"], ev.data.get("shared", False))
                self.rounds_seen = 0
                self.outputs = {}
                continue
            self.log.add(ev)
            if ev.kind == "round":
                self.rounds_seen += 1
                key = (ev.cfg, ev.data.get("prompt_index") or 0)
                self.outputs.setdefault(key, []).extend(ev.data["emitted"])
                self._pending_tokens.setdefault(ev.cfg, []).append(("round", ev.data))
                self._plots_dirty = True
            elif ev.kind == "start" and ev.cfg >= 0:
                self._pending_tokens.setdefault(ev.cfg, []).append(("prompt", ev.data))
            elif ev.kind in ("updater", "topic", "baseline", "share"):
                self._plots_dirty = True
                if ev.kind == "updater":
                    self.statusBar().showMessage(
                        f"updater: {ev.data.get('from')} \u2192 {ev.data.get('to')} at round "
                        f"{ev.data.get('round')}", 6000)
                    self.plots.set_labels([s.label for s in self.log.series])
                    self.controls.set_running_updater(" | ".join(s.label for s in self.log.series))
        if evs:
            self.rounds_changed.emit(self.rounds_seen)

    def flush_tokens(self) -> None:
        for i, items in self._pending_tokens.items():
            if items and i < len(self.token_views):
                self.token_views[i].append(items)
                self._pending_tokens[i] = []

    def refresh_plots(self, force: bool = False) -> None:
        if force:
            self._plots_dirty, self._plot_group = False, 0
            self.plots.refresh(self.log)
        elif self._plots_dirty or self._plot_group == 1:
            self._plots_dirty = False
            self.plots.refresh(self.log, self._plot_group)
            self._plot_group = 1 - self._plot_group
        else:
            return
        self.stats_label.setText(self.stats_text())
        tips = ["\u03c4 = tokens per target forward; tokens/s is over the whole run (updates "
                "included). The speedup is the median over prompts of (this run's tokens/s on a prompt "
                "/ target-only tokens/s on the same prompt, measured right after it), as the bench "
                "pairs them; the range is their spread. It is never shown above \u03c4."]
        if self._shared:
            tips.append("Configurations marked 'target replayed' reuse the target's recorded greedy "
                        "pass: their speed is not measured, compare their \u03c4.")
        self.stats_label.setToolTip("\n".join(tips))

    def stats_text(self) -> str:
        """The status-bar readout: whole-run numbers (they do not move while paused)."""
        parts = []
        for s in self.log.series:
            if s.replayed:
                parts.append(f"{s.label}: \u03c4 {s.mean_tau:.2f}, {s.tokens} tok "
                             "(target replayed: speed not measured)")
                continue
            text = f"{s.label}: \u03c4 {s.mean_tau:.2f}, {s.tokens} tok, {s.tokens_per_s:.0f} tok/s"
            info = self.log.speedup_info(s)
            if info:
                cap = " (capped at \u03c4)" if info["capped"] else ""
                n = f", {info['pairs']} prompts" if info["pairs"] else ", first prompt"
                text += f", {info['value']:.2f}\u00d7 [{info['lo']:.2f}\u2013{info['hi']:.2f}{n}]{cap}"
            parts.append(text)
        b = self.log.baseline_spread
        if b and self.log.baseline_tok_s:
            parts.append(f"target-only {self.log.baseline_tok_s:.0f} tok/s (median of "
                         f"{len(self.log.baseline_samples)}, {b[0]:.0f}\u2013{b[1]:.0f})")
        return "   |   ".join(parts)

    def _on_message(self, text: str) -> None:
        self.statusBar().showMessage(text, 8000)

    def _on_state(self, state: str) -> None:
        self.state = state
        self.controls.set_state(state)
        self.setup.setEnabled(state == "idle")
        text = state
        if state == "idle" and self.rounds_seen:
            n = len({p for _, p in self.outputs})
            tok = sum(s.tokens for s in self.log.series[:1])
            text = (f"stream finished: {n} prompts, {tok} tokens \u2014 Start runs it again"
                    if self.log.finished == "done" else
                    f"stopped after {tok} tokens \u2014 Start runs the stream again")
        elif state == "paused":
            text = "paused \u2014 S: one round, Space: resume"
        self.status.setText(text)
        if state == "idle":
            self.flush_tokens()
            self.refresh_plots(force=True)

    def _beat(self) -> None:
        if self._stall_trace is not None:
            self._stall_trace.beat()
        now = time.perf_counter()
        late = (now - self._beat_last) * 1000.0 - HEARTBEAT_MS
        self._beat_last = now
        if self.state in ("running", "paused") and late > self.max_stall_ms:
            self.max_stall_ms = late
            self.stall_label.setText(f"UI stall max: {late:.0f} ms")

    def showEvent(self, ev) -> None:  # noqa: N802 (Qt API)
        super().showEvent(ev)
        if not self._fitted:
            self._fitted = True
            self.fit_to_screen()

    def fit_to_screen(self) -> None:
        """Window plus title bar inside the screen's available area (1280x800 laptops)."""
        scr = self.screen() or QApplication.primaryScreen()
        if scr is None or QApplication.platformName() == "offscreen":
            return  # headless (screenshot mode, tests): the requested size is the picture's
        avail = scr.availableGeometry()
        frame_h = max(self.frameGeometry().height() - self.height(), 30)
        frame_w = max(self.frameGeometry().width() - self.width(), 2)
        w = min(self.width(), avail.width() - frame_w)
        h = min(self.height(), avail.height() - frame_h)
        if (w, h) != (self.width(), self.height()):
            self.resize(max(w, 640), max(h, 480))
        fg = self.frameGeometry()
        if not avail.contains(fg):
            self.move(max(avail.left(), min(fg.left(), avail.right() - fg.width())),
                      max(avail.top(), min(fg.top(), avail.bottom() - fg.height())))

    # ---- shutdown ----------------------------------------------------------------------
    def shutdown(self, timeout_ms: int = 60_000) -> bool:
        """Stop the run, end the worker thread; True when it ended within the timeout."""
        self.worker.stop()
        self.thread.quit()
        ok = self.thread.wait(timeout_ms)
        for t in (self.heartbeat, self.token_timer, self.plot_timer):
            t.stop()
        if self._stall_trace is not None:
            self._stall_trace.stop()
        return ok

    def closeEvent(self, ev) -> None:  # noqa: N802 (Qt API)
        if not self._closing:
            self._closing = True
            try:
                self.setup.save_settings(self.settings)
                self.settings.setValue("window/geometry", self.saveGeometry())
                self.settings.sync()
            except Exception:
                pass
            self.shutdown()
        super().closeEvent(ev)
