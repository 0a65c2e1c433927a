"""Directions from a training trajectory: its PCA plane and projections onto a plane.

``trajectory_pca`` gives the principal components of a training trajectory (Li et al.
2018 s.7), computed pytree-natively through the ``T x T`` Gram matrix;
``project_onto_plane`` places points on the plane of any directions (numerics only).

Supported names: ``TrajectoryPCA``, ``trajectory_pca``, ``project_onto_plane``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax import tree as tu
from gradience_jax._validate import check_int
from gradience_jax.landscape.common import PyTree, check_direction

__all__ = ["TrajectoryPCA", "project_onto_plane", "trajectory_pca"]


class TrajectoryPCA(NamedTuple):
    """Principal components of a trajectory (Li et al. 2018 s.7).

    Attributes:
        directions: ``k`` orthonormal directions (pytrees like params).
        explained_variance_ratio: ``(k,)`` share of the trajectory's variance.
        coords: ``(T, k)`` coordinates of every trajectory point relative to ``center``.
        center: the plane's origin (default the last point, the final solution).
    """

    directions: list
    explained_variance_ratio: np.ndarray
    coords: np.ndarray
    center: PyTree


def _as_stacked(trajectory: Any, name: str) -> PyTree:
    if isinstance(trajectory, (list, tuple)):
        if len(trajectory) < 2:
            raise ValueError(f"{name} needs at least 2 points, got {len(trajectory)}")
        first = trajectory[0]
        for i, point in enumerate(trajectory[1:], start=1):
            check_direction(point, first, f"{name}[{i}]")
        return tu.stack(list(trajectory))
    leaves = jax.tree_util.tree_leaves(trajectory)
    if not leaves or np.ndim(leaves[0]) == 0 or np.shape(leaves[0])[0] < 2:
        raise ValueError(f"{name} must be a list of params or a stacked pytree with >= 2 points")
    return trajectory


def _gram(a: PyTree, b: PyTree) -> jax.Array:
    """``G[i, j] = <a_i, b_j>`` in float64 when x64 is on, else float32."""
    return tu.stacked_gram(a, b, dtype=jnp.result_type(float))


def trajectory_pca(trajectory: Any, k: int = 2, *, center: PyTree | None = None) -> TrajectoryPCA:
    """PCA directions of a training trajectory (Li et al. 2018 s.7).

    Computed pytree-natively through the ``T x T`` Gram matrix of the (mean-centred)
    displacements ``theta_t - center``.

    Args:
        trajectory: a list of params pytrees or a stacked pytree (leading axis ``T``).
        k: number of components (``<= T - 1``).
        center: origin of the plane; default the last point.

    Returns:
        :class:`TrajectoryPCA`. Cost: two passes over the trajectory, a ``T x T`` ``eigh``.

    Raises:
        ValueError: fewer than 2 points, ``k`` out of range, ``center`` not like params.
    """
    stacked = _as_stacked(trajectory, "trajectory")
    t = int(jax.tree_util.tree_leaves(stacked)[0].shape[0])
    if t < 2:
        raise ValueError(f"trajectory needs at least 2 points, got {t}")
    k = check_int(k, "k", hi=t - 1)
    if center is None:
        center = jax.tree_util.tree_map(lambda x: x[-1], stacked)
    else:
        center = check_direction(center, jax.tree_util.tree_map(lambda x: x[0], stacked), "center")
    g = np.asarray(_pca_gram(stacked, center), np.float64)
    evals, evecs = np.linalg.eigh(0.5 * (g + g.T))
    order = np.argsort(evals)[::-1]
    evals, evecs = np.clip(evals[order], 0.0, None), evecs[:, order]
    total = float(evals.sum())
    coef = evecs[:, :k] / np.sqrt(np.maximum(evals[:k], 1e-300))
    stacked_dirs, coords = _pca_directions(stacked, center, jnp.asarray(coef))
    ratio = evals[:k] / total if total > 0 else np.zeros(k)
    return TrajectoryPCA(tu.unstack(stacked_dirs), ratio, np.asarray(coords, np.float64), center)


def _centred_displacements(stacked, center):
    disp = jax.tree_util.tree_map(lambda x, c: x - c[None], stacked, center)
    y = jax.tree_util.tree_map(lambda x: x - x.mean(axis=0, keepdims=True), disp)
    return disp, y


@jax.jit
def _pca_gram(stacked, center):
    _, y = _centred_displacements(stacked, center)
    return _gram(y, y)


@jax.jit
def _pca_directions(stacked, center, coef):
    disp, y = _centred_displacements(stacked, center)
    dirs = jax.tree_util.tree_map(
        lambda x: jnp.tensordot(coef.T.astype(x.dtype), x, axes=1), y)  # (k, ...)
    return dirs, _gram(disp, dirs)


def project_onto_plane(points: Any, center: PyTree, directions: Sequence[PyTree]) -> np.ndarray:
    """Least-squares coordinates ``c`` of ``points - center`` in ``span(directions)``.

    Solves the Gram system, so the directions need not be orthogonal.

    Args:
        points: a list of params pytrees or a stacked pytree (leading axis ``T``).
        center: the plane's origin (like params).
        directions: ``k`` directions (like params).

    Returns:
        ``(T, k)`` float64 coordinates.

    Raises:
        ValueError: a list with fewer than 2 points.
    """
    stacked = _as_stacked(points, "points") if isinstance(points, (list, tuple)) else points
    disp = jax.tree_util.tree_map(lambda x, c: x - c[None], stacked, center)
    dstack = tu.stack(list(directions))
    gram = np.asarray(_gram(dstack, dstack), np.float64)
    rhs = np.asarray(_gram(disp, dstack), np.float64)
    return np.linalg.lstsq(gram, rhs.T, rcond=None)[0].T

