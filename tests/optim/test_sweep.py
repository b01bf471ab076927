import pytest
import torch

from zotune.optim import rng, sweep
from zotune.optim.flat import FlatParameters

EPS = 1e-3


def _flat(values: torch.Tensor, n_decay: int) -> FlatParameters:
    """A buffer holding `values`, the first n_decay of them decayed."""
    w = torch.nn.Parameter(values[:n_decay].clone())
    b = torch.nn.Parameter(values[n_decay:].clone())
    return FlatParameters([("w", w), ("b", b)], {"b"})


def _random_flat(n: int, n_decay: int, std: float = 1.0, seed: int = 0) -> FlatParameters:
    g = torch.Generator().manual_seed(seed)
    return _flat(torch.randn(n, generator=g) * std, n_decay)


def _spsa_step(flat, seeds, loss, eps=EPS, lr=1.0, weight_decay=0.0):
    """n-SPSA with the sweeps, n = len(seeds): what optim/mezo.py does, written out."""
    grads = []
    for i, seed in enumerate(seeds):
        sweep.perturb(flat, seed, eps)
        loss_plus = loss(flat.buffer)
        sweep.perturb(flat, seed, -eps, times=2)
        loss_minus = loss(flat.buffer)
        grads.append((loss_plus - loss_minus) / (2 * eps) / len(seeds))
        if i < len(seeds) - 1:
            sweep.perturb(flat, seed, eps)  # restore; the last direction restores in the update pass
    sweep.restore_and_update(flat, seeds[-1], eps, seeds, grads, lr, weight_decay)


def _quadratic(d: int):
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(0.5, 2.0, d, dtype=torch.float64)) @ q.T
    b = torch.randn(d, generator=g, dtype=torch.float64)

    def f(theta):
        t = theta.double()
        return 0.5 * t @ a @ t + b @ t

    return f, lambda theta: a @ theta.double() + b


def _log_cosh(d: int):
    g = torch.Generator().manual_seed(2)
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    c = torch.randn(d, generator=g, dtype=torch.float64)

    def f(theta):
        return torch.log(torch.cosh(m @ theta.double() + c)).sum()

    return f, lambda theta: m.T @ torch.tanh(m @ theta.double() + c)


