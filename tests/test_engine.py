"""Engine behaviour: events, control requests between rounds, streams, state, metrics."""
from __future__ import annotations

import threading

import pytest
import torch

import onlinespec_core as osc
from onlinespec_core import state as state_mod
from onlinespec_core.metrics import Metrics, expected_tau, speedup_bound
from onlinespec_core.streams import StreamItem, from_text, interleave_topics, topics_in_order


def reference(pair, prompt, n):
    ids = pair.tokenizer(prompt)["input_ids"]
    out = pair.target.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n,
                               eos_token_id=None, pad_token_id=2)
    return out[0, len(ids):].tolist()


def test_stream_events_and_stats(llama_pair):
    eng = osc.Engine(llama_pair, k=3)
    events = list(eng.stream("def add(a, b):", max_new_tokens=12))
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    rounds = [e.round for e in events if e.kind == "round"]
    assert sum(len(r.emitted) for r in rounds) == 12
    stats = events[-1].data["stats"]
    for key in ("tau", "tokens_per_s", "rounds", "update_s", "update_fraction", "per_position_acceptance"):
        assert key in stats
    assert stats["rounds"] == len(rounds)
    assert all(r.draft_logits is None and r.target_logits is None for r in rounds)  # released
    assert all(len(r.target_p) == len(r.emitted) and len(r.draft_p) == r.k for r in rounds)


def test_keep_distributions(llama_pair):
    out = osc.Engine(llama_pair, k=2, keep_distributions=True).generate("abc", max_new_tokens=6)
    r = out.rounds[0]
    assert r.target_logits.shape == (r.k + 1, llama_pair.target.config.vocab_size)
    assert r.draft_logits.shape == (r.k, llama_pair.target.config.vocab_size)


def test_requests_apply_between_rounds(llama_pair):
    eng = osc.Engine(llama_pair, k=2)
    seen = []
    for ev in eng.stream("def add(a, b):", max_new_tokens=30):
        if ev.kind == "round":
            seen.append(ev.round.k)
            if len(seen) == 2:
                eng.set_k(5)
                eng.set_updater("frozen")
        elif ev.kind in ("config", "updater"):
            seen.append(ev.kind)
    i = seen.index("config")
    assert seen[:i] == [2, 2] and "updater" in seen
    assert seen[i + 2] == 5  # the next round uses the new k


def test_pause_step_resume_stop_from_another_thread(llama_pair):
    eng = osc.Engine(llama_pair, k=2)
    eng.control.pause()
    events: list = []
    th = threading.Thread(target=lambda: events.extend(eng.stream("abc", max_new_tokens=200)))
    th.start()
    _wait(lambda: any(e.kind == "paused" for e in events))
    assert not any(e.kind == "round" for e in events)
    eng.control.step()
    _wait(lambda: sum(e.kind == "round" for e in events) == 1)
    _wait(lambda: sum(e.kind == "paused" for e in events) == 2)
    assert sum(e.kind == "round" for e in events) == 1  # exactly one round per step
    eng.control.resume()
    _wait(lambda: sum(e.kind == "round" for e in events) >= 3)
    eng.control.stop()
    th.join(10)
    assert not th.is_alive()
    assert events[-1].kind == "stopped"
    new = events[-1].data["token_ids"]
    assert new == reference(llama_pair, "abc", len(new))  # what was emitted is still lossless


def _wait(cond, timeout=20.0):
    import time
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.01)


def test_run_stream_and_shift_topic(llama_pair):
    items = [StreamItem("code", "def f(x):"), StreamItem("code", "def g(y):"),
             StreamItem("math", "Tom has 3 apples."), StreamItem("sql", "SELECT name")]
    eng = osc.Engine(llama_pair, k=2)
    topics = []
    for ev in eng.run_stream(items, max_new_tokens=6):
        if ev.kind == "round":
            topics.append(ev.round.topic)
            if ev.round.topic == "code" and len(topics) == 1:
                eng.control.shift_topic()
    assert topics[0] == "code" and "math" in topics and "sql" in topics
    assert topics.count("code") == 1  # the rest of the code topic was skipped
    # a later generate is not affected by the consumed shift request
    assert len(eng.generate("abc", max_new_tokens=5).token_ids) == 5


def test_save_load_continues_identically(tmp_path, llama_pair):
    eng = osc.Engine(llama_pair, k=3, temperature=0.8, seed=7)
    eng.generate("def add(a, b):", max_new_tokens=10)
    eng.save_state(tmp_path / "s")
    a = eng.generate("SELECT", max_new_tokens=20)
    eng2 = osc.Engine(llama_pair, k=1, temperature=0.0, seed=0)
    eng2.load_state(tmp_path / "s")
    b = eng2.generate("SELECT", max_new_tokens=20)
    assert a.token_ids == b.token_ids  # same RNG stream, config and draft
    assert eng2.config.k == 3 and eng2.config.temperature == 0.8


def test_crash_mid_save_keeps_old_state(tmp_path, llama_pair, monkeypatch):
    eng = osc.Engine(llama_pair, k=3)
    eng.save_state(tmp_path / "s")
    before = (tmp_path / "s" / "state.json").read_text()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(state_mod, "save_file", boom)
    eng.generate("abc", max_new_tokens=4)
    with pytest.raises(OSError):
        eng.save_state(tmp_path / "s")
    assert (tmp_path / "s" / "state.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temp dirs left
    monkeypatch.undo()
    eng.load_state(tmp_path / "s")


def test_metrics_math():
    assert expected_tau(0.0, 4) == 1.0
    assert expected_tau(1.0, 4) == 5.0
    assert abs(expected_tau(0.5, 3) - (1 - 0.5 ** 4) / 0.5) < 1e-12
    assert speedup_bound(3.0, 4, 0.1) == pytest.approx(3.0 / 1.4)
    m = Metrics(window=2)
    for k, a in ((4, 4), (4, 1), (2, 0)):
        m.add(osc.Round(index=0, context_len=1, k=k, drafted=[0] * k, accepted=a,
                        emitted=[0] * (a + 1), kind="x"))
    assert m.tau == (5 + 2 + 1) / 3
    assert m.per_position_acceptance == [2 / 3, 1 / 3, 1 / 2, 1 / 2]
    assert m.rolling_tau == (2 + 1) / 2
    assert m.forwards_per_token == 3 / 8


def test_stream_helpers():
    items = interleave_topics({"a": ["1", "2", "3"], "b": ["4", "5"]}, per_block=2, seed=0)
    assert topics_in_order(items) == ["a", "b", "a"]
    assert len(items) == 5
    assert [i.prompt for i in from_text("x\n\n y \n")] == ["x", "y"]
