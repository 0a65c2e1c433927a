"""Experiments: training loops and the studies built on them (above the analyses).

Everything that trains lives here; the analyses below (``geometry``, ``weights``,
``landscape``, ``attention``, ``probes``) stay numerics only, and the figures
(:mod:`gradience_jax.plots`) draw from the results returned here. Import the modules
directly; ``import gradience_jax`` does not import this package.

Modules:

* :mod:`~gradience_jax.experiments.training`: the one training scan (``train_scan``,
  ``TrainResult``, ``sam_optimizer``).
* :mod:`~gradience_jax.experiments.seed`: the seed experiments behind the seed figures
  (pseudo-spectral analysis, sharp vs flat minima).
* :mod:`~gradience_jax.experiments.attention`: attention geometry and attention dynamics.
* :mod:`~gradience_jax.experiments.protocols`: Protocols A-D (one import for all of them),
  made of :mod:`~gradience_jax.experiments.protocol_a` (edge of stability),
  :mod:`~gradience_jax.experiments.protocol_b` (grokking),
  :mod:`~gradience_jax.experiments.protocol_c` (Fisher geometry),
  :mod:`~gradience_jax.experiments.protocol_d` (rank evolution), the shared
  chunked-scan-with-probes runner :mod:`~gradience_jax.experiments.protocol_runner` and
  the telemetry-column helpers :mod:`~gradience_jax.experiments.protocol_columns`.
"""
