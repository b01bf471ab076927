"""Varlen attention equals dense attention under a block-diagonal mask, prefixes included.
The mask-query kernel runs in Triton's interpreter in a subprocess without CUDA, because
TRITON_INTERPRET must be set before the kernel is defined."""

from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from tests.conftest import ON_GPU, TRITON_DEVICES, run_triton_check
from zotune.engine.precision import Precision
from zotune.layers import attention
from zotune.layers.attention import varlen_attention
from zotune.layers.batch import pack, shared_context


def _dense_reference(q, k, v, seq_lens, prefix_k, prefix_v):
    T, P = q.shape[0], 0 if prefix_k is None else prefix_k.shape[0]
    seq = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(seq_lens))
    allowed = seq[:, None] == seq[None, :]                                   # [T, T]
    if P:
        k, v = torch.cat([prefix_k, k]), torch.cat([prefix_v, v])
        allowed = torch.cat([torch.ones(T, P, dtype=torch.bool), allowed], dim=1)
    scores = torch.einsum("tnd,snd->nts", q.double(), k.double()) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("nts,snd->tnd", scores.softmax(-1), v.double())


# varlen_attention as the CPU runs it, and the block-diagonal paths' logic (a mask from
# cu_seqlens, the prefix rows: exact float32 on CUDA, and attention dropout's, here at p = 0)
# run on the CPU.
@pytest.mark.parametrize("path", [varlen_attention, attention._dense_float32, attention._block_diagonal])
@pytest.mark.parametrize("num_prefix", [0, 3])
def test_varlen_matches_block_diagonal_dense(num_prefix, path):
    torch.manual_seed(0)
    seq_lens = [1, 7, 3, 12]
    batch = pack([[5] + [1] * (n - 1) for n in seq_lens], 5, 2)
    q, k, v = (torch.randn(sum(seq_lens), 4, 8) for _ in range(3))
    prefix_k = prefix_v = None
    if num_prefix:
        prefix_k, prefix_v = torch.randn(num_prefix, 4, 8), torch.randn(num_prefix, 4, 8)
    got = path(q, k, v, batch, prefix_k, prefix_v)
    want = _dense_reference(q, k, v, seq_lens, prefix_k, prefix_v)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def _causal_reference(q, k, v, seq_lens, prefix_k, prefix_v):
    """Float64 attention of each sequence alone, token i over the prefix and tokens 0..i, with
    each key/value head repeated for its group of query heads."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if prefix_k is not None:
        prefix_k, prefix_v = prefix_k.repeat_interleave(group, dim=1), prefix_v.repeat_interleave(group, dim=1)
    out = []
    for qb, kb, vb in zip(q.split(seq_lens), k.split(seq_lens), v.split(seq_lens)):
        P, L = 0 if prefix_k is None else len(prefix_k), len(qb)
        if P:
            kb, vb = torch.cat([prefix_k, kb]), torch.cat([prefix_v, vb])
        allowed = torch.arange(P + L)[None, :] <= torch.arange(L)[:, None] + P     # [L, P+L]
        scores = torch.einsum("tnd,snd->nts", qb.double(), kb.double()) / q.shape[-1] ** 0.5
        out.append(torch.einsum("nts,snd->tnd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), vb.double()))
    return torch.cat(out)


# (key/value heads of 4 query heads, prefix rows): plain, grouped-query, multi-query.
CAUSAL_CASES = [(4, 0), (4, 3), (2, 0), (2, 3), (1, 2)]


@pytest.mark.parametrize("path", [varlen_attention, attention._dense_float32, attention._block_diagonal])
@pytest.mark.parametrize("kv_heads,num_prefix", CAUSAL_CASES)
def test_causal_grouped_attention_matches_the_reference(path, kv_heads, num_prefix):
    torch.manual_seed(4)
    seq_lens = [1, 7, 3, 12]
    batch = pack([[1] * n for n in seq_lens], None, 0)
    q = torch.randn(sum(seq_lens), 4, 8)
    k, v = (torch.randn(sum(seq_lens), kv_heads, 8) for _ in range(2))
    prefix_k = prefix_v = None
    if num_prefix:
        prefix_k, prefix_v = (torch.randn(num_prefix, kv_heads, 8) for _ in range(2))
    got = path(q, k, v, batch, prefix_k, prefix_v, causal=True) if path is varlen_attention \
        else path(q, k, v, batch, prefix_k, prefix_v, True)
    torch.testing.assert_close(got.double(), _causal_reference(q, k, v, seq_lens, prefix_k, prefix_v),
                               rtol=1e-5, atol=1e-6)


def test_causal_pair_attends_to_the_prefix_of_its_half():
    torch.manual_seed(5)
    half = pack([[1] * n for n in (2, 9, 4)], None, 0)
    batch, n = half.paired, half.num_tokens
    q, k, v = torch.randn(2 * n, 4, 8), torch.randn(2 * n, 2, 8), torch.randn(2 * n, 2, 8)
    prefix_k, prefix_v = torch.randn(2, 3, 2, 8), torch.randn(2, 3, 2, 8)
    want = torch.cat([varlen_attention(q[:n], k[:n], v[:n], half, prefix_k[0], prefix_v[0], causal=True),
                      varlen_attention(q[n:], k[n:], v[n:], half, prefix_k[1], prefix_v[1], causal=True)])
    assert torch.equal(varlen_attention(q, k, v, batch, prefix_k, prefix_v, causal=True), want)
    torch.testing.assert_close(attention._dense_float32(q, k, v, batch, prefix_k, prefix_v, True), want,
                               rtol=1e-5, atol=1e-6)


# Shared prompts (SharedContext): sequences 1, 2 continue 0; 4 continues 3 (candidates after their prompt).
SHARED_LENS, SHARED_OF = (5, 2, 4, 3, 1), [-1, 0, 0, -1, 3]


def _shared_case(kv_heads, num_prefix, device="cpu", head_dim=8):
    """q, k, v of the shared layout, its batch (paired too), a prefix, and the float64 reference:
    each continuing sequence's rows as the last rows of its context and itself packed as one."""
    torch.manual_seed(7)
    half = pack([[1] * n for n in SHARED_LENS], None, 0)
    half = replace(half, context=shared_context(SHARED_OF, half.seq_lens))
    n = half.num_tokens
    q = torch.randn(n, 4, head_dim)
    k, v = (torch.randn(n, kv_heads, head_dim) for _ in range(2))
    prefix = [torch.randn(num_prefix, kv_heads, head_dim) for _ in range(2)] if num_prefix else [None, None]
    pieces = [t.split(SHARED_LENS) for t in (q, k, v)]
    want = []
    for b, length in enumerate(SHARED_LENS):
        whole = [torch.cat([p[SHARED_OF[b]], p[b]]) if SHARED_OF[b] >= 0 else p[b] for p in pieces]
        want.append(_causal_reference(*whole, [len(whole[0])], *prefix)[-length:])
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return (*map(move, (q, k, v)), half.to(device), *map(move, prefix), torch.cat(want))


