"""The few-shot accuracy table of issue 19: test accuracy of a model on SST-2, SST-5, TREC,
MNLI, SNLI and RTE at k=16 and k=512, mean (std) over LM-BFF's five data seeds, for zero-shot
(raw; for two-class tasks also with the threshold fitted on each seed's dev set), MeZO (full),
MeZO (LoRA), MeZO (LoRA+head: the MeZO paper's LoRA, which also trains the LM head), MeZO
(prefix) and Adam (full). Each cell is aggregated over its lr grid by dev accuracy (never by
test) in two ways (zotune.grid): the paper's, the best-dev run of each seed over the whole
grid (MeZO's gather_result.py), and zotune's, one lr per cell by mean dev.

Every run is a `zotune train` process; all the runs of a call share one pool
(zotune.grid.run_jobs), longest first, several to a GPU since a small model leaves a run
host-bound. Three protocols:
  table       the six tasks, the methods and grids of METHODS (5,000 MeZO steps)
  mezo-paper  SST-2 only, the MeZO paper's: 100,000 steps, eps 1e-3, batch 64, best dev of every
              10,000 steps, MeZO (full) and MeZO (LoRA+head), three lrs each scaled to this
              model (PAPER_METHODS)
  causal      a causal LM (OPT, Llama family; issue 22): SST-2 by default, any of the six tasks
              with --tasks; MeZO (full), MeZO (LoRA) and Adam (full) in MeZO's large_models
              settings scaled to a small model (CAUSAL_METHODS)
The protocol follows the checkpoint: --model DIR of a causal LM takes `causal` (zero-shot rows
through its candidate scores, the threshold on the difference of the two candidates' scores),
a masked LM `table`; a protocol that does not fit the checkpoint is refused.

Chunks: `--deadline S` stops the call S seconds after it started (runs still going get
SIGTERM and stay resumable), aggregates what is complete and prints the table last. The same
command again skips finished runs and continues each unfinished MeZO run bit-identically
(`zotune train --resume`); an Adam run, or one killed before its log began, starts again. To
continue on a fresh machine, unpack the --bundle there: it holds the finished runs' small files,
which is all the grid needs to skip them, and each unfinished MeZO run's trajectory log, which
continues it (an Adam run starts again).

    python tools/fewshot_table.py --plan --runs-per-device 12 --steps-per-s 315 --overhead-s 7
    python tools/fewshot_table.py --device cuda --runs-per-device 12 --deadline 540 \\
        --bundle $OUT/runs.tgz --output $OUT/fewshot_table.json
    python tools/fewshot_table.py --aggregate-only --plot sst2.png   # finished runs only
    python tools/fewshot_table.py --protocol mezo-paper --ks 512 --methods "MeZO (LoRA+head)" \
        --lrs 1e-4 --runs-dir runs/paper-edge --device cuda   # past a grid's top lr, in a folder of its own
    python tools/fewshot_table.py --model out/clm --device cuda --runs-per-device 12 --deadline 540 \
        --bundle $OUT/causal-runs.tgz --output $OUT/fewshot_causal_table.json   # runs/fewshot-causal

--aggregate-only runs nothing and writes nothing under --runs-dir: it aggregates every grid
found there (<task>/<name>-k<k>/<run>/summary.json and config.json, e.g. sst2/MeZO-full-k16,
or a folder of another name, shown under that name), with the settings the runs recorded,
and the zero-shot rows a run of the tool stored there.
"""

import argparse
import json
import os
import re
import statistics
import sys
import tarfile
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
sys.path.insert(0, SRC)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))  # for the run processes

from zotune.cli import run_settings  # noqa: E402
from zotune.errors import UserError  # noqa: E402
from zotune.grid import (Cell, Job, aggregate_dir, check_finished, job_flags, local_devices,  # noqa: E402
                         mean_std_text as mean_std, gpu_sharing, run_jobs)

