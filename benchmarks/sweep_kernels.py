"""The perturbation sweep kernel on a GPU: how close it runs to the memory-bandwidth floor, and
how its launch shape (elements per program, warps) changes that. z does not depend on the
launch shape (each element's z comes from its position), so any shape gives the same bits.

For a buffer of RoBERTa-large's top 4 layers (50.4M float32) and of the whole model (355M), it
times one sweep (buffer += scale * z) per launch shape, and an in-place multiply over the same
buffer (the memory floor: one read and one write per element, no z), each the median of CUDA-
event-timed launches.

    python benchmarks/sweep_kernels.py
"""

import torch
import triton

from common import back_to_back_ms

from zotune.optim import sweep

SIZES = (("top:4 (50.4M)", 50_384_896), ("full (355M)", 355_359_744))
SHAPES = [(block, warps) for block in (1024, 2048, 4096) for warps in (2, 4, 8)]


def main():
    seed = sweep.seed_tensor(1, "cuda")
    print(f"\nSweep kernel (buffer += 1e-3 z), on {torch.cuda.get_device_name()}")
    print("| buffer | launch | ms | GB/s moved | vs memory floor |\n|---|---|---|---|---|")
    for label, n in SIZES:
        buf = torch.zeros(n, device="cuda")
        floor_ms = back_to_back_ms(lambda: buf.mul_(1.0), 20)
        moved = 8 * n / 1e9  # one float32 read and one write per element
        print(f"| {label} | in-place multiply (floor) | {floor_ms:.3f} | {moved / floor_ms * 1e3:.0f} | 1.00 |")
        for block, warps in SHAPES:
            def launch():
                sweep._perturb_kernel[(triton.cdiv(n, block),)](buf, n, seed, 1e-3, TIMES=1, BLOCK=block,
                                                                num_warps=warps, enable_fp_fusion=False)
            launch()  # compile outside the timing
            ms = back_to_back_ms(launch, 20)
            default = " (zotune's)" if (block, warps) == (sweep.BLOCK, 4) else ""
            print(f"| {label} | BLOCK {block}, {warps} warps{default} | {ms:.3f} | {moved / ms * 1e3:.0f} "
                  f"| {ms / floor_ms:.2f} |")
        del buf
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
