"""One speculative round: propose k -> verify in one target pass -> accept -> crop the caches.

Greedy: accept x_i while x_i == argmax p_i. Sampling (lossless): accept x_i ~ q_i with prob
min(1, p_i(x_i)/q_i(x_i)); at the first rejection emit a sample of norm(max(0, p_i - q_i));
if all k pass, emit a bonus sample of p_{k+1}. The output is distributed exactly as the target's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache, PreTrainedModel

from . import fast
from .drafts.base import Draft, Proposal, crop_cache
from .feedback import Round
from .sampling import SamplingConfig, greedy, logits_to_probs, sample


@dataclass
class Verification:
    logits: torch.Tensor  # [k+1, V] raw target logits at the verified positions
    probs: torch.Tensor  # [k+1, V] fp32 sampling distributions p_i
    hidden: torch.Tensor | None  # [n_fed, H] target last hidden states of every fed token


@dataclass
class DecodeState:
    """One sequence being decoded: ids so far and the target's KV cache (holds seq[:-1] or less)."""
    seq: torch.Tensor  # [L] long
    prompt_len: int
    cache: DynamicCache | fast.KVCache  # new_target_cache(target)
    hidden_start: int = 0  # sequence position of the first hidden state handed to the draft

    @property
    def new_tokens(self) -> list[int]:
        return self.seq[self.prompt_len:].tolist()


def new_target_cache(target: PreTrainedModel) -> DynamicCache | fast.KVCache:
    """The fast path's O(1)-crop cache, else an HF cache whose every layer can roll back."""
    lean = fast.lean_of(target)
    return lean.new_cache() if lean is not None else fast.full_cache()


def target_forward(target: PreTrainedModel, ids: torch.Tensor, cache, keep: int,
                   need_hidden: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ids [n] appended to cache -> (logits [keep, V], last hidden states [n, H] fp32 or None)."""
    lean = fast.lean_of(target)
    if lean is not None and isinstance(cache, fast.KVCache):
        logits, hidden = lean.forward(ids, cache, keep, need_hidden)
    else:
        out = target(input_ids=ids[None], cache=cache, use_cache=True, logits_to_keep=keep,
                     output_hidden_states=need_hidden)
        logits, hidden = out.logits[0, -keep:], out.hidden_states[-1][0] if need_hidden else None
    return logits, hidden.float() if hidden is not None else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def verify(target: PreTrainedModel, state: DecodeState, drafted: torch.Tensor, cfg: SamplingConfig,
           need_hidden: bool) -> Verification:
    """Score every drafted position and one more in a single target forward."""
    k = drafted.numel()
    pending = state.seq[state.cache.get_seq_length():]
    ids = torch.cat([pending, drafted])
    logits, hidden = target_forward(target, ids, state.cache, k + 1, need_hidden)
    return Verification(logits, logits_to_probs(logits, cfg), hidden)


def accept_greedy(drafted: torch.Tensor, target_logits: torch.Tensor) -> tuple[int, int]:
    """Leading matches with the target's argmax, then the target's own token."""
    want = greedy(target_logits).tolist()  # [k+1]; plain ints from here
    n = 0
    for x in drafted.tolist():
        if x != want[n]:
            break
        n += 1
    return n, want[n]


def accept_sampling(drafted: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                    generator: torch.Generator | None) -> tuple[int, int]:
    """Lossless rejection sampling on fp32 probabilities q [k, V], p [k+1, V]."""
    k = drafted.numel()
    if k:
        idx = drafted[:, None]
        px = p[:k].gather(1, idx)[:, 0]
        qx = q.gather(1, idx)[:, 0]
        r = torch.rand(k, generator=generator, device=p.device, dtype=torch.float32)
        # accept x with prob min(1, p(x)/q(x))  <=>  r * q(x) < p(x)
        rejected = (r * qx >= px).nonzero()
        if rejected.numel():
            n = int(rejected[0, 0])
            residual = (p[n] - q[n]).clamp_min(0.0)  # norm(max(0, p - q))
            total = residual.sum()
            dist = residual / total if total > 0 else p[n]
            return n, int(sample(dist, generator))
    return k, int(sample(p[k], generator))


def run_round(target: PreTrainedModel, draft: Draft | None, state: DecodeState, k: int,
              cfg: SamplingConfig, generator: torch.Generator | None, index: int,
              eos_ids: set[int], budget: int, feedback_window: int = 256,
              verify_fn: Callable[..., Verification] | None = None, topic: str | None = None,
              prompt_index: int | None = None) -> Round:
    """Propose, verify, accept; append the emitted tokens to state.seq and crop both caches.
    The Round holds the decode part; the engine adds what the updater did (updated, loss)."""
    device = state.seq.device
    L = state.seq.numel()
    k = max(0, min(k, budget - 1)) if draft is not None else 0  # never draft past max_new_tokens
    t0 = time.perf_counter()
    if k > 0:
        prop = draft.propose(state.seq, k, cfg, generator)
        k = int(prop.tokens.numel())  # a draft may propose fewer (ngram: no match -> none)
    else:
        prop = Proposal(state.seq.new_empty(0), torch.empty(0), torch.empty(0))
    sync(device)
    t1 = time.perf_counter()
    need_hidden = bool(draft is not None and draft.needs_hidden)
    ver = (verify_fn or verify)(target, state, prop.tokens, cfg, need_hidden)
    if cfg.greedy:
        n, nxt = accept_greedy(prop.tokens, ver.logits)
    else:
        n, nxt = accept_sampling(prop.tokens, prop.probs, ver.probs, generator)
    sync(device)
    t2 = time.perf_counter()

    fed_start = L - (ver.hidden.shape[0] - k) if ver.hidden is not None else 0
    drafted = prop.tokens.tolist()
    emitted = drafted[:n] + [nxt]
    for i, tok in enumerate(emitted):  # EOS is exact: never emit past it
        if tok in eos_ids:
            emitted = emitted[: i + 1]
            break
    emitted = emitted[:budget]
    valid = L + n  # sequence prefix the target's cache may keep (the new last token is unfed)
    crop_cache(state.cache, valid)
    if draft is not None:
        hidden = ver.hidden[: valid - fed_start] if ver.hidden is not None else None
        draft.commit(valid, target_hidden=hidden, hidden_start=fed_start)
    ids = torch.tensor(emitted, dtype=state.seq.dtype, device=device)
    tail = state.seq[max(0, L - feedback_window):]
    state.seq = torch.cat([state.seq, ids])
    pos = torch.arange(len(emitted), device=device)
    rnd = Round(
        index=index, context_len=L, k=k, drafted=drafted, accepted=n, emitted=emitted,
        kind="target" if k == 0 else ("bonus" if n == k else "correction"),
        context_tail=tail, draft_logits=prop.logits if k else None, target_logits=ver.logits,
        target_hidden=ver.hidden,
        draft_p=prop.probs.gather(1, prop.tokens[:, None])[:, 0].tolist() if k else [],
        target_p=ver.probs[pos, ids].tolist(),
        topic=topic, prompt_index=prompt_index, draft_s=t1 - t0, verify_s=t2 - t1,
    )
    rnd.bookkeeping_s = time.perf_counter() - t2
    return rnd