TASKS = ("sst2", "sst5", "trec", "mnli", "snli", "rte")
TWO_CLASS = ("sst2", "rte")  # where a dev-fitted threshold applies
SEEDS = (13, 21, 42, 87, 100)
KS = (16, 512)
# name -> (trainable subset, lr grid, other `zotune train` flags). MeZO's batch is the paper's 64,
# the whole training set where that is smaller (k=16 of two or three classes); Adam's is LM-BFF's 8.
# The grids reach lower than session 11's (1e-5.. full, 3e-3.. LoRA): there every MeZO (full)
# k=16 run peaked at its first dev evaluation and LoRA's best lr was the grid's smallest. Prefix:
# the eps of MeZO's medium_models prefix runs (1e-1), lr around theirs (1e-2). LoRA+head also
# trains the head's 12.9M-parameter decoder, so it takes the step sizes of full-parameter runs,
# not plain LoRA's (the MeZO paper's LoRA grid: 1e-5..1e-4, eps 1e-3); with plain LoRA's grid
# every k=512 run diverged (RESULTS.md, session 12). Dev every 250
# MeZO steps; a metrics line every 50 keeps the logs small enough to bring back (--bundle).
# Each run starts from its optimizer's paper recipe, so what the flags leave out is the
# reference's: a constant lr for MeZO (medium_models/mezo.sh), linear decay to 0 for Adam (the
# Hugging Face Trainer's default, which MeZO's finetune.sh keeps).
MEZO = dict(recipe="mezo-paper", optimizer="mezo", steps=5000, eval_steps=250, log_steps=50, batch_size=64)
METHODS = {
    "MeZO (full)": ("full", (3e-6, 1e-5, 3e-5), dict(MEZO, eps=1e-3)),
    "MeZO (LoRA)": ("lora", (1e-3, 3e-3, 1e-2), dict(MEZO, eps=1e-2)),
    "MeZO (LoRA+head)": ("lora+head", (1e-5, 3e-5, 1e-4), dict(MEZO, eps=1e-3)),
    "MeZO (prefix)": ("prefix", (1e-3, 1e-2, 3e-2), dict(MEZO, eps=1e-1)),
    "Adam (full)": ("full", (1e-5, 3e-5, 1e-4),
                    dict(recipe="ft-paper", optimizer="adam", steps=1000, eval_steps=100, batch_size=8)),
}
# The MeZO paper's SST-2 protocol (medium_models/mezo.sh: 100,000 steps, batch 64, eps 1e-3,
# constant lr; RoBERTa-large's grid 1e-7..1e-5). Scaled to this model: at 5,000 steps its best
# lrs were 1e-5 (full) and 3e-3 (plain LoRA, eps 1e-2), and 20 times the steps want smaller
# ones; LoRA+head, as above, those of full-parameter runs. Dev is logged every 1,000 steps for the
# picture's curves, and the best-dev weights are chosen among the evaluations at every 10,000, as
# mezo.sh evaluates and selects.
PAPER = dict(recipe="mezo-paper", optimizer="mezo", steps=100_000, eval_steps=1000, select_steps=10_000, log_steps=100,
             batch_size=64, eps=1e-3)
PAPER_METHODS = {
    "MeZO (full)": ("full", (1e-6, 3e-6, 1e-5), PAPER),
    "MeZO (LoRA+head)": ("lora+head", (3e-6, 1e-5, 3e-5), PAPER),
}
# The causal protocol (issue 22): MeZO's large_models settings (mezo.sh and the paper's OPT
# tables: batch 16, constant lr, eps 1e-3 full and 1e-2 LoRA, 20,000 steps, lrs 1e-6/1e-7 full and
# 1e-4/5e-5 LoRA for OPT-13B) scaled to tools/pretrain_clm.py's 19M-parameter Llama and one
# ~10-minute device call: 2,000 steps. A 19M-parameter model takes far larger steps than a 13B
# one; the grids started around the encoder table's picks on zotune-roberta-small, a model of the
# same size and vocabulary (MeZO full 1e-5 / 3e-5, LoRA 3e-3 / 1e-2, Adam 3e-5 / 1e-4). On the
# pretrained Llama, LoRA at 3e-3 and 1e-2 ended at chance and full's k=16 best was its smallest
# lr, so both grids reach lower (RESULTS.md, session 14). LoRA is large_models' (q and v only):
# `lora+head` on a causal LM would untie and train the 12.9M-parameter output embedding, which is
# no setting of the paper's, so it is not offered here.
CAUSAL_MEZO = dict(recipe="mezo-paper", optimizer="mezo", steps=2000, eval_steps=250, log_steps=50, batch_size=16)
CAUSAL_METHODS = {
    "MeZO (full)": ("full", (3e-6, 1e-5, 3e-5), dict(CAUSAL_MEZO, eps=1e-3)),
    "MeZO (LoRA)": ("lora", (1e-4, 3e-4, 1e-3, 3e-3, 1e-2), dict(CAUSAL_MEZO, eps=1e-2)),
    "Adam (full)": ("full", (3e-5, 1e-4), METHODS["Adam (full)"][2]),
}
PROTOCOLS = {"table": (TASKS, METHODS), "mezo-paper": (("sst2",), PAPER_METHODS), "causal": (TASKS, CAUSAL_METHODS)}
DEFAULT_TASKS = {"causal": ("sst2",)}  # else all the protocol's
MASKED_MODEL = "models/zotune-roberta-small"
ZERO_SHOT = "zero_shot.json"


