"""The playground with the real engine on a tiny pair (pytest-qt, offscreen): runs, controls,
live updater switch, topic shift, stop, close mid-run, exports, errors, state, compare, settings."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from PySide6.QtCore import QSettings, Qt
from PySide6.QtGui import QImage

from app.window import MainWindow
from onlinespec_core.streams import StreamItem, write_stream

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
N = 16  # tokens per prompt
WAIT = 90_000  # ms; generous: the machine may be busy, nothing here asserts speed

TOPICS = [StreamItem("code", "def add(a, b):"), StreamItem("code", "def sub(a, b):"),
          StreamItem("code", "def mul(a, b):"), StreamItem("sql", "SELECT name FROM users"),
          StreamItem("math", "Tom has 3 apples")]


def hf_greedy(target, tok, prompt: str, n: int) -> list[int]:
    ids = tok(prompt)["input_ids"]
    out = target.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, pad_token_id=2,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


@pytest.fixture
def stream_file(tmp_path):
    p = tmp_path / "stream.jsonl"
    write_stream(TOPICS, p)
    return p


@pytest.fixture
def win(qtbot, tmp_path, pair_dirs, stream_file):
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    w = MainWindow(settings)
    qtbot.addWidget(w)
    configure(w, pair_dirs["llama"], stream_file)
    w.show()
    yield w
    w.close()
    assert not w.thread.isRunning()


def configure(w: MainWindow, dirs, stream_file, updater: str = "frozen", n: int = N) -> None:
    s = w.setup
    s.pair_source.setCurrentIndex(s.pair_source.findData("dirs"))
    s.target.setText(str(dirs[0]))
    s.draft.setText(str(dirs[1]))
    s.stream_kind.setCurrentIndex(s.stream_kind.findText("JSONL file\u2026"))
    s.stream_file.setText(str(stream_file))
    s.updater.name.setCurrentText(updater)
    s.compare_b.name.setCurrentText("(none)")  # a first launch opens on the demo preset (compare)
    s.compare_c.name.setCurrentText("(none)")
    s.k.setValue(3)
    s.max_new.setValue(n)
    s.baseline.setChecked(False)


def run_to_end(qtbot, w: MainWindow) -> None:
    n_err = len(w.errors)
    w.start()
    qtbot.waitUntil(lambda: (w.state == "idle" and w.rounds_seen > 0) or len(w.errors) > n_err, timeout=WAIT)
    assert len(w.errors) == n_err, w.errors[n_err:]
    qtbot.waitUntil(lambda: w.state == "idle", timeout=WAIT)


def assert_lossless(w: MainWindow, pair_dirs, items=TOPICS, cfg: int = 0, n: int = N) -> None:
    import onlinespec_core as osc
    t, d = pair_dirs["llama"]
    pair = osc.load_pair(target=str(t), draft=str(d))
    seen = {p: ids for (c, p), ids in w.outputs.items() if c == cfg}
    assert seen
    for p, ids in seen.items():
        assert ids == hf_greedy(pair.target, pair.tokenizer, items[p].prompt, n), p


def test_run_receives_rounds_lossless_and_renders(qtbot, win, pair_dirs):
    run_to_end(qtbot, win)
    assert win.kinds_seen[0] == "run" and "round" in win.kinds_seen and "done" in win.kinds_seen
    assert {p for _, p in win.outputs} == set(range(len(TOPICS)))
    assert_lossless(win, pair_dirs)
    view = win.token_views[0]
    assert view.n_tokens == sum(len(v) for v in win.outputs.values())
    info = view.infos[0]
    assert info.origin in ("draft", "correction", "bonus") and info.target_p is not None
    assert "round" in view.tooltip_for(info)
    assert view.token_at(info.start + 0) is info
    s = win.log.series[0]
    assert s.rounds == win.rounds_seen and len(s.x) == s.rounds and len(s.m.pos_drafted) == 3
    assert [t for _, t in win.log.topics] == ["code", "sql", "math"]
    assert win.max_stall_ms >= 0.0


def test_pause_step_resume_with_shortcuts(qtbot, win):
    win.setup.max_new.setValue(400)  # long enough to pause mid-run
    qtbot.keyClick(win, Qt.Key.Key_Space)  # Space: start
    qtbot.waitUntil(lambda: win.rounds_seen >= 3, timeout=WAIT)
    qtbot.keyClick(win, Qt.Key.Key_Space)  # Space: pause
    qtbot.waitUntil(lambda: win.state == "paused", timeout=WAIT)
    r = win.rounds_seen
    qtbot.wait(300)
    assert win.rounds_seen == r  # paused: no rounds
    qtbot.keyClick(win, Qt.Key.Key_S)  # S: exactly one round
    qtbot.waitUntil(lambda: win.rounds_seen == r + 1, timeout=WAIT)
    qtbot.wait(300)
    assert win.rounds_seen == r + 1 and win.state == "paused"
    win.controls.b_pause.click()  # Resume
    qtbot.waitUntil(lambda: win.rounds_seen > r + 3, timeout=WAIT)
    win.controls.b_stop.click()
    qtbot.waitUntil(lambda: win.state == "idle", timeout=WAIT)
    assert "stopped" in win.kinds_seen


def test_switch_updater_mid_run_stays_lossless(qtbot, win, pair_dirs):
    win.setup.max_new.setValue(64)  # long enough that the switch lands mid-run
    win.start()
    qtbot.waitUntil(lambda: win.rounds_seen >= 4, timeout=WAIT)
    win.controls.switch_to.name.setCurrentText("ogd")
    win.controls.switch_to.options.setText("lr=1e-2, every=1, batch=1")
    win.controls.b_switch.click()
    qtbot.waitUntil(lambda: win.state == "idle", timeout=WAIT)
    assert not win.errors
    assert "updater" in win.kinds_seen
    assert win.log.switches and win.log.switches[0][2] == "ogd"
    rows = win.log.series[0].rows
    assert rows[0]["updater"] == "frozen" and rows[-1]["updater"] == "ogd"
    assert any(r["updated"] for r in rows)  # the new updater really changed the draft
    assert_lossless(win, pair_dirs, n=64)


def test_shift_topic_jumps_to_next_topic(qtbot, win):
    win.setup.max_new.setValue(300)  # prompt 0 is still running when T arrives
    win.start()
    qtbot.waitUntil(lambda: win.rounds_seen >= 1, timeout=WAIT)
    qtbot.keyClick(win, Qt.Key.Key_T)
    qtbot.waitUntil(lambda: (0, 3) in win.outputs, timeout=WAIT)
    win.stop()
    qtbot.waitUntil(lambda: win.state == "idle", timeout=WAIT)
    assert sorted({p for _, p in win.outputs}) == [0, 3]  # the rest of "code" was skipped
    assert len(win.outputs[(0, 0)]) < 300
    assert [t for _, t in win.log.topics][:2] == ["code", "sql"]


def test_controls_work_after_the_baseline(qtbot, win):
    win.setup.baseline.setChecked(True)
    win.setup.max_new.setValue(400)
    win.start()
    qtbot.waitUntil(lambda: win.rounds_seen >= 2, timeout=WAIT)
    assert win.log.baseline_tok_s and win.log.baseline_tok_s > 0
    win.shift_topic()
    win.stop()
    qtbot.waitUntil(lambda: win.state == "idle", timeout=WAIT)
    assert "stopped" in win.kinds_seen and {p for _, p in win.outputs} == {0}


def test_close_mid_run_shuts_down(qtbot, win):
    win.setup.max_new.setValue(480)
    win.start()
    qtbot.waitUntil(lambda: win.rounds_seen >= 2, timeout=WAIT)
    assert win.thread.isRunning() and win.state == "running"
    win.close()
    assert not win.thread.isRunning()


def test_close_mid_update_shuts_down(qtbot, win):
    win.setup.updater.name.setCurrentText("ensemble")
    win.setup.updater.options.setText("every=1, batch=2")
    win.setup.max_new.setValue(480)
    win.start()
    qtbot.waitUntil(lambda: win.rounds_seen >= 2, timeout=WAIT)
    win.close()  # most of each round is the ensemble's update here
    assert not win.thread.isRunning()


def test_export_png_csv_json(qtbot, win, tmp_path):
    run_to_end(qtbot, win)
    png = win.export_png(str(tmp_path / "plots.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = QImage(str(png))
    assert not img.isNull() and img.width() >= 1000
    path = win.export_metrics(str(tmp_path / "metrics.csv"))
    rows = list(csv.DictReader(open(path, newline="")))
    assert len(rows) == win.rounds_seen
    assert {"config", "round", "tau", "k", "accepted", "loss", "rolling_tokens_per_s"} <= set(rows[0])
    assert sum(int(r["tokens"]) for r in rows) == sum(len(v) for v in win.outputs.values())
    obj = json.loads(open(win.export_metrics(str(tmp_path / "metrics.json"))).read())
    assert obj["summary"]["frozen"]["rounds"] == win.rounds_seen and len(obj["rounds"]) == win.rounds_seen


def test_bad_model_path_shows_error_and_app_keeps_working(qtbot, win, pair_dirs, tmp_path):
    win.setup.target.setText(str(tmp_path / "no-such-model"))
    with qtbot.waitSignal(win.error_shown, timeout=WAIT) as blocker:
        win.start()
    assert "does not exist" in blocker.args[0]
    assert win.error_box is not None and win.error_box.isVisible()
    assert "no-such-model" in win.error_box.text()
    qtbot.waitUntil(lambda: win.state == "idle", timeout=WAIT)
    assert win.controls.b_start.isEnabled() and win.setup.isEnabled()
    win.setup.updater.options.setText("not an option")  # malformed options: a dialog too
    win.start()
    assert "key=value" in win.errors[-1] and win.state == "idle"
    win.setup.updater.options.setText("")
    win.error_box.close()
    win.setup.target.setText(str(pair_dirs["llama"][0]))
    run_to_end(qtbot, win)
    assert "done" in win.kinds_seen and len(win.errors) == 2


def run_ogd_and_save(qtbot, win, path) -> None:
    """A short ogd run (a step per round), then File > Save state to path."""
    win.setup.updater.name.setCurrentText("ogd")
    win.setup.updater.options.setText("every=1, batch=1")
    run_to_end(qtbot, win)
    with qtbot.waitSignal(win.worker.message, timeout=WAIT):
        win.worker.save_state(str(path))


def test_save_and_load_state(qtbot, win, tmp_path):
    path = tmp_path / "state"
    run_ogd_and_save(qtbot, win, path)
    assert {"draft.safetensors", "state.safetensors", "state.json"} <= {p.name for p in path.iterdir()}
    saved_round = json.loads((path / "state.json").read_text())["round_index"]
    with qtbot.waitSignal(win.worker.message, timeout=WAIT) as blocker:
        win.load_state(str(path))
    assert "loaded state" in blocker.args[0]
    first = win.rounds_seen
    run_to_end(qtbot, win)  # continues the loaded state: round numbers go on
    assert win.rounds_seen > 0 and win.log.series[0].rows[0]["round"] == saved_round
    assert first > 0
    win.load_state(str(tmp_path / "missing"))
    qtbot.waitUntil(lambda: len(win.errors) == 1, timeout=WAIT)
    assert "does not exist" in win.errors[0]


def test_compare_mode_overlays_and_shares_target(qtbot, win, pair_dirs):
    win.setup.compare_b.name.setCurrentText("frozen")
    win.setup.compare_c.name.setCurrentText("ogd")
    win.setup.baseline.setChecked(True)
    run_to_end(qtbot, win)
    assert len(win.log.series) == 3 and win.token_tabs.count() == 3
    for cfg in range(3):
        assert_lossless(win, pair_dirs, cfg=cfg)
    assert all(s.rounds > 0 for s in win.log.series)
    assert len(win.plots.c_tau) == 3
    share = win.log.share
    assert share["forwards"][1] == 0 and share["replayed"][1] == win.log.series[1].rounds
    assert win.log.baseline_tok_s and win.log.baseline_tok_s > 0
    assert win.log.speedup(win.log.series[0]) is not None


def test_settings_are_remembered(qtbot, tmp_path, pair_dirs, stream_file):
    settings = QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat)
    w = MainWindow(settings)
    qtbot.addWidget(w)
    configure(w, pair_dirs["llama"], stream_file, updater="ensemble", n=33)
    w.setup.temperature.setValue(0.7)
    w.setup.dynamic_k.setChecked(True)
    w.close()
    w2 = MainWindow(QSettings(str(tmp_path / "s.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(w2)
    s = w2.setup
    assert s.updater.name.currentText() == "ensemble" and s.max_new.value() == 33
    assert s.temperature.value() == pytest.approx(0.7) and s.dynamic_k.isChecked()
    assert s.target.text() == str(pair_dirs["llama"][0]) and s.pair_source.currentData() == "dirs"
    spec = s.spec()
    assert spec.temperature == pytest.approx(0.7) and spec.stream.kind == "file"
    w2.close()
