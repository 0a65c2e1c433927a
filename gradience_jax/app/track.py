"""``gradience-jax track``: curvature and weight metrics over a training run's checkpoints.

:func:`track` walks the checkpoints of a run (:func:`~gradience_jax.app.checkpoints.
checkpoint_steps`: an orbax ``CheckpointManager`` directory, or a folder of per-step msgpack
files / orbax directories) in step order and measures at each step

* the loss on the measurement batch,
* per operator (``hessian``, ``ggn``, ``ef``, ``kfac``): the top-``k`` eigenvalues
  (``gj.eigsh``, ``which="LA"``) with convergence and matvec count, and (``trace_samples >
  0``) the Hutchinson trace with its standard error,
* the weight-spectra summary (:func:`gradience_jax.weight_spectra`: mean / weighted alpha,
  stable and effective rank, spikes).

Lanczos is warm-started from the previous step's eigenvectors: ``v0`` is the sum of the
``k`` unit Ritz vectors plus a random vector of a tenth of its norm (so that no direction of
the new operator's top eigenspace is missing from the start vector); the results are the
converged eigenvalues of each step's operator, as an independent cold ``eigsh`` run finds
them (to ``tol``), in fewer matvecs when the spectrum moves slowly. Every step uses the
same probe key (common random numbers: trace curves are smooth in the step).

One telemetry record per checkpoint step goes to ``OUT/track.jsonl``
(:class:`~gradience_jax.telemetry.TelemetryWriter`: crash safe, the settings in its
header). Rerunning on the same ``OUT`` skips the steps already measured (the log is read
with :func:`~gradience_jax.telemetry.load_telemetry` and appended to with ``mode="a"``), so
tracking a run while it trains measures only the new checkpoints. The warm-start vectors
of the last measured step are kept beside the log (``OUT/warm_start.npz``, written
atomically after each step), so the first new step of a resumed run is warm-started too;
a missing, stale or unreadable file means a cold start (the latter two with a
:class:`UserWarning`). Settings that change the
measurement (model, data, operators, ``k``, ...) must match the log's (else a
``ValueError``; ``restart=True`` starts a fresh log). A step whose parameters hold NaN /
Inf is recorded with a ``status`` instead of curvature.

The report (``OUT/track.json``, ``OUT/report.md``, ``OUT/report.html`` and PNG figures of
:mod:`gradience_jax.plots.track`) shows every metric over the steps.

Supported names: :class:`TrackConfig`, :func:`track`, :func:`measure_step`,
:func:`read_log`, :data:`LOG_NAME`, :data:`WARM_NAME`, :data:`MEASUREMENT_KEYS`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gradience_jax._json import jsonable
from gradience_jax._validate import check_choice, check_int, check_real
from gradience_jax.app import checkpoints as ck
from gradience_jax.app.families import MODELS, dataset, split
from gradience_jax.app.report import HEADS, OPERATORS, REORTH, check_writable, make_head, versions
from gradience_jax.models.external import is_spec

PyTree = Any
Progress = Callable[[str, str], None]

LOG_NAME = "track.jsonl"
"""The telemetry log of a ``track`` output folder."""
WARM_NAME = "warm_start.npz"
"""The warm-start vectors of the last measured step, beside the log."""
SCHEMA = "gradience_jax.track/1"
"""The ``schema`` entry of ``track.json``."""
MEASUREMENT_KEYS = ("model", "data", "batches", "head", "input_key", "operators", "k", "tol",
                    "reorth", "trace_samples", "weights", "seed")
"""Settings that must equal the log's when a ``track`` run resumes."""
_WARM_NOISE = 0.1
_WEIGHT_KEYS = ("mean_alpha", "weighted_alpha", "mean_stable_rank", "mean_effective_rank",
                "mean_log10_lambda_max", "total_spikes", "num_layers")

__all__ = ["LOG_NAME", "MEASUREMENT_KEYS", "SCHEMA", "TrackConfig", "measure_step", "read_log",
           "track"]


