"""Candidate scoring for causal LMs on the runner floor: the MeZO large-model objective.

An example (tasks/causal.py CandidateExample) is a prompt and one continuation per class; a
class's score is the log-probability of its continuation's tokens after the prompt, summed,
or their mean where the task is `length_normalised` (princeton-nlp/MeZO large_models/run.py
`one_step_pred`). pack_candidates lays a list of examples out as one PackedBatch whose
mask_index holds the scored rows (each row's next token is scored, CausalLM.forward's
score_index) and a CandidateBatch beside it holds their targets; CausalRunner runs the model
and turns the [S] token log-probabilities into per-candidate sums, scores and losses:
  "candidates"  cross entropy over the candidates' scores (MeZO's `forward_wrap_with_option_len`,
                the classification objective)
  "gold"        the gold continuation's token NLL, averaged over the batch's gold tokens (the
                reference's plain LM loss on the option tokens, --train_as_classification False)

Layout. A continuation c of L tokens after a prompt of P tokens is scored at the rows that
predict it: the prompt's last row, then its own first L-1 tokens (its last token predicts
nothing that is scored, so it is never packed).
  plain layout   each candidate is a sequence of its own, its prompt then its continuation
  shared prompts (the default) each prompt is packed once, and each candidate's tokens after
                 it as a sequence that continues it (layers/batch.py SharedContext): it attends
                 to the prompt's rows, then causally to its own, at positions after the
                 prompt's. Within one forward the weights are fixed, so the prompt's keys and
                 values are the same for every candidate: this is exact, and a prompt of P
                 tokens is computed once instead of C times. A one-token candidate (SST-2's
                 " great") needs no rows of its own: the prompt's last row scores it.
It works inside a MeZO pair (PackedBatch.paired: each half's candidates read their own half's
prompt). On CUDA the forwards, and a whole MeZO step, are CUDA graph replays (engine/graphs.py):
the graph pads the batch, and graph_inputs pads the targets and table to match, with entries
that add exact zeros; pad_candidates is that padded batch on the host, which an eager forward
scores bit for bit as the batch where a row's matmul sums do not depend on the other rows (the
CPU, one thread: tests/engine/test_causal_graphs.py). The packer counts, for every batch, the tokens the plain layout computes and what
padding it to its longest sequence would add; the runner adds them up per forward
(RunnerStats.plain_tokens, padding_tokens_avoided) beside the tokens it computed.

Shape notation: N = examples, C = candidates per example, S = scored rows, L = longest
continuation, T = packed tokens.
"""

import itertools
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from zotune.engine.cache import PoolRows
from zotune.engine.graphs import GraphedForward, Layout, one_forward, padded_arrays, padded_batch
from zotune.engine.runner import Runner
from zotune.layers.batch import PackedBatch, pack, shared_context
from zotune.model.causal_lm import CausalLM, KeyValueCache

OBJECTIVES = ("candidates", "gold")
TABLE_BUCKET = 8  # a CUDA graph's candidate table has a multiple of this many columns (graph_inputs)


@dataclass(frozen=True, eq=False)
class CandidateBatch:
    batch: PackedBatch        # mask_index [S]: the scored rows, candidate after candidate, in token order
    targets: torch.Tensor     # [S] int64: the token each scored row predicts
    table: torch.Tensor       # [N*C, L] int64: the scored rows (indices into S) of each candidate; S pads
    lengths: torch.Tensor     # [N, C] int64: tokens of each continuation
    plain_tokens: int         # tokens of the plain layout: every candidate packed with its whole prompt
    padded_tokens: int        # tokens of the plain layout padded to its longest sequence
    key: tuple                # the examples themselves: the same examples pack to the same batch

    @property
    def num_scored(self) -> int:
        return len(self.targets)

    @property
    def head_inputs(self) -> dict[str, torch.Tensor]:
        """What CausalRunner.forward reads beside the packed batch."""
        return {"targets": self.targets, "table": self.table, "lengths": self.lengths}

    def to(self, device: torch.device | str) -> "CandidateBatch":
        return replace(self, batch=self.batch.to(device), targets=self.targets.to(device),
                       table=self.table.to(device), lengths=self.lengths.to(device))

    @cached_property
    def paired(self) -> "CandidateBatch":
        """The batch twice over (PackedBatch.paired): a MeZO pair's ± passes in one forward.
        Its table indexes the [2S] scores, the second half's rows S later, padding at 2S."""
        s = self.num_scored
        table = torch.where(self.table < s, self.table + s, 2 * s)
        return replace(self, batch=self.batch.paired, targets=torch.cat([self.targets, self.targets]),
                       table=torch.cat([torch.where(self.table < s, self.table, 2 * s), table]),
                       lengths=torch.cat([self.lengths, self.lengths]))


