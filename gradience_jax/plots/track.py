"""Figures of a ``track`` run: curvature and weight metrics over the checkpoints' steps.

Drawn from the summary of :func:`gradience_jax.app.track.track` (they never measure), with
the figure helper of :mod:`gradience_jax.plots.figure`.

Supported names: :func:`draw_track_figures`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gradience_jax.plots.figure import TITLE, new_figure, no_data, save_figure

__all__ = ["draw_track_figures"]

_WEIGHT_PANELS = (("weights/mean_alpha", "mean alpha"),
                  ("weights/weighted_alpha", "weighted alpha"),
                  ("weights/mean_effective_rank", "mean effective rank"),
                  ("weights/mean_stable_rank", "mean stable rank"))


def _series(cols: Mapping[str, list], key: str) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in cols.get(key, [])], np.float64)


def _operators(cols: Mapping[str, list]) -> list[str]:
    ops = []
    for k in cols:
        m = re.fullmatch(r"(.+)/lambda_1", k)
        if m:
            ops.append(m.group(1))
    return ops


def _curvature(steps: np.ndarray, cols: Mapping[str, list], path: Path) -> None:
    ops = _operators(cols)
    fig = new_figure((11.0, 3.6 * len(ops)))
    axes = np.atleast_2d(fig.subplots(len(ops), 3, squeeze=False))
    for row, op in zip(axes, ops):
        ax1, ax2, ax3 = row
        i = 1
        while f"{op}/lambda_{i}" in cols:
            ax1.plot(steps, _series(cols, f"{op}/lambda_{i}"), "o-", ms=3, label=f"lambda_{i}")
            i += 1
        ax1.set(xlabel="step", ylabel="eigenvalue")
        ax1.set_title(f"{op}: top-{i - 1} eigenvalues", **TITLE)
        ax1.legend(fontsize=7)
        tr, se = _series(cols, f"{op}/trace"), _series(cols, f"{op}/trace_stderr")
        if np.isfinite(tr).any():
            ax2.errorbar(steps, tr, yerr=np.nan_to_num(se), fmt="s-", ms=3, capsize=2)
        else:
            no_data(ax2, "no trace measured")
        ax2.set(xlabel="step", ylabel="trace (Hutchinson)")
        ax2.set_title(f"{op}: trace +- stderr", **TITLE)
        ax3.bar([str(int(x)) for x in steps], _series(cols, f"{op}/matvecs"), color="tab:gray")
        ax3.set(xlabel="step", ylabel="matvecs")
        ax3.set_title(f"{op}: Lanczos matvecs (warm starts)", **TITLE)
        ax3.tick_params(axis="x", labelrotation=45, labelsize=7)
        for ax in row:
            ax.grid(alpha=0.3)
    save_figure(fig, path)


def _weights(steps: np.ndarray, cols: Mapping[str, list], path: Path) -> None:
    fig = new_figure((9.0, 6.0))
    axes = fig.subplots(2, 2).ravel()
    for ax, (key, label) in zip(axes, _WEIGHT_PANELS):
        y = _series(cols, key)
        if np.isfinite(y).any():
            ax.plot(steps, y, "o-", ms=3, color="tab:purple")
        else:
            no_data(ax)
        ax.set(xlabel="step", ylabel=label)
        ax.set_title(label, **TITLE)
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def _loss(steps: np.ndarray, cols: Mapping[str, list], path: Path) -> None:
    fig = new_figure((5.5, 3.5))
    ax = fig.add_subplot()
    y = _series(cols, "loss")
    ax.plot(steps, y, "o-", ms=3)
    if np.all(y[np.isfinite(y)] > 0):
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="loss (measurement batch)")
    ax.set_title("loss at each checkpoint", **TITLE)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def draw_track_figures(out: Path, summary: Mapping[str, Any]) -> dict[str, str]:
    """Draw a track run's figures into ``out``.

    Args:
        out: the output folder (exists).
        summary: the track summary (``steps``, ``columns``).

    Returns:
        ``{figure key: file name}`` of what was drawn: ``track_curvature`` (per operator:
        top-k eigenvalues, trace with standard error, matvecs per step), ``track_weights``
        (mean / weighted alpha, effective and stable rank), ``track_loss``.
    """
    out = Path(out)
    steps = np.asarray(summary["steps"], np.float64)
    cols = summary["columns"]
    files = {}
    if _operators(cols):
        _curvature(steps, cols, out / "track_curvature.png")
        files["track_curvature"] = "track_curvature.png"
    if any(k in cols for k, _ in _WEIGHT_PANELS):
        _weights(steps, cols, out / "track_weights.png")
        files["track_weights"] = "track_weights.png"
    if np.isfinite(_series(cols, "loss")).any():
        _loss(steps, cols, out / "track_loss.png")
        files["track_loss"] = "track_loss.png"
    return files
