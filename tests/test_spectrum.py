"""eigsh / compute_spectrum against dense float64 eigh; quality checks; fast path; bad input.

All dense cases share n=120, k=5 and the iteration settings, so each reorth mode compiles
its programs once for the whole file.
"""

from __future__ import annotations

import importlib.util
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import strict_dtype_promotion, tree_dense_op
from jax.flatten_util import ravel_pytree

import gradience_jax as gj
from gradience_jax.spectrum import LanczosConfig, compute_spectrum, eigsh, eigsh_fast

strict_promotion = pytest.fixture(autouse=True, scope="module")(strict_dtype_promotion)

N = 120
K = 5
MODES = ("full", "window", "none")
RUN = dict(chunk=40, window=10)  # default matvec caps


LIKE = {"w": jnp.zeros((10, 10)), "b": jnp.zeros((20,))}  # 120 entries


def tree_op(matrix, is_psd=False, name="tree"):
    """A dict-of-arrays operator with a dense matrix behind it."""
    return tree_dense_op(matrix, LIKE, is_psd=is_psd, name=name)


def _orth(seed):
    return np.linalg.qr(np.random.default_rng(seed).standard_normal((N, N)))[0]


def _from_eigs(ev, seed):
    q = _orth(seed)
    a = (q * ev) @ q.T
    return (a + a.T) / 2


