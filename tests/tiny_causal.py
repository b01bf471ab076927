"""Tiny random Hugging Face causal LMs written to disk, as a user's checkpoints would be: one
builder for the parity, pair, subset and loading tests of model/causal_lm.py."""

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, OPTConfig,
                          OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM)

VOCAB = 97
# kind -> (config class, model class, the config's sizes beside the common ones)
KINDS = {
    "opt": (OPTConfig, OPTForCausalLM, dict(ffn_dim=48, max_position_embeddings=160, dropout=0.0)),
    "llama": (LlamaConfig, LlamaForCausalLM, dict(intermediate_size=40, max_position_embeddings=256)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(intermediate_size=40, max_position_embeddings=256)),
    "mistral": (MistralConfig, MistralForCausalLM, dict(intermediate_size=40, max_position_embeddings=256,
                                                        sliding_window=None, head_dim=None)),
}


def save_tiny_causal(path, kind: str = "llama", *, hidden: int = 32, layers: int = 2, heads: int = 4,
                     tie: bool = True, seed: int = 0, max_shard_size: str | None = None, vocab: int = VOCAB,
                     **extra):
    """Write a random `kind` model (opt, llama, qwen2, mistral) to `path`; returns it, in eval mode."""
    config_cls, model_cls, sizes = KINDS[kind]
    if kind != "opt":  # Qwen2 and Mistral default to 32 and 8 key/value heads: more than these models' heads
        extra.setdefault("num_key_value_heads", heads)
    torch.manual_seed(seed)
    config = config_cls(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        tie_word_embeddings=tie, pad_token_id=1, bos_token_id=2, eos_token_id=2, **{**sizes, **extra})
    model = model_cls(config).eval()
    with torch.no_grad():  # random, non-trivial values everywhere (HF initialises biases to 0, norms to 1)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return model
