"""Compare mode: several configurations (updater, k) on the same prompts, sharing the target.

Greedy decoding is lossless, so every configuration emits the target's own greedy sequence.
The target's logits along that sequence are recorded once (by whichever configuration runs a
real forward first) and replayed through Engine(verify_fn=...) for the others:

  row(pos) = target logits for the token at sequence position pos, given seq[:pos]

A round at length L with drafted x_1..x_k needs rows L..L+k conditioned on seq[:L] + x_<i.
Row L+i lies on the greedy path iff x_1..x_i equal the greedy tokens there. When every needed
row is on the path -- or every row up to the first mismatch, for configurations whose updater
reads no row past it (frozen; distillation on the greedy path): later rows never change the
output -- the round is replayed; otherwise one real target forward runs (it catches up the
lagging KV cache) and its on-path rows extend the trace.
Sampling (temperature > 0) never shares: each configuration samples its own sequence.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import torch

from .decoding import DecodeState, Verification, verify
from .driver import Driver, Event, RunControl
from .engine import Engine
from .errors import require
from .models import ModelPair
from .sampling import SamplingConfig, logits_to_probs

MAX_CONFIGS = 3


@dataclass
class CompareConfig:
    name: str
    updater: str = "frozen"
    updater_options: dict[str, Any] = field(default_factory=dict)
    k: int = 4
    dynamic_k: bool = False


@dataclass
class ShareStats:
    replayed: list[int] = field(default_factory=list)  # rounds served from the trace, per config
    forwards: list[int] = field(default_factory=list)  # rounds that ran a real target forward

    def as_dict(self) -> dict[str, Any]:
        total = sum(self.replayed) + sum(self.forwards)
        return {"replayed": list(self.replayed), "forwards": list(self.forwards),
                "forward_fraction": sum(self.forwards) / total if total else 0.0}


class GreedyTrace:
    """The target's greedy path for one prompt: ids, logits rows and fed hidden states."""

    def __init__(self, prompt: torch.Tensor) -> None:
        self.prompt = prompt.clone()
        self.ids: list[int] = prompt.tolist()  # prompt + greedy tokens known so far
        self.rows: dict[int, torch.Tensor] = {}  # pos -> [V] logits for the token at pos
        self.hidden: dict[int, torch.Tensor] = {}  # pos -> [H] last hidden state of the token at pos

    def matches(self, state: DecodeState) -> bool:
        L = state.seq.numel()
        return (state.prompt_len == self.prompt.numel() and L <= len(self.ids)
                and state.seq.tolist() == self.ids[:L])

    def record(self, state: DecodeState, drafted: torch.Tensor, ver: Verification) -> None:
        """Keep the rows (and hidden states) of ver that lie on the greedy path."""
        L, k = state.seq.numel(), drafted.numel()
        d = drafted.tolist()
        if ver.hidden is not None:
            fed_start = L - (ver.hidden.shape[0] - k)
            for j in range(fed_start, L):  # the pending context tokens: on the path
                self.hidden.setdefault(j, ver.hidden[j - fed_start])
        for i in range(k + 1):
            pos = L + i
            self.rows.setdefault(pos, ver.logits[i])
            want = int(ver.logits[i].argmax())
            if pos == len(self.ids):
                self.ids.append(want)
            if i == k or d[i] != self.ids[pos]:
                break
            if ver.hidden is not None:  # drafted token i is on the path: its state is too
                self.hidden.setdefault(pos, ver.hidden[pos - fed_start])

    def replay(self, state: DecodeState, drafted: torch.Tensor, cfg: SamplingConfig,
               need_hidden: bool, exact: bool) -> Verification | None:
        """The Verification a real forward would give, or None when a needed row is missing."""
        L, k = state.seq.numel(), drafted.numel()
        d = drafted.tolist()
        n = 0  # leading drafted tokens on the path
        while n < k and L + n < len(self.ids) and d[n] == self.ids[L + n]:
            n += 1
        last = k if exact else n  # rows after the first mismatch only matter for learning
        if exact and n < k:
            return None
        if any(L + i not in self.rows for i in range(last + 1)):
            return None
        rows = [self.rows[L + i] for i in range(last + 1)]
        rows += [rows[-1]] * (k - last)  # filler after the mismatch: never read for the output
        logits = torch.stack(rows)
        hidden = None
        if need_hidden:
            start = state.cache.get_seq_length()
            need = range(start, L + last)
            if any(j not in self.hidden for j in need):
                return None
            hs = [self.hidden[j] for j in need]
            hs += [hs[-1]] * (k - last)
            hidden = torch.stack(hs)
        return Verification(logits, logits_to_probs(logits, cfg), hidden)


