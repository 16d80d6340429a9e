"""The playground survives a demo and tells the truth about speed (real engine, tiny pair,
offscreen): errors reach the dialog, the baseline is a median of interleaved samples, replayed
compare configurations show no speed, a live switch renames what the user reads, the demo
preset, the wheel guard, load-state, end-of-stream, Shift+S, the tooltip, a still readout."""
from __future__ import annotations

import json

import pytest
from PySide6.QtCore import QPoint, QPointF, QSettings, Qt
from PySide6.QtGui import QWheelEvent
from PySide6.QtWidgets import QApplication, QToolTip

from app.records import UiEvent
from app.views.tokens import TokenView
from app.window import MainWindow
from tests.test_app import WAIT, configure, run_ogd_and_save, run_to_end, stream_file, win  # noqa: F401 (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def wait_rounds(qtbot, w, n):
    qtbot.waitUntil(lambda: w.rounds_seen >= n or w.state == "idle" or bool(w.errors), timeout=WAIT)
    assert not w.errors, w.errors
    assert w.rounds_seen >= n, "the run ended too early for this test"


# ---- errors ----------------------------------------------------------------------------------
def test_bad_option_in_live_switch_shows_dialog_and_run_goes_on(qtbot, win):
    win.setup.updater.name.setCurrentText("ogd")
    win.setup.max_new.setValue(300)
    win.start()
    wait_rounds(qtbot, win, 3)
    win.toggle_pause()
    qtbot.waitUntil(lambda: win.state == "paused", timeout=WAIT)
    win.controls.switch_to.name.setCurrentText("ogd")
    win.controls.switch_to.options.setText("lr=oops")
    with qtbot.waitSignal(win.error_shown, timeout=WAIT) as blocker:
        win.controls.b_switch.click()
    assert "lr must be a finite number, got 'oops'" in blocker.args[0]
    assert win.error_box.isVisible() and "lr" in win.error_box.text()
    win.controls.switch_to.options.setText("nosuch=1")
    win.switch_updater()
    assert "nosuch" in win.errors[-1]
    n = win.rounds_seen
    win.toggle_pause()
    qtbot.waitUntil(lambda: win.rounds_seen > n, timeout=WAIT)  # the app and the run go on
    win.stop()
    qtbot.waitUntil(lambda: win.state == "idle", timeout=WAIT)
    assert win.log.switches == [] and len(win.errors) == 2


def test_bad_option_at_start_names_it_before_any_model_loads(qtbot, win):
    win.setup.updater.name.setCurrentText("ogd")
    win.setup.updater.options.setText("lr=fast")
    win.start()
    assert win.errors and "lr must be a finite number, got 'fast'" in win.errors[-1]
    assert win.state == "idle" and "run" not in win.kinds_seen and win.error_box.isVisible()
    win.setup.updater.options.setText("")
    win.setup.compare_b.name.setCurrentText("ensemble")  # a compare config's options too
    win.setup.compare_b.options.setText("every=1.5")
    win.start()
    assert "every must be an integer, got 1.5" in win.errors[-1] and win.state == "idle"
    win.setup.compare_b.name.setCurrentText("(none)")
    run_to_end(qtbot, win)  # still usable
    assert win.log.finished == "done"


# ---- speed -----------------------------------------------------------------------------------
def test_baseline_is_a_median_of_interleaved_samples_and_speedup_is_capped(qtbot, win):
    win.setup.baseline.setChecked(True)
    run_to_end(qtbot, win)  # 5 prompts: samples before prompt 0, after prompts 0, 1 and 3
    log = win.log
    assert len(log.baseline_samples) == 4, log.baseline_samples
    v = sorted(log.baseline_samples)
    assert log.baseline_tok_s == pytest.approx((v[1] + v[2]) / 2)
    assert log.baseline_spread == (v[0], v[-1])
    s = log.series[0]
    info = log.speedup_info(s)
    assert info and info["value"] <= s.mean_tau + 1e-9 and info["lo"] <= info["value"] <= info["hi"]
    ratios = log.prompt_ratios(s)  # paired per prompt: prompts 0, 1, 2, 3 have a sample
    assert len(ratios) == 4 and info["pairs"] == 4
    v = sorted(ratios)
    assert info["value"] == pytest.approx(min((v[1] + v[2]) / 2, s.mean_tau))
    assert sorted(log.baseline_by_prompt) == [0, 1, 2, 3]
    text = win.stats_text()
    assert "median of 4" in text and "\u00d7 [" in text and "4 prompts]" in text
    assert "median of 4" in win.plots.legend.text()
    assert win.plots._baseline_line is not None and getattr(win.plots._baseline_line, "label", None) is None  # off the curve


