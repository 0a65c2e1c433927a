"""Laplace building blocks against dense float64 references on small models.

References: dense GGN / K-FAC matrices (``to_dense`` and ``helpers.dense_ggn``), numpy
``slogdet`` / ``inv`` / ``eigh``, dense Jacobians of the test outputs, the exact evidence of
Bayesian linear regression, and finite differences of the marginal likelihood.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import (
    FLOAT,
    dense_ggn,
    dense_jacobian,
    strict_dtype_promotion,
    tol,
)

import gradience_jax as gj
from gradience_jax import laplace as lp
from gradience_jax._validate import ArgumentTypeError
from gradience_jax.models import MLP, from_nnx
from gradience_jax.operators.kfac import KFACCoverageWarning

strict_promotion = pytest.fixture(autouse=True, scope="module")(strict_dtype_promotion)

DT = jnp.dtype(FLOAT)
CE = gj.heads.softmax_cross_entropy()
TAU = 0.5


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(x, np.float64))
                           for x in jax.tree_util.tree_leaves(tree)])


def _dense(op) -> np.ndarray:
    return np.asarray(op.to_dense(max_params=op.n_params), np.float64)


def _rand_like(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype),
                                  params)


def _close(a, b, rtol):
    """Relative max-norm closeness (scale of ``b``), for float32 and float64 alike."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)
    assert err <= rtol, err


# -- small models -------------------------------------------------------------------------


class OneDense(nnx.Module):
    def __init__(self, d_in=4, d_out=3, *, rngs):
        self.lin = nnx.Linear(d_in, d_out, param_dtype=DT, dtype=DT, rngs=rngs)

    def __call__(self, x):
        return self.lin(x)


class Gated(nnx.Module):
    """A Dense - gain - Dense net: the elementwise gain is not a K-FAC layer (uncovered)."""

    def __init__(self, *, rngs):
        self.a = nnx.Linear(4, 5, param_dtype=DT, dtype=DT, rngs=rngs)
        self.gain = nnx.Param(jnp.linspace(0.5, 1.5, 5, dtype=DT))
        self.b = nnx.Linear(5, 3, param_dtype=DT, dtype=DT, rngs=rngs)

    def __call__(self, x):
        return self.b(jnp.tanh(self.a(x) * self.gain[...]))


class Sequence(nnx.Module):
    """Per-token outputs ``(B, T, C)`` whose tokens interact (a cumulative sum)."""

    def __init__(self, *, rngs):
        self.a = nnx.Linear(3, 4, param_dtype=DT, dtype=DT, rngs=rngs)
        self.b = nnx.Linear(4, 5, param_dtype=DT, dtype=DT, rngs=rngs)

    def __call__(self, x):
        return self.b(jnp.cumsum(jnp.tanh(self.a(x)), axis=1))


@pytest.fixture(scope="module")
def mlp():
    """A 2-layer tanh MLP 6 -> 16 -> 4 (180 parameters), 12 examples, CE, dense GGN."""
    model = MLP([6, 16, 4], activation=jnp.tanh, param_dtype=DT, rngs=nnx.Rngs(0))
    ad = from_nnx(model, CE)
    batch = gj.data.classification(jax.random.key(1), n=12, dim=6, num_classes=4)
    batch["inputs"] = batch["inputs"].astype(DT)
    test = gj.data.classification(jax.random.key(5), n=7, dim=6, num_classes=4)
    test["inputs"] = test["inputs"].astype(DT)
    G = gj.ggn(ad.model_fn, ad.head, ad.params, batch)
    gd = dense_ggn(ad.model_fn, ad.head, ad.params, batch)
    return ad, batch, test, G, np.asarray(gd, np.float64)


@pytest.fixture(scope="module")
def mlp_kfac(mlp):
    ad, batch, *_ = mlp
    K = gj.kfac(ad.model_fn, ad.head, ad.params, batch)
    return K, _dense(K)


# -- 1. K-FAC log-determinant and trace -----------------------------------------------------


