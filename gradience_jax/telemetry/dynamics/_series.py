"""Series checks and preprocessing shared by the dynamics statistics (NumPy only).

Validation (:func:`_as_series`, :func:`_check_int`, ...), the gap policy of the lag-based
statistics (trim leading / trailing non-finite values, fill interior gaps linearly; see
:mod:`gradience_jax.telemetry.dynamics`) and :func:`phase_randomized_surrogates`, the null
model of the significance tests of :func:`~.autocorrelation.precursor_trend` and
:func:`~.coupling.lead_lag`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["phase_randomized_surrogates"]


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
