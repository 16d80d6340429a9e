"""`onlinespec run` on a tiny pair: real files out (JSON, CSV, PNG), clear errors in."""
from __future__ import annotations

import csv
import json
import struct
import subprocess
import sys

import pytest

from onlinespec_core import cli

PROMPTS = [("code", "def add(a, b):"), ("code", "def sub(a, b):"),
           ("sql", "SELECT name FROM users"), ("sql", "SELECT age FROM users WHERE")]


@pytest.fixture
def stream_file(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text("".join(json.dumps({"topic": t, "prompt": s}) + "\n" for t, s in PROMPTS))
    return p


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def run_cli(argv, capsys):
    rc = cli.main(argv)
    return rc, capsys.readouterr()


def test_run_writes_json_csv_png(pair_dirs, stream_file, tmp_path, capsys):
    t, d = pair_dirs["llama"]
    out = tmp_path / "out"
    rc, io = run_cli(["run", "--pair", str(t), "--draft", str(d), "--stream", str(stream_file),
                      "--updater", "ensemble", "--k", "3", "--max-new-tokens", "10", "--out", str(out),
                      "--no-progress"], capsys)
    assert rc == 0, io.err
    m = json.loads((out / "metrics.json").read_text())
    tot = m["totals"]
    assert tot["tokens"] == 40 and m["config"]["updater"] == "ensemble" and m["config"]["k"] == 3
    assert set(m["per_topic"]) == {"code", "sql"}
    assert [p["topic"] for p in m["prompts"]] == [t for t, _ in PROMPTS]
    assert sum(p["tokens"] for p in m["prompts"]) == 40
    assert 1.0 <= tot["tau"] <= 4.0 and tot["tokens_per_s_end_to_end"] > 0
    assert 0.0 <= tot["update_fraction_end_to_end"] < 1.0
    assert m["machine"]["torch_threads"] >= 1
    rows = list(csv.DictReader((out / "rounds.csv").open()))
    assert len(rows) == tot["rounds"]
    assert sum(int(r["n_emitted"]) for r in rows) == 40
    assert all(int(r["tau"]) == int(r["accepted"]) + 1 for r in rows)
    assert {r["topic"] for r in rows} == {"code", "sql"}
    n_w = sum(1 for key in rows[0] if key[:1] == "w" and key[1:].isdigit())  # the frozen expert + 3
    assert n_w == 4 and all(abs(sum(float(r[f"w{i}"]) for i in range(n_w)) - 1.0) < 1e-4 for r in rows)  # Hedge
    for name in ("tau.png", "weights.png"):
        w, h = png_size(out / name)
        assert w >= 600 and h >= 200
    assert set(m["files"]) == {"metrics.json", "rounds.csv", "tau.png", "weights.png"}
    assert "40 tokens" in io.out


def test_run_frozen_without_plots_has_no_weights(pair_dirs, stream_file, tmp_path, capsys):
    t, d = pair_dirs["gpt2"]
    out = tmp_path / "o"
    rc, io = run_cli(["run", "--pair", str(t), "--draft", str(d), "--stream", str(stream_file),
                      "--limit", "1", "--max-new-tokens", "6", "--out", str(out), "--no-plots",
                      "--no-progress"], capsys)
    assert rc == 0, io.err
    m = json.loads((out / "metrics.json").read_text())
    assert m["totals"]["tokens"] == 12 and len(m["prompts"]) == 2  # one prompt per topic
    assert not list(out.glob("*.png"))
    header = (out / "rounds.csv").read_text().splitlines()[0].split(",")
    assert "w0" not in header and header[:3] == ["round", "prompt_index", "topic"]


@pytest.mark.parametrize("bad, message", [
    (["--stream", "no/such/stream.jsonl"], "not found"),
    (["--updater", "nope"], "unknown updater 'nope'"),
    (["--updater-option", "lr"], "key=value"),
    (["--updater", "frozen", "--updater-option", "lr=0.1"], "takes no options"),
])
def test_run_errors_are_clear(pair_dirs, stream_file, tmp_path, capsys, bad, message):
    t, d = pair_dirs["llama"]
    argv = ["run", "--pair", str(t), "--draft", str(d), "--stream", str(stream_file),
            "--out", str(tmp_path / "x"), "--no-progress"] + bad
    rc, io = run_cli(argv, capsys)
    assert rc == 2 and message in io.err and io.err.startswith("error: ")
    assert not (tmp_path / "x").exists()  # failed before any output


def test_run_malformed_stream_line(pair_dirs, tmp_path, capsys):
    t, d = pair_dirs["llama"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"topic": "a", "prompt": "x"}\n{"topic": "a", prompt: oops}\n')
    rc, io = run_cli(["run", "--pair", str(t), "--draft", str(d), "--stream", str(bad),
                      "--out", str(tmp_path / "x")], capsys)
    assert rc == 2 and "bad.jsonl line 2" in io.err and "not valid JSON" in io.err


def test_run_help_and_no_qt_on_import():
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--help"])
    assert e.value.code == 0
    code = ("import sys, onlinespec_core.runner, onlinespec_core.bench, onlinespec_core.plots_png; "
            "bad = [m for m in sys.modules if m.startswith(('PySide6', 'pyqtgraph'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_topic_spans_and_rolling_mean():
    from onlinespec_core.plots_png import rolling_mean, topic_spans
    assert topic_spans(["a", "a", "b", "a"]) == [(0, 2, "a"), (2, 3, "b"), (3, 4, "a")]
    assert rolling_mean([1, 3, 5, 7], 2) == [1.0, 2.0, 4.0, 6.0]
