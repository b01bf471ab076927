"""The training recipe: setup, a plain loop, and finish.

MeZO (forward only) or Adam (the backprop baseline), dev-based model selection, test accuracy
with the best-dev weights, and a run directory holding config.json, trajectory.jsonl (MeZO),
metrics.jsonl, best.safetensors and summary.json. `setup` builds the run (Session.build) and
its records, `loop` is the step loop, `finish` tests and summarises. The MeZO step itself is
optim/mezo.py.

Every figure in summary.json is measured: counters live in the runner, times come from a clock
around the work, memory from the CUDA allocator or the OS.
"""

import json
import os
import resource
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from zotune import trajectory
from zotune.config import TrainConfig, read_json_object
from zotune.errors import UserError, require
from zotune.evaluate import metric_names, metric_sums
from zotune.files import save_tensors_atomic, write_text_atomic
from zotune.optim.mezo import MezoStepper, direction_seed
from zotune.optim.schedule import SCHEDULES
from zotune.distributed import Group
from zotune.engine.runner import Runner
from zotune.optim.subsets import no_decay_names
from zotune.records import BEST_NAME, RunRecords, best_of, kept_metrics
from zotune.session import Session
from zotune.tasks.data import default_data_dir


@dataclass
class Run:
    """A run being trained: what setup() built, what loop() and finish() use."""
    cfg: TrainConfig
    session: Session
    run_dir: Path
    splits: dict                        # split -> examples
    sequences: dict                     # split -> what the runner packs: encoded prompts, or candidate examples
    step_fn: object                     # (step, examples, labels, lr) -> (loss, grads, log entry)
    log: trajectory.TrajectoryWriter | None  # MeZO: the per-step trajectory log
    records: RunRecords | None          # None: a resumed run that had already finished
    first_step: int                     # 0, or where a resumed run goes on
    logged: list[dict]                  # a resumed run's trajectory records
    zero_shot: dict | None = None       # dev and test accuracy before the first step
    stopped_early: dict | None = None   # {"step", "why"}: the loss diverged, or was NaN/Inf too long (_log_point)
    phase_s: dict = field(default_factory=dict)  # this process's seconds by phase (summary's `phase_s`)


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """A fresh run into cfg.output_dir, or (resume=True) the continuation of the MeZO run
    there: its weights are rebuilt from the snapshot and the trajectory log, and the loop goes
    on from the last logged step, so the run ends bit-identical to an uninterrupted one."""
    started = time.perf_counter()
    run = begin(cfg, resume)
    if isinstance(run, dict):  # a finished run: its summary
        return run
    try:
        train_time = loop(run)
    finally:  # every exit path, Ctrl-C and errors included: what was computed reaches the disk
        close(run)
    return finish(run, started, train_time, resume)


def begin(cfg: TrainConfig, resume: bool) -> "Run | dict":
    """The run set up and scored before its first step, or the summary of one already finished."""
    started = time.perf_counter()
    run = setup(cfg, resume)
    if run.records is None:
        return json.loads((run.run_dir / "summary.json").read_text())
    run.phase_s["setup"] = time.perf_counter() - started
    with timed(run, "zero_shot"):
        run.zero_shot = before_training(run, resume)
    return run


def close(run: Run) -> None:
    """Flush and close the run's records and trajectory log."""
    run.records.close()
    if run.log is not None:
        run.log.close()


