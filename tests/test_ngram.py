"""The ngram draft: lossless (greedy identity, sampling distribution), index bounded, online."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import onlinespec_core as osc
from onlinespec_core.drafts.ngram import NgramDraft, NgramIndex
from tests.test_lossless import (PROMPTS, V, chi2_pvalue, exact_joint, hf_greedy,  # noqa: F401
                                 tiny_vocab_pair)


def ngram_pair(target_dir, **options):
    return osc.load_pair(target=str(target_dir), draft_kind="ngram", **options)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_greedy_matches_target_generate(pair_dirs, arch):
    t, _ = pair_dirs[arch]
    pair = ngram_pair(t)
    assert pair.draft.kind == "ngram" and not list(pair.draft.module.parameters())
    tok = pair.tokenizer
    for k in (1, 4, 8):
        eng = osc.Engine(pair, k=k)  # one engine: the stream index grows across the prompts
        for prompt in PROMPTS + PROMPTS:  # the second pass drafts from the first one's outputs
            ids = tok(prompt)["input_ids"]
            out = eng.generate(ids, max_new_tokens=24)
            assert out.token_ids == hf_greedy(pair.target, ids, 24), (arch, prompt, k)
            assert all(0 <= r.k <= k and r.accepted <= r.k for r in out.rounds)
    assert pair.draft.sequences > 0 and pair.draft.hits["stream"] > 0


def test_repeated_prompt_is_drafted_from_the_stream(pair_dirs):
    t, _ = pair_dirs["llama"]
    pair = ngram_pair(t, min_n=2)
    eng = osc.Engine(pair, k=4)
    first = eng.generate("Tom has 3 apples", max_new_tokens=32)
    again = eng.generate("Tom has 3 apples", max_new_tokens=32)
    assert again.token_ids == first.token_ids
    # the index holds the first answer: almost every round of the second is fully accepted
    assert again.stats["tau"] > 3.0 > first.stats["tau"]
    assert sum(r.kind == "target" for r in first.rounds) > 0  # no match -> empty proposal


def test_empty_proposal_is_a_target_step(pair_dirs):
    t, _ = pair_dirs["gpt2"]
    pair = ngram_pair(t, use_stream=False)
    out = osc.Engine(pair, k=4).generate([5], max_new_tokens=3)  # nothing to match against
    assert out.token_ids == hf_greedy(pair.target, [5], 3)
    assert out.rounds[0].k == 0 and out.rounds[0].kind == "target" and out.rounds[0].drafted == []


def test_sampling_reproduces_target_distribution(tiny_vocab_pair):  # noqa: F811
    """One-hot q: accept x with p(x), else resample from p without x. The stream index is built
    from earlier samples, so the drafts vary from sample to sample; the joint of the first two
    tokens must still be the target's."""
    cfg = osc.SamplingConfig(1.0)
    prompt = [3, 1, 4, 3, 1]  # the suffix "3 1" matches inside the prompt from the first sample on
    probs = exact_joint(tiny_vocab_pair, prompt, cfg)
    pair = osc.load_pair(target=tiny_vocab_pair.target, draft_kind="ngram", tokenizer=tiny_vocab_pair.tokenizer)
    pair.target.generation_config.eos_token_id = []
    eng = osc.Engine(pair, k=2, temperature=1.0, seed=5)
    counts = np.zeros(V * V)
    drafted = 0
    for _ in range(1000):
        out = eng.generate(prompt, max_new_tokens=3)
        a, b = out.token_ids[:2]
        counts[a * V + b] += 1
        drafted += sum(r.k for r in out.rounds)
    assert drafted > 1000  # the draft proposed on most rounds
    assert chi2_pvalue(counts, probs) > 1e-3


def test_index_memory_bound_on_a_long_stream():
    rng = np.random.default_rng(0)
    idx = NgramIndex(min_n=1, max_n=4, max_tokens=2000)
    span = idx.max_n - idx.min_n + 1
    for i in range(400):  # 400 documents, ~40k tokens in all: 20x the budget
        doc = rng.integers(0, 50, size=int(rng.integers(20, 180))).tolist()
        idx.add(doc)
        assert idx.tokens <= 2000 and idx.tokens == sum(len(d) for _, d in idx.docs)
        assert idx.entries <= span * idx.tokens
        held = {d for d, _ in idx.docs}
        assert all(v >> 32 in held for t in idx.tables.values() for v in t.values())  # no dangling entry
    assert idx.evicted_docs > 300
    # FIFO: what remains are the newest documents, and a lookup finds the newest occurrence
    last = rng.integers(100, 150, size=30).tolist()
    idx.add(last)
    assert idx.lookup(tuple(last[:4]), 5) == last[4:9]
    big = list(range(100, 5000))  # a single document longer than the budget keeps its tail
    idx.add(big)
    assert idx.tokens == 2000 and len(idx.docs) == 1 and idx.docs[0][1] == big[-2000:]


def test_draft_index_stays_bounded_through_the_engine(pair_dirs):
    t, _ = pair_dirs["llama"]
    pair = ngram_pair(t, max_index_tokens=120)
    eng = osc.Engine(pair, k=3)
    for i in range(12):
        eng.generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=20)
        assert pair.draft.index.tokens <= 120
    st = pair.draft.stats()
    assert st["sequences"] == 12 and st["evicted_sequences"] > 0


