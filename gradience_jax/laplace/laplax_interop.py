"""laplax interop: our curvature in the shapes laplax's posterior functions take.

``to_laplax_low_rank`` / ``to_laplax_diagonal`` / ``to_laplax_full`` give the estimates of
``laplax.curv.cov.set_posterior_fn``, ``to_laplax_mv`` the ``mv`` of ``create_posterior_fn``
(``docs/laplace.md``). laplax is optional: without it :class:`LowRankTerms` is a twin of its
``LowRankTerms``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradience_jax import tree as tu
from gradience_jax._validate import check_params
from gradience_jax.laplace._common import (
    check_eigenpairs,
    params_dtype,
    positive_scalar,
    scaled_leaves,
)
from gradience_jax.operators.base import (
    DEFAULT_MAX_DENSE_PARAMS,
    LinearOperator,
    check_operator,
)

PyTree = Any


class LowRankTerms(NamedTuple):
    """A twin of ``laplax.curv.utils.LowRankTerms`` (used when laplax is not installed).

    Same field names and the same pytree leaf order ``(U, S, scalar)`` that laplax's
    functions unpack, so laplax accepts it too.

    Attributes:
        U: ``(P, r)`` eigenvectors as columns, rows in ``jax.tree_util.tree_leaves`` order
            of the params (laplax's ``create_pytree_flattener`` order).
        S: ``(r,)`` eigenvalues.
        scalar: scalar added on the diagonal (laplax replaces it by ``prior_prec`` when it
            turns a curvature into a precision).
    """

    U: jax.Array
    S: jax.Array
    scalar: jax.Array


def _laplax_low_rank_class():
    try:
        from laplax.curv.utils import LowRankTerms as cls  # noqa: PLC0415 - optional peer
    except ImportError:
        return LowRankTerms
    return cls


def to_laplax_low_rank(values: Any, vectors: PyTree, *, scale: Any = 1.0,
                       scalar: Any = 0.0) -> Any:
    """A low-rank curvature ``scale * U diag(values) U^T`` as laplax's ``LowRankTerms``.

    laplax's ``set_posterior_fn("lanczos", terms, layout=params)`` turns it into a posterior
    with ``prior_prec`` from its ``prior_arguments`` (the ``scalar`` here is replaced).
    laplax has no low-rank + diagonal form: a :class:`LowRankPosterior`'s diagonal
    correction is not exported.

    Args:
        values: ``(r,)`` eigenvalues of the curvature (e.g. ``post.values`` with
            ``scale=1``, or ``gj.top_eigenpairs(G, r).values``).
        vectors: pytree stack of orthonormal eigenvectors (leaves ``(r, *leaf)``).
        scale: ``> 0`` multiplier (e.g. ``N`` to export the GGN of the summed loss).
        scalar: the ``scalar`` field.

    Returns:
        ``laplax.curv.utils.LowRankTerms`` when laplax is importable, else the
        :class:`LowRankTerms` twin: ``U`` ``(P, r)``, ``S`` ``(r,)``, ``scalar`` 0-d.

    Raises:
        ValueError: ``vectors`` is empty, ``values`` / ``vectors`` disagree on ``r``, or a
            bad ``scale``.
    """
    scale = positive_scalar(scale, "scale")
    values, leaves = check_eigenpairs(values, vectors)
    dt = params_dtype(vectors)
    u = jnp.concatenate([x.reshape(x.shape[0], -1).astype(dt) for x in leaves], axis=1).T
    s = jnp.maximum(values.astype(dt), 0.0) * jnp.asarray(scale, dt)
    return _laplax_low_rank_class()(U=u, S=s, scalar=jnp.asarray(scalar, dt))


def to_laplax_diagonal(diag: PyTree, *, scale: Any = 1.0) -> jax.Array:
    """A diagonal curvature as laplax's diagonal estimate: a flat ``(P,)`` array.

    Use with ``laplax.curv.cov.set_posterior_fn("diagonal", d, layout=params)``.

    Args:
        diag: pytree like the params (e.g. :func:`ggn_diagonal`).
        scale: ``> 0`` multiplier.

    Returns:
        ``(P,)`` in ``tree_leaves`` order (laplax's flattening order).

    Raises:
        ValueError: a bad ``scale`` or an empty pytree.
    """
    check_params(diag, "diag")
    scale = positive_scalar(scale, "scale")
    flat = tu.ravel(diag)
    return flat * jnp.asarray(scale, flat.dtype)


def to_laplax_full(op: LinearOperator, *, scale: Any = 1.0,
                   max_params: int = DEFAULT_MAX_DENSE_PARAMS) -> jax.Array:
    """A curvature operator as laplax's full estimate: the dense ``(P, P)`` matrix.

    Use with ``laplax.curv.cov.set_posterior_fn("full", mat, layout=params)``.

    Args:
        op: the curvature operator.
        scale: ``> 0`` multiplier.
        max_params: the largest ``P`` densified.

    Returns:
        ``(P, P)`` in ``tree_leaves`` order. Cost ``P`` products.

    Raises:
        ArgumentTypeError: ``op`` is not a :class:`LinearOperator`.
        ValueError: ``P > max_params`` or a bad ``scale``.
    """
    check_operator(op)
    scale = positive_scalar(scale, "scale")
    mat = op.to_dense(max_params=max_params)
    return mat * jnp.asarray(scale, mat.dtype)


def to_laplax_mv(op: LinearOperator, *, scale: Any = 1.0) -> Callable[[PyTree], PyTree]:
    """A curvature operator as laplax's ``mv``: a pytree -> pytree matvec.

    Pass it as ``mv`` to ``laplax.curv.cov.create_posterior_fn(curv_type, mv,
    layout=params, ...)`` (or ``estimate_curvature``), which then runs its own estimator
    (``"full"``, ``"diagonal"``, ``"lanczos"``, ``"lobpcg"``) on our operator.

    Args:
        op: the curvature operator (``gj.ggn``, ``gj.kfac``, ...).
        scale: ``> 0`` multiplier.

    Returns:
        ``v -> scale * (op @ v)`` (jittable; the operator's arrays are closed over).

    Raises:
        ArgumentTypeError: ``op`` is not a :class:`LinearOperator`.
        ValueError: a bad ``scale``.
    """
    check_operator(op)
    scale = positive_scalar(scale, "scale")

    def mv(v: PyTree) -> PyTree:
        return scaled_leaves(op.bind()(v), scale)

    return mv
