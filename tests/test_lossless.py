"""Lossless is sacred: greedy output equals the target's own, sampling keeps its distribution."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import onlinespec_core as osc
from onlinespec_core import decoding
from tests.tiny import make_model

PROMPTS = ["d", "def add(a, b):", "Tom has 3 apples and buys 4 more. How many apples does he have?" * 2]


def hf_greedy(target, ids, n, eos=None):
    out = target.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n,
                          eos_token_id=eos, pad_token_id=2, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_greedy_matches_target_generate(pair_dirs, arch):
    t, d = pair_dirs[arch]
    pair = osc.load_pair(target=str(t), draft=str(d))
    tok = pair.tokenizer
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        ref = hf_greedy(pair.target, ids, 24)
        for k in (range(1, 9) if arch == "llama" else (1, 3, 8)):
            out = osc.Engine(pair, k=k).generate(ids, max_new_tokens=24)
            assert out.token_ids == ref, (arch, prompt, k)
            assert sum(len(r.emitted) for r in out.rounds) == 24


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_eos_and_max_new_tokens_mid_round(pair_dirs, arch):
    t, _ = pair_dirs[arch]
    tok_pair = osc.load_pair(target=str(t), draft=str(t))  # target as draft: long rounds
    ids = tok_pair.tokenizer("def add(a, b):")["input_ids"]
    ref = hf_greedy(tok_pair.target, ids, 40)
    eos = ref[9]  # a token the target emits at step 10 -> EOS in the middle of a k=8 round
    first = ref.index(eos)
    tok_pair.target.generation_config.eos_token_id = eos
    try:
        for k in (3, 8):
            out = osc.Engine(tok_pair, k=k).generate(ids, max_new_tokens=40)
            assert out.token_ids == ref[: first + 1]
            assert out.token_ids[-1] == eos
    finally:
        tok_pair.target.generation_config.eos_token_id = 1
    for n in (1, 5, 13):  # max_new_tokens exact, never past it
        out = osc.Engine(tok_pair, k=8).generate(ids, max_new_tokens=n)
        assert out.token_ids == ref[:n]


def test_target_as_draft_accepts_everything(pair_dirs):
    t, _ = pair_dirs["llama"]
    pair = osc.load_pair(target=str(t), draft=str(t))
    for k in (1, 4, 7):
        out = osc.Engine(pair, k=k).generate("def add(a, b):", max_new_tokens=8 * (k + 1))
        assert all(r.accepted == r.k == k and r.kind == "bonus" for r in out.rounds)
        assert out.stats["tau"] == k + 1
        m = osc.engine.Metrics()
        for r in out.rounds:
            m.add(r)
        assert m.per_position_acceptance == [1.0] * k


def test_target_only_baseline_same_output(llama_pair):
    eng = osc.Engine(llama_pair, k=4)
    a = eng.generate_target_only("def add(a, b):", max_new_tokens=20)
    b = eng.generate("def add(a, b):", max_new_tokens=20)
    assert a.token_ids == b.token_ids
    assert all(r.k == 0 and r.kind == "target" for r in a.rounds)
    assert a.stats["target_forwards_per_token"] == 1.0
    assert b.stats["target_forwards_per_token"] <= 1.0


def test_dynamic_k_stays_lossless_and_moves(pair_dirs):
    t, d = pair_dirs["gpt2"]
    pair = osc.load_pair(target=str(t), draft=str(d))
    ids = pair.tokenizer("def add(a, b):")["input_ids"]
    eng = osc.Engine(pair, k=2, dynamic_k=True, k_min=1, k_max=10)
    out = eng.generate(ids, max_new_tokens=40)
    assert out.token_ids == hf_greedy(pair.target, ids, 40)
    assert len({r.k for r in out.rounds}) > 1  # the heuristic changed k


# ---- sampling: chi-square against the exact target distribution ------------------------

V = 6


@pytest.fixture(scope="module")
def tiny_vocab_pair(tokenizer):
    target = make_model("llama", V, hidden=32, layers=1, seed=11, eos_token_id=None)
    draft = make_model("llama", V, hidden=16, layers=1, seed=12, eos_token_id=None)
    with torch.no_grad():  # moderately peaked, clearly different distributions
        target.lm_head.weight.mul_(0.5)
        draft.lm_head.weight.mul_(0.5)
    pair = osc.load_pair(target=target, draft=draft, tokenizer=tokenizer)
    pair.target.generation_config.eos_token_id = []  # no EOS in this 6-token world
    return pair


def exact_joint(pair, prompt, cfg):
    """p(x1, x2 | prompt) of the target under the sampling config, by enumeration."""
    with torch.no_grad():
        ids = torch.tensor([prompt])
        p1 = osc.sampling.logits_to_probs(pair.target(ids).logits[0, -1], cfg)
        rows = []
        for x in range(V):
            nxt = torch.tensor([prompt + [x]])
            rows.append(p1[x] * osc.sampling.logits_to_probs(pair.target(nxt).logits[0, -1], cfg))
    return torch.stack(rows).reshape(-1).numpy()


def sampled_joint(pair, prompt, cfg, n, k=2, seed=0):
    eng = osc.Engine(pair, k=k, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=seed)
    counts = np.zeros(V * V)
    for _ in range(n):
        a, b = eng.generate(prompt, max_new_tokens=k + 1).token_ids[:2]  # one full k-round
        counts[a * V + b] += 1
    return counts


def chi2_pvalue(counts, probs):
    exp = probs * counts.sum()
    keep = exp >= 5
    obs = np.append(counts[keep], counts[~keep].sum())
    ex = np.append(exp[keep], exp[~keep].sum())
    if ex[-1] == 0:
        obs, ex = obs[:-1], ex[:-1]
    ex = ex * obs.sum() / ex.sum()
    return chisquare(obs, ex).pvalue


@pytest.mark.parametrize("cfg", [osc.SamplingConfig(1.0), osc.SamplingConfig(0.7, top_k=4, top_p=0.9)])
def test_sampling_reproduces_target_distribution(tiny_vocab_pair, cfg):
    prompt = [3, 1, 4]
    probs = exact_joint(tiny_vocab_pair, prompt, cfg)
    counts = sampled_joint(tiny_vocab_pair, prompt, cfg, n=1000)
    assert chi2_pvalue(counts, probs) > 1e-3


_real_accept = decoding.accept_sampling


def broken_accept(drafted, q, p, generator):
    """Wrong on purpose: on rejection, resample from p instead of norm(max(0, p - q))."""
    n, _ = _real_accept(drafted, q, p, generator)
    return n, int(osc.sampling.sample(p[n], generator))


def test_broken_rule_fails_the_same_test(tiny_vocab_pair, monkeypatch):
    cfg = osc.SamplingConfig(1.0)
    prompt = [3, 1, 4]
    probs = exact_joint(tiny_vocab_pair, prompt, cfg)
    monkeypatch.setattr(decoding, "accept_sampling", broken_accept)
    counts = sampled_joint(tiny_vocab_pair, prompt, cfg, n=1000)
    assert chi2_pvalue(counts, probs) < 1e-3


def test_temperature_on_one_side_fails(tiny_vocab_pair, monkeypatch):
    """Temperature applied to the draft only (target probs at T=1) breaks the distribution."""
    cfg = osc.SamplingConfig(0.5)
    prompt = [3, 1, 4]
    probs = exact_joint(tiny_vocab_pair, prompt, cfg)
    real = decoding.verify

    def verify_without_temperature(target, state, drafted, c, need_hidden):
        v = real(target, state, drafted, c, need_hidden)
        v.probs = torch.softmax(v.logits.float(), -1)
        return v
    monkeypatch.setattr(decoding, "verify", verify_without_temperature)
    counts = sampled_joint(tiny_vocab_pair, prompt, cfg, n=1000)
    assert chi2_pvalue(counts, probs) < 1e-3
