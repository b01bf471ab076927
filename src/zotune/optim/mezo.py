"""The MeZO step (Malladi et al. 2023, Algorithm 1), with n-SPSA.

For each of n directions z_j (regenerated from seed_j, never stored):
    θ + εz_j      -> L+
    θ − εz_j      -> L−            g_j = (L+ − L−) / 2ε
The last restore is fused with the update, θ ← θ + εz_n − lr·(Σ g_j z_j / n + wd·θ),
so one direction costs 3 sweeps over the parameters, not 4 (2 with a second buffer, below).

With a second buffer (FlatParameters.add_plus) a direction's first sweep writes θ + εz there
and θ − εz in place in one pass (sweep.perturb_apart): two sweeps a direction instead of three,
the same bits. The + pass then reads the second buffer (FlatParameters.reading_plus). Paired
(`paired=True`, subsets that leave the embeddings frozen), `loss_fn` returns [L+, L−] from one
forward over the batch twice (PackedBatch.paired), its first half reading θ + εz from that buffer.

A step whose loss is NaN or Inf (any L+ or L−) is skipped: the sweeps still run, but every
update coefficient is zero, so the last sweep only restores θ (issue 7). The choice is made
on the device with torch.where, so a step still never waits for the host. `replay_step`
repeats a logged step's sweeps without the forward passes: perturb/restore is not exactly the
identity in float32, so an exact replay must round exactly as the original step did.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from zotune.optim.flat import FlatParameters
from zotune.optim.sweep import perturb, perturb_apart, restore_and_update, seed_tensor


@dataclass(frozen=True)
class StepResult:
    loss: torch.Tensor               # mean of L+ and L− over the directions (0-dim, on the device)
    projected_grads: torch.Tensor    # [n] g_j, kept on the device: no host sync inside a step
    finite: torch.Tensor             # 0-dim bool: False when the step was skipped (non-finite loss)


def direction_seed(run_seed: int, step: int, direction: int) -> int:
    """A 63-bit seed per (run, step, direction): a pure function, so a resumed or replayed
    run regenerates every z without any saved generator state."""
    state = np.random.SeedSequence([run_seed, step, direction]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))  # 63 bits, so it also fits a signed int64 tensor


def mezo_step(flat: FlatParameters, loss_fn: Callable[[], torch.Tensor], seeds: list[int] | torch.Tensor,
              eps: float, lr: float | torch.Tensor, weight_decay: float,
              measures: Callable[[int], bool] | None = None,
              combine: Callable[[torch.Tensor], torch.Tensor] | None = None, paired: bool = False) -> StepResult:
    """One step over the directions `seeds`. For scale-out (zotune/distributed.py):
    `measures(j)` says whether this process runs direction j's forward passes (its sweeps run
    regardless, so every replica rounds alike), and `combine` turns this process's [2n] losses
    (L+, L− per direction; zero where not measured) into the global ones. With `paired`,
    loss_fn returns [L+, L−] of a direction at once (see above). `seeds` (int64) and `lr`
    (float64) may be device tensors: then nothing in the step reads the host, and a CUDA graph
    that captured it replays with new values (MezoStepper)."""
    seeds = seed_tensor(seeds, flat.buffer.device)  # copied once: the sweep kernels read it there
    zero = None if measures is None else flat.buffer.new_zeros(2 if paired else ())  # what a rank does not measure
    losses = _sweep_directions(flat, seeds, eps, lambda j: loss_fn() if measures is None or measures(j) else zero,
                               paired)
    losses = torch.cat([loss.reshape(-1) for loss in losses])           # [2n]: L+_0, L−_0, L+_1, ...
    if combine is not None:
        losses = combine(losses)
    grads = (losses[0::2] - losses[1::2]) / (2 * eps)                  # [n]
    finite = update(flat, seeds, grads, eps, lr, weight_decay)
    return StepResult(losses.mean(), grads, finite)


def replay_step(flat: FlatParameters, seeds: list[int], grads: torch.Tensor, eps: float, lr: float,
                weight_decay: float) -> None:
    """mezo_step's sweeps with logged g_j ([n] float32) in place of the forward passes."""
    seeds = seed_tensor(seeds, flat.buffer.device)
    _sweep_directions(flat, seeds, eps, lambda j: None)
    update(flat, seeds, grads.to(flat.buffer.device), eps, lr, weight_decay)


