"""Several small-model MeZO runs sharing one GPU (issue 19's table): how many steps a second they
make together, as separate processes (how tools/fewshot_table.py runs them) against inside one
process, each run on its own CUDA stream with their steps issued in turn (a design not built
into `zotune train`: this measures whether it would pay).

Sessions 12-13 measured 12 table runs sharing an H100 at 67-112 steps/s each, about 1,000-1,200
together, against ~315 for a run alone: the step of the 19M-parameter model is a few hundred
small kernels, processes on one GPU take turns (their kernels never overlap), and so their sum
stays near one process's kernel-latency limit. Kernels of one process on different streams can
overlap. Each mode here runs N runs for a fixed window after a warm-up:
  processes  N processes of this script (--worker), started together, each one run
  mps        the same processes as clients of a CUDA MPS server of their own (grid.temporary_mps_server),
             under which their kernels can overlap as streams' do
  streams    one process, N runs, each on a stream of its own, a step of each in turn
  serial     one process, N runs, all on the default stream, a step of each in turn
A run is `zotune train`'s (zotune.train.setup): the shipped zotune-roberta-small, MeZO (full),
SST-2 k=512 (the five data seeds in turn), batch 64, lr 1e-5, eps 1e-3, tf32 as the table's
runs, each step one CUDA graph replay; its steps are train.stepper's, the loop's own body (batch
choice, packing, step, trajectory and metrics lines, fsyncs), without dev evaluations or
snapshots. The streams mode interleaves runs as `zotune train-together` (together.py) does.

    python benchmarks/concurrent_runs.py                       # N = 1, 4, 12; 10 s windows
    python benchmarks/concurrent_runs.py --runs 1 3 --seconds 5 --modes streams serial
"""

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common import REPO  # noqa: F401  (puts src/ on the path)
from zotune.config import TrainConfig  # noqa: E402
from zotune.errors import UserError  # noqa: E402
from zotune.grid import temporary_mps_server  # noqa: E402
from zotune.together import one_round  # noqa: E402
from zotune.train import setup, stepper  # noqa: E402

MODES = ("processes", "mps", "streams", "serial")
DATA_SEEDS = (13, 21, 42, 87, 100)  # the k-shot splits there are; a sixth run repeats the first's


@dataclass(frozen=True)
class Setting:
    """What every run and window of one table row share."""
    model: str | None   # None: the shipped zotune-roberta-small
    device: str
    trainable: str
    warmup: int         # steps of each run before its window (graph captures, the first epoch's shapes)
    seconds: float      # the measured window


def build_run(index: int, folder: Path, setting: Setting):
    """Run `index` as `zotune train` would set it up, as its steps (train.stepper: the loop's
    body, a step at a time)."""
    cfg = TrainConfig(task="sst2", k=512, seed=DATA_SEEDS[index % len(DATA_SEEDS)], trainable=setting.trainable,
                      lr=1e-5, eps=1e-3, steps=1_000_000, batch_size=64, eval_steps=1_000_000, log_steps=50,
                      snapshot_every=1_000_000, device=setting.device, quiet=True, output_dir=str(folder / f"run{index}"),
                      **({"model": setting.model} if setting.model else {}))
    return stepper(setup(cfg, resume=False))


def in_turn(steps: list, streams: list, warmup: int, seconds: float) -> tuple[int, float]:
    """Steps of every run in turn (together.one_round: run r under streams[r], or the current
    stream where None): `warmup` rounds (captures), then as many rounds as fit in `seconds`.
    (steps, elapsed s)."""
    times = [None] * len(steps)  # the runs never end here: 1,000,000 steps
    for _ in range(warmup):
        one_round(steps, streams, times)
    synchronize()
    rounds, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        one_round(steps, streams, times)
        rounds += 1
    synchronize()
    return rounds * len(steps), time.perf_counter() - start


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def in_process(n: int, mode: str, setting: Setting, profile: cProfile.Profile | None = None) -> tuple[int, float]:
    """N runs in this process (`mode` streams or serial); with `profile`, its window is profiled."""
    with tempfile.TemporaryDirectory() as folder:
        steps = [build_run(i, Path(folder), setting) for i in range(n)]
        synchronize()  # the weights, copied in on the default stream, before other streams read them
        streams = [torch.cuda.Stream() if mode == "streams" else None for _ in steps]
        in_turn(steps, streams, setting.warmup, 0.0)
        with profile or contextlib.nullcontext():
            return in_turn(steps, streams, 0, setting.seconds)


