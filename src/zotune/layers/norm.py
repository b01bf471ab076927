"""norm(x + h): the residual add and LayerNorm that close each half of a post-LN layer, fused
into one kernel on CUDA.

Unfused, each is an add kernel and a layer_norm kernel over [T, E]: 96 launches per
RoBERTa-large forward, and on a few hundred packed tokens each is bound by launch latency,
not by memory (issue 4's profile, benchmarks/RESULTS.md). The Triton kernel
reads both inputs once and normalises one row per program, in float32. `_add_layer_norm_torch`
is its reference: the CPU path, the path under autograd (the backprop baseline), and what the
tests compare the kernel with.

rms_norm is the Llama family's RMSNorm (Zhang & Sennrich 2019), which a pre-norm decoder
applies to a layer's input rather than to a residual sum: a torch function for now, in
float32 as transformers' LlamaRMSNorm computes it.

Shape notation: T = packed tokens, E = hidden size.
"""

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # torch's CPU wheels come without triton
    triton = None


def add_layer_norm(x: torch.Tensor, h: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """LayerNorm(x + h) with `weight`, `bias` [E] for x, h: [T, E] -> [T, E] float32 (h may be
    bf16 under autocast); LayerNorm(x) where h is None (the MLM head's norm, whose two torch
    kernels cost more than this one). In a MeZO pair, trained `weight` and `bias` are [2, E]
    (at θ + εz and at θ − εz): the first half of the rows takes the first, the second the second
    (a frozen [E] one serves both)."""
    if weight.dim() != bias.dim():
        weight, bias = (t.expand(2, *t.shape[-1:]) for t in (weight, bias))  # no copy: stride 0
    if x.is_cuda and triton is not None and not torch.is_grad_enabled():
        return _add_layer_norm_triton(x, h, weight, bias, eps)
    return _add_layer_norm_torch(x, h, weight, bias, eps)


def _add_layer_norm_torch(x, h, weight, bias, eps):
    s = x if h is None else x + h
    if weight.dim() == 2:  # a pair: each half as the unpaired passes compute it, so the bits are theirs
        return torch.cat([F.layer_norm(half, half.shape[-1:], w, b, eps)
                          for half, w, b in zip(s.chunk(2), weight, bias)])
    return F.layer_norm(s, s.shape[-1:], weight, bias, eps)


def _add_layer_norm_triton(x, h, weight, bias, eps):
    has_h = h is not None
    x = x.contiguous()
    h = h.contiguous() if has_h else x  # else a pointer the kernel never reads (HAS_H off)
    rows, cols = x.shape
    pairs = 2 if weight.dim() == 2 else 1
    out = torch.empty(rows, cols, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(cols)
    _add_layer_norm_kernel[(rows,)](x, h, weight, bias, out, cols, rows // pairs, weight.stride(0) if pairs == 2 else 0,
                                    bias.stride(0) if pairs == 2 else 0, eps, HAS_H=has_h, BLOCK=block,
                                    num_warps=min(max(block // 256, 1), 8))
    return out


if triton is not None:
    @triton.jit
    def _add_layer_norm_kernel(x_ptr, h_ptr, w_ptr, b_ptr, out_ptr, cols, half_rows, w_pair_stride, b_pair_stride,
                               eps, HAS_H: tl.constexpr, BLOCK: tl.constexpr):
        """Program r: row r, with the weights of its half of a pair (half_rows = rows outside one)."""
        half = tl.program_id(0) // half_rows
        w_ptr += half * w_pair_stride
        b_ptr += half * b_pair_stride
        row = tl.program_id(0).to(tl.int64) * cols
        offs = tl.arange(0, BLOCK)
        inside = offs < cols
        s = tl.load(x_ptr + row + offs, mask=inside, other=0.0).to(tl.float32)
        if HAS_H:
            s += tl.load(h_ptr + row + offs, mask=inside, other=0.0).to(tl.float32)   # [E] x + h
        mean = tl.sum(s, axis=0) / cols
        centred = tl.where(inside, s - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / cols + eps)     # biased variance, as LayerNorm
        w = tl.load(w_ptr + offs, mask=inside, other=0.0)
        b = tl.load(b_ptr + offs, mask=inside, other=0.0)
        tl.store(out_ptr + row + offs, centred * rstd * w + b, mask=inside)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) * weight for x: [T, E] -> [T, E] float32, normalised in float32
    (transformers' LlamaRMSNorm). In a MeZO pair a trained `weight` is [2, E]: the first half
    of the rows takes the first, the second half the second, each half as its unpaired pass
    computes it."""
    if weight.dim() == 2:
        return torch.cat([_rms_norm_torch(half, w, eps) for half, w in zip(x.chunk(2), weight)])
    return _rms_norm_torch(x, weight, eps)


def _rms_norm_torch(x, weight, eps):
    x = x.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
