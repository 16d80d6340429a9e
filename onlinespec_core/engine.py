"""Engine: owns the pair, the draft's state and the updater; runs rounds; emits events;
applies control requests between rounds only; saves and restores its state."""
from __future__ import annotations

import json
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from .atomic import write_dir_atomically
from .decoding import DecodeState, run_round
from .errors import OnlineSpecError, require
from .feedback import Round
from .metrics import Metrics
from .models import ModelPair
from .sampling import SamplingConfig
from .updaters import make_updater

K_MAX = 32
STATE_VERSION = 1


@dataclass
class EngineConfig:
    k: int = 4  # draft length (0 = target-only decoding)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    dynamic_k: bool = False  # HF's heuristic: +2 after a fully accepted round, -1 otherwise
    k_min: int = 1
    k_max: int = 16
    feedback_window: int = 256  # context ids kept in each Round for the draft's online loss
    keep_distributions: bool = False  # keep logits in out.rounds (memory grows with rounds)
    refresh_draft_cache: bool = True  # re-read the context after an update (stale KV otherwise)

    def validate(self, has_draft: bool) -> None:
        for name in ("k", "k_min", "k_max"):
            v = getattr(self, name)
            require(isinstance(v, int) and 0 <= v <= K_MAX,
                    f"{name} must be an integer in 0..{K_MAX} (0 = target-only decoding); got {v!r}")
        require(self.k_min <= self.k_max, f"k_min ({self.k_min}) must be <= k_max ({self.k_max})")
        require(has_draft or self.k == 0,
                "this pair has no draft; use k=0 (target-only) or load a pair with a draft")
        SamplingConfig(self.temperature, self.top_k, self.top_p)  # validates


@dataclass
class Event:
    """What the engine tells the outside world. kind: start | round | updater | config |
    topic | paused | prompt_done | done | stopped."""
    kind: str
    round: Round | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenerateOutput:
    token_ids: list[int]
    text: str
    rounds: list[Round]
    stats: dict[str, Any]