def setup(cfg: TrainConfig, resume: bool) -> Run:
    if resume and cfg.optimizer != "mezo":
        raise UserError("--resume continues MeZO runs only (an Adam run keeps no trajectory log); start it again")
    run_dir = Path(cfg.output_dir)
    if not resume:
        check_output_dir(cfg)
    if cfg.tensorboard:
        require("torch.utils.tensorboard", "tensorboard", "--tensorboard")
    session = Session.build(cfg)
    data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    splits, sequences = session.read_splits(data_dir)
    if session.is_main:
        print(announcement(cfg, session), flush=True)
    kept = []
    logged = trajectory.read_log(run_dir) if resume else None  # every record read is checked before any write
    if resume:
        kept = kept_metrics(run_dir, min(len(logged[1]), cfg.steps))
    if not resume and session.is_main:
        _prepare_run_dir(cfg)
    log, records = None, []
    if cfg.optimizer == "mezo":
        log, records = _open_trajectory(session, run_dir, logged, best_of(kept, cfg.selects)["step"])
    first_step = len(records)
    step_fn = mezo_stepper(cfg, session) if cfg.optimizer == "mezo" else adam_stepper(cfg, session)
    if resume and _finished(run_dir, first_step, cfg.steps):
        log.close()
        return Run(cfg, session, run_dir, splits, sequences, step_fn, log, None, first_step, records)
    # A resumed run rebuilds the window since the last metrics line from the log's float32 values.
    logged_from = kept[-1]["step"] if kept else 0
    window = [(trajectory.from_hex([r["loss"]])[0].to(session.device), trajectory.from_hex(r["grads"]).to(session.device))
              for r in records[logged_from:first_step]]
    first_loss = float(trajectory.from_hex([records[0]["loss"]])[0]) if records else None
    run_records = RunRecords(run_dir, session.is_main, kept, window, steps=cfg.steps, first_step=first_step,
                             progress=f"{cfg.optimizer} {cfg.task}", quiet=cfg.quiet, tensorboard=cfg.tensorboard,
                             resumed=resume, first_loss=first_loss, selects=cfg.selects)
    return Run(cfg, session, run_dir, splits, sequences, step_fn, log, run_records, first_step, records)


def _finished(run_dir: Path, logged_steps: int, steps: int) -> bool:
    """Whether a run to resume had finished: its summary written, after all its steps or at the
    step where it stopped early (its loss diverged, or was NaN or Inf for too many steps)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return False
    if logged_steps == steps:
        return True
    stopped = read_json_object(path, "delete it to resume the run").get("stopped_early")
    return stopped is not None and stopped.get("step") == logged_steps


def before_training(run: Run, resume: bool) -> dict | None:
    """Dev and test accuracy of the weights before the first step (the checkpoint itself for
    full, top:K, bias and LoRA, whose B starts at zero; with prefix, its initial rows), so the
    result can say what training added. Stored in the run directory for a resume to report;
    the runner's counters restart afterwards, so the summary counts the run's own work."""
    path = run.run_dir / ZERO_SHOT_NAME
    if resume and path.is_file():
        return read_json_object(path, "delete it to resume without zero-shot scores")
    if resume and run.first_step > 0:  # the initial weights are gone; a run writes its scores before step 1
        return None
    scores = {**split_scores("dev", score(run, "dev")), **split_scores("test", score(run, "test"))}
    run.session.runner.start_counting()
    if run.session.is_main:
        write_text_atomic(path, json.dumps(scores, indent=2) + "\n")
    return scores


def announcement(cfg: TrainConfig, session: Session) -> str:
    """The line a run starts with: its recipe and the values that define it."""
    subset = cfg.trainable + (f" (layers {','.join(map(str, cfg.layers))})" if cfg.layers else "")
    changed = cfg.changed_from_recipe()
    recipe = (cfg.recipe or "(none)") + (f" ({', '.join(changed)} changed)" if changed else "")
    return (f"zotune train: recipe {recipe}: {cfg.optimizer} {subset} on {cfg.task} k={cfg.k} "
            f"seed {cfg.seed}, {cfg.steps} steps, lr {cfg.lr:g}, eps {cfg.eps:g}, batch {cfg.batch_size}, "
            f"dev every {cfg.eval_steps}; {sum(p.numel() for _, p in session.trainable):,} trainable parameters "
            f"on {session.device} ({cfg.precision if session.device.type == 'cuda' else 'float32'}); "
            f"run directory {cfg.output_dir}")


def _open_trajectory(session: Session, run_dir: Path, logged, best_step: int | None
                     ) -> tuple[trajectory.TrajectoryWriter, list[dict]]:
    """The trajectory log of a fresh run, or a resumed run's: its header checked against this
    run, its weights restored from the snapshot and the records, a torn last line dropped, and
    its best-dev weights (of `best_step`) rebuilt if they are missing."""
    cfg, flat = session.cfg, session.flat
    header = trajectory.make_header(cfg.to_dict(), trajectory.model_sha256(cfg.model), flat)
    path = run_dir / trajectory.LOG_NAME if session.is_main else None
    if logged is None:
        return trajectory.TrajectoryWriter(path, header), []
    logged_header, records = logged
    trajectory.check_header(logged_header, header, run_dir)
    records = records[:cfg.steps]
    best = run_dir / BEST_NAME
    rebuild = (best_step, best) if best_step is not None and session.is_main and not best.is_file() else None
    with torch.inference_mode():
        trajectory.restore(flat, run_dir, records, cfg.eps, cfg.weight_decay, rebuild)
    if session.is_main:
        trajectory.rewrite_log(run_dir, logged_header, records)
    log = trajectory.TrajectoryWriter(path)
    for record in records:
        log.count(record)
    return log, records


def loop(run: Run) -> float:
    """The steps from run.first_step to cfg.steps; returns their wall time with the GPU's work
    in it, less the dev evaluations: the steps, their logging and snapshots."""
    steps = stepper(run)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def stepper(run: Run) -> Iterator[None]:
    """loop() one step at a time: yields after each step (its logging and snapshot done), so
    that several runs can take turns (together.py); returns loop()'s time."""
    cfg, session, train_set = run.cfg, run.session, run.sequences["train"]
    labels = torch.tensor([e.label for e in run.splits["train"]])
    # k=16 trains on one batch: its labels are indexed once, not at every step. On the host: a
    # step's CUDA graph copies them in as it does its seeds and lr; an eager step copies them itself.
    batch_labels = lru_cache(maxsize=1)(lambda index: labels[list(index)])
    if run.first_step > run.records.logged_from and _is_log_point(cfg, run.first_step):
        _log_point(run, run.first_step, run.logged[run.first_step - 1]["lr"])  # killed before its metrics line
    _synchronize(session.device)
    started = time.perf_counter()
    for step in range(run.first_step, cfg.steps):
        index = batch_indices(len(train_set), cfg.batch_size, cfg.seed, step)
        lr = SCHEDULES[cfg.schedule](step, cfg.lr, cfg.steps)
        loss, grad, logged = run.step_fn(step, [train_set[i] for i in index], batch_labels(tuple(index)), lr)
        done = step + 1
        if run.log is not None:
            run.log.add(done, logged[0], lr, logged[1], loss)
        run.records.add(loss, grad)
        if _is_log_point(cfg, done):
            _log_point(run, done, lr)
        _keep_durable(run, done)
        yield
        if run.stopped_early is not None:
            break
    _synchronize(session.device)
    return time.perf_counter() - started - run.phase_s.get("dev_evals", 0.0)


