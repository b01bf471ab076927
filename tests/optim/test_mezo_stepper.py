"""MezoStepper on a GPU: a whole MeZO step is one CUDA graph replay. Its replays must compute
exactly what the step computes when it runs for real (the warm-up run of each capture), read
each step's seeds, learning rate and labels from memory, never wait for the host, and count
what the eager step counts."""

import dataclasses

import pytest
import torch

from zotune.config import TrainConfig
from zotune.evaluate import encode
from zotune.optim.mezo import MezoStepper, direction_seed
from zotune.session import Session
from zotune.tasks.data import default_data_dir, load_split

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# (subset, layers, cache, ± passes as one batch)
SETUPS = [("top:1", None, True, False), ("full", None, False, False), ("lora", (1,), True, True),
          ("top:1", None, True, True), ("top:2", None, False, True)]


def _stepper(model_dir, trainable, layers, cache, paired, cuda_graphs=True):
    # As zotune train builds it: top:1 reads its + pass from the second buffer, full does not.
    session = Session.build(TrainConfig(model=str(model_dir), trainable=trainable, layers=layers, cache=cache,
                                        pair=paired, device="cuda", cuda_graphs=cuda_graphs))
    assert session.paired == paired
    runner, flat = session.runner, session.flat
    examples = load_split(session.task, default_data_dir(), 16, 42, "train")
    sequences, labels = encode(session.prompt, examples), torch.tensor([e.label for e in examples], device="cuda")
    # Two batch shapes, alternating: each is captured once, then replayed with its own inputs.
    batches = [(runner.pack(sequences), labels), (runner.pack(sequences[:20]), labels[:20])]
    return runner, flat, MezoStepper(runner, flat, 1e-2, 0.1, paired), batches


def _run(stepper, batches, steps, recapture_at=()):
    """Each step's (loss, projected gradients, finite), left on the device."""
    results = []
    with torch.inference_mode():
        for step in range(steps):
            if step in recapture_at:
                stepper.runner.graphs.reset()
            lr = 1e-3 * (1 - step / steps)  # a schedule: the learning rate changes at every step
            seeds = [direction_seed(0, step, j) for j in range(2)]
            results.append(dataclasses.astuple(stepper(*batches[step % 2], seeds, lr)))
    return results


@pytest.mark.parametrize("trainable,layers,cache,paired", SETUPS)
def test_replays_equal_the_step_run_for_real(tiny_mlm_dir, trainable, layers, cache, paired):
    # Run b captures again at steps 3 and 6, so those steps run for real (the warm-up) where
    # run a replays. Had a graph kept its capture's seeds or lr, the runs would part there.
    runner_a, flat_a, stepper_a, batches_a = _stepper(tiny_mlm_dir, trainable, layers, cache, paired)
    runner_b, flat_b, stepper_b, batches_b = _stepper(tiny_mlm_dir, trainable, layers, cache, paired)
    assert torch.equal(flat_a.buffer, flat_b.buffer)
    a = _run(stepper_a, batches_a, 8)
    b = _run(stepper_b, batches_b, 8, recapture_at=(3, 6))
    for step, (x, y) in enumerate(zip(a, b)):
        assert all(torch.equal(u, v) for u, v in zip(x, y)), f"step {step}: {x} != {y}"
    assert torch.equal(flat_a.buffer, flat_b.buffer)
    assert runner_a.graphs.captures == 2 and runner_b.graphs.captures == 6
    assert len({tuple(grads.tolist()) for _, grads, _ in a}) == 8  # every step measured its own directions


def test_a_graphed_step_never_syncs_with_the_host(tiny_mlm_dir):
    _, _, stepper, batches = _stepper(tiny_mlm_dir, "top:1", None, True, False)
    _run(stepper, batches, 2)  # captures both shapes and fills the cache
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _run(stepper, batches, 4)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("paired", [False, True])
def test_counts_equal_the_eager_steps(tiny_mlm_dir, paired):
    # The graphed step counts its passes and cache reads as the steps pass by pass would.
    counts = []
    for cuda_graphs in (True, False):
        runner, _, stepper, batches = _stepper(tiny_mlm_dir, "top:1", None, True, paired, cuda_graphs)
        _run(stepper, batches, 5)
        stats = runner.cache_stats()
        counts.append((runner.stats.forward_passes, runner.stats.padding_tokens_avoided,
                       {k: stats[k] for k in ("lookups", "hits", "tokens_reused", "flops_skipped")}))
    assert counts[0] == counts[1]
    assert counts[0][0] == 5 * 2 * (1 if paired else 2)  # steps x directions x (+, -), or one pass a pair


@pytest.mark.parametrize("trainable,layers,cache", [("lora", (1,), True), ("top:1", None, True), ("top:2", None, False)])
def test_a_pair_graph_serves_batches_of_other_token_counts(tiny_mlm_dir, trainable, layers, cache):
    # A graph pads a pair's halves apart, so that each is half of its rows whatever the token
    # count, and batches of as many sequences but other token counts (a k=512 epoch's) replay
    # one graph. Run b captures again at the second batch, running it for real: the replay of
    # run a must give the same bits.
    runs = []
    for recapture_at in ((), (1,)):
        runner, flat, stepper, (full, _) = _stepper(tiny_mlm_dir, trainable, layers, cache, True)
        sequences, labels = full[0].sequences, full[1]

        windows = [runner.pack([list(s) for s in sequences[i:i + 8]]) for i in range(len(sequences) - 8)]
        first = windows[0]
        shape = runner.graphs.bucket(first.paired)  # the pair's graph runs the batch twice over
        second = next(w for w in windows
                      if runner.graphs.bucket(w.paired) == shape and w.num_tokens != first.num_tokens)
        batches = [(first, labels[:8]), (second, labels[:8])]
        runs.append((_run(stepper, batches, 4, recapture_at), flat.buffer.clone(), runner.graphs.captures))
    (a, weights_a, captures_a), (b, weights_b, captures_b) = runs
    assert captures_a == 1 and captures_b == 2
    for step, (x, y) in enumerate(zip(a, b)):
        assert all(torch.equal(u, v) for u, v in zip(x, y)), f"step {step}: {x} != {y}"
    assert torch.equal(weights_a, weights_b)


@pytest.mark.parametrize("trainable,layers,cache", [("top:1", None, True), ("top:2", None, False), ("lora", (1,), True)])
def test_a_paired_graph_agrees_with_the_paired_eager_step(tiny_mlm_dir, trainable, layers, cache):
    # The graph pads each half of the pair apart (the first half's filler between them, which
    # the <mask> queries skip); the eager step runs the halves back to back. The same maths:
    # equal within TF32 rounding, which the projected gradient magnifies.
    runs = []
    for cuda_graphs in (True, False):
        runner, flat, stepper, batches = _stepper(tiny_mlm_dir, trainable, layers, cache, True, cuda_graphs)
        runs.append((_run(stepper, batches, 4), flat.buffer.clone()))
    (graphed, weights_graphed), (eager, weights_eager) = runs
    for (loss_a, grads_a, _), (loss_b, grads_b, _) in zip(graphed, eager):
        torch.testing.assert_close(loss_a, loss_b, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(grads_a, grads_b, rtol=0.1, atol=0.05)
    torch.testing.assert_close(weights_graphed, weights_eager, rtol=1e-3, atol=1e-3)
