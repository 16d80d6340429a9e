"""The app's save/load dialogs with issue 13's state safety: a foreign folder is never replaced,
a tampered state is refused with a clear message, and the engine keeps running as before."""
from __future__ import annotations

import json

import pytest

from onlinespec_core.atomic import write_manifest
from tests.test_app import WAIT, run_to_end, stream_file, win  # noqa: F401 (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_app_save_never_replaces_user_files_and_refuses_tampered_states(qtbot, win, tmp_path):  # noqa: F811
    run_to_end(qtbot, win)
    user = tmp_path / "Documents"
    user.mkdir()
    (user / "thesis.txt").write_text("years of work")
    win.worker.save_state(str(user))
    qtbot.waitUntil(lambda: len(win.errors) == 1, timeout=WAIT)
    assert "refusing to replace" in win.errors[0] and "pick a new or empty folder" in win.errors[0]
    assert (user / "thesis.txt").read_text() == "years of work"
    path = tmp_path / "state"
    with qtbot.waitSignal(win.worker.message, timeout=WAIT):
        win.worker.save_state(str(path))
    meta = json.loads((path / "state.json").read_text())
    meta["version"] = "2"
    (path / "state.json").write_text(json.dumps(meta))
    win.load_state(str(path))  # not re-signed: the manifest catches the edit
    qtbot.waitUntil(lambda: len(win.errors) == 2, timeout=WAIT)
    assert "state.json does not match its manifest" in win.errors[1]
    write_manifest(path, "state")
    win.load_state(str(path))
    qtbot.waitUntil(lambda: len(win.errors) == 3, timeout=WAIT)
    assert "has version '2' (str), expected the number 2" in win.errors[2]
    run_to_end(qtbot, win)  # the app still runs


def test_app_non_utf8_stream_is_a_dialog(qtbot, win, tmp_path):  # noqa: F811
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"topic": "x", "prompt": "caf\xe9"}\n')
    win.setup.stream_file.setText(str(bad))
    win.start()
    qtbot.waitUntil(lambda: len(win.errors) == 1, timeout=WAIT)
    assert "is not UTF-8 text" in win.errors[0] and win.state == "idle"
