"""The updaters' math on small problems with known answers (Hedge, optimistic OGD on a
quadratic, DPO loss and gradient sign, fp32 parameter average, losses, guard, cadence)."""
from __future__ import annotations

import math

import pytest
import torch

import onlinespec_core as osc
from onlinespec_core.updaters import REGISTRY, make_updater
from onlinespec_core.updaters.ensemble import EnsembleUpdater, Hedge, weighted_average
from onlinespec_core.updaters.gradient import write_params
from onlinespec_core.updaters.losses import (distill_loss, dpo_loss, n_positions, preference_pair,
                                             round_distill_loss)
from onlinespec_core.updaters.optimistic import OptimisticUpdater, optimistic_step


# ---- Hedge -------------------------------------------------------------------------------
def softmax_by_hand(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


def test_hedge_weights_by_hand():
    h = Hedge(3, eps=0.5)
    assert h.weights() == pytest.approx([1 / 3] * 3)
    h.update([1.0, 2.0, 3.0])
    assert h.weights() == pytest.approx(softmax_by_hand([-0.5, -1.0, -1.5]))
    h.update([3.0, 1.0, 1.0])  # cumulative: L = [4, 3, 4]
    assert h.L == [4.0, 3.0, 4.0]
    assert h.weights() == pytest.approx(softmax_by_hand([-2.0, -1.5, -2.0]))
    d = Hedge(3, eps=1.0, mode="discounted", discount=0.5)
    d.update([1.0, 2.0, 3.0])
    d.update([3.0, 1.0, 1.0])  # L = 0.5 * [1, 2, 3] + [3, 1, 1] = [3.5, 2, 2.5]
    assert d.L == [3.5, 2.0, 2.5]
    assert d.weights() == pytest.approx(softmax_by_hand([-3.5, -2.0, -2.5]))
    last = Hedge(2, eps=1 / 1.2, mode="last")  # released code: softmax(-loss / T), T = 1.2
    last.update([5.0, 1.0])
    last.update([0.6, 1.8])
    assert last.weights() == pytest.approx(softmax_by_hand([-0.5, -1.5]))
    big = Hedge(2, eps=1.0)
    big.update([1e4, 1e4 + 1])  # no overflow
    assert big.weights() == pytest.approx(softmax_by_hand([0.0, -1.0]))


# ---- fp32 parameter average --------------------------------------------------------------
def test_weighted_average_is_fp32():
    g = torch.Generator().manual_seed(0)
    experts = [[1.0 + 1e-3 * torch.randn(64, generator=g), torch.randn(3, 4, generator=g)] for _ in range(3)]
    w = [0.2, 0.3, 0.5]
    avg = weighted_average(experts, w)
    ref = [sum(p * e[j].double() for p, e in zip(w, experts)) for j in range(2)]
    for a, r in zip(avg, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), r, rtol=0, atol=1e-6)
    # deploying into a bf16 module casts once: exactly round(avg), unlike averaging in bf16
    p = torch.nn.Parameter(torch.zeros(64, dtype=torch.bfloat16))
    write_params([p], [avg[0]])
    assert torch.equal(p.data, avg[0].to(torch.bfloat16))
    # experts kept in bf16 would lose the small differences the fp32 masters keep
    lossy = weighted_average([[e[0].to(torch.bfloat16)] for e in experts], w)[0]
    assert (lossy.double() - ref[0]).abs().max() > 100 * (avg[0].double() - ref[0]).abs().max()


# ---- optimistic OGD on a quadratic -------------------------------------------------------
@pytest.mark.parametrize("eta,a", [(0.1, 1.0), (0.3, 2.0), (0.05, 4.0)])
def test_optimistic_on_quadratic_matches_closed_form(eta, a):
    """f(w) = a/2 ||w - c||^2. With e_t = w_t - c: e_{t+1} = (1-2 eta a) e_t + eta a e_{t-1},
    e_0 = 0 (no hint), so e_t = e_1 (r1^t - r2^t) / (r1 - r2), r roots of r^2-(1-2ea)r-ea."""
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    w1 = torch.tensor([3.0, 1.0, -1.0], dtype=torch.float64)
    shadow, hint = [w1.clone()], [torch.zeros(3, dtype=torch.float64)]
    w = w1.clone()
    b = 1 - 2 * eta * a
    disc = math.sqrt(b * b + 4 * eta * a)
    r1, r2 = (b + disc) / 2, (b - disc) / 2
    assert max(abs(r1), abs(r2)) < 1  # stable for these step sizes
    for t in range(1, 80):
        expect = (w1 - c) * (r1 ** t - r2 ** t) / (r1 - r2)
        torch.testing.assert_close(w - c, expect, rtol=1e-9, atol=1e-12)
        w = optimistic_step(shadow, hint, [a * (w - c)], eta)[0]  # gradient at the deployed w_t
    assert (w - c).norm() < 1e-2 * (w1 - c).norm()  # and it converges


