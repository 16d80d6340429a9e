"""Prompt streams: JSONL files with one {"topic": ..., "prompt": ...} per line, and schedules."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import OnlineSpecError
from .paths import STREAMS_DIR


@dataclass(frozen=True)
class StreamItem:
    topic: str
    prompt: str


def bundled_streams() -> dict[str, Path]:
    """Name -> path of the streams shipped under assets/streams."""
    if not STREAMS_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(STREAMS_DIR.glob("*.jsonl"))}


def parse_stream_line(line: str, where: str = "line") -> StreamItem:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise OnlineSpecError(
            f"{where}: not valid JSON ({e.msg}); each line must be an object like "
            '{"topic": "math", "prompt": "Question: ..."}') from e
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
        raise OnlineSpecError(
            f'{where}: needs a non-empty string "prompt" (and optionally "topic"); got {line.strip()[:80]!r}')
    topic = obj.get("topic", "default")
    if not isinstance(topic, str):
        raise OnlineSpecError(f'{where}: "topic" must be a string; got {topic!r}')
    for field, text in (("prompt", obj["prompt"]), ("topic", topic)):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise OnlineSpecError(f'{where}: "{field}" contains {text[e.start:e.end]!r}, a lone surrogate '
                                  "escape that is not valid text; remove it or escape a real character") from e
    return StreamItem(topic, obj["prompt"])


def load_stream(source: str | Path) -> list[StreamItem]:
    """A bundled stream name (e.g. 'shift') or a JSONL file path."""
    named = bundled_streams()
    path = named.get(str(source), Path(source))
    if not path.is_file():
        raise OnlineSpecError(
            f"prompt stream {str(source)!r} not found; pass a JSONL file path or one of the bundled "
            f"streams: {', '.join(named) or '(none installed)'}")
    items = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise OnlineSpecError(f"prompt stream {str(path)!r} is not UTF-8 text (byte {e.start}); save it as "
                              "UTF-8 JSONL, one object per line") from e
    except OSError as e:
        raise OnlineSpecError(f"cannot read prompt stream {str(path)!r} ({e.strerror}); check its permissions") from e
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            items.append(parse_stream_line(line, f"{path.name} line {n}"))
    if not items:
        raise OnlineSpecError(f"prompt stream {str(path)!r} is empty; add one JSON object per line")
    return items


def write_stream(items: Iterable[StreamItem], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps({"topic": it.topic, "prompt": it.prompt}, ensure_ascii=False) + "\n")


def from_text(text: str, topic: str = "custom") -> list[StreamItem]:
    """Free text typed by a user: one prompt per non-empty line."""
    items = [StreamItem(topic, ln.strip()) for ln in text.splitlines() if ln.strip()]
    if not items:
        raise OnlineSpecError("the prompt box is empty; type at least one prompt (one per line)")
    return items


def topics_in_order(items: list[StreamItem]) -> list[str]:
    seen: list[str] = []
    for it in items:
        if not seen or seen[-1] != it.topic:
            seen.append(it.topic)
    return seen


def interleave_topics(by_topic: dict[str, list[str]], per_block: int, seed: int = 0) -> list[StreamItem]:
    """A topic-shift schedule: blocks of per_block prompts, topics in the given order, repeated
    until the prompts run out (shuffled within a topic with the seed)."""
    rng = random.Random(seed)
    pools = {t: rng.sample(ps, len(ps)) for t, ps in by_topic.items()}
    out: list[StreamItem] = []
    while any(pools.values()):
        for t, ps in pools.items():
            block, pools[t] = ps[:per_block], ps[per_block:]
            out += [StreamItem(t, p) for p in block]
    return out
