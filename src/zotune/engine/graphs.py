"""CUDA graphs of the forward pass, alone or inside a body (a whole MeZO step): one capture per
padded batch shape and body, then replays.

A RoBERTa-large forward over a few hundred packed tokens is ~350 small kernels; launched one
by one from Python it is bound by launch overhead, not by the GPU. A captured graph replays
them all in one launch. A body captures more around its forward passes: a MeZO step's sweeps,
two forwards per direction, losses and update are one graph (optim/mezo.py, MezoStepper), so
a cached step, whose GPU work is a fraction of a millisecond, costs the host one launch.

A graph has fixed shapes, so batches are bucketed: T tokens are rounded up to the next
multiple of BUCKET by one filler sequence of pad tokens (never fewer than one token), which
the head never reads. The filler tokens are computed, and counted as such by the runner.
Shapes seen in MeZO training repeat (k=16 trains on one batch), so captures are few. A MeZO
pair (PackedBatch.paired) is padded half by half, each half followed by its own filler, so
that each half is half of the graph's rows whatever the batch's token count: a pair's linear
layers split the rows in the middle (layers/linear.py).

Inputs are copied into the graph's static buffers before a replay, unless the buffers already
hold that very batch or tensor: MeZO replays the same batch for its ± passes, and at k=16 at
every step. A batch comes from the host (ModelRunner.pack): its tokens, positions, <mask> rows
and sequence offsets, padded as the graph runs them, are laid out in one pinned buffer and
reach the graph's int32 buffer (of which the static batch's tensors are views) in one
transfer, as a serving engine's model runner prepares a step's inputs. Hidden states from the
trunk cache come as their pool rows (engine/cache.py, PoolRows): the rows travel in that same
transfer and the graph gathers them from the pool itself, so a batch of cache hits costs the
host no launch of its own. A body's other inputs (labels, a step's seeds and learning rate)
are copied one by one. The outputs are copied out of the graph's buffers, which are valid
only until the next replay of any graph (they share one memory pool). (Merging the body's
inputs into one transfer, and its outputs into one copy, saves the host no time: kept simple,
see benchmarks/RESULTS.md.)

The first call of a shape runs the body for real, then captures it: capturing records kernels
without running them, and the warm-up run (which compiles kernels and initialises libraries
outside the capture, as CUDA graphs require) is that call's result. So a body that changes
state, like a MeZO step updating the weights, runs exactly once per call.
"""

import gc
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from zotune.layers.batch import PackedBatch
from zotune.engine.cache import ZERO_ROW, PoolRows
from zotune.model.roberta import MaskedLM

BUCKET = 128           # tokens
MAX_SEQLEN_BUCKET = 64  # the attention kernel's max_seqlen is rounded up to this


# body(forward, static_inputs) -> outputs: the device work a graph captures around its forwards.
Body = Callable[[Callable[[], torch.Tensor], dict[str, torch.Tensor]], tuple[torch.Tensor, ...]]


def _one_forward(forward, inputs):
    """The default body: one forward pass, its logits the only output."""
    return (forward(),)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    staged: torch.Tensor          # int32: the static batch's tensors (and pool rows) are views of it (_staging)
    batch: PackedBatch            # static inputs
    hidden: torch.Tensor | None   # static [T_pad, E] input of layer start_layer, when given as a tensor
                                  # (as PoolRows, its rows are part of `staged`)
    inputs: dict[str, torch.Tensor]  # the body's other static inputs
    outputs: tuple = ()           # static outputs of the body
    # The objects the static inputs were last loaded from, by name. Held, not just their ids,
    # so that none can be freed and its id reused by another tensor.
    loaded: dict = field(default_factory=dict)


@dataclass
class _Weights:
    """The tensors a forward from one start layer reads (MaskedLM.modules_from), listed once:
    walking the module tree costs more host time than a cached step's GPU work. `addresses` is what _addresses() gave then, before the first capture."""
    modules: list[torch.nn.Module]
    params: list[torch.Tensor]
    addresses: tuple[int, ...]


