"""Shared fixtures: tiny random HF models of several architectures and a real BPE tokenizer,
written to real directories so that load_pair exercises the same path users take."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny import build_tokenizer, make_model  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads only add overhead


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _save(model, tok, d: Path) -> Path:
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def pair_dirs(tmp_path_factory, tokenizer):
    """arch -> (target_dir, draft_dir) for llama, qwen2 and gpt2 tiny random models."""
    out = {}
    for arch in ("llama", "qwen2", "gpt2"):
        root = tmp_path_factory.mktemp(arch)
        target = make_model(arch, len(tokenizer), hidden=64, layers=2, seed=1)
        draft = make_model(arch, len(tokenizer), hidden=32, layers=1, seed=2)
        out[arch] = (_save(target, tokenizer, root / "target"), _save(draft, tokenizer, root / "draft"))
    return out


@pytest.fixture
def llama_pair(pair_dirs):
    import onlinespec_core as osc
    t, d = pair_dirs["llama"]
    return osc.load_pair(target=str(t), draft=str(d))
