"""Pytree vector algebra against numpy on the raveled vectors, for Linen dicts and nnx.State."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import strict_dtype_promotion

import gradience_jax as gj
from gradience_jax import tree as tu
from gradience_jax.operators import _common, fisher

strict_promotion = pytest.fixture(autouse=True, scope="module")(strict_dtype_promotion)


def linen_like():
    k = jax.random.split(jax.random.key(0), 3)
    return {
        "params": {
            "Dense_0": {"kernel": jax.random.normal(k[0], (3, 4)), "bias": jnp.arange(4.0)},
            "Dense_1": {"kernel": jax.random.normal(k[1], (4, 2)).astype(jnp.float32)},
        }
    }


def nnx_state():
    model = gj.models.MLP([3, 4, 2], rngs=nnx.Rngs(0))
    return nnx.split(model, nnx.Param)[1]


@pytest.mark.parametrize("make", [linen_like, nnx_state])
def test_algebra_matches_numpy(make):
    a = make()
    b = tu.random_like(jax.random.key(1), a)
    fa, fb = np.asarray(tu.ravel(a), np.float64), np.asarray(tu.ravel(b), np.float64)
    assert np.isclose(tu.vdot(a, b), fa @ fb, rtol=1e-6)
    assert np.isclose(tu.norm(a), np.linalg.norm(fa), rtol=1e-6)
    np.testing.assert_allclose(tu.ravel(tu.axpy(2.0, a, b)), 2 * fa + fb, rtol=1e-6)
    np.testing.assert_allclose(tu.ravel(tu.scale(-0.5, a)), -0.5 * fa, rtol=1e-6)
    np.testing.assert_allclose(tu.ravel(tu.add(a, b)), fa + fb, rtol=1e-6)
    np.testing.assert_allclose(tu.ravel(tu.sub(a, b)), fa - fb, rtol=1e-6)
    assert float(tu.norm(tu.zeros_like(a))) == 0.0
    assert tu.size(a) == fa.size
    # dtypes and structure preserved leaf by leaf
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(tu.axpy(2.0, b, a))):
        assert x.dtype == y.dtype and x.shape == y.shape
    assert jax.tree_util.tree_structure(tu.unravel_like(tu.ravel(a), a)) == \
        jax.tree_util.tree_structure(a)


def test_random_like_distributions_and_keys():
    a = linen_like()
    r = tu.random_like(jax.random.key(2), a, "rademacher")
    vals = np.concatenate([np.asarray(x).ravel() for x in jax.tree_util.tree_leaves(r)])
    assert set(np.unique(vals)) <= {-1.0, 1.0}
    # one key per leaf: two leaves of equal shape get different draws
    same = {"x": jnp.zeros((50,)), "y": jnp.zeros((50,))}
    g = tu.random_like(jax.random.key(3), same)
    assert not np.allclose(g["x"], g["y"])
    # same key, same numbers
    np.testing.assert_array_equal(tu.ravel(g), tu.ravel(tu.random_like(jax.random.key(3), same)))
    with pytest.raises(ValueError, match="distribution"):
        tu.random_like(jax.random.key(0), a, "uniform")


def test_vdot_accumulates_in_float32_for_bfloat16():
    x = {"w": jnp.full((4096,), 1.0 + 2.0**-7, jnp.bfloat16)}
    out = tu.vdot(x, x)
    assert out.dtype == jnp.float32
    exact = 4096 * float(jnp.asarray(1.0 + 2.0**-7, jnp.bfloat16)) ** 2
    assert abs(float(out) - exact) <= 1e-6 * exact


def test_stack_unstack_round_trip():
    a = linen_like()
    trees = [tu.scale(float(i), a) for i in range(3)]
    stacked = tu.stack(trees)
    assert jax.tree_util.tree_leaves(stacked)[0].shape[0] == 3
    for t, u in zip(trees, tu.unstack(stacked)):
        np.testing.assert_array_equal(tu.ravel(t), tu.ravel(u))


def test_leaf_paths_drop_nnx_value_suffix():
    paths = tu.leaf_paths(nnx_state())
    assert "layers/0/kernel" in paths and "layers/1/bias" in paths
    assert tu.leaf_paths(linen_like())[0] == "params/Dense_0/bias"


def test_linearize_auto_respects_the_memory_budget(monkeypatch):
    a = linen_like()["params"]
    fn = lambda p: jnp.tanh(p["Dense_0"]["kernel"]).sum() * p["Dense_0"]["bias"]  # noqa: E731
    nbytes = _common.residual_bytes(fn, a)
    assert nbytes > 0
    assert _common.resolve_linearize("auto", fn, a) is True
    monkeypatch.setattr(_common, "LINEARIZE_BUDGET_BYTES", nbytes - 1)
    assert _common.resolve_linearize("auto", fn, a) is False


def test_empirical_fisher_auto_picks_streaming_over_budget(monkeypatch):
    from helpers import model_case, rel_err

    (loss_fn, _, params, _), batch = model_case("seed", "float64")
    cached = gj.empirical_fisher(loss_fn, params, batch)
    assert isinstance(cached.prepare, fisher._CachedEFPrepare)
    monkeypatch.setattr(fisher, "CACHE_BUDGET_BYTES", 0)
    streaming = gj.empirical_fisher(loss_fn, params, batch)
    assert isinstance(streaming.prepare, fisher._StreamingEFPrepare)
    assert rel_err(streaming.to_dense(), cached.to_dense()) <= 1e-12
