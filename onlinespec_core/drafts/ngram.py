"""Draft kind "ngram": n-gram / suffix lookup over the sequence and everything seen in this stream.

No weights and no training cost. To propose after a sequence s (prompt + tokens emitted so far),
for n = max_n down to min_n it looks up the last n tokens of s

  1. in s itself (prompt lookup: an earlier occurrence in this prompt or this answer), then
  2. in the stream index: every earlier sequence (prompt + target output) this draft has seen
     since it was built, newest occurrence first,

and proposes the (up to k) tokens that followed the newest earlier occurrence; the first n that
matches wins (a longer matched suffix is the stronger evidence). No match -> an empty proposal
(the round is a plain target step). The index "learns" online without a gradient: each finished
sequence is added to it (engine.stream calls observe_sequence; reset() adds the part seen so far
when a sequence ends without that call).

Memory bound: the stream index keeps whole sequences in first-in-first-out order within a token
budget (max_index_tokens); adding a sequence evicts the oldest ones until the total fits (a single
sequence longer than the budget keeps only its last max_index_tokens tokens). Each stored token
carries at most (max_n - min_n + 1) table entries, so entries <= span * max_index_tokens
(int key and packed int value; a full index at the defaults, 5 x 65,536 entries, measured 50 MB
with the stored tokens, about 160 bytes an entry).

The proposal is deterministic given the context, so its distribution q is one-hot (probs 1 at the
drafted token, logits 0 there and -inf elsewhere): the engine's rejection rule accepts x with
probability p(x) and resamples from norm(p with x removed) on rejection, which is exactly the
target's distribution. Greedy output equals the target's greedy output.

backend="arctic" uses Snowflake's arctic-inference suffix tree (SuffixDecoding) for the stream
part when that package is importable; see the README's bench section for what installing it does.
"""
from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import OnlineSpecError, require
from ..feedback import Round
from ..sampling import SamplingConfig
from .base import Draft, Proposal

Key = tuple[int, ...]


_SHIFT = 32  # table values pack (document id, end position) as id << 32 | end


def _key(ngram: list[int] | tuple[int, ...]) -> int:
    """The table key of an n-gram: its tuple hash (a plain int keeps each entry small). Two
    n-grams sharing a hash would only give a wrong proposal, which verification rejects."""
    return hash(tuple(ngram))


class NgramIndex:
    """n-gram -> newest (document, end position) over a FIFO of whole documents within a token
    budget. A document is a list of token ids; the continuation of an occurrence ending at e
    is doc[e:e+k]. About 100 bytes per table entry (int key, int value, dict slot)."""

    def __init__(self, min_n: int, max_n: int, max_tokens: int) -> None:
        self.min_n, self.max_n, self.max_tokens = min_n, max_n, max_tokens
        self.docs: deque[tuple[int, list[int]]] = deque()  # (doc id, tokens), oldest first
        self.by_id: dict[int, list[int]] = {}
        self.tables: dict[int, dict[int, int]] = {n: {} for n in range(min_n, max_n + 1)}
        self.tokens = 0  # tokens held
        self.next_id = 0
        self.evicted_docs = 0

    @property
    def entries(self) -> int:
        return sum(len(t) for t in self.tables.values())

    def add(self, tokens: list[int]) -> None:
        tokens = list(tokens[-self.max_tokens:])
        if len(tokens) < self.min_n + 1:  # no n-gram with a continuation
            return
        require(len(tokens) < 1 << _SHIFT, "ngram index: a sequence is too long")
        while self.docs and self.tokens + len(tokens) > self.max_tokens:
            self._evict_oldest()
        did = self.next_id
        self.next_id += 1
        self.docs.append((did, tokens))
        self.by_id[did] = tokens
        self.tokens += len(tokens)
        for n, table in self.tables.items():
            base = did << _SHIFT
            for e in range(n, len(tokens)):  # occurrences ending at e, continuation tokens[e]...
                table[_key(tokens[e - n:e])] = base | e  # later = newer: overwrite

    def _evict_oldest(self) -> None:
        did, tokens = self.docs.popleft()
        del self.by_id[did]
        self.tokens -= len(tokens)
        self.evicted_docs += 1
        # FIFO: an entry that points into the oldest document has no newer occurrence, so
        # deleting it (rather than falling back to an older one) is exact.
        for n, table in self.tables.items():
            for e in range(n, len(tokens)):
                key = _key(tokens[e - n:e])
                hit = table.get(key)
                if hit is not None and hit >> _SHIFT == did:
                    del table[key]

    def lookup(self, key: Key, k: int) -> list[int]:
        hit = self.tables.get(len(key), {}).get(_key(key))
        if hit is None:
            return []
        e = hit & ((1 << _SHIFT) - 1)
        return self.by_id[hit >> _SHIFT][e:e + k]


