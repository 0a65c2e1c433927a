"""1-D and 2-D loss slices on a grid, in one compiled program (numerics only).

``slice_1d`` / ``slice_2d`` evaluate ``loss_fn(params + a d1 + b d2, batch)`` on a whole
grid in one compiled program: ``jax.lax.map`` over the grid points, vmapped in chunks
whose size fits a memory budget. Non-finite losses are masked (NaN in the result) and
their fraction is reported, never raised. ``evaluate_points`` / ``PointEvaluator`` do the
same for arbitrary points of an affine family.

Supported names: ``Slice1D``, ``Slice2D``, ``slice_1d``, ``slice_2d``, ``evaluate_points``,
``PointEvaluator``, ``accuracy_metric``.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax import tree as tu
from gradience_jax._validate import check_batch, check_int, check_params, check_scalar_fn
from gradience_jax.landscape.common import (
    DEFAULT_MEMORY_BUDGET,
    LossFn,
    PyTree,
    check_direction,
    check_grid,
    mask_nonfinite,
    static_callable,
)

__all__ = [
    "PointEvaluator",
    "Slice1D",
    "Slice2D",
    "accuracy_metric",
    "evaluate_points",
    "slice_1d",
    "slice_2d",
]


def _tree_bytes(t: PyTree) -> int:
    return int(
        sum(int(np.prod(np.shape(x))) * jnp.dtype(jnp.result_type(x)).itemsize
            for x in jax.tree_util.tree_leaves(t))
    )


def _spec(t: PyTree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(t)
    return treedef, tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves)


def _jaxpr_bytes(jaxpr: Any) -> int:
    """Sum of the sizes of every intermediate value of a jaxpr (recursing into sub-jaxprs).

    An upper bound of the temporary memory one evaluation needs (XLA fuses most away).
    """
    total = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            aval = getattr(v, "aval", None)
            if aval is not None and hasattr(aval, "shape") and hasattr(aval, "dtype"):
                total += int(np.prod(aval.shape)) * jnp.dtype(aval.dtype).itemsize
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _jaxpr_bytes(inner)
    return total


_TEMP_BYTES_CACHE: dict = {}


def _temp_bytes(loss_fn: Callable, params: PyTree, batch: PyTree) -> int:
    """Upper bound of the temporary memory of one loss evaluation (traced, not compiled)."""
    key = (loss_fn, _spec(params), _spec(batch))
    if key not in _TEMP_BYTES_CACHE:
        try:
            value = _jaxpr_bytes(jax.make_jaxpr(loss_fn)(params, batch).jaxpr)
        except Exception:  # pragma: no cover - exotic callables
            value = 4 * _tree_bytes(batch)
        if len(_TEMP_BYTES_CACHE) > 256:
            _TEMP_BYTES_CACHE.clear()
        _TEMP_BYTES_CACHE[key] = value
    return _TEMP_BYTES_CACHE[key]


def _chunk_size(loss_fn, params, batch, n_points: int, chunk_size, budget) -> int:
    if chunk_size is not None:
        return min(check_int(chunk_size, "chunk_size"), n_points)
    budget = check_int(budget, "memory_budget_bytes")
    per_point = 2 * _tree_bytes(params) + _temp_bytes(loss_fn, params, batch) + 1
    return int(max(1, min(n_points, budget // per_point)))


def _offset(params: PyTree, directions: Sequence[PyTree], c: jax.Array) -> PyTree:
    """``params + sum_j c[j] * directions[j]`` leaf-wise, keeping params' dtypes."""

    def leaf(w, *ds):
        out = w
        for j, d in enumerate(ds):
            out = out + c[j].astype(w.dtype) * d.astype(w.dtype)
        return out

    return jax.tree_util.tree_map(leaf, params, *directions)


@functools.partial(jax.jit, static_argnames=("loss_fn", "metric_fn", "chunk_size"))
def _eval_points(loss_fn, metric_fn, params, batch, directions, coords, chunk_size):
    def at(c):
        p = _offset(params, directions, c)
        value = loss_fn(p, batch)
        extra = metric_fn(p, batch) if metric_fn is not None else jnp.zeros((), value.dtype)
        return value, extra

    return jax.lax.map(at, coords, batch_size=chunk_size)


class Slice1D(NamedTuple):
    """``loss[i] = loss_fn(params + alphas[i] * d1, batch)``; NaN where not finite."""

    alphas: np.ndarray
    loss: np.ndarray
    metric: np.ndarray | None
    nonfinite_fraction: float


class Slice2D(NamedTuple):
    """``loss[i, j] = loss_fn(params + alphas[i] d1 + betas[j] d2, batch)``.

    NaN where not finite. Plot with ``contourf(alphas, betas, loss.T)``.
    """

    alphas: np.ndarray
    betas: np.ndarray
    loss: np.ndarray
    metric: np.ndarray | None
    nonfinite_fraction: float


def _bucket(n: int) -> int:
    """Pad small point counts to a power of two (at least 32); large grids run at their size.

    Paths, refinements and short 1-D slices then share one compiled program.
    """
    return max(32, 1 << (n - 1).bit_length()) if n <= 256 else n


