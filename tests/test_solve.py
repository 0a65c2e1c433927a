"""gj.solve: every method against dense float64 inverses, auto damping on indefinite
operators, EK-FAC against its dense definition, warnings, jit and bad input."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FLOAT, X64, dense_ggn, dense_hessian, model_case, strict_dtype_promotion, tol
from helpers import tree_dense_op as _tree_dense_op
from jax.flatten_util import ravel_pytree

import gradience_jax as gj
from gradience_jax._validate import ArgumentTypeError
from gradience_jax.operators.ekfac import EKFACOperator, ekfac
from gradience_jax.operators.kfac import _Config, _cotangents, kfac
from gradience_jax.solvers import (
    SolveResult,
    SolveWarning,
    SpectralBounds,
    auto_damping,
    solve,
    spectral_bounds,
)

strict_promotion = pytest.fixture(autouse=True, scope="module")(strict_dtype_promotion)

CE = gj.heads.softmax_cross_entropy()
N_DENSE = 12
LIKE = {"a": jax.ShapeDtypeStruct((3, 2), FLOAT), "b": jax.ShapeDtypeStruct((6,), FLOAT)}


# -- references ------------------------------------------------------------------------


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64))
                           for x in jax.tree_util.tree_leaves(tree)])


def _unflat(vec, like):
    return ravel_pytree(jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), like))[1](
        jnp.asarray(vec, FLOAT))


def _matrix(evals, seed=0) -> np.ndarray:
    """A symmetric float64 matrix with eigenvalues ``evals`` in a random basis."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(evals), len(evals))))
    return (q * np.asarray(evals, np.float64)) @ q.T


def _op(mat, is_psd=False):
    return _tree_dense_op(jnp.asarray(mat, FLOAT), LIKE, is_psd=is_psd)


def _rhs(like, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype),
                                  like)


def _exact(mat, b, damping) -> np.ndarray:
    return np.linalg.solve(mat + damping * np.eye(len(mat)), _flat(b))


def _rel(x, ref) -> float:
    return float(np.linalg.norm(_flat(x) - ref) / np.linalg.norm(ref))


def _true_residual(mat, x, b, damping) -> float:
    bf = _flat(b)
    return float(np.linalg.norm((mat + damping * np.eye(len(mat))) @ _flat(x) - bf)
                 / np.linalg.norm(bf))


INDEFINITE = _matrix(np.linspace(-0.5, 3.0, N_DENSE), seed=0)
SPD = _matrix(np.geomspace(1e-2, 4.0, N_DENSE), seed=2)


# -- CG, LiSSA, Arnoldi on dense matrices behind pytree vectors ---------------------------


def test_cg_equals_dense_inverse_and_reports_the_true_residual():
    b = _rhs(LIKE)
    res = solve(_op(INDEFINITE), b, method="cg", damping="auto", tol=tol(1e-13, 1e-6))
    assert isinstance(res, SolveResult) and res.converged and res.method == "cg"
    assert res.damping + np.linalg.eigvalsh(INDEFINITE)[0] > 0
    assert _rel(res.x, _exact(INDEFINITE, b, res.damping)) <= tol(1e-8, 1e-3)
    assert res.residual == pytest.approx(_true_residual(INDEFINITE, res.x, b, res.damping),
                                         rel=tol(1e-3, 0.3), abs=tol(1e-15, 1e-6))
    assert 1 <= res.iterations <= 2 * N_DENSE and res.warnings == ()
    json.dumps(res.to_dict())


def test_arnoldi_full_rank_equals_dense_inverse():
    b = _rhs(LIKE)
    res = solve(_op(INDEFINITE), b, method="arnoldi", damping="auto", rank=N_DENSE)
    assert res.converged and res.info["rank"] == N_DENSE
    assert _rel(res.x, _exact(INDEFINITE, b, res.damping)) <= tol(1e-8, 1e-3)
    assert res.residual <= tol(1e-10, 1e-4)
    evals = np.sort(np.asarray(res.info["eigenvalues"]))
    np.testing.assert_allclose(evals, np.linalg.eigvalsh(INDEFINITE), atol=tol(1e-10, 1e-5))