@pytest.mark.parametrize("problem", [_quadratic, _log_cosh])
def test_projected_gradient_is_directional_derivative(problem):
    d = 8
    f, grad = problem(d)
    flat = _random_flat(d, d)
    theta0 = flat.buffer.clone()
    for seed in (5, 6, 2**40 + 7):
        sweep.perturb(flat, seed, EPS)
        loss_plus = f(flat.buffer)
        sweep.perturb(flat, seed, -EPS, times=2)
        g = (loss_plus - f(flat.buffer)) / (2 * EPS)
        sweep.perturb(flat, seed, EPS)
        expected = rng.normal(seed, 0, d).double() @ grad(theta0)
        assert abs(g - expected) < 1e-3 * grad(theta0).norm()
        assert torch.allclose(flat.buffer, theta0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("problem", [_quadratic, _log_cosh])
def test_mean_of_g_z_estimates_the_gradient(problem):
    # One n-SPSA step with lr = 1 moves theta by -mean_i(g_i z_i): the estimator itself.
    d, n = 8, 1500
    f, grad = problem(d)
    flat = _random_flat(d, d)
    theta0 = flat.buffer.double().clone()
    _spsa_step(flat, list(range(1000, 1000 + n)), f)
    estimate = theta0 - flat.buffer.double()
    true = grad(theta0)
    cosine = estimate @ true / (estimate.norm() * true.norm())
    assert cosine > 0.95
    assert (estimate - true).norm() / true.norm() < 0.25  # expected ~sqrt((d + 1) / n) = 0.08


def test_perturb_restore_cycles_do_not_drift():
    # Measured: 2e-7 here, against 1.9e-6 when the -2 eps z move is a single add.
    flat = _random_flat(4096, 2048, std=0.05)
    theta0 = flat.buffer.clone()
    for seed in range(1000):
        sweep.perturb(flat, seed, EPS)
        sweep.perturb(flat, seed, -EPS, times=2)
        sweep.restore_and_update(flat, seed, EPS, [seed], [0.0], lr=0.0, weight_decay=0.0)
    assert (flat.buffer - theta0).norm() / theta0.norm() < 1e-6


def test_same_seeds_give_identical_buffers():
    f, _ = _log_cosh(64)
    a, b = _random_flat(64, 40), _random_flat(64, 40)
    for step in range(5):
        for flat in (a, b):
            _spsa_step(flat, [step, 100 + step], f, lr=1e-2, weight_decay=0.1)
    assert torch.equal(a.buffer, b.buffer)
    assert not torch.equal(a.buffer, _random_flat(64, 40).buffer)


def test_weight_decay_touches_only_the_decayed_prefix():
    flat = _random_flat(100, 60)
    before = flat.buffer.clone()
    # eps = 0 and g = 0 leave only the decay: x + 0*z and x - 0*z are exactly x.
    sweep.restore_and_update(flat, 3, 0.0, [3], [0.0], lr=0.1, weight_decay=0.5)
    assert torch.equal(flat.buffer[:60], before[:60] * (1 - 0.1 * 0.5))
    assert torch.equal(flat.buffer[60:], before[60:])


def test_nspsa_with_one_direction_is_the_plain_step():
    f, _ = _quadratic(32)
    a, b = _random_flat(32, 20), _random_flat(32, 20)
    _spsa_step(a, [77], f, lr=1e-2, weight_decay=0.1)
    sweep.perturb(b, 77, EPS)
    loss_plus = f(b.buffer)
    sweep.perturb(b, 77, -EPS, times=2)
    g = (loss_plus - f(b.buffer)) / (2 * EPS)
    sweep.restore_and_update(b, 77, EPS, [77], [g], lr=1e-2, weight_decay=0.1)
    assert torch.equal(a.buffer, b.buffer)


def test_update_terms_apply_in_order():
    # One pass with two terms equals two passes of one term each (eps = 0, no decay in the second).
    a, b = _random_flat(3000, 1000), _random_flat(3000, 1000)
    sweep.restore_and_update(a, 1, EPS, [1, 2], [0.5, -0.25], lr=0.1, weight_decay=0.2)
    sweep.restore_and_update(b, 1, EPS, [1], [0.5], lr=0.1, weight_decay=0.2)
    sweep.restore_and_update(b, 9, 0.0, [2], [-0.25], lr=0.1, weight_decay=0.0)
    assert torch.equal(a.buffer, b.buffer)


def test_tensor_coefficients_equal_float_coefficients():
    a, b = _random_flat(500, 300), _random_flat(500, 300)
    sweep.restore_and_update(a, 4, EPS, [4, 8], [0.37, -1.5], lr=1e-2, weight_decay=0.1)
    sweep.restore_and_update(b, 4, EPS, [4, 8], [torch.tensor(0.37), torch.tensor(-1.5, dtype=torch.float64)], 1e-2, 0.1)
    assert torch.equal(a.buffer, b.buffer)


def test_device_seeds_and_lr_equal_host_ones():
    # What a CUDA-graph step passes: seeds as int64 tensors, lr as a float64 tensor.
    a, b = _random_flat(500, 300), _random_flat(500, 300)
    seeds = sweep.seed_tensor([4, 8], "cpu")
    for lr in (1e-2, 3e-5, 1 / 3):
        sweep.perturb(a, 4, EPS)
        sweep.perturb(b, seeds[0], EPS)
        sweep.restore_and_update(a, 8, EPS, [4, 8], [0.37, -1.5], lr=lr, weight_decay=0.1)
        sweep.restore_and_update(b, seeds[1], EPS, seeds, torch.tensor([0.37, -1.5]),
                                 lr=torch.tensor(lr, dtype=torch.float64), weight_decay=0.1)
        assert torch.equal(a.buffer, b.buffer)


def test_perturb_twice_is_two_rounded_adds():
    a, b = _random_flat(1000, 500), _random_flat(1000, 500)
    sweep.perturb(a, 12, -EPS, times=2)
    sweep.perturb(b, 12, -EPS)
    sweep.perturb(b, 12, -EPS)
    assert torch.equal(a.buffer, b.buffer)
    assert not torch.equal(a.buffer, _random_flat(1000, 500).buffer)


def test_perturb_apart_leaves_the_bits_of_the_two_sweeps(monkeypatch):
    # Chunks of 1000 (not a multiple of 4) split the Philox counters.
    monkeypatch.setattr(sweep, "CHUNK", 1000)
    a, b = _random_flat(4500, 2500), _random_flat(4500, 2500)
    a.add_plus()
    sweep.perturb_apart(a, 2**40 + 7, EPS)
    sweep.perturb(b, 2**40 + 7, EPS)
    assert torch.equal(a.plus, b.buffer)
    sweep.perturb(b, 2**40 + 7, -EPS, times=2)
    assert torch.equal(a.buffer, b.buffer)
    assert not torch.equal(a.plus, a.buffer)


def test_chunking_does_not_change_results(monkeypatch):
    # Chunks of 1000 (not a multiple of 4) split counters and the decayed prefix.
    def run():
        flat = _random_flat(4500, 2500)
        sweep.perturb(flat, 5, EPS)
        sweep.perturb(flat, 5, -EPS, times=2)
        sweep.restore_and_update(flat, 5, EPS, [5, 6], [0.3, 0.2], lr=0.1, weight_decay=0.3)
        return flat.buffer

    reference = run()
    monkeypatch.setattr(sweep, "CHUNK", 1000)
    assert torch.equal(run(), reference)


def test_rejects_bad_seeds():
    flat = _random_flat(10, 5)
    with pytest.raises(ValueError, match="seed"):
        sweep.perturb(flat, -1, EPS)
    with pytest.raises(ValueError, match="seed"):
        sweep.restore_and_update(flat, 1, EPS, [2**63], [0.1], 0.1, 0.0)
    with pytest.raises(ValueError, match="seed"):
        sweep.seed_tensor([1, -5], "cpu")
    with pytest.raises(ValueError, match="int64"):
        sweep.seed_tensor(torch.tensor([1], dtype=torch.int32), "cpu")
