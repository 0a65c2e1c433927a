"""``gradience-jax influence``: the training examples that matter for chosen test examples.

:func:`run_influence` builds the model (a built-in family trained ``train_steps`` full-batch
Adam steps on its generated data, as ``analyze`` does, or a ``module:factory`` model with
``--data``) and computes, on the first ``train`` training examples: for each chosen test
example the ``top`` most helpful and most harmful training examples
(:func:`gradience_jax.influence` on the GGN or the Hessian, or
:func:`gradience_jax.influence.tracin`), and the self-influence ranking (highest = most
surprising first; for TracIn ``sum_c lr_c |g_i(params_c)|^2``). With ``planted_noise``
(built-in classification data) that share of the training labels is replaced by another
class before training and the recall of the top 10 % of the ranking is reported (chance:
0.1). Self-influence reuses the influence solve's damping; TracIn's checkpoints are the
parameters after each fifth of training, weighted by Adam's learning rate times the steps
each stands for (the given parameters, weight 1, without training).

Files in ``out``: ``influence.json`` (every number and each
:class:`~gradience_jax.influence.InfluenceRecord`), ``report.md``, ``scores.npz`` (the
whole score arrays), ``params.msgpack`` and the PNG figures of
:mod:`gradience_jax.plots.influence`. A solve that did not converge is a warning; the result
is unusable (``ok: false``; the command exits 1 after writing its files) only when a score
is not finite or CG / LiSSA ended with a relative residual >= 1 (no better than ``x = 0``).
User guide: ``docs/inverse.md``, section "Command line".

Supported names: :class:`InfluenceConfig`, :class:`InfluenceInputError`,
:func:`run_influence`, :func:`prepare`, :func:`plan`, :func:`plant_label_noise`,
:data:`METHODS`, :data:`OPERATORS`, :data:`SCHEMA`, :data:`JSON_NAME`, :data:`FIGURE_TESTS`,
:data:`INSPECTED_FRACTION`. The subcommand's flags and printout are in
:mod:`gradience_jax.app.influence_command`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from gradience_jax._json import jsonable
from gradience_jax._validate import check_choice, check_int, check_real
from gradience_jax.app.families import MODELS, split
from gradience_jax.app.report import (
    HEADS,
    MAX_SEED,
    MAX_STEPS,
    check_writable,
    load_data,
    setup_model,
    versions,
)
from gradience_jax.models.external import is_spec

PyTree = Any
Progress = Callable[[str, str], None]

METHODS = ("cg", "lissa", "arnoldi", "kfac", "ekfac", "tracin")
"""``--method`` choices: the :func:`gradience_jax.solvers.solve` methods and TracIn."""
OPERATORS = ("ggn", "hessian")
"""``--operator`` choices: the curvature inverted."""
SCHEMA = "gradience_jax.influence/1"
"""The ``schema`` entry of ``influence.json``."""
JSON_NAME = "influence.json"
"""The summary file of an ``influence`` output folder."""
FIGURE_TESTS = 8
"""Test examples that get a figure (the first ones; every one is in the JSON)."""
INSPECTED_FRACTION = 0.1
"""The share of the self-influence ranking inspected for the planted-noise recall."""
TRACIN_CHECKPOINTS = 5
"""TracIn checkpoints of a model trained here (fewer when the steps do not divide)."""
LABELLED = ("mlp", "cnn")
"""Built-in families with one class label per example (``planted_noise`` applies)."""
_DIRECT = ("arnoldi", "kfac", "ekfac")
_PROG = "gradience-jax"
_SELF_CHUNK = 256

__all__ = ["FIGURE_TESTS", "INSPECTED_FRACTION", "JSON_NAME", "METHODS", "OPERATORS", "SCHEMA",
           "InfluenceConfig", "InfluenceInputError", "plan",
           "plant_label_noise", "prepare", "run_influence"]


class InfluenceInputError(ValueError):
    """Settings that do not fit the model or the data (the command's exit code 2)."""


@dataclasses.dataclass(frozen=True)
class InfluenceConfig:
    """Settings of :func:`run_influence`.

    Attributes:
        model: a built-in family (:data:`~gradience_jax.app.families.MODELS`) or a
            ``"module:factory"`` spec (:mod:`gradience_jax.models.external`).
        data: a ``"module:factory"`` spec of the data (required for a spec model; None:
            the generated data of the built-in family). Without ``test_data`` its first
            half is the training set and its second half the test set. batches: batches
            of an iterable data factory to concatenate.
        test_data: a ``"module:factory"`` spec of the test set (then ``data`` is the
            whole training set).
        head: ``"xent"`` or ``"mse"`` (a spec model's loss); input_key: its inputs' key.
        method: one of :data:`METHODS`.
        damping: ``d >= 0`` (``> 0`` for ``arnoldi`` / ``kfac`` / ``ekfac``) or ``"auto"``;
            not used by TracIn (only ``"auto"`` is accepted there).
        operator: ``"ggn"`` or ``"hessian"``; None: the GGN when the model has a
            ``model_fn``, else the Hessian. Not used by TracIn.
        train: the first ``train`` training examples are scored (None: all of them).
        test: indices into the test set; test_count: else its first ``test_count``
            examples (4 when both are None).
        top: helpful and harmful examples listed per test example (and self-influence
            entries listed).
        planted_noise: share of the ``train`` examples whose label is replaced by another
            class before training (0: none; built-in ``mlp`` / ``cnn`` data only).
        train_steps: full-batch Adam steps (None: 200 for a built-in family, 0 for a spec
            model); learning_rate: Adam's.
        seed: data, initialisation, label noise and the solves' Lanczos key.
        tol, maxiter, rank: the solves' options (None: the solver's defaults; ``maxiter``
            for ``cg`` / ``lissa``, ``rank`` for ``arnoldi`` only).
        self_influence: compute the self-influence ranking.
        figures: draw the PNG figures.
        fast: quick settings (60 training steps, the first 128 training examples) where
            ``train_steps`` / ``train`` are None.

    Raises:
        ValueError: (on construction) a value out of range or of the wrong kind (an
            ``ArgumentTypeError``), an unknown model / method / operator / head, an option
            for another method, ``planted_noise`` with data that is not built in, both
            ``test`` and ``test_count``, a spec model without ``data``, ``test_data``
            without ``data``.
    """

    model: str = "mlp"
    data: str | None = None
    test_data: str | None = None
    batches: int = 1
    head: str = "xent"
    input_key: str = "inputs"
    method: str = "cg"
    damping: float | str = "auto"
    operator: str | None = None
    train: int | None = None
    test: tuple[int, ...] | None = None
    test_count: int | None = None
    top: int = 10
    planted_noise: float = 0.0
    train_steps: int | None = None
    learning_rate: float = 3e-3
    seed: int = 0
    tol: float | None = None
    maxiter: int | None = None
    rank: int | None = None
    self_influence: bool = True
    figures: bool = True
    fast: bool = False

    def __post_init__(self):
        if self.model not in MODELS and not is_spec(self.model):
            raise ValueError(f"model must be one of {MODELS} or a 'module:factory' spec, got "
                             f"{self.model!r}")
        for name in ("data", "test_data"):
            value = getattr(self, name)
            if value is not None and not is_spec(value):
                raise ValueError(f"{name} must be a 'module:factory' spec, got {value!r}")
        if is_spec(self.model) and self.data is None:
            raise ValueError(f"model {self.model} needs data (a 'module:factory' spec of its "
                             "training examples)")
        if self.test_data is not None and self.data is None:
            raise ValueError("test_data needs data (the training examples)")
        check_int(self.batches, "batches")
        check_choice(self.head, "head", tuple(HEADS))
        check_choice(self.method, "method", METHODS)
        if self.operator is not None:
            check_choice(self.operator, "operator", OPERATORS)
        if self.damping != "auto":
            check_real(self.damping, "damping", lo=0.0, lo_open=self.method in _DIRECT)
        if self.train is not None:
            check_int(self.train, "train")
        if self.test is not None:
            if self.test_count is not None:
                raise ValueError("test and test_count exclude each other: give the indices or "
                                 "a count")
            if not isinstance(self.test, tuple) or not self.test:
                raise ValueError(f"test must be a non-empty tuple of indices, got {self.test!r}")
            for i, t in enumerate(self.test):
                check_int(t, f"test[{i}]", lo=0)
        if self.test_count is not None:
            check_int(self.test_count, "test_count")
        check_int(self.top, "top")
        check_real(self.planted_noise, "planted_noise", lo=0.0, hi=1.0)
        if self.planted_noise >= 1.0:
            raise ValueError(f"planted_noise must be below 1, got {self.planted_noise}")
        if self.planted_noise and (self.data is not None or self.model not in LABELLED):
            raise ValueError(f"planted_noise applies to the generated data of the built-in "
                             f"{' and '.join(LABELLED)} families (one class label per example), "
                             f"not to {self.data or self.model}")
        if self.train_steps is not None:
            check_int(self.train_steps, "train_steps", lo=0, hi=MAX_STEPS)
        check_real(self.learning_rate, "learning_rate", lo=0.0, lo_open=True)
        check_int(self.seed, "seed", lo=0, hi=MAX_SEED)
        if self.tol is not None:
            check_real(self.tol, "tol", lo=0.0, lo_open=True)
        if self.maxiter is not None:
            check_int(self.maxiter, "maxiter")
            if self.method not in ("cg", "lissa"):
                raise ValueError(f"maxiter applies to the cg and lissa methods, not to "
                                 f"{self.method!r}")
        if self.rank is not None:
            check_int(self.rank, "rank")
            if self.method != "arnoldi":
                raise ValueError(f"rank applies to the arnoldi method, not to {self.method!r}")
        if self.method == "tracin":
            given = [n for n in ("operator", "tol") if getattr(self, n) is not None]
            given += ["damping"] if self.damping != "auto" else []
            if given:
                raise ValueError(f"{given[0]} does not apply to method 'tracin' (no inverse)")

    @property
    def steps(self) -> int:
        """The training steps: ``train_steps``, else 200 (60 fast) built in, 0 for a spec."""
        if self.train_steps is not None:
            return self.train_steps
        return 0 if is_spec(self.model) else 60 if self.fast else 200


def plan(cfg: InfluenceConfig) -> list[tuple[str, str]]:
    """``(stage key, description)`` of every stage of :func:`run_influence`, in order.

    Args:
        cfg: the settings.

    Returns:
        The stages (the command's progress bar).
    """
    stages = [("setup", "building model and data")]
    if cfg.steps:
        stages.append(("train", f"training {cfg.steps} steps"))
    stages.append(("influence", f"influence ({cfg.method})"))
    if cfg.self_influence:
        stages.append(("self_influence", f"self-influence ({cfg.method})"))
    if cfg.figures:
        stages.append(("figures", "figures"))
    stages.append(("write", "writing report"))
    return stages


def plant_label_noise(batch: dict, fraction: float, num_classes: int,
                      key: jax.Array) -> tuple[dict, np.ndarray]:
    """Replace the labels of a random ``fraction`` of ``batch`` by another class.

    The same rule as :func:`gradience_jax.data.mislabelled_classification`, on given data.

    Args:
        batch: ``{"labels": (n,) int, ...}``.
        fraction: share of examples flipped, ``round(fraction * n)`` of them.
        num_classes: number of classes (``>= 2``).
        key: PRNG key.

    Returns:
        ``(batch with the new labels, sorted flipped indices)``.
    """
    labels = np.array(batch["labels"])
    n = labels.shape[0]
    kf, ks = jax.random.split(key)
    flipped = np.sort(np.asarray(jax.random.permutation(kf, n))[:round(fraction * n)])
    shift = np.asarray(jax.random.randint(ks, flipped.shape, 1, num_classes))
    labels[flipped] = (labels[flipped] + shift) % num_classes
    return dict(batch, labels=labels.astype(np.asarray(batch["labels"]).dtype)), flipped


# -- model and data ---------------------------------------------------------------------------


class Prepared(NamedTuple):
    """What :func:`prepare` resolved.

    The model, the examples scored and where they came from, the planted flips and the
    labels they replaced, and the wall time of :func:`prepare`.
    """

    restored: Any
    source: str
    train: dict
    test: dict
    test_indices: tuple[int, ...]
    n_train_available: int
    n_test_available: int
    description: str
    operator: str | None
    flipped: np.ndarray | None
    original_labels: np.ndarray | None
    wall_time_s: float


def _take(batch: PyTree, idx: Any) -> PyTree:
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[idx], batch)


