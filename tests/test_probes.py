"""Jittable probes: every-N under lax.cond inside a jitted step (bit-for-bit, one trace),
warm-started eigenvalue tracking against dense references (float64; float32 with
``GRADIENCE_X64=0``), NNX optimiser, gradient statistics, update ratios, non-finite metrics,
out-of-range labels and bad input."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import FLOAT, tol
from jax.flatten_util import ravel_pytree

import gradience_jax as gj
from gradience_jax import probes
from gradience_jax.models import MLP, from_nnx
from gradience_jax.operators.fisher import per_example_grads


@functools.cache
def _case():
    """A tanh MLP 4-8-3 (67 parameters, this run's float) on 32 points of 3 Gaussian blobs."""
    model = MLP([4, 8, 3], activation=jnp.tanh, param_dtype=FLOAT, rngs=nnx.Rngs(0))
    batch = gj.data.classification(jax.random.key(1), n=32, dim=4, num_classes=3)
    batch["inputs"] = batch["inputs"].astype(FLOAT)
    return from_nnx(model, gj.heads.softmax_cross_entropy()), batch


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _sgd_run(adapted, batch, probe, steps, lr=0.3):
    """Train with optax SGD + momentum in one jitted step; the probe (if any) runs inside."""
    tx = optax.sgd(lr, momentum=0.9)
    traces = []

    @jax.jit
    def step(params, opt_state, pstate, key):
        traces.append(1)  # trace-time side effect: counts compilations
        metrics = {}
        if probe is not None:
            metrics, pstate = probe(params, batch, key, pstate)
        loss, grads = jax.value_and_grad(adapted.loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, pstate, loss, metrics

    params, opt_state = adapted.params, tx.init(adapted.params)
    pstate = probe.init(params) if probe is not None else ()
    history, all_metrics = [], []
    for i in range(steps):
        params, opt_state, pstate, loss, metrics = step(params, opt_state, pstate, jax.random.key(i))
        history.append(_leaves(params) + [np.asarray(loss)])
        all_metrics.append(jax.device_get(metrics))
    return history, all_metrics, traces, step, (params, opt_state, pstate)


def test_every_inside_jit_is_bitwise_neutral_compiles_once_and_survives_nan():
    adapted, batch = _case()
    probe = probes.combine(
        probes.every(3, probes.hessian_eigenvalues(adapted.loss_fn, num_iters=4)),
        probes.every(2, probes.weight_metrics(k_top=2)),
        probes.every(2, probes.gradient_stats(adapted.loss_fn, num_microbatches=4)),
        probes.update_ratios(),
    )
    steps = 7
    plain, _, _, _, _ = _sgd_run(adapted, batch, None, steps)
    probed, metrics, traces, step, (params, opt_state, pstate) = _sgd_run(
        adapted, batch, probe, steps
    )
    assert len(traces) == 1
    for a, b in zip(plain, probed):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)  # bit for bit

    for i, m in enumerate(metrics):
        assert bool(m["hessian_top/probed"]) == (i % 3 == 0)
        assert bool(m["weights/probed"]) == (i % 2 == 0)
        assert np.isfinite(m["hessian_top/eigenvalue"]) == (i % 3 == 0)
        assert np.isfinite(m["weights/layers/0/kernel/effective_rank"]) == (i % 2 == 0)
        assert np.all(np.isfinite(m["weights/layers/1/kernel/top_singular_values"])) == (i % 2 == 0)
        assert np.isfinite(m["gradient/noise_scale"]) == (i % 2 == 0)
        assert not m["hessian_top/nonfinite"] and not m["weights/nonfinite"]
        assert np.isfinite(m["update_ratio/global"]) == (i > 0)
        sel = probes.select_probed(m)
        assert ("hessian_top/eigenvalue" in sel) == (i % 3 == 0)
        assert not any(k.endswith("/probed") for k in sel)
    assert metrics[3]["weights/global_norm"] is not None

    # Non-finite parameters on a probed step: NaN metrics with the flag, state kept, no raise.
    bad = jax.tree_util.tree_map(lambda x: x * jnp.nan, params)
    pstate = (pstate[0]._replace(step=jnp.int32(9)),) + pstate[1:]
    _, _, new_pstate, loss, m = step(bad, opt_state, pstate, jax.random.key(0))
    assert len(traces) == 1
    assert np.isnan(loss) and bool(m["hessian_top/probed"])
    assert bool(m["hessian_top/nonfinite"]) and np.isnan(m["hessian_top/eigenvalue"])
    for a, b in zip(_leaves(pstate[0].inner), _leaves(new_pstate[0].inner)):
        np.testing.assert_array_equal(a, b)
    assert int(new_pstate[0].step) == 10
    assert bool(m["update_ratio/nonfinite"])


def _dense_hessian_fn(loss_fn, batch):
    def dense(params):
        flat, unravel = ravel_pytree(params)
        return jax.hessian(lambda f: loss_fn(unravel(f), batch))(flat)

    return jax.jit(dense)


def _dense_ggn_fn(model_fn, head, batch):
    def dense(params):
        flat, unravel = ravel_pytree(params)
        out = model_fn(params, batch)
        jac = jax.jacfwd(lambda f: model_fn(unravel(f), batch).ravel())(flat)
        h = jax.hessian(lambda o: head(o.reshape(out.shape), batch))(out.ravel())
        return jac.T @ h @ jac

    return jax.jit(dense)


def test_warm_started_eigenvalue_probes_track_dense_references():
    """5 Lanczos iterations per step, warm-started, follow eigh of the dense Hessian / GGN
    top eigenvalue over 50 steps of training (it moves from 1.4 to 4.3): within 1e-2 on the
    first steps after the cold start, while the top eigenvector turns fast, then 1e-3.

    With x64 off the fixture is another instance (``nnx`` init and ``gj.data`` draw in the
    default float dtype): its step 2 is off by 5e-3, as it is in float64 for the same
    float32-initialised weights, so the early bound is about tracking, not precision."""
    adapted, batch = _case()
    probe = probes.combine(
        probes.hessian_eigenvalues(adapted.loss_fn, num_iters=5),
        probes.hessian_eigenvalues(adapted.loss_fn, which="SA", num_iters=5),
        probes.ggn_eigenvalues(adapted.model_fn, adapted.head, num_iters=5),
    )
    steps = 50
    history, metrics, traces, _, _ = _sgd_run(adapted, batch, probe, steps, lr=0.2)
    assert len(traces) == 1
    dense_h = _dense_hessian_fn(adapted.loss_fn, batch)
    dense_g = _dense_ggn_fn(adapted.model_fn, adapted.head, batch)
    treedef = jax.tree_util.tree_structure(adapted.params)
    params = adapted.params
    tops = []
    for i in range(steps):
        # metrics of step i were measured at the params *before* update i
        h = np.linalg.eigvalsh(np.asarray(dense_h(params)))
        g = np.linalg.eigvalsh(np.asarray(dense_g(params)))
        m = metrics[i]
        scale = max(1.0, abs(h[-1]))
        early = i < 5  # the first warm starts follow a fast-turning eigenvector
        assert abs(m["hessian_top/eigenvalue"] - h[-1]) <= (1e-2 if early else 1e-3) * scale, (
            i, m, h[-1])
        # the bottom sits in a near-degenerate cluster around 0: a Ritz value is an upper
        # bound, and 5 warm-started iterations get within 1% of the spectral scale
        assert m["hessian_bottom/eigenvalue"] >= h[0] - tol(1e-10, 1e-5) * scale
        assert m["hessian_bottom/eigenvalue"] - h[0] <= (0.1 if i < 5 else 1e-2) * scale
        assert abs(m["ggn_top/eigenvalue"] - g[-1]) <= (1e-2 if early else 1e-3) * max(
            1.0, g[-1]), (i, m, g[-1])
        tops.append(h[-1])
        params = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in history[i][:-1]])
    assert max(tops) - min(tops) > 0.05 * max(tops)  # the target really moves


