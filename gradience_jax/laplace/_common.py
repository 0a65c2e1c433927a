"""Shared checks and helpers of the ``laplace`` modules (scalars, dtypes, warnings, chunks)."""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax import tree as tu
from gradience_jax._validate import ArgumentTypeError, check_int, check_real, is_traced
from gradience_jax.operators.kfac import KFACOperator

PyTree = Any

#: elements (``chunk x columns x P``) of per-example gradients held at once by default
CHUNK_BUDGET = 2**24


class LaplaceWarning(UserWarning):
    """A Laplace quantity was computed from a doubtful input (e.g. clipped eigenvalues)."""


def positive_scalar(value: Any, name: str) -> Any:
    """A ``> 0`` real scalar: checked when concrete, passed through (0-d) when traced.

    Args:
        value: the argument.
        name: its name, for the error messages.

    Returns:
        The float (concrete) or the 0-d array (traced).

    Raises:
        ArgumentTypeError: not a real scalar.
        ValueError: not ``> 0`` (concrete), or not 0-d (traced).
    """
    if is_traced(value):
        value = jnp.asarray(value)
        if value.ndim != 0:
            raise ValueError(f"{name} must be a scalar, got shape {value.shape}")
        return value
    return check_real(value, name, lo=0.0, lo_open=True)


def params_dtype(params: PyTree) -> jnp.dtype:
    """The promoted dtype of a pytree's leaves."""
    return tu.promote_dtypes(*jax.tree_util.tree_leaves(params))


def scaled_leaves(tree: PyTree, alpha: Any) -> PyTree:
    """``alpha * tree`` leaf by leaf, each leaf keeping its dtype."""
    return jax.tree_util.tree_map(
        lambda x: (x * jnp.asarray(alpha, x.dtype)).astype(x.dtype), tree)


def warn_clipped(values: np.ndarray, what: str) -> None:
    """A :class:`LaplaceWarning` when ``values`` (eigenvalues) are clearly negative.

    Args:
        values: the eigenvalues (host array).
        what: what they are the eigenvalues of, for the message.
    """
    big = float(np.max(np.abs(values))) if values.size else 0.0
    low = float(np.min(values)) if values.size else 0.0
    if low < -1e-6 * max(big, 1e-300):
        warnings.warn(
            f"{what} has negative eigenvalues (min {low:.3e}, max |.| {big:.3e}); they are "
            "clipped to 0 (a Laplace posterior needs a PSD curvature: use the GGN / Fisher)",
            LaplaceWarning, stacklevel=3)


def check_eigenpairs(values: Any, vectors: PyTree) -> tuple[jax.Array, list]:
    """Eigenvalues ``(r,)`` and a pytree stack of eigenvectors (leaves ``(r, *leaf)``).

    Args:
        values: the eigenvalues.
        vectors: the eigenvectors.

    Returns:
        ``(values as an array, the vectors' leaves)``.

    Raises:
        ValueError: ``vectors`` is empty, or ``values`` / ``vectors`` disagree on ``r``.
    """
    leaves = jax.tree_util.tree_leaves(vectors)
    if not leaves:
        raise ValueError("vectors is an empty pytree")
    values = jnp.asarray(values)
    if values.ndim != 1 or any(x.shape[:1] != values.shape for x in leaves):
        raise ValueError(f"values must be (r,) and every vectors leaf (r, ...); got values "
                         f"{values.shape}, leaves {[x.shape[:1] for x in leaves]}")
    return values, leaves


def one_example(x: jax.Array) -> jax.Array:
    """An example's leaf as a batch of one."""
    return x[None]


def examples_per_chunk(chunk_size: int | None, n: int, columns: int, params: PyTree) -> int:
    """Examples per chunk: ``chunk_size``, or as many as fit :data:`CHUNK_BUDGET`; ``<= n``.

    The default keeps ``chunk x columns x P`` elements of parameter-sized vectors in memory.

    Args:
        chunk_size: the user's choice, or ``None``.
        n: examples in the batch.
        columns: parameter-sized vectors per example.
        params: the parameters.

    Returns:
        The chunk size, in ``[1, n]``.

    Raises:
        ArgumentTypeError: ``chunk_size`` is not an integer.
        ValueError: ``chunk_size < 1``.
    """
    if chunk_size is None:
        chunk_size = max(1, min(n, CHUNK_BUDGET // max(columns * tu.size(params), 1)))
    return min(check_int(chunk_size, "chunk_size"), n)


def check_kfac(K: Any) -> KFACOperator:
    """``K`` itself when it is a :class:`KFACOperator`.

    Raises:
        ArgumentTypeError: otherwise.
    """
    if not isinstance(K, KFACOperator):
        raise ArgumentTypeError(f"K must be an operator returned by gj.kfac(), got "
                                f"{type(K).__name__}")
    return K