def _count(batch: PyTree) -> int:
    return int(np.shape(jax.tree_util.tree_leaves(batch)[0])[0])


def prepare(cfg: InfluenceConfig) -> Prepared:
    """Build the model and select the examples; every check that needs no training.

    Args:
        cfg: the settings.

    Returns:
        :class:`Prepared` (the model at its initial / factory values).

    Raises:
        FactoryError: a ``model`` / ``data`` / ``test_data`` spec that cannot be resolved.
        InfluenceInputError: ``train`` above the training examples available, a test index
            out of range, ``top`` above ``train``, a GGN / K-FAC without ``model_fn``, a
            noise fraction that flips no example, data too small to split.
    """
    from gradience_jax.models import external  # noqa: PLC0415

    t0 = time.perf_counter()
    restored, source = setup_model(cfg.model, None, cfg.seed, cfg.head, cfg.input_key)
    train_all, test_all, desc = load_data(cfg, restored)
    if cfg.test_data is not None:
        test_all = external.load_data(cfg.test_data, cfg.batches, what="--test-data")
        desc = f"{desc}; test: --test-data {cfg.test_data}"
    elif test_all is None:
        if _count(train_all) < 2:
            raise InfluenceInputError(f"--data {cfg.data} gives {_count(train_all)} example: "
                                      "at least 2 to split into train and test halves (or "
                                      "pass --test-data)")
        train_all, test_all = split(train_all)
        desc = f"{desc} (first half train, second half test)"
    n_tr, n_te = _count(train_all), _count(test_all)
    n = n_tr if cfg.train is None else cfg.train
    if cfg.train is None and cfg.fast:
        n = min(n_tr, 128)
    if n > n_tr:
        raise InfluenceInputError(f"--train {n} exceeds the {n_tr} training examples "
                                  f"available ({desc})")
    tests = cfg.test if cfg.test is not None else tuple(range(cfg.test_count or 4))
    bad = [t for t in tests if t >= n_te]
    if bad:
        what = "--test index" if cfg.test is not None else "--test-count"
        shown = bad[0] if cfg.test is not None else len(tests)
        raise InfluenceInputError(f"{what} {shown} is out of range: the test set has {n_te} "
                                  f"examples (indices 0..{n_te - 1})")
    if cfg.top > n:
        raise InfluenceInputError(f"--top {cfg.top} exceeds the {n} training examples scored "
                                  "(--train)")
    has_model_fn = restored.adapted.model_fn is not None
    operator = None if cfg.method == "tracin" else cfg.operator or (
        "ggn" if has_model_fn else "hessian")
    if not has_model_fn and (operator == "ggn" or cfg.method in ("kfac", "ekfac")):
        need = f"--method {cfg.method}" if cfg.method in ("kfac", "ekfac") else "--operator ggn"
        raise InfluenceInputError(f"{need} needs a model_fn; --model {cfg.model} gives only a "
                                  "loss_fn (use --operator hessian with cg / lissa / arnoldi, "
                                  "or return (loss_fn, model_fn, params))")
    train, flipped, original = _take(train_all, slice(0, n)), None, None
    if cfg.planted_noise:
        spec = restored.spec
        classes = spec["sizes"][-1] if restored.model == "mlp" else spec["num_classes"]
        original = np.asarray(train["labels"]).copy()
        train, flipped = plant_label_noise(train, cfg.planted_noise, classes,
                                           jax.random.fold_in(jax.random.key(cfg.seed), 1))
        if not flipped.size:
            raise InfluenceInputError(f"--planted-noise {cfg.planted_noise} flips no example "
                                      f"of --train {n} (round({cfg.planted_noise} * {n}) = 0)")
    return Prepared(restored, source, train, _take(test_all, np.asarray(tests, int)),
                    tuple(int(t) for t in tests), n_tr, n_te, desc, operator, flipped, original,
                    time.perf_counter() - t0)


