"""Rotary position embeddings against transformers' Llama functions: the frequencies of each
RoPE kind, and the rotation."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from zotune.layers.rope import apply_rotary, inverse_frequencies, rotary_tables

SCALINGS = [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
]


def _config(scaling):
    return LlamaConfig(hidden_size=256, num_attention_heads=4, rope_parameters=scaling, max_position_embeddings=2048)


@pytest.mark.parametrize("scaling", SCALINGS, ids=[s["rope_type"] for s in SCALINGS])
def test_inverse_frequencies_match_transformers(scaling):
    if scaling["rope_type"] == "default":
        want = LlamaRotaryEmbedding(_config(scaling)).inv_freq
    else:
        want, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](_config(scaling), "cpu")
    got = inverse_frequencies(64, scaling["rope_theta"], None if scaling["rope_type"] == "default" else scaling, "cpu")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_rotation_matches_transformers():
    generator = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 500])  # packed: each sequence numbered from 0
    q, k = torch.randn(9, 4, 64, generator=generator), torch.randn(9, 2, 64, generator=generator)
    rotary = LlamaRotaryEmbedding(_config(SCALINGS[0]))
    cos, sin = rotary(q, positions[None])                       # [1, T, D]
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    tables = rotary_tables(positions, inverse_frequencies(64, 10000.0, None, "cpu"))
    torch.testing.assert_close(apply_rotary(q, *tables), want_q[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(apply_rotary(k, *tables), want_k[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
