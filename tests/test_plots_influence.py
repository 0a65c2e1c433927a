"""Influence figures: drawn from results, recall computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from gradience_jax.plots import plot_influence_examples, plot_self_influence
from gradience_jax.plots.influence import top_recall


def test_top_recall_counts_marked_examples_in_the_top_fraction():
    scores = np.array([0.1, 5.0, 0.2, 4.0, 0.3, 0.0, 3.0, 0.4, 0.5, 0.6])
    # top 20 % = indices 1 and 3; marked 1 and 6 -> one of two found
    assert top_recall(scores, [1, 6], 0.2) == 0.5
    assert top_recall(scores, [1, 3], 0.2) == 1.0
    assert np.isnan(top_recall(scores, [], 0.2))


def test_figures_draw_and_refuse_missing_or_misshaped_results(tmp_path):
    rng = np.random.default_rng(0)
    fig = plot_self_influence(rng.random(50), [1, 2, 3], path=tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0 and fig.axes
    fig = plot_influence_examples(rng.standard_normal((3, 20)), 1, k=4, path=tmp_path / "e.png")
    assert len(fig.axes[0].patches) == 8
    with pytest.raises(TypeError, match="result"):
        plot_self_influence(None)
    with pytest.raises(ValueError, match="1-D"):
        plot_self_influence(np.ones((2, 3)))
    with pytest.raises(ValueError, match="test_index"):
        plot_influence_examples(np.ones((2, 3)), 5)


def test_tracin_bars_colour_proponents_as_helpful_and_ylabel_is_settable():
    """Influence: negative = helpful (green); TracIn (record.kind == "tracin"): positive is."""
    from types import SimpleNamespace

    from matplotlib.colors import to_rgba

    scores = np.array([[-3.0, -1.0, 2.0, 4.0]])
    green, red = to_rgba("tab:green"), to_rgba("tab:red")
    fig = plot_influence_examples(scores, 0, k=2)
    # bars: the 2 lowest then the 2 highest, ascending -> -3, -1, 2, 4
    assert [p.get_facecolor() for p in fig.axes[0].patches] == [green, green, red, red]
    tracin = SimpleNamespace(scores=scores, record=SimpleNamespace(kind="tracin"))
    fig = plot_influence_examples(tracin, 0, k=2)
    assert [p.get_facecolor() for p in fig.axes[0].patches] == [red, red, green, green]
    assert "proponent" in fig.axes[0].get_xlabel()
    fig = plot_self_influence(np.arange(10.0), ylabel="my score")
    assert fig.axes[0].get_ylabel() == "my score"
