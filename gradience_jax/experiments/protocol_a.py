"""Protocol A: Hessian-weight co-evolution at the edge of stability.

Supported names: :class:`ProtocolAConfig`, :data:`FAST_A`, :class:`ProtocolARun`,
:class:`ProtocolAResult`, :class:`EoSSummary`, :func:`edge_of_stability_summary`,
:func:`protocol_a_model`, :func:`protocol_a_probe`, :func:`run_protocol_a`. The data set is
:func:`gradience_jax.data.eos_regression`; the figures are
:func:`gradience_jax.plots.protocols.plot_protocol_a`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gradience_jax import probes
from gradience_jax.data import eos_regression
from gradience_jax.environment import fast_mode
from gradience_jax.experiments import protocol_runner as runner
from gradience_jax.experiments.protocol_columns import series
from gradience_jax.models import MLP, Adapted, from_nnx
from gradience_jax.operators import heads

__all__ = [
    "EoSSummary",
    "FAST_A",
    "ProtocolAConfig",
    "ProtocolAResult",
    "ProtocolARun",
    "edge_of_stability_summary",
    "protocol_a_model",
    "protocol_a_probe",
    "run_protocol_a",
]


class ProtocolAConfig(NamedTuple):
    """Settings of :func:`run_protocol_a`.

    Attributes:
        learning_rates: one full-batch GD run per rate. The defaults: ``stable`` (``2/lr``
            far above the sharpness reached), ``marginal`` (progressive sharpening reaches
            ``2/lr``: edge of stability), ``unstable`` (``2/lr`` below the initial
            sharpness: a catapult to a flatter region, then the edge of stability) and
            ``divergent`` (the loss blows up within ~10 steps; probes log NaN, the run
            goes on).
        labels: a name per rate.
        steps: GD steps per run.
        num_points, input_dim: the regression data (:func:`gradience_jax.data.eos_regression`).
        hidden: widths of the tanh hidden layers.
        probe_every: steps between sharpness probes.
        num_iters: warm-started Lanczos iterations per sharpness probe.
        weights_every: steps between weight-metric probes (0: off).
        trace_every, trace_samples: Hutchinson ``tr H`` schedule (0: off) and probes.
        alpha: host-side power-law alpha per layer at the start of each chunk.
        chunk: steps per jitted ``lax.scan`` (a multiple of the probe periods is best).
        max_lag: largest lead/lag in probe samples.
        seed: data, initialisation and probe keys.
    """

    learning_rates: tuple[float, ...] = (0.03, 0.15, 0.5, 0.7)
    labels: tuple[str, ...] = ("stable", "marginal", "unstable", "divergent")
    steps: int = 800
    num_points: int = 512
    input_dim: int = 20
    hidden: tuple[int, ...] = (64, 64)
    probe_every: int = 5
    num_iters: int = 6
    weights_every: int = 5
    trace_every: int = 50
    trace_samples: int = 16
    alpha: bool = True
    chunk: int = 100
    max_lag: int = 10
    seed: int = 0


FAST_A = ProtocolAConfig(steps=300, probe_every=10, weights_every=10, trace_every=100,
                         trace_samples=8, chunk=100, max_lag=4)
"""The small settings of Protocol A (``fast=True``): seconds on a CPU."""


class EoSSummary(NamedTuple):
    """Edge-of-stability statistics of one run.

    Attributes:
        threshold: ``2 / lr``.
        first_cross: first probed step with sharpness ``>= crossing * 2 / lr`` (None: never).
        median_after: median sharpness over the window after ``first_cross``.
        ratio: ``median_after / threshold`` (the edge of stability predicts about 1).
        max_sharpness: the largest measured sharpness.
    """

    threshold: float
    first_cross: int | None
    median_after: float
    ratio: float
    max_sharpness: float


def edge_of_stability_summary(
    steps: Any, sharpness: Any, lr: float, *, crossing: float = 0.9, window: int | None = None
) -> EoSSummary:
    """Does the sharpness rise to and hover at ``2 / lr``?

    Args:
        steps: the probed steps.
        sharpness: the ``lambda_max`` values at those steps (same length).
        lr: the GD learning rate.
        crossing: the first crossing is at ``sharpness >= crossing * 2 / lr``.
        window: number of probe samples after the crossing (default: all the rest).

    Returns:
        :class:`EoSSummary` (``median_after`` / ``ratio`` NaN without a crossing).

    Raises:
        ValueError: ``lr <= 0``, mismatched lengths.
    """
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    steps = np.asarray(steps)
    s = np.asarray(sharpness, np.float64)
    if steps.shape != s.shape:
        raise ValueError(f"steps {steps.shape} and sharpness {s.shape} must have the same shape")
    thr = 2.0 / lr
    hit = np.flatnonzero(np.isfinite(s) & (s >= crossing * thr))
    smax = float(np.nanmax(s)) if np.isfinite(s).any() else float("nan")
    if hit.size == 0:
        return EoSSummary(thr, None, float("nan"), float("nan"), smax)
    i = int(hit[0])
    after = s[i + 1:] if window is None else s[i + 1: i + 1 + int(window)]
    med = float(np.nanmedian(after)) if np.isfinite(after).any() else float("nan")
    return EoSSummary(thr, int(steps[i]), med, med / thr, smax)


class ProtocolARun(NamedTuple):
    """One learning rate of Protocol A.

    Attributes:
        label, lr: the run's name and learning rate.
        columns: the telemetry as NumPy columns (NaN where a metric was not probed).
        summary: :class:`EoSSummary`.
        lead_lag: ``{weight metric: lead/lag of sharpness vs it}`` (positive lag: sharpness
            leads; None where undefined), see
            :func:`gradience_jax.experiments.protocol_runner.lead_lag_summary`.
        log_path: the JSONL log.
    """

    label: str
    lr: float
    columns: dict[str, np.ndarray]
    summary: EoSSummary
    lead_lag: dict[str, Any]
    log_path: str


class ProtocolAResult(NamedTuple):
    """Result of :func:`run_protocol_a`.

    Attributes:
        config: the settings used.
        runs: one :class:`ProtocolARun` per learning rate.
        figures: paths of the written figures (empty until drawn by
            :func:`gradience_jax.plots.protocols.plot_protocol_a`).
    """

    config: ProtocolAConfig
    runs: list[ProtocolARun]
    figures: list[str]


def protocol_a_model(config: ProtocolAConfig) -> Adapted:
    """The tanh MLP ``input_dim -> hidden... -> 1`` with the MSE head, as an adapter.

    Args:
        config: sizes and seed.

    Returns:
        :class:`gradience_jax.models.Adapted` (``loss_fn``, ``model_fn``, ``params``, ``head``).
    """
    model = MLP([config.input_dim, *config.hidden, 1], activation=jnp.tanh,
                rngs=nnx.Rngs(config.seed))
    return from_nnx(model, heads.mse())


def protocol_a_probe(loss_fn: Callable, config: ProtocolAConfig) -> probes.Probe:
    """The probes Protocol A puts inside its jitted GD step.

    Warm-started Lanczos sharpness (``"sharpness"``) every ``probe_every`` steps, weight
    metrics every ``weights_every`` and Hutchinson ``tr H`` every ``trace_every`` (a
    period of 0 switches a probe off).

    Args:
        loss_fn: ``loss_fn(params, batch)``.
        config: the schedule.

    Returns:
        One combined :class:`gradience_jax.probes.Probe`.
    """
    return runner.combine_probes(
        probes.every(config.probe_every, probes.hessian_eigenvalues(
            loss_fn, num_iters=config.num_iters, name="sharpness")),
        *runner.probe_every(config.weights_every, probes.weight_metrics(
            fields=("spectral_norm", "frobenius_norm", "stable_rank", "effective_rank"))),
        *runner.probe_every(config.trace_every, probes.hessian_trace(
            loss_fn, num_samples=config.trace_samples)),
    )


def _lead_lags(cols: dict[str, np.ndarray], config: ProtocolAConfig) -> dict[str, Any]:
    """Sharpness vs every layer's spectral norm and stable rank."""
    _, sh = series(cols, "sharpness/eigenvalue")
    out = {}
    for key in cols:
        if key.startswith("weights/") and key.endswith(("spectral_norm", "stable_rank")):
            _, wv = series(cols, key)
            if wv.shape == sh.shape:
                out[key[len("weights/"):]] = runner.lead_lag_summary(sh, wv, config.max_lag,
                                                                     config.seed)
    return out


