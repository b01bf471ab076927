"""The model runner: owns device, batching, the trunk cache and the counters; the model
owns the maths.

Runner holds what every runner shares (device, precision, trunk cache, MeZO pairs, counters).
ModelRunner turns encoded prompts (token-id lists with one <mask> each) into packed batches,
runs a masked LM, and returns label-word logits or the loss; engine/candidates.py's
CausalRunner does the same for a causal LM's candidate scoring. Every figure it reports
(forward passes, tokens computed, padding avoided, cache statistics) is counted here,
around the real work.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zotune.layers.batch import PackedBatch, pack
from zotune.engine.cache import CacheStats, PoolRows, TrunkCache
from zotune.engine.graphs import GraphedForward
from zotune.engine.precision import Precision
from zotune.errors import UserError
from zotune.model.causal_lm import CausalLM
from zotune.model.roberta import MaskedLM


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for a GPU but torch sees none; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"unknown --device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def lowest_perturbed_layer(model: MaskedLM, trainable_names: list[str]) -> int | None:
    """Index of the lowest layer holding a trainable tensor (num_layers if only the head
    trains); None if the embeddings train, since then no layer's input is fixed."""
    lowest = min(map(model.layer_of, trainable_names))
    return None if lowest < 0 else lowest


@dataclass
class RunnerStats:
    forward_passes: int = 0
    tokens_computed: int = 0
    # Tokens a padded batch would add to reach its longest sequence: the least padding
    # any padded implementation computes (LM-BFF/MeZO pad further, to max_length).
    padding_tokens_avoided: int = 0
    graph_filler_tokens: int = 0  # computed only to round a batch up to a CUDA-graph bucket
    # Causal LMs (engine/candidates.py): tokens the same forwards would compute with every
    # candidate packed with its whole prompt, as the packer counted them (0 for masked LMs)
    plain_tokens: int = 0