def _is_log_point(cfg: TrainConfig, done: int) -> bool:
    return done % cfg.log_steps == 0 or done % cfg.eval_steps == 0 or done == cfg.steps


def _log_point(run: Run, done: int, lr: float) -> None:
    """The metrics line of step `done`, after a dev evaluation at eval steps."""
    cfg, runner = run.cfg, run.session.runner
    if run.log is not None:
        run.log.write()  # the log leads: best.safetensors and metrics never get ahead of it
    dev = None
    if done % cfg.eval_steps == 0 or done == cfg.steps:
        with timed(run, "dev_evals"):
            dev = next(iter(score(run, "dev").values()))  # the selection metric
        with timed(run, "checkpoints"):
            run.records.offer(dev, done, dict(run.session.trainable))
    extra = {} if runner.cache is None else {"cache_hits": f"{runner.cache.stats.report()['hit_rate']:.1%}"}
    record = run.records.log_point(done, lr, dev, extra)
    # A diverged run ends as a finished one, with its best-dev weights: in a grid it is a result
    # (MeZO's rule picks each seed's best dev over the lrs; the reference trains on through NaN
    # losses and keeps its best checkpoint), and its remaining steps would be wasted.
    streak = (run.log or run.records).worst_streak  # the longest streak at any step, not only at this one
    why = (f"{streak} steps in a row had a NaN or Inf loss (--max-bad-steps {cfg.max_bad_steps}), up to step {done}"
           if streak >= cfg.max_bad_steps else run.records.diverged(record, cfg.max_loss_ratio))
    if why is not None:
        run.stopped_early = {"step": done, "why": why}