# ---- DPO -------------------------------------------------------------------------------
def test_dpo_loss_value_and_gradient_sign():
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    # margin = (-1 - -2) - (-3 - -1) = 3 -> loss = log(1 + exp(-0.1 * 3))
    assert float(dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-1.0), beta=0.1)) == pytest.approx(math.log1p(math.exp(-0.3)))
    assert float(dpo_loss(t(-1.0), t(-2.0), t(-1.0), t(-2.0))) == pytest.approx(math.log(2.0))  # pi = ref
    logits = torch.tensor([0.5, 1.0, -0.3, 0.2], requires_grad=True)
    lp = torch.log_softmax(logits, -1)
    ref = lp.detach()
    c, r = 0, 1
    dpo_loss(lp[c], lp[r], ref[c], ref[r], beta=0.1).backward()
    g = logits.grad
    assert g[c] < 0 < g[r]  # descending raises the chosen token and lowers the rejected one
    assert g[2].abs() < 1e-7 and g[3].abs() < 1e-7  # others untouched (softmax terms cancel)
    # exact gradient at margin 0: d/dz = -beta/2 * (onehot(c) - onehot(r))
    torch.testing.assert_close(g, torch.tensor([-0.05, 0.05, 0.0, 0.0]), atol=1e-7, rtol=0)


# ---- distillation losses ---------------------------------------------------------------
def test_distill_losses():
    g = torch.Generator().manual_seed(0)
    d, t = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    p, q = torch.softmax(t, -1), torch.softmax(d, -1)
    H = -(p * p.log()).sum(-1).mean()
    fkl = float(distill_loss(d, t, "fkl"))
    assert fkl == pytest.approx(float((p * (p.log() - q.log())).sum(-1).mean()), rel=1e-5)
    assert float(distill_loss(d, t, "ce")) == pytest.approx(fkl + float(H), rel=1e-5)
    assert float(distill_loss(d, t, "rkl")) == pytest.approx(float((q * (q.log() - p.log())).sum(-1).mean()), rel=1e-5)
    m = (p + q) / 2
    jsd = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    assert float(distill_loss(d, t, "jsd")) == pytest.approx(float(jsd.mean()), rel=1e-5)
    for kind in ("fkl", "rkl", "jsd"):
        assert float(distill_loss(t, t, kind)) == pytest.approx(0.0, abs=1e-6)
    # vocabulary columns the draft cannot emit (padded with -inf) are left out, not infinite
    padded = torch.cat([d, torch.full((3, 2), float("-inf"))], -1)
    t9 = torch.cat([t, torch.randn(3, 2, generator=g)], -1)
    assert float(distill_loss(padded, t9, "fkl")) == pytest.approx(fkl, rel=1e-5)


def _round(k, accepted, drafted, emitted):
    return osc.Round(index=0, context_len=5, k=k, drafted=drafted, accepted=accepted, emitted=emitted,
                     kind="correction" if accepted < k else "bonus")


def test_positions_and_pairs():
    r = _round(4, 1, [5, 6, 7, 8], [5, 9])
    assert n_positions(r, "path") == 2 and n_positions(r, "all") == 4
    assert preference_pair(r) == (1, 9, 6)  # at the first rejection: chosen 9, rejected 6
    full = _round(3, 3, [5, 6, 7], [5, 6, 7, 4])
    assert n_positions(full, "path") == 3 and preference_pair(full) is None


# ---- on a real tiny draft: Hedge measured before update, optimistic invariant, guard ------
@pytest.fixture(scope="module")
def rounds_and_pair(pair_dirs):
    t, d = pair_dirs["llama"]
    pair = osc.load_pair(target=str(t), draft=str(d))
    eng = osc.Engine(pair, k=4, keep_distributions=True)
    rounds = eng.generate("def add(a, b):", max_new_tokens=40).rounds
    rounds += eng.generate("Tom has 3 apples", max_new_tokens=24).rounds
    return [r for r in rounds if r.k > 0], pair


def fresh_draft(pair_dirs):
    t, d = pair_dirs["llama"]
    return osc.load_pair(target=str(t), draft=str(d)).draft