@dataclasses.dataclass(frozen=True)
class TrackConfig:
    """Settings of :func:`track`.

    Attributes:
        model: a built-in family, a ``"module:factory"`` spec
            (:mod:`gradience_jax.models.external`) or None (the built-in family the first
            checkpoint matches).
        data: a ``"module:factory"`` spec of the measurement batch (needed for a
            ``module:factory`` model when curvature is measured); None: generated data of
            the built-in family (the first half, as ``analyze``). batches: batches of an
            iterable data factory to concatenate.
        head: ``"xent"`` or ``"mse"`` (a ``module:factory`` model's loss); input_key: the
            batch key of its inputs.
        operators: curvature operators measured (empty: weights only).
        k: eigenvalues per operator; iters: Lanczos matvec cap; tol: relative residual
            tolerance; reorth: ``full`` / ``window`` / ``none``.
        trace_samples: Hutchinson probes per operator and step (0: no trace).
        weights: measure the weight-spectra summary.
        warm_start: start Lanczos from the previous step's eigenvectors.
        seed: the probe seed (the same at every step).
        figures: draw the PNG figures.

    Raises:
        ValueError: (on construction) an unknown model / operator / reorth / head, a count
            out of range, ``iters < k``, a non-positive ``tol``; ``ArgumentTypeError`` (a
            ``ValueError``) for a value of the wrong kind.
    """

    model: str | None = None
    data: str | None = None
    batches: int = 1
    head: str = "xent"
    input_key: str = "inputs"
    operators: tuple[str, ...] = ("hessian",)
    k: int = 3
    iters: int = 200
    tol: float = 1e-6
    reorth: str = "full"
    trace_samples: int = 16
    weights: bool = True
    warm_start: bool = True
    seed: int = 0
    figures: bool = True

    def __post_init__(self):
        if self.model is not None and self.model not in MODELS and not is_spec(self.model):
            raise ValueError(f"model must be one of {MODELS} or a 'module:factory' spec, got "
                             f"{self.model!r}")
        if self.data is not None and not is_spec(self.data):
            raise ValueError(f"data must be a 'module:factory' spec, got {self.data!r}")
        bad = [o for o in self.operators if o not in OPERATORS]
        if bad:
            raise ValueError(f"operators must be a subset of {OPERATORS}, got "
                             f"{list(self.operators)}")
        if not self.operators and not self.weights:
            raise ValueError("nothing to measure: operators is empty and weights is False")
        check_choice(self.head, "head", tuple(HEADS))
        check_choice(self.reorth, "reorth", REORTH)
        check_int(self.batches, "batches")
        check_int(self.k, "k")
        check_int(self.iters, "iters")
        check_int(self.trace_samples, "trace_samples", lo=0)
        check_int(self.seed, "seed", lo=0, hi=2**32 - 1)
        check_real(self.tol, "tol", lo=0.0, lo_open=True)
        if self.iters < self.k:
            raise ValueError(f"iters ({self.iters}) must be >= k ({self.k}): Lanczos needs at "
                             "least k matvecs for k eigenvalues")

    def measurement(self) -> dict[str, Any]:
        """The settings of :data:`MEASUREMENT_KEYS` (JSON-safe)."""
        d = dataclasses.asdict(self)
        return jsonable({k: list(d[k]) if isinstance(d[k], tuple) else d[k]
                         for k in MEASUREMENT_KEYS})


# -- the model at each step ----------------------------------------------------------------


class _Model:
    """Builds the model at a checkpoint: a built-in family or a ``module:factory`` model."""

    def __init__(self, cfg: TrackConfig):
        self.cfg = cfg
        self.external = None
        self.family = cfg.model
        self.spec: dict | None = None
        if cfg.model is not None and is_spec(cfg.model):
            from gradience_jax.models import external  # noqa: PLC0415

            self.external = external.load_model(cfg.model, make_head(cfg.head), cfg.input_key)

    @property
    def name(self) -> str:
        return self.cfg.model if self.external is not None else str(self.family)

    def at(self, path: Path) -> Any:
        """:class:`~gradience_jax.models.Adapted` at the checkpoint ``path``."""
        if self.external is not None:
            from gradience_jax.models import external  # noqa: PLC0415

            try:
                return external.restore(self.external, ck.load_tree(path))
            except ck.CheckpointError:
                raise
            except ValueError as exc:
                raise ck.CheckpointError(f"checkpoint {path}: {exc}") from None
        restored = ck.restore_model(ck.load_checkpoint(path), self.family)
        self.family, self.spec = restored.model, restored.spec
        return restored.adapted


def _batch(cfg: TrackConfig, model: _Model) -> dict | None:
    if cfg.data is not None:
        from gradience_jax.models import external  # noqa: PLC0415

        return external.load_data(cfg.data, cfg.batches)
    if model.external is not None:
        if cfg.operators:
            raise ValueError(f"model {cfg.model} needs data to measure curvature: pass "
                             "data='module:factory' (--data)")
        return None
    key = jax.random.fold_in(jax.random.key(cfg.seed), 0)
    return split(dataset(model.family, model.spec, key)[0])[0]


