"""Block-diagonal (variable-length) attention over a packed batch.

Each sequence attends only to itself (plus optional prefix key/values shared by all
sequences, for prefix tuning), so no padding token is ever computed. In a MeZO pair
(PackedBatch.paired) the prefix is [2, P, N, D]: the first half's sequences attend to
prefix[0] (theta + eps z), the others to prefix[1].

A decoder (model/causal_lm.py) asks for `causal` attention: token i of a sequence attends to
the sequence's tokens 0..i and to the whole prefix, which precedes the sequence (as a Hugging
Face past_key_values cache would: the alignment is bottom-right, FlashAttention's). Its keys
and values may have fewer heads than its queries (grouped-query attention, Ainslie et al.
2023): query head h reads key/value head h // (N / N_kv). Every attention of a model goes
through varlen_attention with the PackedBatch, so that a layout the batch describes is one
change here, not in each model: with a SharedContext (layers/batch.py) a sequence attends to
its context's keys and values (its prompt, computed once for every candidate after it), then
causally to its own, the prefix (if any) before both. Within one forward the weights are
fixed, so this is exactly the attention of the context and the sequence packed as one. The
same holds across the forwards of greedy decoding, whose keys and values a KeyValueCache keeps:
there k and v hold the cached rows, then the batch's, and the SharedContext indexes both.

With `masks_only` (the last layer, model/roberta.py) there is one query per sequence, at its
<mask>. On CUDA a Triton kernel computes those in float32, one program per (query, head): a
FlashAttention call, with its bf16 casts, costs far more than the few dot products a head that
this is.

Which kernel runs (attention_kernel) follows the run's precision (engine/precision.py) the way
layers/linear.py does, through torch.backends.cuda.matmul.allow_tf32, which the precision
context sets: off ("float32") means exact float32 attention too, on ("tf32", "bf16") allows
FlashAttention's bf16 kernel for the queries over all tokens.

Shape notation: T = packed tokens, B = sequences, M = <mask> queries, P = prefix length, N = heads,
G = key/value heads (N, or fewer under grouped-query attention), D = head dim.
"""

import functools

import torch
import torch.nn.functional as F

from zotune.layers.batch import PackedBatch

try:
    import triton
    import triton.language as tl
except ImportError:  # torch's CPU wheels come without triton
    triton = None


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch,
                     prefix_k: torch.Tensor | None = None, prefix_v: torch.Tensor | None = None,
                     dropout_p: float = 0.0, masks_only: bool = False, causal: bool = False) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(D)) v within each sequence. q: [T, N, D], k, v: [T, G, D] -> [T, N, D]
    (G = N, or a divisor of N: grouped-query attention); a prefix is [P, G, D] (a pair's
    [2, P, G, D]). With `masks_only`, q is [M, N, D], the query at each sequence's <mask> (one
    per sequence, in order), and so is the output. With `causal`, token i attends to its
    sequence's tokens 0..i and to the whole prefix."""
    if masks_only and causal:
        raise ValueError("masks_only is the encoder's <mask> queries; a causal model selects its rows itself")
    kernel = attention_kernel(q.device.type, masks_only, dropout_p, not torch.backends.cuda.matmul.allow_tf32)
    if kernel == "mask-queries":
        return _mask_queries_triton(q, k, v, batch, prefix_k, prefix_v)
    if kernel == "flash-bf16":
        return _flash_varlen(q, k, v, batch, prefix_k, prefix_v, causal)
    if kernel == "dense-float32":
        return _dense_float32(q, k, v, batch, prefix_k, prefix_v, causal)
    if kernel == "dense-dropout":
        return _block_diagonal(q, k, v, batch, prefix_k, prefix_v, causal, dropout_p, masks_only)
    return _per_sequence(q, k, v, batch, prefix_k, prefix_v, masks_only, causal)


def attention_kernel(device_type: str, masks_only: bool, dropout_p: float, exact_float32: bool) -> str:
    """The kernel that computes attention:
      "dense-dropout"  attention dropout (the backprop baseline's training forward), anywhere:
                       one SDPA call for the whole batch under a block-diagonal mask, in q's dtype
      "per-sequence"   the CPU otherwise: one SDPA call a sequence, float32
      "mask-queries"   CUDA, the last layer's <mask> queries: the Triton kernel, float32
      "flash-bf16"     CUDA, queries over all tokens, TF32 allowed: FlashAttention varlen, bf16
      "dense-float32"  CUDA, queries over all tokens, exact float32 (--precision float32): one
                       SDPA call (the math kernel) under a block-diagonal mask, float32
    `exact_float32`: TF32 is off (the "float32" precision)."""
    if dropout_p != 0.0:
        return "dense-dropout"
    if device_type != "cuda":
        return "per-sequence"
    if masks_only:
        return "mask-queries"
    return "dense-float32" if exact_float32 else "flash-bf16"


