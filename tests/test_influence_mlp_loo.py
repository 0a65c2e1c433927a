"""Influence functions on a small MLP against actual leave-one-out retraining (issue 18).

The model: 2 inputs -> 8 tanh -> 3 classes (51 parameters, float64), softmax cross-entropy
plus the L2 term ``LAM / 2 ||theta||^2`` (so the optimum is a strict local minimum: the
Hessian's smallest eigenvalue is checked positive), on 80 examples of three overlapping
Gaussian blobs. Trained full-batch (L-BFGS, then Newton steps with the dense Hessian) to a
gradient norm below 1e-8. Ground truth: every one of the 80 training examples removed in
turn (a per-example weight mask, ``jax.vmap`` over the removed index), retrained from the
optimum by Newton (warm start, as Koh & Liang 2017 do) to the same tolerance, and the change
of the cross-entropy of each of 4 fixed test examples measured. Prediction:
``-scores / n_train`` (``influence`` scores the up-weighting derivative; removing example
``i`` is a weight of ``-1 / n``), curvature the Hessian (what retraining follows; not the
GGN).

Measured (seed 0; per method the minimum over the 4 test examples of the Spearman /
Pearson correlation between predicted and actual changes over the 80 removals, and the
least-squares slope actual / predicted) and the floors the test asserts:

| method                                  | Spearman | Pearson | slope     | floor S / P |
|-----------------------------------------|----------|---------|-----------|-------------|
| exact: dense ``H^{-1}``, no damping      | 0.9965   | 0.9981  | 1.05-1.10 | 0.98 / 0.98 |
| ``cg``, ``damping="auto"``               | 0.9938   | 0.9980  | 1.05-1.10 | 0.97 / 0.97 |
| ``arnoldi``, rank 20, damping ``LAM``    | 0.9311   | 0.9817  | 1.17-1.22 | 0.85 / 0.95 |
| ``kfac``, damping ``LAM``                | 0.8381   | 0.9292  | 0.52-0.57 | 0.70 / 0.85 |
| ``ekfac``, damping ``LAM``               | 0.8869   | 0.9488  | 0.46-0.47 | 0.75 / 0.85 |
| chance: 1,000 permutations (largest)    | 0.36-0.42| -       | -         | < 0.6       |

The slope of the exact and the cg influence is also asserted (0.9-1.25): correlations
cannot see a wrong ``1 / n`` scaling. ``damping="auto"`` is ``1e-3 lambda_max`` (8e-4).
K-FAC / EK-FAC approximate the GGN of the cross-entropy (the damping ``LAM`` stands in for
the L2 term they do not see): they rank the removals less well than the Hessian solves and
predict about half the size of the changes. ``arnoldi`` with its defaults (rank 20 of 51,
``damping="auto"``) is not in the table: it puts ``1 / d`` with a tiny ``d`` on the 31
discarded directions and measured Spearman 0.13-0.45 here; a truncated rank needs a damping
of the order of the discarded eigenvalues (``LAM``: the L2 term's floor of the spectrum).
The floors are for this seed; on seeds 1 and 2 (data and initialisation) the per-example
Spearman of the exact inverse measured 0.92-0.9998 (0.92: a test example whose changes are
all below 0.01), K-FAC 0.68-0.96, EK-FAC 0.70-0.97.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import X64, strict_dtype_promotion
from jax.flatten_util import ravel_pytree
from scipy.stats import pearsonr, rankdata, spearmanr

import gradience_jax as gj

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not X64, reason="retraining to 1e-8 needs float64")]
strict_promotion = pytest.fixture(autouse=True, scope="module")(strict_dtype_promotion)

LAM = 0.1  # L2 strength
N_TRAIN, N_TEST, HIDDEN, CLASSES = 80, 4, 8, 3
GRAD_TOL = 1e-8  # gradient norm of the optimum and of every retrained optimum
CE = gj.heads.softmax_cross_entropy()
#: method -> (Spearman floor, Pearson floor), the minimum over the test examples
FLOORS = {"exact": (0.98, 0.98), "cg": (0.97, 0.97), "arnoldi": (0.85, 0.95),
          "kfac": (0.70, 0.85), "ekfac": (0.75, 0.85)}
ARNOLDI_RANK = 20  # of 51; the Hessian's eigenvalues 20 and 21 are apart (0.225, 0.207)
#: every permuted prediction stays below this Spearman (and every floor above it)
CHANCE_CEILING = 0.6
#: actual / predicted change (least squares) of the exact and the cg influence
SLOPE_RANGE = (0.9, 1.25)


def model_fn(params, batch):
    """2 -> 8 tanh -> 3 logits."""
    hidden = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


def _l2(params):
    return 0.5 * LAM * sum(jnp.sum(v ** 2) for v in jax.tree_util.tree_leaves(params))


data_loss = gj.compose(model_fn, CE)  # the test measurement: cross-entropy only


def loss_fn(params, batch):
    """Mean cross-entropy + the L2 term (each example's gradient includes the L2 term)."""
    return data_loss(params, batch) + _l2(params)


def _blobs(rng, n):
    centres = np.array([[0.0, 1.5], [-1.3, -0.75], [1.3, -0.75]])
    labels = rng.integers(0, CLASSES, n)
    x = centres[labels] + 0.9 * rng.standard_normal((n, 2))
    return {"x": jnp.asarray(x), "labels": jnp.asarray(labels)}


@pytest.fixture(scope="module")
def mlp():
    """The trained MLP: flat optimum, unravel, data, the weighted objective and the dense
    Hessian at the optimum."""
    rng = np.random.default_rng(0)
    train, test = _blobs(rng, N_TRAIN), _blobs(rng, N_TEST)
    k1, k2 = jax.random.split(jax.random.key(0))
    init = {"w1": jax.random.normal(k1, (2, HIDDEN), jnp.float64) / np.sqrt(2.0),
            "b1": jnp.zeros(HIDDEN, jnp.float64),
            "w2": jax.random.normal(k2, (HIDDEN, CLASSES), jnp.float64) / np.sqrt(HIDDEN),
            "b2": jnp.zeros(CLASSES, jnp.float64)}
    flat, unravel = ravel_pytree(init)

    def per_example(v, batch):
        logp = jax.nn.log_softmax(model_fn(unravel(v), batch))
        return -jnp.take_along_axis(logp, batch["labels"][:, None], axis=1)[:, 0]

    def objective(v, weights):
        """Weighted mean cross-entropy + L2; weight 0 removes an example."""
        return jnp.sum(weights * per_example(v, train)) / jnp.sum(weights) + _l2(unravel(v))

    grad, hess = jax.grad(objective), jax.hessian(objective)
    ones = jnp.ones(N_TRAIN, jnp.float64)

    @jax.jit
    def newton(v, weights):
        def step(_, v):
            return v - jnp.linalg.solve(hess(v, weights), grad(v, weights))

        return jax.lax.fori_loop(0, 8, step, v)

    @jax.jit
    def lbfgs(v):
        opt = optax.lbfgs()
        fn = lambda u: objective(u, ones)  # noqa: E731
        value_and_grad = optax.value_and_grad_from_state(fn)

        def step(carry):
            v, state, i = carry
            value, g = value_and_grad(v, state=state)
            updates, state = opt.update(g, state, v, value=value, grad=g, value_fn=fn)
            return optax.apply_updates(v, updates), state, i + 1

        def go_on(carry):
            v, _, i = carry
            return (i < 2000) & (jnp.linalg.norm(grad(v, ones)) > 1e-6)

        return jax.lax.while_loop(go_on, step, (v, opt.init(v), 0))[0]

    with jax.numpy_dtype_promotion("standard"):  # optax's L-BFGS mixes int32 and int64
        flat = lbfgs(flat)
    flat = newton(flat, ones)
    h = np.asarray(hess(flat, ones))
    return dict(flat=flat, unravel=unravel, train=train, test=test, per_example=per_example,
                grad=grad, newton=newton, hessian=h, ones=ones)


@pytest.fixture(scope="module")
def exact(mlp):
    """The reference: the dense undamped Hessian-inverse influence scores."""
    return _dense_scores(mlp, 0.0)


@pytest.fixture(scope="module")
def loo(mlp):
    """Actual change of each test example's cross-entropy when each training example is
    removed and the model retrained from the optimum: ``(N_TEST, N_TRAIN)``."""
    masks = 1.0 - jnp.eye(N_TRAIN, dtype=jnp.float64)
    retrained = jax.jit(jax.vmap(mlp["newton"], in_axes=(None, 0)))(mlp["flat"], masks)
    grad_norms = jnp.linalg.norm(jax.vmap(mlp["grad"])(retrained, masks), axis=1)
    assert float(jnp.max(grad_norms)) < GRAD_TOL
    assert float(jnp.min(jnp.linalg.norm(retrained - mlp["flat"], axis=1))) > 0
    test_loss = jax.vmap(mlp["per_example"], in_axes=(0, None))(retrained, mlp["test"])
    return np.asarray(test_loss - mlp["per_example"](mlp["flat"], mlp["test"])).T


def _example_grads(fn, mlp, batch):
    """``(n, P)`` per-example gradients of ``fn`` (each example a batch of one), dense."""
    def one(example):
        example = jax.tree_util.tree_map(lambda a: a[None], example)
        return jax.grad(lambda v: fn(mlp["unravel"](v), example))(mlp["flat"])

    return np.asarray(jax.vmap(one)(batch))


def _dense_scores(mlp, damping):
    """``-g_test^T (H + d I)^{-1} g_train`` with the dense float64 Hessian."""
    g_train = _example_grads(loss_fn, mlp, mlp["train"])
    g_test = _example_grads(data_loss, mlp, mlp["test"])
    h = mlp["hessian"] + damping * np.eye(len(mlp["hessian"]))
    return -g_test @ np.linalg.solve(h, g_train.T)


def _dense_low_rank_scores(mlp, rank, damping):
    """Arnoldi's inverse from the dense top-``rank`` eigenpairs ``(U, lam)`` of ``H``:
    ``U diag(1 / (lam + d)) U^T + (I - U U^T) / d``."""
    values, vectors = np.linalg.eigh(mlp["hessian"])
    u, lam = vectors[:, -rank:], values[-rank:]
    inverse = (u / (lam + damping)) @ u.T + (np.eye(len(values)) - u @ u.T) / damping
    g_train = _example_grads(loss_fn, mlp, mlp["train"])
    g_test = _example_grads(data_loss, mlp, mlp["test"])
    return -g_test @ inverse @ g_train.T


def _slope(scores, loo):
    """Per test example least-squares slope of the actual changes on the predicted ones (1
    when the prediction's sign and its 1 / n scaling are right and retraining is linear)."""
    pred = -scores / N_TRAIN
    return np.sum(pred * loo, axis=1) / np.sum(pred * pred, axis=1)


def _correlations(scores, loo):
    """Per test example ``(spearman, pearson)`` of the predicted ``-scores / n`` with LOO."""
    pred = -scores / N_TRAIN
    spearman = np.array([spearmanr(p, a)[0] for p, a in zip(pred, loo)])
    pearson = np.array([pearsonr(p, a)[0] for p, a in zip(pred, loo)])
    return spearman, pearson


def test_the_optimum_is_a_strict_local_minimum(mlp):
    g = mlp["grad"](mlp["flat"], mlp["ones"])
    assert float(jnp.linalg.norm(g)) < GRAD_TOL
    assert np.linalg.eigvalsh(mlp["hessian"])[0] > 0


def test_exact_influence_predicts_leave_one_out_and_chance_does_not(exact, loo):
    """The dense undamped Hessian inverse (the reference) clears its floor; 1,000 random
    permutations of it stay far below every method's floor."""
    spearman, pearson = _correlations(exact, loo)
    print(f"exact: spearman {spearman.round(4)}, pearson {pearson.round(4)}")
    assert spearman.min() >= FLOORS["exact"][0] and pearson.min() >= FLOORS["exact"][1]
    assert spearman.min() >= max(s for s, _ in FLOORS.values())
    slope = _slope(exact, loo)  # the sign and the 1 / n scaling
    assert np.all((SLOPE_RANGE[0] <= slope) & (slope <= SLOPE_RANGE[1]))
    pred = -exact / N_TRAIN
    rng = np.random.default_rng(1)
    perms = np.stack([rng.permutation(N_TRAIN) for _ in range(1000)])
    for t in range(N_TEST):  # Spearman = Pearson of the ranks (no ties here)
        ranks = rankdata(pred[t])[perms]
        chance = np.corrcoef(np.concatenate([ranks, rankdata(loo[t])[None]]))[-1, :-1]
        print(f"chance, test example {t}: largest |spearman| {np.max(np.abs(chance)):.3f}")
        assert np.max(np.abs(chance)) < CHANCE_CEILING
    assert CHANCE_CEILING < min(s for s, _ in FLOORS.values())


@pytest.mark.parametrize("method", ["cg", "arnoldi", "kfac", "ekfac"])
def test_influence_predicts_leave_one_out_retraining(mlp, exact, loo, method):
    """``-scores / n`` ranks the 80 actual leave-one-out changes above the method's floor,
    and no better than the exact inverse does (up to 0.005 that damping can add)."""
    options = {"cg": {}, "arnoldi": {"rank": ARNOLDI_RANK, "damping": LAM},
               "kfac": {"model_fn": model_fn, "head": CE, "damping": LAM},
               "ekfac": {"model_fn": model_fn, "head": CE, "damping": LAM}}[method]
    res = gj.influence(loss_fn, mlp["unravel"](mlp["flat"]), mlp["train"], mlp["test"],
                       method=method, test_fn=data_loss, chunk_size=N_TRAIN, warn=False,
                       **options)
    assert res.scores.shape == (N_TEST, N_TRAIN) and res.record.method == method
    if method == "cg":  # solves of the Hessian itself: the dense formula
        ref = _dense_scores(mlp, res.record.damping)
        np.testing.assert_allclose(res.scores, ref, rtol=1e-6, atol=1e-8 * np.abs(ref).max())
        slope = _slope(res.scores, loo)
        assert np.all((SLOPE_RANGE[0] <= slope) & (slope <= SLOPE_RANGE[1]))
    if method == "arnoldi":  # the dense low-rank inverse of Schioppa et al. (numpy eigh)
        ref = _dense_low_rank_scores(mlp, ARNOLDI_RANK, LAM)
        np.testing.assert_allclose(res.scores, ref, rtol=1e-5, atol=1e-7 * np.abs(ref).max())
    spearman, pearson = _correlations(res.scores, loo)
    print(f"{method}: spearman {spearman.round(4)}, pearson {pearson.round(4)}, "
          f"slope {_slope(res.scores, loo).round(3)}")
    assert spearman.min() >= FLOORS[method][0] and pearson.min() >= FLOORS[method][1]
    exact_spearman, _ = _correlations(exact, loo)
    assert np.all(exact_spearman >= spearman - 0.005)