def task_dir(runs_dir: Path, protocol: str, task: str) -> Path:
    return runs_dir / (task if protocol == "table" else f"{task}-{protocol}")


def grid_dir(folder: Path, name: str, trainable: str, k: int) -> Path:
    return folder / f"{name.split()[0]}-{trainable}-k{k}"


def settings_text(flags: dict, lrs) -> str:
    return (f"{flags['steps']} steps, batch {flags['batch_size']}"
            + (f", eps {flags['eps']:g}" if flags["optimizer"] == "mezo" else "")
            + (f", {flags['schedule']} lr schedule" if flags.get("schedule", "constant") != "constant" else "")
            + (f", dev every {flags['eval_steps']}" if flags.get("eval_steps") else "")
            + (f", best dev of every {flags['select_steps']}" if flags.get("select_steps") else "")
            + f", lr grid {{{', '.join(f'{lr:g}' for lr in sorted(lrs))}}}")


def cell_row(aggregate: dict, lrs, flags: dict) -> dict:
    """One (method, k) cell of the table from a subset's two aggregates (zotune.grid.aggregate)."""
    paper, zotune = aggregate["paper"], aggregate["zotune"]
    return {"paper": paper["test"], "zotune": zotune["test"], "paper_lrs": dict(zip(paper["seeds"], paper["lr"])),
            "zotune_lr": zotune["lr"], "zotune_dev": zotune["dev"], "settings": settings_text(flags, lrs)}


def planned_methods(protocol: str, lrs: tuple[float, ...] | None) -> dict:
    """The protocol's methods, (trainable, lrs, flags), each at `lrs` (--lrs) where given: the runs
    a grid folder is complete with (a folder of runs past a grid's edge has none of the grid's lrs)."""
    return {name: (trainable, lrs or grid, flags) for name, (trainable, grid, flags) in PROTOCOLS[protocol][1].items()}


def plan(protocol: str, tasks: list[str], ks: list[int], methods: list[str], runs_dir: Path,
         model: str, lrs: tuple[float, ...] | None = None) -> list[tuple[str, int, str, Job]]:
    """(task, k, method, job) of every run the selection asks for, at the methods' lr grids or
    at `lrs` (--lrs): task by task, so that a call cut short by --deadline leaves whole tasks
    finished, and longest first within a task, k by k (in the order of `ks`) among runs of equal
    length."""
    jobs, planned = [], planned_methods(protocol, lrs)
    for task in tasks:
        for k in ks:
            for name in methods:
                trainable, planned_lrs, flags = planned[name]
                args = ["--model", model, "--task", task, "--k", str(k)]
                for flag, value in flags.items():  # False: the --no- switch (e.g. --no-cuda-graphs)
                    switch = flag.replace("_", "-")
                    args += [f"--no-{switch}"] if value is False else [f"--{switch}", str(value)]
                folder = grid_dir(task_dir(runs_dir, protocol, task), name, trainable, k)
                jobs += [(task, k, name, Job(folder, Cell(trainable, lr, seed), tuple(args)))
                         for lr in planned_lrs for seed in SEEDS]
    return sorted(jobs, key=lambda j: (tasks.index(j[0]), -_steps(j[3])))  # stable: the table's order among equals


def _steps(job: Job) -> int:
    return int(job.train_args[job.train_args.index("--steps") + 1])


def steps_left(job: Job) -> int:
    """Steps the run still has to take: all of them, none if finished, or those after its last
    metrics line if it is a MeZO run to resume (zotune.grid.resumable)."""
    from zotune.grid import resumable
    if (job.run_dir / "summary.json").exists():
        return 0
    if resumable(job.run_dir):
        lines = (job.run_dir / "metrics.jsonl").read_text().splitlines() if (job.run_dir / "metrics.jsonl").exists() else []
        for line in reversed(lines):
            try:
                return _steps(job) - int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue
    return _steps(job)