def _keep_durable(run: Run, done: int) -> None:
    """MeZO: fsync the logs, compare the ranks' weights, snapshot the trainable tensors."""
    cfg, session = run.cfg, run.session
    if run.log is None:
        return
    if session.is_main and done % cfg.log_every == 0:
        run.log.sync()
        run.records.sync()
    if session.group is not None and done % cfg.sync_check == 0:
        session.group.check_in_sync(session.flat.buffer, done)
    if session.is_main and done % cfg.snapshot_every == 0 and done < cfg.steps:
        with timed(run, "checkpoints"):
            run.log.write()  # a snapshot never gets ahead of the log
            trajectory.write_snapshot(run.run_dir, session.flat, done)


@contextmanager
def timed(run: Run, phase: str):
    """Add the block's wall time, the GPU's work in it included, to run.phase_s[phase]."""
    _synchronize(run.session.device)
    start = time.perf_counter()
    try:
        yield
    finally:
        _synchronize(run.session.device)
        run.phase_s[phase] = run.phase_s.get(phase, 0.0) + time.perf_counter() - start


def score(run: Run, split: str) -> dict[str, float]:
    """A split's metrics (evaluate.metric_names: accuracy, or a generation task's F1 then EM),
    means over its examples; with several ranks each scores its shard and they add up sums."""
    session, group = run.session, run.session.group
    examples, inputs = run.splits[split], run.sequences[split]
    if group is not None:
        examples, inputs = group.shard(examples), group.shard(inputs)
    sums = metric_sums(session.runner, session.prompt, examples, inputs, run.cfg.eval_batch_size)
    totals = torch.tensor([*sums.values(), len(examples)], dtype=torch.float64)
    if group is not None:
        totals = group.all_reduce_sum(totals)
    return {name: (totals[i] / totals[-1]).item() for i, name in enumerate(sums)}


def split_scores(split: str, metrics: dict[str, float]) -> dict[str, float]:
    """A split's metrics as summary fields: `<split>_accuracy` holds the one dev selection uses
    (F1 for a generation task), and every metric has its own `<split>_<name>` too."""
    return {f"{split}_accuracy": next(iter(metrics.values())), **{f"{split}_{n}": v for n, v in metrics.items()}}


def finish(run: Run, started: float, train_time: float, resume: bool) -> dict:
    """final.safetensors, the best-dev weights back in the model, dev and test accuracy, summary.json."""
    cfg, session = run.cfg, run.session
    with timed(run, "final"):
        if run.log is not None and session.is_main:
            save_tensors_atomic(run.run_dir / "final.safetensors", session.flat.state_dict())  # what `replay` rebuilds
        if session.group is not None:
            session.group.barrier()  # rank 0's best.safetensors is complete before any rank reads it
        best = run.records.best
        if best["step"] is not None:  # test with the best-dev weights
            state = load_file(run.run_dir / BEST_NAME)
            with torch.no_grad():
                for name, param in session.trainable:
                    param.copy_(state[name])
        scores = {**split_scores("dev", score(run, "dev")), **split_scores("test", score(run, "test"))}
    stats, device = session.runner.stats, session.device
    taken = run.stopped_early["step"] if run.stopped_early else cfg.steps
    # Disjoint phases: the loop's time less its dev evaluations (train_time) holds the checkpoints.
    phases = {**run.phase_s, "steps": train_time - run.phase_s.get("checkpoints", 0.0)}
    summary = {
        "task": cfg.task, "k": cfg.k, "seed": cfg.seed, "optimizer": cfg.optimizer, "trainable": cfg.trainable,
        "trainable_parameters": sum(p.numel() for _, p in session.trainable),
        "steps": cfg.steps, "best_step": best["step"], "resumed_from_step": run.first_step if resume else None,
        "bad_steps": run.log.bad_total if run.log is not None else 0,
        "forward_passes": stats.forward_passes, "tokens_computed": stats.tokens_computed,
        "padding_tokens_avoided": stats.padding_tokens_avoided, "graph_filler_tokens": stats.graph_filler_tokens,
        "wall_time_s": time.perf_counter() - started, "train_time_s": train_time,
        "steps_per_s": (taken - run.first_step) / train_time if train_time > 0 else 0.0,
        "stopped_early": run.stopped_early,
        "peak_memory_bytes": peak_memory_bytes(device), "device": _device_name(device),
        "metric": metric_names(session.prompt)[0], **scores,
        "cache": session.runner.cache_stats(), "run_dir": str(run.run_dir), "zero_shot": run.zero_shot,
        "phase_s": {name: phases.get(name, 0.0) for name in PHASES},
    }
    if run.log is None:  # a MeZO run's log header pins its base weights; a run without one pins them here
        summary["model_sha256"] = trajectory.model_sha256(cfg.model)
    if session.flat is not None:
        summary["sweeps_per_direction"] = 2 if session.flat.plus is not None else 3  # see session.add_second_buffer
    if session.group is not None:
        summary["ranks"] = session.group.world
    run.records.write_summary(summary)
    return summary


