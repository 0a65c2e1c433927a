"""Figures of Protocols A-D, drawn from their results (they never train).

Supported names: :func:`plot_protocol_a`, :func:`plot_protocol_b`, :func:`plot_protocol_c`,
:func:`plot_protocol_d`. Each takes the result of the matching
``gradience_jax.experiments.protocols.run_protocol_*`` and a folder, writes its PNG
figure(s) there and returns their paths (``figure_dir=None``: draw, write nothing, return
``[]``). matplotlib is imported only when a figure is drawn (Agg canvas, pyplot untouched).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from gradience_jax import telemetry
from gradience_jax.experiments.protocol_a import ProtocolAResult
from gradience_jax.experiments.protocol_b import ProtocolBResult
from gradience_jax.experiments.protocol_c import ProtocolCResult
from gradience_jax.experiments.protocol_columns import diverged_at, layer_keys, series, short_name
from gradience_jax.experiments.protocol_d import ProtocolDResult
from gradience_jax.plots.figure import new_figure, save_figure

__all__ = ["plot_protocol_a", "plot_protocol_b", "plot_protocol_c", "plot_protocol_d"]

FigureDir = str | os.PathLike | None


def _save(fig: Any, figure_dir: FigureDir, name: str) -> list[str]:
    """``[path]`` of ``figure_dir/name`` after writing ``fig`` there (``[]`` without a folder)."""
    if figure_dir is None:
        return []
    path = Path(figure_dir) / name
    save_figure(fig, path)
    return [str(path)]


def _legend(ax: Any, **kw: Any) -> None:
    """A legend only when something is labelled."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def plot_protocol_a(result: ProtocolAResult, figure_dir: FigureDir) -> list[str]:
    """Figures of Protocol A.

    ``protocol_A_edge_of_stability.png``: per learning rate (columns), the loss; the
    sharpness with ``2 / lr`` and the Hessian trace; per-layer spectral norm and stable
    rank. ``protocol_A_lead_lag.png``: the lead/lag correlations of sharpness vs weights.

    Args:
        result: :class:`gradience_jax.experiments.protocols.ProtocolAResult`.
        figure_dir: output folder (created), or None.

    Returns:
        Paths written (empty when ``figure_dir`` is None).
    """
    runs = result.runs
    steps = result.config.steps
    fig = new_figure((3.6 * len(runs), 10.0))
    axes = fig.subplots(4, len(runs), squeeze=False, sharex=True)
    for j, run in enumerate(runs):
        c = run.columns
        div = diverged_at(c, steps)
        ax = axes[0, j]
        loss = np.asarray(c["loss"], np.float64)
        ax.semilogy(c["step"], np.where(loss < 1e6, loss, np.nan), lw=0.8)
        ax.set_title(f"{run.label}: lr = {run.lr:g}, 2/lr = {2 / run.lr:.3g}", fontsize=10)
        if div is not None:
            ax.text(0.5, 0.5, f"diverged at step {div}\n(probes log NaN,\nthe run goes on)",
                    transform=ax.transAxes, ha="center", va="center", fontsize=9, color="tab:red")
        ax = axes[1, j]
        st, sh = series(c, "sharpness/eigenvalue")
        thr = 2.0 / run.lr
        ax.plot(st, sh, ".-", ms=2, lw=1.0, label=r"$\lambda_{max}(H)$")
        ax.axhline(thr, color="k", ls="--", lw=1, label=r"$2/\eta$")
        finite = sh[np.isfinite(sh)]
        top = max(thr, min(float(finite.max()), 3 * thr) if finite.size else thr)
        ax.set_ylim(0, 1.15 * top)
        s = run.summary
        if s.first_cross is not None and div is None:
            ax.axvline(s.first_cross, color="tab:red", lw=0.8, ls=":")
            ax.text(0.03, 0.05, f"median after crossing 0.9 x 2/lr:\n{s.ratio:.2f} x 2/lr",
                    transform=ax.transAxes, fontsize=8)
        _legend(ax, loc="upper left", fontsize=8)
        ts, tr = series(c, "hessian_trace/estimate")
        ok = np.isfinite(tr) & (np.abs(tr) < 1e6)
        if ok.any():
            ax2 = ax.twinx()
            ax2.plot(ts[ok], tr[ok], "o-", ms=3, lw=0.8, color="tab:green")
            ax2.set_ylabel("tr H (Hutchinson)", color="tab:green", fontsize=8)
            ax2.tick_params(labelsize=7)
        ax.set_ylabel("sharpness")
        for row, suffix, label in ((2, "spectral_norm", "spectral norm"),
                                   (3, "stable_rank", "stable rank")):
            ax = axes[row, j]
            for key in layer_keys(c, "weights/", suffix):
                ks, kv = series(c, key)
                kv = np.where(np.abs(kv) < 1e6, kv, np.nan)
                ax.plot(ks, kv, lw=1, label=short_name(key))
            ax.set_ylabel(label)
            _legend(ax, fontsize=7)
        axes[3, j].set_xlabel("step")
        axes[3, j].set_xlim(0, steps)
    paths = _save(fig, figure_dir, "protocol_A_edge_of_stability.png")
    fig = new_figure((3.6 * len(runs), 3.2))
    axes = fig.subplots(1, len(runs), squeeze=False)
    for j, run in enumerate(runs):
        ax = axes[0, j]
        for key, ll in run.lead_lag.items():
            if ll is None:
                continue
            ax.plot(ll["lags"], ll["correlation"], lw=1,
                    label=f"{short_name('w/' + key)} {key.rsplit('/', 1)[-1]} "
                          f"(p={ll['p_value']:.2f})")
        ax.axvline(0, color="k", lw=0.5)
        ax.set_title(f"{run.label}: sharpness vs weights", fontsize=10)
        ax.set_xlabel(f"lag (x{result.config.probe_every} steps; > 0: sharpness leads)",
                      fontsize=8)
        ax.set_ylabel("corr. of increments")
        if not run.lead_lag or all(v is None for v in run.lead_lag.values()):
            ax.text(0.5, 0.5, "not defined\n(diverged run)", transform=ax.transAxes,
                    ha="center", va="center")
        _legend(ax, fontsize=6)
    return paths + _save(fig, figure_dir, "protocol_A_lead_lag.png")


