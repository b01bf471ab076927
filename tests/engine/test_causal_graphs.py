"""CUDA graphs of a causal LM's candidate scoring (engine/graphs.py, engine/candidates.py).

A graph runs a batch padded to its bucket: filler tokens, padded scored rows and targets, a
wider candidate table, padded shared-prompt keys. On the CPU, where a row's sums do not depend
on the other rows of its matrix (one thread), the padded batch (pad_candidates) must score
exactly as the batch does: the padding adds exact zeros. On a GPU the matmul kernels pick their
blocking by row count, so the padded batch is not the batch bit for bit there; what must hold
is that a graph replay computes what an eager forward over the padded batch computes (from
the same hidden states), bit for bit, and that a graphed MeZO step is that eager step."""

import random

import numpy as np
import pytest
import torch

from tests.tiny_causal import VOCAB
from zotune.config import TrainConfig
from zotune.engine.cache import PoolRows
from zotune.engine.candidates import CausalRunner, graph_inputs, pad_candidates
from zotune.engine.graphs import SCORED_BUCKET, GraphedForward, Layout, _sections, _views, padded_arrays, padded_batch
from zotune.model.loading import load_model
from zotune.optim.flat import FlatParameters
from zotune.optim.mezo import MezoStepper, direction_seed, mezo_step
from zotune.optim.subsets import SubsetOptions, attach_pair_weights, select_trainable
from zotune.optim.sweep import seed_tensor
from zotune.session import Session
from zotune.tasks.causal import CandidateExample

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# Batch shapes: SST-2's one-token candidates (the prompts alone are packed), COPA's sentences.
SHAPES = {"sst2": dict(n=6, candidates=2, lengths=(1, 1)), "copa": dict(n=4, candidates=2, lengths=(2, 7))}
# MeZO pairs: (subset, layers); None: the unpaired forward
SUBSETS = {"unpaired": None, "lora": ("lora", (1,)), "prefix": ("prefix", None), "top:1": ("top:1", None)}


def examples(shape: str, seed: int) -> list[CandidateExample]:
    spec, rng = SHAPES[shape], random.Random(seed)
    tokens = lambda k: tuple(rng.randrange(3, VOCAB) for _ in range(k))  # noqa: E731
    return [CandidateExample(tokens(rng.randint(2, 14)), tuple(tokens(rng.randint(*spec["lengths"]))
                                                               for _ in range(spec["candidates"])),
                             rng.randrange(spec["candidates"])) for _ in range(spec["n"])]


def paired_model(model_dir, subset, device="cpu"):
    """The model, with `subset`'s pair weights attached (θ + εz a random step away), or none."""
    model = load_model(model_dir)
    if subset is None:
        return model.to(device), None
    spec, layers = subset
    flat = FlatParameters(select_trainable(model, spec, SubsetOptions(layers=layers, seed=1)), lambda n, p: False)
    assert attach_pair_weights(model, flat)
    flat.plus.copy_(flat.buffer + 0.05 * torch.randn(flat.numel, generator=torch.Generator().manual_seed(0)))
    flat.to(device)
    model.to(device)
    attach_pair_weights(model, flat)  # the pair views of the moved buffers
    return model, flat


def padded_hidden(hidden: torch.Tensor, layout: Layout) -> torch.Tensor:
    """[P, E]: the rows of a batch's hidden states where the graph puts them, zeros in the fillers."""
    out = hidden.new_zeros(layout.padded, hidden.shape[1])
    for to, source in layout.token_parts():
        out[to] = hidden[source]
    return out


def eager_padded(runner: CausalRunner, candidates, pair: bool):
    """What a graph computes for `candidates`: the eager forward over the padded batch, from the
    hidden states the runner gives the graph (the trunk cache's, or a pair's trunk), padded."""
    laid_out = candidates.paired if pair else candidates
    padded = pad_candidates(laid_out, runner.model.config.position_offset, runner.pad_token_id).to(runner.device)
    _, hidden, start = runner._forward_inputs(runner.on_device(candidates).batch, pair, passes=1)
    if hidden is not None:
        hidden = padded_hidden(hidden.hidden if isinstance(hidden, PoolRows) else hidden,
                               Layout.of(laid_out.batch, pad_scored=True))
    return runner.forward(padded.batch, hidden, start, **padded.head_inputs)


# ---- the CPU: the padded batch scores as the batch, bit for bit ------------------------------

