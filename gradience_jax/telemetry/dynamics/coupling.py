"""Two series: cross-correlation and lead/lag with a surrogate significance test.

:func:`cross_correlation` gives Pearson ``r(lag) = corr(x[t], y[t + lag])`` over each lag's
overlap after detrending; :func:`lead_lag` adds a p-value for its peak against
phase-randomised surrogates of ``x``. The two series are gap-filled jointly, so their
alignment is kept. NumPy only.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import numpy as np

from gradience_jax.telemetry.dynamics._series import (
    _as_rng,
    _as_series,
    _check_int,
    _check_same_length,
    _fft_len,
    _gap_filled_pair,
    _require_variation,
    _surrogates,
)

__all__ = ["CrossCorrelation", "LeadLag", "cross_correlation", "lead_lag"]


Detrend = Literal["none", "linear", "difference"]


def _detrend(x: np.ndarray, mode: str, name: str = "detrend") -> np.ndarray:
    """Remove the mean ("none"), a least-squares line ("linear"), or difference."""
    if mode == "none":
        return x - x.mean()
    if mode == "linear":
        t = np.arange(x.size, dtype=np.float64)
        t -= t.mean()
        xc = x - x.mean()
        return xc - t * (t @ xc) / (t @ t)
    if mode == "difference":
        d = np.diff(x)
        return d - d.mean()
    raise ValueError(f"{name} must be one of 'none', 'linear', 'difference', got {mode!r}")


def _lagged_pearson(x: np.ndarray, y: np.ndarray, max_lag: int) -> np.ndarray:
    """Pearson ``r(lag) = corr(x[t], y[t + lag])`` over each lag's overlap.

    x, y: (..., n), broadcastable leading dims. Returns (..., 2 * max_lag + 1) for
    lags ``-max_lag..max_lag``. Cross sums by zero-padded FFT, overlap means and
    variances by prefix sums: O(n log n) per series.
    """
    n = x.shape[-1]
    nfft = _fft_len(n + max_lag)
    fx = np.fft.rfft(x, nfft)
    fy = np.fft.rfft(y, nfft)
    cross = np.fft.irfft(np.conj(fx) * fy, nfft)  # cross[k] = sum_t x[t] y[t + k]
    lags = np.arange(-max_lag, max_lag + 1)
    sxy = cross[..., lags % nfft]
    m = (n - np.abs(lags)).astype(np.float64)
    x0, x1 = np.maximum(0, -lags), n - np.maximum(0, lags)
    y0, y1 = np.maximum(0, lags), n - np.maximum(0, -lags)

    def prefix(a: np.ndarray) -> np.ndarray:
        z = np.zeros(a.shape[:-1] + (1,))
        return np.concatenate([z, np.cumsum(a, axis=-1)], axis=-1)

    px, pxx, py, pyy = prefix(x), prefix(x * x), prefix(y), prefix(y * y)
    sx, sxx = px[..., x1] - px[..., x0], pxx[..., x1] - pxx[..., x0]
    sy, syy = py[..., y1] - py[..., y0], pyy[..., y1] - pyy[..., y0]
    cov = sxy - sx * sy / m
    vx = np.maximum(sxx - sx * sx / m, 0.0)
    vy = np.maximum(syy - sy * sy / m, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return cov / np.sqrt(vx * vy)


class CrossCorrelation(NamedTuple):
    """Normalised lagged cross-correlation of two aligned series.

    Attributes:
        lags: int array (2 * max_lag + 1,), ``-max_lag..max_lag`` in samples.
        correlation: Pearson ``r(lag) = corr(x[t], y[t + lag])`` over each lag's overlap,
            shape (2 * max_lag + 1,). Positive lag: ``x`` leads ``y`` (x's past predicts
            y's present).
        best_lag: lag of the largest ``|r|`` (ties: the smallest ``|lag|``).
        best_correlation: ``r(best_lag)`` (sign kept: negative means anti-correlated).
        n: samples used after gap handling and detrending.
    """

    lags: np.ndarray
    correlation: np.ndarray
    best_lag: int
    best_correlation: float
    n: int


class LeadLag(NamedTuple):
    """Lead/lag analysis with a surrogate significance test.

    Attributes:
        lags, correlation, best_lag, best_correlation, n: as in :class:`CrossCorrelation`
            (positive ``best_lag``: ``x`` leads ``y`` by that many samples).
        p_value: ``(1 + #{null_max >= max|r|}) / (num_surrogates + 1)``: probability under
            "independent series with the same spectra" of a peak ``|r|`` at least as large
            anywhere in the lag range (corrects for searching over lags); NaN without
            surrogates.
        null_max: max over lags of ``|r|`` for each surrogate, shape (num_surrogates,).
        num_surrogates: surrogates used.
    """

    lags: np.ndarray
    correlation: np.ndarray
    best_lag: int
    best_correlation: float
    n: int
    p_value: float
    null_max: np.ndarray
    num_surrogates: int


def _prepare_pair(
    x: Any, y: Any, max_lag: Any, detrend: str
) -> tuple[np.ndarray, np.ndarray, int]:
    xs = _as_series(x, "x", min_length=4)
    ys = _as_series(y, "y", min_length=4)
    _check_same_length(xs, ys, "x", "y")
    xs, ys = _gap_filled_pair(xs, ys, ("x", "y"), 4)
    _require_variation(xs, "x")
    _require_variation(ys, "y")
    xd, yd = _detrend(xs, detrend), _detrend(ys, detrend)
    _require_variation(xd, "x (after detrending)")
    _require_variation(yd, "y (after detrending)")
    max_lag = _check_int(max_lag, "max_lag", 0, xd.size - 3)
    return xd, yd, max_lag


def _best(lags: np.ndarray, r: np.ndarray) -> tuple[int, float]:
    a = np.where(np.isfinite(r), np.abs(r), -np.inf)
    top = np.flatnonzero(a == a.max())
    j = top[np.argmin(np.abs(lags[top]))]
    return int(lags[j]), float(r[j])


def cross_correlation(
    x: Any, y: Any, *, max_lag: int, detrend: Detrend = "linear"
) -> CrossCorrelation:
    """Normalised cross-correlation ``r(lag) = corr(x[t], y[t + lag])``, lags in samples.

    Sign convention: **positive lag means x leads y** (changes in ``x`` show up in ``y``
    ``lag`` samples later); e.g. ``y[t] = x[t - 3]`` peaks at ``lag = +3``. Each lag's
    Pearson correlation uses only its ``n - |lag|`` overlapping pairs, with means and
    variances of that overlap, so values are true correlations in [-1, 1]. O(n log n).

    Trending metrics correlate spuriously at every lag; ``detrend="linear"`` removes a
    straight line, ``"difference"`` correlates increments (best for strongly trending or
    random-walk-like series; lags keep their meaning).

    Args:
        x: the first series, shape (n,). Gaps: joint trim + interpolation.
        y: the second series, aligned with ``x``, shape (n,).
        max_lag: largest |lag| in samples, ``0 <= max_lag <= n - 3`` (keep it well below
            ``n``: the overlap shrinks with the lag).
        detrend: ``"none"`` (mean only), ``"linear"`` or ``"difference"``.

    Returns:
        :class:`CrossCorrelation`.

    Raises:
        ValueError: mismatched lengths (names ``y``), series shorter than 4 or constant,
            bad ``max_lag`` or ``detrend``.
    """
    xd, yd, max_lag = _prepare_pair(x, y, max_lag, detrend)
    lags = np.arange(-max_lag, max_lag + 1)
    r = _lagged_pearson(xd, yd, max_lag)
    best_lag, best_r = _best(lags, r)
    return CrossCorrelation(lags, r, best_lag, best_r, int(xd.size))


def lead_lag(
    x: Any,
    y: Any,
    *,
    max_lag: int,
    num_surrogates: int = 199,
    seed: int | np.random.Generator = 0,
    detrend: Detrend = "linear",
) -> LeadLag:
    """Which series leads, by how much, and is the coupling significant?

    Computes :func:`cross_correlation` (positive lag: ``x`` leads ``y``) and tests the
    peak ``max_lag |r(lag)|`` against ``num_surrogates`` phase-randomised surrogates of
    the (detrended) ``x`` paired with the real ``y``. Surrogates keep each series'
    autocorrelation, which is essential: two independent but smooth training curves have
    large raw correlations, and a naive ``r`` test would call them coupled. Using the
    maximum over all lags makes the p-value account for the search over lags.

    Args:
        x: the first series (the candidate leader), shape (n,).
        y: the second series, aligned with ``x``, shape (n,).
        max_lag: largest |lag| in samples.
        num_surrogates: surrogates for the p-value (0: skip; ~199-999 typical; the
            smallest attainable p is ``1 / (num_surrogates + 1)``).
        seed: int seed or ``numpy.random.Generator``.
        detrend: ``"none"``, ``"linear"`` or ``"difference"`` (see
            :func:`cross_correlation`).

    Returns:
        :class:`LeadLag`.

    Raises:
        ValueError: as :func:`cross_correlation`; bad ``num_surrogates`` / ``seed``.
    """
    xd, yd, max_lag = _prepare_pair(x, y, max_lag, detrend)
    num_surrogates = _check_int(num_surrogates, "num_surrogates", 0)
    rng = _as_rng(seed)
    lags = np.arange(-max_lag, max_lag + 1)
    r = _lagged_pearson(xd, yd, max_lag)
    best_lag, best_r = _best(lags, r)
    null = np.empty(0)
    p_value = float("nan")
    if num_surrogates:
        observed = float(np.nanmax(np.abs(r)))
        per_chunk = max(1, (1 << 22) // _fft_len(xd.size + max_lag))
        chunks = []
        for i in range(0, num_surrogates, per_chunk):
            s = _surrogates(xd, min(per_chunk, num_surrogates - i), rng)
            chunks.append(np.nanmax(np.abs(_lagged_pearson(s, yd[None, :], max_lag)), axis=-1))
        null = np.concatenate(chunks)
        p_value = float((1.0 + np.sum(null >= observed)) / (num_surrogates + 1.0))
    return LeadLag(lags, r, best_lag, best_r, int(xd.size), p_value, null, num_surrogates)
