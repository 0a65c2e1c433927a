"""Trace / tr(A^2) / diagonal / spectral-density estimators against exact dense values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import strict_dtype_promotion, tol, tree_dense_op
from jax.flatten_util import ravel_pytree

import gradience_jax as gj
from gradience_jax.estimators import (
    diagonal,
    hutchinson_trace,
    hutchpp_trace,
    spectral_density,
    trace_of_square,
)
from gradience_jax.lanczos import NonFiniteError

strict_promotion = pytest.fixture(autouse=True, scope="module")(strict_dtype_promotion)

N = 80
LIKE = {"w": jnp.zeros((8, 8)), "b": jnp.zeros((16,))}  # 80 entries


def tree_op(matrix):
    return tree_dense_op(matrix, LIKE)


def from_eigs(ev, seed=0):
    q = np.linalg.qr(np.random.default_rng(seed).standard_normal((N, N)))[0]
    a = (q * ev) @ q.T
    return (a + a.T) / 2


@pytest.fixture(scope="module")
def indefinite():
    g = np.random.default_rng(1).standard_normal((N, N))
    return (g + g.T) / 2 + 0.5 * np.eye(N)


def test_hutchinson_unbiased_over_keys(indefinite):
    op = tree_op(indefinite)
    exact = np.trace(indefinite)
    for dist in ("rademacher", "normal"):
        est = np.array([float(hutchinson_trace(op, jax.random.key(s), 20, dist).estimate)
                        for s in range(100, 150)])
        mean, err = est.mean(), est.std(ddof=1) / np.sqrt(len(est))
        assert abs(mean - exact) < 3 * err, (dist, mean, exact, err)
    one = hutchinson_trace(op, jax.random.key(0), 20)
    assert one.samples.shape == (20,)
    np.testing.assert_allclose(one.estimate, one.samples.mean())
    np.testing.assert_allclose(one.stderr, one.samples.std(ddof=1) / np.sqrt(20))
    # Rademacher variance 2 (||A||_F^2 - sum diag^2): the reported stderr is its estimate
    var = 2 * (np.sum(indefinite**2) - np.sum(np.diag(indefinite) ** 2))
    assert 0.5 < float(one.stderr) ** 2 * 20 / var < 2.0


def test_trace_of_square_unbiased(indefinite):
    op = tree_op(indefinite)
    exact = np.sum(indefinite**2)
    est = np.array([float(trace_of_square(op, jax.random.key(s), 20).estimate) for s in range(40)])
    assert abs(est.mean() - exact) < 3 * est.std(ddof=1) / np.sqrt(len(est))


def test_hutchpp_beats_hutchinson_on_decaying_spectrum():
    a = from_eigs(1.0 / np.arange(1, N + 1) ** 2)
    op = tree_op(a)
    exact = np.trace(a)
    err_h, err_pp = [], []
    for s in range(20):
        err_h.append(abs(float(hutchinson_trace(op, jax.random.key(s), 30).estimate) - exact))
        pp = hutchpp_trace(op, jax.random.key(s), num_matvecs=30)
        err_pp.append(abs(float(pp.estimate) - exact))
    assert np.mean(err_pp) < 0.25 * np.mean(err_h), (np.mean(err_pp), np.mean(err_h))
    # unbiased as well
    est = np.array([float(hutchpp_trace(op, jax.random.key(100 + s), 30).estimate)
                    for s in range(20)])
    assert abs(est.mean() - exact) < 3 * est.std(ddof=1) / np.sqrt(len(est)) + 1e-12


def test_hutchpp_exact_for_low_rank():
    ev = np.zeros(N)
    ev[:5] = [5.0, 4.0, 3.0, 2.0, 1.0]
    a = from_eigs(ev, seed=2)
    est = hutchpp_trace(tree_op(a), jax.random.key(0), num_matvecs=30)
    np.testing.assert_allclose(est.estimate, 15.0, rtol=tol(1e-8, 1e-5))


def test_diagonal_is_pytree_and_converges(indefinite):
    op = tree_op(indefinite)
    d = diagonal(op, jax.random.key(0), num_samples=400)
    assert jax.tree_util.tree_structure(d) == jax.tree_util.tree_structure(LIKE)
    flat = ravel_pytree(d)[0]
    exact = np.diag(indefinite)
    off = np.sqrt(np.sum(indefinite**2, axis=1) - exact**2)  # per-entry noise scale
    assert np.max(np.abs(flat - exact) / off) < 5 / np.sqrt(400) * 3
    diag_op = tree_op(np.diag(np.arange(1.0, N + 1)))
    np.testing.assert_allclose(ravel_pytree(diagonal(diag_op, jax.random.key(1), 3))[0],
                               np.arange(1.0, N + 1), rtol=tol(1e-7, 1e-6))


@pytest.fixture(scope="module")
def bulk_outliers():
    rng = np.random.default_rng(3)
    ev = np.concatenate([rng.uniform(0.0, 1.0, N - 3), [4.0, 6.0, 9.0]])
    return ev, from_eigs(ev, seed=4)


def test_slq_density_integrates_trace_and_outliers(bulk_outliers):
    ev, a = bulk_outliers
    dens = spectral_density(tree_op(a), jax.random.key(0), num_probes=8, num_iters=40)
    assert dens.nodes.shape == (8, 40) and dens.weights.shape == (8, 40)
    np.testing.assert_allclose(np.sum(dens.weights, axis=1), 1.0, atol=tol(1e-10, 1e-5))
    grid = np.linspace(-1.0, 11.0, 4001)
    phi = np.asarray(dens.evaluate(grid, 0.05))
    assert np.trapezoid(phi, grid) == pytest.approx(1.0, abs=1e-3)
    # first moment times n is a trace estimate (exact in expectation): within a few stderr
    assert float(dens.trace()) == pytest.approx(ev.sum(), rel=0.15)
    assert float(dens.trace_of_square()) == pytest.approx(np.sum(ev**2), rel=0.3)
    # outliers: local maxima of the density at 4, 6, 9 with nothing in between
    for x in (4.0, 6.0, 9.0):
        near = (grid > x - 0.2) & (grid < x + 0.2)
        assert phi[near].max() > 0.05
        assert abs(grid[near][np.argmax(phi[near])] - x) < 0.02
    gap = (grid > 1.5) & (grid < 3.5)
    assert phi[gap].max() < 1e-3
    lo, hi = dens.support()
    assert float(hi) == pytest.approx(9.0, abs=tol(1e-6, 1e-4))


def test_slq_exact_trace_with_breakdown():
    """Few distinct eigenvalues: Lanczos breaks down, the quadrature stays exact."""
    ev = np.repeat([1.0, 2.0, 3.0, 4.0], N // 4)
    a = from_eigs(ev, seed=5)
    dens = spectral_density(tree_op(a), jax.random.key(1), num_probes=8, num_iters=40)
    np.testing.assert_allclose(np.sum(dens.weights, axis=1), 1.0, atol=tol(1e-10, 1e-5))
    # each probe's quadrature integrates x exactly: v^T A v / v^T v
    assert np.all(np.isfinite(np.asarray(dens.nodes)))
    assert float(dens.trace()) == pytest.approx(ev.sum(), rel=0.05)


def test_estimators_jit_and_deterministic(indefinite):
    op = tree_op(indefinite)

    @jax.jit
    def all_estimates(op, key):
        return (hutchinson_trace(op, key, 10).estimate, hutchpp_trace(op, key, 12).estimate,
                diagonal(op, key, 10), spectral_density(op, key, 2, 10).trace())

    a = all_estimates(op, jax.random.key(7))
    b = all_estimates(op, jax.random.key(7))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_allclose(a[0], hutchinson_trace(op, jax.random.key(7), 10).estimate)


def test_estimator_bad_input(indefinite):
    op = tree_op(indefinite)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="num_samples"):
        hutchinson_trace(op, key, 0)
    with pytest.raises(ValueError, match="distribution"):
        hutchinson_trace(op, key, 4, "cauchy")
    with pytest.raises(ValueError, match="num_matvecs"):
        hutchpp_trace(op, key, 2)
    with pytest.raises(ValueError, match="reorth"):
        spectral_density(op, key, 2, 10, reorth="partial")
    with pytest.raises(ValueError, match="num_iters"):
        spectral_density(op, key, 2, N + 1, reorth="full")
    with pytest.raises(TypeError, match="LinearOperator"):
        diagonal(np.eye(3), key, 4)
    with pytest.raises(TypeError, match="num_samples must be an integer"):
        hutchinson_trace(op, key, "10")
    with pytest.raises(ValueError, match="batch_size must be >= 1, got -1"):
        trace_of_square(op, key, 4, batch_size=-1)
    with pytest.raises(ValueError, match="key is required"):
        hutchinson_trace(op, None, 4)
    with pytest.raises(TypeError, match="key must be a PRNG key, got the int 42"):
        hutchpp_trace(op, 42, 6)
    with pytest.raises(ValueError, match="key must be a single PRNG key"):
        spectral_density(op, jax.random.split(key, 3), 2, 10)
    with pytest.raises(TypeError, match="num_iters must be an integer"):
        spectral_density(op, key, 2, "10")
    with pytest.raises(ValueError, match="num_probes must be >= 1, got 0"):
        spectral_density(op, key, 0, 10)


def _nan_op():
    return gj.from_matvec(lambda v: jax.tree_util.tree_map(lambda x: x * jnp.nan, v), LIKE,
                          name="diverged")


@pytest.mark.parametrize("name,call,where", [
    ("hutchinson_trace", lambda op, k: hutchinson_trace(op, k, 4), "probe 0 of 4"),
    ("trace_of_square", lambda op, k: trace_of_square(op, k, 4), "probe 0 of 4"),
    ("hutchpp_trace", lambda op, k: hutchpp_trace(op, k, 6), "low-rank"),
    ("diagonal", lambda op, k: diagonal(op, k, 4), "probe 0 of 4"),
    ("spectral_density", lambda op, k: spectral_density(op, k, 2, 10), "probe 0 of 2.*step 0"),
])
def test_nonfinite_operator_raises_eagerly_naming_estimator_and_probe(name, call, where):
    with pytest.raises(NonFiniteError, match=f"{name} of the diverged operator.*{where}") as err:
        call(_nan_op(), jax.random.key(0))
    assert isinstance(err.value, FloatingPointError)


def test_nonfinite_at_one_probe_is_named_and_jit_gives_a_flag(indefinite):
    """Inf at one probe only (a matvec that overflows on some directions): the message names
    that probe; inside jit nothing raises, the NaN / Inf comes with ``finite=False``."""
    a = jnp.asarray(indefinite)

    def mv(v):
        x = ravel_pytree(v)[0]
        y = a @ x
        y = jnp.where(x[0] * x[1] * x[2] > 0, y, jnp.inf)  # Inf for some Rademacher probes
        return ravel_pytree(v)[1](y)

    op = gj.from_matvec(mv, LIKE, name="overflowing")
    key = jax.random.key(3)
    samples = []
    for s in range(8):  # the reference: which probes overflow
        v = gj.tree.random_like(jax.random.split(key, 8)[s], LIKE, "rademacher")
        x = np.asarray(ravel_pytree(v)[0])
        samples.append(x[0] * x[1] * x[2] > 0)
    first_bad = samples.index(False)
    with pytest.raises(FloatingPointError, match=f"probe {first_bad} of 8 .*= (nan|inf)"):
        hutchinson_trace(op, key, 8)

    @jax.jit
    def traced(op, key):
        return hutchinson_trace(op, key, 8), spectral_density(op, key, 2, 6)

    est, dens = traced(op, key)
    assert not bool(est.finite) and not bool(dens.finite)
    with pytest.raises(FloatingPointError, match=f"probe {first_bad} of 8"):
        est.check("the jitted trace")
    with pytest.raises(FloatingPointError, match="spectral_density: probe"):
        dens.check()
    good, good_dens = traced(tree_op(indefinite), key)
    assert bool(good.finite) and bool(good_dens.finite)
    assert good.check() is good and good_dens.check() is good_dens


def test_density_evaluate_checks_sigma_and_grid(bulk_outliers):
    _, a = bulk_outliers
    dens = spectral_density(tree_op(a), jax.random.key(0), num_probes=2, num_iters=10)
    grid = np.linspace(-1.0, 10.0, 7)
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sigma"):
            dens.evaluate(grid, bad)
    with pytest.raises(TypeError, match="sigma must be a real number"):
        dens.evaluate(grid, "0.1")
    with pytest.raises(ValueError, match="grid must be finite, got nan at index 1"):
        dens.evaluate(np.array([0.0, np.nan]), 0.1)
    with pytest.raises(ValueError, match="grid must be 1-D"):
        dens.evaluate(np.zeros((2, 3)), 0.1)
    with pytest.raises(TypeError, match="grid must be a real 1-D array"):
        dens.evaluate(np.array([1j, 2j]), 0.1)
    # the kernel sum against a float64 reference, also for an integer grid and a scalar
    nodes, weights = np.asarray(dens.nodes, np.float64), np.asarray(dens.weights, np.float64)
    z = (grid[:, None, None] - nodes) / 0.3
    ref = np.mean(np.sum(weights * np.exp(-0.5 * z * z), -1), -1) / (0.3 * np.sqrt(2 * np.pi))
    np.testing.assert_allclose(dens.evaluate(grid, 0.3), ref, rtol=tol(1e-12, 1e-5), atol=1e-30)
    np.testing.assert_allclose(dens.evaluate(np.arange(3), 0.3)[2],
                               dens.evaluate(2.0, 0.3), rtol=tol(1e-12, 1e-6))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_operator_estimates_and_vector_dtype(dtype):
    """A bf16 / fp16 operator: float32 scalars, the diagonal in the operator's dtype, and
    estimates that match the float64 trace of the rounded matrix to the dtype's level."""
    ev = np.linspace(0.5, 2.0, N)
    a16 = jnp.asarray(from_eigs(ev, seed=6), dtype)
    a = np.asarray(a16.astype(jnp.float32), np.float64)
    like = {"w": jnp.zeros((8, 8), dtype), "b": jnp.zeros((16,), dtype)}
    op = tree_dense_op(a16, like)
    key = jax.random.key(0)
    d = diagonal(op, key, 50)
    assert all(x.dtype == jnp.dtype(dtype) for x in jax.tree_util.tree_leaves(d))
    err = np.abs(np.asarray(ravel_pytree(jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float32), d))[0], np.float64) - np.diag(a))
    off = np.sqrt(np.sum(a**2, axis=1) - np.diag(a) ** 2)
    assert np.max(err / off) < 5 * 3 / np.sqrt(50)
    est = hutchinson_trace(op, key, 200)
    assert est.estimate.dtype == jnp.float32
    assert abs(float(est.estimate) - np.trace(a)) < 4 * float(est.stderr) + 1e-2 * np.trace(a)
    dens = spectral_density(op, key, 4, 20)
    assert dens.nodes.dtype == jnp.float32
    lo, hi = dens.support()
    eps = float(jnp.finfo(dtype).eps)
    assert float(hi) == pytest.approx(np.linalg.eigvalsh(a)[-1], abs=4 * eps * 2.0)
