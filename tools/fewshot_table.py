"""SST-2 test accuracy of a model: zero-shot, MeZO (full), MeZO (LoRA) and Adam fine-tuning,
at k=16 and k=512, mean (std) over LM-BFF's five data seeds, with the learning rate of each
cell chosen from a small grid by mean dev accuracy (the MeZO and LM-BFF protocol; never by
test). Every run is a `zotune train` process started by `zotune.grid.run_grid`; several share a
GPU at a time, since a small model leaves a run host-bound. Prints a Markdown table and writes
it, with every run's numbers, to --output as JSON.

    python tools/fewshot_table.py --device cuda --runs-per-device 8
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

SRC = str(Path(__file__).resolve().parents[1] / "src")
sys.path.insert(0, SRC)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))  # for the run processes

from zotune.evaluate import accuracy, build, encode, predict  # noqa: E402
from zotune.grid import local_devices, run_grid  # noqa: E402
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
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    started = time.perf_counter()
    zero = build(args.model, "sst2", device=args.device)
    device_name = torch.cuda.get_device_name() if zero.runner.device.type == "cuda" else "cpu"
    devices = local_devices("cpu" if zero.runner.device.type == "cpu" else "auto")
    rows = {"zero-shot": {}}
    for k in ks:
        tests = [load_split(zero.task, default_data_dir(), k, seed, "test") for seed in SEEDS]
        rows["zero-shot"][k] = ([accuracy(predict(zero.runner, encode(zero.prompt, t), 64), t) for t in tests], "")
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
            result = run_grid(Path(args.runs_dir) / f"{name.split()[0]}-{trainable}-k{k}", list(SEEDS), list(lrs),
                              [trainable], train_args, devices, quiet=True, runs_per_device=args.runs_per_device)
            best = result["best_lr"][trainable]
            cell = next(c for c in result["cells"] if c["lr"] == best)
            settings = (f"lr {best:g} of {{{', '.join(f'{lr:g}' for lr in lrs)}}} (dev {mean_std(cell['dev'])}), "
                        f"{flags_k['steps']} steps, batch {flags_k['batch_size']}"
                        + (f", eps {flags_k['eps']:g}" if "eps" in flags_k else ""))
            rows.setdefault(name, {})[k] = (cell["test"], settings)
            print(f"{name} k={k}: test {mean_std(cell['test'])} with {settings}", flush=True)

    lines = ["| method | " + " | ".join(f"k={k}" for k in ks) + " | " + " | ".join(f"settings k={k}" for k in ks) + " |",
             "|---|" + "---|" * (2 * len(ks))]
    for name, by_k in rows.items():
        lines.append(f"| {name} | " + " | ".join(mean_std(by_k[k][0]) for k in ks) + " | "
                     + " | ".join(by_k[k][1] for k in ks) + " |")
    table = "\n".join(lines)
    print(f"\nSST-2 test accuracy (872 sentences), mean (std) over seeds {SEEDS}, model {args.model}, "
          f"on {device_name} ({time.perf_counter() - started:.0f} s in all)\n{table}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(
        {"device": device_name, "table": table, "runs": {n: {k: v[0] for k, v in r.items()} for n, r in rows.items()}},
        indent=2) + "\n")


if __name__ == "__main__":
    main()
