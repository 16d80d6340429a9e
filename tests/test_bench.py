"""`onlinespec bench` on a tiny pair: every named run appears, lossless, clear errors."""
from __future__ import annotations

import json

import pytest

from onlinespec_core import bench, cli
from onlinespec_core.updaters import available_updaters

PROMPTS = [("code", "def add(a, b):"), ("sql", "SELECT name FROM users"), ("code", "def sub(a, b):")]
REQUIRED = {"name", "tau", "tokens_per_s", "speedup_vs_ar", "speedup_vs_hf_assisted", "update_fraction",
            "target_forwards_per_token", "per_topic", "tokens_per_s_reps", "matches_target"}


@pytest.fixture
def stream_file(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text("".join(json.dumps({"topic": t, "prompt": s}) + "\n" for t, s in PROMPTS))
    return p


def test_bench_json_and_table(pair_dirs, stream_file, tmp_path, capsys):
    t, d = pair_dirs["llama"]
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--pair", str(t), "--draft", str(d), "--stream", str(stream_file),
                   "--k", "3", "--max-new-tokens", "8", "--reps", "2", "--warmup-tokens", "4",
                   "--json", str(out), "--table", "--no-progress"])
    io = capsys.readouterr()
    assert rc == 0, io.err
    rep = json.loads(out.read_text())
    names = [r["name"] for r in rep["runs"]]
    ups = available_updaters()
    assert names == ["target_ar", "hf_assisted", "frozen"] + [u for u in ups if u != "frozen"]
    for r in rep["runs"]:
        assert REQUIRED <= set(r), r["name"]
        assert r["tokens"] == 24 and r["tokens_per_s"] > 0
        assert set(r["per_topic"]) == {"code", "sql"}
        assert r["tokens_per_s_reps"]["min"] <= r["tokens_per_s"] <= r["tokens_per_s_reps"]["max"]
        assert len(r["wall_s"]) == 2
        if r["name"] != "hf_assisted":  # lossless: every engine run emits the target's greedy tokens
            assert r["matches_target"], r["name"]
        if r["name"] not in ("target_ar", "hf_assisted"):
            assert 0.0 <= r["update_fraction"] < 1.0
            assert r["bound"] == pytest.approx(r["tau"] / (1 + r["drafted_per_forward"] * rep["cost"]["c"]))
            assert 1.0 <= r["tau"] <= 4.0 and "tau_after_shift" in r
            if r["name"] != "hf_assisted":
                assert r["bound_measured_costs"] == pytest.approx(r["tau"] / (
                    r["verify_cost_vs_ar_forward"] + r["drafted_per_forward"] * r["c_in_engine"]))
    ar = rep["runs"][0]
    assert ar["speedup_vs_ar"] == 1.0 and ar["tau"] == 1.0 and ar["target_forwards_per_token"] == 1.0
    assert rep["runs"][1]["speedup_vs_hf_assisted"] == 1.0
    assert rep["cost"]["c"] > 0 and rep["machine"]["torch_threads"] == 1
    bk = rep["bookkeeping_target_as_draft"]
    assert bk["tau"] > 2.0 and 0.0 < bk["bookkeeping_fraction"] < 1.0  # target drafting for itself
    assert rep["topics"] == ["code", "sql"] and rep["n_prompts"] == 3
    for name in names:
        assert f"| {name} |" in io.out
    assert "| method | code | sql | after first shift |" in io.out
    assert "bound tau/(1+kc)" in io.out


def test_bench_selected_methods_and_options(pair_dirs, stream_file, tmp_path, capsys):
    t, d = pair_dirs["gpt2"]
    rc = cli.main(["bench", "--pair", str(t), "--draft", str(d), "--stream", str(stream_file),
                   "--methods", "target_ar,hf_target_only,frozen,ogd", "--updater-option", "ogd:lr=0.01",
                   "--max-new-tokens", "6", "--reps", "1", "--warmup-tokens", "2", "--limit", "1",
                   "--json", str(tmp_path / "b.json"), "--no-progress"])
    io = capsys.readouterr()
    assert rc == 0, io.err
    rep = json.loads((tmp_path / "b.json").read_text())
    assert [r["name"] for r in rep["runs"]] == ["target_ar", "hf_target_only", "frozen", "ogd"]
    assert rep["n_prompts"] == 2 and rep["config"]["updater_options"] == {"ogd": {"lr": 0.01}}
    hf_ar = rep["runs"][1]
    assert hf_ar["matches_target"] and hf_ar["target_forwards_per_token"] == 1.0
    assert "speedup_vs_hf_assisted" not in hf_ar
    assert "ogd: tau" in io.out and "x vs AR" in io.out


@pytest.mark.parametrize("bad, message", [
    (["--stream", "missing.jsonl"], "not found"),
    (["--methods", "target_ar,nope"], "unknown bench method 'nope'"),
    (["--updater-option", "nope:lr=1"], "unknown bench method 'nope'"),
    (["--updater-option", "lr=1"], "UPDATER:key=value"),
    (["--methods", "frozen"], "needs 'target_ar'"),
])
def test_bench_errors_are_clear(pair_dirs, stream_file, capsys, bad, message):
    t, d = pair_dirs["llama"]
    rc = cli.main(["bench", "--pair", str(t), "--draft", str(d), "--stream", str(stream_file),
                   "--max-new-tokens", "4", "--reps", "1", "--no-progress"] + bad)
    io = capsys.readouterr()
    assert rc == 2 and message in io.err and io.err.startswith("error: ")


def test_markdown_table_marks_lossy_runs():
    run = {"name": "x", "tau": 2.0, "tokens_per_s": 10.0, "tokens_per_s_reps": {"min": 9.0, "max": 11.0},
           "speedup_vs_ar": 1.5, "update_fraction": 0.01, "matches_target": False,
           "per_topic": {"a": {"tau": 2.0, "speedup_vs_ar": 1.5}}}
    report = {"runs": [run], "topics": ["a"], "n_prompts": 1, "cost": {"c": None},
              "config": {"k": 4, "max_new_tokens": 8, "reps": 1},
              "machine": {"torch_threads": 1, "cpu_count": 2}}
    md = bench.markdown_tables(report)
    assert "| x | 2.00 | 10.0 (9.0..11.0) | 1.50x | - | - | - | - | 0.010 | NO |" in md
    assert "| x | 2.00 / 1.50x | - |" in md
