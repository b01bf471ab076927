"""The packed batch: every sequence flattened into one token tensor, no padding.

Shape notation: T = tokens in the batch, B = sequences, M = <mask> positions (one per
sequence for prompt classification, so M = B), T_k = keys of all sequences (SharedContext).
"""

import itertools
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import torch


@dataclass(frozen=True)
class SharedContext:
    """Sequences that continue another sequence of the same batch: a causal LM's candidates
    after the prompt they share (engine/candidates.py), which is computed once. Sequence b
    attends first to every row of sequence of[b], its context (packed earlier in the batch),
    then causally to its own rows, whose positions continue after the context's. A context has
    no context of its own. Or sequences that continue rows earlier forwards computed (greedy
    decoding's KeyValueCache, engine/generate.py; of[b] is -1 there): key_rows then index the
    cached rows followed by the batch's own. Read by layers/attention.py alone."""
    of: tuple[int, ...]         # host: per sequence, the sequence it continues, or -1
    key_rows: torch.Tensor      # [T_k] int64: per sequence, the rows it attends to: its context's (or cached), then its own
    cu_seqlens_k: torch.Tensor  # [B+1] int32: sequence b's keys are key_rows[cu_seqlens_k[b]:cu_seqlens_k[b+1]]
    max_seqlen_k: int           # the most keys of any sequence

    def to(self, move) -> "SharedContext":
        """Its tensors through `move` (PackedBatch.to's copy to a device)."""
        return replace(self, key_rows=move(self.key_rows), cu_seqlens_k=move(self.cu_seqlens_k))

    def twice(self, num_tokens: int) -> "SharedContext":
        """The context of PackedBatch.paired: the second half's sequences continue its own."""
        n_seq = len(self.of)
        return SharedContext(self.of + tuple(o + n_seq if o >= 0 else -1 for o in self.of),
                             torch.cat([self.key_rows, self.key_rows + num_tokens]),
                             torch.cat([self.cu_seqlens_k, self.cu_seqlens_k[1:] + len(self.key_rows)]),
                             self.max_seqlen_k)


def shared_context(of: list[int], seq_lens: tuple[int, ...]) -> SharedContext:
    """The SharedContext of sequences (lengths `seq_lens`) where sequence b continues of[b] (-1: none)."""
    starts = np.concatenate([[0], np.cumsum(seq_lens)[:-1]]).astype(np.int64)
    own = [np.arange(s, s + n) for s, n in zip(starts, seq_lens)]
    if any(o >= 0 and of[o] >= 0 for o in of) or any(o >= b for b, o in enumerate(of)):
        raise ValueError("a context must be an earlier sequence without a context of its own")
    return context_of_keys(of, [np.concatenate([own[o], rows]) if o >= 0 else rows for o, rows in zip(of, own)])


def context_of_keys(of: list[int] | tuple[int, ...], keys: list[np.ndarray]) -> SharedContext:
    """The SharedContext whose sequence b attends to the rows keys[b] (int64: its context's or
    cached rows, then its own), in that order."""
    counts = np.array([len(k) for k in keys], dtype=np.int64)
    return SharedContext(tuple(of), torch.from_numpy(np.concatenate(keys)),
                         torch.from_numpy(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)), int(counts.max()))


@dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor   # [T] int64, sequences back to back
    positions: torch.Tensor   # [T] int64, position-embedding index of each token
    cu_seqlens: torch.Tensor  # [B+1] int32, sequence b is tokens cu_seqlens[b]:cu_seqlens[b+1]
    # [M] int64, index into T of the rows the head reads: each sequence's <mask> token (MaskedLM),
    # or the rows whose next token is scored, any number per sequence (CausalLM's score_index)
    mask_index: torch.Tensor
    seq_lens: tuple[int, ...]  # host copy of the lengths, so nothing needs a device sync
    sequences: tuple[tuple[int, ...], ...]  # host copy of the tokens: the trunk cache's keys
    max_seqlen: int            # an upper bound on seq_lens for the attention kernel (a CUDA graph
                               # fixes it at capture; pack() gives the exact maximum)
    # A MeZO pair (see paired): the first pair_seqs sequences run at theta + eps z and the rest
    # at theta - eps z. 0 in an ordinary batch.
    pair_seqs: int = 0
    # Sequences without a <mask> between a pair's halves: a CUDA graph pads each half apart, so
    # that each is half of the rows (engine/graphs.py), and the first half's filler lies between.
    pair_gap: int = 0
    # Sequences that attend to an earlier one's rows before their own (a causal LM's candidates
    # sharing their prompt, engine/candidates.py); None: each sequence attends to itself only.
    # Their `sequences` entries are (their context's tokens, their own): the trunk cache's keys.
    context: SharedContext | None = None

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens)

    def to(self, device: torch.device | str) -> "PackedBatch":
        device = torch.device(device)
        # From pinned memory the copy is truly asynchronous: the host does not wait for the GPU.
        move = (lambda t: t.pin_memory().to(device, non_blocking=True)) if device.type == "cuda" \
            else (lambda t: t.to(device))  # noqa: E731
        return replace(self, input_ids=move(self.input_ids), positions=move(self.positions),
                       cu_seqlens=move(self.cu_seqlens), mask_index=move(self.mask_index),
                       context=None if self.context is None else self.context.to(move))

    @cached_property
    def paired(self) -> "PackedBatch":
        """The batch twice over, as one batch: MeZO's +eps z and -eps z passes over the same
        sequences run together, so every frozen weight is read once for both (a few small
        device-side concatenations). Built once per batch: at k=16 every step trains on the
        same batch object, and a CUDA graph then finds this one already loaded."""
        n = self.num_tokens
        return PackedBatch(
            torch.cat([self.input_ids, self.input_ids]), torch.cat([self.positions, self.positions]),
            torch.cat([self.cu_seqlens, self.cu_seqlens[1:] + n]), torch.cat([self.mask_index, self.mask_index + n]),
            self.seq_lens * 2, self.sequences * 2, self.max_seqlen, pair_seqs=len(self.seq_lens),
            context=None if self.context is None else self.context.twice(n))


def pack(sequences: list[list[int]], mask_token_id: int | None, position_offset: int) -> PackedBatch:
    """Flatten token sequences into a PackedBatch on the CPU (the runner moves it once).

    Each sequence must hold exactly one `mask_token_id` (None: no mask positions, for
    runs that need hidden states only). `position_offset` is where
    positions start: RoBERTa numbers tokens from padding_idx + 1 (= 2), BERT from 0.
    """
    if not sequences:
        raise ValueError("pack() needs at least one sequence")
    # In numpy: a pack is a dozen small array operations, each cheaper than its torch
    # counterpart on the host, and k=512 packs a new batch at every step.
    seq_lens = tuple(map(len, sequences))
    lens = np.array(seq_lens, dtype=np.int64)
    ends = np.cumsum(lens)
    input_ids = np.fromiter(itertools.chain.from_iterable(sequences), np.int64, count=int(ends[-1]))
    positions = np.arange(len(input_ids)) - np.repeat(ends - lens, lens) + position_offset
    cu_seqlens = np.concatenate([[0], ends]).astype(np.int32)
    if mask_token_id is None:
        mask_index = np.empty(0, dtype=np.int64)                            # [0]
    else:
        mask_index = np.flatnonzero(input_ids == mask_token_id)             # [M]
        if not np.array_equal(np.searchsorted(ends, mask_index, side="right"), np.arange(len(sequences))):
            raise ValueError("every packed sequence must contain exactly one <mask> token")
    return PackedBatch(*map(torch.from_numpy, (input_ids, positions, cu_seqlens, mask_index)), seq_lens,
                       tuple(map(tuple, sequences)), max(seq_lens))
