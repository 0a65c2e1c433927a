"""The research agenda's Protocols A-D as importable functions (also run by the notebooks).

* :func:`run_protocol_a`: Hessian-weight co-evolution at the edge of stability. One model,
  full-batch gradient descent at a stable, a marginal and an unstable learning rate;
  sharpness ``lambda_max`` (warm-started Lanczos probe) against ``2 / lr``, Hessian trace,
  weight-matrix metrics and their lead / lag.
* :func:`run_protocol_b`: grokking on modular addition (quadratic-activation MLP, AdamW
  with weight decay, MSE on one-hot targets) with dense telemetry, and the statistics of
  the metrics around the memorisation -> generalisation transition.
* :func:`run_protocol_c`: Fisher geometry during training (``tr F``, top eigenvalues,
  ``kappa(F)``, effective dimension, natural-gradient alignment) at two learning rates.
* :func:`run_protocol_d`: rank evolution (effective / stable rank, power-law alpha per
  layer) across an MLP, a CNN and a transformer, at a normal and a too-large learning rate.

Every protocol trains inside one jitted ``lax.scan`` per chunk of steps with the probes of
:mod:`gradience_jax.probes` inside the step, logs every step to a JSON Lines file with
:class:`gradience_jax.telemetry.TelemetryWriter` (opened before training, so an unwritable
path fails at once), reads the log back with :func:`gradience_jax.telemetry.load_telemetry`
for the analysis, and draws its figures to ``figure_dir`` (matplotlib is imported only by
the plotting functions). ``fast=True`` (or the environment variable ``GRADIENCE_FAST=1``)
selects small settings that finish in seconds on a CPU; the defaults are the full ones.

Learning rates are arguments of the compiled step, so the runs of one protocol share one
compilation.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gradience_jax import data as gdata
from gradience_jax import probes
from gradience_jax import tree as tu
from gradience_jax import telemetry
from gradience_jax.geometry import fisher_geometry
from gradience_jax.models import CNN, MLP, TinyTransformerLM, from_nnx
from gradience_jax.operators import heads
from gradience_jax.operators.ggn import ggn
from gradience_jax.weights import weight_spectra

PyTree = Any

FAST_ENV = "GRADIENCE_FAST"
DEFAULT_FIGURE_DIR = "docs/figures"
DEFAULT_LOG_DIR = "runs"

__all__ = [
    "EoSSummary",
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


# =============================================================================================
# Shared machinery
# =============================================================================================


def fast_mode(fast: bool | None = None) -> bool:
    """``fast`` if given, else whether the environment variable ``GRADIENCE_FAST`` is set
    to ``1`` / ``true`` / ``yes`` (CI sets it so notebooks finish in seconds)."""
    if fast is not None:
        return bool(fast)
    return os.environ.get(FAST_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _check_labels(config: Any) -> None:
    """One label per learning rate, or a ``ValueError`` naming both."""
    if len(config.labels) != len(config.learning_rates):
        raise ValueError(
            f"labels {config.labels} and learning_rates {config.learning_rates} differ in length"
        )


def _check_steps(steps: int, chunk: int) -> tuple[int, int]:
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    chunk = min(int(chunk), int(steps))
    if steps % chunk:
        raise ValueError(f"steps={steps} must be a multiple of chunk={chunk}")
    return int(steps), chunk


def _open_log(log_dir: str | os.PathLike | None, name: str, config: NamedTuple,
              extra: Mapping[str, Any] | None = None) -> telemetry.TelemetryWriter:
    """The JSONL log ``log_dir/name.jsonl``, opened now so a bad path fails before training."""
    path = Path(DEFAULT_LOG_DIR if log_dir is None else log_dir) / f"{name}.jsonl"
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config._asdict().items()}
    if extra:
        cfg.update(extra)
    return telemetry.TelemetryWriter(path, config=cfg, seed=getattr(config, "seed", None),
                                     metadata={"protocol": name})


def _run_chunks(
    chunk_fn: Callable[..., tuple[Any, dict]],
    carry: Any,
    args: tuple,
    *,
    steps: int,
    chunk: int,
    writer: telemetry.TelemetryWriter,
    at_chunk_start: Callable[[Any, int], Mapping[str, Any]] | None = None,
) -> Any:
    """Run ``chunk_fn(carry, step_indices, *args) -> (carry, stacked metrics)`` over all
    steps, writing one record per step (skipped probes left out). ``at_chunk_start(carry,
    first_step)`` adds host-side metrics, measured at the parameters the chunk starts from
    (like the probes: before that step's update), to the chunk's first record, and writes
    them once more for the final parameters as a record of step ``steps``."""
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


def _columns(writer: telemetry.TelemetryWriter) -> dict[str, np.ndarray]:
    writer.close()
    _, records = telemetry.load_telemetry(writer.path)
    return telemetry.to_columns(records)


def _series(cols: Mapping[str, np.ndarray], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of a metric at the steps where it was measured."""
    if key not in cols:
        return np.zeros(0, np.int64), np.zeros(0)
    v = np.asarray(cols[key], np.float64)
    keep = ~np.isnan(v) if v.ndim == 1 else ~np.all(np.isnan(v), axis=tuple(range(1, v.ndim)))
    return cols["step"][keep], v[keep]


def _float32(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def _safe_lead_lag(x: np.ndarray, y: np.ndarray, max_lag: int, seed: int) -> dict[str, Any] | None:
    """Lead/lag of increments (``detrend="difference"``) or None when undefined (too short,
    constant, diverged)."""
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


def _jit(fn: Callable, low_opt: bool) -> Callable:
    """``jax.jit``, with XLA's backend optimisation off when ``low_opt`` (fast mode): these
    small runs are compile-bound (a Lanczos probe is hundreds of fusions) and level 0
    compiles about a third faster for a slower but here negligible run time. Not for
    convolutions, which level 0 makes several times slower."""
    if low_opt:
        return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})
    return jax.jit(fn)


def _maybe_every(n: int, probe: probes.Probe) -> list[probes.Probe]:
    """``[every(n, probe)]``, or ``[]`` when ``n == 0`` (the probe is switched off)."""
    if n < 0:
        raise ValueError(f"a probe period must be >= 0 (0: off), got {n}")
    return [probes.every(n, probe)] if n else []


def _combined(*ps: probes.Probe) -> probes.Probe:
    """``probes.combine(*ps)``, or a probe measuring nothing when every probe is off."""
    if ps:
        return probes.combine(*ps)
    return probes.Probe("none", lambda params: (), lambda p, b, k, s: ({}, s))


def _new_figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, figure_dir: str | os.PathLike | None, name: str) -> str | None:
    if figure_dir is None:
        return None
    path = Path(figure_dir)
    path.mkdir(parents=True, exist_ok=True)
    out = path / name
    fig.savefig(out, dpi=110)
    return str(out)


# =============================================================================================
# Protocol A: Hessian-weight co-evolution at the edge of stability
# =============================================================================================


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
        num_points, input_dim: the regression data (:func:`eos_regression`).
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
        steps, sharpness: the probed steps and ``lambda_max`` values (same length).
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