def batch_indices(n_examples: int, batch_size: int, run_seed: int, step: int) -> list[int]:
    """Examples of a step: each epoch is a fresh permutation cut into batches (the last one
    may be short, as in the HF Trainer MeZO builds on). A pure function of the step, so a
    resumed run sees the same data. Each batch is sorted: the loss is a mean, so order does
    not matter, and a batch of the same examples is then the same packed input, step after
    step (k=16 trains on one batch), which keeps cached and recomputed results bit-identical."""
    if batch_size >= n_examples:  # every step takes every example (k=16): no permutation to draw
        return list(range(n_examples))
    per_epoch = -(-n_examples // batch_size)
    epoch, position = divmod(step, per_epoch)
    order = _epoch_order(n_examples, run_seed, epoch)
    return sorted(order[position * batch_size:(position + 1) * batch_size])


@lru_cache(maxsize=64)
def _epoch_order(n_examples: int, run_seed: int, epoch: int) -> tuple[int, ...]:
    # Kept for the epoch's steps: drawing a permutation at every step costs host time. One entry
    # per run: the runs of one process (together.py) take turns, step by step.
    return tuple(np.random.default_rng([run_seed, epoch]).permutation(n_examples).tolist())


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _synchronize(device: torch.device) -> None:
    """Before reading the clock: the GPU runs behind the host."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Where a run's wall time goes (summary.json's `phase_s`, seconds of this process): building the
# run (model, data), the zero-shot scores, the steps, the dev evaluations, writing
# best.safetensors and --resume snapshots, and the end (final weights, dev and test scores with
# the best weights). A CUDA graph is captured where it is first replayed, inside that phase. The
# rest of wall_time_s is the summary's own writing; the interpreter's start and imports come
# before any of it.
PHASES = ("setup", "zero_shot", "steps", "dev_evals", "checkpoints", "final")

# What a run directory may hold: what zotune writes there (and its temporary files, NAME.tmp).
ZERO_SHOT_NAME = "zero_shot.json"
RUN_FILES = {"config.json", "metrics.jsonl", "summary.json", BEST_NAME, "final.safetensors", "run.png",
             "tensorboard", ZERO_SHOT_NAME, trajectory.LOG_NAME, trajectory.SNAPSHOT_NAME}


def check_output_dir(cfg: TrainConfig) -> None:
    """Before any work: the run directory can be created and written, and --overwrite replaces
    only a zotune run, never a directory of something else (a model checkpoint, a home)."""
    run_dir = Path(cfg.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--output-dir {run_dir} is a file; pass a directory")
    existing = next(p for p in [run_dir, *run_dir.parents] if p.exists())  # "." always exists
    if not existing.is_dir():
        raise UserError(f"--output-dir {run_dir} is under {existing}, which is a file; pass another --output-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--output-dir {run_dir}: {existing} is not writable; pass another --output-dir")
    if run_dir != existing or not any(run_dir.iterdir()):
        return
    if not cfg.overwrite:
        raise UserError(f"output directory {run_dir} already holds a run; pass --overwrite, another --output-dir, "
                        f"or --resume {run_dir}")
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_FILES and not p.name.endswith(".tmp"))
    if foreign or not (run_dir / "config.json").is_file() or not set(
            read_json_object(run_dir / "config.json", "pass another --output-dir")) <= set(TrainConfig.__dataclass_fields__):
        what = f"it holds {', '.join(foreign[:3])}" if foreign else "its config.json is not a zotune run's"
        raise UserError(f"--overwrite replaces zotune runs only, and {run_dir} is not one ({what}); "
                        f"pass another --output-dir")


def _prepare_run_dir(cfg: TrainConfig) -> Path:
    """A new run replaces all of an old one (check_output_dir allowed it): no plot, TensorBoard
    event or checkpoint of the old run may sit beside the new run's records."""
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in map(run_dir.joinpath, RUN_FILES - {"config.json"}):  # config.json: rewritten below
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink(missing_ok=True)
    write_text_atomic(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2, allow_nan=False) + "\n")
    return run_dir


