"""SST-2 test accuracy of a model: zero-shot, MeZO (full), MeZO (LoRA) and Adam fine-tuning,
at k=16 and k=512, mean (std) over LM-BFF's five data seeds, each cell aggregated over a small
lr grid by dev accuracy (never by test) in two ways (zotune.grid): the paper's, the best-dev
run of each seed over the whole grid (MeZO's gather_result.py), and zotune's, one lr per cell
by mean dev. Every run is a `zotune train` process started by `zotune.grid.run_grid`; several
share a GPU at a time, since a small model leaves a run host-bound. Prints a Markdown table
and writes it, with every run's numbers, to --output as JSON.

    python tools/fewshot_table.py --device cuda --runs-per-device 8
    python tools/fewshot_table.py --aggregate-only --runs-dir runs/fewshot   # finished runs only

--aggregate-only runs nothing and writes nothing under --runs-dir: it aggregates every grid
found there (<name>-k<k>/<run>/summary.json and config.json, e.g. MeZO-full-k16, or one of
another subset such as MeZO-lora+head-k16, shown under its folder's name), with the settings
the runs recorded, and leaves out zero-shot; --methods does not apply.
"""

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

SRC = str(Path(__file__).resolve().parents[1] / "src")
sys.path.insert(0, SRC)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))  # for the run processes

from zotune.evaluate import accuracy, build, encode, predict  # noqa: E402
from zotune.grid import aggregate_dir, local_devices, run_grid  # noqa: E402
from zotune.tasks.data import default_data_dir, load_split  # noqa: E402

SEEDS = (13, 21, 42, 87, 100)
# name -> (trainable subset, lr grid, other `zotune train` flags). MeZO's batch is 32 at k=16
# (the whole 32-example training set) and 64 at k=512, as in the MeZO paper; Adam's is LM-BFF's 8.
METHODS = {
    "MeZO (full)": ("full", (1e-5, 3e-5, 1e-4), dict(optimizer="mezo", eps=1e-3, steps=5000, eval_steps=500)),
    # Unpaired ± passes, as the card's table was measured (pairing became the default later).
    "MeZO (LoRA)": ("lora", (3e-3, 1e-2, 3e-2), dict(optimizer="mezo", eps=1e-2, steps=5000, eval_steps=500,
                                                    pair=False)),
    "Adam (full)": ("full", (3e-5, 1e-4), dict(optimizer="adam", steps=1000, eval_steps=100, batch_size=8)),
}


def mean_std(values) -> str:
    return f"{100 * statistics.mean(values):.1f} ({100 * statistics.pstdev(values):.1f})"


def grid_dir(runs_dir: Path, name: str, trainable: str, k: int) -> Path:
    return runs_dir / f"{name.split()[0]}-{trainable}-k{k}"


def cell_row(aggregate: dict, lrs, flags: dict) -> dict:
    """One (method, k) cell of the table from a subset's two aggregates (zotune.grid.aggregate)."""
    paper, zotune = aggregate["paper"], aggregate["zotune"]
    settings = (f"{flags['steps']} steps, batch {flags['batch_size']}"
                + (f", eps {flags['eps']:g}" if flags["optimizer"] == "mezo" else "")
                + f", lr grid {{{', '.join(f'{lr:g}' for lr in sorted(lrs))}}}")
    return {"paper": paper["test"], "zotune": zotune["test"], "paper_lrs": dict(zip(paper["seeds"], paper["lr"])),
            "zotune_lr": zotune["lr"], "zotune_dev": zotune["dev"], "settings": settings}


def finished_grids(runs_dir: Path, ks: list[int]) -> list[tuple[str, int, Path]]:
    """(row name, k, folder) of every grid folder <name>-k<k> under runs_dir: the methods'
    names where the folder is one of theirs, else the folder's name without -k<k>."""
    known = {grid_dir(runs_dir, name, trainable, k).name: name
             for name, (trainable, _, _) in METHODS.items() for k in ks}
    grids = []
    for folder in sorted(runs_dir.iterdir()):
        match = re.fullmatch(r"(.+)-k(\d+)", folder.name)
        if folder.is_dir() and match and int(match.group(2)) in ks:
            grids.append((known.get(folder.name, match.group(1)), int(match.group(2)), folder))
    order = list(METHODS)  # the methods first, in their order, then the other folders
    return sorted(grids, key=lambda g: (order.index(g[0]) if g[0] in order else len(order), g[0], g[1]))