def test_ngram_refuses_gradient_updaters_and_options(pair_dirs):
    t, _ = pair_dirs["llama"]
    pair = ngram_pair(t)
    with pytest.raises(osc.OnlineSpecError, match="frozen"):
        osc.Engine(pair, updater="ogd")
    with pytest.raises(osc.OnlineSpecError, match="min_n"):
        ngram_pair(t, min_n=3, max_n=2)
    with pytest.raises(osc.OnlineSpecError, match="no option"):
        ngram_pair(t, nope=1)
    eng = osc.Engine(pair, k=2)
    out = eng.generate("def add(a, b):", max_new_tokens=8)
    assert all(r.loss is None for r in out.rounds)  # no NaN losses from one-hot logits


def test_one_hot_proposal():
    d = NgramDraft(vocab_size=10, max_n=2, min_n=1, use_stream=False)
    seq = torch.tensor([1, 2, 3, 1, 2])
    prop = d.propose(seq, 4, osc.SamplingConfig(1.0), None)
    # "1 2" occurred before, followed by 3 1 2 and then (overlapping copy) the cycle goes on: 3
    assert prop.tokens.tolist() == [3, 1, 2, 3]
    assert torch.equal(prop.probs.sum(-1), torch.ones(4)) and prop.probs[0, 3] == 1.0
    assert prop.logits[0, 3] == 0.0 and torch.isinf(prop.logits[0, 0])


@pytest.mark.skipif(not __import__("importlib").util.find_spec("arctic_inference"),
                    reason="arctic-inference is not installed (optional backend)")
def test_arctic_backend_is_lossless(pair_dirs):
    t, _ = pair_dirs["qwen2"]
    pair = ngram_pair(t, backend="arctic")
    eng = osc.Engine(pair, k=4)
    for prompt in PROMPTS + PROMPTS:
        ids = pair.tokenizer(prompt)["input_ids"]
        assert eng.generate(ids, max_new_tokens=20).token_ids == hf_greedy(pair.target, ids, 20)
    assert pair.draft.stats()["sequences"] == 6 and pair.draft.hits["stream"] > 0
    import copy
    twin = copy.deepcopy(pair.draft)  # the bench clones drafts: the native tree is rebuilt
    seq = pair.tokenizer(PROMPTS[1])["input_ids"]
    assert twin.arctic.tokens == pair.draft.arctic.tokens
    assert twin.arctic.speculate(seq, 4) == pair.draft.arctic.speculate(seq, 4)


def test_compare_mode_with_the_ngram_draft(pair_dirs):
    from onlinespec_core.compare import CompareConfig, CompareRunner
    t, _ = pair_dirs["llama"]
    pair = ngram_pair(t)
    runner = CompareRunner(pair, [CompareConfig("k2", k=2), CompareConfig("k4", k=4)])
    prompts = [("a", PROMPTS[1]), ("a", PROMPTS[1]), ("b", PROMPTS[2])]
    done: dict[int, list[list[int]]] = {0: [], 1: []}
    for ci, ev in runner.run(prompts, max_new_tokens=16):
        if ev.kind == "done":
            done[ci].append(ev.data["token_ids"])
    tok = pair.tokenizer
    ref = [hf_greedy(pair.target, tok(p)["input_ids"], 16) for _, p in prompts]
    assert done[0] == ref and done[1] == ref
    assert all(e.draft.sequences == 3 for e in runner.engines)  # each config has its own index


def test_cli_run_with_the_ngram_draft(pair_dirs, tmp_path):
    import json

    from onlinespec_core import cli
    t, _ = pair_dirs["gpt2"]
    stream = tmp_path / "s.jsonl"
    stream.write_text("".join(json.dumps({"topic": "c", "prompt": p}) + "\n" for p in PROMPTS * 2))
    rc = cli.main(["run", "--pair", str(t), "--draft-kind", "ngram", "--updater", "frozen",
                   "--stream", str(stream), "--max-new-tokens", "12", "--out", str(tmp_path / "out"),
                   "--no-progress"])
    assert rc == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["config"]["draft_kind"] == "ngram" and metrics["totals"]["tau"] >= 1.0


def test_saved_state_keeps_the_stream_index(pair_dirs, tmp_path):
    """What the ngram draft learnt (its stream index) survives save_state / load_state: a
    restored engine drafts the repeated prompt from the stream exactly as the original does."""
    t, _ = pair_dirs["llama"]
    pair = osc.load_pair(target=str(t), draft_kind="ngram")
    eng = osc.Engine(pair, k=4)
    prompt = "def add(a, b): return a + b  # SELECT name FROM users"
    eng.generate(prompt, 24)
    eng.save_state(tmp_path / "state")
    saved = pair.draft.state_tensors()
    assert int(saved["lengths"].numel()) >= 1
    want = eng.generate(prompt, 24)
    fresh = osc.load_pair(target=str(t), draft_kind="ngram")
    other = osc.Engine(fresh, k=4)
    other.load_state(tmp_path / "state")
    got = other.generate(prompt, 24)
    assert got.token_ids == want.token_ids
    assert [r.drafted for r in got.rounds] == [r.drafted for r in want.rounds]
    assert sum(r.accepted for r in got.rounds) > 0  # drafted from the restored index
    with pytest.raises(osc.OnlineSpecError, match="ngram index is corrupt"):
        fresh.draft.load_state_tensors({"docs": torch.tensor([1, 2]), "lengths": torch.tensor([5])})
