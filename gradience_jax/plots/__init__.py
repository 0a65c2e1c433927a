"""Figures from results (matplotlib only here; figures never train).

Every figure is one call that takes a result, returns a ``matplotlib.figure.Figure`` and
writes a PNG when given ``path``. Results come from the experiments
(:mod:`gradience_jax.experiments.seed`, :mod:`gradience_jax.experiments.attention`) or the
analyses (``weights``); a figure given no result raises ``TypeError`` instead of training.
Figures are drawn on an Agg canvas without touching pyplot's global state, so notebooks keep
their backend; importing this package does not import matplotlib.

Modules:

* :mod:`~gradience_jax.plots.figure`: ``new_figure``, ``save_figure`` (one ``DPI``).
* :mod:`~gradience_jax.plots.landscape`: ``landscape_contour``, ``landscape_surface``,
  ``slice_lines``, ``pseudo_spectral_analysis``, ``sharp_vs_flat_minima``.
* :mod:`~gradience_jax.plots.attention`: ``plot_attention_geometry`` (old name
  ``attention_geometry``), ``attention_training_dynamics``.
* :mod:`~gradience_jax.plots.weights`: ``plot_weight_esd``, ``plot_layer_metrics``.
* :mod:`~gradience_jax.plots.influence`: ``plot_self_influence``, ``plot_influence_examples``.
* :mod:`~gradience_jax.plots.protocols`: ``plot_protocol_a`` ... ``plot_protocol_d``
  (imported on first use).

Supported names: those in ``__all__``.
"""

from __future__ import annotations

from gradience_jax._compat import lazy_exports
from gradience_jax.plots.attention import (
    attention_geometry,
    attention_training_dynamics,
    plot_attention_geometry,
)
from gradience_jax.plots.figure import DPI, new_figure, save_figure
from gradience_jax.plots.influence import plot_influence_examples, plot_self_influence
from gradience_jax.plots.landscape import (
    landscape_contour,
    landscape_surface,
    pseudo_spectral_analysis,
    sharp_vs_flat_minima,
    slice_lines,
)
from gradience_jax.plots.weights import plot_layer_metrics, plot_weight_esd

__all__ = [
    "DPI",
    "attention_geometry",
    "attention_training_dynamics",
    "landscape_contour",
    "landscape_surface",
    "new_figure",
    "plot_attention_geometry",
    "plot_influence_examples",
    "plot_layer_metrics",
    "plot_self_influence",
    "plot_weight_esd",
    "pseudo_spectral_analysis",
    "save_figure",
    "sharp_vs_flat_minima",
    "slice_lines",
]

#: Figure names defined in sibling modules imported on first use: ``name -> module``.
_LAZY = {
    "plot_protocol_a": "gradience_jax.plots.protocols",
    "plot_protocol_b": "gradience_jax.plots.protocols",
    "plot_protocol_c": "gradience_jax.plots.protocols",
    "plot_protocol_d": "gradience_jax.plots.protocols",
}


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)