class Runner:
    """What every runner shares, whatever its model and objective: the device, the precision, the
    trunk cache, MeZO pairs, the counters and the host-to-device moves. ModelRunner (masked LMs,
    label words) and engine/candidates.py's CausalRunner (causal LMs, candidate scoring) add
    their packing and their heads. `precision` (engine/precision.py) applies on CUDA: "tf32",
    "bf16" or the exact "float32", set around each forward. The model must already be on
    `device` (Session.build moves it)."""

    def __init__(self, model: MaskedLM | CausalLM, device: torch.device, precision: str = "tf32"):
        self.precision = Precision(precision, device)
        if next(model.parameters()).device.type != device.type:
            raise ValueError(f"the model is on {next(model.parameters()).device}, the runner on {device}: "
                             "build runs through zotune.session.Session.build, which moves the model first")
        self.model, self.device = model, device
        self.stats = RunnerStats()
        self.cache: TrunkCache | None = None
        self.cache_status = "off: no cache was requested"
        self.pair_start = 0  # layers below this run once for both halves of a MeZO pair (enable_pairs)
        self._last_moved: tuple = (None, None)  # (a host batch, the same on the device), see on_device
        self.graphs: GraphedForward | None = None

    def enable_cache(self, trainable_names: list[str], budget_bytes: int, spill_to_host: bool = False) -> None:
        """Cache the hidden states below the lowest perturbed layer, where one exists."""
        cfg = self.model.config
        start = lowest_perturbed_layer(self.model, trainable_names)
        if start is None:
            self.cache_status = ("off: the embeddings are perturbed, so every layer's input differs between the "
                                 "+eps and -eps passes and nothing below a perturbed tensor exists to reuse")
            return
        frozen = [p for n, p in self.model.named_parameters() if self.model.layer_of(n) < start]
        # Multiply-adds per token of the trunk's weight matrices (q, k, v, output, feed-forward)
        matrices = sum(p.numel() for layer in self.model.layers[:start] for p in layer.parameters() if p.dim() == 2)

        def trunk_flops(length: int) -> int:
            # Per layer: every weight matrix once per token, plus q·kᵀ and attention·v.
            return 2 * length * matrices + start * 4 * length * length * cfg.hidden_size

        self.cache = TrunkCache(start, cfg.hidden_size, cfg.position_offset, budget_bytes, self.device,
                                self.model.embeddings.word.weight.dtype, frozen, trunk_flops, spill_to_host)
        self.cache_status = f"on: layers 0..{start - 1} and the embeddings are frozen; their output is reused"

    def enable_pairs(self, trainable_names: list[str]) -> None:
        """pair_loss may be used (the model has its pair weights, optim/subsets.py
        attach_pair_weights); the layers below the lowest perturbed one then run once per pair."""
        self.pair_start = lowest_perturbed_layer(self.model, trainable_names) or 0

    def on_device(self, batch: PackedBatch) -> PackedBatch:
        """`batch` on the runner's device, for an eager forward. The last one moved is kept: an
        eager MeZO step runs the same batch twice per direction."""
        if batch.input_ids.device.type == self.device.type:
            return batch
        if self._last_moved[0] is not batch:
            self._last_moved = (batch, batch.to(self.device))
        return self._last_moved[1]

    def _inference(self) -> bool:
        # Dropout makes the trunk random (nothing to reuse) and autograd needs eager execution.
        return not self.model.training and not torch.is_grad_enabled()

    def _graphed(self) -> bool:
        """Whether forwards run as CUDA graph replays now (engine/graphs.py)."""
        return self.graphs is not None and self._inference()

    def _count_filler(self, run: PackedBatch, passes: int) -> None:
        """The tokens a graph computes beyond `run`'s own (its filler sequences), as computed."""
        if self._graphed():
            filler = self.graphs.layout(run).padded - run.num_tokens
            self.stats.graph_filler_tokens += filler * passes
            self.stats.tokens_computed += filler * passes

    def _forward_inputs(self, batch: PackedBatch, pair: bool, passes: int):
        """What `passes` forwards over `batch` run on: the batch (paired or not), the hidden
        states entering layer `start` (from the trunk cache, as its pool rows where it holds the
        whole batch, or a pair's trunk run once), and `start`. (The caller counts the passes.)"""
        run = batch.paired if pair else batch
        hidden, start = None, 0
        if self.cache is not None and self._inference():
            start = self.cache.start_layer
            with self.precision:
                hidden = self.cache.hidden_states(batch, lambda sub: self.model.trunk(sub, start), uses=passes)
        elif pair and self.pair_start:
            start = self.pair_start
            with self.precision:
                hidden = self.model.trunk(self.on_device(batch), start)
        if pair and isinstance(hidden, PoolRows):  # the trunk is the same for both halves: run once
            hidden = hidden.twice
        elif pair and hidden is not None:
            hidden = torch.cat([hidden, hidden])
        return run, hidden, start

    def loss_weight(self, examples: list, labels: torch.Tensor) -> int:
        """What the loss over `examples` averages over: one per example. A data-parallel rank
        scales its shard's loss by its share of the batch's weight, so the ranks' sum is the
        whole batch's loss (train.shard_step_batch)."""
        return len(labels)

    def start_counting(self) -> None:
        """Every counter from zero (the cache keeps what it holds): what a run counts starts here."""
        self.stats = RunnerStats()
        if self.cache is not None:
            self.cache.stats = CacheStats(bytes_held=self.cache.stats.bytes_held)

    def cache_stats(self) -> dict:
        report = (self.cache.stats if self.cache is not None else CacheStats()).report()
        return {**report, "status": self.cache_status}

