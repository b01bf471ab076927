"""The trunk cache: exact reuse of everything below the lowest perturbed layer.

MeZO's +εz and −εz passes run with different weights, so nothing computed with perturbed
weights can be reused, and in a bidirectional encoder a token's key/value depend on every
later token too. What is exact: the hidden states entering layer `start` (the lowest layer
holding a perturbed tensor) depend only on the input tokens and on the frozen weights below
it. So they are the same in both passes, at every step and at evaluation, for as long as
those weights do not change. This cache keeps them, keyed by the exact token sequence, and
checks a version of the frozen weights on every lookup: any in-place change or rebinding of
a tensor below `start` drops every entry (each entry depends on all of them).

Storage is paged: a pool of fixed-size token blocks, as a serving engine pages its KV cache.
A batch of hits is gathered with one index_select (each entry keeps its pool rows on the
host, so building the index is one concatenation); sequences never get a copy each, and the
last batch stays gathered, so the second pass of a MeZO step (and, at k=16, every later step)
costs no gather at all.
Least-recently-used entries are evicted when the byte budget is reached, and on a GPU they
can spill to host memory instead of being dropped.

Every statistic is a counter incremented where the event happens.
"""

import functools
import operator
from collections import OrderedDict
from itertools import accumulate
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from zotune.engine.batch import PackedBatch, pack

BLOCK_TOKENS = 16
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