@torch.no_grad()
def loss_at(draft, weights, rounds):
    write_params(list(draft.module.parameters()), weights)
    return float(torch.stack([round_distill_loss(draft.train_logits(r), r) for r in rounds]).mean())


def test_ensemble_hedge_uses_losses_before_update(rounds_and_pair, pair_dirs):
    rounds, _ = rounds_and_pair
    draft = fresh_draft(pair_dirs)
    ens = EnsembleUpdater(every=2, batch=2, lr=0.01, ratio=3.0, hedge_lr=2.0, hedge="cumulative",
                          loss_scale="raw", frozen_expert=False)
    ens.attach(draft)
    L = [0.0, 0.0, 0.0]
    for i in range(0, 8, 2):
        new = rounds[i:i + 2]
        before = [[t.clone() for t in e] for e in ens.experts]
        by_hand = [loss_at(draft, e, new) for e in before]
        write_params(ens.params, ens.deployed())
        ens.observe(new[0])
        assert ens.observe(new[1]).changed is True
        L = [a + b for a, b in zip(L, by_hand)]
        assert ens.hedge.L == pytest.approx(L, rel=1e-5)
        assert ens.weights == pytest.approx(softmax_by_hand([-2.0 * x for x in L]), rel=1e-5)
        avg = weighted_average(ens.experts, ens.weights)
        for p, a in zip(draft.module.parameters(), avg):
            assert torch.equal(p.data, a)  # deployed = fp32 average by the Hedge weights
    assert max(ens.weights) - min(ens.weights) > 1e-3  # the experts diverged, weights moved
    s = ens.snapshot()
    assert list(s.step_sizes) == pytest.approx([0.01, 0.03, 0.09]) and len(s.weights) == 3


def test_fixed_share_hedge_by_hand_and_recovers():
    h = Hedge(3, eps=2.0, mode="fixed_share", share=0.3)
    h.update([1.0, 0.5, 1.0])
    p = softmax_by_hand([-2.0, -1.0, -2.0])
    p = [0.7 * v + 0.1 for v in p]
    assert h.weights() == pytest.approx(p)
    for _ in range(50):  # one expert far ahead for long: the floor share / N stays
        h.update([1.0, 0.0, 1.0])
    assert min(h.weights()) >= 0.1 - 1e-9 and max(h.weights()) == pytest.approx(h.weights()[1])
    for t in range(50):  # the shift: expert 0 becomes best, and takes the lead within a few steps
        h.update([0.0, 1.0, 1.0])
        if h.weights()[0] == max(h.weights()):
            break
    assert t <= 3


def test_ensemble_frozen_expert_relative_hedge(rounds_and_pair, pair_dirs):
    rounds, _ = rounds_and_pair
    draft = fresh_draft(pair_dirs)
    offline = [p.detach().clone() for p in draft.module.parameters()]
    ens = EnsembleUpdater(every=2, batch=2, lr=0.01)  # defaults: frozen expert, fixed share, relative
    assert ens.cfg.grid[0] == 0.0 and len(ens.cfg.grid) == 4
    ens.attach(draft)
    for r in rounds[:8]:
        ens.observe(r)
    for e, w in zip(ens.experts[0], offline):
        assert torch.equal(e, w.float())  # the step size 0 expert is the offline draft
    assert ens.opts[0] is None and ens.snapshot().step_sizes[0] == 0.0
    assert abs(sum(ens.weights) - 1) < 1e-9 and min(ens.weights) >= ens.cfg.share / 4 - 1e-9
    assert ens._scaled([2.0, 1.0, 4.0, 4.0]) == [0.5, 0.25, 1.0, 1.0]  # l_i / max_j l_j


def first_step(up, draft, rounds):
    """Attach, take the gradient of the first batch (rounds 0-1) by hand, then let the updater
    observe them: (params, weights before, that gradient). Both take HF's gradient (through the
    whole re-read context: context_grad on), so the per-round form by hand and the updater's
    merged form are one function."""
    assert up.cfg.context_grad == "on"
    up.attach(draft)
    params = list(draft.module.parameters())
    w1 = [p.detach().clone() for p in params]
    draft.context_grad = True
    with torch.enable_grad():
        loss = torch.stack([round_distill_loss(draft.train_logits(r), r) for r in rounds[:2]]).mean()
        g1 = torch.autograd.grad(loss, params)
    draft.context_grad = False
    up.observe(rounds[0])
    up.observe(rounds[1])
    return params, w1, g1