def _train(adapted: Any, batch: dict, steps: int, learning_rate: float
           ) -> tuple[PyTree, np.ndarray, list[PyTree], list[float]]:
    """``(params, step losses, TracIn checkpoints, their learning-rate weights)``."""
    if steps == 0:
        return adapted.params, np.zeros(0, np.float64), [adapted.params], [1.0]
    import optax  # noqa: PLC0415

    from gradience_jax.experiments.training import train_scan  # noqa: PLC0415

    parts = next(c for c in range(TRACIN_CHECKPOINTS, 0, -1) if steps % c == 0)
    every = steps // parts
    res = train_scan(adapted.loss_fn, adapted.params, batch, optimizer=optax.adam(learning_rate),
                     num_steps=steps, key=jax.random.key(0), record_every=every)
    ckpts = [jax.tree_util.tree_map(lambda x, i=i: x[i], res.trajectory)
             for i in range(1, parts + 1)]
    return res.params, np.asarray(res.step_loss, np.float64), ckpts, [learning_rate * every] * parts


# -- the scores -------------------------------------------------------------------------------


def _entries(order: np.ndarray, scores: np.ndarray, labels: np.ndarray | None) -> list[dict]:
    return [{"index": int(i), "score": float(scores[i]),
             **({} if labels is None else {"label": int(labels[i])})} for i in order]


