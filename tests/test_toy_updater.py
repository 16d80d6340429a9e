"""Adding an updater is one new file plus its registry line: a toy SGD updater written to a
fresh file here works everywhere an updater is used (engine, compare sharing, save/load, the
app's option checks, `onlinespec run`) with no other change."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

import onlinespec_core as osc
from onlinespec_core.compare import CompareConfig, CompareRunner
from onlinespec_core.errors import OnlineSpecError
from onlinespec_core.updaters import REGISTRY

TOY = textwrap.dedent('''
    """toy: plain SGD on the shared distillation loss, one step per round."""
    from dataclasses import dataclass

    from onlinespec_core.updaters.gradient import (GradConfig, GradientUpdater, fp32_copy,
                                                   make_optimizer, optimizer_step, write_params)


    @dataclass
    class ToyConfig(GradConfig):
        lr: float = 0.05
        optimizer: str = "sgd"
        every: int = 1
        batch: int = 1
        anchor: float = 0.0


    class ToyUpdater(GradientUpdater):
        name = "toy"
        Config = ToyConfig

        def init_weights(self):
            self.master = fp32_copy(self.params)
            self.opt = make_optimizer("sgd", self.master, self.cfg.lr)

        def deployed(self):
            return self.master

        def step(self, batch, n_new):
            _, grads = self.losses_and_grads(batch)
            if grads is None:
                return False
            optimizer_step(self.opt, self.master, grads)
            write_params(self.params, self.master)
            return True
''')
PROMPTS = ["def add(a, b):", "Tom has 3 apples and buys 4 more."]


@pytest.fixture
def toy(tmp_path, monkeypatch):
    (tmp_path / "toy_updater_mod.py").write_text(TOY)  # the one new file ...
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(REGISTRY, "toy", "toy_updater_mod:ToyUpdater")  # ... and its registry line
    yield "toy"
    sys.modules.pop("toy_updater_mod", None)


def hf_greedy(target, ids, n):
    out = target.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, pad_token_id=2,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def test_toy_updater_runs_learns_and_stays_lossless(toy, llama_pair):
    pair = llama_pair
    w0 = [p.detach().clone() for p in pair.draft.module.parameters()]
    eng = osc.Engine(pair, k=3, updater=toy, updater_options={"lr": 0.1})
    for p in PROMPTS:
        out = eng.generate(p, max_new_tokens=24)
        assert out.token_ids == hf_greedy(pair.target, pair.tokenizer(p)["input_ids"], 24)
        assert all(r.loss is not None for r in out.rounds if r.k > 0)
    snap = eng.updater.snapshot()
    assert snap.name == "toy" and snap.updates > 0 and snap.skipped == 0 and snap.lr == 0.1
    assert any(not torch.equal(a, b) for a, b in zip(w0, pair.draft.module.parameters()))
    assert not eng.updater.reads_offpath_rows(pair.draft)  # distils on the path: compare may replay


def test_toy_updater_in_compare_save_load_and_app_checks(toy, llama_pair, pair_dirs, tmp_path):
    from app.spec import check_updater, updater_fields
    fresh_pair = lambda: osc.load_pair(target=str(pair_dirs["llama"][0]), draft=str(pair_dirs["llama"][1]))  # noqa: E731
    assert updater_fields(toy)["lr"] == 0.05 and updater_fields(toy)["optimizer"] == "sgd"
    check_updater(toy, {"lr": 0.2})
    with pytest.raises(OnlineSpecError, match="lr must be a finite number"):
        check_updater(toy, {"lr": "fast"})
    with pytest.raises(OnlineSpecError, match="no option"):
        osc.Engine(llama_pair, updater=toy, updater_options={"nope": 1})

    runner = CompareRunner(llama_pair, [CompareConfig("a", "frozen", k=2), CompareConfig("b", toy, k=3)])
    outs = {}
    for ci, ev in runner.run([("code", PROMPTS[0])], max_new_tokens=16):
        if ev.kind == "done":
            outs[ci] = ev.data["token_ids"]
    assert outs[0] == outs[1] == hf_greedy(llama_pair.target, llama_pair.tokenizer(PROMPTS[0])["input_ids"], 16)
    assert runner.shared.stats.forwards[1] == 0  # the toy's rounds replayed config a's target pass

    a = osc.Engine(llama_pair, k=3, updater=toy)
    a.generate(PROMPTS[0], max_new_tokens=12)
    a.save_state(tmp_path / "s")
    b = osc.Engine(fresh_pair(), k=3)
    b.load_state(tmp_path / "s")
    assert b.updater_name == toy and b.updater.snapshot() == a.updater.snapshot()
    ra, rb = a.generate(PROMPTS[1], 12).rounds, b.generate(PROMPTS[1], 12).rounds
    assert [(r.drafted, r.accepted, r.loss) for r in ra] == [(r.drafted, r.accepted, r.loss) for r in rb]


def test_toy_updater_from_the_cli(toy, pair_dirs, tmp_path):
    from onlinespec_core.runner import main
    t, d = pair_dirs["llama"]
    stream = tmp_path / "s.jsonl"
    stream.write_text("".join(json.dumps({"topic": "code", "prompt": p}) + "\n" for p in PROMPTS))
    assert main(["--pair", str(t), "--draft", str(d), "--stream", str(stream), "--updater", toy,
                 "--updater-option", "lr=0.1", "--max-new-tokens", "12", "--out", str(tmp_path / "o"),
                 "--no-plots", "--no-progress"]) == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["updater_stats"]["name"] == toy and m["updater_stats"]["updates"] > 0
