"""Scale-out over torch.distributed: MeZO ranks exchange scalars, never gradients.

Every rank regenerates z from the shared seeds, so ranks stay in step by exchanging a few
numbers per step:
  data parallel   each rank evaluates the ± losses on its share of the global batch; one
                  all-reduce of the loss sums gives every rank the global projected gradient.
  multi-direction each rank perturbs along its own seeds; an all-gather of (seed, projected
                  gradient) pairs lets every rank apply every update: N ranks give N-direction
                  SPSA at the cost of one.
Launched by torchrun (NCCL on GPUs, gloo on CPU). A rank that dies makes the others' next
collective fail after `timeout`, and they exit with a one-line error instead of hanging.
"""

import os
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

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[world, *t.shape], in rank order."""
        out = [torch.empty_like(t) for _ in range(self.world)]
        _collective(dist.all_gather, out, t)
        return torch.stack(out)

    def check_in_sync(self, buffer: torch.Tensor, step: int) -> None:
        """Compare a checksum of the trainable weights across ranks; stop on a mismatch."""
        values = buffer.double()  # float64 sums of float32 values: any changed weight shows
        checksum = torch.stack([values.sum(), values.square().sum()])
        sums = self.all_gather(checksum)
        if not torch.equal(sums, checksum.expand_as(sums)):
            raise UserError(f"ranks diverged at step {step}: weight checksums {sums[:, 0].tolist()} differ; "
                            "check that every rank runs the same code, data and config")


def _collective(op, *args) -> None:
    try:
        op(*args)
    except (RuntimeError, dist.DistBackendError) as exc:  # a peer died or timed out
        raise UserError(f"a collective with the other ranks failed ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120]}); another rank probably died, see its log") from None


def init_from_env(device: torch.device, timeout_s: float) -> Group | None:
    """Join the process group torchrun describes in the environment; None when not launched so."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return Group(dist.get_rank(), dist.get_world_size())
