"""RunRecords: what a run writes about itself besides its trajectory log.

One object owns RUN/metrics.jsonl (a line per log point), the best dev accuracy and its
weights (RUN/best.safetensors), the TensorBoard event files, the progress bar and
RUN/summary.json, so the training loop only hands it numbers. Only rank 0 writes; the other
ranks keep the same bookkeeping in memory.
"""

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from zotune.errors import UserError
from zotune.files import save_tensors_atomic, write_text_atomic


BEST_NAME = "best.safetensors"  # the best-dev trainable tensors


class RunRecords:
    def __init__(self, run_dir: Path, writes: bool, kept: list[dict], window: list, *, steps: int, first_step: int,
                 progress: str, quiet: bool, tensorboard: bool, resumed: bool, first_loss: float | None = None,
                 selects: Callable[[int], bool]):
        """`kept`: the metrics lines already written (a resumed run's, up to its first step);
        `window`: the (loss, projected gradients) of the steps since the last of them;
        `first_loss`: a resumed run's loss at its first step (`diverged` compares with it);
        `selects`: whether a step's dev evaluation takes part in selection (TrainConfig.selects)."""
        self.run_dir, self.writes, self.selects = run_dir, writes, selects
        self.best = best_of(kept, selects)  # best-dev selection goes on as if the run had never stopped
        self.window, self.logged_from = window, kept[-1]["step"] if kept else 0
        self.first_loss = _finite_or_none(first_loss)
        self.bad_streak = self.worst_streak = 0  # Adam's steps with a non-finite loss, in a row
        path = run_dir / "metrics.jsonl"
        if writes:  # replaced whole (a kill at any instant leaves the old file or the new one), then appended to
            write_text_atomic(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept), fsync=True)
        self.metrics = open(path if writes else os.devnull, "a")  # no gap, no duplicate after a resume
        self.board = None
        if tensorboard and writes:  # the same records as metrics.jsonl, for TensorBoard (RUN/tensorboard)
            from torch.utils.tensorboard import SummaryWriter
            self.board = SummaryWriter(str(run_dir / "tensorboard"), purge_step=first_step + 1 if resumed else None)
        self.progress = tqdm(total=steps, initial=first_step, disable=quiet or not writes, desc=progress, unit="step")

    def add(self, loss: torch.Tensor, projected_grads: torch.Tensor | None) -> None:
        """A step's loss and projected gradients, left on the device until the next log point."""
        self.window.append((loss, projected_grads))
        self.progress.update(1)

    def offer(self, dev_accuracy: float, step: int, tensors: dict[str, torch.Tensor]) -> None:
        """A dev evaluation; if strictly better than the best so far (MeZO's trainer keeps the
        earliest best), its weights become best.safetensors."""
        if self._better(dev_accuracy, step) and self.writes:
            save_tensors_atomic(self.run_dir / BEST_NAME, tensors)

    def _better(self, dev_accuracy: float | None, step: int) -> bool:
        if not (self.selects(step) and _improves(dev_accuracy, self.best)):
            return False
        self.best.update(dev_accuracy=dev_accuracy, step=step)
        return True

    def log_point(self, step: int, lr: float, dev_accuracy: float | None, extra: dict) -> dict:
        """The metrics line of `step`: the window's mean loss and projected gradient, the lr, and
        the dev accuracy where one was measured; also to TensorBoard and the progress bar."""
        if self.window[0][1] is None:  # Adam: no trajectory log counts its bad steps, so count them here
            for ok in torch.isfinite(torch.stack([loss.reshape(()) for loss, _ in self.window])).tolist():
                self.bad_streak = 0 if ok else self.bad_streak + 1
                self.worst_streak = max(self.worst_streak, self.bad_streak)
        if self.first_loss is None and self.logged_from == 0:  # the window holds the run's first step
            self.first_loss = _finite_or_none(float(self.window[0][0].reshape(())))
        loss, projected_grad = window_means(self.window)
        # JSON has no NaN or Infinity: a non-finite mean is written as null (the log keeps the bits).
        record = {"step": step, "loss": _finite_or_none(loss), "projected_grad": _finite_or_none(projected_grad),
                  "lr": lr}
        if dev_accuracy is not None:
            record["dev_accuracy"] = dev_accuracy
        self.window, self.logged_from = [], step
        self.metrics.write(json.dumps(record, allow_nan=False) + "\n")
        self.metrics.flush()
        if self.board is not None:
            for name, value in record.items():
                if name != "step" and value is not None:
                    self.board.add_scalar(name, value, step)
        self.progress.set_postfix({"loss": f"{loss:.4f}", "dev": f"{self.best['dev_accuracy']:.3f}", **extra})
        return record

    def diverged(self, record: dict, max_ratio: float) -> str | None:
        """Why the run has diverged, if it has: the loss of metrics line `record` is more than
        `max_ratio` times the loss of the run's first step (or than max_ratio, where that loss
        is under 1). The first step's, not the first line's: a run can blow up within a line."""
        loss, first = record["loss"], self.first_loss
        if loss is None or first is None or loss <= max_ratio * max(first, 1.0):
            return None
        return f"the loss diverged: {loss:.3g} at step {record['step']}, against {first:.3g} at the first step"

    def sync(self) -> None:
        """metrics.jsonl to the disk (with the trajectory log's fsync)."""
        if self.writes:
            os.fsync(self.metrics.fileno())

    def close(self) -> None:
        self.metrics.close()
        if self.board is not None:
            self.board.close()
        self.progress.close()

    def write_summary(self, summary: dict) -> None:
        if self.writes:
            write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")


