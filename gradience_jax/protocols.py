"""Compatibility path of Protocols A-D: the names now live in their layers.

* runs, configs, results and statistics: :mod:`gradience_jax.experiments.protocols`
  (one module per protocol, :mod:`~gradience_jax.experiments.protocol_a` ...
  :mod:`~gradience_jax.experiments.protocol_d`),
* figures: :mod:`gradience_jax.plots.protocols` (``plot_protocol_a`` ... ``_d``),
* ``run_protocol_a`` ... ``run_protocol_d`` here are the run-and-draw calls of
  :mod:`gradience_jax.app.protocols` (same signature as before: ``config``, ``fast``,
  ``log_dir``, ``figure_dir``),
* the model :class:`gradience_jax.models.ModularAdditionMLP`, the data
  :func:`gradience_jax.data.modular_addition` and :func:`gradience_jax.data.eos_regression`,
* ``fast_mode`` / ``FAST_ENV``: :mod:`gradience_jax.environment`.

Supported names: those of the old module, re-exported unchanged (listed in ``__all__``).
"""

from gradience_jax.app.protocols import (
    DEFAULT_FIGURE_DIR,
    DEFAULT_LOG_DIR,
    run_protocol_a,
    run_protocol_b,
    run_protocol_c,
    run_protocol_d,
)
from gradience_jax.data import eos_regression, modular_addition
from gradience_jax.environment import FAST_ENV, fast_mode
from gradience_jax.experiments.protocols import (
    ARCHITECTURES,
    FAST_A,
    FAST_B,
    FAST_C,
    FAST_D,
    EoSSummary,
    GrokkingSummary,
    ProtocolAConfig,
    ProtocolAResult,
    ProtocolBConfig,
    ProtocolBResult,
    ProtocolCConfig,
    ProtocolCResult,
    ProtocolDConfig,
    ProtocolDResult,
    edge_of_stability_summary,
    grokking_summary,
)
from gradience_jax.models import ModularAdditionMLP
from gradience_jax.plots.protocols import (
    plot_protocol_a,
    plot_protocol_b,
    plot_protocol_c,
    plot_protocol_d,
)

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_FIGURE_DIR",
    "DEFAULT_LOG_DIR",
    "EoSSummary",
    "FAST_A",
    "FAST_B",
    "FAST_C",
    "FAST_D",
    "FAST_ENV",
    "GrokkingSummary",
    "ModularAdditionMLP",
    "ProtocolAConfig",
    "ProtocolAResult",
    "ProtocolBConfig",
    "ProtocolBResult",
    "ProtocolCConfig",
    "ProtocolCResult",
    "ProtocolDConfig",
    "ProtocolDResult",
    "edge_of_stability_summary",
    "eos_regression",
    "fast_mode",
    "grokking_summary",
    "modular_addition",
    "plot_protocol_a",
    "plot_protocol_b",
    "plot_protocol_c",
    "plot_protocol_d",
    "run_protocol_a",
    "run_protocol_b",
    "run_protocol_c",
    "run_protocol_d",
]
