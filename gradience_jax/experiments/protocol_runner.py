"""The machinery Protocols A-D share: one chunked training scan with probes, logged per step.

Supported names:

* :func:`train_chunk`: ``jit(lax.scan)`` over a chunk of optimiser steps with a probe
  (and optionally an evaluation probe on a second batch) inside the step; the optimiser's
  hyper-parameters (the learning rate) are an argument, so runs at several rates share one
  compilation. :func:`init_carry` builds its carry (:class:`ChunkCarry`).
* :func:`run_chunks`: drive a chunk function over all steps, writing one telemetry record
  per step (host-side metrics added at the start of every chunk).
* :func:`open_log` / :func:`read_columns`: the JSON Lines log of a run (opened before any
  training, so an unwritable path fails at once) and its columns;
  :func:`closes_logs_on_error` (a failed run closes the logs it opened).
* :func:`check_steps`, :func:`check_labels`: settings checks with clear errors.
* :func:`probe_every` / :func:`combine_probes`: probe schedules where a period of 0
  switches a probe off.
* :func:`alpha_metrics`, :func:`lead_lag_summary`: host-side metrics and statistics.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradience_jax import probes, telemetry
from gradience_jax import tree as tu
from gradience_jax.weights import weight_spectra

PyTree = Any

DEFAULT_LOG_DIR = "runs"

__all__ = [
    "ChunkCarry",
    "DEFAULT_LOG_DIR",
    "alpha_metrics",
    "check_labels",
    "check_steps",
    "combine_probes",
    "init_carry",
    "lead_lag_summary",
    "open_log",
    "probe_every",
    "read_columns",
    "run_chunks",
    "train_chunk",
]


# -- settings and logs -------------------------------------------------------------------------


def check_labels(config: Any) -> None:
    """Check that a protocol config has one label per learning rate.

    Args:
        config: a config with ``labels`` and ``learning_rates``.

    Raises:
        ValueError: the lengths differ (the message names both).
    """
    if len(config.labels) != len(config.learning_rates):
        raise ValueError(
            f"labels {config.labels} and learning_rates {config.learning_rates} differ in length"
        )


def check_steps(steps: int, chunk: int) -> tuple[int, int]:
    """Validate a run length and its chunk size.

    Args:
        steps: training steps, a positive integer.
        chunk: steps per jitted scan, a positive integer (clipped to ``steps``).

    Returns:
        ``(steps, chunk)`` as ints.

    Raises:
        ValueError: non-positive values, or ``steps`` not a multiple of ``chunk``.
    """
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    chunk = min(int(chunk), int(steps))
    if steps % chunk:
        raise ValueError(f"steps={steps} must be a multiple of chunk={chunk}")
    return int(steps), chunk


#: the writers opened by the protocol run in progress (see :func:`closes_logs_on_error`)
_OPEN_LOGS: list[list[telemetry.TelemetryWriter]] = []


def closes_logs_on_error(run: Callable) -> Callable:
    """Decorate a protocol's ``run_protocol_*``: a failure closes the logs it opened.

    Each log is closed with ``status="error"`` and the exception's text, so its one-writer
    lock is released and a rerun in the same process can open the same path.

    Args:
        run: the protocol's run function.

    Returns:
        The wrapped function (same signature).
    """

    @functools.wraps(run)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        _OPEN_LOGS.append([])
        try:
            return run(*args, **kwargs)
        except BaseException as exc:
            for writer in _OPEN_LOGS[-1]:
                if not writer.closed:
                    writer.close(status="error", error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            _OPEN_LOGS.pop()

    return wrapped


def open_log(log_dir: str | os.PathLike | None, name: str, config: NamedTuple,
             extra: Mapping[str, Any] | None = None) -> telemetry.TelemetryWriter:
    """Open the JSON Lines log ``log_dir/name.jsonl`` now, so a bad path fails before training.

    Args:
        log_dir: the directory (None: :data:`DEFAULT_LOG_DIR`).
        name: the log's stem; also recorded as ``metadata["protocol"]``.
        config: the run's settings (a NamedTuple), written to the header.
        extra: more header config entries (e.g. the run's learning rate).

    Returns:
        The open :class:`gradience_jax.telemetry.TelemetryWriter`.

    Raises:
        OSError: the directory or file cannot be created.
    """
    path = Path(DEFAULT_LOG_DIR if log_dir is None else log_dir) / f"{name}.jsonl"
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config._asdict().items()}
    if extra:
        cfg.update(extra)
    writer = telemetry.TelemetryWriter(path, config=cfg, seed=getattr(config, "seed", None),
                                       metadata={"protocol": name})
    if _OPEN_LOGS:
        _OPEN_LOGS[-1].append(writer)
    return writer


def read_columns(writer: telemetry.TelemetryWriter) -> dict[str, np.ndarray]:
    """Close ``writer`` and read its log back as NumPy columns (``telemetry.to_columns``).

    Args:
        writer: the protocol's telemetry writer (closed here).

    Returns:
        ``{name: array}`` columns aligned with the ``"step"`` column.
    """
    writer.close()
    _, records = telemetry.load_telemetry(writer.path)
    return telemetry.to_columns(records)


# -- probes ------------------------------------------------------------------------------------


def probe_every(n: int, probe: probes.Probe) -> list[probes.Probe]:
    """A probe on a period, as a list to splice into :func:`combine_probes`.

    Args:
        n: steps between measurements; 0 switches the probe off.
        probe: the probe.

    Returns:
        ``[probes.every(n, probe)]``, or ``[]`` when ``n == 0``.

    Raises:
        ValueError: ``n < 0``.
    """
    if n < 0:
        raise ValueError(f"a probe period must be >= 0 (0: off), got {n}")
    return [probes.every(n, probe)] if n else []


def combine_probes(*ps: probes.Probe) -> probes.Probe:
    """``probes.combine(*ps)``, or a probe that measures nothing when ``ps`` is empty.

    Args:
        *ps: the probes (e.g. from :func:`probe_every`), with unique names.

    Returns:
        One :class:`~gradience_jax.probes.Probe`.
    """
    if ps:
        return probes.combine(*ps)
    return probes.Probe("none", lambda params: (), lambda p, b, k, s: ({}, s))


# -- the chunked training scan -----------------------------------------------------------------


class ChunkCarry(NamedTuple):
    """State carried through :func:`train_chunk`'s scan.

    Attributes:
        params: the parameters.
        opt_state: the optax state.
        probe_state: the training probe's state.
        eval_state: the evaluation probe's state (``()`` without one).
    """

    params: PyTree
    opt_state: Any
    probe_state: Any
    eval_state: Any


def init_carry(params: PyTree, optimizer: Callable[[Any], optax.GradientTransformation],
               hyper: Any, probe: probes.Probe,
               eval_probe: probes.Probe | None = None) -> ChunkCarry:
    """The first :class:`ChunkCarry` of a run.

    Args:
        params: initial parameters.
        optimizer: ``optimizer(hyper) -> optax.GradientTransformation`` (as for
            :func:`train_chunk`).
        hyper: the run's hyper-parameters.
        probe: the training probe.
        eval_probe: the evaluation probe, if any.

    Returns:
        ``ChunkCarry(params, optimizer(hyper).init(params), probe.init(params), ...)``.
    """
    estate = eval_probe.init(params) if eval_probe is not None else ()
    return ChunkCarry(params, optimizer(hyper).init(params), probe.init(params), estate)


def _jit(fn: Callable, low_opt: bool) -> Callable:
    """``jax.jit``, with XLA's backend optimisation off when ``low_opt``.

    Small runs are compile-bound (a Lanczos probe is hundreds of fusions) and level 0
    compiles about a third faster for a slower but here negligible run time. Not for
    convolutions, which level 0 makes several times slower.
    """
    if low_opt:
        return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})
    return jax.jit(fn)


def train_chunk(
    loss_fn: Callable[..., Any],
    probe: probes.Probe,
    optimizer: Callable[[Any], optax.GradientTransformation],
    *,
    key: jax.Array,
    low_opt: bool = False,
    has_aux: bool = False,
    eval_probe: probes.Probe | None = None,
) -> Callable[..., tuple[ChunkCarry, dict]]:
    """A compiled chunk of optimiser steps with probes inside the step.

    Each step measures the probe at the current parameters (before the update, key
    ``fold_in(key, step)``), the evaluation probe on ``eval_batch`` with the same key,
    then takes one full-batch optimiser step on ``batch``, and records ``loss``,
    ``grad_norm`` and ``update_ratio`` (``||update|| / ||params||``) next to the probes'
    metrics (and ``loss_fn``'s auxiliary metrics when ``has_aux``).

    Args:
        loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, {name: metric})`` with
            ``has_aux``).
        probe: the training probe (:mod:`gradience_jax.probes`), given ``batch``.
        optimizer: ``optimizer(hyper) -> optax.GradientTransformation``; ``hyper`` is an
            argument of the compiled chunk (e.g. the learning rate), so runs that differ
            only in it share one compilation.
        key: base key of the probes.
        low_opt: compile with XLA's backend optimisation off (fast mode; not for
            convolutions).
        has_aux: ``loss_fn`` returns ``(loss, metrics)``.
        eval_probe: a probe given ``eval_batch`` (e.g. the test set), or None.

    Returns:
        ``chunk(carry, steps, hyper, batch, eval_batch) -> (carry, metrics)``: ``carry`` a
        :class:`ChunkCarry` (:func:`init_carry`), ``steps`` the ``(C,)`` int32 step
        indices of the chunk, ``metrics`` a dict of ``(C, ...)`` stacked arrays. One
        scan; cost per step one gradient plus the probes that fire.
    """

    def run(carry, idx, hyper, batch, eval_batch):
        tx = optimizer(hyper)

        def one(c, step):
            params, opt_state, pstate, estate = c
            k = jax.random.fold_in(key, step)
            metrics, pstate = probe(params, batch, k, pstate)
            metrics = dict(metrics)
            if eval_probe is not None:
                emetrics, estate = eval_probe(params, eval_batch, k, estate)
                metrics.update(emetrics)
            if has_aux:
                (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
                metrics.update(aux)
            else:
                loss, grads = jax.value_and_grad(loss_fn)(params, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            metrics["loss"] = loss
            metrics["grad_norm"] = tu.norm(grads)
            metrics["update_ratio"] = tu.norm(updates) / tu.norm(params)
            new = ChunkCarry(optax.apply_updates(params, updates), opt_state, pstate, estate)
            return new, metrics

        return jax.lax.scan(one, ChunkCarry(*carry), idx)

    return _jit(run, low_opt)


def run_chunks(
    chunk_fn: Callable[..., tuple[Any, dict]],
    carry: Any,
    args: tuple,
    *,
    steps: int,
    chunk: int,
    writer: telemetry.TelemetryWriter,
    at_chunk_start: Callable[[Any, int], Mapping[str, Any]] | None = None,
) -> Any:
    """Run a chunk function over all steps and log every step.

    Args:
        chunk_fn: ``chunk_fn(carry, step_indices, *args) -> (carry, stacked metrics)``
            (e.g. from :func:`train_chunk`).
        carry: the initial carry.
        args: the chunk function's further arguments.
        steps: total steps (a multiple of ``chunk``, see :func:`check_steps`).
        chunk: steps per call.
        writer: the log; one record per step, skipped probes left out
            (``probes.select_probed``).
        at_chunk_start: ``at_chunk_start(carry, first_step) -> metrics`` measured on the
            host at the parameters a chunk starts from (like the probes: before that
            step's update), added to the chunk's first record; called once more for the
            final parameters, written as a record of step ``steps``.

    Returns:
        The final carry.
    """
    for start in range(0, steps, chunk):
        extra = dict(at_chunk_start(carry, start)) if at_chunk_start is not None else {}
        idx = jnp.arange(start, start + chunk, dtype=jnp.int32)
        carry, stacked = chunk_fn(carry, idx, *args)
        host = jax.device_get(stacked)
        for i in range(chunk):
            rec = probes.select_probed({k: v[i] for k, v in host.items()})
            if i == 0:
                rec.update(extra)
            writer.write(start + i, rec)
    if at_chunk_start is not None:  # the final parameters, after the last update
        writer.write(steps, dict(at_chunk_start(carry, steps)))
    return carry


# -- host-side metrics and statistics ----------------------------------------------------------


def alpha_metrics(params: PyTree, prefix: str = "alpha") -> dict[str, float]:
    """Power-law exponent alpha of every layer's spectrum, on the host.

    Args:
        params: the parameters (:func:`gradience_jax.weight_spectra` picks the matrices).
        prefix: key prefix.

    Returns:
        ``{f"{prefix}/{layer}": alpha}``, NaN where the matrix is too small for a fit.
        Cost: one SVD per weight matrix.
    """
    rep = weight_spectra(params)
    return {f"{prefix}/{path}": (float("nan") if ls.alpha is None else float(ls.alpha))
            for path, ls in rep.layers.items()}


def lead_lag_summary(x: np.ndarray, y: np.ndarray, max_lag: int, seed: int
                     ) -> dict[str, Any] | None:
    """Lead/lag of the increments of ``x`` and ``y``, JSON-safe.

    ``telemetry.lead_lag`` with ``detrend="difference"`` and 99 surrogates.

    Args:
        x: a series (non-finite values end the series).
        y: a second series sampled at the same steps.
        max_lag: largest lag in samples.
        seed: the surrogates' seed.

    Returns:
        ``{"lags", "correlation", "best_lag", "best_correlation", "p_value"}`` (positive
        lag: ``x`` leads), or None when undefined (too short, constant, diverged).
    """
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < max(8, 2 * max_lag + 4):
        return None
    last = np.flatnonzero(ok)[-1] + 1
    try:
        ll = telemetry.lead_lag(x[:last], y[:last], max_lag=max_lag, num_surrogates=99,
                                seed=seed, detrend="difference")
    except ValueError:
        return None
    return {
        "lags": ll.lags.tolist(),
        "correlation": [float(c) for c in ll.correlation],
        "best_lag": int(ll.best_lag),
        "best_correlation": float(ll.best_correlation),
        "p_value": float(ll.p_value),
    }