def make_matrix(kind):
    rng = np.random.default_rng(MATRICES.index(kind) + 10)
    if kind == "random":
        g = rng.standard_normal((N, N))
        return (g + g.T) / np.sqrt(2 * N)
    if kind == "clustered":  # 5 top eigenvalues within 1e-6
        ev = np.concatenate([np.linspace(-1.0, 1.0, N - 5), 3.0 + 2.5e-7 * np.arange(5)])
        return _from_eigs(ev, 1)
    if kind == "psd_lowrank":
        u = rng.standard_normal((N, 6))
        g = rng.standard_normal((N, N))
        return u @ np.diag([10.0, 8.0, 6.0, 4.0, 3.0, 2.0]) @ u.T / N + 1e-2 * g @ g.T / N
    if kind == "indefinite":
        ev = np.concatenate([np.linspace(-5.0, -0.5, N // 2), np.linspace(0.1, 3.0, N - N // 2)])
        return _from_eigs(ev, 2)
    raise KeyError(kind)


MATRICES = ("random", "clustered", "psd_lowrank", "indefinite")


@pytest.fixture(scope="module")
def dense():
    return {kind: make_matrix(kind) for kind in MATRICES}


def expected(ref_sorted, which, k=K):
    if which == "LA":
        return ref_sorted[::-1][:k]
    if which == "SA":
        return ref_sorted[:k]
    return np.concatenate([ref_sorted[: k // 2], ref_sorted[len(ref_sorted) - (k - k // 2) :]])


@pytest.mark.parametrize("reorth", MODES)
@pytest.mark.parametrize("kind", MATRICES)
def test_eigsh_matches_dense_eigh(dense, kind, reorth):
    a = dense[kind]
    ref = np.linalg.eigvalsh(a)
    op = tree_op(a)
    for which in ("LA", "SA", "BE"):
        res = eigsh(op, k=K, which=which, reorth=reorth, **RUN)
        want = expected(ref, which)
        if reorth != "none":  # "none" reaches the accuracy, its bounds may stay above tol
            assert res.converged, (which, res.warnings)
        atol = 1e-8 * max(1, abs(ref).max())
        np.testing.assert_allclose(res.eigenvalues, want, rtol=0, atol=atol)
        assert not any("ghost" in w for w in res.warnings), res.warnings


def _mlp_case():
    rng = np.random.default_rng(0)
    params = {
        "l1": {"w": jnp.asarray(rng.standard_normal((4, 6)) * 0.8), "b": jnp.zeros(6)},
        "l2": {"w": jnp.asarray(rng.standard_normal((6, 3)) * 0.8), "b": jnp.zeros(3)},
    }
    batch = {
        "inputs": jnp.asarray(rng.standard_normal((16, 4))),
        "labels": jnp.asarray(rng.integers(0, 3, 16)),
    }
    return params, batch


def mlp_model(params, batch):
    # explicit cast (strict promotion): compute_spectrum upcasts bf16 params for the Hessian,
    # not the batch
    x = batch["inputs"].astype(params["l1"]["w"].dtype)
    h = jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"])
    return h @ params["l2"]["w"] + params["l2"]["b"]


HEAD = gj.heads.softmax_cross_entropy()


def mlp_loss(params, batch):
    return HEAD(mlp_model(params, batch), batch)


MLP_RUN = dict(k=4, max_iters=40)  # the settings compute_spectrum uses below: shared programs


@pytest.fixture(scope="module")
def mlp_ops():
    params, batch = _mlp_case()
    ops = {"hessian": gj.hessian(mlp_loss, params, batch),
           "ggn": gj.ggn(mlp_model, HEAD, params, batch)}
    refs = {name: np.linalg.eigvalsh(np.asarray(op.to_dense(), np.float64))
            for name, op in ops.items()}
    return ops, refs


@pytest.mark.parametrize("reorth", MODES)
def test_eigsh_on_mlp_hessian_and_ggn(mlp_ops, reorth):
    ops, refs = mlp_ops
    cases = (("hessian", ("LA", "SA")), ("ggn", ("LA",)))
    if reorth == "none":  # keep the compile budget: GGN runs with "full" and "window"
        cases = cases[:1]
    for name, whiches in cases:
        ref = refs[name]
        for which in whiches:
            res = eigsh(ops[name], which=which, reorth=reorth, **MLP_RUN)
            scale = max(1.0, abs(ref).max())
            np.testing.assert_allclose(res.eigenvalues, expected(ref, which, 4), atol=1e-8 * scale)


def test_none_without_filter_produces_ghosts_and_warns(dense):
    op = tree_op(dense["clustered"])
    raw = eigsh(op, k=K, reorth="none", filter_ghosts=False, **RUN)
    assert any("ghost" in w for w in raw.warnings), raw.warnings
    # the raw top-5 repeats converged copies instead of the 5 distinct cluster members
    assert len(np.unique(np.round(raw.eigenvalues, 12))) < K
    for reorth in ("window", "full"):
        res = eigsh(op, k=K, reorth=reorth, **RUN)
        assert not any("ghost" in w for w in res.warnings), res.warnings
    filtered = eigsh(op, k=K, reorth="none", **RUN)
    assert filtered.ghosts_removed > 0
    np.testing.assert_allclose(filtered.eigenvalues, np.sort(np.linalg.eigvalsh(
        dense["clustered"]))[::-1][:K], atol=1e-8)


@pytest.mark.parametrize("reorth", MODES)
def test_ritz_residual_bound_and_eigenvectors(dense, reorth):
    a = dense["indefinite"]
    ref_vals, ref_vecs = np.linalg.eigh(a)
    op = tree_op(a)
    res = eigsh(op, k=K, which="LA", reorth=reorth, return_eigenvectors=True, **RUN)
    assert res.true_residuals is not None
    assert np.all(res.ritz_residuals >= res.true_residuals - 1e-10)
    vecs = np.stack([ravel_pytree(v)[0] for v in gj.tree.unstack(res.eigenvectors)])
    assert vecs.shape == (K, N)
    overlap = np.abs(vecs @ ref_vecs[:, ::-1][:, :K])
    np.testing.assert_allclose(np.diag(overlap), 1.0, atol=1e-7)
    expected_calls = res.iterations * (1 if reorth == "full" else 2) + K
    assert res.operator_calls == expected_calls


def test_thick_restart_under_memory_budget(dense):
    a = dense["clustered"]
    ref = np.linalg.eigvalsh(a)
    op = tree_op(a)
    budget = 24 * N * 8  # 24 stored vectors
    res = eigsh(op, k=K, reorth="full", max_iters=600, memory_budget_bytes=budget,
                return_eigenvectors=True)
    assert res.restarts > 0 and res.converged
    np.testing.assert_allclose(res.eigenvalues, ref[::-1][:K], atol=1e-8)
    assert np.all(res.true_residuals < 1e-8)


def test_deterministic_and_key_dependent(dense):
    op = tree_op(dense["random"])
    r1 = eigsh(op, k=K, num_iters=8, reorth="full", key=jax.random.key(3))
    r2 = eigsh(op, k=K, num_iters=8, reorth="full", key=jax.random.key(3))
    r3 = eigsh(op, k=K, num_iters=8, reorth="full", key=jax.random.key(4))
    np.testing.assert_array_equal(r1.eigenvalues, r2.eigenvalues)
    np.testing.assert_array_equal(r1.ritz_residuals, r2.ritz_residuals)
    assert not np.array_equal(r1.ritz_residuals, r3.ritz_residuals)


def test_quality_warnings_few_iterations_name_the_knob(dense):
    op = tree_op(dense["clustered"])
    res = eigsh(op, k=K, num_iters=8, reorth="full")
    assert not res.converged
    msg = next(w for w in res.warnings if w.startswith("not converged"))
    assert "raise num_iters (now 8)" in msg and "basis_size" in msg
    assert any("< 3k" in w for w in res.warnings)
    res = eigsh(op, k=K, reorth="window", window=4, max_iters=12)
    msg = next(w for w in res.warnings if w.startswith("not converged"))
    assert "raise max_iters" in msg and "use reorth='full'" in msg
    # a symmetric operator measures round-off asymmetry only
    assert res.asymmetry < 1e-12


@pytest.mark.parametrize("reorth", MODES)
def test_asymmetric_operator_stops_early_with_a_clear_error(dense, reorth):
    nonsym = np.asarray(dense["random"]) + 0.05 * np.triu(np.ones((N, N)), 1)
    with pytest.raises(ValueError, match=r"not symmetric.*stopped after (\d) matvecs"):
        eigsh(tree_op(nonsym), k=K, reorth=reorth, max_iters=4000, **{
            k: v for k, v in RUN.items() if k != "max_iters"})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0), "k must"),
        (dict(k=N + 1), "k must"),
        (dict(k=5, num_iters=4), "num_iters"),
        (dict(k=5, reorth="window", window=1), "window"),
        (dict(k=5, which="LR"), "which"),
        (dict(k=5, reorth="partial"), "reorth"),
        (dict(k=5, tol=-1.0), "tol"),
        (dict(k=5, num_iters=N + 1), "exceeds n_params"),
        (dict(k=5, num_iters=N + 1, reorth="window", window=N), "exceeds n_params"),
    ],
)
def test_eigsh_bad_arguments(dense, kwargs, match):
    with pytest.raises(ValueError, match=match):
        eigsh(tree_op(dense["random"]), **kwargs)


@pytest.mark.parametrize("reorth,num_iters,window", [
    ("full", None, None), ("full", 12, None), ("window", None, 12), ("window", 12, 12),
    ("none", 12, None)])
def test_eigsh_exhausting_the_space_is_exact_and_quiet(reorth, num_iters, window):
    # n = 12 iterations span the space: the last beta is round-off, which is the natural end
    # of the recurrence, not a breakdown, and leaves no orthogonality loss behind
    a = np.random.default_rng(3).standard_normal((12, 12))
    a = (a + a.T) / 2
    res = eigsh(gj.from_dense(a), k=3, num_iters=num_iters, reorth=reorth, window=window)
    np.testing.assert_allclose(np.sort(res.eigenvalues), np.linalg.eigvalsh(a)[-3:], rtol=0,
                               atol=1e-12)
    assert res.iterations == 12 and res.breakdowns == 0 and res.converged
    assert res.warnings == ()


@pytest.mark.parametrize("reorth", MODES)
def test_eigsh_low_rank_reports_no_copies(reorth):
    # rank 4 in n = 50: breakdowns restart the recurrence; with a window (or nothing) stored
    # the restarts re-find converged eigenvalues, which must be merged, not reported twice
    rng = np.random.default_rng(4)
    u = np.linalg.qr(rng.standard_normal((50, 4)))[0]
    a = (u * np.array([5.0, 3.0, 2.0, 1.0])) @ u.T
    res = eigsh(gj.from_dense(a), k=3, num_iters=30, reorth=reorth)
    np.testing.assert_allclose(np.sort(res.eigenvalues), [2.0, 3.0, 5.0], rtol=1e-12)
    assert res.breakdowns > 0 and not any("ghost" in w for w in res.warnings)


def test_eigsh_bad_matvecs():
    bad = gj.from_matvec(lambda v: {"w": v["w"]}, LIKE, name="dropper")
    with pytest.raises(ValueError, match="dropper.*structure"):
        eigsh(bad, k=2, num_iters=5)
    nan = gj.from_matvec(lambda v: jax.tree_util.tree_map(lambda x: x * jnp.nan, v), LIKE,
                         name="nanny")
    with pytest.raises(ValueError, match="nanny.*non-finite"):
        eigsh(nan, k=2, num_iters=5)


# -- fast path -----------------------------------------------------------------------------


def test_eigsh_fast_compiles_once_and_warm_starts():
    params, batch = _mlp_case()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def probe(params, v0):
        op = gj.hessian(mlp_loss, params, batch, linearize=True, check=False)
        return eigsh_fast(op, v0, k=2, num_iters=20, reorth="full")

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    out = probe(params, zeros)
    ref = np.linalg.eigvalsh(np.asarray(gj.hessian(mlp_loss, params, batch).to_dense()))
    np.testing.assert_allclose(out.eigenvalues, ref[::-1][:2], atol=1e-8)
    params2 = jax.tree_util.tree_map(lambda x: x * 1.1, params)
    top = jax.tree_util.tree_map(lambda x: x[0], out.eigenvectors)
    out2 = probe(params2, top)  # new params + warm start: no retrace
    ref2 = np.linalg.eigvalsh(np.asarray(gj.hessian(mlp_loss, params2, batch).to_dense()))
    np.testing.assert_allclose(out2.eigenvalues, ref2[::-1][:2], atol=1e-8)
    assert out2.residuals.shape == (2,)


@pytest.mark.parametrize("reorth", ("none",))
def test_eigsh_fast_window_modes_filter_ghosts(dense, reorth):
    op = tree_op(dense["clustered"])
    out = eigsh_fast(op, k=K, num_iters=120, reorth=reorth, window=10)
    ref = np.linalg.eigvalsh(dense["clustered"])
    np.testing.assert_allclose(out.eigenvalues, ref[::-1][:K], atol=1e-8)
    vecs = np.stack([ravel_pytree(v)[0] for v in gj.tree.unstack(out.eigenvectors)])
    a = dense["clustered"]
    resid = np.linalg.norm(vecs @ a - out.eigenvalues[:, None] * vecs, axis=1)
    assert np.all(resid < 1e-6)


# -- compute_spectrum ----------------------------------------------------------------------


def test_compute_spectrum_hessian_fields_json_repr():
    params, batch = _mlp_case()
    cfg = LanczosConfig(k=4, max_iters=40, which="BE")
    res = compute_spectrum(mlp_loss, params, batch, operator="hessian", config=cfg)
    d = res.to_dict()
    json.dumps(d, allow_nan=False)  # strict JSON
    for field in (
        "eigenvalues eigenvectors operator is_psd iterations converged n_params seed reorth_mode "
        "regularization_applied warnings ritz_residuals operator_calls wall_time_s "
        "has_negative_eigenvalues n_negative range_ratio sharpness_score negative_fraction "
        "negative_mass most_negative_eigenvalue"
    ).split():
        assert field in d, field
        assert hasattr(res, field), field
    assert d["operator"] == "hessian" and d["seed"] == 42 and d["reorth_mode"] == "full"
    ref = np.linalg.eigvalsh(np.asarray(gj.hessian(mlp_loss, params, batch).to_dense()))
    np.testing.assert_allclose(res.eigenvalues, expected(ref, "BE", 4), atol=1e-8)
    assert res.has_negative_eigenvalues and res.n_negative == 2
    assert res.most_negative_eigenvalue == pytest.approx(ref[0], abs=1e-8)
    assert "SpectrumResult(hessian" in repr(res) and "eigenvalues" in repr(res)


def test_compute_spectrum_ggn_psd_metrics_and_regularization():
    params, batch = _mlp_case()
    base = compute_spectrum(None, params, batch, operator="ggn", model_fn=mlp_model, head=HEAD,
                            config=LanczosConfig(k=4, max_iters=40))
    assert base.is_psd and base.regularization_applied == 0.0
    d = base.to_dict()
    for field in ("max_eigenvalue", "min_eigenvalue", "spectral_gap", "ritz_condition_number",
                  "ritz_effective_rank"):
        assert field in d
    assert 1.0 <= base.ritz_effective_rank <= 4.0
    fixed = compute_spectrum(None, params, batch, operator="ggn", model_fn=mlp_model, head=HEAD,
                             config=LanczosConfig(k=4, max_iters=40, regularization_mode="fixed",
                                                  regularization=1e-3))
    np.testing.assert_allclose(fixed.eigenvalues, base.eigenvalues + 1e-3, atol=1e-10)
    rel = compute_spectrum(None, params, batch, operator="ggn", model_fn=mlp_model, head=HEAD,
                           config=LanczosConfig(k=4, max_iters=40, regularization_mode="relative",
                                                regularization=1e-2))
    assert rel.regularization_applied == pytest.approx(1e-2 * base.max_eigenvalue)
    hess = compute_spectrum(mlp_loss, params, batch, "hessian",
                            LanczosConfig(k=4, max_iters=40, regularization_mode="fixed"))
    assert hess.regularization_applied == 0.0
    assert any("regularization" in w for w in hess.warnings)


def test_compute_spectrum_bf16_model_matches_float32_twin(mlp_ops):
    params, batch = _mlp_case()
    p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    p32 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), p16)  # the same values
    b16 = {"inputs": batch["inputs"].astype(jnp.bfloat16), "labels": batch["labels"]}
    b32 = {"inputs": b16["inputs"].astype(jnp.float32), "labels": batch["labels"]}
    cfg = LanczosConfig(k=3, max_iters=40)
    # Hessian: bf16 params are upcast, so the bf16 model equals its float32 twin
    h16 = compute_spectrum(mlp_loss, p16, b16, "hessian", cfg)
    h32 = compute_spectrum(mlp_loss, p32, b32, "hessian", cfg)
    assert h16.dtype == "float32" and h32.dtype == "float32"
    np.testing.assert_allclose(h16.eigenvalues, h32.eigenvalues, rtol=1e-5)
    # GGN runs in bf16 (float32 Lanczos vectors and dot products): bf16-level agreement with
    # the float64 reference (a stricter twin than float32)
    g16 = compute_spectrum(None, p16, b16, "ggn", cfg, model_fn=mlp_model, head=HEAD)
    assert g16.dtype == "bfloat16"
    np.testing.assert_allclose(g16.eigenvalues, mlp_ops[1]["ggn"][::-1][:3], rtol=3e-2)


def test_compute_spectrum_bad_input():
    params, batch = _mlp_case()
    with pytest.raises(ValueError, match="operator must be one of"):
        compute_spectrum(mlp_loss, params, batch, operator="jacobian")
    with pytest.raises(ValueError, match="model_fn and head"):
        compute_spectrum(mlp_loss, params, batch, operator="ggn")
    if importlib.util.find_spec("gradience_jax.operators.kfac") is None:
        with pytest.raises(ValueError, match="kfac"):
            compute_spectrum(mlp_loss, params, batch, operator="kfac", model_fn=mlp_model,
                             head=HEAD)
    with pytest.raises(ValueError, match="reorth_mode"):
        LanczosConfig(reorth_mode="selective")
    with pytest.raises(ValueError, match="regularization_mode"):
        LanczosConfig(regularization_mode="always")
    with pytest.raises(ValueError, match="exceeds n_params"):
        compute_spectrum(mlp_loss, params, batch, config=LanczosConfig(k=100))
