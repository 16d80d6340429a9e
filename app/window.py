"""MainWindow: setup panel | controls + token view + live plots; the engine lives in a worker."""
from __future__ import annotations

import time
from pathlib import Path

from PySide6.QtCore import QSettings, Qt, QThread, QTimer, Signal
from PySide6.QtGui import QAction, QKeySequence, QShortcut
from PySide6.QtWidgets import (QFileDialog, QLabel, QMainWindow, QMessageBox, QScrollArea,
                               QSplitter, QTabWidget, QToolBar, QWidget)

from onlinespec_core.errors import OnlineSpecError

from .records import RunLog, UiEvent
from .views.controls import ControlBar, SetupPanel
from .views.plots import PlotsView
from .views.tokens import TokenView
from .worker import EngineWorker

HEARTBEAT_MS = 20  # UI-stall probe: a tick later than this is a stall of the UI thread
TOKENS_MS = 50  # token view flush period
PLOTS_MS = 250  # plot refresh period (half the plots per tick: each updates at 2 Hz)


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
        self.stats_label = QLabel("")
        self.stall_label = QLabel("UI stall max: 0 ms")
        self.statusBar().addWidget(self.status)
        self.statusBar().addPermanentWidget(self.stats_label)
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
        self.thread.start()

        c = self.controls
        c.start.connect(self.start)
        c.pause.connect(self.toggle_pause)
        c.step.connect(self.step)
        c.stop.connect(self.stop)
        c.shift.connect(self.shift_topic)
        c.switch.connect(self.switch_updater)
        for key, fn in ((Qt.Key.Key_Space, self.space), (Qt.Key.Key_S, self.step),
                        (Qt.Key.Key_T, self.shift_topic)):
            QShortcut(QKeySequence(key), self, activated=fn)

        self._beat_last = time.perf_counter()
        self.heartbeat = QTimer(self, interval=HEARTBEAT_MS, timeout=self._beat)
        self.heartbeat.start()
        self.token_timer = QTimer(self, interval=TOKENS_MS, timeout=self.flush_tokens)
        self.token_timer.start()
        self.plot_timer = QTimer(self, interval=PLOTS_MS, timeout=self.refresh_plots)
        self.plot_timer.start()
        self.setup.load_settings(self.settings)
        geo = self.settings.value("window/geometry")
        if geo is not None:
            self.restoreGeometry(geo)
        else:
            self.resize(1280, 800)

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
    def start(self) -> None:
        if self.state != "idle":
            return
        try:
            spec = self.setup.spec()
        except OnlineSpecError as e:
            self.show_error(str(e))
            return
        self.setup.save_settings(self.settings)
        self.max_stall_ms = 0.0
        self._on_state("loading")
        self.worker.start(spec)

    def space(self) -> None:
        self.start() if self.state == "idle" else self.toggle_pause()

    def toggle_pause(self) -> None:
        if self.state == "idle":
            return
        if self.worker.paused:
            self.worker.resume()
        else:
            self.worker.pause()

    def step(self) -> None:
        if self.state == "paused":
            self.worker.step()

    def stop(self) -> None:
        self.worker.stop()

    def shift_topic(self) -> None:
        if self.state in ("running", "paused"):
            self.worker.shift_topic()
            self.statusBar().showMessage("shifting to the next topic\u2026", 3000)

    def switch_updater(self) -> None:
        try:
            name, opts = self.controls.switch_to.value()
            self.worker.set_updater(name, opts)
        except OnlineSpecError as e:
            self.show_error(str(e))
            return
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
    def save_state_dialog(self) -> None:
        d = QFileDialog.getSaveFileName(self, "Save state (a folder)", "runs/state")[0]
        if d:
            self.worker.save_state(d)

    def load_state_dialog(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Load state folder", "runs")
        if d:
            self.load_state(d)

    def load_state(self, path: str) -> None:
        try:
            self.worker.load_state(path, self.setup.spec())
        except OnlineSpecError as e:
            self.show_error(str(e))

    def export_png_dialog(self) -> None:
        p = QFileDialog.getSaveFileName(self, "Export plots", "plots.png", "PNG (*.png)")[0]
        if p:
            self.export_png(p)

    def export_csv_dialog(self) -> None:
        p = QFileDialog.getSaveFileName(self, "Export metrics", "metrics.csv", "CSV (*.csv)")[0]
        if p:
            self.export_metrics(p)

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
        self.log.reset(names)
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
        parts = []
        for i, s in enumerate(self.log.series):
            up = self.log.speedup(s)
            note = " (target replayed)" if self._shared and i > 0 else ""
            parts.append(f"{s.name}: \u03c4 {s.mean_tau:.2f}, {s.tokens} tok, {s.tokens_per_s:.0f} tok/s"
                         + (f", {up:.2f}\u00d7" if up else "") + ("*" if note else ""))
        self.stats_label.setText("   |   ".join(parts))
        self.stats_label.setToolTip("* target replayed (compare mode): tokens/s leaves out most "
                                    "target time" if self._shared else "")

    def _on_message(self, text: str) -> None:
        self.statusBar().showMessage(text, 8000)

    def _on_state(self, state: str) -> None:
        self.state = state
        self.controls.set_state(state)
        self.setup.setEnabled(state == "idle")
        self.status.setText(state)
        if state == "idle":
            self.flush_tokens()
            self.refresh_plots(force=True)

    def _beat(self) -> None:
        now = time.perf_counter()
        late = (now - self._beat_last) * 1000.0 - HEARTBEAT_MS
        self._beat_last = now
        if self.state in ("running", "paused") and late > self.max_stall_ms:
            self.max_stall_ms = late
            self.stall_label.setText(f"UI stall max: {late:.0f} ms")

    # ---- shutdown ----------------------------------------------------------------------
    def shutdown(self, timeout_ms: int = 60_000) -> bool:
        """Stop the run, end the worker thread; True when it ended within the timeout."""
        self.worker.stop()
        self.thread.quit()
        ok = self.thread.wait(timeout_ms)
        for t in (self.heartbeat, self.token_timer, self.plot_timer):
            t.stop()
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
