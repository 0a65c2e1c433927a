"""Regimes of one series: mean-shift change points and a power law against step.

:func:`change_points` (PELT on mean shifts; non-finite samples dropped, indices into the
original series) and :func:`fit_power_law_series` (least squares in log-log space;
non-finite ``(x, y)`` pairs dropped). The ESD tail fit of weight matrices is a different
estimator: :func:`gradience_jax.weights.fit_power_law`. NumPy only.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from gradience_jax.telemetry.dynamics._series import (
    _as_series,
    _check_int,
    _check_same_length,
    _require_variation,
)

__all__ = ["ChangePoints", "SeriesPowerLawFit", "change_points", "fit_power_law_series"]


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