def test_optimistic_step_on_draft(rounds_and_pair, pair_dirs):
    rounds, _ = rounds_and_pair
    draft = fresh_draft(pair_dirs)
    up = OptimisticUpdater(every=2, batch=2, lr=0.05, max_grad_norm=0, precondition="none", anchor=0.0,
                           context_grad="on")
    params, w1, g1 = first_step(up, draft, rounds)
    for p, w, g, s, h in zip(params, w1, g1, up.shadow, up.hint):  # h_1 = 0
        torch.testing.assert_close(s, w - 0.05 * g)
        torch.testing.assert_close(h, g)
        torch.testing.assert_close(p.data, w - 2 * 0.05 * g)  # deployed = shadow - eta * hint
    for r in rounds[2:6]:
        up.observe(r)
    for p, s, h in zip(params, up.shadow, up.hint):
        torch.testing.assert_close(p.data, s - 0.05 * h)


@pytest.mark.parametrize("name", [n for n in REGISTRY if n != "frozen"])
def test_guard_skips_non_finite_and_restores(rounds_and_pair, pair_dirs, name):
    rounds, _ = rounds_and_pair
    draft = fresh_draft(pair_dirs)
    up = make_updater(name, every=1, batch=1)
    up.attach(draft)
    good = next(r for r in rounds if r.accepted < r.k)
    up.observe(good)
    assert up.stats()["updates"] == 1
    before = [p.detach().clone() for p in draft.module.parameters()]
    bad = osc.Round(**{**good.__dict__})
    bad.target_logits = torch.full_like(good.target_logits, float("nan"))
    if name == "dpo":  # the DPO loss does not read target logits: corrupt its reference
        bad = good
        up.ref[0].fill_(float("nan"))
    up.observe(bad)
    s = up.stats()
    assert s["skipped"] == 1 and s["updates"] == 1
    for p, b in zip(draft.module.parameters(), before):
        assert torch.equal(p.data, b)  # the last good weights are back
    if name == "dpo":
        up.refresh_reference()
    up.observe(good)
    assert up.stats()["updates"] == 2


def test_cadences(pair_dirs):
    t, d = pair_dirs["llama"]
    pair = osc.load_pair(target=str(t), draft=str(d))
    eng = osc.Engine(pair, k=3, updater="ogd", updater_options={"every": 3, "batch": 5})
    out = eng.generate("def add(a, b):", max_new_tokens=30)
    obs = [r for r in out.rounds if r.k > 0]
    assert [r.updated for r in obs] == [(i + 1) % 3 == 0 for i in range(len(obs))]
    assert eng.updater.stats()["updates"] == len(obs) // 3
    # chunked test-then-train: train once per 2 prompts, epochs * ceil(rounds / batch) steps
    pair = osc.load_pair(target=str(t), draft=str(d))
    eng = osc.Engine(pair, k=3, updater="ogd",
                     updater_options={"cadence": "chunk", "chunk_prompts": 2, "epochs": 2, "batch": 4})
    prompts = ["def add(a, b):", "Tom has", "SELECT name", "The licensee", "def f"]
    rounds = [ev.round for ev in eng.run_stream(prompts, max_new_tokens=12) if ev.kind == "round"]
    updated = [r.prompt_index for r in rounds if r.updated]
    assert updated == [2, 4]  # the first round of each new chunk triggers training on the last
    assert all(r.index == min(x.index for x in rounds if x.prompt_index == r.prompt_index)
               for r in rounds if r.updated)
    n1 = sum(1 for r in rounds if r.prompt_index in (0, 1))
    n2 = sum(1 for r in rounds if r.prompt_index in (2, 3))
    assert eng.updater.stats()["updates"] == 2 * (math.ceil(n1 / 4) + math.ceil(n2 / 4))
    assert eng.updater.flush() is True  # the last, partial chunk on demand


def test_bad_options_are_clear_errors():
    with pytest.raises(osc.OnlineSpecError, match="no option"):
        make_updater("ogd", learning_rate=0.1)
    with pytest.raises(osc.OnlineSpecError, match="hedge must be"):
        make_updater("ensemble", hedge="sometimes")
    with pytest.raises(osc.OnlineSpecError, match="unknown updater"):
        make_updater("sgd")


