"""The linearised-Laplace predictive covariance ``J(x*) Sigma J(x*)^T`` per test example.

``O`` vector-Jacobian products per example (``O`` outputs), ``Sigma`` applied to each, their
``O x O`` Gram matrix: no Jacobian of the whole model is formed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax import tree as tu
from gradience_jax._validate import ArgumentTypeError, check_batch, check_params
from gradience_jax.laplace._common import examples_per_chunk, one_example
from gradience_jax.laplace.covariance import lowrank_covariance
from gradience_jax.laplace.posterior import LowRankPosterior
from gradience_jax.operators._common import check_callable
from gradience_jax.operators.base import LinearOperator, from_matvec
from gradience_jax.operators.kfac import static_callable

PyTree = Any


def _as_covariance(covariance: Any, params: PyTree) -> LinearOperator:
    if isinstance(covariance, LowRankPosterior):
        return lowrank_covariance(covariance)
    if isinstance(covariance, LinearOperator):
        return covariance
    if callable(covariance):
        return from_matvec(covariance, params, is_psd=True, name="covariance")
    raise ArgumentTypeError(
        "covariance must be a LinearOperator (lowrank_covariance / kfac_covariance / "
        "dense_covariance), a LowRankPosterior or a callable v -> Sigma v, got "
        f"{type(covariance).__name__}")


class PredictiveVariance(NamedTuple):
    """Linearised-Laplace predictive of ``f(x*)``: mean ``f(x*; theta*)``, ``J Sigma J^T``.

    Attributes:
        mean: ``(N, *rest, C)`` model outputs at ``theta*``.
        variance: ``(N, *rest, C)`` the diagonal of ``J Sigma J^T`` per example.
        covariance: ``(N, *rest, C, *rest, C)`` the full per-example ``J Sigma J^T``, or
            ``None`` (``full_covariance=False``).
    """

    mean: jax.Array
    variance: jax.Array
    covariance: jax.Array | None


@functools.partial(jax.jit, static_argnums=(0, 1))
def _predictive_jit(model_fn, chunk, cov, params, batch):
    mv = cov.bind()

    def one(ex):
        ex1 = jax.tree_util.tree_map(one_example, ex)
        out, vjp = jax.vjp(lambda p: model_fn(p, ex1), params)
        o = out.size
        basis = jnp.eye(o, dtype=out.dtype).reshape((o,) + out.shape)
        rows = jax.vmap(lambda u: vjp(u)[0])(basis)  # J^T e_j, leaves (O, *leaf)
        srows = jax.vmap(mv)(rows)
        m = tu.stacked_gram(rows, srows)
        return out[0], 0.5 * (m + m.T)

    return jax.lax.map(one, batch, batch_size=chunk)


def predictive_variance(
    model_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    covariance: Any,
    *,
    full_covariance: bool = False,
    chunk_size: int | None = None,
) -> PredictiveVariance:
    """``Var[f(x*)] = J(x*) Sigma J(x*)^T`` of the linearised model, per test example.

    For each example (fed as a batch of one) the ``O = |f(x*)|`` rows ``J^T e_j`` come from
    one ``vjp`` (vmapped over ``j``), ``Sigma`` is applied to each, and ``J Sigma J^T`` is
    their ``O x O`` Gram matrix. No Jacobian of the whole model is formed.

    Cost per example: one forward pass, ``O`` vector-Jacobian products and ``O`` products
    with ``Sigma``; memory ``2 chunk_size O`` parameter-sized vectors.

    Args:
        model_fn: ``model_fn(params, batch) -> (N, *rest, C)``; examples must not interact.
        params: ``theta*``.
        batch: test inputs, a pytree with a leading batch axis (targets are not needed
            unless ``model_fn`` reads them).
        covariance: ``Sigma``: a :class:`LowRankPosterior`, a :class:`LinearOperator`
            (:func:`lowrank_covariance`, :func:`kfac_covariance`, :func:`dense_covariance`)
            or a callable ``v -> Sigma v`` on pytrees (its arrays become constants).
        full_covariance: also return the full per-example ``O x O`` matrices.
        chunk_size: examples vmapped together (default: as many as keep
            ``chunk_size * O * P <= 2**24``).

    Returns:
        :class:`PredictiveVariance`.

    Raises:
        ArgumentTypeError: a bad ``covariance`` kind, a non-callable ``model_fn`` or a
            non-integer ``chunk_size``.
        ValueError: ``chunk_size < 1``, inconsistent batch axes, a covariance over other
            parameters.
    """
    check_callable(model_fn, "model_fn")
    check_params(params)
    n = check_batch(batch)
    cov = _as_covariance(covariance, params)
    like = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x),
                                                                 jnp.result_type(x)), params)
    cov_like = cov.params_like
    if jax.tree_util.tree_structure(cov_like) != jax.tree_util.tree_structure(like) or any(
            a.shape != b.shape for a, b in zip(jax.tree_util.tree_leaves(cov_like),
                                               jax.tree_util.tree_leaves(like))):
        raise ValueError("covariance acts on another parameter tree (structure or shapes) "
                         "than params")
    out = jax.eval_shape(lambda p, b: model_fn(p, jax.tree_util.tree_map(one_example, b)),
                         params, jax.tree_util.tree_map(lambda x: x[0], batch))
    o = math.prod(out.shape)
    chunk_size = examples_per_chunk(chunk_size, n, o, params)
    mean, mats = _predictive_jit(static_callable(model_fn), chunk_size, cov, params, batch)
    shape = mean.shape[1:]
    var = jnp.diagonal(mats, axis1=1, axis2=2).reshape(mean.shape)
    full = mats.reshape((n,) + shape + shape) if full_covariance else None
    return PredictiveVariance(mean, var, full)
