"""Cost-aware draft length: the policy's arithmetic, and the engine stays lossless under it."""
from __future__ import annotations

import torch

import onlinespec_core as osc
from onlinespec_core.feedback import Round
from onlinespec_core.kpolicy import CostK


def _round(k: int, accepted: int, draft_s: float, verify_s: float) -> Round:
    return Round(index=0, context_len=10, k=k, drafted=[1] * k, accepted=accepted,
                 emitted=[1] * (accepted + 1), kind="correction", draft_s=draft_s, verify_s=verify_s)


def feed(p: CostK, k: int, accepted: int, d: float = 0.1e-3, t1: float = 5e-3, per_row: float = 0.4e-3,
         n: int = 30) -> None:
    for _ in range(n):
        p.observe(_round(0, 0, 0.0, t1), prefill=False)
        p.observe(_round(k, accepted, k * d, t1 + k * per_row), prefill=False)


def test_never_drafts_when_the_draft_is_never_right_but_probes():
    p = CostK(k_max=8, probe_every=4, probe_max=16)
    feed(p, 4, 0, per_row=1e-3)
    assert p.alpha < 0.05
    ks = []
    for _ in range(60):
        k = p.best_k()
        ks.append(k)
        p.observe(_round(k, 0, k * 1e-4, 5e-3 + k * 1e-3), prefill=False)  # every probe loses
    probes = [i for i, k in enumerate(ks) if k == 1]
    assert set(ks) == {0, 1}
    assert [b - a for a, b in zip(probes, probes[1:])][:3] == [8, 16, 16]  # the gap doubles after each lost probe, capped
    p.since_probe = p.gap  # the next round probes; an accepted token alone does not make
    assert p.best_k() == 1  # drafting pay here, so the gap stays long ...
    p.observe(_round(1, 1, 1e-4, 6e-3), prefill=False)
    assert p.gap == 16
    p.accepted, p.rejected = 9.0, 1.0  # ... until the draft has become good (a = 0.9):
    p.probing = True                     # then a probe resets the gap, and k > 0 wins outright
    p.observe(_round(1, 1, 1e-4, 6e-3), prefill=False)
    assert p.gap == 4 and p.best_k() > 1


def test_drafts_long_when_the_draft_is_good_and_cheap():
    p = CostK(k_max=8)
    feed(p, 4, 4)  # every position accepted
    assert p.alpha > 0.9 and p.best_k() == 8
    assert p.rate(8) > p.rate(4) > p.rate(0)


def test_a_middling_draft_gets_a_middling_k():
    p = CostK(k_max=16)
    feed(p, 4, 1, per_row=1.0e-3)  # a ~ 0.5, each verified row costs 20% of a step
    k = p.best_k()
    assert 1 <= k <= 4
    assert p.rate(k) >= max(p.rate(j) for j in range(17)) - 1e-12
    assert p.t_of(9) > p.t_of(5) > p.t_of(1)  # unseen row counts: a line through the seen ones


def test_engine_with_cost_k_is_lossless_and_uses_k0(pair_dirs):
    t, d = pair_dirs["llama"]
    pair = osc.load_pair(target=str(t), draft=str(d))  # a random draft: almost never right
    ids = pair.tokenizer("def add(a, b):")["input_ids"]
    ref = pair.target.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=60, pad_token_id=2,
                               attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    eng = osc.Engine(pair, k=4, cost_k=True, k_max=8)
    out = eng.generate(ids, max_new_tokens=60)
    assert out.token_ids == ref
    ks = [r.k for r in out.rounds]
    assert 0 in ks and max(ks) <= 8
    samp = osc.Engine(pair, k=4, cost_k=True, temperature=1.0, seed=3).generate(ids, 30)
    assert len(samp.token_ids) == 30


def test_cost_k_excludes_dynamic_k(pair_dirs):
    import pytest
    t, d = pair_dirs["llama"]
    pair = osc.load_pair(target=str(t), draft=str(d))
    with pytest.raises(osc.OnlineSpecError, match="dynamic_k and cost_k"):
        osc.Engine(pair, k=4, cost_k=True, dynamic_k=True)


