"""Prompt streams for the demo: single-topic and topic-shift JSONL files from held-out splits."""

from __future__ import annotations

import json
import random
from pathlib import Path

from .corpus import TOPICS, read_split

SHIFT_ORDER = ("code", "math", "sql", "prose")


def _pick(corpus_dir, topic: str, n: int, rng: random.Random, max_prompt_chars: int) -> list[dict]:
    docs = [d for d in read_split(corpus_dir, topic, "heldout") if len(d["prompt"]) <= max_prompt_chars]
    docs.sort(key=lambda d: d["id"])
    rng.shuffle(docs)
    return [{"topic": topic, "prompt": d["prompt"]} for d in docs[:n]]


def write_streams(corpus_dir: str | Path, out_dir: str | Path, seed: int = 0, n_single: int = 40,
                  n_shift: int = 25, n_shift_short: int = 8, max_prompt_chars: int = 600,
                  n_long: int = 0, n_long_return: int = 0) -> dict:
    """Write code/math/sql/prose.jsonl (``n_single`` each), shift.jsonl (code -> math -> sql ->
    prose, ``n_shift`` each, disjoint from each other within the file) and shift_short.jsonl.
    With ``n_long``: shift_long.jsonl, code -> math -> sql -> prose with ``n_long`` prompts each
    (all of a topic's held-out prompts when it has fewer), then a return visit to the first topic
    with ``n_long_return`` further prompts (none repeated within the file), so that forgetting is
    measurable. Its pool is drawn with its own seed, independently of the short streams.

    Prompts are the start of held-out documents (docstring+signature, question, schema+question,
    first sentences), so that the target's continuation is the topical answer.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    pools = {t: _pick(corpus_dir, t, max(n_single, n_shift + n_shift_short),
                      random.Random(f"{seed}:stream:{t}"), max_prompt_chars) for t in TOPICS}

    def dump(name: str, rows: list[dict]) -> None:
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        counts[name] = len(rows)

    for t in TOPICS:
        dump(t, pools[t][:n_single])
    dump("shift", [r for t in SHIFT_ORDER for r in pools[t][:n_shift]])
    # the short shift stream takes prompts from the end of the pool: a different slice
    dump("shift_short", [r for t in SHIFT_ORDER for r in pools[t][-n_shift_short:]])
    if n_long:
        long_pools = {t: _pick(corpus_dir, t, n_long + (n_long_return if t == SHIFT_ORDER[0] else 0),
                               random.Random(f"{seed}:long:{t}"), max_prompt_chars) for t in SHIFT_ORDER}
        rows = [r for t in SHIFT_ORDER for r in long_pools[t][:n_long]]
        rows += long_pools[SHIFT_ORDER[0]][n_long:n_long + n_long_return]
        dump("shift_long", rows)
    return counts
