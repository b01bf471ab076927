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
from zotune.train import Run, begin, close, finish, stepper


def train_together(cfgs: list[TrainConfig], resume: list[bool] | None = None) -> list[dict]:
    """Train every config's run (resume[i]: continue run i, as train(cfg, resume=True)); returns
    their summaries in order. Any error or Ctrl-C stops them all, each log flushed and closed,
    so that each run resumes as an interrupted `zotune train` does."""
    resume = resume or [False] * len(cfgs)
    summaries: list[dict | None] = [None] * len(cfgs)
    runs: list[tuple[int, Run, float]] = []
    try:
        for i, (cfg, again) in enumerate(zip(cfgs, resume)):
            started = time.perf_counter()
            run = begin(cfg, again)
            if isinstance(run, dict):
                summaries[i] = run  # finished before
            else:
                runs.append((i, run, started))
        train_times = in_turn([run for _, run, _ in runs])
    finally:
        for _, run, _ in runs:
            close(run)
    for (i, run, started), train_time in zip(runs, train_times):
        summaries[i] = finish(run, started, train_time, resume[i])
    return summaries


def in_turn(runs: list[Run]) -> list[float]:
    """Step the runs in turn until each has finished; each run's loop time (train.loop's)."""
    if any(run.session.device.type == "cuda" for run in runs):
        torch.cuda.synchronize()  # setup's work, on the default stream, before the runs' streams read it
    streams = [torch.cuda.Stream(run.session.device) if run.session.device.type == "cuda" else None for run in runs]
    steps = [stepper(run) for run in runs]
    times: list[float | None] = [None] * len(runs)
    while any(t is None for t in times):
        one_round(steps, streams, times)
    if any(stream is not None for stream in streams):
        torch.cuda.synchronize()  # the runs' streams, before finish reads their weights on the default stream
    return times


def one_round(steps: list[Iterator], streams: list, times: list) -> None:
    """One step of each unfinished run (times[r] is None), run r's under streams[r] (None: the
    current stream); a run whose steps end leaves its loop time (train.stepper's) in times[r]."""
    for r, (stream, steps_of_run) in enumerate(zip(streams, steps)):
        if times[r] is not None:
            continue
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            try:
                next(steps_of_run)
            except StopIteration as done:
                times[r] = done.value
