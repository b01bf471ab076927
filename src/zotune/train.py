"""The training loop: MeZO (forward only) or Adam (backprop baseline), dev-based model
selection, test accuracy with the best-dev weights, and a run directory holding
config.json, metrics.jsonl, best.safetensors and summary.json.

Every figure in summary.json is measured: counters live in the runner, times come from
a clock around the work, memory from the CUDA allocator or the OS.
"""

import json
import resource
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from zotune.config import TrainConfig
from zotune.errors import UserError
from zotune.evaluate import accuracy, build, encode, predict
from zotune.optim.flat import FlatParameters
from zotune.optim.mezo import direction_seed, mezo_step
from zotune.optim.schedule import SCHEDULES
from zotune.optim.subsets import SubsetOptions, no_weight_decay, select_trainable
from zotune.tasks.data import default_data_dir, load_split


def batch_indices(n_examples: int, batch_size: int, run_seed: int, step: int) -> list[int]:
    """Examples of a step: each epoch is a fresh permutation cut into batches (the last one
    may be short, as in the HF Trainer MeZO builds on). A pure function of the step, so a
    resumed run sees the same data. Each batch is sorted: the loss is a mean, so order does
    not matter, and a batch of the same examples is then the same packed input, step after
    step (k=16 trains on one batch), which keeps cached and recomputed results bit-identical."""
    per_epoch = -(-n_examples // batch_size)
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([run_seed, epoch]).permutation(n_examples)
    return sorted(order[position * batch_size:(position + 1) * batch_size].tolist())


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _prepare_run_dir(cfg: TrainConfig) -> Path:
    run_dir = Path(cfg.output_dir)
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.overwrite:
        raise UserError(f"output directory {run_dir} already holds a run; pass --overwrite or another --output-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", "summary.json", "best.safetensors"):
        (run_dir / stale).unlink(missing_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return run_dir


def train(cfg: TrainConfig) -> dict:
    started = time.perf_counter()
    prompted = build(cfg.model, cfg.task, tokenizer=cfg.tokenizer, template=cfg.template,
                     label_words=cfg.label_words, max_length=cfg.max_length, device=cfg.device,
                     precision=cfg.precision, cuda_graphs=cfg.cuda_graphs)
    runner, device = prompted.runner, prompted.runner.device
    data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    splits = {s: load_split(prompted.task, data_dir, cfg.k, cfg.seed, s) for s in ("train", "dev", "test")}
    sequences = {s: encode(prompted.prompt, examples) for s, examples in splits.items()}
    train_labels = torch.tensor([e.label for e in splits["train"]], device=device)
    run_dir = _prepare_run_dir(cfg)

    trainable = select_trainable(runner.model, cfg.trainable, SubsetOptions(
        cfg.lora_rank, cfg.lora_alpha, cfg.num_prefix, cfg.layers, cfg.seed))
    runner.model.to(device)  # subsets may have added LoRA or prefix tensors
    if cfg.cache:
        runner.enable_cache([name for name, _ in trainable], cfg.cache_budget_bytes, cfg.cache_spill)
    decay_exempt = (lambda name, p: False) if cfg.decay_all else (lambda name, p: no_weight_decay(name))
    if cfg.optimizer == "mezo":
        flat = FlatParameters(trainable, decay_exempt)
        step_fn = _mezo_stepper(cfg, runner, flat)
    else:
        step_fn = _adam_stepper(cfg, runner, trainable, decay_exempt)

    best = {"dev_accuracy": -1.0, "step": None}

    def evaluate_dev(step: int) -> float:
        dev_acc = accuracy(predict(runner, sequences["dev"], cfg.eval_batch_size), splits["dev"])
        if dev_acc > best["dev_accuracy"]:  # strictly better, as MeZO's trainer keeps the earliest best
            best.update(dev_accuracy=dev_acc, step=step)
            save_file({n: p.detach().cpu().contiguous() for n, p in trainable}, run_dir / "best.safetensors.tmp")
            (run_dir / "best.safetensors.tmp").replace(run_dir / "best.safetensors")
        return dev_acc

    train_time = 0.0
    loss_sum, grad_sum, logged_from = None, None, 0
    progress = tqdm(total=cfg.steps, disable=cfg.quiet, desc=f"{cfg.optimizer} {cfg.task}", unit="step")
    with open(run_dir / "metrics.jsonl", "w") as metrics:
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            index = batch_indices(len(sequences["train"]), cfg.batch_size, cfg.seed, step)
            batch = runner.pack([sequences["train"][i] for i in index])
            lr = SCHEDULES[cfg.schedule](step, cfg.lr, cfg.steps)
            loss, grad = step_fn(step, batch, train_labels[index], lr)
            loss_sum = loss if loss_sum is None else loss_sum + loss   # stays on the device until logged
            if grad is not None:
                grad_sum = grad if grad_sum is None else grad_sum + grad
            train_time += time.perf_counter() - t0
            done = step + 1
            is_eval = done % cfg.eval_steps == 0 or done == cfg.steps
            if done % cfg.log_steps == 0 or is_eval:
                record = {"step": done, "loss": loss_sum.item() / (done - logged_from),
                          "projected_grad": grad_sum.item() / (done - logged_from) if grad_sum is not None else None,
                          "lr": lr}
                loss_sum, grad_sum, logged_from = None, None, done
                if is_eval:
                    record["dev_accuracy"] = evaluate_dev(done)
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                postfix = {"loss": f"{record['loss']:.4f}", "dev": f"{best['dev_accuracy']:.3f}"}
                if runner.cache is not None:
                    postfix["cache_hits"] = f"{runner.cache.stats.report()['hit_rate']:.1%}"
                progress.set_postfix(postfix)
            progress.update(1)
    progress.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)

    if best["step"] is not None:  # test with the best-dev weights
        state = load_file(run_dir / "best.safetensors")
        with torch.no_grad():
            for name, param in trainable:
                param.copy_(state[name])
    dev_acc = accuracy(predict(runner, sequences["dev"], cfg.eval_batch_size), splits["dev"])
    test_acc = accuracy(predict(runner, sequences["test"], cfg.eval_batch_size), splits["test"])
    stats = runner.stats
    summary = {
        "task": cfg.task, "k": cfg.k, "seed": cfg.seed, "optimizer": cfg.optimizer, "trainable": cfg.trainable,
        "trainable_parameters": sum(p.numel() for _, p in trainable),
        "steps": cfg.steps, "best_step": best["step"],
        "forward_passes": stats.forward_passes, "tokens_computed": stats.tokens_computed,
        "padding_tokens_avoided": stats.padding_tokens_avoided, "graph_filler_tokens": stats.graph_filler_tokens,
        "wall_time_s": time.perf_counter() - started, "train_time_s": train_time,
        "steps_per_s": cfg.steps / train_time if train_time > 0 else 0.0,
        "peak_memory_bytes": peak_memory_bytes(device), "device": _device_name(device),
        "dev_accuracy": dev_acc, "test_accuracy": test_acc,
        "cache": runner.cache_stats(),
    }
    (run_dir / "summary.json.tmp").write_text(json.dumps(summary, indent=2) + "\n")
    (run_dir / "summary.json.tmp").replace(run_dir / "summary.json")
    return summary


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _mezo_stepper(cfg, runner, flat):
    @torch.inference_mode()
    def step_fn(step, batch, labels, lr):
        seeds = [direction_seed(cfg.seed, step, j) for j in range(cfg.n_spsa)]
        result = mezo_step(flat, lambda: runner.loss(batch, labels), seeds, cfg.eps, lr, cfg.weight_decay)
        return result.loss, result.projected_grads.mean()
    return step_fn


def _adam_stepper(cfg, runner, trainable, decay_exempt):
    groups = [
        {"params": [p for n, p in trainable if not decay_exempt(n, p)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in trainable if decay_exempt(n, p)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
    model = runner.model

    def step_fn(step, batch, labels, lr):
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()  # dropout on, as in standard fine-tuning
        loss = runner.loss(batch, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        return loss.detach(), None
    return step_fn