def plot_protocol_b(result: ProtocolBResult, figure_dir: FigureDir) -> list[str]:
    """Figure of Protocol B (``protocol_B_grokking.png``).

    Accuracies, losses, weight and gradient norms, stable and effective ranks, sharpness,
    the rolling variance and lag-1 autocorrelation of metric increments, and the
    autocorrelation times before / after the transition, with the fitting, transition and
    generalisation steps marked.

    Args:
        result: :class:`gradience_jax.experiments.protocols.ProtocolBResult`.
        figure_dir: output folder (created), or None.

    Returns:
        Paths written (empty when ``figure_dir`` is None).
    """
    c, s, cfg = result.columns, result.summary, result.config
    fig = new_figure((16.0, 7.2))
    axes = fig.subplots(2, 4)
    marks = [(s.fit_step, "tab:blue", "train acc >= 0.99"),
             (s.transition_step, "tab:gray", "test acc >= 0.5"),
             (s.generalization_step, "tab:orange", "test acc >= 0.9")]

    def mark(ax, labels=False):
        for step, color, label in marks:
            if step is not None:
                ax.axvline(step, color=color, lw=0.8, ls=":", label=label if labels else None)

    ax = axes[0, 0]
    ax.plot(c["step"], c["train_accuracy"], label="train")
    ts, ta = series(c, "test/accuracy")
    ax.plot(ts, ta, label="test")
    mark(ax, labels=True)
    ax.set_ylabel("accuracy")
    ax.set_title(f"a + b mod {cfg.p}: N = {cfg.width}, train fraction {cfg.train_fraction:g}, "
                 f"wd {cfg.weight_decay:g}", fontsize=9)
    _legend(ax, fontsize=7)
    ax = axes[0, 1]
    ax.semilogy(c["step"], c["loss"], label="train")
    ts, tl = series(c, "test/loss")
    ax.semilogy(ts, tl, label="test")
    mark(ax)
    ax.set_ylabel("MSE loss (one-hot targets)")
    _legend(ax, fontsize=8)
    ax = axes[0, 2]
    ws, wn = series(c, "weights/global_norm")
    ax.plot(ws, wn, color="k", label="weight norm")
    ax.set_ylabel("weight norm (black)")
    ax2 = ax.twinx()
    gs, gn = series(c, "grad_norm")
    ax2.semilogy(gs, gn, color="tab:red", lw=0.8)
    ax2.set_ylabel("gradient norm (red)")
    mark(ax)
    ax = axes[0, 3]
    ax2 = ax.twinx()
    for layer, color in (("embed", "tab:green"), ("readout", "tab:purple")):
        ks, kv = series(c, f"weights/{layer}/kernel/stable_rank")
        ax.plot(ks, kv, color=color, lw=1.2, label=f"stable rank {layer}")
        ks, kv = series(c, f"weights/{layer}/kernel/effective_rank")
        ax2.plot(ks, kv, color=color, lw=0.8, ls="--", label=f"eff. rank {layer}")
    ax.set_ylabel("stable rank (solid)")
    ax2.set_ylabel("effective rank (dashed)")
    _legend(ax, fontsize=7, loc="center right")
    mark(ax)
    ax = axes[1, 0]
    ss, sv = series(c, "sharpness/eigenvalue")
    ax.plot(ss, sv, "o-", ms=2, lw=1)
    ax.set_ylabel(r"sharpness $\lambda_{max}(H)$")
    mark(ax)
    lo = s.fit_step if s.fit_step is not None else 0
    for ax, kind in ((axes[1, 1], "variance"), (axes[1, 2], "autocorrelation")):
        for key in ("log_loss", "grad_norm", "weights/global_norm",
                    "weights/embed/kernel/stable_rank"):
            st, x = series(c, key)
            if x.size < 2 * cfg.window + 2:
                continue
            dx = np.diff(x)
            if kind == "variance":
                r = telemetry.rolling_variance(dx, cfg.window)
                ref = r[st[1:] >= lo + cfg.window]
                if np.isfinite(ref).any() and np.nanmax(ref) > 0:
                    r = r / np.nanmax(ref)
            else:
                r = telemetry.rolling_autocorrelation(dx, cfg.window)
            label = key.replace("weights/", "").replace("/kernel", "")
            ax.plot(st[1:], r, lw=1, label=label)
        mark(ax)
        ax.set_xlim(lo, c["step"][-1])
        if kind == "variance":
            ax.set_ylim(0, 1.05)
            ax.set_ylabel("rolling variance of increments (/ max after fit)")
        else:
            ax.set_ylabel("rolling lag-1 autocorr. of increments")
        ax.set_title(f"window {cfg.window} steps, from the fit on", fontsize=9)
        _legend(ax, fontsize=7)
    for ax in axes[1, :3]:
        ax.set_xlabel("step")
    ax = axes[1, 3]
    names = [k for k, v in result.statistics.items() if v is not None]
    before = [result.statistics[k]["tau_before"] or np.nan for k in names]
    after = [result.statistics[k]["tau_after"] or np.nan for k in names]
    y = np.arange(len(names))
    ax.barh(y - 0.2, before, 0.4, label="fit -> transition")
    ax.barh(y + 0.2, after, 0.4, label="after transition")
    ax.set_yticks(y, [k.replace("weights/", "").replace("/kernel", "").replace("/eigenvalue", "")
                      for k in names], fontsize=7)
    ax.set_xlabel("integrated autocorrelation time of increments (samples)")
    _legend(ax, fontsize=7)
    return _save(fig, figure_dir, "protocol_B_grokking.png")


