"""Power-law fits of weight spectra: the ESD tail and the singular-value decay.

* :func:`fit_power_law`: the tail ``p(lambda) ~ lambda^-alpha`` of the ESD (the density
  exponent that WeightWatcher reports) by the continuous maximum-likelihood estimator
  ``alpha = 1 + n / sum_i log(lambda_i / xmin)``, with ``xmin`` chosen to minimise the
  Kolmogorov-Smirnov distance (Clauset, Shalizi & Newman, 2009). All candidate ``xmin`` are
  evaluated at once with array operations. It is a distribution-tail estimator; the
  power law of a metric against step is :func:`gradience_jax.telemetry.fit_power_law_series`.
* :func:`decay_exponent`: least-squares slope ``a`` of ``log sigma_i = c - a log i``.

NumPy only (host side). Supported names: ``PowerLawFit``, ``fit_power_law``,
``missing_fit``, ``decay_exponent``.

References: Clauset, Shalizi & Newman, SIAM Review 51 (2009); Martin & Mahoney, JMLR 22
(2021).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from gradience_jax._validate import ArgumentTypeError, check_int, check_real

__all__ = ["PowerLawFit", "decay_exponent", "fit_power_law", "missing_fit"]


class PowerLawFit(NamedTuple):
    """Continuous power-law fit ``p(x) ~ x^-alpha`` for ``x >= xmin``.

    ``alpha``, ``alpha_stderr`` (``(alpha - 1) / sqrt(n)``), ``xmin`` and ``ks_distance``
    are None when no fit is possible; ``missing_reason`` then says why. ``num_tail`` is the
    number ``n`` of samples ``>= xmin`` used, ``num_total`` the number of samples offered.
    """

    alpha: float | None
    alpha_stderr: float | None
    xmin: float | None
    ks_distance: float | None
    num_tail: int
    num_total: int
    missing_reason: str | None


def missing_fit(reason: str, num_total: int) -> PowerLawFit:
    """The ``PowerLawFit`` of "no fit possible".

    Args:
      reason: why there is no fit (stored as ``missing_reason``).
      num_total: number of samples offered (``num_total``).

    Returns:
      A ``PowerLawFit`` with ``alpha`` etc. None and ``num_tail = 0``.
    """
    return PowerLawFit(None, None, None, None, 0, num_total, reason)


def fit_power_law(
    samples: Any,
    *,
    xmin: float | None = None,
    min_tail: int = 10,
    block_elements: int = 1 << 22,
) -> PowerLawFit:
    """Continuous power-law MLE with KS-optimal ``xmin`` (Clauset, Shalizi & Newman 2009).

    For each candidate ``xmin`` (every distinct sample leaving ``>= min_tail`` points in the
    tail) ``alpha = 1 + n / sum(log(x / xmin))`` over the ``n`` samples ``x >= xmin``, and the
    KS distance between the tail's empirical CDF and ``1 - (x / xmin)^(1 - alpha)``; the
    candidate with the smallest KS distance wins. All candidates are scored with array
    operations, in blocks of at most ``block_elements`` (candidate, sample) pairs, so memory
    stays bounded; cost ``O(n^2)``.

    Args:
      samples: real samples, any shape (flattened); values ``<= 0`` are left out of the fit
        (zero eigenvalues of a rank-deficient matrix), NaN / Inf are refused.
      xmin: fix ``xmin > 0`` instead of searching (then only alpha and KS are computed).
      min_tail: smallest tail size accepted (``>= 2``).
      block_elements: memory bound of the vectorised KS scan (``>= 1``).

    Returns:
      ``PowerLawFit`` (alpha etc. None with ``missing_reason`` when no fit is possible).

    Raises:
      ArgumentTypeError: an argument of the wrong kind (e.g. a string ``xmin``).
      ValueError: ``min_tail < 2``, ``block_elements < 1``, ``xmin <= 0`` or not finite,
        non-real or non-finite samples.
    """
    min_tail = check_int(min_tail, "min_tail", lo=2)
    block_elements = check_int(block_elements, "block_elements")
    if xmin is not None:
        xmin = check_real(xmin, "xmin", lo=0.0, lo_open=True)
    raw = np.asarray(samples)
    if raw.dtype.kind not in "fiub":
        raise ArgumentTypeError(f"samples must be real numbers, got dtype {raw.dtype}")
    x = np.asarray(raw, dtype=np.float64).ravel()
    num_total = int(x.size)
    bad = ~np.isfinite(x)
    if bad.any():
        raise ValueError(f"samples have non-finite values ({int(np.isnan(x).sum())} NaN, "
                         f"{int(np.isinf(x).sum())} Inf)")
    x = np.sort(x[x > 0])
    if x.size < min_tail:
        return missing_fit(
            f"only {x.size} positive values; a tail fit needs at least min_tail={min_tail}",
            num_total,
        )
    lx = np.log(x)
    if xmin is not None:
        k = int(np.searchsorted(x, xmin, side="left"))
        if x.size - k < min_tail:
            return missing_fit(
                f"only {x.size - k} values >= xmin={xmin}; need min_tail={min_tail}", num_total
            )
        cands = np.array([k])
        log_xmin = np.array([math.log(xmin)])
    else:
        last = x.size - min_tail
        cands = np.arange(last + 1)
        distinct = np.concatenate([[True], x[1:] != x[:-1]])[: last + 1]
        cands = cands[distinct]
        log_xmin = lx[cands]
    suffix = np.concatenate([np.cumsum(lx[::-1])[::-1], [0.0]])  # sum_{i>=k} log x_i
    n_tail = x.size - cands
    log_sum = suffix[cands] - n_tail * log_xmin
    ok = log_sum > 1e-12 * n_tail
    alpha = np.where(ok, 1.0 + n_tail / np.where(ok, log_sum, 1.0), np.nan)
    if not ok.any():
        return missing_fit("all tail values are equal (degenerate spectrum): no tail", num_total)
    ks = _ks_scan(lx, cands, log_xmin, alpha, block_elements)
    ks = np.where(ok, ks, np.inf)
    best = int(np.argmin(ks))
    a, n = float(alpha[best]), int(n_tail[best])
    return PowerLawFit(
        alpha=a,
        alpha_stderr=(a - 1.0) / math.sqrt(n),
        xmin=float(math.exp(log_xmin[best])),
        ks_distance=float(ks[best]),
        num_tail=n,
        num_total=num_total,
        missing_reason=None,
    )


def _ks_scan(
    lx: np.ndarray, cands: np.ndarray, log_xmin: np.ndarray, alpha: np.ndarray, block: int
) -> np.ndarray:
    """KS distance of the fitted power law for every candidate (vectorised in blocks)."""
    m = lx.size
    out = np.empty(cands.size)
    step = max(1, block // max(m, 1))
    for start in range(0, cands.size, step):
        k = cands[start : start + step][:, None]
        lo = int(k.min())
        i = np.arange(lo, m)[None, :]
        a = np.nan_to_num(alpha[start : start + step], nan=2.0)[:, None]
        valid = i >= k
        lr = np.where(valid, lx[None, lo:] - log_xmin[start : start + step][:, None], 0.0)
        model = -np.expm1((1.0 - a) * lr)  # 1 - (x / xmin)^(1 - alpha)
        n = (m - k).astype(np.float64)
        j = (i - k).astype(np.float64)
        d = np.maximum(np.abs((j + 1.0) / n - model), np.abs(j / n - model))
        out[start : start + step] = np.where(valid, d, 0.0).max(axis=1)
    return out


def decay_exponent(s: np.ndarray) -> float | None:
    """Slope ``a`` of the least-squares fit ``log s_i = c - a log i`` (needs >= 2 points).

    Args:
      s: positive singular values in descending order, shape ``(k,)``.

    Returns:
      The decay exponent ``a`` (float), or None when ``k < 2``. Cost ``O(k)``.
    """
    if s.size < 2:
        return None
    li = np.log(np.arange(1, s.size + 1, dtype=np.float64))
    ls = np.log(s)
    li_c = li - li.mean()
    return float(-np.dot(li_c, ls - ls.mean()) / np.dot(li_c, li_c))
