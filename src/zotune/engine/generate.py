"""Greedy decoding for causal LMs on the runner floor: how a generation task's answer is made.

As the reference's `model.generate(do_sample=False)` (princeton-nlp/MeZO large_models/run.py
`forward(generation=True)`, with the run's defaults num_beams 1, max_new_tokens 50 and
eos_token "\\n"): each step appends the most likely next token to every unfinished sequence,
and a sequence finishes once it has appended one of `stop_ids` (kept, as `generate` keeps its
eos) or `max_new_tokens` tokens. Every step recomputes each sequence whole (no key/value
cache): the unfinished sequences of a step are packed into one forward
(CausalRunner.next_tokens), which reads the head at their last rows only.
"""

from collections.abc import Collection, Sequence

import torch

from zotune.engine.candidates import CausalRunner


@torch.inference_mode()
def greedy(runner: CausalRunner, prompts: Sequence[Sequence[int]], max_new_tokens: int,
           stop_ids: Collection[int]) -> list[list[int]]:
    """Each prompt's greedy continuation, its stop token included where one came."""
    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    for _ in range(max_new_tokens):
        if not active:
            break
        chosen = runner.next_tokens([[*prompts[i], *outputs[i]] for i in active]).tolist()  # one sync a step
        for i, token in zip(active, chosen):
            outputs[i].append(token)
        active = [i for i, token in zip(active, chosen) if token not in stop_ids]
    return outputs
