"""Views and entry points: 100k-token view, spec parsing, records, screenshot mode, CLI."""
from __future__ import annotations

import gc
import time

import pytest
from PySide6.QtGui import QImage

from app.records import RunLog, UiEvent
from onlinespec_core.feedback import origins
from onlinespec_core.updaters.base import UpdaterSnapshot
from app.spec import parse_options, updater_fields
from app.views import tokens as tokens_mod
from app.views.tokens import TokenView
from onlinespec_core.errors import OnlineSpecError
from onlinespec_core.streams import StreamItem, write_stream


def fake_round(i: int, k: int = 4, acc: int = 2) -> dict:
    """A round record as the worker sends it (shape only: the view is what is tested here)."""
    n = acc + 1
    kind = "bonus" if acc == k else "correction"
    return {"round": i, "k": k, "accepted": acc, "kind": kind, "origins": origins(acc, kind, n),
            "emitted": list(range(n)), "texts": [f"t{i % 97}" if j < n - 1 else " x\n"[j % 2:]
                                                 for j in range(n)],
            "drafted": list(range(k)), "drafted_texts": ["d"] * k, "draft_p": [0.5] * k,
            "target_p": [0.25] * n}


def test_token_view_100k_tokens_stays_bounded(qtbot):
    gc.collect()
    gc.freeze()  # as the app does after loading: torch's heap out of the collector's way
    try:
        _fill_100k(qtbot)
    finally:
        gc.unfreeze()


def _fill_100k(qtbot) -> None:
    view = TokenView()
    qtbot.addWidget(view)
    view.resize(900, 400)
    view.show()
    batches, worst = 0, 0.0
    i = 0
    while view.n_tokens < 100_000:
        items = [("prompt", {"topic": "code", "prompt_index": i, "prompt": "def f():"})] if i % 40 == 0 else []
        items += [("round", fake_round(i + j, acc=(i + j) % 5 if (i + j) % 5 < 4 else 4)) for j in range(60)]
        i += 60
        t = time.perf_counter()
        view.append(items)
        worst = max(worst, time.perf_counter() - t)
        batches += 1
    print(f"\n100k tokens in {batches} batches; slowest batch {worst * 1000:.1f} ms; kept "
          f"{len(view.infos)} tokens, {view.text.document().blockCount()} blocks")
    assert len(view.infos) <= tokens_mod.MAX_TOKENS + tokens_mod.TRIM + 400
    assert view.n_tokens >= 100_000
    last = view.infos[-1]  # hover lookup still maps positions to tokens after trimming
    assert view.token_at(last.start - view._removed) is last
    first = view.infos[0]
    assert view.token_at(first.start - view._removed) is first
    assert "round" in view.tooltip_for(last)


def test_origins_and_records():
    assert origins(2, "correction", 3) == ["draft", "draft", "correction"]
    assert origins(4, "bonus", 5) == ["draft"] * 4 + ["bonus"]
    assert origins(0, "target", 1) == ["target"]
    assert origins(3, "correction", 2) == ["draft", "draft"]  # cut at EOS / max_new_tokens
    log = RunLog()
    log.reset(["a"])
    log.add(UiEvent("start", 0, {"topic": "code"}))
    for i in range(5):
        d = fake_round(i)
        d.update(wall_s=0.01, loss=0.5,
                 updater_state=UpdaterSnapshot("ensemble", weights=(0.2, 0.8), step_sizes=(1e-4, 2e-4)))
        log.add(UiEvent("round", 0, d))
    log.add(UiEvent("updater", 0, {"from": "frozen", "to": "ogd"}))
    log.add(UiEvent("baseline", -1, {"tokens_per_s": 150.0}))
    s = log.series[0]
    assert s.rounds == 5 and s.tokens == 15 and s.mean_tau == 3.0
    assert s.per_position == [1.0, 1.0, 0.0, 0.0]
    assert s.weights[-1] == [0.2, 0.8] and s.step_sizes == [1e-4, 2e-4]
    assert log.switches == [(15, "frozen", "ogd")] and log.topics == [(0, "code")]
    assert log.speedup(s) == pytest.approx(2.0)


def test_parse_options_and_fields():
    assert parse_options("") == {}
    assert parse_options("lr=1e-3, hedge=discounted, lrs=[1e-4, 2e-4], every=4") == \
        {"lr": 1e-3, "hedge": "discounted", "lrs": [1e-4, 2e-4], "every": 4}
    with pytest.raises(OnlineSpecError, match="key=value"):
        parse_options("lr 1e-3")
    f = updater_fields("ensemble")
    assert "lr" in f and "hedge" in f
    assert updater_fields("frozen") == {} and updater_fields("nope") == {}


def test_screenshot_mode(qtbot, tmp_path, pair_dirs, monkeypatch):
    from app.main import main
    monkeypatch.setenv("ONLINESPEC_THREADS", "1")
    stream = tmp_path / "s.jsonl"
    write_stream([StreamItem("code", "def add(a, b):"), StreamItem("sql", "SELECT name")], stream)
    out = tmp_path / "shot.png"
    t, d = pair_dirs["llama"]
    rc = main(["--screenshot", str(out), "--rounds", "6", "--target", str(t), "--draft", str(d),
               "--stream", str(stream), "--max-new-tokens", "24", "--size", "1280x800"])
    assert rc == 0
    img = QImage(str(out))
    assert (img.width(), img.height()) == (1280, 800)
    rc = main(["--screenshot", str(tmp_path / "bad.png"), "--rounds", "3", "--target",
               str(tmp_path / "missing"), "--stream", str(stream)])
    assert rc == 2 and not (tmp_path / "bad.png").exists()


def test_cli_gui_help(capsys):
    from onlinespec_core.cli import main
    with pytest.raises(SystemExit) as e:
        main(["gui", "--help"])
    assert e.value.code == 0
    assert "--screenshot" in capsys.readouterr().out


def test_hover_shows_round_and_probabilities(qtbot):
    from PySide6.QtCore import QEvent, QPoint
    from PySide6.QtGui import QHelpEvent
    from PySide6.QtWidgets import QApplication, QToolTip
    view = TokenView()
    qtbot.addWidget(view)
    view.resize(600, 300)
    view.show()
    view.append([("prompt", {"topic": "code", "prompt_index": 0, "prompt": "def f():"}),
                 ("round", fake_round(7, acc=1))])
    info = view.infos[1]  # the correction token of round 7
    c = view.text.textCursor()
    c.setPosition(info.start - view._removed + 1)
    pos = view.text.cursorRect(c).center()
    vp = view.text.viewport()
    QApplication.sendEvent(vp, QHelpEvent(QEvent.Type.ToolTip, pos, vp.mapToGlobal(pos)))
    text = QToolTip.text()
    assert "round 7" in text and "target prob p = 0.250" in text and "draft had proposed" in text
