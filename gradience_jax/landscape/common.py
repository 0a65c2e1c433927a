"""Shared checks and helpers of the ``landscape`` modules (numerics only).

Supported names: ``PyTree``, ``LossFn``, ``DENSE_LIMIT``, ``DEFAULT_MEMORY_BUDGET``,
``static_callable`` (a callable usable as a static ``jit`` argument), ``check_direction``,
``check_grid`` and ``mask_nonfinite``. They are public so that the sibling modules
(``directions``, ``slices``, ``connectivity``, ``sharpness``) and the experiments above
them share one implementation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax._validate import check_like

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

#: Operators with at most this many parameters are made dense (exact eigenvalues / trace).
DENSE_LIMIT = 2000
#: Default memory budget of one vmapped chunk of grid points.
DEFAULT_MEMORY_BUDGET = 256 * 1024**2

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "DENSE_LIMIT",
    "LossFn",
    "PyTree",
    "check_direction",
    "check_grid",
    "mask_nonfinite",
    "static_callable",
]


@dataclasses.dataclass(frozen=True, eq=False)
class _ById:
    """Makes an unhashable callable usable as a static ``jit`` argument (hashed by id)."""

    fn: Callable

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def static_callable(fn: Callable | None) -> Callable | None:
    """``fn`` itself when it is hashable, else a wrapper hashed by identity.

    ``jax.jit`` needs static arguments to be hashable; closures and bound methods of
    unhashable objects are not always. The wrapper compares by identity, so one function
    object keeps one compiled program.

    Args:
        fn: any callable, or None.

    Returns:
        A hashable callable with the same behaviour (None for None).
    """
    if fn is None:
        return None
    try:
        hash(fn)
    except TypeError:
        return _ById(fn)
    return fn


def check_direction(direction: PyTree, params: PyTree, name: str) -> PyTree:
    """Check that ``direction`` matches ``params``' structure and shapes; cast it to their dtypes.

    Args:
        direction: a pytree like ``params`` (a direction, an eigenvector, a second point).
        params: the reference pytree.
        name: the argument's name, used in error messages.

    Returns:
        ``direction`` with every leaf cast to the dtype of the matching ``params`` leaf.

    Raises:
        ValueError: the structures or shapes differ (dtype differences are cast, not raised).
    """
    try:
        check_like(direction, params, name, "params")
    except TypeError:  # dtype only: harmless, cast below
        pass
    return jax.tree_util.tree_map(lambda d, p: jnp.asarray(d, jnp.result_type(p)),
                                  direction, params)


def check_grid(grid: Any, name: str) -> np.ndarray:
    """Validate a 1-D grid of coefficients.

    Args:
        grid: array-like of numbers.
        name: the argument's name, used in error messages.

    Returns:
        The grid as a float64 ``(n,)`` numpy array.

    Raises:
        ValueError: not numeric, not 1-D, empty, non-finite or not strictly increasing.
    """
    try:
        g = np.asarray(grid, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a 1-D array of numbers: {exc}") from exc
    if g.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {g.shape}")
    if g.size == 0:
        raise ValueError(f"{name} is empty: give at least one grid point")
    if not np.all(np.isfinite(g)):
        raise ValueError(f"{name} contains non-finite values")
    if g.size > 1 and not np.all(np.diff(g) > 0):
        raise ValueError(f"{name} must be strictly increasing (monotone, no repeats)")
    return g


def mask_nonfinite(values: Any) -> tuple[np.ndarray, float]:
    """Replace non-finite values by NaN and measure their share.

    Args:
        values: array-like of losses (any shape).

    Returns:
        ``(masked float64 array of the same shape, fraction of non-finite entries)``.
    """
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    frac = float(1.0 - finite.mean()) if values.size else 0.0
    return np.where(finite, values, np.nan), frac
