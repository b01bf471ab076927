"""Scale-out over torch.distributed: MeZO ranks exchange scalars, never gradients.

Every rank regenerates z from the shared seeds, so ranks stay in step by exchanging a few
numbers per step (one all-reduce of a [2n] loss vector):
  data parallel   each rank evaluates the ± losses on its share of the global batch, scaled
                  by its share; the sum over ranks is the global batch's mean loss.
  multi-direction each rank measures its own directions on the whole batch and reports zeros
                  for the others', so the sum holds every direction's losses: N ranks give
                  N-direction SPSA at the cost of one forward pair each. Every rank still runs
                  every direction's sweeps (cheap, memory-bound), so the replicas stay
                  bit-identical.
Launched by torchrun (NCCL on GPUs, gloo on CPU). A rank that dies makes the others' next
collective fail (at the latest after --dist-timeout) and they exit with a one-line error
instead of hanging.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from zotune.errors import UserError


@dataclass(frozen=True)
class Group:
    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's share of a list: every world-th item, starting at its rank."""
        return items[self.rank::self.world]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        _collective(dist.all_reduce, t)
        return t

    def barrier(self) -> None:
        _collective(dist.barrier)

    def check_in_sync(self, buffer: torch.Tensor, step: int) -> None:
        """Compare a checksum of the trainable weights across ranks; stop on a mismatch."""
        # float64 sums of float32 values, so a changed weight shows; in chunks, so the check
        # never holds a float64 copy of the whole buffer (2.8 GB for RoBERTa-large).
        checksum = torch.zeros(2, dtype=torch.float64, device=buffer.device)
        for chunk in buffer.split(1 << 24):
            values = chunk.double()
            checksum += torch.stack([values.sum(), values.square().sum()])
        total = self.all_reduce_sum(checksum)
        if not torch.equal(total, checksum * self.world):
            raise UserError(f"ranks diverged by step {step}: rank {self.rank}'s weight checksum "
                            f"{checksum[0].item():.17g} is not the mean {total[0].item() / self.world:.17g}; "
                            "check that every rank runs the same code, data and config")


def _collective(op, *args) -> None:
    try:
        op(*args)
    except (RuntimeError, dist.DistBackendError) as exc:  # a peer died or timed out
        raise UserError(f"a collective with the other ranks failed ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120]}); another rank probably died, see its log") from None


def rank_device(device: torch.device, env: Mapping[str, str] = os.environ) -> torch.device:
    """The device this process computes on: under torchrun (WORLD_SIZE > 1) on CUDA, its own
    GPU, cuda:LOCAL_RANK; otherwise `device`. Chosen before anything is placed on a device."""
    if device.type == "cuda" and int(env.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(env.get("LOCAL_RANK", "0")))
    return device


def init_from_env(device: torch.device, timeout_s: float) -> Group | None:
    """Join the process group torchrun describes in the environment; None when not launched so.
    `device` is rank_device's: on CUDA it becomes this process's current device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return Group(dist.get_rank(), dist.get_world_size())
