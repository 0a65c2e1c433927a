"""The four seed figures: which experiment feeds which figure (``gradience-jax figures``).

Supported names: :data:`SEED_FIGURES` (``{file stem: SeedFigure(experiment, plot,
fast)}``), :class:`SeedFigure`, :func:`draw_seed_figure`. The experiments live in
:mod:`gradience_jax.experiments.seed` / :mod:`gradience_jax.experiments.attention`, the
figures in :mod:`gradience_jax.plots`; figures never train, so every figure is one
experiment run followed by one drawing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

from gradience_jax import plots
from gradience_jax.experiments import attention as attention_experiments
from gradience_jax.experiments import seed as seed_experiments

__all__ = ["SEED_FIGURES", "SeedFigure", "draw_seed_figure"]


class SeedFigure(NamedTuple):
    """One seed figure.

    Attributes:
        experiment: ``experiment(**settings) -> result`` (its defaults are the full run).
        plot: ``plot(result, path=...) -> Figure``.
        fast: the quick experiment settings (``--fast``).
    """

    experiment: Callable[..., Any]
    plot: Callable[..., Any]
    fast: dict[str, Any]


SEED_FIGURES: dict[str, SeedFigure] = {
    "pseudo_spectral_analysis": SeedFigure(
        seed_experiments.pseudo_spectral_experiment, plots.pseudo_spectral_analysis,
        {"num_steps": 600, "record_every": 60, "resolution": 15}),
    "sharp_vs_flat_minima": SeedFigure(
        seed_experiments.sharp_vs_flat_experiment, plots.sharp_vs_flat_minima,
        {"num_steps": 200, "record_every": 50, "resolution": 9, "bezier_steps": 20}),
    "attention_geometry": SeedFigure(
        attention_experiments.attention_geometry_experiment, plots.plot_attention_geometry,
        {"num_steps": 60, "resolution": 9}),
    "attention_training_dynamics": SeedFigure(
        attention_experiments.attention_dynamics_experiment, plots.attention_training_dynamics,
        {"num_steps": 100, "record_every": 20}),
}
"""The seed figures by file stem."""


def draw_seed_figure(name: str, path: str | os.PathLike, *, fast: bool = False) -> Any:
    """Run the experiment of seed figure ``name`` and draw the figure to ``path``.

    Args:
        name: a key of :data:`SEED_FIGURES`.
        path: the PNG to write.
        fast: the quick experiment settings (seconds instead of about a minute).

    Returns:
        The matplotlib figure.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid ones).
    """
    if name not in SEED_FIGURES:
        raise ValueError(f"figure must be one of {sorted(SEED_FIGURES)}, got {name!r}")
    entry = SEED_FIGURES[name]
    result = entry.experiment(**(entry.fast if fast else {}))
    return entry.plot(result, path=str(path))
