"""Reading the protocols' telemetry columns (``telemetry.to_columns`` output).

Supported names: :func:`series`, :func:`layer_keys`, :func:`short_name`,
:func:`diverged_at`. Pure NumPy; the protocols' statistics and figures share them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["diverged_at", "layer_keys", "series", "short_name"]


def series(columns: Mapping[str, np.ndarray], key: str) -> tuple[np.ndarray, np.ndarray]:
    """One metric at the steps where it was measured.

    Args:
        columns: telemetry columns (``"step"`` plus one array per metric, NaN where the
            metric was not measured).
        key: the metric.

    Returns:
        ``(steps, values)`` as float64 values, rows that are all-NaN dropped; two empty
        arrays when ``key`` is absent. A metric with trailing axes (e.g. ``(T, k)``) keeps
        them.
    """
    if key not in columns:
        return np.zeros(0, np.int64), np.zeros(0)
    v = np.asarray(columns[key], np.float64)
    keep = ~np.isnan(v) if v.ndim == 1 else ~np.all(np.isnan(v), axis=tuple(range(1, v.ndim)))
    return columns["step"][keep], v[keep]


def layer_keys(columns: Mapping[str, Any], prefix: str, suffix: str) -> list[str]:
    """Column names that start with ``prefix`` and end with ``suffix``, in column order.

    E.g. ``layer_keys(columns, "weights/", "stable_rank")``: every layer's stable rank.

    Args:
        columns: the telemetry columns (``{name: array}``).
        prefix: the start of the wanted names.
        suffix: the end of the wanted names.

    Returns:
        The matching column names.
    """
    return [k for k in columns if k.startswith(prefix) and k.endswith(suffix)]


def short_name(key: str) -> str:
    """A layer's short name from a metric key.

    ``weights/layers/0/kernel/spectral_norm`` -> ``layers/0``: the first (metric group) and
    last (metric) parts and the ``kernel`` / ``embedding`` leaf names are dropped.

    Args:
        key: a ``"/"``-joined metric key.

    Returns:
        The layer path, or ``key`` itself when nothing is left.
    """
    parts = key.split("/")
    parts = [p for p in parts[1:-1] if p not in ("kernel", "embedding")]
    return "/".join(parts) or key


def diverged_at(columns: Mapping[str, np.ndarray], steps: int, key: str = "loss") -> int | None:
    """First training step whose loss is not finite.

    Args:
        columns: telemetry columns with ``"step"`` and ``key``.
        steps: training steps of the run (records at ``step >= steps``, such as the final
            parameters' host metrics, are ignored).
        key: the loss column.

    Returns:
        The step, or None when the loss stayed finite.
    """
    train = np.asarray(columns["step"]) < steps
    loss = np.asarray(columns[key], np.float64)[train]
    bad = np.flatnonzero(~np.isfinite(loss))
    return int(np.asarray(columns["step"])[train][bad[0]]) if bad.size else None