@pytest.mark.parametrize("subset", list(SUBSETS))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("share", [True, False], ids=["shared-prompts", "plain"])
def test_the_padded_batch_scores_as_the_batch(model_dir, one_thread, share, shape, subset):
    model, _ = paired_model(model_dir, SUBSETS[subset])
    pair = SUBSETS[subset] is not None
    runner = CausalRunner(model, torch.device("cpu"), share_prompts=share)
    batch = runner.pack(examples(shape, seed=1))
    laid_out = batch.paired if pair else batch
    padded = pad_candidates(laid_out, model.config.position_offset)
    layout = Layout.of(laid_out.batch, pad_scored=True)
    assert padded.batch.num_tokens == layout.padded > laid_out.batch.num_tokens  # fillers, one a part
    assert len(padded.targets) % SCORED_BUCKET == 0 and padded.table.shape[1] == 8  # TABLE_BUCKET
    labels = torch.tensor([e.label for e in batch.key])
    with torch.inference_mode():
        want = runner.forward(laid_out.batch, **laid_out.head_inputs)
        got = runner.forward(padded.batch, **padded.head_inputs)
        assert torch.equal(runner.candidate_logprobs(batch, pair)[0], want[0])  # the runner's own path
        start = 1  # from the hidden states entering the top layer, as above a trunk cache
        hidden = model.trunk(laid_out.batch, start)
        want_top = runner.forward(laid_out.batch, hidden, start, **laid_out.head_inputs)
        got_top = runner.forward(padded.batch, padded_hidden(hidden, layout), start, **padded.head_inputs)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(got_top[0], want_top[0])
    for normalised, objective in ((True, "candidates"), (False, "candidates"), (True, "gold")):
        runner.length_normalised, runner.loss_kind = normalised, objective
        assert torch.equal(runner.objective(got, labels, pair), runner.objective(want, labels, pair))


def test_padding_then_pairing_is_pairing_then_padding(model_dir, one_thread):
    # The eager twin of a graphed MeZO step (test_graphed_mezo_steps_are_the_eager_padded_steps)
    # pairs the padded batch, where the graph pads the pair: the same rows.
    model, _ = paired_model(model_dir, SUBSETS["lora"])
    runner = CausalRunner(model, torch.device("cpu"))
    batch = runner.pack(examples("copa", seed=2))
    offset = model.config.position_offset
    a, b = pad_candidates(batch, offset).paired, pad_candidates(batch.paired, offset)
    for name in ("input_ids", "positions", "cu_seqlens", "mask_index"):
        assert torch.equal(getattr(a.batch, name), getattr(b.batch, name)), name
    assert torch.equal(a.batch.context.key_rows, b.batch.context.key_rows)
    assert torch.equal(a.table, b.table) and torch.equal(a.targets, b.targets)
    with torch.inference_mode():
        assert torch.equal(runner.forward(a.batch, **a.head_inputs)[0], runner.forward(b.batch, **b.head_inputs)[0])


def test_a_graphs_staged_buffer_holds_the_padded_batch(model_dir, one_thread):
    # What a capture does without its device: the batch, its pool rows and its head inputs laid
    # out in one int32 buffer (one transfer), the static batch made of views of it.
    model, _ = paired_model(model_dir, SUBSETS["prefix"])
    runner = CausalRunner(model, torch.device("cpu"))
    laid_out = runner.pack(examples("copa", seed=7)).paired
    layout = Layout.of(laid_out.batch, pad_scored=True)
    pool_rows = np.arange(laid_out.batch.num_tokens) + 16
    arrays = {**padded_arrays(laid_out.batch, layout, 0, model.config.position_offset, pool_rows),
              **graph_inputs(laid_out, layout, 0)}
    sections = _sections(arrays)
    staged = GraphedForward._staging(arrays, sections).clone()  # the device's copy
    views = _views(staged, sections, torch.int64)
    static = padded_batch(laid_out.batch, layout, views, 0)
    assert all(torch.equal(views[name], torch.from_numpy(a)) for name, a in arrays.items())
    padded = pad_candidates(laid_out, model.config.position_offset)
    with torch.inference_mode():
        got = runner.forward(static, **{name: views[name] for name in ("targets", "table", "lengths")})
        want = runner.forward(padded.batch, **padded.head_inputs)
    assert torch.equal(got[0], want[0])


# ---- a GPU: graph replays are the eager padded forwards --------------------------------------

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("subset", list(SUBSETS))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("share", [True, False], ids=["shared-prompts", "plain"])
@pytest.mark.parametrize("cache,precision", [(False, "tf32"), (True, "float32")], ids=["tf32", "cache-float32"])
def test_graphed_scores_are_the_eager_padded_scores(model_dir, share, shape, subset, cache, precision):
    model, flat = paired_model(model_dir, SUBSETS[subset], "cuda")
    pair = flat is not None
    runner = CausalRunner(model, torch.device("cuda"), precision, share_prompts=share)
    names = flat.names if pair else ["layers.1.ffn_in.weight"]
    if pair:
        runner.enable_pairs(names)
    if cache:
        runner.enable_cache(names, 1 << 24)
    eager = CausalRunner(model, torch.device("cuda"), precision, share_prompts=share, cuda_graphs=False)
    batches = [runner.pack(examples(shape, seed)) for seed in (3, 4)]
    labels = torch.tensor([e.label for e in batches[0].key], device="cuda")
    with torch.inference_mode():
        for batch in (batches[0], batches[1], batches[0]):  # a new shape captures, a known one replays
            got = runner.candidate_logprobs(batch, pair)
            want = eager_padded(runner, batch, pair)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            if batch is batches[0]:
                assert torch.equal(runner.objective(got, labels, pair), runner.objective(want, labels, pair))
            # and the unpadded eager forward, within the kernels' rounding for another row count
            unpadded = eager.candidate_logprobs(batch, pair)[0]
            tolerance = 2e-2 if precision == "tf32" else 1e-4
            torch.testing.assert_close(got[0], unpadded, rtol=tolerance, atol=tolerance)
    assert 1 <= runner.graphs.captures <= 2


