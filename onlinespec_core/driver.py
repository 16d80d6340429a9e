"""The run driver: one run over a prompt stream for one or several engines (Qt-free).

    for ci, ev in Driver([engine_a, engine_b]).run(items, max_new_tokens):  # ci = config index
        ...                                                                # -1: stream events

- Prompt i runs on every engine before prompt i+1 (config 0 first). Compare mode shares the
  target through each engine's verify_fn (compare.SharedGreedyTarget); the driver only orders.
- One RunControl is shared by the driver and its engines: pause / resume / step / stop /
  shift_topic are thread-safe flags read between rounds, so the engine is never interrupted
  mid-round. While paused, the engine still applies its queued requests (save, load, updater
  switch) and calls control.idle (e.g. a GUI worker's queued calls).
- A topic shift ends the current prompt at once when one engine runs; with several engines it
  waits for the prompt's end, so every configuration sees the same prompts.
Users: Engine.run_stream, compare.CompareRunner, runner (onlinespec run), the app's worker.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from .feedback import Round

if TYPE_CHECKING:
    from .engine import Engine
    from .updaters.base import UpdaterSnapshot


@dataclass
class Event:
    """What a run tells the outside world. kind: topic | start | round | updater | config |
    paused | resumed | done | stopped. A round event carries the round record and a snapshot
    of the updater after it (the one view of its state every reader uses)."""
    kind: str
    round: Round | None = None
    data: dict[str, Any] = field(default_factory=dict)
    updater: UpdaterSnapshot | None = None


class RunControl:
    """Thread-safe run requests, read between rounds."""

    def __init__(self) -> None:
        self._paused = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._steps = 0
        self.stopping = False
        self.shifting = False
        self.idle: Callable[[], None] | None = None  # called while held paused

    def pause(self) -> None:
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()
        self._wake.set()

    def step(self) -> None:
        """While paused: run exactly one more round."""
        with self._lock:
            self._steps += 1
        self._wake.set()

    def stop(self) -> None:
        self.stopping = True
        self._wake.set()

    def shift_topic(self) -> None:
        self.shifting = True
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def reset(self) -> None:
        """A new run: earlier stop/shift requests are spent."""
        self.stopping = self.shifting = False

    def clear(self) -> None:
        """Back to the start: not paused, no pending step, stop or shift."""
        self.reset()
        with self._lock:
            self._steps = 0
        self.resume()

    def take_shift(self) -> bool:
        shift, self.shifting = self.shifting, False
        return shift

    def _take_step(self) -> bool:
        with self._lock:
            if self._steps > 0:
                self._steps -= 1
                return True
            return False

    def hold(self, drain: Callable[[], list[Event]], round_index: int) -> Iterator[Event]:
        """Between rounds: return at once unless paused; a pending step lets one round through;
        otherwise yield 'paused', apply drain()'s requests while waiting, then 'resumed'."""
        if not self._paused.is_set() or self.stopping or self._take_step():
            return
        yield Event("paused", data={"round": round_index})
        while self._paused.is_set() and not self.stopping:
            if self._take_step():
                return  # one round, still paused
            self._wake.wait(0.05)
            self._wake.clear()
            yield from drain()
            if self.idle is not None:
                self.idle()
        if not self.stopping:
            yield Event("resumed", data={"round": round_index})


def topic_prompt(item: Any) -> tuple[str | None, Any]:
    """A stream item as (topic, prompt): StreamItem, {'topic', 'prompt'}, (topic, prompt) or a prompt."""
    if hasattr(item, "prompt"):
        return getattr(item, "topic", None), item.prompt
    if isinstance(item, dict):
        return item.get("topic"), item["prompt"]
    if isinstance(item, tuple):
        return item[0], item[1]
    return None, item


def next_topic(items: list[Any], i: int) -> int:
    """Index of the first item after i whose topic differs from item i's (len(items) if none)."""
    topic = topic_prompt(items[i])[0]
    j = i + 1
    while j < len(items) and topic_prompt(items[j])[0] == topic:
        j += 1
    return j


class Driver:
    """Runs a prompt stream on one or several engines under one RunControl."""

    def __init__(self, engines: list[Engine], control: RunControl | None = None) -> None:
        self.engines = list(engines)
        self.control = control or RunControl()
        for e in self.engines:
            e.control = self.control
        self.active = 0  # the engine running now (compare mode)

    def run(self, items: Iterable[Any], max_new_tokens: int = 64) -> Iterator[tuple[int, Event]]:
        """Yield (config index, event); index -1 for stream events (topic)."""
        items = list(items)
        c = self.control
        c.reset()
        cut = len(self.engines) == 1  # one engine: a shift ends the prompt now
        i = 0
        while i < len(items) and not c.stopping:
            topic, prompt = topic_prompt(items[i])
            yield -1, Event("topic", data={"topic": topic, "prompt_index": i, "n_prompts": len(items)})
            for ci, eng in enumerate(self.engines):
                if c.stopping:
                    break
                self.active = ci
                for ev in eng.stream(prompt, max_new_tokens, topic=topic, prompt_index=i,
                                     in_run=True, cut_on_shift=cut):
                    yield ci, ev
            if c.stopping:
                break
            if c.take_shift():
                j = next_topic(items, i)
                yield -1, Event("topic", data={"shifted": True, "from": topic,
                                               "to": topic_prompt(items[j])[0] if j < len(items) else None})
                i = j
            else:
                i += 1
