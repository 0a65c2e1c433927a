"""Spectra of a Laplace curvature and the closed-form log-determinant, trace and ``gamma``.

:class:`LaplaceSpectrum` holds the non-zero part of the spectrum of ``H``; ``logdet(H + tau
I) = sum_i log(lambda_i + tau) + (P - m) log tau``, the trace and MacKay's effective number
of parameters follow in ``O(m)``. Constructors for tiny models (:func:`dense_spectrum`), a
low-rank curvature (:func:`lowrank_spectrum`) and a diagonal one (:func:`diagonal_spectrum`);
the K-FAC spectrum is in :mod:`gradience_jax.laplace.kfac`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax import tree as tu
from gradience_jax._validate import (
    ArgumentTypeError,
    check_all_finite,
    check_int,
    check_params,
    check_real,
    is_traced,
)
from gradience_jax.laplace._common import positive_scalar, warn_clipped
from gradience_jax.operators.base import DEFAULT_MAX_DENSE_PARAMS, LinearOperator

PyTree = Any


class LaplaceSpectrum(NamedTuple):
    """The non-zero part of the spectrum of a curvature ``H`` (``P`` parameters).

    ``H`` has the eigenvalues ``eigenvalues`` (``m`` of them, ``>= 0``) and ``P - m``
    zeros, so ``logdet(H + tau I) = sum_i log(lambda_i + tau) + (P - m) log tau``.

    Attributes:
        eigenvalues: ``(m,)`` eigenvalues of ``H = scale * C`` (already scaled).
        n_params: ``P``, the dimension (a Python int when built eagerly).
    """

    eigenvalues: jax.Array
    n_params: Any


def _spectrum_parts(spec: LaplaceSpectrum, prior_prec: Any):
    lam = spec.eigenvalues
    tau = jnp.asarray(prior_prec, lam.dtype)
    rest = jnp.asarray(spec.n_params - lam.shape[0], lam.dtype)
    return lam, tau, rest


def logdet(spec: LaplaceSpectrum, prior_prec: Any) -> jax.Array:
    """``logdet(H + tau I) = sum_i log(lambda_i + tau) + (P - m) log tau``.

    Args:
        spec: a :class:`LaplaceSpectrum`.
        prior_prec: ``tau > 0`` (may be traced).

    Returns:
        The scalar log-determinant in the eigenvalues' dtype. Cost ``O(m)``.

    Raises:
        ValueError: ``prior_prec`` is not ``> 0`` (concrete values).
        ArgumentTypeError: ``spec`` is not a :class:`LaplaceSpectrum`.

    Example:
        >>> import jax.numpy as jnp
        >>> from gradience_jax.laplace import LaplaceSpectrum, logdet
        >>> spec = LaplaceSpectrum(jnp.array([1.0, 3.0]), 3)  # eigenvalues 1, 3 and 0
        >>> round(float(logdet(spec, 1.0)), 6)  # log 2 + log 4 + log 1
        2.079442
    """
    _check_spectrum(spec)
    lam, tau, rest = _spectrum_parts(spec, positive_scalar(prior_prec, "prior_prec"))
    return jnp.sum(jnp.log(lam + tau)) + rest * jnp.log(tau)


def trace(spec: LaplaceSpectrum, prior_prec: Any = 0.0) -> jax.Array:
    """``tr(H + tau I) = sum_i lambda_i + P tau``.

    Args:
        spec: a :class:`LaplaceSpectrum`.
        prior_prec: ``tau >= 0`` (may be traced).

    Returns:
        The scalar trace. Cost ``O(m)``.

    Raises:
        ArgumentTypeError: ``spec`` is not a :class:`LaplaceSpectrum`.
        ValueError: ``prior_prec < 0`` (concrete values).
    """
    _check_spectrum(spec)
    if not is_traced(prior_prec):
        check_real(prior_prec, "prior_prec", lo=0.0)
    lam = spec.eigenvalues
    return jnp.sum(lam) + jnp.asarray(spec.n_params, lam.dtype) * jnp.asarray(prior_prec,
                                                                              lam.dtype)


def effective_params(spec: LaplaceSpectrum, prior_prec: Any) -> jax.Array:
    """MacKay's effective number of parameters ``gamma = sum_i lambda_i / (lambda_i + tau)``.

    Args:
        spec: a :class:`LaplaceSpectrum`.
        prior_prec: ``tau > 0``.

    Returns:
        ``gamma`` in ``[0, m]``.

    Raises:
        ArgumentTypeError: ``spec`` is not a :class:`LaplaceSpectrum`.
        ValueError: ``prior_prec`` is not ``> 0`` (concrete values).
    """
    _check_spectrum(spec)
    lam, tau, _ = _spectrum_parts(spec, positive_scalar(prior_prec, "prior_prec"))
    return jnp.sum(lam / (lam + tau))


def _check_spectrum(spec: Any) -> None:
    if not isinstance(spec, LaplaceSpectrum):
        raise ArgumentTypeError(
            f"spec must be a LaplaceSpectrum (from kfac_spectrum / dense_spectrum / "
            f"lowrank_spectrum / diagonal_spectrum), got {type(spec).__name__}")


def dense_spectrum(curvature: Any, *, scale: Any = 1.0,
                   max_params: int = DEFAULT_MAX_DENSE_PARAMS) -> LaplaceSpectrum:
    """All eigenvalues of ``scale * C`` from a dense float64 ``eigh`` (tiny models).

    Args:
        curvature: a :class:`LinearOperator` (``to_dense()`` is called) or a symmetric
            ``(P, P)`` matrix.
        scale: ``> 0`` multiplier.
        max_params: the largest ``P`` densified.

    Returns:
        :class:`LaplaceSpectrum` with ``m = P``; negative eigenvalues (round-off, or an
        indefinite Hessian) are clipped to 0, with a :class:`LaplaceWarning` when one is
        below ``-1e-6`` of the largest magnitude. Cost ``O(P^3)``, ``P^2`` memory.

    Raises:
        ArgumentTypeError: ``curvature`` is neither an operator nor a matrix.
        ValueError: a non-square matrix, ``P > max_params``, or a bad ``scale``.
        FloatingPointError: non-finite entries.
    """
    scale = check_real(scale, "scale", lo=0.0, lo_open=True)
    if isinstance(curvature, LinearOperator):
        mat = np.asarray(curvature.to_dense(max_params=max_params), np.float64)
        dtype = curvature.dtype
    else:
        if not hasattr(curvature, "shape"):
            raise ArgumentTypeError(f"curvature must be a LinearOperator or a (P, P) matrix, "
                                    f"got {type(curvature).__name__}")
        mat = np.asarray(curvature, np.float64)
        dtype = jnp.result_type(curvature)
        if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
            raise ValueError(f"curvature must be a square (P, P) matrix, got shape {mat.shape}")
    check_all_finite(mat, "the dense curvature")
    evals = np.linalg.eigvalsh(0.5 * (mat + mat.T)) * scale
    warn_clipped(evals, "the curvature")
    dtype = dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32
    return LaplaceSpectrum(jnp.asarray(np.maximum(evals, 0.0), dtype), int(mat.shape[0]))


def lowrank_spectrum(values: Any, n_params: int, *, scale: Any = 1.0) -> LaplaceSpectrum:
    """The spectrum of a rank-``r`` curvature ``scale * U diag(values) U^T`` in ``P`` dims.

    The ``P - r`` directions outside the subspace get curvature 0 (prior precision only):
    the low-rank Laplace approximation.

    Args:
        values: ``(r,)`` eigenvalues (e.g. ``gj.top_eigenpairs(G, r).values``).
        n_params: ``P >= r``.
        scale: ``> 0`` multiplier.

    Returns:
        :class:`LaplaceSpectrum`; negative values are clipped to 0.

    Raises:
        ValueError: ``values`` is not 1-D, ``n_params < r`` or a bad ``scale``.
        ArgumentTypeError: ``n_params`` is not an integer.
    """
    scale = positive_scalar(scale, "scale")
    values = jnp.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"values must be a 1-D array of eigenvalues, got shape {values.shape}")
    n_params = check_int(n_params, "n_params", lo=values.shape[0])
    lam = jnp.maximum(values, 0.0) * jnp.asarray(scale, values.dtype)
    return LaplaceSpectrum(lam, n_params)


def diagonal_spectrum(diag: PyTree, *, scale: Any = 1.0) -> LaplaceSpectrum:
    """The "spectrum" of a diagonal curvature (e.g. :func:`ggn_diagonal`): its entries.

    Args:
        diag: pytree like the params (the curvature's diagonal).
        scale: ``> 0`` multiplier.

    Returns:
        :class:`LaplaceSpectrum` with ``m = P`` (negative entries clipped to 0).

    Raises:
        ValueError: a bad ``scale`` or an empty pytree.
        TypeError: a non-floating leaf.
    """
    check_params(diag, "diag")
    scale = positive_scalar(scale, "scale")
    flat = tu.ravel(diag)
    return LaplaceSpectrum(jnp.maximum(flat, 0.0) * jnp.asarray(scale, flat.dtype), flat.size)
