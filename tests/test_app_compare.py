"""Core compare mode: configs share the target's greedy pass and stay lossless."""
from __future__ import annotations

import torch

import onlinespec_core as osc
from onlinespec_core.compare import CompareConfig, CompareRunner, clone_draft
from onlinespec_core.streams import StreamItem

ITEMS = [StreamItem("code", "def add(a, b):"), StreamItem("code", "SELECT name FROM"),
         StreamItem("math", "Tom has 3 apples")]
N = 20


def hf_greedy(target, ids, n):
    out = target.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, pad_token_id=2,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def collect(runner):
    outs: dict[tuple[int, int], list[int]] = {}
    rounds: dict[int, list] = {}
    for ci, ev in runner.run(ITEMS, max_new_tokens=N):
        if ev.kind == "round":
            rounds.setdefault(ci, []).append(ev.round)
        elif ev.kind == "done":
            outs[(ci, ev.data["prompt_index"])] = ev.data["token_ids"]
    return outs, rounds


CONFIGS = [CompareConfig("k2", k=2), CompareConfig("k4", k=4), CompareConfig("dyn", k=3, dynamic_k=True)]


def test_shared_target_is_lossless_and_saves_forwards(llama_pair):
    pair = llama_pair
    refs = [hf_greedy(pair.target, pair.tokenizer(it.prompt)["input_ids"], N) for it in ITEMS]
    shared = CompareRunner(pair, CONFIGS, share_target=True)
    outs, rounds = collect(shared)
    for (ci, pi), ids in outs.items():
        assert ids == refs[pi], (ci, pi)
    assert len(outs) == len(CONFIGS) * len(ITEMS)
    plain_outs, plain_rounds = collect(CompareRunner(pair, CONFIGS, share_target=False))
    assert plain_outs == outs
    for ci in range(len(CONFIGS)):  # same acceptance round by round
        assert [r.accepted for r in rounds[ci]] == [r.accepted for r in plain_rounds[ci]]
    st = shared.shared.stats
    # config 0 builds the trace with real forwards; frozen followers replay every round
    assert st.forwards[0] == len(rounds[0]) and st.replayed[0] == 0
    assert st.forwards[1] == 0 and st.forwards[2] == 0
    assert st.replayed[1] == len(rounds[1]) and st.replayed[2] == len(rounds[2])


def test_exact_feedback_replays_the_real_logits(llama_pair):
    """For a learning config every verified row must be what a real forward gives."""
    cfgs = [CompareConfig("lead", k=1), CompareConfig("learner", k=3)]
    runner = CompareRunner(llama_pair, cfgs, keep_distributions=True)
    runner.engines[1].updater.feedback_rows = "all"  # behave as an updater that reads every row
    _, rounds = collect(runner)
    plain = CompareRunner(llama_pair, cfgs, share_target=False, keep_distributions=True)
    _, plain_rounds = collect(plain)
    assert runner.shared.stats.replayed[1] > 0  # fully accepted rounds were replayed
    assert runner.shared.stats.forwards[1] > 0  # rounds with a rejection ran the target
    for a, b in zip(rounds[1], plain_rounds[1]):
        assert a.emitted == b.emitted
        torch.testing.assert_close(a.target_logits, b.target_logits, atol=1e-4, rtol=1e-4)


def test_path_distillation_learns_the_same_from_replayed_rows(llama_pair):
    """ogd distils on the greedy path (accepted + first rejected): replayed rows are enough,
    and the online loss and acceptance match a run with its own target forwards."""
    cfgs = [CompareConfig("lead", k=2), CompareConfig("ogd", "ogd", {"lr": 1e-2, "every": 1, "batch": 1}, k=3)]
    shared = CompareRunner(llama_pair, cfgs)
    outs, rounds = collect(shared)
    plain_outs, plain_rounds = collect(CompareRunner(llama_pair, cfgs, share_target=False))
    assert outs == plain_outs
    assert shared.shared.stats.forwards[1] == 0  # every ogd round was replayed
    a, b = rounds[1], plain_rounds[1]
    assert [r.accepted for r in a] == [r.accepted for r in b]
    assert any(r.updated for r in a)
    la = [r.loss for r in a if r.loss is not None]
    lb = [r.loss for r in b if r.loss is not None]
    assert la and len(la) == len(lb)
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), atol=1e-3, rtol=1e-3)


def test_sampling_never_shares_and_controls(llama_pair):
    runner = CompareRunner(llama_pair, CONFIGS[:2], temperature=1.0, seed=3)
    outs, _ = collect(runner)
    assert sum(runner.shared.stats.replayed) == 0 and len(outs) == 2 * len(ITEMS)
    # shift topic: the rest of the "code" block is skipped for every config
    runner = CompareRunner(llama_pair, CONFIGS[:2])
    seen = []
    for ci, ev in runner.run(ITEMS, max_new_tokens=N):
        if ev.kind == "done":
            seen.append((ci, ev.data["prompt_index"]))
            if len(seen) == 1:
                runner.control.shift_topic()
    assert seen == [(0, 0), (1, 0), (0, 2), (1, 2)]


def test_clone_draft_shares_target_and_copies_weights(llama_pair):
    d = clone_draft(llama_pair.draft, llama_pair.target)
    a = next(llama_pair.draft.module.parameters())
    b = next(d.module.parameters())
    assert a.data_ptr() != b.data_ptr() and torch.equal(a, b)
    with torch.no_grad():
        b.add_(1.0)
    assert not torch.equal(a, b)
    out = osc.Engine(llama_pair, k=3).generate("def add(a, b):", max_new_tokens=8)
    assert len(out.token_ids) == 8
