"""Statistics of training dynamics: autocorrelation, precursors, change points, lead/lag.

NumPy only (host side, no jax import), for the co-evolution and phase-transition questions
of the research agenda. Supported names: :func:`autocorrelation_function`,
:func:`autocorrelation_time` (Sokal's automatic window) and :class:`AutocorrelationTime`,
:func:`rolling_variance`, :func:`rolling_autocorrelation`, :func:`precursor_trend` (critical
slowing down before a transition) and :class:`PrecursorTrend`, :func:`change_points` (PELT
on mean shifts) and :class:`ChangePoints`, :func:`fit_power_law_series` (power law of a
metric against step) and :class:`SeriesPowerLawFit`, :func:`cross_correlation` and
:class:`CrossCorrelation`, :func:`lead_lag` (lead/lag with a phase-randomised surrogate
test) and :class:`LeadLag`, :func:`phase_randomized_surrogates`. The ESD tail fit of weight
matrices is a different estimator: :func:`gradience_jax.weights.fit_power_law`.

All lags, windows and times are in **samples** (probe intervals): a lag of 3 on a metric
probed every 50 steps is 150 training steps.

Missing probes (NaN / inf, e.g. the ``null`` of a non-finite metric) follow one policy per
kind of statistic:

* lag-based statistics (autocorrelation, cross-correlation, surrogates) need a regular
  grid: leading and trailing non-finite values are trimmed (jointly for two series, so
  their alignment is kept) and interior gaps are filled by linear interpolation in the
  sample index. Interpolation smooths the gap, so long gaps bias autocorrelation upwards;
  a series with no finite interior is rejected.
* rolling statistics ignore non-finite values inside each window and return NaN where a
  window has fewer than ``min_periods`` finite values.
* :func:`change_points` drops non-finite samples and reports indices into the original
  series; :func:`fit_power_law_series` drops non-finite ``(x, y)`` pairs.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import numpy as np

__all__ = [
    "AutocorrelationTime",
    "ChangePoints",
    "CrossCorrelation",
    "LeadLag",
    "PrecursorTrend",
    "SeriesPowerLawFit",
    "autocorrelation_function",
    "autocorrelation_time",
    "change_points",
    "cross_correlation",
    "fit_power_law_series",
    "lead_lag",
    "phase_randomized_surrogates",
    "precursor_trend",
    "rolling_autocorrelation",
    "rolling_variance",
]


# --------------------------------------------------------------------------------------
# Series validation and preprocessing
# --------------------------------------------------------------------------------------


def _as_series(x: Any, name: str, *, min_length: int = 2) -> np.ndarray:
    """Any 1-D real array-like -> float64 copy; non-finite values become NaN."""
    try:
        arr = np.array(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a 1-D real array, got {type(x).__name__}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size < min_length:
        raise ValueError(f"{name} is too short: {arr.size} samples < {min_length} needed")
    arr[~np.isfinite(arr)] = np.nan
    return arr


def _check_same_length(x: np.ndarray, y: np.ndarray, xname: str, yname: str) -> None:
    if x.shape != y.shape:
        raise ValueError(
            f"{yname} has length {y.size} but {xname} has length {x.size}; they must be "
            "aligned sample by sample"
        )


def _finite_span(mask: np.ndarray) -> tuple[int, int]:
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return 0, 0
    return int(idx[0]), int(idx[-1]) + 1


def _interpolate_gaps(x: np.ndarray) -> np.ndarray:
    """Linear interpolation of interior NaNs (x has finite endpoints)."""
    bad = np.isnan(x)
    if not bad.any():
        return x
    t = np.arange(x.size)
    out = x.copy()
    out[bad] = np.interp(t[bad], t[~bad], x[~bad])
    return out


def _gap_filled(x: np.ndarray, name: str, min_length: int) -> tuple[np.ndarray, int]:
    """Trim leading/trailing NaNs, interpolate interior ones; returns (series, offset)."""
    lo, hi = _finite_span(np.isfinite(x))
    if hi - lo < min_length:
        raise ValueError(
            f"{name} has only {hi - lo} samples between its first and last finite value; "
            f"{min_length} needed"
        )
    return _interpolate_gaps(x[lo:hi]), lo


def _gap_filled_pair(
    x: np.ndarray, y: np.ndarray, names: tuple[str, str], min_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Jointly trim two aligned series to the span where both have finite ends."""
    lx, hx = _finite_span(np.isfinite(x))
    ly, hy = _finite_span(np.isfinite(y))
    lo, hi = max(lx, ly), min(hx, hy)
    if hi - lo < min_length:
        raise ValueError(
            f"{names[0]} and {names[1]} overlap on only {max(hi - lo, 0)} finite-bounded "
            f"samples; {min_length} needed"
        )
    xs, ys = x[lo:hi], y[lo:hi]
    return _interpolate_gaps(xs), _interpolate_gaps(ys)


