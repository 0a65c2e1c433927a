"""The analysis report's PNG figures, drawn from the report dict (they never measure).

Supported names: :func:`draw_report_figures`. Figures use the one figure helper of
:mod:`gradience_jax.plots.figure` (Agg canvas, one dpi; matplotlib imported on use) and
the weight-spectra figure of :mod:`gradience_jax.plots`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradience_jax.plots.figure import new_figure, save_figure

__all__ = ["draw_report_figures"]


def _fig_training(curve: np.ndarray, path: Path) -> None:
    fig = new_figure((5.5, 3.5))
    ax = fig.add_subplot()
    ax.semilogy(np.arange(1, len(curve) + 1), curve)
    ax.set(xlabel="step", ylabel="training loss", title="training (full-batch Adam)")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _fig_top_k(curv: Mapping[str, dict], path: Path) -> None:
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    fig = new_figure((10.0, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    for name, c in curv.items():
        lam = np.asarray(c["top_k"]["eigenvalues"], np.float64)
        res = np.asarray(c["top_k"]["ritz_residuals"], np.float64)
        idx = np.arange(1, len(lam) + 1)
        ax1.plot(idx, lam, "o-", label=name)
        ax2.semilogy(idx, np.maximum(res, 1e-300), "s-", label=name)
    ax1.set(xlabel="index i", ylabel="lambda_i", title="top-k eigenvalues (Lanczos)")
    ax2.set(xlabel="index i", ylabel="Ritz residual bound", title="convergence")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def _fig_density(density: dict, lam: Sequence[float], path: Path) -> None:
    fig = new_figure((6.0, 3.8))
    ax = fig.add_subplot()
    dens = np.asarray(density["density"], np.float64)
    floor = 1e-7 * max(float(np.max(dens)), 1e-300)
    ax.semilogy(density["grid"], np.maximum(dens, floor), color="C0")
    for v in lam:
        ax.axvline(v, color="C3", alpha=0.35, lw=0.8)
    ax.set(xlabel="eigenvalue", ylabel="density (log)",
           title=f"{density['operator']} spectral density (SLQ); red: top-k")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def _fig_landscape(land: dict, path: Path) -> None:
    fig = new_figure((5.5, 4.5))
    ax = fig.add_subplot()
    loss = np.asarray(land["loss"], np.float64)
    cs = ax.contourf(land["alphas"], land["betas"], loss.T, levels=25, cmap="viridis")
    ax.contour(land["alphas"], land["betas"], loss.T, levels=12, colors="k", linewidths=0.4)
    fig.colorbar(cs, ax=ax, label="loss")
    ax.plot([0], [0], "r*", ms=12)
    ax.set(xlabel="alpha (direction 1)", ylabel="beta (direction 2)",
           title="loss landscape, filter-normalised directions")
    save_figure(fig, path)


def draw_report_figures(out: Path, report: Mapping[str, Any], weight_report: Any,
                        curve: np.ndarray | None) -> dict[str, str]:
    """Draw the report's figures into ``out``.

    Args:
        out: the report folder (exists).
        report: the JSON-safe report dict (``curvature``, ``density``, ``landscape``).
        weight_report: the :class:`gradience_jax.WeightSpectraReport` (or None).
        curve: the training loss per step (or None).

    Returns:
        ``{figure key: file name}`` of what was drawn: ``training``, ``curvature_top_k``,
        ``spectral_density``, ``landscape_2d``, ``weight_spectra``.
    """
    from gradience_jax.plots import plot_layer_metrics  # noqa: PLC0415

    files = {}
    if curve is not None and len(curve):
        _fig_training(curve, out / "training.png")
        files["training"] = "training.png"
    if report.get("curvature"):
        _fig_top_k(report["curvature"], out / "curvature_top_k.png")
        files["curvature_top_k"] = "curvature_top_k.png"
    if report.get("density"):
        dens = report["density"]
        lam = report["curvature"][dens["operator"]]["top_k"]["eigenvalues"]
        _fig_density(dens, lam, out / "spectral_density.png")
        files["spectral_density"] = "spectral_density.png"
    if report.get("landscape"):
        _fig_landscape(report["landscape"], out / "landscape_2d.png")
        files["landscape_2d"] = "landscape_2d.png"
    if weight_report is not None and len(weight_report):
        plot_layer_metrics(weight_report, path=str(out / "weight_spectra.png"))
        files["weight_spectra"] = "weight_spectra.png"
    return files
