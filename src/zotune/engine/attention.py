"""Block-diagonal (variable-length) attention over a packed batch.

Each sequence attends only to itself (plus optional prefix key/values shared by all
sequences, for prefix tuning), so no padding token is ever computed. In a MeZO pair
(PackedBatch.paired) the prefix is [2, P, N, D]: the first half's sequences attend to
prefix[0] (theta + eps z), the others to prefix[1].

Shape notation: T = packed tokens, B = sequences, P = prefix length, N = heads, D = head dim.
"""

import torch
import torch.nn.functional as F

from zotune.engine.batch import PackedBatch


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch,
                     prefix_k: torch.Tensor | None = None, prefix_v: torch.Tensor | None = None,
                     dropout_p: float = 0.0, masks_only: bool = False) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(D)) v within each sequence. q, k, v: [T, N, D] -> [T, N, D].
    With `masks_only`, q is [M, N, D], the query at each sequence's <mask> (one per sequence,
    in order), and so is the output."""
    if q.is_cuda and dropout_p == 0.0:
        return _flash_varlen(q, k, v, batch, prefix_k, prefix_v, masks_only)
    return _per_sequence(q, k, v, batch, prefix_k, prefix_v, dropout_p, masks_only)


def _per_sequence(q, k, v, batch, prefix_k, prefix_v, dropout_p, masks_only):
    # The reference path (CPU, and training with attention dropout): one SDPA call per
    # sequence. Exact and padding-free; the Python loop costs microseconds per sequence.
    outputs = []
    queries = q.split(1) if masks_only else q.split(batch.seq_lens)
    for b, (qb, kb, vb) in enumerate(zip(queries, k.split(batch.seq_lens), v.split(batch.seq_lens))):
        if prefix_k is not None:
            half = 0 if b < batch.pair_seqs else 1
            kb = torch.cat([prefix_k if prefix_k.dim() == 3 else prefix_k[half], kb])  # [P+L, N, D]
            vb = torch.cat([prefix_v if prefix_v.dim() == 3 else prefix_v[half], vb])
        out = F.scaled_dot_product_attention(                           # [N, L, D]
            qb.transpose(0, 1), kb.transpose(0, 1), vb.transpose(0, 1), dropout_p=dropout_p)
        outputs.append(out.transpose(0, 1))                             # [L, N, D]
    return torch.cat(outputs)                                           # [T, N, D]


def _flash_varlen(q, k, v, batch, prefix_k, prefix_v, masks_only):
    # FlashAttention's varlen kernel reads cu_seqlens directly: one launch for the whole
    # batch. It computes in bf16; the caller's matmuls stay in their own precision.
    from torch.nn.attention.varlen import varlen_attn

    dtype = q.dtype
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    cu_k, max_k = batch.cu_seqlens, batch.max_seqlen
    if prefix_k is not None:
        k, v, cu_k = _prepend_prefix(k, v, prefix_k.to(k.dtype), prefix_v.to(v.dtype), batch)
        max_k += prefix_k.shape[-3]
    if masks_only:
        # Query b is row b. A CUDA graph's filler sequence (past the last mask) is left out.
        cu_q, max_q = torch.arange(len(q) + 1, dtype=torch.int32, device=q.device), 1
        cu_k = cu_k[:len(q) + 1]
    else:
        cu_q, max_q = batch.cu_seqlens, batch.max_seqlen
    out = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k)
    return out.to(dtype)


def _prepend_prefix(k, v, prefix_k, prefix_v, batch):
    """Interleave the shared prefix before every sequence: [T, N, D] -> [T + B*P, N, D]."""
    n_prefix, n_seq = prefix_k.shape[-3], len(batch.seq_lens)
    seq_of_token = torch.repeat_interleave(
        torch.arange(n_seq, device=k.device), torch.diff(batch.cu_seqlens), output_size=k.shape[0])
    token_rows = torch.arange(k.shape[0], device=k.device) + (seq_of_token + 1) * n_prefix
    prefix_rows = (batch.cu_seqlens[:-1, None] + torch.arange(n_seq, device=k.device)[:, None] * n_prefix
                   + torch.arange(n_prefix, device=k.device)[None, :]).flatten()      # [B*P]
    shape = (k.shape[0] + n_seq * n_prefix, *k.shape[1:])
    k_full, v_full = k.new_empty(shape), v.new_empty(shape)
    k_full[token_rows], v_full[token_rows] = k, v
    k_full[prefix_rows] = _prefix_rows_of_each_sequence(prefix_k, batch)
    v_full[prefix_rows] = _prefix_rows_of_each_sequence(prefix_v, batch)
    cu_k = batch.cu_seqlens + torch.arange(n_seq + 1, device=k.device, dtype=torch.int32) * n_prefix
    return k_full, v_full, cu_k


def _prefix_rows_of_each_sequence(prefix, batch):
    """[P, N, D] (or a pair's [2, P, N, D]) -> [B*P, N, D], sequence after sequence."""
    n_seq = len(batch.seq_lens)
    if prefix.dim() == 3:
        return prefix.repeat(n_seq, 1, 1)
    return torch.cat([prefix[0].repeat(batch.pair_seqs, 1, 1), prefix[1].repeat(n_seq - batch.pair_seqs, 1, 1)])
