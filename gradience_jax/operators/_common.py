"""Shared pieces of the operator factories: linearisation policy and J^T M J products."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from gradience_jax._validate import is_traced

PyTree = Any

#: Residuals stored by ``linearize="auto"`` may use at most this many bytes.
LINEARIZE_BUDGET_BYTES = 2 * 1024**3


def residual_bytes(fn: Callable[[PyTree], Any], params: PyTree) -> int:
    """Bytes of the residuals a linearisation of ``fn`` at ``params`` stores (shape inference)."""
    vjp_fn = jax.eval_shape(lambda p: jax.vjp(fn, p)[1], params)
    return int(
        sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(vjp_fn))
    )


def resolve_linearize(
    linearize: bool | str, fn: Callable[[PyTree], Any], params: PyTree
) -> bool:
    """``True`` / ``False`` as given; ``"auto"``: linearise when the residuals fit the budget."""
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
