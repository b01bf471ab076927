"""CUDA graphs of the forward pass, alone or inside a body (a whole MeZO step): one capture per
padded batch shape and body, then replays. One machinery for both model kinds: the runner
gives the forward (engine/runner.py ModelRunner: label-word logits; engine/candidates.py
CausalRunner: candidate log-probabilities), this file pads, stages, captures and replays it.

A RoBERTa-large forward over a few hundred packed tokens is ~350 small kernels; launched one
by one from Python it is bound by launch overhead, not by the GPU. A captured graph replays
them all in one launch. A body captures more around its forward passes: a MeZO step's sweeps,
two forwards per direction, losses and update are one graph (optim/mezo.py, MezoStepper), so
a cached step, whose GPU work is a fraction of a millisecond, costs the host one launch.

A graph has fixed shapes, so batches are bucketed (Layout): T tokens are rounded up to the
next multiple of BUCKET by one filler sequence of pad tokens (never fewer than one token),
which the head never reads. The filler tokens are computed, and counted as such by the runner.
Shapes seen in MeZO training repeat (k=16 trains on one batch), so captures are few. A MeZO
pair (PackedBatch.paired) is padded half by half, each half followed by its own filler, so
that each half is half of the graph's rows whatever the batch's token count: a pair's linear
layers split the rows in the middle (layers/linear.py). A causal LM's batch varies in more
than its tokens, and each part is padded so that the padding contributes exactly nothing:
  scored rows   (mask_index: any number a sequence) rounded up to SCORED_BUCKET a part, the
                padding rows pointing at the part's filler (the runner's padded targets and
                table never read their log-probabilities: engine/candidates.py graph_inputs)
  shared prompts (SharedContext) the keys, rounded up so that their count less the tokens'
                is a multiple of BUCKET: the filler attends to the extra ones (copies of its
                first row) before its own, and the bound max_seqlen_k is that count
A masked LM's <mask> rows are one a sequence, read by the mask-query kernel sequence by
sequence (layers/attention.py), and are not padded. The padded batch is a PackedBatch in its
own right (padded_batch), built by the same functions on the host: an eager forward over it,
on the CPU too, gives the graph's numbers, which is how tests check the padding.

Inputs are copied into the graph's static buffers before a replay, unless the buffers already
hold that very batch or tensor: MeZO replays the same batch for its ± passes, and at k=16 at
every step. A batch comes from the host (the runner's pack): its tokens, positions, scored
rows and sequence offsets (and shared-prompt keys), padded as the graph runs them, and the
head's other inputs (a causal LM's targets, candidate table and lengths) are laid out in one
pinned buffer and reach the graph's int32 buffer (of which the static tensors are views) in
one transfer, as a serving engine's model runner prepares a step's inputs. Hidden states from
the trunk cache come as their pool rows (engine/cache.py, PoolRows): the rows travel in that
same transfer and the graph gathers them from the pool itself, so a batch of cache hits costs
the host no launch of its own. A body's other inputs (labels, a step's seeds and learning
rate) are copied one by one. The outputs are copied out of the graph's buffers, which are
valid only until the next replay of any graph (they share one memory pool). (Merging the
body's inputs into one transfer, and its outputs into one copy, saves the host no time: kept
simple, see benchmarks/RESULTS.md.)

The first call of a shape runs the body for real, then captures it: capturing records kernels
without running them, and the warm-up run (which compiles kernels and initialises libraries
outside the capture, as CUDA graphs require) is that call's result. So a body that changes
state, like a MeZO step updating the weights, runs exactly once per call.

Shape notation: T = tokens, P = a graph's tokens (fillers included), S = scored rows.
"""

import gc
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from zotune.engine.cache import ZERO_ROW, PoolRows
from zotune.layers.batch import PackedBatch, SharedContext

BUCKET = 128            # tokens
MAX_SEQLEN_BUCKET = 64  # the attention kernel's max_seqlen is rounded up to this
SCORED_BUCKET = 32      # a causal LM's scored rows, per part


# body(forward, static_inputs) -> outputs: the device work a graph captures around its forwards.
Body = Callable[[Callable[[], torch.Tensor], dict[str, torch.Tensor]], tuple[torch.Tensor, ...]]
# forward(batch, hidden, start_layer, **head_inputs) -> the head's output (a tensor or a tuple of
# them): the runner's forward, which the eager path runs too.
Forward = Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]


