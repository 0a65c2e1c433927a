"""Crash-safe training telemetry and the statistics of training dynamics.

Two halves, each its own module, both host side (no jax import; jitted probes live in
:mod:`gradience_jax.probes`):

* :mod:`gradience_jax.telemetry.io`: logging. :class:`TelemetryWriter` (crash-safe JSON
  Lines, one writer per file, optional TensorBoard mirror), :class:`TelemetryRecord`,
  :class:`TelemetryWarning`, :class:`TelemetryLockError` (a second writer on a log),
  :func:`load_telemetry`, :func:`to_columns`; the file format, the lock and what the reader
  recovers from a damaged log are described there.
* :mod:`gradience_jax.telemetry.sinks`: the same ``(step, metrics)`` records sent to other
  loggers, each an optional extra: :class:`TensorBoardSink`, :class:`WandbSink`,
  :class:`MLflowSink`, :class:`CluSink` (into a ``clu.metric_writers`` writer),
  :func:`as_clu_writer` / :class:`CluMetricWriter` (any of them as a clu ``MetricWriter``),
  :func:`tee` / :class:`MultiSink` (fan-out), :func:`replay` (a log into a logger),
  :func:`split_metrics`, :func:`summary_writer_class`, :class:`MetricSink` (their base),
  :class:`MissingExtraError` (an ``ImportError`` naming the extra to install).
* :mod:`gradience_jax.telemetry.dynamics`: statistics of the logged series (NumPy only).
  :func:`autocorrelation_function`, :func:`autocorrelation_time`, :func:`rolling_variance`,
  :func:`rolling_autocorrelation`, :func:`precursor_trend`, :func:`change_points`,
  :func:`fit_power_law_series`, :func:`cross_correlation`, :func:`lead_lag`,
  :func:`phase_randomized_surrogates` and their result types.

Every name below is supported and importable from here. ``fit_power_law`` and
``PowerLawFit`` are the old names of :func:`fit_power_law_series` and
:class:`SeriesPowerLawFit` (kept as aliases; the ESD tail fit of weight matrices is
:func:`gradience_jax.weights.fit_power_law`, a different estimator).
"""

from gradience_jax.telemetry.dynamics import (
    AutocorrelationTime,
    ChangePoints,
    CrossCorrelation,
    LeadLag,
    PrecursorTrend,
    SeriesPowerLawFit,
    autocorrelation_function,
    autocorrelation_time,
    change_points,
    cross_correlation,
    fit_power_law_series,
    lead_lag,
    phase_randomized_surrogates,
    precursor_trend,
    rolling_autocorrelation,
    rolling_variance,
)
from gradience_jax.telemetry.io import (
    FORMAT_NAME,
    FORMAT_VERSION,
    TelemetryLockError,
    TelemetryRecord,
    TelemetryWarning,
    TelemetryWriter,
    load_telemetry,
    to_columns,
)
from gradience_jax.telemetry.sinks import (
    CluMetricWriter,
    CluSink,
    MetricSink,
    MissingExtraError,
    MLflowSink,
    MultiSink,
    TensorBoardSink,
    WandbSink,
    as_clu_writer,
    replay,
    split_metrics,
    summary_writer_class,
    tee,
)

PowerLawFit = SeriesPowerLawFit
"""Old name of :class:`SeriesPowerLawFit`."""
fit_power_law = fit_power_law_series
"""Old name of :func:`fit_power_law_series`."""

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "AutocorrelationTime",
    "ChangePoints",
    "CluMetricWriter",
    "CluSink",
    "CrossCorrelation",
    "LeadLag",
    "MLflowSink",
    "MetricSink",
    "MissingExtraError",
    "MultiSink",
    "PowerLawFit",
    "PrecursorTrend",
    "SeriesPowerLawFit",
    "TelemetryLockError",
    "TelemetryRecord",
    "TelemetryWarning",
    "TelemetryWriter",
    "TensorBoardSink",
    "WandbSink",
    "as_clu_writer",
    "autocorrelation_function",
    "autocorrelation_time",
    "change_points",
    "cross_correlation",
    "fit_power_law",
    "fit_power_law_series",
    "lead_lag",
    "load_telemetry",
    "phase_randomized_surrogates",
    "precursor_trend",
    "replay",
    "rolling_autocorrelation",
    "rolling_variance",
    "split_metrics",
    "summary_writer_class",
    "tee",
    "to_columns",
]