def test_speedup_never_exceeds_tau():
    from app.records import RunLog
    log = RunLog()
    log.reset(["frozen"])
    for i in range(4):  # tau 1: a frozen draft whose tokens are all rejected
        log.add(UiEvent("round", 0, {"round": i, "k": 4, "accepted": 0, "kind": "correction",
                                     "emitted": [1], "wall_s": 0.01}))
    log.add(UiEvent("baseline", -1, {"tokens_per_s": 50.0, "samples": [40.0, 50.0, 60.0]}))
    info = log.speedup_info(log.series[0])  # raw 100 / 50 = 2x: a baseline measured too slow
    assert info["raw"] == pytest.approx(2.0) and info["value"] == pytest.approx(1.0) and info["capped"]


def test_compare_replayed_configs_show_tau_only(qtbot, win):
    win.setup.compare_b.name.setCurrentText("frozen")
    win.setup.baseline.setChecked(True)
    run_to_end(qtbot, win)
    log = win.log
    assert log.series[1].replayed and not log.series[0].replayed
    assert log.speedup(log.series[1]) is None and log.speedup(log.series[0]) is not None
    assert win.plots.c_speed[1] is None and win.plots.c_up[1] is None  # no fake 8x curve
    assert "target replayed: speed not measured" in win.stats_text()
    assert "\u03c4 only" in win.plots.legend.text()
    summary = log.summary()
    assert summary["B: frozen"]["tokens_per_s"] is None and summary["B: frozen"]["target_replayed"]


# ---- a live switch renames what the user reads -------------------------------------------------
def test_live_switch_renames_legend_status_and_export(qtbot, win, tmp_path):
    win.setup.max_new.setValue(200)
    win.start()
    wait_rounds(qtbot, win, 3)
    assert "frozen" in win.controls.running_updater.text()
    win.controls.switch_to.name.setCurrentText("ogd")
    win.controls.switch_to.options.setText("every=1, batch=1")
    win.switch_updater()
    qtbot.waitUntil(lambda: bool(win.log.switches), timeout=WAIT)
    win.refresh_plots(force=True)
    assert "frozen \u2192 ogd" in win.plots.legend.text()
    assert "frozen \u2192 ogd" in win.stats_text()
    assert "ogd" in win.controls.running_updater.text()
    win.stop()
    qtbot.waitUntil(lambda: win.state == "idle", timeout=WAIT)
    obj = json.loads(win.export_metrics(str(tmp_path / "m.json")).read_text())
    assert obj["updaters"] == ["ogd"] and obj["config_labels"] == ["frozen \u2192 ogd"]
    assert obj["summary"]["frozen"]["updater"] == "ogd"


