"""`zotune sweep`: the paper's protocol as one command. A grid of data seeds x learning rates
x trainable subsets, each cell a normal `zotune train` run in its own process, one run per GPU
at a time (or one after another on the CPU); `runs_per_device` > 1 shares each device between
that many runs, which keeps a GPU busy when the model is small and a run is host-bound.
Results, as Markdown and JSON: one table with mean and std over seeds per (subset, lr), and
two aggregates per subset, both choosing by dev accuracy (never by test):
  paper    MeZO's rule (princeton-nlp/MeZO medium_models/tools/gather_result.py): for each
           seed, the run with the best dev accuracy over the whole lr grid; the mean and
           population std of those runs' test accuracies. What the MeZO paper's tables report.
  zotune   one lr per subset, the one with the best mean dev accuracy over seeds; the mean and
           population std of that lr's test accuracies.
Finished runs (a summary.json exists) are not run again, and an unfinished MeZO run whose
trajectory log has its header is continued with `zotune train --resume` (bit-identical to an
uninterrupted run), so an interrupted sweep loses nothing; any other unfinished run starts again.
`run_jobs` takes a deadline: at it, the runs still going get SIGTERM (they flush their logs and
stay resumable) and no new one starts, so a sweep fits a wall-clock limit and the same command
continues it. `aggregate_dir` aggregates a folder of finished runs without running any.
"""

import contextlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Queue

from zotune.config import read_run_values
from zotune.errors import UserError


@dataclass(frozen=True)
class Cell:
    trainable: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.trainable.replace(':', '')}-lr{self.lr:g}-seed{self.seed}"


# The config fields every run of one grid shares (aggregate_dir checks them).
GRID_SHARED = ("model", "task", "k", "optimizer", "steps", "eps", "batch_size", "schedule", "weight_decay",
               "max_grad_norm", "select_steps")


@dataclass(frozen=True)
class Job:
    """One run of a grid: the cell, its grid folder and the `zotune train` flags it shares."""
    output_dir: Path
    cell: Cell
    train_args: tuple[str, ...]

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.cell.name


def run_grid(output_dir: Path, seeds: list[int], lrs: list[float], subsets: list[str], train_args: list[str],
             devices: list[str], config_of: Callable[[list[str]], dict], quiet: bool = False, runs_per_device: int = 1,
             runs_per_process: int = 1, mps: bool = False) -> dict:
    """Run every cell (skipping finished ones, once check_finished has matched them to
    `config_of`) on `devices` ("cpu" or CUDA indices), the processes as clients of an MPS
    server if `mps` (gpu_sharing), then write and return the results table."""
    if not seeds or not lrs or not subsets:
        raise UserError("--seeds, --lrs and --trainable each need at least one value")
    sharing = gpu_sharing(mps, devices)  # --mps for CPU runs is refused before anything is written
    cells = [Cell(t, lr, s) for t, lr, s in itertools.product(subsets, lrs, seeds)]
    if len({cell.name for cell in cells}) < len(cells):  # two runs would share one folder
        twice = _repeated(cells)
        more = f" and {len(twice) - 1} more" if len(twice) > 1 else ""
        raise UserError(f"--seeds, --lrs or --trainable names a value twice (run {twice[0]}{more} would be "
                        "started twice); give each once")
    jobs = [Job(output_dir, cell, tuple(train_args)) for cell in cells]
    check_finished(jobs, config_of)
    output_dir.mkdir(parents=True, exist_ok=True)
    with sharing as env:
        run_jobs(jobs, devices, config_of, quiet, runs_per_device, runs_per_process=runs_per_process, env=env)
    return write_table(output_dir, cells)


def _repeated(cells: list[Cell]) -> list[str]:
    names = [cell.name for cell in cells]
    return list(dict.fromkeys(name for name in names if names.count(name) > 1))  # in the grid's order


def resumable(run_dir: Path) -> bool:
    """Whether `zotune train --resume` can continue this unfinished run: a MeZO run whose
    trajectory log has its whole header line (a run killed before writing it has nothing to keep)."""
    from zotune.trajectory import read_header
    try:
        config = json.loads((run_dir / "config.json").read_text())
        read_header(run_dir)
    except (OSError, ValueError, UserError):
        return False
    return isinstance(config, dict) and config.get("optimizer") == "mezo"


