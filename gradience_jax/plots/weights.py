"""Figures of weight-matrix spectra (from ``weights`` results; matplotlib drawn lazily).

* ``plot_weight_esd``: the empirical spectral density of one layer on log-log axes, with
  the fitted power law ``p(lambda) ~ lambda^-alpha`` (above ``xmin``) and the fitted
  Marchenko-Pastur density overlaid, and the TW-corrected MP edge marked.
* ``plot_layer_metrics``: a layer-wise bar chart (one panel per metric, default alpha and
  effective rank), with the heuristic alpha ranges 2 and 6 marked.

Each function returns a ``matplotlib.figure.Figure`` drawn on an Agg canvas (no pyplot
state is touched, so notebooks keep their backend) and writes a PNG when given ``path``
(:func:`gradience_jax.plots.figure.save_figure`, one resolution for every figure).

Supported names: ``plot_weight_esd``, ``plot_layer_metrics``. (Formerly
``gradience_jax.plots_weights``, which still re-exports them.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gradience_jax.plots.figure import new_figure, save_figure
from gradience_jax.weights import (
    ALPHA_HEAVY,
    ALPHA_RANDOM,
    LayerSpectrum,
    layer_spectrum,
    marchenko_pastur_pdf,
)

__all__ = ["plot_layer_metrics", "plot_weight_esd"]


def plot_weight_esd(
    spectrum: Any,
    *,
    path: str | None = None,
    bins: int = 60,
    title: str | None = None,
    figsize: tuple[float, float] = (6.0, 4.2),
) -> Any:
    """Log-log histogram of one layer's ESD with the power-law and MP fits overlaid.

    The histogram is a density over the positive eigenvalues of ``W^T W / N`` (log-spaced
    bins). The power law is drawn for ``lambda >= xmin`` as
    ``(n_tail / n) (alpha - 1) / xmin (lambda / xmin)^-alpha`` (the tail's share of the
    density); the MP curve is ``marchenko_pastur_pdf`` with the fitted ``sigma^2``.

    Args:
      spectrum: a ``LayerSpectrum`` (or a 2-D array, analysed with ``layer_spectrum``).
      path: write a PNG there.
      bins: number of log-spaced histogram bins.
      title: axes title; default the layer path and alpha.
      figsize: figure size in inches.

    Returns:
      The ``matplotlib.figure.Figure`` (one axes).

    Raises:
      ValueError: if ``bins < 1``.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    ls = spectrum if isinstance(spectrum, LayerSpectrum) else layer_spectrum(spectrum)
    fig = new_figure(figsize)
    ax = fig.add_subplot(1, 1, 1)
    esd = np.asarray(ls.esd, dtype=np.float64)
    pos = esd[esd > max(ls.rank_tolerance, 0.0) ** 2 / ls.n_rows]
    pos = pos[pos > 0]
    name = ls.path or "matrix"
    if title is None:
        a = "n/a" if ls.alpha is None else f"{ls.alpha:.2f}"
        title = f"{name}: ESD, alpha = {a}"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(r"eigenvalue $\lambda$ of $W^TW/N$")
    ax.set_ylabel("density")
    if pos.size == 0:
        ax.text(
            0.5, 0.5, "no positive eigenvalues", ha="center", va="center", transform=ax.transAxes
        )
        save_figure(fig, path)
        return fig
    lo, hi = pos.min(), pos.max()
    if hi <= lo:
        lo, hi = lo / 1.5, hi * 1.5
    edges = np.logspace(math.log10(lo), math.log10(hi), bins + 1)
    edges[0], edges[-1] = lo * (1 - 1e-9), hi * (1 + 1e-9)
    ax.hist(
        pos,
        bins=edges,
        density=True,
        color="0.65",
        edgecolor="0.35",
        linewidth=0.4,
        label=f"ESD ({pos.size} eigenvalues)",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    if ls.mp_sigma2 > 0:
        grid = np.logspace(
            math.log10(max(ls.mp_lower, lo / 10) * 1.0001), math.log10(ls.mp_edge * 0.9999), 400
        )
        dens = marchenko_pastur_pdf(grid, ls.n_cols / ls.n_rows, ls.mp_sigma2)
        keep = dens > 0
        ax.plot(
            grid[keep],
            dens[keep],
            color="tab:blue",
            lw=1.6,
            label=rf"Marchenko-Pastur ($\sigma^2$={ls.mp_sigma2:.3g})",
        )
        ax.axvline(
            ls.mp_edge_tw,
            color="tab:blue",
            ls=":",
            lw=1.2,
            label=f"MP edge + TW ({ls.num_spikes} spikes)",
        )
    if ls.alpha is not None and ls.xmin is not None:
        x = np.logspace(math.log10(ls.xmin), math.log10(max(hi, ls.xmin * 1.01)), 200)
        frac = ls.num_tail / pos.size
        y = frac * (ls.alpha - 1.0) / ls.xmin * (x / ls.xmin) ** (-ls.alpha)
        ax.plot(x, y, color="tab:red", lw=1.8, label=rf"power law $\alpha$={ls.alpha:.2f}")
        ax.axvline(ls.xmin, color="tab:red", ls="--", lw=1.0, label=r"$x_{min}$")
    ax.legend(fontsize=7, loc="best")
    save_figure(fig, path)
    return fig


_LABELS = {
    "alpha": r"power-law $\alpha$",
    "effective_rank": "effective rank",
    "stable_rank": "stable rank",
    "weighted_alpha": r"$\alpha \log_{10}\sigma_{max}^2$",
    "weighted_alpha_normalized": r"$\alpha \log_{10}\lambda_{max}$",
    "numerical_rank": "numerical rank",
    "num_spikes": "spikes above MP edge",
}


def plot_layer_metrics(
    report: Mapping[str, LayerSpectrum],
    *,
    path: str | None = None,
    metrics: Sequence[str] = ("alpha", "effective_rank"),
    figsize: tuple[float, float] | None = None,
) -> Any:
    """Layer-wise bar chart of spectral metrics, one panel per metric, layers in order.

    The alpha panel shades the heuristic "typical trained" band ``2 <= alpha <= 6``; layers
    without a fitted alpha show "n/a". The effective-rank panel marks each layer's full rank
    ``min(shape)`` with a tick.

    Args:
      report: a ``WeightSpectraReport`` or any mapping ``path -> LayerSpectrum``.
      path: write a PNG there.
      metrics: ``LayerSpectrum`` attribute names (numeric).
      figsize: figure size; default grows with the number of layers.

    Returns:
      The ``matplotlib.figure.Figure`` (``len(metrics)`` axes).

    Raises:
      ValueError: empty report, no metrics, or a name that is not a numeric field.
    """
    names = list(report.keys())
    if not names:
        raise ValueError("report has no layers to plot")
    if not metrics:
        raise ValueError("metrics must name at least one LayerSpectrum field")
    first = report[names[0]]
    for m in metrics:
        if not hasattr(first, m) or isinstance(getattr(first, m), (str, np.ndarray)):
            raise ValueError(f"metric {m!r} is not a numeric LayerSpectrum field")
    if figsize is None:
        figsize = (max(6.0, 0.35 * len(names) + 2.0), 2.6 * len(metrics) + 1.2)
    fig = new_figure(figsize)
    axes = [fig.add_subplot(len(metrics), 1, i + 1) for i in range(len(metrics))]
    x = np.arange(len(names))
    for ax, m in zip(axes, metrics, strict=True):
        vals = [getattr(report[n], m) for n in names]
        ys = np.array([np.nan if v is None else float(v) for v in vals])
        ok = np.isfinite(ys)
        ax.bar(x[ok], ys[ok], color="tab:red" if m == "alpha" else "tab:green", width=0.7)
        for i in np.flatnonzero(~ok):
            ax.text(x[i], 0.0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        if m == "alpha":
            ax.axhspan(
                ALPHA_HEAVY, ALPHA_RANDOM, color="0.9", zorder=0, label="typical trained (2-6)"
            )
            ax.axhline(ALPHA_HEAVY, color="0.4", ls="--", lw=0.8)
            ax.axhline(ALPHA_RANDOM, color="0.4", ls="--", lw=0.8)
            ax.legend(fontsize=7, loc="upper right")
        if m in ("effective_rank", "stable_rank", "numerical_rank"):
            full = [report[n].n_cols for n in names]
            ax.scatter(x, full, marker="_", s=120, color="k", label="min(shape)")
            ax.legend(fontsize=7, loc="upper right")
        ax.set_ylabel(_LABELS.get(m, m), fontsize=9)
        ax.set_xticks(x)
        ax.set_xticklabels([])
        ax.set_xlim(-0.6, len(names) - 0.4)
    axes[-1].set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    axes[0].set_title("weight spectra by layer", fontsize=10)
    save_figure(fig, path)
    return fig
