"""Cost-aware draft length (EngineConfig.cost_k): each round, the k that maximises expected
tokens per second on this machine, from the engine's own measurements.

With a per-position acceptance rate a, a round with draft length k emits
E(k) = sum_{i=0..k} a^i = (1 - a^(k+1)) / (1 - a) tokens and costs k*d + t(k+1) seconds (d: one
draft step, t(n): a target forward of n tokens); k = 0 is plain decoding at 1 / t(1). a is a
decayed count of accepted vs rejected positions, d and t(n) are running means of the rounds'
timings (t(n) for unseen n from a line through the seen ones). When k = 0 wins, a probe round
still drafts one token, so a keeps tracking a draft that learns: after `probe_every` rounds,
the gap doubling after each probe that leaves k = 0 the best choice (up to `probe_max`) and
resetting once drafting pays again.
Lossless like any k: only how many tokens are drafted changes, never how they are checked.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .feedback import Round


@dataclass
class CostK:
    k_max: int
    k_min: int = 0
    probe_every: int = 8
    probe_max: int = 64
    decay: float = 0.9  # weight of the past in every running estimate
    accepted: float = 1.0  # decayed counts of accepted / rejected draft positions (prior a = 0.5)
    rejected: float = 1.0
    draft_s: float | None = None  # seconds per drafted token
    t: dict[int, float] = field(default_factory=dict)  # n fed tokens -> seconds per target forward
    since_probe: int = 0
    gap: int = 0  # rounds between probes now (probe_every .. probe_max)
    probing: bool = False

    @property
    def alpha(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def observe(self, rnd: Round, prefill: bool) -> None:
        """Fold one round in (prefill: the round also fed the prompt; its verify time is not t(k+1))."""
        g = self.decay
        if rnd.k > 0:
            self.accepted = g * self.accepted + rnd.accepted
            self.rejected = g * self.rejected + (1.0 if rnd.accepted < rnd.k else 0.0)
            d = rnd.draft_s / rnd.k
            self.draft_s = d if self.draft_s is None else g * self.draft_s + (1 - g) * d
        if not prefill:
            n = rnd.k + 1
            self.t[n] = rnd.verify_s if n not in self.t else g * self.t[n] + (1 - g) * rnd.verify_s
        if self.probing:  # the probe "wins" only if drafting now pays: then probe often again
            self.probing = False
            pays = self.k_max >= 1 and max(self.rate(k) for k in range(1, self.k_max + 1)) > self.rate(0)
            self.gap = self.probe_every if pays else min(self.probe_max, 2 * max(self.gap, self.probe_every))

    def t_of(self, n: int) -> float:
        if n in self.t:
            return self.t[n]
        pts = sorted(self.t.items())
        if not pts:
            return 1.0
        if len(pts) == 1:  # one point: assume each extra row costs 15% of a step
            (m, tm), = pts
            return tm * (1 + 0.15 * (n - m)) if n > m else tm
        (n0, t0), (n1, t1) = pts[0], pts[-1]
        slope = max(0.0, (t1 - t0) / (n1 - n0))
        return max(t0, t0 + slope * (n - n0))

    def expected_tokens(self, k: int) -> float:
        a = min(self.alpha, 1 - 1e-9)
        return (1 - a ** (k + 1)) / (1 - a)

    def rate(self, k: int) -> float:
        """Expected tokens per second at draft length k."""
        d = self.draft_s or 0.0
        return self.expected_tokens(k) / (k * d + self.t_of(k + 1))

    def best_k(self) -> int:
        lo = max(0, self.k_min)
        if self.draft_s is None:  # nothing measured yet: draft once to learn d and a
            return max(1, lo) if self.k_max >= 1 else 0
        k = max(range(lo, self.k_max + 1), key=self.rate)
        if k > 0:
            self.since_probe = 0
            return k
        self.since_probe += 1
        if self.since_probe >= max(self.gap, self.probe_every):
            self.since_probe = 0
            self.probing = True
            return min(1, self.k_max)
        return 0