def _labels(batch: dict) -> np.ndarray | None:
    lab = batch.get("labels") if isinstance(batch, dict) else None
    if lab is None or np.ndim(lab) != 1 or not np.issubdtype(np.asarray(lab).dtype, np.integer):
        return None
    return np.asarray(lab)


def _problems(scores: np.ndarray, record: Any, what: str) -> list[str]:
    out = []
    bad = int(np.sum(~np.isfinite(scores)))
    if bad:
        out.append(f"{what}: {bad} non-finite score(s)")
    if record.method in ("cg", "lissa") and record.max_residual >= 1.0:
        out.append(f"{what}: the {record.method} solves ended with a relative residual of "
                   f"{record.max_residual:.3g} (>= 1: no better than x = 0); raise --maxiter "
                   "or --damping")
    return out


def _approximation_note(record: Any, what: str) -> list[str]:
    """A warning when a direct method's inverse is far from the exact one (residual > 1)."""
    if record.method not in _DIRECT or record.max_residual <= 1.0:
        return []
    fix = "--rank or --damping" if record.method == "arnoldi" else "--damping"
    return [f"{what}: the {record.method} inverse is far from the exact one (relative "
            f"residual up to {record.max_residual:.3g}): the scores are an approximation; a "
            f"larger {fix} narrows the gap"]


