"""The Round record: one draft-verify round, i.e. one online-learning round's feedback."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


ORIGINS = ("draft", "correction", "bonus", "target")  # accepted draft | rejection fix | bonus | target-only


def origins(accepted: int, kind: str, n: int) -> list[str]:
    """Origin of each of a round's n emitted tokens: accepted draft tokens, then the target's."""
    if kind == "target":
        return ["target"] * n
    last = "bonus" if kind == "bonus" else "correction"
    return ["draft" if i < accepted else last for i in range(n)]


@dataclass
class Round:
    index: int  # round number within the engine's lifetime
    context_len: int  # tokens in the sequence before this round (prompt + emitted so far)
    k: int  # draft length used this round (0 = target-only step)
    drafted: list[int]  # the k proposed token ids
    accepted: int  # how many drafted tokens were accepted (0..k)
    emitted: list[int]  # tokens appended this round: accepted drafts + correction/bonus (cut at EOS/max)
    kind: str  # "bonus" when all k accepted, "correction" otherwise, "target" when k == 0
    # feedback tensors (kept on the model's device; released after the updater has seen them)
    context_tail: torch.Tensor | None = None  # [W] last W context ids (what the draft conditioned on)
    draft_logits: torch.Tensor | None = None  # [k, V] draft logits at the drafted positions (raw)
    target_logits: torch.Tensor | None = None  # [k+1, V] target logits at the verified positions (raw)
    target_hidden: torch.Tensor | None = None  # [k+1, H] target last hidden states, when a draft needs them
    draft_p: list[float] = field(default_factory=list)  # q(x_i) of each drafted token (sampling dists)
    target_p: list[float] = field(default_factory=list)  # p(x_i) of each emitted token (sampling dists)
    topic: str | None = None
    prompt_index: int | None = None
    draft_s: float = 0.0
    verify_s: float = 0.0
    update_s: float = 0.0
    bookkeeping_s: float = 0.0
    updated: bool = False  # did the updater change the draft after this round
    loss: float | None = None  # online loss of this round (before any update), if computed

    @property
    def tau(self) -> int:
        """Acceptance length: tokens per target forward, counting the bonus/correction."""
        return self.accepted + 1

    @property
    def origins(self) -> list[str]:
        """Where each emitted token came from (ORIGINS)."""
        return origins(self.accepted, self.kind, len(self.emitted))

    @property
    def wall_s(self) -> float:
        return self.draft_s + self.verify_s + self.update_s + self.bookkeeping_s

    def release(self) -> None:
        """Drop the heavy tensors (after the updater has taken what it needs)."""
        self.context_tail = None
        self.draft_logits = None
        self.target_logits = None
        self.target_hidden = None

    def summary(self) -> dict:
        return {
            "round": self.index, "k": self.k, "accepted": self.accepted, "tau": self.tau,
            "kind": self.kind, "emitted": list(self.emitted), "drafted": list(self.drafted),
            "topic": self.topic, "prompt_index": self.prompt_index, "context_len": self.context_len,
            "draft_s": self.draft_s, "verify_s": self.verify_s, "update_s": self.update_s,
            "updated": self.updated, "loss": self.loss,
        }