class Engine:
    def __init__(self, pair: ModelPair, k: int = 4, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, updater: str = "frozen",
                 updater_options: dict[str, Any] | None = None,
                 verify_fn: Callable[..., Any] | None = None, **config: Any) -> None:
        self.pair = pair
        # verify_fn(target, state, drafted, cfg, need_hidden) -> decoding.Verification; None =
        # one real target forward (compare mode may plug in a shared greedy target trace)
        self.verify_fn = verify_fn
        self.config = EngineConfig(k=k, temperature=temperature, top_k=top_k, top_p=top_p,
                                   seed=seed, **config)
        self.config.validate(pair.draft is not None)
        self.device = pair.device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.round_index = 0
        self.metrics = Metrics()  # lifetime totals (all prompts)
        self.updater_name = updater
        self.updater_options = dict(updater_options or {})
        self.updater = make_updater(updater, **self.updater_options)
        if pair.draft is not None:
            self.updater.attach(pair.draft)
        self._requests: queue.SimpleQueue[Callable[[], Event | None]] = queue.SimpleQueue()
        self._lock = threading.RLock()
        self._running = False
        self._paused = threading.Event()
        self._wake = threading.Event()
        self._steps = 0
        self._stop = False
        self._shift = False

    # ---- sampling / config -------------------------------------------------------------
    @property
    def draft(self):
        return self.pair.draft

    @property
    def k(self) -> int:
        return self.config.k

    @property
    def sampling(self) -> SamplingConfig:
        c = self.config
        return SamplingConfig(c.temperature, c.top_k, c.top_p)

    # ---- control requests: applied between rounds --------------------------------------
    def _request(self, fn: Callable[[], Event | None]) -> Event | None:
        with self._lock:
            if self._running:
                self._requests.put(fn)
                return None
        return fn()

    def _drain_requests(self) -> list[Event]:
        events = []
        while True:
            try:
                fn = self._requests.get_nowait()
            except queue.Empty:
                return events
            ev = fn()
            if ev is not None:
                events.append(ev)

    def set_k(self, k: int, dynamic: bool | None = None) -> None:
        new = EngineConfig(**{**asdict(self.config), "k": k,
                              "dynamic_k": self.config.dynamic_k if dynamic is None else dynamic})
        new.validate(self.draft is not None)

        def apply() -> Event:
            self.config.k, self.config.dynamic_k = new.k, new.dynamic_k
            return Event("config", data={"k": new.k, "dynamic_k": new.dynamic_k})
        self._request(apply)

    def set_sampling(self, temperature: float, top_k: int | None = None, top_p: float | None = None) -> None:
        cfg = SamplingConfig(temperature, self.config.top_k if top_k is None else top_k,
                             self.config.top_p if top_p is None else top_p)

        def apply() -> Event:
            self.config.temperature, self.config.top_k, self.config.top_p = \
                cfg.temperature, cfg.top_k, cfg.top_p
            return Event("config", data=asdict(cfg))
        self._request(apply)

    def set_temperature(self, temperature: float) -> None:
        self.set_sampling(temperature)

    def set_updater(self, name: str, **options: Any) -> None:
        """Switch the online algorithm; the deployed weights carry over."""
        new = make_updater(name, **options)  # validate now, in the caller's thread

        def apply() -> Event:
            old = self.updater_name
            if self.draft is not None:
                self.updater.detach()
                self.draft.invalidate()
                new.attach(self.draft)
            self.updater, self.updater_name, self.updater_options = new, name, dict(options)
            return Event("updater", data={"from": old, "to": name, "options": dict(options),
                                          "round": self.round_index})
        self._request(apply)

    def pause(self) -> None:
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()
        self._wake.set()

    def step(self) -> None:
        """While paused: run exactly one more round."""
        self._steps += 1
        self._wake.set()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()

    def shift_topic(self) -> None:
        """In run_stream: end the current prompt and jump to the next topic's first prompt."""
        self._shift = True
        self._wake.set()

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def _wait_if_paused(self) -> Iterator[Event]:
        if not self._paused.is_set() or self._stop:
            return
        if self._steps > 0:
            self._steps -= 1
            return
        yield Event("paused", data={"round": self.round_index})
        while self._paused.is_set() and not self._stop and self._steps == 0:
            self._wake.wait(0.05)
            self._wake.clear()
        if self._steps > 0 and self._paused.is_set():
            self._steps -= 1
        elif not self._stop:
            yield Event("resumed", data={"round": self.round_index})

    # ---- decoding ----------------------------------------------------------------------
    def encode(self, prompt: str | list[int] | torch.Tensor) -> torch.Tensor:
        if isinstance(prompt, str):
            ids = self.pair.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, torch.Tensor):
            ids = prompt.reshape(-1).tolist()
        else:
            ids = list(prompt)
        require(len(ids) > 0, "the prompt is empty; give at least one token of text")
        vocab = self.pair.target.config.vocab_size
        bad = [i for i in ids if not (0 <= int(i) < vocab)]
        require(not bad, f"prompt ids {bad[:5]} are outside the vocabulary (0..{vocab - 1}); "
                         "encode the prompt with the pair's tokenizer")
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def stream(self, prompt: str | list[int] | torch.Tensor, max_new_tokens: int = 64,
               topic: str | None = None, prompt_index: int | None = None,
               target_only: bool = False, _in_stream: bool = False) -> Iterator[Event]:
        """Yield an event per round (plus config/updater/pause events) for one prompt."""
        require(isinstance(max_new_tokens, int) and max_new_tokens >= 1,
                f"max_new_tokens must be a positive integer; got {max_new_tokens!r}")
        seq = self.encode(prompt)
        from transformers import DynamicCache
        state = DecodeState(seq=seq, prompt_len=seq.numel(), cache=DynamicCache(config=self.pair.target.config))
        draft = None if target_only else self.draft
        if draft is not None:
            draft.reset()
        eos = self.pair.eos_ids
        with self._lock:
            self._running = True
            if not _in_stream:
                self._stop = False
        metrics = Metrics()
        try:
            yield Event("start", data={"prompt_len": state.prompt_len, "topic": topic,
                                       "prompt_index": prompt_index, "target_only": target_only})
            for ev in self._drain_requests():
                yield ev
            while True:
                yield from self._wait_if_paused()
                if self._stop or (_in_stream and self._shift):
                    break
                budget = max_new_tokens - (state.seq.numel() - state.prompt_len)
                k = self.config.k if draft is not None else 0
                if draft is not None and draft.needs_hidden and state.cache.get_seq_length() == 0:
                    k = 0  # feature drafts need the target's hidden states: round 0 is the prefill
                rnd = run_round(self.pair.target, draft, state, k, self.sampling, self.generator,
                                self.round_index, eos, budget, self.config.feedback_window,
                                self.verify_fn)
                rnd.topic, rnd.prompt_index = topic, prompt_index
                self.round_index += 1
                if draft is not None and rnd.k > 0:
                    t0 = time.perf_counter()
                    rnd.updated = bool(self.updater.observe(rnd))
                    rnd.update_s = time.perf_counter() - t0
                    if rnd.updated and self.config.refresh_draft_cache:
                        draft.invalidate()
                    if self.config.dynamic_k:
                        step = 2 if rnd.accepted == rnd.k else -1
                        self.config.k = max(self.config.k_min, min(self.config.k_max, self.config.k + step))
                if not self.config.keep_distributions:
                    rnd.release()
                metrics.add(rnd)
                self.metrics.add(rnd)
                yield Event("round", round=rnd, data={"updater": self.updater_name})
                for ev in self._drain_requests():
                    yield ev
                done = budget - len(rnd.emitted) <= 0 or (rnd.emitted and rnd.emitted[-1] in eos)
                if done:
                    break
        finally:
            with self._lock:
                self._running = False
        for ev in self._drain_requests():  # requests that arrived during the last round
            yield ev
        new = state.new_tokens
        kind = "stopped" if self._stop else "done"
        yield Event(kind, data={"token_ids": new, "stats": self._stats(metrics),
                                "topic": topic, "prompt_index": prompt_index})

    def _stats(self, m: Metrics) -> dict[str, Any]:
        d = m.as_dict()
        d["updater"] = self.updater_name
        d["k"] = self.config.k
        return d

    def generate(self, prompt: str | list[int] | torch.Tensor, max_new_tokens: int = 64,
                 target_only: bool = False) -> GenerateOutput:
        rounds: list[Round] = []
        final: dict[str, Any] = {}
        for ev in self.stream(prompt, max_new_tokens, target_only=target_only):
            if ev.kind == "round":
                rounds.append(ev.round)
            elif ev.kind in ("done", "stopped"):
                final = ev.data
        ids = final.get("token_ids", [])
        text = self.pair.tokenizer.decode(ids, skip_special_tokens=True)
        return GenerateOutput(ids, text, rounds, final.get("stats", {}))

    def generate_target_only(self, prompt: str | list[int] | torch.Tensor,
                             max_new_tokens: int = 64) -> GenerateOutput:
        """The baseline: plain autoregressive decoding through the same code path."""
        return self.generate(prompt, max_new_tokens, target_only=True)

    def run_stream(self, prompts: Iterable[Any], max_new_tokens: int = 64) -> Iterator[Event]:
        """Run a prompt stream (items with .topic/.prompt or (topic, prompt) or str); a
        shift_topic() request skips the rest of the current topic."""
        items = list(prompts)
        i = 0
        self._stop = self._shift = False
        while i < len(items) and not self._stop:
            item = items[i]
            topic, prompt = _topic_prompt(item)
            yield Event("topic", data={"topic": topic, "prompt_index": i, "n_prompts": len(items)})
            for ev in self.stream(prompt, max_new_tokens, topic=topic, prompt_index=i, _in_stream=True):
                yield ev
            if self._stop:
                break
            if self._shift:
                self._shift = False
                j = i + 1
                while j < len(items) and _topic_prompt(items[j])[0] == topic:
                    j += 1
                yield Event("topic", data={"shifted": True, "from": topic,
                                           "to": _topic_prompt(items[j])[0] if j < len(items) else None})
                i = j
            else:
                i += 1

    # ---- state -------------------------------------------------------------------------
    def save_state(self, path: str | os.PathLike) -> Path:
        """Evolved draft + updater state + config + RNG, atomically (temp dir, then rename)."""
        require(self.draft is not None, "nothing to save: this engine has no draft")

        def write(tmp: Path) -> None:
            self.updater.detach()
            save_model(self.draft.module, str(tmp / "draft.safetensors"))
            tensors = {f"updater.{k}": v.detach().contiguous().cpu()
                       for k, v in self.updater.state_tensors().items()}
            tensors["rng"] = self.generator.get_state().cpu()
            save_file(tensors, str(tmp / "state.safetensors"))
            meta = {
                "version": STATE_VERSION, "config": asdict(self.config), "round_index": self.round_index,
                "updater": {"name": self.updater_name, "options": self.updater_options,
                            "state": self.updater.state_json()},
                "draft_kind": self.draft.kind, "pair": self.pair.name,
                "draft_source": self.pair.draft_source, "target_source": self.pair.target_source,
                "metrics": self.metrics.as_dict(),
            }
            (tmp / "state.json").write_text(json.dumps(meta, indent=2, default=_json_default))
        return write_dir_atomically(path, write)

    def load_state(self, path: str | os.PathLike) -> None:
        path = Path(path)
        fix = "save it again with engine.save_state(path), or pick the folder save_state wrote"
        require(path.is_dir(), f"saved state {str(path)!r} does not exist or is not a folder; {fix}")
        for name in ("state.json", "draft.safetensors", "state.safetensors"):
            require((path / name).is_file(), f"saved state {str(path)!r} is incomplete ({name} missing); {fix}")
        try:
            meta = json.loads((path / "state.json").read_text())
            tensors = load_file(str(path / "state.safetensors"), device=str(self.device))
        except Exception as e:
            raise OnlineSpecError(f"saved state {str(path)!r} is corrupt ({type(e).__name__}: {e}); {fix}") from e
        require(meta.get("version") == STATE_VERSION,
                f"saved state {str(path)!r} has version {meta.get('version')}, expected {STATE_VERSION}; {fix}")
        require(self.draft is not None and meta.get("draft_kind") == self.draft.kind,
                f"saved state is for a {meta.get('draft_kind')!r} draft, this engine has "
                f"{getattr(self.draft, 'kind', None)!r}; load it into an engine with the same pair")
        try:
            missing, unexpected = load_model(self.draft.module, str(path / "draft.safetensors"),
                                             strict=True, device=str(self.device))
        except Exception as e:
            raise OnlineSpecError(
                f"saved draft weights in {str(path)!r} do not fit this draft ({str(e)[:300]}); "
                "load the state into an engine built from the same model pair") from e
        cfg = {**asdict(self.config), **meta["config"]}
        self.config = EngineConfig(**cfg)
        self.round_index = int(meta["round_index"])
        u = meta["updater"]
        updater = make_updater(u["name"], **u["options"])
        updater.attach(self.draft)
        utensors = {k[len("updater."):]: v for k, v in tensors.items() if k.startswith("updater.")}
        try:
            updater.load_state(utensors, u["state"])
        except Exception as e:
            raise OnlineSpecError(f"updater state in {str(path)!r} is corrupt or from another "
                                  f"version ({e}); {fix}") from e
        self.updater, self.updater_name, self.updater_options = updater, u["name"], u["options"]
        self.generator.set_state(tensors["rng"].cpu())
        self.draft.invalidate()


def _topic_prompt(item: Any) -> tuple[str | None, Any]:
    if hasattr(item, "prompt"):
        return getattr(item, "topic", None), item.prompt
    if isinstance(item, dict):
        return item.get("topic"), item["prompt"]
    if isinstance(item, tuple):
        return item[0], item[1]
    return None, item


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
