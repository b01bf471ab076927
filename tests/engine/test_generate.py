"""Greedy decoding (engine/generate.py), through its key/value cache, gives transformers'
`generate(do_sample=False)` tokens, computing each token once."""

import random
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny_causal import VOCAB
from zotune.engine.candidates import CausalRunner
from zotune.engine.generate import appended_tokens, greedy
from zotune.layers.batch import pack, shared_context
from zotune.model.causal_lm import KeyValueCache
from zotune.model.loading import load_model
from zotune.optim.subsets import select_trainable

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
    # the prompts once, then each appended token once (the key/value cache holds the rest) ...
    assert runner.stats.tokens_computed == sum(map(len, prompts)) + sum(len(o) - 1 for o in out)
    # ... where recomputing every unfinished sequence whole at each step would have computed
    assert runner.stats.plain_tokens == sum(len(p) + i for p, o in zip(prompts, out) for i in range(len(o)))


CUDA_KERNELS = [pytest.param(kernel, marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")]) for kernel in ("dense-float32", "flash-bf16")]


@pytest.mark.parametrize("kernel", ["per-sequence", *CUDA_KERNELS])
@pytest.mark.parametrize("prefix", [False, True])
def test_cached_logits_equal_a_whole_forward(model_dir, one_thread, prefix, kernel, monkeypatch):
    """Prompts of several lengths packed, then one token per step appended through the cache:
    each step's next-token logits equal those of the whole sequences computed at once (same
    weights), with a prefix-tuning prefix too (before the cached rows). On the CPU and with
    CUDA's exact float32 kernel to float32 rounding; with FlashAttention's bf16 kernel to bf16's."""
    device = "cpu" if kernel == "per-sequence" else "cuda"
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", kernel == "flash-bf16")  # picks the kernel
    tolerance = 3e-2 if kernel == "flash-bf16" else 1e-5
    model = load_model(model_dir).eval()
    if prefix:
        select_trainable(model, "prefix")
    model.to(device)
    offset, rng = model.config.position_offset, random.Random(1)
    prompts = [[2, *(rng.randrange(3, VOCAB) for _ in range(n))] for n in (1, 6, 11)]
    appended = [[rng.randrange(3, VOCAB) for _ in range(4)] for _ in prompts]
    cache = KeyValueCache(model.config.num_layers, sum(map(len, prompts)) + 4 * len(prompts))
    batch = pack(prompts, None, offset)
    batch = replace(batch, context=shared_context([-1] * len(prompts), batch.seq_lens))
    rows = [list(range(s, e)) for s, e in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist())]
    with torch.inference_mode():
        for step in range(5):
            moved = batch.to(device)
            got = model.logits(moved, moved.cu_seqlens[1:].long() - 1, cache=cache)       # [B, V]
            whole = pack([p + a[:step] for p, a in zip(prompts, appended)], None, offset).to(device)
            want = model.logits(whole, whole.cu_seqlens[1:].long() - 1)                  # [B, V]
            torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
            if step == 4:
                break
            cached = cache.rows
            positions = [len(p) + step + offset for p in prompts]
            batch = appended_tokens([a[step] for a in appended], positions, rows, cached)
            rows = [r + [cached + b] for b, r in enumerate(rows)]
    assert cache.rows == sum(map(len, prompts)) + 4 * len(prompts)  # full: one more row is refused
    with pytest.raises(ValueError, match="cannot take"):
        cache.layers[0].extend(cache.layers[0].k[:1], cache.layers[0].v[:1])
