"""Lanczos core: recurrence, re-orthogonalisation modes, breakdown, jit, bad input."""

from __future__ import annotations

import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import strict_dtype_promotion, tol, tree_dense_op
from jax.flatten_util import ravel_pytree

import gradience_jax as gj
from gradience_jax.lanczos import LanczosState, lanczos

strict_promotion = pytest.fixture(autouse=True, scope="module")(strict_dtype_promotion)

N = 60
M = 12  # one iteration count and window everywhere: each static combination compiles once
W = 4
LIKE = {"a": jnp.zeros((4, 5)), "b": {"c": jnp.zeros((40,))}}  # 60 entries, a pytree vector


def tree_op(matrix, like=LIKE, is_psd=False):
    return tree_dense_op(matrix, like, is_psd=is_psd)


def sym(seed, n=N):
    g = np.random.default_rng(seed).standard_normal((n, n))
    return (g + g.T) / np.sqrt(2 * n)


def tridiag(state: LanczosState):
    a = np.asarray(state.alphas, np.float64)
    b = np.asarray(state.betas, np.float64)[:-1]
    return np.diag(a) + np.diag(b, 1) + np.diag(b, -1)


def basis_matrix(state: LanczosState):
    leaves = jax.tree_util.tree_leaves(state.basis)
    return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in leaves], axis=1)


def test_full_basis_is_orthonormal_and_tridiagonalises():
    a = sym(0)
    op = tree_op(a)
    v0 = jax.tree_util.tree_map(jnp.ones_like, LIKE)
    st = lanczos(op, v0, M, reorth="full")
    q = basis_matrix(st)  # rows are q_j, in ravel order (a, b/c)
    assert q.shape == (M, N)
    q = q.astype(np.float64)
    np.testing.assert_allclose(q @ q.T, np.eye(M), atol=tol(1e-13, 1e-6))
    np.testing.assert_allclose(q @ a @ q.T, tridiag(st), atol=tol(1e-12, 2e-6))
    # the next vector completes the Lanczos relation A Q^T = Q^T T + beta_m q_m e_m^T
    qm = np.asarray(ravel_pytree(st.q)[0], np.float64)
    resid = a @ q.T - q.T @ tridiag(st)
    np.testing.assert_allclose(resid[:, -1], float(st.betas[-1]) * qm, atol=tol(1e-12, 2e-6))
    assert int(st.step) == M
    assert not bool(np.any(st.breakdowns))
    assert float(np.max(st.asymmetry)) < tol(1e-13, 1e-6)


@pytest.mark.parametrize("reorth,window", [("window", W), ("none", None)])
def test_window_and_none_match_full_tridiagonal_early(reorth, window):
    """Before orthogonality is lost, all modes produce the same T."""
    op = tree_op(sym(1))
    v0 = jax.tree_util.tree_map(jnp.ones_like, LIKE)
    full = lanczos(op, v0, M, reorth="full")
    other = lanczos(op, v0, M, reorth=reorth, window=window)
    np.testing.assert_allclose(other.alphas[:8], full.alphas[:8], atol=tol(1e-10, 2e-6))
    np.testing.assert_allclose(other.betas[:8], full.betas[:8], atol=tol(1e-10, 2e-6))
    rows = jax.tree_util.tree_leaves(other.basis)[0].shape[0]
    assert rows == (window if reorth == "window" else 0)


def test_window_ring_buffer_holds_last_vectors():
    op = tree_op(sym(2))
    v0 = jax.tree_util.tree_map(jnp.ones_like, LIKE)
    full = lanczos(op, v0, M, reorth="full")
    win = lanczos(op, v0, M, reorth="window", window=W)
    qf, qw = basis_matrix(full), basis_matrix(win)
    for j in range(M - W, M):  # q_j sits in slot j % W
        np.testing.assert_allclose(qw[j % W], qf[j], atol=tol(1e-8, 1e-4))


def test_window_reads_q_prev_from_its_ring_and_asymmetry_stays_round_off():
    """``"window"`` carries no ``q_prev`` (the ring holds it): same T as ``"full"`` while
    orthogonal, and the measured asymmetry of a symmetric operator is round-off."""
    op = tree_op(sym(3))
    v0 = jax.tree_util.tree_map(jnp.ones_like, LIKE)
    win = lanczos(op, v0, M, reorth="window", window=W)
    full = lanczos(op, v0, M, reorth="full")
    assert win.q_prev is None and full.q_prev is not None
    np.testing.assert_allclose(win.alphas[:W + 2], full.alphas[:W + 2], atol=tol(1e-10, 2e-6))
    assert float(np.max(win.asymmetry)) < tol(1e-12, 1e-5)
    skew = sym(3) + 1e-2 * np.triu(sym(4), 1)  # a non-symmetric matrix: measured, not hidden
    bad = lanczos(tree_op(skew), v0, M, reorth="window", window=W)
    assert float(np.max(bad.asymmetry)) > 1e-4


