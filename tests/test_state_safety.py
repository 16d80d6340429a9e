"""Saved states and user folders are never lost; a load sees one complete save or a clear error;
load_state is all or nothing; save/load from other threads run between rounds (issue 13)."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import onlinespec_core as osc
from onlinespec_core.atomic import MANIFEST, write_manifest
from onlinespec_core.errors import OnlineSpecError
from onlinespec_core.export import export_draft, export_engine_draft


def names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def params(pair) -> list[torch.Tensor]:
    return [p.detach().clone() for p in pair.draft.module.parameters()]


def tamper(state: Path, edit) -> None:
    """Edit state.json and re-sign the manifest (a deliberate, consistent edit)."""
    meta = json.loads((state / "state.json").read_text())
    edit(meta)
    (state / "state.json").write_text(json.dumps(meta))
    write_manifest(state, "state")


@pytest.fixture
def eng(llama_pair):
    e = osc.Engine(llama_pair, k=3, updater="ogd", updater_options={"every": 1, "batch": 2})
    e.generate("def add(a, b):", max_new_tokens=8)
    return e


# ---- never delete user files ------------------------------------------------------------
def test_save_refuses_a_foreign_folder(tmp_path, eng):
    user = tmp_path / "photos"
    user.mkdir()
    (user / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(OnlineSpecError, match="refusing to replace .* not an OnlineSpec saved state; pick a new"):
        eng.save_state(user)
    assert (user / "cat.jpg").read_bytes() == b"meow" and names(tmp_path) == ["photos"]
    (tmp_path / "empty").mkdir()
    eng.save_state(tmp_path / "empty")  # an empty folder is fine
    eng.save_state(tmp_path / "empty")  # and so is one of our states
    assert MANIFEST in names(tmp_path / "empty") and names(tmp_path) == ["empty", "photos"]
    (tmp_path / "empty" / "notes.txt").write_text("mine")  # a user file inside a state: kept
    with pytest.raises(OnlineSpecError, match=r"it holds other files \(notes.txt\)"):
        eng.save_state(tmp_path / "empty")
    assert (tmp_path / "empty" / "notes.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OnlineSpecError, match="is a file; pick a folder path"):
        eng.save_state(tmp_path / "afile")
    with pytest.raises(OnlineSpecError, match="a parent path is a file"):
        eng.save_state(tmp_path / "afile" / "s")
    assert (tmp_path / "afile").read_text() == "x"


def test_export_refuses_a_foreign_folder(tmp_path, eng, capsys):
    from onlinespec_core.cli import main as cli
    state = eng.save_state(tmp_path / "state")
    user = tmp_path / "model"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(OnlineSpecError, match="refusing to replace"):
        export_engine_draft(eng, user)
    assert cli(["export-draft", str(state), "--out", str(user)]) == 2
    assert "refusing to replace" in capsys.readouterr().err
    with pytest.raises(OnlineSpecError, match="it holds an OnlineSpec saved state"):
        export_draft(state, state)  # an export never replaces a saved state
    assert (user / "notes.txt").read_text() == "keep me"
    (tmp_path / "f").write_text("x")
    assert cli(["export-draft", str(state), "--out", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err
    out = export_draft(state, tmp_path / "exp")
    assert export_draft(state, out) == out  # replacing our own export is fine
    eng.load_state(state)


# ---- crash debris -----------------------------------------------------------------------
def test_state_only_in_old_folder_is_recovered(tmp_path, eng, llama_pair):
    s = eng.save_state(tmp_path / "s")
    want = params(llama_pair)
    os.replace(s, tmp_path / ".s.old-12345")  # killed between the two renames
    (tmp_path / ".s.tmp-abc").mkdir()  # the new save was not finished
    (tmp_path / ".s.tmp-abc" / "draft.safetensors").write_bytes(b"half")
    with torch.no_grad():
        for p in llama_pair.draft.module.parameters():
            p.add_(1.0)
    eng.load_state(tmp_path / "s")  # not "does not exist"
    assert names(tmp_path) == ["s"]
    assert all(torch.equal(a, b) for a, b in zip(want, params(llama_pair)))


def test_debris_is_cleaned_and_pid_names_never_collide(tmp_path, eng):
    eng.save_state(tmp_path / "s")
    for d in (f".s.old-{os.getpid()}", ".s.old-1", ".s.tmp-x1"):  # e.g. left by a PID-1 container
        (tmp_path / d).mkdir()
        (tmp_path / d / "junk").write_text("j")
    (tmp_path / ".other.tmp-1").mkdir()  # not ours to touch
    eng.save_state(tmp_path / "s")
    eng.save_state(tmp_path / "s")
    assert names(tmp_path) == [".other.tmp-1", "s"]
    eng.load_state(tmp_path / "s")


def test_mixed_files_of_two_saves_are_refused(tmp_path, eng):
    a = eng.save_state(tmp_path / "a")
    eng.generate("SELECT name", max_new_tokens=8)
    b = eng.save_state(tmp_path / "b")
    (a / "state.safetensors").write_bytes((b / "state.safetensors").read_bytes())
    with pytest.raises(OnlineSpecError, match="state.safetensors does not match its manifest"):
        eng.load_state(a)
    (b / MANIFEST).unlink()
    with pytest.raises(OnlineSpecError, match="incomplete or corrupt .*manifest"):
        eng.load_state(b)


# ---- all-or-nothing load ----------------------------------------------------------------
BAD_META = [
    ("version-string", lambda m: m.update(version="2"), r"has version '2' \(str\), expected the number 2"),
    ("version-old", lambda m: m.update(version=1), "has format version 1, this OnlineSpec reads version 2"),
    ("no-updater", lambda m: m.pop("updater"), "field 'updater' must be an object"),
    ("updater-name", lambda m: m["updater"].update(name="bogus"), "uses updater 'bogus'"),
    ("updater-opt", lambda m: m["updater"]["options"].update(lr="fast"), "lr must be a finite number, got 'fast'"),
    ("updater-state", lambda m: m["updater"]["state"].pop("counters"), "the updater state is corrupt"),
    ("updater-state-type", lambda m: m["updater"].update(state={"buffer": 5, "counters": [], "extra": 1}),
     "the updater state is corrupt"),
    ("config-k", lambda m: m["config"].update(k=99), "k must be an integer in 0..32"),
    ("config-key", lambda m: m["config"].update(bogus=1), r"unknown engine option\(s\) \['bogus'\]"),
    ("config-temp", lambda m: m["config"].update(temperature="hot"), "temperature must be a finite number"),
    ("config-type", lambda m: m.update(config=[1]), "field 'config' must be an object"),
    ("round", lambda m: m.update(round_index="7"), "field 'round_index' must be an integer"),
    ("kind", lambda m: m.update(draft_kind="eagle"), "is for a 'eagle' draft"),
    ("fingerprint", lambda m: m["fingerprint"].update(draft="0" * 16), "draft of another architecture"),
    ("not-object", lambda m: m.clear(), "field 'config' must be an object|has version None"),
]


@pytest.mark.parametrize("edit,match", [b[1:] for b in BAD_META], ids=[b[0] for b in BAD_META])
def test_tampered_state_is_refused_and_nothing_changes(tmp_path, eng, llama_pair, edit, match):
    state = eng.save_state(tmp_path / "s")
    eng.generate("SELECT name FROM", max_new_tokens=12)  # the live engine moves on
    before = (params(llama_pair), eng.round_index, eng.updater, eng.updater_name, dict(vars(eng.config)),
              eng.generator.get_state())
    tamper(state, edit)
    with pytest.raises(OnlineSpecError, match=match):
        eng.load_state(state)
    after = (params(llama_pair), eng.round_index, eng.updater, eng.updater_name, dict(vars(eng.config)),
             eng.generator.get_state())
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert before[1:5] == after[1:5] and torch.equal(before[5], after[5])
    eng.generate("abc", max_new_tokens=4)  # still usable


def test_bad_tensors_are_refused_before_anything_changes(tmp_path, eng, llama_pair):
    state = eng.save_state(tmp_path / "s")
    want = params(llama_pair)
    t = load_file(str(state / "state.safetensors"))
    t["rng"] = torch.zeros(3, dtype=torch.uint8)
    save_file(t, str(state / "state.safetensors"))
    write_manifest(state, "state")
    with pytest.raises(OnlineSpecError, match="RNG state"):
        eng.load_state(state)
    state = eng.save_state(tmp_path / "s")
    d = load_file(str(state / "draft.safetensors"))
    k = next(iter(d))
    d[k] = torch.full_like(d[k], float("nan"))
    save_file(d, str(state / "draft.safetensors"))
    write_manifest(state, "state")
    with pytest.raises(OnlineSpecError, match="contain NaN or inf"):
        eng.load_state(state)
    d.pop(k)
    save_file(d, str(state / "draft.safetensors"))
    write_manifest(state, "state")
    with pytest.raises(OnlineSpecError, match="do not fit this draft"):
        eng.load_state(state)
    assert all(torch.equal(a, b) for a, b in zip(want, params(llama_pair)))


def test_state_of_another_pair_is_refused(tmp_path, pair_dirs, tokenizer, eng):
    from tests.tiny import make_model
    state = eng.save_state(tmp_path / "s")
    t, d = pair_dirs["llama"]
    other = tmp_path / "other_target"  # same shapes, other weights
    make_model("llama", len(tokenizer), hidden=64, layers=2, seed=9).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(OnlineSpecError, match="saved for a different target model"):
        osc.Engine(osc.load_pair(target=str(other), draft=str(d))).load_state(state)
    big = tmp_path / "big_draft"  # another draft size
    make_model("llama", len(tokenizer), hidden=64, layers=1, seed=3).save_pretrained(big)
    with pytest.raises(OnlineSpecError, match="draft of another architecture or size"):
        osc.Engine(osc.load_pair(target=str(t), draft=str(big))).load_state(state)
    osc.Engine(osc.load_pair(target=str(t), draft=str(d))).load_state(state)  # the same pair: fine


# ---- engine threads -----------------------------------------------------------------------
def _run_in_thread(eng, prompt: str, n: int):
    box: dict = {}

    def go() -> None:
        try:
            box["out"] = eng.generate(prompt, max_new_tokens=n)
        except BaseException as e:
            box["err"] = e
    th = threading.Thread(target=go)
    th.start()
    return th, box


def _wait_running(eng, timeout: float = 20.0) -> None:
    t0 = time.time()
    while not eng._running:
        assert time.time() - t0 < timeout
        time.sleep(0.001)


def test_save_and_load_during_a_generate_in_another_thread(tmp_path, pair_dirs):
    t, d = pair_dirs["llama"]
    ref = osc.Engine(osc.load_pair(target=str(t), draft=str(d)), k=2)
    expect = ref.generate("def add(a, b):", max_new_tokens=120).token_ids
    eng = osc.Engine(osc.load_pair(target=str(t), draft=str(d)), k=2)
    eng.save_state(tmp_path / "s0")  # idle: applies at once
    th, box = _run_in_thread(eng, "def add(a, b):", 120)
    _wait_running(eng)
    saved = eng.save_state(tmp_path / "s1")  # queued, applied between rounds, waited for
    running_at_save = eng._running
    eng.load_state(tmp_path / "s0")
    eng.set_updater("ogd", every=1)
    eng.set_updater("frozen")
    th.join()
    assert "err" not in box, box.get("err")
    assert box["out"].token_ids == expect  # greedy: unchanged by the requests
    assert running_at_save and saved.is_dir()
    eng.load_state(saved)


def test_switches_racing_a_starting_generate(pair_dirs):
    t, d = pair_dirs["llama"]
    eng = osc.Engine(osc.load_pair(target=str(t), draft=str(d)), k=2, updater="ogd",
                     updater_options={"every": 1, "batch": 2})
    stop = threading.Event()
    errors: list[BaseException] = []

    def flip() -> None:
        n = 0
        try:
            while not stop.is_set():
                eng.set_updater("ogd" if n % 2 else "optimistic", every=1, batch=2)
                n += 1
                time.sleep(0.002)  # a busy user, not a livelock
        except BaseException as e:
            errors.append(e)
    th = threading.Thread(target=flip)
    th.start()
    try:
        for _ in range(12):
            eng.generate("def add(a, b):", max_new_tokens=10)
    finally:
        stop.set()
        th.join()
    assert not errors


def test_a_flood_of_requests_never_starves_generate(pair_dirs):
    t, d = pair_dirs["llama"]
    eng = osc.Engine(osc.load_pair(target=str(t), draft=str(d)), k=2)
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            eng.set_k(2)
    ths = [threading.Thread(target=flood) for _ in range(2)]
    for th in ths:
        th.start()
    try:
        t0 = time.perf_counter()
        out = eng.generate("def add(a, b):", max_new_tokens=30)
        assert len(out.token_ids) == 30 and time.perf_counter() - t0 < 60
    finally:
        stop.set()
        for th in ths:
            th.join()


def test_save_waits_with_a_timeout_and_works_from_the_consumer(tmp_path, llama_pair):
    eng = osc.Engine(llama_pair, k=2)
    g = eng.stream("def add(a, b):", max_new_tokens=20)
    assert next(g).kind == "start"  # running; the consumer (this thread) holds it
    box: dict = {}

    def other() -> None:
        try:
            eng.save_state(tmp_path / "late", timeout=0.3)
        except OnlineSpecError as e:
            box["err"] = str(e)
    th = threading.Thread(target=other)
    th.start()
    th.join()
    assert "did not reach the end of a round within 0.3 s" in box["err"]
    assert eng.save_state(tmp_path / "mine").is_dir()  # from the consumer's thread: between rounds
    kinds = [ev.kind for ev in g]
    assert kinds[-1] == "done" and not (tmp_path / "late").exists()  # the dropped request never ran


def test_save_while_paused(tmp_path, llama_pair):
    eng = osc.Engine(llama_pair, k=2)
    eng.control.pause()
    th, box = _run_in_thread(eng, "def add(a, b):", 20)
    _wait_running(eng)
    assert eng.save_state(tmp_path / "p", timeout=30).is_dir()  # drained by the pause loop
    eng.control.resume()
    th.join()
    assert "err" not in box and len(box["out"].token_ids) == 20
