"""Shared test fixtures: small models in a registry and dense float64 references.

Core test files switch strict dtype promotion on for every test (as lineax does)::

    strict_promotion = pytest.fixture(autouse=True, scope="module")(strict_dtype_promotion)

(module scope: module-scoped fixtures are built under strict promotion too, so their
programs are the ones the tests reuse). Flax layers that are not strict-clean run inside
:func:`flax_standard`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

import gradience_jax as gj
from gradience_jax.models import CNN, MLP, SeedMLP, TinyTransformerLM, from_nnx
from gradience_jax.operators.base import LinearOperator

#: whether this run has float64 (``GRADIENCE_X64=0`` runs the suite with x64 off, as users do)
X64 = bool(jax.config.jax_enable_x64)
#: the float dtype of this run's defaults
FLOAT = np.float64 if X64 else np.float32


def tol(x64: float, x32: float) -> float:
    """The tolerance for this run's precision: ``x64`` with float64, ``x32`` without."""
    return x64 if X64 else x32


def strict_dtype_promotion():
    """Fixture body: run the test under ``jax.numpy_dtype_promotion("strict")``."""
    with jax.numpy_dtype_promotion("strict"):
        yield


@dataclasses.dataclass(frozen=True)
class StandardPromotion:
    """``fn`` run under standard dtype promotion, whatever the test's setting.

    Flax's own layers are not strict-clean in float64 (``nnx.LayerNorm`` promotes with
    ``jnp.promote_types(float64, float32)``; ``nnx.avg_pool`` divides by an int64 window
    size), so the CNN and transformer fixtures wrap their forward pass (the model call
    only); the heads, the operators and the algorithms around it still run strict.
    """

    fn: Callable

    def __call__(self, *args):
        with jax.numpy_dtype_promotion("standard"):
            return self.fn(*args)


def flax_standard(adapted):
    """``adapted`` with its Flax model call under :class:`StandardPromotion`."""
    model_fn = adapted.model_fn
    if isinstance(model_fn, gj.SplitModel):
        model_fn = gj.SplitModel(StandardPromotion(model_fn.features),
                                 StandardPromotion(model_fn.readout))
    else:
        model_fn = StandardPromotion(model_fn)
    return adapted._replace(loss_fn=gj.operators.heads.compose(model_fn, adapted.head),
                            model_fn=model_fn)


def _mlp(dtype):
    model = MLP([4, 5, 3], activation=jnp.tanh, param_dtype=dtype, rngs=nnx.Rngs(0))
    batch = gj.data.classification(jax.random.key(1), n=6, dim=4, num_classes=3)
    batch["inputs"] = batch["inputs"].astype(dtype)
    return from_nnx(model, gj.heads.softmax_cross_entropy()), batch


def _seed(dtype):
    model = SeedMLP(param_dtype=dtype, rngs=nnx.Rngs(0))
    batch = gj.data.seed_regression(jax.random.key(2), n=8)
    batch = jax.tree_util.tree_map(lambda x: x.astype(dtype), batch)
    return from_nnx(model, gj.heads.mse()), batch


def _cnn(dtype):
    model = CNN(channels=(2,), image_size=4, num_classes=3, param_dtype=dtype, rngs=nnx.Rngs(0))
    batch = gj.data.images(jax.random.key(3), n=4, size=4, num_classes=3)
    batch["inputs"] = batch["inputs"].astype(dtype)
    return flax_standard(from_nnx(model, gj.heads.softmax_cross_entropy())), batch


def _transformer(dtype):
    model = TinyTransformerLM(
        vocab_size=5, d_model=4, num_heads=2, num_layers=1, d_ff=8, max_len=4,
        param_dtype=dtype, rngs=nnx.Rngs(0),
    )
    batch = gj.data.token_sequences(jax.random.key(4), n=2, seq_len=3, vocab_size=5)
    batch["mask"] = jnp.array([[1, 1, 0], [1, 1, 1]], dtype)
    head = gj.heads.softmax_cross_entropy("labels", mask_key="mask")
    return flax_standard(from_nnx(model, head)), batch


MODELS = {"mlp": _mlp, "seed": _seed, "cnn": _cnn, "transformer": _transformer}


