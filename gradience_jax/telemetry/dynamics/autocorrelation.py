"""Autocorrelation of one series: its function and time, rolling statistics, precursors.

:func:`autocorrelation_function` and :func:`autocorrelation_time` (Sokal's automatic
window) on the gap-filled series; :func:`rolling_variance` and
:func:`rolling_autocorrelation` over trailing windows (non-finite values ignored inside a
window); :func:`precursor_trend`, the trend of one of these indicators before a transition
(critical slowing down), with a phase-randomised surrogate test. NumPy only.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import numpy as np

from gradience_jax.telemetry.dynamics._series import (
    _as_series,
    _check_int,
    _check_same_length,
    _fft_len,
    _gap_filled,
    _require_variation,
    phase_randomized_surrogates,
)

__all__ = [
    "AutocorrelationTime",
    "PrecursorTrend",
    "autocorrelation_function",
    "autocorrelation_time",
    "precursor_trend",
    "rolling_autocorrelation",
    "rolling_variance",
]


# --------------------------------------------------------------------------------------
# Autocorrelation
# --------------------------------------------------------------------------------------


def _acf(x: np.ndarray, max_lag: int) -> np.ndarray:
    """Normalised biased autocorrelation of a demeaned series by FFT, lags 0..max_lag."""
    n = x.size
    nfft = _fft_len(2 * n)
    f = np.fft.rfft(x, nfft)
    acov = np.fft.irfft(f * np.conj(f), nfft)[: max_lag + 1]
    return acov / acov[0]


def autocorrelation_function(x: Any, max_lag: int | None = None) -> np.ndarray:
    """Normalised autocorrelation ``rho(k)``, ``k = 0..max_lag`` (samples), by FFT.

    Uses the standard biased estimator ``rho(k) = sum_t x'_t x'_{t+k} / sum_t x'_t^2``
    (``x'`` = demeaned ``x``), which is positive semi-definite. O(n log n).

    Args:
        x: series, shape (n,). Gaps are interpolated (see module docstring).
        max_lag: largest lag (default ``n - 1`` of the gap-filled series).

    Returns:
        float64 array, shape (max_lag + 1,), with ``rho(0) = 1``.

    Raises:
        ValueError: ``x`` not 1-D, shorter than 3 samples or constant; bad ``max_lag``.
    """
    xs, _ = _gap_filled(_as_series(x, "x", min_length=3), "x", 3)
    _require_variation(xs, "x")
    n = xs.size
    max_lag = n - 1 if max_lag is None else _check_int(max_lag, "max_lag", 0, n - 1)
    return _acf(xs - xs.mean(), max_lag)


class AutocorrelationTime(NamedTuple):
    """Integrated autocorrelation time of a series.

    Attributes:
        tau: ``1 + 2 sum_{k=1}^{M} rho(k)`` in samples (1 for white noise,
            ``(1 + phi) / (1 - phi)`` for AR(1)).
        window: the summation window ``M`` chosen by Sokal's rule ``M >= c * tau(M)``.
        n: number of samples used.
        effective_sample_size: ``n / tau``.
        reliable: the window rule was satisfied and ``n >= min_samples_per_tau * tau``
            (emcee's criterion; otherwise ``tau`` is likely an underestimate).
    """

    tau: float
    window: int
    n: int
    effective_sample_size: float
    reliable: bool


def autocorrelation_time(
    x: Any, *, c: float = 5.0, min_samples_per_tau: float = 50.0
) -> AutocorrelationTime:
    """Integrated autocorrelation time with Sokal's automatic window (as in emcee).

    ``tau(M) = 1 + 2 sum_{k=1}^{M} rho(k)`` is evaluated for all ``M``; the window is the
    smallest ``M >= c * tau(M)``, which balances the truncation bias against the variance
    (``~ 2 (2M + 1) / n * tau^2``) of the sum. Near a critical point (critical slowing down)
    ``tau`` grows.

    References: A. Sokal, "Monte Carlo Methods in Statistical Mechanics" (1997);
    D. Foreman-Mackey et al., emcee ``autocorr.integrated_time``.

    Args:
        x: series, shape (n,), in probe samples. Gaps are interpolated.
        c: window factor (emcee default 5; larger for slowly decaying correlations).
        min_samples_per_tau: ``reliable`` requires ``n >= min_samples_per_tau * tau``.

    Returns:
        :class:`AutocorrelationTime` (``tau`` in samples).

    Raises:
        ValueError: ``x`` not 1-D, shorter than 3 samples or constant; ``c <= 0``.
    """
    if not c > 0:
        raise ValueError(f"c must be > 0, got {c}")
    xs, _ = _gap_filled(_as_series(x, "x", min_length=3), "x", 3)
    _require_variation(xs, "x")
    n = xs.size
    rho = _acf(xs - xs.mean(), n - 1)
    taus = 2.0 * np.cumsum(rho) - 1.0  # taus[M] = 1 + 2 sum_{k=1}^{M} rho(k)
    ok = np.arange(n) >= c * taus
    found = bool(ok.any())
    window = int(np.argmax(ok)) if found else n - 1
    tau = float(taus[window])
    return AutocorrelationTime(
        tau=tau,
        window=window,
        n=n,
        effective_sample_size=n / tau if tau > 0 else float("nan"),
        reliable=found and n >= min_samples_per_tau * tau,
    )


# --------------------------------------------------------------------------------------
# Rolling statistics
# --------------------------------------------------------------------------------------


def _rolling_windows(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing windows aligned with x: row t holds x[t-window+1 .. t] (NaN-padded)."""
    padded = np.concatenate([np.full(window - 1, np.nan), x])
    return np.lib.stride_tricks.sliding_window_view(padded, window)


def _rolling_apply(x: np.ndarray, window: int, func: Any, chunk_elems: int = 1 << 22) -> np.ndarray:
    """Apply ``func((rows, window) block) -> (rows,)`` over trailing windows in chunks."""
    wins = _rolling_windows(x, window)
    rows = max(1, chunk_elems // window)
    return np.concatenate([func(wins[i : i + rows]) for i in range(0, x.size, rows)])


def _check_window(window: Any, n: int, min_periods: Any, floor: int) -> tuple[int, int]:
    window = _check_int(window, "window", 2, n)
    if min_periods is None:
        min_periods = window
    min_periods = _check_int(min_periods, "min_periods", floor, window)
    return window, min_periods


def rolling_variance(
    x: Any, window: int, *, min_periods: int | None = None, ddof: int = 1
) -> np.ndarray:
    """Trailing (causal) rolling variance, aligned with the input.

    ``out[t] = var(x[t - window + 1 .. t])``, using only the past, so it can serve as an
    early-warning indicator without look-ahead. Non-finite values inside a window are
    ignored. Cost O(n * window) time, O(min(n, 4M / window) * window) memory.

    Args:
        x: series, shape (n,).
        window: window length in samples, ``2 <= window <= n``.
        min_periods: minimum finite values in a window (default ``window``); below it the
            output is NaN. The first ``window - 1`` outputs are partial windows.
        ddof: delta degrees of freedom (1: sample variance, 0: population variance).

    Returns:
        float64 array, shape (n,).

    Raises:
        ValueError: ``x`` not 1-D or shorter than 2; bad ``window`` / ``min_periods`` /
            ``ddof``.
    """
    xs = _as_series(x, "x", min_length=2)
    ddof = _check_int(ddof, "ddof", 0)
    window, min_periods = _check_window(window, xs.size, min_periods, ddof + 1)

    def block(w: np.ndarray) -> np.ndarray:
        ok = np.isfinite(w)
        cnt = ok.sum(axis=1)
        filled = np.where(ok, w, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = filled.sum(axis=1) / cnt
            dev = np.where(ok, w - mean[:, None], 0.0)
            var = (dev * dev).sum(axis=1) / (cnt - ddof)
        return np.where(cnt >= min_periods, var, np.nan)

    return _rolling_apply(xs, window, block)


def rolling_autocorrelation(
    x: Any, window: int, *, lag: int = 1, min_periods: int | None = None
) -> np.ndarray:
    """Trailing rolling lag-``lag`` autocorrelation, aligned with the input.

    ``out[t]`` is the Pearson correlation of the pairs ``(x[s], x[s + lag])`` with both
    ends inside the trailing window ``[t - window + 1, t]`` and finite. A rising lag-1
    autocorrelation is the classic signature of critical slowing down (for AR(1) it is
    ``phi``, and the autocorrelation time is ``(1 + phi) / (1 - phi)``).

    Args:
        x: series, shape (n,).
        window: window length in samples, ``lag + 3 <= window <= n``.
        lag: lag in samples, ``>= 1``.
        min_periods: minimum number of finite pairs (default ``window - lag``).

    Returns:
        float64 array, shape (n,); NaN where there are too few pairs or a window is
        constant.

    Raises:
        ValueError: ``x`` not 1-D; bad ``window`` / ``lag`` / ``min_periods``.
    """
    xs = _as_series(x, "x", min_length=4)
    lag = _check_int(lag, "lag", 1, xs.size - 3)
    window = _check_int(window, "window", lag + 3, xs.size)
    npairs = window - lag
    if min_periods is None:
        min_periods = npairs
    min_periods = _check_int(min_periods, "min_periods", 3, npairs)

    def block(w: np.ndarray) -> np.ndarray:
        a, b = w[:, :-lag], w[:, lag:]
        ok = np.isfinite(a) & np.isfinite(b)
        cnt = ok.sum(axis=1)
        a0, b0 = np.where(ok, a, 0.0), np.where(ok, b, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            ma, mb = a0.sum(axis=1) / cnt, b0.sum(axis=1) / cnt
            da = np.where(ok, a - ma[:, None], 0.0)
            db = np.where(ok, b - mb[:, None], 0.0)
            r = (da * db).sum(axis=1) / np.sqrt((da * da).sum(axis=1) * (db * db).sum(axis=1))
        return np.where(cnt >= min_periods, r, np.nan)

    return _rolling_apply(xs, window, block)


def _sign_matrix(a: np.ndarray, i0: int, rows: int) -> np.ndarray:
    """int8 ``sign(a[j] - a[i])`` for rows i in [i0, i0 + rows), all j."""
    col = a[i0 : i0 + rows, None]
    return (a[None, :] > col).view(np.int8) - (a[None, :] < col).view(np.int8)


def _kendall_tau(x: np.ndarray, y: np.ndarray, chunk_elems: int = 1 << 21) -> float:
    """Kendall's tau-b (ties handled as in scipy.stats.kendalltau), O(n^2) in row chunks.

    ``sign(x_j - x_i) sign(y_j - y_i)`` is symmetric in (i, j), so sums over full rows are
    twice the sums over pairs i < j (the diagonal contributes 0 to the concordance sum and
    n to the tie counts).
    """
    n = x.size
    s = 0
    zeros_x = 0
    zeros_y = 0
    rows = max(1, chunk_elems // max(n, 1))
    for i0 in range(0, n, rows):
        sx = _sign_matrix(x, i0, rows)
        sy = _sign_matrix(y, i0, rows)
        s += int(np.einsum("ij,ij->", sx, sy, dtype=np.int64))
        zeros_x += int(np.count_nonzero(sx == 0))
        zeros_y += int(np.count_nonzero(sy == 0))
    n0 = n * (n - 1) / 2.0
    ties_x, ties_y = (zeros_x - n) / 2.0, (zeros_y - n) / 2.0
    denom = math.sqrt((n0 - ties_x) * (n0 - ties_y))
    return (s / 2.0) / denom if denom > 0 else float("nan")


def _gaussian_smooth(x: np.ndarray, bandwidth: float) -> np.ndarray:
    """Gaussian-kernel smoother, renormalised at the edges and over NaNs (ignored)."""
    half = int(min(math.ceil(3.0 * bandwidth), x.size - 1))
    k = np.arange(-half, half + 1, dtype=np.float64)
    w = np.exp(-0.5 * (k / bandwidth) ** 2)
    ok = np.isfinite(x)
    num = np.convolve(np.where(ok, x, 0.0), w, mode="full")[half : half + x.size]
    den = np.convolve(ok.astype(np.float64), w, mode="full")[half : half + x.size]
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / den


class PrecursorTrend(NamedTuple):
    """Trend of an early-warning indicator before a transition.

    Attributes:
        kendall_tau: Kendall's tau-b between time and the indicator over the
            pre-transition window (> 0: the indicator rises towards the transition).
        p_value: one-sided surrogate p-value ``P(tau_null >= tau)`` from phase-randomised
            surrogates of the (detrended) pre-transition series; NaN without surrogates.
            Do not use the analytic Kendall p-value: overlapping windows are correlated.
        indicator: the rolling indicator, shape (stop - start,), aligned with
            ``x[start:stop]`` (NaN for the first ``window - 1`` samples).
        start: first sample index of the analysed pre-transition segment.
        stop: the transition's sample index (exclusive end of the segment).
        window: rolling window (samples).
        null_taus: surrogate taus, shape (num_surrogates,).
    """

    kendall_tau: float
    p_value: float
    indicator: np.ndarray
    start: int
    stop: int
    window: int
    null_taus: np.ndarray


def _indicator(x: np.ndarray, kind: str, window: int) -> np.ndarray:
    if kind == "variance":
        return rolling_variance(x, window)
    if kind == "autocorrelation":
        return rolling_autocorrelation(x, window, lag=1)
    raise ValueError(f"indicator must be 'variance' or 'autocorrelation', got {kind!r}")


def precursor_trend(
    x: Any,
    transition: int,
    *,
    window: int,
    steps: Any | None = None,
    start: int = 0,
    indicator: Literal["variance", "autocorrelation"] = "variance",
    detrend_bandwidth: float | None = None,
    num_surrogates: int = 0,
    seed: int | np.random.Generator = 0,
) -> PrecursorTrend:
    """Does variance (or lag-1 autocorrelation) rise before a transition?

    Critical slowing down predicts rising variance and autocorrelation as a transition
    (e.g. grokking) approaches. This computes the causal rolling indicator on
    ``x[start:transition]`` (optionally after removing a Gaussian-kernel trend, as in
    Dakos et al. 2012) and its Kendall tau against time. Significance is assessed against
    ``num_surrogates`` phase-randomised surrogates of the (detrended) segment: same
    spectrum, hence same autocorrelation, but stationary, so any indicator trend in them
    is chance. Phase randomisation assumes stationarity, so detrend a trending metric
    (``detrend_bandwidth``) before trusting the p-value.

    Args:
        x: metric series, shape (n,).
        transition: the transition, as a sample index into ``x``, or as a step value when
            ``steps`` is given (the first sample with ``steps >= transition``).
        window: rolling window in samples.
        steps: optional step of each sample, shape (n,), increasing.
        start: first sample index of the pre-transition segment.
        indicator: ``"variance"`` or ``"autocorrelation"`` (lag 1).
        detrend_bandwidth: Gaussian-kernel bandwidth (samples) of the trend removed before
            the indicator; None keeps the raw series.
        num_surrogates: phase-randomised surrogates for the p-value (0: none).
        seed: int seed or ``numpy.random.Generator`` for the surrogates.

    Returns:
        :class:`PrecursorTrend`.

    Raises:
        ValueError: bad ``transition`` / ``start`` / ``window``; ``steps`` of another
            length; a segment too short for ``window``; a constant indicator.
    """
    xs = _as_series(x, "x", min_length=4)
    n = xs.size
    if steps is not None:
        st = _as_series(steps, "steps", min_length=4)
        _check_same_length(xs, st, "x", "steps")
        if np.any(np.diff(st) <= 0):
            raise ValueError("steps must be strictly increasing")
        stop = int(np.searchsorted(st, transition, side="left"))
    else:
        stop = _check_int(transition, "transition", 1, n)
    start = _check_int(start, "start", 0)
    if stop - start < 4:
        raise ValueError(
            f"transition leaves only {stop - start} samples after start={start}; need >= 4"
        )
    seg = xs[start:stop]
    window = _check_int(window, "window", 4 if indicator == "autocorrelation" else 2, seg.size - 2)
    if detrend_bandwidth is not None:
        if not detrend_bandwidth > 0:
            raise ValueError(f"detrend_bandwidth must be > 0, got {detrend_bandwidth}")
    num_surrogates = _check_int(num_surrogates, "num_surrogates", 0)

    def trend(series: np.ndarray) -> tuple[float, np.ndarray]:
        ind = _indicator(series, indicator, window)
        ok = np.isfinite(ind)
        if ok.sum() < 3:
            return float("nan"), ind
        t = np.flatnonzero(ok).astype(np.float64)
        return _kendall_tau(t, ind[ok]), ind

    resid = seg if detrend_bandwidth is None else seg - _gaussian_smooth(seg, detrend_bandwidth)
    tau, ind = trend(resid)
    finite_ind = ind[np.isfinite(ind)]
    if finite_ind.size < 3 or not np.ptp(finite_ind) > 0:
        raise ValueError(
            "x gives a constant (or too short) indicator before the transition; the trend "
            "is undefined"
        )
    null = np.empty(0)
    p_value = float("nan")
    if num_surrogates:
        filled, _ = _gap_filled(resid, "x", window + 3)
        surr = phase_randomized_surrogates(filled, num_surrogates, seed=seed)
        null = np.array([trend(s)[0] for s in surr])
        p_value = (1.0 + np.sum(null >= tau)) / (num_surrogates + 1.0)
    return PrecursorTrend(
        kendall_tau=float(tau),
        p_value=float(p_value),
        indicator=ind,
        start=start,
        stop=stop,
        window=window,
        null_taus=null,
    )
