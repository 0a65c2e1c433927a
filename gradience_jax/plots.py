"""The four seed figures (matplotlib, Agg canvas; matplotlib is imported only here).

Each figure is one call that returns a ``matplotlib.figure.Figure`` and writes a PNG when
given ``path``. It draws from an experiment result (``landscape.pseudo_spectral_experiment``,
``landscape.sharp_vs_flat_experiment``, ``attention.attention_geometry_experiment``,
``attention.attention_dynamics_experiment``); without one it runs the experiment with its
small defaults (keyword arguments are forwarded), a few seconds to a minute on a CPU.

* ``pseudo_spectral_analysis``: Hessian spectrum, 3-D loss surface on the top-2
  eigenvectors, contour of the trajectory's PCA plane with the trajectory, eigenvalue
  histogram, loss along principal curvature directions, training dynamics.
* ``sharp_vs_flat_minima``: train / test curves, generalisation gap, sharpness bars, mode
  connectivity (straight paths and a trained Bezier curve), a 3-D landscape per recipe.
* ``attention_geometry``: attention maps, singular values of W_Q/W_K/W_V/W_O and of the QK /
  OV circuits, entropy, Hessian eigenvalues of the block, query correlation, value norms,
  loss landscape in the attention parameters.
* ``attention_training_dynamics``: loss, effective rank and entropy of the attention maps,
  and the maps before / after training.

Figures are drawn on an Agg canvas without touching pyplot's global state, so notebooks keep
their backend. Non-finite landscape values are masked (drawn as gaps), never fatal.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

__all__ = [
    "attention_geometry",
    "attention_training_dynamics",
    "landscape_contour",
    "landscape_surface",
    "pseudo_spectral_analysis",
    "sharp_vs_flat_minima",
    "slice_lines",
]

_TITLE = dict(fontsize=10, fontweight="bold")


def _new_figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Optional[str], dpi: int = 110) -> None:
    if path is not None:
        directory = os.path.dirname(os.fspath(path))
        if directory:
            os.makedirs(directory, exist_ok=True)
        fig.savefig(path, dpi=dpi)


def _finite_range(z: np.ndarray, clip_percentile: float = 95.0) -> Optional[tuple[float, float]]:
    finite = z[np.isfinite(z)]
    if finite.size == 0:
        return None
    lo, hi = float(finite.min()), float(np.percentile(finite, clip_percentile))
    if hi <= lo:
        hi = lo + max(abs(lo), 1.0) * 1e-6
    return lo, hi


def _no_data(ax: Any, what: str = "no finite values") -> None:
    text = getattr(ax, "text2D", ax.text)  # 3-D axes place 2-D text with text2D
    text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="0.4")


# =========================================================================================
# building blocks
# =========================================================================================


def landscape_contour(
    slice2d: Any,
    ax: Any = None,
    *,
    trajectory: Optional[np.ndarray] = None,
    levels: int = 25,
    cmap: str = "viridis",
    colorbar: bool = True,
    clip_percentile: float = 95.0,
    title: Optional[str] = None,
) -> Any:
    """Filled contour of a ``Slice2D`` (non-finite points masked; colours clipped at the
    ``clip_percentile`` of the finite values), the centre marked, optionally a trajectory
    ``(T, 2)`` of plane coordinates. Returns the axes (a new figure's if ``ax`` is None)."""
    if ax is None:
        ax = _new_figure((5, 4)).add_subplot(1, 1, 1)
    z = np.asarray(slice2d.loss, np.float64).T  # rows: betas, cols: alphas
    rng = _finite_range(z, clip_percentile)
    if rng is None:
        _no_data(ax)
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
        ax.set_title(title, **_TITLE)
    return ax


def landscape_surface(slice2d: Any, ax: Any, *, cmap: str = "viridis",
                      zlim: Optional[tuple[float, float]] = None,
                      title: Optional[str] = None) -> Any:
    """3-D surface of a ``Slice2D`` on a ``projection="3d"`` axes (non-finite points and
    points above ``zlim`` are left as holes)."""
    a, b = np.meshgrid(slice2d.alphas, slice2d.betas, indexing="ij")
    z = np.asarray(slice2d.loss, np.float64).copy()
    rng = zlim or _finite_range(z, 99.0)
    if rng is None:
        _no_data(ax)
        return ax
    z[~np.isfinite(z) | (z > rng[1])] = np.nan
    ax.plot_surface(a, b, z, cmap=cmap, vmin=rng[0], vmax=rng[1], linewidth=0,
                    antialiased=True, rcount=60, ccount=60, alpha=0.95)
    ax.set_zlim(rng[0], rng[1])
    ax.set_xlabel(r"$\alpha$", fontsize=8, labelpad=-4)
    ax.set_ylabel(r"$\beta$", fontsize=8, labelpad=-4)
    ax.tick_params(labelsize=6, pad=-2)
    if title:
        ax.set_title(title, **_TITLE)
    return ax


def slice_lines(slices: dict, ax: Any = None, *, title: Optional[str] = None) -> Any:
    """Loss along 1-D slices ``{label: Slice1D}`` on one axes."""
    if ax is None:
        ax = _new_figure((5, 4)).add_subplot(1, 1, 1)
    for label, s in slices.items():
        ax.plot(s.alphas, s.loss, linewidth=2, label=label)
    ax.set_xlabel(r"step $\alpha$ along the direction")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, **_TITLE)
    return ax


