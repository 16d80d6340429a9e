"""The fast decode path (onlinespec_core.fast) is exact: greedy output equals plain HF fp32
generate, token for token, on both paths and for more families than Llama/Qwen2/GPT-2
(Gemma-2's sliding-window layers included), and the online draft's fast form sees every update."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import onlinespec_core as osc
from onlinespec_core import decoding, fast
from onlinespec_core.models import set_fast
from tests.tiny import make_model

PROMPTS = ["d", "def add(a, b):", "Tom has 3 apples and buys 4 more. How many apples does he have?" * 2]
ARCHS = ["llama", "qwen2", "gpt2", "mistral", "gemma2", "phi3"]


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tokenizer):
    out = {}
    for arch in ARCHS:
        root = tmp_path_factory.mktemp(f"fast-{arch}")
        for role, hidden, layers, seed in (("target", 64, 2, 1), ("draft", 32, 1, 2)):
            m = make_model(arch, len(tokenizer), hidden=hidden, layers=layers, seed=seed)
            m.save_pretrained(root / role, safe_serialization=True)
            tokenizer.save_pretrained(root / role)
        out[arch] = (root / "target", root / "draft")
    return out


def plain_greedy(target_dir, ids, n, eos=None):
    """The reference: a fresh HF fp32 model, never touched by the fast path."""
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, eos_token_id=eos,
                         pad_token_id=2, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("use_fast", [True, False])
def test_greedy_equals_plain_hf_on_both_paths(family_dirs, arch, use_fast):
    t, d = family_dirs[arch]
    pair = osc.load_pair(target=str(t), draft=str(d), fast=use_fast)
    assert pair.fast == use_fast
    assert (fast.lean_of(pair.target) is not None) == (use_fast and arch in ("llama", "qwen2", "mistral"))
    for prompt in PROMPTS:
        ids = pair.tokenizer(prompt)["input_ids"]
        ref = plain_greedy(t, ids, 24)
        for k in (1, 3, 8):
            out = osc.Engine(pair, k=k).generate(ids, max_new_tokens=24)
            assert out.token_ids == ref, (arch, use_fast, prompt, k)
        assert osc.Engine(pair, k=0).generate(ids, 24, target_only=True).token_ids == ref


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_fast_eos_and_budget_mid_round(family_dirs, arch):
    t, _ = family_dirs[arch]
    pair = osc.load_pair(target=str(t), draft=str(t))  # target as its own draft: long rounds
    ids = pair.tokenizer("def add(a, b):")["input_ids"]
    ref = plain_greedy(t, ids, 40)
    eos = ref[9]
    pair.target.generation_config.eos_token_id = eos
    out = osc.Engine(pair, k=8).generate(ids, max_new_tokens=40)
    assert out.token_ids == ref[: ref.index(eos) + 1]
    pair.target.generation_config.eos_token_id = 1
    for n in (1, 5, 13):
        assert osc.Engine(pair, k=8).generate(ids, max_new_tokens=n).token_ids == ref[:n]


def test_kv_cache_crop_is_a_move_and_grows():
    c = fast.KVCache(n_layers=2, n_kv=1, head_dim=4, dtype=torch.float32, device=torch.device("cpu"),
                     capacity=4)
    for step in range(3):
        k = torch.full((1, 3, 4), float(step))
        c.reserve(c.length + 3)
        c.write(0, k, k)
        c.write(1, k, k)
        c.length += 3
    assert c.get_seq_length() == 9 and c.capacity >= 9  # grew past 4, kept what it held
    c.crop(-4)
    assert c.get_seq_length() == 5
    c.crop(7)  # a positive count keeps that many (never more than held)
    assert c.get_seq_length() == 5
    c.reserve(6)
    ks, _ = c.write(0, torch.full((1, 1, 4), 9.0), torch.zeros(1, 1, 4))
    assert ks.shape[1] == 6 and ks[0, :3].eq(0).all() and ks[0, 3:5].eq(1).all() and ks[0, 5].eq(9).all()


def test_lean_forward_matches_hf_logits_and_hidden(family_dirs):
    t, _ = family_dirs["qwen2"]  # q/k/v biases
    pair = osc.load_pair(target=str(t), draft=str(t))
    ref = AutoModelForCausalLM.from_pretrained(t, dtype=torch.float32).eval()
    ids = torch.tensor(pair.tokenizer(PROMPTS[2])["input_ids"])
    with torch.inference_mode():
        want = ref(input_ids=ids[None], output_hidden_states=True)
        cache = decoding.new_target_cache(pair.target)
        a, ha = decoding.target_forward(pair.target, ids[:-5], cache, 1, True)
        b, hb = decoding.target_forward(pair.target, ids[-5:], cache, 5, True)
    assert isinstance(cache, fast.KVCache)
    torch.testing.assert_close(torch.cat([a, b]), torch.cat([want.logits[0, -6:-5], want.logits[0, -5:]]),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat([ha, hb]), want.hidden_states[-1][0], atol=1e-4, rtol=1e-4)


def test_online_draft_fast_form_sees_every_update(family_dirs):
    t, d = family_dirs["llama"]
    pair = osc.load_pair(target=str(t), draft=str(d))
    draft = pair.draft
    assert draft.lean is not None
    opt = torch.optim.SGD(draft.module.parameters(), lr=0.5)
    ids = torch.tensor(pair.tokenizer("def add(a, b):")["input_ids"])
    for _ in range(2):
        loss = draft.model(input_ids=ids[None]).logits.square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.inference_mode():
            out = draft.model(input_ids=ids[None], output_hidden_states=True)
            got, hidden = draft.lean.forward(ids, draft.lean.new_cache(), 1, need_hidden=True)
        # the fp32 stack (packed copies of q|k|v, o, gate|up, down) sees the step exactly ...
        torch.testing.assert_close(hidden, out.hidden_states[-1][0], atol=1e-4, rtol=1e-4)
        # ... and the readout is lm_head(h) through the int8 kernel where it exists
        w = draft.model.get_output_embeddings().weight
        if fast.draft_kernels() is not None:
            want = fast.i8_reference(hidden[-1:], w.detach()).float()
        else:
            want = out.logits[0, -1:]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert (got[0] - out.logits[0, -1]).abs().max() < 0.05 * out.logits[0, -1].abs().max() + 1e-3


@pytest.mark.parametrize("updater", ["ogd", "optimistic", "ensemble"])
def test_online_updaters_reach_the_proposal_copies(family_dirs, updater):
    """Every updater's write (optimizer steps, optimistic's w = w^ - lr h, the ensemble's
    average) moves the weights' version counters, so the packed copies a proposal reads are
    re-made: after a run with updates the fast forward still equals HF on the live weights."""
    t, d = family_dirs["llama"]
    pair = osc.load_pair(target=str(t), draft=str(d))
    eng = osc.Engine(pair, k=3, updater=updater, updater_options={"every": 1, "batch": 1})
    eng.generate(PROMPTS[2], 24)
    assert eng.updater.snapshot().updates > 0
    draft, ids = pair.draft, torch.tensor(pair.tokenizer(PROMPTS[1])["input_ids"])
    with torch.inference_mode():
        out = draft.model(input_ids=ids[None], output_hidden_states=True)
        _, hidden = draft.lean.forward(ids, draft.lean.new_cache(), 1, need_hidden=True)
    torch.testing.assert_close(hidden, out.hidden_states[-1][0], atol=1e-4, rtol=1e-4)


def draft16_pair(family_dirs, tokenizer, tmp_path):
    """The llama target with a draft of head size 16 and two layers (the shared tiny drafts have
    head size 8, which the attention kernel does not take): (target dir, pair, lean, prompt ids)."""
    t, _ = family_dirs["llama"]
    d = tmp_path / "draft16"
    make_model("llama", len(tokenizer), hidden=64, layers=2, seed=3).save_pretrained(d)
    tokenizer.save_pretrained(d)
    pair = osc.load_pair(target=str(t), draft=str(d))
    return t, pair, pair.draft.lean, torch.tensor(pair.tokenizer(PROMPTS[2])["input_ids"])


@pytest.mark.skipif(fast.draft_kernels() is None, reason="no AVX-512 VNNI draft kernels here")
def test_fused_draft_step_equals_the_lean_forward(family_dirs, tokenizer, tmp_path):
    """One C call per drafted token computes what the lean forward on the copies computes: the
    same logits and K/V rows (train_logits later attends to those) up to the last bit. Head size 16, two
    layers (the shared tiny drafts have head size 8, which the attention kernel does not take)."""
    t, pair, lean, ids = draft16_pair(family_dirs, tokenizer, tmp_path)
    with torch.inference_mode():
        a, b = lean.new_cache(), lean.new_cache()
        lean.forward(ids[:10], a, 1)
        lean.forward(ids[:10], b, 1)
        assert lean.sync_mirrors()
        for i in range(10, 20):
            want = lean.forward(ids[i:i + 1], a, 1)[0][-1]
            got = lean.draft_step(int(ids[i]), b)
            assert got is not None
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert a.length == b.length == 20
        for li in range(len(lean.layers)):
            # the same kernels; only silu(g) u is C's expf, not torch's (a last-bit difference)
            torch.testing.assert_close(a.k[li][:, :20], b.k[li][:, :20], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(a.v[li][:, :20], b.v[li][:, :20], atol=1e-6, rtol=1e-6)
    eng = osc.Engine(pair, k=4)
    ref = plain_greedy(t, ids.tolist(), 16)
    assert eng.generate(ids.tolist(), 16).token_ids == ref


def test_set_fast_off_restores_plain_hf_modules(family_dirs):
    t, d = family_dirs["gpt2"]  # generic path: Conv1D / Linear forwards replaced in place
    pair = osc.load_pair(target=str(t), draft=str(d))
    assert pair.fast and fast.is_fast(pair.target)
    assert any("forward" in vars(m) for m in pair.target.modules())
    assert set_fast(pair, False) is False
    assert not fast.is_fast(pair.target) and not any("forward" in vars(m) for m in pair.target.modules())
    ids = pair.tokenizer("def add(a, b):")["input_ids"]
    assert osc.Engine(pair, k=3).generate(ids, 20).token_ids == plain_greedy(t, ids, 20)


def test_online_step_reads_the_proposal_cache_not_the_context(family_dirs):
    """train_logits on the fast path feeds only the drafted positions (context K/V from the
    proposal's cache) and gives the same logits as re-reading the context tail."""
    t, d = family_dirs["llama"]
    pair = osc.load_pair(target=str(t), draft=str(d))
    eng = osc.Engine(pair, k=4, keep_distributions=True)
    rounds = [r for r in eng.generate("def add(a, b): return", 24).rounds if r.k > 0]
    draft = pair.draft
    last = rounds[-1]
    assert draft._cached_context(last)
    fast_logits = draft.train_logits(last)
    draft.reuse_cache = False
    slow_logits = draft.train_logits(last)
    torch.testing.assert_close(fast_logits, slow_logits, atol=1e-4, rtol=1e-4)
    assert fast_logits.requires_grad
    draft.reuse_cache = True
    with torch.no_grad():  # any weight write makes the cached K/V stale: the tail's K/V are
        next(draft.module.parameters()).mul_(1.01)  # recomputed (no grad) under the new weights
    assert not draft._cached_context(last) and draft._context_state(last) == "stale"
    stale = draft.train_logits(last)
    draft.reuse_cache = False
    torch.testing.assert_close(stale, draft.train_logits(last), atol=1e-4, rtol=1e-4)
    assert stale.requires_grad
    for r in rounds[:3]:  # every earlier round of the sequence too
        draft.reuse_cache = True
        a = draft.train_logits(r)
        draft.reuse_cache = False
        torch.testing.assert_close(a, draft.train_logits(r), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cost_table_measures_both_paths(family_dirs, arch):
    from onlinespec_core.costs import cost_table, format_cost_table
    t, d = family_dirs[arch]
    pair = osc.load_pair(target=str(t), draft=str(d))
    prompts = [pair.tokenizer(p)["input_ids"] for p in PROMPTS[1:]]
    table = cost_table(pair, prompts, k=3, reps=1, max_new_tokens=8, update_rows=(8,))
    for path in ("fast", "hf"):
        m = table[path]
        assert all(m[f"t{n}_ms"] > 0 for n in (1, 2, 5, 9)) and m["v1"] == 1.0
        assert m["draft_step_ms"] > 0 and m["update8_ms"] > 0 and m["update8_rows"] >= 8
        assert m["break_even_tau"] == pytest.approx(m["round_ms"] / m["ar_ms_per_token"])
    assert table["hf_generate_tok_s"] > 0 and set(table["ratios"]) >= {"ar_fast_vs_hf_generate", "v5_fast_vs_hf_step"}
    assert pair.fast  # the pair is left on the path it was on
    text = format_cost_table(table)
    assert "break-even tau" in text and "fast" in text and "hf" in text


def test_bench_cli_no_fast_and_costs_only(family_dirs, capsys):
    from onlinespec_core import bench
    t, d = family_dirs["llama"]
    assert bench.main(["--pair", str(t), "--draft", str(d), "--stream", str(_stream(t)), "--k", "2",
                       "--max-new-tokens", "6", "--costs", "only", "--cost-reps", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "break-even tau" in out and "| fast | hf" in out
    args = bench.build_argparser().parse_args(["--no-fast"])
    assert args.fast is False
    from onlinespec_core.runner import load_pair_from_args
    args = bench.build_argparser().parse_args(["--pair", str(t), "--draft", str(d), "--no-fast"])
    assert load_pair_from_args(args).fast is False


def _stream(root):
    import json
    p = root.parent / "stream.jsonl"
    p.write_text("\n".join(json.dumps({"topic": tp, "prompt": pr}) for tp, pr in
                           (("code", "def add(a, b):"), ("math", "Tom has 3 apples")) * 2) + "\n")
    return p


@pytest.mark.parametrize("kind", ["eagle", "hydra"])
def test_feature_heads_fast_lm_head_and_reduced_vocab_stay_lossless(family_dirs, tmp_path, kind):
    """Eagle/Hydra read tokens through the target's fast lm_head; with a reduced draft vocabulary
    (N most frequent ids) they never propose outside it, greedy output is still the target's,
    and the vocabulary survives save/load."""
    from onlinespec_core.drafts.features import top_tokens
    from onlinespec_core.training import warm_up
    t, _ = family_dirs["llama"]
    pair = osc.load_pair(target=str(t), draft=None, draft_kind=kind)
    data = torch.tensor(pair.tokenizer(" ".join(PROMPTS) * 8)["input_ids"])
    warm_up(pair, data, steps=30, batch_size=2, seq_len=16)
    ids = pair.tokenizer(PROMPTS[1])["input_ids"]
    ref = plain_greedy(t, ids, 20)
    assert osc.Engine(pair, k=3).generate(ids, 20).token_ids == ref
    vocab = top_tokens(data, 40, pair.target.config.vocab_size, tuple(pair.eos_ids))
    pair.draft.set_vocab(vocab)
    out = osc.Engine(pair, k=3).generate(ids, 20)
    assert out.token_ids == ref
    allowed = set(vocab.tolist())
    assert all(x in allowed for r in out.rounds for x in r.drafted)
    pair.draft.save(tmp_path / "head")
    again = osc.load_pair(target=str(t), draft=str(tmp_path / "head"), draft_kind=kind)
    assert again.draft.vocab_ids == sorted(allowed)
    assert osc.Engine(again, k=3).generate(ids, 20).token_ids == ref
    eng = osc.Engine(again, k=3, updater="ogd")  # the online losses drop the columns outside it
    eng.generate(ids, 20)
    assert eng.updater.stats()["updates"] >= 1 and eng.updater.stats()["skipped"] == 0


DEMO = __import__("pathlib").Path(__file__).resolve().parent.parent / "assets"


@pytest.mark.skipif(not (DEMO / "models" / "demo" / "target" / "model.safetensors").exists(),
                    reason="demo pair absent")
def test_demo_pair_fast_path_equals_plain_hf_on_held_out_prompts():
    """The shipped pair on the fast path (lean target + lean draft) reproduces plain HF fp32
    greedy decoding on held-out prompts of every topic (one per topic, 40 tokens, k = 4)."""
    from onlinespec_core.streams import load_stream
    pair = osc.load_pair("demo")
    assert pair.fast and fast.lean_of(pair.target) is not None and pair.draft.lean is not None
    seen: dict = {}
    for item in load_stream("shift"):
        seen.setdefault(item.topic, item.prompt)
    ref_model = AutoModelForCausalLM.from_pretrained(DEMO / "models" / "demo" / "target",
                                                     dtype=torch.float32).eval()
    eng = osc.Engine(pair, k=4)
    for topic, prompt in seen.items():
        ids = pair.tokenizer(prompt)["input_ids"]
        ref = ref_model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=40,
                                 pad_token_id=pair.tokenizer.pad_token_id or 0,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
        assert eng.generate(ids, 40).token_ids == ref, topic


def test_tied_draft_training_form_gives_the_dense_gradient(tokenizer):
    """Tied embeddings: the training form's sparse embedding grad plus the lm_head's dense one
    equals the all-dense gradient."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    lean = fast.LeanLM(model, frozen=False)
    assert lean.tied
    ids = torch.tensor(tokenizer("def add(a, b): return a + b")["input_ids"])
    with torch.inference_mode():
        cache = lean.new_cache()
        lean.forward(ids[:-4], cache)
    grads = []
    for tied in (True, False):
        lean.tied = tied
        loss = lean.forward_after(ids[-5:], cache, ids.numel() - 5).log_softmax(-1)[:, 7].sum()
        grads.append(torch.autograd.grad(loss, [model.get_output_embeddings().weight])[0])
    assert not grads[0].is_sparse
    torch.testing.assert_close(grads[0], grads[1])


def test_stale_context_read_keeps_absolute_positions(family_dirs):
    """A context tail that starts mid-sequence (feedback_window < context) is re-read at its
    own positions: the same logits as HF's re-read with position_ids."""
    t, d = family_dirs["llama"]
    pair = osc.load_pair(target=str(t), draft=str(d))
    eng = osc.Engine(pair, k=3, keep_distributions=True, feedback_window=6)
    rounds = [r for r in eng.generate(PROMPTS[2], 20).rounds if r.k > 0]
    draft = pair.draft
    with torch.no_grad():  # weights changed since the proposal: the stale-tail read
        next(draft.module.parameters()).mul_(1.01)
    for r in rounds[-3:]:
        assert r.context_len - r.context_tail.numel() > 0 and draft._context_state(r) == "stale"
        a = draft.train_logits(r)
        draft.reuse_cache = False
        torch.testing.assert_close(a, draft.train_logits(r), atol=1e-4, rtol=1e-4)
        draft.reuse_cache = True


needs_kernels = pytest.mark.skipif(fast.kernels() is None,
                                   reason="no compiled kernels here (no AVX-512 or no C++ compiler)")


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 9, 12, 13, 16])
def test_few_row_gemm_matches_fp64(rows):
    """The compiled GEMM (blocked weight, odd N and K, bias) against an fp64 reference, at the
    error size of MKL's fp32 GEMMs (F.linear, as HF runs it, and x @ W^T)."""
    g = torch.Generator().manual_seed(rows)
    for n, k in ((640, 384), (100, 33), (7, 1152)):
        w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
        lin = fast.PackedLinear(w, b)
        assert lin.kernel is not None and lin._wt is None  # no W^T copy while the kernel serves
        x = torch.randn(rows, k, generator=g)
        ref = x.double() @ w.double().t() + b.double()
        err = (lin(x).double() - ref).abs().max()
        hf = (torch.nn.functional.linear(x, w, b).double() - ref).abs().max()  # what HF runs
        mkl = ((x @ w.t().contiguous() + b).double() - ref).abs().max()  # MKL, W^T as B
        assert err <= 3 * max(hf, mkl) + 1e-6
        assert lin(x[None]).shape == (1, rows, n)  # HF's [1, n, H] activations
    x.requires_grad_(True)
    assert lin(x).requires_grad  # grad: the torch path


@pytest.mark.skipif(fast.draft_kernels() is None, reason="no AVX-512 VNNI draft kernels here")
@pytest.mark.parametrize("rows", [1, 5, 7, 16])
def test_draft_readout_kernel_is_the_int8_form_and_follows_the_weight(rows):
    """The lm draft's readout = the int8 form (per-row scales for W, a per-call scale for x, exact
    integer sums; odd N and K), near F.linear, and its copy is re-made from the live weight."""
    g = torch.Generator().manual_seed(rows)
    for n, k in ((8192, 128), (100, 33)):
        lin = torch.nn.Linear(k, n)
        ro = fast.DraftReadout(lin, fast._Mirrors())
        x = torch.randn(rows, k, generator=g)
        for _ in range(2):
            ro.pack()
            ro.mirrors.on = True
            with torch.no_grad():
                got = ro(x)
            ro.mirrors.on = False
            ref = fast.i8_reference(x, lin.weight.detach(), lin.bias.detach())
            assert (got.double() - ref).abs().max() < 1e-4
            assert torch.allclose(got, ro(x), atol=0.05 * float(ref.abs().max()))  # near the fp32 F.linear
            with torch.no_grad():
                lin.weight.mul_(-2.0)
    # a NaN/inf input row or weight row comes out NaN (a NaN draft must surface, as with F.linear)
    ks, w = fast.draft_kernels(), torch.randn(70, 33)
    x = torch.randn(2, 33)
    x[1, 3] = float("nan")
    y = fast._gemm_i8(ks, x, fast.pack_i8(ks, w), None)
    assert not torch.isnan(y[0]).any() and torch.isnan(y[1]).all()
    w[5, 2] = float("inf")
    assert torch.isnan(fast._gemm_i8(ks, x[:1], fast.pack_i8(ks, w), None)[0]).nonzero().flatten().tolist() == [5]


@needs_kernels
@pytest.mark.parametrize("start,n", [(0, 1), (0, 6), (63, 1), (64, 5), (150, 9), (10, 16)])
def test_kernel_attention_matches_sdpa(start, n):
    g = torch.Generator().manual_seed(start + n)
    hq, hkv, d, cap = 6, 2, 64, 256
    kc, vc = torch.randn(hkv, cap, d, generator=g), torch.randn(hkv, cap, d, generator=g)
    kb = kc.view(hkv, cap // 64, 64, d).transpose(2, 3).contiguous()
    q = torch.randn(hq, n, d, generator=g) * 4  # peaked weights: many tiny exp() terms
    L = start + n
    mask = torch.ones(n, L, dtype=torch.bool).tril(diagonal=start)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[None].double(), kc[None, :, :L].double(), vc[None, :, :L].double(), attn_mask=mask,
        scale=d ** -0.5, enable_gqa=True)[0].transpose(0, 1).reshape(n, -1)
    out = fast._attn_k(fast.kernels(), q, kb, vc, start, d ** -0.5)
    assert (out.double() - ref).abs().max() < 1e-5


@needs_kernels
def test_kernel_path_and_torch_path_agree_and_both_equal_hf(family_dirs, tokenizer, monkeypatch):
    """Greedy output with the compiled kernels equals plain HF, and so does the fast path with
    them off (the fallback every machine without AVX-512 or a compiler runs); the blocked-K
    cache stays in step across crops and growth (a prompt past the initial capacity)."""
    t, d = family_dirs["llama"]
    ids = tokenizer(PROMPTS[2] * 4)["input_ids"]
    ref = plain_greedy(t, ids, 24)
    pair = osc.load_pair(target=str(t), draft=str(d))
    lean = fast.lean_of(pair.target)
    assert lean.layers[0].qkv[0].kernel is not None
    assert osc.Engine(pair, k=3).generate(ids, 24).token_ids == ref
    state_cache = lean.new_cache(capacity=8)
    with torch.inference_mode():
        lean.forward(torch.tensor(ids), state_cache, 1)
    assert state_cache.kb_ok and state_cache.kb[0].shape[1] * 64 >= len(ids)
    monkeypatch.setattr(fast, "_gemm_lib", [None])  # as if nothing compiled
    pair2 = osc.load_pair(target=str(t), draft=str(d))
    assert fast.lean_of(pair2.target).layers[0].qkv[0].kernel is None
    assert osc.Engine(pair2, k=3).generate(ids, 24).token_ids == ref


@pytest.mark.parametrize("head_dim", [8, 48, 64])
def test_lean_forward_any_head_dim_matches_hf(tokenizer, head_dim):
    """Head sizes the attention kernel does not take (8, 48) run SDPA on the same cache; every
    size matches HF's logits, a prompt then 1 and 5 new tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=2 * head_dim, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      head_dim=head_dim, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    lean = fast.LeanLM(model, frozen=True)
    ids = torch.tensor(tokenizer(PROMPTS[2])["input_ids"])
    with torch.inference_mode():
        want = model(input_ids=ids[None]).logits[0]
        cache = lean.new_cache()
        got = [lean.forward(ids[:-6], cache, 1)[0], lean.forward(ids[-6:-5], cache, 1)[0],
               lean.forward(ids[-5:], cache, 5)[0]]
    torch.testing.assert_close(torch.cat(got), want[-7:], atol=1e-4, rtol=1e-4)


@needs_kernels
def test_online_loss_kernel_matches_the_torch_divergence():
    """fast.kl_rows (the per-round online loss every updater reports) = updaters.losses'
    forward KL, with -inf draft columns left out and NaN kept visible."""
    from onlinespec_core.updaters.losses import distill_rows
    g = torch.Generator().manual_seed(0)
    for v in (8192, 100, 37):
        d, t = torch.randn(3, v, generator=g) * 3, torch.randn(3, v, generator=g) * 3
        torch.testing.assert_close(fast.kl_rows(d, t), distill_rows(d, t), atol=1e-5, rtol=1e-5)
        d[:, 5:20] = float("-inf")  # a reduced vocabulary / pad_vocab
        torch.testing.assert_close(fast.kl_rows(d, t), distill_rows(d, t), atol=1e-5, rtol=1e-5)
        d[1, 0] = float("nan")
        got = fast.kl_rows(d, t)
        assert torch.isnan(got[1]) and not torch.isnan(got[0]) and not torch.isnan(got[2])


@needs_kernels
def test_training_kl_kernel_gives_torchs_loss_and_gradient():
    """fast.kl_rows_grad (the default fkl training loss) = the torch divergence in value and in
    gradient (q - p), -inf draft columns getting none; NaN still reaches the guard."""
    import torch.nn.functional as F
    from onlinespec_core.updaters.losses import _finite_columns
    g = torch.Generator().manual_seed(1)
    for v in (8192, 100, 37):
        base, t = torch.randn(4, v, generator=g) * 3, torch.randn(4, v, generator=g) * 3
        base[:, 3:9] = float("-inf")
        w = torch.rand(4, generator=g)
        a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
        got = fast.kl_rows_grad(a, t)
        (got * w).sum().backward()
        dd, tt = _finite_columns(b, t)
        want = F.kl_div(F.log_softmax(dd, -1), F.log_softmax(tt, -1), reduction="none", log_target=True).sum(-1)
        (want * w).sum().backward()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.grad, b.grad, atol=1e-7, rtol=1e-5)
        assert torch.all(a.grad[:, 3:9] == 0)
        nan = base.clone()
        nan[2, 0] = float("nan")
        out = fast.kl_rows_grad(nan.requires_grad_(), t)
        assert torch.isnan(out[2]) and torch.isfinite(out[[0, 1, 3]]).all()


@pytest.mark.skipif(fast.draft_kernels() is None, reason="no AVX-512 VNNI draft kernels here")
def test_fused_proposal_equals_the_token_by_token_one(family_dirs, tokenizer, tmp_path):
    """LeanLM.draft_steps (a greedy proposal with the per-call work done once) drafts the same
    tokens with the same logits, bit for bit, and leaves the same cache, as draft_step token by
    token with greedy in between; pending runs of 1-4 tokens."""
    from onlinespec_core.sampling import greedy
    t, pair, lean, ids = draft16_pair(family_dirs, tokenizer, tmp_path)
    with torch.inference_mode():
        for pend in (1, 2, 4):
            a, b = lean.new_cache(), lean.new_cache()
            lean.forward(ids[:8], a, 1)
            lean.forward(ids[:8], b, 1)
            assert lean.sync_mirrors()
            toks = ids[8:8 + pend].tolist()
            got = lean.draft_steps(toks, b, 5)
            assert got is not None
            want_t, want_l = [], []
            for tok in toks:
                last = lean.draft_step(int(tok), a)
            for _ in range(5):
                x = int(greedy(last))
                want_t.append(x)
                want_l.append(last)
                if len(want_t) < 5:
                    last = lean.draft_step(x, a)
            assert got[0] == want_t
            assert torch.equal(got[1], torch.stack(want_l))
            assert a.length == b.length
            for li in range(len(lean.layers)):
                assert torch.equal(a.k[li][:, :a.length], b.k[li][:, :b.length])
