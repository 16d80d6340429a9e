"""The demo recipe reproduces a (tiny) pair from scratch: corpus, tokenizer, target, draft, streams."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from onlinespec_core.demo import recipe  # noqa: E402
from onlinespec_core.demo.corpus import ALL_SETS, TOPICS, CorpusConfig, build_corpus, read_split  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_tiny")
    rc = recipe.main(["--tiny", "--out", str(out / "work"), "--install", str(out / "assets")])
    assert rc == 0
    return out


def test_recipe_outputs_load_with_transformers(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for which in ("target", "draft"):
        d = tiny_run / "assets" / "models" / "demo" / which
        assert (d / "model.safetensors").exists() and (d / "config.json").exists()
        assert not list(d.glob("*.bin")) and not list(d.glob("*.pt")), "weights must be safetensors only"
        tok = AutoTokenizer.from_pretrained(str(d))
        model = AutoModelForCausalLM.from_pretrained(str(d))
        enc = tok("def add(a, b):\n", return_tensors="pt")
        assert enc["input_ids"][0, 0].item() == tok.bos_token_id
        with torch.no_grad():
            g = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        assert g.shape[1] > enc["input_ids"].shape[1]
        assert model.config.vocab_size >= len(tok)
    # target and draft share the tokenizer
    t = AutoTokenizer.from_pretrained(str(tiny_run / "assets" / "models" / "demo" / "target"))
    d = AutoTokenizer.from_pretrained(str(tiny_run / "assets" / "models" / "demo" / "draft"))
    assert t.get_vocab() == d.get_vocab()


def test_recipe_streams_parse_and_come_from_heldout(tiny_run):
    sdir = tiny_run / "assets" / "streams"
    names = {p.stem for p in sdir.glob("*.jsonl")}
    assert {"code", "math", "sql", "prose", "shift", "shift_short"} <= names
    corpus = tiny_run / "work" / "corpus"
    train_prompts = {d["prompt"] for t in TOPICS for d in read_split(corpus, t, "train")}
    held_prompts = {d["prompt"] for t in TOPICS for d in read_split(corpus, t, "heldout")}
    for p in sdir.glob("*.jsonl"):
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        assert rows, p
        for r in rows:
            assert set(r) == {"topic", "prompt"} and r["topic"] in TOPICS and r["prompt"]
            assert r["prompt"] in held_prompts and r["prompt"] not in train_prompts
    shift = [json.loads(line)["topic"] for line in (sdir / "shift.jsonl").read_text().splitlines()]
    order = [t for i, t in enumerate(shift) if i == 0 or shift[i - 1] != t]
    assert order == ["code", "math", "sql", "prose"]


def test_recipe_report_and_resume(tiny_run):
    rep = json.loads((tiny_run / "work" / "report.json").read_text())
    assert set(rep["eval"]["target_heldout_loss"]) >= set(TOPICS)
    assert rep["eval"]["decode_ms"]["ratio"] > 0
    # resume: a second invocation of the target stage finds the final checkpoint and does not retrain
    rc = recipe.main(["--tiny", "--out", str(tiny_run / "work"), "--stages", "target"])
    assert rc == 0
    rep2 = json.loads((tiny_run / "work" / "report.json").read_text())
    assert rep2["target_train"]["step"] == rep["target_train"]["step"]


def test_corpus_is_deterministic_and_splits_are_disjoint(tmp_path):
    cfg = CorpusConfig(seed=3, n_math=150, n_sql=150, n_prose=100, n_general=100, max_code_functions=60, max_code_files=30,
                       max_code_extra=20, max_pydoc_paragraphs=20, min_heldout=10)
    a = build_corpus(tmp_path / "a", cfg, log=lambda m: None)
    b = build_corpus(tmp_path / "b", cfg, log=lambda m: None)
    assert a == b
    for s in ALL_SETS:
        for split in ("train", "heldout"):
            assert (tmp_path / "a" / f"{s}.{split}.jsonl").read_bytes() == \
                (tmp_path / "b" / f"{s}.{split}.jsonl").read_bytes()
        tr = read_split(tmp_path / "a", s, "train")
        ho = read_split(tmp_path / "a", s, "heldout")
        assert ho, s
        assert not ({d["id"] for d in tr} & {d["id"] for d in ho})
        assert not ({d["prompt"] + d["completion"] for d in tr} & {d["prompt"] + d["completion"] for d in ho})


def test_deadline_parsing():
    assert recipe.parse_deadline(None) is None
    assert recipe.parse_deadline("1700000000") == 1700000000.0
    assert recipe.parse_deadline("2026-01-01T00:00:00") == 1767225600.0
    assert isinstance(recipe.parse_deadline("15:50"), float)


def test_bad_stage_is_rejected(tmp_path):
    assert recipe.main(["--tiny", "--out", str(tmp_path), "--stages", "nonsense"]) == 2


def test_anneal_phase_continues_from_the_first_phase(tiny_run):
    rep = json.loads((tiny_run / "work" / "report.json").read_text())
    assert rep["target_anneal"]["step"] > 0
    shipped = json.loads((tiny_run / "assets" / "models" / "demo" / "target" / "training.json").read_text())
    # the exported target is the second phase, started from the first phase's final checkpoint
    assert shipped["init_from"]["step"] == rep["target_train"]["step"]
    assert shipped["step"] == rep["target_anneal"]["step"]


def test_batcher_copy_rows_repeat_their_window(tmp_path):
    import numpy as np

    from onlinespec_core.demo.train import Batcher

    np.save(tmp_path / "code.train.npy", np.arange(5000, dtype=np.uint16) % 997)
    b = Batcher(tmp_path, {"code": 0.5, "copy:code": 0.5}, seq_len=32, batch_size=64, seed=1)
    x = b.batch(0)
    assert x.shape == (64, 33)
    repeats = [bool((r[17:33] == r[:16]).all()) for r in x]
    assert 10 < sum(repeats) < 54  # both kinds of rows appear
    plain = [r for r, rep in zip(x, repeats) if not rep]
    assert all(bool(((r[1:] - r[:-1]) % 997 == 1).all()) for r in plain)  # contiguous windows
    assert torch.equal(b.batch(5), Batcher(tmp_path, {"code": 0.5, "copy:code": 0.5}, 32, 64, 1).batch(5))


def test_copy_probe_separates_a_copying_model():
    from onlinespec_core.demo.train import copy_probe_loss

    class Copier(torch.nn.Module):
        """Predicts, at each position, the token that followed the previous occurrence of the current one."""

        def __init__(self, vocab):
            super().__init__()
            self.config = transformers.LlamaConfig(vocab_size=vocab, bos_token_id=1)

        def forward(self, input_ids):
            b, t = input_ids.shape
            logits = torch.zeros(b, t, self.config.vocab_size)
            for i in range(b):
                seen = {}
                for j in range(t):
                    tok = int(input_ids[i, j])
                    if tok in seen:
                        logits[i, j, int(input_ids[i, seen[tok] + 1])] = 30.0
                    seen[tok] = j
            return type("Out", (), {"logits": logits})()

    probe = copy_probe_loss(Copier(50_000), n=24)
    assert probe["repeat"] < 0.1 < 5.0 < probe["first"]