def test_bench_runs_an_updater_with_cost_k(pair_dirs, tmp_path):
    import json

    from onlinespec_core import bench
    t, d = pair_dirs["llama"]
    stream = tmp_path / "s.jsonl"
    stream.write_text("\n".join(json.dumps({"topic": "code", "prompt": p}) for p in
                                ("def add(a, b):", "def sub(a, b):")) + "\n")
    out = tmp_path / "b.json"
    assert bench.main(["--pair", str(t), "--draft", str(d), "--stream", str(stream), "--k", "3",
                       "--max-new-tokens", "12", "--reps", "1", "--warmup-tokens", "4", "--costs", "off",
                       "--methods", "target_ar,frozen,frozen+cost_k", "--no-progress", "--json", str(out)]) == 0
    runs = {r["name"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"target_ar", "frozen", "frozen+cost_k"}
    assert runs["frozen+cost_k"]["tau"] >= 1.0


def test_a_probe_after_a_run_of_k0_rounds_is_not_a_cost_sample():
    """After k = 0 rounds the draft first reads the tokens it missed, and that round's verify
    was measured slow: neither goes into D(k) or t(n); a round after a drafting round does."""
    p = CostK(k_max=8)
    p.observe(_round(1, 1, 1e-4, 4e-3), prefill=False)
    for _ in range(10):
        p.observe(_round(0, 0, 0.0, 4e-3), prefill=False)
    p.observe(_round(1, 0, 5e-3, 9e-3), prefill=False)  # the probe: catch-up read, slow verify
    assert p.draft_of(1) == 1e-4 and p.t_of(2) == 4e-3
    p.observe(_round(1, 1, 2e-4, 6e-3), prefill=False)  # the next round is a cost sample again
    assert p.draft_of(1) > 1e-4 and p.t_of(2) > 4e-3


def test_proposal_cost_has_a_fixed_part_and_prompts_reset_most_of_a():
    p = CostK(k_max=8)
    for _ in range(20):
        p.observe(_round(1, 0, 3e-4, 4e-3), prefill=False)
        p.observe(_round(4, 0, 6e-4, 5e-3), prefill=False)
    assert abs(p.draft_of(2) - 4e-4) < 1e-9  # a line through (1, 0.3 ms) and (4, 0.6 ms), not 2 x 0.3
    assert abs(p.draft_of(8) - 1e-3) < 1e-9
    assert p.alpha < 0.1
    before = p.accepted + p.rejected
    p.observe(_round(0, 0, 0.0, 20e-3), prefill=True)  # a new prompt: a's counts shrink ...
    assert p.accepted + p.rejected < 0.5 * before
    p.observe(_round(1, 1, 3e-4, 4e-3), prefill=False)  # ... so its first accepted probe moves a far
    assert p.alpha > 0.25  # (it was < 0.1)


def test_a_probe_still_corrects_an_estimate_above_it():
    """A noisy moment can leave t(n) or D(k) high enough that k = 0 wins for good; a probe's
    timings (an upper bound on a drafting round's) then pull an estimate above them down."""
    p = CostK(k_max=4)
    p.observe(_round(1, 1, 5e-3, 20e-3), prefill=False)  # a slow moment: D(1) 5 ms, t(2) 20 ms
    for _ in range(10):
        p.observe(_round(0, 0, 0.0, 4e-3), prefill=False)
    p.observe(_round(1, 1, 1e-3, 6e-3), prefill=False)  # a probe, cheaper than both estimates
    assert p.draft_of(1) < 5e-3 and p.t_of(2) < 20e-3


def test_a_one_off_first_proposal_does_not_park_cost_k_at_k0():
    """A draft's first proposal may pay a one-off cost (a feature draft packs its readout): a
    probe's cheaper timing caps D(k) at once, so drafting resumes once it pays."""
    p = CostK(k_max=4)
    p.observe(_round(1, 1, 20e-3, 4.5e-3), prefill=False)  # D(1) = 20 ms: the one-off
    for _ in range(10):
        p.observe(_round(0, 0, 0.0, 4e-3), prefill=False)
    assert p.best_k() == 0
    p.observe(_round(1, 1, 0.8e-3, 4.6e-3), prefill=False)  # the probe: 0.8 ms
    assert p.draft_of(1) == 0.8e-3
    p.accepted, p.rejected = 8.0, 2.0
    assert p.best_k() >= 1
