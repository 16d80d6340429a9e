"""Draft kinds by name: lm (separate small LM), eagle (feature head), hydra (heads), ngram (lookup)."""
from __future__ import annotations

from .base import Draft, Proposal, crop_cache, pad_vocab

DRAFT_KINDS = ("lm", "eagle", "hydra", "ngram")

__all__ = ["Draft", "Proposal", "crop_cache", "pad_vocab", "DRAFT_KINDS"]
