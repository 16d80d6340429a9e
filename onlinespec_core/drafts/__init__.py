"""Draft kinds by name: lm (separate small LM), eagle (feature head), hydra (heads)."""
from __future__ import annotations

from .base import Draft, Proposal, crop_cache, pad_vocab

DRAFT_KINDS = ("lm", "eagle", "hydra")

__all__ = ["Draft", "Proposal", "crop_cache", "pad_vocab", "DRAFT_KINDS"]
