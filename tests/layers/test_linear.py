"""The split-K linear kernel against its torch reference (and so against F.linear and the
activation). Without CUDA the kernel runs in Triton's interpreter in a subprocess, because
TRITON_INTERPRET must be set before the kernel is defined."""

import pytest
import torch
import torch.nn.functional as F

from zotune.layers import linear as fused
from tests.conftest import TRITON_DEVICES, run_triton_check

# (rows, in features K, out features N, bias, activation, SMs to fill): one row up to the row
# limit (128); K and N off the 64-wide blocks and on them; one K split, uneven shares (K = 320
# is 5 blocks in shares of 3 and 2) and as many splits as K blocks.
CASES = [
    (1, 96, 80, True, None, 132),
    (7, 100, 33, False, "gelu", 4),
    (32, 512, 384, True, "gelu_new", 132),
    (100, 320, 200, True, "gelu_pytorch_tanh", 5),
    (100, 256, 1024, True, "relu", 132),
    (32, 448, 96, True, "gelu", 1),
    (128, 192, 64, False, None, 132),
]


def _inputs(rows, k, n, has_bias, generator):
    x = torch.randn(rows, k, generator=generator)
    weight = torch.randn(n, k, generator=generator) / k ** 0.5
    bias = torch.randn(n, generator=generator) if has_bias else None
    return x, weight, bias


def check_kernel_matches_torch(device: torch.device):
    generator = torch.Generator().manual_seed(0)
    for rows, k, n, has_bias, activation, sm_count in CASES:
        x, weight, bias = _inputs(rows, k, n, has_bias, generator)
        expected = fused._linear_torch(x, weight, bias, activation)
        on_device = [t if t is None else t.to(device) for t in (x, weight, bias)]
        got = fused._linear_triton(*on_device, activation, torch.float32, "ieee", sm_count)
        # The splits are summed in a fixed order: the same bits every call (many calls on a GPU,
        # where programs race to arrive last).
        for _ in range(50 if device.type == "cuda" else 1):
            again = fused._linear_triton(*on_device, activation, torch.float32, "ieee", sm_count)
            assert torch.equal(got, again)
        assert got.dtype == torch.float32 and got.shape == (rows, n)
        # Both accumulate in float32; they differ only in summation order.
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    check_pairs(device, generator)


# (rows a half, K, N, the pair's bias: "pair", "frozen" (one [N] for both) or None, SMs to fill)
PAIR_CASES = [(3, 96, 80, "pair", 132), (32, 320, 200, "frozen", 5), (17, 64, 48, None, 1)]


def check_pairs(device: torch.device, generator: torch.Generator):
    """A MeZO pair: [2, N, K] weights, views of two buffers as FlatParameters.pair_views gives
    them (a tensor's offset apart), and a frozen weight beside a paired bias (stride 0); each
    half of the rows against F.linear with its own tensors."""
    for rows, k, n, bias_kind, sm_count in PAIR_CASES:
        x = torch.randn(2 * rows, k, generator=generator)
        buffers = torch.randn(2, 5 + n * k + n, generator=generator) / k ** 0.5
        weight, bias = buffers[:, 5:5 + n * k].view(2, n, k), buffers[:, 5 + n * k:]
        bias = {"pair": bias, "frozen": bias[0], None: None}[bias_kind]
        biases = bias if bias_kind == "pair" else (bias, bias)
        halves = [F.linear(x[:rows], weight[0], biases[0]), F.linear(x[rows:], weight[1], biases[1])]
        expected = F.gelu(torch.cat(halves))
        on_device = [t if t is None else t.to(device) for t in (x, weight, bias)]
        got = fused._linear_triton(*on_device, "gelu", torch.float32, "ieee", sm_count)
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
        # the reference path computes each half as F.linear does: the same bits
        assert torch.equal(fused._linear_torch(x, weight, bias, "gelu"), expected)
    # One frozen weight, a paired bias: linear() shares the weight between the halves.
    x, weight, bias = torch.randn(6, 16, generator=generator), torch.randn(4, 16), torch.randn(2, 4)
    expected = torch.cat([F.linear(x[:3], weight, bias[0]), F.linear(x[3:], weight, bias[1])])
    assert torch.equal(fused.linear(x, weight, bias), expected)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_kernel_matches_torch(device):
    run_triton_check(__file__, check_kernel_matches_torch, device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_autocast_gives_bf16_as_f_linear_does():
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (t.cuda() for t in _inputs(32, 1024, 4096, True, generator))
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        got = fused.linear(x, weight, bias, "gelu")
        expected = F.gelu(F.linear(x, weight, bias))
    assert got.dtype == expected.dtype == torch.bfloat16
    # The kernel applies GELU before rounding to bf16, F.gelu after: a bf16 ulp or so apart.
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.parametrize("activation", [None, *fused.ACTIVATIONS])
def test_cpu_and_autograd_take_the_reference_path(activation):
    x, weight, bias = torch.randn(3, 8, requires_grad=True), torch.randn(5, 8), torch.randn(5)
    out = fused.linear(x, weight, bias, activation)
    out.sum().backward()  # the backprop baseline needs a graph through it
    assert x.grad is not None
    expected = F.linear(x, weight, bias)
    expected = expected if activation is None else fused.ACTIVATIONS[activation](expected)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


if __name__ == "__main__":
    check_kernel_matches_torch(torch.device("cpu"))
