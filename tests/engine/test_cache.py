"""The trunk cache reuses exactly what the perturbation cannot change, and counts what it does."""

import json

import pytest
import torch
from safetensors.torch import load_file

from zotune.config import TrainConfig
from zotune.evaluate import build
from zotune.train import train

# (subset, layers, ± passes as one batch)
SUBSETS = [("top:1", None, False), ("lora", (1,), False), ("prefix", (1,), False), ("bias", (1,), False),
           ("top:1", None, True), ("lora", (1,), True), ("prefix", (1,), True), ("bias", (1,), True)]


def _train(tmp_path, model_dir, name, **overrides):
    options = dict(model=str(model_dir), steps=6, eval_steps=3, log_steps=1, quiet=True, device="cpu",
                   output_dir=str(tmp_path / name), lr=1e-3, eps=1e-2, batch_size=32)
    options.update(overrides)
    summary = train(TrainConfig(**options))
    run = tmp_path / name
    return summary, (run / "metrics.jsonl").read_text(), load_file(run / "best.safetensors")


@pytest.mark.parametrize("trainable,layers,pair", SUBSETS)
def test_cache_on_and_off_are_bit_identical_when_the_batch_repeats(tmp_path, tiny_mlm_dir, trainable, layers, pair):
    # k=16 SST-2 has 32 training examples and the batch is 32: every step sees the same packed
    # batch, so the cached hidden states are the very numbers recomputation would produce. A
    # pair runs its trunk once on the batch (not the batch twice) with or without the cache.
    on, metrics_on, weights_on = _train(tmp_path, tiny_mlm_dir, "on", trainable=trainable, layers=layers, pair=pair)
    off, metrics_off, weights_off = _train(tmp_path, tiny_mlm_dir, "off", trainable=trainable, layers=layers,
                                           pair=pair, cache=False)
    assert metrics_on == metrics_off
    assert all(torch.equal(weights_on[n], weights_off[n]) for n in weights_on)
    assert on["test_accuracy"] == off["test_accuracy"]
    assert on["cache"]["hits"] > 0 and off["cache"]["lookups"] == 0


def test_cache_with_sampled_batches_agrees_within_float32_rounding(tmp_path, tiny_mlm_dir):
    # Batch 8 of 32: a miss is computed in a sub-batch of the new sequences only, a matrix of
    # another height, and BLAS may pick another kernel (another summation order) for it. So
    # bits can differ; values agree to float32 rounding, ~1e-6 relative on the losses.
    _, metrics_on, weights_on = _train(tmp_path, tiny_mlm_dir, "on", trainable="top:1", batch_size=8)
    _, metrics_off, weights_off = _train(tmp_path, tiny_mlm_dir, "off", trainable="top:1", batch_size=8, cache=False)
    on = [json.loads(line) for line in metrics_on.splitlines()]
    off = [json.loads(line) for line in metrics_off.splitlines()]
    for a, b in zip(on, off):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for n in weights_on:
        torch.testing.assert_close(weights_on[n], weights_off[n], rtol=1e-5, atol=1e-6)


def _runner(model_dir, trainable_names=("layers.1.ffn_in.weight",), budget=1 << 30):
    prompted = build(str(model_dir), "sst2", device="cpu")
    prompted.runner.enable_cache(list(trainable_names), budget)
    encode = lambda text: prompted.prompt.encode((text,))  # noqa: E731
    return prompted.runner, encode


