"""The cheaper lm-draft update step (issue 12) computes what the plain forms compute: DPO's merged
losses equal the per-round ones, the reference forward leaves the live weights (and the proposal
cache) as they were, fp32 masters are the parameters themselves, another sequence's round reads
its context as constants (values as HF's, gradient as the proposal cache's), and train='layers' leaves the vocabulary
matrices alone. No timing here (benchmarks measure cost)."""
from __future__ import annotations

import pytest
import torch

import onlinespec_core as osc
from onlinespec_core.updaters import make_updater
from onlinespec_core.updaters.dpo import DPOUpdater
from onlinespec_core.updaters.gradient import aliased, vocab_matrices


def llama_pair(pair_dirs):
    t, d = pair_dirs["llama"]
    return osc.load_pair(target=str(t), draft=str(d))


@pytest.fixture(scope="module")
def rounds(pair_dirs):
    pair = llama_pair(pair_dirs)
    eng = osc.Engine(pair, k=4, keep_distributions=True)
    rs = eng.generate("def add(a, b):", max_new_tokens=40).rounds
    rs += eng.generate("Tom has 3 apples", max_new_tokens=24).rounds
    return [r for r in rs if r.k > 0]


def logits_and_grads(draft, rnd, params):
    """train_logits(rnd) and the gradient of one log-probability column into every parameter."""
    with torch.enable_grad():
        lg = draft.train_logits(rnd)
        g = torch.autograd.grad(torch.log_softmax(lg, -1)[:, 7].sum(), params, allow_unused=True)
    return lg.detach(), g


def assert_grads_close(ga, gb, rtol: float, atol: float) -> int:
    """Two gradient lists alike (None where the other is None; sparse compared dense); returns
    how many were non-zero."""
    moved = 0
    for a, b in zip(ga, gb):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a.to_dense(), b.to_dense(), rtol=rtol, atol=atol)
        moved += int(bool(a.to_dense().abs().sum() > 0))
    return moved


@pytest.mark.parametrize("opts", [{}, {"mode": "sft"}, {"sft_weight": 0.0}])
def test_merged_dpo_losses_equal_the_per_round_form(pair_dirs, rounds, opts):
    batch = rounds[:10]  # spans both prompts: two sequences
    ups = []
    for merge in (True, False):
        up = DPOUpdater(merge=merge, every=4, batch=4, lr=1e-2, **opts)
        draft = llama_pair(pair_dirs).draft
        # HF's re-read (grad through every context): the same function in both forms; the lean
        # form holds the context before a group constant, so its per-round form differs by design
        draft.reuse_cache = False
        up.attach(draft)
        for r in rounds[10:18]:  # a few steps: the reference now differs from the weights
            up.observe(r)
        ups.append(up)
    a, b = ups
    assert a.updates > 0 and not a.ref_current and not b.ref_current
    for x, y in zip(a.params, b.params):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    with torch.enable_grad():
        la, lb = a.batch_losses(batch), b.batch_losses(batch)
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)
        ga = torch.autograd.grad(la.mean(), a.params, allow_unused=True)
        gb = torch.autograd.grad(lb.mean(), b.params, allow_unused=True)
    assert_grads_close(ga, gb, rtol=1e-3, atol=1e-5)


def test_reference_forward_swaps_storage_and_back(pair_dirs, rounds):
    pair = llama_pair(pair_dirs)
    up = DPOUpdater(every=2, batch=2, lr=1e-2)
    up.attach(pair.draft)
    assert aliased(up.params, up.master)  # fp32 draft: the masters are the parameters
    for r in rounds[:6]:
        up.observe(r)
    live = [p.detach().clone() for p in up.params]
    ptrs = [p.data_ptr() for p in up.params]
    versions = [p._version for p in up.params]
    d = pair.draft
    d.cache_version = 12345
    with up.reference_weights():
        for p, r in zip(up.params, up.ref):
            assert torch.equal(p.data, r)
        assert d.cache_version is None  # the proposal cache does not hold the reference's K/V
    assert d.cache_version == 12345
    assert [p.data_ptr() for p in up.params] == ptrs and [p._version for p in up.params] == versions
    for p, w in zip(up.params, live):
        assert torch.equal(p.data, w)


