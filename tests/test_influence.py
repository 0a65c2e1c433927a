"""Influence functions against closed forms and actual leave-one-out retraining (L2
logistic regression, numpy float64 Newton), planted mislabelled examples found by
self-influence, EK-FAC influence, TracIn, the JSON record and bad input."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FLOAT, dense_ggn, strict_dtype_promotion, tol
from jax.flatten_util import ravel_pytree

import gradience_jax as gj
from gradience_jax._validate import ArgumentTypeError
from gradience_jax.influence import (
    InfluenceResult,
    influence,
    self_influence,
    tracin,
)
from gradience_jax.operators.ekfac import ekfac

strict_promotion = pytest.fixture(autouse=True, scope="module")(strict_dtype_promotion)

LAM = 1e-2  # L2 strength of the logistic regression
CE = gj.heads.softmax_cross_entropy()


# -- L2-regularised logistic regression in numpy float64 (the reference) -----------------


def _aug(x):
    """``[1, x]``: the bias first, as ``ravel`` orders ``{"b", "w"}``."""
    return np.concatenate([np.ones((len(x), 1)), x], axis=1)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _newton(x, y, theta, steps=60):
    a, m = _aug(x), len(y)
    for _ in range(steps):
        p = _sigmoid(a @ theta)
        g = a.T @ (p - y) / m + LAM * theta
        if np.linalg.norm(g) < 1e-15:
            break
        h = (a.T * (p * (1 - p))) @ a / m + LAM * np.eye(len(theta))
        theta = theta - np.linalg.solve(h, g)
    return theta


def _per_example_loss(theta, x, y):
    z = _aug(x) @ theta
    return np.logaddexp(0.0, z) - y * z + 0.5 * LAM * theta @ theta


def _per_example_grads(theta, x, y):
    a = _aug(x)
    return (_sigmoid(a @ theta) - y)[:, None] * a + LAM * theta[None]


def _hessian(theta, x):
    a = _aug(x)
    p = _sigmoid(a @ theta)
    return (a.T * (p * (1 - p))) @ a / len(x) + LAM * np.eye(a.shape[1])


def loss_fn(p, batch):
    """Mean logistic loss + the L2 term (what each example's gradient includes too)."""
    z = batch["x"] @ p["w"] + p["b"][0]
    reg = 0.5 * LAM * (jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2))
    return jnp.mean(jnp.logaddexp(0.0, z) - batch["y"] * z) + reg


def _params(theta):
    return {"b": jnp.asarray(theta[:1], FLOAT), "w": jnp.asarray(theta[1:], FLOAT)}


def _batch(x, y):
    return {"x": jnp.asarray(x, FLOAT), "y": jnp.asarray(y, FLOAT)}


@pytest.fixture(scope="module")
def logreg():
    rng = np.random.default_rng(0)
    n, d = 200, 5
    x = rng.standard_normal((n, d))
    y = (rng.random(n) < _sigmoid(x @ rng.standard_normal(d))).astype(np.float64)
    xt = rng.standard_normal((3, d))
    yt = (rng.random(3) < 0.5).astype(np.float64)
    theta = _newton(x, y, np.zeros(d + 1))
    return dict(x=x, y=y, xt=xt, yt=yt, theta=theta)


@pytest.fixture(scope="module")
def loo(logreg):
    """Actual leave-one-out changes of each test loss for the first 50 training examples."""
    x, y, theta = logreg["x"], logreg["y"], logreg["theta"]
    base = _per_example_loss(theta, logreg["xt"], logreg["yt"])
    out = []
    for i in range(50):
        keep = np.delete(np.arange(len(y)), i)
        th = _newton(x[keep], y[keep], theta)
        out.append(_per_example_loss(th, logreg["xt"], logreg["yt"]) - base)
    return np.stack(out, axis=1)  # (n_test, 50)


def _dense_scores(logreg, damping):
    th = logreg["theta"]
    g_tr = _per_example_grads(th, logreg["x"], logreg["y"])
    g_te = _per_example_grads(th, logreg["xt"], logreg["yt"])
    h = _hessian(th, logreg["x"]) + damping * np.eye(len(th))
    return -g_te @ np.linalg.solve(h, g_tr.T)


