"""The app's 'Fast decode path' setting: unticked, the worker loads the pair on the plain HF
path; both settings give the target's own greedy output (real engine, offscreen window)."""
from __future__ import annotations

import pytest
from PySide6.QtCore import QSettings

from app.window import MainWindow
from tests.test_app import TOPICS, assert_lossless, configure, run_to_end

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.parametrize("use_fast", [False, True])
def test_fast_setting_picks_the_decode_path(qtbot, tmp_path, pair_dirs, use_fast):
    from onlinespec_core.streams import write_stream
    stream = tmp_path / "stream.jsonl"
    write_stream(TOPICS[:2], stream)
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    w = MainWindow(settings)
    qtbot.addWidget(w)
    configure(w, pair_dirs["llama"], stream)
    w.setup.fast.setChecked(use_fast)
    assert w.setup.pair_spec().load_kwargs()["fast"] == (None if use_fast else False)
    w.show()
    run_to_end(qtbot, w)
    assert w.worker.pair.fast is use_fast
    assert_lossless(w, pair_dirs, items=TOPICS[:2])
    w.close()
    assert not w.thread.isRunning()


def test_ensemble_legend_names_the_offline_expert(qtbot, tmp_path, pair_dirs):
    """The ensemble's step-0 expert (the offline draft) is labelled as such, not as 'e1'."""
    from onlinespec_core.streams import write_stream
    stream = tmp_path / "stream.jsonl"
    write_stream(TOPICS[:2], stream)
    w = MainWindow(QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(w)
    configure(w, pair_dirs["llama"], stream, updater="ensemble")
    w.show()
    run_to_end(qtbot, w)
    title = w.plots.p_w.titleLabel.text
    assert "0 (offline)" in title and "e1" not in title, title
    w.close()