def print_plan(jobs: list[Job], workers: int, steps_per_s: float | None, overhead_s: float | None) -> None:
    """The run count, and an estimate of the wall time from a measured speed where one is given:
    (steps left / steps_per_s + overhead_s) summed over the runs to go, over the concurrent runs.
    steps_per_s: one run's speed while `workers` runs share the devices (session 11: 315 steps/s,
    MeZO full at k=16/512 on SST-2 with 12 runs sharing an H100); overhead_s: a run's wall time
    outside its steps (start, capture, evaluations; 7 s there). Other subsets, tasks (the NLI
    prompts are twice as long) and Adam differ: measure before trusting a figure."""
    left = [(job, steps_left(job)) for job in jobs]
    to_go = [(job, n) for job, n in left if not (job.run_dir / "summary.json").exists()]
    resumes = sum(1 for job, n in to_go if n < _steps(job))
    print(f"plan: {len(jobs)} runs, {len(jobs) - len(to_go)} finished, {len(to_go)} to go ({resumes} to resume), "
          f"{sum(n for _, n in to_go):,} steps to go; {workers} at a time", flush=True)
    if steps_per_s:
        estimate = sum(n / steps_per_s + (overhead_s or 0) for _, n in to_go) / workers
        print(f"plan: about {estimate:.0f} s of wall time at {steps_per_s:g} steps/s a run"
              f"{f' and {overhead_s:g} s a run besides' if overhead_s else ' (no per-run overhead given)'}, "
              f"{workers} runs at a time", flush=True)


def zero_shot_rows(model: str, tasks: list[str], ks: list[int], device: str, runs_dir: Path) -> dict:
    """task -> row name -> k -> per-seed test accuracies, computed once and kept in
    runs_dir/zero_shot.json (a later chunk reads them back). A causal LM is scored through its
    candidates (evaluate.build picks the path), and its dev-fitted threshold is on the
    difference of the two candidates' scores."""
    import torch
    from zotune.evaluate import accuracy, build, dev_threshold_accuracy, predict, split_inputs
    from zotune.tasks.data import default_data_dir
    path = runs_dir / ZERO_SHOT
    stored = json.loads(path.read_text()) if path.exists() else {}
    if stored.get("model") != model:
        stored = {"model": model, "tasks": {}}
    for task in tasks:
        have = stored["tasks"].setdefault(task, {})
        if all(str(k) in have.get("zero-shot", {}) for k in ks):
            continue
        zero = build(model, task, device=device)
        stored["device"] = torch.cuda.get_device_name() if zero.runner.device.type == "cuda" else "cpu"
        for k in ks:
            raw, fitted = [], []
            for seed in SEEDS:  # a causal LM's "logits" are its candidates' scores
                (dev, dev_inputs), (test, test_inputs) = (
                    split_inputs(zero.task, zero.prompt, default_data_dir(), k, seed, s) for s in ("dev", "test"))
                dev_logits, test_logits = (predict(zero.runner, x, 64) for x in (dev_inputs, test_inputs))
                raw.append(accuracy(test_logits, test))
                if task in TWO_CLASS:
                    fitted.append(dev_threshold_accuracy(dev_logits, dev, test_logits, test))
            have.setdefault("zero-shot", {})[str(k)] = raw
            if fitted:
                have.setdefault("zero-shot, threshold fitted on the seed's dev set", {})[str(k)] = fitted
        del zero
    runs_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stored, indent=2) + "\n")
    return stored


def unfinished_runs(grid: Path, method: tuple | None) -> list[str]:
    """The runs of a grid folder without a summary.json: the folders there, and for one of the
    protocol's methods, (trainable, lrs, flags), every run of its lrs and SEEDS, started or not
    (a call's deadline can fall before some of a grid's runs have begun)."""
    present = {run.name for run in grid.iterdir() if run.is_dir()} if grid.is_dir() else set()
    planned = {Cell(method[0], lr, seed).name for lr in method[1] for seed in SEEDS} if method else set()
    return sorted(name for name in present | planned if not (grid / name / "summary.json").is_file())


def finished_grids(folder: Path, ks: list[int], names: dict, methods: dict) -> list[tuple[str, int, Path]]:
    """(row name, k, grid folder) of every folder <name>-k<k> under a task's folder whose runs
    are all finished: the methods' names where the folder is one of theirs, else its name."""
    grids = []
    for grid in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = re.fullmatch(r"(.+)-k(\d+)", grid.name)
        if grid.is_dir() and match and int(match.group(2)) in ks and any(grid.glob("*/summary.json")):
            name = names.get(grid.name, match.group(1))
            if unfinished_runs(grid, methods.get(name)):
                continue  # a grid still running: not a table cell yet
            grids.append((name, int(match.group(2)), grid))
    order = list(METHODS)
    return sorted(grids, key=lambda g: (order.index(g[0]) if g[0] in order else len(order), g[0], g[1]))


