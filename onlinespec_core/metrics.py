"""Acceptance metrics: tau, per-position acceptance, throughput, rolling windows."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .feedback import Round


def expected_tau(alpha: float, k: int) -> float:
    """E[tau] with i.i.d. per-token acceptance alpha: (1 - alpha^(k+1)) / (1 - alpha)."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def speedup_bound(tau: float, k: int, c: float) -> float:
    """Ideal speedup over target-only decoding: tau / (1 + k*c), c = draft/target cost ratio."""
    return tau / (1.0 + k * c)


@dataclass
class Metrics:
    """Running totals over rounds, plus a rolling window of recent tau."""
    window: int = 32
    rounds: int = 0
    tokens: int = 0
    accepted: int = 0
    drafted: int = 0
    wall_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    update_s: float = 0.0
    updates: int = 0
    pos_drafted: list[int] = field(default_factory=list)  # rounds that drafted position i
    pos_accepted: list[int] = field(default_factory=list)  # rounds that accepted position i
    recent: deque = field(default_factory=deque)

    def add(self, rnd: Round) -> None:
        self.count(rnd.k, rnd.accepted, len(rnd.emitted), rnd.wall_s, rnd.draft_s, rnd.verify_s,
                   rnd.update_s, rnd.updated)

    def count(self, k: int, accepted: int, tokens: int, wall_s: float, draft_s: float = 0.0,
              verify_s: float = 0.0, update_s: float = 0.0, updated: bool = False) -> None:
        """One round's numbers (add() from a Round; the app from the worker's flat record)."""
        self.rounds += 1
        self.tokens += tokens
        self.accepted += accepted
        self.drafted += k
        self.wall_s += wall_s
        self.draft_s += draft_s
        self.verify_s += verify_s
        self.update_s += update_s
        self.updates += int(updated)
        while len(self.pos_drafted) < k:
            self.pos_drafted.append(0)
            self.pos_accepted.append(0)
        for i in range(k):
            self.pos_drafted[i] += 1
            self.pos_accepted[i] += int(i < accepted)
        self.recent.append(accepted + 1)
        if len(self.recent) > self.window:
            self.recent.popleft()

    @property
    def tau(self) -> float:
        """Mean acceptance length: accepted + 1 per round."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def rolling_tau(self) -> float:
        return sum(self.recent) / len(self.recent) if self.recent else 0.0

    @property
    def per_position_acceptance(self) -> list[float]:
        """vLLM's unconditional rate: accepted at position i / rounds that drafted position i."""
        return [a / d if d else 0.0 for a, d in zip(self.pos_accepted, self.pos_drafted)]

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def forwards_per_token(self) -> float:
        """Target forward passes per emitted token (1.0 for target-only decoding)."""
        return self.rounds / self.tokens if self.tokens else 0.0

    def as_dict(self) -> dict:
        return {
            "tau": self.tau, "rolling_tau": self.rolling_tau, "rounds": self.rounds,
            "tokens": self.tokens, "acceptance_rate": self.acceptance_rate,
            "per_position_acceptance": self.per_position_acceptance,
            "tokens_per_s": self.tokens_per_s, "target_forwards_per_token": self.forwards_per_token,
            "wall_s": self.wall_s, "draft_s": self.draft_s, "verify_s": self.verify_s,
            "update_s": self.update_s, "update_fraction": self.update_s / self.wall_s if self.wall_s else 0.0,
            "updates": self.updates,
        }
