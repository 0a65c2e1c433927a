"""Old import path of the weight-spectrum figures; they live in :mod:`gradience_jax.plots.weights`.

Supported names: ``plot_weight_esd``, ``plot_layer_metrics`` (re-exported unchanged).
"""

from gradience_jax.plots.weights import plot_layer_metrics, plot_weight_esd

__all__ = ["plot_layer_metrics", "plot_weight_esd"]