class TrunkCache:
    def __init__(self, start_layer: int, hidden_size: int, position_offset: int, budget_bytes: int,
                 device: torch.device, dtype: torch.dtype, frozen: list[torch.Tensor],
                 flops_per_sequence: Callable[[int], int], spill_to_host: bool = False):
        self.start_layer, self.position_offset = start_layer, position_offset
        self.hidden_size, self.device, self.dtype = hidden_size, device, dtype
        block_bytes = BLOCK_TOKENS * hidden_size * torch.finfo(dtype).bits // 8
        self.max_blocks = budget_bytes // block_bytes
        self.block_bytes = block_bytes
        self.frozen = frozen
        self.flops_per_sequence = functools.lru_cache(maxsize=None)(flops_per_sequence)  # by length: few distinct
        self.spill_to_host = spill_to_host and device.type == "cuda"
        self.pool = torch.empty(0, BLOCK_TOKENS, hidden_size, device=device, dtype=dtype)  # [blocks, 16, E]
        self.free: list[int] = []
        self.blocks_in_use = 0
        # tokens -> the pool rows holding them ([len] int64, on the host), in LRU order
        self.entries: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self.host: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self.version = self._frozen_version()
        self.stats = CacheStats()
        # The last batch looked up, once all its sequences are in the pool, as gathered: (its keys,
        # [T, E] hidden states, tokens, FLOPs). MeZO looks each batch up twice per step (the ±
        # passes), and at k=16 the batch is the same at every step. Dropped whenever an entry is
        # stored, evicted or cleared.
        self._last = None

    def _frozen_version(self) -> tuple:
        # _version counts in-place writes; data_ptr changes when a tensor is rebound. (map over
        # the C accessors: ~20 % less host time than a generator, and this runs at every lookup.)
        return (*map(torch.Tensor.data_ptr, self.frozen), *map(_VERSION, self.frozen))

    def hidden_states(self, batch: PackedBatch, trunk: Callable[[PackedBatch], torch.Tensor],
                      uses: int = 1) -> torch.Tensor:
        """Hidden states entering layer `start_layer` for every token of `batch`: [T, E].
        `trunk` computes them for a packed sub-batch of the sequences not in the cache. The
        result may be shared with the next lookup of the same batch: callers must not write to it.
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
        if self._last is not None and self._last[0] == keys:  # every sequence a hit, gathered before
            # The last lookup was this batch (any other, or any store or eviction, replaces
            # _last), so its keys are the most recently used already: no LRU update.
            _, out, tokens, flops = self._last
            self._count_hits(len(keys) * uses, tokens * uses, flops * uses)
            return out
        pool_rows = [self.entries.get(key) for key in keys]
        if all(rows is not None for rows in pool_rows):  # every sequence a hit in the pool: one gather, in order
            for key in keys:
                self.entries.move_to_end(key)
            out = self.pool.view(-1, self.hidden_size).index_select(0, self._pool_index(pool_rows))
            tokens, flops = batch.num_tokens, sum(map(self.flops_per_sequence, map(len, keys)))
            self._count_hits(len(keys) * uses, tokens * uses, flops * uses)
            self._last = (keys, out, tokens, flops)
            return out
        missing = [b for b, key in enumerate(keys) if key not in self.entries and key not in self.host]
        missing_set = set(missing)
        hit = [b for b in range(len(keys)) if b not in missing_set]
        # A hit serves every use; a miss, computed for the first use, serves the others.
        served = [(b, uses) for b in hit] + [(b, uses - 1) for b in missing]
        self._count_hits(sum(n for _, n in served), sum(len(keys[b]) * n for b, n in served),
                         sum(self.flops_per_sequence(len(keys[b])) * n for b, n in served))

        # Hits in the pool are gathered first, before storing anything can evict them (the
        # stream runs the gather before any later write to their blocks).
        in_pool = [b for b in hit if keys[b] in self.entries]
        for b in in_pool:
            self.entries.move_to_end(keys[b])
        out = torch.empty(batch.num_tokens, self.hidden_size, device=self.device, dtype=self.dtype)  # [T, E]
        if in_pool:
            out[self._rows(batch, in_pool)] = self.pool.view(-1, self.hidden_size)[
                self._pool_index([self.entries[keys[b]] for b in in_pool])]
        for b in hit:
            if keys[b] in self.host:
                self.stats.host_hits += 1
                rows = self.host.pop(keys[b]).to(self.device, non_blocking=True)
                out[self._rows(batch, [b])] = rows
                self._store(keys[b], rows)
        if missing:
            sub = pack([list(keys[b]) for b in missing], None, self.position_offset).to(self.device)
            computed = trunk(sub)                                               # [T_missing, E]
            out[self._rows(batch, missing)] = computed
            for key, rows in zip(sub.sequences, computed.split(sub.seq_lens)):
                self._store(key, rows)
        if all(key in self.entries for key in keys):  # (a budget smaller than the batch may not hold them all)
            self._last = (keys, out, batch.num_tokens, sum(map(self.flops_per_sequence, map(len, keys))))
        self.stats.bytes_held = (self.blocks_in_use * self.block_bytes
                                 + sum(t.numel() * t.element_size() for t in self.host.values()))
        return out

    def _count_hits(self, hits: int, tokens: int, flops: int) -> None:
        self.stats.hits += hits
        self.stats.tokens_reused += tokens
        self.stats.flops_skipped += flops

    def _rows(self, batch: PackedBatch, seqs: list[int]) -> torch.Tensor:
        """Rows of the packed batch holding sequences `seqs`."""
        starts = [0, *accumulate(batch.seq_lens)]
        return self._to_device(torch.tensor([starts[b] + i for b in seqs for i in range(batch.seq_lens[b])]))

    def _pool_index(self, pool_rows: list[torch.Tensor]) -> torch.Tensor:
        """The pool rows of several entries (their host index tensors), as one device index."""
        return self._to_device(torch.cat(pool_rows))

    def _to_device(self, index: torch.Tensor) -> torch.Tensor:
        # Indices are built on the host and copied without a stream sync (torch.tensor(...,
        # device=cuda) would wait for the GPU to finish its queued work).
        return index.to(self.device, non_blocking=True)

    def _store(self, key: tuple[int, ...], rows: torch.Tensor) -> None:
        need = -(-len(key) // BLOCK_TOKENS)
        if need > self.max_blocks:
            return  # larger than the whole budget: recomputed each time, never cached
        while len(self.free) < need:
            if self.pool.shape[0] < self.max_blocks:
                self._grow(need)
            else:
                self._evict_lru(exclude=key)
        self._last = None
        blocks = torch.tensor([self.free.pop() for _ in range(need)])
        index = (blocks[:, None] * BLOCK_TOKENS + torch.arange(BLOCK_TOKENS)).flatten()[:len(key)]
        self.pool.view(-1, self.hidden_size)[self._to_device(index)] = rows
        self.entries[key] = index
        self.blocks_in_use += need

    def _grow(self, need: int) -> None:
        old = self.pool.shape[0]
        new = min(self.max_blocks, max(old * 2, old + need, 64))
        pool = torch.empty(new, BLOCK_TOKENS, self.hidden_size, device=self.device, dtype=self.dtype)
        pool[:old] = self.pool
        self.pool = pool
        self.free += list(range(new - 1, old - 1, -1))

    def _evict_lru(self, exclude) -> None:
        key, index = next((k, v) for k, v in self.entries.items() if k != exclude)
        del self.entries[key]
        self._last = None
        if self.spill_to_host:
            self.host[key] = self.pool.view(-1, self.hidden_size)[self._to_device(index)].cpu()
        self._free(index)
        self.stats.evictions += 1

    def _free(self, index: torch.Tensor) -> None:
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
