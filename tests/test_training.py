"""Warm-up training: learning (tau rises on held-out text), data formats, the train-draft CLI."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

import onlinespec_core as osc
from onlinespec_core import cli
from onlinespec_core.errors import OnlineSpecError
from onlinespec_core.training import WarmupConfig, batches, load_tokens, warm_up
from tests.tiny import make_model

NAMES = ["Tom", "Ann", "Bob", "Eve", "Sam", "Kim"]
THINGS = ["apples", "pears", "books", "coins"]


def corpus(seed: int, n: int) -> list[str]:
    """Small templated corpus (math / code / sql lines); seeds give disjoint-ish splits."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = r.randint(1, 9), r.randint(1, 9)
        out.append(r.choice([
            f"{r.choice(NAMES)} has {a} {r.choice(THINGS)} and buys {b} more. {a} + {b} = {a + b}.",
            f"def add_{a}(x, y):\n    return x + y * {b}\n",
            f"SELECT name FROM users WHERE age > {a}{b};"]))
    return out


@pytest.fixture(scope="module")
def lm_target(tokenizer):
    """A tiny Llama briefly trained on the corpus, so its greedy text follows the source."""
    torch.manual_seed(0)
    target = make_model("llama", len(tokenizer), hidden=64, layers=2, seed=1)
    tokens = load_tokens(corpus(0, 400), tokenizer)
    opt = torch.optim.AdamW(target.parameters(), lr=3e-3)
    target.train()
    for _, ids in zip(range(100), batches(tokens, 16, 64, torch.Generator().manual_seed(0))):
        loss = target(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    target.eval().requires_grad_(False)
    target.generation_config.eos_token_id = None
    return target


def heldout_tau(pair, n_prompts: int = 10) -> float:
    eng = osc.Engine(pair, k=4)
    m = osc.metrics.Metrics()
    for text in corpus(1, n_prompts):
        ids = pair.tokenizer(text)["input_ids"][:12]
        for r in eng.generate(ids, max_new_tokens=32).rounds:
            if r.k:
                m.add(r)
    return m.tau


@pytest.mark.parametrize("kind", ["eagle", "hydra", "lm"])
def test_warm_up_raises_tau_on_heldout_text(lm_target, tokenizer, kind):
    if kind == "lm":
        from onlinespec_core.training import small_lm
        draft = small_lm(lm_target, hidden=32, layers=1)
        pair = osc.load_pair(target=lm_target, draft=draft, tokenizer=tokenizer)
    else:
        pair = osc.load_pair(target=lm_target, draft=None, draft_kind=kind, tokenizer=tokenizer)
    before = heldout_tau(pair)
    res = warm_up(pair, corpus(0, 400), steps=120, batch_size=8, seq_len=64, lr=3e-3)
    after = heldout_tau(pair)
    print(f"{kind}: held-out tau {before:.2f} -> {after:.2f} (k=4)")
    assert res.steps == 120 and res.final_loss < res.first_loss
    assert after > before + 0.5, (kind, before, after)
    assert after > 2.0, (kind, before, after)


def test_load_tokens_formats(tmp_path, tokenizer):
    texts = corpus(2, 5)
    (tmp_path / "a.txt").write_text("\n\n".join(texts))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"prompt": t[:10], "completion": t[10:]}) for t in texts)
                                      + "\n" + json.dumps({"text": "plain text line"}) + "\n")
    np.save(tmp_path / "a.npy", np.arange(50, dtype=np.uint16))
    assert load_tokens(tmp_path / "a.txt", tokenizer).numel() > 20
    assert load_tokens(str(tmp_path / "a.jsonl"), tokenizer).numel() > 20
    assert load_tokens(tmp_path / "a.npy").tolist() == list(range(50))
    assert load_tokens(texts, tokenizer).numel() == load_tokens(tmp_path / "a.txt", tokenizer).numel()
    assert load_tokens([{"topic": "x", "prompt": "def f(x):"}], tokenizer).numel() > 2
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(OnlineSpecError, match="bad.jsonl:1"):
        load_tokens(tmp_path / "bad.jsonl", tokenizer)
    with pytest.raises(OnlineSpecError, match="does not exist"):
        load_tokens(tmp_path / "nope.txt", tokenizer)


def test_minutes_limit_and_config_errors(pair_dirs):
    t, _ = pair_dirs["gpt2"]
    pair = osc.load_pair(target=str(t), draft=None, draft_kind="hydra")
    res = warm_up(pair, corpus(3, 50), minutes=1e-4, batch_size=2, seq_len=16)
    assert res.steps >= 1
    with pytest.raises(OnlineSpecError, match="lr must be"):
        warm_up(pair, corpus(3, 50), WarmupConfig(lr=0))


def run_cli(*args: str) -> int:
    return cli.main(["train-draft", *args])


@pytest.mark.parametrize("kind,fmt", [("hydra", "txt"), ("eagle", "jsonl"), ("lm", "npy")])
def test_train_draft_cli(pair_dirs, tokenizer, tmp_path, capfd, kind, fmt):
    t, _ = pair_dirs["qwen2"]
    texts = corpus(4, 80)
    data = tmp_path / f"data.{fmt}"
    if fmt == "txt":
        data.write_text("\n\n".join(texts))
    elif fmt == "jsonl":
        data.write_text("\n".join(json.dumps({"text": x}) for x in texts))
    else:
        np.save(data, load_tokens(texts, tokenizer).numpy().astype(np.uint16))
    out = tmp_path / "out"
    extra = ["--n-heads", "3", "--prefix"] if kind == "hydra" else ["--save-dtype", "bfloat16"]
    rc = run_cli("--kind", kind, "--target", str(t), "--data", str(data), "--out", str(out),
                 "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--hidden", "32", *extra)
    err = capfd.readouterr()
    assert rc == 0, err.err
    assert "warm-up" in err.err and "4/4" in err.err  # the tqdm progress bar
    assert f"{kind} draft" in err.out
    report = json.loads((out / "training.json").read_text())
    assert report["steps"] == 4 and report["kind"] == kind
    pair = osc.load_pair(target=str(t), draft=str(out), draft_kind=kind)
    if kind == "hydra":
        assert len(pair.draft.module.heads) == 3 and pair.draft.module.prefix is not None
    ids = pair.tokenizer("def add(a, b):")["input_ids"]
    pair.target.generation_config.eos_token_id = None
    ref = pair.target.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12, pad_token_id=2,
                               attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    assert osc.Engine(pair, k=3).generate(ids, max_new_tokens=12).token_ids == ref
    # continue training from the saved draft (--init)
    if kind != "lm":
        assert run_cli("--kind", kind, "--target", str(t), "--data", str(data), "--out", str(tmp_path / "again"),
                       "--init", str(out), "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--quiet") == 0


def test_train_draft_cli_errors(pair_dirs, tmp_path, capsys):
    t, _ = pair_dirs["llama"]
    with pytest.raises(SystemExit) as e:
        run_cli("--help")
    assert e.value.code == 0
    assert "--kind" in capsys.readouterr().out
    assert run_cli("--kind", "eagle", "--target", str(t), "--data", str(tmp_path / "none.txt"),
                   "--out", str(tmp_path / "o"), "--steps", "1") == 2
    assert "does not exist" in capsys.readouterr().err
    assert run_cli("--kind", "eagle", "--target", str(t), "--data", "x", "--out", "o", "--prefix") == 2
    assert "hydra options" in capsys.readouterr().err