# =========================================================================================
# figure 1: pseudo-spectral analysis
# =========================================================================================


def pseudo_spectral_analysis(result: Any = None, *, path: Optional[str] = None,
                             key: Any = None, **experiment_kwargs: Any) -> Any:
    """Complete geometric analysis of the trained seed MLP (2 x 3 panels + colour bar and a
    twin axis: 8 axes).

    Args:
        result: a ``landscape.PseudoSpectralResult``; None runs
            ``landscape.pseudo_spectral_experiment(key, **experiment_kwargs)``.
        path: write a PNG there.
    """
    if result is None:
        from gradience_jax.landscape import pseudo_spectral_experiment  # noqa: PLC0415

        result = pseudo_spectral_experiment(key, **experiment_kwargs)
    ev = np.sort(np.asarray(result.eigenvalues, np.float64))[::-1]
    fig = _new_figure((16, 9.5))
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
    ax.text(0.97, 0.97, f"positive: {n_pos}\nnegative: {n_neg}\nnear zero: {ev.size - n_pos - n_neg}"
            f"\ntrace: {ev.sum():.3g}\n" + r"$\lambda_{max}/\lambda_{min>0}$" + f": {cond:.3g}",
            transform=ax.transAxes, ha="right", va="top", fontsize=8,
            bbox=dict(boxstyle="round", facecolor="wheat", alpha=0.6))
    ax.set_xlabel("eigenvalue index (descending)")
    ax.set_ylabel("eigenvalue (symlog)")
    ax.set_title(f"Hessian eigenvalue spectrum ({result.n_params} parameters)", **_TITLE)
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
    ax.set_title("Eigenvalue histogram", **_TITLE)
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
    ax.set_title("Training dynamics: loss and extreme curvature", **_TITLE)
    fig.suptitle("Pseudo-spectral analysis of the seed 2-3-1 sigmoid MLP", fontsize=13,
                 fontweight="bold")
    _save(fig, path)
    return fig


# =========================================================================================
# figure 2: sharp vs flat minima
# =========================================================================================

_RUN_COLORS = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown"]


