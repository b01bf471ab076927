"""Where a MeZO step's time goes (or, with --optimizer adam, the backprop baseline's: batch 8),
RoBERTa-large with random weights (or --model DIR, a checkpoint) on real SST-2 batches (k=16:
the whole training set, batch 32; --k 512: an epoch of batches of 64, in turn):
the step's wall time (CUDA events), the host's time to issue it, the GPU kernels by family and
by name (torch.profiler; with --graphs the profiler may not see inside replayed graphs), and
the host functions that take longest (cProfile). Optimisation starts from this measurement.

    python benchmarks/profile_step.py --precision bf16
    python benchmarks/profile_step.py --trainable top:1 --cache --graphs --k 512
    python benchmarks/profile_step.py --trainable lora --layers 20,21,22,23 --pair --cache --graphs
    python benchmarks/profile_step.py --model models/zotune-roberta-small --k 512   # the table's step
    python benchmarks/profile_step.py --model models/zotune-roberta-small --k 512 --optimizer adam   # its Adam step

With --device cpu (a checkpoint only) it prints the step's wall time and the aten operators it
calls (top-level, and with those they call), where a small model's GPU step is bound by the count.
"""

import argparse
import cProfile
import io
import itertools
import pstats
import sys
import time
from collections import Counter, defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from common import median_ms, session, sst2_prompt, sst2_train

from zotune.optim.mezo import MezoStepper, direction_seed
from zotune.train import adam_stepper

FAMILIES = (("sweep (Philox)", ("_perturb_kernel", "_perturb_apart_kernel", "_restore_and_update_kernel")),
            ("few-rows matmul", ("_split_k_kernel",)),
            ("matmul", ("gemm", "sm90", "cutlass", "cublas", "nvjet")),
            ("attention", ("flash", "fmha", "attn")),
            ("layernorm", ("layer_norm",)),
            ("cast", ("copy_", "to_copy", "convert")))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", default="tf32")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--trainable", default="full")
    parser.add_argument("--graphs", action="store_true", help="each step one CUDA graph replay (default: eager)")
    parser.add_argument("--cache", action="store_true", help="turn the trunk cache on")
    parser.add_argument("--k", type=int, choices=(16, 512), default=16)
    parser.add_argument("--layers", type=lambda s: tuple(map(int, s.split(","))), default=None,
                        help="the layers a lora, prefix or bias subset covers, as in zotune train")
    parser.add_argument("--pair", action="store_true", help="each direction's ± passes as one batch")
    parser.add_argument("--model", help="a checkpoint folder instead of the random RoBERTa-large")
    parser.add_argument("--optimizer", choices=("mezo", "adam"), default="mezo",
                        help="adam: the backprop baseline's step (ft-paper: batch 8, dropout on, clipped at 1.0)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: wall time and aten operators per step (with --model)")
    args = parser.parse_args()
    if args.device == "cpu" and (args.model is None or args.graphs):
        parser.error("--device cpu needs --model (a small checkpoint) and no --graphs")
    return args


def main():
    args = parse_args()
    # As zotune train builds it (Session.build): the second buffer where it pays.
    built = session(args.trainable, model=args.model, layers=args.layers, precision=args.precision,
                    cuda_graphs=args.graphs, cache=args.cache, pair=args.pair, optimizer=args.optimizer,
                    max_grad_norm=1.0 if args.optimizer == "adam" else 0.0, device=args.device)
    if args.pair and not built.paired:
        print("profile_step.py: error: --pair needs a subset that leaves the embeddings frozen", file=sys.stderr)
        raise SystemExit(2)
    size = 8 if args.optimizer == "adam" else 32 if args.k == 16 else 64
    batches = sst2_batches(args.k, size)
    step = _stepper(args, built, batches)
    for _ in batches:  # every batch once: fills the cache and captures each shape
        step()
    if args.device == "cpu":
        return _cpu_report(args, step, size)
    tokens = sum(map(len, itertools.chain.from_iterable(examples for examples, _ in batches))) / len(batches)
    _gpu_report(args, step, size, tokens)


def sst2_batches(k: int, size: int) -> list:
    """An epoch of SST-2 k-shot training batches of `size` (examples, labels): one fixed
    permutation cut into batches, each sorted as zotune train sorts its batches."""
    sequences, labels = sst2_train(sst2_prompt(), k)
    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(0)).tolist()
    chunks = [sorted(order[s:s + size]) for s in range(0, len(order), size)]
    return [([sequences[i] for i in chunk], labels[chunk]) for chunk in chunks]


