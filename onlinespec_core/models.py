"""Load a target/draft pair: local dirs or hub ids, tokenizer check, the embedded demo pair."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .drafts.base import Draft
from .errors import OnlineSpecError

from .paths import DEMO_DIR

# draft kind -> "module:loader"; loader(target, path_or_None, tokenizer, device, dtype, **kw) -> Draft
DRAFT_LOADERS: dict[str, str] = {
    "lm": "lm:load_lm_draft",
    "eagle": "eagle:load_eagle_draft",
    "hydra": "hydra:load_hydra_draft",
    "ngram": "ngram:load_ngram_draft",
}


@dataclass
class ModelPair:
    target: PreTrainedModel
    draft: Draft | None
    tokenizer: Any
    name: str = "custom"
    draft_kind: str = "lm"
    target_source: str | None = None
    draft_source: str | None = None
    fast: bool = False  # the fast decode path is attached (models.set_fast)

    @property
    def device(self) -> torch.device:
        return self.target.get_input_embeddings().weight.device

    @property
    def eos_ids(self) -> set[int]:
        eos = self.target.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return set()
        return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float64": torch.float64}
    if dtype not in table:
        raise OnlineSpecError(f"unknown dtype {dtype!r}; use one of {', '.join(table)} or 'auto'")
    return table[dtype]


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~", "/"))


def check_source(source: str | os.PathLike, role: str) -> str:
    """A local directory with config.json, or a hub id (only reachable when online)."""
    s = str(source)
    p = Path(s).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise OnlineSpecError(
                f"{role} directory {s!r} has no config.json; point to a Hugging Face model directory "
                "(the folder save_pretrained wrote) or a hub id such as 'Qwen/Qwen2.5-0.5B-Instruct'")
        return str(p)
    if _looks_like_hub_id(s):
        return s
    raise OnlineSpecError(
        f"{role} model path {s!r} does not exist; pass an existing model directory "
        f"(containing config.json and *.safetensors), a hub id when online, or 'demo' for the embedded pair")


def load_causal_lm(source: str, role: str, device: str | torch.device = "cpu", dtype: Any = "float32",
                   device_map: Any = None, trust_remote_code: bool = False) -> PreTrainedModel:
    src = check_source(source, role)
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except Exception as e:  # hub id while offline, unreadable config, remote code needed ...
        raise OnlineSpecError(
            f"could not read the {role} config from {source!r} ({type(e).__name__}: {str(e)[:200]}); "
            "check the path, connect to the hub for hub ids, or pass trust_remote_code=True "
            "only if you trust the model's own code") from e
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    remote = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote:
        raise OnlineSpecError(
            f"{role} {source!r} is a {config.model_type!r} model, not a causal language model; "
            "pick a decoder-only model that AutoModelForCausalLM can load (Llama, Qwen2, GPT-2, ...)")
    arch = [a for a in (getattr(config, "architectures", None) or []) if isinstance(a, str)]
    mapped = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, ())
    causal_classes = {mapped} if isinstance(mapped, str) else set(mapped)  # e.g. *ForConditionalGeneration
    if not remote and (
            (arch and not any(a.endswith(("ForCausalLM", "LMHeadModel")) or a in causal_classes for a in arch))
            or (not arch and config.model_type in ENCODER_TYPES and not getattr(config, "is_decoder", False))):
        raise OnlineSpecError(
            f"{role} {source!r} is a {config.model_type!r} model saved as {', '.join(arch) or 'an encoder'}, "
            "not a causal language model (its head would be random); pick a decoder-only model "
            "(Llama, Qwen2, GPT-2, ...)")
    kw: dict[str, Any] = {"dtype": parse_dtype(dtype), "trust_remote_code": trust_remote_code,
                          "use_safetensors": True, "output_loading_info": True}
    if device_map is not None:
        kw["device_map"] = device_map  # accelerate places the layers (targets larger than one device)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(src, **kw)
    except OnlineSpecError:
        raise
    except ValueError as e:
        if "Unrecognized configuration" in str(e) or "AutoModelForCausalLM" in str(e):
            raise OnlineSpecError(
                f"{role} {source!r} ({config.model_type}) is not a causal language model; "
                "pick a model that AutoModelForCausalLM can load (decoder-only LM)") from e
        raise OnlineSpecError(f"could not load the {role} from {source!r}: {e}") from e
    except OSError as e:
        raise OnlineSpecError(
            f"could not load the {role} weights from {source!r} ({str(e)[:200]}); the directory needs "
            "*.safetensors weights (pickled .bin weights are refused for safety)") from e
    except Exception as e:  # SafetensorError (truncated/empty file), size mismatch (RuntimeError), ...
        msg = str(e)
        why = ("the weights do not match the shapes in config.json" if "mismatch" in msg.lower()
               else "a *.safetensors file is truncated, empty or corrupt" if "safetensor" in
               (type(e).__name__ + msg).lower() or "header" in msg.lower() else "the files are unreadable")
        raise OnlineSpecError(
            f"could not load the {role} weights from {source!r}: {why} ({type(e).__name__}: {msg[:200]}); "
            "re-download or re-save the model (model.save_pretrained(dir)) with config and weights "
            "from the same model") from e
    missing = list((info or {}).get("missing_keys") or [])
    if missing:
        raise OnlineSpecError(
            f"the {role} weights in {source!r} lack {len(missing)} tensor(s) the config needs (e.g. "
            f"{sorted(missing)[:3]}), so they would be random; use weights saved with this config")
    if device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def load_tokenizer(source: str, trust_remote_code: bool = False):
    try:
        return AutoTokenizer.from_pretrained(check_source(source, "tokenizer"),
                                             trust_remote_code=trust_remote_code)
    except OnlineSpecError:
        raise
    except Exception as e:
        raise OnlineSpecError(
            f"could not load a tokenizer from {source!r} ({type(e).__name__}: {str(e)[:200]}); "
            "save the tokenizer next to the model with tokenizer.save_pretrained(dir)") from e


def check_tokenizers(target_tok, draft_tok) -> None:
    """Same strings must map to the same ids, or verification compares different tokens."""
    tv, dv = target_tok.get_vocab(), draft_tok.get_vocab()
    t_by_id = {i: s for s, i in tv.items()}
    d_by_id = {i: s for s, i in dv.items()}
    for i in sorted(set(t_by_id) | set(d_by_id)):
        a, b = t_by_id.get(i), d_by_id.get(i)
        if a != b:
            raise OnlineSpecError(
                f"draft and target tokenizers differ: id {i} is {a!r} for the target but {b!r} for "
                "the draft; use a draft that shares the target's tokenizer (same vocabulary and ids)")
    a, b = _backend_model(target_tok), _backend_model(draft_tok)
    if a is not None and b is not None and a != b:
        raise OnlineSpecError(
            "draft and target tokenizers differ in their merges or normalisation (same vocabulary, "
            "different tokenizer.json model); use a draft that shares the target's tokenizer")
    if any(target_tok.encode(p) != draft_tok.encode(p) for p in PROBES):
        raise OnlineSpecError(
            "draft and target tokenizers split the same text differently (same vocabulary, different "
            "merges or normalisation); use a draft that shares the target's tokenizer")


ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "electra", "ernie",
                 "data2vec-text", "roformer", "megatron-bert", "rembert", "xmod", "big_bird", "bert-generation"}
PROBES = ("Hello, world! def f(x): return x ** 2  # 3.14 SELECT * FROM t;",
          "The quick brown fox jumps over the lazy dog. 0123456789",
          "  leading spaces\ttabs\nnew lines\r\n\u00e9\u00e8 \u4e2d\u6587 \U0001f600 emoji",
          "def add(a, b):\n    return a + b\nSELECT name FROM users WHERE age > 30;",
          "Tom has 3 apples and buys 4 more. The licensee shall not distribute the work.")


def _backend_model(tok: Any) -> Any:
    """The tokenizer.json model section (vocab + merges) of a fast tokenizer, else None."""
    try:
        import json
        return json.loads(tok.backend_tokenizer.to_str()).get("model")
    except Exception:
        return None


def make_draft(kind: str, target: PreTrainedModel, source: Any, tokenizer: Any,
               device: Any = "cpu", dtype: Any = "float32", **kw: Any) -> Draft:
    if kind not in DRAFT_LOADERS:
        raise OnlineSpecError(f"unknown draft_kind {kind!r}; choose one of {', '.join(DRAFT_LOADERS)}")
    module, fn = DRAFT_LOADERS[kind].split(":")
    try:
        loader = getattr(importlib.import_module(f".drafts.{module}", __package__), fn)
    except (ImportError, AttributeError) as e:
        raise OnlineSpecError(f"draft kind {kind!r} is not available in this build ({e})") from e
    return loader(target, source, tokenizer, device=device, dtype=dtype, **kw)


def _check_draft(draft: Any, target: PreTrainedModel, tokenizer: Any) -> None:
    """A draft must embed every token the pair uses and start from finite weights."""
    module = getattr(draft, "module", None)
    if getattr(draft, "kind", None) == "lm" and hasattr(module, "get_input_embeddings"):
        n = module.get_input_embeddings().num_embeddings
        need = min(len(tokenizer), target.config.vocab_size)
        if n < need:
            raise OnlineSpecError(
                f"the draft's vocabulary has {n} tokens, fewer than the {need} of the target/tokenizer; "
                "use a draft with the target's vocabulary (same tokenizer and embedding size)")
    if isinstance(module, torch.nn.Module):
        for name, p in module.named_parameters():
            if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                raise OnlineSpecError(
                    f"the draft's weights contain NaN or inf ({name}); re-save or re-train the draft")


def load_pair(target: Any = None, draft: Any = None, draft_kind: str = "lm",
              device: str | torch.device = "cpu", dtype: Any = "float32", device_map: Any = None,
              trust_remote_code: bool = False, tokenizer: Any = None, fast: bool | None = None,
              **draft_options: Any) -> ModelPair:
    """Load a target and a draft that share a tokenizer.

    fast: the fast decode path (onlinespec_core.fast); None = on for a CPU pair, False = plain HF.

    load_pair("demo") gives the embedded demo pair (offline). target/draft may be directories,
    hub ids, or already-built PreTrainedModel objects (then pass tokenizer=).
    """
    name = "custom"
    if target == "demo":
        name = "demo"
        if not (DEMO_DIR / "target" / "config.json").is_file():
            raise OnlineSpecError(
                f"the demo pair is missing under {DEMO_DIR}; run `onlinespec train-demo` to build it "
                "or use a checkout that includes assets/models/demo")
        target = str(DEMO_DIR / "target")
        if draft is None:
            cand = DEMO_DIR / ("draft" if draft_kind == "lm" else draft_kind)
            draft = str(cand) if cand.is_dir() else None
    if target is None:
        raise OnlineSpecError("no target given; pass target='dir-or-hub-id' or load_pair('demo')")
    if isinstance(target, PreTrainedModel):
        if tokenizer is None:
            raise OnlineSpecError("a target model object needs tokenizer= as well")
        target_model = target.to(device).eval().requires_grad_(False)
        target_source = None
    else:
        target_source = str(target)
        target_model = load_causal_lm(target_source, "target", device, dtype, device_map, trust_remote_code)
        tokenizer = tokenizer or load_tokenizer(target_source, trust_remote_code)
    if draft_kind == "lm" and draft is None:
        raise OnlineSpecError("draft_kind='lm' needs a draft model: pass draft='dir-or-hub-id'")
    if draft_kind == "lm" and isinstance(draft, (str, os.PathLike)):
        dsrc = check_source(draft, "draft")
        if (Path(dsrc) / "tokenizer_config.json").is_file() or _looks_like_hub_id(dsrc):
            check_tokenizers(tokenizer, load_tokenizer(dsrc, trust_remote_code))
    draft_obj = make_draft(draft_kind, target_model, draft, tokenizer, device=device if device_map is None
                           else target_model.get_input_embeddings().weight.device, dtype=dtype,
                           trust_remote_code=trust_remote_code, **draft_options)
    _check_draft(draft_obj, target_model, tokenizer)
    pair = ModelPair(target_model, draft_obj, tokenizer, name=name, draft_kind=draft_kind,
                     target_source=target_source, draft_source=None if draft is None or
                     isinstance(draft, torch.nn.Module) else str(draft))
    set_fast(pair, device_map is None if fast is None else fast)
    return pair


def set_fast(pair: ModelPair, on: bool) -> bool:
    """Switch the pair between the fast decode path (CPU only) and plain HF; returns the state.
    Takes effect at the next prompt (caches are built per prompt)."""
    from . import fast as fastpath
    on = bool(on) and fastpath.fast_supported(pair.target)
    for model, frozen in ((pair.target, True), (getattr(pair.draft, "model", None), False)):
        if model is None or (model is not pair.target and getattr(pair.draft, "kind", None) != "lm"):
            continue
        if on:
            fastpath.enable(model, frozen)
        else:
            fastpath.disable(model)
    if pair.draft is not None:
        pair.draft.reset()
    pair.fast = on
    return on