@pytest.mark.parametrize("path", [varlen_attention, attention._dense_float32, attention._block_diagonal])
@pytest.mark.parametrize("kv_heads,num_prefix", CAUSAL_CASES)
def test_shared_context_is_attention_over_context_and_sequence(path, kv_heads, num_prefix):
    q, k, v, batch, prefix_k, prefix_v, want = _shared_case(kv_heads, num_prefix)
    got = path(q, k, v, batch, prefix_k, prefix_v, causal=True) if path is varlen_attention \
        else path(q, k, v, batch, prefix_k, prefix_v, True)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_prefix", [0, 3])
def test_shared_context_in_a_pair_is_each_half_alone(num_prefix):
    q, k, v, half, prefix_k, prefix_v, _ = _shared_case(2, num_prefix)
    batch = half.paired
    assert batch.context.of == (-1, 0, 0, -1, 3, -1, 5, 5, -1, 8)
    # the second half: other queries, keys and values, and its own prefix
    other = [None if t is None else torch.randn_like(t) for t in (q, k, v, prefix_k, prefix_v)]
    q2, k2, v2 = (torch.cat([a, b]) for a, b in zip((q, k, v), other[:3]))
    prefix2 = [None if p is None else torch.stack([p, o]) for p, o in zip((prefix_k, prefix_v), other[3:])]
    want = torch.cat([varlen_attention(q, k, v, half, prefix_k, prefix_v, causal=True),
                      varlen_attention(*other[:3], half, *other[3:], causal=True)])
    assert torch.equal(varlen_attention(q2, k2, v2, batch, *prefix2, causal=True), want)
    torch.testing.assert_close(attention._dense_float32(q2, k2, v2, batch, *prefix2, True), want,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv_heads,num_prefix", CAUSAL_CASES)
@pytest.mark.parametrize("tf32", [True, False])
def test_shared_context_on_gpu(kv_heads, num_prefix, tf32):
    # FlashAttention varlen (cu_seqlens_q != cu_seqlens_k, bottom-right causal) and the exact
    # float32 SDPA path, over the gathered keys of each sequence's context and its own.
    q, k, v, batch, prefix_k, prefix_v, want = _shared_case(kv_heads, num_prefix, "cuda", head_dim=64)
    with _tf32(tf32):
        got = varlen_attention(q, k, v, batch, prefix_k, prefix_v, causal=True)
    error = ((got.cpu().double() - want).norm() / want.norm()).item()
    assert error < (1e-2 if tf32 else 1e-5), error  # FlashAttention computes in bf16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv_heads,num_prefix", CAUSAL_CASES)
@pytest.mark.parametrize("tf32", [True, False])
def test_causal_grouped_attention_on_gpu(kv_heads, num_prefix, tf32):
    torch.manual_seed(6)
    seq_lens = [1, 7, 3, 12, 100]
    batch = pack([[1] * n for n in seq_lens], None, 0).to("cuda")
    q = torch.randn(sum(seq_lens), 4, 64, device="cuda")
    k, v = (torch.randn(sum(seq_lens), kv_heads, 64, device="cuda") for _ in range(2))
    prefix_k = prefix_v = None
    if num_prefix:
        prefix_k, prefix_v = (torch.randn(num_prefix, kv_heads, 64, device="cuda") for _ in range(2))
    with _tf32(tf32):
        got = varlen_attention(q, k, v, batch, prefix_k, prefix_v, causal=True)
    want = _causal_reference(*(None if t is None else t.cpu() for t in (q, k, v)), seq_lens,
                             *(None if t is None else t.cpu() for t in (prefix_k, prefix_v)))
    error = ((got.cpu().double() - want).norm() / want.norm()).item()
    assert error < (1e-2 if tf32 else 1e-5), error  # FlashAttention computes in bf16


def test_masks_only_is_not_causal():
    q = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match="masks_only"):
        varlen_attention(q, q, q, pack([[1, 5, 1]], 5, 0), masks_only=True, causal=True)