# ---- a GPU: a graphed MeZO step is the eager step over the padded batch -----------------------

STEP_SETUPS = [("full", None, False), ("lora", (1,), True), ("prefix", None, True), ("top:1", None, True),
               ("top:2", None, False)]


def _session(model_dir, trainable, layers, cache, pair):
    return Session.build(TrainConfig(model=str(model_dir), task="sst2", trainable=trainable, layers=layers,
                                     cache=cache, pair=pair, device="cuda"))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("trainable,layers,pair", STEP_SETUPS)
def test_graphed_mezo_steps_are_the_eager_padded_steps(tiny_causal_dir, shape, trainable, layers, pair):
    # Two sessions built alike; one steps through MezoStepper (a whole step one graph replay),
    # the other runs mezo_step eagerly with the graph's inputs (seeds and lr as device tensors)
    # over the padded batch: the same losses, projected gradients and weights, bit for bit.
    eps, weight_decay = 1e-2, 0.1
    graphed, eager = (_session(tiny_causal_dir, trainable, layers, True, pair) for _ in range(2))
    assert graphed.paired == eager.paired
    paired = graphed.paired
    stepper = MezoStepper(graphed.runner, graphed.flat, eps, weight_decay, paired)
    start = graphed.flat.buffer.clone()
    batches = [graphed.runner.pack(examples(shape, seed)) for seed in (5, 6)]
    labels = [torch.tensor([e.label for e in b.key]) for b in batches]
    with torch.inference_mode():
        for step in range(6):
            batch, y = batches[step % 2], labels[step % 2]
            seeds, lr = [direction_seed(0, step, j) for j in range(2)], 1e-3 * (1 - step / 6)
            got = stepper(batch, y, seeds, lr)
            on_device = y.to("cuda")

            def loss():
                return eager.runner.objective(eager_padded(eager.runner, batch, paired), on_device, paired)
            want = mezo_step(eager.flat, loss, seed_tensor(seeds, "cuda"), eps,
                             torch.tensor(lr, dtype=torch.float64, device="cuda"), weight_decay, paired=paired)
            for name in ("loss", "projected_grads", "finite"):
                assert torch.equal(getattr(got, name), getattr(want, name)), (step, name)
    assert torch.equal(graphed.flat.buffer, eager.flat.buffer)
    assert 1 <= graphed.runner.graphs.captures <= 2
    assert not torch.equal(graphed.flat.buffer, start)


@pytest.mark.gpu
@needs_cuda
def test_zotune_train_on_a_causal_lm_captures_its_steps(tmp_path, tiny_causal_dir):
    # No refusal: a causal run on CUDA graphs every step and every dev evaluation.
    import json

    from zotune.cli import main
    run = tmp_path / "run"
    argv = ["train", "--model", tiny_causal_dir, "--task", "sst2", "--k", "16", "--seed", "42", "--device", "cuda",
            "--trainable", "lora", "--steps", "10", "--eval-steps", "5", "--log-steps", "5", "--lr", "1e-2",
            "--eps", "1e-2", "--batch-size", "16", "--quiet", "--output-dir", run]
    assert main([str(a) for a in argv]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["graph_filler_tokens"] > 0


@pytest.mark.gpu
@needs_cuda
def test_greedy_decoding_stays_eager_on_a_graphed_runner(model_dir):
    # next_tokens (engine/generate.py's step) never goes through the graphs: after a capture it
    # gives the tokens an eager runner gives.
    from zotune.engine.generate import greedy
    model = load_model(model_dir).to("cuda")
    graphed = CausalRunner(model, torch.device("cuda"), "float32")
    eager = CausalRunner(model, torch.device("cuda"), "float32", cuda_graphs=False)
    prompts = [[2, 5, 6, 7], [2, 9], [2, *range(10, 30)]]
    with torch.inference_mode():
        graphed.candidate_logprobs(graphed.pack(examples("copa", 3)))
    assert graphed.graphs.captures == 1
    assert greedy(graphed, prompts, 6, {0}) == greedy(eager, prompts, 6, {0})
    assert graphed.graphs.captures == 1