def _tracin_self(loss_fn: Any, ckpts: list, lrs: list, train: dict) -> np.ndarray:
    """``sum_c lr_c |g_i(params_c)|^2``: the diagonal of TracIn(train, train), by chunks."""
    from gradience_jax.influence import tracin  # noqa: PLC0415

    n = _count(train)
    out = np.empty(n)
    for start in range(0, n, _SELF_CHUNK):
        part = _take(train, slice(start, start + _SELF_CHUNK))
        block = tracin(loss_fn, ckpts, part, part, learning_rates=lrs).scores
        out[start:start + block.shape[0]] = np.diag(block)
    return out


class _Scores(NamedTuple):
    influence: Any
    self_scores: np.ndarray | None
    self_record: Any


def _compute(cfg: InfluenceConfig, prep: Prepared, params: PyTree, ckpts: list, lrs: list,
             stage: Callable[[str, str], None]) -> _Scores:
    import gradience_jax as gj  # noqa: PLC0415
    from gradience_jax.influence import self_influence, tracin  # noqa: PLC0415

    a = prep.restored.adapted
    n = _count(prep.train)
    stage("influence", f"influence ({cfg.method}): {n} train x {len(prep.test_indices)} test")
    if cfg.method == "tracin":
        res = tracin(a.loss_fn, ckpts, prep.train, prep.test, learning_rates=lrs)
        if not cfg.self_influence:
            return _Scores(res, None, None)
        stage("self_influence", f"self-influence (tracin) of {n} examples")
        return _Scores(res, _tracin_self(a.loss_fn, ckpts, lrs, prep.train), None)
    op = (gj.ggn(a.model_fn, a.head, params, prep.train) if prep.operator == "ggn"
          else gj.hessian(a.loss_fn, params, prep.train))
    opts: dict[str, Any] = {"operator": op, "tol": cfg.tol, "maxiter": cfg.maxiter,
                            "rank": cfg.rank, "key": jax.random.key(cfg.seed), "warn": False}
    if cfg.method in ("kfac", "ekfac"):
        build = gj.kfac if cfg.method == "kfac" else gj.ekfac
        opts.update(model_fn=a.model_fn, head=a.head,
                    approx=build(a.model_fn, a.head, params, prep.train))
    res = gj.influence(a.loss_fn, params, prep.train, prep.test, method=cfg.method,
                       damping=cfg.damping, **opts)
    if not cfg.self_influence:
        return _Scores(res, None, None)
    stage("self_influence", f"self-influence ({cfg.method}) of {n} examples")
    s = self_influence(a.loss_fn, params, prep.train, method=cfg.method,
                       damping=res.record.damping, **opts)
    return _Scores(res, s.scores, s.record)


