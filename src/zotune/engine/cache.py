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
A batch of hits is gathered with one index_select; sequences never get a copy each, and the
last all-hit batch stays gathered, so the second pass of a MeZO step (and, at k=16, every
later step) costs no gather at all.
Least-recently-used entries are evicted when the byte budget is reached, and on a GPU they
can spill to host memory instead of being dropped.

Every statistic is a counter incremented where the event happens.
"""

from collections import OrderedDict
from itertools import accumulate
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from zotune.engine.batch import PackedBatch, pack

BLOCK_TOKENS = 16


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
        self.flops_per_sequence = flops_per_sequence
        self.spill_to_host = spill_to_host and device.type == "cuda"
        self.pool = torch.empty(0, BLOCK_TOKENS, hidden_size, device=device, dtype=dtype)  # [blocks, 16, E]
        self.free: list[int] = []
        self.entries: OrderedDict[tuple[int, ...], list[int]] = OrderedDict()  # tokens -> block ids, LRU order
        self.host: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self.version = self._frozen_version()
        self.stats = CacheStats()
        # The last all-hit batch, already gathered: (its keys, [T, E] hidden states, tokens, FLOPs).
        # MeZO looks each batch up twice per step (the ± passes), and at k=16 the batch is the
        # same at every step. Dropped whenever an entry is stored, evicted or cleared.
        self._last = None

    def _frozen_version(self) -> tuple:
        # _version counts in-place writes; data_ptr changes when a tensor is rebound.
        return tuple((t.data_ptr(), t._version) for t in self.frozen)

    def hidden_states(self, batch: PackedBatch, trunk: Callable[[PackedBatch], torch.Tensor]) -> torch.Tensor:
        """Hidden states entering layer `start_layer` for every token of `batch`: [T, E].
        `trunk` computes them for a packed sub-batch of the sequences not in the cache. The
        result may be shared with the next lookup of the same batch: callers must not write to it."""
        version = self._frozen_version()
        if version != self.version:
            self.clear()
            self.version = version
            self.stats.invalidations += 1
        keys = batch.sequences
        self.stats.lookups += len(keys)
        if self._last is not None and self._last[0] == keys:  # every sequence a hit, gathered before
            _, out, tokens, flops = self._last
            self.stats.hits += len(keys)
            self.stats.tokens_reused += tokens
            self.stats.flops_skipped += flops
            for key in keys:
                self.entries.move_to_end(key)
            return out
        missing = [b for b, key in enumerate(keys) if key not in self.entries and key not in self.host]
        missing_set = set(missing)
        hit = [b for b in range(len(keys)) if b not in missing_set]
        tokens = sum(len(keys[b]) for b in hit)
        flops = sum(self.flops_per_sequence(len(keys[b])) for b in hit)
        self.stats.hits += len(hit)
        self.stats.tokens_reused += tokens
        self.stats.flops_skipped += flops
        for b in hit:
            if keys[b] in self.host:
                self.stats.host_hits += 1
                self._store(keys[b], self.host.pop(keys[b]).to(self.device, non_blocking=True))
            self.entries.move_to_end(keys[b])

        out = torch.empty(batch.num_tokens, self.hidden_size, device=self.device, dtype=self.dtype)  # [T, E]
        if missing:
            sub = pack([list(keys[b]) for b in missing], None, self.position_offset).to(self.device)
            computed = trunk(sub)                                                   # [T_missing, E]
            out[self._rows(batch, missing)] = computed
            for key, rows in zip(sub.sequences, computed.split(sub.seq_lens)):
                self._store(key, rows)
        # Hits are gathered from the pool in one index_select (misses stored just now are not
        # re-read: `computed` already filled them).
        stored = [b for b in hit if keys[b] in self.entries]
        if stored:
            pool_rows = self._pool_rows([keys[b] for b in stored])
            out[self._rows(batch, stored)] = self.pool.view(-1, self.hidden_size)[pool_rows]
        if not missing:
            self._last = (keys, out, tokens, flops)
        self.stats.bytes_held = (self.used_blocks() * self.block_bytes
                                 + sum(t.numel() * t.element_size() for t in self.host.values()))
        return out

    def _rows(self, batch: PackedBatch, seqs: list[int]) -> torch.Tensor:
        """Rows of the packed batch holding sequences `seqs`."""
        starts = [0, *accumulate(batch.seq_lens)]
        return torch.tensor([starts[b] + i for b in seqs for i in range(batch.seq_lens[b])], device=self.device)

    def _pool_rows(self, keys) -> torch.Tensor:
        rows = []
        for key in keys:
            blocks, n = self.entries[key], len(key)
            rows += [block * BLOCK_TOKENS + i for block in blocks for i in range(BLOCK_TOKENS)][:n]
        return torch.tensor(rows, device=self.device)

    def used_blocks(self) -> int:
        return sum(len(blocks) for blocks in self.entries.values())

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
        blocks = [self.free.pop() for _ in range(need)]
        index = self._block_rows(blocks, len(key))
        self.pool.view(-1, self.hidden_size)[index] = rows
        self.entries[key] = blocks

    def _block_rows(self, blocks, n) -> torch.Tensor:
        return torch.tensor([b * BLOCK_TOKENS + i for b in blocks for i in range(BLOCK_TOKENS)][:n], device=self.device)

    def _grow(self, need: int) -> None:
        old = self.pool.shape[0]
        new = min(self.max_blocks, max(old * 2, old + need, 64))
        pool = torch.empty(new, BLOCK_TOKENS, self.hidden_size, device=self.device, dtype=self.dtype)
        pool[:old] = self.pool
        self.pool = pool
        self.free += list(range(new - 1, old - 1, -1))

    def _evict_lru(self, exclude) -> None:
        key, blocks = next((k, v) for k, v in self.entries.items() if k != exclude)
        del self.entries[key]
        self._last = None
        if self.spill_to_host:
            self.host[key] = self.pool.view(-1, self.hidden_size)[self._block_rows(blocks, len(key))].cpu()
        self.free += blocks
        self.stats.evictions += 1

    def clear(self) -> None:
        self._last = None
        self.free += [b for blocks in self.entries.values() for b in blocks]
        self.entries.clear()
        self.host.clear()

