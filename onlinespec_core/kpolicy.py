"""Cost-aware draft length (EngineConfig.cost_k): each round, the k that maximises expected
tokens per second on this machine, from the engine's own measurements.

With a per-position acceptance rate a, a round with draft length k emits
E(k) = sum_{i=0..k} a^i = (1 - a^(k+1)) / (1 - a) tokens and costs D(k) + t(k+1) seconds (D(k): a
proposal of k tokens, t(n): a target forward of n tokens); k = 0 is plain decoding at 1 / t(1). a
is a decayed count of accepted vs rejected positions, D(k) and t(n) are running means of the
rounds' timings (unseen k or n from a line through the seen ones: a proposal has a fixed part,
so D(k) is not k D(1)). Proposals that first read a run of tokens the draft missed (after k = 0
rounds, or the prompt) are not a proposal's cost and are left out. When k = 0 wins, a probe round
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
    prompt_decay: float = 0.3  # weight of a's past counts when a new prompt starts
    accepted: float = 1.0  # decayed counts of accepted / rejected draft positions (prior a = 0.5)
    rejected: float = 1.0
    dk: dict[int, float] = field(default_factory=dict)  # k drafted -> seconds per proposal
    t: dict[int, float] = field(default_factory=dict)  # n fed tokens -> seconds per target forward
    since_probe: int = 0
    gap: int = 0  # rounds between probes now (probe_every .. probe_max)
    probing: bool = False
    missed: int = 0  # tokens emitted since the last drafting round (the draft has not read them)

    @property
    def alpha(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def observe(self, rnd: Round, prefill: bool) -> None:
        """Fold one round in (prefill: the round also fed the prompt, to the target and to an lm
        draft: neither its verify time is t(k+1) nor its draft time k drafted tokens)."""
        g = self.decay
        # a probe after a run of k = 0 rounds: the draft first reads the tokens it missed, and
        # the target forward after that read measured ~1.5x a usual one (demo pair, CPU):
        # neither is what a round of drafting costs, so the timings of such a round are left out
        # (a probe's timings only over-state a round's: they still cap an estimate above them, which
        # a one-off cost may have left - a noisy moment, a draft's first proposal packing its
        # readout - or k = 0 would win for good)
        typical = not prefill and (rnd.k == 0 or self.missed <= 4)
        probe = not prefill and not typical
        if rnd.k > 0:
            self.accepted = g * self.accepted + rnd.accepted
            self.rejected = g * self.rejected + (1.0 if rnd.accepted < rnd.k else 0.0)
            k = rnd.k
            if typical:
                self.dk[k] = rnd.draft_s if k not in self.dk else g * self.dk[k] + (1 - g) * rnd.draft_s
            elif probe and k in self.dk:  # an upper bound on a typical proposal: cap the estimate
                self.dk[k] = min(self.dk[k], rnd.draft_s)
            self.missed = 0
        else:
            self.missed += len(rnd.emitted)
        n = rnd.k + 1
        if typical:
            self.t[n] = rnd.verify_s if n not in self.t else g * self.t[n] + (1 - g) * rnd.verify_s
        elif probe and n in self.t:
            self.t[n] = min(self.t[n], rnd.verify_s)
        if prefill:  # a new prompt (maybe a new topic): a counts for less, its first decision probes
            self.accepted *= self.prompt_decay
            self.rejected *= self.prompt_decay
            self.since_probe = max(self.gap, self.probe_every)
        if self.probing:  # the probe "wins" only if drafting now pays: then probe often again
            self.probing = False
            pays = self.k_max >= 1 and max(self.rate(k) for k in range(1, self.k_max + 1)) > self.rate(0)
            self.gap = self.probe_every if pays else min(self.probe_max, 2 * max(self.gap, self.probe_every))

    @property
    def draft_s(self) -> float | None:
        """Seconds per drafted token at the longest proposal seen (None: none measured yet)."""
        if not self.dk:
            return None
        k = max(self.dk)
        return self.dk[k] / k

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

    def draft_of(self, k: int) -> float:
        """Seconds for a proposal of k tokens (0 for k = 0)."""
        if k <= 0 or not self.dk:
            return 0.0
        if k in self.dk:
            return self.dk[k]
        pts = sorted(self.dk.items())
        if len(pts) == 1:  # one point: proportional (an over-estimate past it: the fixed part)
            (m, dm), = pts
            return dm * k / m
        (k0, d0), (k1, d1) = pts[0], pts[-1]
        slope = max(0.0, (d1 - d0) / (k1 - k0))
        return max(0.0, d0 + slope * (k - k0)) if k > k0 else d0 * k / k0

    def expected_tokens(self, k: int) -> float:
        a = min(self.alpha, 1 - 1e-9)
        return (1 - a ** (k + 1)) / (1 - a)

    def rate(self, k: int) -> float:
        """Expected tokens per second at draft length k."""
        return self.expected_tokens(k) / (self.draft_of(k) + self.t_of(k + 1))

    def best_k(self) -> int:
        lo = max(0, self.k_min)
        if self.draft_s is None or not self.t:  # nothing measured yet: draft one token to learn d, t, a
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
