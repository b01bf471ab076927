"""Scale-out on the CPU with gloo, 2 processes started as torchrun would start them: a masked
LM, and a causal LM (tiny random Llama and OPT on SST-2 k=16) through the same path."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.engine.test_candidates import random_examples
from zotune.cli import main
from zotune.distributed import Group
from zotune.engine.candidates import OBJECTIVES, CausalRunner
from zotune.model.loading import load_model
from zotune.train import shard_step_batch
from zotune.trajectory import LOG_NAME


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(model_dir, run, steps=12, *extra):
    return ["train", "--model", str(model_dir), "--device", "cpu", "--trainable", "lora", "--steps", str(steps),
            "--eval-steps", "6", "--log-steps", "1", "--lr", "1e-2", "--eps", "1e-2", "--batch-size", "16",
            "--sync-check", "2", "--quiet", "--output-dir", str(run), *extra]


def _launch(args, world=1):
    """Processes with the environment torchrun gives its workers (one thread each)."""
    port, procs = _free_port(), []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if world > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "zotune", *args], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
    return procs


def _finish(procs):
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err


def _losses(run):
    return torch.tensor([json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()],
                        dtype=torch.float64)


def test_data_parallel_matches_one_process(tmp_path, tiny_mlm_dir):
    # Bound: the two ranks run half batches (other matrix heights, so other BLAS blockings)
    # and the global mean is a sum of two rank means: float32 reduction-order differences,
    # ~1e-7 relative on a loss. The projected gradient divides loss differences by 2*eps
    # (2e-2), so losses may drift apart to 1e-5 relative and weights to 1e-5 absolute.
    _finish(_launch(_args(tiny_mlm_dir, tmp_path / "one")))
    _finish(_launch(_args(tiny_mlm_dir, tmp_path / "two"), world=2))
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 12
    torch.testing.assert_close(two, one, rtol=1e-5, atol=0)
    a, b = load_file(tmp_path / "one" / "final.safetensors"), load_file(tmp_path / "two" / "final.safetensors")
    assert all((a[n] - b[n]).abs().max() <= 1e-5 for n in a)
    assert any(not torch.equal(a[n], torch.zeros_like(a[n])) for n in a if n.endswith(".B"))  # it trained
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["ranks"] == 2 and not (tmp_path / "two" / "metrics.jsonl.rank1").exists()


def test_multi_direction_equals_n_spsa(tmp_path, tiny_mlm_dir):
    # Rank r measures direction r on the whole batch; every rank runs every direction's sweeps,
    # so the replicas round exactly as one process running 2-direction SPSA does.
    _finish(_launch(_args(tiny_mlm_dir, tmp_path / "nspsa", 12, "--n-spsa", "2")))
    _finish(_launch(_args(tiny_mlm_dir, tmp_path / "md", 12, "--directions-per-rank", "1"), world=2))
    torch.testing.assert_close(_losses(tmp_path / "md"), _losses(tmp_path / "nspsa"), rtol=1e-6, atol=0)
    a, b = load_file(tmp_path / "nspsa" / "final.safetensors"), load_file(tmp_path / "md" / "final.safetensors")
    assert all((a[n] - b[n]).abs().max() <= 1e-6 for n in a)


def test_a_dead_rank_stops_the_others_with_a_clear_error(tmp_path, tiny_mlm_dir):
    procs = _launch(_args(tiny_mlm_dir, tmp_path / "run", 100000, "--dist-timeout", "20"), world=2)
    deadline = time.monotonic() + 300
    metrics = tmp_path / "run" / "metrics.jsonl"
    while not metrics.exists() or metrics.read_text().count("\n") < 2:
        assert procs[0].poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    _, err = procs[0].communicate(timeout=120)
    assert time.monotonic() - killed_at < 60
    assert procs[0].returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "another rank probably died" in lines[0], err


def test_each_rank_computes_on_its_own_gpu():
    # Under torchrun on CUDA, rank r's model, label words and graphs go to cuda:LOCAL_RANK, chosen
    # before anything is placed (Session.build); a single process keeps the device it was given.
    from zotune.distributed import rank_device

    cuda = torch.device("cuda")
    for rank in range(4):
        assert rank_device(cuda, {"WORLD_SIZE": "4", "LOCAL_RANK": str(rank)}) == torch.device("cuda", rank)
    assert rank_device(cuda, {}) == cuda
    assert rank_device(torch.device("cpu"), {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == torch.device("cpu")


def _causal_args(model_dir, run, *extra):
    subset = "lora" if "llama" in model_dir.name else "top:1"  # LoRA pairs; top:1 pairs over the trunk cache
    return ["train", "--model", str(model_dir), "--task", "sst2", "--k", "16", "--seed", "42", "--device", "cpu",
            "--trainable", subset, "--steps", "8", "--eval-steps", "4", "--log-steps", "1", "--snapshot-every", "2",
            "--lr", "1e-2", "--eps", "1e-2", "--batch-size", "16", "--sync-check", "2", "--quiet",
            "--output-dir", str(run), *extra]


def _summary(run) -> dict:
    return json.loads((run / "summary.json").read_text())


def _cut(run, cut, step):
    """A copy of `run` as a kill after `step` leaves it: the logs end there, later files are gone
    (a snapshot past the log stays, as a kill leaves it; resume ignores it)."""
    shutil.copytree(run, cut)
    log = (cut / LOG_NAME).read_text().splitlines(keepends=True)
    (cut / LOG_NAME).write_text("".join(log[:1 + step]))
    metrics = (cut / "metrics.jsonl").read_text().splitlines(keepends=True)
    (cut / "metrics.jsonl").write_text("".join(line for line in metrics if json.loads(line)["step"] <= step))
    for name in ("summary.json", "final.safetensors"):
        (cut / name).unlink()


@pytest.mark.usefixtures("one_thread")
def test_causal_data_parallel_matches_one_process_and_resumes(tmp_path, tiny_causal_dir):
    # Each rank scores 8 of the batch's 16 examples; the bound is the encoder test's (above).
    one, two, cut = tmp_path / "one", tmp_path / "two", tmp_path / "cut"
    assert main(_causal_args(tiny_causal_dir, one)) == 0  # one thread, as the ranks run
    _finish(_launch(_causal_args(tiny_causal_dir, two), world=2))
    torch.testing.assert_close(_losses(two), _losses(one), rtol=1e-5, atol=0)
    a, b = load_file(one / "final.safetensors"), load_file(two / "final.safetensors")
    assert a.keys() == b.keys() and all((a[n] - b[n]).abs().max() <= 1e-5 for n in a)
    assert any(json.loads(line)["projected_grad"] != 0 for line in (two / "metrics.jsonl").read_text().splitlines())
    summaries = _summary(one), _summary(two)
    for key in ("dev_accuracy", "test_accuracy", "zero_shot", "best_step"):
        assert summaries[0][key] == summaries[1][key], key
    assert summaries[1]["ranks"] == 2
    # killed after step 5, resumed by 2 ranks: the uninterrupted 2-rank run's bits
    _cut(two, cut, 5)
    _finish(_launch(["train", "--resume", str(cut)], world=2))
    c = load_file(cut / "final.safetensors")
    assert all(torch.equal(b[n], c[n]) for n in b)
    assert (cut / "metrics.jsonl").read_text() == (two / "metrics.jsonl").read_text()
    assert _summary(cut)["resumed_from_step"] == 5 and _summary(cut)["test_accuracy"] == summaries[1]["test_accuracy"]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("tiny_causal_dir", ["llama"], indirect=True)  # the mechanism is the data-parallel test's
def test_causal_directions_per_rank_equal_n_spsa(tmp_path, tiny_causal_dir):
    assert main(_causal_args(tiny_causal_dir, tmp_path / "nspsa", "--n-spsa", "2", "--steps", "4")) == 0
    _finish(_launch(_causal_args(tiny_causal_dir, tmp_path / "md", "--directions-per-rank", "1", "--steps", "4"),
                    world=2))
    torch.testing.assert_close(_losses(tmp_path / "md"), _losses(tmp_path / "nspsa"), rtol=1e-6, atol=0)
    a, b = load_file(tmp_path / "nspsa" / "final.safetensors"), load_file(tmp_path / "md" / "final.safetensors")
    assert all((a[n] - b[n]).abs().max() <= 1e-6 for n in a)
    assert _summary(tmp_path / "md")["test_accuracy"] == _summary(tmp_path / "nspsa")["test_accuracy"]


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_rank_shares_weigh_shard_losses_into_the_batch_loss(tiny_causal_dir, one_thread, objective):
    # "gold" averages over the gold continuations' tokens, so a shard's share is its tokens', not
    # its examples' (continuations of 1-4 tokens here; 5 examples shard 3 + 2).
    runner = CausalRunner(load_model(tiny_causal_dir), torch.device("cpu"), objective=objective)
    examples = random_examples(5, 2, seed=3)
    labels = torch.tensor([e.label for e in examples])
    with torch.inference_mode():
        whole = runner.loss(runner.pack(examples), labels)
        shards = [shard_step_batch(Group(rank, 2), runner, examples, labels) for rank in range(2)]
        summed = sum(runner.loss(runner.pack(mine), mine_labels) * share for mine, mine_labels, share in shards)
    assert sum(share for *_, share in shards) == pytest.approx(1.0)
    torch.testing.assert_close(summed, whole, rtol=1e-6, atol=0)