def collect(runs_dir: Path, protocol: str, tasks: list[str], ks: list[int],
            lrs: tuple[float, ...] | None = None) -> tuple[dict, set, set]:
    """task -> row -> k -> cell, from the complete grids and the stored zero-shot rows; and the
    models and devices the runs recorded."""
    stored = json.loads((runs_dir / ZERO_SHOT).read_text()) if (runs_dir / ZERO_SHOT).exists() else {}
    methods = planned_methods(protocol, lrs)
    rows, models, devices = {}, set(), set()
    for task in tasks:
        by_row = rows.setdefault(task, {})
        for name, by_k in stored.get("tasks", {}).get(task, {}).items():
            for k in ks:
                if str(k) in by_k:
                    by_row.setdefault(name, {})[k] = {"paper": by_k[str(k)], "zotune": by_k[str(k)], "settings": "-"}
        if stored.get("tasks", {}).get(task):
            models.add(stored["model"])
            devices.add(stored.get("device", "?"))
        names = {grid_dir(Path(), name, trainable, k).name: name for name, (trainable, _, _) in methods.items()
                 for k in ks}
        for name, k, folder in finished_grids(task_dir(runs_dir, protocol, task), ks, names, methods):
            result = aggregate_dir(folder)
            flags = result["config"]
            models.add(flags["model"])
            devices.update(result["devices"])
            for trainable, both in result["aggregates"].items():
                lrs = {c["lr"] for c in result["cells"] if c["trainable"] == trainable}
                row = cell_row(both, lrs, {**flags, "eval_steps": None})
                stopped = sum(c["stopped_early"] for c in result["cells"] if c["trainable"] == trainable)
                if stopped:  # runs that diverged (loss or NaN streak) ended early (train.py); the table says how many
                    row["settings"] += f"; {stopped} runs stopped early (diverged)"
                by_row.setdefault(name, {})[k] = row
                print(f"{task} {name} k={k}: test {mean_std(row['paper'])} by the paper's rule (lrs "
                      f"{row['paper_lrs']}), {mean_std(row['zotune'])} by zotune's (lr {row['zotune_lr']:g}, dev "
                      f"{mean_std(row['zotune_dev'])}); {row['settings']}", flush=True)
    return rows, models, devices


def table(by_row: dict, ks: list[int]) -> str:
    """Each k in two columns, the paper's aggregate first; zero-shot has no lr to choose."""
    head = ["method"] + [f"k={k} {rule}" for k in ks for rule in ("paper", "zotune")] + [f"settings k={k}" for k in ks]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, by_k in by_row.items():
        accuracies = [mean_std(by_k[k][rule]) if k in by_k else "" for k in ks for rule in ("paper", "zotune")]
        settings = [by_k[k]["settings"] if k in by_k else "" for k in ks]
        lines.append("| " + " | ".join([name, *accuracies, *settings]) + " |")
    return "\n".join(lines)


def bundle(runs_dir: Path, path: Path) -> None:
    """The small files of every run under runs_dir (summary.json, config.json, metrics.jsonl,
    zero_shot.json) in one archive, xz-compressed where `path` ends in .xz, else gzip: what the
    table and the plot read, and what a later chunk needs to skip finished runs; no weights or
    snapshots. An unfinished run's trajectory log comes too: with it, a MeZO run continues on
    another machine, the log rebuilding its weights and best-dev weights (`zotune train
    --resume`). The processes' output (*.log, a few lines a run) comes too: where a run failed,
    it says why. xz packs the logs into a quarter fewer bytes than gzip but takes ten times as
    long (RESULTS.md, session 22), so a call that packs at its end names a .tgz."""
    from zotune.trajectory import LOG_NAME
    keep = {"summary.json", "config.json", "metrics.jsonl", ZERO_SHOT}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:xz" if path.suffix == ".xz" else "w:gz") as tar:
        for file in sorted(runs_dir.rglob("*")):
            unfinished_log = file.name == LOG_NAME and not (file.parent / "summary.json").exists()
            if file.is_file() and (file.name in keep or file.suffix == ".log" or unfinished_log):
                tar.add(file, arcname=str(file.relative_to(runs_dir.parent)))


