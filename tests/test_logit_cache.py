"""The fast logit tables (drafts.logit_cache): the update is the OGD step on the round's fkl
loss (gradient q - p in the unigram and in the previous token's bigram row), lazy decay equals
eager decay, and the tables round-trip through state. No timing."""
from __future__ import annotations

import pytest
import torch

import onlinespec_core as osc
from onlinespec_core.drafts.logit_cache import LogitCache
from onlinespec_core.updaters import make_updater


def test_step_is_ogd_on_the_deployed_logits_gradient():
    V, rho = 11, 0.1
    c = LogitCache(V, rho)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, V, generator=g)
    p = torch.softmax(torch.randn(3, V, generator=g), -1)
    deployed = torch.stack([c.apply(z[i], prev) for i, prev in enumerate([4, 7, 4])])
    dl = deployed.clone().requires_grad_()
    # d/dz of KL(p || softmax(z)) summed over rows = softmax(z) - p per row
    loss = torch.nn.functional.kl_div(torch.log_softmax(dl, -1), p, reduction="sum")
    (grad,) = torch.autograd.grad(loss, dl)
    c.step(grad, [4, 7, 4], lr_unigram=0.5, lr_bigram=2.0)
    torch.testing.assert_close(c.unigram, -0.5 * grad.sum(0))
    torch.testing.assert_close(c.rows[4][0], -2.0 * (grad[0] + grad[2]))
    torch.testing.assert_close(c.rows[7][0], -2.0 * grad[1])
    torch.testing.assert_close(c.apply(z[0], 4), z[0] + c.unigram + c.rows[4][0])
    torch.testing.assert_close(c.apply(z[0], 5), z[0] + c.unigram)  # no row for 5


def test_lazy_decay_equals_eager_decay():
    V, rho = 5, 0.2
    c = LogitCache(V, rho)
    g = torch.ones(1, V)
    c.step(g, [3], 0.0, 1.0)
    row0 = c.rows[3][0].clone()
    for _ in range(4):  # rounds where token 3 is not the previous token
        c.step(torch.zeros(1, V), [1], 0.0, 1.0)
    torch.testing.assert_close(c.apply(torch.zeros(V), 3), row0 * (1 - rho) ** 4)


def test_tables_round_trip_through_state():
    c = LogitCache(6, 0.05)
    c.step(torch.randn(2, 6), [1, 2], 0.3, 1.0)
    c.step(torch.randn(1, 6), [2], 0.3, 1.0)
    d = LogitCache.from_state(c.state_tensors())
    assert d.now == c.now and d.decay == c.decay
    for prev in (1, 2, 3):
        torch.testing.assert_close(d.apply(torch.zeros(6), prev), c.apply(torch.zeros(6), prev))


def test_cache_options_need_an_lm_draft(pair_dirs):
    t, d = pair_dirs["llama"]
    pair = osc.load_pair(target=str(t), draft=str(d))
    up = make_updater("ogd", cache_lr=0.1)
    up.attach(pair.draft)
    assert pair.draft.logit_cache is up.cache  # the draft's state (saved with it), kept across updaters
    up.detach()
    nxt = make_updater("dpo", bigram_lr=1.0, cache_decay=0.2)
    nxt.attach(pair.draft)
    assert nxt.cache is up.cache and nxt.cache.decay == 0.2
    assert set(pair.draft.state_tensors()) >= {"logit_cache.unigram", "logit_cache.meta"}
    pair.draft.load_state_tensors({})  # a state saved without tables
    assert pair.draft.logit_cache is None
    with pytest.raises(osc.OnlineSpecError, match="cache_decay"):
        make_updater("ogd", cache_decay=1.0)

    class NoCache:  # a draft kind without the tables (feature heads)
        kind = "hydra"
        module = torch.nn.Linear(2, 2)
    with pytest.raises(osc.OnlineSpecError, match="lm, eagle and hydra drafts"):
        make_updater("ogd", cache_lr=0.1).attach(NoCache())


@pytest.mark.parametrize("name", ["ogd", "dpo"])
def test_train_none_leaves_every_weight_and_trains_only_the_tables(pair_dirs, name):
    t, d = pair_dirs["llama"]
    pair = osc.load_pair(target=str(t), draft=str(d))
    before = {k: v.clone() for k, v in pair.draft.module.state_dict().items()}
    eng = osc.Engine(pair, k=4, updater=name, updater_options={"train": "none", "bigram_lr": 2.0, "every": 1})
    ref = osc.Engine(osc.load_pair(target=str(t), draft=str(d)), k=0)
    for prompt in ("def add(a, b):", "Tom has 3 apples"):
        assert eng.generate(prompt, max_new_tokens=24).token_ids == ref.generate(prompt, max_new_tokens=24).token_ids
    assert eng.updater.stats()["updates"] == 0 and not eng.updater.buffer
    for k, v in pair.draft.module.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert pair.draft.logit_cache.rows  # the tables learnt