def _per_sequence(q, k, v, batch, prefix_k, prefix_v, masks_only, causal=False):
    # The reference path (the CPU without dropout): one SDPA call per sequence. Exact and
    # padding-free; the Python loop costs microseconds per sequence.
    outputs = []
    queries = q.split(1) if masks_only else q.split(batch.seq_lens)
    if batch.context is None:
        keys, values = k.split(batch.seq_lens), v.split(batch.seq_lens)
    else:  # each sequence's context rows, then its own (SharedContext.key_rows)
        rows = batch.context.key_rows.split(torch.diff(batch.context.cu_seqlens_k).tolist())
        keys, values = [k[r] for r in rows], [v[r] for r in rows]
    for b, (qb, kb, vb) in enumerate(zip(queries, keys, values)):
        n_before = len(kb) - len(qb) if causal else 0  # keys before the sequence's own: its context's
        if prefix_k is not None:
            half = 0 if b < batch.pair_seqs else 1
            kb = torch.cat([prefix_k if prefix_k.dim() == 3 else prefix_k[half], kb])  # [P + before + L, G, D]
            vb = torch.cat([prefix_v if prefix_v.dim() == 3 else prefix_v[half], vb])
            n_before += prefix_k.shape[-3]
        # SDPA's is_causal aligns top-left; after a prefix or context the queries sit at the bottom right.
        mask = _causal_mask(len(qb), n_before, q.device) if causal and n_before else None
        out = F.scaled_dot_product_attention(                           # [N, L, D]
            qb.transpose(0, 1), kb.transpose(0, 1), vb.transpose(0, 1), attn_mask=mask,
            is_causal=causal and not n_before, enable_gqa=kb.shape[1] != qb.shape[1])
        outputs.append(out.transpose(0, 1))                             # [L, N, D]
    return torch.cat(outputs)                                           # [T, N, D]


def _causal_mask(length: int, n_prefix: int, device) -> torch.Tensor:
    """[L, P+L] bool: query i sees the P prefix keys and keys 0..i of its sequence."""
    return torch.ones(length, n_prefix + length, dtype=torch.bool, device=device).tril(n_prefix)


def _flash_varlen(q, k, v, batch, prefix_k, prefix_v, causal=False):
    # FlashAttention's varlen kernel reads cu_seqlens directly: one launch for the whole
    # batch. It computes in bf16; the caller's matmuls stay in their own precision.
    from torch.nn.attention.varlen import varlen_attn

    dtype = q.dtype
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    k, v, cu_k, max_k = _keys_of_sequences(k, v, batch, prefix_k, prefix_v)
    grouped = {}
    if k.shape[1] != q.shape[1]:
        if _varlen_takes_gqa():
            grouped = {"enable_gqa": True}
        else:  # torch < 2.13's varlen_attn: each key/value head repeated for its group of query heads
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))  # [T_k, N, D]
    # window (-1, 0) is FlashAttention's causal mask, aligned bottom-right: past the prefix and context.
    out = varlen_attn(q, k, v, batch.cu_seqlens, cu_k, batch.max_seqlen, max_k,
                      window_size=(-1, 0) if causal else (-1, -1), **grouped)
    return out.to(dtype)


@functools.cache
def _varlen_takes_gqa() -> bool:
    import inspect

    from torch.nn.attention.varlen import varlen_attn
    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def _dense_float32(q, k, v, batch, prefix_k, prefix_v, causal=False):
    # Exact float32 on CUDA (issue 19): FlashAttention has no float32 kernel, and the reference
    # path's per-sequence split reads the host's sequence lengths, which a CUDA graph replaying
    # other batches of its bucket does not have. The math kernel's matmuls follow allow_tf32,
    # off here, so they run in IEEE float32; its [N, T, T + B*P] scores cost memory that the
    # bf16 kernel avoids.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return _block_diagonal(q.float(), k.float(), v.float(), batch, prefix_k, prefix_v, causal).to(q.dtype)


