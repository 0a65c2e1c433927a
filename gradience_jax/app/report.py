"""The analysis job behind ``gradience-jax analyze``: measure a model, write a report folder.

:func:`analyze` trains a small model on generated data (or loads a checkpoint), then measures

* the top-``k`` eigenvalues of the Hessian and the GGN (or the operators asked for:
  ``hessian``, ``ggn``, ``ef``, ``kfac``) with every diagnostic of
  :class:`~gradience_jax.spectrum.SpectrumResult`,
* their traces (Hutchinson) and the Hessian's spectral density (stochastic Lanczos
  quadrature),
* the spectra of the weight matrices (:func:`~gradience_jax.weights.weight_spectra`),
* a 2-D loss-landscape slice along filter-normalised random directions,

runs consistency checks between them (Hutchinson vs SLQ trace, top-k sum vs trace, PSD-ness
of the GGN, ...) and writes ``report.json`` (every number with its diagnostics, versions,
seed, wall times), PNG figures, ``report.md`` embedding them, ``report.html`` (the same
report as one self-contained page: :mod:`gradience_jax.app.html`) and ``params.msgpack``
(the analysed parameters) into the output folder.

Your own model: ``AnalysisConfig(model="pkg.mod:factory", data="pkg.mod:batches")``
(:mod:`gradience_jax.models.external`); it is analysed at the factory's values (or at
``checkpoint``) after ``train_steps`` steps of training (the command line's default for
such a model is 0: analysed as given).

Supported names: :class:`AnalysisConfig`, :func:`analyze`, :func:`plan`, :func:`train`,
:func:`check_writable`, :func:`versions`, :func:`write_weights_report`, :data:`SCHEMA`,
:data:`OPERATORS`, :data:`REORTH`, :data:`VERSION_PACKAGES`, :data:`MAX_STEPS`,
:data:`MAX_SEED`. The measurements are in
:mod:`gradience_jax.app.measurements`, the text in :mod:`gradience_jax.app.markdown`, the
figures in :mod:`gradience_jax.plots.report`, checkpoints and built-in models in
:mod:`gradience_jax.app.checkpoints` / :mod:`gradience_jax.app.families`.

Example::

    from gradience_jax.app.report import AnalysisConfig, analyze
    report = analyze(AnalysisConfig(seed=0), out="gradience_report")
    report["curvature"]["hessian"]["top_k"]["eigenvalues"]
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gradience_jax import environment
from gradience_jax._json import jsonable
from gradience_jax._validate import check_choice, check_int, check_real
from gradience_jax.app import measurements as ms
from gradience_jax.app.checkpoints import (
    Restored,
    init_model,
    load_checkpoint,
    restore_model,
    save_checkpoint,
)
from gradience_jax.app.families import MODELS, dataset, split
from gradience_jax.app.markdown import markdown
from gradience_jax.models.external import is_spec

PyTree = Any
Progress = Callable[[str, str], None]

SCHEMA = "gradience_jax.report/1"
"""The ``schema`` entry of ``report.json``."""
OPERATORS = ("hessian", "ggn", "ef", "kfac")
"""The curvature operators :func:`analyze` can measure."""
REORTH = ("full", "window", "none")
"""Lanczos reorthogonalisation modes."""
MAX_STEPS = 10_000_000
"""Upper bound of ``iters`` and ``train_steps`` (larger values are refused, not clamped)."""
MAX_SEED = 2**32 - 1
"""Largest ``seed`` (seeds are 32-bit: ``0 <= seed <= MAX_SEED``)."""
HEADS = {"xent": "softmax cross-entropy on batch['labels']",
         "mse": "mean squared error on batch['targets']"}
"""The heads of a ``module:factory`` model (``AnalysisConfig.head``, ``--head``)."""
VERSION_PACKAGES = ("gradience-jax", "jax", "jaxlib", "flax", "optax", "numpy",
                    "orbax-checkpoint", "matplotlib")
"""Packages whose versions ``report.json`` records."""

__all__ = [
    "HEADS",
    "AnalysisConfig",
    "MAX_SEED",
    "MAX_STEPS",
    "OPERATORS",
    "REORTH",
    "SCHEMA",
    "VERSION_PACKAGES",
    "analyze",
    "check_writable",
    "load_data",
    "make_head",
    "plan",
    "setup_model",
    "train",
    "versions",
    "write_weights_files",
    "write_weights_report",
]


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
    """Settings of :func:`analyze` (defaults: the full job, about a minute on a laptop CPU).

    Attributes:
        model: ``"mlp"``, ``"cnn"`` or ``"transformer"`` (``None`` with a checkpoint: infer),
            or your own model as a ``"module:factory"`` spec
            (:mod:`gradience_jax.models.external`).
        checkpoint: a flax msgpack file, an orbax item directory, an orbax
            ``CheckpointManager`` step directory or run directory (its latest step);
            ``None``: the model as built (trained ``train_steps`` steps).
        data: a ``"module:factory"`` spec of the batch (needed for a ``module:factory``
            model unless ``weights_only``); ``None``: generated data matching a built-in
            family. batches: how many batches of an iterable data factory to concatenate.
        head: the loss on the model's outputs of a ``module:factory`` model, ``"xent"``
            (softmax cross-entropy on integer ``batch["labels"]``) or ``"mse"``
            (``batch["targets"]``); input_key: the batch key of the model's inputs.
        operators: curvature operators measured (``hessian``, ``ggn``, ``ef``, ``kfac``).
        k: eigenvalues per operator; iters: Lanczos iteration cap; reorth: ``full`` /
            ``window`` / ``none``; tol: relative residual tolerance.
        seed: one integer for data, initialisation, training and every probe.
        train_steps: full-batch Adam steps (learning rate ``learning_rate``).
        trace_samples: Hutchinson probes per operator.
        density_probes, density_iters: stochastic Lanczos quadrature settings.
        grid: points per axis of the 2-D landscape slice; span: its half-width.
        weights_only: skip everything that needs data (weight spectra only).
        figures: draw the PNG figures.
        fast: the quick settings were applied (recorded in the report).

    Raises:
        ValueError: (on construction) an unknown model / operator / reorth mode, a count
            out of range (``k``, ``iters``, ``trace_samples``, ``density_probes``,
            ``density_iters`` >= 1, ``grid`` >= 3, ``train_steps`` >= 0, ``iters`` and
            ``train_steps`` at most :data:`MAX_STEPS`, ``iters >= k``), a ``seed`` outside
            ``[0, 2**32)``, a non-positive or non-finite ``tol`` / ``learning_rate`` /
            ``span``. ``ArgumentTypeError`` (a ``ValueError``): a value of the wrong kind.
    """

    model: str | None = None
    checkpoint: str | None = None
    data: str | None = None
    batches: int = 1
    head: str = "xent"
    input_key: str = "inputs"
    operators: tuple[str, ...] = ("hessian", "ggn")
    k: int = 10
    iters: int = 60
    reorth: str = "full"
    tol: float = 1e-6
    seed: int = 0
    train_steps: int = 200
    learning_rate: float = 3e-3
    trace_samples: int = 64
    density_probes: int = 4
    density_iters: int = 48
    grid: int = 25
    span: float = 1.0
    weights_only: bool = False
    figures: bool = True
    fast: bool = False

    def __post_init__(self):
        if self.model is not None and self.model not in MODELS and not is_spec(self.model):
            raise ValueError(f"model must be one of {MODELS} or a 'module:factory' spec, got "
                             f"{self.model!r}")
        if self.data is not None and not is_spec(self.data):
            raise ValueError(f"data must be a 'module:factory' spec, got {self.data!r}")
        check_choice(self.head, "head", tuple(HEADS))
        check_int(self.batches, "batches")
        bad = [o for o in self.operators if o not in OPERATORS]
        if bad or not self.operators:
            raise ValueError(f"operators must be a non-empty subset of {OPERATORS}, "
                             f"got {list(self.operators)}")
        check_choice(self.reorth, "reorth", REORTH)
        for name in ("k", "trace_samples", "density_probes", "density_iters"):
            check_int(getattr(self, name), name)
        check_int(self.iters, "iters", hi=MAX_STEPS)
        check_int(self.grid, "grid", lo=3)
        check_int(self.train_steps, "train_steps", lo=0, hi=MAX_STEPS)
        check_int(self.seed, "seed", lo=0, hi=MAX_SEED)
        if self.iters < self.k:
            raise ValueError(f"iters ({self.iters}) must be >= k ({self.k}): Lanczos needs at "
                             "least k matvecs for k eigenvalues")
        for name in ("tol", "learning_rate", "span"):
            check_real(getattr(self, name), name, lo=0.0, lo_open=True)

    def quick(self) -> AnalysisConfig:
        """The same job with the quick settings (tests, CI): fewer steps, probes, points."""
        return dataclasses.replace(
            self, k=min(self.k, 5), iters=min(self.iters, 30),
            train_steps=min(self.train_steps, 60),
            trace_samples=min(self.trace_samples, 8), density_probes=min(self.density_probes, 2),
            density_iters=min(self.density_iters, 20), grid=min(self.grid, 9), fast=True,
        )


def plan(cfg: AnalysisConfig) -> list[tuple[str, str]]:
    """``(stage key, description)`` of every stage :func:`analyze` will run, in order.

    Args:
        cfg: the analysis settings.

    Returns:
        The stages as ``(key, description)`` pairs.
    """
    stages = [("setup", "building model and data")]
    if cfg.checkpoint is None:
        stages.append(("train", f"training {cfg.train_steps} steps"))
    if not cfg.weights_only:
        for op in cfg.operators:
            stages.append((f"top_k:{op}", f"{op}: top-{cfg.k} eigenvalues (Lanczos)"))
            stages.append((f"trace:{op}", f"{op}: trace (Hutchinson, {cfg.trace_samples} probes)"))
        stages.append(("density", "spectral density (SLQ)"))
        stages.append(("landscape", f"2-D landscape slice ({cfg.grid}x{cfg.grid})"))
    stages.append(("weights", "weight spectra"))
    if cfg.figures:
        stages.append(("figures", "figures"))
    stages.append(("write", "writing report"))
    return stages


def versions() -> dict[str, str]:
    """The versions ``report.json`` records.

    Returns:
        :func:`gradience_jax.environment.versions` of :data:`VERSION_PACKAGES` with
        ``device=True``: ``python``, ``platform``, each package (``gradience-jax``,
        ``jax``, ...), ``device`` and ``x64``.
    """
    return environment.versions(VERSION_PACKAGES, device=True)


def check_writable(out: str | os.PathLike) -> Path:
    """Create ``out`` (a directory) and verify a file can be written in it.

    Args:
        out: the folder.

    Returns:
        Its path (user-expanded).

    Raises:
        OSError: with a one-line reason when the folder cannot be created or written.
    """
    path = Path(out).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".gradience_write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OSError(f"cannot write to output folder {path}: {reason}") from None
    return path


def train(adapted: Any, batch: dict, steps: int, learning_rate: float) -> tuple[PyTree, np.ndarray]:
    """Full-batch Adam for ``steps`` steps in one compiled ``lax.scan``.

    :func:`gradience_jax.experiments.training.train_scan` with ``optax.adam``.

    Args:
        adapted: the model (``loss_fn``, ``params``).
        batch: the training batch.
        steps: optimiser steps (0: no training).
        learning_rate: Adam's learning rate.

    Returns:
        ``(trained params, (steps,) float64 loss before each step)``.
    """
    import optax  # noqa: PLC0415

    from gradience_jax.experiments.training import train_scan  # noqa: PLC0415

    if int(steps) == 0:
        return adapted.params, np.zeros(0, np.float64)
    res = train_scan(adapted.loss_fn, adapted.params, batch,
                     optimizer=optax.adam(float(learning_rate)), num_steps=int(steps),
                     key=jax.random.key(0))
    return res.params, np.asarray(res.step_loss, np.float64)


class _Run:
    """Bookkeeping of one job: stage timing, captured warnings, progress callbacks."""

    def __init__(self, progress: Progress | None):
        self.progress = progress
        self.wall: dict[str, float] = {}
        self.warnings: dict[str, list[str]] = {}

    def stage(self, key: str, description: str, fn: Callable[[], Any]) -> Any:
        if self.progress is not None:
            self.progress(key, description)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = fn()
        self.wall[key] = time.perf_counter() - t0
        msgs = list(dict.fromkeys(str(w.message).splitlines()[0] for w in caught))
        if msgs:
            self.warnings[key] = msgs
        return value


def make_head(name: str) -> Any:
    """The head named ``name`` (a key of :data:`HEADS`).

    Args:
        name: ``"xent"`` or ``"mse"``.

    Returns:
        ``gj.heads.softmax_cross_entropy()`` or ``gj.heads.mse()``.

    Raises:
        ValueError: another name.
    """
    from gradience_jax.operators import heads  # noqa: PLC0415

    check_choice(name, "head", tuple(HEADS))
    return heads.softmax_cross_entropy() if name == "xent" else heads.mse()


def setup_model(model: str | None, checkpoint: str | None = None, seed: int = 0,
                head: str = "xent", input_key: str = "inputs") -> tuple[Restored, str]:
    """The model to analyse and where it came from.

    Args:
        model: a built-in family, a ``module:factory`` spec, or None (inferred from the
            checkpoint; the MLP without one).
        checkpoint: a checkpoint path (:func:`~gradience_jax.app.checkpoints.load_tree`).
        seed: initialisation seed of a built-in family without a checkpoint.
        head: the head of a ``module:factory`` model (:data:`HEADS`).
        input_key: the batch key of a ``module:factory`` model's inputs.

    Returns:
        ``(Restored, source description)``; for a ``module:factory`` model ``Restored.model``
        is the spec, ``spec`` is ``{"factory", "kind"}`` and ``module`` what the factory
        returned.

    Raises:
        FactoryError: a ``module:factory`` spec that cannot be resolved.
        CheckpointError: a missing, unreadable or mismatched checkpoint.
    """
    if model is not None and is_spec(model):
        from gradience_jax.app.checkpoints import CheckpointError, load_tree  # noqa: PLC0415
        from gradience_jax.models import external  # noqa: PLC0415

        ext = external.load_model(model, make_head(head), input_key)
        adapted, source = ext.adapted, f"factory {model}"
        if checkpoint is not None:
            try:
                adapted = external.restore(ext, load_tree(checkpoint))
            except CheckpointError:
                raise
            except ValueError as exc:
                raise CheckpointError(f"checkpoint {checkpoint}: {exc}") from None
            source = f"checkpoint {checkpoint}"
        return Restored(model, {"factory": model, "kind": ext.kind}, ext.source, adapted), source
    if checkpoint is not None:
        restored = restore_model(load_checkpoint(checkpoint), model)
        return restored, f"checkpoint {checkpoint}"
    return init_model(model or "mlp", seed=seed), "trained here"


def load_data(cfg: AnalysisConfig, restored: Restored) -> tuple[dict, dict | None, str]:
    """``(analysis batch, held-out batch or None, description)`` of a job.

    ``cfg.data`` (a ``module:factory`` spec: the whole batch is analysed, nothing is held
    out), else the generated data of the built-in family (first half analysed, second
    half held out).

    Args:
        cfg: the settings (``data``, ``batches``, ``seed``).
        restored: the model (:func:`setup_model`).

    Returns:
        The batches and a one-line description.

    Raises:
        FactoryError: a ``data`` spec that cannot be resolved.
        ValueError: a ``module:factory`` model without ``data``.
    """
    if cfg.data is not None:
        from gradience_jax.models import external  # noqa: PLC0415

        batch = external.load_data(cfg.data, cfg.batches)
        return batch, None, f"--data {cfg.data}"
    if restored.model not in MODELS:
        raise ValueError(f"model {restored.model} needs data: pass data='module:factory' "
                         "(--data)")
    key = jax.random.fold_in(jax.random.key(cfg.seed), 0)
    data_all, desc = dataset(restored.model, restored.spec, key)
    train_batch, test_batch = split(data_all)
    return train_batch, test_batch, desc


def _source(cfg: AnalysisConfig) -> str:
    if cfg.checkpoint is not None:
        return f"checkpoint {cfg.checkpoint}"
    return f"factory {cfg.model}" if cfg.model is not None and is_spec(cfg.model) else \
        "trained here"


def _setup(cfg: AnalysisConfig) -> tuple[Restored, str]:
    return setup_model(cfg.model, cfg.checkpoint, cfg.seed, cfg.head, cfg.input_key)


def _curvature(run: _Run, name: str, adapted: Any, params: PyTree, batch: dict,
               cfg: AnalysisConfig) -> tuple[dict[str, Any], Any]:
    def top_k() -> tuple[Any, Any]:
        op = ms.build_operator(name, adapted, params, batch)
        return op, ms.top_k(op, cfg)

    op, res = run.stage(f"top_k:{name}", f"{name}: top-{cfg.k} eigenvalues (Lanczos)", top_k)
    tr = run.stage(f"trace:{name}", f"{name}: trace (Hutchinson, {cfg.trace_samples} probes)",
                   lambda: ms.trace(op, cfg))
    entry = {"top_k": res.to_dict(), "trace": tr,
             "warnings": (run.warnings.get(f"top_k:{name}", [])
                          + run.warnings.get(f"trace:{name}", [])),
             "wall_time_s": run.wall[f"top_k:{name}"] + run.wall[f"trace:{name}"]}
    coverage = getattr(op, "coverage", None)
    if coverage is not None:
        entry["coverage"] = jsonable(getattr(coverage, "to_dict", lambda: str(coverage))())
    return entry, op


def analyze(cfg: AnalysisConfig | None = None, out: str | os.PathLike | None = "gradience_report",
            progress: Progress | None = None, save_params_to: str | os.PathLike | None = None,
            *, model: Restored | None = None) -> dict[str, Any]:
    """Run the analysis job and write the report folder.

    Args:
        cfg: :class:`AnalysisConfig` (default: ``AnalysisConfig()``, quick settings when
            ``GRADIENCE_FAST=1``).
        out: output folder (created); ``None``: return the report without writing files.
        progress: ``progress(stage_key, description)`` called as each stage starts.
        save_params_to: also save the analysed parameters there (msgpack file or orbax dir).
        model: the model already built from ``cfg`` (:func:`setup_model`), so that a
            factory is not called twice; None: built here.

    Returns:
        The report dict (JSON-safe; the same content as ``report.json``).

    Raises:
        CheckpointError: missing / corrupt / mismatched checkpoint.
        OSError: ``out`` cannot be written.
        ValueError: bad settings.
    """
    cfg = AnalysisConfig() if cfg is None else cfg
    if environment.fast_mode() and not cfg.fast:
        cfg = cfg.quick()
    t_start = time.perf_counter()
    out_path = check_writable(out) if out is not None else None
    run = _Run(progress)
    restored, source = run.stage("setup", "building model and data",
                                 lambda: _setup(cfg) if model is None else
                                 (model, _source(cfg)))
    adapted = restored.adapted
    if cfg.weights_only and cfg.data is None and restored.model not in MODELS:
        train_batch, test_batch, data_desc = None, None, None
    else:
        train_batch, test_batch, data_desc = load_data(cfg, restored)
    params, curve = adapted.params, None
    if cfg.checkpoint is None and train_batch is not None:
        params, curve = run.stage("train", f"training {cfg.train_steps} steps",
                                  lambda: train(adapted, train_batch, cfg.train_steps,
                                                cfg.learning_rate))
    results: dict[str, Any] = {"curvature": {}, "density": None, "landscape": None}
    ops = {}
    if not cfg.weights_only:
        for name in cfg.operators:
            results["curvature"][name], ops[name] = _curvature(run, name, adapted, params,
                                                               train_batch, cfg)
        dens_op = "hessian" if "hessian" in ops else cfg.operators[0]
        results["density"] = run.stage("density", "spectral density (SLQ)",
                                       lambda: ms.density(ops[dens_op], cfg))
        results["density"]["operator"] = dens_op
        results["landscape"] = run.stage(
            "landscape", f"2-D landscape slice ({cfg.grid}x{cfg.grid})",
            lambda: ms.landscape_slice(adapted, params, train_batch, cfg))
    weights_dict, rep = run.stage("weights", "weight spectra", lambda: ms.weights(params))
    from gradience_jax.tree import size  # noqa: PLC0415

    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "seed": cfg.seed,
        "config": jsonable(dataclasses.asdict(cfg)),
        "model": {"name": restored.model, "spec": restored.spec, "n_params": size(params),
                  "source": source},
        "data": None if cfg.weights_only or train_batch is None else {
            "description": data_desc, "train_examples": _examples(train_batch),
            "test_examples": None if test_batch is None else _examples(test_batch),
            "shapes": {k: list(np.shape(v)) for k, v in train_batch.items()}},
        "training": None if curve is None else {
            "steps": cfg.train_steps, "optimizer": f"adam({cfg.learning_rate:g}), full batch",
            "loss_initial": curve[0] if len(curve) else None,
            "loss_final": curve[-1] if len(curve) else None, "loss_curve": curve},
        "loss": None if cfg.weights_only else ms.losses(adapted, params, train_batch, test_batch),
        "curvature": results["curvature"] or None,
        "density": results["density"],
        "weights": weights_dict,
        "landscape": results["landscape"],
        "checks": [] if cfg.weights_only else ms.consistency_checks(results["curvature"],
                                                                    results["density"]),
        "warnings": run.warnings,
        "figures": {},
        "files": {},
        "wall_times": {},
    }
    report = jsonable(report)
    if out_path is not None and cfg.figures:
        from gradience_jax.plots.report import draw_report_figures  # noqa: PLC0415

        report["figures"] = run.stage("figures", "figures",
                                      lambda: draw_report_figures(out_path, report, rep, curve))
    if save_params_to is not None:
        save_checkpoint(params, save_params_to)
    if out_path is not None:
        run.stage("write", "writing report", lambda: _write(out_path, report, params, run, t_start))
    else:
        report["wall_times"] = {**run.wall, "total": time.perf_counter() - t_start}
    return report


def _examples(batch: PyTree) -> int:
    return int(np.shape(jax.tree_util.tree_leaves(batch)[0])[0])


def _write(out: Path, report: dict, params: PyTree, run: _Run, t_start: float) -> None:
    from gradience_jax.app.html import analysis_html  # noqa: PLC0415

    save_checkpoint(params, out / "params.msgpack")
    report["files"] = {"json": "report.json", "markdown": "report.md", "html": "report.html",
                       "params": "params.msgpack", "figures": sorted(report["figures"].values())}
    report["wall_times"] = jsonable({**run.wall, "total": time.perf_counter() - t_start})
    report["warnings"] = jsonable(run.warnings)
    (out / "report.md").write_text(markdown(report))
    (out / "report.html").write_text(analysis_html(report, out))
    (out / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False))


def write_weights_report(pure: Mapping, out: str | os.PathLike | None = None) -> tuple[dict, Any]:
    """Weight spectra of any parameter tree; writes ``weights.json`` / ``weights.md`` to ``out``.

    Args:
        pure: a parameter dict (e.g. from :func:`gradience_jax.app.checkpoints.load_checkpoint`).
        out: folder to write to (created), or None.

    Returns:
        ``(JSON-safe dict, WeightSpectraReport)``.

    Raises:
        OSError: ``out`` cannot be written.
    """
    data, rep = ms.weights(pure)
    return write_weights_files(rep, out), rep


def write_weights_files(rep: Any, out: str | os.PathLike | None = None) -> dict:
    """``weights.json`` / ``weights.md`` of a weight-spectra report.

    Args:
        rep: a :class:`gradience_jax.WeightSpectraReport` (e.g. of
            :func:`gradience_jax.weights.weight_spectra_from_file`).
        out: folder to write to (created), or None.

    Returns:
        The JSON-safe dict (``rep.to_dict()``).

    Raises:
        OSError: ``out`` cannot be written.
    """
    data = jsonable(rep.to_dict())
    if out is not None:
        path = check_writable(out)
        (path / "weights.json").write_text(json.dumps(data, indent=1, allow_nan=False))
        (path / "weights.md").write_text("```\n" + rep.to_text() + "\n```\n")
    return data
