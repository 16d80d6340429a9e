"""Every bad input of issue 13 raises OnlineSpecError with the fix in its message (never a raw
TypeError/IndexError/RuntimeError), or is refused by the CLI/GUI argument parser."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

import onlinespec_core as osc
from onlinespec_core.errors import OnlineSpecError
from onlinespec_core.streams import load_stream, parse_stream_line
from tests.tiny import make_model


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- models -----------------------------------------------------------------------------
@pytest.mark.parametrize("damage,match", [
    (lambda b: b[: len(b) // 2], "truncated, empty or corrupt"),
    (lambda b: b"", "truncated, empty or corrupt"),
])
def test_broken_safetensors(tmp_path, pair_dirs, damage, match):
    t, d = pair_dirs["llama"]
    bad = copy_dir(d, tmp_path / "d")
    f = bad / "model.safetensors"
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(OnlineSpecError, match=match + ".*re-save the model"):
        osc.load_pair(target=str(t), draft=str(bad))


def test_config_weight_shape_mismatch(tmp_path, pair_dirs):
    t, d = pair_dirs["llama"]
    bad = copy_dir(d, tmp_path / "d")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] += 16
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OnlineSpecError, match="do not match the shapes in config.json"):
        osc.load_pair(target=str(t), draft=str(bad))


def test_draft_with_a_smaller_vocabulary(tmp_path, pair_dirs):
    t, _ = pair_dirs["llama"]
    make_model("llama", 200, hidden=32, layers=1).save_pretrained(tmp_path / "d")
    with pytest.raises(OnlineSpecError, match="draft's vocabulary has 200 tokens, fewer than the 300"):
        osc.load_pair(target=str(t), draft=str(tmp_path / "d"))


def test_bert_is_not_a_causal_lm(tmp_path, pair_dirs, tokenizer):
    from transformers import BertConfig, BertForMaskedLM
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64)).save_pretrained(tmp_path / "b")
    tokenizer.save_pretrained(tmp_path / "b")
    with pytest.raises(OnlineSpecError, match="saved as BertForMaskedLM, not a causal language model"):
        osc.load_pair(target=str(tmp_path / "b"), draft=str(pair_dirs["llama"][1]))
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    cfg.pop("architectures")  # no architectures: an encoder type without is_decoder
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(OnlineSpecError, match="not a causal language model"):
        osc.load_pair(target=str(tmp_path / "b"), draft=str(pair_dirs["llama"][1]))


def test_tokenizer_with_one_merge_dropped(tmp_path, pair_dirs):
    t, d = pair_dirs["llama"]
    bad = copy_dir(d, tmp_path / "d")
    tj = json.loads((bad / "tokenizer.json").read_text())
    tj["model"]["merges"] = tj["model"]["merges"][:-1]  # same vocabulary, one merge fewer
    (bad / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(OnlineSpecError, match="tokenizers differ in their merges"):
        osc.load_pair(target=str(t), draft=str(bad))


def test_nan_draft(tmp_path, pair_dirs, llama_pair):
    t, d = pair_dirs["llama"]
    with torch.no_grad():
        for p in llama_pair.draft.module.parameters():
            p.fill_(float("nan"))
    eng = osc.Engine(llama_pair, k=3, temperature=1.0)  # frozen: no guard involved
    with pytest.raises(OnlineSpecError, match="cannot sample: .*NaN"):
        eng.generate("def add(a, b):", max_new_tokens=8)
    for name in ("ogd", "ensemble"):  # the guard would "restore" NaN weights: refuse up front
        with pytest.raises(OnlineSpecError, match="draft's weights contain NaN or inf"):
            osc.Engine(llama_pair, k=3, updater=name)
    llama_pair.draft.module.save_pretrained(tmp_path / "nan")
    with pytest.raises(OnlineSpecError, match="draft's weights contain NaN or inf"):
        osc.load_pair(target=str(t), draft=str(tmp_path / "nan"))


# ---- prompts and lengths ------------------------------------------------------------------
def test_prompt_longer_than_gpt2_positions(pair_dirs):
    t, d = pair_dirs["gpt2"]  # n_positions = 512
    eng = osc.Engine(osc.load_pair(target=str(t), draft=str(d)), k=3)
    with pytest.raises(OnlineSpecError, match=r"prompt \(600 tokens\) plus max_new_tokens \(8\) exceed "
                                              r"the model's 512 positions; shorten the prompt"):
        eng.generate([3 + i % 290 for i in range(600)], max_new_tokens=8)
    with pytest.raises(OnlineSpecError, match="exceed the model's 512 positions"):
        eng.generate([3 + i % 290 for i in range(500)], max_new_tokens=64)
    assert len(eng.generate([3 + i % 290 for i in range(500)], max_new_tokens=10).token_ids) <= 10


def test_huge_prompt_and_max_new_tokens_fail_fast(llama_pair):
    eng = osc.Engine(llama_pair, k=3)
    t0 = time.perf_counter()
    with pytest.raises(OnlineSpecError, match="characters, more than"):
        eng.generate("x" * (2 << 20), max_new_tokens=8)
    with pytest.raises(OnlineSpecError, match="cannot fit the model's 512 positions"):
        eng.generate("SELECT name FROM users; " * 40000, max_new_tokens=8)  # ~1 MB: refused untokenised
    with pytest.raises(OnlineSpecError, match="exceed the model's 512 positions"):
        eng.generate("SELECT name FROM users; " * 100, max_new_tokens=8)
    with pytest.raises(OnlineSpecError, match="max_new_tokens must be an integer in 1.."):
        eng.generate("abc", max_new_tokens=10 ** 9)
    assert time.perf_counter() - t0 < 30
    for bad in (0, -1, True, 2.0, "8"):
        with pytest.raises(OnlineSpecError, match="max_new_tokens must be a positive integer"):
            eng.generate("abc", max_new_tokens=bad)


@pytest.mark.parametrize("prompt,match", [
    (None, "the prompt must be a string, a list of token ids or a 1-D integer tensor; got NoneType"),
    (3.5, "the prompt must be a string"),
    ([1.0, 2.0], r"prompt ids must be integers; got \[1.0, 2.0\]"),
    ([5, True], "prompt ids must be integers"),
    (torch.tensor([1.0, 2.0]), "dtype torch.float32; token ids must be integers"),
    ("abc\ud800def", r"contains '\\ud800' at character 3, which is not valid text"),
    ([], "the prompt is empty"),
    ([5, 10 ** 6], "outside the vocabulary"),
])
def test_bad_prompts(llama_pair, prompt, match):
    with pytest.raises(OnlineSpecError, match=match):
        osc.Engine(llama_pair, k=2).generate(prompt, max_new_tokens=4)


# ---- engine and updater options -------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    ({"seed": "abc"}, "seed must be an integer"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"seed": -1}, "seed must be an integer"),
    ({"temperature": "0.5"}, "temperature must be a finite number"),
    ({"temperature": float("inf")}, "temperature must be a finite number"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"top_k": True}, "top_k must be an integer"),
    ({"top_p": "x"}, "top_p must be a number"),
    ({"k": True}, "k must be an integer in 0..32"),
    ({"k_max": False}, "k_max must be an integer"),
    ({"dynamic_k": "yes"}, "dynamic_k must be True or False"),
    ({"feedback_window": 2.0}, "feedback_window must be an integer"),
    ({"updater": None}, "updater must be a name"),
    ({"updater_options": ["lr"]}, "updater_options must be a dict"),
    ({"updater": "ogd", "updater_options": {"lr": "fast"}}, "lr must be a finite number, got 'fast'"),
    ({"updater": "ogd", "updater_options": {"lr": float("nan")}}, "lr must be a finite number"),
    ({"updater": "ogd", "updater_options": {"every": 2.5}}, "every must be an integer, got 2.5"),
    ({"updater": "ogd", "updater_options": {"merge": "yes"}}, "merge must be True or False"),
    ({"updater": "ogd", "updater_options": {"loss": 3}}, "loss must be a string"),
    ({"updater": "ensemble", "updater_options": {"lr": "fast"}}, "lr must be a finite number"),
])
def test_typed_engine_and_updater_options(llama_pair, kw, match):
    with pytest.raises(OnlineSpecError, match=match):
        osc.Engine(llama_pair, **kw)


def test_typed_live_switches(llama_pair):
    eng = osc.Engine(llama_pair, k=2)
    with pytest.raises(OnlineSpecError, match="k must be an integer"):
        eng.set_k(True)
    with pytest.raises(OnlineSpecError, match="temperature must be a finite number"):
        eng.set_sampling(float("inf"))
    with pytest.raises(OnlineSpecError, match="top_k must be an integer"):
        eng.set_sampling(1.0, top_k=2.5)
    with pytest.raises(OnlineSpecError, match="lr must be a finite number, got 'fast'"):
        eng.set_updater("ogd", lr="fast")
    assert eng.config.k == 2 and eng.updater_name == "frozen"


# ---- streams and output folders -------------------------------------------------------------
def test_stream_not_utf8_and_surrogates(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_bytes(b'{"topic": "x", "prompt": "caf\xe9"}\n')
    with pytest.raises(OnlineSpecError, match="is not UTF-8 text .* save it as UTF-8 JSONL"):
        load_stream(p)
    with pytest.raises(OnlineSpecError, match=r'"prompt" contains .* lone surrogate'):
        parse_stream_line('{"prompt": "a \\ud800 b"}')
    with pytest.raises(OnlineSpecError, match=r'"topic" contains .* lone surrogate'):
        parse_stream_line('{"prompt": "ok", "topic": "\\udfff"}')
    p.write_text('{"prompt": "\\ud800"}\n')
    with pytest.raises(OnlineSpecError, match="s.jsonl line 1: .*lone surrogate"):
        load_stream(p)


def test_run_out_naming_a_file(tmp_path, capsys):
    from onlinespec_core.cli import main as cli
    stream = tmp_path / "s.jsonl"
    stream.write_text('{"topic": "a", "prompt": "1 + 1 ="}\n')
    f = tmp_path / "results.txt"
    f.write_text("mine")
    for out in (f, f / "sub"):
        assert cli(["run", "--stream", str(stream), "--out", str(out)]) == 2
        assert "is a file, not a folder; pick a folder path" in capsys.readouterr().err
    assert f.read_text() == "mine"


# ---- the GUI's command line -------------------------------------------------------------------
@pytest.mark.parametrize("argv,match", [
    (["--k", "99"], "--k 99: must be in 0..32"),
    (["--k", "-1"], "--k -1: must be in 0..32"),
    (["--updater", "bogus"], "unknown updater 'bogus'; choose one of frozen"),
    (["--compare", "ogd", "bogus"], "unknown updater 'bogus'"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0: must be in 1.."),
])
def test_gui_args_error_instead_of_clamping(argv, match, capsys):
    from app.main import parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2 and match in capsys.readouterr().err
    assert parse_args(["--k", "5", "--updater", "ogd"]).k == 5
