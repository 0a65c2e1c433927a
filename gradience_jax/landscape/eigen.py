"""Extreme Hessian eigenpairs for the landscape analyses: dense for small models, Krylov above.

Supported names: ``EigenDirections``, ``top_eigenpairs`` (any operator),
``small_hessian_eigh`` (all eigenpairs of a small model's dense Hessian),
``dense_hessian_eigvals_stacked`` (eigenvalues along a stacked trajectory) and
``unravel_columns`` (matrix columns back to pytrees).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax import tree as tu
from gradience_jax._validate import (
    check_batch,
    check_choice,
    check_int,
    check_params,
    check_scalar_fn,
)
from gradience_jax.landscape.common import DENSE_LIMIT, PyTree, static_callable
from gradience_jax.operators.base import LinearOperator, check_operator
from gradience_jax.operators.hessian import hessian

__all__ = [
    "EigenDirections",
    "dense_hessian_eigvals_stacked",
    "small_hessian_eigh",
    "top_eigenpairs",
    "unravel_columns",
]


class EigenDirections(NamedTuple):
    """Hessian eigenpairs.

    Attributes:
        eigenvalues: ``(k,)`` (descending for ``which='LA'``, ascending for ``'SA'``).
        directions: the unit eigenvectors as a list of pytrees like ``params``.
    """

    eigenvalues: np.ndarray
    directions: list


@jax.jit
def _sym_eigh(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    # XLA's solver: numpy's (OpenBLAS) can be 20x slower on busy machines (thread contention)
    m = m.astype(jnp.result_type(float))
    return jnp.linalg.eigh(0.5 * (m + m.T))


def _eigh_np(m: Any) -> tuple[np.ndarray, np.ndarray]:
    w, v = _sym_eigh(jnp.asarray(m))
    return np.asarray(w, np.float64), np.asarray(v, np.float64)


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def _dense_hessian(loss_fn, params, batch):
    """The dense Hessian of a small model in one compiled program (``tree.ravel`` order)."""
    op = hessian(loss_fn, params, batch, linearize=False, check=False)
    return op.to_dense(max_params=op.n_params)


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def dense_hessian_eigvals_stacked(loss_fn, stacked_params, batch):
    """Eigenvalues (ascending) of the dense Hessian at every point of a stacked pytree.

    One compiled program (``vmap`` over the leading axis); for small models only.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``, hashable (see
            :func:`~gradience_jax.landscape.common.static_callable`).
        stacked_params: params with a leading axis ``T`` (e.g. ``TrainResult.trajectory``).
        batch: the data.

    Returns:
        ``(T, n_params)`` eigenvalues. Cost: ``T`` dense Hessians (``n_params`` HVPs each)
        and ``T`` symmetric eigendecompositions.
    """
    return jax.vmap(lambda p: _sym_eigh(_dense_hessian(loss_fn, p, batch))[0])(stacked_params)


def small_hessian_eigh(loss_fn, params, batch) -> tuple[np.ndarray, np.ndarray]:
    """All eigenpairs (ascending) of the dense Hessian of a small model, validated.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params: the point (pytree) at which the Hessian is taken.
        batch: the data passed to ``loss_fn``.

    Returns:
        ``(eigenvalues (n,), eigenvectors (n, n))`` as float64 numpy arrays, the columns in
        ``tree.ravel(params)`` order. Cost: ``n`` Hessian-vector products, one ``eigh``.

    Raises:
        ValueError / TypeError: invalid ``params`` / ``batch`` / ``loss_fn``.
        FloatingPointError: the Hessian is not finite.
    """
    check_params(params)
    check_batch(batch)
    fn = static_callable(loss_fn)
    check_scalar_fn(fn, (params, batch), "loss_fn")
    m = _dense_hessian(fn, params, batch)
    if not bool(jnp.all(jnp.isfinite(m))):
        raise FloatingPointError("the Hessian of loss_fn is not finite at params")
    return _eigh_np(m)


def unravel_columns(vecs: np.ndarray, like: PyTree) -> list:
    """The columns of ``vecs`` as pytrees like ``like``.

    Args:
        vecs: ``(n_params, k)`` vectors in ``tree.ravel(like)`` order.
        like: the pytree whose structure, shapes and dtypes the columns take.

    Returns:
        A list of ``k`` pytrees.
    """
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(np.shape(s), jnp.result_type(s)), like)
    return [tu.unravel_like(jnp.asarray(vecs[:, i], tu.ravel(zeros).dtype), zeros)
            for i in range(vecs.shape[1])]


def top_eigenpairs(
    op: LinearOperator,
    k: int,
    *,
    which: str = "LA",
    key: jax.Array | None = None,
    dense_limit: int = DENSE_LIMIT,
    return_eigenvectors: bool = True,
) -> EigenDirections:
    """``k`` extreme eigenpairs of ``op``, exact when small.

    Dense ``eigh`` when ``n_params <= dense_limit``, otherwise the Krylov engine
    (:func:`gradience_jax.spectrum.top_eigenpairs`).

    Args:
        op: a symmetric :class:`~gradience_jax.operators.base.LinearOperator`.
        k: number of eigenpairs, ``1 <= k <= op.n_params``.
        which: ``"LA"`` largest algebraic (descending), ``"SA"`` smallest (ascending).
        key: Lanczos start key (Krylov path only).
        dense_limit: operators with at most this many parameters are made dense.
        return_eigenvectors: also return the eigenvectors (as pytrees).

    Returns:
        :class:`EigenDirections` (``directions`` empty without eigenvectors).

    Raises:
        ValueError: bad ``which`` or ``k``.
        FloatingPointError: the operator is not finite.
    """
    op = check_operator(op)
    which = check_choice(which, "which", ("LA", "SA"))
    k = check_int(k, "k", hi=op.n_params)
    from gradience_jax.spectrum import top_eigenpairs as _top  # noqa: PLC0415 (the engine)

    try:
        pairs = _top(op, int(k), which=which, key=key, dense_limit=dense_limit,
                     return_eigenvectors=return_eigenvectors)
    except ValueError as exc:
        if "non-finite" in str(exc):
            raise FloatingPointError(f"the {op.name} operator is not finite") from exc
        raise
    dirs = tu.unstack(pairs.vectors) if return_eigenvectors else []
    return EigenDirections(np.asarray(pairs.values, np.float64), dirs)

