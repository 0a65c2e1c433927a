"""Random-matrix references for weight spectra: Marchenko-Pastur and Tracy-Widom.

The ESD of an ``N x M`` matrix (``N >= M``) is the eigenvalues of ``W^T W / N``. For i.i.d.
entries of variance ``sigma^2`` it follows the Marchenko-Pastur (MP) law with ratio
``gamma = M / N`` on ``[lambda_-, lambda_+]``, ``lambda_pm = sigma^2 (1 pm sqrt(gamma))^2``.
The bulk scale is estimated robustly from the median eigenvalue,
``sigma^2 = median(lambda) / m_MP(gamma)`` with ``m_MP`` the median of the unit MP law (the
idea of Gavish & Donoho, 2014). The largest eigenvalue of a white Wishart matrix fluctuates
on the Tracy-Widom scale (Johnstone, 2001):
``mu = (sqrt(N-1) + sqrt(M))^2``, ``s = (sqrt(N-1) + sqrt(M)) (1/sqrt(N-1) + 1/sqrt(M))^(1/3)``
and the TW-corrected edge is ``sigma^2 (mu + q s) / N`` with ``q`` the TW1 quantile at
``tw_level``. NumPy only (no jax); every function also accepts jax scalars for ``sigma2``.

Supported names: ``marchenko_pastur_pdf``, ``marchenko_pastur_cdf``, ``mp_median``,
``mp_edges``, ``tracy_widom_edge``, ``tw_quantile``, ``mp_ks_distance``,
``mp_ks_threshold``, ``TW1_QUANTILES``, ``MP_KS_RANDOM``.

References: Marchenko & Pastur (1967); Johnstone, Ann. Stat. 29 (2001); Gavish & Donoho,
IEEE Trans. Inf. Theory 60 (2014).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from gradience_jax._validate import check_int, check_real

__all__ = [
    "MP_KS_RANDOM",
    "TW1_QUANTILES",
    "marchenko_pastur_cdf",
    "marchenko_pastur_pdf",
    "mp_edges",
    "mp_ks_distance",
    "mp_ks_threshold",
    "mp_median",
    "tracy_widom_edge",
    "tw_quantile",
]

# Quantiles of the Tracy-Widom (beta = 1) law, Johnstone (2001), Table 1.
TW1_QUANTILES: dict[float, float] = {0.90: 0.4501, 0.95: 0.9793, 0.99: 2.0234}

MP_KS_RANDOM = 0.1
"""Floor of :func:`mp_ks_threshold`."""


def tw_quantile(tw_level: float) -> float:
    """The tabulated TW1 quantile at ``tw_level``.

    Args:
      tw_level: quantile level, one of 0.90, 0.95, 0.99 (the keys of ``TW1_QUANTILES``).

    Returns:
      The quantile ``q`` (Johnstone 2001, Table 1).

    Raises:
      ArgumentTypeError: ``tw_level`` is not a real number.
      ValueError: if ``tw_level`` is not tabulated (the message lists the choices).
    """
    x = check_real(tw_level, "tw_level")
    for level, q in TW1_QUANTILES.items():
        if abs(x - level) < 1e-12:
            return q
    raise ValueError(
        f"tw_level={tw_level!r} is not tabulated; choose one of {sorted(TW1_QUANTILES)}"
    )


def _check_ratio(ratio: Any) -> float:
    """``ratio = M / N`` as a float in (0, 1]."""
    return check_real(ratio, "ratio", lo=0.0, lo_open=True, hi=1.0)


def _check_sigma2(sigma2: Any) -> float:
    """The MP scale ``sigma2`` as a positive finite float."""
    return check_real(sigma2, "sigma2", lo=0.0, lo_open=True)


def mp_edges(ratio: float, sigma2: Any = 1.0) -> tuple[Any, Any]:
    """Marchenko-Pastur bulk edges ``sigma2 (1 -+ sqrt(ratio))^2``.

    Args:
      ratio: ``gamma = M / N`` in (0, 1] (not checked).
      sigma2: entry variance (float or array; the edges follow its type).

    Returns:
      ``(lambda_minus, lambda_plus)``.
    """
    r = math.sqrt(ratio)
    return sigma2 * (1.0 - r) ** 2, sigma2 * (1.0 + r) ** 2


def marchenko_pastur_pdf(x: Any, ratio: float, sigma2: float = 1.0) -> np.ndarray:
    """Marchenko-Pastur density of the eigenvalues of ``W^T W / N``.

    ``rho(x) = sqrt((l_+ - x)(x - l_-)) / (2 pi sigma2 ratio x)`` on ``[l_-, l_+]``,
    ``l_pm = sigma2 (1 pm sqrt(ratio))^2``, zero elsewhere.

    Args:
      x: evaluation points, any shape.
      ratio: ``gamma = M / N`` in (0, 1].
      sigma2: entry variance.

    Returns:
      Density values, shape of ``x`` (float64).

    Raises:
      ArgumentTypeError: ``ratio`` or ``sigma2`` is not a real number.
      ValueError: ``ratio`` outside (0, 1], ``sigma2 <= 0`` or not finite.
    """
    ratio, sigma2 = _check_ratio(ratio), _check_sigma2(sigma2)
    x = np.asarray(x, dtype=np.float64)
    lo, hi = mp_edges(ratio, sigma2)
    inside = (x > lo) & (x < hi) & (x > 0)
    xs = np.where(inside, x, 1.0)
    val = np.sqrt(np.clip((hi - xs) * (xs - lo), 0.0, None)) / (2 * np.pi * sigma2 * ratio * xs)
    return np.where(inside, val, 0.0)


@functools.lru_cache(maxsize=256)
def _mp_cdf_table(ratio: float, num: int = 4097) -> tuple[np.ndarray, np.ndarray]:
    """Unit-variance MP CDF on a grid: substitution ``x = a + (b-a)(1-cos t)/2``.

    The substitution removes the square-root singularities at both edges, so a trapezoid
    rule on a uniform ``t`` grid is accurate; the table is renormalised to end at 1.
    """
    a, b = mp_edges(ratio)
    t = np.linspace(0.0, np.pi, num)
    x = a + (b - a) * (1.0 - np.cos(t)) / 2.0
    half = (b - a) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        f = half**2 * np.sin(t) ** 2 / (2 * np.pi * ratio * x)
    if a == 0.0:  # ratio == 1: sin^2 t / x -> 4 / b at t = 0
        f[0] = half**2 * 4.0 / b / (2 * np.pi * ratio)
    cdf = np.concatenate([[0.0], np.cumsum((f[1:] + f[:-1]) / 2.0 * np.diff(t))])
    return x, cdf / cdf[-1]


def marchenko_pastur_cdf(x: Any, ratio: float, sigma2: float = 1.0) -> np.ndarray:
    """Marchenko-Pastur CDF (numerical quadrature, accurate to ~1e-7).

    Args:
      x: evaluation points, any shape.
      ratio: ``gamma = M / N`` in (0, 1].
      sigma2: entry variance.

    Returns:
      CDF values in [0, 1], shape of ``x``.

    Raises:
      ArgumentTypeError: ``ratio`` or ``sigma2`` is not a real number.
      ValueError: ``ratio`` outside (0, 1], ``sigma2 <= 0`` or not finite.
    """
    ratio, sigma2 = _check_ratio(ratio), _check_sigma2(sigma2)
    grid, cdf = _mp_cdf_table(float(ratio))
    return np.interp(np.asarray(x, dtype=np.float64) / sigma2, grid, cdf, left=0.0, right=1.0)


def mp_median(ratio: float) -> float:
    """Median of the unit-variance Marchenko-Pastur law with ``gamma = ratio``.

    Args:
      ratio: ``gamma = M / N`` in (0, 1].

    Returns:
      The median ``m_MP(gamma)`` (cached per ratio).

    Raises:
      ArgumentTypeError: ``ratio`` is not a real number.
      ValueError: ``ratio`` outside (0, 1].
    """
    return _mp_median(_check_ratio(ratio))


@functools.lru_cache(maxsize=256)
def _mp_median(ratio: float) -> float:
    grid, cdf = _mp_cdf_table(ratio)
    return float(np.interp(0.5, cdf, grid))


def tracy_widom_edge(
    n_rows: int, n_cols: int, sigma2: Any = 1.0, tw_level: float = 0.99
) -> tuple[Any, Any]:
    """Tracy-Widom corrected MP edge for the ESD of an ``N x M`` white matrix (N >= M).

    Johnstone (2001): ``mu = (sqrt(N-1) + sqrt(M))^2``,
    ``s = (sqrt(N-1) + sqrt(M)) (1/sqrt(N-1) + 1/sqrt(M))^(1/3)``; the top eigenvalue of
    ``W^T W / N`` is ~ ``sigma2 (mu + s * TW1) / N``.

    Args:
      n_rows: first matrix dimension (either order: ``N = max``, ``M = min``).
      n_cols: second matrix dimension.
      sigma2: entry variance (float or array).
      tw_level: TW1 quantile level, one of 0.90, 0.95, 0.99.

    Returns:
      ``(edge, scale)``: ``sigma2 (mu + q s) / N`` and ``sigma2 s / N``.

    Raises:
      ArgumentTypeError: a dimension is not an integer.
      ValueError: a non-positive dimension or an untabulated ``tw_level``.
    """
    n_rows, n_cols = check_int(n_rows, "n_rows"), check_int(n_cols, "n_cols")
    n, m = max(n_rows, n_cols), min(n_rows, n_cols)
    q = tw_quantile(tw_level)
    a, b = math.sqrt(max(n - 1, 1)), math.sqrt(m)
    mu = (a + b) ** 2
    s = (a + b) * (1.0 / a + 1.0 / b) ** (1.0 / 3.0)
    return sigma2 * (mu + q * s) / n, sigma2 * s / n


def mp_ks_distance(esd_desc: np.ndarray, ratio: float, sigma2: float) -> float | None:
    """Kolmogorov-Smirnov distance between an ESD and the fitted MP law.

    Args:
      esd_desc: ESD eigenvalues in descending order, shape ``(M,)``.
      ratio: ``gamma = M / N`` in (0, 1].
      sigma2: fitted bulk scale.

    Returns:
      ``max_i |F_emp - F_MP|`` over the eigenvalues, or None when ``sigma2 <= 0``.
      Cost ``O(M)`` after the cached CDF table.
    """
    if not sigma2 > 0:
        return None
    x = esd_desc[::-1]
    f = marchenko_pastur_cdf(x, ratio, sigma2)
    m = x.size
    i = np.arange(1, m + 1)
    return float(np.max(np.maximum(np.abs(i / m - f), np.abs((i - 1) / m - f))))


def mp_ks_threshold(num_eigs: int) -> float:
    """KS distance below which an ESD of ``num_eigs`` eigenvalues counts as MP-like.

    ``max(0.1, 1.36 / sqrt(num_eigs))``: 1.36 / sqrt(n) is the 95% critical value of the
    one-sample KS test for i.i.d. samples, which is conservative for (rigid) eigenvalues.

    Args:
      num_eigs: number of ESD eigenvalues ``M``.

    Returns:
      The threshold (at least ``MP_KS_RANDOM``).

    Raises:
      ArgumentTypeError: ``num_eigs`` is not an integer.
      ValueError: ``num_eigs < 1``.
    """
    return max(MP_KS_RANDOM, 1.36 / math.sqrt(check_int(num_eigs, "num_eigs")))
