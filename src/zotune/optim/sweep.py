"""The MeZO sweeps: in-place passes over `FlatParameters.buffer` that add multiples of z.

A MeZO step (Malladi et al. 2023; princeton-nlp/MeZO medium_models/src/trainer.py,
`zo_perturb_parameters`, `zo_step`, `zo_update`) is

    perturb(flat, seed, +eps)                 theta + eps z        -> loss L+
    perturb(flat, seed, -eps, times=2)        theta - eps z        -> loss L-
    restore_and_update(flat, seed, eps, [seed], [g], lr, wd)       g = (L+ - L-) / (2 eps)
                                              theta <- theta - lr (g z + wd theta)

MeZO restores theta and then updates it in two more passes; here restore and update share one
pass, so a step is three passes over the parameters instead of four. With a second buffer
(FlatParameters.add_plus) the first two passes are one, perturb_apart: it writes theta + eps z
there and leaves theta - eps z in place, rounding exactly as the two passes do, so a step is two
passes and two draws of z, the same weights bit for bit. With n-SPSA (n directions
at the same theta) the caller restores each direction but the last with perturb(+eps) and
passes all n seeds and g_i / n to the final restore_and_update.

Floating point: each pass applies its terms as a sequence of individually rounded float32
operations in a fixed order, never pre-summed coefficients. d = eps*z is rounded once and then
added or subtracted term by term, so (((theta + d) - d) - d) + d is exactly theta except where
a sum crosses a binade: 1000 perturb/restore cycles drift ~2e-7 relative, against ~2e-6 when
the -2 eps z move is a single add. The torch path (any device) and the Triton path (CUDA, one
kernel launch per sweep, fp fusion off so a*b+c is not contracted into one rounding) run the
same sequence and give the same bits.
"""

import torch

from zotune.optim import rng
from zotune.optim.flat import FlatParameters

try:
    import triton
    import triton.language as tl
except ImportError:  # torch's CPU wheels come without triton; the torch path needs none
    triton = None

CHUNK = 1 << 20  # elements per torch pass, so z is never materialised for the whole buffer


def perturb(flat: FlatParameters, seed: int | torch.Tensor, scale: float, times: int = 1):
    """buffer += scale * z(seed), `times` times, each add rounded (times=2 for the -2 eps move).
    `seed`: an int, or a 0-dim int64 tensor on the buffer's device (see seed_tensor)."""
    if _use_triton(flat.buffer):
        _perturb_triton(flat.buffer, seed_tensor(seed, flat.buffer.device), scale, times)
    else:
        _perturb_torch(flat.buffer, _host_seed(seed), scale, times)


def perturb_apart(flat: FlatParameters, seed: int | torch.Tensor, eps: float):
    """flat.plus = buffer + eps z; buffer = ((buffer + eps z) - eps z) - eps z: the bits
    perturb(+eps) then perturb(-eps, times=2) leave, with theta + eps z kept, in one pass."""
    if _use_triton(flat.buffer):
        _perturb_apart_triton(flat.buffer, flat.plus, seed_tensor(seed, flat.buffer.device), eps)
    else:
        _perturb_apart_torch(flat.buffer, flat.plus, _host_seed(seed), eps)