@contextmanager
def _tf32(allowed: bool):
    """The switch the precision contexts set (engine/precision.py), which picks the kernel."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # Precision sets the switch without a GPU too
@pytest.mark.parametrize("precision, kernel", [("tf32", "flash-bf16"), ("bf16", "flash-bf16"),
                                               ("float32", "dense-float32")])
def test_each_precision_picks_its_attention_kernel(precision, kernel):
    # The decision alone, checkable without CUDA: a CUDA run's precision context sets the switch.
    with Precision(precision, torch.device("cuda")):
        exact = not torch.backends.cuda.matmul.allow_tf32
        assert attention.attention_kernel("cuda", False, 0.0, exact) == kernel
        assert attention.attention_kernel("cuda", True, 0.0, exact) == "mask-queries"  # float32 in every mode
        assert attention.attention_kernel("cuda", False, 0.1, exact) == "dense-dropout"
        assert attention.attention_kernel("cuda", True, 0.1, exact) == "dense-dropout"
        assert attention.attention_kernel("cpu", False, 0.1, exact) == "dense-dropout"
        assert attention.attention_kernel("cpu", False, 0.0, exact) == "per-sequence"


def test_dense_float32_pair_attends_to_the_prefix_of_its_half():
    q, k, v, batch, prefix_k, prefix_v, want = _paired_case()
    torch.testing.assert_close(attention._dense_float32(q, k, v, batch, prefix_k, prefix_v), want,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_prefix", [0, 3])
@pytest.mark.parametrize("tf32", [True, False])
def test_varlen_matches_reference_on_gpu(num_prefix, tf32):
    torch.manual_seed(0)
    seq_lens = [1, 7, 3, 12, 100]
    batch = pack([[5] + [1] * (n - 1) for n in seq_lens], 5, 2).to("cuda")
    q, k, v = (torch.randn(sum(seq_lens), 4, 64, device="cuda") for _ in range(3))
    prefix_k = prefix_v = None
    if num_prefix:
        prefix_k, prefix_v = (torch.randn(num_prefix, 4, 64, device="cuda") for _ in range(2))
    with _tf32(tf32):
        got = varlen_attention(q, k, v, batch, prefix_k, prefix_v)
    want = _dense_reference(q.cpu(), k.cpu(), v.cpu(), seq_lens,
                            None if prefix_k is None else prefix_k.cpu(), None if prefix_v is None else prefix_v.cpu())
    error = ((got.cpu().double() - want).norm() / want.norm()).item()
    assert error < (1e-2 if tf32 else 1e-5), error  # FlashAttention computes in bf16; "float32" in float32


def _paired_case(device="cpu", head_dim=8):
    torch.manual_seed(1)
    half = pack([[5] + [1] * (n - 1) for n in (2, 9, 4)], 5, 2)
    batch = half.paired.to(device)
    n = half.num_tokens
    q, k, v = (torch.randn(2 * n, 4, head_dim, device=device) for _ in range(3))
    prefix_k, prefix_v = (torch.randn(2, 3, 4, head_dim, device=device) for _ in range(2))  # [plus, minus]
    # What each half must equal: the half alone, attending to its own prefix.
    want = torch.cat([varlen_attention(q[:n].cpu(), k[:n].cpu(), v[:n].cpu(), half,
                                       prefix_k[0].cpu(), prefix_v[0].cpu()),
                      varlen_attention(q[n:].cpu(), k[n:].cpu(), v[n:].cpu(), half,
                                       prefix_k[1].cpu(), prefix_v[1].cpu())])
    return q, k, v, batch, prefix_k, prefix_v, want


def test_a_pair_attends_to_the_prefix_of_its_half():
    q, k, v, batch, prefix_k, prefix_v, want = _paired_case()
    assert torch.equal(varlen_attention(q, k, v, batch, prefix_k, prefix_v), want)


def test_prefix_interleave_of_a_pair():
    # The rows the FlashAttention path builds: every sequence's prefix (its half's) before its tokens.
    from zotune.layers.attention import _prepend_prefix
    q, k, v, batch, prefix_k, prefix_v, _ = _paired_case()
    k_full, _, cu_k = _prepend_prefix(k, v, prefix_k, prefix_v, batch.cu_seqlens, batch)
    pieces = []
    for b, rows in enumerate(k.split(batch.seq_lens)):
        pieces += [prefix_k[0 if b < batch.pair_seqs else 1], rows]
    assert torch.equal(k_full, torch.cat(pieces))
    assert cu_k.tolist() == [c + 3 * i for i, c in enumerate(batch.cu_seqlens.tolist())]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tf32", [True, False])
def test_varlen_pair_matches_reference_on_gpu(tf32):
    q, k, v, batch, prefix_k, prefix_v, want = _paired_case("cuda", head_dim=64)
    with _tf32(tf32):
        got = varlen_attention(q, k, v, batch, prefix_k, prefix_v).cpu()
    error = ((got - want).norm() / want.norm()).item()
    assert error < (1e-2 if tf32 else 1e-5), error  # FlashAttention computes in bf16


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
@pytest.mark.parametrize("case", ["plain", "prefix", "pair with prefixes"])
def test_masks_only_gives_the_mask_rows_of_full_attention(device, case):
    # The last layer's queries at the <mask> rows alone (model/roberta.py): each must equal its
    # row of the attention over every query, the same keys, values and prefixes.
    if case == "pair with prefixes":
        q, k, v, batch, prefix_k, prefix_v, _ = _paired_case(device, head_dim=64)
    else:
        torch.manual_seed(2)
        seq_lens = [3, 9, 1, 20]
        positions = [1, 4, 0, 19]  # where each sequence's mask sits
        batch = pack([[1] * p + [5] + [1] * (n - p - 1) for n, p in zip(seq_lens, positions)], 5, 2).to(device)
        q, k, v = (torch.randn(sum(seq_lens), 4, 64, device=device) for _ in range(3))
        prefix_k = prefix_v = None
        if case == "prefix":
            prefix_k, prefix_v = (torch.randn(3, 4, 64, device=device) for _ in range(2))
    full = varlen_attention(q, k, v, batch, prefix_k, prefix_v)
    masks = varlen_attention(q[batch.mask_index], k, v, batch, prefix_k, prefix_v, masks_only=True)
    assert masks.shape == (len(batch.mask_index), *q.shape[1:])
    # Equal up to rounding: a one-row product is summed in another order than the full one's
    # (float32 on the CPU; FlashAttention computes in bf16 on the GPU).
    torch.testing.assert_close(masks, full[batch.mask_index], rtol=0, atol=1e-6 if device == "cpu" else 1e-2)


@pytest.mark.parametrize("case", ["plain", "prefix", "pair with prefixes"])
def test_dropout_path_at_the_masks_is_the_reference(case):
    # The backprop baseline's last layer: the <mask> queries alone, through the block-diagonal
    # path (at p = 0 here), equal the per-sequence reference's.
    if case == "pair with prefixes":
        q, k, v, batch, prefix_k, prefix_v, _ = _paired_case()
    else:
        torch.manual_seed(2)
        batch = pack([[1] * p + [5] + [1] * (n - p - 1) for n, p in zip([3, 9, 1, 20], [1, 4, 0, 19])], 5, 2)
        q, k, v = (torch.randn(33, 4, 8) for _ in range(3))
        prefix_k, prefix_v = (torch.randn(3, 4, 8) for _ in range(2)) if case == "prefix" else (None, None)
    queries = q[batch.mask_index]
    want = attention._per_sequence(queries, k, v, batch, prefix_k, prefix_v, masks_only=True)
    got = attention._block_diagonal(queries, k, v, batch, prefix_k, prefix_v, masks_only=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _dropout_case(device):
    torch.manual_seed(3)
    seq_lens = [4, 9, 2, 7]
    batch = pack([[5] + [1] * (n - 1) for n in seq_lens], 5, 2).to(device)
    q, k, v = (torch.randn(sum(seq_lens), 2, 8, device=device) for _ in range(3))
    return q, k, v, batch, seq_lens


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
def test_attention_dropout_keeps_each_sequence_to_itself(device):
    # Under dropout a sequence still sees only its own keys: with the same random draws, other
    # values in sequence 1 change its rows and no other sequence's.
    q, k, v, batch, seq_lens = _dropout_case(device)
    first, rows = sum(seq_lens[:1]), slice(sum(seq_lens[:1]), sum(seq_lens[:2]))
    torch.manual_seed(11)
    out = varlen_attention(q, k, v, batch, dropout_p=0.5)
    k2, v2 = k.clone(), v.clone()
    k2[rows], v2[rows] = torch.randn_like(k[rows]), torch.randn_like(v[rows])
    torch.manual_seed(11)
    out2 = varlen_attention(q, k2, v2, batch, dropout_p=0.5)
    others = torch.ones(len(q), dtype=torch.bool, device=device)
    others[rows] = False
    assert torch.equal(out[others], out2[others]) and first > 0
    assert not torch.allclose(out[rows], out2[rows])


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
def test_attention_dropout_is_unbiased(device):
    # Dropout zeroes probabilities and scales the rest by 1 / (1 - p): one draw differs from the
    # plain attention, the mean of many draws is it.
    q, k, v, batch, _ = _dropout_case(device)
    plain = varlen_attention(q, k, v, batch)
    torch.manual_seed(12)
    draws = torch.stack([varlen_attention(q, k, v, batch, dropout_p=0.3) for _ in range(4000)])
    assert (draws[0] - plain).abs().max() > 0.1
    torch.testing.assert_close(draws.mean(0), plain, rtol=0, atol=0.06)


# (a MeZO pair, prefix rows, a CUDA graph's filler sequence, dtype of q, k, v): a pair's two
# halves read prefix[0] and prefix[1]; the filler sequence, last, has no query; bf16 is q, k, v
# under autocast, with the prefix parameters in float32.
MASK_QUERY_CASES = [(False, 0, False, torch.float32), (False, 3, False, torch.float32), (True, 3, False, torch.float32),
                    (True, 3, True, torch.float32), (False, 0, True, torch.float32), (False, 5, False, torch.bfloat16)]


def check_mask_query_kernel(device: torch.device):
    """The Triton mask-query kernel against the per-sequence reference, which computes in float32."""
    generator = torch.Generator().manual_seed(3)
    sequences = [[5] + [1] * (n - 1) for n in (1, 7, 70, 3, 130, 2)]  # one token, and more than a key step
    for case in MASK_QUERY_CASES:
        paired, n_prefix, filler, dtype = case
        batch = pack(sequences[:3], 5, 2).paired if paired else pack(sequences, 5, 2)
        num_queries = len(batch.seq_lens) - filler
        # Strided views of one tensor, as the model's q, k, v are of its linear's output.
        qkv = torch.randn(batch.num_tokens, 3, 4, 16, generator=generator).to(dtype)   # [T, 3, N, D]
        prefix_k = prefix_v = None
        if n_prefix:
            shape = (2, n_prefix, 4, 16) if paired else (n_prefix, 4, 16)
            prefix_k, prefix_v = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
        expected = attention._per_sequence(qkv[:num_queries, 0].float(), qkv[:, 1].float(), qkv[:, 2].float(), batch,
                                           prefix_k, prefix_v, masks_only=True)
        qkv = qkv.to(device)
        got = attention._mask_queries_triton(qkv[:num_queries, 0], qkv[:, 1], qkv[:, 2], batch.to(device),
                                             *(None if t is None else t.to(device) for t in (prefix_k, prefix_v)))
        assert got.shape == expected.shape and got.dtype == dtype
        # bf16: the output's rounding alone, under a unit in the last place of its 8-bit
        # significand (Triton's interpreter truncates where CUDA rounds to nearest).
        tolerance = 1e-5 if dtype == torch.float32 else 2 ** -7
        torch.testing.assert_close(got.cpu().float(), expected, rtol=tolerance, atol=1e-5, msg=str(case))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_mask_query_kernel_matches_the_reference(device):
    run_triton_check(__file__, check_mask_query_kernel, device)


if __name__ == "__main__":
    check_mask_query_kernel(torch.device("cpu"))
