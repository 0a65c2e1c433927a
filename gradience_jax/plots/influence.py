"""Figures of influence results (from :mod:`gradience_jax.influence`; matplotlib drawn lazily).

* ``plot_self_influence``: self-influence of every training example, sorted, with planted
  or suspected examples marked, and the recall of the top fraction.
* ``plot_influence_examples``: the most helpful and most harmful training examples for one
  test example, as a horizontal bar chart.

Each function returns a ``matplotlib.figure.Figure`` on an Agg canvas and writes a PNG when
given ``path`` (:func:`gradience_jax.plots.figure.save_figure`).

Supported names: ``plot_self_influence``, ``plot_influence_examples``, ``top_recall``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gradience_jax.plots.figure import TITLE, new_figure, require_result, save_figure

__all__ = ["plot_influence_examples", "plot_self_influence", "top_recall"]


def top_recall(scores: Any, marked: Sequence[int], fraction: float = 0.1) -> float:
    """Share of ``marked`` examples among the top ``fraction`` of ``scores`` (highest first).

    Args:
        scores: ``(n,)`` scores (e.g. self-influence).
        marked: indices of the examples to find (e.g. planted wrong labels).
        fraction: the share of examples inspected, ``0 < fraction <= 1``.

    Returns:
        ``|top ∩ marked| / |marked|`` (``nan`` when nothing is marked).
    """
    scores = np.asarray(scores, np.float64).ravel()
    marked = set(np.asarray(marked, int).ravel().tolist())
    if not marked:
        return float("nan")
    k = max(1, round(fraction * scores.size))
    top = np.argsort(scores, kind="stable")[::-1][:k]
    return len(marked & set(top.tolist())) / len(marked)


def plot_self_influence(
    result: Any,
    marked: Sequence[int] | None = None,
    *,
    fraction: float = 0.1,
    path: str | None = None,
    title: str | None = None,
    ylabel: str | None = None,
    figsize: tuple[float, float] = (6.5, 3.8),
) -> Any:
    """Sorted self-influence, marked examples in red, the inspected top fraction shaded.

    Args:
        result: an :class:`~gradience_jax.influence.InfluenceResult` of ``self_influence``
            (or a ``(n,)`` array of scores).
        marked: indices to highlight (planted wrong labels, say); with them the title
            reports the recall of the top ``fraction``.
        fraction: the share of examples an annotator would inspect.
        path: write a PNG there.
        title: axes title (default: method and damping, and the recall).
        ylabel: y-axis label (default the self-influence formula; e.g. a TracIn label for
            scores of another kind).
        figsize: figure size in inches.

    Returns:
        The ``matplotlib.figure.Figure`` (one axes).

    Raises:
        TypeError: ``result`` is None.
        ValueError: the scores are not 1-D.
    """
    require_result(result, "plot_self_influence", "gradience_jax.self_influence")
    scores = np.asarray(getattr(result, "scores", result), np.float64)
    if scores.ndim != 1:
        raise ValueError(f"result must hold 1-D self-influence scores, got shape {scores.shape}")
    order = np.argsort(scores, kind="stable")[::-1]
    rank = np.arange(1, scores.size + 1)
    fig = new_figure(figsize)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(rank, scores[order], color="0.3", lw=1.2, label="self-influence (sorted)")
    k = max(1, round(fraction * scores.size))
    ax.axvspan(0.5, k + 0.5, color="tab:orange", alpha=0.15,
               label=f"top {fraction:.0%} inspected")
    parts = []
    record = getattr(result, "record", None)
    if record is not None:
        parts.append(f"{record.method}, damping {record.damping:.2g}")
    if marked is not None and len(marked):
        pos = np.empty(scores.size, int)
        pos[order] = rank
        idx = np.asarray(marked, int)
        ax.scatter(pos[idx], scores[idx], s=16, color="tab:red", zorder=3,
                   label=f"marked ({idx.size})")
        parts.append(f"recall@{fraction:.0%} = {top_recall(scores, idx, fraction):.2f}")
    ax.set_yscale("symlog", linthresh=max(1e-12, float(np.percentile(np.abs(scores), 10))))
    ax.set_xlabel("rank (highest self-influence first)")
    ax.set_ylabel(ylabel or r"$g_i^\top (H + dI)^{-1} g_i$")
    ax.set_title(title or "self-influence: " + "; ".join(parts), **TITLE)
    ax.legend(fontsize=8, loc="upper right")
    save_figure(fig, path)
    return fig


def plot_influence_examples(
    result: Any,
    test_index: int = 0,
    *,
    k: int = 8,
    labels: Sequence[str] | None = None,
    path: str | None = None,
    title: str | None = None,
    figsize: tuple[float, float] = (6.5, 4.0),
) -> Any:
    """The ``k`` most helpful and ``k`` most harmful training examples for one test example.

    Helpful bars are green, harmful ones red. For influence scores negative is helpful;
    for a TracIn result (``result.record.kind == "tracin"``) positive is (proponents).

    Args:
        result: an :class:`~gradience_jax.influence.InfluenceResult` of ``influence``
            (scores ``(n_test, n_train)``; positive = removing the example lowers the test
            loss, i.e. harmful) or of ``tracin`` (positive = proponent, i.e. helpful).
        test_index: the test example (row).
        k: bars of each sign.
        labels: names of the training examples (default their indices).
        path: write a PNG there.
        title: axes title.
        figsize: figure size in inches.

    Returns:
        The ``matplotlib.figure.Figure`` (one axes).

    Raises:
        TypeError: ``result`` is None.
        ValueError: ``result`` does not hold 2-D scores, or a bad ``test_index`` / ``k``.
    """
    require_result(result, "plot_influence_examples", "gradience_jax.influence")
    scores = np.asarray(getattr(result, "scores", result), np.float64)
    if scores.ndim != 2:
        raise ValueError(f"result must hold (n_test, n_train) scores, got shape {scores.shape}")
    if not 0 <= test_index < scores.shape[0]:
        raise ValueError(f"test_index must be in [0, {scores.shape[0]}), got {test_index}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    row = scores[test_index]
    tracin = getattr(getattr(result, "record", None), "kind", None) == "tracin"
    order = np.argsort(row, kind="stable")
    k = min(k, row.size // 2 or 1)
    chosen = np.concatenate([order[:k], order[::-1][:k][::-1]])
    names = [labels[i] if labels is not None else f"#{i}" for i in chosen]
    fig = new_figure(figsize)
    ax = fig.add_subplot(1, 1, 1)
    colors = ["tab:green" if (row[i] > 0 if tracin else row[i] < 0) else "tab:red"
              for i in chosen]
    ax.barh(np.arange(chosen.size), row[chosen], color=colors)
    ax.set_yticks(np.arange(chosen.size), names, fontsize=8)
    ax.axvline(0.0, color="0.3", lw=0.8)
    ax.set_xlabel("TracIn score (> 0 proponent / helpful, < 0 opponent / harmful)" if tracin
                  else "influence on the test loss (< 0 helpful, > 0 harmful)")
    ax.set_title(title or f"training examples that matter for test example {test_index}",
                 **TITLE)
    save_figure(fig, path)
    return fig