# -- one step ------------------------------------------------------------------------------


def _warm_vector(vectors: PyTree, key: jax.Array) -> PyTree:
    """Sum of the stacked unit Ritz vectors plus a random tenth of its norm."""
    from gradience_jax import tree  # noqa: PLC0415

    total = jax.tree_util.tree_map(lambda x: x.sum(0), vectors)
    noise = tree.random_like(key, total)
    scale = _WARM_NOISE * tree.norm(total) / tree.norm(noise)
    return tree.axpy(scale, noise, total)


def measure_step(adapted: Any, batch: dict | None, cfg: TrackConfig,
                 warm: dict[str, PyTree] | None = None) -> tuple[dict[str, Any], dict]:
    """The metrics of one checkpoint.

    Args:
        adapted: the model at the step (``loss_fn``, ``model_fn``, ``params``, ``head``).
        batch: the measurement batch (None: weights only).
        cfg: the settings.
        warm: ``{operator: v0}`` from the previous step (updated in place), or None.

    Returns:
        ``(metrics, warm)``: ``metrics`` holds ``loss``; per operator ``<op>/lambda_<i>``
        (``i = 1..k``, descending), ``<op>/converged``, ``<op>/iterations``,
        ``<op>/matvecs``, ``<op>/warm_start``, ``<op>/trace``, ``<op>/trace_stderr``; the
        ``weights/<summary field>`` values; ``wall_time_s``. NaN / Inf parameters give
        ``status`` and the weights only.
    """
    from gradience_jax.app import measurements as ms  # noqa: PLC0415
    from gradience_jax.estimators import hutchinson_trace  # noqa: PLC0415
    from gradience_jax.spectrum import eigsh  # noqa: PLC0415
    from gradience_jax.weights import weight_spectra  # noqa: PLC0415

    t0 = time.perf_counter()
    warm = {} if warm is None else warm
    params = adapted.params
    metrics: dict[str, Any] = {}
    bad = ck.nonfinite_leaves(params)
    key = jax.random.key(cfg.seed)
    if bad:
        first = next(iter(bad))
        metrics["status"] = f"non-finite parameters in {len(bad)} array(s), e.g. {first}"
        warm.clear()
    elif batch is not None:
        metrics["loss"] = float(ms._loss_jit(adapted.loss_fn, params, batch))
        for name in cfg.operators:
            op = ms.build_operator(name, adapted, params, batch)
            if cfg.k > op.n_params:
                raise ValueError(f"k={cfg.k} exceeds the number of parameters of the "
                                 f"{op.name} operator (n_params={op.n_params})")
            v0 = warm.get(name) if cfg.warm_start else None
            res = eigsh(op, k=cfg.k, which="LA", reorth=cfg.reorth, key=key, tol=cfg.tol,
                        max_iters=cfg.iters, v0=v0, return_eigenvectors=cfg.warm_start,
                        true_residuals=False, seed=cfg.seed)  # vectors only for the next v0
            if cfg.warm_start:
                warm[name] = _warm_vector(res.eigenvectors, jax.random.fold_in(key, 7))
            for i, lam in enumerate(np.asarray(res.eigenvalues, np.float64)):
                metrics[f"{name}/lambda_{i + 1}"] = float(lam)
            metrics[f"{name}/converged"] = bool(res.converged)
            metrics[f"{name}/iterations"] = int(res.iterations)
            metrics[f"{name}/matvecs"] = int(res.operator_calls)
            metrics[f"{name}/warm_start"] = v0 is not None
            if cfg.trace_samples:
                t = hutchinson_trace(op, jax.random.fold_in(key, 1), cfg.trace_samples)
                metrics[f"{name}/trace"] = float(t.estimate)
                metrics[f"{name}/trace_stderr"] = float(t.stderr)
    if cfg.weights:
        s = weight_spectra(params).summary._asdict()
        for k in _WEIGHT_KEYS:
            metrics[f"weights/{k}"] = s.get(k)
    metrics["wall_time_s"] = time.perf_counter() - t0
    return metrics, warm


# -- warm start across resumes ---------------------------------------------------------------


