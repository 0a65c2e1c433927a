"""``LinearOperator.linearized()``: products from a stored linearisation equal the dense
reference (float64; float32 with ``GRADIENCE_X64=0``), pass through ``jit`` and reuse the
compiled programs for new params."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FLOAT, strict_dtype_promotion, tol

import gradience_jax as gj
from gradience_jax.operators.base import _linearize, apply

strict_promotion = pytest.fixture(autouse=True, scope="module")(strict_dtype_promotion)

HEAD = gj.heads.softmax_cross_entropy()
#: absolute tolerance on entries of size ~1 in this run's precision
ATOL = tol(1e-10, 1e-5)


def _case(scale=1.0):
    rng = np.random.default_rng(0)
    params = {"l1": {"w": jnp.asarray(rng.standard_normal((4, 6)) * 0.8 * scale, FLOAT),
                     "b": jnp.asarray(rng.standard_normal(6) * 0.1, FLOAT)},
              "l2": {"w": jnp.asarray(rng.standard_normal((6, 3)) * 0.8, FLOAT),
                     "b": jnp.zeros(3, FLOAT)}}
    batch = {"inputs": jnp.asarray(rng.standard_normal((16, 4)), FLOAT),
             "labels": jnp.asarray(rng.integers(0, 3, 16))}
    return params, batch


def model(params, batch):
    h = jnp.tanh(batch["inputs"] @ params["l1"]["w"] + params["l1"]["b"])
    return h @ params["l2"]["w"] + params["l2"]["b"]


def loss(params, batch):
    return HEAD(model(params, batch), batch)


BUILDERS = {
    "hessian": lambda p, b: gj.hessian(loss, p, b, linearize=False),
    "hessian_linearize": lambda p, b: gj.hessian(loss, p, b, linearize=True),
    "ggn": lambda p, b: gj.ggn(model, HEAD, p, b),
    "ef_streaming": lambda p, b: gj.empirical_fisher(loss, p, b, mode="streaming"),
    "damped_sum": lambda p, b: gj.damped(gj.hessian(loss, p, b) + gj.ggn(model, HEAD, p, b),
                                         0.1),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_linearized_products_equal_the_dense_reference(name):
    params, batch = _case()
    op = BUILDERS[name](params, batch)
    lin = op.linearized()
    assert (lin.name, lin.is_psd, lin.n_params) == (op.name, op.is_psd, op.n_params)
    dense = np.asarray(op.to_dense(), np.float64)
    np.testing.assert_allclose(np.asarray(lin.to_dense()), dense, rtol=0,
                               atol=ATOL * max(1.0, np.abs(dense).max()))
    v = gj.tree.random_like(jax.random.key(3), params)
    out = jax.jit(lambda o, x: o @ x)(lin, v)  # an operator argument of a jitted function
    ref = dense @ np.asarray(gj.tree.ravel(v), np.float64)
    np.testing.assert_allclose(np.asarray(gj.tree.ravel(out)), ref,
                               atol=ATOL * max(1.0, np.abs(ref).max()))


def test_linearizing_at_new_params_reuses_the_programs():
    params, batch = _case()
    v = gj.tree.random_like(jax.random.key(3), params)
    gj.hessian(loss, params, batch).linearized() @ v
    sizes = (_linearize._cache_size(), apply._cache_size())
    p2, _ = _case(scale=1.3)
    lin2 = gj.hessian(loss, p2, batch).linearized()
    out = lin2 @ v
    assert (_linearize._cache_size(), apply._cache_size()) == sizes
    dense = np.asarray(gj.hessian(loss, p2, batch).to_dense(), np.float64)
    ref = dense @ np.asarray(gj.tree.ravel(v), np.float64)
    np.testing.assert_allclose(np.asarray(gj.tree.ravel(out)), ref,
                               atol=ATOL * max(1.0, np.abs(ref).max()))


def test_eigsh_on_a_linearized_operator():
    params, batch = _case()
    lin = gj.hessian(loss, params, batch).linearized()
    ref = np.linalg.eigvalsh(np.asarray(gj.hessian(loss, params, batch).to_dense(), np.float64))
    res = gj.eigsh(lin, k=3, which="BE")
    np.testing.assert_allclose(res.eigenvalues, np.r_[ref[:1], ref[-2:]],
                               atol=tol(1e-9, 1e-4) * max(1.0, np.abs(ref).max()))
