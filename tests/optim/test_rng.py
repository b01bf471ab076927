import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zotune.optim import rng

# Random123's published known-answer vectors for philox4x32_10 (kat_vectors): counter, key, output.
KNOWN_ANSWERS = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    (
        [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
        [0xA4093822, 0x299F31D0],
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
    ),
]

N = 1 << 20


@pytest.fixture(scope="module")
def z():
    return rng.normal(20240601, 0, N).double()


@pytest.mark.parametrize("counter, key, expected", KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, expected):
    out = rng.philox4x32_10(torch.tensor(counter).view(4, 1), tuple(key))
    assert out.view(-1).tolist() == expected


def test_philox_columns_are_independent():
    # All three vectors in one call: lanes must not leak into each other.
    counters = torch.tensor([c for c, _, _ in KNOWN_ANSWERS]).T  # [4, 3]
    for i, (c, key, expected) in enumerate(KNOWN_ANSWERS):
        assert rng.philox4x32_10(counters, tuple(key))[:, i].tolist() == expected


def _box_muller_float64(seed: int, n: int) -> torch.Tensor:
    """The spec in float64, from the Philox words: what normal() approximates to a few ulps."""
    c = torch.arange((n + 3) // 4)
    zero = torch.zeros_like(c)
    x = rng.philox4x32_10(torch.stack((c & rng.MASK32, c >> 32, zero, zero)), (seed & rng.MASK32, seed >> 32))
    u = ((x >> 8) | 1).double() * 2.0**-24
    pairs = []
    for a, b in ((0, 1), (2, 3)):
        r = torch.sqrt(-2.0 * torch.log(u[a]))
        pairs += [r * torch.cos(2 * math.pi * u[b]), r * torch.sin(2 * math.pi * u[b])]
    return torch.stack(pairs, dim=1).reshape(-1)[:n]


@pytest.mark.parametrize("seed", [0, 7, 2**32 + 5, 2**63 - 1])
def test_normal_matches_float64_box_muller(seed):
    n = 1 << 16
    ref = _box_muller_float64(seed, n)
    err = (rng.normal(seed, 0, n).double() - ref).abs()
    assert err.max() < 1e-6
    big = ref.abs() > 1e-3
    assert (err[big] / ref.abs()[big]).max() < 3 * 2.0**-23  # a few float32 ulps


def test_normal_moments(z):
    n = z.numel()
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.std() - 1) < 5 / math.sqrt(2 * n)
    assert abs((z**4).mean() - 3) < 5 * math.sqrt(96 / n)  # Var(z^4) = 105 - 9


def test_normal_distribution_kolmogorov_smirnov(z):
    s = torch.sort(z).values
    cdf = 0.5 * (1 + torch.erf(s / math.sqrt(2)))
    ks = (torch.arange(1, s.numel() + 1, dtype=torch.float64) / s.numel() - cdf).abs().max()
    assert ks < 1.95 / math.sqrt(s.numel())  # 0.1% level


@pytest.mark.parametrize("lag", [1, 2, 3, 4, 5])
def test_no_correlation_between_nearby_elements(z, lag):
    # lag 1 includes the cos/sin pairs that share a radius; lag 4 the same lane of the next counter.
    corr = (z[:-lag] * z[lag:]).mean()
    assert abs(corr) < 5 / math.sqrt(z.numel())


def test_different_seeds_differ(z):
    other = rng.normal(20240602, 0, N).double()
    high = rng.normal(20240601 + 2**32, 0, N).double()  # differs in the key's high word only
    for w in (other, high):
        assert abs((z * w).mean()) < 5 / math.sqrt(N)
        assert (z == w).double().mean() < 1e-3


@settings(max_examples=60, deadline=None)
@given(start=st.integers(0, 4000), n=st.integers(0, 1000), seed=st.sampled_from([3, 2**40 + 1]))
def test_slices_agree_with_full_generation(start, n, seed):
    full = rng.normal(seed, 0, 5000)
    assert torch.equal(rng.normal(seed, start, n), full[start : start + n])


def test_slices_across_blocks():
    # normal() works through counters in blocks of rng.BLOCK; slices must not see the seams.
    n = 4 * rng.BLOCK + 10
    full = rng.normal(11, 0, n)
    start = 4 * rng.BLOCK - 3
    assert torch.equal(rng.normal(11, start, 9), full[start : start + 9])
    assert torch.equal(rng.normal(11, 2**40 + 2, 5), rng.normal(11, 2**40, 7)[2:])  # counters above 2**32


@pytest.mark.parametrize("seed", [-1, 2**63])
def test_seed_range(seed):
    with pytest.raises(ValueError, match="seed"):
        rng.normal(seed, 0, 4)
