"""The shipped demo pair (assets/models/demo) and prompt streams (assets/streams) load offline and work."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "models" / "demo"
STREAMS = ROOT / "assets" / "streams"
TOPICS = ("code", "math", "sql", "prose")
# mean loss (nats/token) of the shipped target on the first 20 prompts of each stream, measured at
# 3.23 / 0.59 / 0.22 / 0.75 (the general-only draft: 8.28 / 9.66 / 8.35 / 9.01); bounds leave room
# for a retrained pair, not for a target that does not know a topic
TARGET_PROMPT_LOSS_MAX = {"code": 3.6, "math": 1.0, "sql": 0.5, "prose": 1.2}

needs_assets = pytest.mark.skipif(
    not (DEMO / "target" / "model.safetensors").exists() or not (DEMO / "draft" / "model.safetensors").exists(),
    reason="demo assets absent: build them with `onlinespec train-demo --install assets`")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _load(which: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(DEMO / which))
    model = AutoModelForCausalLM.from_pretrained(str(DEMO / which), dtype=torch.float32)
    model.eval()
    return tok, model


@needs_assets
def test_assets_are_safetensors_and_small():
    total = 0
    for which in ("target", "draft"):
        d = DEMO / which
        assert (d / "config.json").exists() and (d / "tokenizer.json").exists()
        assert not [p for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
        total += sum(p.stat().st_size for p in d.iterdir() if p.is_file())
    assert total < 60 * 2**20, f"demo assets are {total / 2**20:.1f} MiB"


@needs_assets
def test_pair_loads_fast_and_shares_tokenizer():
    t0 = time.perf_counter()
    ttok, target = _load("target")
    dtok, draft = _load("draft")
    assert time.perf_counter() - t0 < 5.0
    assert ttok.get_vocab() == dtok.get_vocab()
    nt = sum(p.numel() for p in target.parameters())
    nd = sum(p.numel() for p in draft.parameters())
    assert 15e6 <= nt <= 25e6, nt
    assert nd <= 2e6, nd
    assert target.config.vocab_size == draft.config.vocab_size


@needs_assets
def test_tokenizer_round_trips():
    tok, _ = _load("target")
    samples = ["def f(x):\n    return x + 1\n", "Question: Ana has 3 apples.\nAnswer:",
               "SELECT name FROM employees WHERE city = 'Boston';", "naïve café — 数学 \t tabs\n\n"]
    for s in samples:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == s
        enc = tok(s)["input_ids"]
        assert enc[0] == tok.bos_token_id
        assert tok.decode(enc, skip_special_tokens=True) == s
    assert tok.eos_token_id is not None and tok.pad_token_id is not None


@needs_assets
def test_target_generates_topical_continuations():
    tok, target = _load("target")
    rows = [json.loads(line) for line in (STREAMS / "math.jsonl").read_text().splitlines()[:2]]
    for r in rows:
        enc = tok(r["prompt"], return_tensors="pt")
        with torch.no_grad():
            g = target.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        new = g[0, enc["input_ids"].shape[1]:]
        assert new.numel() > 0
        text = tok.decode(new, skip_special_tokens=True)
        assert any(ch.isdigit() for ch in text), text  # a worked answer has numbers


@needs_assets
def test_draft_generates():
    tok, draft = _load("draft")
    enc = tok("Once upon a time,", return_tensors="pt")
    with torch.no_grad():
        g = draft.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert g.shape[1] > enc["input_ids"].shape[1]


@pytest.mark.skipif(not STREAMS.is_dir() or not list(STREAMS.glob("*.jsonl")), reason="streams absent")
def test_streams_parse():
    names = {p.stem for p in STREAMS.glob("*.jsonl")}
    assert {"code", "math", "sql", "prose", "shift", "shift_short"} <= names
    for p in STREAMS.glob("*.jsonl"):
        rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        assert rows
        for r in rows:
            assert set(r) == {"topic", "prompt"} and r["topic"] in TOPICS and r["prompt"].strip()
    for t in TOPICS:
        assert 30 <= len((STREAMS / f"{t}.jsonl").read_text().splitlines()) <= 60
    shift = [json.loads(line)["topic"] for line in (STREAMS / "shift.jsonl").read_text().splitlines()]
    assert [t for i, t in enumerate(shift) if i == 0 or shift[i - 1] != t] == ["code", "math", "sql", "prose"]
    assert len(shift) >= 80


@pytest.mark.skipif(not (STREAMS / "shift_long.jsonl").exists(), reason="long stream absent")
def test_long_shift_stream_returns_to_a_topic():
    rows = [json.loads(line) for line in (STREAMS / "shift_long.jsonl").read_text().splitlines()]
    topics = [r["topic"] for r in rows]
    visits = [t for i, t in enumerate(topics) if i == 0 or topics[i - 1] != t]
    assert visits == ["code", "math", "sql", "prose", "code"]  # a return visit: forgetting shows
    assert len({r["prompt"] for r in rows}) == len(rows)  # no prompt twice
    counts = {t: topics.count(t) for t in TOPICS}
    assert counts["code"] >= 120 and counts["math"] >= 100 and counts["prose"] >= 100
    assert counts["sql"] >= 60  # every held-out sql prompt: the templated generator has only ~70 unseen


@needs_assets
def test_load_pair_demo_is_fast():
    import onlinespec_core as osc
    t0 = time.perf_counter()
    pair = osc.load_pair("demo")
    assert time.perf_counter() - t0 < 5.0
    assert pair.target is not None and pair.tokenizer is not None


def _prompt_loss(tok, model, prompts) -> float:
    """Mean next-token loss (nats) over held-out stream prompts, one forward each."""
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids).logits[0, :-1].float()
            tot += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            cnt += ids.shape[1] - 1
    return tot / cnt


@needs_assets
def test_target_is_good_on_every_topic_and_the_draft_is_not():
    """The shipped target has a low loss on held-out prompts of every topic (numbers in the README);
    the general-only draft is far worse there, which is what leaves online learning something to win."""
    tok, target = _load("target")
    _, draft = _load("draft")
    for topic in TOPICS:
        prompts = [json.loads(line)["prompt"] for line in (STREAMS / f"{topic}.jsonl").read_text().splitlines()][:20]
        lt, ld = _prompt_loss(tok, target, prompts), _prompt_loss(tok, draft, prompts)
        assert lt < TARGET_PROMPT_LOSS_MAX[topic], (topic, lt)
        assert ld > lt + 1.0, (topic, lt, ld)


@needs_assets
def test_target_copies_in_context():
    """Induction: random tokens repeated once are predicted far better the second time."""
    from onlinespec_core.demo.train import copy_probe_loss

    _, target = _load("target")
    probe = copy_probe_loss(target)
    assert probe["repeat"] < probe["first"] - 2.0, probe  # measured 11.38 -> 8.08
