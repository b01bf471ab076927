"""The trunk cache: exact reuse of everything below the lowest perturbed layer.

MeZO's +εz and −εz passes run with different weights, so nothing computed with perturbed
weights can be reused, and in a bidirectional encoder a token's key/value depend on every
later token too. What is exact: the hidden states entering layer `start` (the lowest layer
holding a perturbed tensor) depend only on the input tokens and on the frozen weights below
it. So they are the same in both passes, at every step and at evaluation, for as long as
those weights do not change. This cache keeps them, keyed by the exact token sequence (a
causal LM's candidate that continues its shared prompt, by the prompt's tokens and its own:
PackedBatch.sequences), and
checks a version of the frozen weights on every lookup: any in-place change or rebinding of
a tensor below `start` drops every entry (each entry depends on all of them).

Storage is paged: a pool of fixed-size token blocks, as a serving engine pages its KV cache.
A lookup whose sequences are all in the pool returns their pool rows (PoolRows), not a copy:
a CUDA graph gathers them inside its replay (engine/graphs.py), so a batch of hits costs the
host one index built from each entry's rows (kept on the host) and no kernel launch of its
own; an eager forward gathers them with one index_select. The last batch looked up is kept,
so the second pass of a MeZO step (and, at k=16, every later step) finds it ready.
Least-recently-used entries are evicted when the byte budget is reached, and on a GPU they
can spill to host memory instead of being dropped.

Every statistic is a counter incremented where the event happens.
"""

import functools
import operator
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property
from itertools import accumulate

import numpy as np
import torch

from zotune.layers.batch import PackedBatch, pack

BLOCK_TOKENS = 16
ZERO_ROW = 0  # block 0 of the pool holds zeros, never an entry: a CUDA graph's filler tokens read it
_VERSION = operator.attrgetter("_version")


@dataclass
class CacheStats:
    lookups: int = 0           # sequences looked up
    hits: int = 0              # of those, found (on the device or, with spill, in host memory)
    host_hits: int = 0         # hits served from host memory
    tokens_reused: int = 0     # tokens of the hits: their trunk layers were not run again
    flops_skipped: int = 0     # multiply-add FLOPs of the trunk layers the hits did not run
    evictions: int = 0         # entries pushed out of the device pool
    invalidations: int = 0     # times a frozen-weight change emptied the cache
    bytes_held: int = 0        # bytes of hidden states held now, device and host

    def report(self) -> dict:
        return {**asdict(self), "hit_rate": self.hits / self.lookups if self.lookups else 0.0}


@dataclass(frozen=True, eq=False)
class PoolRows:
    """A batch's hidden states as they lie in the cache: rows `index` of `pool`, not gathered.
    Valid until the cache next stores, evicts or clears (it then hands out new ones)."""
    pool: torch.Tensor    # [R, E], the cache's pool viewed as rows
    index: np.ndarray     # [T] int64, the pool row of each token of the batch

    @cached_property
    def hidden(self) -> torch.Tensor:
        """The rows gathered, [T, E], for an eager forward (kept: MeZO reads a batch twice a step)."""
        index = torch.from_numpy(self.index)
        if self.pool.is_cuda:  # from pinned memory: the copy does not wait for the GPU
            index = index.pin_memory().to(self.pool.device, non_blocking=True)
        return self.pool.index_select(0, index)

    @cached_property
    def twice(self) -> "PoolRows":
        """The rows of the batch twice over: a MeZO pair's input (PackedBatch.paired)."""
        return PoolRows(self.pool, np.concatenate([self.index, self.index]))