def test_arnoldi_low_rank_is_the_subspace_formula_and_exact_for_low_rank_operators():
    """rank < n: ``U diag(1/(lam + d)) U^T b + (b - U U^T b) / d`` with dense eigenvectors;
    an operator of rank r is inverted exactly by ``rank=r``."""
    evals = np.concatenate([np.linspace(1.0, 3.0, 4), np.zeros(N_DENSE - 4)])
    mat = _matrix(evals, seed=5)
    b, d = _rhs(LIKE, seed=3), 0.1
    res = solve(_op(mat, is_psd=True), b, method="arnoldi", damping=d, rank=4)
    assert _rel(res.x, _exact(mat, b, d)) <= tol(1e-8, 1e-4)
    r = 4  # fewer than the rank: the formula, not the inverse
    res = solve(_op(SPD, is_psd=True), b, method="arnoldi", damping=d, rank=r)
    w, u = np.linalg.eigh(SPD)
    u, w = u[:, -r:], w[-r:]
    bf = _flat(b)
    ref = u @ ((u.T @ bf) / (w + d)) + (bf - u @ (u.T @ bf)) / d
    assert _rel(res.x, ref) <= tol(1e-8, 1e-4)
    assert res.residual == pytest.approx(_true_residual(SPD, res.x, b, d), rel=tol(1e-6, 1e-3))
    assert res.residual > 1e-3  # not the inverse: the residual says so


def test_lissa_meets_its_stated_tolerance_with_a_contracting_scale():
    """The residual is below tol (a factor 10 of slack) and the error below cond * residual;
    the scale exceeds lambda_max + d (so the recursion contracts)."""
    b = _rhs(LIKE)
    t = tol(1e-9, 1e-5)
    res = solve(_op(INDEFINITE), b, method="lissa", damping="auto", tol=t, maxiter=20000)
    d = res.damping
    evals = np.linalg.eigvalsh(INDEFINITE) + d
    assert evals[0] > 0 and res.info["scale"] > evals[-1]
    assert res.converged and res.residual <= 10 * t
    true_res = _true_residual(INDEFINITE, res.x, b, d)
    assert true_res <= 10 * t
    assert _rel(res.x, _exact(INDEFINITE, b, d)) <= 2 * (evals[-1] / evals[0]) * true_res
    # the residual of x_j / s is (I - (A + d I) / s)^j b: the predicted count is a bound
    assert res.iterations <= 1.02 * res.info["predicted_iterations"] + 2


def test_lissa_refuses_an_indefinite_system_and_a_diverging_scale():
    b = _rhs(LIKE)
    with pytest.raises(ValueError, match="lissa.*indefinite"):
        solve(_op(INDEFINITE), b, method="lissa", damping=0.1)
    with pytest.raises(ValueError, match="scale must be >"):
        solve(_op(SPD, is_psd=True), b, method="lissa", damping=0.1, scale=1.0)


# -- auto damping on indefinite operators -------------------------------------------------


@pytest.mark.parametrize("spectrum", [
    np.linspace(-0.5, 3.0, N_DENSE),          # mildly indefinite
    np.linspace(-30.0, 1.0, N_DENSE),         # dominated by negative curvature
    np.concatenate([[-1e-3], np.geomspace(1e-2, 10.0, N_DENSE - 1)]),  # barely indefinite
    -np.geomspace(0.1, 2.0, N_DENSE),         # negative definite
])
def test_auto_damping_never_produces_an_indefinite_system(spectrum):
    mat = _matrix(spectrum, seed=7)
    lam = np.linalg.eigvalsh(mat)
    b = _rhs(LIKE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolveWarning)
        res = solve(_op(mat), b, method="cg", damping="auto")
    rho = max(abs(lam[0]), abs(lam[-1]))
    assert lam[0] + res.damping >= 0.09 * max(0.0, -lam[0]) + 0.9e-3 * rho
    assert res.damping == pytest.approx(1e-3 * rho + 1.1 * max(0.0, -lam[0]), rel=1e-3)
    assert res.converged and not any("indefinite" in w for w in res.warnings)


@pytest.mark.slow
def test_auto_damping_on_an_indefinite_mlp_hessian():
    ad, batch = model_case("mlp", "float64" if X64 else "float32")
    H = gj.hessian(ad.loss_fn, ad.params, batch)
    lam = np.linalg.eigvalsh(dense_hessian(ad.loss_fn, ad.params, batch).astype(np.float64))
    assert lam[0] < 0  # the test needs an indefinite Hessian
    b = jax.tree_util.tree_map(jnp.ones_like, ad.params)
    res = solve(H, b, method="cg", damping="auto")
    assert lam[0] + res.damping > 0 and res.converged
    assert res.info["lambda_min"] == pytest.approx(lam[0], rel=tol(1e-3, 1e-2))
    assert auto_damping(H) == pytest.approx(res.damping, rel=1e-6)


