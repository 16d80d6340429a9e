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
