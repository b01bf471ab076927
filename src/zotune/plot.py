"""`zotune plot RUN`: one PNG of a run's metrics.jsonl against the step; and `plot_dev_curves`,
dev accuracy against the step over the seeds of a grid (tools/fewshot_table.py --plot).

Three panels: training loss (the logged values faint, an exponential moving average on top),
|projected gradient| on a log scale (MeZO's (L+ - L-) / 2eps; absent for Adam runs, whose log
holds null there, so the panel is left out), and dev accuracy at each evaluation.
"""

import json
import math
import statistics
from pathlib import Path

from zotune.errors import UserError, require
from zotune.files import write_atomic


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl; pass the --output-dir of a zotune train run")
    records, lines = [], path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # a run killed mid-write leaves a partial last line
                break
            raise UserError(f"{path}:{number} is not a JSON line; the metrics log is damaged") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f"{path}:{number} is not a metrics line (no step); the metrics log is damaged")
        records.append(record)
    if not records:
        raise UserError(f"{path} is empty; the run logged no step yet")
    return records


def ema(values: list[float], span: int) -> list[float]:
    """Exponential moving average with weight 2 / (span + 1), bias-corrected like Adam's moments
    so the first points are not pulled towards zero."""
    alpha, average, weight, out = 2 / (span + 1), 0.0, 0.0, []
    for v in values:
        average = (1 - alpha) * average + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(average / weight)
    return out


def _series(records: list[dict], key: str, transform=lambda v: v) -> tuple[list[int], list[float]]:
    """(steps, values) where the value is a finite number (NaN/Inf steps and nulls are dropped)."""
    pairs = [(r["step"], transform(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    pairs = [(s, v) for s, v in pairs if math.isfinite(v)]
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    matplotlib = require("matplotlib", "plot", "zotune plot")
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; pass the --output-dir of a zotune train run")
    records = read_metrics(run_dir)
    output = Path(output) if output else run_dir / "run.png"
    loss_steps, loss = _series(records, "loss")
    grad_steps, grad = _series(records, "projected_grad", abs)
    grad_steps, grad = [s for s, g in zip(grad_steps, grad) if g > 0], [g for g in grad if g > 0]  # log scale
    dev_steps, dev = _series(records, "dev_accuracy")

    panels = ["loss"] + (["grad"] if grad else []) + ["dev"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False)
    axes = dict(zip(panels, axes[:, 0]))
    fig.suptitle(_title(run_dir), fontsize=10)

    ax = axes["loss"]
    ax.plot(loss_steps, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="logged")
    if loss:
        ax.plot(loss_steps, ema(loss, max(2, len(loss) // 10)), color="tab:blue", linewidth=1.8, label="EMA")
    ax.set_ylabel("training loss")
    ax.legend(loc="upper right", fontsize=8)

    if "grad" in axes:
        ax = axes["grad"]
        ax.plot(grad_steps, grad, color="tab:orange", alpha=0.3, linewidth=0.8)
        ax.plot(grad_steps, [math.exp(v) for v in ema([math.log(g) for g in grad], max(2, len(grad) // 10))],
                color="tab:orange", linewidth=1.8)  # a geometric EMA suits a log axis
        ax.set_yscale("log")
        ax.set_ylabel("|projected grad|")

    ax = axes["dev"]
    ax.plot(dev_steps, dev, color="tab:green", marker="o", markersize=4, linewidth=1)
    if dev:
        best = max(range(len(dev)), key=dev.__getitem__)  # the earliest best, as train.py keeps
        ax.plot([dev_steps[best]], [dev[best]], marker="*", markersize=12, color="tab:red", linestyle="none",
                label=f"best {dev[best]:.3f} at step {dev_steps[best]}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_ylabel("dev accuracy")
    ax.set_xlabel("step")
    for ax in axes.values():
        ax.grid(alpha=0.3)

    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(output, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return output


def plot_dev_curves(curves: dict[str, list[Path]], lines: dict[str, float], output: str | Path,
                    title: str) -> Path:
    """Dev accuracy against the step, one curve per entry of `curves` (label -> the run
    directories of its seeds): the mean over the seeds at each evaluation step all of them
    logged, and a band of one population std either side; each entry of `lines` (label ->
    accuracy) a horizontal line, e.g. zero-shot and Adam's final dev accuracy."""
    matplotlib = require("matplotlib", "plot", "tools/fewshot_table.py --plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = iter(["tab:blue", "tab:orange", "tab:purple", "tab:brown"])
    for label, run_dirs in curves.items():
        if not run_dirs:
            raise UserError(f"no runs for the curve {label!r}")
        series = [dict(zip(*_series(read_metrics(run), "dev_accuracy"))) for run in run_dirs]
        steps = sorted(set.intersection(*(set(s) for s in series)))
        if not steps:
            raise UserError(f"the runs of {label!r} share no dev evaluation step; are they one grid's?")
        mean = [statistics.mean(s[step] for s in series) for step in steps]
        std = [statistics.pstdev([s[step] for s in series]) for step in steps]
        colour = next(colours)
        ax.plot(steps, mean, color=colour, linewidth=1.6, label=f"{label} ({len(run_dirs)} seeds)")
        ax.fill_between(steps, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                        color=colour, alpha=0.2, linewidth=0)
    for (label, value), style in zip(lines.items(), ["--", ":", "-.", (0, (1, 3))]):
        ax.axhline(value, color="black", linestyle=style, linewidth=1.2, label=f"{label}: {value:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("dev accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(output, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return output


def _title(run_dir: Path) -> str:
    """What the run was, from config.json and summary.json where present."""
    parts = [run_dir.name]
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
        parts.append(f"{cfg.get('optimizer')} {cfg.get('trainable')} on {cfg.get('task')} k={cfg.get('k')} "
                     f"seed {cfg.get('seed')}, lr {cfg.get('lr')}, eps {cfg.get('eps')}")
    except (OSError, json.JSONDecodeError):
        pass
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        if summary.get("test_accuracy") is not None:
            parts.append(f"test accuracy {summary['test_accuracy']:.3f}")
    except (OSError, json.JSONDecodeError):
        pass
    return " · ".join(parts)