def _block_diagonal(q, k, v, batch, prefix_k, prefix_v, causal=False, dropout_p=0.0, masks_only=False):
    # All queries against all keys in one SDPA call, masked to each query's own sequence (its
    # prefix and context rows too); it reads only cu_seqlens, on the device. Under attention
    # dropout this replaces a call per sequence, whose autograd nodes and launches made the
    # backprop baseline's step host-bound (RESULTS.md, session 20): the masked scores cost B
    # times a sequence's, and dropout keeps its meaning, since a masked probability is 0.
    k, v, cu_k, _ = _keys_of_sequences(k, v, batch, prefix_k, prefix_v)
    seq_k = _sequence_of_rows(cu_k, k.shape[0])
    seq_q = torch.arange(q.shape[0], device=q.device) if masks_only else _sequence_of_rows(batch.cu_seqlens, q.shape[0])
    allowed = seq_q[:, None] == seq_k[None, :]                          # [T, T_k]
    if causal:  # key j of a sequence (prefix and context rows first) is seen by its queries i with j <= i + before
        before = torch.diff(cu_k) - torch.diff(batch.cu_seqlens)        # [B] keys before each sequence's own
        local_q = torch.arange(q.shape[0], device=q.device) - batch.cu_seqlens[seq_q]
        local_k = torch.arange(k.shape[0], device=k.device) - cu_k[seq_k]
        allowed &= local_k[None, :] <= (local_q + before[seq_q])[:, None]
    out = F.scaled_dot_product_attention(                                # [N, T, D]
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=allowed, dropout_p=dropout_p,
        enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(0, 1)                                          # [T, N, D]


def _sequence_of_rows(cu_seqlens: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows]: the sequence each packed row belongs to (rows = cu_seqlens[-1], given so that
    nothing reads the device)."""
    n_seq = cu_seqlens.shape[0] - 1
    return torch.repeat_interleave(torch.arange(n_seq, device=cu_seqlens.device), torch.diff(cu_seqlens),
                                   output_size=rows)


def _keys_of_sequences(k, v, batch, prefix_k, prefix_v):
    """Every sequence's keys and values back to back, for the kernels that read cu_seqlens_k:
    its prefix rows, its context's rows (SharedContext), then its own. Returns them
    [T_k (+ B*P), G, D], their cu_seqlens_k [B+1] and the most keys of a sequence."""
    cu_k, max_k = batch.cu_seqlens, batch.max_seqlen
    if batch.context is not None:
        k, v = k[batch.context.key_rows], v[batch.context.key_rows]    # [T_k, G, D]
        cu_k, max_k = batch.context.cu_seqlens_k, batch.context.max_seqlen_k
    if prefix_k is not None:
        k, v, cu_k = _prepend_prefix(k, v, prefix_k.to(k.dtype), prefix_v.to(v.dtype), cu_k, batch)
        max_k += prefix_k.shape[-3]
    return k, v, cu_k, max_k


def _prepend_prefix(k, v, prefix_k, prefix_v, cu_k, batch):
    """Interleave the shared prefix before every sequence's keys (offsets cu_k [B+1]):
    [T_k, N, D] -> [T_k + B*P, N, D], and the new offsets."""
    n_prefix, n_seq = prefix_k.shape[-3], len(batch.seq_lens)
    seq_of_token = torch.repeat_interleave(
        torch.arange(n_seq, device=k.device), torch.diff(cu_k), output_size=k.shape[0])
    token_rows = torch.arange(k.shape[0], device=k.device) + (seq_of_token + 1) * n_prefix
    prefix_rows = (cu_k[:-1, None] + torch.arange(n_seq, device=k.device)[:, None] * n_prefix
                   + torch.arange(n_prefix, device=k.device)[None, :]).flatten()      # [B*P]
    shape = (k.shape[0] + n_seq * n_prefix, *k.shape[1:])
    k_full, v_full = k.new_empty(shape), v.new_empty(shape)
    k_full[token_rows], v_full[token_rows] = k, v
    k_full[prefix_rows] = _prefix_rows_of_each_sequence(prefix_k, batch)
    v_full[prefix_rows] = _prefix_rows_of_each_sequence(prefix_v, batch)
    return k_full, v_full, cu_k + torch.arange(n_seq + 1, device=k.device, dtype=torch.int32) * n_prefix


def _prefix_rows_of_each_sequence(prefix, batch):
    """[P, N, D] (or a pair's [2, P, N, D]) -> [B*P, N, D], sequence after sequence."""
    n_seq = len(batch.seq_lens)
    if prefix.dim() == 3:
        return prefix.repeat(n_seq, 1, 1)
    return torch.cat([prefix[0].repeat(batch.pair_seqs, 1, 1), prefix[1].repeat(n_seq - batch.pair_seqs, 1, 1)])


# Keys a step of the mask-query kernel's loop: 64 keys spill registers at D = 128 on sm_90 (the
# register counts are in benchmarks/RESULTS.md); 32 do not, and a RoBERTa prompt of ~19 tokens
# still needs one step.
KEYS_BLOCK = 32


def _mask_queries_triton(q, k, v, batch, prefix_k, prefix_v):
    """softmax(q kᵀ / sqrt(D)) v in float32 for q: [M, N, D], query b at sequence b's <mask>
    (in a pair's second half, sequence b + pair_gap) -> [M, N, D] in q's dtype. M may be fewer
    than B: a CUDA graph's filler sequences have no mask."""
    num_queries, num_heads, head_dim = q.shape
    n_prefix = 0 if prefix_k is None else prefix_k.shape[-3]
    if prefix_k is None:  # k and v stand in for the pointers: HAS_PREFIX off, never read
        prefix_k, prefix_v = k, v
    # A [P, N, D] prefix serves both halves of a pair: a stride-0 view of it as [2, P, N, D].
    prefix_k, prefix_v = (t if t.dim() == 4 else t.expand(2, *t.shape) for t in (prefix_k, prefix_v))
    assert all(t.stride(-1) == 1 for t in (q, k, v, prefix_k, prefix_v)), "head dims must be contiguous"
    out = torch.empty_like(q)
    _mask_query_kernel[(num_queries, num_heads)](
        q, k, v, prefix_k, prefix_v, batch.cu_seqlens, out, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2],
        *prefix_k.stride()[:3], *prefix_v.stride()[:3], *out.stride()[:2], batch.pair_seqs, batch.pair_gap, n_prefix,
        head_dim ** -0.5, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), HAS_PREFIX=n_prefix > 0,
        BLOCK_P=triton.next_power_of_2(max(n_prefix, 1)), BLOCK_L=KEYS_BLOCK)
    return out


