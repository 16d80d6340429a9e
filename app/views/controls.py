"""Run setup panel (pair, updater, k, sampling, seed, stream, compare) and the control bar."""
from __future__ import annotations

from typing import Any

from PySide6.QtCore import QCoreApplication, QEvent, QObject, QSettings, Qt, Signal
from PySide6.QtWidgets import (QAbstractScrollArea, QAbstractSpinBox, QCheckBox, QComboBox,
                               QDoubleSpinBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout,
                               QLabel, QLineEdit, QPlainTextEdit, QPushButton, QSpinBox, QStyle,
                               QVBoxLayout, QWidget)

from onlinespec_core.compare import CompareConfig
from onlinespec_core.models import DRAFT_LOADERS
from onlinespec_core.streams import bundled_streams
from onlinespec_core.updaters import available_updaters

from ..spec import PairSpec, RunSpec, StreamSpec, default_stream, format_options, parse_options, updater_fields

MAIN_OPTIONS = ("lr", "lrs", "hedge", "cadence", "every", "form", "loss", "beta")
# Online-LR with the fast bigram logit table vs frozen: the combination that learned most on the
# long shift stream (README, issue 12: tau 1.46x frozen; the table alone 1.34x at 3.7% update time)
DEMO = {"updater": "dpo", "updater_options": {"bigram_lr": 4.0, "cache_decay": 0.005},
        "compare_b": "frozen", "stream": "shift", "k": 4, "max_new": 64}


class WheelGuard(QObject):
    """The mouse wheel over an unfocused combo or spin box scrolls the panel instead of changing
    the value (a teacher scrolling the setup panel must not turn Config B into dpo)."""

    def eventFilter(self, obj: QObject, ev: QEvent) -> bool:  # noqa: N802 (Qt API)
        if ev.type() == QEvent.Type.Wheel and isinstance(obj, (QComboBox, QAbstractSpinBox)) \
                and not obj.hasFocus():
            p = obj.parentWidget()
            while p is not None and not isinstance(p, QAbstractScrollArea):
                p = p.parentWidget()
            if p is not None:
                QCoreApplication.sendEvent(p.verticalScrollBar(), ev)
            return True
        return False


def install_wheel_guard(root: QWidget) -> WheelGuard:
    guard = WheelGuard(root)
    for w in root.findChildren(QWidget):
        if isinstance(w, (QComboBox, QAbstractSpinBox)):
            w.setFocusPolicy(Qt.FocusPolicy.StrongFocus)  # the wheel never gives them focus
            w.installEventFilter(guard)
    return guard


def options_hint(name: str) -> str:
    fields = updater_fields(name)
    main = {k: v for k, v in fields.items() if k in MAIN_OPTIONS}
    return format_options(main) if main else ""


def options_tooltip(name: str) -> str:
    fields = updater_fields(name)
    if not fields:
        return f"'{name}' takes no options"
    return "Options of '%s' (key=value, comma separated; empty = defaults):\n%s" % (
        name, "\n".join(f"  {k} = {v!r}" for k, v in fields.items()))


class UpdaterPicker(QWidget):
    """An updater name plus its options (key=value, defaults shown as the placeholder)."""

    def __init__(self, parent: QWidget | None = None, allow_none: bool = False,
                 vertical: bool = False) -> None:
        super().__init__(parent)
        self.name = QComboBox(self)
        if allow_none:
            self.name.addItem("(none)")
        self.name.addItems(available_updaters())
        self.options = QLineEdit(self)
        lay = QVBoxLayout(self) if vertical else QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(2)
        lay.addWidget(self.name)
        lay.addWidget(self.options, 1)
        self.name.currentTextChanged.connect(self._hint)
        self._hint(self.name.currentText())

    def _hint(self, name: str) -> None:
        # options typed for another updater do not carry over (frozen takes none; ogd has no beta)
        self.options.clear()
        self.options.setPlaceholderText(options_hint(name) or "no options")
        self.options.setToolTip(options_tooltip(name))

    def value(self) -> tuple[str, dict[str, Any]]:
        return self.name.currentText(), parse_options(self.options.text())


