"""Data-parallel MeZO throughput at 1, 2 and 4 GPUs (weak scaling, issue 6).

RoBERTa-large config with random weights, real SST-2 k=512 seed-42 examples, a global batch of
64 examples per GPU: each rank runs its 64, and one all-reduce of the [2] loss vector per step
gives every rank the projected gradient. Ideal scaling keeps steps/s constant as GPUs are added
(each step then processes N times the examples); efficiency = steps/s(N) / steps/s(1).

    python benchmarks/scaling.py            # launches torchrun for each GPU count that fits
"""

import argparse
import json
import subprocess
import sys
import time

import torch

from common import random_roberta_large, session, sst2_train

from zotune.distributed import rank_device
from zotune.optim.mezo import direction_seed, mezo_step
from zotune.train import batch_indices

PER_GPU = 64


def worker(steps: int) -> None:
    device = rank_device(torch.device("cuda"))
    built = session("full", random_roberta_large(device), cache=False, pair=False, decay_all=True,
                    batch_size=PER_GPU, dist_timeout=300.0)  # joins the group, as zotune train does
    group, runner, flat = built.group, built.runner, built.flat
    world, rank = (1, 0) if group is None else (group.world, group.rank)
    sequences, labels = sst2_train(built.prompt, 512)
    combine = None if group is None else group.all_reduce_sum

    def step(i: int) -> None:
        index = batch_indices(len(sequences), PER_GPU * world, 0, i)[rank::world]  # my 64 of the global batch
        batch, y = runner.pack([sequences[j] for j in index]), labels[index].to(device)
        with torch.inference_mode():
            mezo_step(flat, lambda: runner.loss(batch, y) / world, [direction_seed(0, i, 0)], 1e-3, 1e-6, 0.0,
                      combine=combine)

    for i in range(16):  # warm-up: CUDA graphs for the batch shapes of an epoch
        step(i)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(16, 16 + steps):
        step(i)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if rank == 0:
        print("RESULT " + json.dumps({"gpus": world, "steps_per_s": steps / elapsed,
                                      "examples_per_s": steps * PER_GPU * world / elapsed,
                                      "device": torch.cuda.get_device_name(device)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    if args.worker:
        return worker(args.steps)
    results = []
    for gpus in (1, 2, 4):
        if gpus > torch.cuda.device_count():
            break
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(gpus),
                              __file__, "--worker", "--steps", str(args.steps)], capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"{gpus}-GPU run failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
        results.append(json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))[7:]))
    base = results[0]["steps_per_s"]
    print(f"\nData-parallel MeZO, RoBERTa-large (random weights), SST-2 k=512, {PER_GPU} examples per GPU, "
          f"on {results[0]['device']}")
    print("| GPUs | steps/s | examples/s | scaling efficiency |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['gpus']} | {r['steps_per_s']:.1f} | {r['examples_per_s']:.0f} | {r['steps_per_s'] / base:.0%} |")


if __name__ == "__main__":
    main()
