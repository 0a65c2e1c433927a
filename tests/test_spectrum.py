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
from helpers import FLOAT, X64, strict_dtype_promotion, tol, tree_dense_op
from jax.flatten_util import ravel_pytree

import gradience_jax as gj
from gradience_jax.lanczos import DEFAULT_WINDOW
from gradience_jax.spectrum import LanczosConfig, compute_spectrum, eigsh, eigsh_fast
from gradience_jax.spectrum.eigsh import VECTOR_RESIDUAL_SLACK

strict_promotion = pytest.fixture(autouse=True, scope="module")(strict_dtype_promotion)

N = 120
K = 5
MODES = ("full", "window", "none")
RUN = dict(chunk=40, window=10)  # default matvec caps
#: eigenvalue accuracy relative to max(1, ||A||): float64, or float32 (x64 off)
EIG = tol(1e-8, 2e-5)
#: spacing of the clustered top eigenvalues: well above the work precision's resolution
#: (10 eps ||A||: 7e-15 with float64, 4e-6 with float32), well below the spectrum's gaps
CLUSTER_GAP = tol(2.5e-7, 2.5e-4)
#: machine epsilon of the Lanczos arithmetic (the work dtype)
EPS_WORK = float(np.finfo(FLOAT).eps)


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


def as_run(a):
    """``a`` as this run's operators hold it (rounded to float32 when x64 is off), in float64:
    the dense references are computed from the very matrix the operator applies."""
    return np.asarray(np.asarray(a, FLOAT), np.float64)