def test_given_damping_below_lambda_min_warns_indefinite():
    b = _rhs(LIKE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = solve(_op(INDEFINITE), b, method="cg", damping=0.1)
    assert any("indefinite" in w for w in res.warnings)
    assert any(issubclass(w.category, SolveWarning) and "indefinite" in str(w.message)
               for w in caught)


def test_not_converged_warns_and_says_so():
    b = _rhs(LIKE)
    bounds = SpectralBounds(4.0, None, 0, True)
    with pytest.warns(SolveWarning, match="did not converge|stopped after"):
        res = solve(_op(SPD, is_psd=True), b, method="cg", damping=1e-3, maxiter=2,
                    bounds=bounds)
    assert not res.converged and res.iterations == 2
    assert res.residual == pytest.approx(_true_residual(SPD, res.x, b, 1e-3), rel=1e-3)


def test_spectral_bounds_match_dense_eigenvalues():
    sb = spectral_bounds(_op(INDEFINITE))
    lam = np.linalg.eigvalsh(INDEFINITE)
    assert sb.lambda_min == pytest.approx(lam[0], rel=tol(1e-6, 1e-4))
    assert sb.lambda_max == pytest.approx(lam[-1], rel=tol(1e-6, 1e-4))
    psd = spectral_bounds(_op(SPD, is_psd=True))
    assert psd.lambda_min is None and psd.lambda_max == pytest.approx(4.0, rel=1e-4)


# -- preconditioned CG ---------------------------------------------------------------------


def test_diagonal_preconditioner_gives_the_same_solution():
    b = _rhs(LIKE)
    diag = _unflat(np.diag(SPD), LIKE)
    bounds = SpectralBounds(4.0, None, 0, True)
    res = solve(_op(SPD, is_psd=True), b, method="cg", damping=1e-2, preconditioner=diag,
                tol=tol(1e-12, 1e-6), bounds=bounds)
    assert res.converged and res.info["preconditioner"] == "diagonal"
    assert _rel(res.x, _exact(SPD, b, 1e-2)) <= tol(1e-8, 1e-3)
    bad = _unflat(-np.ones(N_DENSE), LIKE)
    with pytest.raises(ValueError, match="preconditioner.*> 0"):
        solve(_op(SPD, is_psd=True), b, method="cg", damping=1e-2, preconditioner=bad,
              bounds=bounds)


# -- K-FAC / EK-FAC on one Dense layer -----------------------------------------------------


def _dense_model(p, batch):
    return batch["inputs"] @ p["w"] + p["b"]


def _layer_case(n, seed=0):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.standard_normal((4, 3)), FLOAT),
              "b": jnp.asarray(rng.standard_normal(3), FLOAT)}
    batch = {"inputs": jnp.asarray(rng.standard_normal((n, 4)), FLOAT),
             "labels": jnp.asarray(rng.integers(0, 3, n))}
    return params, batch


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_kfac_and_ekfac_are_exact_on_one_dense_layer_with_one_example(method):
    params, batch = _layer_case(1)
    G = gj.ggn(_dense_model, CE, params, batch)
    approx = (kfac if method == "kfac" else ekfac)(_dense_model, CE, params, batch)
    b = _rhs(params, seed=4)
    d = 1e-2
    res = solve(G, b, method=method, damping=d, approx=approx)
    ggn = dense_ggn(_dense_model, CE, params, batch).astype(np.float64)
    assert _rel(res.x, _exact(ggn, b, d)) <= tol(1e-8, 1e-3)
    assert res.residual <= tol(1e-10, 1e-4) and res.iterations == 0 and res.converged
    # op itself may be the approximation
    assert solve(approx, b, method=method, damping=d).residual <= tol(1e-10, 1e-4)