# ---- first launch, wheel, load state, end of stream, keys -------------------------------------
def test_first_launch_opens_on_the_demo_preset(qtbot, tmp_path):
    w = MainWindow(QSettings(str(tmp_path / "fresh.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(w)
    s = w.setup
    assert s.demo.text().startswith("Demo preset")
    assert s.pair_source.currentData() == "demo" and s.updater.name.currentText() == "dpo"
    assert s.updater.value() == ("dpo", {"bigram_lr": 4.0, "cache_decay": 0.005})
    assert s.compare_b.name.currentText() == "frozen" and s.stream_kind.currentData() == ("bundled", "shift")
    s.updater.name.setCurrentText("ogd")
    s.updater.options.clear()
    s.compare_b.name.setCurrentText("(none)")
    s.demo.click()
    assert s.updater.name.currentText() == "dpo" and s.compare_b.name.currentText() == "frozen"
    assert s.updater.value() == ("dpo", {"bigram_lr": 4.0, "cache_decay": 0.005})
    w.close()


def test_wheel_over_unfocused_fields_scrolls_instead_of_changing_them(qtbot, tmp_path):
    w = MainWindow(QSettings(str(tmp_path / "w.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(w)
    w.resize(1280, 600)
    w.show()
    qtbot.waitExposed(w)
    combo, spin = w.setup.compare_b.name, w.setup.k
    before = (combo.currentIndex(), spin.value())
    for target in (combo, spin):
        ev = QWheelEvent(QPointF(5, 5), QPointF(target.mapToGlobal(QPoint(5, 5))), QPoint(0, 0),
                         QPoint(0, -120), Qt.MouseButton.NoButton, Qt.KeyboardModifier.NoModifier,
                         Qt.ScrollPhase.NoScrollPhase, False)
        QApplication.sendEvent(target, ev)
    assert (combo.currentIndex(), spin.value()) == before
    assert combo.focusPolicy() == Qt.FocusPolicy.StrongFocus
    w.close()


def test_load_state_says_what_start_continues(qtbot, win, tmp_path):
    path = tmp_path / "state"
    run_ogd_and_save(qtbot, win, path)
    win.setup.updater.name.setCurrentText("frozen")  # the panel disagrees with the saved state
    win.setup.updater.options.setText("")
    win.setup.max_new.setValue(300)
    win.start()
    wait_rounds(qtbot, win, 2)
    win.load_state_dialog()  # while running: said before any folder is picked
    assert "stop the run" in win.errors[-1]
    win.stop()
    qtbot.waitUntil(lambda: win.state == "idle", timeout=WAIT)
    with qtbot.waitSignal(win.worker.loaded, timeout=WAIT):
        win.load_state(str(path))
    note = win.setup.loaded_note
    qtbot.waitUntil(lambda: not note.isHidden(), timeout=WAIT)  # the window's slot runs after the signal
    assert not note.isHidden() and "ogd" in note.text() and "prompt 0" in note.text()
    assert win.setup.updater.name.currentText() == "ogd" and not win.setup.reset_draft.isEnabled()
    win.setup.max_new.setValue(16)
    run_to_end(qtbot, win)
    assert note.isHidden() and win.setup.reset_draft.isEnabled()
    assert win.log.series[0].updater == "ogd"


def test_end_of_stream_stop_shift_s_and_still_readout(qtbot, win):
    run_to_end(qtbot, win)
    assert win.status.text().startswith("stream finished: 5 prompts")
    win.setup.max_new.setValue(300)
    win.setup.baseline.setChecked(True)
    win.start()
    wait_rounds(qtbot, win, 3)
    win.toggle_pause()
    qtbot.waitUntil(lambda: win.state == "paused", timeout=WAIT)
    qtbot.wait(300)
    win.refresh_plots(force=True)
    readout = win.stats_text()
    n = win.rounds_seen
    qtbot.keyClick(win, Qt.Key.Key_S, Qt.KeyboardModifier.ShiftModifier)  # Shift+S steps too
    qtbot.waitUntil(lambda: win.rounds_seen == n + 1, timeout=WAIT)
    qtbot.keyClick(win, Qt.Key.Key_S)
    qtbot.waitUntil(lambda: win.rounds_seen == n + 2, timeout=WAIT)
    qtbot.wait(400)
    assert win.rounds_seen == n + 2 and win.state == "paused"
    win.refresh_plots(force=True)
    after = win.stats_text()
    qtbot.wait(600)  # paused: nothing may move
    win.refresh_plots(force=True)
    assert win.stats_text() == after and readout.split("|")[0] != "" and "paused" in win.status.text()
    win.stop()
    qtbot.waitUntil(lambda: win.state == "idle", timeout=WAIT)
    assert win.status.text().startswith("stopped after")


def test_tooltip_quotes_what_the_draft_proposed(qtbot):
    view = TokenView()
    qtbot.addWidget(view)
    view.append([("round", {"round": 3, "k": 2, "accepted": 0, "kind": "correction", "origins": ["correction"],
                            "emitted": [7],
                            "texts": ["x"], "drafted": [9, 9], "drafted_texts": ["|", "|"],
                            "draft_p": [0.4], "target_p": [0.6]})])
    tip = view.tooltip_for(view.infos[0])
    assert "\u201c<b>|</b>\u201d (rejected)" in tip and "round 3" in tip
    QToolTip.showText(QPoint(10, 10), "stale", view.text.viewport())
    view.append([("round", {"round": 4, "k": 1, "accepted": 1, "kind": "bonus", "origins": ["draft", "bonus"],
                            "emitted": [1, 2],
                            "texts": ["a", "b"]})])
    qtbot.waitUntil(lambda: not QToolTip.isVisible(), timeout=3000)  # new text scrolls under it


def test_topic_labels_stay_inside_and_switch_labels_sit_low(qtbot, win):
    win.setup.max_new.setValue(48)
    win.start()
    wait_rounds(qtbot, win, 3)
    win.controls.switch_to.name.setCurrentText("ogd")
    win.switch_updater()
    qtbot.waitUntil(lambda: win.state == "idle", timeout=WAIT)
    win.refresh_plots(force=True)
    p = win.plots
    assert p._switch_items and all(it.label.orthoPos <= 0.35 for it in p._switch_items)
    (x_lo, x_hi), _ = p.p_tau.viewRange()
    for items, x0 in p._topic_items:
        label = items[2]
        if x0 > x_lo + 0.8 * (x_hi - x_lo):
            assert tuple(label.anchor) == (1, 0)


def test_readout_sits_above_the_plots_and_messages_have_room(qtbot, win):
    assert win.stats_label is win.plots.readout  # not in the status bar, where it hid messages
    run_to_end(qtbot, win)
    assert "frozen: \u03c4" in win.plots.readout.text()
    win.statusBar().showMessage("saved state to somewhere", 5000)
    assert win.statusBar().currentMessage() == "saved state to somewhere"


def test_stall_trace_writes_stacks_when_the_ui_thread_is_late(tmp_path):
    import time

    from app.diag import StallTrace
    out = tmp_path / "stalls.txt"
    t = StallTrace(str(out))
    try:
        time.sleep(1.6)  # no beat: the "UI thread" (this one) is late
    finally:
        t.stop()
    text = out.read_text()
    assert "UI thread" in text and "--- UI" in text and "test_stall_trace" in text