def plot(runs_dir: Path, protocol: str, output: Path, lrs: tuple[float, ...] | None = None) -> Path:
    """SST-2 dev accuracy against steps at k=512 for MeZO (full) and the protocol's LoRA, each at
    zotune's chosen lr, with zero-shot (the runs' own dev scores before step 1) and Adam's final
    dev accuracy (the protocol's own grid, else the table protocol's) as lines."""
    from zotune.plot import plot_dev_curves
    folder = task_dir(runs_dir, protocol, "sst2")
    methods = planned_methods(protocol, lrs)
    lora = "MeZO (LoRA+head)" if "MeZO (LoRA+head)" in methods else "MeZO (LoRA)"  # the paper's LoRA for each
    curves = {}
    for name in ("MeZO (full)", lora):  # issue 19's picture: full and the paper's LoRA
        trainable = methods[name][0]
        grid = grid_dir(folder, name, trainable, 512)
        if missing := unfinished_runs(grid, methods[name]):
            raise UserError(f"--plot draws finished grids only, and {grid} has {len(missing)} run"
                            f"{'s' * (len(missing) > 1)} not finished ({', '.join(missing[:2])}); finish the protocol first")
        result = aggregate_dir(grid)
        lr = result["best_lr"][trainable]
        curves[f"{name}, lr {lr:g}"] = [grid / Cell(trainable, lr, seed).name for seed in result["aggregates"][trainable]["zotune"]["seeds"]]
    runs = [run for dirs in curves.values() for run in dirs]
    zero = [json.loads((run / "summary.json").read_text())["zero_shot"]["dev_accuracy"] for run in runs[:len(SEEDS)]]
    lines = {"zero-shot": statistics.mean(zero)}
    adam_protocol = protocol if "Adam (full)" in methods else "table"
    adam = grid_dir(task_dir(runs_dir, adam_protocol, "sst2"), "Adam (full)", "full", 512)
    if not unfinished_runs(adam, PROTOCOLS[adam_protocol][1]["Adam (full)"]):
        best = aggregate_dir(adam)["aggregates"]["full"]["zotune"]
        lines[f"Adam (full), lr {best['lr']:g}"] = statistics.mean(best["dev"])
    steps = json.loads((runs[0] / "config.json").read_text())["steps"]
    return plot_dev_curves(curves, lines, output, f"SST-2 k=512, {steps:,} MeZO steps: dev accuracy, mean and "
                                                 f"std over {len(SEEDS)} seeds at zotune's chosen lr")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=f"checkpoint directory (default: {MASKED_MODEL}; a causal protocol needs one)")
    parser.add_argument("--protocol", choices=list(PROTOCOLS), help="default: causal for a causal LM, else table")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (every visible GPU)")
    parser.add_argument("--runs-per-device", type=int, default=1, help="processes sharing each device")
    parser.add_argument("--runs-per-process", type=int, default=1,
                        help="runs each process trains a step of each in turn, each on a CUDA stream of its own "
                             "(zotune train-together; benchmarks/concurrent_runs.py says whether that pays)")
    parser.add_argument("--mps", action="store_true",
                        help="run the processes under a CUDA MPS server of their own, so that their kernels "
                             "overlap (benchmarks/concurrent_runs.py --modes mps says whether that pays)")
    parser.add_argument("--tasks", help=f"comma-separated subset of {', '.join(TASKS)} (default: the protocol's)")
    parser.add_argument("--ks", default=",".join(map(str, KS)))
    parser.add_argument("--methods", help="comma-separated subset of the protocol's methods (default: all)")
    parser.add_argument("--lrs", help="comma-separated lrs to run instead of the methods' grids, e.g. to try past "
                             "a grid's edge; a grid's aggregate takes every finished run in its folder, so give "
                             "such runs a --runs-dir of their own unless they are to join the cell")
    parser.add_argument("--mezo-steps", type=int, help="override the MeZO step count (e.g. a short CPU run)")
    parser.add_argument("--deadline", type=float, help="stop after this many seconds (runs stay resumable)")
    parser.add_argument("--plan", action="store_true", help="print the run count (and --steps-per-s estimate) only")
    parser.add_argument("--steps-per-s", type=float, help="measured steps/s of one run while the runs share a GPU")
    parser.add_argument("--overhead-s", type=float, help="measured wall seconds of one run outside its steps")
    parser.add_argument("--keep-weights", action="store_true", help="keep finished runs' *.safetensors")
    parser.add_argument("--output", help="default: runs/fewshot_table.json (causal: runs/fewshot_causal_table.json)")
    parser.add_argument("--runs-dir", help="default: runs/fewshot (causal: runs/fewshot-causal)")
    parser.add_argument("--bundle", help="also write the runs' small files to this .tgz (xz if it ends in .xz)")
    parser.add_argument("--plot", help="write the SST-2 k=512 dev-accuracy picture to this PNG")
    parser.add_argument("--aggregate-only", action="store_true", help="run nothing: aggregate finished grids")
    return parser.parse_args()