def run_jobs(jobs: list[Job], devices: list[str], config_of: Callable[[list[str]], dict], quiet: bool = False,
             runs_per_device: int = 1, deadline: float | None = None, keep_weights: bool = True,
             runs_per_process: int = 1, env: dict[str, str] | None = None) -> list[Job]:
    """Run the unfinished `jobs`, in the order given, `runs_per_device` processes at a time on
    each of `devices`, each process training `runs_per_process` of them a step of each in turn
    (`zotune train-together`; 1: `zotune train`). `config_of` (check_finished's): the config a
    job's flags make, whose model a resumed run is given. `deadline` (time.monotonic()): no process
    starts after it, and those still going at it get SIGTERM. `keep_weights` False: a finished
    run's *.safetensors are deleted (a grid of full-model runs fills a disk). `env`: variables
    every process gets (mps_server's). Returns the jobs left unfinished by the deadline; the
    finished ones it skips are the caller's to check first (check_finished)."""
    if runs_per_device < 1 or runs_per_process < 1:
        raise UserError(f"--runs-per-device {runs_per_device} and --runs-per-process {runs_per_process} "
                        f"must be at least 1")
    todo: Queue = Queue()
    unfinished = [job for job in jobs if not (job.run_dir / "summary.json").exists()]
    for job in unfinished:
        job.output_dir.mkdir(parents=True, exist_ok=True)
    for group in process_groups(unfinished, runs_per_process):
        todo.put(group)
    failures: list[tuple[list[str], str]] = []  # a process's failed runs, and where its output is
    stopped: list[Job] = []
    workers = len(devices) * runs_per_device
    # Each run would start a CPU thread per core; several runs at once then oversubscribe the
    # cores many times over (a run on a shared GPU is host-bound and slows to a crawl).
    threads_per_run = str(max(1, (os.cpu_count() or 1) // workers))

    def worker(device: str):
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                return
            try:
                group = todo.get_nowait()  # not empty() then get(): another worker may take the last
            except Empty:
                return
            command, log = _process_command(group, device, config_of)
            with open(log, "a") as out:  # a resumed run's output follows the first attempt's
                code = _call(command, out, _process_env(device, threads_per_run, env), deadline)
            finished = [job for job in group if (job.run_dir / "summary.json").exists()]
            if code is None:
                stopped.extend(job for job in group if job not in finished)
            elif len(finished) < len(group):  # a group's run that stopped leaves the others finished
                failures.append(([str(job.run_dir) for job in group if job not in finished], f"exit {code}, see {log}"))
            for job in finished:
                _finish(job, keep_weights, None if quiet else f"done {job.run_dir} on {device}")

    pool = [threading.Thread(target=worker, args=(d,)) for d in devices for _ in range(runs_per_device)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if failures:
        lines = [f"{', '.join(runs)} ({why})" for runs, why in failures[:3]]
        raise UserError(f"{sum(len(runs) for runs, _ in failures)} run(s) failed: {'; '.join(lines)}")
    return stopped + [job for group in todo.queue for job in group]


def _process_command(group: list[Job], device: str, config_of: Callable[[list[str]], dict]
                     ) -> tuple[list[str], Path]:
    """The command of the process that trains `group` on `device` (`zotune train` for one run,
    `zotune train-together` and a jobs file for several), and the log its output goes to."""
    commands = [_train_arguments(job, device, config_of) for job in group]
    first = group[0]
    if len(group) == 1:
        return [sys.executable, "-m", "zotune", "train", *commands[0]], first.output_dir / f"{first.cell.name}.log"
    log = first.output_dir / f"{first.cell.name}+{len(group) - 1}.log"
    jobs_file = log.with_suffix(".json")
    jobs_file.write_text(json.dumps({"runs": commands}) + "\n")
    return [sys.executable, "-m", "zotune", "train-together", str(jobs_file)], log


def _process_env(device: str, threads: str, env: dict[str, str] | None) -> dict[str, str]:
    """A run process's environment: the user's OMP_NUM_THREADS wins over `threads`, `env` (an
    MPS server's) is added to theirs, and a GPU run sees its GPU only."""
    process_env = {"OMP_NUM_THREADS": threads, **os.environ, **(env or {})}
    if device != "cpu":
        process_env["CUDA_VISIBLE_DEVICES"] = device
    return process_env


def _finish(job: Job, keep_weights: bool, message: str | None) -> None:
    """A finished run's weights deleted unless `keep_weights`; `message` printed, if any."""
    if not keep_weights:
        for weights in job.run_dir.glob("*.safetensors"):
            weights.unlink()
    if message:
        print(message, flush=True)


def process_groups(jobs: list[Job], runs_per_process: int) -> list[list[Job]]:
    """The jobs as the runs of each process: MeZO runs `runs_per_process` at a time in their
    order, an Adam run alone. (An Adam step is eager autograd, bound by the host: among other
    runs it holds up their steps, and an H100 measured it at 6 steps/s there against 19 as a
    process of its own, RESULTS.md session 15.)"""
    groups: list[list[Job]] = []
    filling: list[Job] | None = None
    for job in jobs:
        if _flag(job.train_args, "--optimizer") == "adam":
            groups.append([job])
            continue
        if filling is None or len(filling) == runs_per_process:
            filling = []
            groups.append(filling)
        filling.append(job)
    return groups


def _flag(args: tuple[str, ...], name: str) -> str | None:
    """The value given to `name` in a run's flags (`name value` or `name=value`), if any."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    return None


@contextlib.contextmanager
def mps_server(folder: Path):
    """NVIDIA's multi-process service for the processes of run_jobs: without it, processes
    sharing a GPU take turns on it (time slices), so the kernels of one run never overlap
    another's; under it they can. Starts a control daemon of this user's own (its pipe and log
    under `folder`), yields the environment that makes a process its client, and quits it at
    the end, a SIGTERM meanwhile included (a time limit's: Python's default ends the process
    without unwinding). The card's settings (compute mode and the like) are left as they are."""
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        raise UserError("--mps needs nvidia-cuda-mps-control (NVIDIA's driver utilities) on PATH; run without --mps")
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
    for path in env.values():
        Path(path).mkdir(parents=True, exist_ok=True)
    started = subprocess.run([control, "-d"], env={**os.environ, **env}, capture_output=True, text=True)
    if started.returncode != 0:
        raise UserError(f"nvidia-cuda-mps-control -d failed ({(started.stderr or started.stdout).strip()}); "
                        f"run without --mps")
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    except ValueError:  # not the main thread: signals stay the embedding program's
        previous = None
    try:
        yield env
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        subprocess.run([control], input="quit\n", env={**os.environ, **env}, capture_output=True, text=True,
                       timeout=60)


def gpu_sharing(mps: bool, devices: list[str]):
    """The environment of run_jobs' processes, as a context: an MPS server's (mps_server, in a
    temporary folder removed afterwards) if `mps`, else none."""
    if not mps:
        return contextlib.nullcontext({})
    if devices == ["cpu"]:
        raise UserError("--mps lets processes share a GPU, and these runs go to the CPU: drop --mps")
    return temporary_mps_server()


@contextlib.contextmanager
def temporary_mps_server():
    """mps_server in a temporary folder, removed after the daemon quits."""
    with tempfile.TemporaryDirectory(prefix="zotune-mps-", ignore_cleanup_errors=True) as folder:
        with mps_server(Path(folder)) as env:
            yield env


def job_flags(job: Job) -> list[str]:
    """The `zotune train` flags that define the job's run: the grid's and the cell's."""
    cell = job.cell
    return [*job.train_args, "--trainable", cell.trainable, "--lr", str(cell.lr), "--seed", str(cell.seed)]


def check_finished(jobs: list[Job], config_of: Callable[[list[str]], dict]) -> None:
    """A finished run is skipped as done, and an unfinished MeZO run resumed from its own
    config.json, only if it is the job's run: its config.json must agree with
    config_of(job_flags(job)), the config those flags make over their recipe, in every field of
    GRID_SHARED and the cell's, the model by path or, for a run moved where its checkpoint lies
    elsewhere, by the sha256 it pinned (_logged_model). Otherwise (a grid re-planned with other
    settings: a schedule, a clip, a selection rule) a one-line UserError, before anything runs.
    Every job's config is made, so a config `zotune train` would refuse stops the grid here, not
    in each of its runs."""
    for job in jobs:
        want = config_of(job_flags(job))
        finished = (job.run_dir / "summary.json").is_file()
        if not (finished or resumable(job.run_dir)):
            continue  # a run that starts afresh takes the job's flags
        have = read_run_values(job.run_dir)
        differ = [f"{k} {have.get(k)!r}, not {want[k]!r}" for k in (*GRID_SHARED, "trainable", "lr", "seed")
                  if have.get(k) != want[k] and not (k == "model" and _logged_model(job.run_dir, want[k]))]
        if differ:
            raise UserError(f"{job.run_dir} holds {'a finished' if finished else 'an unfinished'} run of other "
                            f"settings ({'; '.join(differ[:3])}); move {job.output_dir} aside (its runs stay "
                            f"readable there) or write this grid elsewhere")


def _logged_model(run_dir: Path, model: str) -> bool:
    """Whether `model` holds the base weights that the run pinned: its trajectory log's header
    (a MeZO run), else its summary.json (a finished Adam run). False for a run with neither
    (an Adam run finished before summaries held the sha256: known by its path only)."""
    from zotune.trajectory import model_sha256, read_header
    try:
        logged = read_header(run_dir)["model_sha256"]
    except UserError:
        try:
            logged = json.loads((run_dir / "summary.json").read_text())["model_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
    return model_sha256(model) == logged


def _train_arguments(job: Job, device: str, config_of: Callable[[list[str]], dict]) -> list[str]:
    """What `zotune train` takes for the job: --resume for a run whose trajectory log has its
    header (its config.json holds every setting, device and --quiet included; --model where the
    config of the job's flags, a --config file's included, puts its checkpoint elsewhere:
    check_finished matched it by sha256), else its flags."""
    if resumable(job.run_dir):
        model = config_of(job_flags(job))["model"]
        moved = model != read_run_values(job.run_dir)["model"]
        return ["--resume", str(job.run_dir), *(["--model", model] if moved else [])]
    return [*job_flags(job), "--output-dir", str(job.run_dir), "--overwrite", "--quiet",
            "--device", "cpu" if device == "cpu" else "cuda"]


def _call(command: list[str], out, env: dict, deadline: float | None) -> int | None:
    """The run's exit code, or None where the deadline stopped it: SIGTERM first, which
    `zotune train` takes like Ctrl-C (logs flushed, resumable); SIGKILL if it has not ended a
    minute later, which a MeZO run also survives (its log never runs ahead of its steps)."""
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        return process.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return None


def write_table(output_dir: Path, cells: list[Cell]) -> dict:
    """Aggregate the finished `cells` under `output_dir`, and write results.md and results.json there."""
    result = aggregate(output_dir, cells)
    (output_dir / "results.md").write_text(result["table"] + "\n")
    (output_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def aggregate(output_dir: Path, cells: list[Cell]) -> dict:
    """The per-(subset, lr) table and both aggregates of finished runs; writes nothing."""
    runs = {cell: json.loads((output_dir / cell.name / "summary.json").read_text()) for cell in cells}
    rows = {}
    for cell, summary in runs.items():
        row = rows.setdefault((cell.trainable, cell.lr), {"dev": [], "test": [], "seeds": [], "stopped_early": 0})
        row["dev"].append(summary["dev_accuracy"])
        row["test"].append(summary["test_accuracy"])
        row["seeds"].append(cell.seed)
        row["stopped_early"] += bool(summary.get("stopped_early"))  # diverged (train.py): counted, not hidden
    best = {}
    for (trainable, lr), row in rows.items():
        if trainable not in best or statistics.mean(row["dev"]) > statistics.mean(rows[(trainable, best[trainable])]["dev"]):
            best[trainable] = lr
    aggregates = {}
    for trainable, lr in best.items():
        row = rows[(trainable, lr)]
        zotune = {"lr": lr, "seeds": row["seeds"], "dev": row["dev"], "test": row["test"],
                  **_mean_std(row["test"])}
        aggregates[trainable] = {"paper": paper_aggregate({c: s for c, s in runs.items() if c.trainable == trainable}),
                                 "zotune": zotune}

    lines = ["| trainable | lr | dev acc | test acc | seeds | best lr (by mean dev) |", "|---|---|---|---|---|---|"]
    for (trainable, lr), row in rows.items():
        stopped = f" ({row['stopped_early']} stopped early: diverged)" if row["stopped_early"] else ""
        lines.append(f"| {trainable} | {lr:g} | {mean_std_text(row['dev'])} | {mean_std_text(row['test'])} "
                     f"| {len(row['dev'])}{stopped} | {'yes' if best[trainable] == lr else ''} |")
    lines += ["", "| trainable | test acc, paper's rule (best-dev run per seed) | lr per seed "
                  "| test acc, zotune's rule (one lr by mean dev) | lr |", "|---|---|---|---|---|"]
    for trainable, both in aggregates.items():
        paper, zotune = both["paper"], both["zotune"]
        per_seed = ", ".join(f"{seed}: {lr:g}" for seed, lr in zip(paper["seeds"], paper["lr"]))
        lines.append(f"| {trainable} | {mean_std_text(paper['test'])} | {per_seed} "
                     f"| {mean_std_text(zotune['test'])} | {zotune['lr']:g} |")
    return {"table": "\n".join(lines), "best_lr": best,
            "cells": [{"trainable": t, "lr": lr, **row} for (t, lr), row in rows.items()],
            "aggregates": aggregates, "devices": sorted({str(s.get("device")) for s in runs.values()})}


def paper_aggregate(runs: dict[Cell, dict]) -> dict:
    """MeZO's aggregate of one subset's grid (gather_result.py): for each seed, the run with the
    best dev accuracy over every lr, ties going to the first run name in sorted order as there
    (its runs are sorted by output_dir); then the mean and population std (numpy's std) of the
    chosen runs' test accuracies. `runs`: cell -> its summary.json."""
    by_seed: dict[int, list[Cell]] = {}
    for cell in sorted(runs, key=lambda c: c.name):
        by_seed.setdefault(cell.seed, []).append(cell)
    chosen = [max(cells, key=lambda c: runs[c]["dev_accuracy"]) for _, cells in sorted(by_seed.items())]
    test = [runs[c]["test_accuracy"] for c in chosen]
    return {"seeds": [c.seed for c in chosen], "lr": [c.lr for c in chosen],
            "dev": [runs[c]["dev_accuracy"] for c in chosen], "test": test,
            "runs_per_seed": [len(by_seed[c.seed]) for c in chosen], **_mean_std(test)}


def aggregate_dir(grid_dir: Path) -> dict:
    """Both aggregates of a folder of finished runs (each <run>/summary.json and config.json, as
    a sweep writes them), read only: it writes nothing there. Unfinished runs are left out; the
    runs must share everything but lr and seed (one task, k, optimizer...), which the result
    holds as "config"."""
    grid_dir = Path(grid_dir)
    cells, shared = [], None
    for summary in sorted(grid_dir.glob("*/summary.json")):
        config = read_run_values(summary.parent)  # older runs' too
        cell = Cell(config["trainable"], float(config["lr"]), int(config["seed"]))
        if cell.name != summary.parent.name:
            raise UserError(f"{summary.parent} holds the run {cell.name} (its config.json); "
                            "rename it or move it out of the grid")
        rest = {k: v for k, v in config.items() if k in GRID_SHARED}
        if shared is not None and rest != shared:
            raise UserError(f"{summary.parent} differs from the other runs of {grid_dir} in "
                            f"{sorted(k for k in rest if rest[k] != shared.get(k))}; aggregate one grid at a time")
        shared = rest
        cells.append(cell)
    if not cells:
        raise UserError(f"{grid_dir} holds no finished run (no <run>/summary.json); pass a sweep's --output-dir")
    return {**aggregate(grid_dir, cells), "config": shared}


def _mean_std(values: list[float]) -> dict:
    return {"test_mean": statistics.mean(values), "test_std": statistics.pstdev(values)}


def mean_std_text(values: list[float]) -> str:
    """Accuracies as 'mean (population std)' in percent, the tables' form."""
    return f"{100 * statistics.mean(values):.1f} ({100 * statistics.pstdev(values):.1f})"


def local_devices(spec: str) -> list[str]:
    """'auto': every visible GPU, else the CPU; 'cpu'; or GPU indices '0,1'."""
    if spec == "cpu":
        return ["cpu"]
    if spec == "auto":
        import torch
        count = torch.cuda.device_count()
        return [str(i) for i in range(count)] or ["cpu"]
    return [d.strip() for d in spec.split(",")]
