"""Protocols A-D of the research agenda, in one import (the runs; figures are in plots).

* Protocol A (:mod:`~gradience_jax.experiments.protocol_a`): Hessian-weight co-evolution at
  the edge of stability. One model, full-batch gradient descent at a stable, a marginal,
  an unstable and a divergent learning rate; sharpness ``lambda_max`` (warm-started Lanczos
  probe) against ``2 / lr``, Hessian trace, weight-matrix metrics and their lead / lag.
* Protocol B (:mod:`~gradience_jax.experiments.protocol_b`): grokking on modular addition
  (quadratic-activation MLP, AdamW with weight decay, MSE on one-hot targets) with dense
  telemetry, and the statistics of the metrics around the memorisation -> generalisation
  transition.
* Protocol C (:mod:`~gradience_jax.experiments.protocol_c`): Fisher geometry during
  training (``tr F``, top eigenvalues, ``kappa(F)``, effective dimension, natural-gradient
  alignment) at two learning rates.
* Protocol D (:mod:`~gradience_jax.experiments.protocol_d`): rank evolution (effective /
  stable rank, power-law alpha per layer) across an MLP, a CNN and a transformer, at a
  normal and a too-large learning rate.

Every protocol trains with the one chunked scan of
:mod:`~gradience_jax.experiments.protocol_runner` (probes of :mod:`gradience_jax.probes`
inside the jitted step, learning rates as arguments so the runs of a protocol share one
compilation), logs every step to a JSON Lines file opened before training (an unwritable
path fails at once) and analyses the log read back as columns
(:mod:`~gradience_jax.experiments.protocol_columns`). ``fast=True`` (or
``GRADIENCE_FAST=1``, :func:`gradience_jax.environment.fast_mode`) selects small settings
that finish in seconds on a CPU; the defaults are the full ones. The runners draw nothing:
:mod:`gradience_jax.plots.protocols` draws the figures from their results, and
:mod:`gradience_jax.app.protocols` does both (as the CLI's ``protocol`` command).

Supported names: everything listed in ``__all__`` (re-exported from the modules above).
"""

from gradience_jax.environment import FAST_ENV, fast_mode
from gradience_jax.experiments.protocol_a import (
    FAST_A,
    EoSSummary,
    ProtocolAConfig,
    ProtocolAResult,
    ProtocolARun,
    edge_of_stability_summary,
    protocol_a_model,
    protocol_a_probe,
    run_protocol_a,
)
from gradience_jax.experiments.protocol_b import (
    FAST_B,
    TRANSITION_METRICS,
    GrokkingSummary,
    ProtocolBConfig,
    ProtocolBResult,
    evaluation_probe,
    grokking_summary,
    run_protocol_b,
)
from gradience_jax.experiments.protocol_c import (
    FAST_C,
    ProtocolCConfig,
    ProtocolCResult,
    ProtocolCRun,
    fisher_report,
    kappa_correlations,
    run_protocol_c,
)
from gradience_jax.experiments.protocol_columns import diverged_at, layer_keys, series, short_name
from gradience_jax.experiments.protocol_d import (
    ARCHITECTURES,
    FAST_D,
    ProtocolDConfig,
    ProtocolDResult,
    matrix_shapes,
    protocol_d_case,
    run_protocol_d,
)
from gradience_jax.experiments.protocol_runner import (
    DEFAULT_LOG_DIR,
    ChunkCarry,
    alpha_metrics,
    init_carry,
    lead_lag_summary,
    run_chunks,
    train_chunk,
)

__all__ = [
    "ARCHITECTURES",
    "ChunkCarry",
    "DEFAULT_LOG_DIR",
    "EoSSummary",
    "FAST_A",
    "FAST_B",
    "FAST_C",
    "FAST_D",
    "FAST_ENV",
    "GrokkingSummary",
    "ProtocolAConfig",
    "ProtocolAResult",
    "ProtocolARun",
    "ProtocolBConfig",
    "ProtocolBResult",
    "ProtocolCConfig",
    "ProtocolCResult",
    "ProtocolCRun",
    "ProtocolDConfig",
    "ProtocolDResult",
    "TRANSITION_METRICS",
    "alpha_metrics",
    "diverged_at",
    "edge_of_stability_summary",
    "evaluation_probe",
    "fast_mode",
    "fisher_report",
    "grokking_summary",
    "init_carry",
    "kappa_correlations",
    "layer_keys",
    "lead_lag_summary",
    "matrix_shapes",
    "protocol_a_model",
    "protocol_a_probe",
    "protocol_d_case",
    "run_chunks",
    "run_protocol_a",
    "run_protocol_b",
    "run_protocol_c",
    "run_protocol_d",
    "series",
    "short_name",
    "train_chunk",
]
