"""Attention figures: the geometry of a trained block and its training dynamics.

* ``plot_attention_geometry`` (old name ``attention_geometry``): attention maps, singular
  values of W_Q/W_K/W_V/W_O and of the QK / OV circuits, entropy, Hessian eigenvalues of
  the block, query correlation, value norms, loss landscape in the attention parameters.
* ``attention_training_dynamics``: loss, effective rank and entropy of the attention maps,
  and the maps before / after training.

The figures draw results of :mod:`gradience_jax.experiments.attention` and never train.

Supported names: ``plot_attention_geometry``, ``attention_geometry`` (alias),
``attention_training_dynamics``.
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
from gradience_jax.plots.landscape import landscape_contour

__all__ = ["attention_geometry", "attention_training_dynamics", "plot_attention_geometry"]


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
    ax.set_title(title, **TITLE)


def plot_attention_geometry(result: Any = None, *, path: str | None = None) -> Any:
    """Geometric properties of a trained attention block (9 axes).

    2 x 4 panels + one colour bar: attention maps, singular values of W_Q / W_K / W_V / W_O
    and of the QK / OV circuits, entropy and rank per head, Hessian eigenvalues of the
    block, query correlation, value norms and the loss landscape in the attention
    parameters. (The old name ``plots.attention_geometry`` is an alias; the numerics are
    :func:`gradience_jax.attention.attention_geometry`.)

    Args:
        result: an ``AttentionGeometryResult`` from
            :func:`gradience_jax.experiments.attention.attention_geometry_experiment`
            (required: figures never train).
        path: write a PNG there.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        TypeError: no ``result``.
    """
    result = require_result(result, "plot_attention_geometry",
                            "gradience_jax.experiments.attention.attention_geometry_experiment")
    g = result.geometry
    fig = new_figure((19, 9))
    gs = fig.add_gridspec(2, 4)
    heads = np.arange(g.num_heads)
    hcolors = [RUN_COLORS[i % len(RUN_COLORS)] for i in heads]

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
    ax.set_title("Singular values of W_Q, W_K, W_V, W_O per head", **TITLE)
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
    ax.set_title("QK and OV circuits (low-rank structure)", **TITLE)
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
    ax.set_title("Attention entropy (label: normalised) and rank", **TITLE)
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
        no_data(ax, "no Hessian computed")
    ax.set_xlabel("eigenvalue index (descending)")
    ax.set_ylabel("eigenvalue (symlog)")
    ax.set_title("Hessian eigenvalues (attention parameters)", **TITLE)
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
    mean_off = off.mean() if off.size else 0
    ax.set_title(f"Query correlation (mean |off-diag| {mean_off:.2f})", **TITLE)

    ax = fig.add_subplot(gs[1, 2])
    vn = g.value_norms  # (H, S)
    pos = np.arange(vn.shape[1])
    w = 0.8 / g.num_heads
    for h in heads:
        ax.bar(pos + (h - (g.num_heads - 1) / 2) * w, vn[h], w, color=hcolors[h], label=f"head {h}")
    ax.set_xlabel("key position")
    ax.set_ylabel(r"mean $\|v\|$")
    ax.set_title("Value-vector norms", **TITLE)
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
    save_figure(fig, path)
    return fig


def attention_training_dynamics(result: Any = None, *, path: str | None = None) -> Any:
    """How attention evolves during training (2 x 3 panels: 6 axes).

    Loss, effective rank and entropy of the attention maps per head, effective rank of
    ``W_Q W_K^T``, and the maps of one held-out sequence before and after training.

    Args:
        result: an ``AttentionDynamicsResult`` from
            :func:`gradience_jax.experiments.attention.attention_dynamics_experiment`
            (required: figures never train).
        path: write a PNG there.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        TypeError: no ``result``.
    """
    result = require_result(result, "attention_training_dynamics",
                            "gradience_jax.experiments.attention.attention_dynamics_experiment")
    r = result
    steps = r.steps
    nh = r.entropy.shape[1]
    seq = r.weights_last.shape[-1]
    fig = new_figure((16, 9))
    gs = fig.add_gridspec(2, 3)

    ax = fig.add_subplot(gs[0, 0])
    ax.plot(steps, r.train_loss, linewidth=2, label="train")
    if r.eval_loss is not None:
        ax.plot(steps, r.eval_loss, linewidth=2, linestyle="--", label="held out")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (log)")
    ax.set_title("Loss", **TITLE)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)

    ax = fig.add_subplot(gs[0, 1])
    for h in range(nh):
        ax.plot(steps, r.effective_rank[:, h], linewidth=2, color=RUN_COLORS[h % 6],
                label=f"head {h}")
    ax.axhline(seq, color="k", linestyle=":", linewidth=1, label=f"T = {seq}")
    ax.set_xlabel("step")
    ax.set_ylabel("effective rank of the T x T maps")
    ax.set_title("Effective rank of attention maps", **TITLE)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)

    ax = fig.add_subplot(gs[0, 2])
    for h in range(nh):
        ax.plot(steps, r.normalized_entropy[:, h], linewidth=2, color=RUN_COLORS[h % 6],
                label=f"head {h}")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("entropy / log(#visible keys)")
    ax.set_title("Normalised attention entropy (1 = uniform)", **TITLE)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)

    _draw_maps(fig.add_subplot(gs[1, 0]), r.weights_first, f"Attention at step {steps[0]}",
               annotate=False)
    _draw_maps(fig.add_subplot(gs[1, 1]), r.weights_last, f"Attention at step {steps[-1]}",
               annotate=False)

    ax = fig.add_subplot(gs[1, 2])
    for h in range(nh):
        ax.plot(steps, r.qk_effective_rank[:, h], linewidth=2, color=RUN_COLORS[h % 6],
                label=f"head {h}")
    ax.set_xlabel("step")
    ax.set_ylabel("effective rank")
    ax.set_title(r"Effective rank of $W_Q W_K^T$", **TITLE)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    cfg = r.config
    task = {"copy_first": "task: predict the first token", "progression":
            "task: next token of arithmetic progressions"}.get(cfg.get("task"), "")
    fig.suptitle(f"Attention training dynamics: d_model {cfg.get('d_model')}, {nh} heads, "
                 f"sequence length {seq}" + (f" ({task})" if task else ""), fontsize=13,
                 fontweight="bold")
    save_figure(fig, path)
    return fig



#: The old name of :func:`plot_attention_geometry` (distinct from the numerics
#: :func:`gradience_jax.attention.attention_geometry`).
attention_geometry = plot_attention_geometry