class ModelRunner(Runner):
    """Masked LMs (model/roberta.py): prompts with one <mask> each -> label-word logits or the
    loss, on CUDA through captured graphs (engine/graphs.py)."""

    def __init__(self, model: MaskedLM, label_word_ids: list[int], mask_token_id: int, device: torch.device,
                 precision: str = "tf32", cuda_graphs: bool = True, pad_token_id: int = 1):
        super().__init__(model, device, precision)
        self.label_word_ids = torch.tensor(label_word_ids, device=device)     # [C]
        self.mask_token_id = mask_token_id
        self._last_packed: PackedBatch | None = None
        self.graphs = GraphedForward(self.model, self.forward, pad_token_id, device) \
            if device.type == "cuda" and cuda_graphs else None

    def pack(self, sequences: list[list[int]]) -> PackedBatch:
        """The packed batch, on the host. A CUDA graph copies it into its own buffers in one
        transfer (engine/graphs.py); an eager forward moves it first (on_device). The last one is
        kept: MeZO at k=16 trains on the same batch at every step, and packing it again costs
        host time and a graph's input copy."""
        if self._last_packed is not None and self._last_packed.sequences == tuple(map(tuple, sequences)):
            return self._last_packed
        self._last_packed = pack(sequences, self.mask_token_id, self.model.config.position_offset)
        return self._last_packed

    def logits(self, batch: PackedBatch, pair: bool = False) -> torch.Tensor:
        """Label-word logits [B, C]; autograd follows torch's mode (off in MeZO, on for Adam).
        With `pair`, [2B, C]: the batch at θ + εz, then at θ − εz, from one forward (see pair_loss)."""
        run, hidden, start = self._forward_inputs(batch, pair, passes=1)
        self._count(run, passes=1)
        if self._graphed():
            return self.graphs(run, hidden, start)[0]
        if isinstance(hidden, PoolRows):
            hidden = hidden.hidden
        return self.forward(self.on_device(run), hidden, start)

    def forward(self, batch: PackedBatch, hidden: torch.Tensor | None = None, start_layer: int = 0) -> torch.Tensor:
        """[B, C] float32 label-word logits of a batch on the device, in the run's precision: what
        an eager pass and a CUDA graph (over its padded static batch) run."""
        with self.precision:
            return self.model(batch, self.label_word_ids, hidden=hidden, start_layer=start_layer).float()

    def graphed(self, batch: PackedBatch, body, inputs: dict[str, torch.Tensor], passes: int,
                pair: bool = False) -> tuple[torch.Tensor, ...]:
        """body(logits, inputs) as one CUDA graph replay (engine/graphs.py): logits() is the
        forward over `batch` (or its pair, [2B, C]) and body calls it `passes` times among its
        own device work, a whole MeZO step. `inputs` reach body through the graph's static
        copies. Counts what `passes` calls of logits() would count: forward passes, tokens,
        and cache lookups, each pass reading the trunk's hidden states (the first may compute
        them). Needs CUDA graphs and inference mode."""
        if not self._graphed():
            raise RuntimeError("ModelRunner.graphed needs CUDA graphs, eval mode and no autograd")
        run, hidden, start = self._forward_inputs(batch, pair, passes)
        self._count(run, passes)
        return self.graphs(run, hidden, start, body, inputs)

    @staticmethod
    def objective(logits: torch.Tensor, labels: torch.Tensor, pair: bool = False) -> torch.Tensor:
        """The loss of a forward's output (MezoStepper's graphed step calls it too): mean
        cross-entropy over the label words, LM-BFF's prompt-based objective; for a pair's [2B, C]
        logits, [L+, L−]."""
        if not pair:
            return F.cross_entropy(logits, labels)
        n = len(labels)
        return torch.stack([F.cross_entropy(logits[:n], labels), F.cross_entropy(logits[n:], labels)])

    def loss(self, batch: PackedBatch, labels: torch.Tensor) -> torch.Tensor:
        return self.objective(self.logits(batch), labels)

    def pair_loss(self, batch: PackedBatch, labels: torch.Tensor) -> torch.Tensor:
        """[L+, L−]: the loss at θ + εz (FlatParameters.plus) and at θ − εz (the model's own
        tensors) from one forward over the batch twice, so the frozen weights are read once for
        both. Needs enable_pairs."""
        return self.objective(self.logits(batch, pair=True), labels, pair=True)

    def _count(self, batch: PackedBatch, passes: int) -> None:
        """Counts `passes` forwards over `batch` (as the graphs run it, fillers included)."""
        self.stats.forward_passes += passes
        self.stats.tokens_computed += batch.num_tokens * passes
        self.stats.padding_tokens_avoided += (len(batch.seq_lens) * max(batch.seq_lens) - batch.num_tokens) * passes
        self._count_filler(batch, passes)