class PointEvaluator:
    """Loss (and metric) at many points of an affine family ``params + sum_j c_j d_j``.

    Validated once, then evaluates many coordinate arrays with one compiled program per
    padded size (see :func:`evaluate_points`); used by the slices and by the path
    evaluations of ``landscape.connectivity``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params: the origin of the affine family (pytree).
        batch: the data passed to ``loss_fn``.
        directions: a non-empty sequence of pytrees like ``params``.
        metric_fn: optional second ``(params, batch) -> scalar``.
        chunk_size: points per vmapped chunk (default: as many as fit
            ``memory_budget_bytes``).
        memory_budget_bytes: memory budget of one chunk, used when ``chunk_size`` is None.

    Raises:
        ValueError: empty ``directions`` or directions not like ``params``; invalid
            ``params`` / ``batch`` / ``loss_fn``.

    Calling it with ``coords (M, len(directions))`` returns ``(loss (M,), metric (M,) or
    None)`` as raw (unmasked) float64 numpy arrays.
    """

    def __init__(self, loss_fn, params, batch, directions, *, metric_fn=None, chunk_size=None,
                 memory_budget_bytes=DEFAULT_MEMORY_BUDGET):
        check_params(params)
        check_batch(batch)
        self.dirs = tuple(check_direction(d, params, f"directions[{i}]")
                          for i, d in enumerate(directions))
        if not self.dirs:
            raise ValueError("directions is empty")
        self.num_dirs = len(self.dirs)
        # 1-D slices run the 2-D program with a zero second direction: one compiled grid
        self._dirs = self.dirs + (tu.zeros_like(self.dirs[0]),) * max(0, 2 - self.num_dirs)
        self.loss_fn, self.metric_fn = static_callable(loss_fn), static_callable(metric_fn)
        check_scalar_fn(self.loss_fn, (params, batch), "loss_fn")
        if self.metric_fn is not None:
            check_scalar_fn(self.metric_fn, (params, batch), "metric_fn")
        self.params, self.batch = params, batch
        self.chunk_size, self.budget = chunk_size, memory_budget_bytes
        self.dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))

    def __call__(self, coords: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """Loss (and metric) at ``coords (M, len(directions))``; raw float64 arrays."""
        coords = np.asarray(coords, np.float64)
        if coords.ndim != 2 or coords.shape[1] != self.num_dirs:
            raise ValueError(f"coords must have shape (M, {self.num_dirs}), got {coords.shape}")
        m = coords.shape[0]
        if m == 0:
            raise ValueError("coords is empty")
        padded = np.zeros((_bucket(m), len(self._dirs)))
        padded[:m, : self.num_dirs] = coords
        chunk = _chunk_size(self.loss_fn, self.params, self.batch, padded.shape[0],
                            self.chunk_size, self.budget)
        values, extra = _eval_points(self.loss_fn, self.metric_fn, self.params, self.batch,
                                     self._dirs, jnp.asarray(padded, self.dtype), chunk)
        values = np.asarray(values, np.float64)[:m]
        extra = np.asarray(extra, np.float64)[:m] if self.metric_fn is not None else None
        return values, extra


def evaluate_points(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    directions: Sequence[PyTree],
    coords: Any,
    *,
    metric_fn: LossFn | None = None,
    chunk_size: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Loss (and metric) at ``params + sum_j coords[m, j] directions[j]`` for every row ``m``.

    One jitted program (``params``, ``batch``, directions and coords are arguments, so the
    compiled grid is reused for new points of the same shapes; point counts are padded to
    powers of two): ``lax.map`` over points, vmapped ``chunk_size`` at a time (default: as
    many as fit ``memory_budget_bytes``, from an upper bound of one evaluation's
    intermediates).

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params: the origin of the affine family (pytree).
        batch: the data passed to ``loss_fn``.
        directions: a non-empty sequence of ``J`` pytrees like ``params``.
        coords: ``(M, J)`` coefficients, one row per point.
        metric_fn: optional second ``(params, batch) -> scalar`` on the same points.
        chunk_size: points per vmapped chunk (default: as many as fit
            ``memory_budget_bytes``).
        memory_budget_bytes: memory budget of one chunk, used when ``chunk_size`` is None.

    Returns:
        ``(loss (M,), metric (M,) or None)`` as float64 numpy arrays (raw, not masked).
        Cost: ``M`` loss (and metric) evaluations, padded to a power of two for small ``M``.

    Raises:
        ValueError: directions not like ``params``, coords not ``(M, len(directions))``.
    """
    return PointEvaluator(loss_fn, params, batch, directions, metric_fn=metric_fn,
                      chunk_size=chunk_size, memory_budget_bytes=memory_budget_bytes)(coords)


def _warn_nonfinite(frac: float, what: str) -> None:
    if frac > 0:
        warnings.warn(f"{what}: the loss is not finite on {100 * frac:.1f}% of the grid; "
                      "those points are NaN (masked) in the result", RuntimeWarning, stacklevel=3)


def slice_1d(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    d1: PyTree,
    grid1: Any,
    *,
    metric_fn: LossFn | None = None,
    chunk_size: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
) -> Slice1D:
    """The loss along ``params + alpha * d1`` for ``alpha`` in ``grid1``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params: the centre of the slice (pytree).
        batch: the data passed to ``loss_fn``.
        d1: direction, a pytree like ``params`` (e.g. :func:`random_direction`).
        grid1: strictly increasing 1-D grid of coefficients.
        metric_fn: optional second function ``(params, batch) -> scalar`` (e.g.
            :func:`accuracy_metric`) evaluated on the same grid.
        chunk_size: points per vmapped chunk (default: as many as fit
            ``memory_budget_bytes``).
        memory_budget_bytes: memory budget of one chunk, used when ``chunk_size`` is None.

    Returns:
        :class:`Slice1D`: the loss ``(len(grid1),)`` with non-finite values masked to NaN
        (a ``RuntimeWarning`` says how many), and the metric on the same grid.

    Raises:
        ValueError: empty / non-monotone / non-finite grid, direction not like params.
    """
    g1 = check_grid(grid1, "grid1")
    d1 = check_direction(d1, params, "d1")
    loss, metric = evaluate_points(loss_fn, params, batch, [d1], g1[:, None], metric_fn=metric_fn,
                                   chunk_size=chunk_size, memory_budget_bytes=memory_budget_bytes)
    loss, frac = mask_nonfinite(loss)
    _warn_nonfinite(frac, "slice_1d")
    if metric is not None:
        metric = np.where(np.isfinite(loss), metric, np.nan)
    return Slice1D(g1, loss, metric, frac)


def slice_2d(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    d1: PyTree,
    d2: PyTree,
    grid1: Any,
    grid2: Any,
    *,
    metric_fn: LossFn | None = None,
    chunk_size: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
) -> Slice2D:
    """The loss on the plane ``params + a d1 + b d2``, ``a`` in ``grid1``, ``b`` in ``grid2``.

    The whole ``len(grid1) x len(grid2)`` grid runs in one compiled program (see
    :func:`evaluate_points`). ``result.loss[i, j]`` is at ``(grid1[i], grid2[j])``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params: the centre of the plane (pytree).
        batch: the data passed to ``loss_fn``.
        d1: first direction, a pytree like ``params``.
        d2: second direction, a pytree like ``params``.
        grid1: strictly increasing 1-D grid of ``d1`` coefficients.
        grid2: strictly increasing 1-D grid of ``d2`` coefficients.
        metric_fn: optional second function ``(params, batch) -> scalar`` on the same grid.
        chunk_size: points per vmapped chunk (default: as many as fit
            ``memory_budget_bytes``).
        memory_budget_bytes: memory budget of one chunk, used when ``chunk_size`` is None.

    Returns:
        :class:`Slice2D`: the loss ``(len(grid1), len(grid2))`` with non-finite values
        masked to NaN (a ``RuntimeWarning`` says how many), and the metric on the same grid.
        Cost: ``len(grid1) * len(grid2)`` loss evaluations.

    Raises:
        ValueError: bad grids or directions (see :func:`slice_1d`).
    """
    g1 = check_grid(grid1, "grid1")
    g2 = check_grid(grid2, "grid2")
    d1 = check_direction(d1, params, "d1")
    d2 = check_direction(d2, params, "d2")
    aa, bb = np.meshgrid(g1, g2, indexing="ij")
    coords = np.stack([aa.ravel(), bb.ravel()], axis=1)
    loss, metric = evaluate_points(loss_fn, params, batch, [d1, d2], coords, metric_fn=metric_fn,
                                   chunk_size=chunk_size, memory_budget_bytes=memory_budget_bytes)
    loss, frac = mask_nonfinite(loss.reshape(aa.shape))
    _warn_nonfinite(frac, "slice_2d")
    if metric is not None:
        metric = np.where(np.isfinite(loss), metric.reshape(aa.shape), np.nan)
    return Slice2D(g1, g2, loss, metric, frac)


@dataclasses.dataclass(frozen=True)
class accuracy_metric:  # noqa: N801 - used like a function
    """``metric_fn(params, batch)``: classification accuracy of ``model_fn``.

    The argmax over the last axis of ``model_fn(params, batch)`` against integer
    ``batch[labels_key]``; a frozen dataclass, hence hashable, so grids stay compiled.

    Args:
        model_fn: ``model_fn(params, batch) -> logits (..., C)``.
        labels_key: the key of the integer labels in ``batch``.
    """

    model_fn: Callable
    labels_key: str = "labels"

    def __call__(self, params, batch):
        """The accuracy at ``params`` on ``batch`` (a scalar in ``[0, 1]``)."""
        logits = self.model_fn(params, batch)
        hits = jnp.argmax(logits, axis=-1) == batch[self.labels_key]
        return jnp.mean(hits.astype(logits.dtype))