def test_kfac_logdet_exact_on_one_dense_layer_one_example():
    """N = R = 1: K-FAC equals the GGN, so its closed form equals the dense GGN slogdet."""
    ad = from_nnx(OneDense(rngs=nnx.Rngs(0)), CE)
    batch = {"inputs": jax.random.normal(jax.random.key(0), (1, 4), DT),
             "labels": jnp.array([2])}
    K = gj.kfac(ad.model_fn, ad.head, ad.params, batch, check=False)
    gd = np.asarray(dense_ggn(ad.model_fn, ad.head, ad.params, batch), np.float64)
    p = gd.shape[0]
    for damping, scale in [(0.1, 1.0), (1e-3, 7.0)]:
        res = lp.kfac_logdet(K, damping, scale=scale)
        ref = np.linalg.slogdet(scale * gd + damping * np.eye(p))
        assert ref[0] > 0
        np.testing.assert_allclose(float(res.logdet), ref[1], rtol=tol(1e-10, 1e-4))
        np.testing.assert_allclose(float(res.trace), np.trace(scale * gd) + p * damping,
                                   rtol=tol(1e-10, 1e-5))
        assert res.n_covered == p and res.n_uncovered == 0


def test_kfac_logdet_and_trace_equal_the_dense_kfac_matrix(mlp, mlp_kfac):
    ad, batch, *_ = mlp
    K, kd = mlp_kfac
    p = kd.shape[0]
    res = lp.kfac_logdet(K, TAU, scale=12.0)
    ref = np.linalg.slogdet(12.0 * kd + TAU * np.eye(p))[1]
    np.testing.assert_allclose(float(res.logdet), ref, rtol=tol(1e-10, 1e-4))
    np.testing.assert_allclose(float(res.trace), np.trace(12.0 * kd) + p * TAU,
                               rtol=tol(1e-12, 1e-5))
    # per-layer split: each block's logdet is the dense block's
    idx = np.cumsum([0] + [x.size for x in jax.tree_util.tree_leaves(ad.params)])
    paths = gj.tree.leaf_paths(ad.params)
    for layer in K.coverage.layers:
        ii = np.concatenate([np.arange(idx[paths.index(q)], idx[paths.index(q) + 1])
                             for q in layer.paths])
        block = 12.0 * kd[np.ix_(ii, ii)] + TAU * np.eye(ii.size)
        np.testing.assert_allclose(float(res.layer_logdets[layer.name]),
                                   np.linalg.slogdet(block)[1], rtol=tol(1e-10, 1e-4))
    spec = lp.kfac_spectrum(K, scale=12.0)
    np.testing.assert_allclose(float(lp.logdet(spec, TAU)), ref, rtol=tol(1e-10, 1e-4))
    np.testing.assert_allclose(np.sort(np.asarray(spec.eigenvalues, np.float64)),
                               np.clip(np.linalg.eigvalsh(12.0 * kd), 0, None),
                               atol=tol(1e-10, 1e-4) * np.abs(12.0 * kd).max())
    # jittable: K is a pytree, damping traced
    jitted = jax.jit(lambda k, d: lp.kfac_logdet(k, d, scale=12.0).logdet)(K, TAU)
    np.testing.assert_allclose(float(jitted), float(res.logdet), rtol=tol(1e-12, 1e-5))


def test_kfac_logdet_gives_uncovered_parameters_the_prior_precision_only():
    ad = from_nnx(Gated(rngs=nnx.Rngs(1)), CE)
    batch = {"inputs": jax.random.normal(jax.random.key(3), (6, 4), DT),
             "labels": jnp.arange(6) % 3}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KFACCoverageWarning)
        K = gj.kfac(ad.model_fn, ad.head, ad.params, batch, check=False)
    kd = _dense(K)
    p = kd.shape[0]
    n_unc = p - K.coverage.n_covered
    assert K.coverage.uncovered_paths == ("gain",) and n_unc == 5
    damping = 0.3
    res = lp.kfac_logdet(K, damping, scale=2.0)
    assert res.n_uncovered == n_unc and res.n_covered == K.coverage.n_covered
    np.testing.assert_allclose(float(res.uncovered_logdet), n_unc * np.log(damping),
                               rtol=tol(1e-12, 1e-5))
    ref = np.linalg.slogdet(2.0 * kd + damping * np.eye(p))[1]  # zero block + damping
    np.testing.assert_allclose(float(res.logdet), ref, rtol=tol(1e-10, 1e-4))
    np.testing.assert_allclose(float(res.trace), np.trace(2.0 * kd) + p * damping,
                               rtol=tol(1e-10, 1e-5))


