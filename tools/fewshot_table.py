"""SST-2 test accuracy of a model: zero-shot, MeZO (full), MeZO (LoRA) and Adam fine-tuning,
at k=16 and k=512, mean (std) over LM-BFF's five data seeds. Prints a Markdown table (and
writes it, with every run's numbers, to --output as JSON).

    python tools/fewshot_table.py --model models/zotune-roberta-small --device cuda
"""

import argparse
import json
import statistics
import sys
import time

import torch
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from zotune.config import TrainConfig  # noqa: E402
from zotune.evaluate import accuracy, build, encode, predict  # noqa: E402
from zotune.tasks.data import default_data_dir, load_split  # noqa: E402
from zotune.train import train  # noqa: E402

SEEDS = (13, 21, 42, 87, 100)
# name -> TrainConfig overrides (steps, lr, eps, batch size as used for every k)
METHODS = {
    "MeZO (full)": dict(optimizer="mezo", trainable="full", lr=1e-5, eps=1e-3, steps=2000, eval_steps=250),
    "MeZO (LoRA)": dict(optimizer="mezo", trainable="lora", lr=1e-2, eps=1e-2, steps=2000, eval_steps=250),
    "Adam (full)": dict(optimizer="adam", trainable="full", lr=1e-4, steps=1000, eval_steps=100, batch_size=8),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="models/zotune-roberta-small")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ks", default="16,512")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    parser.add_argument("--mezo-steps", type=int, help="override the MeZO step count (e.g. a short CPU run)")
    parser.add_argument("--output", default="runs/fewshot_table.json")
    parser.add_argument("--runs-dir", default="runs/fewshot")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    results: dict[str, dict[int, list[float]]] = {}
    started = time.perf_counter()
    zero = build(args.model, "sst2", device=args.device)
    for k in ks:
        for seed in SEEDS:
            test = load_split(zero.task, default_data_dir(), k, seed, "test")
            acc = accuracy(predict(zero.runner, encode(zero.prompt, test), 64), test)
            results.setdefault("zero-shot", {}).setdefault(k, []).append(acc)
            for name, overrides in METHODS.items():
                if name not in args.methods.split(","):
                    continue
                options = dict(model=args.model, task="sst2", k=k, seed=seed, device=args.device, quiet=True,
                               overwrite=True, batch_size=32 if k == 16 else 64,
                               output_dir=f"{args.runs_dir}/{name.split()[0]}-{overrides['trainable']}-{k}-{seed}")
                options.update(overrides)
                if args.mezo_steps and overrides["optimizer"] == "mezo":
                    options.update(steps=args.mezo_steps, eval_steps=max(1, args.mezo_steps // 6))
                summary = train(TrainConfig(**options))
                results.setdefault(name, {}).setdefault(k, []).append(summary["test_accuracy"])
                print(f"{name} k={k} seed={seed}: test {summary['test_accuracy']:.3f} dev {summary['dev_accuracy']:.3f} "
                      f"({summary['wall_time_s']:.0f} s, {summary['device']})", flush=True)

    def cell(values):
        return f"{100 * statistics.mean(values):.1f} ({100 * statistics.pstdev(values):.1f})"
    lines = ["| method | " + " | ".join(f"k={k}" for k in ks) + " | settings |",
             "|---|" + "---|" * len(ks) + "---|"]
    for name, by_k in results.items():
        o = METHODS.get(name)
        if o is not None and args.mezo_steps and o["optimizer"] == "mezo":
            o = {**o, "steps": args.mezo_steps}
        settings = "" if o is None else (f"{o['steps']} steps, lr {o['lr']}" + (f", eps {o['eps']}" if "eps" in o else "")
                                         + f", batch {o.get('batch_size', '32 (k=16) / 64 (k=512)')}")
        lines.append(f"| {name} | " + " | ".join(cell(by_k[k]) for k in ks) + f" | {settings} |")
    table = "\n".join(lines)
    device_name = torch.cuda.get_device_name() if zero.runner.device.type == "cuda" else "cpu"
    print(f"\nSST-2 test accuracy (872 sentences), mean (std) over seeds {SEEDS}, model {args.model}, "
          f"on {device_name} ({time.perf_counter() - started:.0f} s in all)\n{table}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"table": table, "runs": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