@pytest.mark.parametrize("block", (2, 7))
def test_subtract_rows_in_place_blocks_match_the_dense_update(monkeypatch, block):
    """``w - B h - c q`` in column blocks (leaves of >= 16 blocks, a tail block included)
    against float64 numpy, leaf by leaf."""
    lz = importlib.import_module("gradience_jax.lanczos")
    monkeypatch.setattr(lz, "SUBTRACT_BLOCK", block)
    rng = np.random.default_rng(0)
    rows = 3
    like = {"big": jnp.zeros((16, 17)), "small": jnp.zeros((5,))}  # 272 = 38 x 7 + 6
    as_tree = lambda shape_lead: jax.tree_util.tree_map(  # noqa: E731
        lambda x: jnp.asarray(rng.standard_normal(shape_lead + x.shape), x.dtype), like)
    w, q, basis = as_tree(()), as_tree(()), as_tree((rows,))
    h = jnp.asarray(rng.standard_normal(rows), jnp.zeros(()).dtype)
    c = jnp.asarray(0.37, jnp.zeros(()).dtype)
    out = jax.jit(lz.subtract_rows)(w, basis, h, q, c)
    for name in like:
        b = np.asarray(basis[name], np.float64)
        want = (np.asarray(w[name], np.float64) - np.tensordot(np.asarray(h, np.float64), b, 1)
                - 0.37 * np.asarray(q[name], np.float64))
        np.testing.assert_allclose(np.asarray(out[name], np.float64), want,
                                   atol=tol(1e-12, 1e-5))
    # and inside the recurrence (leaf "b/c" of 40 entries blocked at block 2; traced anew):
    # the windowed run matches the full one
    jax.clear_caches()
    op = tree_op(sym(1))
    v0 = jax.tree_util.tree_map(jnp.ones_like, LIKE)
    win = lanczos(op, v0, M, reorth="window", window=W)
    full = lanczos(op, v0, M, reorth="full")
    np.testing.assert_allclose(win.alphas[:8], full.alphas[:8], atol=tol(1e-10, 2e-6))


def test_breakdown_restarts_and_is_reported():
    rng = np.random.default_rng(3)
    u = rng.standard_normal((N, 3))
    a = u @ np.diag([3.0, 2.0, 1.0]) @ u.T  # rank 3: invariant subspace after 4 steps
    op = tree_op(a)
    v0 = jax.tree_util.tree_map(jnp.ones_like, LIKE)
    st = lanczos(op, v0, M, reorth="full")
    assert bool(np.any(st.breakdowns))
    q = basis_matrix(st)
    q = q.astype(np.float64)
    np.testing.assert_allclose(q @ q.T, np.eye(M), atol=tol(1e-12, 1e-6))  # restarts stay orthogonal
    theta = np.linalg.eigvalsh(tridiag(st))
    ref = np.linalg.eigvalsh(a)
    np.testing.assert_allclose(theta[-3:], ref[-3:], rtol=tol(1e-10, 1e-5))
    assert np.all(np.isfinite(np.asarray(st.alphas)))


def test_jit_with_operator_argument_compiles_once():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(op, v0):
        return lanczos(op, v0, M, reorth="window", window=W).alphas

    v0 = jax.tree_util.tree_map(jnp.ones_like, LIKE)
    a1 = run(tree_op(sym(4)), v0)
    a2 = run(tree_op(sym(5)), v0)  # new operands, same shapes: no retrace
    assert not np.allclose(a1, a2)
    ref = lanczos(tree_op(sym(5)), v0, M, reorth="window", window=W).alphas
    np.testing.assert_allclose(a2, ref, atol=tol(1e-12, 1e-6))


def test_deterministic():
    op = tree_op(sym(6))
    v0 = jax.tree_util.tree_map(jnp.ones_like, LIKE)
    s1 = lanczos(op, v0, M, reorth="none")
    s2 = lanczos(op, v0, M, reorth="none")
    np.testing.assert_array_equal(s1.alphas, s2.alphas)
    np.testing.assert_array_equal(s1.betas, s2.betas)