def test_spectrum_logdet_trace_and_effective_params():
    lam = np.array([3.0, 1.0, 0.25, 0.0])
    spec = lp.lowrank_spectrum(jnp.asarray(lam, DT), 10, scale=2.0)
    full = np.concatenate([2.0 * lam, np.zeros(6)])
    np.testing.assert_allclose(float(lp.logdet(spec, 0.7)), np.sum(np.log(full + 0.7)),
                               rtol=tol(1e-13, 1e-6))
    np.testing.assert_allclose(float(lp.trace(spec, 0.7)), np.sum(full) + 10 * 0.7,
                               rtol=tol(1e-13, 1e-6))
    np.testing.assert_allclose(float(lp.effective_params(spec, 0.7)),
                               np.sum(full / (full + 0.7)), rtol=tol(1e-13, 1e-6))
    d = {"a": jnp.asarray([1.0, 2.0], DT), "b": jnp.asarray([[0.5]], DT)}
    dspec = lp.diagonal_spectrum(d, scale=3.0)
    np.testing.assert_allclose(float(lp.logdet(dspec, 1.0)), np.sum(np.log([4.0, 7.0, 2.5])),
                               rtol=tol(1e-13, 1e-6))


# -- 2. exact GGN diagonal ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SumSquare(gj.Head):
    """``0.5 (sum_c f_c - sum_c y_c)^2``: a rank-one, non-diagonal per-token Hessian."""

    def token_loss(self, outputs, targets):
        return 0.5 * (outputs.sum(-1) - targets.sum(-1)) ** 2

    def token_hvp(self, outputs, targets, u):
        return jnp.broadcast_to(u.sum(-1, keepdims=True), u.shape)


def test_ggn_diagonal_equals_dense_ggn_diagonal_mlp(mlp):
    ad, batch, _, _, gd = mlp
    ref = np.diag(gd)
    d = lp.ggn_diagonal(ad.model_fn, ad.head, ad.params, batch)
    assert jax.tree_util.tree_structure(d) == jax.tree_util.tree_structure(ad.params)
    _close(_flat(d), ref, tol(1e-10, 1e-5))
    chunked = lp.ggn_diagonal(ad.model_fn, ad.head, ad.params, batch, chunk_size=5)  # padding
    _close(_flat(chunked), ref, tol(1e-10, 1e-5))


def test_ggn_diagonal_mse_soft_targets_and_generic_head():
    ad = from_nnx(OneDense(d_in=3, d_out=2, rngs=nnx.Rngs(3)), gj.heads.mse())
    k1, k2 = jax.random.split(jax.random.key(2))
    batch = {"inputs": jax.random.normal(k1, (5, 3), DT),
             "targets": jax.random.normal(k2, (5, 2), DT),
             "soft": 2.0 * jax.nn.softmax(jax.random.normal(k2, (5, 2), DT))}  # sums 2
    for head in (gj.heads.mse(), SumSquare("targets"), gj.heads.softmax_cross_entropy("soft")):
        ref = np.diag(np.asarray(dense_ggn(ad.model_fn, head, ad.params, batch), np.float64))
        d = lp.ggn_diagonal(ad.model_fn, head, ad.params, batch, chunk_size=2)
        _close(_flat(d), ref, tol(1e-10, 1e-5))


def test_ggn_diagonal_sequence_model_with_mask():
    """Positions per example (R = 4 interacting tokens, C = 5) and a padding mask."""
    head = gj.heads.softmax_cross_entropy("labels", mask_key="mask")
    ad = from_nnx(Sequence(rngs=nnx.Rngs(2)), head)
    batch = {"inputs": jax.random.normal(jax.random.key(4), (3, 4, 3), DT),
             "labels": jnp.arange(12).reshape(3, 4) % 5,
             "mask": jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], DT)}
    ref = np.diag(np.asarray(dense_ggn(ad.model_fn, ad.head, ad.params, batch), np.float64))
    d = lp.ggn_diagonal(ad.model_fn, ad.head, ad.params, batch, chunk_size=1)
    _close(_flat(d), ref, tol(1e-10, 1e-5))


# -- 3. low-rank posterior -------------------------------------------------------------------


