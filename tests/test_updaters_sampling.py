"""Sampling stays lossless while the draft learns: tokens drafted by a draft that was updated
between rounds (and across samples) still follow the target's exact distribution."""
from __future__ import annotations

import itertools

import numpy as np
import torch

import onlinespec_core as osc
from tests.test_lossless import V, chi2_pvalue, tiny_vocab_pair  # noqa: F401  (fixture)


def exact_joint_34(pair, prompt, cfg):
    """p(x3, x4 | prompt) of the target, marginalising x1, x2 by enumeration."""
    with torch.no_grad():
        seqs = torch.tensor([prompt + list(p) for p in itertools.product(range(V), repeat=3)])
        probs = [osc.sampling.logits_to_probs(pair.target(seqs[:, :len(prompt) + j]).logits[:, -1], cfg)
                 for j in range(4)]  # [216, V] each: p(x_{j+1} | prompt, x_1..x_j)
    joint = np.zeros((V, V))
    for n, (a, b, c) in enumerate(itertools.product(range(V), repeat=3)):
        w = float(probs[0][n, a] * probs[1][n, b] * probs[2][n, c])
        joint[c] += w * probs[3][n].numpy()
    return joint.reshape(-1)


def test_sampling_lossless_while_learning(tiny_vocab_pair):  # noqa: F811
    cfg = osc.SamplingConfig(1.0)
    prompt = [3, 1, 4]
    probs = exact_joint_34(tiny_vocab_pair, prompt, cfg)
    pair = osc.load_pair(target=tiny_vocab_pair.target, draft=_copy(tiny_vocab_pair.draft.module),
                         tokenizer=tiny_vocab_pair.tokenizer)
    pair.target.generation_config.eos_token_id = []
    eng = osc.Engine(pair, k=1, temperature=1.0, seed=3, updater="ogd",
                     updater_options={"every": 1, "batch": 1, "lr": 0.05, "optimizer": "sgd"})
    w0 = [p.detach().clone() for p in pair.draft.module.parameters()]
    counts = np.zeros(V * V)
    for _ in range(700):  # k=1: rounds 2+ are drafted by a draft updated after round 1
        ids = eng.generate(prompt, max_new_tokens=4).token_ids
        counts[ids[2] * V + ids[3]] += 1
    assert any(not torch.equal(a, b) for a, b in zip(w0, pair.draft.module.parameters()))
    assert chi2_pvalue(counts, probs) > 1e-3


def _copy(module):
    import copy
    return copy.deepcopy(module)