def test_merged_sequence_forward_equals_per_round(rounds_and_pair, pair_dirs):
    """lm drafts: one forward per sequence gives every round's path logits (same inputs)."""
    from onlinespec_core.updaters.gradient import contiguous_groups
    from onlinespec_core.updaters.ogd import OGDUpdater
    rounds, _ = rounds_and_pair
    draft = fresh_draft(pair_dirs)
    merged, single = OGDUpdater(), OGDUpdater(merge=False)
    merged.attach(draft)
    single.attach(draft)
    groups = contiguous_groups(rounds)
    assert len(groups) == 2 and sum(map(len, groups)) == len(rounds)  # the two prompts
    with torch.no_grad():
        for a, b in zip(merged.batch_logits(rounds), single.batch_logits(rounds)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(merged.batch_losses(rounds), single.batch_losses(rounds), rtol=1e-4, atol=1e-5)


def test_anchor_pulls_toward_the_offline_weights(rounds_and_pair, pair_dirs):
    from onlinespec_core.updaters.ogd import OGDUpdater
    rounds, _ = rounds_and_pair
    drift = {}
    for anchor in (0.0, 0.5):
        draft = fresh_draft(pair_dirs)
        w0 = [p.detach().clone() for p in draft.module.parameters()]
        up = OGDUpdater(every=1, batch=1, lr=1e-2, anchor=anchor)
        up.attach(draft)
        for r in rounds[:6]:
            up.observe(r)
        drift[anchor] = float(sum((p.detach() - w).pow(2).sum() for p, w in zip(draft.module.parameters(), w0)))
    assert 0 < drift[0.5] < 0.5 * drift[0.0]


def test_optimistic_adam_preconditioned_step(rounds_and_pair, pair_dirs):
    """precondition='adam': the optimistic pair of states moves on g / (sqrt(v^) + 1e-8)."""
    rounds, _ = rounds_and_pair
    draft = fresh_draft(pair_dirs)
    up = OptimisticUpdater(every=2, batch=2, lr=1e-3, max_grad_norm=0, anchor=0.0, context_grad="on")
    assert up.cfg.precondition == "adam" and up.cfg.beta1 == 0.9
    params, w1, g1 = first_step(up, draft, rounds)
    for p, w, g in zip(params, w1, g1):  # t = 1: m^ = g, v^ = g^2, so d = g / (|g| + 1e-8) ~ sign(g)
        d = g / (g.abs() + 1e-8)
        torch.testing.assert_close(p.data, w - 2 * 1e-3 * d, rtol=1e-4, atol=1e-6)


def test_fused_optimistic_adam_matches_the_unfused_form(rounds_and_pair, pair_dirs):
    """The fused path (one Adam kernel on a zeroed step buffer, clip folded into its grad scale)
    takes the same steps as the explicit one (moments, direction, the two states, the anchor)."""
    rounds, _ = rounds_and_pair

    class Unfused(OptimisticUpdater):
        fused = False

    ups = []
    for cls in (OptimisticUpdater, Unfused):
        up = cls(every=2, batch=2, lr=1e-3, anchor=0.05)  # clip at the default max_grad_norm=1
        up.attach(fresh_draft(pair_dirs))
        for r in rounds[:8]:
            up.observe(r)
        ups.append(up)
    fused, plain = ups
    assert fused.fused and not plain.fused and fused.updates == plain.updates == 4
    # atol: 1% of one step (lr = 1e-3); coordinates with |g| near Adam's eps round differently
    for a, b in zip(fused.params + fused.shadow, plain.params + plain.shadow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(fused.hint, plain.hint):  # the direction itself, |d| <= ~1
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-2)
    for a, b in zip(fused.m + fused.v, plain.m + plain.v):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    for a, b in zip(fused.deployed(), fused.params):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("prefix", [False, True])
def test_hydra_train_rows_match_train_logits(pair_dirs, prefix):
    """HydraDraft.train_rows (every round's rows in one pass) gives the rows of train_logits, and
    the batch losses an updater takes from it are the per-round losses."""
    t, _ = pair_dirs["llama"]
    pair = osc.load_pair(target=str(t), draft=None, draft_kind="hydra", prefix=prefix, n_heads=3)
    eng = osc.Engine(pair, k=4, keep_distributions=True)
    rounds = [r for r in eng.generate("def add(a, b):", max_new_tokens=32).rounds if r.k > 0]
    draft = pair.draft
    assert draft.batches_rounds and len(rounds) >= 4
    for positions in ("path", "all"):
        ms = [min(n_positions(r, positions), r.k) for r in rounds]
        rows = draft.train_rows(rounds, ms)
        ref = torch.cat([draft.train_logits(r)[:m] for r, m in zip(rounds, ms)])
        torch.testing.assert_close(rows, ref, rtol=1e-4, atol=1e-4)
    up = make_updater("ogd")
    up.attach(draft)
    with torch.no_grad():
        got = up.batch_losses(rounds)
        want = torch.stack([round_distill_loss(draft.train_logits(r), r) for r in rounds])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
