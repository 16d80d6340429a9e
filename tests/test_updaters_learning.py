"""Updaters learn: a draft far from the target gains acceptance on a repetitive stream, and
a run saved mid-stream continues exactly (outputs, per-round feedback, metrics, updater state)."""
from __future__ import annotations

import pytest
import torch

import onlinespec_core as osc

# the shipped defaults (the issue: learning must not depend on test-specific step sizes)
LEARNERS = [("ogd", {}), ("optimistic", {}), ("optimistic", {"form": "momentum"}),
            ("ensemble", {}), ("dpo", {}), ("dpo", {"mode": "sft"}),
            ("ogd", {"cadence": "chunk", "chunk_prompts": 1, "epochs": 2})]


@pytest.fixture(scope="module")
def far_pair_dirs(tmp_path_factory, tokenizer):
    """A target and a draft with unrelated random weights: the draft starts far away."""
    from tests.tiny import far_pair_dirs
    return list(far_pair_dirs(tmp_path_factory.mktemp("far"), tokenizer))


def mean_tau(name, opts, dirs, prompts=12, n=32):
    pair = osc.load_pair(target=dirs[0], draft=dirs[1])
    eng = osc.Engine(pair, k=4, updater=name, updater_options=opts)
    taus = [eng.generate("def add(a, b):", max_new_tokens=n).stats["tau"] for _ in range(prompts)]
    return taus, eng


@pytest.fixture(scope="module")
def frozen_tau(far_pair_dirs):
    taus, _ = mean_tau("frozen", {}, far_pair_dirs)
    assert max(taus) == min(taus)  # nothing changes without learning
    return taus[0]


@pytest.mark.parametrize("name,opts", LEARNERS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(LEARNERS)])
def test_every_updater_learns_on_a_repetitive_stream(far_pair_dirs, frozen_tau, name, opts):
    taus, eng = mean_tau(name, opts, far_pair_dirs)
    late = sum(taus[-3:]) / 3
    # within 12 prompts of 32 tokens (<= 384 rounds) the draft has learned the target's path; at
    # the shipped defaults (anchor 0.02 toward the random draft included), so the steps are small
    assert late >= frozen_tau + 0.3, (name, opts, frozen_tau, taus)
    assert eng.updater.stats()["updates"] > 0 and eng.updater.stats()["skipped"] == 0


RESTORE = [("ogd", {"every": 2}, 0.0), ("optimistic", {}, 0.0), ("optimistic", {"form": "momentum"}, 0.0),
           ("ensemble", {"every": 2, "hedge": "discounted"}, 0.0), ("dpo", {"every": 2, "ref_every": 6}, 0.0),
           ("ogd", {"cadence": "chunk", "chunk_prompts": 2, "batch": 3}, 0.0),
           ("ogd", {"every": 2}, 0.8), ("ensemble", {"every": 2}, 0.8),  # sampling: RNG restored too
           ("dpo", {"every": 2, "cache_lr": 0.3, "bigram_lr": 1.0}, 0.0),  # the logit cache's tables too
           ("ogd", {"every": 2, "bigram_lr": 1.0, "cache_decay": 0.1}, 0.8)]


def run_prompts(eng, prompts):
    rec = []
    for p in prompts:
        out = eng.generate(p, max_new_tokens=24)
        rec.append((out.token_ids, [(r.drafted, r.accepted, r.updated, r.loss) for r in out.rounds],
                    {k: out.stats[k] for k in ("tau", "rounds", "tokens", "acceptance_rate", "updates")}))
    return rec


@pytest.mark.parametrize("name,opts,temperature", RESTORE, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(RESTORE)])
def test_save_load_mid_run_continues_exactly(far_pair_dirs, tmp_path, name, opts, temperature):
    first = ["def add(a, b):", "Tom has 3 apples"]  # chunk cadence: saved with a full buffer
    rest = ["def add(a, b):", "The licensee shall"]
    pair = osc.load_pair(target=far_pair_dirs[0], draft=far_pair_dirs[1])
    a = osc.Engine(pair, k=3, temperature=temperature, seed=5, updater=name, updater_options=opts)
    run_prompts(a, first)
    a.save_state(tmp_path / "state")
    expect = run_prompts(a, rest)
    pair_b = osc.load_pair(target=far_pair_dirs[0], draft=far_pair_dirs[1])  # the original draft
    b = osc.Engine(pair_b, k=3, seed=123)
    b.load_state(tmp_path / "state")
    assert b.updater_name == name
    got = run_prompts(b, rest)
    assert got == expect
    assert b.updater.stats() == a.updater.stats()
    for x, y in zip(pair.draft.module.parameters(), pair_b.draft.module.parameters()):
        assert torch.equal(x, y)


def test_ensemble_falls_back_to_frozen_when_learning_hurts(far_pair_dirs):
    """With every learning expert bad (huge steps), Hedge moves the weight to the step size 0
    expert, so the deployed draft returns toward the offline one."""
    pair = osc.load_pair(target=far_pair_dirs[0], draft=far_pair_dirs[1])
    eng = osc.Engine(pair, k=4, updater="ensemble", updater_options={"lr": 1.0, "ratio": 2.0, "anchor": 0.0})
    for _ in range(3):
        eng.generate("def add(a, b):", max_new_tokens=32)
    w = eng.updater.stats()["weights"]
    assert w[0] == max(w), w


def test_logit_cache_alone_learns_and_stays_lossless(far_pair_dirs):
    """The fast logit tables with the network's own steps off (lr tiny): tau still rises on the
    repetitive stream, from the rounds' own logits (no backward), and every output is the
    target's own."""
    pair = osc.load_pair(target=far_pair_dirs[0], draft=far_pair_dirs[1])
    ar = osc.Engine(osc.load_pair(target=far_pair_dirs[0], draft=far_pair_dirs[1]), k=0)
    want = ar.generate("def add(a, b):", max_new_tokens=32).token_ids
    eng = osc.Engine(pair, k=4, updater="ogd", updater_options={"lr": 1e-9, "anchor": 0.0, "cache_lr": 0.3,
                                                                "bigram_lr": 2.0, "cache_decay": 0.01})
    taus = []
    for _ in range(6):
        out = eng.generate("def add(a, b):", max_new_tokens=32)
        assert out.token_ids == want
        taus.append(out.stats["tau"])
    assert taus[-1] >= taus[0] + 0.3, taus
    assert pair.draft.logit_cache is eng.updater.cache and eng.updater.cache.rows
    tables = pair.draft.logit_cache
    eng.set_updater("frozen")  # like the learnt weights, the tables stay (and stop learning)
    assert pair.draft.logit_cache is tables
    before = tables.unigram.clone()
    assert eng.generate("def add(a, b):", max_new_tokens=32).token_ids == want
    assert torch.equal(tables.unigram, before)
