"""Statistics of training dynamics: autocorrelation, precursors, change points, lead/lag.

NumPy only (host side, no jax import), for the co-evolution and phase-transition questions
of the research agenda. Supported names: :func:`autocorrelation_function`,
:func:`autocorrelation_time` (Sokal's automatic window) and :class:`AutocorrelationTime`,
:func:`rolling_variance`, :func:`rolling_autocorrelation`, :func:`precursor_trend` (critical
slowing down before a transition) and :class:`PrecursorTrend`, :func:`change_points` (PELT
on mean shifts) and :class:`ChangePoints`, :func:`fit_power_law_series` (power law of a
metric against step) and :class:`SeriesPowerLawFit`, :func:`cross_correlation` and
:class:`CrossCorrelation`, :func:`lead_lag` (lead/lag with a phase-randomised surrogate
test) and :class:`LeadLag`, :func:`phase_randomized_surrogates`. The ESD tail fit of weight
matrices is a different estimator: :func:`gradience_jax.weights.fit_power_law`.

All lags, windows and times are in **samples** (probe intervals): a lag of 3 on a metric
probed every 50 steps is 150 training steps.

Missing probes (NaN / inf, e.g. the ``null`` of a non-finite metric) follow one policy per
kind of statistic:

* lag-based statistics (autocorrelation, cross-correlation, surrogates) need a regular
  grid: leading and trailing non-finite values are trimmed (jointly for two series, so
  their alignment is kept) and interior gaps are filled by linear interpolation in the
  sample index. Interpolation smooths the gap, so long gaps bias autocorrelation upwards;
  a series with no finite interior is rejected.
* rolling statistics ignore non-finite values inside each window and return NaN where a
  window has fewer than ``min_periods`` finite values.
* :func:`change_points` drops non-finite samples and reports indices into the original
  series; :func:`fit_power_law_series` drops non-finite ``(x, y)`` pairs.

The statistics live in three modules by question, all re-exported here:
:mod:`~gradience_jax.telemetry.dynamics.autocorrelation` (one series' memory: the
autocorrelation function and time, rolling statistics, precursors of a transition),
:mod:`~gradience_jax.telemetry.dynamics.regimes` (change points, power law against step)
and :mod:`~gradience_jax.telemetry.dynamics.coupling` (two series: cross-correlation,
lead/lag); the shared checks, gap filling and surrogates are in ``_series``.
"""

from gradience_jax.telemetry.dynamics._series import phase_randomized_surrogates
from gradience_jax.telemetry.dynamics.autocorrelation import (  # noqa: F401 - tests use _names
    AutocorrelationTime,
    PrecursorTrend,
    _kendall_tau,
    _rolling_apply,
    autocorrelation_function,
    autocorrelation_time,
    precursor_trend,
    rolling_autocorrelation,
    rolling_variance,
)
from gradience_jax.telemetry.dynamics.coupling import (
    CrossCorrelation,
    LeadLag,
    cross_correlation,
    lead_lag,
)
from gradience_jax.telemetry.dynamics.regimes import (
    ChangePoints,
    SeriesPowerLawFit,
    change_points,
    fit_power_law_series,
)

__all__ = [
    "AutocorrelationTime",
    "ChangePoints",
    "CrossCorrelation",
    "LeadLag",
    "PrecursorTrend",
    "SeriesPowerLawFit",
    "autocorrelation_function",
    "autocorrelation_time",
    "change_points",
    "cross_correlation",
    "fit_power_law_series",
    "lead_lag",
    "phase_randomized_surrogates",
    "precursor_trend",
    "rolling_autocorrelation",
    "rolling_variance",
]
