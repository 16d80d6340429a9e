"""Tiny random models and a small byte-level BPE tokenizer for tests (no downloads)."""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

TEXT = """def add(a, b):\n    return a + b\nSELECT name FROM users WHERE age > 30;\n
Tom has 3 apples and buys 4 more. How many apples does he have? 3 + 4 = 7.\n
The licensee shall not distribute the work without permission of the copyright holder.\n
""" * 20


def build_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def make_model(arch: str, vocab: int, hidden: int = 64, layers: int = 2, seed: int = 0,
               eos_token_id: int = 1):
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=eos_token_id, pad_token_id=2)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          **common)
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          **common)
        model = Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, **common)
        model = GPT2LMHeadModel(cfg)
    elif arch == "gemma2":  # alternating sliding-window (8 tokens) and full-attention layers
        from transformers import Gemma2Config, Gemma2ForCausalLM
        cfg = Gemma2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                           sliding_window=8, max_position_embeddings=512, **common)
        model = Gemma2ForCausalLM(cfg)
    elif arch == "mistral":
        from transformers import MistralConfig, MistralForCausalLM
        cfg = MistralConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            sliding_window=None, **common)
        model = MistralForCausalLM(cfg)
    elif arch == "phi3":
        from transformers import Phi3Config, Phi3ForCausalLM
        cfg = Phi3Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         **common)
        model = Phi3ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    # sharpen the random init a little so greedy paths are not all near-ties
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(4.0)
    return model.eval()


def far_pair_dirs(root: Path, tokenizer: PreTrainedTokenizerFast) -> tuple[str, str]:
    """A tiny random llama target and a draft with unrelated random weights (the draft starts
    far away), written to root/target and root/draft."""
    out = []
    for role, kw in (("target", dict(hidden=64, layers=2, seed=21)), ("draft", dict(hidden=32, layers=1, seed=22))):
        m = make_model("llama", len(tokenizer), **kw)
        m.save_pretrained(root / role)
        tokenizer.save_pretrained(root / role)
        out.append(str(root / role))
    return out[0], out[1]
