"""Directions for loss landscapes (numerics only).

``random_direction`` draws a Gaussian direction and normalises it per filter (Li et al.
2018, "Visualizing the loss landscape of neural nets"), per layer or not at all;
``hessian_directions`` gives top (or bottom) Hessian eigenvectors. Directions are pytrees
like ``params``; the trajectory's PCA directions are in ``landscape.trajectory``.

Supported names: ``default_filter_axes``, ``filter_norms``, ``normalize_direction``,
``gaussian_like``, ``random_direction``, ``restrict_direction``, ``hessian_directions``,
``EigenDirections``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax import tree as tu
from gradience_jax._validate import check_key, check_params
from gradience_jax.landscape.common import (
    DENSE_LIMIT,
    LossFn,
    PyTree,
    check_direction,
    static_callable,
)
from gradience_jax.landscape.eigen import (
    EigenDirections,
    small_hessian_eigh,
    top_eigenpairs,
    unravel_columns,
)
from gradience_jax.operators.hessian import hessian

__all__ = [
    "EigenDirections",
    "default_filter_axes",
    "filter_norms",
    "gaussian_like",
    "hessian_directions",
    "normalize_direction",
    "random_direction",
    "restrict_direction",
]


def default_filter_axes(path: str, shape: Sequence[int]) -> tuple[int, ...] | None:
    """The axes that index *filters* (output units) of a parameter leaf in Flax layout.

    * 0-D / 1-D leaves (biases, LayerNorm scales and offsets): ``None`` (handled by the
      ``bias`` rule of :func:`normalize_direction`);
    * ``.../embedding`` ``(vocab, d)``: one filter per token row, ``(0,)``;
    * attention ``query`` / ``key`` / ``value`` kernels ``(d_in, heads, head_dim)``: one
      filter per output unit ``(head, j)``, ``(1, 2)``;
    * any other kernel (Dense ``(in, out)``, Conv ``(kh, kw, in, out)``, attention ``out``
      ``(heads, head_dim, d_out)``): the last (output) axis.

    A filter is then the slice of the leaf at one index of these axes (a Dense column, a
    Conv output channel: the PyTorch row / output channel of Li et al. 2018).

    Args:
        path: the leaf's ``"/"``-joined path (``tree.path_str``).
        shape: the leaf's shape.

    Returns:
        The filter axes, or None for leaves without filters.
    """
    nd = len(shape)
    if nd <= 1:
        return None
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "embedding":
        return (0,)
    parts = path.split("/")
    qkv = len(parts) >= 2 and parts[-1] == "kernel" and parts[-2] in ("query", "key", "value")
    if nd == 3 and qkv:
        return (1, 2)
    return (nd - 1,)


def _reduce_axes(path, x, filter_axes_fn):
    axes = filter_axes_fn(path, np.shape(x))
    if axes is None:
        return None
    nd = np.ndim(x)
    axes = tuple(a % nd for a in axes)
    return tuple(a for a in range(nd) if a not in axes)


def filter_norms(tree: PyTree, *, filter_axes: Callable | None = None) -> PyTree:
    """Per-filter Euclidean norms of every leaf (keepdims, so they broadcast against it).

    Leaves without filters (``filter_axes`` returns ``None``: biases) get their whole norm.

    Args:
        tree: parameters or a direction.
        filter_axes: ``(path, shape) -> axes or None``; default :func:`default_filter_axes`.

    Returns:
        A pytree like ``tree`` of norms with the filter axes kept and the others of size 1.
    """
    return _filter_norms_core(tree, static_callable(filter_axes or default_filter_axes))


@functools.partial(jax.jit, static_argnames=("fa",))
def _filter_norms_core(tree, fa):
    def leaf(path, x):
        red = _reduce_axes(path, x, fa)
        if red is None:
            red = tuple(range(np.ndim(x)))
        return jnp.sqrt(jnp.sum(jnp.square(x), axis=red, keepdims=True))

    return tu.map_with_path(leaf, tree)


def normalize_direction(
    direction: PyTree,
    params: PyTree,
    *,
    mode: str = "filter",
    bias: str | None = None,
    filter_axes: Callable | None = None,
    eps: float = 1e-12,
) -> PyTree:
    """Rescale a direction to the scale of the weights (Li et al. 2018).

    Args:
        direction: pytree like ``params``.
        params: the weights the direction lives at.
        mode: ``"filter"``: every filter ``d_f`` becomes ``d_f * ||w_f|| / ||d_f||``
            (filters as in :func:`default_filter_axes`); ``"layer"``: every leaf becomes
            ``d * ||w|| / ||d||``; ``"none"``: unchanged.
        bias: what happens to leaves without filters (biases, norm scales / offsets):
            ``"zero"`` (Li et al.'s default ``ignore='biasbn'``: they are not perturbed),
            ``"keep"`` (left as given) or ``"normalize"`` (scaled to the leaf's norm like a
            layer). Default ``"zero"`` for ``mode`` filter / layer, ``"keep"`` for none.
        filter_axes: ``(path, shape) -> axes or None``; default :func:`default_filter_axes`.
        eps: added to ``||d_f||`` against division by zero.

    Returns:
        A pytree like ``params`` (params' dtypes).

    Raises:
        ValueError: unknown ``mode`` / ``bias``, or ``direction`` does not match ``params``.
    """
    if mode not in ("filter", "layer", "none"):
        raise ValueError(f"mode must be 'filter', 'layer' or 'none', got {mode!r}")
    if bias is None:
        bias = "keep" if mode == "none" else "zero"
    if bias not in ("zero", "keep", "normalize"):
        raise ValueError(f"bias must be 'zero', 'keep' or 'normalize', got {bias!r}")
    direction = check_direction(direction, params, "direction")
    fa = static_callable(filter_axes or default_filter_axes)
    return _normalize_core(direction, params, mode, bias, fa, float(eps))


@functools.partial(jax.jit, static_argnames=("mode", "bias", "fa", "eps"))
def _normalize_core(direction, params, mode, bias, fa, eps):
    def rescale(d, w, axes):
        nd = jnp.sqrt(jnp.sum(jnp.square(d), axis=axes, keepdims=True))
        nw = jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True))
        return (d * (nw / (nd + eps))).astype(w.dtype)

    def leaf(path, d, w):
        red = _reduce_axes(path, w, fa)
        if red is None:  # bias-like leaf
            if bias == "zero":
                return jnp.zeros_like(w)
            if bias == "keep":
                return d
            return rescale(d, w, tuple(range(np.ndim(w))))
        if mode == "none":
            return d
        if mode == "layer":
            return rescale(d, w, tuple(range(np.ndim(w))))
        return rescale(d, w, red)

    return jax.tree_util.tree_map_with_path(
        lambda p, d, w: leaf(tu.path_str(p), d, w), direction, params
    )


@jax.jit
def gaussian_like(key: jax.Array, params: PyTree) -> PyTree:
    """A standard Gaussian pytree like ``params`` from ONE draw split into the leaves.

    One threefry call (far cheaper to compile than a draw per leaf); the draw is in the
    leaves' common dtype, then cast to each leaf's dtype. Unnormalised: see
    :func:`random_direction` for the filter-normalised version.

    Args:
        key: ``jax.random`` key.
        params: the pytree whose structure, shapes and dtypes the draw takes.

    Returns:
        A pytree like ``params`` of i.i.d. ``N(0, 1)`` entries.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    sizes = [int(np.prod(np.shape(x))) for x in leaves]
    dtype = jnp.result_type(*leaves) if leaves else jnp.float32
    flat = jax.random.normal(key, (max(sum(sizes), 1),), dtype)
    out, start = [], 0
    for x, n in zip(leaves, sizes):
        out.append(flat[start:start + n].reshape(np.shape(x)).astype(jnp.result_type(x)))
        start += n
    return jax.tree_util.tree_unflatten(treedef, out)


def random_direction(
    key: jax.Array,
    params: PyTree,
    *,
    mode: str = "filter",
    bias: str | None = None,
    filter_axes: Callable | None = None,
) -> PyTree:
    """A Gaussian direction normalised by :func:`normalize_direction` (default per filter).

    Args:
        key: ``jax.random`` key (same key, same direction).
        params: the weights the direction lives at.
        mode: ``"filter"``, ``"layer"`` or ``"none"``, as in :func:`normalize_direction`.
        bias: ``"zero"``, ``"keep"`` or ``"normalize"`` (default by ``mode``), as in
            :func:`normalize_direction`.
        filter_axes: ``(path, shape) -> axes or None``; default :func:`default_filter_axes`.

    Returns:
        A pytree like ``params`` (params' dtypes).

    Raises:
        ValueError: unknown ``mode`` / ``bias``, or empty ``params``.
        TypeError: ``params`` leaves that are not floating-point arrays.

    Example:
        >>> params = {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}
        >>> d = random_direction(jax.random.key(0), params)
        >>> bool(jnp.allclose(jnp.linalg.norm(d["kernel"], axis=0), jnp.sqrt(3.0)))
        True
        >>> d["bias"].tolist()  # leaves without filters are not perturbed by default
        [0.0, 0.0]
    """
    check_params(params)
    d = gaussian_like(check_key(key, default=False), params)
    return normalize_direction(d, params, mode=mode, bias=bias, filter_axes=filter_axes)


def restrict_direction(direction: PyTree, predicate: Callable[[str, Any], bool]) -> PyTree:
    """Zero every leaf whose ``"/"``-joined path does not satisfy ``predicate(path, leaf)``.

    E.g. a landscape of the attention parameters only.

    Args:
        direction: a pytree (a direction like params).
        predicate: ``(path, leaf) -> bool``; ``path`` as in ``tree.path_str``.

    Returns:
        A pytree like ``direction`` with the unselected leaves zero.
    """
    return tu.map_with_path(lambda p, x: x if predicate(p, x) else jnp.zeros_like(x), direction)


def hessian_directions(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    k: int = 2,
    *,
    which: str = "LA",
    key: jax.Array | None = None,
    dense_limit: int = DENSE_LIMIT,
) -> EigenDirections:
    """The top-``k`` or bottom-``k`` Hessian eigenvectors as unit directions like ``params``.

    Dense below ``dense_limit`` params, else Lanczos.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params: the point (pytree) at which the Hessian is taken.
        batch: the data passed to ``loss_fn``.
        k: number of directions, ``1 <= k <= n_params``.
        which: ``"LA"`` (largest, descending) or ``"SA"`` (smallest, ascending).
        key: Lanczos start key (large models only).
        dense_limit: at most this many parameters: dense Hessian (``n_params`` HVPs).

    Returns:
        :class:`EigenDirections` with ``k`` eigenvalues and directions.

    Raises:
        ValueError: bad ``which`` or ``k``.
        FloatingPointError: the Hessian is not finite.
    """
    if which not in ("LA", "SA"):
        raise ValueError(f"which must be 'LA' or 'SA', got {which!r}")
    n = tu.size(params)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n_params={n}], got {k}")
    if n <= dense_limit:
        evals, evecs = small_hessian_eigh(loss_fn, params, batch)
        idx = np.argsort(evals)[::-1][:k] if which == "LA" else np.argsort(evals)[:k]
        res = EigenDirections(evals[idx], unravel_columns(evecs[:, idx], params))
    else:
        res = top_eigenpairs(hessian(loss_fn, params, batch), k, which=which, key=key,
                             dense_limit=dense_limit)
    dirs = [check_direction(d, params, "eigenvector") for d in res.directions]
    return EigenDirections(res.eigenvalues, dirs)
