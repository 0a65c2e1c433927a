"""Trace / tr(A^2) / diagonal / spectral-density estimators against exact dense values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import strict_dtype_promotion, tree_dense_op
from jax.flatten_util import ravel_pytree

from gradience_jax.estimators import (
    diagonal,
    hutchinson_trace,
    hutchpp_trace,
    spectral_density,
    trace_of_square,
)

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
    np.testing.assert_allclose(est.estimate, 15.0, rtol=1e-8)


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
                               np.arange(1.0, N + 1))


@pytest.fixture(scope="module")
def bulk_outliers():
    rng = np.random.default_rng(3)
    ev = np.concatenate([rng.uniform(0.0, 1.0, N - 3), [4.0, 6.0, 9.0]])
    return ev, from_eigs(ev, seed=4)


def test_slq_density_integrates_trace_and_outliers(bulk_outliers):
    ev, a = bulk_outliers
    dens = spectral_density(tree_op(a), jax.random.key(0), num_probes=8, num_iters=40)
    assert dens.nodes.shape == (8, 40) and dens.weights.shape == (8, 40)
    np.testing.assert_allclose(np.sum(dens.weights, axis=1), 1.0, atol=1e-10)
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
    assert float(hi) == pytest.approx(9.0, abs=1e-6)


def test_slq_exact_trace_with_breakdown():
    """Few distinct eigenvalues: Lanczos breaks down, the quadrature stays exact."""
    ev = np.repeat([1.0, 2.0, 3.0, 4.0], N // 4)
    a = from_eigs(ev, seed=5)
    dens = spectral_density(tree_op(a), jax.random.key(1), num_probes=8, num_iters=40)
    np.testing.assert_allclose(np.sum(dens.weights, axis=1), 1.0, atol=1e-10)
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