class _LocalIndex:
    """The current sequence: n-gram -> newest end position, indexed incrementally."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self.tables: dict[int, dict[Key, int]] = {n: {} for n in range(min_n, max_n + 1)}
        self.upto = 0  # occurrences ending at e < upto... are indexed for e in [n, upto)

    def extend(self, seq: torch.Tensor) -> None:
        L = seq.numel()
        if L < len(self.tokens) or (self.tokens and int(seq[len(self.tokens) - 1]) != self.tokens[-1]):
            self.__init__(self.min_n, self.max_n)  # not a continuation: start over
        if L > len(self.tokens):
            self.tokens.extend(seq[len(self.tokens):].tolist())
        toks = self.tokens
        # index occurrences ending before the last position (the current suffix must not match
        # itself): every e in [upto, L-1] has at least one continuation token
        for e in range(max(self.upto, self.min_n), L):
            for n, table in self.tables.items():
                if e >= n:
                    table[tuple(toks[e - n:e])] = e
        self.upto = max(self.upto, L)

    def lookup(self, key: Key, k: int) -> list[int]:
        e = self.tables.get(len(key), {}).get(key)
        if e is None:
            return []
        toks, L = self.tokens, len(self.tokens)
        out = toks[e:e + k]
        while len(out) < k:  # overlapping copy (as in LZ77): a run or a cycle continues itself
            out.append(out[e + len(out) - L])
        return out


class NgramDraft(Draft):
    kind = "ngram"
    trainable = False  # no weights: online updaters other than 'frozen' do not apply

    def __init__(self, vocab_size: int, max_n: int = 6, min_n: int = 2,
                 max_index_tokens: int = 65_536, use_stream: bool = True,
                 backend: str = "python") -> None:
        require(isinstance(min_n, int) and isinstance(max_n, int) and 1 <= min_n <= max_n <= 64,
                f"ngram draft: need integers 1 <= min_n <= max_n <= 64; got min_n={min_n!r}, max_n={max_n!r}")
        require(isinstance(max_index_tokens, int) and max_index_tokens >= 0,
                f"ngram draft: max_index_tokens must be an integer >= 0 (0 = no stream index); "
                f"got {max_index_tokens!r}")
        require(backend in ("python", "arctic"),
                f"ngram draft: backend must be 'python' or 'arctic'; got {backend!r}")
        self.vocab_size = vocab_size
        self.min_n, self.max_n = min_n, max_n
        self.max_index_tokens = max_index_tokens
        self.use_stream = bool(use_stream) and max_index_tokens > 0
        self.backend = backend
        self.module = nn.Module()  # no parameters: nothing to train, save or load
        self.index = NgramIndex(min_n, max_n, max(1, max_index_tokens))
        self.arctic = _ArcticStream(max_n, max_index_tokens) if backend == "arctic" and self.use_stream else None
        self.local = _LocalIndex(min_n, max_n)
        self.sequences = 0  # sequences added to the stream index
        self.hits = {"local": 0, "stream": 0, "none": 0}

    # ---- the Draft protocol --------------------------------------------------------------
    def reset(self) -> None:
        """A new sequence starts: file the one seen so far (if observe_sequence did not)."""
        if self.local.tokens:
            self._add_to_stream(self.local.tokens)
        self.local = _LocalIndex(self.min_n, self.max_n)

    def invalidate(self) -> None:
        pass  # no weights, nothing cached that depends on them

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What the draft has learnt: the stream index as the documents it holds, oldest first
        (flat ids + lengths; the current sequence is filed as the last one, as reset() would)."""
        docs = [t for _, t in (self.arctic.docs if self.arctic is not None else self.index.docs)]
        if self.local.tokens:
            docs.append(list(self.local.tokens))
        flat = [t for d in docs for t in d]
        return {"docs": torch.tensor(flat, dtype=torch.long),
                "lengths": torch.tensor([len(d) for d in docs], dtype=torch.long)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Rebuild the stream index from state_tensors() (same FIFO budget and eviction)."""
        docs, lengths = tensors.get("docs"), tensors.get("lengths")
        require(docs is not None and lengths is not None and docs.dim() == 1 and lengths.dim() == 1
                and int(lengths.sum()) == docs.numel() and bool((lengths >= 0).all())
                and (docs.numel() == 0 or (int(docs.min()) >= 0 and int(docs.max()) < self.vocab_size)),
                "the saved ngram index is corrupt (docs/lengths do not fit); save the state again")
        self.index = NgramIndex(self.min_n, self.max_n, max(1, self.max_index_tokens))
        if self.arctic is not None:
            self.arctic = _ArcticStream(self.max_n, self.max_index_tokens)
        self.local = _LocalIndex(self.min_n, self.max_n)
        self.sequences = 0
        for d in docs.split(lengths.tolist()):
            self._add_to_stream(d.tolist())

    def observe_sequence(self, seq: torch.Tensor) -> None:
        """The engine finished a sequence (prompt + output): add all of it to the stream index."""
        self._add_to_stream(seq.tolist())
        self.local = _LocalIndex(self.min_n, self.max_n)

    def _add_to_stream(self, tokens: list[int]) -> None:
        if not self.use_stream:
            return
        if self.arctic is not None:
            self.arctic.add(tokens)
        else:
            self.index.add(tokens)
        self.sequences += 1

    def match(self, seq: torch.Tensor, k: int) -> list[int]:
        """Up to k continuation tokens for the longest matching suffix of seq (may be empty)."""
        self.local.extend(seq)
        toks = self.local.tokens
        L = len(toks)
        if k <= 0:
            return []
        if self.arctic is not None:
            local = self._best_local(toks, L, k)
            stream = self.arctic.speculate(toks, k)
            if local[1] and (len(local[1]) >= len(stream[1]) or local[0] >= stream[0]):
                self.hits["local"] += 1
                return local[1]
            if stream[1]:
                self.hits["stream"] += 1
                return stream[1]
            self.hits["none"] += 1
            return []
        for n in range(min(self.max_n, L), self.min_n - 1, -1):
            key = tuple(toks[L - n:])
            out = self.local.lookup(key, k)
            if len(out) < k and self.use_stream:  # same n: the longer continuation wins, ties local
                other = self.index.lookup(key, k)
                if len(other) > len(out):
                    self.hits["stream"] += 1
                    return other
            if out:
                self.hits["local"] += 1
                return out
        self.hits["none"] += 1
        return []

    def _best_local(self, toks: list[int], L: int, k: int) -> tuple[int, list[int]]:
        for n in range(min(self.max_n, L), self.min_n - 1, -1):
            out = self.local.lookup(tuple(toks[L - n:]), k)
            if out:
                return n, out
        return 0, []

    @torch.inference_mode()
    def propose(self, seq: torch.Tensor, k: int, cfg: SamplingConfig,
                generator: torch.Generator | None) -> Proposal:
        toks = self.match(seq, k)
        m = len(toks)
        device = seq.device
        tokens = torch.tensor(toks, dtype=torch.long, device=device)
        probs = torch.zeros(m, self.vocab_size, dtype=torch.float32, device=device)
        if m:
            probs[torch.arange(m, device=device), tokens] = 1.0  # q is one-hot: a deterministic draft
        logits = torch.full((m, self.vocab_size), float("-inf"), device=device)
        if m:
            logits[torch.arange(m, device=device), tokens] = 0.0
        return Proposal(tokens, logits, probs)

    def commit(self, valid_len: int, target_hidden: torch.Tensor | None = None,
               hidden_start: int = 0) -> None:
        pass  # the next propose reads the final sequence

    def train_logits(self, rnd: Round) -> torch.Tensor:
        raise OnlineSpecError("the ngram draft has no weights to train; use updater='frozen'")

    def save(self, path: str | Path) -> None:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        import json
        (p / "ngram.json").write_text(json.dumps(self.config()))

    # ---- introspection -------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "min_n": self.min_n, "max_n": self.max_n,
                "max_index_tokens": self.max_index_tokens, "use_stream": self.use_stream,
                "backend": self.backend}

    def stats(self) -> dict[str, Any]:
        held = self.arctic.tokens if self.arctic is not None else self.index.tokens
        return {"sequences": self.sequences, "index_tokens": held,
                "index_entries": None if self.arctic is not None else self.index.entries,
                "evicted_sequences": (self.arctic.evicted if self.arctic is not None
                                      else self.index.evicted_docs), "hits": dict(self.hits)}


class _ArcticStream:
    """The stream part on arctic-inference's SuffixTree (optional dependency), same FIFO budget."""

    def __init__(self, max_n: int, max_tokens: int) -> None:
        try:
            from arctic_inference.suffix_decoding._C import SuffixTree
        except ImportError as e:
            raise OnlineSpecError(
                "ngram backend 'arctic' needs the arctic-inference package (pip install arctic-inference, "
                "a source build: C++20 compiler and cmake); use backend='python' (the default)") from e
        self.max_n = max_n
        self.depth = max(max_n, 24)
        self.tree = SuffixTree(self.depth)
        self.max_tokens = max_tokens
        self.docs: deque[tuple[int, list[int]]] = deque()  # (seq id, tokens), oldest first
        self.tokens = 0
        self.next_id = 0
        self.evicted = 0

    def add(self, tokens: list[int]) -> None:
        tokens = list(tokens[-self.max_tokens:])
        while self.docs and self.tokens + len(tokens) > self.max_tokens:
            sid, old = self.docs.popleft()
            self.tree.remove(sid)
            self.tokens -= len(old)
            self.evicted += 1
        sid = self.next_id
        self.next_id += 1
        self.tree.extend(sid, tokens)
        self.docs.append((sid, tokens))
        self.tokens += len(tokens)

    def __deepcopy__(self, memo: dict) -> "_ArcticStream":
        """The native tree does not pickle: rebuild it from the sequences it holds."""
        new = _ArcticStream(self.max_n, self.max_tokens)
        for _, tokens in self.docs:
            new.add(tokens)
        new.evicted, new.next_id = self.evicted, max(new.next_id, self.next_id)
        return new

    def speculate(self, toks: list[int], k: int) -> tuple[int, list[int]]:
        ctx = toks[-self.depth:]
        d = self.tree.speculate(ctx, k, 1.0, 0.0, 0.1, False)
        return int(d.match_len), list(d.token_ids)[:k]


def load_ngram_draft(target, source=None, tokenizer=None, device="cpu", dtype="float32",
                     trust_remote_code: bool = False, **options: Any) -> NgramDraft:
    """No weights to load: source is ignored unless it is a folder NgramDraft.save wrote."""
    import json
    if source is not None and (Path(str(source)) / "ngram.json").is_file():
        saved = json.loads((Path(str(source)) / "ngram.json").read_text())
        saved.pop("kind", None)
        options = {**saved, **options}
    return make_ngram_draft(target.config.vocab_size, **options)


OPTIONS = ("max_n", "min_n", "max_index_tokens", "use_stream", "backend")


def make_ngram_draft(vocab_size: int, **options: Any) -> NgramDraft:
    """NgramDraft with its options checked (unknown names and bad values raise OnlineSpecError)."""
    bad = sorted(set(options) - set(OPTIONS))
    require(not bad, f"ngram draft has no option(s) {bad}; valid options: {', '.join(OPTIONS)}")
    return NgramDraft(vocab_size=vocab_size, **options)
