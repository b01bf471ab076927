"""The fused residual add + LayerNorm kernel against its torch reference (and so against
nn.LayerNorm). Without CUDA the kernel runs in Triton's interpreter in a subprocess, because
TRITON_INTERPRET must be set before the kernel is defined."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zotune.layers import norm as fused
from tests.conftest import TRITON_DEVICES, run_triton_check

# (tokens, hidden size, dtype of h): a power of two and not, one row and many, bf16 h as
# under autocast (the linear's output) with a float32 residual stream.
# None: no residual, norm(x) alone (the MLM head's norm).
CASES = [(1, 32, torch.float32), (7, 48, torch.float32), (130, 1024, torch.float32), (65, 256, torch.bfloat16),
         (33, 96, None)]


def check_kernel_matches_torch(device: torch.device):
    generator = torch.Generator().manual_seed(0)
    for tokens, hidden, h_dtype in CASES:
        layer_norm = nn.LayerNorm(hidden, eps=1e-5)
        with torch.no_grad():
            layer_norm.weight.copy_(torch.randn(hidden, generator=generator))
            layer_norm.bias.copy_(torch.randn(hidden, generator=generator))
        x = torch.randn(tokens, hidden, generator=generator) * 3 + 1
        h = None if h_dtype is None else torch.randn(tokens, hidden, generator=generator).to(h_dtype)
        with torch.no_grad():
            expected = layer_norm(x if h is None else x + h)
            weight, bias = layer_norm.weight.to(device), layer_norm.bias.to(device)
            got = fused._add_layer_norm_triton(x.to(device), None if h is None else h.to(device), weight, bias, 1e-5)
        assert got.dtype == torch.float32 and got.shape == (tokens, hidden)
        # Both normalise in float32; they differ only in summation order (~1 ulp of the row's scale).
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)
    # The same tensor as x and h is norm(x + x), not norm(x). (Small values, so that eps tells
    # the two apart: LayerNorm alone cannot see a factor of 2.)
    x = (torch.randn(5, hidden, generator=generator) * 1e-3).to(device)
    got = fused._add_layer_norm_triton(x, x, weight, bias, 1e-5)
    torch.testing.assert_close(got.cpu(), layer_norm((x + x).cpu()), rtol=1e-5, atol=1e-5)
    # A MeZO pair: [2, E] weights, views of two buffers as FlatParameters.pair_views gives them
    # (rows 7 apart here), each half of the rows normalised with its own.
    for tokens, hidden in ((2, 32), (66, 1024)):
        buffers = torch.randn(2, 7 + 2 * hidden, generator=generator)
        weight, bias = buffers[:, 7:7 + hidden], buffers[:, 7 + hidden:]
        x, h = torch.randn(2, tokens // 2, hidden, generator=generator).unbind()
        got = fused._add_layer_norm_triton(torch.cat([x, h]).to(device), torch.cat([h, x]).to(device),
                                           weight.to(device), bias.to(device), 1e-5)
        expected = torch.cat([F.layer_norm(x + h, (hidden,), weight[0], bias[0], 1e-5),
                              F.layer_norm(h + x, (hidden,), weight[1], bias[1], 1e-5)])
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused._add_layer_norm_torch(torch.cat([x, h]), torch.cat([h, x]), weight, bias, 1e-5),
                                   expected, rtol=0, atol=0)
        # a frozen weight beside a trained bias (`bias` on upper layers): one weight, stride 0
        shared = weight[0].expand(2, hidden)
        got = fused._add_layer_norm_triton(torch.cat([x, h]).to(device), None, shared.to(device), bias.to(device), 1e-5)
        expected = torch.cat([F.layer_norm(x, (hidden,), weight[0], bias[0], 1e-5),
                              F.layer_norm(h, (hidden,), weight[0], bias[1], 1e-5)])
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(fused.add_layer_norm(torch.cat([x, h]), None, weight[0], bias, 1e-5), expected)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_kernel_matches_torch(device):
    run_triton_check(__file__, check_kernel_matches_torch, device)


def test_cpu_and_autograd_take_the_reference_path():
    layer_norm = nn.LayerNorm(8)
    x, h = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8)
    out = fused.add_layer_norm(x, h, layer_norm.weight, layer_norm.bias, layer_norm.eps)
    out.sum().backward()  # the backprop baseline needs a graph through it
    assert x.grad is not None
    torch.testing.assert_close(out, layer_norm(x + h), rtol=0, atol=0)


if __name__ == "__main__":
    check_kernel_matches_torch(torch.device("cpu"))


def test_rms_norm_matches_transformers_and_pairs_by_halves():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    generator = torch.Generator().manual_seed(1)
    reference = LlamaRMSNorm(48, eps=1e-6)
    with torch.no_grad():
        reference.weight.copy_(torch.randn(48, generator=generator))
    x = torch.randn(10, 48, generator=generator) * 3 + 1
    with torch.no_grad():
        got = fused.rms_norm(x, reference.weight, 1e-6)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, reference(x), rtol=1e-6, atol=1e-6)
        # A pair: the first half of the rows with weight[0], the second with weight[1], each as alone.
        pair = torch.stack([reference.weight, reference.weight + 1])
        paired = fused.rms_norm(torch.cat([x, x]), pair, 1e-6)
        assert torch.equal(paired[:10], fused.rms_norm(x, pair[0], 1e-6))
        assert torch.equal(paired[10:], fused.rms_norm(x, pair[1], 1e-6))