def sharp_vs_flat_minima(result: Any = None, *, path: Optional[str] = None,
                         key: Any = None, **experiment_kwargs: Any) -> Any:
    """Compare training recipes: train / test curves, generalisation gap, sharpness bars,
    mode connectivity, and a 3-D landscape (filter-normalised directions, shared scale) per
    recipe. ``4 + len(result.runs)`` axes.

    Args:
        result: a ``landscape.SharpFlatResult``; None runs
            ``landscape.sharp_vs_flat_experiment(key, **experiment_kwargs)``.
        path: write a PNG there.
    """
    if result is None:
        from gradience_jax.landscape import sharp_vs_flat_experiment  # noqa: PLC0415

        result = sharp_vs_flat_experiment(key, **experiment_kwargs)
    runs = list(result.runs.values())
    color = {r.name: _RUN_COLORS[i % len(_RUN_COLORS)] for i, r in enumerate(runs)}
    ncols = max(4, len(runs))
    fig = _new_figure((4.3 * ncols, 9.0))
    gs = fig.add_gridspec(2, ncols, height_ratios=[1.0, 1.15])

    ax = fig.add_subplot(gs[0, 0])
    for r in runs:
        ax.plot(r.train.steps, r.train.train_loss, color=color[r.name], linewidth=1.8, label=r.label)
        if r.train.eval_loss is not None:
            ax.plot(r.train.steps, r.train.eval_loss, color=color[r.name], linewidth=1.2,
                    linestyle="--")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (solid: train, dashed: test)")
    ax.set_title("Training curves", **_TITLE)
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
    ax.set_title("Generalisation gap", **_TITLE)
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
    ax.set_title("Sharpness (lower = flatter)", **_TITLE)
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
    ax.set_title("Mode connectivity (legend: barrier)", **_TITLE)
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
    _save(fig, path)
    return fig


# =========================================================================================
# figure 3: attention geometry
# =========================================================================================


def _concat_heads(maps: np.ndarray) -> tuple[np.ndarray, int]:
    """``(H, T, S)`` maps side by side with a NaN column between heads."""
    h, t, s = maps.shape
    gap = np.full((t, 1), np.nan)
    parts = []
    for i in range(h):
        parts += [maps[i], gap] if i < h - 1 else [maps[i]]
    return np.concatenate(parts, axis=1), s


def _draw_maps(ax: Any, maps: np.ndarray, title: str, annotate: bool = True) -> None:
    img, s = _concat_heads(np.asarray(maps, np.float64))
    ax.imshow(np.ma.masked_invalid(img), cmap="YlOrRd", vmin=0, vmax=1, aspect="auto")
    h, t = maps.shape[0], maps.shape[1]
    if annotate and t * s * h <= 96:
        for i in range(t):
            for j in range(img.shape[1]):
                if np.isfinite(img[i, j]):
                    ax.text(j, i, f"{img[i, j]:.2f}", ha="center", va="center", fontsize=6)
    ax.set_xticks([k * (s + 1) + (s - 1) / 2 for k in range(h)], [f"head {k}" for k in range(h)])
    ax.set_xlabel("key position (one block per head)")
    ax.set_yticks(range(t))
    ax.set_ylabel("query position")
    ax.set_title(title, **_TITLE)


