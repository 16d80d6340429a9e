"""Each bad input a user can cause raises OnlineSpecError with the fix in its message."""
from __future__ import annotations

import json

import pytest

import onlinespec_core as osc
from onlinespec_core.errors import OnlineSpecError
from onlinespec_core.streams import load_stream, parse_stream_line
from tests.tiny import build_tokenizer


def test_missing_model_path(tmp_path, pair_dirs):
    with pytest.raises(OnlineSpecError, match="does not exist; pass an existing model directory"):
        osc.load_pair(target=str(tmp_path / "nope"), draft=str(pair_dirs["llama"][1]))
    with pytest.raises(OnlineSpecError, match="has no config.json"):
        osc.load_pair(target=str(tmp_path), draft=str(pair_dirs["llama"][1]))


def test_missing_draft_path(tmp_path, pair_dirs):
    with pytest.raises(OnlineSpecError, match="draft model path"):
        osc.load_pair(target=str(pair_dirs["llama"][0]), draft=str(tmp_path / "missing"))


def test_tokenizers_that_differ(tmp_path, pair_dirs):
    from transformers import AutoModelForCausalLM
    t, d = pair_dirs["llama"]
    other = tmp_path / "draft"
    AutoModelForCausalLM.from_pretrained(d).save_pretrained(other)
    tok = build_tokenizer(vocab_size=280)  # a different vocabulary
    tok.save_pretrained(other)
    with pytest.raises(OnlineSpecError, match="tokenizers differ: id .* use a draft that shares"):
        osc.load_pair(target=str(t), draft=str(other))


def test_not_a_causal_lm(tmp_path, pair_dirs):
    from transformers import ViTConfig
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(OnlineSpecError, match="not a causal language model"):
        osc.load_pair(target=str(tmp_path), draft=str(pair_dirs["llama"][1]))


def test_pickle_weights_refused(tmp_path, pair_dirs):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(pair_dirs["llama"][1])
    m.config.save_pretrained(tmp_path)
    import torch
    torch.save(m.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle: must be refused
    with pytest.raises(OnlineSpecError, match="safetensors"):
        osc.load_pair(target=str(tmp_path), draft=str(pair_dirs["llama"][1]))


@pytest.mark.parametrize("k", [-1, 33, 2.5, "4"])
def test_k_out_of_range(llama_pair, k):
    with pytest.raises(OnlineSpecError, match="k must be an integer in 0..32"):
        osc.Engine(llama_pair, k=k)
    eng = osc.Engine(llama_pair, k=4)
    with pytest.raises(OnlineSpecError, match="k must be an integer"):
        eng.set_k(k)


def test_bad_sampling_and_updater(llama_pair):
    with pytest.raises(OnlineSpecError, match="temperature must be >= 0"):
        osc.Engine(llama_pair, temperature=-1.0)
    with pytest.raises(OnlineSpecError, match="top_p must be in"):
        osc.Engine(llama_pair, temperature=1.0, top_p=0.0)
    with pytest.raises(OnlineSpecError, match="unknown updater 'nope'; choose one of"):
        osc.Engine(llama_pair, updater="nope")
    with pytest.raises(OnlineSpecError, match="prompt is empty"):
        osc.Engine(llama_pair).generate([], max_new_tokens=4)


def test_malformed_stream_line(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"topic": "math", "prompt": "1 + 1 ="}\n{"topic": "math", "prompt": \n')
    with pytest.raises(OnlineSpecError, match=r"s.jsonl line 2: not valid JSON"):
        load_stream(p)
    with pytest.raises(OnlineSpecError, match='needs a non-empty string "prompt"'):
        parse_stream_line(json.dumps({"topic": "x"}))
    with pytest.raises(OnlineSpecError, match="not found; pass a JSONL file path"):
        load_stream(tmp_path / "missing.jsonl")


def test_corrupt_saved_state(tmp_path, llama_pair):
    eng = osc.Engine(llama_pair, k=3)
    eng.generate("def add(a, b):", max_new_tokens=8)
    state = eng.save_state(tmp_path / "state")
    with pytest.raises(OnlineSpecError, match="does not exist"):
        eng.load_state(tmp_path / "other")
    (state / "state.json").write_text("{ not json")
    with pytest.raises(OnlineSpecError, match="is corrupt .* save it again"):
        eng.load_state(state)
    state = eng.save_state(tmp_path / "state")
    (state / "draft.safetensors").write_bytes(b"garbage")
    with pytest.raises(OnlineSpecError, match="draft.safetensors does not match its manifest"):
        eng.load_state(state)
    (state / "draft.safetensors").unlink()
    with pytest.raises(OnlineSpecError, match=r"incomplete \(draft.safetensors missing\)"):
        eng.load_state(state)


def test_cli_reports_errors(capsys):
    from onlinespec_core.cli import main
    assert main(["nope"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_hub_id_offline_is_clear(pair_dirs):
    with pytest.raises(OnlineSpecError, match="connect to the hub for hub ids"):
        osc.load_pair(target="someone/not-cached-model", draft=str(pair_dirs["llama"][1]))


def test_device_map_goes_through_accelerate(pair_dirs):
    t, d = pair_dirs["llama"]
    layers = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
              "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}  # a per-layer map
    pair = osc.load_pair(target=str(t), draft=str(d), device_map=layers)
    plain = osc.load_pair(target=str(t), draft=str(d))
    out = osc.Engine(pair, k=3).generate("def add(a, b):", max_new_tokens=8)
    assert out.token_ids == osc.Engine(plain, k=3).generate("def add(a, b):", max_new_tokens=8).token_ids


def test_demo_keyword_without_assets(monkeypatch, tmp_path):
    from onlinespec_core import models
    monkeypatch.setattr(models, "DEMO_DIR", tmp_path / "none")
    with pytest.raises(OnlineSpecError, match="run `onlinespec train-demo`"):
        osc.load_pair("demo")