def save_warm(path: Path, step: int, warm: Mapping[str, PyTree]) -> None:
    """Write ``{operator: v0}`` of ``step`` to ``path`` (npz; temporary file + rename)."""
    arrays = {"step": np.asarray(step, np.int64)}
    for name, vec in warm.items():
        for i, leaf in enumerate(jax.tree_util.tree_leaves(vec)):
            arrays[f"{name}/{i}"] = np.asarray(leaf)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_warm(path: Path, step: int, params: PyTree) -> dict[str, PyTree]:
    """The vectors saved by :func:`save_warm` for ``step``, shaped like ``params``.

    Returns ``{}`` (a cold start) when there is no file; with a :class:`UserWarning` when
    the file is of another step, unreadable, or does not match ``params``.
    """
    import warnings  # noqa: PLC0415

    if not path.exists():
        return {}
    leaves, treedef = jax.tree_util.tree_flatten(params)
    try:
        with np.load(path) as z:
            saved = int(z["step"])
            if saved != step:
                warnings.warn(f"{path} holds step {saved}, the log ends at step {step}: "
                              "the next step starts cold", UserWarning, stacklevel=3)
                return {}
            names = sorted({k.rsplit("/", 1)[0] for k in z.files if k != "step"})
            warm = {}
            for name in names:
                got = [z[f"{name}/{i}"] for i in range(len(leaves))]
                if any(g.shape != x.shape for g, x in zip(got, leaves)):
                    raise ValueError("leaf shapes differ from the checkpoint's parameters")
                warm[name] = jax.tree_util.tree_unflatten(
                    treedef, [jax.numpy.asarray(g, x.dtype) for g, x in zip(got, leaves)])
            return warm
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        warnings.warn(f"cannot read the warm-start vectors {path} ({e}): the next step "
                      "starts cold", UserWarning, stacklevel=3)
        return {}


# -- the log -------------------------------------------------------------------------------


def read_log(path: str | os.PathLike) -> tuple[dict, dict[int, dict[str, Any]]]:
    """A ``track`` log: its header and ``{step: metrics}`` (the last record of a step).

    Args:
        path: ``OUT/track.jsonl``.

    Returns:
        ``(header, {step: metrics})`` sorted by step.

    Raises:
        FileNotFoundError: no log; ValueError: not a telemetry log.
    """
    import warnings  # noqa: PLC0415

    from gradience_jax.telemetry import TelemetryWarning, load_telemetry  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TelemetryWarning)  # a torn last line: re-measured
        header, records = load_telemetry(path)
    by_step = {}
    for r in records:
        by_step[int(r.step)] = dict(r.metrics)
    return header, dict(sorted(by_step.items()))


def _check_resume(header: Mapping[str, Any], cfg: TrackConfig, log: Path) -> None:
    old = (header.get("config") or {}).get("measurement") or {}
    new = cfg.measurement()
    diffs = [f"{k}: {old.get(k)!r} in the log, {new[k]!r} now" for k in MEASUREMENT_KEYS
             if old.get(k) != new[k]]
    if diffs:
        raise ValueError(f"{log} was written with other settings ({'; '.join(diffs[:3])}): "
                         "use another output folder, or restart=True (--restart) to measure "
                         "again from scratch")


# -- the job -------------------------------------------------------------------------------


def _columns(by_step: Mapping[int, Mapping[str, Any]]) -> dict[str, list]:
    names: dict[str, None] = {}
    for m in by_step.values():
        for k in m:
            names.setdefault(k, None)
    return {k: [m.get(k) for m in by_step.values()] for k in names}


def _markdown(summary: Mapping[str, Any]) -> str:
    from gradience_jax.app.markdown import _md_table  # noqa: PLC0415

    cols = summary["columns"]
    scalar = [k for k, v in cols.items() if not k.endswith("warm_start")
              and all(x is None or isinstance(x, (int, float)) for x in v)]
    lines = ["# gradience_jax track report", "",
             f"Run `{summary['run_dir']}`, model `{summary['model']}`, "
             f"{len(summary['steps'])} checkpoint steps "
             f"({summary['measured']} measured now, {summary['skipped']} from the log).", ""]
    for name, file in (summary.get("figures") or {}).items():
        lines += [f"![{name}]({file})", ""]
    rows = [[s] + [cols[k][i] for k in scalar] for i, s in enumerate(summary["steps"])]
    lines += _md_table(["step"] + scalar, rows)
    lines += ["Settings: `" + json.dumps(summary["config"]) + "`", ""]
    return "\n".join(lines)