def _require_variation(x: np.ndarray, name: str) -> None:
    if not np.ptp(x[np.isfinite(x)]) > 0:
        raise ValueError(f"{name} is constant (variance 0): the statistic is undefined")


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


def _fft_len(n: int) -> int:
    return 1 << max(1, int(math.ceil(math.log2(n))))


def _as_rng(seed: int | np.random.Generator) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int or a numpy Generator, got {seed!r}")
    return np.random.default_rng(int(seed))


def _check_int(value: Any, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if v < lo or (hi is not None and v > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {bound}, got {v}")
    return v


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


# --------------------------------------------------------------------------------------
# Change points
# --------------------------------------------------------------------------------------


class ChangePoints(NamedTuple):
    """Mean-shift change points.

    Attributes:
        indices: int array (k,): sample indices (into the original series) where a new
            segment starts, increasing; ``x[indices[i]]`` is the first sample after change
            ``i``.
        means: segment means, shape (k + 1,).
        penalty: the penalty per change point used (in units of ``noise_scale**2``).
        noise_scale: the noise standard deviation used to standardise the series.
    """

    indices: np.ndarray
    means: np.ndarray
    penalty: float
    noise_scale: float


def _noise_scale(x: np.ndarray) -> float:
    """Robust noise sd from first differences (MAD), insensitive to mean shifts."""
    d = np.diff(x)
    mad = np.median(np.abs(d - np.median(d)))
    sigma = 1.482602218505602 * mad / math.sqrt(2.0)
    if sigma > 0:
        return float(sigma)
    return float(np.std(d) / math.sqrt(2.0))


def _pelt(z: np.ndarray, penalty: float, min_size: int) -> list[int]:
    """PELT (Killick et al. 2012) for the Gaussian mean-shift (sum of squares) cost."""
    n = z.size
    s1 = np.concatenate([[0.0], np.cumsum(z)])
    s2 = np.concatenate([[0.0], np.cumsum(z * z)])

    def cost(s: np.ndarray, t: int) -> np.ndarray:
        m = t - s
        return (s2[t] - s2[s]) - (s1[t] - s1[s]) ** 2 / m

    best = np.full(n + 1, np.inf)
    best[0] = -penalty
    last = np.zeros(n + 1, dtype=np.int64)
    cands = np.array([0], dtype=np.int64)
    for t in range(min_size, n + 1):
        new = t - min_size
        if new >= min_size and np.isfinite(best[new]):
            cands = np.append(cands, new)
        c = best[cands] + cost(cands, t)
        j = int(np.argmin(c))
        best[t] = c[j] + penalty
        last[t] = cands[j]
        cands = cands[c <= best[t]]  # PELT pruning (K = 0 for this cost)
    cps: list[int] = []
    t = n
    while t > 0:
        s = int(last[t])
        if s > 0:
            cps.append(s)
        t = s
    return cps[::-1]


def change_points(
    x: Any,
    *,
    penalty: float | None = None,
    min_size: int = 2,
    noise_scale: float | None = None,
) -> ChangePoints:
    """Mean-shift change points by PELT with a penalty (exact optimal segmentation).

    Minimises ``sum_segments SSE(segment) / sigma^2 + penalty * (#changes)`` over all
    segmentations with segments of at least ``min_size`` samples (Killick, Fearnhead &
    Eckley 2012), in O(n) expected time. ``sigma`` is estimated robustly from the median
    absolute first difference, so steps in the mean do not inflate it. Autocorrelated
    noise is not modelled: strongly correlated series (``tau >> 1``) yield spurious
    changes unless the penalty is raised (roughly by a factor ``tau``).

    Args:
        x: series, shape (n,). Non-finite samples are dropped; indices refer to ``x``.
        penalty: cost of one change point, in units of the noise variance (default
            ``3 log n``, a modified-BIC choice that keeps false alarms on pure noise rare).
        min_size: minimum segment length in samples.
        noise_scale: noise standard deviation (default: robust estimate).

    Returns:
        :class:`ChangePoints`. A constant series has no change points.

    Raises:
        ValueError: ``x`` not 1-D or with fewer than ``2 * min_size`` finite samples; bad
            ``penalty`` / ``min_size`` / ``noise_scale``.
    """
    xs = _as_series(x, "x", min_length=2)
    min_size = _check_int(min_size, "min_size", 1)
    keep = np.flatnonzero(np.isfinite(xs))
    z = xs[keep]
    n = z.size
    if n < 2 * min_size:
        raise ValueError(f"x has {n} finite samples; at least 2 * min_size = {2 * min_size} needed")
    if penalty is None:
        penalty = 3.0 * math.log(n)
    if not penalty >= 0:
        raise ValueError(f"penalty must be >= 0, got {penalty}")
    sigma = _noise_scale(z) if noise_scale is None else float(noise_scale)
    if noise_scale is not None and not sigma > 0:
        raise ValueError(f"noise_scale must be > 0, got {noise_scale}")
    if not sigma > 0:  # constant series
        return ChangePoints(np.zeros(0, dtype=np.int64), np.array([z.mean()]), float(penalty), 0.0)
    cps = _pelt((z - z.mean()) / sigma, float(penalty), min_size)
    bounds = [0, *cps, n]
    means = np.array([z[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:])])
    return ChangePoints(
        indices=keep[np.array(cps, dtype=np.int64)],
        means=means,
        penalty=float(penalty),
        noise_scale=sigma,
    )


# --------------------------------------------------------------------------------------
# Power law
# --------------------------------------------------------------------------------------


class SeriesPowerLawFit(NamedTuple):
    """Fit of ``y = prefactor * x ** exponent`` by least squares in log-log space.

    Also reachable as ``gradience_jax.telemetry.PowerLawFit`` (the old name; the ESD tail
    fit of :mod:`gradience_jax.weights` has its own ``PowerLawFit``).

    Attributes:
        exponent: slope of ``log y`` on ``log x`` (negative for a decaying metric).
        prefactor: ``exp(intercept)``.
        exponent_stderr: standard error of the exponent (OLS, ``n - 2`` dof).
        r_squared: coefficient of determination in log-log space.
        residual_std: std of the log residuals (multiplicative scatter).
        n: number of points used.
    """

    exponent: float
    prefactor: float
    exponent_stderr: float
    r_squared: float
    residual_std: float
    n: int


def fit_power_law_series(
    x: Any, y: Any, *, x_min: float | None = None, x_max: float | None = None
) -> SeriesPowerLawFit:
    """Power-law fit of a metric against step: OLS of ``log y`` on ``log x``.

    Also reachable as ``gradience_jax.telemetry.fit_power_law`` (the old name).

    This is the maximum-likelihood fit under multiplicative log-normal noise (the usual
    case for losses and curvature, which span decades). It is not the right tool for the
    tail of a distribution (use a Clauset-style MLE:
    :func:`gradience_jax.weights.fit_power_law`).

    Args:
        x: abscissa (e.g. steps), shape (n,), positive in the fitted range.
        y: metric, shape (n,), positive in the fitted range.
        x_min: optional lower end of the fit range on ``x`` (inclusive).
        x_max: optional upper end of the fit range on ``x`` (inclusive).

    Returns:
        :class:`SeriesPowerLawFit`. Cost O(n).

    Raises:
        ValueError: mismatched lengths; fewer than 3 usable points; non-positive ``x`` or
            ``y`` in range (e.g. step 0: pass ``x_min=1``); constant ``x`` or ``y``.
    """
    xs = _as_series(x, "x", min_length=3)
    ys = _as_series(y, "y", min_length=3)
    _check_same_length(xs, ys, "x", "y")
    use = np.isfinite(xs) & np.isfinite(ys)
    if x_min is not None:
        use &= xs >= x_min
    if x_max is not None:
        use &= xs <= x_max
    if np.any(xs[use] <= 0):
        raise ValueError(
            f"x must be > 0 in the fitted range, got min {xs[use].min()}; restrict it with "
            "x_min (e.g. drop step 0)"
        )
    if np.any(ys[use] <= 0):
        raise ValueError(f"y must be > 0 in the fitted range, got min {ys[use].min()}")
    lx, ly = np.log(xs[use]), np.log(ys[use])
    n = lx.size
    if n < 3:
        raise ValueError(f"x, y have only {n} usable points in range; at least 3 needed")
    _require_variation(lx, "x")
    _require_variation(ly, "y")
    mx, my = lx.mean(), ly.mean()
    sxx = np.sum((lx - mx) ** 2)
    slope = float(np.sum((lx - mx) * (ly - my)) / sxx)
    intercept = my - slope * mx
    resid = ly - (intercept + slope * lx)
    sse = float(resid @ resid)
    sst = float(np.sum((ly - my) ** 2))
    return SeriesPowerLawFit(
        exponent=slope,
        prefactor=float(math.exp(intercept)),
        exponent_stderr=math.sqrt(sse / (n - 2) / sxx) if n > 2 else float("nan"),
        r_squared=1.0 - sse / sst,
        residual_std=math.sqrt(sse / (n - 2)),
        n=n,
    )


# --------------------------------------------------------------------------------------
# Cross-correlation and lead/lag
# --------------------------------------------------------------------------------------


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


def phase_randomized_surrogates(
    x: Any, num_surrogates: int, *, seed: int | np.random.Generator = 0
) -> np.ndarray:
    """Fourier phase-randomised surrogates: same power spectrum (autocorrelation), random phases.

    Each surrogate keeps the amplitudes ``|X_f|`` and the mean of ``x`` and draws
    independent uniform phases (the Nyquist bin, which must stay real, gets a random
    sign) - Theiler et al. 1992. They realise the null hypothesis "linear Gaussian
    stationary process with the same autocorrelation as x".

    Args:
        x: series, shape (n,), finite.
        num_surrogates: number of surrogates S >= 1.
        seed: int seed or ``numpy.random.Generator`` (same seed, same surrogates).

    Returns:
        float64 array, shape (S, n).

    Raises:
        ValueError: ``x`` not 1-D / shorter than 4 / non-finite; bad ``num_surrogates``.
    """
    xs = _as_series(x, "x", min_length=4)
    if not np.isfinite(xs).all():
        raise ValueError("x must be finite for surrogates (fill gaps first)")
    num_surrogates = _check_int(num_surrogates, "num_surrogates", 1)
    rng = _as_rng(seed)
    return _surrogates(xs, num_surrogates, rng)


def _surrogates(x: np.ndarray, num: int, rng: np.random.Generator) -> np.ndarray:
    n = x.size
    mean = x.mean()
    f = np.fft.rfft(x - mean)
    phases = rng.uniform(0.0, 2.0 * np.pi, size=(num, f.size))
    phases[:, 0] = 0.0
    rot = np.exp(1j * phases)
    if n % 2 == 0:
        rot[:, -1] = np.where(rng.random(num) < 0.5, 1.0, -1.0)
    return np.fft.irfft(f * rot, n) + mean


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