class TrunkCache:
    def __init__(self, start_layer: int, hidden_size: int, position_offset: int, budget_bytes: int,
                 device: torch.device, dtype: torch.dtype, frozen: list[torch.Tensor],
                 flops_per_sequence: Callable[[int], int], spill_to_host: bool = False):
        self.start_layer, self.position_offset = start_layer, position_offset
        self.hidden_size, self.device, self.dtype = hidden_size, device, dtype
        block_bytes = BLOCK_TOKENS * hidden_size * torch.finfo(dtype).bits // 8
        self.max_blocks = budget_bytes // block_bytes  # for entries; the zero block is extra
        self.block_bytes = block_bytes
        self.frozen = frozen
        self.flops_per_sequence = functools.lru_cache(maxsize=None)(flops_per_sequence)  # by length: few distinct
        self.spill_to_host = spill_to_host and device.type == "cuda"
        self.pool = torch.zeros(1, BLOCK_TOKENS, hidden_size, device=device, dtype=dtype)  # [blocks, 16, E]
        self.free: list[int] = []
        self.blocks_in_use = 0
        # tokens -> the pool rows holding them ([len] int64, on the host), in LRU order
        self.entries: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self.host: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self.version = self._frozen_version()
        self.stats = CacheStats()
        # The last batch looked up, once all its sequences are in the pool: (its keys, PoolRows,
        # tokens, FLOPs). MeZO looks each batch up twice per step (the ± passes), and at k=16 the
        # batch is the same at every step. Dropped whenever an entry is stored, evicted or cleared.
        self._last = None

    def _frozen_version(self) -> tuple:
        # _version counts in-place writes; data_ptr changes when a tensor is rebound. (map over
        # the C accessors takes less host time than a generator, and this runs at every lookup.)
        return (*map(torch.Tensor.data_ptr, self.frozen), *map(_VERSION, self.frozen))

    def hidden_states(self, batch: PackedBatch, trunk: Callable[[PackedBatch], torch.Tensor],
                      uses: int = 1) -> PoolRows | torch.Tensor:
        """Hidden states entering layer `start_layer` for every token of `batch`: their rows in
        the pool (PoolRows), or, when the budget cannot hold the whole batch, a [T, E] tensor.
        `trunk` computes them for a packed sub-batch of the sequences not in the cache. Callers
        must not write to the result.
        `uses`: the forward passes that will read the result (a whole MeZO step in one CUDA
        graph reads it 2n times). Each counts as a lookup of every sequence, and for every
        use after the first, a sequence computed for the first is a hit: its trunk does not
        run again."""
        version = self._frozen_version()
        if version != self.version:
            self.clear()
            self.version = version
            self.stats.invalidations += 1
        keys = batch.sequences
        self.stats.lookups += len(keys) * uses
        # If the last lookup was this batch (any other, or any store or eviction, replaces _last),
        # every sequence is a hit and the most recently used already: no LRU update.
        if self._last is None or self._last[0] != keys:
            pool_rows = list(map(self.entries.get, keys))
            if any(rows is None for rows in pool_rows):
                return self._fill(batch, trunk, uses)
            for key in keys:
                self.entries.move_to_end(key)
            self._hand_out(batch, pool_rows)
        _, rows, tokens, flops = self._last
        self._count_hits(len(keys) * uses, tokens * uses, flops * uses)
        return rows

    def _hand_out(self, batch: PackedBatch, pool_rows: list[np.ndarray]) -> PoolRows:
        """The PoolRows of a batch whose sequences are all in the pool (`pool_rows`, each
        sequence's), kept as the last lookup."""
        keys = batch.sequences
        rows = PoolRows(self.pool.view(-1, self.hidden_size), np.concatenate(pool_rows))
        self._last = (keys, rows, batch.num_tokens, sum(map(self.flops_per_sequence, batch.seq_lens)))
        return rows

    def _fill(self, batch: PackedBatch, trunk, uses: int) -> PoolRows | torch.Tensor:
        """A lookup with sequences outside the pool: compute the missing ones, bring spilled ones
        back, store them, and return the batch's hidden states as hidden_states does."""
        keys = batch.sequences
        missing = [b for b, key in enumerate(keys) if key not in self.entries and key not in self.host]
        missing_set = set(missing)
        hit = [b for b in range(len(keys)) if b not in missing_set]
        # A hit serves every use; a miss, computed for the first use, serves the others.
        served = [(b, uses) for b in hit] + [(b, uses - 1) for b in missing]
        lens = batch.seq_lens
        self._count_hits(sum(n for _, n in served), sum(lens[b] * n for b, n in served),
                         sum(self.flops_per_sequence(lens[b]) * n for b, n in served))
        for b in hit:
            if keys[b] in self.entries:
                self.entries.move_to_end(keys[b])
        # Storing never evicts a sequence of this batch, so the ones stored stay until it is read.
        protected = set(keys)
        unstored = {}  # b -> the [len, E] hidden states of a sequence the budget cannot hold
        for b in hit:
            if keys[b] in self.host:
                self.stats.host_hits += 1
                rows = self.host.pop(keys[b]).to(self.device, non_blocking=True)
                if not self._store(keys[b], rows, protected):
                    unstored[b] = rows
        for b, rows in self._compute(batch, missing, trunk):
            if not self._store(keys[b], rows, protected):
                unstored[b] = rows
        self.stats.bytes_held = (self.blocks_in_use * self.block_bytes
                                 + sum(t.numel() * t.element_size() for t in self.host.values()))
        if not unstored:
            return self._hand_out(batch, [self.entries[key] for key in keys])
        # The budget cannot hold the whole batch: assemble it, from the pool and from what was computed.
        out = torch.empty(batch.num_tokens, self.hidden_size, device=self.device, dtype=self.dtype)  # [T, E]
        in_pool = [b for b in range(len(keys)) if b not in unstored]
        if in_pool:
            out[self._rows(batch, in_pool)] = self.pool.view(-1, self.hidden_size)[
                self._to_device(np.concatenate([self.entries[keys[b]] for b in in_pool]))]
        for b, rows in unstored.items():
            out[self._rows(batch, [b])] = rows
        return out

    def _compute(self, batch: PackedBatch, missing: list[int], trunk) -> list[tuple[int, torch.Tensor]]:
        """(b, hidden states [len_b, E]) of the sequences `missing` of `batch`: packed alone, or,
        where sequences continue others (PackedBatch.context: candidates after their shared
        prompt), the whole batch as the forward would run it, so that its rows are those bits."""
        if not missing:
            return []
        if batch.context is not None:
            on_device = batch if batch.input_ids.device.type == self.device.type else batch.to(self.device)
            computed = trunk(on_device).split(batch.seq_lens)                  # [T, E] by sequence
            return [(b, computed[b]) for b in missing]
        sub = pack([list(batch.sequences[b]) for b in missing], None, self.position_offset).to(self.device)
        return list(zip(missing, trunk(sub).split(sub.seq_lens)))              # [T_missing, E] by sequence

    def _count_hits(self, hits: int, tokens: int, flops: int) -> None:
        self.stats.hits += hits
        self.stats.tokens_reused += tokens
        self.stats.flops_skipped += flops

    def _rows(self, batch: PackedBatch, seqs: list[int]) -> torch.Tensor:
        """Rows of the packed batch holding sequences `seqs`."""
        starts = [0, *accumulate(batch.seq_lens)]
        return self._to_device(np.concatenate([np.arange(starts[b], starts[b + 1]) for b in seqs]))

    def _to_device(self, index: np.ndarray) -> torch.Tensor:
        # Indices are built on the host and copied without a stream sync (torch.tensor(...,
        # device=cuda) would wait for the GPU to finish its queued work).
        return torch.from_numpy(index).to(self.device, non_blocking=True)

    def _store(self, key: tuple[int, ...], rows: torch.Tensor, protected: set) -> bool:
        """Keep `rows` in the pool, evicting least-recently-used entries outside `protected`;
        False if the budget cannot make room."""
        need = -(-len(rows) // BLOCK_TOKENS)
        if key in self.entries:
            return True  # (a sequence twice in one batch)
        if need > self.max_blocks:
            return False  # larger than the whole budget: recomputed each time, never cached
        while len(self.free) < need:
            if self.pool.shape[0] - 1 < self.max_blocks:
                self._grow(need)
            elif not self._evict_lru(protected):
                return False
        self._last = None
        blocks = np.array([self.free.pop() for _ in range(need)])
        index = (blocks[:, None] * BLOCK_TOKENS + np.arange(BLOCK_TOKENS)).ravel()[:len(rows)]
        self.pool.view(-1, self.hidden_size)[self._to_device(index)] = rows
        self.entries[key] = index
        self.blocks_in_use += need
        return True

    def _grow(self, need: int) -> None:
        old = self.pool.shape[0]
        new = 1 + min(self.max_blocks, max((old - 1) * 2, old - 1 + need, 64))
        pool = torch.empty(new, BLOCK_TOKENS, self.hidden_size, device=self.device, dtype=self.dtype)
        pool[:old] = self.pool
        self.pool = pool
        self.free += list(range(new - 1, old - 1, -1))

    def _evict_lru(self, protected: set) -> bool:
        """Evict the least recently used entry outside `protected`; False if there is none."""
        key = next((k for k in self.entries if k not in protected), None)
        if key is None:
            return False
        index = self.entries.pop(key)
        self._last = None
        if self.spill_to_host:
            self.host[key] = self.pool.view(-1, self.hidden_size)[self._to_device(index)].cpu()
        self._free(index)
        self.stats.evictions += 1
        return True

    def _free(self, index: np.ndarray) -> None:
        """Return the blocks of an entry's pool rows to the free list."""
        blocks = (index[::BLOCK_TOKENS] // BLOCK_TOKENS).tolist()
        self.free += blocks
        self.blocks_in_use -= len(blocks)

    def clear(self) -> None:
        self._last = None
        for index in self.entries.values():
            self._free(index)
        self.entries.clear()
        self.host.clear()
