"""The GPU path follows the CPU path: same seeds, same data, same z (bit for bit), so the loss
trajectories differ only by the GPU's arithmetic.

Bound and why: on CUDA the matmuls run in TF32 (10-bit mantissa, relative error ~5e-4 per
product) and attention in bf16 FlashAttention (8-bit mantissa, ~4e-3), against float32 on the
CPU. The first forward pass measures that error on this model. The trajectories may differ by
at most 5x that plus 1e-3 at every one of 300 steps: the projected gradients differ by the loss
error over 2*eps, and with lr*|g| small against the weights those differences move the weights
by far less than the forward error itself.
"""

import json

import pytest
import torch

from zotune.config import TrainConfig
from zotune.optim import rng
from zotune.train import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_z_from_the_gpu_equals_z_from_the_cpu():
    for seed, start, n in [(0, 0, 4096), (2**62 + 12345, 1 << 20, 100_003), (7, 3, 17)]:
        assert torch.equal(rng.normal(seed, start, n, "cuda").cpu(), rng.normal(seed, start, n, "cpu"))


@pytest.mark.parametrize("n_spsa", [1, 2])  # 2: the update also regenerates a z the restore did not use
def test_300_steps_gpu_vs_cpu(tmp_path, tiny_mlm_dir, n_spsa):
    losses = {}
    for device in ("cpu", "cuda"):
        cfg = TrainConfig(model=str(tiny_mlm_dir), device=device, steps=300, eval_steps=300, log_steps=1,
                          trainable="full", lr=1e-4, eps=1e-3, batch_size=32, n_spsa=n_spsa, quiet=True,
                          output_dir=str(tmp_path / device))
        train(cfg)
        lines = (tmp_path / device / "metrics.jsonl").read_text().splitlines()
        losses[device] = torch.tensor([json.loads(line)["loss"] for line in lines], dtype=torch.float64)
    difference = (losses["cuda"] - losses["cpu"]).abs()
    first = difference[0].item()
    assert first < 5e-3 * losses["cpu"][0].item(), f"forward error {first} is beyond TF32/bf16 precision"
    assert difference.max().item() <= 5 * first + 1e-3, difference.max().item()


def test_10000_perturb_restore_cycles_keep_the_master_weights():
    # float32 master weights with the Triton sweeps: +eps z, then -eps z twice (each add
    # rounded), then the fused restore with lr = 0. Exact except at binade crossings.
    from zotune.optim.flat import FlatParameters
    from zotune.optim.sweep import perturb, restore_and_update
    torch.manual_seed(0)
    weights = torch.nn.Parameter(torch.randn(1 << 20, device="cuda") * 0.05)
    start = weights.detach().clone()
    flat = FlatParameters([("w", weights)], set())
    for seed in range(10_000):
        perturb(flat, seed, 1e-3)
        perturb(flat, seed, -1e-3, times=2)
        restore_and_update(flat, seed, 1e-3, [seed], [0.0], 0.0, 0.0)
    drift = ((flat.buffer - start).norm() / start.norm()).item()
    assert drift < 1e-6, drift


def test_cuda_graph_replays_match_eager_forward(tiny_mlm_dir):
    from zotune.evaluate import build
    eager = build(str(tiny_mlm_dir), "sst2", device="cuda", cuda_graphs=False)
    graphed = build(str(tiny_mlm_dir), "sst2", device="cuda")
    texts = [("a gorgeous , witty film ",), ("boring ",), ("it is neither good nor bad , just long ",)]
    with torch.inference_mode():
        for n in (1, 2, 3, 2):  # new shapes capture, repeated shapes replay
            sequences = [eager.prompt.encode(t) for t in texts[:n]]
            want = eager.runner.logits(eager.runner.pack(sequences))
            got = graphed.runner.logits(graphed.runner.pack(sequences))
            torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)  # TF32 kernels may differ by shape
    assert graphed.runner.graphs.captures == 3


@pytest.mark.parametrize("trainable", ["prefix", "lora"])
def test_a_gpu_run_replays_on_the_cpu_bit_for_bit(tmp_path, tiny_mlm_dir, trainable):
    # Issue 21: a prefix run trained on a GPU replayed on the CPU to other weights (7e-4),
    # because its initial tensors came from a device-dependent forward pass. Session.build now
    # computes them on the CPU, and the log pins their sha256. The replay then owes nothing to
    # the GPU's arithmetic: it applies the logged g_j with the sweeps, whose torch and Triton
    # paths give the same bits (optim/sweep.py, tests/optim/test_sweep_triton.py), with z the
    # same on both devices (the first test here). So the tolerance is zero.
    from safetensors.torch import load_file

    from zotune import trajectory
    from zotune.session import flatten, load_trainable

    run = tmp_path / "run"
    cfg = TrainConfig(model=str(tiny_mlm_dir), device="cuda", steps=20, eval_steps=20, log_steps=5,
                      trainable=trainable, lr=1e-2, eps=1e-2, batch_size=16, quiet=True, output_dir=str(run))
    train(cfg)
    header, records = trajectory.read_log(run)
    assert len(records) == 20
    on_cpu = flatten(load_trainable(TrainConfig.from_dict({**header["config"], "device": "cpu"}))[1], cfg.decay_all)
    initial = on_cpu.state_dict()
    assert trajectory.make_header(header["config"], header["model_sha256"], on_cpu)["initial_sha256"] \
        == header["initial_sha256"]
    trajectory.replay_run(run, tmp_path / "out")
    final, replayed = load_file(run / "final.safetensors"), load_file(tmp_path / "out" / "trainable.safetensors")
    assert final.keys() == replayed.keys() == initial.keys()
    differences = {n: (final[n] - replayed[n]).abs().max().item() for n in final}
    assert all(torch.equal(final[n], replayed[n]) for n in final), differences
    assert any(not torch.equal(final[n], initial[n].cpu()) for n in final)  # the run did move the weights