def best_of(kept: list[dict], selects: Callable[[int], bool]) -> dict:
    """The best dev evaluation among metrics lines `kept` whose step `selects` admits:
    {"dev_accuracy", "step"}, the earliest of equals (MeZO's trainer keeps the earliest best);
    step None where none was evaluated."""
    best = {"dev_accuracy": -1.0, "step": None}
    for record in kept:
        if selects(record["step"]) and _improves(record.get("dev_accuracy"), best):
            best = {"dev_accuracy": record["dev_accuracy"], "step": record["step"]}
    return best


def _improves(dev_accuracy: float | None, best: dict) -> bool:
    return dev_accuracy is not None and dev_accuracy > best["dev_accuracy"]


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def window_means(window: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[float, float | None]:
    """Mean loss and mean projected gradient over a window of steps, each (loss, its projected
    gradients [n], or None without MeZO), brought to the host in one transfer. A step's
    gradients are averaged, then the steps summed, in float32 and in order: a figure does not
    depend on where the window's values were (device, or the log of a resumed run)."""
    values = torch.cat([t.reshape(-1) for step in window for t in step if t is not None]).cpu().numpy()
    loss_sum = grad_sum = np.float32(0)
    at = 0
    for _, grads in window:
        loss_sum += values[at]
        if grads is not None:
            grad_sum += np.add.accumulate(values[at + 1:at + 1 + grads.numel()])[-1] / np.float32(grads.numel())
        at += 1 + (0 if grads is None else grads.numel())
    has_grads = window[0][1] is not None
    return float(loss_sum) / len(window), float(grad_sum) / len(window) if has_grads else None


def kept_metrics(run_dir: Path, last_step: int) -> list[dict]:
    """metrics.jsonl lines up to the resumed step (a torn last line dropped), each checked: a
    damaged line is a UserError, never carried into the resumed run."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.is_file() else []
    kept, previous = [], 0
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            ok = (isinstance(record, dict) and _is_int(record.get("step")) and record["step"] > previous
                  and all(_is_number(record.get(key), optional=key != "lr")
                          for key in ("loss", "projected_grad", "lr", "dev_accuracy")))
        except (json.JSONDecodeError, TypeError):
            ok = False
        if not ok:
            raise UserError(f"{path}:{number} is not a metrics line of this run; restore the file or delete it "
                            f"(dev history before step {last_step} is then lost)")
        previous = record["step"]
        if record["step"] <= last_step:
            kept.append(record)
    return kept


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value, optional: bool) -> bool:
    if value is None:
        return optional
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