@runner.closes_logs_on_error
def run_protocol_a(
    config: ProtocolAConfig | None = None,
    *,
    fast: bool | None = None,
    log_dir: str | os.PathLike | None = runner.DEFAULT_LOG_DIR,
) -> ProtocolAResult:
    """Protocol A: sharpness, Hessian trace and weight spectra co-evolving under GD.

    A tanh MLP regresses :func:`gradience_jax.data.eos_regression` with full-batch gradient
    descent (loss: mean over examples of the squared error, ``gj.heads.mse`` with one
    output) at each learning rate. Under GD with this loss the sharpness ``lambda_max(H)``
    rises (progressive sharpening) until it reaches ``2 / lr`` and then hovers there (the
    edge of stability, Cohen et al. 2021): measured here on CPU, lr 0.15 rises from ~6.5,
    overshoots and then hovers at ~13.5 (``2 / lr = 13.3``); a small rate stays below its
    ``2 / lr``, a large one is catapulted or diverges (the probes then log NaN and training
    carries on).

    Probes inside the jitted step (:func:`protocol_a_probe`); power-law alpha per layer on
    the host at the start of each chunk. Lead/lag: sharpness vs each layer's spectral norm
    and stable rank, on increments, with a surrogate p-value. The learning rate is an
    argument of the compiled step, so the runs share one compilation.

    Args:
        config: settings (default: full, or :data:`FAST_A` in fast mode).
        fast: small settings (default: the ``GRADIENCE_FAST`` environment variable).
        log_dir: directory of the JSONL logs ``protocol_A_<label>.jsonl``.

    Returns:
        :class:`ProtocolAResult` (no figures: draw them with
        :func:`gradience_jax.plots.protocols.plot_protocol_a`).

    Raises:
        ValueError: bad settings; OSError: unwritable ``log_dir`` (before any training).
    """
    fast = fast_mode(fast)
    if config is None:
        config = FAST_A if fast else ProtocolAConfig()
    runner.check_labels(config)
    steps, chunk = runner.check_steps(config.steps, config.chunk)
    writers = [runner.open_log(log_dir, f"protocol_A_{lab}", config, {"lr": lr})
               for lab, lr in zip(config.labels, config.learning_rates)]
    adapted = protocol_a_model(config)
    batch = eos_regression(jax.random.key(config.seed + 1), config.num_points, config.input_dim)
    probe = protocol_a_probe(adapted.loss_fn, config)
    chunk_fn = runner.train_chunk(adapted.loss_fn, probe, optax.sgd,
                                  key=jax.random.key(config.seed), low_opt=fast)
    at_start = (lambda c, s: runner.alpha_metrics(c.params)) if config.alpha else None
    runs = []
    for lab, lr, writer in zip(config.labels, config.learning_rates, writers):
        hyper = jnp.asarray(lr, jnp.float32)
        carry = runner.init_carry(adapted.params, optax.sgd, hyper, probe)
        runner.run_chunks(chunk_fn, carry, (hyper, batch, None), steps=steps, chunk=chunk,
                          writer=writer, at_chunk_start=at_start)
        cols = runner.read_columns(writer)
        st, sh = series(cols, "sharpness/eigenvalue")
        runs.append(ProtocolARun(lab, float(lr), cols, edge_of_stability_summary(st, sh, lr),
                                 _lead_lags(cols, config), str(writer.path)))
    return ProtocolAResult(config, runs, [])