def one_forward(forward, inputs):
    """The default body: one forward pass, its output (a tensor, or a tuple of them) the outputs."""
    out = forward()
    return out if isinstance(out, tuple) else (out,)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class Layout:
    """Where a graph puts a batch's rows: `parts` parts (a pair's two halves, else one) of `part`
    tokens each, the part's own `tokens` then its filler sequence; its `scored` rows padded to
    `scored_pad`; with a SharedContext, its `keys` padded to `keys_pad` (the filler's included)."""
    parts: int
    part: int         # tokens of a part, its filler included
    tokens: int       # the batch's tokens in a part
    seqs: int         # the batch's sequences in a part (its filler is one more)
    scored: int       # scored rows (mask_index) of a part
    scored_pad: int
    keys: int         # SharedContext keys of a part; 0 without a context
    keys_pad: int
    max_seqlen: int   # the attention kernel's bound, a filler's length included, rounded up

    @classmethod
    def of(cls, batch: PackedBatch, pad_scored: bool) -> "Layout":
        """`pad_scored`: round the scored rows up (a causal LM's), else keep them (a masked LM's)."""
        parts = 2 if batch.pair_seqs else 1
        tokens, seqs, scored = batch.num_tokens // parts, len(batch.seq_lens) // parts, len(batch.mask_index) // parts
        part = (tokens // BUCKET + 1) * BUCKET
        keys = keys_pad = 0
        if batch.context is not None:  # the keys beyond the tokens (prompts read again) rounded up
            keys = len(batch.context.key_rows) // parts
            keys_pad = part + _round_up(keys - tokens, BUCKET)
        return cls(parts, part, tokens, seqs, scored, _round_up(scored, SCORED_BUCKET) if pad_scored else scored,
                   keys, keys_pad, _round_up(max(batch.max_seqlen, part - tokens), MAX_SEQLEN_BUCKET))

    @property
    def shape(self) -> tuple[int, ...]:
        """What a graph's shapes depend on: batches of one shape replay one graph."""
        return self.parts, self.part, self.seqs, self.scored_pad, self.keys_pad, self.max_seqlen

    @property
    def padded(self) -> int:
        """P, the graph's tokens."""
        return self.parts * self.part

    def token_parts(self) -> list[tuple[slice, slice]]:
        """Per part: (its real tokens' rows in the padded batch, their rows in the batch)."""
        n = self.tokens
        return [(slice(p * self.part, p * self.part + n), slice(p * n, (p + 1) * n)) for p in range(self.parts)]

    def scored_index(self) -> np.ndarray:
        """[S] int64: where each of the batch's scored rows goes among the padded ones."""
        s = np.arange(self.parts * self.scored)
        return s + s // max(self.scored, 1) * (self.scored_pad - self.scored)


def padded_arrays(batch: PackedBatch, layout: Layout, pad_token_id: int, position_offset: int,
                  pool_rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """`batch` (on the host) as `layout` pads it, as numpy arrays: input_ids, positions (and with
    `pool_rows`, the trunk cache's rows of its tokens, the fillers' reading the pool's zero row)
    [P] int64, mask_index [parts * scored_pad] int64, cu_seqlens int32 (each part's sequences,
    then its filler, which ends where the next part starts), and with a SharedContext its
    key_rows [parts * keys_pad] int64 and cu_seqlens_k int32."""
    lo, padded = layout, layout.padded
    ids, positions = np.full(padded, pad_token_id, np.int64), np.empty(padded, np.int64)
    rows = np.full(padded, ZERO_ROW, np.int64) if pool_rows is not None else None
    batch_ids, batch_positions = batch.input_ids.numpy(), batch.positions.numpy()
    filler_positions = np.arange(lo.part - lo.tokens) + position_offset
    for to, source in layout.token_parts():
        ids[to], positions[to] = batch_ids[source], batch_positions[source]
        positions[to.stop:to.start + lo.part] = filler_positions
        if rows is not None:
            rows[to] = pool_rows[source]
    # A padding scored row reads its part's filler's first row: computed, never summed.
    mask_index = np.repeat(np.arange(lo.parts) * lo.part + lo.tokens, lo.scored_pad)
    shift = np.repeat(np.arange(lo.parts) * (lo.part - lo.tokens), lo.scored)  # each part's rows move by this
    mask_index[layout.scored_index()] = batch.mask_index.numpy() + shift
    arrays = {"input_ids": ids, "positions": positions, "mask_index": mask_index,
              "cu_seqlens": _offsets(batch.cu_seqlens.numpy(), layout, lo.tokens, lo.part)}
    if rows is not None:
        arrays["pool_rows"] = rows
    if batch.context is not None:
        arrays.update(_padded_keys(batch.context, layout))
    return arrays


def _padded_keys(context: SharedContext, layout: Layout) -> dict[str, np.ndarray]:
    """key_rows and cu_seqlens_k of `context` as `layout` pads it: each part's keys (as rows of the
    padded batch), then its filler's: copies of the filler's first row up to keys_pad, then its
    own rows (a filler query sees the copies and its own rows up to itself; its output is never read)."""
    lo = layout
    key_rows = np.empty(lo.parts * lo.keys_pad, np.int64)
    source_rows = context.key_rows.numpy()
    for p in range(lo.parts):
        at, to, n = p * lo.keys_pad, p * lo.part, lo.tokens
        filler = to + n  # the filler's first row
        key_rows[at:at + lo.keys] = source_rows[p * lo.keys:(p + 1) * lo.keys] - p * n + to
        copies = lo.keys_pad - lo.keys - (lo.part - n)
        key_rows[at + lo.keys:at + lo.keys + copies] = filler
        key_rows[at + lo.keys + copies:at + lo.keys_pad] = np.arange(filler, to + lo.part)
    return {"key_rows": key_rows, "cu_seqlens_k": _offsets(context.cu_seqlens_k.numpy(), layout, lo.keys, lo.keys_pad)}


def _offsets(source: np.ndarray, layout: Layout, size: int, padded_size: int) -> np.ndarray:
    """[parts * (seqs + 1) + 1] int32: sequence offsets `source` (cu_seqlens or cu_seqlens_k, parts
    of `size` rows) in parts of `padded_size`: each part's sequences, then its filler, which ends
    where the next part starts."""
    lo = layout
    out = np.empty(lo.parts * (lo.seqs + 1) + 1, np.int32)
    for p in range(lo.parts):
        out[p * (lo.seqs + 1):(p + 1) * (lo.seqs + 1)] = source[p * lo.seqs:(p + 1) * lo.seqs + 1] - p * size \
            + p * padded_size
    out[-1] = lo.parts * padded_size
    return out


def padded_batch(batch: PackedBatch, layout: Layout, tensors: dict[str, torch.Tensor],
                 pad_token_id: int) -> PackedBatch:
    """The PackedBatch of `batch` padded by `layout`, over `tensors` (padded_arrays' arrays: as
    torch tensors on the host, or a graph's static views of them): every field as the padded
    rows have it, fillers included (their sequences: pad tokens), so that an eager forward, or
    the trunk cache, can run it too. On CUDA, kernels read only its tensors and the count of
    its sequences, so a graph's static batch serves every batch of its shape."""
    lo = layout
    filler = lo.part - lo.tokens

    def per_part(values: tuple, fill) -> tuple:  # each part's values, then its filler's
        return sum((values[p * lo.seqs:(p + 1) * lo.seqs] + (fill,) for p in range(lo.parts)), ())

    context = None
    if batch.context is not None:  # a part's sequences, and their contexts, move one per filler before them
        moved = tuple(o + b // lo.seqs if o >= 0 else -1 for b, o in enumerate(batch.context.of))
        context = SharedContext(per_part(moved, -1), tensors["key_rows"], tensors["cu_seqlens_k"], lo.keys_pad)
    return replace(batch, input_ids=tensors["input_ids"], positions=tensors["positions"],
                   cu_seqlens=tensors["cu_seqlens"], mask_index=tensors["mask_index"],
                   seq_lens=per_part(batch.seq_lens, filler),
                   sequences=per_part(batch.sequences, (pad_token_id,) * filler),
                   max_seqlen=lo.max_seqlen, pair_gap=1 if batch.pair_seqs else 0,  # the first half's filler
                   context=context)


def _sections(arrays: dict[str, np.ndarray]) -> tuple[tuple[str, bool, tuple[int, ...]], ...]:
    """How a graph's int32 buffer holds `arrays`: (name, int64?, shape), the int64 ones first,
    so that every int64 view starts at an even word."""
    ordered = sorted(arrays.items(), key=lambda item: item[1].dtype != np.int64)  # stable
    return tuple((name, a.dtype == np.int64, a.shape) for name, a in ordered)


def _views(words, sections, int64) -> dict:
    """The arrays of `sections` as views of `words` (the graph's int32 device tensor, or its pinned
    host image as a numpy array; `int64` is that library's dtype)."""
    views, at = {}, 0
    for name, wide, shape in sections:
        size = int(np.prod(shape)) * (2 if wide else 1)
        view = words[at:at + size]
        views[name] = (view.view(int64) if wide else view).reshape(shape)
        at += size
    return views


def _words(sections) -> int:
    return sum(int(np.prod(shape)) * (2 if wide else 1) for _, wide, shape in sections)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    staged: torch.Tensor          # int32: the static batch's tensors, pool rows and head inputs are views of it
    sections: tuple               # how `staged` holds them (_sections)
    batch: PackedBatch            # static inputs
    hidden: torch.Tensor | None   # static [P, E] input of layer start_layer, when given as a tensor
                                  # (as PoolRows, its rows are part of `staged`)
    inputs: dict[str, torch.Tensor]  # the body's other static inputs
    outputs: tuple = ()           # static outputs of the body
    # The objects the static inputs were last loaded from, by name. Held, not just their ids,
    # so that none can be freed and its id reused by another tensor.
    loaded: dict = field(default_factory=dict)


@dataclass
class _Weights:
    """The tensors a forward from one start layer reads (model.modules_from), listed once:
    walking the module tree costs more host time than a cached step's GPU work. `addresses` is
    what _addresses() gave then, before the first capture."""
    modules: list[torch.nn.Module]
    params: list[torch.Tensor]
    addresses: tuple[int, ...]


def _addresses(modules: list[torch.nn.Module], params: list[torch.Tensor]) -> tuple[int, ...]:
    """Where every tensor lives, plus how many tensors and submodules each module holds, so
    that a LoRA or prefix tensor attached after a capture is noticed too."""
    shape = sum(len(m._parameters) + len(m._modules) for m in modules)
    return (shape, *map(torch.Tensor.data_ptr, params))


class GraphedForward:
    def __init__(self, model, forward: Forward, pad_token_id: int, device: torch.device, pad_scored: bool = False):
        """`model`: the MaskedLM or CausalLM whose weights `forward` (the runner's, Forward above,
        which enters the run's precision itself) reads; `pad_scored`: Layout.of's."""
        self.model, self.forward, self.device = model, forward, device
        self.pad_token_id, self.pad_scored = pad_token_id, pad_scored
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

    def layout(self, batch: PackedBatch) -> Layout:
        """How a graph lays `batch` out (Layout)."""
        return Layout.of(batch, self.pad_scored)

    def bucket(self, batch: PackedBatch) -> tuple[int, ...]:
        """The shape of the graph that runs `batch`: batches of one bucket replay one graph."""
        return self.layout(batch).shape

    def __call__(self, batch: PackedBatch, hidden: torch.Tensor | PoolRows | None = None, start_layer: int = 0,
                 body: Body = one_forward, inputs: dict[str, torch.Tensor] | None = None,
                 head_inputs: dict[str, np.ndarray] | None = None) -> tuple[torch.Tensor, ...]:
        """The outputs of body(forward, static_inputs), which may call forward() (the runner's
        forward over the padded batch, from `hidden` entering layer `start_layer`, with
        `head_inputs`) any number of times. The default body is one forward. A body is part of
        the graph's key: pass the same object at every call. `batch` is on the host (the
        runner's pack); `head_inputs` are the forward's other int64 inputs, already padded to
        the batch's layout (engine/candidates.py graph_inputs), on the host, staged with the
        batch: the same batch must come with the same ones. Inputs are taken as immutable: a
        batch, rows or tensor passed again is not copied again. The outputs are the caller's
        own copies."""
        self._check_weights(start_layer)
        self._check_cache_pool(hidden)
        inputs, head_inputs = inputs or {}, head_inputs or {}
        layout = self.layout(batch)
        # The layout's counts are Python ints the capture bakes in (a pair's split among them:
        # LoRA finds its rows on the device), so batches of one shape share a graph.
        key = (layout.shape, start_layer, type(hidden), body, tuple((name, t.shape) for name, t in inputs.items()),
               tuple((name, a.shape) for name, a in head_inputs.items()))
        entry = self.graphs.get(key)
        if entry is None:
            entry, outputs = self._capture(batch, layout, hidden, start_layer, body, inputs, head_inputs)
            self.graphs[key] = entry
        else:
            self._load(entry, batch, layout, hidden, inputs, head_inputs)
            entry.graph.replay()
            outputs = entry.outputs  # the graph's buffers, reused by its next replay
        return tuple(t.clone() for t in outputs)

    def _arrays(self, batch: PackedBatch, layout: Layout, rows: PoolRows | None, head_inputs: dict) -> dict:
        if batch.input_ids.is_cuda:
            raise ValueError("a CUDA graph takes a batch on the host (the runner's pack), not one on the GPU")
        arrays = padded_arrays(batch, layout, self.pad_token_id, self.model.config.position_offset,
                               None if rows is None else rows.index)
        return {**arrays, **head_inputs}

    def _load(self, entry: _Graph, batch: PackedBatch, layout: Layout, hidden, inputs: dict, head_inputs: dict) -> None:
        loaded = entry.loaded
        rows = hidden if isinstance(hidden, PoolRows) else None
        if loaded.get("batch") is not batch or loaded.get("rows") is not rows:  # else the buffers hold them
            loaded["batch"], loaded["rows"] = batch, rows
            entry.staged.copy_(self._staging(self._arrays(batch, layout, rows, head_inputs), entry.sections),
                               non_blocking=True)
        if entry.hidden is not None and loaded.get("hidden") is not hidden:
            loaded["hidden"] = hidden
            entry.hidden.zero_()
            for to, source in layout.token_parts():
                entry.hidden[to].copy_(hidden[source])
        for name, tensor in inputs.items():
            if loaded.get(name) is not tensor:
                loaded[name] = tensor
                entry.inputs[name].copy_(tensor, non_blocking=True)  # from the host: no stream sync

    @staticmethod
    def _staging(arrays: dict[str, np.ndarray], sections) -> torch.Tensor:
        """`arrays` as the graph's buffer holds them (_sections), in pinned host memory (where a GPU
        is: always, for a graph). From pinned memory the copy does not wait for the GPU, and
        torch keeps the block from reuse until the copy has run."""
        host = torch.empty(_words(sections), dtype=torch.int32, pin_memory=torch.cuda.is_available())
        for name, view in _views(host.numpy(), sections, np.int64).items():
            view[...] = arrays[name]
        return host

    def _capture(self, batch: PackedBatch, layout: Layout, hidden, start_layer: int, body: Body, inputs: dict,
                 head_inputs: dict) -> tuple[_Graph, tuple[torch.Tensor, ...]]:
        """A new graph, and the outputs of the run that warmed it up (see the module docstring)."""
        device, gathers = self.device, isinstance(hidden, PoolRows)
        sections = _sections(self._arrays(batch, layout, hidden if gathers else None, head_inputs))
        staged = torch.empty(_words(sections), dtype=torch.int32, device=device)
        views = _views(staged, sections, torch.int64)
        static = padded_batch(batch, layout, views, self.pad_token_id)
        static_head = {name: views[name] for name in head_inputs}
        static_rows = views.get("pool_rows")
        static_hidden = torch.empty(layout.padded, hidden.shape[1], dtype=hidden.dtype, device=device) \
            if isinstance(hidden, torch.Tensor) else None
        static_inputs = {name: torch.empty_like(t, device=device) for name, t in inputs.items()}
        entry = _Graph(torch.cuda.CUDAGraph(), staged, sections, static, static_hidden, static_inputs)
        self._load(entry, batch, layout, hidden, inputs, head_inputs)
        cache_pool = hidden.pool if gathers else None

        def forward():
            # The cache's rows are gathered here, inside the graph, straight from its pool.
            x = cache_pool.index_select(0, static_rows) if gathers else static_hidden
            return self.forward(static, x, start_layer, **static_head)

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