def host_profile(n: int, mode: str, setting: Setting, top: int = 25) -> str:
    """Where the host's time goes while one process steps N runs: the functions of most own
    time in the window (cProfile, which slows the host a little), as pstats prints them."""
    profile = cProfile.Profile()
    steps, elapsed = in_process(n, mode, setting, profile)
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(top)
    return f"{n} runs, {mode}, profiled: {steps} steps in {elapsed:.1f} s\n{out.getvalue()}"


def processes(n: int, setting: Setting, env: dict[str, str] | None = None) -> tuple[int, float]:
    """N workers (`env` added to their environment); the window starts once every one has
    warmed up. (steps of all, longest window s)."""
    with tempfile.TemporaryDirectory() as folder:
        flags = ["--folder", folder, "--warmup", str(setting.warmup), "--seconds", str(setting.seconds),
                 "--device", setting.device, "--trainable", setting.trainable,
                 *(["--model", setting.model] if setting.model else [])]
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(i), *flags], stdout=subprocess.PIPE,
                                  text=True, env={**os.environ, **(env or {})}) for i in range(n)]
        while not all((Path(folder) / f"ready{i}").exists() for i in range(n)):
            if any(p.poll() is not None for p in procs):
                raise UserError("a worker ended before its window; its error is above")
            time.sleep(0.05)
        (Path(folder) / "go").write_text("")
        results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return sum(r["steps"] for r in results), max(r["seconds"] for r in results)


def under_mps(n: int, setting: Setting) -> tuple[int, float]:
    with temporary_mps_server() as env:
        return processes(n, setting, env)


def worker(index: int, folder: Path, setting: Setting) -> None:
    """One run of the processes mode: warm up, say so, wait for the others, step for the window."""
    steps = [build_run(index, folder, setting)]
    in_turn(steps, [None], setting.warmup, 0.0)
    (folder / f"ready{index}").write_text("")
    while not (folder / "go").exists():
        time.sleep(0.01)
    done, elapsed = in_turn(steps, [None], 0, setting.seconds)
    print(json.dumps({"steps": done, "seconds": elapsed}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[1, 4, 12])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--seconds", type=float, default=10.0, help="the measured window")
    parser.add_argument("--warmup", type=int, default=40, help="steps of each run before the window (captures)")
    parser.add_argument("--model", help="default: the shipped zotune-roberta-small")
    parser.add_argument("--trainable", default="full", help="the runs' subset (e.g. lora+head)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a check of the code (no streams)")
    parser.add_argument("--profile-host", type=int, metavar="N",
                        help="also profile the host while one process steps N runs (streams on CUDA, else serial)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu for a check of the code")
    setting = Setting(args.model, args.device, args.trainable, args.warmup, args.seconds)
    if args.worker is not None:
        return worker(args.worker, Path(args.folder), setting)
    if args.device == "cpu" and {"streams", "mps"} & set(args.modes):
        raise SystemExit("the streams and mps modes need CUDA: pass --modes processes serial")
    rows, modes = [], list(args.modes)
    measure = {"processes": processes, "mps": under_mps}
    for n in args.runs:
        for mode in list(modes):
            try:
                steps, elapsed = measure[mode](n, setting) if mode in measure else in_process(n, mode, setting)
            except UserError as unavailable:  # e.g. no MPS on this machine: the other modes still measure
                print(f"{mode}: {unavailable}", flush=True)
                modes.remove(mode)
                continue
            rows.append((n, mode, steps / elapsed, steps / elapsed / n))
            print(f"{n} runs, {mode}: {steps} steps in {elapsed:.1f} s", flush=True)
    how = "tf32, CUDA graphs" if args.device == "cuda" else "float32, eager"
    print(f"\nMeZO ({args.trainable}) steps of {args.model or 'zotune-roberta-small'}, SST-2 k=512 batch 64, {how}, "
          f"{args.seconds:g} s windows, on {device_name(args.device)}")
    print("| runs | mode | steps/s, all runs | steps/s a run |\n|---|---|---|---|")
    for n, mode, total, each in rows:
        print(f"| {n} | {mode} | {total:.1f} | {each:.1f} |")
    if args.profile_host:
        print("\n" + host_profile(args.profile_host, "streams" if args.device == "cuda" else "serial", setting))


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


if __name__ == "__main__":
    main()