def _addresses(modules: list[torch.nn.Module], params: list[torch.Tensor]) -> tuple[int, ...]:
    """Where every tensor lives, plus how many tensors and submodules each module holds, so
    that a LoRA or prefix tensor attached after a capture is noticed too."""
    shape = sum(len(m._parameters) + len(m._modules) for m in modules)
    return (shape, *map(torch.Tensor.data_ptr, params))


def _batch_views(words, padded: int, masks: int, with_rows: bool, int64):
    """The static batch's tensors in a graph's int32 buffer `words` (the device tensor, or its
    pinned host image as a numpy array; `int64` is that library's dtype): token ids and
    positions (int64, `padded` each), with `with_rows` the trunk cache's pool rows (int64,
    `padded`, else None), <mask> rows (int64), sequence offsets (int32, the rest)."""
    rows_end = (6 if with_rows else 4) * padded
    return (words[:2 * padded].view(int64), words[2 * padded:4 * padded].view(int64),
            words[4 * padded:rows_end].view(int64) if with_rows else None,
            words[rows_end:rows_end + 2 * masks].view(int64), words[rows_end + 2 * masks:])


class GraphedForward:
    def __init__(self, model: MaskedLM, label_word_ids: torch.Tensor, pad_token_id: int, precision,
                 device: torch.device):
        """`precision`: the runner's (engine/precision.py), entered around every capture."""
        self.model, self.label_word_ids, self.precision, self.device = model, label_word_ids, precision, device
        self.pad_token_id = pad_token_id
        self.graphs: dict[tuple, _Graph] = {}
        self.weights: dict[int, _Weights] = {}  # by start layer
        self.pool = torch.cuda.graph_pool_handle()  # all graphs share one memory pool
        self.cache_pool: torch.Tensor | None = None  # the trunk cache's pool the graphs gather from
        self.captures = 0

    def _check_weights(self, start_layer: int) -> None:
        """A graph reads the weights at the addresses they had at capture. If any tensor a
        forward from `start_layer` reads was rebound since (FlatParameters, LoRA attached,
        .to()), every graph is stale. Only those tensors are checked: above a cached trunk they
        are a tenth of the model's, and the check runs at every call."""
        weights = self.weights.get(start_layer)
        if weights is not None and _addresses(weights.modules, weights.params) != weights.addresses:
            self.reset()
            weights = None
        if weights is None:
            modules = [m for root in self.model.modules_from(start_layer) for m in root.modules()]
            params = [p for m in modules for p in m._parameters.values() if p is not None]
            self.weights[start_layer] = _Weights(modules, params, _addresses(modules, params))

    def _check_cache_pool(self, hidden) -> None:
        """A graph gathers its input rows from the trunk cache's pool at the address it had at
        capture; when the pool grows it moves, and every graph is stale. (The old pool is held
        until then, so the new one cannot take its address.)"""
        if isinstance(hidden, PoolRows):
            if self.cache_pool is not None and hidden.pool.data_ptr() != self.cache_pool.data_ptr():
                self.reset()
            self.cache_pool = hidden.pool

    def reset(self) -> None:
        """Drop every graph; the next call of each shape captures again."""
        self.graphs.clear()
        self.weights.clear()
        self.pool = torch.cuda.graph_pool_handle()  # a fresh pool: the old one dies with its graphs

    @staticmethod
    def parts(batch: PackedBatch) -> tuple[int, int]:
        """How a graph lays `batch` out: in how many parts (a pair's two halves, else one), and
        each part's tokens padded by its filler sequence."""
        parts = 2 if batch.pair_seqs else 1
        return parts, (batch.num_tokens // parts // BUCKET + 1) * BUCKET

    @staticmethod
    def bucket(batch: PackedBatch) -> tuple[int, int]:
        """The shape of the graph that runs `batch`: its tokens padded by the filler sequences,
        and the attention kernel's max_seqlen (a filler's length included) rounded up."""
        parts, part = GraphedForward.parts(batch)
        longest = max(batch.max_seqlen, part - batch.num_tokens // parts)
        return parts * part, -(-longest // MAX_SEQLEN_BUCKET) * MAX_SEQLEN_BUCKET

    def __call__(self, batch: PackedBatch, hidden: torch.Tensor | PoolRows | None = None, start_layer: int = 0,
                 body: Body = _one_forward, inputs: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
        """The outputs of body(forward, static_inputs), which may call forward() (the model over
        the batch, from `hidden` entering layer `start_layer`; returns the [B, C] float32
        logits) any number of times. The default body is one forward. A body is part of the
        graph's key: pass the same object at every call. `batch` is on the host
        (ModelRunner.pack). Inputs are taken as immutable: a batch, rows or tensor passed again
        is not copied again. The outputs are the caller's own copies."""
        self._check_weights(start_layer)
        self._check_cache_pool(hidden)
        inputs = inputs or {}
        padded, max_seqlen = self.bucket(batch)
        # A pair's split, pair_seqs, is a Python int the capture bakes in (the prefix of each sequence;
        # LoRA finds its rows on the device), so batches of one size share a graph.
        key = (padded, len(batch.seq_lens), max_seqlen, start_layer, type(hidden), batch.pair_seqs, body,
               tuple((name, t.shape) for name, t in inputs.items()))
        entry = self.graphs.get(key)
        if entry is None:
            entry, outputs = self._capture(batch, hidden, start_layer, padded, max_seqlen, body, inputs)
            self.graphs[key] = entry
        else:
            self._load(entry, batch, hidden, inputs)
            entry.graph.replay()
            outputs = entry.outputs  # the graph's buffers, reused by its next replay
        return tuple(t.clone() for t in outputs)

    def _load(self, entry: _Graph, batch: PackedBatch, hidden, inputs: dict) -> None:
        loaded = entry.loaded
        rows = hidden if isinstance(hidden, PoolRows) else None
        if loaded.get("batch") is not batch or loaded.get("rows") is not rows:  # else the buffers hold them
            loaded["batch"], loaded["rows"] = batch, rows
            entry.staged.copy_(self._staging(batch, rows, entry.staged, len(entry.batch.input_ids)), non_blocking=True)
        if entry.hidden is not None and loaded.get("hidden") is not hidden:
            loaded["hidden"] = hidden
            parts, part = self.parts(batch)
            n = batch.num_tokens // parts
            for p in range(parts):
                entry.hidden[p * part:p * part + n].copy_(hidden[p * n:(p + 1) * n])
                entry.hidden[p * part + n:(p + 1) * part].zero_()
        for name, tensor in inputs.items():
            if loaded.get(name) is not tensor:
                loaded[name] = tensor
                entry.inputs[name].copy_(tensor, non_blocking=True)  # from the host: no stream sync

    def _staging(self, batch: PackedBatch, rows: PoolRows | None, staged: torch.Tensor, padded: int) -> torch.Tensor:
        """`batch` (and the pool rows of its hidden states) as the graph's buffer `staged` holds
        it, in pinned host memory: int64 token ids, then int64 positions (`padded` each, each
        part's filler sequence of pad tokens after the part, see parts()), int64 pool rows
        (`padded`, the fillers' reading the pool's zero row), int64 <mask> rows (B), int32
        sequence offsets (the fillers' included, the last one's end last). From pinned memory
        the copy does not wait for the GPU, and torch keeps the block from reuse until the
        copy has run."""
        if batch.input_ids.is_cuda:
            raise ValueError("a CUDA graph takes a batch on the host (ModelRunner.pack), not one on the GPU")
        parts, part = self.parts(batch)
        n, seqs = batch.num_tokens // parts, len(batch.seq_lens) // parts  # a part's tokens and sequences
        host = torch.empty(staged.shape, dtype=torch.int32, pin_memory=True)
        ids, positions, pool_rows, mask_index, cu_seqlens = _batch_views(
            host.numpy(), padded, len(batch.mask_index), rows is not None, np.int64)
        batch_ids, batch_positions = batch.input_ids.numpy(), batch.positions.numpy()
        batch_masks, batch_cu = batch.mask_index.numpy(), batch.cu_seqlens.numpy()
        filler_positions = np.arange(part - n) + self.model.config.position_offset
        for p in range(parts):
            at, tokens = p * part, slice(p * n, (p + 1) * n)  # where the part goes, where it comes from
            ids[at:at + n], ids[at + n:at + part] = batch_ids[tokens], self.pad_token_id
            positions[at:at + n], positions[at + n:at + part] = batch_positions[tokens], filler_positions
            if rows is not None:
                pool_rows[at:at + n], pool_rows[at + n:at + part] = rows.index[tokens], ZERO_ROW
            mask_index[p * seqs:(p + 1) * seqs] = batch_masks[p * seqs:(p + 1) * seqs] - p * n + at
            # the part's sequences, then its filler, which ends where the next part starts
            cu_seqlens[p * (seqs + 1):(p + 1) * (seqs + 1)] = batch_cu[p * seqs:(p + 1) * seqs + 1] - p * n + at
        cu_seqlens[-1] = padded
        return host

    def _capture(self, batch: PackedBatch, hidden, start_layer: int, padded: int, max_seqlen: int, body: Body,
                 inputs: dict) -> tuple[_Graph, tuple[torch.Tensor, ...]]:
        """A new graph, and the outputs of the run that warmed it up (see the module docstring)."""
        device = self.device
        masks, gathers = len(batch.mask_index), isinstance(hidden, PoolRows)
        parts, part = self.parts(batch)
        seqs = len(batch.seq_lens) // parts
        staged = torch.empty((6 if gathers else 4) * padded + 2 * masks + parts * (seqs + 1) + 1, dtype=torch.int32,
                             device=device)
        input_ids, positions, static_rows, mask_index, cu_seqlens = _batch_views(staged, padded, masks, gathers,
                                                                                torch.int64)
        filler = (part - batch.num_tokens // parts,)
        static = replace(
            batch, input_ids=input_ids, positions=positions, mask_index=mask_index, cu_seqlens=cu_seqlens,
            # lengths of the capture batch, each part's filler after it; only their count is read on CUDA
            seq_lens=sum((batch.seq_lens[p * seqs:(p + 1) * seqs] + filler for p in range(parts)), ()),
            max_seqlen=max_seqlen, pair_gap=1 if batch.pair_seqs else 0)  # the first half's filler
        static_hidden = torch.empty(padded, hidden.shape[1], dtype=hidden.dtype, device=device) \
            if isinstance(hidden, torch.Tensor) else None
        static_inputs = {name: torch.empty_like(t, device=device) for name, t in inputs.items()}
        entry = _Graph(torch.cuda.CUDAGraph(), staged, static, static_hidden, static_inputs)
        self._load(entry, batch, hidden, inputs)
        cache_pool = hidden.pool if gathers else None

        def forward():
            # The cache's rows are gathered here, inside the graph, straight from its pool.
            x = cache_pool.index_select(0, static_rows) if gathers else static_hidden
            with self.precision:
                return self.model(static, self.label_word_ids, hidden=x, start_layer=start_layer).float()

        # The real run, on a side stream: lazy initialisation must not happen during capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = body(forward, static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        # Python's cycle collector may free a dropped runner's graphs or their memory pool at
        # any allocation, and those CUDA calls, made during a capture, end it (a caller that
        # drops runners, as benchmarks/reuse.py does per row, triggers it). Hold it off until the
        # capture ends. (Not gc.collect() first: a full collection at every capture is slow
        # once transformers is imported.)
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(entry.graph, pool=self.pool):
                entry.outputs = body(forward, static_inputs)
        finally:
            if collecting:
                gc.enable()
        self.captures += 1
        return entry, outputs
