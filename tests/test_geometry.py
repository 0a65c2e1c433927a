"""Fisher geometry against dense float64 references on a small MLP (GGN and K-FAC)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from helpers import X64, model_case, rel_err, tol

import gradience_jax as gj
from gradience_jax import geometry as geo
from gradience_jax.operators.kfac import kfac

LAM = 1e-2
#: conjugate-gradient tolerance this run's precision can reach (float32: ~1e-6 at best)
CG_TOL = tol(1e-12, 1e-5)


@pytest.fixture(scope="module")
def case():
    # x64 off: the float32 model (the exact paths still compare with float64 algebra on the
    # float32 operator's own dense matrix)
    ad, batch = model_case("mlp", "float64" if X64 else "float32")
    ops = {
        "ggn": gj.ggn(ad.model_fn, ad.head, ad.params, batch),
        "kfac": kfac(ad.model_fn, ad.head, ad.params, batch, check=False),
    }
    dense = {name: np.asarray(op.to_dense(), np.float64) for name, op in ops.items()}
    dense = {name: (m + m.T) / 2 for name, m in dense.items()}
    grad = jax.grad(ad.loss_fn)(ad.params, batch)
    return ad, batch, ops, dense, grad


@pytest.mark.parametrize("name", ["ggn", "kfac"])
def test_traces_exact_and_hutchinson_within_three_stderr(case, name):
    _, _, ops, dense, _ = case
    op, m = ops[name], dense[name]
    tr, tr2 = np.trace(m), np.sum(m * m)
    exact = geo.fisher_trace(op, method="exact")
    assert exact.method == "exact" and exact.trace_stderr == 0.0
    assert abs(exact.trace - tr) <= 1e-10 * tr and abs(exact.trace_sq - tr2) <= 1e-10 * tr2
    assert exact.participation_ratio == pytest.approx(tr**2 / tr2, rel=1e-10)
    est = geo.fisher_trace(op, jax.random.key(5), num_samples=200, method="matrix-free")
    assert est.method == "hutchinson" and est.num_matvecs == 200
    assert 0 < est.trace_stderr and abs(est.trace - tr) <= 3 * est.trace_stderr
    assert 0 < est.trace_sq_stderr and abs(est.trace_sq - tr2) <= 3 * est.trace_sq_stderr


def test_spectrum_condition_number_and_effective_dimension_exact(case):
    _, _, ops, dense, _ = case
    op, evals = ops["ggn"], np.clip(np.linalg.eigvalsh(dense["ggn"]), 0, None)
    top = geo.top_eigenvalues(op, 4, return_eigenvectors=True)
    np.testing.assert_allclose(top.values, evals[::-1][:4], rtol=1e-10)
    v0 = jax.tree_util.tree_map(lambda x: x[0], top.vectors)
    assert rel_err(gj.tree.ravel(op @ v0), top.values[0] * gj.tree.ravel(v0)) <= tol(1e-8, 1e-5)
    cond = geo.condition_number(op, LAM)
    assert cond.method == "exact" and cond.damping == LAM
    assert cond.kappa == pytest.approx((evals[-1] + LAM) / (evals[0] + LAM), rel=1e-8)
    deff = geo.effective_dimension(op, LAM)
    assert deff.value == pytest.approx(np.sum(evals / (evals + LAM)), rel=1e-10)
    assert geo.condition_number(op, 0.0).kappa > 1e8  # rank-deficient GGN, no damping


def test_effective_dimension_hutchinson_cg_within_three_stderr(case):
    _, _, ops, dense, _ = case
    evals = np.clip(np.linalg.eigvalsh(dense["ggn"]), 0, None)
    exact = float(np.sum(evals / (evals + LAM)))
    est = geo.effective_dimension(ops["ggn"], LAM, key=jax.random.key(1), num_samples=60,
                                  method="matrix-free", tol=tol(1e-10, 1e-5))
    assert est.cg_max_residual <= tol(1e-8, 1e-4)
    assert abs(est.value - exact) <= 3 * est.stderr


def test_matrix_free_paths_agree_with_dense(case):
    _, _, ops, dense, _ = case
    evals = np.linalg.eigvalsh(dense["ggn"])
    cond = geo.condition_number(ops["ggn"], LAM, key=jax.random.key(0), method="matrix-free")
    assert "lam_min=0 assumed" in cond.method
    assert cond.kappa == pytest.approx((evals[-1] + LAM) / LAM, rel=tol(1e-8, 1e-5))
    # one Lanczos program (the GGN's) serves both sides; K-FAC vs GGN is compared densely below
    mf = geo.compare_curvature(ops["ggn"], ops["ggn"], k=3, key=jax.random.key(2),
                               method="matrix-free", num_samples=10)
    assert mf.method == "matrix-free" and mf.rel_frobenius_error_blocks is None
    np.testing.assert_allclose(mf.top_reference, evals[::-1][:3], rtol=tol(1e-8, 1e-5))  # Lanczos
    # two Lanczos runs (different keys) of one operator: equal to the run's precision
    assert mf.top_eigenvalue_ratio == pytest.approx(1.0, rel=tol(1e-10, 1e-5))
    assert mf.subspace_overlap == pytest.approx(1.0, abs=tol(1e-6, 1e-4))
    assert mf.rel_frobenius_error == 0.0


def test_natural_gradient_cg_equals_dense_solve(case):
    _, _, ops, dense, grad = case
    g = np.asarray(gj.tree.ravel(grad), np.float64)
    x = np.linalg.solve(dense["ggn"] + LAM * np.eye(len(g)), g)
    ng = geo.natural_gradient(ops["ggn"], grad, LAM, tol=CG_TOL)
    assert ng.converged and ng.residual <= 10 * CG_TOL and 0 < ng.iterations <= 2 * len(g)
    # kappa(GGN + LAM) ~ 1e3: the solution is accurate to kappa x the residual
    assert rel_err(gj.tree.ravel(ng.direction), x) <= tol(1e-9, 2e-2)
    assert ng.alignment == pytest.approx(g @ x / np.linalg.norm(g) / np.linalg.norm(x),
                                         rel=tol(1e-9, 1e-3))
    assert 0.0 < ng.alignment <= 1.0
    # K-FAC as a preconditioner: the same solution
    pre = ops["kfac"].inverse(LAM)
    ng_pre = geo.natural_gradient(ops["ggn"], grad, LAM, tol=CG_TOL, preconditioner=pre)
    assert ng_pre.converged and rel_err(gj.tree.ravel(ng_pre.direction), x) <= tol(1e-9, 2e-2)
    # the natural gradient in the K-FAC metric, by CG, equals K's damped inverse
    ng_k = geo.natural_gradient(ops["kfac"], grad, LAM, tol=CG_TOL)
    assert rel_err(gj.tree.ravel(ng_k.direction), gj.tree.ravel(pre @ grad)) <= tol(1e-9, 2e-2)


def test_cg_that_stops_early_reports_residual_and_warns(case):
    _, _, ops, _, grad = case
    with pytest.warns(geo.CGNotConvergedWarning, match="relative residual"):
        ng = geo.natural_gradient(ops["ggn"], grad, LAM, tol=1e-12, maxiter=2)
    assert not ng.converged and ng.iterations == 2 and ng.residual > 1e-6


def test_nonpositive_damping_raises_where_an_inverse_is_needed(case):
    _, _, ops, _, grad = case
    for bad in (0.0, -1e-3, float("inf")):
        with pytest.raises(ValueError, match="damping"):
            geo.natural_gradient(ops["ggn"], grad, bad)
        with pytest.raises(ValueError, match="damping"):
            geo.effective_dimension(ops["ggn"], bad)
    with pytest.raises(ValueError, match="damping"):
        geo.condition_number(ops["ggn"], -1.0)
    with pytest.raises(ValueError, match="zero norm"):
        geo.natural_gradient(ops["ggn"], gj.tree.zeros_like(grad), LAM)
    with pytest.raises(ValueError, match="key"):
        geo.fisher_trace(ops["ggn"], method="matrix-free")
    with pytest.raises(ValueError, match="method"):
        geo.fisher_trace(ops["ggn"], method="dense")


def test_compare_curvature_kfac_vs_ggn(case):
    ad, _, ops, dense, _ = case
    same = geo.compare_curvature(ops["ggn"], ops["ggn"], k=3)
    assert same.top_eigenvalue_ratio == pytest.approx(1.0)
    assert same.subspace_overlap == pytest.approx(1.0, abs=1e-8)
    assert same.rel_frobenius_error == 0.0 and same.rel_frobenius_error_blocks is None
    cmp = geo.compare_curvature(ops["kfac"], ops["ggn"], k=3)
    k_ev, g_ev = np.linalg.eigvalsh(dense["kfac"]), np.linalg.eigvalsh(dense["ggn"])
    assert cmp.top_eigenvalue_ratio == pytest.approx(k_ev[-1] / g_ev[-1], rel=1e-10)
    assert 0.0 <= cmp.subspace_overlap <= 1.0 + 1e-12
    assert cmp.rel_frobenius_error == pytest.approx(rel_err(dense["kfac"], dense["ggn"]))
    # the block error against a dense float64 reference on K-FAC's own blocks
    mask = geo._block_mask(ops["kfac"].params_like, ops["kfac"].coverage.blocks)
    ref_b = np.where(mask, dense["ggn"], 0.0)
    assert cmp.rel_frobenius_error_blocks == pytest.approx(
        rel_err(np.where(mask, dense["kfac"], 0.0), ref_b), rel=tol(1e-10, 1e-6))
    if X64:  # a property of this model (x64 off draws another batch, see helpers._mlp)
        assert cmp.rel_frobenius_error_blocks < cmp.rel_frobenius_error
    json.dumps(cmp.to_dict())


def test_fisher_geometry_report_is_json_safe(case):
    _, _, ops, dense, grad = case
    rep = geo.fisher_geometry(ops["kfac"], grad, damping=LAM, k=3)
    d = rep.to_dict()
    json.dumps(d)
    assert d["operator"] == "kfac" and d["trace"] == pytest.approx(np.trace(dense["kfac"]))
    assert d["cg_converged"] and 0 < d["natural_gradient_alignment"] <= 1
    assert len(d["top_eigenvalues"]) == 3 and d["condition_number"] >= 1.0


@pytest.mark.parametrize("limit_kw", ["dense_limit", "max_exact"])
def test_dense_cutoff_one_name_old_name_accepted(case, limit_kw):
    _, _, ops, dense, _ = case
    op = ops["ggn"]
    exact = geo.fisher_trace(op, None, **{limit_kw: op.n_params})  # dense: no key needed
    assert exact.method == "exact"
    assert abs(exact.trace - np.trace(dense["ggn"])) <= 1e-10 * np.trace(dense["ggn"])
    with pytest.raises(ValueError, match="key is required"):
        geo.fisher_trace(op, None, **{limit_kw: op.n_params - 1})  # now matrix-free


def test_cg_lives_in_solvers_and_geometry_reexports_it():
    from gradience_jax import solvers

    assert geo.conjugate_gradient is solvers.conjugate_gradient
    assert geo.CGResult is solvers.CGResult


def test_same_key_same_probes_in_geometry_and_estimators(case):
    _, _, ops, _, _ = case
    op, key = ops["ggn"], jax.random.key(5)
    geo_tr = geo.fisher_trace(op, key, num_samples=12, method="matrix-free")
    est = gj.hutchinson_trace(op, key, num_samples=12)
    sq = gj.trace_of_square(op, key, num_samples=12)
    assert geo_tr.trace == pytest.approx(float(est.estimate), rel=tol(1e-12, 1e-6))
    assert geo_tr.trace_sq == pytest.approx(float(sq.estimate), rel=tol(1e-12, 1e-6))
    other = gj.hutchinson_trace(op, jax.random.key(6), num_samples=12)
    assert float(other.estimate) != pytest.approx(float(est.estimate), rel=1e-3)


def _nan_like(op):
    return gj.from_matvec(lambda v: jax.tree_util.tree_map(lambda x: x * np.nan, v),
                          op.params_like, name="diverged", is_psd=True)


@pytest.mark.parametrize("method", ["exact", "matrix-free"])
def test_nonfinite_operator_raises_in_every_metric(case, method):
    _, _, ops, _, grad = case
    bad, key = _nan_like(ops["ggn"]), jax.random.key(0)
    kw = dict(method=method, key=key)
    where = "dense matrix is not finite" if method == "exact" else "probe 0 of"
    with pytest.raises(FloatingPointError, match=f"fisher_trace.*{where}"):
        geo.fisher_trace(bad, num_samples=4, **kw)
    with pytest.raises(FloatingPointError, match="effective_dimension"):
        geo.effective_dimension(bad, LAM, num_samples=4, **kw)
    with pytest.raises(FloatingPointError, match="non-finite|not finite"):
        geo.condition_number(bad, LAM, **kw)
    with pytest.raises(FloatingPointError, match="non-finite|not finite"):
        geo.top_eigenvalues(bad, 2, **kw)
    with pytest.raises(FloatingPointError, match="compare_curvature|non-finite|not finite"):
        geo.compare_curvature(bad, ops["ggn"], k=2, num_samples=4, **kw)
    with pytest.raises(FloatingPointError, match="natural_gradient"), pytest.warns(
            geo.CGNotConvergedWarning):  # CG warns first, then the result is refused
        geo.natural_gradient(bad, grad, LAM, maxiter=3)


def test_geometry_bad_arguments_name_the_argument(case):
    _, _, ops, _, grad = case
    op, key = ops["ggn"], jax.random.key(0)
    with pytest.raises(TypeError, match="op must be a gradience_jax.LinearOperator"):
        geo.fisher_trace(np.eye(3))
    with pytest.raises(ValueError, match="op must be"):  # ArgumentTypeError: both kinds
        geo.condition_number(None, LAM)
    with pytest.raises(TypeError, match="damping must be a real number"):
        geo.natural_gradient(op, grad, "0.1")
    with pytest.raises(TypeError, match="key must be a PRNG key, got the int 3"):
        geo.fisher_trace(op, 3, method="matrix-free")
    with pytest.raises(ValueError, match="key must be a single PRNG key"):
        geo.effective_dimension(op, LAM, key=jax.random.split(key, 2), method="matrix-free")
    with pytest.raises(ValueError, match="num_samples must be >= 2, got 0"):
        geo.effective_dimension(op, LAM, num_samples=0, method="matrix-free", key=key)
    with pytest.raises(TypeError, match="num_samples must be an integer"):
        geo.fisher_trace(op, key, num_samples="10", method="matrix-free")
    with pytest.raises(TypeError, match="k must be an integer"):
        geo.top_eigenvalues(op, "3")
    with pytest.raises(ValueError, match="k must be <= n_params"):
        geo.top_eigenvalues(op, op.n_params + 1)
    with pytest.raises(ValueError, match="lam_min must be finite"):
        geo.condition_number(op, LAM, lam_min=float("nan"), method="matrix-free", key=key)
    with pytest.raises(ValueError, match="tol must be > 0"):
        geo.effective_dimension(op, LAM, tol=0.0)
    with pytest.raises(ValueError, match="dense_limit must be >= 0"):
        geo.fisher_trace(op, key, dense_limit=-1)