def parse_lrs(text: str) -> tuple[float, ...]:
    return tuple(parse_list("--lrs", text, float, lambda lr: 0 < lr < float("inf"), "learning rates",
                            "distinct positive numbers", "1e-4,3e-4"))


def parse_ks(text: str) -> list[int]:
    return parse_list("--ks", text, int, lambda k: k >= 1, "shot counts", "distinct positive whole numbers", "16,512")


def parse_list(flag: str, text: str, convert, valid, what: str, give: str, example: str) -> list:
    """A comma-separated flag's values, each converted and valid and none repeated (a repeat would
    plan its runs twice), else one line that says what to pass."""
    try:
        values = [convert(value) for value in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(map(valid, values)) or len(set(values)) < len(values):
        raise UserError(f"{flag} {text!r} is not a list of {what}; pass {give} joined by commas, e.g. {flag} {example}")
    return values


def check_numbers(args: argparse.Namespace) -> None:
    """The numbers that size the pool, the runs and the estimate: one line where none could work."""
    for flag, value in [("--runs-per-device", args.runs_per_device), ("--runs-per-process", args.runs_per_process),
                        ("--mezo-steps", args.mezo_steps)]:
        if value is not None and value < 1:
            raise UserError(f"{flag} {value} leaves nothing to run; pass 1 or more")
    for flag, value, unit, zero in [("--deadline", args.deadline, "seconds", False),
                                    ("--steps-per-s", args.steps_per_s, "steps a second", False),
                                    ("--overhead-s", args.overhead_s, "seconds", True)]:
        if value is not None and not (value > 0 or zero and value == 0):
            raise UserError(f"{flag} takes {'0 or more' if zero else 'a positive number of'} {unit}, not {value:g}")


def check_splits(tasks: list[str], ks: list[int]) -> None:
    """Every task's k-shot folder for every k and seed, before anything runs: a missing one would
    fail each of its runs alone, after the others had taken their time."""
    from zotune.tasks.data import default_data_dir, kshot_folder, kshot_root
    from zotune.tasks.tasks import TASKS as TASK_TABLE
    for name in tasks:
        task, data_dir = TASK_TABLE[name], default_data_dir()
        folders = [kshot_folder(task, data_dir, k, seed) for k in ks for seed in SEEDS]
        missing = [f.name for f in folders if not f.is_dir()]
        if missing:
            folder = kshot_root(task, data_dir)
            have = sorted({int(p.name.split("-")[0]) for p in folder.glob("*-*") if p.is_dir()})
            raise UserError(f"{folder} has no {missing[0]} split ({len(missing)} of the plan's k-seed folders "
                            f"missing); pass --ks among the k there: {', '.join(map(str, have)) or 'none'}")


def choose_protocol(args: argparse.Namespace) -> tuple[str, str | None]:
    """The protocol and model of a call: --protocol, or the checkpoint's (a local --model whose
    config.json names a causal LM takes `causal`); a protocol that does not fit the checkpoint is
    refused. The model may be None for --aggregate-only of a causal protocol (none is read)."""
    from zotune.model.loading import is_causal_checkpoint
    causal = is_causal_checkpoint(Path(args.model)) if args.model and Path(args.model).is_dir() else None
    protocol = args.protocol or ("causal" if causal else "table")
    if causal is not None and causal != (protocol == "causal"):
        raise UserError(f"--model {args.model} is a {'causal' if causal else 'masked'} LM, but --protocol {protocol} "
                        f"is for {'masked' if causal else 'causal'} LMs; drop --protocol (the checkpoint picks it)")
    model = args.model or (None if protocol == "causal" else MASKED_MODEL)
    if model is None and not args.aggregate_only:
        raise UserError("--protocol causal needs --model DIR of a causal LM (OPT, Llama family), e.g. out/clm "
                        "from tools/pretrain_clm.py")
    return protocol, model


def main():
    args = parse_args()
    try:
        run(args, *choose_protocol(args))
    except UserError as exc:  # one line, as the CLI's
        print(f"fewshot_table.py: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run(args: argparse.Namespace, protocol: str, model: str | None) -> None:
    started = time.monotonic()
    protocol_tasks, methods = PROTOCOLS[protocol]
    tasks = args.tasks.split(",") if args.tasks else list(DEFAULT_TASKS.get(protocol, protocol_tasks))
    names = args.methods.split(",") if args.methods else list(methods)
    ks = parse_ks(args.ks)
    lrs = None if args.lrs is None else parse_lrs(args.lrs)
    for value, known, what in [(tasks, protocol_tasks, "--tasks"), (names, methods, "--methods")]:
        if set(value) - set(known):
            raise UserError(f"{what} {sorted(set(value) - set(known))} not in protocol {protocol}: {', '.join(known)}")
    check_numbers(args)
    if not args.aggregate_only:
        check_splits(tasks, ks)
    causal = protocol == "causal"
    runs_dir = Path(args.runs_dir or ("runs/fewshot-causal" if causal else "runs/fewshot"))
    output = Path(args.output or ("runs/fewshot_causal_table.json" if causal else "runs/fewshot_table.json"))
    devices = local_devices("cpu" if args.device == "cpu" else "auto")
    workers = len(devices) * args.runs_per_device * args.runs_per_process
    jobs = plan(protocol, tasks, ks, names, runs_dir, model or "", lrs)
    if args.mezo_steps is not None:
        jobs = [(t, k, n, Job(j.output_dir, j.cell, _with_steps(j.train_args, args.mezo_steps))) for t, k, n, j in jobs]
    if not args.aggregate_only:
        check_finished([j for *_, j in jobs], run_settings)  # a finished run of other settings is not this plan's
        print_plan([j for *_, j in jobs], workers, args.steps_per_s, args.overhead_s)
        planned = planned_methods(protocol, lrs)
        for name in names:
            trainable, planned_lrs, _ = planned[name]
            first = next(job for *_, method, job in jobs if method == name)
            settings = run_settings(job_flags(first))  # what its runs get: flags over the recipe, --mezo-steps
            print(f"plan: {name}: {trainable}, {settings_text(settings, planned_lrs)}, k {ks}, seeds {SEEDS}",
                  flush=True)
    if args.plan:
        return
    if not args.aggregate_only:
        sharing = gpu_sharing(args.mps, devices)  # --mps for CPU runs is refused before anything runs
        zero_shot_rows(model, tasks, ks, args.device, runs_dir)
        deadline = started + args.deadline if args.deadline else None
        with sharing as env:
            left = run_jobs([j for *_, j in jobs], devices, run_settings, quiet=True, runs_per_device=args.runs_per_device,
                            deadline=deadline, keep_weights=args.keep_weights, runs_per_process=args.runs_per_process,
                            env=env)
        if left:
            print(f"deadline: {len(left)} of {len(jobs)} runs unfinished; the same command continues them", flush=True)
    rows, models, devices_seen = collect(runs_dir, protocol, tasks, ks, lrs)
    if args.plot:
        print(f"picture: {plot(runs_dir, protocol, Path(args.plot), lrs)}", flush=True)
    if args.bundle:
        bundle(runs_dir, Path(args.bundle))
    report(output, protocol, rows, ks, models, devices_seen, None if args.aggregate_only else time.monotonic() - started)


def report(output: Path, protocol: str, rows: dict, ks: list[int], models: set, devices: set,
           seconds: float | None) -> None:
    """The tables as JSON at `output`, and printed last; `seconds`, this call's wall time, when it ran runs
    (the runs of a table usually span several calls, each printing its own)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    device_name = ", ".join(sorted(devices))
    output.write_text(json.dumps(
        {"protocol": protocol, "device": device_name, "models": sorted(models),
         "tables": {task: table(by_row, ks) for task, by_row in rows.items()},
         "runs": rows}, indent=2) + "\n")
    lora = ("MeZO (LoRA) trains the LoRA matrices on q and v only, as MeZO's large_models does" if protocol == "causal"
            else "MeZO (LoRA) trains the LoRA matrices only; MeZO (LoRA+head), the paper's, also the LM head")
    print(f"\nTest accuracy, mean (std) over seeds {SEEDS}, protocol {protocol}, model "
          f"{', '.join(sorted(models))}, on {device_name}{'' if seconds is None else f' (this call: {seconds:.0f} s)'}. paper: "
          "the best-dev run of each seed over the lr grid (MeZO's gather_result.py); zotune: one lr per cell by "
          f"mean dev. {lora}.")
    for task, by_row in rows.items():
        print(f"\n{task}\n{table(by_row, ks)}")


def _with_steps(train_args: tuple[str, ...], steps: int) -> tuple[str, ...]:
    """--mezo-steps: another step count for MeZO runs, dev evaluated six times, logged and (where
    the method selects among fewer evaluations, the paper protocol) selected at each."""
    if "mezo" not in train_args:
        return train_args
    args, every = list(train_args), max(1, steps // 6)
    for flag, value in {"--steps": steps, "--eval-steps": every, "--log-steps": every, "--select-steps": every}.items():
        if flag in args:
            args[args.index(flag) + 1] = str(value)
    return tuple(args)


if __name__ == "__main__":
    main()
