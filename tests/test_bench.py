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
    assert names == ["target_ar", "hf_assisted", "hf_assisted_k", "hf_prompt_lookup", "ngram",
                     "frozen"] + [u for u in ups if u != "frozen"]
    for r in rep["runs"]:
        assert REQUIRED <= set(r), r["name"]
        assert r["tokens"] == 24 and r["tokens_per_s"] > 0
        assert set(r["per_topic"]) == {"code", "sql"}
        assert r["tokens_per_s_reps"]["min"] <= r["tokens_per_s"] <= r["tokens_per_s_reps"]["max"]
        assert len(r["wall_s"]) == 2
        if r["name"] not in ("hf_assisted", "hf_assisted_k"):  # lossless: the target's greedy tokens
            assert r["matches_target"], r["name"]
        if r["name"] not in ("target_ar", "hf_assisted", "hf_assisted_k", "hf_prompt_lookup"):
            assert 0.0 <= r["update_fraction"] < 1.0
            assert r["bound"] == pytest.approx(r["tau"] / (1 + r["drafted_per_forward"] * rep["cost"]["c"]))
            assert 1.0 <= r["tau"] <= 4.0 and "tau_after_shift" in r
            if r["name"] != "ngram":
                assert r["bound_measured_costs"] == pytest.approx(r["tau"] / (
                    r["verify_cost_vs_ar_forward"] + r["drafted_per_forward"] * r["c_in_engine"]))
            else:  # no draft model: no draft forwards, only the lookup's own time
                assert r["drafted_per_forward"] == 0 and r["bound"] == pytest.approx(r["tau"])
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
    assert "| x | 2.00 | - | 10.0 (9.0..11.0) | 1.50x | - | - | - | - | 0.010 | NO |" in md
    assert "| x | 2.00 / 1.50x | - |" in md


def test_bench_new_methods_greedy_and_sampling(pair_dirs, stream_file, tmp_path, capsys):
    """hf_prompt_lookup, ngram and hf_assisted pinned to k run on a tiny pair; the sampling runs
    report tau and acceptance per method."""
    t, d = pair_dirs["qwen2"]
    out = tmp_path / "s.json"
    rc = cli.main(["bench", "--pair", str(t), "--draft", str(d), "--stream", str(stream_file),
                   "--methods", "target_ar,hf_assisted,hf_assisted_k,hf_prompt_lookup,ngram,frozen",
                   "--ngram-option", "max_n=3", "--k", "3", "--max-new-tokens", "10", "--reps", "1",
                   "--warmup-tokens", "2", "--limit", "0", "--sampling-temperatures", "0.7,1.0",
                   "--top-p", "0.95", "--json", str(out), "--table", "--no-progress"])
    io = capsys.readouterr()
    assert rc == 0, io.err
    rep = json.loads(out.read_text())
    runs = {r["name"]: r for r in rep["runs"]}
    for name in ("hf_prompt_lookup", "ngram"):  # lossless lookups: the target's greedy tokens
        assert runs[name]["matches_target"] and runs[name]["tokens"] == 30
        assert runs[name]["tau"] >= 1.0 and runs[name]["drafted_per_forward"] == 0
    assert runs["ngram"]["proposed_per_forward"] > 0 and 0 <= runs["ngram"]["acceptance"] <= 1
    assert runs["hf_assisted_k"]["proposed_per_forward"] <= 3.0  # pinned: never more than k
    assert runs["hf_assisted_k"]["acceptance"] is not None
    assert rep["config"]["ngram_options"] == {"max_n": 3}
    assert [s["config"]["temperature"] for s in rep["sampling"]] == [0.7, 1.0]
    for s in rep["sampling"]:
        assert s["config"]["top_p"] == 0.95 and s["bookkeeping_target_as_draft"] is None
        for r in s["runs"]:
            assert r["matches_target"] is None and r["tokens"] > 0 and r["tau"] >= 1.0
    assert "Sampling runs:" in io.out and "T=0.7, top-p 0.95: tau / acceptance / speedup vs AR" in io.out
    assert "| ngram | " in io.out and "| hf_prompt_lookup | " in io.out


def test_hf_assisted_pinned_k_settings(pair_dirs):
    import onlinespec_core as osc
    t, d = pair_dirs["llama"]
    pair = osc.load_pair(target=str(t), draft=str(d))
    m = bench.HFMethod("hf_assisted_k", pair, assisted=True, k=3, pinned=True)
    gc = m.assistant.generation_config
    assert (gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, gc.assistant_confidence_threshold) == \
        (3, "constant", 0.0)
    ids = pair.tokenizer("def add(a, b):")["input_ids"]
    r = m.run(ids, 12)
    assert len(r.token_ids) == 12 and r.proposed <= 3 * r.forwards and 0 <= r.accepted <= r.proposed
    assert pair.draft.model.generation_config.num_assistant_tokens != 3 or \
        pair.draft.model.generation_config is not gc  # the pair's own draft is untouched


def test_quick_preset_fills_unset_flags():
    args = bench.build_argparser().parse_args(["--quick", "--reps", "3"])
    assert args.quick and args.reps == 3 and args.limit is None  # filled in main()
    assert bench.QUICK["limit"] == 1 and bench.DEFAULTS["reps"] >= 1


def test_bench_plain_output_lists_sampling_runs(pair_dirs, stream_file, capsys):
    t, d = pair_dirs["gpt2"]
    rc = cli.main(["bench", "--pair", str(t), "--draft", str(d), "--stream", str(stream_file),
                   "--methods", "target_ar,ngram", "--max-new-tokens", "6", "--reps", "1",
                   "--warmup-tokens", "2", "--limit", "1", "--sampling-temperatures", "1.0",
                   "--costs", "off", "--no-progress"])
    io = capsys.readouterr()
    assert rc == 0, io.err
    assert "ngram (T=1, top-p 1): tau" in io.out and "acceptance" in io.out


@pytest.mark.parametrize("bad, message", [
    (["--sampling-temperatures", "0"], "must all be > 0"),
    (["--ngram-option", "min_n=0"], "min_n"),
    (["--ngram-option", "nope=1"], "no option(s) ['nope']"),
    (["--top-p", "0"], "top_p"),
])
def test_bench_new_option_errors(pair_dirs, stream_file, capsys, bad, message):
    t, d = pair_dirs["llama"]
    rc = cli.main(["bench", "--pair", str(t), "--draft", str(d), "--stream", str(stream_file),
                   "--max-new-tokens", "4", "--reps", "1", "--no-progress"] + bad)
    io = capsys.readouterr()
    assert rc == 2 and message in io.err