class SharedGreedyTarget:
    """One target pass shared by several engines in greedy mode (see the module docstring)."""

    def __init__(self, n_configs: int) -> None:
        self.trace: GreedyTrace | None = None
        self.stats = ShareStats([0] * n_configs, [0] * n_configs)
        self.exact: list[bool] = [True] * n_configs  # does config i read rows off the path?
        self.exact_of: list[Callable[[], bool] | None] = [None] * n_configs  # live (updater switch)

    def verify_fn(self, index: int):
        def fn(target, state: DecodeState, drafted: torch.Tensor, cfg: SamplingConfig,
               need_hidden: bool) -> Verification:
            return self.verify(index, target, state, drafted, cfg, need_hidden)
        return fn

    def verify(self, index: int, target, state: DecodeState, drafted: torch.Tensor,
               cfg: SamplingConfig, need_hidden: bool) -> Verification:
        if not cfg.greedy:
            self.stats.forwards[index] += 1
            return verify(target, state, drafted, cfg, need_hidden)
        if self.trace is None or not self.trace.matches(state):
            prompt = state.seq[: state.prompt_len]
            if self.trace is None or not torch.equal(self.trace.prompt, prompt):
                self.trace = GreedyTrace(prompt)  # a new prompt: start a new trace
        if self.trace.matches(state):
            fn = self.exact_of[index]
            exact = fn() if fn is not None else self.exact[index]
            ver = self.trace.replay(state, drafted, cfg, need_hidden, exact)
            if ver is not None:
                self.stats.replayed[index] += 1
                return ver
        ver = verify(target, state, drafted, cfg, need_hidden)
        self.stats.forwards[index] += 1
        if self.trace.matches(state):
            self.trace.record(state, drafted, ver)
        return ver


def clone_draft(draft: Any, target: torch.nn.Module) -> Any:
    """A deep copy of a draft that still shares (never copies) the target's modules."""
    memo: dict[int, Any] = {id(target): target}
    for m in target.modules():
        memo[id(m)] = m
    for p in list(target.parameters()) + list(target.buffers()):
        memo[id(p)] = p
    out = copy.deepcopy(draft, memo)
    out.reset()
    return out


def needs_offpath_rows(engine: Engine) -> bool:
    """Does this engine's updater read target rows past the first rejection (declared by the
    updater: Updater.reads_offpath_rows)? Then only a real target forward will do."""
    return engine.updater.reads_offpath_rows(engine.draft)


class CompareRunner:
    """2-3 configurations on the same prompt stream, prompt by prompt (config 0 first)."""

    def __init__(self, pair: ModelPair, configs: list[CompareConfig], temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, share_target: bool = True,
                 control: RunControl | None = None, **engine_config: Any) -> None:
        require(1 <= len(configs) <= MAX_CONFIGS,
                f"compare mode takes 1 to {MAX_CONFIGS} configurations; got {len(configs)}")
        require(pair.draft is not None, "compare mode needs a pair with a draft")
        self.configs = configs
        self.shared = SharedGreedyTarget(len(configs)) if share_target else None
        self.engines: list[Engine] = []
        for i, c in enumerate(configs):
            p = replace(pair, draft=clone_draft(pair.draft, pair.target))
            fn = self.shared.verify_fn(i) if self.shared else None
            eng = Engine(p, k=c.k, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                         updater=c.updater, updater_options=c.updater_options, verify_fn=fn,
                         dynamic_k=c.dynamic_k, **engine_config)
            if self.shared:
                self.shared.exact_of[i] = lambda e=eng: needs_offpath_rows(e)
            self.engines.append(eng)
        self.driver = Driver(self.engines, control)

    @property
    def control(self) -> RunControl:
        return self.driver.control

    @property
    def active(self) -> int:
        return self.driver.active

    def run(self, prompts: Any, max_new_tokens: int = 64) -> Iterator[tuple[int, Event]]:
        """Yield (config index, event); config index -1 for stream-level (topic) events."""
        return self.driver.run(prompts, max_new_tokens)