# -- the run ----------------------------------------------------------------------------------


def run_influence(cfg: InfluenceConfig, out: str | Path, progress: Progress | None = None, *,
                  prepared: Prepared | None = None) -> dict[str, Any]:
    """Compute the influence summary and write the output folder.

    Args:
        cfg: the settings.
        out: the output folder (created).
        progress: ``progress(stage_key, description)`` as each stage starts.
        prepared: :func:`prepare`'s result for ``cfg`` (so the model is not built twice).

    Returns:
        The summary, the content of ``influence.json`` (its keys: ``docs/inverse.md``):
        per test example ``helpful`` / ``harmful`` lists of ``{"index", "score"[,
        "label"]}``, most extreme first; the self-influence ``ranking``; ``ok``.

    Raises:
        FactoryError, InfluenceInputError: as :func:`prepare`.
        OSError: ``out`` is not writable.
    """
    from gradience_jax.app.checkpoints import save_checkpoint  # noqa: PLC0415
    from gradience_jax.app.measurements import losses  # noqa: PLC0415
    from gradience_jax.plots.influence import top_recall  # noqa: PLC0415
    from gradience_jax.tree import size  # noqa: PLC0415

    # a prepared model's setup time counts (in "setup" and "total")
    t_start = time.perf_counter() - (0.0 if prepared is None else prepared.wall_time_s)
    out_path = check_writable(out)
    wall: dict[str, float] = {}
    clock = {"key": None, "t": t_start}

    def stage(key: str, description: str) -> None:
        now = time.perf_counter()
        if clock["key"] is not None:
            wall[clock["key"]] = now - clock["t"]
        clock.update(key=key, t=now)
        if progress is not None and key != "done":
            progress(key, description)

    stage("setup", "building model and data")
    prep = prepare(cfg) if prepared is None else prepared
    a = prep.restored.adapted
    if cfg.steps:
        stage("train", f"training {cfg.steps} steps")
    params, curve, ckpts, lrs = _train(a, prep.train, cfg.steps, cfg.learning_rate)
    summary: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(), "config": jsonable(dataclasses.asdict(cfg)),
        "model": {"name": prep.restored.model, "n_params": size(params), "source": prep.source},
        "data": {"description": prep.description, "train_available": prep.n_train_available,
                 "test_available": prep.n_test_available, "train": _count(prep.train),
                 "test_indices": list(prep.test_indices)},
        "training": None if not cfg.steps else {
            "steps": cfg.steps, "optimizer": f"adam({cfg.learning_rate:g}), full batch",
            "loss_initial": curve[0], "loss_final": curve[-1]},
        "loss": losses(a, params, prep.train, prep.test),
        "method": cfg.method, "operator": prep.operator, "damping": None,
        "influence": None, "self_influence": None, "planted_noise": None,
        "ok": True, "problems": [], "warnings": [], "error": None,
        "figures": {}, "files": {}, "wall_times": {},
    }
    scores = None
    try:
        scores = _compute(cfg, prep, params, ckpts, lrs, stage)
    except FloatingPointError as exc:  # a non-finite loss, gradient or solve residual
        summary.update(ok=False, error=f"{type(exc).__name__}: {' '.join(str(exc).split())}")
    if scores is not None:
        _fill(summary, cfg, prep, scores, top_recall)
    summary = jsonable(summary)
    if cfg.figures and scores is not None:
        stage("figures", "figures")
        summary["figures"] = _figures(out_path, summary, prep, scores)
    stage("write", "writing report")
    save_checkpoint(params, out_path / "params.msgpack")
    arrays = {"test_indices": np.asarray(prep.test_indices), "flipped": prep.flipped,
              "influence": None if scores is None else scores.influence.scores,
              "self_influence": None if scores is None else scores.self_scores}
    np.savez(out_path / "scores.npz", **{k: v for k, v in arrays.items() if v is not None})
    stage("done", "done")
    summary["files"] = {"json": JSON_NAME, "markdown": "report.md", "scores": "scores.npz",
                        "params": "params.msgpack", "figures": sorted(summary["figures"].values())}
    summary["wall_times"] = jsonable({**wall, "total": time.perf_counter() - t_start})
    (out_path / "report.md").write_text(_markdown(summary))
    (out_path / JSON_NAME).write_text(json.dumps(summary, indent=1, allow_nan=False))
    return summary


