"""The Draft protocol: what every draft kind (lm, eagle, hydra) offers the engine and updaters."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..feedback import Round
from ..sampling import SamplingConfig


@dataclass
class Proposal:
    tokens: torch.Tensor  # [k] long, the drafted ids
    logits: torch.Tensor  # [k, V] raw draft logits at the drafted positions (no grad)
    probs: torch.Tensor  # [k, V] fp32 sampling distributions q_i the tokens were drawn from


@runtime_checkable
class Draft(Protocol):
    kind: str
    module: nn.Module  # every trainable parameter of the draft lives here
    needs_hidden: bool  # True when the draft reads the target's hidden states

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

    def save(self, path: str | Path) -> None:
        """Write weights (safetensors) + config into directory path."""


def draft_state(draft: Draft) -> dict[str, torch.Tensor]:
    """What a draft learnt outside its module's weights (e.g. the ngram draft's stream index):
    draft.state_tensors() where a kind has it, else nothing. Saved with the engine's state."""
    fn = getattr(draft, "state_tensors", None)
    return dict(fn()) if fn is not None else {}


def load_draft_state(draft: Draft, tensors: dict[str, torch.Tensor]) -> None:
    """The inverse of draft_state (load_state_tensors); a kind without it must get nothing."""
    fn = getattr(draft, "load_state_tensors", None)
    if fn is not None:
        fn(tensors)


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