def attention_geometry(result: Any = None, *, path: Optional[str] = None,
                       key: Any = None, **experiment_kwargs: Any) -> Any:
    """Geometric properties of a trained attention block (2 x 4 panels + one colour bar:
    9 axes).

    Args:
        result: an ``attention.AttentionGeometryResult``; None runs
            ``attention.attention_geometry_experiment(key, **experiment_kwargs)``.
        path: write a PNG there.
    """
    if result is None:
        from gradience_jax.attention import attention_geometry_experiment  # noqa: PLC0415

        result = attention_geometry_experiment(key, **experiment_kwargs)
    g = result.geometry
    fig = _new_figure((19, 9))
    gs = fig.add_gridspec(2, 4)
    heads = np.arange(g.num_heads)
    hcolors = [_RUN_COLORS[i % len(_RUN_COLORS)] for i in heads]

    ax = fig.add_subplot(gs[0, 0])
    _draw_maps(ax, g.weights[0], "Attention weights (first sequence)")

    ax = fig.add_subplot(gs[0, 1])
    styles = ["-", "--", ":", "-."]
    mcolors = {"query": "tab:blue", "key": "tab:orange", "value": "tab:green", "out": "tab:red"}
    for name, col in mcolors.items():
        for h in heads:
            s = g.svd.singular_values[name][h]
            ax.plot(np.arange(1, s.size + 1), s, styles[h % 4], marker="o", markersize=3,
                    color=col, label=f"W_{name[0].upper()} head {h}" if g.num_heads <= 4 else None)
    ax.set_xlabel("singular value index")
    ax.set_ylabel("singular value")
    ax.set_title("Singular values of W_Q, W_K, W_V, W_O per head", **_TITLE)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(True, alpha=0.3)

    ax = fig.add_subplot(gs[0, 2])
    for name, col in (("qk", "tab:purple"), ("ov", "tab:brown")):
        for h in heads:
            s = g.svd.singular_values[name][h]
            er = g.svd.effective_rank[name][h]
            ax.semilogy(np.arange(1, s.size + 1), np.maximum(s, 1e-12), styles[h % 4], marker="s",
                        markersize=3, color=col,
                        label=f"{'W_Q W_K^T' if name == 'qk' else 'W_V W_O'} head {h} "
                              f"(erank {er:.2f})")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("singular value (log)")
    ax.set_title("QK and OV circuits (low-rank structure)", **_TITLE)
    ax.legend(fontsize=6)
    ax.grid(True, alpha=0.3, which="both")

    ax = fig.add_subplot(gs[0, 3])
    seq = g.weights.shape[-1]
    ax.bar(heads - 0.2, g.entropy, 0.4, color=hcolors, label="entropy (nats)")
    ax.bar(heads + 0.2, g.effective_rank, 0.4, color=hcolors, alpha=0.45, hatch="//",
           label="effective rank of maps")
    ax.axhline(np.log(seq), color="k", linestyle="--", linewidth=1,
               label=f"log T = {np.log(seq):.2f}")
    for h in heads:
        ax.text(h - 0.2, g.entropy[h], f"{g.normalized_entropy[h]:.2f}", ha="center",
                va="bottom", fontsize=7)
    ax.set_xticks(heads, [f"head {h}" for h in heads])
    ax.set_ylim(0, 1.3 * max(float(np.max(g.effective_rank)), float(np.log(seq)), 1e-3))
    ax.set_title("Attention entropy (label: normalised) and rank", **_TITLE)
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)

    ax = fig.add_subplot(gs[1, 0])
    if g.hessian_eigenvalues is not None and len(g.hessian_eigenvalues):
        hev = np.asarray(g.hessian_eigenvalues)
        ax.plot(np.arange(hev.size), hev, "o-", markersize=2.5, color="purple")
        ax.axhline(0, color="k", linewidth=0.6)
        pos = np.abs(hev[hev != 0])
        thresh = float(np.percentile(pos, 50)) if pos.size else 1e-3
        ax.set_yscale("symlog", linthresh=max(thresh, 1e-6))
        ax.text(0.97, 0.97, f"{hev.size} attention parameters\n" + r"$\lambda_{max}$" +
                f" = {hev[0]:.3g}\nnegative: {int(np.sum(hev < 0))}", transform=ax.transAxes,
                ha="right", va="top", fontsize=8,
                bbox=dict(boxstyle="round", facecolor="wheat", alpha=0.6))
    else:
        _no_data(ax, "no Hessian computed")
    ax.set_xlabel("eigenvalue index (descending)")
    ax.set_ylabel("eigenvalue (symlog)")
    ax.set_title("Hessian eigenvalues (attention parameters)", **_TITLE)
    ax.grid(True, alpha=0.3)

    ax = fig.add_subplot(gs[1, 1])
    qc = g.query_correlation
    ax.imshow(qc, cmap="RdBu_r", vmin=-1, vmax=1)
    for h in range(1, g.num_heads):
        ax.axhline(h * g.head_dim - 0.5, color="k", linewidth=1)
        ax.axvline(h * g.head_dim - 0.5, color="k", linewidth=1)
    off = np.abs(qc[~np.eye(qc.shape[0], dtype=bool)])
    ax.set_xlabel("query feature (head-major)")
    ax.set_ylabel("query feature")
    ax.set_title(f"Query correlation (mean |off-diag| {off.mean() if off.size else 0:.2f})", **_TITLE)

    ax = fig.add_subplot(gs[1, 2])
    vn = g.value_norms  # (H, S)
    pos = np.arange(vn.shape[1])
    w = 0.8 / g.num_heads
    for h in heads:
        ax.bar(pos + (h - (g.num_heads - 1) / 2) * w, vn[h], w, color=hcolors[h], label=f"head {h}")
    ax.set_xlabel("key position")
    ax.set_ylabel(r"mean $\|v\|$")
    ax.set_title("Value-vector norms", **_TITLE)
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)

    ax = fig.add_subplot(gs[1, 3])
    landscape_contour(result.landscape, ax, title="Loss landscape (attention parameters)")
    ax.set_xlabel(r"$\alpha$ (filter-normalised)")
    ax.set_ylabel(r"$\beta$")
    cfg = result.config
    fig.suptitle(f"Attention geometry: d_model {cfg.get('d_model')}, {g.num_heads} heads, "
                 f"sequence length {cfg.get('seq_len')} (trained one-block causal LM)",
                 fontsize=13, fontweight="bold")
    _save(fig, path)
    return fig


