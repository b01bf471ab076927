"""Rotary position embeddings (RoPE, Su et al. 2021) in Llama's rotate-half convention.

A query or key vector at position p is rotated pairwise: dimension j and j + D/2 form a plane
turned by the angle p * inv_freq[j], inv_freq[j] = theta^(-2j/D). The positions are the
packed batch's own (PackedBatch.positions, numbered from 0 within each sequence), so a
packed batch needs no per-sequence offsets. The tables are computed in float32 on the
positions' device, as transformers' LlamaRotaryEmbedding does, once per forward for all
layers.

`scaling` follows the checkpoint's `rope_parameters` (transformers 5; `rope_scaling` before):
"default", "linear" (inv_freq / factor) and "llama3" (Llama 3.1's smooth interpolation of the
low frequencies, transformers' _compute_llama3_parameters). Other kinds are refused by the
loader (model/loading.py).

Shape notation: T = packed tokens, N = heads, D = head dim.
"""

import math

import torch

ROPE_TYPES = ("default", "linear", "llama3")


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None, device) -> torch.Tensor:
    """[D/2] float32: the angle per position of each rotated pair."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3(inv_freq, scaling)
    return inv_freq


def _llama3(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Wavelengths above original_max_position_embeddings / low_freq_factor are stretched by
    `factor`, those below .. / high_freq_factor kept, and those between interpolated."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    stretched = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * stretched / factor + smooth * stretched
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(medium, smoothed, stretched)


def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [T, D] float32, for positions [T]."""
    angles = positions.float()[:, None] * inv_freq[None, :]                 # [T, D/2]
    angles = torch.cat([angles, angles], dim=-1)                             # [T, D]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, N, D] rotated by its token's angles; in x's dtype."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-second, first], dim=-1)                      # [T, N, D]
    return (x * cos[:, None, :] + rotated_half * sin[:, None, :]).to(x.dtype)
