"""Several `zotune train` runs in one process, a step of each in turn, each on a CUDA stream of
its own (issue 19's table of a 19M-parameter model: a step is a few hundred small kernels, and
processes sharing a GPU take turns, so their kernels never overlap; one process's streams can).

Each run is train.py's: the same setup, loop body, files and summary, so interleaving changes
no run's numbers (a run's arithmetic reads only its own tensors, and its batches and
directions are functions of its step). Only wall times change: a run's count the other runs'
steps too. Whether this is faster than processes is for benchmarks/concurrent_runs.py to say
on a GPU; on the CPU it only interleaves.
"""

import contextlib
import time
from collections.abc import Iterator

import torch

from zotune.config import TrainConfig
from zotune.errors import UserError
from zotune.train import Run, begin, close, finish, stepper


def train_together(cfgs: list[TrainConfig], resume: list[bool] | None = None) -> list[dict]:
    """Train every config's run (resume[i]: continue run i, as train(cfg, resume=True)); returns
    their summaries in order. A run that stops on a UserError (a bad setting, a damaged file) ends
    alone: the others go on and finish, and RunsFailed then names it. Ctrl-C or any other error
    stops them all, each log flushed and closed, so that each run resumes as an interrupted
    `zotune train` does."""
    resume = resume or [False] * len(cfgs)
    summaries: list[dict | None] = [None] * len(cfgs)
    failed: dict[int, str] = {}
    runs: list[tuple[int, Run, float]] = []
    try:
        for i, (cfg, again) in enumerate(zip(cfgs, resume)):
            started = time.perf_counter()
            try:
                run = begin(cfg, again)
            except UserError as exc:
                failed[i] = str(exc)
                continue
            if isinstance(run, dict):
                summaries[i] = run  # finished before
            else:
                runs.append((i, run, started))
        outcomes = in_turn([run for _, run, _ in runs])
    finally:
        for _, run, _ in runs:
            close(run)
    for (i, run, started), outcome in zip(runs, outcomes):
        if isinstance(outcome, UserError):
            failed[i] = str(outcome)
        else:
            summaries[i] = finish(run, started, outcome, resume[i])
    if failed:
        raise RunsFailed(summaries, {cfgs[i].output_dir: failed[i] for i in sorted(failed)})
    return summaries


class RunsFailed(UserError):
    """Some runs of a train_together call stopped on a UserError; the rest finished
    (`summaries`, None where a run failed)."""

    def __init__(self, summaries: list[dict | None], errors: dict[str, str]):
        self.summaries = summaries
        super().__init__(f"{len(errors)} of {len(summaries)} runs stopped: "
                         + "; ".join(f"{run_dir}: {message}" for run_dir, message in errors.items()))


def in_turn(runs: list[Run]) -> list[float | UserError]:
    """Step the runs in turn until each has finished or stopped; each run's loop time
    (train.loop's), or the UserError that stopped it."""
    if any(run.session.device.type == "cuda" for run in runs):
        torch.cuda.synchronize()  # setup's work, on the default stream, before the runs' streams read it
    streams = [torch.cuda.Stream(run.session.device) if run.session.device.type == "cuda" else None for run in runs]
    steps = [stepper(run) for run in runs]
    outcomes: list[float | UserError | None] = [None] * len(runs)
    while any(outcome is None for outcome in outcomes):
        one_round(steps, streams, outcomes)
    if any(stream is not None for stream in streams):
        torch.cuda.synchronize()  # the runs' streams, before finish reads their weights on the default stream
    return outcomes


def one_round(steps: list[Iterator], streams: list, outcomes: list) -> None:
    """One step of each run still going (outcomes[r] is None), run r's under streams[r] (None:
    the current stream). A run whose steps end leaves its loop time (train.stepper's) in
    outcomes[r]; one that raises a UserError leaves the error."""
    for r, (stream, steps_of_run) in enumerate(zip(streams, steps)):
        if outcomes[r] is not None:
            continue
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            try:
                next(steps_of_run)
            except StopIteration as done:
                outcomes[r] = done.value
            except UserError as exc:
                outcomes[r] = exc