def _make_matrix(kind):
    rng = np.random.default_rng(MATRICES.index(kind) + 10)
    if kind == "random":
        g = rng.standard_normal((N, N))
        return (g + g.T) / np.sqrt(2 * N)
    if kind == "clustered":  # 5 top eigenvalues within 4 CLUSTER_GAP
        ev = np.concatenate([np.linspace(-1.0, 1.0, N - 5), 3.0 + CLUSTER_GAP * np.arange(5)])
        return _from_eigs(ev, 1)
    if kind == "psd_lowrank":
        u = rng.standard_normal((N, 6))
        g = rng.standard_normal((N, N))
        return u @ np.diag([10.0, 8.0, 6.0, 4.0, 3.0, 2.0]) @ u.T / N + 1e-2 * g @ g.T / N
    if kind == "indefinite":
        ev = np.concatenate([np.linspace(-5.0, -0.5, N // 2), np.linspace(0.1, 3.0, N - N // 2)])
        return _from_eigs(ev, 2)
    raise KeyError(kind)


def make_matrix(kind):
    """The test matrix ``kind`` (symmetric, float64 holding this run's precision)."""
    a = as_run(_make_matrix(kind))
    return (a + a.T) / 2  # exact in float32 too: a is symmetric already


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
        atol = EIG * max(1, abs(ref).max())
        warned = any("ghost" in w for w in res.warnings)
        if reorth == "none" and not X64 and warned:
            # float32 without reorthogonalisation, a long run: converged copies of one value
            # can differ by ~100 eps ||A|| (measured on psd_lowrank, BE, 600 steps). The
            # contract: the values are right, or the result says they may be ghosts
            continue
        np.testing.assert_allclose(res.eigenvalues, want, rtol=0, atol=atol)
        assert not warned, res.warnings


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
            np.testing.assert_allclose(res.eigenvalues, expected(ref, which, 4), atol=EIG * scale)


def test_none_without_filter_produces_ghosts_and_warns(dense):
    op = tree_op(dense["clustered"])
    raw = eigsh(op, k=K, reorth="none", filter_ghosts=False, **RUN)
    assert any("ghost" in w for w in raw.warnings), raw.warnings
    # the raw top-5 repeats converged copies instead of the 5 distinct cluster members
    sv = np.sort(raw.eigenvalues)
    assert 1 + np.sum(np.diff(sv) > CLUSTER_GAP / 10) < K  # fewer distinct values than K
    for reorth in ("window", "full"):
        res = eigsh(op, k=K, reorth=reorth, **RUN)
        assert not any("ghost" in w for w in res.warnings), res.warnings
    filtered = eigsh(op, k=K, reorth="none", **RUN)
    assert filtered.ghosts_removed > 0
    np.testing.assert_allclose(filtered.eigenvalues, np.sort(np.linalg.eigvalsh(
        dense["clustered"]))[::-1][:K], atol=EIG * 3)


@pytest.mark.parametrize("reorth", MODES)
def test_ritz_residual_bound_and_eigenvectors(dense, reorth):
    a = dense["indefinite"]
    ref_vals, ref_vecs = np.linalg.eigh(a)
    op = tree_op(a)
    res = eigsh(op, k=K, which="LA", reorth=reorth, return_eigenvectors=True, **RUN)
    assert res.true_residuals is not None
    # the bound is of the recurrence: the true residual adds the rounding of the products,
    # a few eps ||A|| (||A|| = 5 here). Without reorthogonalisation a vector can mix copies
    # of its value and miss that (float32, "none": 25x): the result must say so
    holds = res.ritz_residuals >= res.true_residuals - VECTOR_RESIDUAL_SLACK * EPS_WORK * 5.0
    said = any("true residual" in w for w in res.warnings)
    assert holds.all() != said, (res.warnings, res.ritz_residuals, res.true_residuals)
    if reorth != "none":
        assert holds.all()
    vecs = np.stack([ravel_pytree(v)[0] for v in gj.tree.unstack(res.eigenvectors)])
    assert vecs.shape == (K, N)
    assert vecs.dtype == FLOAT  # the operator's dtype
    overlap = np.abs(vecs.astype(np.float64) @ ref_vecs[:, ::-1][:, :K])
    # the gap to the next eigenvalue is 0.05: eigenvector error ~ residual / gap
    np.testing.assert_allclose(np.diag(overlap), 1.0, atol=tol(1e-7, 1e-4))
    expected_calls = res.iterations * (1 if reorth == "full" else 2) + K
    assert res.operator_calls == expected_calls


def test_thick_restart_under_memory_budget(dense):
    a = dense["clustered"]
    ref = np.linalg.eigvalsh(a)
    op = tree_op(a)
    budget = 24 * N * np.dtype(FLOAT).itemsize  # 24 stored vectors
    res = eigsh(op, k=K, reorth="full", max_iters=600, memory_budget_bytes=budget,
                return_eigenvectors=True)
    assert res.restarts > 0 and res.converged and res.basis_size == 23
    np.testing.assert_allclose(res.eigenvalues, ref[::-1][:K], atol=EIG * 3)
    assert np.all(res.true_residuals < tol(1e-8, 1e-5))


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
    assert res.asymmetry < tol(1e-12, 1e-6)


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
    a = as_run((a + a.T) / 2)
    res = eigsh(gj.from_dense(a), k=3, num_iters=num_iters, reorth=reorth, window=window)
    np.testing.assert_allclose(np.sort(res.eigenvalues), np.linalg.eigvalsh(a)[-3:], rtol=0,
                               atol=tol(1e-12, 5e-6))
    assert res.iterations == 12 and res.breakdowns == 0
    if X64 or reorth != "none":  # float32 without any re-orthogonalisation: 12 steps lose
        # enough orthogonality that they no longer span the space (bounds ~1e-5 ||A||)
        assert res.converged and res.warnings == ()


@pytest.mark.parametrize("reorth, window, seed", [
    ("full", None, 4), ("none", None, 4), ("window", None, 4),
    # windows whose ring forgot the invariant subspace just before a restart: every seed of
    # 20 reported an unconverged copy of 5 in place of 2 (window 7, and window 8 once the
    # ring row was written before the restart) until copies in progress were merged
    ("window", 3, 0), ("window", 4, 1), ("window", 7, 0), ("window", 7, 3), ("window", 8, 0),
])
def test_eigsh_low_rank_reports_no_copies(reorth, window, seed):
    # rank 4 in n = 50: breakdowns restart the recurrence; with a window (or nothing) stored
    # the restarts re-find converged eigenvalues, which must be merged, not reported twice
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((50, 4)))[0]
    a = as_run((u * np.array([5.0, 3.0, 2.0, 1.0])) @ u.T)
    res = eigsh(gj.from_dense(a), k=3, num_iters=30, reorth=reorth, window=window)
    np.testing.assert_allclose(np.sort(res.eigenvalues), np.linalg.eigvalsh(a)[-3:],
                               rtol=tol(1e-12, 5e-6))
    assert res.converged
    assert res.breakdowns > 0 and not any("ghost" in w for w in res.warnings)
    if reorth == "window" and (window or DEFAULT_WINDOW) >= 6:
        # the ring still holds everything when the restart after the invariant subspace
        # (dimension 5: the range and the start's null component) is an eigenvector: the
        # spectrum is complete and the fixed 30-step run stops (at step 6, or 7 after a
        # restart within the subspace), never later than the window
        assert 6 <= res.operator_calls <= (window or DEFAULT_WINDOW), res.operator_calls


def test_eigsh_bad_matvecs():
    bad = gj.from_matvec(lambda v: {"w": v["w"]}, LIKE, name="dropper")
    with pytest.raises(ValueError, match="dropper.*structure"):
        eigsh(bad, k=2, num_iters=5)
    nan = gj.from_matvec(lambda v: jax.tree_util.tree_map(lambda x: x * jnp.nan, v), LIKE,
                         name="nanny")
    with pytest.raises(FloatingPointError, match="nanny.*non-finite.*iteration 0") as err:
        eigsh(nan, k=2, num_iters=5)
    assert isinstance(err.value, ValueError)  # the earlier exception type, still caught


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
    np.testing.assert_allclose(out.eigenvalues, ref[::-1][:2], atol=EIG)
    params2 = jax.tree_util.tree_map(lambda x: x * 1.1, params)
    top = jax.tree_util.tree_map(lambda x: x[0], out.eigenvectors)
    out2 = probe(params2, top)  # new params + warm start: no retrace
    ref2 = np.linalg.eigvalsh(np.asarray(gj.hessian(mlp_loss, params2, batch).to_dense()))
    np.testing.assert_allclose(out2.eigenvalues, ref2[::-1][:2], atol=EIG)
    assert out2.residuals.shape == (2,)


@pytest.mark.parametrize("reorth", ("none",))
def test_eigsh_fast_window_modes_filter_ghosts(dense, reorth):
    op = tree_op(dense["clustered"])
    out = eigsh_fast(op, k=K, num_iters=120, reorth=reorth, window=10)
    ref = np.linalg.eigvalsh(dense["clustered"])
    np.testing.assert_allclose(out.eigenvalues, ref[::-1][:K], atol=3 * EIG)
    vecs = np.stack([ravel_pytree(v)[0] for v in gj.tree.unstack(out.eigenvectors)])
    vecs = vecs.astype(np.float64)
    a = dense["clustered"]
    resid = np.linalg.norm(vecs @ a - np.asarray(out.eigenvalues, np.float64)[:, None] * vecs,
                           axis=1)
    assert np.all(resid < tol(1e-6, 1e-4))


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
    np.testing.assert_allclose(res.eigenvalues, expected(ref, "BE", 4), atol=EIG)
    assert res.has_negative_eigenvalues and res.n_negative == 2
    assert res.most_negative_eigenvalue == pytest.approx(ref[0], abs=EIG)
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
    np.testing.assert_allclose(fixed.eigenvalues, base.eigenvalues + 1e-3, atol=tol(1e-10, 1e-6))
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


# -- half precision ------------------------------------------------------------------------


def _spd16(dtype, n=64):
    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    ev = np.linspace(0.1, 1.0, n)
    ev[-3:] = [2.0, 3.0, 4.0]
    a16 = jnp.asarray((q * ev) @ q.T, dtype)
    a16 = ((a16 + a16.T) / 2).astype(dtype)  # symmetric after rounding
    return a16, np.asarray(a16.astype(jnp.float32), np.float64)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_eigsh_vectors_in_dtype_and_honest_convergence(dtype):
    """A bf16 / fp16 operator: eigenvectors in its dtype (usable with the operator itself),
    true residuals of those vectors, convergence judged at eps(dtype) ||A|| with a warning
    instead of a claimed tol=1e-10."""
    a16, a = _spd16(dtype)
    eps = float(jnp.finfo(dtype).eps)
    norm = np.linalg.norm(a, 2)
    ref = np.linalg.eigvalsh(a)[::-1][:3]
    op = gj.from_dense(a16, is_psd=True)
    for reorth in ("full", "window"):
        res = eigsh(op, k=3, tol=1e-10, reorth=reorth, return_eigenvectors=True)
        assert res.eigenvectors.dtype == jnp.dtype(dtype)
        assert res.eigenvalues.dtype == np.float64 and res.true_residuals.dtype == np.float64
        top = jax.tree_util.tree_map(lambda x: x[0], res.eigenvectors)
        assert (op @ top).dtype == jnp.dtype(dtype)  # the operator accepts its own vectors
        # the true residuals, recomputed in float64 from the returned (rounded) vectors and
        # the rounded matrix: what the dtype can reach, and what the result says
        y = np.asarray(res.eigenvectors.astype(jnp.float32), np.float64)
        exact = np.linalg.norm(y @ a - res.eigenvalues[:, None] * y, axis=1)
        assert np.all(exact <= eps * norm), (exact, eps * norm)
        np.testing.assert_allclose(res.true_residuals, exact, rtol=0.3, atol=0.05 * eps * norm)
        assert res.converged and np.all(res.true_residuals <= eps * 1.2 * norm)
        np.testing.assert_allclose(res.eigenvalues, ref, atol=eps * norm)
        msg = [w for w in res.warnings if "below what a" in w]
        assert len(msg) == 1 and f"{dtype} operator can reach" in msg[0], res.warnings
    # a tol the dtype can reach: no warning
    loose = eigsh(op, k=3, tol=0.05, return_eigenvectors=True)
    assert not any("below what a" in w for w in loose.warnings) and loose.converged
    # without eigenvectors (reorth="full") the true residuals are still measured
    plain = eigsh(op, k=3, tol=1e-10)
    assert plain.eigenvectors is None and plain.true_residuals is not None
    assert plain.operator_calls == plain.iterations + 3


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_eigsh_fast_true_residuals_in_jit(dtype):
    a16, a = _spd16(dtype)
    eps = float(jnp.finfo(dtype).eps)
    norm = np.linalg.norm(a, 2)

    @jax.jit
    def run(m):
        return eigsh_fast(gj.from_dense(m, is_psd=True), k=2, num_iters=40, tol=1e-10)

    out = run(a16)
    assert out.eigenvectors.dtype == jnp.dtype(dtype) and out.eigenvalues.dtype == jnp.float32
    y = np.asarray(out.eigenvectors.astype(jnp.float32), np.float64)
    lam = np.asarray(out.eigenvalues, np.float64)
    exact = np.linalg.norm(y @ a - lam[:, None] * y, axis=1)
    np.testing.assert_allclose(np.asarray(out.residuals), exact, rtol=0.3,
                               atol=0.05 * eps * norm)
    assert bool(np.all(out.converged)) and bool(out.finite)
    np.testing.assert_allclose(lam, np.linalg.eigvalsh(a)[::-1][:2], atol=eps * norm)


def test_bf16_mlp_ggn_eigenvectors_are_bf16_and_residuals_true():
    """A tiny MLP in bfloat16: the GGN's eigenvectors come back in bfloat16 and apply to the
    operator; the reported true residuals match a float64 recomputation against the dense
    GGN of the same bf16 operator."""
    params, batch = _mlp_case()
    p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    b16 = {"inputs": batch["inputs"].astype(jnp.bfloat16), "labels": batch["labels"]}
    with jax.numpy_dtype_promotion("standard"):
        op = gj.ggn(mlp_model, HEAD, p16, b16)
        dense = np.asarray(op.to_dense().astype(jnp.float32), np.float64)
        res = eigsh(op, k=3, return_eigenvectors=True)
        vecs = gj.tree.unstack(res.eigenvectors)
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(res.eigenvectors))
        gj.tree.ravel(op @ vecs[0])  # the operator accepts them
    dense = (dense + dense.T) / 2
    eps = float(jnp.finfo(jnp.bfloat16).eps)
    norm = np.linalg.norm(dense, 2)
    y = np.stack([np.asarray(gj.tree.ravel(v).astype(jnp.float32), np.float64) for v in vecs])
    exact = np.linalg.norm(y @ dense - res.eigenvalues[:, None] * y, axis=1)
    # the bf16 GGN product is itself accurate to ~eps ||A|| (its dense matrix too)
    assert np.all(res.true_residuals <= eps * norm * 1.2) and res.converged
    assert np.all(exact <= 2 * eps * norm)
    np.testing.assert_allclose(res.eigenvalues, np.linalg.eigvalsh(dense)[::-1][:3],
                               rtol=0, atol=2 * eps * norm)


def test_eigsh_bad_start_vectors_keys_and_kinds(dense):
    op = tree_op(dense["random"])
    zeros = jax.tree_util.tree_map(jnp.zeros_like, LIKE)
    with pytest.raises(ValueError, match="v0 is the zero vector"):
        eigsh(op, k=2, v0=zeros)
    with pytest.raises(ValueError, match="v0 leaf 'w' is not finite"):
        eigsh(op, k=2, v0=dict(zeros, w=zeros["w"].at[0, 0].set(jnp.inf)))
    with pytest.raises(ValueError, match=r"v0 does not match.*missing leaves \['b'\]"):
        eigsh(op, k=2, v0={"w": zeros["w"]})
    with pytest.raises(ValueError, match="v0 does not match"):
        eigsh_fast(op, {"w": zeros["w"]}, k=2)
    with pytest.raises(TypeError, match="tol must be a real number"):
        eigsh(op, k=2, tol="1e-6")
    with pytest.raises(TypeError, match="k must be an integer"):
        eigsh(op, k="2")
    with pytest.raises(TypeError, match="k must be an integer"):
        gj.top_eigenpairs(op, "2")
    with pytest.raises(TypeError, match="key must be a PRNG key, got the int 42"):
        eigsh(op, k=2, key=42)
    with pytest.raises(ValueError, match="single PRNG key"):
        eigsh_fast(op, k=2, key=jax.random.split(jax.random.key(0), 3))
    with pytest.raises(TypeError, match="op must be a gradience_jax.LinearOperator"):
        eigsh_fast(np.eye(N), k=2)
    with pytest.raises(ValueError, match="max_iters must be >= 1"):
        eigsh(op, k=2, max_iters=-3)
    with pytest.raises(ValueError, match="memory_budget_bytes must be >= 1"):
        eigsh(op, k=2, memory_budget_bytes=0)
    with pytest.raises(TypeError, match="tol must be a real number"):
        LanczosConfig(tol="small")
    with pytest.raises(ValueError, match="regularization must be >= 0"):
        LanczosConfig(regularization=-1.0)


def test_eigsh_fast_nonfinite_flag_inside_jit():
    nan = gj.from_matvec(lambda v: jax.tree_util.tree_map(lambda x: x * jnp.nan, v), LIKE)
    out = jax.jit(lambda op: eigsh_fast(op, k=2, num_iters=10))(nan)
    assert not bool(out.finite) and int(out.status) == 3
    with pytest.raises(FloatingPointError, match="eigsh_fast.*non-finite"):
        out.check()
