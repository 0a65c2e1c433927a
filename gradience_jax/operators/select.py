"""Restrict an operator to a subset of parameters: the principal sub-block ``P^T A P``.

Supported names (the module has no ``__all__``): ``params_filter``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from gradience_jax.operators._common import check_callable
from gradience_jax.operators.base import LinearOperator, check_operator
from gradience_jax.tree import path_str

PyTree = Any


@dataclasses.dataclass(frozen=True)
class _FilterPrepare:
    selected: tuple[str, ...]

    def __call__(self, operands):
        (op,) = operands
        like = op.params_like
        flat, treedef = jax.tree_util.tree_flatten_with_path(like)
        paths = [path_str(p) for p, _ in flat]
        mv = op.bind()
        sel = set(self.selected)

        def matvec(sub):
            full = [
                sub[p] if p in sel else jnp.zeros(leaf.shape, leaf.dtype)
                for p, (_, leaf) in zip(paths, flat)
            ]
            out = mv(jax.tree_util.tree_unflatten(treedef, full))
            out_leaves = jax.tree_util.tree_leaves(out)
            return {p: x for p, x in zip(paths, out_leaves) if p in sel}

        return matvec


def params_filter(
    op: LinearOperator, predicate: Callable[[str, Any], bool]
) -> LinearOperator:
    """The operator restricted to the parameters selected by ``predicate(path, leaf)``.

    Args:
        op: any :class:`LinearOperator` over a parameter pytree.
        predicate: called with the ``"/"``-joined key path (NNX's trailing ``value`` dropped,
            e.g. ``"blocks/0/attention/query/kernel"``) and the leaf's
            ``jax.ShapeDtypeStruct``; returns True to keep the leaf.

    Returns:
        An operator whose vectors are flat dicts ``{path: array}`` of the selected leaves;
        its matrix is the principal sub-block of ``op`` for those parameters (each product
        costs one product of ``op``).

    Raises:
        ValueError: if the predicate selects no parameter.
        ArgumentTypeError: ``op`` is not a :class:`LinearOperator` or ``predicate`` is not
            callable.
    """
    check_operator(op, "op")
    check_callable(predicate, "predicate")
    flat = jax.tree_util.tree_flatten_with_path(op.params_like)[0]
    selected = tuple(path_str(p) for p, leaf in flat if predicate(path_str(p), leaf))
    if not selected:
        paths = [path_str(p) for p, _ in flat]
        raise ValueError(f"params_filter selected no parameters; available paths: {paths[:20]}")
    if len(set(selected)) != len(selected):
        raise ValueError("parameter paths are not unique; cannot key the sub-vector by path")
    like = {path_str(p): leaf for p, leaf in flat if path_str(p) in set(selected)}
    return LinearOperator(
        _FilterPrepare(selected), (op,), like, is_psd=op.is_psd, name=f"filtered({op.name})"
    )