def _gpu_report(args, step, size: int, tokens: float):
    """Wall ms per step, the host's issue time, the kernels by family and name, the host's
    functions by own time."""
    wall_ms = median_ms(step, 20)
    torch.cuda.synchronize()
    issue = time.perf_counter()
    for _ in range(20):
        step()
    issue_ms = (time.perf_counter() - issue) / 20 * 1e3  # the host runs ahead: time to issue a step
    torch.cuda.synchronize()
    host = cProfile.Profile()
    host.enable()
    for _ in range(20):
        step()
    host.disable()
    torch.cuda.synchronize()
    per_name, families, launches = _kernels(args, step)
    print(f"\n{'MeZO' if args.optimizer == 'mezo' else 'Adam'} step, {args.model or 'RoBERTa-large'}, SST-2 k={args.k} batch {size} ({tokens:.0f} tokens), {args.precision}, "
          f"trainable {args.trainable}{f' layers {args.layers}' if args.layers else ''}{', pair' if args.pair else ''}, "
          f"{'CUDA graphs' if args.graphs else 'eager'}, cache "
          f"{'on' if args.cache else 'off'}, on {torch.cuda.get_device_name()}: wall {wall_ms:.2f} ms/step, "
          f"host issue {issue_ms:.2f} ms/step, GPU kernels seen {sum(families.values()):.2f} ms/step "
          f"in {launches:.0f} kernels/step")  # a small model's step may be bound by the count
    print("| family | ms/step |\n|---|---|")
    for family, ms in sorted(families.items(), key=lambda kv: -kv[1]):
        print(f"| {family} | {ms:.3f} |")
    print("| kernel | ms/step | launches/step |\n|---|---|---|")
    for name, (ms, count) in sorted(per_name.items(), key=lambda kv: -kv[1][0])[:20]:
        print(f"| {name[:90]} | {ms:.3f} | {count / args.steps:.0f} |")
    text = io.StringIO()
    pstats.Stats(host, stream=text).sort_stats("tottime").print_stats(15)
    print("host functions over 20 steps (cProfile, by own time):\n" + text.getvalue()[-4000:])


def _kernels(args, step) -> tuple[dict, dict, float]:
    """GPU time per step by kernel name ([ms, launches]) and by family (ms), and launches per
    step, over args.steps steps (torch.profiler)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_name = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        per_name[e.name][0] += e.device_time / args.steps / 1000
        per_name[e.name][1] += 1
    families = defaultdict(float)
    for name, (ms, _) in per_name.items():
        family = next((f for f, keys in FAMILIES if any(k in name.lower() for k in keys)), "other")
        families[family] += ms
    return per_name, families, len(kernels) / args.steps


def _cpu_report(args, step, size: int):
    """Wall ms per step (median of 10) and the aten operators a step calls."""
    times = []
    for _ in range(10):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    ops = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    print(f"\n{'MeZO' if args.optimizer == 'mezo' else 'Adam'} step, {args.model}, SST-2 k={args.k} batch {size}, "
          f"trainable {args.trainable}, on the CPU ({torch.get_num_threads()} threads): wall "
          f"{sorted(times)[len(times) // 2]:.1f} ms/step, {len(top) / args.steps:.0f} top-level aten operators/step "
          f"({len(ops) / args.steps:.0f} with those they call)")
    print("| operator | calls/step |\n|---|---|")
    for name, count in Counter(e.name for e in top).most_common(10):
        print(f"| {name} | {count / args.steps:.0f} |")


def _stepper(args, built, batches: list):
    """A step of the run `built`, on the (examples, labels) batches in turn, as zotune train
    steps: MeZO's inference-mode step on packed batches, or the Adam baseline's step."""
    counter = {"step": 0}
    if args.optimizer == "adam":
        adam_step = adam_stepper(built.cfg, built)

        def step():
            counter["step"] += 1
            adam_step(counter["step"], *batches[counter["step"] % len(batches)], 1e-5)
        return step
    runner = built.runner
    packed = [(runner.pack(examples), labels) for examples, labels in batches]  # labels on the host, as train's
    stepper = MezoStepper(runner, built.flat, 1e-3, 0.0, args.pair)

    def step():
        counter["step"] += 1
        with torch.inference_mode():
            stepper(*packed[counter["step"] % len(packed)], [direction_seed(0, counter["step"], 0)], 1e-6)
    return step


if __name__ == "__main__":
    main()