# -- influence -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["cg", "arnoldi", "lissa"])
def test_influence_equals_the_dense_formula_and_predicts_leave_one_out(logreg, loo, method):
    """Scores = -g_test^T (H + dI)^{-1} g_train (closed-form gradients and Hessian), and
    -scores / n predicts actual retraining without the example (Pearson >= 0.99 on 50)."""
    opts = {"rank": 6} if method == "arnoldi" else {"maxiter": 5000} if method == "lissa" else {}
    res = influence(loss_fn, _params(logreg["theta"]), _batch(logreg["x"], logreg["y"]),
                    _batch(logreg["xt"], logreg["yt"]), method=method, chunk_size=64, **opts)
    assert isinstance(res, InfluenceResult) and res.scores.shape == (3, 200)
    rec = res.record
    assert rec.converged and rec.method == method and rec.residuals.shape == (3,)
    lam_min = np.linalg.eigvalsh(_hessian(logreg["theta"], logreg["x"]))[0]
    assert LAM <= lam_min and 0 < rec.damping <= 1e-2 * lam_min  # "auto": 1e-3 lambda_max
    ref = _dense_scores(logreg, rec.damping)
    np.testing.assert_allclose(res.scores, ref, rtol=tol(1e-7, 2e-3),
                               atol=tol(1e-9, 2e-3) * np.abs(ref).max())
    pred = -res.scores[:, :50] / 200
    for t in range(3):
        assert np.corrcoef(pred[t], loo[t])[0, 1] >= 0.99
    json.dumps(res.to_dict())


def test_self_influence_equals_the_dense_quadratic_form(logreg):
    th = logreg["theta"]
    res = self_influence(loss_fn, _params(th), _batch(logreg["x"], logreg["y"]),
                         method="arnoldi", rank=6, damping=1e-3, chunk_size=33)
    g = _per_example_grads(th, logreg["x"], logreg["y"])
    h = _hessian(th, logreg["x"]) + 1e-3 * np.eye(len(th))
    ref = np.einsum("ij,ji->i", g, np.linalg.solve(h, g.T))
    np.testing.assert_allclose(res.scores, ref, rtol=tol(1e-8, 1e-3))
    assert res.record.kind == "self_influence" and res.record.residuals.shape == (200,)
    assert res.record.damping == 1e-3 and res.record.info["damping_rule"] == "given"