class SetupPanel(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        v = QVBoxLayout(self)
        v.setContentsMargins(4, 4, 4, 4)
        self.demo = QPushButton("Demo preset: dpo + logit cache learns vs frozen", self)
        self.demo.setObjectName("demo_preset")
        self.demo.setToolTip("The embedded demo pair on the topic-shift stream: config A is the "
                             "ensemble updater (its draft learns online), config B the frozen draft "
                             "on the same prompts, so the gap in \u03c4 is what learning buys. "
                             "Press Start (Space) after choosing it.")
        v.addWidget(self.demo)
        self.loaded_note = QLabel("", self)  # at the top: what the next Start continues
        self.loaded_note.setObjectName("loaded_note")
        self.loaded_note.setWordWrap(True)
        self.loaded_note.setStyleSheet("color: #00365A; background: #E8F1FA; padding: 3px;")
        self.loaded_note.hide()
        v.addWidget(self.loaded_note)

        # model pair
        g = QGroupBox("Model pair", self)
        f = QFormLayout(g)
        self.pair_source = QComboBox(g)
        self.pair_source.addItem("Demo pair (embedded)", "demo")
        self.pair_source.addItem("Local directories", "dirs")
        self.pair_source.addItem("Hub ids", "hub")
        self.target = QLineEdit(g)
        self.target.setPlaceholderText("target dir or hub id")
        self.draft = QLineEdit(g)
        self.draft.setPlaceholderText("draft dir or hub id")
        self.target_browse = QPushButton("\u2026", g)
        self.draft_browse = QPushButton("\u2026", g)
        for b, e in ((self.target_browse, self.target), (self.draft_browse, self.draft)):
            b.setFixedWidth(28)
            b.clicked.connect(lambda _=False, e=e: self._pick_dir(e))
        self.draft_kind = QComboBox(g)
        self.draft_kind.addItems(list(DRAFT_LOADERS))
        self.device = QComboBox(g)
        self.device.addItems(_devices())
        f.addRow("Pair", self.pair_source)
        f.addRow("Target", _row(self.target, self.target_browse))
        f.addRow("Draft", _row(self.draft, self.draft_browse))
        f.addRow("Draft kind", self.draft_kind)
        f.addRow("Device", self.device)
        self.fast = QCheckBox("Fast decode path", g)
        self.fast.setChecked(True)
        self.fast.setToolTip("CPU: packed weights, a free-crop KV cache and a lean forward "
                             "(same greedy output). Untick to run the plain Hugging Face forward "
                             "and compare speeds. Not used on CUDA.")
        f.addRow("", self.fast)
        self.pair_source.currentIndexChanged.connect(self._sync)
        v.addWidget(g)

        # decoding + updater
        g = QGroupBox("Decoding and learning", self)
        f = QFormLayout(g)
        self.updater = UpdaterPicker(g, vertical=True)
        self.k = QSpinBox(g)
        self.k.setRange(0, 32)
        self.k.setValue(4)
        self.dynamic_k = QCheckBox("dynamic", g)
        self.temperature = _dspin(g, 0.0, 5.0, 0.0, 0.1)
        self.top_k = QSpinBox(g)
        self.top_k.setRange(0, 100000)
        self.top_p = _dspin(g, 0.01, 1.0, 1.0, 0.05)
        self.seed = QSpinBox(g)
        self.seed.setRange(0, 2**31 - 1)
        self.max_new = QSpinBox(g)
        self.max_new.setRange(1, 1_000_000)
        self.max_new.setValue(64)
        f.addRow("Updater", self.updater)
        f.addRow("k (draft length)", _row(self.k, self.dynamic_k))
        f.addRow("Temperature", self.temperature)
        f.addRow("Top-k / top-p", _row(self.top_k, self.top_p))
        f.addRow("Seed", self.seed)
        f.addRow("Tokens / prompt", self.max_new)
        v.addWidget(g)

        # stream
        g = QGroupBox("Prompt stream", self)
        f = QFormLayout(g)
        self.stream_kind = QComboBox(g)
        for name in bundled_streams():
            self.stream_kind.addItem(f"bundled: {name}", ("bundled", name))
        if self.stream_kind.count() == 0:
            self.stream_kind.addItem("bundled: built-in prompts", ("bundled", ""))
        self.stream_kind.addItem("JSONL file\u2026", ("file", ""))
        self.stream_kind.addItem("Free text (one prompt per line)", ("text", ""))
        self.stream_file = QLineEdit(g)
        self.stream_file.setPlaceholderText('{"topic": ..., "prompt": ...} per line')
        self.stream_browse = QPushButton("\u2026", g)
        self.stream_browse.setFixedWidth(28)
        self.stream_browse.clicked.connect(self._pick_file)
        self.stream_text = QPlainTextEdit(g)
        self.stream_text.setPlaceholderText("def fib(n):\nSELECT * FROM")
        self.stream_text.setFixedHeight(56)
        f.addRow("Stream", self.stream_kind)
        f.addRow("File", _row(self.stream_file, self.stream_browse))
        f.addRow("Prompts", self.stream_text)
        self.stream_kind.currentIndexChanged.connect(self._sync)
        v.addWidget(g)

        # compare
        g = QGroupBox("Compare (same prompts, curves overlaid)", self)
        f = QFormLayout(g)
        self.compare_b = UpdaterPicker(g, allow_none=True, vertical=True)
        self.compare_c = UpdaterPicker(g, allow_none=True, vertical=True)
        self.share = QCheckBox("share the target's greedy pass", g)
        self.dynamic_k.setToolTip("HF heuristic: k += 2 after a fully accepted round, k -= 1 otherwise")
        self.share.setChecked(True)
        self.share.setToolTip("Greedy output is identical across configurations: the target's logits "
                              "are recorded once and replayed; a real forward runs only where a "
                              "learning draft needs rows off the greedy path. Tokens/s of the replaying "
                              "configurations then excludes most target time.")
        f.addRow("Config B", self.compare_b)
        f.addRow("Config C", self.compare_c)
        f.addRow(self.share)
        v.addWidget(g)

        g = QGroupBox("Run", self)
        f = QFormLayout(g)
        self.baseline = QCheckBox("measure target-only baseline first", g)
        self.baseline.setChecked(True)
        self.baseline.setToolTip("Target-only decoding of the stream's prompts, interleaved with the "
                                 "run: prompt 0 before it, then each prompt just run (the first four, "
                                 "then every third). The speedup is the median over those prompts of "
                                 "run / target-only tokens/s on the same prompt, as the bench pairs them")
        self.reset_draft = QCheckBox("start from the initial draft weights", g)
        self.reset_draft.setChecked(True)
        self.loaded: dict | None = None
        f.addRow(self.baseline)
        f.addRow(self.reset_draft)
        v.addWidget(g)
        v.addStretch(1)
        default = default_stream()
        for i in range(self.stream_kind.count()):
            if self.stream_kind.itemData(i) == ("bundled", default):
                self.stream_kind.setCurrentIndex(i)
        self._sync()
        self._wheel_guard = install_wheel_guard(self)

    def apply_demo_preset(self) -> None:
        """The embedded demo pair, topic-shift stream, dpo + logit cache (learning) vs frozen, greedy."""
        self.pair_source.setCurrentIndex(self.pair_source.findData("demo"))
        self.draft_kind.setCurrentText("lm")
        for i in range(self.stream_kind.count()):
            if self.stream_kind.itemData(i) == ("bundled", DEMO["stream"]):
                self.stream_kind.setCurrentIndex(i)
        self.updater.name.setCurrentText(DEMO["updater"])
        self.updater.options.setText(format_options(DEMO["updater_options"]))
        self.compare_b.name.setCurrentText(DEMO["compare_b"])
        self.compare_b.options.clear()
        self.compare_c.name.setCurrentText("(none)")
        self.k.setValue(DEMO["k"])
        self.dynamic_k.setChecked(False)
        self.temperature.setValue(0.0)
        self.top_k.setValue(0)
        self.top_p.setValue(1.0)
        self.seed.setValue(0)
        self.max_new.setValue(DEMO["max_new"])
        self.share.setChecked(True)
        self.baseline.setChecked(True)
        self.reset_draft.setChecked(True)
        self._sync()

    def set_loaded(self, info: dict | None) -> None:
        """Show which state and stream position the next Start uses (None: no loaded state)."""
        self.loaded = info
        self.reset_draft.setEnabled(info is None)
        if info is None:
            self.loaded_note.hide()
            return
        if info.get("updater"):
            self.updater.name.setCurrentText(info["updater"])
            self.updater.options.setText(format_options(info.get("options") or {}))
        self.compare_b.name.setCurrentText("(none)")  # a loaded state continues as a single run
        self.compare_c.name.setCurrentText("(none)")
        self.loaded_note.setText(
            f"<b>Loaded state</b> {info.get('path', '')}<br>Start continues its draft and updater "
            f"(<b>{info.get('updater', '?')}</b>, {info.get('round', 0)} rounds learnt) on the stream "
            "from prompt 0; the initial draft weights are not used. Change the model pair to drop it.")
        self.loaded_note.show()

    def _sync(self) -> None:
        custom = self.pair_source.currentData() != "demo"
        for w in (self.target, self.draft, self.target_browse, self.draft_browse):
            w.setEnabled(custom)
        kind = (self.stream_kind.currentData() or ("bundled", ""))[0]
        self.stream_file.setEnabled(kind == "file")
        self.stream_browse.setEnabled(kind == "file")
        self.stream_text.setEnabled(kind == "text")

    def _pick_dir(self, edit: QLineEdit) -> None:
        d = QFileDialog.getExistingDirectory(self, "Model directory", edit.text())
        if d:
            edit.setText(d)

    def _pick_file(self) -> None:
        p, _ = QFileDialog.getOpenFileName(self, "Prompt stream", self.stream_file.text(), "JSONL (*.jsonl);;All (*)")
        if p:
            self.stream_file.setText(p)

    # ---- spec --------------------------------------------------------------------------
    def pair_spec(self) -> PairSpec:
        return PairSpec(self.pair_source.currentData(), self.target.text(), self.draft.text(),
                        self.draft_kind.currentText(), self.device.currentText(),
                        fast=self.fast.isChecked())

    def stream_spec(self) -> StreamSpec:
        kind, name = self.stream_kind.currentData() or ("bundled", "")
        value = {"bundled": name, "file": self.stream_file.text(),
                 "text": self.stream_text.toPlainText()}[kind]
        return StreamSpec(kind, value)

    def spec(self) -> RunSpec:
        """The run described by the panel (raises OnlineSpecError on malformed options)."""
        name, opts = self.updater.value()
        compare = []
        extra = [p.value() for p in (self.compare_b, self.compare_c) if p.name.currentText() != "(none)"]
        if extra:
            k, dyn = self.k.value(), self.dynamic_k.isChecked()
            for i, (n, o) in enumerate([(name, opts)] + extra):
                compare.append(CompareConfig(f"{'ABC'[i]}: {n}", n, o, k, dyn))
        return RunSpec(pair=self.pair_spec(), stream=self.stream_spec(), updater=name, updater_options=opts,
                       k=self.k.value(), dynamic_k=self.dynamic_k.isChecked(),
                       temperature=self.temperature.value(), top_k=self.top_k.value(),
                       top_p=self.top_p.value(), seed=self.seed.value(), max_new_tokens=self.max_new.value(),
                       compare=compare, share_target=self.share.isChecked(),
                       baseline=self.baseline.isChecked(), reset_draft=self.reset_draft.isChecked())

    # ---- QSettings ---------------------------------------------------------------------
    def _widgets(self) -> dict[str, QWidget]:
        return {"pair_source": self.pair_source, "target": self.target, "draft": self.draft,
                "draft_kind": self.draft_kind, "device": self.device, "fast": self.fast,
                "updater": self.updater.name, "updater_options": self.updater.options,
                "k": self.k, "dynamic_k": self.dynamic_k, "temperature": self.temperature,
                "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed, "max_new": self.max_new,
                "stream_kind": self.stream_kind, "stream_file": self.stream_file,
                "stream_text": self.stream_text, "compare_b": self.compare_b.name,
                "compare_b_options": self.compare_b.options, "compare_c": self.compare_c.name,
                "compare_c_options": self.compare_c.options, "share": self.share,
                "baseline": self.baseline, "reset_draft": self.reset_draft}

    def save_settings(self, s: QSettings) -> None:
        s.beginGroup("setup")
        for key, w in self._widgets().items():
            if isinstance(w, QComboBox):
                s.setValue(key, w.currentText())
            elif isinstance(w, QLineEdit):
                s.setValue(key, w.text())
            elif isinstance(w, QPlainTextEdit):
                s.setValue(key, w.toPlainText())
            elif isinstance(w, QCheckBox):
                s.setValue(key, int(w.isChecked()))
            elif isinstance(w, (QSpinBox, QDoubleSpinBox)):
                s.setValue(key, w.value())
        s.endGroup()

    def load_settings(self, s: QSettings) -> None:
        s.beginGroup("setup")
        for key, w in self._widgets().items():
            val = s.value(key)
            if val is None:
                continue
            try:
                if isinstance(w, QComboBox):
                    i = w.findText(str(val))
                    if i >= 0:
                        w.setCurrentIndex(i)
                elif isinstance(w, QLineEdit):
                    w.setText(str(val))
                elif isinstance(w, QPlainTextEdit):
                    w.setPlainText(str(val))
                elif isinstance(w, QCheckBox):
                    w.setChecked(bool(int(val)))
                elif isinstance(w, QSpinBox):
                    w.setValue(int(float(val)))
                elif isinstance(w, QDoubleSpinBox):
                    w.setValue(float(val))
            except (TypeError, ValueError):
                pass  # a stale or hand-edited setting: keep the default
        s.endGroup()
        self._sync()


class ControlBar(QWidget):
    """Start / Pause-Resume / Step / Stop / Shift topic, and the live updater switch."""
    start = Signal()
    pause = Signal()
    step = Signal()
    stop = Signal()
    shift = Signal()
    switch = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(4, 2, 4, 2)
        st = self.style()
        self.b_start = QPushButton(st.standardIcon(QStyle.StandardPixmap.SP_MediaPlay), "Start", self)
        self.b_pause = QPushButton(st.standardIcon(QStyle.StandardPixmap.SP_MediaPause), "Pause", self)
        self.b_step = QPushButton(st.standardIcon(QStyle.StandardPixmap.SP_MediaSkipForward), "Step", self)
        self.b_stop = QPushButton(st.standardIcon(QStyle.StandardPixmap.SP_MediaStop), "Stop", self)
        self.b_shift = QPushButton(st.standardIcon(QStyle.StandardPixmap.SP_ArrowRight), "Shift topic", self)
        self.b_start.setToolTip("Start a run (Space)")
        self.b_pause.setToolTip("Pause / resume between rounds (Space)")
        self.b_step.setToolTip("While paused: one more round (S)")
        self.b_shift.setToolTip("Jump the stream to its next topic (T)")
        for b, sig in ((self.b_start, self.start), (self.b_pause, self.pause), (self.b_step, self.step),
                       (self.b_stop, self.stop), (self.b_shift, self.shift)):
            b.clicked.connect(sig.emit)
            lay.addWidget(b)
        lay.addSpacing(16)
        self.running_updater = QLabel("", self)
        self.running_updater.setObjectName("running_updater")
        self.running_updater.setToolTip("The updater(s) in use now (a live switch renames them)")
        lay.addWidget(self.running_updater)
        lay.addSpacing(8)
        lay.addWidget(QLabel("Switch to:", self))
        self.switch_to = UpdaterPicker(self)
        self.switch_to.options.setMinimumWidth(160)
        self.b_switch = QPushButton("Apply at next round", self)
        self.b_switch.clicked.connect(self.switch.emit)
        lay.addWidget(self.switch_to, 1)
        lay.addWidget(self.b_switch)
        self._wheel_guard = install_wheel_guard(self)
        self.set_state("idle")

    def set_running_updater(self, text: str) -> None:
        self.running_updater.setText(f"<b>updater:</b> {text}" if text else "")

    def set_state(self, state: str) -> None:
        running = state in ("loading", "running", "paused")
        self.b_start.setEnabled(not running)
        self.b_pause.setEnabled(state in ("running", "paused"))
        st = self.style()
        self.b_pause.setText("Resume" if state == "paused" else "Pause")
        self.b_pause.setIcon(st.standardIcon(QStyle.StandardPixmap.SP_MediaPlay if state == "paused"
                                             else QStyle.StandardPixmap.SP_MediaPause))
        self.b_step.setEnabled(state == "paused")
        self.b_stop.setEnabled(running)
        self.b_shift.setEnabled(state in ("running", "paused"))
        self.b_switch.setEnabled(state in ("running", "paused"))


def _row(*widgets: QWidget) -> QWidget:
    w = QWidget()
    lay = QHBoxLayout(w)
    lay.setContentsMargins(0, 0, 0, 0)
    for x in widgets:
        lay.addWidget(x, 1 if isinstance(x, (QLineEdit, QComboBox)) else 0)
    return w


def _dspin(parent: QWidget, lo: float, hi: float, val: float, step: float) -> QDoubleSpinBox:
    s = QDoubleSpinBox(parent)
    s.setRange(lo, hi)
    s.setSingleStep(step)
    s.setDecimals(2)
    s.setValue(val)
    return s


def _devices() -> list[str]:
    out = ["cpu"]
    try:
        import torch
        if torch.cuda.is_available():
            out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            out.append("mps")
    except Exception:
        pass
    return out