def test_full_rank_lowrank_posterior_equals_dense_inverse(mlp):
    ad, batch, _, G, gd = mlp
    p, n = gd.shape[0], 12.0
    post = lp.lowrank_posterior(G, p, TAU, scale=n)  # dense path of top_eigenpairs
    prec = n * gd + TAU * np.eye(p)
    sigma = np.linalg.inv(prec)
    v = _rand_like(ad.params, 0)
    _close(_flat(post.covariance(v)), sigma @ _flat(v), tol(1e-10, 1e-4))
    _close(_flat(post.precision(v)), prec @ _flat(v), tol(1e-10, 1e-5))
    np.testing.assert_allclose(float(post.logdet()), np.linalg.slogdet(prec)[1],
                               rtol=tol(1e-10, 1e-4))
    np.testing.assert_allclose(float(post.covariance_trace()), np.trace(sigma),
                               rtol=tol(1e-10, 1e-4))
    # jittable, and the covariance operator is the same map
    jitted = jax.jit(lambda q, x: q.covariance(x))(post, v)
    _close(_flat(jitted), sigma @ _flat(v), tol(1e-10, 1e-4))
    op = lp.lowrank_covariance(post)
    _close(_dense(op), sigma, tol(1e-10, 1e-4))


def test_lanczos_lowrank_posterior_matches_dense_truncation(mlp):
    ad, batch, _, G, gd = mlp
    p, r, n = gd.shape[0], 8, 12.0
    post = lp.lowrank_posterior(G, r, TAU, scale=n, dense_limit=0, tol=tol(1e-12, 1e-6))
    evals, evecs = np.linalg.eigh(gd)
    lam, u = evals[::-1][:r], evecs[:, ::-1][:, :r]
    assert (lam[r - 1] - evals[::-1][r]) > 1e-3 * lam[0]  # a gap: the subspace is defined
    _close(np.asarray(post.values), n * lam, tol(1e-9, 1e-4))
    ref = np.linalg.inv(n * (u * lam) @ u.T + TAU * np.eye(p))
    v = _rand_like(ad.params, 1)
    _close(_flat(post.covariance(v)), ref @ _flat(v), tol(1e-8, 1e-3))
    spec = post.spectrum()
    np.testing.assert_allclose(float(lp.logdet(spec, TAU)),
                               np.sum(np.log(n * lam + TAU)) + (p - r) * np.log(TAU),
                               rtol=tol(1e-9, 1e-5))


def test_diagonal_correction_makes_the_precision_diagonal_exact(mlp):
    ad, batch, _, G, gd = mlp
    p, r, n = gd.shape[0], 5, 12.0
    diag = lp.ggn_diagonal(ad.model_fn, ad.head, ad.params, batch)
    post = lp.lowrank_posterior(G, r, TAU, scale=n, ggn_diag=diag)
    prec = _dense(gj.from_matvec(post.precision, ad.params))
    _close(np.diag(prec), n * np.diag(gd) + TAU, tol(1e-10, 1e-5))
    cov = _dense(lp.lowrank_covariance(post))
    _close(cov @ prec, np.eye(p), tol(1e-9, 1e-3))
    np.testing.assert_allclose(float(post.logdet()), np.linalg.slogdet(prec)[1],
                               rtol=tol(1e-10, 1e-4))
    np.testing.assert_allclose(float(post.covariance_trace()), np.trace(cov),
                               rtol=tol(1e-10, 1e-4))


def test_samples_have_the_posterior_covariance():
    """Samples are ``M eps`` for the draws ``eps`` the key gives: recover M, check M M^T."""
    like = {"w": jnp.zeros((3, 2), DT), "b": jnp.zeros((4,), DT)}
    p = 10
    rng = np.random.default_rng(0)
    u = np.linalg.qr(rng.standard_normal((p, 3)))[0].T
    vectors = jax.vmap(lambda f: gj.tree.unravel_like(f, like))(jnp.asarray(u, DT))
    diag = gj.tree.unravel_like(jnp.asarray(rng.uniform(0, 2, p), DT), like)
    post = lp.LowRankPosterior(jnp.asarray([4.0, 1.0, 0.0], DT), vectors,
                               jnp.asarray(0.3, DT), diag)
    prec = (u.T * np.array([4.0, 1.0, 0.0])) @ u + np.diag(0.3 + _flat(diag))
    key = jax.random.key(4)
    x = np.asarray(jax.vmap(gj.tree.ravel)(post.sample(key, p)), np.float64)
    eps = np.asarray(jax.vmap(lambda k: gj.tree.ravel(gj.tree.random_like(k, like, "normal")))(
        jax.random.split(key, p)), np.float64)
    m = np.linalg.solve(eps, x).T  # x_i = M eps_i
    _close(m @ m.T, np.linalg.inv(prec), tol(1e-10, 1e-3))
    mean = gj.tree.unravel_like(jnp.ones((p,), DT), like)
    shifted = np.asarray(jax.vmap(gj.tree.ravel)(post.sample(key, p, mean=mean)), np.float64)
    _close(shifted, x + 1.0, tol(1e-12, 1e-6))


