"""The Triton sweeps against the torch reference, bit for bit.

On a CUDA machine the kernels run on the GPU and are compared with the torch path on the CPU,
which also shows that z is the same on both devices. Without CUDA the same comparison runs the
kernels in Triton's interpreter (numpy float32 on the CPU) in a subprocess, because
TRITON_INTERPRET must be set before the kernels are defined.
"""

import pytest
import torch

from zotune.optim import rng, sweep
from zotune.optim.flat import FlatParameters
from zotune.optim.mezo import update
from tests.conftest import TRITON_DEVICES, run_triton_check

EPS = 1e-3
# (buffer size, decayed prefix): not multiples of the kernel's BLOCK, prefix inside a block.
SIZES = [(3001, 1500), (2 * sweep.BLOCK, 0), (sweep.BLOCK + 5, sweep.BLOCK + 5)]
# (restore seed, update seeds): the one-direction reuse of z, n-SPSA with the restored direction
# first and last (mezo.update restores the last), seeds above 2**32.
SEEDS = [(2**40 + 3, [2**40 + 3]), (4, [4, 2**62 + 9]), (9, [8, 9]), (7, [8, 9])]


def _sweeps(buf, n_decay, restore_seed, update_seeds, perturb, restore_and_update, decay):
    """One MeZO step's three sweeps; the buffer after each, on the CPU. The Triton functions
    read their seeds from device memory, the torch ones take ints."""
    if perturb is sweep._perturb_triton:
        restore_seed, update_seeds = (sweep.seed_tensor(s, buf.device) for s in (restore_seed, update_seeds))
    after = []
    perturb(buf, restore_seed, EPS, 1)
    after.append(buf.to("cpu", copy=True))
    perturb(buf, restore_seed, -EPS, 2)
    after.append(buf.to("cpu", copy=True))
    g = torch.linspace(-2.0, 3.0, len(update_seeds), device=buf.device)  # stays on the device
    restore_and_update(buf, n_decay, restore_seed, EPS, update_seeds, g * 1e-2, decay if decay is None else decay.to(buf.device))
    after.append(buf.to("cpu", copy=True))
    return after


def check_triton_matches_torch(device: torch.device):
    for n, n_decay in SIZES:
        zero = torch.zeros(n, device=device)
        sweep._perturb_triton(zero, sweep.seed_tensor(2**40 + 3, device), 1.0, 1)
        assert torch.equal(zero.cpu(), rng.normal(2**40 + 3, 0, n))
        for restore_seed, update_seeds in SEEDS:
            values = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.05
            # The factor as restore_and_update rounds it (float32); None, as it passes for no weight
            # decay, in the plain MeZO case: one direction.
            decay = None if len(update_seeds) == 1 else torch.full((), 1.0 - 1e-2 * 0.1)
            expected = _sweeps(values.clone(), n_decay, restore_seed, update_seeds, sweep._perturb_torch,
                               sweep._restore_and_update_torch, decay)
            # perturb_apart: the first two sweeps in one pass, theta + eps z kept in a second buffer.
            buf, plus = values.to(device, copy=True), torch.empty(n, device=device)
            sweep._perturb_apart_triton(buf, plus, sweep.seed_tensor(restore_seed, device), EPS)
            assert torch.equal(plus.cpu(), expected[0]) and torch.equal(buf.cpu(), expected[1]), f"apart, n={n}"
            got = _sweeps(values.to(device), n_decay, restore_seed, update_seeds, sweep._perturb_triton,
                          sweep._restore_and_update_triton, decay)
            for i, (e, g) in enumerate(zip(expected, got)):
                assert torch.equal(e, g), f"sweep {i}, n={n}, seeds {restore_seed} {update_seeds}: {(e != g).sum()} differ"
            if update_seeds[-1] == restore_seed:  # as mezo.update calls it: the restore seed is a view of the last
                seeds = sweep.seed_tensor(update_seeds, device)
                restored = sweep._restored_index(seeds[-1], seeds)
                assert restored == len(seeds) - 1 == sweep._restored_index(restore_seed, update_seeds)
                buf = expected[1].to(device)
                g = torch.linspace(-2.0, 3.0, len(update_seeds), device=device)
                sweep._restore_and_update_triton(buf, n_decay, seeds[-1], EPS, seeds, g * 1e-2,
                                                 decay if decay is None else decay.to(device), restored)
                assert torch.equal(buf.cpu(), expected[2]), f"restored last, n={n}, seeds {update_seeds}"


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_kernels_match_torch(device):
    run_triton_check(__file__, check_triton_matches_torch, device, timeout=600)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_step_never_syncs_with_the_host():
    w = torch.nn.Parameter(torch.randn(5000, device="cuda"))
    flat = FlatParameters([("w", w)], set())
    sweep.perturb(flat, 1, EPS)  # compile the kernels outside the check
    sweep.restore_and_update(flat, 1, EPS, [1], [torch.ones((), device="cuda")], 1e-2, 0.1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sweep.perturb(flat, 2, EPS)
        loss_plus = flat.buffer.square().sum()
        sweep.perturb(flat, 2, -EPS, times=2)
        g = (loss_plus - flat.buffer.square().sum()) / (2 * EPS)  # a 0-dim CUDA tensor
        sweep.restore_and_update(flat, 2, EPS, [2], [g], 1e-2, 0.1)
        update(flat, [3], torch.stack([g]), EPS, 1e-2, 0.1)  # the NaN check and the decay switch stay on the device
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_normal_is_the_same_on_gpu():
    for seed, start, n in [(1, 0, 1 << 20), (2**40 + 1, 3, 1000)]:
        assert torch.equal(rng.normal(seed, start, n, "cuda").cpu(), rng.normal(seed, start, n))


if __name__ == "__main__":
    check_triton_matches_torch(torch.device("cpu"))
