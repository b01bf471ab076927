"""CUDA graphs of the forward pass: one capture per padded batch shape, then replays.

A RoBERTa-large forward over a few hundred packed tokens is ~350 small kernels; launched one
by one from Python it is bound by launch overhead, not by the GPU. A captured graph replays
them all in one launch. A graph has fixed shapes, so batches are bucketed: T tokens are
rounded up to the next multiple of BUCKET by one filler sequence of pad tokens (never fewer
than one token), which the head never reads. The filler tokens are computed, and counted as
such by the runner. Shapes seen in MeZO training repeat (k=16 trains on one batch), so
captures are few.

Inputs are copied into the graph's static buffers before a replay (device-to-device, a
handful of small copies), unless the buffers already hold that very batch: MeZO replays the
same batch for its ± passes, and at k=16 at every step. The output is the graph's own logits
buffer, valid until the next replay of the same graph.
"""

from dataclasses import dataclass, replace

import torch

from zotune.engine.batch import PackedBatch
from zotune.model.roberta import MaskedLM

BUCKET = 128           # tokens
MAX_SEQLEN_BUCKET = 64  # the attention kernel's max_seqlen is rounded up to this


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    batch: PackedBatch            # static inputs
    hidden: torch.Tensor | None   # static [T_pad, E] input of layer start_layer
    logits: torch.Tensor          # static output [B, C]
    # The (batch, hidden) objects the static inputs were last loaded from. Held, not just
    # their ids, so that neither can be freed and its id reused by another batch.
    loaded: tuple = (None, None)


class GraphedForward:
    def __init__(self, model: MaskedLM, label_word_ids: torch.Tensor, pad_token_id: int, autocast):
        self.model, self.label_word_ids, self.autocast = model, label_word_ids, autocast
        self.pad_token_id = pad_token_id
        self.graphs: dict[tuple, _Graph] = {}
        self._list_weights()
        self.weights = self._weight_addresses()
        self.pool = torch.cuda.graph_pool_handle()  # all graphs share one memory pool
        self.captures = 0

    def _list_weights(self) -> None:
        # Walking the module tree (model.parameters()) costs ~1 ms on RoBERTa-large, more than a
        # cached step's GPU work, so the tree is walked at capture time only.
        self.modules = list(self.model.modules())
        self.params = list(self.model.parameters())

    def _weight_addresses(self) -> tuple[int, ...]:
        """Where every weight lives, plus how many tensors and submodules each module holds, so
        that a LoRA or prefix tensor attached after a capture is noticed too."""
        shape = sum(len(m._parameters) + len(m._modules) for m in self.modules)
        return (shape, *(p.data_ptr() for p in self.params))

    @staticmethod
    def padded_tokens(num_tokens: int) -> int:
        return (num_tokens // BUCKET + 1) * BUCKET

    def __call__(self, batch: PackedBatch, hidden: torch.Tensor | None = None, start_layer: int = 0) -> torch.Tensor:
        # A graph reads the weights at the addresses they had at capture. If any tensor was
        # rebound since (FlatParameters, LoRA attached, .to()), every graph is stale.
        weights = self._weight_addresses()
        if weights != self.weights:
            self.graphs.clear()
            self.pool = torch.cuda.graph_pool_handle()  # a fresh pool: the old one dies with its graphs
            self._list_weights()
            self.weights = self._weight_addresses()
        num_tokens, num_seqs = batch.num_tokens, len(batch.seq_lens)
        padded = self.padded_tokens(num_tokens)
        filler = padded - num_tokens
        max_seqlen = -(-max(batch.max_seqlen, filler) // MAX_SEQLEN_BUCKET) * MAX_SEQLEN_BUCKET
        # A pair's split points are Python ints the capture bakes in (LoRA rows, prefix per sequence).
        key = (padded, num_seqs, max_seqlen, start_layer, hidden is None, batch.pair_seqs, batch.pair_tokens)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(batch, hidden, start_layer, padded, max_seqlen)
        self._load(entry, batch, hidden, filler)
        entry.graph.replay()
        return entry.logits

    def _load(self, entry: _Graph, batch: PackedBatch, hidden, filler: int) -> None:
        if entry.loaded[0] is batch and entry.loaded[1] is hidden:
            return  # the static buffers hold these inputs already
        entry.loaded = (batch, hidden)
        static, n = entry.batch, batch.num_tokens
        static.input_ids[:n].copy_(batch.input_ids)
        static.input_ids[n:].fill_(self.pad_token_id)
        static.positions[:n].copy_(batch.positions)
        static.positions[n:].copy_(torch.arange(filler, device=static.positions.device)
                                   + self.model.config.position_offset)
        static.cu_seqlens[:-1].copy_(batch.cu_seqlens)
        static.mask_index.copy_(batch.mask_index)
        if hidden is not None:
            entry.hidden[:n].copy_(hidden)
            entry.hidden[n:].zero_()

    def _capture(self, batch: PackedBatch, hidden, start_layer: int, padded: int, max_seqlen: int) -> _Graph:
        device = batch.input_ids.device
        num_seqs = len(batch.seq_lens)
        static = replace(
            batch,
            input_ids=torch.empty(padded, dtype=batch.input_ids.dtype, device=device),
            positions=torch.empty(padded, dtype=batch.positions.dtype, device=device),
            cu_seqlens=torch.empty(num_seqs + 2, dtype=batch.cu_seqlens.dtype, device=device),
            mask_index=torch.empty_like(batch.mask_index),
            seq_lens=batch.seq_lens + (padded - batch.num_tokens,),  # lengths of the capture batch; only
            max_seqlen=max_seqlen)                                   # their count is read on CUDA
        static.cu_seqlens[-1] = padded
        static_hidden = None if hidden is None else torch.empty(padded, hidden.shape[1], dtype=hidden.dtype,
                                                                device=device)
        entry = _Graph(torch.cuda.CUDAGraph(), static, static_hidden, None)
        self._load(entry, batch, hidden, padded - batch.num_tokens)

        def forward():
            with self.autocast:
                return self.model(static, self.label_word_ids, hidden=static_hidden, start_layer=start_layer).float()

        # Warm up on a side stream (lazy initialisation must not happen during capture).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            forward()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(entry.graph, pool=self.pool):
            entry.logits = forward()
        self.captures += 1
        return entry
