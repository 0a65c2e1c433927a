"""The exact diagonal of the GGN ``J^T H_out J`` (deterministic, no sampling).

One vector-Jacobian product per example, output position and column of an explicit factor of
the head's Hessian (:func:`gradience_jax.operators.kfac.head_hessian_factor`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from gradience_jax import tree as tu
from gradience_jax._validate import (
    ArgumentTypeError,
    check_all_finite,
    check_batch,
    check_loss_at_point,
    check_params,
    check_scalar_fn,
)
from gradience_jax.laplace._common import examples_per_chunk, one_example
from gradience_jax.operators._common import check_callable
from gradience_jax.operators.heads import Head, check_targets, compose
from gradience_jax.operators.kfac import head_hessian_factor, static_callable

PyTree = Any


def _output_factor(head: Head, outputs: jax.Array, batch: PyTree) -> tuple:
    """Rows ``q_tk`` and weights ``c_tk`` with ``H_t = sum_k c_tk q_tk q_tk^T`` per token.

    ``H_t`` is the head's Hessian w.r.t. token ``t``'s outputs, with the token weight and the
    normaliser (``w_t / Z``), soft-target sums and the NaN flag of invalid labels included:
    the head's own factor (:func:`~gradience_jax.operators.kfac.head_hessian_factor`, signed
    weights for a non-convex head) times ``w_t / Z``.

    Returns:
        ``q`` ``(*lead, K, C)`` and ``c`` ``(*lead, K)`` in the outputs' dtype.
    """
    lead, num_classes = outputs.shape[:-1], outputs.shape[-1]
    w = head.weights(batch, lead, outputs.dtype)
    targets = head.targets(batch)
    coef = w / head.normalizer(w, num_classes)
    flag = head.target_factor(outputs, targets, w)
    if flag is not None:
        coef = coef * flag
    q, weights = head_hessian_factor(head, outputs, targets)
    c = coef[..., None] if weights is None else coef[..., None] * weights
    return q, jnp.broadcast_to(c, q.shape[:-1])


def _pad_examples(tree: PyTree, pad: int, mode: str) -> PyTree:
    if pad == 0:
        return tree
    return jax.tree_util.tree_map(
        lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), mode=mode), tree)


def _chunked(tree: PyTree, chunk: int) -> PyTree:
    return jax.tree_util.tree_map(lambda x: x.reshape((-1, chunk) + x.shape[1:]), tree)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _ggn_diagonal_jit(model_fn, head, chunk, params, batch):
    outputs = model_fn(params, batch)
    q, c = _output_factor(head, outputs, batch)
    n, rest, num_classes = outputs.shape[0], outputs.shape[1:-1], outputs.shape[-1]
    r, k = math.prod(rest), q.shape[-2]
    q = q.reshape(n, r, k, num_classes)
    c = c.reshape(n, r * k)
    eye_r = jnp.eye(r, dtype=outputs.dtype)

    def one(ex, q_n, c_n):
        ex1 = jax.tree_util.tree_map(one_example, ex)
        _, vjp = jax.vjp(lambda p: model_fn(p, ex1), params)
        cots = jnp.einsum("ab,akc->akbc", eye_r, q_n).reshape((r * k, 1) + rest
                                                              + (num_classes,))
        g = jax.vmap(lambda u: vjp(u)[0])(cots)  # leaves (r k, *leaf)
        return jax.tree_util.tree_map(
            lambda x: jnp.tensordot(c_n.astype(x.dtype), x * x, axes=1), g)

    pad = (-n) % chunk
    xs = (_chunked(_pad_examples(batch, pad, "edge"), chunk),
          _chunked(_pad_examples(q, pad, "constant"), chunk),
          _chunked(_pad_examples(c, pad, "constant"), chunk))

    def step(acc, x):
        d = jax.vmap(one)(*x)
        return jax.tree_util.tree_map(lambda a, y: a + y.sum(0), acc, d), None

    acc, _ = jax.lax.scan(step, tu.zeros_like(params), xs)
    return acc


def ggn_diagonal(
    model_fn: Callable[[PyTree, PyTree], jax.Array],
    head: Head,
    params: PyTree,
    batch: PyTree,
    *,
    chunk_size: int | None = None,
    check: bool = True,
) -> PyTree:
    """The exact diagonal of the GGN ``G = J^T H_out J`` of ``head(model_fn(params, batch))``.

    ``diag(G) = sum_{n, r, k} c_nrk (J_nr^T q_nrk)^2`` where, per example ``n`` and output
    position ``r``, ``H_nr = sum_k c_nrk q_nrk q_nrk^T`` is an explicit factorisation of the
    head's output Hessian (softmax CE: ``diag(p) - p p^T = sum_k p_k (e_k - p)(e_k - p)^T``;
    MSE: ``2 I``; see ``_output_factor``). Each ``J_nr^T q`` is one ``vjp`` of example
    ``n`` fed as a batch of one (examples must not interact, as for ``gj.kfac``); the
    ``R C`` columns of an example share its forward pass (``vmap``), and examples run
    ``chunk_size`` at a time in a ``lax.scan``. Deterministic, no sampling.

    Cost: one forward pass over the batch, then ``N R C`` vector-Jacobian products through
    one example (about ``R C`` backward passes over the batch; ``R`` = positions per
    example, 1 for plain classifiers / regressors, ``C`` = output size). Memory:
    ``chunk_size * R * C`` parameter-sized gradients plus ``chunk_size`` examples'
    activations. For large ``R C`` (language models) prefer ``gj.diagonal`` (stochastic)
    or K-FAC.

    Args:
        model_fn: ``model_fn(params, batch) -> (N, *rest, C)`` outputs.
        head: a built-in head (``gj.heads.softmax_cross_entropy`` / ``mse``) or another
            :class:`~gradience_jax.Head` subclass (its per-token Hessian is eigendecomposed).
        params: parameter pytree.
        batch: pytree with a shared leading batch axis ``N``.
        chunk_size: examples per scan step (default: as many as keep
            ``chunk_size * R * C * P <= 2**24``, at least 1).
        check: raise on a non-finite loss / gradient at the point, and on a non-finite
            diagonal (eager calls).

    Returns:
        A pytree like ``params`` (``>= 0`` for convex heads).

    Raises:
        ArgumentTypeError: ``head`` is not a :class:`~gradience_jax.Head`, ``model_fn`` is
            not callable, or ``chunk_size`` is not an integer.
        ValueError: ``chunk_size < 1``, inconsistent batch axes, integer labels out of range.
        FloatingPointError: a non-finite loss or diagonal (``check=True``).
    """
    check_callable(model_fn, "model_fn")
    if not isinstance(head, Head):
        raise ArgumentTypeError(
            f"head must be a gj.heads head (softmax_cross_entropy / mse or a gj.Head "
            f"subclass with a per-token Hessian), got {type(head).__name__}")
    check_params(params)
    n = check_batch(batch)
    loss_fn = compose(model_fn, head)
    check_scalar_fn(loss_fn, (params, batch), "head(model_fn(params, batch), batch)")
    check_targets(head, model_fn, params, batch)
    if check:
        check_loss_at_point(loss_fn, params, batch, "the loss head(model_fn(params, batch))")
    out = jax.eval_shape(model_fn, params, batch)
    columns = math.prod(out.shape[1:])  # R * C per example
    chunk_size = examples_per_chunk(chunk_size, n, columns, params)
    diag = _ggn_diagonal_jit(static_callable(model_fn), head, chunk_size, params, batch)
    if check:
        check_all_finite(diag, "the GGN diagonal")
    return diag