def restore_and_update(
    flat: FlatParameters,
    restore_seed: int | torch.Tensor,
    eps: float,
    seeds: list[int | torch.Tensor] | torch.Tensor,
    grads: list[float | torch.Tensor] | torch.Tensor,
    lr: float | torch.Tensor,
    weight_decay: float,
    decays: torch.Tensor | None = None,
):
    """In one pass and in this order: buffer += eps * z(restore_seed);
    buffer[:n_decay] *= 1 - lr * weight_decay (MeZO decays the restored theta; skipped when
    weight_decay is 0, where the factor is exactly 1); then buffer -= (lr * g_j) * z(seed_j) for
    each seed_j in `seeds` and g_j in `grads` (one or more).

    Everything that changes from step to step may live on the buffer's device, so the
    projected gradient computed from GPU losses never visits the host and a step captured in
    a CUDA graph replays with the next step's values: seeds as an int64 tensor (seed_tensor),
    grads as a float32 tensor [n], lr as a 0-dim float64 tensor (the host's float exactly,
    rounded on the device as the host would round it). lr * g_j is rounded to float32 once, on
    that device. `decays`, a 0-dim bool on that device, where False skips the weight decay (a
    skipped step, optim/mezo.py), again without the host reading it.
    """
    buf = flat.buffer
    if isinstance(grads, torch.Tensor):
        g = grads.to(buf.device, torch.float32)
    else:
        g = torch.stack([torch.as_tensor(g_j, dtype=torch.float32).to(buf.device, non_blocking=True) for g_j in grads])
    on_device = isinstance(lr, torch.Tensor)
    coefs = g * (lr.to(torch.float32) if on_device else lr)  # [n] float32
    decay = None
    if weight_decay != 0:
        # The host computes the decay factor in float64 and rounds it to float32 once; so does this.
        decay = (1.0 - lr * weight_decay).to(torch.float32) if on_device else \
            torch.full((), 1.0 - lr * weight_decay, dtype=torch.float32, device=buf.device)
        if decays is not None:
            decay = torch.where(decays, decay, 1.0)
    if _use_triton(buf):
        restored = _restored_index(restore_seed, seeds)
        if not isinstance(seeds, torch.Tensor):
            seeds = torch.stack([seed_tensor(seed, buf.device).reshape(()) for seed in seeds])
        _restore_and_update_triton(buf, flat.n_decay, seed_tensor(restore_seed, buf.device), eps,
                                   seed_tensor(seeds, buf.device), coefs, decay, restored)
    else:
        _restore_and_update_torch(buf, flat.n_decay, _host_seed(restore_seed), eps, list(map(_host_seed, seeds)),
                                  coefs, decay)


def seed_tensor(seeds: int | list[int] | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Checked seeds as an int64 tensor on `device` (a tensor already there is returned as is).
    The Triton kernels read their seeds from device memory, so a step captured in a CUDA graph
    replays with whatever seeds this tensor holds at the time."""
    if isinstance(seeds, torch.Tensor):
        device = torch.device(device)
        if seeds.dtype != torch.int64 or seeds.device.type != device.type or device.index not in (None, seeds.device.index):
            raise ValueError(f"seeds must be int64 on {device}, got {seeds.dtype} on {seeds.device}")
        return seeds
    for seed in [seeds] if isinstance(seeds, int) else seeds:
        rng.check_seed(seed)
    return torch.tensor(seeds, dtype=torch.int64).to(device, non_blocking=True)


def _host_seed(seed: int | torch.Tensor) -> int:
    """The torch path's seed as a Python int (a CPU tensor's value costs nothing to read)."""
    seed = int(seed)
    rng.check_seed(seed)
    return seed


def _use_triton(buf: torch.Tensor) -> bool:
    """CUDA buffers take the Triton kernels; every other device takes the torch path."""
    if buf.is_cuda and triton is None:
        raise RuntimeError("sweeps over a CUDA buffer need triton; install it (pip install triton)")
    return buf.is_cuda


def _perturb_torch(buf: torch.Tensor, seed: int, scale: float, times: int):
    for start in range(0, buf.numel(), CHUNK):
        x = buf[start : start + CHUNK]
        d = rng.normal(seed, start, x.numel(), buf.device).mul_(scale)
        for _ in range(times):
            x.add_(d)


def _perturb_apart_torch(buf: torch.Tensor, plus: torch.Tensor, seed: int, eps: float):
    for start in range(0, buf.numel(), CHUNK):
        x = buf[start : start + CHUNK]
        d = rng.normal(seed, start, x.numel(), buf.device).mul_(eps)
        torch.add(x, d, out=plus[start : start + CHUNK])
        x.copy_(plus[start : start + CHUNK]).sub_(d).sub_(d)


def _restore_and_update_torch(buf, n_decay, restore_seed, eps, seeds, coefs, decay):
    for start in range(0, buf.numel(), CHUNK):
        x = buf[start : start + CHUNK]
        z = rng.normal(restore_seed, start, x.numel(), buf.device)
        x.add_(z * eps)
        if decay is not None:
            x[: max(n_decay - start, 0)].mul_(decay)  # decay: a 0-dim float32 tensor
        for seed, c in zip(seeds, coefs):
            # With one direction the update's z is the restore's: generate it once.
            z_j = z if seed == restore_seed else rng.normal(seed, start, x.numel(), buf.device)
            x.sub_(z_j * c)


# ---- Triton (CUDA). Each kernel is the torch function above, op for op, with z from
# _normal_block, a transcription of rng.normal. The torch path is the reference the tests
# compare against, bit for bit.

BLOCK = 2048  # elements per program, 512 Philox counters: faster MeZO steps than 1024 or 4096 (RESULTS.md)


def _perturb_triton(buf: torch.Tensor, seed: torch.Tensor, scale: float, times: int):
    n = buf.numel()
    _perturb_kernel[(triton.cdiv(n, BLOCK),)](buf, n, seed, scale, TIMES=times, BLOCK=BLOCK, enable_fp_fusion=False)


def _perturb_apart_triton(buf: torch.Tensor, plus: torch.Tensor, seed: torch.Tensor, eps: float):
    n = buf.numel()
    _perturb_apart_kernel[(triton.cdiv(n, BLOCK),)](buf, plus, n, seed, eps, BLOCK=BLOCK, enable_fp_fusion=False)


def _restore_and_update_triton(buf, n_decay, restore_seed, eps, seeds, coefs, decay, restored: int = -1):
    """restore_seed: 0-dim and seeds: [T], int64 tensors on the buffer's device; decay: None for
    none; restored: _restored_index."""
    n = buf.numel()
    _restore_and_update_kernel[(triton.cdiv(n, BLOCK),)](
        buf, n, n_decay, restore_seed, eps, coefs if decay is None else decay, seeds, coefs, HAS_DECAY=decay is not None,
        N_UPDATES=len(seeds), RESTORED=restored, BLOCK=BLOCK, enable_fp_fusion=False
    )


def _restored_index(restore_seed, seeds) -> int:
    """The update the host knows to be the restored direction: the same int, or the same tensor
    element (mezo.update passes seeds[-1]). The kernel reuses the restore's z for it without
    reading and comparing seeds, and compares the others' seeds on the device; -1 if none."""
    for j in range(len(seeds)):
        seed = seeds[j]
        if isinstance(seed, torch.Tensor) and isinstance(restore_seed, torch.Tensor):
            if seed.device == restore_seed.device and seed.data_ptr() == restore_seed.data_ptr():
                return j
        elif isinstance(seed, int) and isinstance(restore_seed, int) and seed == restore_seed:
            return j
    return -1