@pytest.mark.parametrize("name", ["ogd", "dpo"])
def test_masters_are_the_parameters_and_steps_reach_the_module(pair_dirs, rounds, name):
    pair = llama_pair(pair_dirs)
    up = make_updater(name, every=2, batch=2)
    up.attach(pair.draft)
    before = [p.detach().clone() for p in up.params]
    for r in rounds[:6]:
        up.observe(r)
    assert up.updates > 0
    for p, m, b in zip(up.params, up.master, before):
        assert p.data_ptr() == m.data_ptr()
    assert any(not torch.equal(p.data, b) for p, b in zip(up.params, before))


def test_bf16_draft_keeps_fp32_master_copies(pair_dirs, rounds):
    pair = llama_pair(pair_dirs)
    pair.draft.module.to(torch.bfloat16)
    up = make_updater("dpo", every=2, batch=2)
    up.attach(pair.draft)
    assert all(m.dtype == torch.float32 for m in up.master) and not aliased(up.params, up.master)


def test_other_sequence_round_reads_its_context_as_constants(pair_dirs, rounds):
    """A round of another sequence (no fresh proposal cache): the lean form re-reads its tail
    without grad and runs only the round's rows with grad. Its logits equal HF's re-read, and
    its gradient equals the one the proposal's own cache gives (the context's K/V constants in
    both), so a batch spanning prompts trains every round alike."""
    from onlinespec_core.sampling import SamplingConfig
    pair = llama_pair(pair_dirs)
    draft = pair.draft
    assert draft.lean is not None
    r = rounds[3]
    assert draft._context_state(r) is None and r.context_tail.numel() == r.context_len
    params = [p for p in draft.module.parameters()]
    reread = logits_and_grads(draft, r, params)
    draft.reuse_cache = False
    hf = logits_and_grads(draft, r, params)
    draft.reuse_cache = True
    torch.testing.assert_close(reread[0], hf[0], rtol=1e-4, atol=1e-4)
    seq = r.context_tail.clone()
    draft.propose(seq, 1, SamplingConfig(), None)  # the proposal's cache now holds the context
    draft.commit(seq.numel())
    assert draft._context_state(r) == "fresh"
    fresh = logits_and_grads(draft, r, params)
    torch.testing.assert_close(reread[0], fresh[0], rtol=1e-4, atol=1e-4)
    moved = assert_grads_close(reread[1], fresh[1], rtol=1e-3, atol=1e-5)
    assert moved >= 3  # embedding/head, attention and MLP weights all get a gradient


def test_context_grad_on_gives_hfs_gradient(pair_dirs, rounds):
    """Option context_grad=on: the lean re-read of a round's tail gives HF's logits and HF's
    gradient (grad through the whole tail), whether or not the proposal cache holds it."""
    from onlinespec_core.sampling import SamplingConfig
    pair = llama_pair(pair_dirs)
    draft = pair.draft
    r = rounds[3]
    params = [p for p in draft.module.parameters()]
    draft.reuse_cache = False
    hf = logits_and_grads(draft, r, params)
    draft.reuse_cache = True
    draft.context_grad = True
    outs = [logits_and_grads(draft, r, params)]
    draft.propose(r.context_tail.clone(), 1, SamplingConfig(), None)
    draft.commit(r.context_tail.numel())
    assert draft._context_state(r) == "fresh"
    outs.append(logits_and_grads(draft, r, params))
    draft.context_grad = False
    for lg, gs in outs:
        torch.testing.assert_close(lg, hf[0], rtol=1e-4, atol=1e-4)
        assert_grads_close(gs, hf[1], rtol=1e-3, atol=1e-5)