def _fill(summary: dict, cfg: InfluenceConfig, prep: Prepared, scores: _Scores,
          top_recall: Callable) -> None:
    res = scores.influence
    rec = res.record
    tracin = rec.kind == "tracin"
    labels = _labels(prep.train)
    test_labels = _labels(prep.test)
    tests = []
    for row, t in enumerate(prep.test_indices):
        top = res.top(cfg.top, test_index=row)
        helpful, harmful = ((top["highest"], top["lowest"]) if tracin
                            else (top["lowest"], top["highest"]))
        entry = {"test_index": t, "helpful": _entries(helpful, res.scores[row], labels),
                 "harmful": _entries(harmful, res.scores[row], labels)}
        if test_labels is not None:
            entry["label"] = int(test_labels[row])
        tests.append(entry)
    summary["damping"] = rec.damping
    summary["influence"] = {"record": rec.to_dict(), "sign": rec.sign, "tests": tests}
    summary["problems"] += _problems(res.scores, rec, "influence")
    summary["warnings"] += [f"influence: {w}" for w in rec.warnings]
    summary["warnings"] += _approximation_note(rec, "influence")
    if scores.self_scores is not None:
        s = scores.self_scores
        ranking = np.argsort(s, kind="stable")[::-1]
        srec = scores.self_record
        summary["self_influence"] = {
            "record": None if srec is None else srec.to_dict(),
            "definition": ("sum_c lr_c |g_i(params_c)|^2 (TracIn of the example on itself)"
                           if tracin else srec.sign),
            "top": _entries(ranking[:cfg.top], s, labels), "ranking": ranking.tolist()}
        if srec is not None:
            summary["problems"] += _problems(s, srec, "self-influence")
            summary["warnings"] += [f"self-influence: {w}" for w in srec.warnings]
            summary["warnings"] += _approximation_note(srec, "self-influence")
        elif not np.all(np.isfinite(s)):
            summary["problems"].append("self-influence: non-finite score(s)")
    if prep.flipped is not None:
        noise = {"fraction": cfg.planted_noise, "flipped": prep.flipped.tolist(),
                 "labels": np.asarray(prep.train["labels"])[prep.flipped].tolist(),
                 "original_labels": prep.original_labels[prep.flipped].tolist(),
                 "inspected_fraction": INSPECTED_FRACTION, "recall": None,
                 "chance": INSPECTED_FRACTION}
        if scores.self_scores is not None:
            noise["recall"] = top_recall(scores.self_scores, prep.flipped, INSPECTED_FRACTION)
        summary["planted_noise"] = noise
    summary["ok"] = not summary["problems"]