def _layout(examples, share_prompts: bool):
    """(sequences, the sequence each continues or -1, each candidate's scored rows as packed row
    numbers, targets, each candidate's plain-layout length) of pack_candidates."""
    sequences, of, rows, targets, plain_lens, at = [], [], [], [], [], 0
    for example in examples:
        prompt = list(example.prompt_ids)
        prompt_end = at + len(prompt)  # where the prompt ends in the packed rows, when shared
        if share_prompts:
            sequences.append(prompt), of.append(-1)
            at, prompt_index = prompt_end, len(sequences) - 1
        for candidate in example.candidate_ids:
            own = list(candidate[:-1])
            if share_prompts:
                # the prompt's last row predicts the first token, the candidate's own rows the rest
                rows.append([prompt_end - 1, *range(at, at + len(own))])
                if own:  # a one-token candidate needs no rows of its own
                    sequences.append(own), of.append(prompt_index)
            else:
                rows.append(list(range(at + len(prompt) - 1, at + len(prompt) + len(own))))
                sequences.append(prompt + own), of.append(-1)
            at += len(own) if share_prompts else len(prompt) + len(own)
            targets += candidate
            plain_lens.append(len(prompt) + len(own))
    return sequences, of, rows, targets, plain_lens


def pack_candidates(examples, position_offset: int, share_prompts: bool = True) -> CandidateBatch:
    """The examples' candidates as one batch on the host, the prompts shared or every candidate
    with its own copy (see the module docstring). Every example must have the same number of
    candidates, each at least one token long (tasks/causal.py guarantees both for a task)."""
    counts = {len(e.candidate_ids) for e in examples}
    if len(counts) != 1 or any(not c for e in examples for c in e.candidate_ids):
        raise ValueError("pack_candidates needs examples with the same number of non-empty candidates")
    sequences, of, rows, targets, plain_lens = _layout(examples, share_prompts)
    batch = pack(sequences, None, position_offset)
    if share_prompts:
        before = np.array([len(sequences[o]) if o >= 0 else 0 for o in of], dtype=np.int64)
        # A continuation's positions go on after its prompt's; its history is the trunk cache's key.
        # (A pair of tuples, never equal to a sequence's flat tokens: a prompt that happens to be
        # another prompt followed by these tokens holds more rows.)
        history = tuple((batch.sequences[o], own) if o >= 0 else own for o, own in zip(of, batch.sequences))
        batch = replace(batch, positions=batch.positions + torch.from_numpy(np.repeat(before, batch.seq_lens)),
                        sequences=history, context=shared_context(of, batch.seq_lens))
    return _candidate_batch(batch, rows, targets, examples, counts.pop(),
                            plain=(sum(plain_lens), len(plain_lens) * max(plain_lens)))


