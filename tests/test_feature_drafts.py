"""Feature-level drafts (eagle, hydra): lossless under every updater, train_logits exact,
training aligned with inference, frozen target parts out of the trainable set, save/load."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import onlinespec_core as osc
from onlinespec_core.drafts import Draft
from onlinespec_core.errors import OnlineSpecError
from onlinespec_core.training import warm_up
from onlinespec_core.updaters import available_updaters
from onlinespec_core.updaters.base import Update, Updater
from tests.tiny import TEXT, make_model

PROMPTS = ["d", "def add(a, b):", "Tom has 3 apples and buys 4 more. How many apples does he have?"]
KINDS = ("eagle", "hydra")


def hf_greedy(target, ids, n):
    out = target.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, eos_token_id=None,
                          pad_token_id=2, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def refs(pair_dirs):
    """arch -> {prompt: target's own greedy continuation}, computed once (the pair's tokenizer)."""
    out = {}
    for arch, (t, _) in pair_dirs.items():
        pair = osc.load_pair(target=str(t), draft=None, draft_kind="hydra")
        out[arch] = {p: hf_greedy(pair.target, pair.tokenizer(p)["input_ids"], 20) for p in PROMPTS}
    return out


def feature_pair(pair_dirs, arch, kind, **opts):
    t, _ = pair_dirs[arch]
    pair = osc.load_pair(target=str(t), draft=None, draft_kind=kind, **opts)
    pair.target.generation_config.eos_token_id = None  # compare full lengths with hf_greedy
    return pair


def assert_lossless(pair, refs_arch, ks=(1, 3, 8), **engine_kw):
    for prompt, ref in refs_arch.items():
        ids = pair.tokenizer(prompt)["input_ids"]
        for k in ks:
            out = osc.Engine(pair, k=k, **engine_kw).generate(ids, max_new_tokens=20)
            assert out.token_ids == ref, (pair.draft.kind, prompt, k, engine_kw)
            assert out.rounds[0].k == 0  # round 0 is the target-only prefill
            assert sum(len(r.emitted) for r in out.rounds) == 20


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("kind", KINDS)
def test_random_heads_are_lossless(pair_dirs, refs, arch, kind):
    assert_lossless(feature_pair(pair_dirs, arch, kind), refs[arch])


def test_hydra_prefix_and_few_heads_lossless(pair_dirs, refs):
    pair = feature_pair(pair_dirs, "qwen2", "hydra", prefix=True, n_heads=2)
    assert_lossless(pair, refs["qwen2"], ks=(2, 5))


@pytest.fixture(scope="module")
def trained(pair_dirs):
    """(arch, kind) -> pair whose head had a brief warm-up (weights far from the random init)."""
    out = {}
    for arch in ("llama", "qwen2"):
        for kind in KINDS:
            pair = feature_pair(pair_dirs, arch, kind)
            warm_up(pair, TEXT, steps=25, batch_size=4, seq_len=48, lr=3e-3)
            out[arch, kind] = pair
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", KINDS)
def test_trained_heads_are_lossless(trained, refs, arch, kind):
    assert_lossless(trained[arch, kind], refs[arch])


@pytest.mark.parametrize("updater", available_updaters())
@pytest.mark.parametrize("kind", KINDS)
def test_every_updater_keeps_feature_drafts_lossless(trained, refs, kind, updater):
    pair = trained["llama", kind]
    before = {k: v.clone() for k, v in pair.draft.module.state_dict().items()}
    try:
        assert_lossless(pair, refs["llama"], ks=(3,), updater=updater)
        # and a switch in the middle of a generation
        ids = pair.tokenizer(PROMPTS[1])["input_ids"]
        eng = osc.Engine(pair, k=2, updater="frozen")
        got = []
        for ev in eng.stream(ids, max_new_tokens=20):
            if ev.kind == "round" and ev.round.index == 2:
                eng.set_updater(updater)
            if ev.kind == "done":
                got = ev.data["token_ids"]
        assert got == refs["llama"][PROMPTS[1]]
    finally:
        pair.draft.module.load_state_dict(before)


class SGD(Updater):
    """A minimal real online updater (plain SGD on soft CE toward the target) driving
    train_logits through the engine: weights change between rounds."""
    name = "test-sgd"

    def __init__(self, lr: float = 0.5) -> None:
        self.lr, self.steps, self.draft = lr, 0, None

    def attach(self, draft):
        self.draft = draft
        self.opt = torch.optim.SGD([p for p in draft.module.parameters() if p.requires_grad], lr=self.lr)

    def observe(self, rnd):
        logits = self.draft.train_logits(rnd)
        p = torch.softmax(rnd.target_logits[: rnd.k].float().clone(), -1)
        loss = -(p * torch.log_softmax(logits, -1)).sum(-1).mean()
        if self.draft.has_train_terms and rnd.target_hidden is not None:
            loss = loss + self.draft.train_terms(rnd)["feature_loss"]
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.steps += 1
        return Update(changed=True)

    def detach(self):
        pass


@pytest.mark.parametrize("kind", KINDS)
def test_online_sgd_through_train_logits_is_lossless(pair_dirs, refs, kind):
    pair = feature_pair(pair_dirs, "llama", kind)
    target_before = {k: v.clone() for k, v in pair.target.state_dict().items()}
    head_before = [p.detach().clone() for p in pair.draft.module.parameters()]
    for prompt, ref in refs["llama"].items():
        eng = osc.Engine(pair, k=3)
        eng.updater = SGD()
        eng.updater.attach(pair.draft)
        assert eng.generate(pair.tokenizer(prompt)["input_ids"], max_new_tokens=20).token_ids == ref
        assert eng.updater.steps > 0
    assert any(not torch.equal(a, b) for a, b in zip(head_before, pair.draft.module.parameters()))
    for k, v in pair.target.state_dict().items():  # the frozen target parts never move
        assert torch.equal(v, target_before[k]), k


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", KINDS)
def test_train_logits_recompute_the_proposal(pair_dirs, arch, kind):
    """train_logits(round) == the logits the draft proposed with, with grad into the head only."""
    pair = feature_pair(pair_dirs, arch, kind)
    warm_up(pair, TEXT, steps=5, batch_size=2, seq_len=32)
    pair.draft.readout.int8 = False  # exact: proposals read out in fp32, as training does
    eng = osc.Engine(pair, k=4, keep_distributions=True)
    rounds = []
    for prompt in PROMPTS[1:]:  # two prompts: records of the first survive the second's reset
        rounds += [r for r in eng.generate(prompt, max_new_tokens=16).rounds if r.k]
    target_ids = {id(p) for p in pair.target.parameters()}
    assert not target_ids & {id(p) for p in pair.draft.module.parameters()}  # no embeddings/lm_head
    for r in rounds:
        logits = pair.draft.train_logits(r)
        assert logits.shape == r.draft_logits.shape
        torch.testing.assert_close(logits.detach(), r.draft_logits, atol=1e-4, rtol=1e-4)
        pair.draft.module.zero_grad()
        logits.logsumexp(-1).sum().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pair.draft.module.parameters())
        assert all(p.grad is None for p in pair.target.parameters())
    if kind == "eagle":
        terms = pair.draft.train_terms(rounds[-1])
        assert torch.isfinite(terms["feature_loss"]) and terms["feature_loss"].requires_grad


# ---- alignment: training feeds exactly what inference feeds -----------------------------
def offline_first_logits(draft, target, seq: list[int], shift: int = 1) -> torch.Tensor:
    """Teacher-forced training forward over a whole sequence: row t = the logits for x_{t+2}
    (eagle: from (f_t, x_{t+shift}); hydra head 1: from (h_t, x_{t+shift})). shift=1 is the
    aligned feed; shift=0 is the classic off-by-one bug."""
    ids = torch.tensor([seq])
    with torch.no_grad():
        f = target(input_ids=ids, output_hidden_states=True).hidden_states[-1].float()
        e = draft.readout.embed(ids).float()
        n = len(seq) - 1
        if draft.kind == "eagle":
            pred = draft.module(e[:, shift:shift + n], f[:, :n])
        else:
            pred = draft.module(draft.module.base(f)[:, :n], [e[:, shift:shift + n]])
        return draft.readout.logits(pred)[0]


@pytest.mark.parametrize("kind", KINDS)
def test_training_is_aligned_with_inference(pair_dirs, kind):
    pair = feature_pair(pair_dirs, "llama", kind, **({"prefix": True} if kind == "hydra" else {}))
    warm_up(pair, TEXT, steps=5, batch_size=2, seq_len=32)
    pair.draft.readout.int8 = False  # compare the fp32 readout row for row
    ids = pair.tokenizer(PROMPTS[2])["input_ids"]
    out = osc.Engine(pair, k=3, keep_distributions=True).generate(ids, max_new_tokens=24)
    seq = ids + out.token_ids
    aligned = offline_first_logits(pair.draft, pair.target, seq, shift=1)
    shifted = offline_first_logits(pair.draft, pair.target, seq, shift=0)
    checked = 0
    for r in out.rounds:
        if r.k:  # the round's first proposal read context x_0..x_{L-1}: offline row L-2
            torch.testing.assert_close(r.draft_logits[0], aligned[r.context_len - 2], atol=1e-3, rtol=1e-3)
            assert not torch.allclose(r.draft_logits[0], shifted[r.context_len - 2], atol=1e-3)
            checked += 1
    assert checked >= 3
    # and the warm-up loss is computed on exactly those rows
    s = torch.tensor([seq])
    with torch.no_grad():
        f = pair.target(input_ids=s, output_hidden_states=True)
        loss_aligned, _ = pair.draft.offline_loss(s, f.hidden_states[-1].float(), f.logits)
    assert torch.isfinite(loss_aligned)


# ---- frozen parts, save / load, errors ----------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_module_holds_only_the_head(pair_dirs, kind):
    pair = feature_pair(pair_dirs, "llama", kind)
    d = pair.draft
    assert d.kind == kind and d.needs_hidden and isinstance(d, Draft)
    names = [n for n, _ in d.module.named_parameters()]
    assert names and not any("embed" in n or "lm_head" in n or n.endswith("wte.weight") for n in names)
    assert all(p.requires_grad for p in d.module.parameters())
    assert not any(p.requires_grad for p in pair.target.parameters())
    n_head = sum(p.numel() for p in d.module.parameters())
    assert n_head < sum(p.numel() for p in pair.target.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_roundtrip_and_engine_state(pair_dirs, tmp_path, kind):
    t, _ = pair_dirs["llama"]
    opts = {"n_heads": 3} if kind == "hydra" else {}
    pair = osc.load_pair(target=str(t), draft=None, draft_kind=kind, **opts)
    warm_up(pair, TEXT, steps=5, batch_size=2, seq_len=32)
    pair.draft.save(tmp_path / "head")
    again = osc.load_pair(target=str(t), draft=str(tmp_path / "head"), draft_kind=kind)
    for a, b in zip(pair.draft.module.state_dict().values(), again.draft.module.state_dict().values()):
        assert torch.equal(a, b)
    if kind == "hydra":
        assert len(again.draft.module.heads) == 3
    a = osc.Engine(pair, k=3).generate(PROMPTS[1], max_new_tokens=16)
    b = osc.Engine(again, k=3).generate(PROMPTS[1], max_new_tokens=16)
    assert [r.drafted for r in a.rounds] == [r.drafted for r in b.rounds]
    eng = osc.Engine(again, k=3)
    eng.save_state(tmp_path / "state")
    eng.load_state(tmp_path / "state")
    assert eng.generate(PROMPTS[1], max_new_tokens=16).token_ids == a.token_ids
    # bf16 files load into an fp32 head
    pair.draft.save(tmp_path / "bf16", dtype=torch.bfloat16)
    assert osc.load_pair(target=str(t), draft=str(tmp_path / "bf16"), draft_kind=kind).draft.module.state_dict()


def test_load_errors_are_clear(pair_dirs, tmp_path):
    t, _ = pair_dirs["llama"]
    t_gpt2, _ = pair_dirs["gpt2"]
    pair = osc.load_pair(target=str(t), draft=None, draft_kind="hydra")
    pair.draft.save(tmp_path / "hydra")
    with pytest.raises(OnlineSpecError, match="draft_kind='hydra'"):
        osc.load_pair(target=str(t), draft=str(tmp_path / "hydra"), draft_kind="eagle")
    with pytest.raises(OnlineSpecError, match="does not exist"):
        osc.load_pair(target=str(t), draft=str(tmp_path / "nope"), draft_kind="eagle")
    with pytest.raises(OnlineSpecError, match="different target"):
        osc.load_pair(target=str(t_gpt2), draft=str(tmp_path / "hydra"), draft_kind="hydra")
    with pytest.raises(OnlineSpecError, match="unknown eagle draft option"):
        osc.load_pair(target=str(t), draft=None, draft_kind="eagle", n_heads=3)
    (tmp_path / "hydra" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(Exception):
        osc.load_pair(target=str(t), draft=str(tmp_path / "hydra"), draft_kind="hydra")


def test_demo_style_fresh_head_via_load_pair(pair_dirs):
    """draft=None gives a fresh head; the same seed gives the same head."""
    a = feature_pair(pair_dirs, "qwen2", "eagle")
    b = feature_pair(pair_dirs, "qwen2", "eagle")
    c = feature_pair(pair_dirs, "qwen2", "eagle", seed=1)
    sa, sb, sc = (x.draft.module.state_dict() for x in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


# ---- sampling keeps the target's distribution with a feature draft -------------------------
V = 6


def test_eagle_sampling_reproduces_target_distribution(tokenizer):  # noqa: D103
    target = make_model("llama", V, hidden=32, layers=1, seed=11, eos_token_id=None)
    with torch.no_grad():
        target.lm_head.weight.mul_(0.5)
    pair = osc.load_pair(target=target, draft=None, draft_kind="eagle", tokenizer=tokenizer)
    pair.target.generation_config.eos_token_id = []
    cfg = osc.SamplingConfig(1.0)
    prompt = [3, 1, 4]
    with torch.no_grad():
        p1 = osc.sampling.logits_to_probs(target(torch.tensor([prompt])).logits[0, -1], cfg)
        joint = torch.stack([p1[x] * osc.sampling.logits_to_probs(
            target(torch.tensor([prompt + [x]])).logits[0, -1], cfg) for x in range(V)]).reshape(-1).numpy()
    eng = osc.Engine(pair, k=2, temperature=1.0, seed=0)
    counts = np.zeros(V * V)
    for _ in range(600):  # round 0 emits x1 (prefill), round 1 drafts from x1 on
        a, b = eng.generate(prompt, max_new_tokens=3).token_ids[:2]
        counts[a * V + b] += 1
    exp = joint * counts.sum()
    keep = exp >= 5
    obs, ex = np.append(counts[keep], counts[~keep].sum()), np.append(exp[keep], exp[~keep].sum())
    if ex[-1] == 0:
        obs, ex = obs[:-1], ex[:-1]
    ex = ex * obs.sum() / ex.sum()
    assert chisquare(obs, ex).pvalue > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_train_logits_without_the_proposal_record(pair_dirs, kind):
    """Rounds restored by an updater's load_state in a new process: the draft never saw the
    proposal; train_logits re-reads the context tail with the target (exact for short contexts)."""
    pair = feature_pair(pair_dirs, "llama", kind)
    warm_up(pair, TEXT, steps=5, batch_size=2, seq_len=32)
    pair.draft.readout.int8 = False
    out = osc.Engine(pair, k=4, keep_distributions=True).generate(PROMPTS[1], max_new_tokens=16)
    pair.draft.records.clear()
    for r in out.rounds:
        if r.k:
            logits = pair.draft.train_logits(r)
            torch.testing.assert_close(logits.detach(), r.draft_logits, atol=1e-3, rtol=1e-3)
            assert logits.requires_grad


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_demo_heads_load_and_stay_lossless(kind):
    from onlinespec_core.models import DEMO_DIR
    if not (DEMO_DIR / kind / "draft_config.json").is_file() or not (DEMO_DIR / "target").is_dir():
        pytest.skip(f"no shipped demo {kind} head")
    pair = osc.load_pair("demo", draft_kind=kind)
    assert pair.draft.kind == kind
    pair.target.generation_config.eos_token_id = None
    ids = pair.tokenizer("The weather on Saturday will be")["input_ids"]
    assert osc.Engine(pair, k=4).generate(ids, max_new_tokens=16).token_ids == hf_greedy(pair.target, ids, 16)


@pytest.mark.parametrize("kind", KINDS)
def test_proposals_read_tokens_through_an_int8_copy_of_the_lm_head(pair_dirs, kind):
    """Where the CPU has the kernel a proposal's readout is the int8 form of f W^T (full
    vocabulary and a reduced one); training keeps fp32; the output stays the target's."""
    from onlinespec_core import fast
    if fast.draft_kernels() is None:
        pytest.skip("no AVX-512 VNNI draft kernels here")
    pair = feature_pair(pair_dirs, "llama", kind)
    ro = pair.draft.readout
    w = ro.lm_head.weight.detach()
    f = torch.randn(3, w.shape[1])
    for subset in (None, torch.arange(0, w.shape[0], 3)):
        ro.set_vocab(subset)
        with torch.no_grad():
            got = ro.logits(f)
        rows = w if subset is None else w[subset]
        ref = fast.i8_reference(f, rows).float()
        sub = got if subset is None else got[:, subset]
        torch.testing.assert_close(sub, ref, atol=1e-4, rtol=1e-4)
        if subset is not None:
            assert torch.isinf(got[:, 1]).all()  # outside the subset: q = 0
        with torch.enable_grad():
            exact = ro.logits(f.requires_grad_(True))  # the training form: fp32
        exact = exact.detach() if subset is None else exact.detach()[:, subset]
        assert (exact - sub).abs().max() < 0.05 * float(exact.abs().max()) + 1e-3
        f = f.detach()
    ro.set_vocab(None)
    ids = pair.tokenizer(PROMPTS[2])["input_ids"]
    assert osc.Engine(pair, k=4).generate(ids, max_new_tokens=20).token_ids == hf_greedy(pair.target, ids, 20)


@pytest.mark.parametrize("kind", KINDS)
def test_logit_tables_on_feature_heads_learn_and_stay_lossless(trained, refs, kind):
    """The updaters' fast bigram/unigram logit tables (drafts.logit_cache) on eagle/hydra heads:
    every output is the target's own, the tables learn, and they round-trip through the draft's
    state."""
    pair = trained["llama", kind]
    opts = {"train": "none", "bigram_lr": 2.0, "cache_lr": 0.2, "cache_decay": 0.02}
    try:
        assert_lossless(pair, refs["llama"], ks=(3,), updater="ogd", updater_options=opts)
        tables = pair.draft.logit_cache
        assert tables is not None and tables.rows and tables.uses_unigram
        z = torch.zeros(pair.draft.vocab_size)
        prev = next(iter(tables.rows))
        want = pair.draft.corrected(z, prev)
        state = pair.draft.state_tensors()
        pair.draft.load_state_tensors({})  # a state without tables: none
        assert pair.draft.logit_cache is None and torch.equal(pair.draft.corrected(z, prev), z)
        pair.draft.load_state_tensors(state)
        assert torch.equal(pair.draft.corrected(z, prev), want)
    finally:
        pair.draft.logit_cache = None