if triton is not None:
    # rng's constants, as the constexpr globals a jit function may read.
    _ROUNDS, _M0, _M1, _W0, _W1 = map(tl.constexpr, (rng.ROUNDS, rng.M0, rng.M1, rng.W0, rng.W1))
    _LN2, _LOG_SHIFT, _SQRT_HALF_BITS = map(tl.constexpr, (rng.LN2, rng.LOG_SHIFT, rng.SQRT_HALF_BITS))
    _LOG_SERIES, _COS_SERIES, _SIN_SERIES = map(tl.constexpr, (rng.LOG_SERIES, rng.COS_SERIES, rng.SIN_SERIES))

    @triton.jit
    def _horner(y, c: tl.constexpr):
        """c[0] + y*(c[1] + ... + y*c[5]), each * and + rounded as in rng._horner."""
        p = y * c[5]
        for i in tl.static_range(4, 0, -1):
            p = (p + c[i]) * y
        return p + c[0]

    @triton.jit
    def _philox(c0, c1, k0, k1):
        """Philox4x32-10 of counters (c0, c1, 0, 0) under key (k0, k1), all uint32."""
        x0, x1 = c0, c1
        x2 = tl.zeros_like(c0)
        x3 = tl.zeros_like(c0)
        for _ in tl.static_range(_ROUNDS):
            # One 32x32 -> 64-bit multiply gives both words (IMAD.WIDE), where umulhi and a
            # wrapping multiply cost two instructions.
            p0 = x0.to(tl.uint64) * _M0
            p1 = x2.to(tl.uint64) * _M1
            x0, x1, x2, x3 = (p1 >> 32).to(tl.uint32) ^ x1 ^ k0, p1.to(tl.uint32), (p0 >> 32).to(tl.uint32) ^ x3 ^ k1, \
                p0.to(tl.uint32)
            k0 = k0 + _W0
            k1 = k1 + _W1
        return x0, x1, x2, x3

    @triton.jit
    def _box_muller(xa, xb):
        """r cos(theta), r sin(theta) from two uint32 Philox words; rng._box_muller's ops."""
        u = ((xa >> 8) | 1).to(tl.float32) * 2.0**-24
        bits = u.to(tl.int32, bitcast=True) + _LOG_SHIFT
        e = ((bits >> 23) - 127).to(tl.float32)
        f = ((bits & 0x7FFFFF) + _SQRT_HALF_BITS).to(tl.float32, bitcast=True) - 1.0
        s = tl.div_rn(f, f + 2.0)
        ln_u = e * _LN2 + _horner(s * s, _LOG_SERIES) * s
        r = tl.sqrt_rn(ln_u * -2.0)

        j = (xb >> 8) | 1
        q = (j + 2**21) >> 22
        f = (j.to(tl.int32) - (q << 22).to(tl.int32)).to(tl.float32) * 2.0**-24
        y = f * f
        cos_f = _horner(y, _COS_SERIES)
        sin_f = _horner(y, _SIN_SERIES) * f
        swap = (q & 1) != 0
        cos_t = tl.where(swap, sin_f, cos_f)  # a select is exact, like the torch path's x*1 + y*0
        sin_t = tl.where(swap, cos_f, sin_f)
        r_cos = tl.where(((q + 1) & 2) != 0, -r, r)
        r_sin = tl.where((q & 2) != 0, -r, r)
        return r_cos * cos_t, r_sin * sin_t

    @triton.jit
    def _normal_block(seed, start, BLOCK: tl.constexpr):
        """z[start : start + BLOCK] for `seed` (start a multiple of 4)."""
        seed = seed.to(tl.int64)
        k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
        k1 = (seed >> 32).to(tl.uint32)
        c = start // 4 + tl.arange(0, BLOCK // 4)  # [BLOCK/4] int64 counters
        x0, x1, x2, x3 = _philox((c & 0xFFFFFFFF).to(tl.uint32), (c >> 32).to(tl.uint32), k0, k1)
        z0, z1 = _box_muller(x0, x1)
        z2, z3 = _box_muller(x2, x3)
        return tl.interleave(tl.interleave(z0, z2), tl.interleave(z1, z3))  # z0[0] z1[0] z2[0] z3[0] z0[1] ...

    @triton.jit
    def _perturb_kernel(buf_ptr, n, seed_ptr, scale, TIMES: tl.constexpr, BLOCK: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(buf_ptr + offs, mask=offs < n)
        d = _normal_block(tl.load(seed_ptr), start, BLOCK) * scale
        for _ in tl.static_range(TIMES):
            x = x + d
        tl.store(buf_ptr + offs, x, mask=offs < n)

    @triton.jit
    def _perturb_apart_kernel(buf_ptr, plus_ptr, n, seed_ptr, eps, BLOCK: tl.constexpr):
        start = tl.program_id(0).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(buf_ptr + offs, mask=offs < n)
        d = _normal_block(tl.load(seed_ptr), start, BLOCK) * eps
        plus = x + d
        tl.store(plus_ptr + offs, plus, mask=offs < n)
        tl.store(buf_ptr + offs, (plus - d) - d, mask=offs < n)

    @triton.jit(do_not_specialize=["n_decay"])
    def _restore_and_update_kernel(
        buf_ptr, n, n_decay, restore_seed_ptr, eps, decay_ptr, seeds_ptr, coefs_ptr, HAS_DECAY: tl.constexpr,
        N_UPDATES: tl.constexpr, RESTORED: tl.constexpr, BLOCK: tl.constexpr
    ):
        """RESTORED: the update known to reuse the restore's z (_restored_index), or -1."""
        start = tl.program_id(0).to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(buf_ptr + offs, mask=offs < n)
        restore_seed = tl.load(restore_seed_ptr)
        z_restore = _normal_block(restore_seed, start, BLOCK)
        x = x + z_restore * eps
        if HAS_DECAY:
            x = tl.where(offs < n_decay, x * tl.load(decay_ptr), x)
        for j in tl.static_range(N_UPDATES):  # n-SPSA's n: a handful, unrolled
            z = z_restore  # not the previous update's z: the restored direction may come after others
            if j != RESTORED:
                seed = tl.load(seeds_ptr + j)
                if seed != restore_seed:
                    z = _normal_block(seed, start, BLOCK)
            x = x - z * tl.load(coefs_ptr + j)
        tl.store(buf_ptr + offs, x, mask=offs < n)
