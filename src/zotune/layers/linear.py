"""activation(x Wᵀ + b) for few rows, as one split-K Triton matmul on CUDA.

Above a cached trunk, the last layer computes only the <mask> rows (M = 32..128): its query
and output projections, both feed-forward matmuls and the head's dense layer read ~52 MB of
float32 weights for a few rows each, so they are bound by reading the weights and by launch
latency. Here each program takes a BLOCK_N-column block of N and a contiguous share of K, so
that the programs of all SMs stream the weight together. Each writes its share's partial sums;
the last program of a column block to finish (an arrival counter tells it) adds the shares up
in split order, whichever program that is, so the same inputs give the same bits, then adds
the bias and applies the activation. One launch: a separate summing kernel would add a launch
to every matmul. benchmarks/linear_kernels.py times it against cuBLAS (benchmarks/RESULTS.md).
`_linear_torch` is its reference: the CPU path, the path under
autograd (the backprop baseline), the path for many rows (where cuBLAS's own tiles fill the
GPU), and what the tests compare the kernel with.

Shape notation: R = rows, K = input features, N = output features, S = K splits.
"""

from functools import cache, partial

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # torch's CPU wheels come without triton
    triton = None

# Activation names as in Hugging Face configs (`hidden_act`) -> the torch function. The Triton
# epilogue (_activate) implements the same names; the model validates names against this dict.
ACTIVATIONS = {
    "gelu": F.gelu,  # exact erf GELU, what RoBERTa and BERT were trained with
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}

# Up to this many rows the matmul is bound by reading the weight; the whole row block is one
# tile (BLOCK_R) of the kernel, whose accumulator must fit the registers.
MAX_ROWS = 128
# Chosen with benchmarks/linear_kernels.py (benchmarks/RESULTS.md): 32-column blocks, and 2
# programs a SM up to 64 rows but 1 above, where each program's taller x tile already keeps
# enough loads in flight.
BLOCK_N, BLOCK_K = 32, 64
PROGRAMS_PER_SM = 2  # up to 64 rows; half as many above


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           activation: str | None = None) -> torch.Tensor:
    """activation(x @ weight.T + bias) for x: [R, K], weight: [N, K] (nn.Linear's layout) -> [R, N],
    in the dtype and precision F.linear would use here (bf16 under CUDA autocast).

    In a MeZO pair (PackedBatch.paired) a trained weight is [2, N, K] and a trained bias [2, N]:
    the tensor at θ + εz and at θ − εz (FlatParameters.pair_views). The first half of x's rows
    is multiplied by the first, the second half by the second; a frozen [N, K] weight beside a
    trained bias serves both halves."""
    if weight.dim() == 2 and bias is not None and bias.dim() == 2:
        weight = weight.expand(2, *weight.shape)  # no copy: both halves read the one weight
    pairs = 2 if weight.dim() == 3 else 1
    if x.is_cuda and triton is not None and not torch.is_grad_enabled() and len(x) // pairs <= MAX_ROWS:
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda") if autocast else weight.dtype
        # As cuBLAS: TF32 for float32 operands only where the runner allowed it.
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
        return _linear_triton(x, weight, bias, activation, dtype, precision, _sm_count(x.device))
    # Many rows, paired: a GEMM per half, each with its bias fused. (A batched GEMM, baddbmm, has
    # no bias epilogue, so its bias is copied out first, and it is the slower of the two:
    # benchmarks/RESULTS.md.)
    return _linear_torch(x, weight, bias, activation)


def _linear_torch(x, weight, bias, activation):
    if weight.dim() == 3:  # a pair: each half as the unpaired passes compute it, so the bits are theirs
        biases = bias if bias is not None and bias.dim() == 2 else (bias, bias)
        return torch.cat([_linear_torch(half, w, b, activation) for half, w, b in zip(x.chunk(2), weight, biases)])
    y = F.linear(x, weight, bias)
    return y if activation is None else ACTIVATIONS[activation](y)


@cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _linear_triton(x, weight, bias, activation, dtype, precision, sm_count):
    """`weight` [N, K], or a pair's [2, N, K] (each half of x's rows with its own, as linear);
    `dtype`: the operands' dtype in the dot and the output's; `precision`: "tf32" or "ieee"
    for float32 operands; `sm_count`: the programs to fill, over PROGRAMS_PER_SM."""
    pairs = 2 if weight.dim() == 3 else 1
    x = x.contiguous()
    # Each matrix row-major; a pair's two may lie anywhere (views of FlatParameters' two
    # buffers, or one weight twice, stride 0), so its stride between them is an argument.
    if weight.stride()[-2:] != (weight.shape[-1], 1):
        weight = weight.contiguous()
    if bias is not None and bias.stride(-1) != 1:
        bias = bias.contiguous()
    rows, k = len(x) // pairs, x.shape[1]
    n = weight.shape[-2]
    n_blocks, k_blocks = triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_K)
    # Split K until the grid has PROGRAMS_PER_SM programs a SM, at most one split per K block;
    # then even out the shares so that no split is empty.
    programs = PROGRAMS_PER_SM * sm_count // (1 if rows <= 64 else 2)
    splits = min(max(programs // (n_blocks * pairs), 1), k_blocks)
    blocks_per_split = triton.cdiv(k_blocks, splits)
    splits = triton.cdiv(k_blocks, blocks_per_split)
    block_r = triton.next_power_of_2(max(rows, 16))  # tl.dot needs 16 or more rows
    partials = torch.empty(pairs, splits if splits > 1 else 0, rows, n, dtype=torch.float32,
                           device=x.device)  # [pairs, S, R, N]
    out = torch.empty(pairs * rows, n, dtype=dtype, device=x.device)
    dot_dtype = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
    weight_pair_stride = weight.stride(0) if pairs == 2 else 0
    bias_pair_stride = bias.stride(0) if pairs == 2 and bias is not None and bias.dim() == 2 else 0
    # 3 stages: at BLOCK_R = 128 a stage holds 48 KB of float32 x and weight tiles in shared memory.
    # The loop counts are constexprs: a few values per model (one per weight shape), and Triton
    # 3.6's interpreter cannot loop to a runtime bound under numpy 2.4 (triton-lang/triton#9171).
    _split_k_kernel[(n_blocks, splits, pairs)](
        x, weight, bias, partials, _arrivals(x.device, pairs * n_blocks), out, rows, n, k,
        weight_pair_stride, bias_pair_stride,
        BLOCKS_PER_SPLIT=blocks_per_split, SPLITS=splits, HAS_BIAS=bias is not None, ACTIVATION=activation,
        DOT_DTYPE=dot_dtype, PRECISION=precision, BLOCK_R=block_r, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        num_warps=4, num_stages=3)
    return out


_ARRIVALS: dict[torch.device, torch.Tensor] = {}


def _arrivals(device: torch.device, n_blocks: int) -> torch.Tensor:
    """Zeroed int32 counters, one per column block, kept between calls (and so inside CUDA graphs):
    the last program of a block sets its counter back to zero."""
    counters = _ARRIVALS.get(device)
    if counters is None or len(counters) < n_blocks:
        counters = _ARRIVALS[device] = torch.zeros(max(n_blocks, 1024), dtype=torch.int32, device=device)
    return counters


if triton is not None:
    @triton.jit
    def _split_k_kernel(x_ptr, w_ptr, b_ptr, partials_ptr, arrivals_ptr, out_ptr, rows, n, k, w_pair_stride,
                        b_pair_stride, BLOCKS_PER_SPLIT: tl.constexpr, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                        ACTIVATION: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program (j, s, h): x [half h's rows, share s of K] @ weight[h][block j of N, share s of K].T
        -> partials[h, s]; the last of (h, j)'s programs to arrive writes out[half h's rows, block j].
        (h is 0 outside a pair.)"""
        block, split, half = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        x_ptr += half * rows * k
        w_ptr += half * w_pair_stride
        if HAS_BIAS:
            b_ptr += half * b_pair_stride
        out_ptr += half * rows * n
        partials_ptr += half * SPLITS * rows * n
        arrivals_ptr += half * tl.num_programs(0)
        r = tl.arange(0, BLOCK_R)
        cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        for step in range(BLOCKS_PER_SPLIT):
            ks = (split * BLOCKS_PER_SPLIT + step) * BLOCK_K + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + r[:, None] * k + ks[None, :], mask=(r[:, None] < rows) & (ks[None, :] < k),
                        other=0.0)                                                       # [BLOCK_R, BLOCK_K]
            w = tl.load(w_ptr + cols[None, :] * k + ks[:, None], mask=(cols[None, :] < n) & (ks[:, None] < k),
                        other=0.0)                                                       # [BLOCK_K, BLOCK_N] of Wᵀ
            acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)
        inside = (r[:, None] < rows) & (cols[None, :] < n)
        tile = r[:, None] * n + cols[None, :]
        if SPLITS == 1:
            _finish(acc, b_ptr, out_ptr, cols, n, tile, inside, HAS_BIAS, ACTIVATION)
        else:
            tl.store(partials_ptr + split * rows * n + tile, acc, mask=inside)
            # The barrier puts every thread's partials before the arrival, which acq_rel publishes
            # to the GPU; the last program then reads all partials past its L1 (.cg).
            tl.debug_barrier()
            if tl.atomic_add(arrivals_ptr + block, 1, sem="acq_rel") == SPLITS - 1:
                y = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
                # In split order, whichever program arrived last; unrolled, so that the loads are in
                # flight together (a loop waits for each in turn).
                for s in tl.static_range(SPLITS):
                    y += tl.load(partials_ptr + s * rows * n + tile, mask=inside, other=0.0, cache_modifier=".cg")
                _finish(y, b_ptr, out_ptr, cols, n, tile, inside, HAS_BIAS, ACTIVATION)
                tl.atomic_xchg(arrivals_ptr + block, 0)  # ready for the next call

    @triton.jit
    def _finish(y, b_ptr, out_ptr, cols, n, tile, inside, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):
        """out[tile] = activation(y + bias), in float32, then cast."""
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
        y = _activate(y, ACTIVATION)
        tl.store(out_ptr + tile, y.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _activate(y, ACTIVATION: tl.constexpr):
        """ACTIVATIONS' functions, in float32."""
        if ACTIVATION == "gelu":
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))     # x Φ(x), Φ via erf(x / √2)
        elif ACTIVATION == "gelu_new" or ACTIVATION == "gelu_pytorch_tanh":
            # 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = √(2/π) (x + 0.044715 x³): no tanh needed,
            # and no cancellation near 0.
            u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
            y = y * tl.sigmoid(2.0 * u)
        elif ACTIVATION == "relu":
            y = tl.maximum(y, 0.0)
        else:
            tl.static_assert(ACTIVATION is None, "unknown activation")
        return y