def test_probes_in_nnx_jit_with_nnx_optimizer():
    """Probe state is an ordinary argument of an nnx.jit step; training is unchanged."""
    head = gj.heads.softmax_cross_entropy()
    batch = gj.data.classification(jax.random.key(1), n=32, dim=4, num_classes=3)

    def make():
        model = MLP([4, 8, 3], activation=jnp.tanh, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    model, _ = make()
    adapted = from_nnx(model, head)
    probe = probes.every(
        2,
        probes.combine(
            probes.hessian_trace(adapted.loss_fn, num_samples=3),
            probes.weight_metrics(fields=("stable_rank",)),
            name="curvature_and_weights",
        ),
    )
    traces = []

    def loss_of(model):
        return head(model(batch["inputs"]), batch)

    @nnx.jit
    def step(model, optimizer, pstate, key):
        traces.append(1)
        metrics, pstate = probe(nnx.state(model, nnx.Param), batch, key, pstate)
        loss, grads = nnx.value_and_grad(loss_of)(model)
        optimizer.update(model, grads)
        return loss, metrics, pstate

    @nnx.jit
    def plain_step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_of)(model)
        optimizer.update(model, grads)
        return loss

    m1, opt1 = make()
    m2, opt2 = make()
    pstate = probe.init(nnx.state(m1, nnx.Param))
    for i in range(5):
        loss, metrics, pstate = step(m1, opt1, pstate, jax.random.key(i))
        loss2 = plain_step(m2, opt2)
        assert float(loss) == float(loss2)
        assert bool(metrics["hessian_trace/probed"]) == (i % 2 == 0)
        if i % 2 == 0:
            assert np.isfinite(metrics["hessian_trace/estimate"])
            assert np.isfinite(metrics["weights/layers/0/kernel/stable_rank"])
    assert len(traces) == 1
    for a, b in zip(_leaves(nnx.state(m1, nnx.Param)), _leaves(nnx.state(m2, nnx.Param))):
        np.testing.assert_array_equal(a, b)


