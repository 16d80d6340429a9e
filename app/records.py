"""What the UI keeps of a run (Qt-free): per-config series for the plots, CSV/JSON export.

The x axis everywhere is tokens generated: every configuration of a greedy comparison emits
the same tokens, so topic changes and prompts line up across configurations.
"""
from __future__ import annotations

import csv
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onlinespec_core.metrics import Metrics
from onlinespec_core.options import dumps
from onlinespec_core.updaters.base import UpdaterSnapshot

ROLL = 32  # rounds in the rolling windows (tau, loss, tokens/s)


@dataclass
class UiEvent:
    """One engine event, flattened by the worker for the UI thread. cfg = config index (-1: stream)."""
    kind: str
    cfg: int = 0
    data: dict[str, Any] = field(default_factory=dict)


class Growable:
    """An append-only float array with amortised O(1) append and O(1) numpy view (for plots)."""

    def __init__(self) -> None:
        self._buf = np.empty(1024)
        self._n = 0

    def append(self, v: float) -> None:
        if self._n == len(self._buf):
            self._buf = np.concatenate([self._buf, np.empty(len(self._buf))])
        self._buf[self._n] = v
        self._n += 1

    def view(self) -> np.ndarray:
        return self._buf[: self._n]

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        return self.view()[i]


@dataclass
class Series:
    name: str
    x: Growable = field(default_factory=Growable)  # tokens generated after each round
    tau: Growable = field(default_factory=Growable)  # rolling mean tau
    loss: Growable = field(default_factory=Growable)  # rolling mean online loss (nan if none)
    tok_s: Growable = field(default_factory=Growable)  # rolling tokens/s
    weights: list[list[float]] = field(default_factory=list)  # ensemble weights per round
    weights_x: list[int] = field(default_factory=list)
    step_sizes: list[float] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per round (CSV)
    m: Metrics = field(default_factory=lambda: Metrics(window=ROLL))  # totals, per-position acceptance
    updater: str = ""
    switched_to: str = ""  # the updater a live switch put in place ("" = none)
    per_prompt: dict[int, list[float]] = field(default_factory=dict)  # prompt -> [tokens, wall_s]
    last_prompt: int = -1
    replayed: bool = False  # compare mode: replays the target's recorded pass (speed not real)
    _losses: deque = field(default_factory=lambda: deque(maxlen=ROLL))
    _speed: deque = field(default_factory=lambda: deque(maxlen=ROLL))

    @property
    def label(self) -> str:
        """The config's name, and the updater now running when a live switch changed it."""
        return f"{self.name} \u2192 {self.switched_to}" if self.switched_to else self.name

    @property
    def tokens(self) -> int:
        return self.m.tokens

    @property
    def rounds(self) -> int:
        return self.m.rounds

    @property
    def wall_s(self) -> float:
        return self.m.wall_s

    @property
    def mean_tau(self) -> float:
        return self.m.tau

    @property
    def tokens_per_s(self) -> float:
        return self.m.tokens_per_s

    @property
    def per_position(self) -> list[float]:
        return self.m.per_position_acceptance

    def add(self, d: dict[str, Any]) -> None:
        n, k = len(d["emitted"]), d["k"]
        self.m.count(k, d["accepted"], n, d["wall_s"], update_s=d.get("update_s", 0.0),
                     updated=bool(d.get("updated")))
        p = d.get("prompt_index")
        if p is not None:
            acc = self.per_prompt.setdefault(p, [0, 0.0])
            acc[0] += n
            acc[1] += d["wall_s"]
            self.last_prompt = p
        self.updater = d.get("updater", self.updater)
        loss = d.get("loss")
        if loss is not None and math.isfinite(loss):
            self._losses.append(loss)
        self._speed.append((n, d["wall_s"]))
        wall = sum(w for _, w in self._speed)
        self.x.append(self.tokens)
        self.tau.append(self.m.rolling_tau)
        self.loss.append(sum(self._losses) / len(self._losses) if self._losses else math.nan)
        self.tok_s.append(sum(t for t, _ in self._speed) / wall if wall > 0 else math.nan)
        snap: UpdaterSnapshot | None = d.get("updater_state")
        if snap is not None and snap.weights:
            self.weights.append(list(snap.weights))
            self.weights_x.append(self.tokens)
            if snap.step_sizes:
                self.step_sizes = list(snap.step_sizes)
        self.rows.append({
            "config": self.name, "round": d["round"], "prompt_index": d.get("prompt_index"),
            "topic": d.get("topic"), "updater": self.updater, "k": k, "accepted": d["accepted"],
            "tau": d["accepted"] + 1, "tokens": n, "tokens_total": self.tokens,
            "rolling_tau": float(self.tau[-1]), "loss": _finite(loss), "wall_s": d["wall_s"],
            "update_s": d.get("update_s", 0.0), "updated": d.get("updated", False),
            "rolling_tokens_per_s": _finite(float(self.tok_s[-1])),
        })


