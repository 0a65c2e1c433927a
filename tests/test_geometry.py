"""Fisher geometry against dense float64 references on a small MLP (GGN and K-FAC)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from helpers import model_case, rel_err

import gradience_jax as gj
from gradience_jax import geometry as geo
from gradience_jax.operators.kfac import kfac

LAM = 1e-2


@pytest.fixture(scope="module")
def case():
    ad, batch = model_case("mlp")
    ops = {
        "ggn": gj.ggn(ad.model_fn, ad.head, ad.params, batch),
        "kfac": kfac(ad.model_fn, ad.head, ad.params, batch, check=False),
    }
    dense = {name: np.asarray(op.to_dense(), np.float64) for name, op in ops.items()}
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
    assert rel_err(gj.tree.ravel(op @ v0), top.values[0] * gj.tree.ravel(v0)) <= 1e-8
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
                                  method="matrix-free", tol=1e-10)
    assert est.cg_max_residual <= 1e-8
    assert abs(est.value - exact) <= 3 * est.stderr


def test_matrix_free_paths_agree_with_dense(case):
    _, _, ops, dense, _ = case
    evals = np.linalg.eigvalsh(dense["ggn"])
    cond = geo.condition_number(ops["ggn"], LAM, key=jax.random.key(0), method="matrix-free")
    assert "lam_min=0 assumed" in cond.method
    assert cond.kappa == pytest.approx((evals[-1] + LAM) / LAM, rel=1e-8)
    # one Lanczos program (the GGN's) serves both sides; K-FAC vs GGN is compared densely below
    mf = geo.compare_curvature(ops["ggn"], ops["ggn"], k=3, key=jax.random.key(2),
                               method="matrix-free", num_samples=10)
    assert mf.method == "matrix-free" and mf.rel_frobenius_error_blocks is None
    np.testing.assert_allclose(mf.top_reference, evals[::-1][:3], rtol=1e-8)  # Lanczos
    assert mf.top_eigenvalue_ratio == pytest.approx(1.0, rel=1e-10)
    assert mf.subspace_overlap == pytest.approx(1.0, abs=1e-6)
    assert mf.rel_frobenius_error == 0.0


def test_natural_gradient_cg_equals_dense_solve(case):
    _, _, ops, dense, grad = case
    g = np.asarray(gj.tree.ravel(grad), np.float64)
    x = np.linalg.solve(dense["ggn"] + LAM * np.eye(len(g)), g)
    ng = geo.natural_gradient(ops["ggn"], grad, LAM, tol=1e-12)
    assert ng.converged and ng.residual <= 1e-11 and 0 < ng.iterations <= 2 * len(g)
    assert rel_err(gj.tree.ravel(ng.direction), x) <= 1e-9
    assert ng.alignment == pytest.approx(g @ x / np.linalg.norm(g) / np.linalg.norm(x), rel=1e-9)
    assert 0.0 < ng.alignment <= 1.0
    # K-FAC as a preconditioner: the same solution
    pre = ops["kfac"].inverse(LAM)
    ng_pre = geo.natural_gradient(ops["ggn"], grad, LAM, tol=1e-12, preconditioner=pre)
    assert ng_pre.converged and rel_err(gj.tree.ravel(ng_pre.direction), x) <= 1e-9
    # the natural gradient in the K-FAC metric, by CG, equals K's damped inverse
    ng_k = geo.natural_gradient(ops["kfac"], grad, LAM, tol=1e-12)
    assert rel_err(gj.tree.ravel(ng_k.direction), gj.tree.ravel(pre @ grad)) <= 1e-9


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
    assert geo_tr.trace == pytest.approx(float(est.estimate), rel=1e-12)
    assert geo_tr.trace_sq == pytest.approx(float(sq.estimate), rel=1e-12)
    other = gj.hutchinson_trace(op, jax.random.key(6), num_samples=12)
    assert float(other.estimate) != pytest.approx(float(est.estimate), rel=1e-12)