def test_float32_operator_keeps_float32_work_dtype():
    op = gj.from_dense(jnp.asarray(sym(7), jnp.float32))
    st = lanczos(op, jnp.ones(N, jnp.float32), M, reorth="full")
    assert st.alphas.dtype == jnp.float32
    q = basis_matrix(st).astype(np.float64)
    np.testing.assert_allclose(q @ q.T, np.eye(M), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_iters=0), "num_iters"),
        (dict(num_iters=5, reorth="selective"), "reorth"),
        (dict(num_iters=5, reorth="window", window=1), "window"),
        (dict(num_iters=N + 1, reorth="full"), "n_params"),
        (dict(num_iters="5"), "num_iters must be an integer"),
        (dict(num_iters=5, reorth="window", window="3"), "window must be an integer"),
        (dict(num_iters=5, key=jax.random.split(jax.random.key(0), 2)), "single PRNG key"),
    ],
)
def test_bad_arguments(kwargs, match):
    op = tree_op(sym(8))
    v0 = jax.tree_util.tree_map(jnp.ones_like, LIKE)
    with pytest.raises(ValueError, match=match):
        lanczos(op, v0, **kwargs)


def test_bad_vectors_and_matvec_structure():
    op = tree_op(sym(9))
    with pytest.raises(ValueError, match="v0"):
        lanczos(op, {"a": jnp.ones((4, 5))}, 5)
    bad = gj.from_matvec(lambda v: {"x": v["a"]}, LIKE, name="broken")
    with pytest.raises(ValueError, match="broken.*structure"):
        lanczos(bad, jax.tree_util.tree_map(jnp.ones_like, LIKE), 5)
    bad_shape = gj.from_matvec(lambda v: {"a": v["a"].T, "b": v["b"]}, LIKE, name="transposed")
    with pytest.raises(ValueError, match="transposed.*shape"):
        lanczos(bad_shape, jax.tree_util.tree_map(jnp.ones_like, LIKE), 5)
    ones = jax.tree_util.tree_map(jnp.ones_like, LIKE)
    with pytest.raises(ValueError, match=r"v0 does not match.*missing leaves \['b/c'\]"):
        lanczos(op, {"a": jnp.ones((4, 5)), "b": {}}, 5)
    with pytest.raises(ValueError, match="v0 leaf 'b/c' is not finite"):
        lanczos(op, {"a": ones["a"], "b": {"c": ones["b"]["c"].at[3].set(jnp.nan)}}, 5)
    with pytest.raises(TypeError, match="key must be a PRNG key, got the int 42"):
        lanczos(op, ones, 5, key=42)
    with pytest.raises(TypeError, match="op must be a gradience_jax.LinearOperator"):
        lanczos(np.eye(N), ones, 5)


def test_hash_start_vector_is_layout_free_uniform_and_keyed():
    """The engine's in-program start vector: the flat ``(P,)`` template gives the raveled
    pytree's entries, in the leaves' work dtypes; the entries are uniform on [-0.5, 0.5)
    (moments against the closed forms); another key gives another vector."""
    from gradience_jax.lanczos import hash_vector

    like = {"a": jnp.zeros((300, 70), jnp.float32), "b": jnp.zeros((5,), jnp.bfloat16),
            "c": jnp.zeros((2, 3, 4), jnp.float32)}
    key = jax.random.key(3)
    tree = jax.jit(hash_vector)(like, key)
    assert tree["b"].dtype == jnp.float32  # the work dtype of a bfloat16 leaf
    flat_like = jax.ShapeDtypeStruct((sum(x.size for x in like.values()),), jnp.float32)
    flat = np.asarray(jax.jit(hash_vector)(flat_like, key))
    leaves = jax.tree_util.tree_leaves(tree)  # flatten order, as the flat layout ravels
    np.testing.assert_array_equal(np.concatenate([np.ravel(x) for x in leaves]), flat)
    assert flat.min() >= -0.5 and flat.max() < 0.5
    n = flat.size
    assert abs(flat.mean()) < 4 * np.sqrt(1 / 12 / n)  # uniform: variance 1/12
    assert abs(flat.var() - 1 / 12) < 4 * np.sqrt(1 / 180 / n)  # var of x^2: 1/180
    assert len(np.unique(flat)) > 0.99 * n
    other = np.asarray(hash_vector(flat_like, jax.random.key(4)))
    assert abs(np.corrcoef(flat, other)[0, 1]) < 4 / np.sqrt(n)