def mezo_stepper(cfg: TrainConfig, session: Session):
    """Single process: n-SPSA over cfg.n_spsa directions. Data parallel (torchrun): each rank
    takes its shard of the batch (shard_step_batch) and the losses are summed. Multi-direction
    (--directions-per-rank d): rank r measures directions r*d .. r*d+d-1 on the whole batch.
    Paired (session.paired): each direction's ± passes are one forward (runner.pair_loss).
    A batch is a list of the runner's examples: encoded prompts, or CandidateExamples."""
    group, runner = session.group, session.runner
    n = cfg.n_spsa if group is None or cfg.directions_per_rank is None else group.world * cfg.directions_per_rank
    measures = combine = None
    if group is not None:
        combine = group.all_reduce_sum
        if cfg.directions_per_rank is not None:
            measures = lambda j: j // cfg.directions_per_rank == group.rank  # noqa: E731
    stepper = MezoStepper(runner, session.flat, cfg.eps, cfg.weight_decay, session.paired)

    @torch.inference_mode()
    def step_fn(step, examples, labels, lr):
        seeds = [direction_seed(cfg.seed, step, j) for j in range(n)]
        share = 1.0
        if group is not None and cfg.directions_per_rank is None:  # data parallel: my shard
            examples, labels, share = shard_step_batch(group, runner, examples, labels)
        result = stepper(runner.pack(examples), labels, seeds, lr, share, measures, combine)
        return result.loss, result.projected_grads, (seeds, result.projected_grads)  # the last for the log
    return step_fn


def shard_step_batch(group: Group, runner: Runner, examples: list, labels: torch.Tensor
                     ) -> tuple[list, torch.Tensor, float]:
    """A data-parallel rank's shard of a step's batch, its labels, and its share of the batch's
    loss weight (runner.loss_weight: examples, or a causal LM's gold tokens): the ranks' shard
    losses, each scaled by its share, sum to the whole batch's loss."""
    mine, my_labels = group.shard(examples), group.shard(labels)
    return mine, my_labels, runner.loss_weight(mine, my_labels) / runner.loss_weight(examples, labels)


def adam_stepper(cfg: TrainConfig, session: Session):
    """The backprop baseline's step: AdamW over the trained tensors, dropout on, the gradient
    clipped at cfg.max_grad_norm; the dropout draws seeded from the run's seed and the step."""
    trainable, runner = session.trainable, session.runner
    exempt = no_decay_names(trainable, cfg.decay_all)
    groups = [{"params": [p for n, p in trainable if n not in exempt], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in trainable if n in exempt], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
    params = [p for _, p in trainable]

    def step_fn(step, examples, labels, lr):
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        runner.model.train()  # dropout on, as in standard fine-tuning
        # Dropout draws from torch's global generator: seeded here from the run's seed and step
        # (as MeZO's z), and restored after, its masks depend on nothing else that ran in the
        # process (another run's steps in turn, together.py; a resumed process).
        cuda = [runner.device] if runner.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), runner.precision:  # the backward's matmuls in the run's precision
            torch.manual_seed(direction_seed(cfg.seed, step, 0))
            loss = runner.loss(runner.pack(examples), labels.to(runner.device, non_blocking=True))
            loss.backward()
        if cfg.max_grad_norm > 0:  # HF Trainer's max_grad_norm, which the MeZO/LM-BFF fine-tuning runs keep at 1.0
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        runner.model.eval()
        return loss.detach(), None, None
    return step_fn