def _candidate_batch(batch: PackedBatch, rows: list[list[int]], targets: list[int], examples, n_candidates: int,
                     plain: tuple[int, int]) -> CandidateBatch:
    """The CandidateBatch of a packed batch and each candidate's scored rows (packed row numbers)."""
    lengths = np.array([len(r) for r in rows], dtype=np.int64)                   # [N*C]
    flat_rows = np.fromiter(itertools.chain.from_iterable(rows), np.int64, count=int(lengths.sum()))
    starts = np.cumsum(lengths) - lengths
    offsets = np.arange(lengths.max())                                          # [L]
    table = np.where(offsets[None, :] < lengths[:, None], starts[:, None] + offsets[None, :], len(flat_rows))
    return CandidateBatch(replace(batch, mask_index=torch.from_numpy(flat_rows)), torch.tensor(targets),
                          torch.from_numpy(table), torch.from_numpy(lengths).view(-1, n_candidates),
                          *plain, tuple(examples))


def summed(logprobs: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[N*C] sums of each candidate's token log-probabilities [S] (table [N*C, L], S pads). A
    padded gather and additions column by column, not a scatter-add nor a reduction kernel,
    so that the order of the additions, and the bits, are the same on every device and for
    any number of padding columns (each adds an exact zero: a CUDA graph's wider table)."""
    gathered = torch.cat([logprobs, logprobs.new_zeros(1)])[table]     # [N*C, L]
    total = gathered[:, 0]
    for column in gathered.unbind(1)[1:]:
        total = total + column
    return total


def graph_inputs(laid_out: CandidateBatch, layout: Layout, pad_token_id: int) -> dict[str, np.ndarray]:
    """The head's inputs of `laid_out` (a CandidateBatch as its forward runs it: paired or not, on
    the host) padded as a CUDA graph pads its batch (engine/graphs.py Layout): targets at the
    padded scored rows (the padding rows' any token), the table pointing at them, its padding
    (and TABLE_BUCKET's columns) at summed's zero, and the lengths as they are. So each
    candidate's sum adds the same numbers in the same order, then zeros: the same bits."""
    total = layout.parts * layout.scored_pad                       # summed's zero is at this index
    where = layout.scored_index()                                   # [S] padded index of each scored row
    targets = np.full(total, pad_token_id, np.int64)
    targets[where] = laid_out.targets.numpy()
    table = laid_out.table.numpy()
    padded_table = np.full((len(table), -(-table.shape[1] // TABLE_BUCKET) * TABLE_BUCKET), total, np.int64)
    where = np.append(where, total)  # the table's padding, S, goes to the padded zero
    padded_table[:, :table.shape[1]] = where[table]
    return {"targets": targets, "table": padded_table, "lengths": laid_out.lengths.numpy()}


def pad_candidates(laid_out: CandidateBatch, position_offset: int, pad_token_id: int = 0) -> CandidateBatch:
    """`laid_out` (as its forward runs it: paired or not, on the host) padded as a CUDA graph runs
    it, as a CandidateBatch on the host: what CausalRunner.forward computes over it is what the
    graph computes, so that an eager forward, on the CPU too, checks the padding."""
    layout = Layout.of(laid_out.batch, pad_scored=True)
    arrays = padded_arrays(laid_out.batch, layout, pad_token_id, position_offset)
    batch = padded_batch(laid_out.batch, layout, {k: torch.from_numpy(a) for k, a in arrays.items()}, pad_token_id)
    return replace(laid_out, batch=batch,
                   **{k: torch.from_numpy(a) for k, a in graph_inputs(laid_out, layout, pad_token_id).items()})


class CausalRunner(Runner):
    """CausalLM (model/causal_lm.py) over candidate examples: packs them (pack), scores them
    (candidate_logprobs, logits) and gives the task's loss for MeZO and Adam (loss, pair_loss),
    on CUDA through captured graphs (engine/graphs.py; graphed, a whole MeZO step).
    `length_normalised` and `objective` come from the task row (tasks/causal.py);
    `share_prompts` picks the layout (the module docstring); `pad_token_id` fills a graph's
    filler sequences (any token: their rows are never read)."""

    def __init__(self, model: CausalLM, device: torch.device, precision: str = "tf32", *,
                 length_normalised: bool = True, objective: str = "candidates", share_prompts: bool = True,
                 cuda_graphs: bool = True, pad_token_id: int = 0):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; known: {OBJECTIVES}")
        super().__init__(model, device, precision)
        self.length_normalised, self.loss_kind, self.share_prompts = length_normalised, objective, share_prompts
        self._last_packed: CandidateBatch | None = None
        self.pad_token_id = pad_token_id
        self.graphs = GraphedForward(model, self.forward, pad_token_id, device, pad_scored=True) \
            if device.type == "cuda" and cuda_graphs else None
        self._graph_inputs: tuple = (None, None)  # (a laid-out batch, its graph_inputs): a step reuses them

    def pack(self, examples) -> CandidateBatch:
        """The examples as one CandidateBatch on the host; the last one is kept (MeZO at k=16
        trains on the same batch at every step)."""
        if self._last_packed is None or self._last_packed.key != tuple(examples):
            self._last_packed = pack_candidates(examples, self.model.config.position_offset, self.share_prompts)
        return self._last_packed

    def on_device(self, batch):
        """`batch` (a CandidateBatch, or a PackedBatch as Runner.on_device) on the runner's device,
        the last one moved kept: an eager MeZO step runs the same batch twice per direction."""
        if isinstance(batch, PackedBatch) or batch.targets.device.type == self.device.type:
            return super().on_device(batch) if isinstance(batch, PackedBatch) else batch
        if self._last_moved[0] is not batch:
            self._last_moved = (batch, batch.to(self.device))
        return self._last_moved[1]

    def forward(self, batch: PackedBatch, hidden: torch.Tensor | None = None, start_layer: int = 0, *,
                targets: torch.Tensor, table: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([N, C] summed log-probability of each candidate given its prompt, [N, C] its token
        counts) of a batch as laid out (a CandidateBatch's fields, CandidateBatch.head_inputs:
        paired or not, padded or not) on the device, in the run's precision: what an eager pass
        and a CUDA graph (over its padded static batch) run."""
        with self.precision:
            logprobs = self.model(batch, batch.mask_index, targets, hidden=hidden, start_layer=start_layer)  # [S]
        return summed(logprobs, table).view(lengths.shape), lengths

    def candidate_logprobs(self, candidates: CandidateBatch, pair: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """([N, C] summed log-probability of each candidate given its prompt, [N, C] its token
        counts); [2N, C] each with `pair`: the batch at θ + εz, then at θ − εz. Counts the forward."""
        if self._graphed():
            return self.graphed(candidates, one_forward, {}, passes=1, pair=pair)
        on_device = self.on_device(candidates)
        run, hidden, start = self._forward_inputs(on_device.batch, pair, passes=1)
        self._count(candidates, pair, passes=1)
        if isinstance(hidden, PoolRows):
            hidden = hidden.hidden  # gathered from the trunk cache's pool
        return self.forward(run, hidden, start, **(on_device.paired if pair else on_device).head_inputs)

    def graphed(self, candidates: CandidateBatch, body, inputs: dict[str, torch.Tensor], passes: int,
                pair: bool = False) -> tuple[torch.Tensor, ...]:
        """body(forward, inputs) as one CUDA graph replay (engine/graphs.py), as ModelRunner.graphed:
        forward() gives candidate_logprobs' pair of tensors. Needs CUDA graphs and inference mode."""
        if not self._graphed():
            raise RuntimeError("CausalRunner.graphed needs CUDA graphs, eval mode and no autograd")
        laid_out = candidates.paired if pair else candidates
        if self._graph_inputs[0] is not laid_out:
            self._graph_inputs = (laid_out, graph_inputs(laid_out, self.graphs.layout(laid_out.batch),
                                                         self.pad_token_id))
        run, hidden, start = self._forward_inputs(candidates.batch, pair, passes)
        self._count(candidates, pair, passes)
        return self.graphs(run, hidden, start, body, inputs, self._graph_inputs[1])

    def logits(self, candidates: CandidateBatch, pair: bool = False) -> torch.Tensor:
        """[N, C] the candidates' scores, what a prediction takes the argmax of: the mean token
        log-probability where the task is length-normalised, else the sum."""
        sums, lengths = self.candidate_logprobs(candidates, pair)
        return sums / lengths if self.length_normalised else sums

    def loss(self, candidates: CandidateBatch, labels: torch.Tensor) -> torch.Tensor:
        return self.objective(self.candidate_logprobs(candidates), labels)

    def pair_loss(self, candidates: CandidateBatch, labels: torch.Tensor) -> torch.Tensor:
        """[L+, L−] from one forward over the batch twice (see ModelRunner.pair_loss)."""
        return self.objective(self.candidate_logprobs(candidates, pair=True), labels, pair=True)

    def objective(self, output: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor,
                  pair: bool = False) -> torch.Tensor:
        """The task's loss of a forward's output (sums, lengths) (MezoStepper's graphed step calls
        it too); for a pair's [2N, C] output, [L+, L−]."""
        sums, lengths = output
        if not pair:
            return self._objective(sums, lengths, labels)
        n = len(labels)
        return torch.stack([self._objective(sums[:n], lengths[:n], labels),
                            self._objective(sums[n:], lengths[n:], labels)])

    def loss_weight(self, examples, labels: torch.Tensor) -> int:
        """Runner.loss_weight: examples, or for "gold" the gold continuations' tokens, the loss's
        denominator (_objective)."""
        if self.loss_kind == "gold":
            return sum(len(e.candidate_ids[label]) for e, label in zip(examples, labels.tolist()))
        return len(labels)

    def _objective(self, sums: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.loss_kind == "gold":
            gold = labels[:, None]
            return -sums.gather(1, gold).sum() / lengths.gather(1, gold).sum()
        return F.cross_entropy(sums / lengths if self.length_normalised else sums, labels)

    def next_tokens(self, batch: PackedBatch, cache: KeyValueCache, plain_tokens: int) -> torch.Tensor:
        """[B] the most likely token after each sequence of `batch` (greedy decoding,
        engine/generate.py): its new tokens only, attending through its SharedContext to the
        rows `cache` holds, whose keys and values it joins; the head reads each sequence's last
        row. Counted as a forward whose plain layout (every sequence whole, recomputed) would
        have computed `plain_tokens`. The trunk cache is left out (nothing recurs)."""
        batch = self.on_device(batch)
        last = batch.cu_seqlens[1:].long() - 1                                  # [B]
        with self.precision:
            logits = self.model.logits(batch, last, cache=cache)                # [B, V]
        self.stats.forward_passes += 1
        self.stats.tokens_computed += batch.num_tokens
        self.stats.plain_tokens += plain_tokens
        self.stats.padding_tokens_avoided += len(batch.seq_lens) * max(batch.seq_lens) - batch.num_tokens
        return logits.argmax(-1)

    def cache_stats(self) -> dict:
        """The trunk cache's report (Runner.cache_stats) and prefix sharing's, counted per forward:
        tokens computed (less a CUDA graph's fillers) against tokens the plain layout would have
        computed."""
        computed, plain = self.stats.tokens_computed - self.stats.graph_filler_tokens, self.stats.plain_tokens
        sharing = {"tokens_computed": computed, "plain_tokens": plain, "tokens_saved": plain - computed,
                   "saved_share": (plain - computed) / plain if plain else 0.0}
        return {**super().cache_stats(), "prefix_sharing": sharing}

    def _count(self, candidates: CandidateBatch, pair: bool, passes: int) -> None:
        """`passes` forwards over `candidates` (twice over in a pair); what they compute (a graph's
        fillers included), and what the plain layout, padded or not, would have."""
        times = (2 if pair else 1) * passes
        self.stats.forward_passes += passes
        self.stats.tokens_computed += candidates.batch.num_tokens * times
        self.stats.plain_tokens += candidates.plain_tokens * times
        self.stats.padding_tokens_avoided += (candidates.padded_tokens - candidates.plain_tokens) * times
        if self._graphed():
            self._count_filler(candidates.batch.paired if pair else candidates.batch, passes)