def test_kfac_residual_measures_the_approximation_against_the_real_operator():
    params, batch = _layer_case(8)
    G = gj.ggn(_dense_model, CE, params, batch)
    K = kfac(_dense_model, CE, params, batch)
    b, d = _rhs(params, seed=4), 1e-2
    res = solve(G, b, method="kfac", damping=d, approx=K)
    ggn = dense_ggn(_dense_model, CE, params, batch).astype(np.float64)
    kd = np.asarray(K.to_dense(), np.float64)
    assert _rel(res.x, _exact(kd, b, d)) <= tol(1e-8, 1e-4)  # the K-FAC inverse ...
    assert res.residual == pytest.approx(_true_residual(ggn, res.x, b, d), rel=1e-4)
    assert res.residual > 1e-2  # ... of an approximation: the residual shows it
    with pytest.warns(SolveWarning, match="approximation"):
        assert not solve(G, b, method="kfac", damping=d, approx=K, tol=1e-6).converged


def test_cg_with_kfac_preconditioner_converges_faster():
    params, batch = _layer_case(8)
    G = gj.ggn(_dense_model, CE, params, batch)
    K = kfac(_dense_model, CE, params, batch)
    b, d = _rhs(params, seed=4), 1e-3
    bounds = SpectralBounds(1.0, None, 0, True)
    plain = solve(G, b, method="cg", damping=d, tol=tol(1e-10, 1e-5), bounds=bounds)
    pre = solve(G, b, method="cg", damping=d, tol=tol(1e-10, 1e-5), preconditioner=K,
                bounds=bounds)
    ggn = dense_ggn(_dense_model, CE, params, batch).astype(np.float64)
    assert pre.converged and pre.info["preconditioner"] == "kfac_inverse"
    assert _rel(pre.x, _exact(ggn, b, d)) <= tol(1e-6, 1e-2)
    assert pre.iterations < plain.iterations


def _pseudo_fisher(params, batch):
    """``sum_{n,k} g_nk g_nk^T`` with ``g_nk = grad <u_nk, f(x_n)>`` (explicit loop)."""
    out = _dense_model(params, batch)
    u = np.asarray(_cotangents(_Config(CE, "type-2", "expand", 1), out, batch, None))
    rows = []
    for k in range(u.shape[0]):
        for n in range(u.shape[1]):
            ex = jax.tree_util.tree_map(lambda a, n=n: a[n:n + 1], batch)
            uk = jnp.asarray(u[k, n], FLOAT)
            g = jax.grad(lambda p, ex=ex, uk=uk: jnp.sum(_dense_model(p, ex)[0] * uk))(params)
            rows.append(_flat(g))
    rows = np.stack(rows)
    return rows.T @ rows


@pytest.mark.parametrize("seq", [False, True])
def test_ekfac_eigenvalues_are_the_pseudo_fisher_diagonal_in_the_kfac_basis(seq):
    """``S[i, j] = q_ij^T F q_ij`` with ``q_ij = Q_A[:, i] Q_B[:, j]^T`` (George et al.); for
    one position per example ``F`` is the GGN, and EK-FAC is closer to it than K-FAC."""
    rng = np.random.default_rng(3)
    params, batch = _layer_case(6, seed=3)
    if seq:  # two positions per example
        batch = {"inputs": jnp.asarray(rng.standard_normal((6, 2, 4)), FLOAT),
                 "labels": jnp.asarray(rng.integers(0, 3, (6, 2)))}
    E = ekfac(_dense_model, CE, params, batch)
    assert isinstance(E, EKFACOperator) and E.is_psd
    (name, f), = E.factors.items()
    s = np.asarray(E.scales[name], np.float64)
    qa, qb = np.asarray(f.a_evecs, np.float64), np.asarray(f.b_evecs, np.float64)
    fisher = _pseudo_fisher(params, batch)
    ref = np.zeros_like(s)
    for i in range(qa.shape[1]):
        for j in range(qb.shape[1]):
            m = np.outer(qa[:, i], qb[:, j])
            q = _flat({"b": m[4], "w": m[:4]})  # ravel order: "b" before "w"
            ref[i, j] = q @ fisher @ q
    np.testing.assert_allclose(s, ref, rtol=tol(1e-10, 1e-4), atol=tol(1e-14, 1e-7))
    if not seq:
        ggn = dense_ggn(_dense_model, CE, params, batch).astype(np.float64)
        np.testing.assert_allclose(fisher, ggn, atol=tol(1e-12, 1e-5))
        ed = np.asarray(E.to_dense(), np.float64)
        kd = np.asarray(E.kfac().to_dense(), np.float64)
        assert np.linalg.norm(ed - ggn) <= np.linalg.norm(kd - ggn)
    d = 0.1
    v = _rhs(params, seed=9)
    back = E.inverse(d) @ jax.tree_util.tree_map(lambda a, b: a + d * b, E @ v, v)
    assert _rel(back, _flat(v)) <= tol(1e-10, 1e-5)