if triton is not None:
    # pair_seqs changes with the batch size; specialised (on == 1, or on % 16) it would compile
    # the kernel again for some of them.
    @triton.jit(do_not_specialize=["pair_seqs", "pair_gap"])
    def _mask_query_kernel(q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, cu_ptr, out_ptr, q_row, q_head, k_row, k_head,
                           v_row, v_head, pk_half, pk_row, pk_head, pv_half, pv_row, pv_head, out_row, out_head,
                           pair_seqs, pair_gap, n_prefix, scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                           HAS_PREFIX: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr):
        """Program (b, h): sequence b's <mask> query at head h, over the prefix (if any) and then
        the sequence's keys, BLOCK_L at a time, all in float32."""
        b, h = tl.program_id(0), tl.program_id(1)
        half = (b >= pair_seqs).to(tl.int32)  # 1 in a pair's second half (and outside a pair)
        seq = b + half * pair_gap  # pair_gap is 0 outside a pair
        d = tl.arange(0, BLOCK_D)
        in_d = d < HEAD_DIM
        q = tl.load(q_ptr + b * q_row + h * q_head + d, mask=in_d, other=0.0).to(tl.float32) * scale   # [D]
        best = tl.full((), -float("inf"), tl.float32)  # the running max of the scores,
        total = tl.full((), 0.0, tl.float32)           # sum of exp(score - best)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)   # and sum of exp(score - best) * value [D]
        if HAS_PREFIX:
            p = tl.arange(0, BLOCK_P)  # a pair's second half reads prefix[1]
            best, total, acc = _online_softmax_step(                               # all P rows in one block
                q, pk_ptr + half * pk_half + p[:, None] * pk_row + h * pk_head + d[None, :],
                pv_ptr + half * pv_half + p[:, None] * pv_row + h * pv_head + d[None, :], p < n_prefix, in_d,
                best, total, acc)
        t = tl.load(cu_ptr + seq)
        end = tl.load(cu_ptr + seq + 1)
        # A while loop: Triton 3.6's interpreter cannot run `for` to a runtime bound under
        # numpy 2.4 (triton-lang/triton#9171), and the tests run the kernel there.
        while t < end:
            rows = t + tl.arange(0, BLOCK_L)
            best, total, acc = _online_softmax_step(
                q, k_ptr + rows[:, None] * k_row + h * k_head + d[None, :],
                v_ptr + rows[:, None] * v_row + h * v_head + d[None, :], rows < end, in_d, best, total, acc)
            t += BLOCK_L
        tl.store(out_ptr + b * out_row + h * out_head + d, (acc / total).to(out_ptr.dtype.element_ty), mask=in_d)

    @triton.jit
    def _online_softmax_step(q, key_ptrs, value_ptrs, valid, in_d, best, total, acc):
        """Fold a block of keys and values ([L, D] pointers; rows where `valid`) into the running
        max, sum and weighted sum of q's softmax: the online softmax of FlashAttention."""
        inside = valid[:, None] & in_d[None, :]
        keys = tl.load(key_ptrs, mask=inside, other=0.0).to(tl.float32)                 # [L, D]
        values = tl.load(value_ptrs, mask=inside, other=0.0).to(tl.float32)
        scores = tl.where(valid, tl.sum(keys * q[None, :], axis=1), -float("inf"))     # [L]
        new_best = tl.maximum(best, tl.max(scores, axis=0))
        rescale = tl.exp(best - new_best)  # 0 at the first block, where best is -inf
        weights = tl.exp(scores - new_best)
        acc = acc * rescale + tl.sum(weights[:, None] * values, axis=0)
        total = total * rescale + tl.sum(weights, axis=0)
        return new_best, total, acc