@dataclass
class RunLog:
    names: list[str] = field(default_factory=list)
    series: list[Series] = field(default_factory=list)
    topics: list[tuple[int, str]] = field(default_factory=list)  # (tokens at start, topic)
    switches: list[tuple[int, str, str]] = field(default_factory=list)  # (tokens, from, to)
    baseline_tok_s: float | None = None  # median of the target-only samples
    baseline_samples: list[float] = field(default_factory=list)  # target-only tokens/s, one per prompt
    baseline_by_prompt: dict[int, float] = field(default_factory=dict)  # prompt -> target-only tokens/s
    share: dict[str, Any] = field(default_factory=dict)
    max_stall_ms: float = 0.0
    finished: str = ""  # "done" (stream ended) | "stopped" | "" (running or never run)

    def reset(self, names: list[str], shared: bool = False) -> None:
        self.__init__(names=list(names), series=[Series(n) for n in names])  # type: ignore[misc]
        for s in self.series[1:]:
            s.replayed = shared

    @property
    def baseline_spread(self) -> tuple[float, float] | None:
        """(min, max) of the target-only samples, when there are any."""
        v = self.baseline_samples
        return (min(v), max(v)) if v else None

    def add(self, ev: UiEvent) -> None:
        if ev.kind == "round" and 0 <= ev.cfg < len(self.series):
            self.series[ev.cfg].add(ev.data)
        elif ev.kind == "start" and ev.cfg <= 0:
            topic = ev.data.get("topic") or "prompt"
            x = self.series[0].tokens if self.series else 0
            if not self.topics or self.topics[-1][1] != topic:
                self.topics.append((x, topic))
        elif ev.kind == "updater" and self.series:
            s = self.series[max(ev.cfg, 0)]
            to = ev.data.get("to", "")
            self.switches.append((s.tokens, ev.data.get("from", ""), to))
            s.switched_to = "" if to == s.name.split(": ")[-1] else to
            s.updater = to or s.updater
        elif ev.kind == "baseline":
            samples = [float(v) for v in ev.data.get("samples") or [] if v and math.isfinite(v)]
            self.baseline_by_prompt = {int(k): float(v) for k, v in (ev.data.get("by_prompt") or {}).items()}
            if samples:
                self.baseline_samples = samples
                self.baseline_tok_s = float(np.median(samples))
            else:
                v = ev.data.get("tokens_per_s")
                self.baseline_tok_s = v
                self.baseline_samples = [float(v)] if v else []
        elif ev.kind == "share":
            self.share = dict(ev.data)
        elif ev.kind == "end":
            self.finished = ev.data.get("reason", "")

    def speedup(self, s: Series) -> float | None:
        """Whole-run tokens/s over the target-only median; None where there is no honest number
        (no baseline yet, or a compare config that replays the target's recorded pass)."""
        info = self.speedup_info(s)
        return info["value"] if info else None

    def prompt_ratios(self, s: Series) -> list[float]:
        """Per-prompt speedups: the run's tokens/s on a finished prompt over the target-only
        sample taken on the same prompt right after it (the bench's pairing)."""
        out = []
        for p, base in sorted(self.baseline_by_prompt.items()):
            tw = s.per_prompt.get(p)
            finished = p < s.last_prompt or bool(self.finished)
            if tw and tw[1] > 0 and base > 0 and finished:
                out.append(tw[0] / tw[1] / base)
        return out

    def speedup_info(self, s: Series) -> dict[str, Any] | None:
        """value: the median of the per-prompt ratios (before the first pair: whole-run tokens/s
        over the target-only median), lo..hi their spread, capped at tau: a round costs at least one
        target step, so tokens/s can never beat tau x the target-only rate; above it the baseline
        was measured slow."""
        if not self.baseline_tok_s or s.replayed or s.rounds == 0 or s.wall_s <= 0:
            return None
        cap = s.mean_tau
        ratios = self.prompt_ratios(s)
        if ratios:
            raw, lo, hi, n = float(np.median(ratios)), min(ratios), max(ratios), len(ratios)
        else:
            lo_b, hi_b = self.baseline_spread or (self.baseline_tok_s, self.baseline_tok_s)
            raw, lo, hi, n = s.tokens_per_s / self.baseline_tok_s, s.tokens_per_s / hi_b, s.tokens_per_s / lo_b, 0
        return {"value": min(raw, cap), "raw": raw, "capped": raw > cap, "pairs": n,
                "lo": min(lo, cap), "hi": min(hi, cap)}

    def summary(self) -> dict[str, Any]:
        out = {}
        for s in self.series:
            info = self.speedup_info(s)
            out[s.name] = {"updater": s.updater, "label": s.label, "rounds": s.rounds, "tokens": s.tokens,
                           "tau": s.mean_tau, "tokens_per_s": None if s.replayed else s.tokens_per_s,
                           "target_replayed": s.replayed,
                           "speedup_vs_target_only": info["value"] if info else None,
                           "speedup_range": [info["lo"], info["hi"]] if info else None,
                           "speedup_capped_at_tau": info["capped"] if info else None,
                           "per_position_acceptance": s.per_position}
        return out

    def write_csv(self, path: str | Path) -> Path:
        path = Path(path)
        rows = [r for s in self.series for r in s.rows]
        cols = list(rows[0]) if rows else ["config", "round", "tau"]
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
        return path

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        obj = {"configs": self.names, "config_labels": [s.label for s in self.series],
               "updaters": [s.updater for s in self.series],
               "baseline_tokens_per_s": self.baseline_tok_s,
               "baseline_samples_tokens_per_s": self.baseline_samples,
               "summary": self.summary(), "topics": self.topics, "updater_switches": self.switches,
               "shared_target": self.share, "ui_max_stall_ms": self.max_stall_ms,
               "rounds": [r for s in self.series for r in s.rows]}
        path.write_text(dumps(obj, indent=1), encoding="utf-8")
        return path


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None