def plot_protocol_c(result: ProtocolCResult, figure_dir: FigureDir) -> list[str]:
    """Figure of Protocol C (``protocol_C_fisher_geometry.png``).

    Loss, ``tr F`` and participation ratio, top eigenvalues, ``kappa(F)`` against the
    weight matrices' ``kappa(W)``, natural-gradient alignment and effective dimension, one
    line style per learning rate.

    Args:
        result: :class:`gradience_jax.experiments.protocols.ProtocolCResult`.
        figure_dir: output folder (created), or None.

    Returns:
        Paths written (empty when ``figure_dir`` is None).
    """
    fig = new_figure((13.0, 7.0))
    axes = fig.subplots(2, 3, sharex=True)
    styles = ["-", "--", ":", "-."]
    ax2 = axes[0, 1].twinx()
    for i, run in enumerate(result.runs):
        c, ls = run.columns, styles[i % len(styles)]
        tag = f"{run.label} (lr {run.lr:g})"
        axes[0, 0].semilogy(c["step"], c["loss"], ls, color="k", lw=1, label=tag)
        s, tr = series(c, "fisher/trace")
        axes[0, 1].plot(s, tr, ls, color="tab:blue", marker="o", ms=3, label=f"tr F, {run.label}")
        s2, pr = series(c, "fisher/participation_ratio")
        ax2.plot(s2, pr, ls, color="tab:red", lw=1)
        s, top = series(c, "fisher/top_eigenvalues")
        for j in range(top.shape[1] if top.ndim == 2 else 0):
            axes[0, 2].semilogy(s, top[:, j], ls, color=f"C{j}", lw=1,
                                label=f"$\\lambda_{j + 1}$" if i == 0 else None)
        gs, gt = series(c, "ggn_top/eigenvalue")
        axes[0, 2].semilogy(gs, gt, ls, color="gray", lw=0.6,
                            label="Lanczos probe" if i == 0 else None)
        s, kf = series(c, "fisher/condition_number")
        axes[1, 0].semilogy(s, kf, ls, color="k", marker="o", ms=3,
                            label=f"$\\kappa(F)$ {run.label}")
        for j, key in enumerate(layer_keys(c, "weights/", "condition_number")):
            ks, kv = series(c, key)
            axes[1, 0].semilogy(ks, kv, ls, color=f"C{j}", lw=1,
                                label=f"$\\kappa(W)$ {short_name(key)}" if i == 0 else None)
        s, al = series(c, "fisher/ng_alignment")
        axes[1, 1].plot(s, al, ls, marker="o", ms=3, color="tab:purple", label=tag)
        s, de = series(c, "fisher/effective_dimension")
        axes[1, 2].plot(s, de, ls, marker="o", ms=3, color="tab:green", label=tag)
    axes[0, 0].set_ylabel("training loss (softmax CE)")
    axes[0, 1].set_ylabel("tr F (blue)")
    ax2.set_ylabel("participation ratio (tr F)^2 / tr F^2 (red)")
    axes[0, 2].set_ylabel("top eigenvalues of F")
    lam = result.config.damping
    axes[1, 0].set_ylabel(f"condition numbers ($\\kappa(F + {lam:g} I)$, $\\kappa(W)$)")
    axes[1, 1].set_ylabel(r"natural-gradient alignment cos(g, $F^{-1}$g)")
    axes[1, 2].set_ylabel(f"effective dimension d_eff({lam:g})")
    for ax in axes[1]:
        ax.set_xlabel("step")
    for ax in (*axes[0], *axes[1]):
        _legend(ax, fontsize=7)
    return _save(fig, figure_dir, "protocol_C_fisher_geometry.png")