def track(run_dir: str | os.PathLike, cfg: TrackConfig | None = None,
          out: str | os.PathLike = "gradience_track", *, restart: bool = False,
          progress: Progress | None = None) -> dict[str, Any]:
    """Measure every checkpoint of a run; write the log, figures and report to ``out``.

    Args:
        run_dir: the run (:func:`~gradience_jax.app.checkpoints.checkpoint_steps`).
        cfg: :class:`TrackConfig` (default ``TrackConfig()``).
        out: output folder (created): ``track.jsonl``, ``track.json``, ``report.md``,
            ``report.html``, ``*.png``.
        restart: ignore (overwrite) an existing log instead of resuming it.
        progress: ``progress(key, description)`` called as each step starts.

    Returns:
        The summary (JSON-safe; also ``track.json``): ``steps``, ``columns`` (metric ->
        value per step), ``measured`` / ``skipped`` counts, ``figures``, ``files``.

    Raises:
        CheckpointError: no checkpoint in ``run_dir``, or one that cannot be read or does
            not match the model.
        FactoryError: a ``module:factory`` spec that cannot be resolved.
        ValueError: the log was written with other settings, ``k`` above the parameter
            count, a ``module:factory`` model without data.
        OSError: ``out`` cannot be written; TelemetryLockError: another ``track`` writes
            the same log.
    """
    from gradience_jax.telemetry import TelemetryWriter  # noqa: PLC0415

    cfg = TrackConfig() if cfg is None else cfg
    t_start = time.perf_counter()
    steps = ck.checkpoint_steps(run_dir)
    out_path = check_writable(out)
    log = out_path / LOG_NAME
    done: dict[int, dict] = {}
    mode = "w"
    if log.exists() and log.stat().st_size and not restart:
        header, done = read_log(log)
        _check_resume(header, cfg, log)
        mode = "a"
    model = _Model(cfg)
    todo = [(s, p) for s, p in steps if s not in done]
    batch = None
    if todo and cfg.operators:
        if model.external is None:
            model.at(todo[0][1])  # the family and sizes of the generated data
        batch = _batch(cfg, model)
    config = {"measurement": cfg.measurement(), "iters": cfg.iters,
              "warm_start": cfg.warm_start, "run_dir": str(run_dir)}
    measured = 0
    with TelemetryWriter(log, metadata={"kind": SCHEMA, "run_dir": str(run_dir)},
                         config=config, seed=cfg.seed, mode=mode) as writer:
        warm: dict[str, PyTree] = {}
        warm_file = out_path / WARM_NAME
        for n, (step, path) in enumerate(todo):
            if progress is not None:
                progress(f"step:{step}", f"step {step} ({measured + 1}/{len(todo)})")
            adapted = model.at(path)
            before = [s for s in done if s < step]
            if n == 0 and before and cfg.warm_start and batch is not None:
                warm = load_warm(warm_file, max(before), adapted.params)
            metrics, warm = measure_step(adapted, batch, cfg, warm)
            writer.write(step, metrics)
            done[step] = jsonable(metrics)
            measured += 1
            if cfg.warm_start and warm:
                save_warm(warm_file, step, warm)
            elif warm_file.exists():
                warm_file.unlink()
    header, by_step = read_log(log)
    in_run = {s for s, _ in steps}
    by_step = {s: m for s, m in by_step.items() if s in in_run}
    summary: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run_dir), "model": model.name,
        "config": jsonable(dataclasses.asdict(cfg)), "versions": versions(),
        "steps": list(by_step), "columns": _columns(by_step),
        "measured": measured, "skipped": len(steps) - measured,
        "figures": {}, "files": {}, "wall_time_s": None,
    }
    summary = jsonable(summary)
    if cfg.figures and by_step:
        from gradience_jax.plots.track import draw_track_figures  # noqa: PLC0415

        summary["figures"] = draw_track_figures(out_path, summary)
    _write(out_path, summary, t_start)
    return summary


def _write(out: Path, summary: dict, t_start: float) -> None:
    from gradience_jax.app.html import track_html  # noqa: PLC0415

    summary["files"] = {"log": LOG_NAME, "json": "track.json", "markdown": "report.md",
                        "html": "report.html", "figures": sorted(summary["figures"].values())}
    summary["wall_time_s"] = time.perf_counter() - t_start
    (out / "report.md").write_text(_markdown(summary))
    (out / "report.html").write_text(track_html(summary, out))
    (out / "track.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