@functools.cache
def model_case(name: str, dtype_name: str = "float64"):
    """``(Adapted, batch)``. The float64 case holds the float32 case's weights and batch,
    upcast, so one float64 reference serves both precisions. With x64 off (``GRADIENCE_X64=0``)
    a float64 case cannot exist and the test is skipped; the float32 case then takes its
    references from float32 dense ``jax.hessian`` (compare with ``tol(x64, x32)``)."""
    if dtype_name == "float64" and not X64:
        import pytest

        pytest.skip("a float64 model needs jax_enable_x64 (this run has x64 off)")
    if dtype_name == "float32":
        return MODELS[name](jnp.dtype(jnp.float32))
    adapted, batch = MODELS[name](jnp.dtype(dtype_name))
    adapted32, batch32 = model_case(name, "float32")
    return adapted._replace(params=as_f64(adapted32.params)), as_f64(batch32)


def as_f64(tree):
    return jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def dense_hessian(loss_fn, params, batch):
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.jit(jax.hessian(lambda f: loss_fn(unravel(f), batch)))(flat))


def dense_jacobian(model_fn, params, batch):
    flat, unravel = ravel_pytree(params)
    out = model_fn(params, batch)
    jac = jax.jit(jax.jacfwd(lambda f: model_fn(unravel(f), batch).ravel()))(flat)
    return np.asarray(jac), out


def dense_ggn(model_fn, head, params, batch):
    jac, out = dense_jacobian(model_fn, params, batch)
    h_out = jax.jit(jax.hessian(lambda o: head(o.reshape(out.shape), batch)))(out.ravel())
    return jac.T @ np.asarray(h_out) @ jac


def dense_empirical_fisher(loss_fn, params, batch):
    """Sum of per-example outer products, per-example gradients by a Python loop."""
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    grads = []
    grad_fn = jax.jit(jax.grad(loss_fn))
    for i in range(n):
        ex = jax.tree_util.tree_map(lambda x: x[i : i + 1], batch)
        grads.append(np.asarray(ravel_pytree(grad_fn(params, ex))[0]))
    g = np.stack(grads)
    return g.T @ g / n


def dense_mc_fisher(model_fn, head, params, batch, key, num_samples, sample_outputs=None):
    """``J^T (sum_s g_s g_s^T w / (S Z)) J`` for the label draws ``mc_fisher(key)`` makes.

    ``g_s = head.token_sample_grad(outputs, k_s)`` with ``k_s = split(key, S)``; the draws
    are made from ``sample_outputs`` (default the outputs at ``params``: pass a float32
    model's outputs to reproduce a float32 operator's labels), all algebra in float64.
    """
    jac, out = dense_jacobian(model_fn, params, batch)
    draw_from = out if sample_outputs is None else sample_outputs
    keys = jax.random.split(key, num_samples)
    grads = np.stack([np.asarray(head.token_sample_grad(draw_from, k), np.float64)
                      for k in keys])
    w_arr = head.weights(batch, out.shape[:-1], out.dtype)
    c = out.shape[-1]
    z = float(head.normalizer(w_arr, c))
    w = np.asarray(w_arr, np.float64).reshape(-1)
    jt = jac.reshape(-1, c, jac.shape[-1])
    ref = np.zeros((jac.shape[-1],) * 2)
    for g in grads.reshape(num_samples, -1, c):
        rows = np.einsum("tc,tcp->tp", g, jt) * np.sqrt(w)[:, None]
        ref += rows.T @ rows
    return ref / (num_samples * z)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@dataclasses.dataclass(frozen=True)
class _TreeDense:
    """A dense matrix acting on pytree vectors (tests pytree, not flat, vectors)."""

    def __call__(self, matrix):
        def mv(v):
            flat, unravel = ravel_pytree(v)
            return unravel((matrix @ flat).astype(flat.dtype))

        return mv


def tree_dense_op(matrix, like, is_psd=False, name="tree") -> LinearOperator:
    """A :class:`LinearOperator` on vectors shaped like ``like`` with ``matrix`` behind it."""
    return LinearOperator(_TreeDense(), jnp.asarray(matrix), like, is_psd=is_psd, name=name)


def json_numbers(tree):
    """Every int / float (not bool) in a decoded JSON tree of dicts and lists."""
    if isinstance(tree, dict):
        for v in tree.values():
            yield from json_numbers(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from json_numbers(v)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree
