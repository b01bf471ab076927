"""`zotune sweep`: the paper's protocol as one command. A grid of data seeds x learning rates
x trainable subsets, each cell a normal `zotune train` run in its own process, one run per GPU
at a time (or one after another on the CPU); `runs_per_device` > 1 shares each device between
that many runs, which keeps a GPU busy when the model is small and a run is host-bound.
Results: one table with mean and std over seeds per (subset, lr), the best lr of each subset
chosen by mean dev accuracy (never by test), as Markdown and JSON. Finished runs (a
summary.json exists) are not run again, so an interrupted sweep continues where it stopped.
"""

import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Queue

from zotune.errors import UserError


@dataclass(frozen=True)
class Cell:
    trainable: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.trainable.replace(':', '')}-lr{self.lr:g}-seed{self.seed}"


def run_grid(output_dir: Path, seeds: list[int], lrs: list[float], subsets: list[str], train_args: list[str],
             devices: list[str], quiet: bool = False, runs_per_device: int = 1) -> dict:
    """Run every cell (skipping finished ones) on `devices` ("cpu" or CUDA indices), then
    write and return the results table."""
    if not seeds or not lrs or not subsets:
        raise UserError("--seeds, --lrs and --trainable each need at least one value")
    if runs_per_device < 1:
        raise UserError(f"--runs-per-device {runs_per_device} must be at least 1")
    output_dir.mkdir(parents=True, exist_ok=True)
    cells = [Cell(t, lr, s) for t, lr, s in itertools.product(subsets, lrs, seeds)]
    todo: Queue = Queue()
    for cell in cells:
        if not (output_dir / cell.name / "summary.json").exists():
            todo.put(cell)
    failures: list[str] = []
    workers = len(devices) * runs_per_device
    # Each run would start a CPU thread per core; several runs at once then oversubscribe the
    # cores many times over (a run on a shared GPU is host-bound and slows to a crawl).
    threads_per_run = str(max(1, (os.cpu_count() or 1) // workers))

    def worker(device: str):
        while True:
            try:
                cell = todo.get_nowait()  # not empty() then get(): another worker may take the last cell between
            except Empty:
                return
            env = {"OMP_NUM_THREADS": threads_per_run, **os.environ}  # the user's setting wins
            if device != "cpu":
                env["CUDA_VISIBLE_DEVICES"] = device  # the run sees its GPU only
            command = [sys.executable, "-m", "zotune", "train", *train_args, "--trainable", cell.trainable,
                       "--lr", str(cell.lr), "--seed", str(cell.seed), "--output-dir", str(output_dir / cell.name),
                       "--overwrite", "--quiet", "--device", "cpu" if device == "cpu" else "cuda"]
            log = output_dir / f"{cell.name}.log"
            with open(log, "w") as out:
                code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=env)
            if code != 0:
                failures.append(f"{cell.name} (exit {code}, see {log})")
            elif not quiet:
                print(f"done {cell.name} on {device}", flush=True)

    pool = [threading.Thread(target=worker, args=(d,)) for d in devices for _ in range(runs_per_device)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if failures:
        raise UserError(f"{len(failures)} run(s) failed: {'; '.join(failures[:3])}")
    return write_table(output_dir, cells)


def write_table(output_dir: Path, cells: list[Cell]) -> dict:
    rows = {}
    for cell in cells:
        summary = json.loads((output_dir / cell.name / "summary.json").read_text())
        row = rows.setdefault((cell.trainable, cell.lr), {"dev": [], "test": []})
        row["dev"].append(summary["dev_accuracy"])
        row["test"].append(summary["test_accuracy"])
    best = {}
    for (trainable, lr), row in rows.items():
        if trainable not in best or statistics.mean(row["dev"]) > statistics.mean(rows[(trainable, best[trainable])]["dev"]):
            best[trainable] = lr

    def cell_text(values):
        return f"{100 * statistics.mean(values):.1f} ({100 * statistics.pstdev(values):.1f})"
    lines = ["| trainable | lr | dev acc | test acc | seeds | best lr (by dev) |", "|---|---|---|---|---|---|"]
    for (trainable, lr), row in rows.items():
        lines.append(f"| {trainable} | {lr:g} | {cell_text(row['dev'])} | {cell_text(row['test'])} "
                     f"| {len(row['dev'])} | {'yes' if best[trainable] == lr else ''} |")
    table = "\n".join(lines)
    result = {"table": table, "best_lr": best,
              "cells": [{"trainable": t, "lr": lr, **row} for (t, lr), row in rows.items()]}
    (output_dir / "results.md").write_text(table + "\n")
    (output_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def local_devices(spec: str) -> list[str]:
    """'auto': every visible GPU, else the CPU; 'cpu'; or GPU indices '0,1'."""
    if spec == "cpu":
        return ["cpu"]
    if spec == "auto":
        import torch
        count = torch.cuda.device_count()
        return [str(i) for i in range(count)] or ["cpu"]
    return [d.strip() for d in spec.split(",")]
