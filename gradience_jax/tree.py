"""Pytree vector algebra.

Vectors in gradience_jax are pytrees shaped like the model parameters (Linen param dicts,
``flax.nnx.State`` or any other pytree of arrays). Every function here maps leaf-wise with
``jax.tree_util`` and never concatenates leaves into one array, so sharded parameters stay
sharded. Reductions (``vdot``, ``norm``) accumulate in float32 or wider.

Dtypes: every function promotes explicitly (:func:`promote_dtypes`, JAX's standard rules,
weak Python scalars included), so results are the same whether or not
``jax.numpy_dtype_promotion("strict")`` is on.

Supported names: ``accumulation_dtype``, ``add``, ``axpy``, ``leaf_paths``, ``map_with_path``,
``norm``, ``path_str``, ``promote_dtypes``, ``random_like``, ``ravel``, ``scale``, ``size``,
``stack``, ``stacked_gram``, ``sub``, ``unravel_like``, ``unstack``, ``vdot``, ``zeros_like``
(the ``__all__`` list); ``PyTree`` is the type alias used in signatures.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

PyTree = Any

__all__ = [
    "accumulation_dtype",
    "add",
    "axpy",
    "leaf_paths",
    "map_with_path",
    "norm",
    "path_str",
    "promote_dtypes",
    "random_like",
    "ravel",
    "scale",
    "size",
    "stack",
    "stacked_gram",
    "sub",
    "unravel_like",
    "unstack",
    "vdot",
    "zeros_like",
]


def promote_dtypes(*xs: Any) -> jnp.dtype:
    """The dtype JAX's standard promotion gives ``xs``, decided explicitly.

    Use it to cast operands before mixing dtypes on purpose: the answer (and so the
    arithmetic after ``.astype``) does not depend on ``jax_numpy_dtype_promotion``, which
    may be ``"strict"``. Weak types count as usual: a Python float with a float32 array
    gives float32.

    Args:
        xs: arrays, Python scalars, ``jax.ShapeDtypeStruct`` s or dtypes (at least one).

    Returns:
        The promoted ``jnp.dtype``.
    """
    with jax.numpy_dtype_promotion("standard"):
        return jnp.dtype(jnp.result_type(*xs))


def accumulation_dtype(dtype: Any) -> jnp.dtype:
    """Dtype used to accumulate dot products of ``dtype`` leaves: float32 or wider.

    Args:
        dtype: a leaf dtype (non-floating dtypes accumulate in float32).

    Returns:
        ``float32`` for low-precision floats, the dtype itself for float32 / float64 /
        complex.
    """
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        return jnp.dtype(jnp.float32)
    return promote_dtypes(dtype, jnp.float32)


def _tree_dtype(tree: PyTree) -> jnp.dtype:
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.dtype(jnp.float32)
    return promote_dtypes(*[accumulation_dtype(jnp.result_type(leaf)) for leaf in leaves])


def _promoted(op: Callable[[Any, Any], Any], a: Any, b: Any) -> Any:
    """``op(a, b)`` with both operands cast to :func:`promote_dtypes` ``(a, b)`` first."""
    dt = promote_dtypes(a, b)
    return op(jnp.asarray(a, dt), jnp.asarray(b, dt))


def vdot(a: PyTree, b: PyTree) -> jax.Array:
    """Inner product ``<a, b>`` summed over all leaves, accumulated in float32 or wider.

    Args:
        a: pytree vector.
        b: pytree vector with the structure and leaf shapes of ``a``.

    Returns:
        A scalar array of dtype ``max(float32, leaf dtypes)`` (the real part for complex
        leaves). Cost: ``O(P)``, one ``vdot`` per leaf.
    """
    acc = _tree_dtype(a)
    parts = jax.tree_util.tree_map(
        lambda x, y: jnp.vdot(jnp.asarray(x, acc).ravel(), jnp.asarray(y, acc).ravel()).real,
        a,
        b,
    )
    return sum(jax.tree_util.tree_leaves(parts), jnp.zeros((), acc))


def norm(a: PyTree) -> jax.Array:
    """Euclidean norm of a pytree vector (float32 or wider).

    Args:
        a: pytree vector.

    Returns:
        A scalar array ``sqrt(<a, a>)`` in the dtype of :func:`vdot`. Cost: ``O(P)``.
    """
    return jnp.sqrt(vdot(a, a))


def add(a: PyTree, b: PyTree) -> PyTree:
    """``a + b`` leaf-wise (leaves of different dtypes promote as :func:`promote_dtypes`).

    Args:
        a: pytree vector.
        b: pytree vector with the structure and leaf shapes of ``a``.

    Returns:
        A pytree like ``a`` with each leaf in the promoted dtype of the pair.
    """
    return jax.tree_util.tree_map(functools.partial(_promoted, jnp.add), a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
    """``a - b`` leaf-wise (leaves of different dtypes promote as :func:`promote_dtypes`).

    Args:
        a: pytree vector.
        b: pytree vector with the structure and leaf shapes of ``a``.

    Returns:
        A pytree like ``a`` with each leaf in the promoted dtype of the pair.
    """
    return jax.tree_util.tree_map(functools.partial(_promoted, jnp.subtract), a, b)


def scale(alpha: Any, a: PyTree) -> PyTree:
    """``alpha * a``; the product is formed in the promoted dtype, then cast to each leaf's.

    Args:
        alpha: a scalar (Python number or scalar array).
        a: pytree vector.

    Returns:
        A pytree like ``a``, each leaf in its own dtype.
    """
    return jax.tree_util.tree_map(lambda x: _promoted(jnp.multiply, alpha, x).astype(x.dtype), a)


def axpy(alpha: Any, x: PyTree, y: PyTree) -> PyTree:
    """``alpha * x + y`` leaf-wise, keeping ``y``'s dtypes (promoted arithmetic, then cast).

    Args:
        alpha: a scalar (Python number or scalar array).
        x: pytree vector.
        y: pytree vector with the structure and leaf shapes of ``x``.

    Returns:
        A pytree like ``y``, each leaf in ``y``'s dtype.
    """
    return jax.tree_util.tree_map(
        lambda xi, yi: _promoted(jnp.add, _promoted(jnp.multiply, alpha, xi), yi).astype(yi.dtype),
        x,
        y,
    )


def zeros_like(a: PyTree) -> PyTree:
    """A zero vector with the structure, shapes and dtypes of ``a``.

    Args:
        a: template pytree of arrays.

    Returns:
        A pytree of zeros like ``a``.
    """
    return jax.tree_util.tree_map(jnp.zeros_like, a)


def size(a: PyTree) -> int:
    """Total number of scalar entries over all leaves (static).

    Args:
        a: pytree of arrays or ``jax.ShapeDtypeStruct``.

    Returns:
        ``P``, the sum of the leaves' sizes, as a Python ``int``.
    """
    return int(sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(a)))


def random_like(
    key: jax.Array,
    a: PyTree,
    distribution: Literal["normal", "rademacher"] = "normal",
    dtype: Any = None,
) -> PyTree:
    """A random vector shaped like ``a``: the one probe policy of the package.

    Same key, same vector everywhere: the estimators, Fisher geometry, the landscape and the
    Lanczos probes all draw through this function. All ``n`` entries come from ONE flat
    draw (a per-leaf draw compiles one PRNG kernel per leaf, slow for many-leaf models),
    split into the leaves in ``tree_flatten`` order.

    Args:
        key: a ``jax.random`` key.
        a: template pytree (arrays or ``jax.ShapeDtypeStruct``).
        distribution: ``"normal"`` (standard Gaussian) or ``"rademacher"`` (+-1).
        dtype: dtype of the draw and of every output leaf; default the promoted
            accumulation dtype of the leaves (float32 or wider), cast back to each leaf's
            own dtype.

    Returns:
        A pytree with ``a``'s structure and shapes; leaves in ``dtype`` when given, else in
        their own (floating) dtypes. Cost: one PRNG draw of ``n`` numbers.

    Raises:
        ValueError: an unknown ``distribution``.
    """
    if distribution == "normal":
        draw = jax.random.normal
    elif distribution == "rademacher":
        draw = jax.random.rademacher
    else:
        raise ValueError(
            f"distribution must be 'normal' or 'rademacher', got {distribution!r}"
        )
    leaves, treedef = jax.tree_util.tree_flatten(a)
    sizes = [int(np.prod(x.shape)) for x in leaves]
    acc = [accumulation_dtype(x.dtype) for x in leaves]
    draw_dtype = (jnp.dtype(dtype) if dtype is not None
                  else promote_dtypes(*acc) if acc else jnp.dtype(jnp.float32))
    flat = draw(key, (sum(sizes),), dtype=draw_dtype)
    out, start = [], 0
    for x, size in zip(leaves, sizes):
        piece = flat[start:start + size].reshape(tuple(x.shape))
        out.append(piece if dtype is not None else piece.astype(x.dtype))
        start += size
    return jax.tree_util.tree_unflatten(treedef, out)


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stack a sequence of same-structured pytrees along a new leading axis.

    Args:
        trees: ``n`` pytrees with the same structure and leaf shapes.

    Returns:
        A pytree whose leaves have shape ``(n, *leaf.shape)``.
    """
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: PyTree) -> list[PyTree]:
    """Inverse of :func:`stack`: split the leading axis into a list of pytrees.

    Args:
        tree: stacked pytree, every leaf with leading axis ``n``.

    Returns:
        A list of ``n`` pytrees (empty for a pytree without leaves).
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    if not leaves:
        return []
    n = leaves[0].shape[0]
    return [jax.tree_util.tree_unflatten(treedef, [x[i] for x in leaves]) for i in range(n)]


def stacked_gram(a: PyTree, b: PyTree | None = None, dtype: Any = None) -> jax.Array:
    """Gram matrix of two stacked pytrees: ``G[i, j] = <a_i, b_j>`` summed over leaves.

    Args:
        a: stacked pytree, every leaf with leading axis ``n``.
        b: stacked pytree like ``a`` with leading axis ``m``; default ``a``.
        dtype: contraction dtype (leaves are cast to it first); default each leaf pair's
            promoted dtype (:func:`promote_dtypes`).

    Returns:
        ``(n, m)`` array; leaves' partial Grams are summed in the promoted dtype. Cost: one
        ``tensordot`` per leaf, ``O(n m P)``.
    """
    b = a if b is None else b

    def leaf(x, y):
        dt = promote_dtypes(x, y) if dtype is None else dtype
        x, y = jnp.asarray(x, dt), jnp.asarray(y, dt)
        axes = tuple(range(1, x.ndim))
        return jnp.tensordot(x, y, axes=(axes, axes))

    parts = jax.tree_util.tree_leaves(jax.tree_util.tree_map(leaf, a, b))
    return functools.reduce(functools.partial(_promoted, jnp.add), parts)


def ravel(a: PyTree) -> jax.Array:
    """Concatenate all leaves into one 1-D array (tests and ``to_dense`` only).

    Leaves are cast to their :func:`promote_dtypes` first (as ``jax.flatten_util``'s
    ``ravel_pytree`` does), in ``tree_leaves`` order.

    Args:
        a: pytree of arrays.

    Returns:
        ``(size(a),)`` array.
    """
    leaves = jax.tree_util.tree_leaves(a)
    if not leaves:
        return ravel_pytree(a)[0]
    dt = promote_dtypes(*leaves)
    return jnp.concatenate([jnp.ravel(jnp.asarray(x, dt)) for x in leaves])


def unravel_like(flat: jax.Array, like: PyTree) -> PyTree:
    """Split a flat array (as made by :func:`ravel`) back into a pytree like ``like``.

    Args:
        flat: ``(size(like),)`` array.
        like: template pytree (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
        A pytree with ``like``'s structure, shapes and dtypes (each piece cast to its
        leaf's dtype).

    Raises:
        ValueError: ``flat`` does not have shape ``(size(like),)``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(like)
    sizes = [int(np.prod(np.shape(x))) for x in leaves]
    if tuple(np.shape(flat)) != (sum(sizes),):
        raise ValueError(
            f"flat must have shape ({sum(sizes)},) to unravel like the template, "
            f"got {tuple(np.shape(flat))}"
        )
    parts = jnp.split(flat, np.cumsum(sizes)[:-1]) if leaves else []
    out = [
        jax.lax.convert_element_type(part.reshape(np.shape(x)), jnp.result_type(x))
        for part, x in zip(parts, leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def _key_str(k: Any) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return str(k.name)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def path_str(path: Sequence[Any]) -> str:
    """A key path as a ``"/"``-joined string; NNX's trailing ``.value`` is dropped.

    Args:
        path: a ``jax.tree_util`` key path (dict, attribute, sequence or flattened keys).

    Returns:
        The path string, e.g. ``"blocks/0/attention/query/kernel"``.
    """
    parts = list(path)
    if parts and isinstance(parts[-1], jax.tree_util.GetAttrKey) and parts[-1].name == "value":
        parts = parts[:-1]
    return "/".join(_key_str(k) for k in parts)


def leaf_paths(a: PyTree) -> list[str]:
    """The ``"/"``-joined path of every leaf, in ``tree_leaves`` order.

    Args:
        a: pytree.

    Returns:
        One :func:`path_str` per leaf.
    """
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(a)[0]]


def map_with_path(fn: Callable[[str, Any], Any], a: PyTree) -> PyTree:
    """``tree_map`` whose function also receives the leaf's ``"/"``-joined path.

    Args:
        fn: ``fn(path, leaf) -> new leaf``, ``path`` as :func:`path_str`.
        a: pytree.

    Returns:
        A pytree with ``a``'s structure and ``fn``'s leaves.
    """
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), a)
