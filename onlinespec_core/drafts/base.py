"""The Draft protocol: what every draft kind (lm, eagle, hydra) offers the engine and updaters."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import require
from ..feedback import Round
from ..sampling import SamplingConfig
from .logit_cache import LogitCache


@dataclass
class Proposal:
    tokens: torch.Tensor  # [k] long, the drafted ids
    logits: torch.Tensor  # [k, V] raw draft logits at the drafted positions (no grad)
    probs: torch.Tensor  # [k, V] fp32 sampling distributions q_i the tokens were drawn from


@runtime_checkable
class Draft(Protocol):
    """A draft kind subclasses this (capabilities and no-op hooks come with defaults)."""
    kind: ClassVar[str]
    module: nn.Module  # every trainable parameter of the draft lives here
    # capabilities
    needs_hidden: ClassVar[bool] = False  # reads the target's hidden states (feature drafts)
    trainable: ClassVar[bool] = True  # has weights an updater can train (a lookup draft: False)
    merges_rounds: ClassVar[bool] = False  # one causal forward over a sequence gives every
    #                                        round's training logits on the path (lm drafts)
    has_train_terms: ClassVar[bool] = False  # train_terms adds losses beyond the logits (eagle)
    batches_rounds: ClassVar[bool] = False  # train_rows reads a whole batch in one pass (hydra)
    supports_logit_cache: ClassVar[bool] = False  # propose adds logit_cache's tables (lm, eagle, hydra)
    logit_cache: LogitCache | None = None  # set by an updater (options cache_lr / bigram_lr)

    def reset(self) -> None:
        """Forget any cached state (new sequence)."""

    def invalidate(self) -> None:
        """The weights changed: recompute cached state from the sequence at the next propose."""

    def propose(self, seq: torch.Tensor, k: int, cfg: SamplingConfig,
                generator: torch.Generator | None) -> Proposal:
        """Draft k tokens autoregressively after seq ([L] long ids)."""

    def commit(self, valid_len: int, target_hidden: torch.Tensor | None = None,
               hidden_start: int = 0) -> None:
        """After verification: the first valid_len tokens of the sequence are final; drop cached
        state beyond them. target_hidden ([n, H], fp32) are the target's last hidden states of
        sequence positions hidden_start .. hidden_start+n-1 (only passed when needs_hidden)."""

    def train_logits(self, rnd: Round) -> torch.Tensor:
        """[k, V] draft logits at the round's drafted positions, recomputed WITH grad from
        exactly the inputs the draft saw when it proposed them."""

    def train_rows(self, rounds: list[Round], ms: list[int]) -> torch.Tensor:
        """[sum(ms), V] training logits: the first ms[i] drafted positions of each round."""
        return torch.cat([self.train_logits(r)[:m] for r, m in zip(rounds, ms)])

    def train_terms(self, rnd: Round) -> dict[str, torch.Tensor]:
        """{"logits": train_logits(rnd)} plus extra loss terms (e.g. "feature_loss") when
        has_train_terms."""
        return {"logits": self.train_logits(rnd)}

    def offline_loss(self, ids: torch.Tensor, feats: torch.Tensor | None, target_logits: torch.Tensor,
                     generator: torch.Generator | None = None,
                     max_positions: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Warm-up training loss on a window of ids (training.py)."""
        raise NotImplementedError(f"the {self.kind!r} draft has no offline training loss")

    def observe_sequence(self, seq: torch.Tensor) -> None:
        """A sequence ended (prompt + output): drafts that index what they saw (ngram) file it."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What the draft learnt outside its module's weights (the logit tables; ngram: its
        stream index); saved with the engine's state."""
        c = self.logit_cache
        return {} if c is None else {f"logit_cache.{k}": v for k, v in c.state_tensors().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """The inverse of state_tensors; a kind without such state gets nothing."""
        got = {k[len("logit_cache."):]: v for k, v in tensors.items() if k.startswith("logit_cache.")}
        rest = sorted(set(tensors) - {f"logit_cache.{k}" for k in got})
        require(not rest and (not got or self.supports_logit_cache),
                f"the saved state holds {(rest or sorted(tensors))[:3]} for a {self.kind!r} draft, which "
                "keeps no such state outside its weights; load it with the draft kind it was saved from")
        if not got or got["unigram"].numel() == 0:  # none saved: the draft proposes without tables
            self.logit_cache = None
            return
        require(got["unigram"].numel() == getattr(self, "vocab_size", got["unigram"].numel()) and "meta" in got,
                "the saved logit tables do not fit this draft's vocabulary; save the state again")
        dev = getattr(self, "device", "cpu")
        self.logit_cache = LogitCache.from_state({k: v.to(dev) for k, v in got.items()})

    def save(self, path: str | Path) -> None:
        """Write weights (safetensors) + config into directory path."""


def crop_cache(cache, keep_len: int) -> None:
    """Keep the first keep_len positions of an HF cache (crop takes a negative count)."""
    if cache is None:
        return
    drop = cache.get_seq_length() - keep_len
    if drop > 0:
        cache.crop(-drop)


def pad_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Pad [..., V'] logits with -inf up to the target's vocab size (ids the draft cannot emit)."""
    extra = vocab - logits.shape[-1]
    if extra <= 0:
        return logits[..., :vocab] if extra < 0 else logits
    pad = logits.new_full((*logits.shape[:-1], extra), float("-inf"))
    return torch.cat([logits, pad], dim=-1)