def eos_regression(key: jax.Array, n: int = 512, dim: int = 20) -> dict:
    """The edge-of-stability regression: ``x ~ N(0, I_dim)``, ``y = sin(x . w)``,
    ``w ~ N(0, I_dim)`` (a hard, oscillating target: strong progressive sharpening).

    Returns ``{"inputs": (n, dim), "targets": (n, 1)}`` float32.
    """
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, dim), jnp.float32)
    w = jax.random.normal(kw, (dim, 1), jnp.float32)
    return {"inputs": x, "targets": jnp.sin(x @ w)}


class _ARun(NamedTuple):
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
        runs: one entry per learning rate: ``label``, ``lr``, ``columns`` (the telemetry as
            NumPy columns, NaN where a metric was not probed), ``summary``
            (:class:`EoSSummary`), ``lead_lag`` (``{weight metric: lead/lag of sharpness vs
            it, positive lag: sharpness leads}``) and ``log_path``.
        figures: paths of the written figures.
    """

    config: ProtocolAConfig
    runs: list[_ARun]
    figures: list[str]


def _a_model(config: ProtocolAConfig):
    model = MLP([config.input_dim, *config.hidden, 1], activation=jnp.tanh,
                rngs=nnx.Rngs(config.seed))
    return from_nnx(model, heads.mse())


def _gd_chunk(loss_fn: Callable, probe: probes.Probe, seed: int, fast: bool) -> Callable:
    """``jit(scan)`` of full-batch GD steps with the probe inside; ``lr`` is an argument."""
    base = jax.random.key(seed)

    def run(carry, idx, lr, batch):
        tx = optax.sgd(lr)

        def one(c, step):
            params, pstate = c
            metrics, pstate = probe(params, batch, jax.random.fold_in(base, step), pstate)
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
            updates, _ = tx.update(grads, tx.init(params), params)
            metrics = dict(metrics)
            metrics["loss"] = loss
            metrics["grad_norm"] = tu.norm(grads)
            metrics["update_ratio"] = tu.norm(updates) / tu.norm(params)
            return (optax.apply_updates(params, updates), pstate), metrics

        return jax.lax.scan(one, carry, idx)

    return _jit(run, fast)


def _a_probe(loss_fn: Callable, config: ProtocolAConfig) -> probes.Probe:
    return _combined(
        probes.every(config.probe_every, probes.hessian_eigenvalues(
            loss_fn, num_iters=config.num_iters, name="sharpness")),
        *_maybe_every(config.weights_every, probes.weight_metrics(
            fields=("spectral_norm", "frobenius_norm", "stable_rank", "effective_rank"))),
        *_maybe_every(config.trace_every, probes.hessian_trace(
            loss_fn, num_samples=config.trace_samples)),
    )


def _alpha_metrics(params: PyTree, prefix: str = "alpha") -> dict[str, float]:
    """Host-side power-law alpha per layer (``weight_spectra``; NaN where no fit)."""
    rep = weight_spectra(params)
    return {f"{prefix}/{path}": (float("nan") if ls.alpha is None else float(ls.alpha))
            for path, ls in rep.layers.items()}


def run_protocol_a(
    config: ProtocolAConfig | None = None,
    *,
    fast: bool | None = None,
    log_dir: str | os.PathLike | None = DEFAULT_LOG_DIR,
    figure_dir: str | os.PathLike | None = DEFAULT_FIGURE_DIR,
) -> ProtocolAResult:
    """Protocol A: sharpness, Hessian trace and weight spectra co-evolving under GD.

    A tanh MLP regresses :func:`eos_regression` with full-batch gradient descent (loss: mean
    over examples of the squared error, ``gj.heads.mse`` with one output) at each learning
    rate. Under GD with this loss the sharpness ``lambda_max(H)`` rises (progressive
    sharpening) until it reaches ``2 / lr`` and then hovers there (the edge of stability,
    Cohen et al. 2021): measured here on CPU, lr 0.15 rises from ~6.5, overshoots and then
    hovers at ~13.5 (``2 / lr = 13.3``); a small rate stays below its ``2 / lr``, a large
    one is catapulted or diverges (the probes then log NaN and training carries on).

    Probes inside the jitted step: warm-started Lanczos sharpness and weight metrics every
    ``probe_every`` steps, Hutchinson ``tr H`` every ``trace_every``; power-law alpha per
    layer on the host at the start of each chunk. Lead/lag: sharpness vs each layer's
    spectral norm and stable rank, on increments, with a surrogate p-value.

    Args:
        config: settings (default: full, or :data:`FAST_A` in fast mode).
        fast: small settings (default: the ``GRADIENCE_FAST`` environment variable).
        log_dir: directory of the JSONL logs ``protocol_A_<label>.jsonl``.
        figure_dir: where ``protocol_A_edge_of_stability.png`` and
            ``protocol_A_lead_lag.png`` go (None: no figures).

    Returns:
        :class:`ProtocolAResult`.

    Raises:
        ValueError: bad settings; OSError: unwritable ``log_dir`` (before any training).
    """
    fast = fast_mode(fast)
    if config is None:
        config = FAST_A if fast else ProtocolAConfig()
    _check_labels(config)
    steps, chunk = _check_steps(config.steps, config.chunk)
    writers = [_open_log(log_dir, f"protocol_A_{lab}", config, {"lr": lr})
               for lab, lr in zip(config.labels, config.learning_rates)]
    adapted = _a_model(config)
    batch = eos_regression(jax.random.key(config.seed + 1), config.num_points, config.input_dim)
    probe = _a_probe(adapted.loss_fn, config)
    chunk_fn = _gd_chunk(adapted.loss_fn, probe, config.seed, fast)
    runs = []
    for lab, lr, writer in zip(config.labels, config.learning_rates, writers):
        carry = (adapted.params, probe.init(adapted.params))
        _run_chunks(chunk_fn, carry, (jnp.asarray(lr, jnp.float32), batch), steps=steps,
                    chunk=chunk, writer=writer,
                    at_chunk_start=(lambda c, s: _alpha_metrics(c[0])) if config.alpha else None)
        cols = _columns(writer)
        st, sh = _series(cols, "sharpness/eigenvalue")
        summary = edge_of_stability_summary(st, sh, lr)
        ll = {}
        for key in cols:
            if key.startswith("weights/") and key.endswith(("spectral_norm", "stable_rank")):
                _, wv = _series(cols, key)
                if wv.shape == sh.shape:
                    ll[key[len("weights/"):]] = _safe_lead_lag(sh, wv, config.max_lag, config.seed)
        runs.append(_ARun(lab, float(lr), cols, summary, ll, str(writer.path)))
    result = ProtocolAResult(config, runs, [])
    figures = plot_protocol_a(result, figure_dir) if figure_dir is not None else []
    return result._replace(figures=figures)


def _layer_keys(cols: Mapping[str, Any], prefix: str, suffix: str) -> list[str]:
    return [k for k in cols if k.startswith(prefix) and k.endswith(suffix)]


def _short(key: str) -> str:
    """``weights/layers/0/kernel/spectral_norm`` -> ``layers/0``."""
    parts = key.split("/")
    parts = [p for p in parts[1:-1] if p not in ("kernel", "embedding")]
    return "/".join(parts) or key


def _legend(ax: Any, **kw: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def _diverged_at(columns: Mapping[str, np.ndarray], steps: int, key: str = "loss") -> int | None:
    """First training step (``< steps``) whose loss is not finite (None: stayed finite)."""
    train = np.asarray(columns["step"]) < steps
    loss = np.asarray(columns[key], np.float64)[train]
    bad = np.flatnonzero(~np.isfinite(loss))
    return int(np.asarray(columns["step"])[train][bad[0]]) if bad.size else None


def plot_protocol_a(result: ProtocolAResult, figure_dir: str | os.PathLike | None) -> list[str]:
    """Figures of Protocol A: per learning rate, loss; sharpness with ``2 / lr`` and the
    Hessian trace; per-layer spectral norm and stable rank; and the lead/lag correlations.

    Returns:
        Paths written (empty when ``figure_dir`` is None).
    """
    runs = result.runs
    steps = result.config.steps
    fig = _new_figure((3.6 * len(runs), 10.0))
    axes = fig.subplots(4, len(runs), squeeze=False, sharex=True)
    for j, run in enumerate(runs):
        c = run.columns
        div = _diverged_at(c, steps)
        ax = axes[0, j]
        loss = np.asarray(c["loss"], np.float64)
        ax.semilogy(c["step"], np.where(loss < 1e6, loss, np.nan), lw=0.8)
        ax.set_title(f"{run.label}: lr = {run.lr:g}, 2/lr = {2 / run.lr:.3g}", fontsize=10)
        if div is not None:
            ax.text(0.5, 0.5, f"diverged at step {div}\n(probes log NaN,\nthe run goes on)",
                    transform=ax.transAxes, ha="center", va="center", fontsize=9, color="tab:red")
        ax = axes[1, j]
        st, sh = _series(c, "sharpness/eigenvalue")
        thr = 2.0 / run.lr
        ax.plot(st, sh, ".-", ms=2, lw=1.0, label=r"$\lambda_{max}(H)$")
        ax.axhline(thr, color="k", ls="--", lw=1, label=r"$2/\eta$")
        finite = sh[np.isfinite(sh)]
        top = max(thr, min(float(finite.max()), 3 * thr) if finite.size else thr)
        ax.set_ylim(0, 1.15 * top)
        s = run.summary
        if s.first_cross is not None and div is None:
            ax.axvline(s.first_cross, color="tab:red", lw=0.8, ls=":")
            ax.text(0.03, 0.05, f"median after crossing 0.9 x 2/lr:\n{s.ratio:.2f} x 2/lr",
                    transform=ax.transAxes, fontsize=8)
        _legend(ax, loc="upper left", fontsize=8)
        ts, tr = _series(c, "hessian_trace/estimate")
        ok = np.isfinite(tr) & (np.abs(tr) < 1e6)
        if ok.any():
            ax2 = ax.twinx()
            ax2.plot(ts[ok], tr[ok], "o-", ms=3, lw=0.8, color="tab:green")
            ax2.set_ylabel("tr H (Hutchinson)", color="tab:green", fontsize=8)
            ax2.tick_params(labelsize=7)
        ax.set_ylabel("sharpness")
        for row, suffix, label in ((2, "spectral_norm", "spectral norm"),
                                   (3, "stable_rank", "stable rank")):
            ax = axes[row, j]
            for key in _layer_keys(c, "weights/", suffix):
                ks, kv = _series(c, key)
                kv = np.where(np.abs(kv) < 1e6, kv, np.nan)
                ax.plot(ks, kv, lw=1, label=_short(key))
            ax.set_ylabel(label)
            _legend(ax, fontsize=7)
        axes[3, j].set_xlabel("step")
        axes[3, j].set_xlim(0, steps)
    paths = []
    p = _save(fig, figure_dir, "protocol_A_edge_of_stability.png")
    if p:
        paths.append(p)
    fig = _new_figure((3.6 * len(runs), 3.2))
    axes = fig.subplots(1, len(runs), squeeze=False)
    for j, run in enumerate(runs):
        ax = axes[0, j]
        for key, ll in run.lead_lag.items():
            if ll is None:
                continue
            ax.plot(ll["lags"], ll["correlation"], lw=1,
                    label=f"{_short('w/' + key)} {key.rsplit('/', 1)[-1]} (p={ll['p_value']:.2f})")
        ax.axvline(0, color="k", lw=0.5)
        ax.set_title(f"{run.label}: sharpness vs weights", fontsize=10)
        ax.set_xlabel(f"lag (x{result.config.probe_every} steps; > 0: sharpness leads)",
                      fontsize=8)
        ax.set_ylabel("corr. of increments")
        if not run.lead_lag or all(v is None for v in run.lead_lag.values()):
            ax.text(0.5, 0.5, "not defined\n(diverged run)", transform=ax.transAxes,
                    ha="center", va="center")
        _legend(ax, fontsize=6)
    p = _save(fig, figure_dir, "protocol_A_lead_lag.png")
    if p:
        paths.append(p)
    return paths


# =============================================================================================
# Protocol B: grokking on modular addition
# =============================================================================================


class ModularAdditionMLP(nnx.Module):
    """``logits = W (U[a] + V[b] + c)^2 + d``: the one-hot pair ``(a, b)`` through a linear
    layer (``embed``, kernel rows ``U`` then ``V``, computed by gathering rows), a quadratic
    activation and a linear read-out (``readout``). Input ``(B, 2)`` int; output ``(B, p)``.
    """

    def __init__(self, p: int, width: int, *, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, dtype=param_dtype, rngs=rngs)
        self.p = int(p)
        self.embed = nnx.Linear(2 * p, width, **kw)
        self.readout = nnx.Linear(width, p, **kw)

    def __call__(self, pairs: jax.Array) -> jax.Array:
        kernel = self.embed.kernel[...]
        h = kernel[pairs[:, 0]] + kernel[self.p + pairs[:, 1]] + self.embed.bias[...]
        return self.readout(h * h)


def modular_addition(key: jax.Array, p: int = 97, train_fraction: float = 0.3) -> tuple[dict, dict]:
    """``(train, test)`` of :func:`gradience_jax.data.modular_arithmetic` (``a + b mod p``)
    with float32 one-hot ``"targets"`` added for the MSE head."""
    train, test = gdata.modular_arithmetic(key, p=p, train_fraction=train_fraction, op="add")
    add = lambda d: dict(d, targets=jax.nn.one_hot(d["labels"], p, dtype=jnp.float32))  # noqa: E731
    return add(train), add(test)


class ProtocolBConfig(NamedTuple):
    """Settings of :func:`run_protocol_b`.

    Attributes:
        p: the modulus.
        width: hidden units ``N``.
        train_fraction: share of the ``p^2`` pairs used for training (full batch).
        learning_rate, b1, b2, weight_decay: AdamW.
        steps: full-batch AdamW steps.
        test_every: steps between test-set evaluations.
        weights_every: steps between weight-metric probes.
        sharpness_every: steps between sharpness probes (0: off).
        num_iters: warm-started Lanczos iterations per sharpness probe.
        window: rolling window (samples) of the transition statistics.
        chunk: steps per jitted ``lax.scan``.
        seed: data split, initialisation and probe keys.
    """

    p: int = 97
    width: int = 500
    train_fraction: float = 0.3
    learning_rate: float = 1e-2
    b1: float = 0.9
    b2: float = 0.98
    weight_decay: float = 1.0
    steps: int = 400
    test_every: int = 1
    weights_every: int = 1
    sharpness_every: int = 10
    num_iters: int = 5
    window: int = 20
    chunk: int = 50
    seed: int = 0


FAST_B = ProtocolBConfig(p=31, width=256, train_fraction=0.6, steps=200, window=10)


class GrokkingSummary(NamedTuple):
    """Where the grokking run memorised and where it generalised.

    Attributes:
        fit_step: first step with train accuracy ``>= train_threshold`` (None: never).
        generalization_step: first step with test accuracy ``>= test_threshold``.
        transition_step: first step with test accuracy ``>= 0.5`` (the transition's middle).
        delay: ``generalization_step - fit_step`` (None if either is missing).
        grokked: both reached, the training set first.
    """

    fit_step: int | None
    generalization_step: int | None
    transition_step: int | None
    delay: int | None
    grokked: bool


def _first(steps: np.ndarray, values: np.ndarray, threshold: float) -> int | None:
    hit = np.flatnonzero(np.isfinite(values) & (values >= threshold))
    return int(steps[hit[0]]) if hit.size else None


def grokking_summary(
    steps: Any, train_accuracy: Any, test_accuracy: Any, *,
    train_threshold: float = 0.99, test_threshold: float = 0.9,
) -> GrokkingSummary:
    """First steps at which the train and the test accuracy reach their thresholds.

    ``test_accuracy`` may be NaN on steps where it was not evaluated.
    """
    steps = np.asarray(steps)
    tr = np.asarray(train_accuracy, np.float64)
    te = np.asarray(test_accuracy, np.float64)
    if not (steps.shape == tr.shape == te.shape):
        raise ValueError(
            f"steps {steps.shape}, train_accuracy {tr.shape} and test_accuracy {te.shape} "
            "must have the same shape"
        )
    fit = _first(steps, tr, train_threshold)
    gen = _first(steps, te, test_threshold)
    mid = _first(steps, te, 0.5)
    delay = gen - fit if fit is not None and gen is not None else None
    return GrokkingSummary(fit, gen, mid, delay, bool(delay is not None and delay > 0))


class ProtocolBResult(NamedTuple):
    """Result of :func:`run_protocol_b`.

    Attributes:
        config: settings used.
        columns: the telemetry as NumPy columns (``step``, ``loss``, ``train_accuracy``,
            ``test/loss``, ``test/accuracy``, ``weights/...``, ``sharpness/eigenvalue``,
            ``grad_norm``, ``update_ratio``; NaN where not measured).
        summary: :class:`GrokkingSummary`.
        statistics: per metric, the transition statistics: ``tau_before`` / ``tau_after``
            (integrated autocorrelation time of the increments between fitting and the
            transition / after it), ``var_before`` / ``var_after`` and the precursor trends
            (Kendall tau and surrogate p-value of rolling variance and lag-1
            autocorrelation before the transition); None where undefined.
        log_path: the JSONL log.
        figures: written figure paths.
    """

    config: ProtocolBConfig
    columns: dict[str, np.ndarray]
    summary: GrokkingSummary
    statistics: dict[str, dict[str, Any] | None]
    log_path: str
    figures: list[str]


class _Eval(NamedTuple):
    loss: jax.Array
    accuracy: jax.Array


def _evaluate(model_fn: Callable, head: Callable, params: PyTree, batch: PyTree) -> _Eval:
    out = model_fn(params, batch)
    acc = jnp.mean((jnp.argmax(out, -1) == batch["labels"]).astype(jnp.float32))
    return _Eval(head(out, batch), acc)


def _eval_probe(model_fn: Callable, head: Callable, name: str) -> probes.Probe:
    """Loss and accuracy on whatever batch the probe is given (here: the test set)."""

    def apply(params, batch, key, state):
        ev = _evaluate(model_fn, head, params, batch)
        return {f"{name}/loss": ev.loss, f"{name}/accuracy": ev.accuracy}, state

    return probes.Probe(name, lambda params: (), apply)


def _b_metrics(config: ProtocolBConfig) -> tuple[str, ...]:
    return ("log_loss", "grad_norm", "weights/global_norm",
            "weights/embed/kernel/stable_rank", "weights/readout/kernel/stable_rank",
            "weights/embed/kernel/effective_rank", "sharpness/eigenvalue")


def _transition_stats(cols: Mapping[str, np.ndarray], key: str, fit: int | None,
                      mid: int | None, window: int, seed: int) -> dict[str, Any] | None:
    """Statistics of one metric's increments before and after the transition."""
    if fit is None or mid is None or key not in cols:
        return None
    st, x = _series(cols, key)
    if x.size < 8:
        return None
    dx = np.diff(x)
    ds = st[1:]
    i0, i1 = int(np.searchsorted(ds, fit)), int(np.searchsorted(ds, mid))
    before, after = dx[i0:i1], dx[i1:]
    w = max(3, min(window, (i1 - i0) // 3))
    out: dict[str, Any] = {"window": w, "samples_before": int(before.size)}

    def tau(seg):
        try:
            return float(telemetry.autocorrelation_time(seg).tau) if seg.size >= 8 else None
        except ValueError:
            return None

    out["tau_before"], out["tau_after"] = tau(before), tau(after)
    out["var_before"] = float(np.var(before)) if before.size > 1 else None
    out["var_after"] = float(np.var(after)) if after.size > 1 else None
    for kind in ("variance", "autocorrelation"):
        try:
            pt = telemetry.precursor_trend(dx, i1, window=w, start=i0, indicator=kind,
                                           num_surrogates=99, seed=seed)
            out[f"{kind}_trend_tau"] = float(pt.kendall_tau)
            out[f"{kind}_trend_p"] = float(pt.p_value)
        except ValueError:
            out[f"{kind}_trend_tau"] = out[f"{kind}_trend_p"] = None
    return out


def run_protocol_b(
    config: ProtocolBConfig | None = None,
    *,
    fast: bool | None = None,
    log_dir: str | os.PathLike | None = DEFAULT_LOG_DIR,
    figure_dir: str | os.PathLike | None = DEFAULT_FIGURE_DIR,
) -> ProtocolBResult:
    """Protocol B: grokking of modular addition with dense telemetry.

    :class:`ModularAdditionMLP` (quadratic activation) learns ``a + b mod p`` from a
    fraction of all pairs with full-batch AdamW and weight decay, MSE on one-hot targets
    (``gj.heads.mse``). Measured on CPU with the defaults (``p = 97``, ``N = 500``, train
    fraction 0.3, lr 1e-2, betas (0.9, 0.98), weight decay 1): train accuracy reaches 0.99
    by step ~20, test accuracy 0.9 only at step ~130 (with weight decay 5 and fraction 0.5
    there is no delay). Every step logs train / test loss and accuracy, the gradient norm,
    the update-to-weight ratio and the weight metrics (norm, effective / stable rank per
    layer); the sharpness (warm-started Lanczos) every ``sharpness_every`` steps. The
    transition statistics (autocorrelation time, variance, precursor trends of their rolling
    versions, computed on increments) compare the plateau between fitting and the transition
    with the time after it.

    Args:
        config: settings (default: full, or :data:`FAST_B` in fast mode: ``p = 31``).
        fast: small settings (default: the ``GRADIENCE_FAST`` environment variable).
        log_dir: directory of the JSONL log ``protocol_B_grokking.jsonl``.
        figure_dir: where ``protocol_B_grokking.png`` goes (None: no figure).

    Returns:
        :class:`ProtocolBResult`.

    Raises:
        ValueError: bad settings; OSError: unwritable ``log_dir`` (before any training).
    """
    fast = fast_mode(fast)
    if config is None:
        config = FAST_B if fast else ProtocolBConfig()
    steps, chunk = _check_steps(config.steps, config.chunk)
    writer = _open_log(log_dir, "protocol_B_grokking", config)
    train, test = modular_addition(jax.random.key(config.seed), config.p, config.train_fraction)
    model = ModularAdditionMLP(config.p, config.width, rngs=nnx.Rngs(config.seed))
    adapted = from_nnx(model, heads.mse())
    tx = optax.adamw(config.learning_rate, b1=config.b1, b2=config.b2,
                     weight_decay=config.weight_decay)
    train_probe = _combined(
        *_maybe_every(config.weights_every, probes.weight_metrics(
            fields=("frobenius_norm", "stable_rank", "effective_rank"))),
        *_maybe_every(config.sharpness_every, probes.hessian_eigenvalues(
            adapted.loss_fn, num_iters=config.num_iters, name="sharpness")),
    )
    test_probe = probes.every(config.test_every, _eval_probe(adapted.model_fn, adapted.head, "test"))
    base = jax.random.key(config.seed + 1)

    def run(carry, idx, train, test):
        def one(c, step):
            params, opt_state, pstate, tstate = c
            key = jax.random.fold_in(base, step)
            metrics, pstate = train_probe(params, train, key, pstate)
            tmetrics, tstate = test_probe(params, test, key, tstate)

            def loss_fn(p):
                ev = _evaluate(adapted.model_fn, adapted.head, p, train)
                return ev.loss, ev.accuracy

            (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            metrics = dict(metrics, **tmetrics)
            metrics.update(loss=loss, log_loss=jnp.log(loss), train_accuracy=acc,
                           grad_norm=tu.norm(grads),
                           update_ratio=tu.norm(updates) / tu.norm(params))
            return (optax.apply_updates(params, updates), opt_state, pstate, tstate), metrics

        return jax.lax.scan(one, carry, idx)

    chunk_fn = _jit(run, fast)
    params = adapted.params
    carry = (params, tx.init(params), train_probe.init(params), test_probe.init(params))
    _run_chunks(chunk_fn, carry, (train, test), steps=steps, chunk=chunk, writer=writer)
    cols = _columns(writer)
    summary = grokking_summary(cols["step"], cols["train_accuracy"], cols["test/accuracy"])
    stats = {key: _transition_stats(cols, key, summary.fit_step, summary.transition_step,
                                    config.window, config.seed)
             for key in _b_metrics(config)}
    result = ProtocolBResult(config, cols, summary, stats, str(writer.path), [])
    figures = plot_protocol_b(result, figure_dir) if figure_dir is not None else []
    return result._replace(figures=figures)


def plot_protocol_b(result: ProtocolBResult, figure_dir: str | os.PathLike | None) -> list[str]:
    """Figure of Protocol B: accuracies, losses, weight and gradient norms, stable and
    effective ranks, sharpness, the rolling variance and lag-1 autocorrelation of metric
    increments, and the autocorrelation times before / after the transition, with the
    fitting, transition and generalisation steps marked."""
    c, s, cfg = result.columns, result.summary, result.config
    fig = _new_figure((16.0, 7.2))
    axes = fig.subplots(2, 4)
    marks = [(s.fit_step, "tab:blue", "train acc >= 0.99"),
             (s.transition_step, "tab:gray", "test acc >= 0.5"),
             (s.generalization_step, "tab:orange", "test acc >= 0.9")]

    def mark(ax, labels=False):
        for step, color, label in marks:
            if step is not None:
                ax.axvline(step, color=color, lw=0.8, ls=":", label=label if labels else None)

    ax = axes[0, 0]
    ax.plot(c["step"], c["train_accuracy"], label="train")
    ts, ta = _series(c, "test/accuracy")
    ax.plot(ts, ta, label="test")
    mark(ax, labels=True)
    ax.set_ylabel("accuracy")
    ax.set_title(f"a + b mod {cfg.p}: N = {cfg.width}, train fraction {cfg.train_fraction:g}, "
                 f"wd {cfg.weight_decay:g}", fontsize=9)
    _legend(ax, fontsize=7)
    ax = axes[0, 1]
    ax.semilogy(c["step"], c["loss"], label="train")
    ts, tl = _series(c, "test/loss")
    ax.semilogy(ts, tl, label="test")
    mark(ax)
    ax.set_ylabel("MSE loss (one-hot targets)")
    _legend(ax, fontsize=8)
    ax = axes[0, 2]
    ws, wn = _series(c, "weights/global_norm")
    ax.plot(ws, wn, color="k", label="weight norm")
    ax.set_ylabel("weight norm (black)")
    ax2 = ax.twinx()
    gs, gn = _series(c, "grad_norm")
    ax2.semilogy(gs, gn, color="tab:red", lw=0.8)
    ax2.set_ylabel("gradient norm (red)")
    mark(ax)
    ax = axes[0, 3]
    ax2 = ax.twinx()
    for layer, color in (("embed", "tab:green"), ("readout", "tab:purple")):
        ks, kv = _series(c, f"weights/{layer}/kernel/stable_rank")
        ax.plot(ks, kv, color=color, lw=1.2, label=f"stable rank {layer}")
        ks, kv = _series(c, f"weights/{layer}/kernel/effective_rank")
        ax2.plot(ks, kv, color=color, lw=0.8, ls="--", label=f"eff. rank {layer}")
    ax.set_ylabel("stable rank (solid)")
    ax2.set_ylabel("effective rank (dashed)")
    _legend(ax, fontsize=7, loc="center right")
    mark(ax)
    ax = axes[1, 0]
    ss, sv = _series(c, "sharpness/eigenvalue")
    ax.plot(ss, sv, "o-", ms=2, lw=1)
    ax.set_ylabel(r"sharpness $\lambda_{max}(H)$")
    mark(ax)
    lo = s.fit_step if s.fit_step is not None else 0
    for ax, kind in ((axes[1, 1], "variance"), (axes[1, 2], "autocorrelation")):
        for key in ("log_loss", "grad_norm", "weights/global_norm",
                    "weights/embed/kernel/stable_rank"):
            st, x = _series(c, key)
            if x.size < 2 * cfg.window + 2:
                continue
            dx = np.diff(x)
            if kind == "variance":
                r = telemetry.rolling_variance(dx, cfg.window)
                ref = r[st[1:] >= lo + cfg.window]
                if np.isfinite(ref).any() and np.nanmax(ref) > 0:
                    r = r / np.nanmax(ref)
            else:
                r = telemetry.rolling_autocorrelation(dx, cfg.window)
            label = key.replace("weights/", "").replace("/kernel", "")
            ax.plot(st[1:], r, lw=1, label=label)
        mark(ax)
        ax.set_xlim(lo, c["step"][-1])
        if kind == "variance":
            ax.set_ylim(0, 1.05)
            ax.set_ylabel("rolling variance of increments (/ max after fit)")
        else:
            ax.set_ylabel("rolling lag-1 autocorr. of increments")
        ax.set_title(f"window {cfg.window} steps, from the fit on", fontsize=9)
        _legend(ax, fontsize=7)
    for ax in axes[1, :3]:
        ax.set_xlabel("step")
    ax = axes[1, 3]
    names = [k for k, v in result.statistics.items() if v is not None]
    before = [result.statistics[k]["tau_before"] or np.nan for k in names]
    after = [result.statistics[k]["tau_after"] or np.nan for k in names]
    y = np.arange(len(names))
    ax.barh(y - 0.2, before, 0.4, label="fit -> transition")
    ax.barh(y + 0.2, after, 0.4, label="after transition")
    ax.set_yticks(y, [k.replace("weights/", "").replace("/kernel", "").replace("/eigenvalue", "")
                      for k in names], fontsize=7)
    ax.set_xlabel("integrated autocorrelation time of increments (samples)")
    _legend(ax, fontsize=7)
    p = _save(fig, figure_dir, "protocol_B_grokking.png")
    return [p] if p else []


# =============================================================================================
# Protocol C: Fisher geometry during training
# =============================================================================================


class ProtocolCConfig(NamedTuple):
    """Settings of :func:`run_protocol_c`.

    Attributes:
        learning_rates, labels: one full-batch GD run per rate.
        steps: GD steps per run.
        num_points, input_dim, num_classes, separation: the Gaussian-blob classification.
        hidden: tanh hidden widths (keep ``n_params <= 2000`` for exact dense geometry).
        geometry_every: steps between Fisher-geometry reports (host side, the chunk size).
        probe_every: steps between the jitted GGN-top and weight probes.
        damping: ``lam`` in ``kappa(F + lam I)``, ``d_eff(lam)`` and ``(F + lam I)^-1 g``.
        k: top eigenvalues reported.
        seed: data, initialisation and keys.
    """

    learning_rates: tuple[float, ...] = (0.1, 2.0)
    labels: tuple[str, ...] = ("small lr", "large lr")
    steps: int = 400
    num_points: int = 256
    input_dim: int = 8
    num_classes: int = 4
    separation: float = 1.0
    hidden: tuple[int, ...] = (32, 32)
    geometry_every: int = 20
    probe_every: int = 5
    damping: float = 1e-3
    k: int = 5
    seed: int = 0


FAST_C = ProtocolCConfig(steps=120, hidden=(16,), geometry_every=20, probe_every=5)


class _CRun(NamedTuple):
    label: str
    lr: float
    columns: dict[str, np.ndarray]
    log_path: str


class ProtocolCResult(NamedTuple):
    """Result of :func:`run_protocol_c`.

    Attributes:
        config: settings used.
        runs: per learning rate ``label``, ``lr``, ``columns`` (telemetry columns:
            ``loss``, ``accuracy``, ``ggn_top/eigenvalue`` and ``weights/...`` from the jitted
            probes; ``fisher/trace``, ``fisher/trace_sq``, ``fisher/participation_ratio``,
            ``fisher/top_eigenvalues`` ``(T, k)``, ``fisher/condition_number``,
            ``fisher/effective_dimension``, ``fisher/ng_alignment``, ``fisher/cg_converged``
            from the host-side reports) and ``log_path``.
        correlations: per run, Pearson correlations over the reports between
            ``log kappa(F)`` and each layer's ``log kappa(W)`` (None if undefined).
        figures: written figure paths.
    """

    config: ProtocolCConfig
    runs: list[_CRun]
    correlations: dict[str, dict[str, float | None]]
    figures: list[str]


def _fisher_report(adapted: Any, params: PyTree, batch: PyTree, config: ProtocolCConfig,
                   key: jax.Array) -> dict[str, Any]:
    """Host-side Fisher geometry (``gradience_jax.geometry.fisher_geometry``) of the GGN,
    which is the Fisher information for softmax cross-entropy."""
    import warnings  # noqa: PLC0415

    op = ggn(adapted.model_fn, adapted.head, params, batch, check=False)
    grad = jax.grad(adapted.loss_fn)(params, batch)
    if not (np.isfinite(float(tu.norm(grad))) and float(tu.norm(grad)) > 0):
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = fisher_geometry(op, grad, damping=config.damping, key=key,
                              k=min(config.k, op.n_params), num_samples=30)
    d = rep.to_dict()
    return {
        "fisher/trace": d["trace"],
        "fisher/trace_sq": d["trace_sq"],
        "fisher/participation_ratio": d["participation_ratio"],
        "fisher/top_eigenvalues": np.asarray(d["top_eigenvalues"]),
        "fisher/condition_number": d["condition_number"],
        "fisher/effective_dimension": d["effective_dimension"],
        "fisher/ng_alignment": d["natural_gradient_alignment"],
        "fisher/cg_converged": bool(d["cg_converged"]),
    }


def run_protocol_c(
    config: ProtocolCConfig | None = None,
    *,
    fast: bool | None = None,
    log_dir: str | os.PathLike | None = DEFAULT_LOG_DIR,
    figure_dir: str | os.PathLike | None = DEFAULT_FIGURE_DIR,
) -> ProtocolCResult:
    """Protocol C: the Fisher metric during training at a small and a large learning rate.

    A tanh MLP classifies Gaussian blobs (softmax cross-entropy, full-batch GD). Every
    ``geometry_every`` steps the host computes :func:`gradience_jax.geometry.fisher_geometry`
    of the GGN (= Fisher for softmax CE; exact dense linear algebra for small models,
    matrix-free otherwise): ``tr F``, ``tr F^2``, participation ratio, top-``k``
    eigenvalues, ``kappa(F + lam I)``, ``d_eff(lam)`` and the natural-gradient alignment
    ``cos(g, (F + lam I)^-1 g)`` (conjugate gradients). Inside the jitted step the
    warm-started GGN top eigenvalue and the weight matrices' condition numbers are probed
    every ``probe_every`` steps.

    Args:
        config: settings (default: full, or :data:`FAST_C` in fast mode).
        fast: small settings (default: the ``GRADIENCE_FAST`` environment variable).
        log_dir: directory of the JSONL logs ``protocol_C_<label>.jsonl``.
        figure_dir: where ``protocol_C_fisher_geometry.png`` goes (None: no figure).

    Returns:
        :class:`ProtocolCResult`.

    Raises:
        ValueError: bad settings; OSError: unwritable ``log_dir`` (before any training).
    """
    fast = fast_mode(fast)
    if config is None:
        config = FAST_C if fast else ProtocolCConfig()
    _check_labels(config)
    steps, chunk = _check_steps(config.steps, config.geometry_every)
    writers = [_open_log(log_dir, f"protocol_C_{lab.replace(' ', '_')}", config, {"lr": lr})
               for lab, lr in zip(config.labels, config.learning_rates)]
    batch = gdata.classification(jax.random.key(config.seed + 1), n=config.num_points,
                                 dim=config.input_dim, num_classes=config.num_classes,
                                 separation=config.separation)
    model = MLP([config.input_dim, *config.hidden, config.num_classes], activation=jnp.tanh,
                rngs=nnx.Rngs(config.seed))
    adapted = from_nnx(model, heads.softmax_cross_entropy())
    probe = probes.combine(
        probes.every(config.probe_every, probes.ggn_eigenvalues(adapted.model_fn, adapted.head)),
        probes.every(config.probe_every, probes.weight_metrics(
            fields=("condition_number", "stable_rank", "spectral_norm"))),
    )
    chunk_fn = _gd_chunk(adapted.loss_fn, probe, config.seed, fast)
    key = jax.random.key(config.seed + 2)

    def with_accuracy(carry, s):
        params = carry[0]
        out = dict(_fisher_report(adapted, params, batch, config, jax.random.fold_in(key, s)))
        logits = adapted.model_fn(params, batch)
        out["accuracy"] = float(jnp.mean(jnp.argmax(logits, -1) == batch["labels"]))
        return out

    runs = []
    for lab, lr, writer in zip(config.labels, config.learning_rates, writers):
        carry = (adapted.params, probe.init(adapted.params))
        _run_chunks(chunk_fn, carry, (jnp.asarray(lr, jnp.float32), batch), steps=steps,
                    chunk=chunk, writer=writer, at_chunk_start=with_accuracy)
        runs.append(_CRun(lab, float(lr), _columns(writer), str(writer.path)))
    corr = {run.label: _kappa_correlations(run.columns) for run in runs}
    result = ProtocolCResult(config, runs, corr, [])
    figures = plot_protocol_c(result, figure_dir) if figure_dir is not None else []
    return result._replace(figures=figures)


def _kappa_correlations(cols: Mapping[str, np.ndarray]) -> dict[str, float | None]:
    """Pearson correlation of ``log kappa(F)`` with each layer's ``log kappa(W)`` at the
    report steps."""
    fs, fk = _series(cols, "fisher/condition_number")
    out: dict[str, float | None] = {}
    for key in _layer_keys(cols, "weights/", "condition_number"):
        v = np.asarray(cols[key], np.float64)
        idx = np.searchsorted(cols["step"], fs)
        x, y = np.log(fk), np.log(v[idx])
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() < 3 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
            out[_short(key)] = None
        else:
            out[_short(key)] = float(np.corrcoef(x[ok], y[ok])[0, 1])
    return out


def plot_protocol_c(result: ProtocolCResult, figure_dir: str | os.PathLike | None) -> list[str]:
    """Figure of Protocol C: loss, ``tr F`` and participation ratio, top eigenvalues,
    ``kappa(F)`` against the weight matrices' ``kappa(W)``, natural-gradient alignment and
    effective dimension, one line style per learning rate."""
    fig = _new_figure((13.0, 7.0))
    axes = fig.subplots(2, 3, sharex=True)
    styles = ["-", "--", ":", "-."]
    ax2 = axes[0, 1].twinx()
    for i, run in enumerate(result.runs):
        c, ls = run.columns, styles[i % len(styles)]
        tag = f"{run.label} (lr {run.lr:g})"
        axes[0, 0].semilogy(c["step"], c["loss"], ls, color="k", lw=1, label=tag)
        s, tr = _series(c, "fisher/trace")
        axes[0, 1].plot(s, tr, ls, color="tab:blue", marker="o", ms=3, label=f"tr F, {run.label}")
        s2, pr = _series(c, "fisher/participation_ratio")
        ax2.plot(s2, pr, ls, color="tab:red", lw=1)
        s, top = _series(c, "fisher/top_eigenvalues")
        for j in range(top.shape[1] if top.ndim == 2 else 0):
            axes[0, 2].semilogy(s, top[:, j], ls, color=f"C{j}", lw=1,
                                label=f"$\\lambda_{j + 1}$" if i == 0 else None)
        gs, gt = _series(c, "ggn_top/eigenvalue")
        axes[0, 2].semilogy(gs, gt, ls, color="gray", lw=0.6,
                            label="Lanczos probe" if i == 0 else None)
        s, kf = _series(c, "fisher/condition_number")
        axes[1, 0].semilogy(s, kf, ls, color="k", marker="o", ms=3, label=f"$\\kappa(F)$ {run.label}")
        for j, key in enumerate(_layer_keys(c, "weights/", "condition_number")):
            ks, kv = _series(c, key)
            axes[1, 0].semilogy(ks, kv, ls, color=f"C{j}", lw=1,
                                label=f"$\\kappa(W)$ {_short(key)}" if i == 0 else None)
        s, al = _series(c, "fisher/ng_alignment")
        axes[1, 1].plot(s, al, ls, marker="o", ms=3, color="tab:purple", label=tag)
        s, de = _series(c, "fisher/effective_dimension")
        axes[1, 2].plot(s, de, ls, marker="o", ms=3, color="tab:green", label=tag)
    axes[0, 0].set_ylabel("training loss (softmax CE)")
    axes[0, 1].set_ylabel("tr F (blue)")
    ax2.set_ylabel("participation ratio (tr F)^2 / tr F^2 (red)")
    axes[0, 2].set_ylabel("top eigenvalues of F")
    lam = result.config.damping
    axes[1, 0].set_ylabel(f"condition numbers ($\\kappa(F + {lam:g} I)$, $\\kappa(W)$)")
    axes[1, 1].set_ylabel(r"natural-gradient alignment cos(g, $F^{-1}$g)")
    axes[1, 2].set_ylabel(f"effective dimension d_eff({lam:g})")
    for ax in axes[1]:
        ax.set_xlabel("step")
    for ax in (*axes[0], *axes[1]):
        _legend(ax, fontsize=7)
    p = _save(fig, figure_dir, "protocol_C_fisher_geometry.png")
    return [p] if p else []


# =============================================================================================
# Protocol D: rank evolution across architectures
# =============================================================================================


ARCHITECTURES = ("mlp", "cnn", "transformer")


class ProtocolDConfig(NamedTuple):
    """Settings of :func:`run_protocol_d`.

    Attributes:
        architectures: any of ``"mlp"`` (classification), ``"cnn"`` (tiny images),
            ``"transformer"`` (next-token prediction).
        learning_rates, labels: one Adam run per rate and architecture (the second rate is
            10x too large: induced instability).
        steps: full-batch Adam steps per run.
        probe_every: steps between the jitted weight-metric probes.
        alpha_every: steps between host-side power-law fits (the chunk size).
        width: hidden width of the MLP / model width of the transformer.
        num_layers: transformer blocks.
        seed: data, initialisation.
    """

    architectures: tuple[str, ...] = ARCHITECTURES
    learning_rates: tuple[float, ...] = (3e-3, 3e-2)
    labels: tuple[str, ...] = ("normal", "10x lr")
    steps: int = 600
    probe_every: int = 10
    alpha_every: int = 100
    width: int = 64
    num_layers: int = 2
    seed: int = 0


FAST_D = ProtocolDConfig(steps=60, probe_every=5, alpha_every=60, width=32, num_layers=1)


def _d_case(arch: str, config: ProtocolDConfig) -> tuple[Any, dict]:
    key = jax.random.key(config.seed + 1)
    rngs = nnx.Rngs(config.seed)
    w = config.width
    if arch == "mlp":
        batch = gdata.classification(key, n=512, dim=32, num_classes=8, separation=1.0)
        model = MLP([32, 2 * w, 2 * w, 8], activation=jax.nn.relu, rngs=rngs)
        head = heads.softmax_cross_entropy()
    elif arch == "cnn":
        batch = gdata.images(key, n=256, size=8, num_classes=10)
        model = CNN(channels=(16, 32), image_size=8, num_classes=10, rngs=rngs)
        head = heads.softmax_cross_entropy()
    elif arch == "transformer":
        batch = gdata.token_sequences(key, n=64, seq_len=16, vocab_size=32)
        model = TinyTransformerLM(vocab_size=32, d_model=w, num_heads=2,
                                  num_layers=config.num_layers,
                                  max_len=16, rngs=rngs)
        head = heads.softmax_cross_entropy()
    else:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {arch!r}")
    return from_nnx(model, head), batch


class ProtocolDResult(NamedTuple):
    """Result of :func:`run_protocol_d`.

    Attributes:
        config: settings used.
        runs: ``{architecture: {label: columns}}`` (``loss``, ``weights/<layer>/
            effective_rank`` / ``stable_rank`` / ``spectral_norm``, ``alpha/<layer>``).
        shapes: ``{architecture: {layer: (rows, cols)}}`` of the analysed matrices.
        log_paths: the JSONL logs.
        figures: written figure paths.
    """

    config: ProtocolDConfig
    runs: dict[str, dict[str, dict[str, np.ndarray]]]
    shapes: dict[str, dict[str, tuple[int, int]]]
    log_paths: list[str]
    figures: list[str]


def _adam_chunk(loss_fn: Callable, probe: probes.Probe, seed: int, fast: bool) -> Callable:
    base = jax.random.key(seed)

    def run(carry, idx, lr, batch):
        tx = optax.adam(lr)

        def one(c, step):
            params, opt_state, pstate = c
            metrics, pstate = probe(params, batch, jax.random.fold_in(base, step), pstate)
            loss, grads = jax.value_and_grad(loss_fn)(params, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            metrics = dict(metrics, loss=loss, update_ratio=tu.norm(updates) / tu.norm(params))
            return (optax.apply_updates(params, updates), opt_state, pstate), metrics

        return jax.lax.scan(one, carry, idx)

    return _jit(run, fast)


def run_protocol_d(
    config: ProtocolDConfig | None = None,
    *,
    fast: bool | None = None,
    log_dir: str | os.PathLike | None = DEFAULT_LOG_DIR,
    figure_dir: str | os.PathLike | None = DEFAULT_FIGURE_DIR,
) -> ProtocolDResult:
    """Protocol D: effective / stable rank and power-law alpha of every layer over training.

    An MLP (Gaussian blobs), a CNN (tiny template images) and a 2-block transformer LM
    (arithmetic token sequences) train with full-batch Adam at a normal and a 10x larger
    learning rate. The jitted weight probe logs every layer's effective rank (entropy of
    the normalised singular values), stable rank and spectral norm every ``probe_every``
    steps; the power-law exponent ``alpha`` of each layer's eigenvalue spectrum is fitted on
    the host (:func:`gradience_jax.weight_spectra`) every ``alpha_every`` steps (NaN for
    matrices too small for a fit).

    Args:
        config: settings (default: full, or :data:`FAST_D` in fast mode).
        fast: small settings (default: the ``GRADIENCE_FAST`` environment variable).
        log_dir: directory of the JSONL logs ``protocol_D_<arch>_<label>.jsonl``.
        figure_dir: where ``protocol_D_rank_evolution.png`` goes (None: no figure).

    Returns:
        :class:`ProtocolDResult`.

    Raises:
        ValueError: bad settings (unknown architecture); OSError: unwritable ``log_dir``.
    """
    fast = fast_mode(fast)
    if config is None:
        config = FAST_D if fast else ProtocolDConfig()
    bad = [a for a in config.architectures if a not in ARCHITECTURES]
    if bad:
        raise ValueError(f"architectures must be among {ARCHITECTURES}, got {bad}")
    _check_labels(config)
    steps, chunk = _check_steps(config.steps, config.alpha_every)
    writers = {
        (arch, lab): _open_log(log_dir, f"protocol_D_{arch}_{lab.replace(' ', '_')}", config,
                               {"architecture": arch, "lr": lr})
        for arch in config.architectures
        for lab, lr in zip(config.labels, config.learning_rates)
    }
    probe = probes.every(config.probe_every, probes.weight_metrics(
        fields=("effective_rank", "stable_rank", "spectral_norm")))
    runs: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    shapes: dict[str, dict[str, tuple[int, int]]] = {}
    for arch in config.architectures:
        adapted, batch = _d_case(arch, config)
        shapes[arch] = {path: _matrix_shape(np.shape(leaf), rule)
                        for path, rule, leaf in probes._weight_leaves(adapted.params, None)}
        chunk_fn = _adam_chunk(adapted.loss_fn, probe, config.seed, fast and arch != "cnn")
        runs[arch] = {}
        for lab, lr in zip(config.labels, config.learning_rates):
            writer = writers[(arch, lab)]
            tx_state = optax.adam(lr).init(adapted.params)
            carry = (adapted.params, tx_state, probe.init(adapted.params))
            _run_chunks(chunk_fn, carry, (jnp.asarray(lr, jnp.float32), batch), steps=steps,
                        chunk=chunk, writer=writer,
                        at_chunk_start=lambda c, s: _alpha_metrics(c[0]))
            runs[arch][lab] = _columns(writer)
    result = ProtocolDResult(config, runs, shapes, [str(w.path) for w in writers.values()], [])
    figures = plot_protocol_d(result, figure_dir) if figure_dir is not None else []
    return result._replace(figures=figures)


def _matrix_shape(shape: Sequence[int], rule: str) -> tuple[int, int]:
    """Shape of the 2-D matrix the weight metrics analyse (the ``weights`` reshape rules)."""
    shape = tuple(int(d) for d in shape)
    if rule == "leading":
        return math.prod(shape[:-1]), shape[-1]
    if rule == "trailing":
        return shape[0], math.prod(shape[1:])
    return shape[0], shape[1]


def plot_protocol_d(result: ProtocolDResult, figure_dir: str | os.PathLike | None) -> list[str]:
    """Figure of Protocol D: per architecture (columns) the effective rank as a fraction of
    the full rank, the stable rank and alpha of every layer (solid: normal learning rate,
    dashed: 10x), and the training losses."""
    archs = list(result.runs)
    fig = _new_figure((4.4 * len(archs), 11.0))
    axes = fig.subplots(4, len(archs), squeeze=False, sharex="col")
    styles = ["-", "--", ":", "-."]
    for j, arch in enumerate(archs):
        for i, (lab, c) in enumerate(result.runs[arch].items()):
            ls = styles[i % len(styles)]
            axes[0, j].semilogy(c["step"], c["loss"], ls, color="k", lw=1, label=lab)
            for li, key in enumerate(_layer_keys(c, "weights/", "effective_rank")):
                path = key[len("weights/"):-len("/effective_rank")]
                full = min(result.shapes[arch].get(path, (1, 1)))
                color = f"C{li % 10}"
                label = _short(key) if i == 0 else None
                s, er = _series(c, key)
                axes[1, j].plot(s, er / full, ls, color=color, lw=1, label=label)
                s, sr = _series(c, f"weights/{path}/stable_rank")
                axes[2, j].plot(s, sr, ls, color=color, lw=1, label=label)
                s, al = _series(c, f"alpha/{path}")
                if np.isfinite(al).any():
                    axes[3, j].plot(s, al, ls, color=color, marker="o", ms=3, lw=1, label=label)
        axes[0, j].set_title(arch)
        axes[0, j].set_ylabel("training loss")
        axes[1, j].set_ylabel("effective rank / full rank")
        axes[2, j].set_ylabel("stable rank")
        axes[3, j].set_ylabel(r"power-law $\alpha$ (ESD tail)")
        axes[3, j].set_xlabel("step")
        _legend(axes[0, j], fontsize=8)
        _legend(axes[1, j], fontsize=6, ncol=2)
        _legend(axes[3, j], fontsize=6)
    p = _save(fig, figure_dir, "protocol_D_rank_evolution.png")
    return [p] if p else []