def _planted(seed=0, n=200, d=5, flips=20, sep=2.5):
    """Two Gaussian classes ``sep`` apart along one axis, ``flips`` labels flipped."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    mu = np.zeros(d)
    mu[0] = sep
    x = rng.standard_normal((n, d)) + np.where(y[:, None] > 0, mu, -mu)
    flipped = rng.choice(n, flips, replace=False)
    y[flipped] = 1 - y[flipped]
    return x, y, flipped


def test_self_influence_recovers_planted_mislabelled_examples():
    x, y, flipped = _planted()
    theta = _newton(x, y.astype(np.float64), np.zeros(x.shape[1] + 1))
    res = self_influence(loss_fn, _params(theta), _batch(x, y), method="cg")
    top = res.top(len(flipped))["highest"]  # the top 10%
    assert len(set(top.tolist()) & set(flipped.tolist())) / len(flipped) >= 0.8


def _softmax_model(p, batch):
    return batch["x"] @ p["w"] + p["b"]


@pytest.mark.slow
def test_ekfac_self_influence_recovers_planted_mislabelled_examples():
    """EK-FAC (Grosse et al. 2023) on a two-logit softmax model: factors once, cheap
    queries; the damping stands in for the L2 term K-FAC does not see."""
    x, y, flipped = _planted(seed=1)
    params = {"w": jnp.zeros((x.shape[1], 2), FLOAT), "b": jnp.zeros(2, FLOAT)}
    batch = {"x": jnp.asarray(x, FLOAT), "labels": jnp.asarray(y)}

    def objective(p, b):
        reg = 0.5 * LAM * sum(jnp.sum(v ** 2) for v in jax.tree_util.tree_leaves(p))
        return gj.compose(_softmax_model, CE)(p, b) + reg

    flat, unravel = ravel_pytree(params)
    f = jax.jit(lambda v: objective(unravel(v), batch))
    g, h = jax.jit(jax.grad(f)), jax.jit(jax.hessian(f))
    for _ in range(30):  # Newton to the minimum
        flat = flat - jnp.linalg.solve(h(flat), g(flat))
    params = unravel(flat)
    res = self_influence(objective, params, batch, method="ekfac", model_fn=_softmax_model,
                         head=CE, damping=LAM)
    top = res.top(len(flipped))["highest"]
    assert len(set(top.tolist()) & set(flipped.tolist())) / len(flipped) >= 0.8
    assert res.record.method == "ekfac" and np.all(np.isfinite(res.record.residuals))


def test_ekfac_influence_is_exact_when_ekfac_is_the_ggn():
    """One training example and one Dense layer: EK-FAC = GGN, so the scores equal the
    dense GGN-inverse formula; a prebuilt approximation gives the same scores."""
    rng = np.random.default_rng(4)
    params = {"w": jnp.asarray(rng.standard_normal((4, 3)), FLOAT),
              "b": jnp.asarray(rng.standard_normal(3), FLOAT)}
    train = {"x": jnp.asarray(rng.standard_normal((1, 4)), FLOAT),
             "labels": jnp.asarray([2])}
    test = {"x": jnp.asarray(rng.standard_normal((5, 4)), FLOAT),
            "labels": jnp.asarray(rng.integers(0, 3, 5))}
    lf = gj.compose(_softmax_model, CE)
    G = gj.ggn(_softmax_model, CE, params, train)
    d = 0.1
    res = influence(lf, params, train, test, method="ekfac", damping=d, operator=G)
    ggn = dense_ggn(_softmax_model, CE, params, train).astype(np.float64)

    def grads(batch):  # a Python loop over examples, each a batch of one
        rows = []
        for i in range(jax.tree_util.tree_leaves(batch)[0].shape[0]):
            ex = jax.tree_util.tree_map(lambda a, i=i: a[i:i + 1], batch)
            rows.append(np.asarray(ravel_pytree(jax.grad(lf)(params, ex))[0], np.float64))
        return np.stack(rows)

    ref = -grads(test) @ np.linalg.solve(ggn + d * np.eye(len(ggn)), grads(train).T)
    np.testing.assert_allclose(res.scores, ref, rtol=tol(1e-8, 1e-3),
                               atol=tol(1e-12, 1e-5) * np.abs(ref).max())
    assert res.record.max_residual <= tol(1e-10, 1e-4)
    E = ekfac(_softmax_model, CE, params, train)
    again = influence(lf, params, train, test, method="ekfac", damping=d, operator=G, approx=E)
    np.testing.assert_allclose(again.scores, res.scores, rtol=1e-6)


# -- TracIn --------------------------------------------------------------------------------


def test_tracin_equals_the_checkpoint_sum_of_gradient_dot_products(logreg):
    rng = np.random.default_rng(2)
    thetas = [logreg["theta"] + 0.3 * rng.standard_normal(6) for _ in range(3)]
    lrs = [0.1, 0.05, 0.02]
    res = tracin(loss_fn, [_params(t) for t in thetas], _batch(logreg["x"], logreg["y"]),
                 _batch(logreg["xt"], logreg["yt"]), learning_rates=lrs, chunk_size=50)
    ref = sum(lr * _per_example_grads(t, logreg["xt"], logreg["yt"])
              @ _per_example_grads(t, logreg["x"], logreg["y"]).T
              for lr, t in zip(lrs, thetas))
    np.testing.assert_allclose(res.scores, ref, rtol=tol(1e-10, 1e-4),
                               atol=tol(1e-12, 1e-5) * np.abs(ref).max())
    assert res.record.method == "tracin" and res.record.damping is None
    d = json.loads(json.dumps(res.to_dict(scores=False)))
    assert d["info"]["learning_rates"] == lrs and "scores" not in d


# -- the record and bad input -----------------------------------------------------------


def test_record_serialises_and_top_ranks(logreg):
    res = influence(loss_fn, _params(logreg["theta"]), _batch(logreg["x"], logreg["y"]),
                    _batch(logreg["xt"], logreg["yt"]), method="cg", damping=0.05)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["method"] == "cg" and d["damping"] == 0.05 and len(d["residuals"]) == 3
    assert np.array(d["scores"]).shape == (3, 200) and d["max_residual"] <= tol(1e-7, 1e-4)
    top = res.top(3, test_index=1)
    row = res.scores[1]
    assert row[top["highest"][0]] == row.max() and row[top["lowest"][0]] == row.min()
    with pytest.raises(ValueError, match="test_index is required"):
        res.top(3)


def test_bad_input_raises_naming_the_argument(logreg):
    p = _params(logreg["theta"])
    train = _batch(logreg["x"][:10], logreg["y"][:10])
    test = _batch(logreg["xt"], logreg["yt"])
    with pytest.raises(ArgumentTypeError, match="loss_fn must be a callable"):
        influence("loss", p, train, test)
    with pytest.raises(ValueError, match="train leaves have inconsistent"):
        influence(loss_fn, p, {"x": train["x"], "y": train["y"][:5]}, test)
    with pytest.raises(ValueError, match="test has batch size 0"):
        influence(loss_fn, p, train, jax.tree_util.tree_map(lambda a: a[:0], test),
                  method="cg", damping=0.1)
    with pytest.raises(ValueError, match="model_fn=..., head=..."):
        influence(loss_fn, p, train, test, method="kfac", damping=0.1)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        influence(loss_fn, p, train, test, chunk_size=0)
    with pytest.raises(ValueError, match="method must be one of"):
        self_influence(loss_fn, p, train, method="exact")
    with pytest.raises(ValueError, match="checkpoints must be a non-empty list"):
        tracin(loss_fn, [], train, test)
    with pytest.raises(ValueError, match="learning_rates has 1 entries for 2"):
        tracin(loss_fn, [p, p], train, test, learning_rates=[0.1])
    with pytest.raises(ValueError, match=r"checkpoints\[1\]"):
        tracin(loss_fn, [p, {"w": p["w"]}], train, test)
