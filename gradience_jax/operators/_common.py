"""Shared pieces of the operator factories: linearisation policy and J^T M J products.

Supported names: none for users (a private module of :mod:`gradience_jax.operators`, no
``__all__``). ``hessian``, ``ggn`` and ``fisher`` use ``LINEARIZE_BUDGET_BYTES``,
``residual_bytes``, ``resolve_linearize``, ``jtmj_matvec`` and ``check_callable``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from gradience_jax._validate import ArgumentTypeError, is_traced

PyTree = Any

#: Residuals stored by ``linearize="auto"`` may use at most this many bytes.
LINEARIZE_BUDGET_BYTES = 2 * 1024**3


def check_callable(fn: Any, name: str) -> Callable:
    """``fn`` must be callable (a clear error instead of a failure deep in a trace).

    Args:
        fn: the value to check (``loss_fn``, ``model_fn``, ``head``, ...).
        name: the argument's name, for the error message.

    Returns:
        ``fn``.

    Raises:
        ArgumentTypeError: ``fn`` is not callable.
    """
    if not callable(fn):
        raise ArgumentTypeError(f"{name} must be a callable, got {type(fn).__name__}")
    return fn


def residual_bytes(fn: Callable[[PyTree], Any], params: PyTree) -> int:
    """Bytes of the residuals a linearisation of ``fn`` at ``params`` stores (shape inference).

    Args:
        fn: ``fn(params) -> outputs``.
        params: the linearisation point (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
        The total bytes of the ``jax.vjp`` residuals; no FLOPs are spent (``eval_shape``).
    """
    vjp_fn = jax.eval_shape(lambda p: jax.vjp(fn, p)[1], params)
    return int(
        sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(vjp_fn))
    )


def resolve_linearize(
    linearize: bool | str, fn: Callable[[PyTree], Any], params: PyTree
) -> bool:
    """``True`` / ``False`` as given; ``"auto"``: linearise when the residuals fit the budget.

    Args:
        linearize: ``True``, ``False`` or ``"auto"``.
        fn: the function that would be linearised (``fn(params) -> outputs``).
        params: the linearisation point.

    Returns:
        Whether to linearise: for ``"auto"``, ``residual_bytes(fn, params) <=
        LINEARIZE_BUDGET_BYTES`` (``False`` when ``params`` are traced).

    Raises:
        ValueError: ``linearize`` is none of the three.
    """
    if linearize is True or linearize is False:
        return linearize
    if linearize != "auto":
        raise ValueError(f"linearize must be True, False or 'auto', got {linearize!r}")
    if is_traced(params):
        return False
    return residual_bytes(fn, params) <= LINEARIZE_BUDGET_BYTES


def jtmj_matvec(
    fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    out_map: Callable[[jax.Array], Callable[[jax.Array], jax.Array]],
    linearize: bool,
) -> Callable[[PyTree], PyTree]:
    """The matvec ``v -> J^T M(J v)`` with ``J`` the Jacobian of ``fn`` at ``params``.

    ``out_map(outputs)`` returns the output-space map ``M`` (e.g. a head's Hessian).
    Linearised: ``jax.linearize`` once, transpose the stored linear map for ``J^T``.
    Otherwise each product pays one ``jax.jvp`` and one ``jax.vjp``.

    Args:
        fn: ``fn(params) -> outputs`` whose Jacobian is ``J``.
        params: the point.
        out_map: ``out_map(outputs) -> M``, ``M`` a map on output-shaped arrays.
        linearize: linearise once (memory: the residuals) or recompute per product.

    Returns:
        The matvec ``v -> J^T M(J v)`` on pytrees shaped like ``params``.
    """
    if linearize:
        outputs, jvp = jax.linearize(fn, params)
        vjp = jax.linear_transpose(jvp, params)
        m = out_map(outputs)
        return lambda v: vjp(m(jvp(v)))[0]

    def matvec(v):
        outputs, jv = jax.jvp(fn, (params,), (v,))
        _, vjp = jax.vjp(fn, params)
        return vjp(out_map(outputs)(jv))[0]

    return matvec