def plot_protocol_d(result: ProtocolDResult, figure_dir: FigureDir) -> list[str]:
    """Figure of Protocol D (``protocol_D_rank_evolution.png``).

    Per architecture (columns): the training losses, the effective rank as a fraction of
    the full rank, the stable rank and alpha of every layer (solid: normal learning rate,
    dashed: 10x).

    Args:
        result: :class:`gradience_jax.experiments.protocols.ProtocolDResult`.
        figure_dir: output folder (created), or None.

    Returns:
        Paths written (empty when ``figure_dir`` is None).
    """
    archs = list(result.runs)
    fig = new_figure((4.4 * len(archs), 11.0))
    axes = fig.subplots(4, len(archs), squeeze=False, sharex="col")
    styles = ["-", "--", ":", "-."]
    for j, arch in enumerate(archs):
        for i, (lab, c) in enumerate(result.runs[arch].items()):
            ls = styles[i % len(styles)]
            axes[0, j].semilogy(c["step"], c["loss"], ls, color="k", lw=1, label=lab)
            for li, key in enumerate(layer_keys(c, "weights/", "effective_rank")):
                path = key[len("weights/"):-len("/effective_rank")]
                full = min(result.shapes[arch].get(path, (1, 1)))
                color = f"C{li % 10}"
                label = short_name(key) if i == 0 else None
                s, er = series(c, key)
                axes[1, j].plot(s, er / full, ls, color=color, lw=1, label=label)
                s, sr = series(c, f"weights/{path}/stable_rank")
                axes[2, j].plot(s, sr, ls, color=color, lw=1, label=label)
                s, al = series(c, f"alpha/{path}")
                if np.isfinite(al).any():
                    axes[3, j].plot(s, al, ls, color=color, marker="o", ms=3, lw=1, label=label)
        axes[0, j].set_title(arch)
        axes[0, j].set_ylabel("training loss")
        axes[1, j].set_ylabel("effective rank / full rank")
        axes[2, j].set_ylabel("stable rank")
        axes[3, j].set_ylabel(r"power-law $\alpha$ (ESD tail)")
        axes[3, j].set_xlabel("step")
        _legend(axes[0, j], fontsize=8)
        _legend(axes[1, j], fontsize=6, ncol=2)
        _legend(axes[3, j], fontsize=6)
    return _save(fig, figure_dir, "protocol_D_rank_evolution.png")