def _figures(out: Path, summary: dict, prep: Prepared, scores: _Scores) -> dict[str, str]:
    from gradience_jax.plots.influence import (  # noqa: PLC0415
        plot_influence_examples,
        plot_self_influence,
    )

    figs = {}
    res = scores.influence
    for row, t in enumerate(prep.test_indices[:FIGURE_TESTS]):
        name = f"influence_test{t}.png"
        plot_influence_examples(res, row, k=8, path=str(out / name),
                                title=f"{res.record.method}: training examples that matter "
                                f"for test example {t}")
        figs[f"test{t}"] = name
    if scores.self_scores is not None:
        tracin = res.record.kind == "tracin"
        plot_self_influence(scores.self_scores if tracin else
                            res._replace(scores=scores.self_scores,
                                         record=scores.self_record),
                            prep.flipped, fraction=INSPECTED_FRACTION,
                            path=str(out / "self_influence.png"),
                            title="TracIn self-influence" if tracin else None,
                            ylabel=r"$\sum_c \eta_c |g_i|^2$" if tracin else None)
        figs["self_influence"] = "self_influence.png"
    return figs


# -- report.md --------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _list(entries: Sequence[dict]) -> str:
    def score(v: Any) -> str:
        return "-" if v is None else f"{v:.3g}"

    return ", ".join(f"#{e['index']} ({score(e['score'])}" + (f", label {e['label']}"
                                                            if "label" in e else "") + ")"
                     for e in entries)


def _markdown(s: dict) -> str:
    cfg = s["config"]
    lines = ["# gradience-jax influence", "",
             f"Model **{s['model']['name']}** ({s['model']['n_params']:,} parameters, "
             f"{s['model']['source']}); data: {s['data']['description']}; "
             f"{s['data']['train']} training examples scored (of "
             f"{s['data']['train_available']}), test examples {s['data']['test_indices']}.", ""]
    if s["training"]:
        t = s["training"]
        lines += [f"Training: {t['steps']} steps of {t['optimizer']}, loss "
                  f"{_fmt(t['loss_initial'])} -> {_fmt(t['loss_final'])}.", ""]
    loss = s["loss"]
    lines += [f"Loss train / test: {_fmt(loss['train'])} / {_fmt(loss['test'])}; accuracy: "
              f"{_fmt(loss['train_accuracy'])} / {_fmt(loss['test_accuracy'])}.", ""]
    if s["error"]:
        lines += [f"**Failed:** {s['error']}", ""]
    notes = ([f"- **unusable:** {p}" for p in s["problems"]]
             + [f"- warning: {w}" for w in s["warnings"]])
    lines += notes + [""] * bool(notes)
    inf = s["influence"]
    if inf is not None:
        rec = inf["record"]
        lines += ["## Influence", "",
                  f"Method **{rec['method']}**, curvature {s['operator'] or '-'}, damping "
                  f"{_fmt(rec['damping'])}, max relative residual {_fmt(rec['max_residual'])}, "
                  f"converged: {'yes' if rec['converged'] else 'no'}, "
                  f"{_fmt(rec['wall_time_s'])} s. Sign: {inf['sign']}.", "",
                  f"| test example | label | top {cfg['top']} helpful | top {cfg['top']} "
                  "harmful |", "|---|---|---|---|"]
        for t in inf["tests"]:
            lines.append(f"| {t['test_index']} | {t.get('label', '-')} | {_list(t['helpful'])} "
                         f"| {_list(t['harmful'])} |")
        lines.append("")
    si = s["self_influence"]
    if si is not None:
        lines += ["## Self-influence", "", f"{si['definition']}.", "",
                  f"Highest first: {_list(si['top'])}.", ""]
    noise = s["planted_noise"]
    if noise is not None:
        lines += ["## Planted label noise", "",
                  f"{len(noise['flipped'])} of {s['data']['train']} training labels "
                  f"({noise['fraction']:g}) replaced by another class before training. "
                  f"Recall of the top {noise['inspected_fraction']:.0%} of the self-influence "
                  f"ranking: **{_fmt(noise['recall'])}** (chance {noise['chance']:g}).", ""]
    lines += [x for key, name in s["figures"].items() for x in (f"![{key}]({name})", "")]
    return "\n".join(lines)
