"""export-draft: the evolved lm draft as a plain HF model dir (library and CLI)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import onlinespec_core as osc
from onlinespec_core.cli import main as cli
from onlinespec_core.export import export_draft, export_engine_draft


@pytest.fixture
def evolved(pair_dirs, tmp_path):
    t, d = pair_dirs["llama"]
    pair = osc.load_pair(target=str(t), draft=str(d))
    eng = osc.Engine(pair, k=3, updater="ogd", updater_options={"every": 1})
    eng.generate("def add(a, b):", max_new_tokens=20)
    eng.save_state(tmp_path / "state")
    return eng, tmp_path / "state"


def same_logits(model, draft_module, ids):
    with torch.no_grad():
        a = model(torch.tensor([ids])).logits
        b = draft_module(torch.tensor([ids])).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_export_from_state_and_cli(evolved, pair_dirs, tmp_path):
    eng, state = evolved
    ids = eng.pair.tokenizer("SELECT name FROM users")["input_ids"]
    out = export_draft(state, tmp_path / "hf")
    m = AutoModelForCausalLM.from_pretrained(out)
    same_logits(m, eng.draft.module, ids)
    assert AutoTokenizer.from_pretrained(out)("def")["input_ids"] == eng.pair.tokenizer("def")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(pair_dirs["llama"][1])
    assert any(not torch.equal(a, b) for a, b in zip(m.parameters(), base.parameters()))  # it evolved
    assert json.loads((out / "onlinespec_export.json").read_text())["updater"] == "ogd"
    # CLI, with an explicit base, over an existing folder
    assert cli(["export-draft", str(state), "--out", str(tmp_path / "hf"), "--base", str(pair_dirs["llama"][1])]) == 0
    same_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), eng.draft.module, ids)
    # the exported dir works as a draft again (and as HF's assistant model)
    pair2 = osc.load_pair(target=str(pair_dirs["llama"][0]), draft=str(out))
    assert osc.Engine(pair2, k=3).generate(ids, max_new_tokens=12).token_ids == \
        osc.Engine(eng.pair, k=3).generate(ids, max_new_tokens=12).token_ids


def test_export_live_engine(evolved, tmp_path):
    eng, _ = evolved
    out = export_engine_draft(eng, tmp_path / "live")
    same_logits(AutoModelForCausalLM.from_pretrained(out), eng.draft.module, [5, 6, 7])


def test_export_errors(tmp_path, capsys):
    with pytest.raises(osc.OnlineSpecError, match="does not exist"):
        export_draft(tmp_path / "nope", tmp_path / "out")
    from safetensors.torch import save

    from onlinespec_core.atomic import write_manifest

    def fake_state(kind: str) -> None:
        (tmp_path / "s").mkdir(exist_ok=True)
        meta = {"version": 2, "config": {}, "round_index": 0, "draft_kind": kind,
                "updater": {"name": "frozen", "options": {}, "state": {}},
                "fingerprint": {"target": "", "draft": ""}}
        (tmp_path / "s" / "state.json").write_text(json.dumps(meta))
        (tmp_path / "s" / "draft.safetensors").write_bytes(save({}))
        write_manifest(tmp_path / "s", "state")
    fake_state("eagle")
    with pytest.raises(osc.OnlineSpecError, match="not a causal LM"):
        export_draft(tmp_path / "s", tmp_path / "out")
    fake_state("lm")
    assert cli(["export-draft", str(tmp_path / "s"), "--out", str(tmp_path / "out")]) == 2
    assert "--base" in capsys.readouterr().err


def test_bench_updaters_script_runs(tmp_path, capsys):
    from onlinespec_core.studies.shift_bench import main as bench
    out = tmp_path / "b.json"
    assert bench(["--tiny", "--runs", "frozen;ensemble:hedge=last", "--per-topic", "2", "--max-new-tokens", "10",
                  "--window", "4", "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["name"] for r in runs] == ["frozen", "ensemble:hedge=last"]
    for r in runs:
        assert 0 <= r["update_fraction"] < 1 and r["tau_A_first"] >= 1 and r["tau_B_last"] >= 1
    assert len(runs[1]["weights_A_end"]) == 4 and runs[1]["options"] == {"hedge": "last"}  # frozen expert + 3
    assert "| run | tau |" in capsys.readouterr().out