def test_context_grad_option_reaches_the_draft_only_during_a_step(pair_dirs, rounds):
    seen = []
    pair = llama_pair(pair_dirs)
    d = pair.draft
    orig = d.train_hidden
    d.train_hidden = lambda rnd: (seen.append(d.context_grad), orig(rnd))[1]
    for opt, want in (("on", True), ("off", False), ("auto", False)):
        seen.clear()
        up = make_updater("ogd", every=2, batch=2, context_grad=opt)
        up.attach(d)
        for r in rounds[:4]:
            up.observe(r)
        up.detach()
        assert seen and set(seen) == {want} and d.context_grad is False
    with pytest.raises(osc.OnlineSpecError, match="context_grad"):
        make_updater("ogd", context_grad="sometimes")


@pytest.mark.parametrize("name", ["ogd", "dpo"])
def test_train_layers_leaves_the_vocabulary_matrices(pair_dirs, rounds, name):
    pair = llama_pair(pair_dirs)
    vocab = [v.detach().clone() for v in vocab_matrices(pair.draft.module)]
    assert vocab
    up = make_updater(name, every=2, batch=2, train="layers")
    up.attach(pair.draft)
    before = [p.detach().clone() for p in up.params]
    for r in rounds[:6]:
        up.observe(r)
    assert up.updates > 0
    for v, w in zip(vocab_matrices(pair.draft.module), vocab):
        assert torch.equal(v, w)
    assert any(not torch.equal(p.data, b) for p, b in zip(up.params, before))
    with pytest.raises(osc.OnlineSpecError, match="train must be"):
        make_updater(name, train="head")


def test_head_rows_keeps_logits_and_layer_gradients_and_trains_the_rows(pair_dirs, rounds):
    """head_rows: the same logits and the same gradient for every weight but the vocabulary
    matrix, whose gradient is the exact one on the support rows and absent elsewhere."""
    pair = llama_pair(pair_dirs)
    draft = pair.draft
    r = rounds[5]
    params = list(draft.module.parameters())
    w = draft.module.get_output_embeddings().weight
    out = []
    for sup in (None, (torch.tensor([3, 7, 11]), 4)):
        draft.train_support = sup
        out.append(logits_and_grads(draft, r, params))
    draft.train_support = None
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-5)
    for p, a, b in zip(params, out[0][1], out[1][1]):
        if p is w:
            assert b.is_sparse
            b = b.coalesce()
            rows = b.indices()[0]
            assert {3, 7, 11} <= set(rows.tolist()) and rows.numel() < w.shape[0]
            torch.testing.assert_close(b.to_dense()[rows], a.to_dense()[rows], rtol=1e-4, atol=1e-6)
        elif a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["ogd", "dpo"])
def test_head_rows_steps_move_only_support_rows(pair_dirs, rounds, name):
    pair = llama_pair(pair_dirs)
    w = pair.draft.module.get_output_embeddings().weight
    w0 = w.detach().clone()
    up = make_updater(name, every=2, batch=2, head_rows=2)
    up.attach(pair.draft)
    for r in rounds[:8]:
        up.observe(r)
    assert up.updates > 0 and up.skipped == 0
    moved = (w.detach() != w0).any(-1)
    assert 0 < int(moved.sum()) < w.shape[0]  # some rows learnt, most untouched
    with pytest.raises(osc.OnlineSpecError, match="head_rows"):
        bad = make_updater("optimistic", every=1, batch=1, head_rows=2)
        bad.attach(llama_pair(pair_dirs).draft)
        bad.observe(rounds[0])