def _sweep_directions(flat: FlatParameters, seeds: torch.Tensor, eps: float,
                      measure: Callable[[int], torch.Tensor | None], paired: bool = False) -> list:
    """The perturbation sweeps of a step, in the order that fixes its rounding: per direction
    θ + εz, then θ − εz (two rounded adds, see sweep.py), then back to θ except after the last
    direction, whose restore the update fuses. measure(j) runs at θ ± εz; returns its results
    [L+_0, L−_0, L+_1, ...], or with `paired` one [L+_j, L−_j] per direction, measured at θ − εz
    with θ + εz kept in flat.plus."""
    results = []
    for j, seed in enumerate(seeds):
        if flat.plus is not None:
            perturb_apart(flat, seed, eps)
            if not paired:
                with flat.reading_plus():
                    results.append(measure(j))
        else:
            perturb(flat, seed, eps)
            results.append(measure(j))
            perturb(flat, seed, -eps, times=2)
        results.append(measure(j))
        if j < len(seeds) - 1:
            perturb(flat, seed, eps)  # the update waits for all n directions
    return results


def update(flat: FlatParameters, seeds: list[int] | torch.Tensor, grads: torch.Tensor, eps: float,
           lr: float | torch.Tensor, weight_decay: float) -> torch.Tensor:
    """The last restore fused with the update θ -= lr (Σ g_j z_j / n + wd θ). A non-finite g_j
    makes every coefficient zero, so the step only restores θ; returns that flag (0-dim bool)."""
    finite = torch.isfinite(grads).all()
    safe = torch.where(finite, grads, 0.0)
    n = len(seeds)
    # Each op here is a kernel of its own in a step's CUDA graph; dividing by n = 1 changes no
    # bit, so it is left out.
    restore_and_update(flat, seeds[-1], eps, seeds, safe if n == 1 else safe / n, lr, weight_decay, decays=finite)
    return finite


class MezoStepper:
    """mezo_step over a runner's packed batches (engine/runner.py ModelRunner, engine/candidates.py
    CausalRunner: both give `graphed` and `objective`). Where the runner has
    CUDA graphs, a whole step (its sweeps, forward passes, losses and update) is one graph
    replay, captured at the first step of each batch shape: the host only copies in the seeds,
    learning rate and labels and launches it, so a step the trunk cache has made small is not
    bound by Python and kernel launches. The graph runs the same kernels with the same
    arguments as the eager step over its padded batch (engine/graphs.py). Elsewhere, and for
    scale-out (a rank's step talks to the other ranks), mezo_step runs eagerly."""

    def __init__(self, runner, flat: FlatParameters, eps: float, weight_decay: float, paired: bool = False):
        self.runner, self.flat, self.eps, self.weight_decay, self.paired = runner, flat, eps, weight_decay, paired

    def __call__(self, batch, labels: torch.Tensor, seeds: list[int], lr: float, share: float = 1.0,
                 measures: Callable[[int], bool] | None = None,
                 combine: Callable[[torch.Tensor], torch.Tensor] | None = None) -> StepResult:
        """One step on `batch` (the runner's pack: a PackedBatch, or a causal LM's CandidateBatch)
        with `labels` on the host (or the device);
        `share` scales the loss (a rank's part of a data-parallel batch), `measures` and
        `combine` are mezo_step's."""
        if self.runner.graphs is not None and (share, measures, combine) == (1.0, None, None):
            inputs = {"labels": labels, "seeds": seed_tensor(seeds, "cpu"),
                      "lr": torch.tensor(lr, dtype=torch.float64)}
            passes = len(seeds) * (1 if self.paired else 2)
            return StepResult(*self.runner.graphed(batch, self._step, inputs, passes, self.paired))
        loss = self.runner.pair_loss if self.paired else self.runner.loss
        labels = labels.to(self.runner.device, non_blocking=True)
        return mezo_step(self.flat, lambda: loss(batch, labels) * share, seeds, self.eps, lr, self.weight_decay,
                         measures, combine, self.paired)

    def _step(self, logits: Callable[[], torch.Tensor], inputs: dict[str, torch.Tensor]) -> tuple:
        """The graph's body: a MeZO step reading its seeds, lr and labels from the static inputs;
        logits() is the runner's forward, runner.objective its loss."""
        result = mezo_step(self.flat, lambda: self.runner.objective(logits(), inputs["labels"], self.paired),
                           inputs["seeds"], self.eps, inputs["lr"], self.weight_decay, paired=self.paired)
        return result.loss, result.projected_grads, result.finite
