"""Linear solves with curvature operators, matrix-free on pytrees.

Supported names: ``conjugate_gradient``, ``CGResult``, ``CGNotConvergedWarning``, ``cg_loop``
(the jittable core), ``default_cg_maxiter``. The natural gradient and the effective
dimension of :mod:`gradience_jax.geometry` solve with these.

References:
    M. Hestenes & E. Stiefel (1952) "Methods of conjugate gradients for solving linear
    systems"; Y. Saad (2003) "Iterative methods for sparse linear systems", s. 9.2 (PCG).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradience_jax import tree as tu
from gradience_jax._validate import check_like
from gradience_jax.operators.base import LinearOperator

PyTree = Any

__all__ = [
    "CGNotConvergedWarning",
    "CGResult",
    "cg_loop",
    "conjugate_gradient",
    "default_cg_maxiter",
]


class CGNotConvergedWarning(UserWarning):
    """Conjugate gradients stopped at ``maxiter`` above the requested tolerance."""


def _check_op(op: Any, name: str = "op") -> LinearOperator:
    if not isinstance(op, LinearOperator):
        raise ValueError(f"{name} must be a gradience_jax.LinearOperator, got {type(op).__name__}")
    return op


class CGResult(NamedTuple):
    """Solution of ``A x = b`` by conjugate gradients.

    Attributes:
        x: the solution (pytree like ``b``).
        residual: true relative residual ``||b - A x|| / ||b||`` (recomputed at the end).
        iterations: CG iterations (= products with ``A``, plus one for the residual).
        converged: ``residual <= tol`` (up to a factor 10 of rounding slack).
    """

    x: PyTree
    residual: float
    iterations: int
    converged: bool


def cg_loop(mv: Callable, b: PyTree, x0: PyTree, tol: Any, maxiter: Any,
            precond: Callable | None = None) -> tuple[PyTree, jax.Array, jax.Array]:
    """Preconditioned CG on pytrees in one ``lax.while_loop`` (jittable).

    Stops when ``||r|| <= tol ||b||`` or after ``maxiter`` iterations. A non-positive
    curvature ``p^T A p <= 0`` freezes the iterate (step 0) instead of dividing by it.

    Args:
        mv: ``v -> A v`` on pytrees like ``b`` (symmetric positive definite ``A``).
        b: right-hand side pytree.
        x0: initial guess like ``b``.
        tol: relative tolerance (scalar, may be traced).
        maxiter: iteration cap (int scalar, may be traced).
        precond: ``r -> M r`` with ``M ~ A^-1`` SPD, or ``None``.

    Returns:
        ``(x, iterations, ||r||)``: the iterate, the number of products with ``A`` and the
        recurrence residual norm (not recomputed). Cost: one ``mv`` and one ``precond`` per
        iteration, ``O(P)`` memory (four vectors).
    """
    m = precond if precond is not None else (lambda r: r)
    r = tu.sub(b, mv(x0))
    z = m(r)
    p = z
    rz = tu.vdot(r, z)
    stop = tol * tu.norm(b)

    def cond(state):
        _, r, _, _, k = state
        return jnp.logical_and(tu.norm(r) > stop, k < maxiter)

    def body(state):
        x, r, p, rz, k = state
        ap = mv(p)
        pap = tu.vdot(p, ap)
        alpha = jnp.where(pap > 0, rz / jnp.where(pap > 0, pap, 1.0), 0.0)
        x = tu.axpy(alpha, p, x)
        r = tu.axpy(-alpha, ap, r)
        z = m(r)
        rz_new = tu.vdot(r, z)
        beta = jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1.0), 0.0)
        p = tu.axpy(beta, p, z)
        return x, r, p, rz_new, k + 1

    x, r, _, _, k = jax.lax.while_loop(cond, body, (x0, r, p, rz, jnp.asarray(0, jnp.int32)))
    return x, k, tu.norm(r)


@jax.jit
def _cg_jit(op, precond, b, x0, tol, maxiter):
    mv = op.bind()
    pm = None if precond is None else precond.bind()
    x, k, _ = cg_loop(mv, b, x0, tol, maxiter, pm)
    res = tu.norm(tu.sub(b, mv(x))) / tu.norm(b)
    return x, k, res


def default_cg_maxiter(op: LinearOperator, maxiter: int | None) -> int:
    """``maxiter`` checked (``>= 1``), or the default ``min(2 n, 1000)``.

    Args:
        op: the operator (``n = op.n_params``).
        maxiter: the requested iteration cap, or None for the default.

    Returns:
        The iteration cap as an int.

    Raises:
        ValueError: ``maxiter < 1``.
    """
    if maxiter is None:
        return int(min(2 * op.n_params, 1000))
    if int(maxiter) < 1:
        raise ValueError(f"maxiter must be >= 1, got {maxiter}")
    return int(maxiter)


def conjugate_gradient(
    op: LinearOperator,
    b: PyTree,
    *,
    tol: float = 1e-8,
    maxiter: int | None = None,
    x0: PyTree | None = None,
    preconditioner: LinearOperator | None = None,
) -> CGResult:
    """Solve ``op x = b`` for a symmetric positive-definite operator by (P)CG on pytrees.

    Args:
        op: SPD operator (e.g. ``gj.damped(F, lam)``).
        b: right-hand side, a pytree like ``op.params_like``.
        tol: relative residual target ``||b - A x|| <= tol ||b||``.
        maxiter: iteration cap (default ``min(2 n, 1000)``).
        x0: initial guess (default zeros).
        preconditioner: an operator approximating ``op^-1`` (e.g.
            ``K.inverse(lam)`` of a K-FAC operator).

    Returns:
        :class:`CGResult`; a :class:`CGNotConvergedWarning` is emitted when the residual is
        above ``tol`` at the end (the result is still returned).

    Raises:
        ValueError: if ``b`` has zero norm or does not match ``op``'s parameters.
    """
    _check_op(op)
    check_like(b, op.params_like, "b", f"the {op.name} operator's params")
    if preconditioner is not None:
        _check_op(preconditioner, "preconditioner")
    if float(tu.norm(b)) == 0.0:
        raise ValueError("b has zero norm: the solution is zero and residuals are undefined")
    maxiter = default_cg_maxiter(op, maxiter)
    x0 = tu.zeros_like(b) if x0 is None else x0
    x, k, res = _cg_jit(op, preconditioner, b, x0, jnp.asarray(tol, op.dtype),
                        jnp.asarray(maxiter, jnp.int32))
    res, k = float(res), int(k)
    converged = res <= 10 * tol
    if not converged:
        warnings.warn(
            f"conjugate gradients stopped after {k} iterations with relative residual "
            f"{res:.3e} > tol={tol:.1e}",
            CGNotConvergedWarning,
            stacklevel=2,
        )
    return CGResult(x, res, k, converged)