@pytest.mark.parametrize("opts", [{"every": 2}, {"every": 2, "head_rows": 4}])
def test_dpo_save_load_continues_exactly(pair_dirs, tmp_path, opts):
    t, d = pair_dirs["llama"]
    a_pair = osc.load_pair(target=str(t), draft=str(d))
    a = osc.Engine(a_pair, k=3, updater="dpo", updater_options={**opts, "ref_every": 6, "lr": 1e-2})
    for p in ("def add(a, b):", "Tom has 3 apples"):
        a.generate(p, max_new_tokens=20)
    a.save_state(tmp_path / "s")
    rest = ["def add(a, b):", "SELECT name"]
    want = [a.generate(p, max_new_tokens=20).token_ids for p in rest]
    b_pair = osc.load_pair(target=str(t), draft=str(d))
    b = osc.Engine(b_pair, k=3)
    b.load_state(tmp_path / "s")
    got = [b.generate(p, max_new_tokens=20).token_ids for p in rest]
    assert got == want and b.updater.stats() == a.updater.stats()
    for x, y in zip(a_pair.draft.module.parameters(), b_pair.draft.module.parameters()):
        assert torch.equal(x, y)


def test_merged_rows_run_one_head_over_every_sequence(pair_dirs, rounds):
    """merged_rows on the fast path: each sequence's states, then ONE lm_head over all rows;
    the same rows (values and gradient) as each sequence's own logits."""
    from onlinespec_core.updaters.gradient import contiguous_groups, sequence_round
    from onlinespec_core.updaters.losses import n_positions
    pair = llama_pair(pair_dirs)
    d = pair.draft
    up = make_updater("ogd")
    up.attach(d)
    cut = next(i for i in range(1, len(rounds)) if rounds[i].context_len < rounds[i - 1].context_len)
    batch = rounds[cut - 3:cut + 3]  # the last rounds of the first prompt, the first of the second
    groups = contiguous_groups(batch)
    assert len(groups) == 2
    params = list(d.module.parameters())
    with torch.enable_grad():
        rows, ms = up.merged_rows(batch)
        ga = torch.autograd.grad(torch.log_softmax(rows, -1)[:, 5].sum(), params, allow_unused=True)
        want = []
        for g in groups:
            lg = d.train_logits(sequence_round([batch[i] for i in g], ms[g[-1]]))
            off0 = batch[g[0]].context_len
            want += [lg[batch[i].context_len - off0:][:ms[i]] for i in g]
        want = torch.cat(want)
        gb = torch.autograd.grad(torch.log_softmax(want, -1)[:, 5].sum(), params, allow_unused=True)
    assert ms == [min(n_positions(r), r.k) for r in batch]
    torch.testing.assert_close(rows, want, rtol=1e-5, atol=1e-5)
    assert_grads_close(ga, gb, rtol=1e-4, atol=1e-6)


def test_tied_embedding_rows_join_the_head_gradient_in_place(pair_dirs, rounds):
    """The input side's gradient collected as rows and added into the head's dense gradient
    equals autograd's own sum of the two (sparse lookup + dense head) for the tied matrix."""
    pair = osc.load_pair("demo")  # a tied draft (the tiny test drafts are untied)
    d = pair.draft
    assert d.lean is not None and d.lean.tied
    eng = osc.Engine(pair, k=4, keep_distributions=True)
    rs = [r for r in eng.generate("def add(a, b):", max_new_tokens=24).rounds if r.k > 0]
    rs += [r for r in eng.generate("Question: Tom has 3 apples.", max_new_tokens=16).rounds if r.k > 0]
    up = make_updater("ogd", max_grad_norm=0)
    up.attach(d)
    batch = rs[-8:]  # the end of the first prompt and the second: two sequences
    _, fast_g = up.losses_and_grads(batch)
    orig = d.collect_embedding_rows
    d.collect_embedding_rows = lambda on: None  # autograd's own accumulation
    try:
        _, ref_g = up.losses_and_grads(batch)
    finally:
        d.collect_embedding_rows = orig
    assert d.lean.embed_rows is None
    w = d.embedding_weight
    for p, a, b in zip(up.params, fast_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        if p is w:
            assert a.abs().sum() > 0