def report(rows: dict, name: str, k: int, row: dict) -> None:
    rows.setdefault(name, {})[k] = row
    print(f"{name} k={k}: test {mean_std(row['paper'])} by the paper's rule (best-dev run per seed, lrs "
          f"{row['paper_lrs']}), {mean_std(row['zotune'])} by zotune's (lr {row['zotune_lr']:g}, dev "
          f"{mean_std(row['zotune_dev'])}); {row['settings']}", flush=True)


def table(rows: dict, ks: list[int]) -> str:
    """Each k in two columns, the paper's aggregate first; zero-shot has no lr to choose."""
    head = ["method"] + [f"k={k} {rule}" for k in ks for rule in ("paper", "zotune")] + [f"settings k={k}" for k in ks]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, by_k in rows.items():
        accuracies = [mean_std(by_k[k][rule]) if k in by_k else "" for k in ks for rule in ("paper", "zotune")]
        settings = [by_k[k]["settings"] if k in by_k else "" for k in ks]
        lines.append("| " + " | ".join([name, *accuracies, *settings]) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="models/zotune-roberta-small")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (every visible GPU)")
    parser.add_argument("--runs-per-device", type=int, default=1)
    parser.add_argument("--ks", default="16,512")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    parser.add_argument("--mezo-steps", type=int, help="override the MeZO step count (e.g. a short CPU run)")
    parser.add_argument("--output", default="runs/fewshot_table.json")
    parser.add_argument("--runs-dir", default="runs/fewshot")
    parser.add_argument("--aggregate-only", action="store_true",
                        help="run nothing: aggregate every finished grid under --runs-dir (no zero-shot row)")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    runs_dir = Path(args.runs_dir)
    started = time.perf_counter()
    rows, models, devices_seen = {}, set(), set()
    if args.aggregate_only:
        for name, k, folder in finished_grids(runs_dir, ks):
            result = aggregate_dir(folder)
            flags_k = result["config"]  # what the runs used
            models.add(flags_k["model"])
            devices_seen.update(result["devices"])
            for trainable, both in result["aggregates"].items():
                row_name = name if len(result["aggregates"]) == 1 else f"{name} ({trainable})"
                lrs = {c["lr"] for c in result["cells"] if c["trainable"] == trainable}
                report(rows, row_name, k, cell_row(both, lrs, flags_k))
    else:
        models.add(args.model)
        zero = build(args.model, "sst2", device=args.device)
        devices_seen.add(torch.cuda.get_device_name() if zero.runner.device.type == "cuda" else "cpu")
        devices = local_devices("cpu" if zero.runner.device.type == "cpu" else "auto")
        rows["zero-shot"] = {}
        for k in ks:
            tests = [load_split(zero.task, default_data_dir(), k, seed, "test") for seed in SEEDS]
            accuracies = [accuracy(predict(zero.runner, encode(zero.prompt, t), 64), t) for t in tests]
            rows["zero-shot"][k] = {"paper": accuracies, "zotune": accuracies, "settings": ""}
        del zero
        for name in args.methods.split(","):
            trainable, lrs, flags = METHODS[name]
            if args.mezo_steps and flags["optimizer"] == "mezo":
                flags = {**flags, "steps": args.mezo_steps, "eval_steps": max(1, args.mezo_steps // 6)}
            for k in ks:
                flags_k = {"batch_size": 32 if k == 16 else 64, **flags}
                train_args = ["--model", args.model, "--task", "sst2", "--k", str(k)]
                for flag, value in flags_k.items():
                    option = flag.replace("_", "-")
                    train_args += [f"--no-{option}"] if value is False else [f"--{option}", str(value)]
                result = run_grid(grid_dir(runs_dir, name, trainable, k), list(SEEDS), list(lrs), [trainable],
                                  train_args, devices, quiet=True, runs_per_device=args.runs_per_device)
                report(rows, name, k, cell_row(result["aggregates"][trainable], lrs, flags_k))

    text = table(rows, ks)
    device_name = ", ".join(sorted(devices_seen))
    print(f"\nSST-2 test accuracy (872 sentences), mean (std) over seeds {SEEDS}, model {', '.join(sorted(models))}, "
          f"on {device_name} ({time.perf_counter() - started:.0f} s in all). paper: the best-dev run of each "
          f"seed over the lr grid (MeZO's gather_result.py); zotune: one lr per cell by mean dev.\n{text}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(
        {"device": device_name, "table": text, "runs": rows},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
