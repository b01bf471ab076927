"""Greedy decoding (engine/generate.py) gives transformers' `generate(do_sample=False)` tokens."""

import random

import torch
from transformers import AutoModelForCausalLM

from tests.tiny_causal import VOCAB
from zotune.engine.candidates import CausalRunner
from zotune.engine.generate import greedy
from zotune.model.loading import load_model

def hf_greedy(hf, prompt: list[int], max_new_tokens: int, stop_ids: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                      max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=1)
    new = out[0, len(prompt):].tolist()
    # a batch of one is never padded, but generate stops at the first stop token: cut after it
    ends = [i for i, t in enumerate(new) if t in stop_ids]
    return new[:ends[0] + 1] if ends else new


def test_greedy_tokens_equal_transformers_generate(model_dir, one_thread):
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    runner = CausalRunner(load_model(model_dir), torch.device("cpu"))
    rng = random.Random(0)
    prompts = [[2, *(rng.randrange(3, VOCAB) for _ in range(n))] for n in (1, 7, 12, 30)]
    with torch.inference_mode():
        free = [hf_greedy(hf, p, 12, [0]) for p in prompts]
    # stop tokens that the model does produce, so that sequences finish at different steps
    stop_ids = [free[1][3], free[2][5]]
    with torch.inference_mode():
        want = [hf_greedy(hf, p, 12, stop_ids) for p in prompts]
    got = greedy(runner, prompts, 12, set(stop_ids))
    assert got == want
    assert any(len(g) < 12 for g in got) and all(g[-1] in stop_ids for g in got if len(g) < 12)
    assert greedy(runner, prompts, 12, {0}) == free


def test_one_forward_per_step_for_the_unfinished(model_dir, one_thread):
    runner = CausalRunner(load_model(model_dir), torch.device("cpu"))
    prompts = [[2, 5, 6], [2, 7]]
    first = greedy(runner, prompts, 1, set())
    runner.start_counting()
    out = greedy(runner, prompts, 3, {first[0][0]})  # the first prompt stops after one token
    assert len(out[0]) == 1
    steps = max(map(len, out))
    assert runner.stats.forward_passes == steps
    assert runner.stats.tokens_computed == sum(len(p) + i for p, o in zip(prompts, out) for i in range(len(o)))