# -- 4. predictive variance ------------------------------------------------------------------


def _dense_pred(ad, test, sigma):
    jac, out = dense_jacobian(ad.model_fn, ad.params, test)
    c = out.shape[-1]
    full = jac @ sigma @ jac.T
    n = out.shape[0]
    return np.stack([full[c * i:c * (i + 1), c * i:c * (i + 1)] for i in range(n)])


def test_predictive_variance_matches_dense_j_sigma_jt(mlp, mlp_kfac):
    ad, batch, test, G, gd = mlp
    p, n = gd.shape[0], 12.0
    sigma = np.linalg.inv(n * gd + TAU * np.eye(p))
    ref = _dense_pred(ad, test, sigma)
    post = lp.lowrank_posterior(G, p, TAU, scale=n)
    for cov, chunk in [(post, 3), (lp.dense_covariance(G, TAU, scale=n), None),
                       (lp.lowrank_covariance(post).matvec, 7)]:
        res = lp.predictive_variance(ad.model_fn, ad.params, test, cov, full_covariance=True,
                                     chunk_size=chunk)
        assert res.covariance.shape == (7, 4, 4) and res.variance.shape == (7, 4)
        _close(res.covariance, ref, tol(1e-10, 1e-3))
        _close(res.variance, np.diagonal(ref, axis1=1, axis2=2), tol(1e-10, 1e-3))
        _close(res.mean, ad.model_fn(ad.params, test), tol(1e-12, 1e-6))
    # K-FAC posterior: Sigma = (n K + tau I)^-1 from the dense K-FAC matrix
    K, kd = mlp_kfac
    kref = _dense_pred(ad, test, np.linalg.inv(n * kd + TAU * np.eye(p)))
    res = lp.predictive_variance(ad.model_fn, ad.params, test, lp.kfac_covariance(K, TAU,
                                                                                 scale=n))
    assert res.covariance is None
    _close(res.variance, np.diagonal(kref, axis1=1, axis2=2), tol(1e-10, 1e-3))


# -- 5. marginal likelihood and prior precision ----------------------------------------------