def test_gradient_stats_match_per_example_formulas():
    adapted, batch = _case()
    n = 32
    m_full = jax.jit(lambda p: probes.gradient_stats(adapted.loss_fn, num_microbatches=n)(
        p, batch, jax.random.key(0), ())[0])(adapted.params)
    g = np.asarray(jax.vmap(lambda x: ravel_pytree(x)[0])(
        per_example_grads(adapted.loss_fn, adapted.params, batch)), np.float64)
    mean = g.mean(0)
    cov_trace = np.sum(np.var(g, axis=0, ddof=1))
    rtol = tol(1e-10, 1e-4)
    np.testing.assert_allclose(m_full["gradient/norm"], np.linalg.norm(mean), rtol=rtol)
    np.testing.assert_allclose(m_full["gradient/trace_cov"], cov_trace, rtol=rtol)
    unbiased = mean @ mean - cov_trace / n
    # |G|^2 - tr(Sigma)/n cancels: its error is relative to the larger term
    atol = rtol * (mean @ mean)
    np.testing.assert_allclose(m_full["gradient/norm_sq_unbiased"], unbiased, rtol=rtol,
                               atol=atol)
    np.testing.assert_allclose(m_full["gradient/noise_scale"], cov_trace / unbiased,
                               rtol=rtol + atol / abs(unbiased))
    assert not bool(m_full["gradient/nonfinite"])
    with pytest.raises(ValueError, match="num_microbatches=5"):
        probes.gradient_stats(adapted.loss_fn, num_microbatches=5)(
            adapted.params, batch, jax.random.key(0), ())


def test_update_ratios():
    params = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([[1.0]])}
    updates = {"a": jnp.array([0.3, 0.4]), "b": jnp.array([[0.0]])}
    r = probes.update_to_weight_ratios(updates, params)
    np.testing.assert_allclose(r["update_ratio/a"], 0.1)
    np.testing.assert_allclose(r["update_ratio/b"], 0.0)
    np.testing.assert_allclose(r["update_ratio/global"], 0.5 / np.sqrt(26.0))
    probe = probes.update_ratios()
    state = probe.init(params)
    m0, state = probe(params, None, jax.random.key(0), state)
    assert np.isnan(m0["update_ratio/global"]) and not bool(m0["update_ratio/nonfinite"])
    new = jax.tree_util.tree_map(jnp.add, params, updates)
    m1, _ = probe(new, None, jax.random.key(0), state)
    np.testing.assert_allclose(m1["update_ratio/a"], 0.1)