# -- jit ----------------------------------------------------------------------------------


def test_solve_inside_jit_matches_eager():
    b = _rhs(LIKE)
    op = _op(SPD, is_psd=True)
    bounds = SpectralBounds(4.0, None, 0, True)
    eig = gj.top_eigenpairs(op, N_DENSE)

    @jax.jit
    def run(op, b):
        return (solve(op, b, method="cg", damping=0.05).x,
                solve(op, b, method="lissa", damping=0.05, scale=5.0, maxiter=3000).x,
                solve(op, b, method="arnoldi", damping=0.05, eigenpairs=eig).residual)

    x_cg, x_lissa, res_arnoldi = run(op, b)
    eager = solve(op, b, method="cg", damping=0.05, bounds=bounds)
    ref = _exact(SPD, b, 0.05)
    assert _rel(x_cg, _flat(eager.x)) <= tol(1e-12, 1e-5)
    assert _rel(x_lissa, ref) <= tol(1e-6, 1e-3)
    assert float(res_arnoldi) <= tol(1e-10, 1e-4)
    with pytest.raises(ValueError, match="auto"):
        jax.jit(lambda op, b: solve(op, b, damping="auto").x)(op, b)


# -- bad input ----------------------------------------------------------------------------


def test_bad_input_raises_naming_the_argument():
    op, b = _op(SPD, is_psd=True), _rhs(LIKE)
    bounds = SpectralBounds(4.0, None, 0, True)
    kw = dict(bounds=bounds)
    with pytest.raises(ValueError, match="method must be one of"):
        solve(op, b, method="newton", **kw)
    with pytest.raises(ValueError, match="damping must be >= 0"):
        solve(op, b, damping=-1.0, **kw)
    with pytest.raises(ValueError, match="damping must be > 0"):
        solve(op, b, method="arnoldi", damping=0.0, **kw)
    with pytest.raises(ValueError, match="damping must be a number >= 0 or 'auto'"):
        solve(op, b, damping="big", **kw)
    with pytest.raises(ArgumentTypeError, match="damping must be a real number"):
        solve(op, b, damping=True, **kw)
    with pytest.raises(ValueError, match="b leaf"):
        solve(op, {"a": b["a"], "b": b["b"][:3]}, **kw)
    with pytest.raises(ValueError, match="b has zero norm"):
        solve(op, jax.tree_util.tree_map(jnp.zeros_like, b), **kw)
    with pytest.raises(FloatingPointError, match="b is not finite"):
        solve(op, jax.tree_util.tree_map(lambda x: x * jnp.nan, b), **kw)
    with pytest.raises(ValueError, match="rank applies to method='arnoldi' only"):
        solve(op, b, method="cg", rank=3, **kw)
    with pytest.raises(ValueError, match="x0 applies to method='cg' only"):
        solve(op, b, method="lissa", x0=b, **kw)
    with pytest.raises(ValueError, match="tol must be > 0"):
        solve(op, b, tol=0.0, **kw)
    with pytest.raises(ValueError, match="maxiter must be >= 1"):
        solve(op, b, maxiter=0, **kw)
    with pytest.raises(ArgumentTypeError, match="maxiter must be an integer"):
        solve(op, b, maxiter=2.5, **kw)
    with pytest.raises(ValueError, match="rank must be <= 12"):
        solve(op, b, method="arnoldi", damping=0.1, rank=13, **kw)
    with pytest.raises(ValueError, match="approx="):
        solve(op, b, method="kfac", damping=0.1, **kw)
    with pytest.raises(ArgumentTypeError, match="approx for method='ekfac'"):
        solve(op, b, method="ekfac", damping=0.1, approx=op, **kw)
    with pytest.raises(ArgumentTypeError, match="op must be a gradience_jax.LinearOperator"):
        solve(np.eye(3), b)
    with pytest.raises(ArgumentTypeError, match="bounds must be a SpectralBounds"):
        solve(op, b, bounds=(0.0, 1.0))
    nan_op = _op(np.where(np.eye(N_DENSE) > 0, np.nan, SPD), is_psd=True)
    with pytest.raises(FloatingPointError, match="non-finite residual"):
        solve(nan_op, b, damping=0.1, **kw)