def test_counters_equal_a_hand_count(tiny_mlm_dir):
    runner, encode = _runner(tiny_mlm_dir)
    a, b, c = encode("good "), encode("a long and winding sentence "), encode("bad ")
    labels = torch.tensor([1, 0])
    with torch.inference_mode():
        runner.loss(runner.pack([a, b]), labels)        # 2 lookups, 2 misses
        runner.loss(runner.pack([a, b]), labels)        # 2 lookups, 2 hits
        runner.loss(runner.pack([c, a]), labels)        # 2 lookups, 1 hit (a)
    stats = runner.cache_stats()
    assert (stats["lookups"], stats["hits"], stats["evictions"]) == (6, 3, 0)
    assert stats["tokens_reused"] == 2 * len(a) + len(b)
    cfg = runner.model.config
    per_layer = lambda n: 2 * n * (4 * cfg.hidden_size ** 2 + 2 * cfg.hidden_size * cfg.intermediate_size) \
        + 4 * n * n * cfg.hidden_size  # noqa: E731
    assert stats["flops_skipped"] == 2 * per_layer(len(a)) + per_layer(len(b))   # start layer 1: one layer
    assert stats["hit_rate"] == 0.5
    assert stats["bytes_held"] == sum(-(-n // 16) * 16 for n in map(len, (a, b, c))) * cfg.hidden_size * 4


def test_a_lookup_for_several_passes_counts_each_pass(tiny_mlm_dir):
    # A whole MeZO step in one CUDA graph reads the hidden states 2n times from one lookup
    # (uses=2n): each pass counts as a lookup, and a sequence computed for the first pass is a
    # hit for the others, its trunk not run again.
    runner, encode = _runner(tiny_mlm_dir)
    a, b, c = encode("good "), encode("a long and winding sentence "), encode("bad ")
    trunk_runs = []

    def trunk(sub):
        trunk_runs.append(len(sub.seq_lens))
        return runner.model.trunk(sub, runner.cache.start_layer)
    with torch.inference_mode():
        first = runner.cache.hidden_states(runner.pack([a, b]), trunk, uses=4)   # 8 lookups: 2 misses, 6 hits
        second = runner.cache.hidden_states(runner.pack([c, a]), trunk, uses=2)  # 4 lookups: c misses once
    stats = runner.cache_stats()
    assert trunk_runs == [2, 1]
    assert (stats["lookups"], stats["hits"]) == (12, 9)
    assert stats["tokens_reused"] == 3 * (len(a) + len(b)) + 2 * len(a) + len(c)
    assert torch.equal(second.hidden[len(c):], first.hidden[:len(a)])  # a's rows, gathered from the pool


def test_changing_a_frozen_weight_invalidates(tiny_mlm_dir):
    runner, encode = _runner(tiny_mlm_dir)
    batch, labels = runner.pack([encode("good "), encode("bad ")]), torch.tensor([1, 0])
    with torch.inference_mode():
        runner.loss(batch, labels)
        with torch.no_grad():
            runner.model.layers[0].ffn_in.weight.mul_(1.5)   # a frozen tensor below the start layer
        after = runner.loss(batch, labels)
    assert runner.cache.stats.invalidations == 1 and runner.cache.stats.hits == 0
    runner.cache = None
    with torch.inference_mode():
        assert torch.equal(after, runner.loss(batch, labels))  # the recomputed value, not the stale one


def test_eviction_under_a_small_budget_gives_identical_results(tiny_mlm_dir):
    sentences = [f"sentence number {i} of the test " for i in range(6)]
    results = {}
    for budget in (1 << 30, 2 * 16 * 32 * 4):      # room for everything; room for two short entries
        runner, encode = _runner(tiny_mlm_dir, budget=budget)
        out = []
        with torch.inference_mode():
            for rep in range(2):
                for i in range(0, 6, 2):
                    out.append(runner.logits(runner.pack([encode(sentences[i]), encode(sentences[i + 1])])))
        results[budget] = (torch.stack(out), runner.cache_stats())
    big, small = results[1 << 30], results[2 * 16 * 32 * 4]
    assert torch.equal(big[0], small[0])
    assert small[1]["evictions"] > 0 and big[1]["evictions"] == 0 and big[1]["hits"] == 6


def _logits_under_budgets(model_dir, batches, budgets, device="cpu", spill=False):
    """Logits of `batches` (lists of sentences) with the cache off (None) and under each budget."""
    results = {}
    for budget in budgets:
        prompted = build(str(model_dir), "sst2", device=device)
        runner = prompted.runner
        if budget is not None:
            runner.enable_cache(["layers.1.ffn_in.weight"], budget, spill_to_host=spill)
        with torch.inference_mode():
            out = [runner.logits(runner.pack([prompted.prompt.encode((t,)) for t in batch])) for batch in batches]
        results[budget] = (out, runner.cache_stats())
    return results


def test_a_budget_smaller_than_the_batch_still_gives_exact_results(tiny_mlm_dir):
    # Room for two short sentences. The third batch's miss cannot evict its own two hits, so it
    # is not stored: that batch is put together from the pool and the computed rows. The last
    # batch's miss evicts "bad ".
    batches = [["good ", "bad "], ["good ", "bad "], ["good ", "bad ", "fine "], ["fine ", "good "]]
    results = _logits_under_budgets(tiny_mlm_dir, batches, [None, 2 * 16 * 32 * 4])
    (off, _), (small, stats) = results[None], results[2 * 16 * 32 * 4]
    assert all(torch.equal(a, b) for a, b in zip(off, small))
    assert stats["evictions"] > 0 and stats["hits"] >= 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_spill_to_host_gives_the_same_results(tiny_mlm_dir):
    sentences = [f"sentence number {i} of the test " for i in range(6)]
    batches = [sentences[i:i + 2] for i in range(0, 6, 2)] * 2
    budget = 2 * 16 * 32 * 4
    spilled = _logits_under_budgets(tiny_mlm_dir, batches, [budget], "cuda", spill=True)[budget]
    dropped = _logits_under_budgets(tiny_mlm_dir, batches, [budget], "cuda")[budget]
    assert all(torch.equal(a, b) for a, b in zip(spilled[0], dropped[0]))
    assert spilled[1]["host_hits"] > 0 and spilled[1]["hits"] == 6 and dropped[1]["hits"] == 0


def test_full_fine_tuning_reports_zero_and_why(tiny_mlm_dir):
    runner, _ = _runner(tiny_mlm_dir, trainable_names=("embeddings.word.weight", "layers.0.ffn_in.weight"))
    stats = runner.cache_stats()
    assert stats["hit_rate"] == 0.0 and stats["lookups"] == 0 and "embeddings are perturbed" in stats["status"]


def test_a_sequence_twice_in_one_batch_is_stored_once(tiny_mlm_dir):
    runner, encode = _runner(tiny_mlm_dir)
    a, b = encode("good "), encode("a long and winding sentence ")
    with torch.inference_mode():
        logits = runner.logits(runner.pack([a, b, a]))
    cache, runner.cache = runner.cache, None
    with torch.inference_mode():
        assert torch.equal(logits, runner.logits(runner.pack([a, b, a])))
    runner.cache = cache
    blocks = sum(-(-len(s) // 16) for s in (a, b))
    assert runner.cache.blocks_in_use == blocks and len(runner.cache.entries) == 2
    assert runner.cache_stats()["bytes_held"] == blocks * 16 * runner.model.config.hidden_size * 4
