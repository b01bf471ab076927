"""Greedy decoding for causal LMs on the runner floor: how a generation task's answer is made.

As the reference's `model.generate(do_sample=False)` (princeton-nlp/MeZO large_models/run.py
`forward(generation=True)`, with the run's defaults num_beams 1, max_new_tokens 50 and
eos_token "\\n"): each step appends the most likely next token to every unfinished sequence,
and a sequence finishes once it has appended one of `stop_ids` (kept, as `generate` keeps its
eos) or `max_new_tokens` tokens.

With a key/value cache (model/causal_lm.py KeyValueCache): the weights are fixed while an
answer is decoded, so the keys and values of a sequence's earlier tokens are those a whole
recomputation would give. The first forward computes the prompts, packed; each later one
computes only the token each unfinished sequence appended, which attends, through the batch's
SharedContext (layers/batch.py), to its sequence's cached rows and then to itself.
"""

from collections.abc import Collection, Sequence
from dataclasses import replace

import numpy as np
import torch

from zotune.engine.candidates import CausalRunner
from zotune.layers.batch import PackedBatch, context_of_keys, pack, shared_context
from zotune.model.causal_lm import KeyValueCache


@torch.inference_mode()
def greedy(runner: CausalRunner, prompts: Sequence[Sequence[int]], max_new_tokens: int,
           stop_ids: Collection[int]) -> list[list[int]]:
    """Each prompt's greedy continuation, its stop token included where one came."""
    outputs: list[list[int]] = [[] for _ in prompts]
    cache = KeyValueCache(runner.model.config.num_layers, sum(map(len, prompts)) + max_new_tokens * len(prompts))
    offset = runner.model.config.position_offset
    batch = pack([list(p) for p in prompts], None, offset)
    batch = replace(batch, context=shared_context([-1] * len(prompts), batch.seq_lens))  # the cache is empty
    rows: list[list[int]] = [[] for _ in prompts]  # each sequence's cached rows
    active = list(range(len(prompts)))
    for _ in range(max_new_tokens):
        cached = cache.rows
        plain = sum(len(prompts[i]) + len(outputs[i]) for i in active)  # what recomputing them whole costs
        chosen = runner.next_tokens(batch, cache, plain).tolist()       # one sync a step
        for i, token in zip(active, chosen):
            outputs[i].append(token)
        for j, i in enumerate(active):  # the rows this forward cached, in its packed order
            rows[i].extend(range(cached + int(batch.cu_seqlens[j]), cached + int(batch.cu_seqlens[j + 1])))
        active = [i for i, token in zip(active, chosen) if token not in stop_ids]
        if not active:
            break
        batch = appended_tokens([outputs[i][-1] for i in active],
                                [len(prompts[i]) + len(outputs[i]) - 1 + offset for i in active],
                                [rows[i] for i in active], cache.rows)
    return outputs


def appended_tokens(tokens: list[int], positions: list[int], cached_rows: list[list[int]], cached: int) -> PackedBatch:
    """A forward of one new token per sequence (`tokens`, at `positions`): sequence b attends to
    its cached rows, then to its new token, which the forward appends at row cached + b."""
    n = len(tokens)
    context = context_of_keys((-1,) * n, [np.array([*r, cached + b], dtype=np.int64) for b, r in enumerate(cached_rows)])
    return PackedBatch(torch.tensor(tokens, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64),
                       torch.arange(n + 1, dtype=torch.int32), torch.empty(0, dtype=torch.int64), (1,) * n,
                       tuple((t,) for t in tokens), 1, context=context)
