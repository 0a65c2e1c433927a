"""Posterior covariances ``Sigma`` as PSD operators: the inputs of ``predictive_variance``.

``Sigma`` of a :class:`~gradience_jax.laplace.posterior.LowRankPosterior`
(:func:`lowrank_covariance`), of K-FAC (:func:`kfac_covariance`, in the factors'
eigenbases) or a dense float64 inverse for tiny models and references
(:func:`dense_covariance`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax import tree as tu
from gradience_jax._validate import ArgumentTypeError, check_all_finite, check_real
from gradience_jax.laplace._common import check_kfac, positive_scalar, scaled_leaves
from gradience_jax.laplace.posterior import LowRankPosterior
from gradience_jax.operators.base import (
    DEFAULT_MAX_DENSE_PARAMS,
    LinearOperator,
    check_operator,
)
from gradience_jax.operators.kfac import KFACOperator, kfac_inverse


@dataclasses.dataclass(frozen=True)
class _LowRankCovPrepare:
    def __call__(self, post: LowRankPosterior):
        return post.covariance


def lowrank_covariance(post: LowRankPosterior) -> LinearOperator:
    """``Sigma = P^-1`` of a :class:`LowRankPosterior` as a PSD :class:`LinearOperator`.

    Args:
        post: the posterior.

    Returns:
        A :class:`LinearOperator` named ``"lowrank_covariance"`` (the posterior is its
        operand: passing it to ``jit`` does not bake arrays into the program).

    Raises:
        ArgumentTypeError: ``post`` is not a :class:`LowRankPosterior`.
    """
    if not isinstance(post, LowRankPosterior):
        raise ArgumentTypeError(f"post must be a LowRankPosterior, got {type(post).__name__}")
    like = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                                  post.vectors)
    return LinearOperator(_LowRankCovPrepare(), post, like, is_psd=True,
                          name="lowrank_covariance")


def kfac_covariance(K: KFACOperator, prior_prec: Any, *, scale: Any = 1.0) -> LinearOperator:
    """``Sigma = (scale K + tau I)^-1 = scale^-1 (K + (tau / scale) I)^-1`` (K-FAC Laplace).

    Args:
        K: an operator returned by :func:`gradience_jax.kfac`.
        prior_prec: ``tau > 0`` (may be traced).
        scale: ``> 0`` (may be traced).

    Returns:
        A PSD :class:`LinearOperator` (products in the factors' eigenbases, as
        :func:`gradience_jax.kfac_inverse`; uncovered parameters get ``1 / tau``).

    Raises:
        ArgumentTypeError: ``K`` is not a :class:`KFACOperator`.
        ValueError: ``prior_prec`` or ``scale`` is not ``> 0``.
    """
    check_kfac(K)
    tau = positive_scalar(prior_prec, "prior_prec")
    s = positive_scalar(scale, "scale")
    dt = K.dtype
    inv = kfac_inverse(K, jnp.asarray(tau, dt) / jnp.asarray(s, dt))
    return LinearOperator(_ScaledPrepare(), (inv, 1.0 / jnp.asarray(s, dt)), None,
                          is_psd=True, name="kfac_covariance", _spec=K._spec)


@dataclasses.dataclass(frozen=True)
class _ScaledPrepare:
    """``v -> alpha * (op @ v)`` with operands ``(op, alpha)`` (alpha > 0)."""

    def __call__(self, operands):
        op, alpha = operands
        mv = op.bind()
        return lambda v: scaled_leaves(mv(v), alpha)


@dataclasses.dataclass(frozen=True)
class _TreeDensePrepare:
    def __call__(self, matrix):
        def matvec(v):
            flat = tu.ravel(v)
            return tu.unravel_like((matrix @ flat.astype(matrix.dtype)).astype(flat.dtype), v)

        return matvec


def dense_covariance(op: LinearOperator, prior_prec: Any, *, scale: Any = 1.0,
                     max_params: int = DEFAULT_MAX_DENSE_PARAMS) -> LinearOperator:
    """``Sigma = (scale C + tau I)^-1`` by a dense float64 inverse (tiny models, references).

    Args:
        op: the curvature operator ``C``.
        prior_prec: ``tau > 0``.
        scale: ``> 0``.
        max_params: the largest ``P`` densified.

    Returns:
        A PSD :class:`LinearOperator` on pytrees like ``op.params_like`` (the ``(P, P)``
        inverse is its operand, in the operator's dtype). Cost ``O(P^3)`` once, ``O(P^2)``
        per product.

    Raises:
        ArgumentTypeError: ``op`` is not a :class:`LinearOperator`.
        ValueError: bad ``prior_prec`` / ``scale``, ``P > max_params``.
    """
    check_operator(op)
    tau = check_real(prior_prec, "prior_prec", lo=0.0, lo_open=True)
    s = check_real(scale, "scale", lo=0.0, lo_open=True)
    mat = np.asarray(op.to_dense(max_params=max_params), np.float64)
    check_all_finite(mat, "the dense curvature")
    prec = s * 0.5 * (mat + mat.T) + tau * np.eye(mat.shape[0])
    cov = np.linalg.inv(prec)
    return LinearOperator(_TreeDensePrepare(), jnp.asarray(0.5 * (cov + cov.T), op.dtype),
                          op.params_like, is_psd=True, name="dense_covariance")
