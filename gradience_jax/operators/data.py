"""Dataset-level operators: the batch-size-weighted mean of an operator over batches.

Supported names: ``dataset_operator`` (re-exported as ``gradience_jax.dataset_operator``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from gradience_jax import tree as tu
from gradience_jax._validate import ArgumentTypeError, check_batch, check_key
from gradience_jax.operators._common import check_callable
from gradience_jax.operators.base import LinearOperator

PyTree = Any


@dataclasses.dataclass(frozen=True)
class _DatasetPrepare:
    prepares: tuple  # one static prepare per group of same-shaped batches

    def __call__(self, operands):
        groups, total = operands

        def matvec(v):
            acc = tu.zeros_like(v)
            for prepare, (stacked, weights) in zip(self.prepares, groups):

                def step(carry, xs, prepare=prepare):
                    ops_i, w_i = xs
                    out = prepare(ops_i)(v)
                    return tu.axpy(w_i / total, out, carry), None

                acc, _ = jax.lax.scan(step, acc, (stacked, weights))
            return acc

        return matvec


def dataset_operator(
    make_op: Callable[..., LinearOperator],
    fn: Callable,
    params: PyTree,
    batches: Iterable[PyTree],
    **kwargs: Any,
) -> LinearOperator:
    """``A v = sum_b N_b A_b v / sum_b N_b`` over an iterable of batches.

    Each batch's operator is built as ``make_op(fn, params=params, batch=b, **kwargs)``
    (e.g. ``dataset_operator(gj.ggn, model_fn, params, batches, head=head)``). Batches of
    equal shapes are stacked and scanned, so the compiled matvec does not grow with their
    number; a ``key`` in ``kwargs`` is folded with the batch index.

    Weighting by batch size makes the result equal the operator on the concatenated data
    for losses that are means over examples.

    Args:
        make_op: an operator factory taking ``(fn, params=..., batch=..., **kwargs)``, e.g.
            :func:`gradience_jax.hessian`, :func:`gradience_jax.ggn`.
        fn: the factory's first argument (``loss_fn`` or ``model_fn``).
        params: parameter pytree (the same for every batch).
        batches: an iterable of batch pytrees, each with a shared leading batch axis ``N_b``.
        **kwargs: further factory arguments (``head=...``, ``key=...``, ...);
            ``linearize`` defaults to ``False`` here.

    Returns:
        A :class:`LinearOperator` named ``"dataset(<name>, <B> batches)"``, PSD when every
        batch operator is. Construction builds (and checks) one operator per batch; a
        product costs one product per batch, scanned per group of equal shapes.

    Raises:
        ValueError: ``batches`` is empty or a batch is malformed; the factory's own errors
            pass through.
        ArgumentTypeError: ``make_op`` is not callable, ``batches`` is one batch (a dict)
            or not iterable, or ``key`` is not a PRNG key.
    """
    check_callable(make_op, "make_op")
    if isinstance(batches, Mapping) or not isinstance(batches, Iterable):
        raise ArgumentTypeError(
            f"batches must be an iterable of batches (e.g. a list of dicts), got "
            f"{type(batches).__name__}" + (": wrap a single batch as [batch]"
                                           if isinstance(batches, Mapping) else ""))
    if "key" in kwargs:
        kwargs = dict(kwargs, key=check_key(kwargs["key"], "key", default=False))
    ops, sizes = [], []
    for i, b in enumerate(batches):
        kw = dict(kwargs)
        if "key" in kw:
            kw["key"] = jax.random.fold_in(kw["key"], i)
        kw.setdefault("linearize", False)
        ops.append(make_op(fn, params=params, batch=b, **kw))
        sizes.append(check_batch(b))
    if not ops:
        raise ValueError("batches is empty: a dataset operator needs at least one batch")
    groups: dict = {}
    for op, n in zip(ops, sizes):
        treedef = jax.tree_util.tree_structure(op)
        shapes = tuple(jnp.shape(x) for x in jax.tree_util.tree_leaves(op))
        groups.setdefault((treedef, shapes), []).append((op, n))
    acc = tu.accumulation_dtype(ops[0].dtype)
    prepares, operands = [], []
    for members in groups.values():
        prepares.append(members[0][0].prepare)
        stacked = tu.stack([m.operands for m, _ in members])
        weights = jnp.asarray([n for _, n in members], dtype=acc)
        operands.append((stacked, weights))
    total = jnp.asarray(float(sum(sizes)), dtype=acc)
    first = ops[0]
    return LinearOperator(
        _DatasetPrepare(tuple(prepares)),
        (tuple(operands), total),
        None,
        is_psd=all(op.is_psd for op in ops),
        name=f"dataset({first.name}, {len(ops)} batches)",
        _spec=first._spec,
    )
