"""The Hessian of the loss as a matrix-free operator: ``jax.jvp`` over ``jax.grad``.

Supported names (the module has no ``__all__``): ``hessian``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from gradience_jax._validate import check_batch, check_loss_at_point, check_params, check_scalar_fn
from gradience_jax.operators._common import check_callable, resolve_linearize
from gradience_jax.operators.base import LinearOperator
from gradience_jax.operators.heads import check_loss_targets

PyTree = Any


@dataclasses.dataclass(frozen=True)
class _HessianPrepare:
    loss_fn: Callable
    linearize: bool

    def __call__(self, operands):
        params, batch = operands
        grad = lambda p: jax.grad(self.loss_fn)(p, batch)  # noqa: E731
        if self.linearize:
            return jax.linearize(grad, params)[1]
        return lambda v: jax.jvp(grad, (params,), (v,))[1]


def hessian(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    *,
    linearize: bool | str = "auto",
    check: bool = True,
) -> LinearOperator:
    """The Hessian ``H = d^2 loss / d params^2`` at ``(params, batch)``.

    Matvec: forward-over-reverse, ``H v = jvp(grad(loss), (params,), (v,))`` (Pearlmutter
    1994), about 2-3 gradient evaluations. With ``linearize=True`` the gradient is
    linearised once per bound operator (``jax.linearize``) and every product pays only the
    tangent pass; ``"auto"`` does so when the stored residuals fit
    ``operators._common.LINEARIZE_BUDGET_BYTES``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss over the batch.
        params: parameter pytree (floating point leaves).
        batch: pytree whose leaves share a leading batch axis.
        linearize: ``True``, ``False`` or ``"auto"``.
        check: evaluate loss and gradient once and raise on non-finite values.

    Returns:
        A symmetric (indefinite) :class:`LinearOperator` on pytrees shaped like ``params``.

    Raises:
        TypeError: integer / non-array parameter leaves, non-float loss, a ``loss_fn`` that
            is not callable.
        ValueError: non-scalar loss, inconsistent batch axes, integer labels out of
            ``[0, C)`` (for a ``loss_fn`` made by ``compose`` / ``from_nnx`` with a built-in
            head, concrete batches).
        FloatingPointError: non-finite loss or gradient at the point.
    """
    check_callable(loss_fn, "loss_fn")
    check_params(params)
    check_batch(batch)
    check_scalar_fn(loss_fn, (params, batch), "loss_fn")
    check_loss_targets(loss_fn, params, batch)
    if check:
        check_loss_at_point(loss_fn, params, batch, "loss_fn")
    lin = resolve_linearize(linearize, lambda p: jax.grad(loss_fn)(p, batch), params)
    return LinearOperator(
        _HessianPrepare(loss_fn, lin), (params, batch), params, is_psd=False, name="hessian"
    )