# =========================================================================================
# figure 4: attention training dynamics
# =========================================================================================


def attention_training_dynamics(result: Any = None, *, path: Optional[str] = None,
                                key: Any = None, **experiment_kwargs: Any) -> Any:
    """How attention evolves during training (2 x 3 panels: 6 axes): loss, effective rank
    and entropy of the attention maps per head, effective rank of ``W_Q W_K^T``, and the
    maps of one held-out sequence before and after training.

    Args:
        result: an ``attention.AttentionDynamicsResult``; None runs
            ``attention.attention_dynamics_experiment(key, **experiment_kwargs)``.
        path: write a PNG there.
    """
    if result is None:
        from gradience_jax.attention import attention_dynamics_experiment  # noqa: PLC0415

        result = attention_dynamics_experiment(key, **experiment_kwargs)
    r = result
    steps = r.steps
    nh = r.entropy.shape[1]
    seq = r.weights_last.shape[-1]
    fig = _new_figure((16, 9))
    gs = fig.add_gridspec(2, 3)

    ax = fig.add_subplot(gs[0, 0])
    ax.plot(steps, r.train_loss, linewidth=2, label="train")
    if r.eval_loss is not None:
        ax.plot(steps, r.eval_loss, linewidth=2, linestyle="--", label="held out")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (log)")
    ax.set_title("Loss", **_TITLE)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)

    ax = fig.add_subplot(gs[0, 1])
    for h in range(nh):
        ax.plot(steps, r.effective_rank[:, h], linewidth=2, color=_RUN_COLORS[h % 6],
                label=f"head {h}")
    ax.axhline(seq, color="k", linestyle=":", linewidth=1, label=f"T = {seq}")
    ax.set_xlabel("step")
    ax.set_ylabel("effective rank of the T x T maps")
    ax.set_title("Effective rank of attention maps", **_TITLE)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)

    ax = fig.add_subplot(gs[0, 2])
    for h in range(nh):
        ax.plot(steps, r.normalized_entropy[:, h], linewidth=2, color=_RUN_COLORS[h % 6],
                label=f"head {h}")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("entropy / log(#visible keys)")
    ax.set_title("Normalised attention entropy (1 = uniform)", **_TITLE)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)

    _draw_maps(fig.add_subplot(gs[1, 0]), r.weights_first, f"Attention at step {steps[0]}",
               annotate=False)
    _draw_maps(fig.add_subplot(gs[1, 1]), r.weights_last, f"Attention at step {steps[-1]}",
               annotate=False)

    ax = fig.add_subplot(gs[1, 2])
    for h in range(nh):
        ax.plot(steps, r.qk_effective_rank[:, h], linewidth=2, color=_RUN_COLORS[h % 6],
                label=f"head {h}")
    ax.set_xlabel("step")
    ax.set_ylabel("effective rank")
    ax.set_title(r"Effective rank of $W_Q W_K^T$", **_TITLE)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    cfg = r.config
    task = {"copy_first": "task: predict the first token", "progression":
            "task: next token of arithmetic progressions"}.get(cfg.get("task"), "")
    fig.suptitle(f"Attention training dynamics: d_model {cfg.get('d_model')}, {nh} heads, "
                 f"sequence length {seq}" + (f" ({task})" if task else ""), fontsize=13,
                 fontweight="bold")
    _save(fig, path)
    return fig