def test_head_log_likelihood_constants(mlp):
    ad, batch, *_ = mlp
    ll = lp.head_log_likelihood(ad.model_fn, ad.head, ad.params, batch)
    np.testing.assert_allclose(float(ll.scale), 12.0)
    logits = np.asarray(ad.model_fn(ad.params, batch), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ref = logp[np.arange(12), np.asarray(batch["labels"])].sum()
    np.testing.assert_allclose(float(ll.value), ref, rtol=tol(1e-12, 1e-5))


def test_log_marginal_likelihood_matches_dense(mlp, mlp_kfac):
    ad, batch, _, G, gd = mlp
    p = gd.shape[0]
    ll = lp.head_log_likelihood(ad.model_fn, ad.head, ad.params, batch)
    n = float(ll.scale)
    m2 = float(np.sum(_flat(ad.params) ** 2))

    def ref(curv):
        return (float(ll.value) - TAU / 2 * m2 + p / 2 * np.log(TAU)
                - 0.5 * np.linalg.slogdet(n * curv + TAU * np.eye(p))[1])

    rtol = tol(1e-10, 1e-4)
    dense = lp.log_marginal_likelihood(ll.value, ad.params, TAU, lp.dense_spectrum(G, scale=n))
    np.testing.assert_allclose(float(dense.value), ref(gd), rtol=rtol)
    np.testing.assert_allclose(float(dense.effective_params),
                               p - TAU * np.trace(np.linalg.inv(n * gd + TAU * np.eye(p))),
                               rtol=tol(1e-8, 1e-3))
    post = lp.lowrank_posterior(G, p, 1.0, scale=n)  # its prior_prec is replaced by TAU
    np.testing.assert_allclose(float(lp.log_marginal_likelihood(ll.value, ad.params, TAU,
                                                                post).value), ref(gd), rtol=rtol)
    K, kd = mlp_kfac
    kf = lp.log_marginal_likelihood(ll.value, ad.params, TAU, lp.kfac_spectrum(K, scale=n))
    np.testing.assert_allclose(float(kf.value), ref(kd), rtol=rtol)
    # jittable in tau, and its tau-derivative is (gamma - tau ||theta||^2) / (2 tau)
    spec = lp.dense_spectrum(G, scale=n)
    f = jax.jit(lambda t: lp.log_marginal_likelihood(ll.value, ad.params, t, spec).value)
    grad = float(jax.grad(f)(jnp.asarray(TAU, DT)))
    np.testing.assert_allclose(grad, (float(dense.effective_params) - TAU * m2) / (2 * TAU),
                               rtol=tol(1e-8, 1e-3))


class Linear(nnx.Module):
    def __init__(self, *, rngs):
        self.lin = nnx.Linear(4, 1, param_dtype=DT, dtype=DT, rngs=rngs)

    def __call__(self, x):
        return self.lin(x)


def test_evidence_is_exact_for_bayesian_linear_regression():
    """Linear-Gaussian model at its MAP: Laplace = log N(y; 0, sigma^2 I + J J^T / tau)."""
    ad = from_nnx(Linear(rngs=nnx.Rngs(0)), gj.heads.mse())
    k1, k2 = jax.random.split(jax.random.key(9))
    x = jax.random.normal(k1, (20, 4), DT)
    y = x @ jnp.asarray([[1.0], [-2.0], [0.5], [0.0]], DT) + 0.3 * jax.random.normal(
        k2, (20, 1), DT)
    batch = {"inputs": x, "targets": y}
    sig, tau = 0.4, 2.0
    jac, _ = dense_jacobian(ad.model_fn, ad.params, batch)  # f = J theta (bias included)
    yv = np.asarray(y, np.float64).ravel()
    theta = np.linalg.solve(jac.T @ jac / sig**2 + tau * np.eye(5), jac.T @ yv / sig**2)
    params = gj.tree.unravel_like(jnp.asarray(theta, DT), ad.params)
    cov_y = sig**2 * np.eye(20) + jac @ jac.T / tau
    exact = -0.5 * (yv @ np.linalg.solve(cov_y, yv) + np.linalg.slogdet(cov_y)[1]
                    + 20 * np.log(2 * np.pi))
    ll = lp.head_log_likelihood(ad.model_fn, ad.head, params, batch, sigma=sig)
    np.testing.assert_allclose(float(ll.scale), 20 / (2 * sig**2), rtol=1e-12)
    G = gj.ggn(ad.model_fn, ad.head, params, batch)
    for spec in (lp.dense_spectrum(G, scale=ll.scale),
                 lp.kfac_spectrum(gj.kfac(ad.model_fn, ad.head, params, batch),
                                  scale=ll.scale)):  # K-FAC is exact for linear + MSE
        res = lp.log_marginal_likelihood(ll.value, params, tau, spec)
        np.testing.assert_allclose(float(res.value), exact, rtol=tol(1e-10, 1e-4))


def test_optimized_prior_precision_is_a_stationary_maximum(mlp):
    ad, batch, _, G, gd = mlp
    ll = lp.head_log_likelihood(ad.model_fn, ad.head, ad.params, batch)
    spec = lp.dense_spectrum(G, scale=ll.scale)
    res = lp.optimize_prior_precision(ll.value, ad.params, spec)
    assert res.converged and res.method == "brentq"
    fp = lp.optimize_prior_precision(ll.value, ad.params, spec, method="fixed_point",
                                     tol=1e-12)
    assert fp.converged
    np.testing.assert_allclose(fp.prior_prec, res.prior_prec, rtol=tol(1e-8, 1e-3))

    def lml(log_tau):  # float64 reference of the same formula
        t = np.exp(log_tau)
        p = gd.shape[0]
        return (-t / 2 * np.sum(_flat(ad.params) ** 2) + p / 2 * np.log(t)
                - 0.5 * np.linalg.slogdet(float(ll.scale) * gd + t * np.eye(p))[1])

    t0, h = np.log(res.prior_prec), 1e-4
    deriv = (lml(t0 + h) - lml(t0 - h)) / (2 * h)
    scale = abs(lml(t0 + 1 + h) - lml(t0 + 1 - h)) / (2 * h)  # the slope one e-fold away
    assert abs(deriv) <= tol(1e-6, 1e-2) * scale, (deriv, scale)
    assert lml(t0) > max(lml(t0 - 0.1), lml(t0 + 0.1))
    np.testing.assert_allclose(res.effective_params,
                               res.prior_prec * np.sum(_flat(ad.params) ** 2),
                               rtol=tol(1e-8, 1e-3))
    # a low-rank + diagonal posterior: the same stationarity through its covariance trace
    diag = lp.ggn_diagonal(ad.model_fn, ad.head, ad.params, batch)
    post = lp.lowrank_posterior(G, 6, 1.0, scale=ll.scale, ggn_diag=diag)
    pr = lp.optimize_prior_precision(ll.value, ad.params, post)
    f = lambda t: float(lp.log_marginal_likelihood(ll.value, ad.params, np.exp(t), post).value)
    t1 = np.log(pr.prior_prec)
    d1 = (f(t1 + 1e-3) - f(t1 - 1e-3)) / 2e-3
    s1 = abs(f(t1 + 1 + 1e-3) - f(t1 + 1 - 1e-3)) / 2e-3
    assert abs(d1) <= tol(1e-5, 5e-2) * s1, (d1, s1)


# -- 6. laplax interop ------------------------------------------------------------------------


def test_laplax_exports_have_laplax_shapes_and_numbers(mlp):
    ad, batch, _, G, gd = mlp
    p, r = gd.shape[0], 6
    pairs = gj.top_eigenpairs(G, r)
    terms = lp.to_laplax_low_rank(pairs.values, pairs.vectors, scale=12.0)
    u, s = np.asarray(terms.U, np.float64), np.asarray(terms.S, np.float64)
    assert u.shape == (p, r) and s.shape == (r,)
    _close(u.T @ u, np.eye(r), tol(1e-10, 1e-5))
    evals, evecs = np.linalg.eigh(gd)
    top = evecs[:, ::-1][:, :r]
    _close((u * s) @ u.T, 12.0 * (top * evals[::-1][:r]) @ top.T, tol(1e-9, 1e-3))
    u_leaves, s_leaf, scalar = jax.tree_util.tree_leaves(terms)  # the order laplax unpacks
    assert u_leaves.shape == (p, r) and s_leaf.shape == (r,) and scalar.shape == ()
    diag = lp.ggn_diagonal(ad.model_fn, ad.head, ad.params, batch)
    _close(lp.to_laplax_diagonal(diag, scale=2.0), 2.0 * np.diag(gd), tol(1e-10, 1e-5))
    _close(lp.to_laplax_full(G, scale=3.0), 3.0 * gd, tol(1e-10, 1e-5))
    v = _rand_like(ad.params, 2)
    _close(_flat(lp.to_laplax_mv(G, scale=4.0)(v)), 4.0 * gd @ _flat(v), tol(1e-10, 1e-5))


def test_laplax_posteriors_from_our_curvature_equal_ours(mlp):
    pytest.importorskip("laplax")
    from laplax.curv.cov import set_posterior_fn

    ad, batch, _, G, gd = mlp
    p, n = gd.shape[0], 12.0
    v = _rand_like(ad.params, 3)
    post = lp.lowrank_posterior(G, p, TAU, scale=n)
    terms = lp.to_laplax_low_rank(post.values, post.vectors)  # already scaled
    posterior = set_posterior_fn("lanczos", terms, layout=ad.params)({"prior_prec": TAU})
    got = posterior.cov_mv(posterior.state)(v)
    _close(_flat(got), _flat(post.covariance(v)), tol(1e-10, 1e-4))
    full = set_posterior_fn("full", lp.to_laplax_full(G, scale=n),
                            layout=ad.params)({"prior_prec": TAU})
    sigma = np.linalg.inv(n * gd + TAU * np.eye(p))
    _close(_flat(full.cov_mv(full.state)(v)), sigma @ _flat(v), tol(1e-10, 1e-3))
    diag = lp.ggn_diagonal(ad.model_fn, ad.head, ad.params, batch)
    dpost = set_posterior_fn("diagonal", lp.to_laplax_diagonal(diag, scale=n),
                             layout=ad.params)({"prior_prec": TAU})
    _close(_flat(dpost.cov_mv(dpost.state)(v)), _flat(v) / (n * np.diag(gd) + TAU),
           tol(1e-10, 1e-5))


def test_laplax_estimates_curvature_from_our_matvec():
    pytest.importorskip("laplax")
    from laplax.curv.cov import estimate_curvature

    ad = from_nnx(OneDense(rngs=nnx.Rngs(0)), CE)
    batch = {"inputs": jax.random.normal(jax.random.key(0), (5, 4), DT),
             "labels": jnp.arange(5) % 3}
    G = gj.ggn(ad.model_fn, ad.head, ad.params, batch)
    gd = _dense(G)
    mv = lp.to_laplax_mv(G, scale=5.0)
    _close(estimate_curvature("full", mv, layout=ad.params), 5.0 * gd, tol(1e-12, 1e-5))
    _close(estimate_curvature("diagonal", mv, layout=ad.params), 5.0 * np.diag(gd),
           tol(1e-12, 1e-5))


# -- bad input ----------------------------------------------------------------------------------


def test_bad_input_raises(mlp, mlp_kfac):
    ad, batch, test, G, _ = mlp
    K, _ = mlp_kfac
    p = G.n_params
    with pytest.raises(ArgumentTypeError, match="K must be an operator returned by gj.kfac"):
        lp.kfac_logdet(G, 0.1)
    with pytest.raises(ValueError, match="damping must be > 0"):
        lp.kfac_logdet(K, 0.0)
    with pytest.raises(ValueError, match="scale must be > 0"):
        lp.kfac_spectrum(K, scale=-1.0)
    with pytest.raises(ArgumentTypeError, match="spec must be a LaplaceSpectrum"):
        lp.logdet(np.ones(3), 1.0)
    with pytest.raises(ArgumentTypeError, match="head must be a gj.heads head"):
        lp.ggn_diagonal(ad.model_fn, lambda o, b: o.sum(), ad.params, batch)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        lp.ggn_diagonal(ad.model_fn, ad.head, ad.params, batch, chunk_size=0)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lp.lowrank_posterior(G, 0, 1.0)
    with pytest.raises(ValueError, match=f"rank must be <= {p}"):
        lp.lowrank_posterior(G, p + 1, 1.0)
    with pytest.raises(ValueError, match="prior_prec must be > 0"):
        lp.lowrank_posterior(G, 2, -1.0)
    with pytest.raises(ArgumentTypeError, match="op must be a gradience_jax.LinearOperator"):
        lp.lowrank_posterior("G", 2, 1.0)
    with pytest.raises(ArgumentTypeError, match="covariance must be a LinearOperator"):
        lp.predictive_variance(ad.model_fn, ad.params, test, "sigma")
    other = gj.from_dense(jnp.eye(3, dtype=DT))
    with pytest.raises(ValueError, match="covariance acts on another parameter tree"):
        lp.predictive_variance(ad.model_fn, ad.params, test, other)
    with pytest.raises(ValueError, match="sigma is the MSE"):
        lp.head_log_likelihood(ad.model_fn, ad.head, ad.params, batch, sigma=1.0)
    with pytest.raises(ArgumentTypeError, match="head must be gj.heads.softmax_cross_entropy"):
        lp.head_log_likelihood(ad.model_fn, SumSquare("labels"), ad.params, batch)
    spec = lp.lowrank_spectrum(jnp.ones(3, DT), 5)
    with pytest.raises(ValueError, match="curvature has n_params=5, params have"):
        lp.log_marginal_likelihood(0.0, ad.params, 1.0, spec)
    with pytest.raises(ArgumentTypeError, match="curvature must be a LaplaceSpectrum"):
        lp.log_marginal_likelihood(0.0, ad.params, 1.0, G)
    full = lp.lowrank_spectrum(jnp.ones(3, DT), p)
    with pytest.raises(ValueError, match="method must be one of"):
        lp.optimize_prior_precision(0.0, ad.params, full, method="newton")
    zeros = jax.tree_util.tree_map(jnp.zeros_like, ad.params)
    with pytest.raises(ValueError, match="params are all zero"):
        lp.optimize_prior_precision(0.0, zeros, full)
    with pytest.raises(ValueError, match="the curvature is zero"):
        lp.optimize_prior_precision(0.0, ad.params, lp.lowrank_spectrum(jnp.zeros(3, DT), p))
    with pytest.raises(ValueError, match="n_params must be >= 3"):
        lp.lowrank_spectrum(jnp.ones(3, DT), 2)
    with pytest.warns(lp.LaplaceWarning, match="negative eigenvalues"):
        lp.dense_spectrum(np.diag([1.0, -0.5]))
