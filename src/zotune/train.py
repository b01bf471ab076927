"""The training loop: MeZO (forward only) or Adam (backprop baseline), dev-based model
selection, test accuracy with the best-dev weights, and a run directory holding
config.json, metrics.jsonl, best.safetensors and summary.json.

Every figure in summary.json is measured: counters live in the runner, times come from
a clock around the work, memory from the CUDA allocator or the OS.
"""

import json
import os
import resource
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from zotune import trajectory
from zotune.config import TrainConfig
from zotune.distributed import init_from_env
from zotune.errors import UserError
from zotune.evaluate import accuracy, build, encode, predict
from zotune.optim.flat import FlatParameters
from zotune.optim.mezo import MezoStepper, direction_seed
from zotune.optim.schedule import SCHEDULES
from zotune.optim.subsets import SubsetOptions, attach_pair_weights, no_weight_decay, select_trainable
from zotune.tasks.data import default_data_dir, load_split


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


@lru_cache(maxsize=1)
def _epoch_order(n_examples: int, run_seed: int, epoch: int) -> tuple[int, ...]:
    # Kept for the epoch's steps: a new generator and permutation at every step cost 9-17 us of
    # host time on the CI CPU (k=16, k=512), against ~1 us; a cached step's GPU work is ~500 us.
    return tuple(np.random.default_rng([run_seed, epoch]).permutation(n_examples).tolist())


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _prepare_run_dir(cfg: TrainConfig) -> Path:
    run_dir = Path(cfg.output_dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.overwrite:
        raise UserError(f"output directory {run_dir} already holds a run; pass --overwrite, another --output-dir, "
                        f"or --resume {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", "summary.json", "best.safetensors", "final.safetensors",
                  trajectory.LOG_NAME, trajectory.SNAPSHOT_NAME):
        (run_dir / stale).unlink(missing_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return run_dir


def _save_atomic(tensors: dict, path: Path):
    save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """A fresh run into cfg.output_dir, or (resume=True) the continuation of the MeZO run
    there: its weights are rebuilt from the snapshot and the trajectory log, and the loop goes
    on from the last logged step, so the run ends bit-identical to an uninterrupted one."""
    started = time.perf_counter()
    if resume and cfg.optimizer != "mezo":
        raise UserError("--resume continues MeZO runs only (an Adam run keeps no trajectory log); start it again")
    prompted = build(cfg.model, cfg.task, tokenizer=cfg.tokenizer, template=cfg.template,
                     label_words=cfg.label_words, max_length=cfg.max_length, device=cfg.device,
                     precision=cfg.precision, cuda_graphs=cfg.cuda_graphs)
    runner, device = prompted.runner, prompted.runner.device
    group = init_from_env(device, cfg.dist_timeout)  # None unless launched by torchrun
    is_main = group is None or group.is_main        # rank 0 alone writes the run directory
    if group is not None and cfg.optimizer != "mezo":
        raise UserError("torchrun scale-out runs MeZO only; run --optimizer adam as a single process")
    if group is not None and cfg.directions_per_rank is None and cfg.batch_size < group.world:
        raise UserError(f"--batch-size {cfg.batch_size} is smaller than the {group.world} ranks sharing it")
    data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    splits = {s: load_split(prompted.task, data_dir, cfg.k, cfg.seed, s) for s in ("train", "dev", "test")}
    sequences = {s: encode(prompted.prompt, examples) for s, examples in splits.items()}
    train_labels = torch.tensor([e.label for e in splits["train"]])

    @lru_cache(maxsize=1)  # k=16 trains on one batch: its labels are indexed once, not at every step
    def batch_labels(index: tuple[int, ...]) -> torch.Tensor:
        # On the host: a step's CUDA graph copies them into its buffer as it does its seeds and
        # learning rate (engine/graphs.py, no stream sync); an eager step copies them itself.
        return train_labels[list(index)]
    if resume:
        run_dir = Path(cfg.output_dir)
        logged_header, records = trajectory.read_log(run_dir)  # fails before anything is written
    else:
        run_dir = _prepare_run_dir(cfg) if is_main else Path(cfg.output_dir)

    trainable = select_trainable(runner.model, cfg.trainable, SubsetOptions(
        cfg.lora_rank, cfg.lora_alpha, cfg.num_prefix, cfg.layers, cfg.seed))
    runner.model.to(device)  # subsets may have added LoRA or prefix tensors
    if cfg.cache:
        runner.enable_cache([name for name, _ in trainable], cfg.cache_budget_bytes, cfg.cache_spill)
    decay_exempt = (lambda name, p: False) if cfg.decay_all else (lambda name, p: no_weight_decay(name))
    log = None
    if cfg.optimizer == "mezo":
        flat = FlatParameters(trainable, decay_exempt)
        paired = cfg.pair and second_buffer_fits(flat, runner.model) and attach_pair_weights(runner.model, flat)
        add_second_buffer(flat, runner.model, graphed_ranks=group is not None and runner.graphs is not None)
        if paired:
            runner.enable_pairs([name for name, _ in trainable])
        step_fn = _mezo_stepper(cfg, runner, flat, group, paired)
        header = trajectory.make_header(cfg.to_dict(), trajectory.model_sha256(cfg.model), flat)
        if resume:
            trajectory.check_header(logged_header, header, run_dir)
            records = records[:cfg.steps]
            with torch.inference_mode():
                trajectory.restore(flat, run_dir, records, cfg.eps, cfg.weight_decay)
            if is_main:
                trajectory.rewrite_log(run_dir, logged_header, records)  # drops a torn last line
            log = trajectory.TrajectoryWriter(run_dir / trajectory.LOG_NAME if is_main else None)
            for record in records:
                log.count(record)
        else:
            log = trajectory.TrajectoryWriter(run_dir / trajectory.LOG_NAME if is_main else None, header)
    else:
        step_fn = _adam_stepper(cfg, runner, trainable, decay_exempt)

    best = {"dev_accuracy": -1.0, "step": None}
    first_step, kept = 0, []
    if resume:
        first_step = len(records)
        if first_step == cfg.steps and (run_dir / "summary.json").is_file():
            log.file.close()
            return json.loads((run_dir / "summary.json").read_text())  # a finished run: nothing to do
        kept = _kept_metrics(run_dir, first_step, best)

    def evaluate(split: str) -> float:
        """Accuracy on a split; with several ranks each scores its shard and they add up counts."""
        if group is None:
            return accuracy(predict(runner, sequences[split], cfg.eval_batch_size), splits[split])
        examples, mine = group.shard(splits[split]), group.shard(sequences[split])
        correct = accuracy(predict(runner, mine, cfg.eval_batch_size), examples) * len(examples) if mine else 0.0
        counts = group.all_reduce_sum(torch.tensor([round(correct), len(examples)], dtype=torch.float64))
        return counts[0].item() / counts[1].item()

    def synchronize():  # before reading the clock: the GPU runs behind the host
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    eval_seconds = 0.0  # dev evaluations inside the training loop, kept out of train_time_s

    def evaluate_dev(step: int) -> float:
        nonlocal eval_seconds
        synchronize()
        eval_started = time.perf_counter()
        dev_acc = evaluate("dev")
        eval_seconds += time.perf_counter() - eval_started
        if dev_acc > best["dev_accuracy"]:  # strictly better, as MeZO's trainer keeps the earliest best
            best.update(dev_accuracy=dev_acc, step=step)
            if is_main:
                _save_atomic(dict(trainable), run_dir / "best.safetensors")
        return dev_acc

    # Metrics average over the steps since the last logged line (_window_means). A resumed run
    # rebuilds that window from the log's float32 values, so it adds the same numbers in order.
    logged_from = kept[-1]["step"] if kept else 0
    window = [(trajectory.from_hex([record["loss"]])[0].to(device), trajectory.from_hex(record["grads"]).to(device))
              for record in (records[logged_from:first_step] if resume else [])]

    progress = tqdm(total=cfg.steps, initial=first_step, disable=cfg.quiet or not is_main, desc=f"{cfg.optimizer} {cfg.task}",
                    unit="step")
    metrics = open(run_dir / "metrics.jsonl" if is_main else os.devnull, "w")
    metrics.write("".join(json.dumps(r) + "\n" for r in kept))  # no gap, no duplicate after a resume
    board = None
    if cfg.tensorboard and is_main:  # the same records as metrics.jsonl, for TensorBoard (RUN/tensorboard)
        from torch.utils.tensorboard import SummaryWriter
        board = SummaryWriter(str(run_dir / "tensorboard"), purge_step=first_step + 1 if resume else None)

    def log_point(done: int, lr: float):
        """Write the metrics line of step `done` (and evaluate on dev at eval steps)."""
        nonlocal window, logged_from
        if log is not None:
            log.write()  # the log leads: best.safetensors and metrics never get ahead of it
        loss, projected_grad = _window_means(window)
        record = {"step": done, "loss": loss, "projected_grad": projected_grad, "lr": lr}
        window, logged_from = [], done
        if done % cfg.eval_steps == 0 or done == cfg.steps:
            record["dev_accuracy"] = evaluate_dev(done)
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        if board is not None:
            for name, value in record.items():
                if name != "step" and value is not None:
                    board.add_scalar(name, value, done)
        postfix = {"loss": f"{record['loss']:.4f}", "dev": f"{best['dev_accuracy']:.3f}"}
        if runner.cache is not None:
            postfix["cache_hits"] = f"{runner.cache.stats.report()['hit_rate']:.1%}"
        progress.set_postfix(postfix)
        if log is not None and log.bad_streak >= cfg.max_bad_steps:
            raise UserError(f"{log.bad_streak} bad steps in a row (NaN or Inf loss) up to step {done}; "
                            f"progress is kept in {run_dir} (best.safetensors, trajectory.jsonl); "
                            f"lower --lr or --eps, or raise --max-bad-steps")

    def is_log_point(done: int) -> bool:
        return done % cfg.log_steps == 0 or done % cfg.eval_steps == 0 or done == cfg.steps

    try:
        if first_step > logged_from and is_log_point(first_step):  # killed between the log and its metrics line
            log_point(first_step, records[first_step - 1]["lr"])
        synchronize()
        loop_started, eval_seconds = time.perf_counter(), 0.0
        for step in range(first_step, cfg.steps):
            index = batch_indices(len(sequences["train"]), cfg.batch_size, cfg.seed, step)
            batch = [sequences["train"][i] for i in index]
            lr = SCHEDULES[cfg.schedule](step, cfg.lr, cfg.steps)
            labels = batch_labels(tuple(index))
            loss, grad, logged = step_fn(step, batch, labels, lr)
            done = step + 1
            if log is not None:
                seeds, projected_grads = logged
                log.add(done, seeds, lr, projected_grads, loss)
            window.append((loss, grad))  # on the device until logged
            if is_log_point(done):
                log_point(done, lr)
            if is_main and log is not None and done % cfg.log_every == 0:
                log.sync()
                os.fsync(metrics.fileno())
            if group is not None and done % cfg.sync_check == 0:
                group.check_in_sync(flat.buffer, done)
            if is_main and log is not None and done % cfg.snapshot_every == 0 and done < cfg.steps:
                log.write()  # a snapshot never gets ahead of the log
                trajectory.write_snapshot(run_dir, flat, done)
            progress.update(1)
        synchronize()
        # The loop's wall time with the GPU's work in it, less the dev evaluations: the steps,
        # their logging and snapshots.
        train_time = time.perf_counter() - loop_started - eval_seconds
    finally:  # every exit path, Ctrl-C and errors included: what was computed reaches the disk
        metrics.close()
        if board is not None:
            board.close()
        if log is not None:
            log.close()
        progress.close()
    if log is not None and is_main:
        _save_atomic(flat.state_dict(), run_dir / "final.safetensors")  # what `zotune replay` rebuilds
    if group is not None:
        group.barrier()  # rank 0's best.safetensors is complete before any rank reads it

    if best["step"] is not None:  # test with the best-dev weights
        state = load_file(run_dir / "best.safetensors")
        with torch.no_grad():
            for name, param in trainable:
                param.copy_(state[name])
    dev_acc, test_acc = evaluate("dev"), evaluate("test")
    stats = runner.stats
    run_steps = cfg.steps - first_step
    summary = {
        "task": cfg.task, "k": cfg.k, "seed": cfg.seed, "optimizer": cfg.optimizer, "trainable": cfg.trainable,
        "trainable_parameters": sum(p.numel() for _, p in trainable),
        "steps": cfg.steps, "best_step": best["step"], "resumed_from_step": first_step if resume else None,
        "bad_steps": log.bad_total if log is not None else 0,
        "forward_passes": stats.forward_passes, "tokens_computed": stats.tokens_computed,
        "padding_tokens_avoided": stats.padding_tokens_avoided, "graph_filler_tokens": stats.graph_filler_tokens,
        "wall_time_s": time.perf_counter() - started, "train_time_s": train_time,
        "steps_per_s": run_steps / train_time if train_time > 0 else 0.0,
        "peak_memory_bytes": peak_memory_bytes(device), "device": _device_name(device),
        "dev_accuracy": dev_acc, "test_accuracy": test_acc,
        "cache": runner.cache_stats(),
    }
    if cfg.optimizer == "mezo":
        summary["sweeps_per_direction"] = 2 if flat.plus is not None else 3  # see add_second_buffer
    if group is not None:
        summary["ranks"] = group.world
    if is_main:
        (run_dir / "summary.json.tmp").write_text(json.dumps(summary, indent=2) + "\n")
        (run_dir / "summary.json.tmp").replace(run_dir / "summary.json")
    return summary


def _window_means(window: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[float, float | None]:
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


def _kept_metrics(run_dir: Path, last_step: int, best: dict) -> list[dict]:
    """metrics.jsonl lines up to the resumed step (a torn last line dropped), and the best dev
    evaluation among them, so best-dev selection goes on as if the run had never stopped."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.is_file() else []
    kept = [r for r in map(json.loads, lines) if r["step"] <= last_step]
    for r in kept:
        if r.get("dev_accuracy") is not None and r["dev_accuracy"] > best["dev_accuracy"]:
            best.update(dev_accuracy=r["dev_accuracy"], step=r["step"])
    return kept


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# A second buffer of the trainable tensors is kept while it is at most this share of the model.
SECOND_BUFFER_SHARE = 0.25


def second_buffer_fits(flat: FlatParameters, model: torch.nn.Module) -> bool:
    """Whether a second buffer of the trainable tensors is small next to the model: not for
    `full` or the like, since MeZO trains in inference memory."""
    return flat.numel <= SECOND_BUFFER_SHARE * sum(p.numel() for p in model.parameters())


def add_second_buffer(flat: FlatParameters, model: torch.nn.Module, graphed_ranks: bool = False) -> bool:
    """Give MeZO a second buffer for theta + eps z (FlatParameters.add_plus) where it pays, and
    say whether `flat` has one: two sweeps a direction instead of three, the same weights bit
    for bit, for a copy of the trainable tensors. A pair has one already. Otherwise it is added
    where it fits (second_buffer_fits), and not for data-parallel ranks on CUDA graphs
    (`graphed_ranks`), whose forwards are graphs of their own that the + pass's weight
    addresses would recapture."""
    if flat.plus is None and not graphed_ranks and second_buffer_fits(flat, model):
        flat.add_plus()
    return flat.plus is not None


def _mezo_stepper(cfg, runner, flat, group, paired: bool):
    """Single process: n-SPSA over cfg.n_spsa directions. Data parallel (torchrun): each rank
    takes its shard of the batch and the losses are summed. Multi-direction
    (--directions-per-rank d): rank r measures directions r*d .. r*d+d-1 on the whole batch.
    `paired`: each direction's ± passes are one forward (runner.pair_loss)."""
    n = cfg.n_spsa if group is None or cfg.directions_per_rank is None else group.world * cfg.directions_per_rank
    measures = combine = None
    if group is not None:
        combine = group.all_reduce_sum
        if cfg.directions_per_rank is not None:
            measures = lambda j: j // cfg.directions_per_rank == group.rank  # noqa: E731
    stepper = MezoStepper(runner, flat, cfg.eps, cfg.weight_decay, paired)

    @torch.inference_mode()
    def step_fn(step, sequences, labels, lr):
        seeds = [direction_seed(cfg.seed, step, j) for j in range(n)]
        share = 1.0
        if group is not None and cfg.directions_per_rank is None:  # data parallel: my shard
            share = len(group.shard(sequences)) / len(sequences)
            sequences, labels = group.shard(sequences), labels[group.rank::group.world]
        result = stepper(runner.pack(sequences), labels, seeds, lr, share, measures, combine)
        return result.loss, result.projected_grads, (seeds, result.projected_grads)  # the last for the log
    return step_fn


def _adam_stepper(cfg, runner, trainable, decay_exempt):
    groups = [
        {"params": [p for n, p in trainable if not decay_exempt(n, p)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in trainable if decay_exempt(n, p)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
    model = runner.model

    def step_fn(step, sequences, labels, lr):
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        model.train()  # dropout on, as in standard fine-tuning
        loss = runner.loss(runner.pack(sequences), labels.to(runner.device, non_blocking=True))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        return loss.detach(), None, None
    return step_fn
