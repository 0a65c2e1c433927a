"""Loss-landscape figures: contour / surface / slice building blocks and the two seed figures.

* ``landscape_contour``, ``landscape_surface``, ``slice_lines``: draw ``landscape.Slice2D``
  / ``Slice1D`` results on a given axes (non-finite values are masked, drawn as gaps).
* ``pseudo_spectral_analysis``: Hessian spectrum, 3-D loss surface on the top-2
  eigenvectors, contour of the trajectory's PCA plane with the trajectory, eigenvalue
  histogram, loss along principal curvature directions, training dynamics.
* ``sharp_vs_flat_minima``: train / test curves, generalisation gap, sharpness bars, mode
  connectivity (straight paths and a trained Bezier curve), a 3-D landscape per recipe.

The figures draw results of :mod:`gradience_jax.experiments.seed` and never train.

Supported names: ``landscape_contour``, ``landscape_surface``, ``slice_lines``,
``pseudo_spectral_analysis``, ``sharp_vs_flat_minima``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradience_jax.plots.figure import (
    RUN_COLORS,
    TITLE,
    new_figure,
    no_data,
    require_result,
    save_figure,
)

__all__ = [
    "landscape_contour",
    "landscape_surface",
    "pseudo_spectral_analysis",
    "sharp_vs_flat_minima",
    "slice_lines",
]


def _finite_range(z: np.ndarray, clip_percentile: float = 95.0) -> tuple[float, float] | None:
    finite = z[np.isfinite(z)]
    if finite.size == 0:
        return None
    lo, hi = float(finite.min()), float(np.percentile(finite, clip_percentile))
    if hi <= lo:
        hi = lo + max(abs(lo), 1.0) * 1e-6
    return lo, hi


def landscape_contour(
    slice2d: Any,
    ax: Any = None,
    *,
    trajectory: np.ndarray | None = None,
    levels: int = 25,
    cmap: str = "viridis",
    colorbar: bool = True,
    clip_percentile: float = 95.0,
    title: str | None = None,
) -> Any:
    """Filled contour of a ``Slice2D`` with the centre marked and an optional trajectory.

    Non-finite points are masked (gaps) and their share is printed; colours are clipped at
    the ``clip_percentile`` of the finite values (logarithmic levels for wide ranges).

    Args:
        slice2d: a ``landscape.Slice2D`` (or anything with ``alphas``, ``betas``, ``loss``).
        ax: the axes to draw on (default: a new figure's).
        trajectory: optional ``(T, 2)`` plane coordinates (e.g. ``TrajectoryPCA.coords``).
        levels: number of contour levels.
        cmap: colour map.
        colorbar: draw a colour bar.
        clip_percentile: upper colour limit as a percentile of the finite values.
        title: axes title.

    Returns:
        The axes.
    """
    if ax is None:
        ax = new_figure((5, 4)).add_subplot(1, 1, 1)
    z = np.asarray(slice2d.loss, np.float64).T  # rows: betas, cols: alphas
    rng = _finite_range(z, clip_percentile)
    if rng is None:
        no_data(ax)
    else:
        zm = np.ma.masked_invalid(np.minimum(z, rng[1]))
        norm = None
        if rng[0] > 0 and rng[1] / rng[0] > 30:  # wide range: logarithmic levels
            from matplotlib.colors import LogNorm  # noqa: PLC0415

            lv = np.geomspace(rng[0], rng[1], levels)
            norm = LogNorm(rng[0], rng[1])
        else:
            lv = np.linspace(rng[0], rng[1], levels)
        cs = ax.contourf(slice2d.alphas, slice2d.betas, zm, levels=lv, cmap=cmap, extend="max",
                         norm=norm)
        ax.contour(slice2d.alphas, slice2d.betas, zm, levels=lv[::3], colors="k",
                   linewidths=0.4, alpha=0.5)
        if colorbar:
            ax.figure.colorbar(cs, ax=ax, shrink=0.85, label="loss", ticks=lv[::4], format="%.3g")
    ax.plot([0], [0], marker="*", color="red", markersize=12, linestyle="none", label="solution")
    if trajectory is not None:
        tr = np.asarray(trajectory)
        ax.plot(tr[:, 0], tr[:, 1], "-o", color="white", markersize=2.5, linewidth=1.2,
                markeredgecolor="k", markeredgewidth=0.3, label="trajectory")
        ax.plot(tr[0, 0], tr[0, 1], "s", color="orange", markersize=6, label="start")
    frac = getattr(slice2d, "nonfinite_fraction", 0.0)
    if frac:
        ax.text(0.02, 0.02, f"{100 * frac:.0f}% non-finite (masked)", transform=ax.transAxes,
                fontsize=7, color="red")
    ax.legend(fontsize=7, loc="upper right")
    if title:
        ax.set_title(title, **TITLE)
    return ax


def landscape_surface(slice2d: Any, ax: Any, *, cmap: str = "viridis",
                      zlim: tuple[float, float] | None = None,
                      title: str | None = None) -> Any:
    """3-D surface of a ``Slice2D`` on a ``projection="3d"`` axes.

    Non-finite points and points above ``zlim`` are left as holes.

    Args:
        slice2d: a ``landscape.Slice2D``.
        ax: a 3-D axes.
        cmap: colour map.
        zlim: ``(low, high)`` (default: min to the 99th percentile of the finite values).
        title: axes title.

    Returns:
        The axes.
    """
    a, b = np.meshgrid(slice2d.alphas, slice2d.betas, indexing="ij")
    z = np.asarray(slice2d.loss, np.float64).copy()
    rng = zlim or _finite_range(z, 99.0)
    if rng is None:
        no_data(ax)
        return ax
    z[~np.isfinite(z) | (z > rng[1])] = np.nan
    ax.plot_surface(a, b, z, cmap=cmap, vmin=rng[0], vmax=rng[1], linewidth=0,
                    antialiased=True, rcount=60, ccount=60, alpha=0.95)
    ax.set_zlim(rng[0], rng[1])
    ax.set_xlabel(r"$\alpha$", fontsize=8, labelpad=-4)
    ax.set_ylabel(r"$\beta$", fontsize=8, labelpad=-4)
    ax.tick_params(labelsize=6, pad=-2)
    if title:
        ax.set_title(title, **TITLE)
    return ax


def slice_lines(slices: dict, ax: Any = None, *, title: str | None = None) -> Any:
    """Loss along 1-D slices on one axes.

    Args:
        slices: ``{label: Slice1D}``.
        ax: the axes to draw on (default: a new figure's).
        title: axes title.

    Returns:
        The axes.
    """
    if ax is None:
        ax = new_figure((5, 4)).add_subplot(1, 1, 1)
    for label, s in slices.items():
        ax.plot(s.alphas, s.loss, linewidth=2, label=label)
    ax.set_xlabel(r"step $\alpha$ along the direction")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, **TITLE)
    return ax


def pseudo_spectral_analysis(result: Any = None, *, path: str | None = None) -> Any:
    """Complete geometric analysis of the trained seed MLP (8 axes).

    2 x 3 panels + a colour bar and a twin axis: the Hessian spectrum, the 3-D loss surface
    on the top-2 eigenvectors, the trajectory's PCA plane, the eigenvalue histogram, the
    loss along principal curvature directions and the training dynamics.

    Args:
        result: a ``PseudoSpectralResult`` from
            :func:`gradience_jax.experiments.seed.pseudo_spectral_experiment` (required:
            figures never train).
        path: write a PNG there.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        TypeError: no ``result``.
    """
    result = require_result(result, "pseudo_spectral_analysis",
                            "gradience_jax.experiments.seed.pseudo_spectral_experiment")
    ev = np.sort(np.asarray(result.eigenvalues, np.float64))[::-1]
    fig = new_figure((16, 9.5))
    gs = fig.add_gridspec(2, 3)

    ax = fig.add_subplot(gs[0, 0])
    tol = 1e-6 * max(1.0, float(np.max(np.abs(ev))))
    colors = np.where(ev > tol, "steelblue", np.where(ev < -tol, "crimson", "0.6"))
    ax.bar(np.arange(ev.size), ev, color=colors)
    ax.axhline(0, color="k", linewidth=0.6)
    nonzero = np.abs(ev[ev != 0])
    ax.set_yscale("symlog", linthresh=max(1e-3, float(nonzero.min())) if nonzero.size else 1e-3)
    n_pos, n_neg = int(np.sum(ev > tol)), int(np.sum(ev < -tol))
    lam_pos = ev[ev > tol]
    cond = (lam_pos[0] / lam_pos[-1]) if lam_pos.size else float("nan")
    n_zero = ev.size - n_pos - n_neg
    ax.text(0.97, 0.97, f"positive: {n_pos}\nnegative: {n_neg}\nnear zero: {n_zero}"
            f"\ntrace: {ev.sum():.3g}\n" + r"$\lambda_{max}/\lambda_{min>0}$" + f": {cond:.3g}",
            transform=ax.transAxes, ha="right", va="top", fontsize=8,
            bbox=dict(boxstyle="round", facecolor="wheat", alpha=0.6))
    ax.set_xlabel("eigenvalue index (descending)")
    ax.set_ylabel("eigenvalue (symlog)")
    ax.set_title(f"Hessian eigenvalue spectrum ({result.n_params} parameters)", **TITLE)
    ax.grid(True, alpha=0.3)

    ax = fig.add_subplot(gs[0, 1], projection="3d")
    landscape_surface(result.surface, ax, title="3-D loss surface (top-2 Hessian eigenvectors)")
    ax.set_xlabel(r"$v_1$ ($\lambda_1$)", fontsize=8)
    ax.set_ylabel(r"$v_2$ ($\lambda_2$)", fontsize=8)

    ax = fig.add_subplot(gs[0, 2])
    ratio = result.pca.explained_variance_ratio
    landscape_contour(result.plane, ax, trajectory=result.pca.coords,
                      title="Contour in the trajectory's PCA plane")
    ax.set_xlabel(f"PC 1 ({100 * ratio[0]:.0f}% of the path's variance)")
    ax.set_ylabel(f"PC 2 ({100 * ratio[1]:.0f}%)")

    ax = fig.add_subplot(gs[1, 0])
    ax.hist(ev, bins=max(5, min(40, ev.size // 2)), color="coral", edgecolor="black", alpha=0.8)
    ax.axvline(0, color="r", linestyle="--", linewidth=1.5, label="zero")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("count")
    ax.set_title("Eigenvalue histogram", **TITLE)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)

    ax = fig.add_subplot(gs[1, 1])
    slice_lines(result.principal_slices, ax, title="Loss along principal curvature directions")

    ax = fig.add_subplot(gs[1, 2])
    h = result.history
    ax.plot(h["steps"], h["loss"], color="tab:blue", linewidth=2, label="loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (log)", color="tab:blue")
    ax.grid(True, alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(h["steps"], h["lambda_max"], "r-o", markersize=3, label=r"$\lambda_{max}$")
    ax2.plot(h["steps"], h["lambda_min"], "g-s", markersize=3, label=r"$\lambda_{min}$")
    ax2.axhline(0, color="k", linewidth=0.5, alpha=0.5)
    ax2.set_ylabel("Hessian eigenvalue")
    lines = ax.get_lines()[:1] + ax2.get_lines()[:2]
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="center right")
    ax.set_title("Training dynamics: loss and extreme curvature", **TITLE)
    fig.suptitle("Pseudo-spectral analysis of the seed 2-3-1 sigmoid MLP", fontsize=13,
                 fontweight="bold")
    save_figure(fig, path)
    return fig


def sharp_vs_flat_minima(result: Any = None, *, path: str | None = None) -> Any:
    """Compare training recipes (``4 + len(result.runs)`` axes).

    Train / test curves, generalisation gap, sharpness bars, mode connectivity, and a 3-D
    landscape (filter-normalised directions, shared scale) per recipe.

    Args:
        result: a ``SharpFlatResult`` from
            :func:`gradience_jax.experiments.seed.sharp_vs_flat_experiment` (required:
            figures never train).
        path: write a PNG there.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        TypeError: no ``result``.
    """
    result = require_result(result, "sharp_vs_flat_minima",
                            "gradience_jax.experiments.seed.sharp_vs_flat_experiment")
    runs = list(result.runs.values())
    color = {r.name: RUN_COLORS[i % len(RUN_COLORS)] for i, r in enumerate(runs)}
    ncols = max(4, len(runs))
    fig = new_figure((4.3 * ncols, 9.0))
    gs = fig.add_gridspec(2, ncols, height_ratios=[1.0, 1.15])

    ax = fig.add_subplot(gs[0, 0])
    for r in runs:
        ax.plot(r.train.steps, r.train.train_loss, color=color[r.name], linewidth=1.8,
                label=r.label)
        if r.train.eval_loss is not None:
            ax.plot(r.train.steps, r.train.eval_loss, color=color[r.name], linewidth=1.2,
                    linestyle="--")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (solid: train, dashed: test)")
    ax.set_title("Training curves", **TITLE)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)

    ax = fig.add_subplot(gs[0, 1])
    for r in runs:
        if r.train.eval_loss is not None:
            ax.plot(r.train.steps, r.train.eval_loss - r.train.train_loss, color=color[r.name],
                    linewidth=1.8, label=f"{r.label}: final test {r.train.eval_loss[-1]:.3g}")
    ax.axhline(0, color="k", linewidth=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("test loss - train loss")
    ax.set_title("Generalisation gap", **TITLE)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)

    ax = fig.add_subplot(gs[0, 2])
    metrics = [("lambda_max", r"$\lambda_{max}$"), ("trace", "tr H"),
               ("epsilon_sharpness", r"$\epsilon$-sharpness"),
               ("adaptive_sharpness", "adaptive")]
    width = 0.8 / len(runs)
    x = np.arange(len(metrics))
    for i, r in enumerate(runs):
        vals = np.array([getattr(r.sharpness, m) for m, _ in metrics], np.float64)
        top = np.array([max(abs(getattr(q.sharpness, m)) for q in runs) for m, _ in metrics])
        rel = np.where(top > 0, vals / np.where(top > 0, top, 1.0), 0.0)
        bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, rel, width, color=color[r.name],
                      label=r.label)
        for bar, v in zip(bars, vals):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{v:.3g}",
                    ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xticks(x, [lab for _, lab in metrics], fontsize=8)
    ax.set_ylim(0, 1.35)
    ax.set_ylabel("relative to the sharpest run")
    ax.set_title("Sharpness (lower = flatter)", **TITLE)
    ax.legend(fontsize=6, loc="upper right", ncol=2)
    ax.grid(True, axis="y", alpha=0.3)

    ax = fig.add_subplot(gs[0, 3])
    for (a, b), it in result.barriers.items():
        ax.plot(it.ts, it.loss, linewidth=1.4,
                label=f"{result.runs[a].label} -> {result.runs[b].label}: {it.barrier:.3g}")
    if result.bezier is not None:
        names = list(result.runs)
        ax.plot(result.bezier.ts, result.bezier.loss, "k--", linewidth=2,
                label=f"Bezier {result.runs[names[0]].label} -> {result.runs[names[1]].label}: "
                      f"{result.bezier.barrier:.3g}")
    ax.set_xlabel("t along the path")
    ax.set_ylabel("training loss")
    ax.set_title("Mode connectivity (legend: barrier)", **TITLE)
    ax.legend(fontsize=5.5)
    ax.grid(True, alpha=0.3)

    finite = np.concatenate([r.landscape.loss[np.isfinite(r.landscape.loss)] for r in runs])
    zlim = (float(finite.min()), float(np.percentile(finite, 99))) if finite.size else None
    for i, r in enumerate(runs):
        ax = fig.add_subplot(gs[1, i], projection="3d")
        landscape_surface(r.landscape, ax, zlim=zlim, cmap="viridis",
                          title=f"{r.label}\n" + r"$\lambda_{max}$"
                          + f"={r.sharpness.lambda_max:.3g}, train loss {r.sharpness.loss:.3g}")
        ax.set_zlabel("loss", fontsize=7)
    fig.suptitle("Sharp vs flat minima (same model and initialisation, different training recipes)",
                 fontsize=13, fontweight="bold")
    save_figure(fig, path)
    return fig