def test_select_probed_and_bad_input():
    m = {"a/probed": np.bool_(False), "a/x": np.nan, "b/probed": np.bool_(True), "b/y": 1.0,
         "loss": 0.5}
    assert probes.select_probed(m) == {"b/y": 1.0, "loss": 0.5}
    adapted, _ = _case()
    top = probes.hessian_eigenvalues(adapted.loss_fn)
    with pytest.raises(ValueError, match="n must be"):
        probes.every(0, top)
    with pytest.raises(ValueError, match="which"):
        probes.hessian_eigenvalues(adapted.loss_fn, which="LM")
    with pytest.raises(ValueError, match="num_iters"):
        probes.hessian_eigenvalues(adapted.loss_fn, k=3, num_iters=2)
    with pytest.raises(ValueError, match="duplicates"):
        probes.combine(top, top)
    with pytest.raises(ValueError, match="fields"):
        probes.weight_metrics(fields=("bogus",))
    with pytest.raises(ValueError, match="name"):
        probes.weight_metrics(name="a/b")
    with pytest.raises(ValueError, match="perturbation"):
        probes.hessian_eigenvalues(adapted.loss_fn, perturbation=2.0)
    from gradience_jax._validate import ArgumentTypeError

    for call, exc, match in [
        (lambda: probes.every(2, top, offset=0.5), ArgumentTypeError, "offset must be an int"),
        (lambda: probes.every("2", top), ArgumentTypeError, "n must be an integer"),
        (lambda: probes.every(2, "probe"), ArgumentTypeError, "probe must be a Probe"),
        (lambda: probes.hessian_eigenvalues(adapted.loss_fn, k=1.5), ArgumentTypeError,
         "k must be an integer"),
        (lambda: probes.hessian_eigenvalues(adapted.loss_fn, perturbation="0.1"),
         ArgumentTypeError, "perturbation must be a real number"),
        (lambda: probes.hessian_eigenvalues(adapted.loss_fn, reorth="partial"), ValueError,
         "reorth must be one of"),
        (lambda: probes.hessian_eigenvalues(adapted.loss_fn, linearize="yes"), ValueError,
         "linearize must be True, False or 'auto'"),
        (lambda: probes.hessian_eigenvalues("loss"), ArgumentTypeError,
         "loss_fn must be a callable"),
        (lambda: probes.hessian_trace(adapted.loss_fn, num_samples=-3), ValueError,
         "num_samples must be >= 1, got -3"),
        (lambda: probes.hessian_trace(adapted.loss_fn, distribution="gauss"), ValueError,
         "distribution must be one of"),
        (lambda: probes.gradient_stats(adapted.loss_fn, num_microbatches="4"),
         ArgumentTypeError, "num_microbatches must be an integer"),
        (lambda: probes.weight_metrics(fields="stable_rank"), ArgumentTypeError,
         "fields must be a sequence"),
        (lambda: probes.weight_metrics(k_top=0), ValueError, "k_top must be >= 1"),
        (lambda: probes.combine(top, "x"), ArgumentTypeError, r"probes\[1\] is not a Probe"),
        (lambda: probes.update_to_weight_ratios(adapted.params, adapted.params, eps=-1.0),
         ValueError, "eps must be > 0"),
    ]:
        with pytest.raises(exc, match=match):
            call()


def test_out_of_range_labels_inside_jit_are_flagged_not_scored():
    """Traced labels cannot be checked on the host: a label of -1 or >= C makes the curvature
    probes' metrics NaN with ``nonfinite`` set and the state kept; called eagerly, the
    operator the probe builds raises naming the labels."""
    adapted, batch = _case()
    probe = probes.combine(
        probes.hessian_eigenvalues(adapted.loss_fn, num_iters=4),
        probes.ggn_eigenvalues(adapted.model_fn, adapted.head, num_iters=4),
        probes.hessian_trace(adapted.loss_fn, num_samples=2),
        probes.gradient_stats(adapted.loss_fn, num_microbatches=4),
    )
    run = jax.jit(lambda p, b, k, s: probe(p, b, k, s))
    state = probe.init(adapted.params)
    good, state1 = run(adapted.params, batch, jax.random.key(0), state)
    flags = ("hessian_top", "ggn_top", "hessian_trace", "gradient")
    assert not any(bool(good[f"{f}/nonfinite"]) for f in flags)
    for bad in (-1, 3):
        labels = batch["labels"].at[5].set(bad)
        m, state2 = run(adapted.params, dict(batch, labels=labels), jax.random.key(0), state1)
        for f in flags:
            assert bool(m[f"{f}/nonfinite"]), (bad, f)
        assert np.isnan(m["hessian_top/eigenvalue"]) and np.isnan(m["ggn_top/eigenvalue"])
        for a, b in zip(_leaves(state1), _leaves(state2)):  # the warm start survives
            np.testing.assert_array_equal(a, b)
        with pytest.raises(ValueError, match=r"batch\['labels'\] must lie in \[0, 3\)"):
            probe(adapted.params, dict(batch, labels=labels), jax.random.key(0), state1)


def test_probe_calls_check_key_and_state():
    adapted, batch = _case()
    probe = probes.every(2, probes.hessian_trace(adapted.loss_fn, num_samples=2))
    state = probe.init(adapted.params)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="state of probe 'hessian_trace' is None.*probe.init"):
        probe(adapted.params, batch, key, None)
    with pytest.raises(ValueError, match="does not match probe.init"):
        probe(adapted.params, batch, key, probes.hessian_eigenvalues(adapted.loss_fn).init(
            adapted.params))
    with pytest.raises(TypeError, match="key must be a PRNG key, got the int 42"):
        probe(adapted.params, batch, 42, state)
    with pytest.raises(ValueError, match="key is required"):
        probe(adapted.params, batch, None, state)
    with pytest.raises(ValueError, match="single PRNG key"):
        probe(adapted.params, batch, jax.random.split(key, 2), state)
    # a legacy raw key is one key; under jit the checks run at trace time
    metrics, _ = jax.jit(lambda p, b, k, s: probe(p, b, k, s))(
        adapted.params, batch, jax.random.PRNGKey(0), state)
    assert bool(metrics["hessian_trace/probed"]) and np.isfinite(metrics["hessian_trace/estimate"])
