"""How far the GPU precisions' MeZO projected gradients are from float32 (issue 19).

For each k (SST-2 seed-42 batches: k=16's whole training set of 32, k=512's first batch of 64,
as `zotune train` draws them) and each subset, every precision starts from the same weights
and measures the same N directions on the same batch: one `mezo_step` over the N direction
seeds with lr 0 (optim/mezo.py), the session built as `zotune train` builds it
(Session.build: trunk cache, ± pairs, second buffer), eagerly (no CUDA graphs: a graph
replays the same kernels). The sweeps are bit-identical in every mode and on both devices
(optim/sweep.py), so direction j sees the very same θ ± εz everywhere: the differences come
from the forward passes alone.

Per precision, against float32 on the same device: the relative error of each projected
gradient g_j = (L+ − L−) / 2ε (median and max over the directions, and the norm of the
difference over the norm of the float32 vector), the share of directions whose g_j has the
same sign (the sign decides the update's direction), and the largest relative error of the
2N losses. The float32 row measures float32 again: all zeros unless a kernel is not
deterministic. On CUDA, the "float32, cpu" row compares the CPU's float32 (its own summation
order, per-sequence attention) with the GPU's on the first --cpu-directions directions.
There is no float64 reference: FlatParameters holds float32 only.

    python benchmarks/precision_gap.py                      # on the GPU, ~1 min on an H100
    python benchmarks/precision_gap.py --device cpu --directions 4 --k 16   # float32 only
"""

import argparse
import statistics

import torch

from common import REPO

from zotune.config import TrainConfig
from zotune.evaluate import encode
from zotune.optim.mezo import direction_seed, mezo_step
from zotune.session import Session
from zotune.tasks.data import default_data_dir, load_split
from zotune.train import batch_indices

BATCH_SIZE = {16: 32, 512: 64}  # the MeZO paper's (k=16: the whole training set)
COLUMNS = ("k", "subset", "precision", "directions", "g rel err median", "g rel err max", "g rel err norm",
           "sign agreement", "loss rel err max")


def measure_directions(cfg: TrainConfig, directions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(g [n], losses [2n]: L+_0, L−_0, ...) as float64 on the host, for the first `directions`
    direction seeds of step 0, at the weights the session starts from."""
    session = Session.build(cfg)
    examples = load_split(session.task, default_data_dir(), cfg.k, cfg.seed, "train")
    index = batch_indices(len(examples), cfg.batch_size, cfg.seed, 0)
    batch = session.runner.pack(encode(session.prompt, [examples[i] for i in index]))
    labels = torch.tensor([examples[i].label for i in index], device=session.device)
    loss = session.runner.pair_loss if session.paired else session.runner.loss
    recorded = []

    def loss_fn():
        recorded.append(loss(batch, labels))
        return recorded[-1]

    seeds = [direction_seed(cfg.seed, 0, j) for j in range(directions)]
    with torch.inference_mode():
        result = mezo_step(session.flat, loss_fn, seeds, cfg.eps, 0.0, 0.0, paired=session.paired)
    losses = torch.cat([value.reshape(-1) for value in recorded])
    return result.projected_grads.double().cpu(), losses.double().cpu()


def compare(grads: torch.Tensor, losses: torch.Tensor, ref_grads: torch.Tensor, ref_losses: torch.Tensor) -> dict:
    """The table's error columns for (grads, losses) against the reference's first as many."""
    n = len(grads)
    ref_grads, ref_losses = ref_grads[:n], ref_losses[:2 * n]
    relative = ((grads - ref_grads).abs() / ref_grads.abs().clamp_min(1e-30)).tolist()
    return {"directions": n, "g rel err median": statistics.median(relative), "g rel err max": max(relative),
            "g rel err norm": ((grads - ref_grads).norm() / ref_grads.norm().clamp_min(1e-30)).item(),
            "sign agreement": (torch.sign(grads) == torch.sign(ref_grads)).double().mean().item(),
            "loss rel err max": ((losses - ref_losses).abs() / ref_losses.abs().clamp_min(1e-30)).max().item()}


def measure(model: str, device: str, precisions: list[str], subsets: list[str], ks: list[int], directions: int,
            cpu_directions: int = 0, eps: float = 1e-3) -> list[dict]:
    """One row per (k, subset, precision), float32 first: a second build and measurement
    against the reference's, so its errors are 0 exactly when the forward passes are
    deterministic. Then, on CUDA, a "float32, cpu" row when cpu_directions > 0."""
    rows = []
    for k in ks:
        for subset in subsets:
            def config(device, precision):
                return TrainConfig(model=model, task="sst2", k=k, seed=42, trainable=subset, device=device,
                                   precision=precision, batch_size=BATCH_SIZE[k], eps=eps, cuda_graphs=False,
                                   quiet=True)
            reference = measure_directions(config(device, "float32"), directions)
            for precision in ["float32", *(p for p in precisions if p != "float32")]:
                measured = measure_directions(config(device, precision), directions)
                rows.append({"k": k, "subset": subset, "precision": precision, **compare(*measured, *reference)})
            if device != "cpu" and cpu_directions > 0:
                on_cpu = measure_directions(config("cpu", "float32"), min(cpu_directions, directions))
                rows.append({"k": k, "subset": subset, "precision": "float32, cpu", **compare(*on_cpu, *reference)})
    return rows


def table(rows: list[dict], device_name: str) -> str:
    lines = [f"MeZO projected gradients against float32 on {device_name} (SST-2 seed 42, step 0's directions, "
             f"eps 1e-3)", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [f"{row[c]:.1%}" if c == "sign agreement" else f"{row[c]:.2e}" if isinstance(row[c], float)
                 else str(row[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(REPO / "models/zotune-roberta-small"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--directions", type=int, default=64, help="direction seeds per row")
    parser.add_argument("--cpu-directions", type=int, default=8, help="of those, measured on the CPU too (CUDA)")
    parser.add_argument("--k", type=int, nargs="+", choices=sorted(BATCH_SIZE), default=[16, 512])
    parser.add_argument("--subsets", nargs="+", default=["full", "lora", "top:1"])
    args = parser.parse_args()
    cuda = args.device == "cuda"
    precisions = ["float32", "tf32", "bf16"] if cuda else ["float32"]  # the CPU computes in float32 only
    rows = measure(args.model, args.device, precisions, args.subsets, args.k, args.directions,
                   args.cpu_directions if cuda else 0)
    print(table(rows, torch.cuda.get_device_name() if cuda else "the CPU"))


if __name__ == "__main__":
    main()
