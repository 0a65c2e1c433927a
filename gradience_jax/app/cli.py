"""The ``gradience-jax`` command.

Subcommands::

    gradience-jax analyze                      # train the default MLP, write gradience_report/
    gradience-jax analyze --model transformer --checkpoint ckpt.msgpack --operator ggn --k 5
    gradience-jax analyze --model my_model.py:build --data my_model.py:batches
    gradience-jax track RUN_DIR --model mlp    # metrics over a run's checkpoints
    gradience-jax weights PATH                 # weight-spectra table of a checkpoint
    gradience-jax influence --test 0,5 --planted-noise 0.1   # helpful / harmful examples
    gradience-jax protocol A --fast            # a research protocol (telemetry)
    gradience-jax figures                      # the seed figures into docs/figures/
    gradience-jax bench                        # the benchmark suite, quick mode

Every subcommand takes ``--json`` (machine-readable output on stdout) and ``--debug`` (full
traceback on failure). Exit codes: 0 ok, 1 failure (one-line reason on stderr), 2 bad usage.
Nothing is clamped or dropped silently: a flag value out of range, or a combination that
cannot run (``--iters`` below ``--k``, ``--k`` above the model's parameter count, a
checkpoint path that does not exist), is refused with exit code 2 and a message naming the
flag; a checkpoint that exists but cannot be read is a failure (exit code 1); a weight
matrix that cannot be analysed (NaN / Inf entries) is a ``FAILED`` row of the table and
makes ``weights`` (and ``analyze --weights-only``) exit 1 after writing their output.

The CLI compiles with XLA's cheap-compile settings (the built-in models are small, so
compile time dominates) unless ``XLA_FLAGS`` is set, and keeps a persistent compilation
cache in ``~/.cache/gradience_jax/xla`` so that repeated runs start fast
(``GRADIENCE_JAX_CACHE=off`` disables it, any other value is a cache directory).
``GRADIENCE_FAST=1`` selects the quick settings everywhere (as ``--fast``).

Supported names: :func:`main`, :func:`build_parser`, :func:`summarise`, :class:`UsageError`,
:class:`CLIError`, :data:`COMMANDS`, :data:`PROTOCOLS`, :data:`FIGURES`. The parser and
its flag types are in :mod:`gradience_jax.app.cli_parser`, the JAX set-up and terminal
output in :mod:`gradience_jax.app.console`. The work behind the commands is in
:mod:`gradience_jax.app.report` (``analyze``), :mod:`gradience_jax.app.track` (``track``),
:mod:`gradience_jax.app.influence` (``influence``; its flags in
:mod:`gradience_jax.app.influence_command`),
:mod:`gradience_jax.app.checkpoints` (``weights``), :mod:`gradience_jax.app.protocols`
(``protocol``) and :mod:`gradience_jax.app.seed_figures` (``figures``); they are imported
when their command runs, so ``--help`` stays fast and JAX is configured first.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gradience_jax.app.cli_parser import (
    FIGURES,
    PROG,
    PROTOCOLS,
    CLIError,
    UsageError,
    build_parser,
)
from gradience_jax.app.console import (
    _configure_jax,
    _console,
    _partial_failure,
    _print_json,
    _Stages,
    _summary_table,
)

__all__ = ["COMMANDS", "CLIError", "FIGURES", "PROTOCOLS", "UsageError", "build_parser",
           "main", "summarise"]


# =========================================================================================
# commands
# =========================================================================================


_FLAGS = {"k": "--k", "iters": "--iters", "train_steps": "--train-steps", "seed": "--seed"}


def _analysis_config(args: argparse.Namespace) -> Any:
    """The :class:`~gradience_jax.app.report.AnalysisConfig` of ``analyze``'s flags.

    Raises:
        UsageError: ``--iters`` below ``--k`` (given, or the default cap), or any value the
            config refuses (the message names the flag).
    """
    from gradience_jax.app.report import AnalysisConfig  # noqa: PLC0415
    from gradience_jax.environment import fast_mode  # noqa: PLC0415

    kw: dict[str, Any] = {"model": args.model, "checkpoint": args.checkpoint,
                          "weights_only": args.weights_only, "figures": not args.no_figures,
                          "data": args.data, "batches": args.batches, "head": args.head,
                          "input_key": args.input_key}
    if _is_factory(args.model) and args.train_steps is None:
        kw["train_steps"] = 0  # your model is analysed as the factory returns it
    if args.operator:
        kw["operators"] = tuple(dict.fromkeys(args.operator))
    for name in ("k", "iters", "reorth", "seed", "train_steps"):
        value = getattr(args, name)
        if value is not None:
            kw[name] = value
    fast = args.fast or fast_mode()
    base = AnalysisConfig().quick() if fast else AnalysisConfig()
    k = kw.get("k", base.k)
    iters = kw.get("iters", base.iters)
    if iters < k:  # before AnalysisConfig refuses it, with the flags' names
        if "iters" in kw:
            raise UsageError(f"{PROG} analyze: --iters {iters} is less than --k {k}: Lanczos "
                             "needs at least k matvecs for k eigenvalues")
        default = f"{base.iters}{' with --fast' if fast else ''}"
        raise UsageError(f"{PROG} analyze: --k {k} needs --iters >= {k} (the default cap is "
                         f"{default}); pass --iters")
    try:
        cfg = dataclasses.replace(base, **kw)  # explicit flags win over the (quick) defaults
    except ValueError as exc:
        text = str(exc)
        for name, flag in _FLAGS.items():
            if text.startswith(f"{name} "):
                text = flag + text[len(name):]
        raise UsageError(f"{PROG} analyze: {text}") from None
    return cfg


def _is_factory(model: str | None) -> bool:
    from gradience_jax.app.families import MODELS  # noqa: PLC0415

    return model is not None and model not in MODELS


def _resolve_model(cfg: Any, command: str) -> Any | None:
    """The model of ``--model`` / ``--checkpoint``, resolved before any slow work.

    Returns:
        :class:`~gradience_jax.app.checkpoints.Restored`, or None (a built-in family
        without a checkpoint: built by the job itself).

    Raises:
        UsageError: a ``--model`` / ``--data`` spec that cannot be resolved (a bad spec, a
            missing module or attribute, a raising factory, an unsupported result), a
            ``module:factory`` model without ``--data`` (unless weights only), an operator
            that needs the model function of a model given as a plain ``loss_fn``.
        CheckpointError: an unreadable / mismatched checkpoint, or NaN / Inf parameters
            when curvature is measured.
    """
    from gradience_jax.app import checkpoints as ck  # noqa: PLC0415
    from gradience_jax.app import report as rp  # noqa: PLC0415
    from gradience_jax.models.external import FactoryError  # noqa: PLC0415

    factory = _is_factory(cfg.model)
    if cfg.checkpoint is not None:
        _existing_checkpoint(cfg.checkpoint, command, "--checkpoint")
    if factory and cfg.data is None and not getattr(cfg, "weights_only", False):
        raise UsageError(f"{PROG} {command}: --model {cfg.model} needs --data MODULE:FACTORY "
                         "(the batches to measure on)")
    if not factory and cfg.checkpoint is None:
        restored = None
    else:
        try:
            restored, _ = rp.setup_model(cfg.model, cfg.checkpoint, cfg.seed, cfg.head,
                                         cfg.input_key)
        except FactoryError as exc:
            raise UsageError(f"{PROG} {command}: {exc}") from None
        bad = ck.nonfinite_leaves(restored.adapted.params)
        if bad and not getattr(cfg, "weights_only", False):
            first = next(iter(bad))
            where = f"checkpoint {cfg.checkpoint}" if cfg.checkpoint else f"model {cfg.model}"
            raise ck.CheckpointError(
                f"{where} has non-finite parameters in {len(bad)} "
                f"array(s), e.g. {first} ({bad[first]}): curvature needs finite parameters "
                "(--weights-only or `gradience-jax weights PATH` shows the other layers)")
        if restored.adapted.model_fn is None:
            needs = [o for o in cfg.operators if o in ("ggn", "kfac")]
            if needs:
                raise UsageError(f"{PROG} {command}: --operator {needs[0]} needs a model_fn; "
                                 f"--model {cfg.model} gives only a loss_fn (use hessian or "
                                 "ef, or return (loss_fn, model_fn, params))")
    if cfg.data is not None:
        from gradience_jax.models import external  # noqa: PLC0415

        try:
            external.load_factory(cfg.data, "--data")
        except FactoryError as exc:
            raise UsageError(f"{PROG} {command}: {exc}") from None
    return restored


def _check_k_fits(cfg: Any, restored: Any | None) -> None:
    """``--k`` must not exceed the model's parameter count (refused, not clamped).

    Args:
        cfg: the analysis settings.
        restored: the model restored from ``--checkpoint``, or None (the built-in default
            sizes of ``cfg.model``, counted from abstract shapes: nothing compiles).

    Raises:
        UsageError: ``cfg.k`` is larger than the number of parameters.
    """
    from gradience_jax.app import checkpoints as ck  # noqa: PLC0415
    from gradience_jax.tree import size  # noqa: PLC0415

    if cfg.weights_only:
        return
    if restored is not None:
        model, n = restored.model, size(restored.adapted.params)
    else:
        model = cfg.model or "mlp"
        n = ck.param_count(model)
    if cfg.k > n:
        raise UsageError(f"{PROG} analyze: --k {cfg.k} exceeds the number of parameters of "
                         f"the {model} model ({n:,}): at most {n} eigenvalues exist")


def _existing_checkpoint(path: str, command: str, flag: str) -> str:
    """``path`` when it exists; a missing checkpoint path is bad usage (exit code 2).

    Raises:
        UsageError: naming the argument and the path.
    """
    if not Path(path).expanduser().exists():
        raise UsageError(f"{PROG} {command}: checkpoint not found: {path} ({flag} must be a "
                         "flax msgpack file, an orbax checkpoint directory (item, step or run)"
                         + (" or a .safetensors checkpoint" if command == "weights" else "")
                         + ")")
    return path


def _failed_layers_message(failed: dict[str, str], what: str) -> str:
    names = ", ".join(list(failed)[:3]) + (f" (and {len(failed) - 3} more)"
                                           if len(failed) > 3 else "")
    return (f"{len(failed)} weight matri{'x' if len(failed) == 1 else 'ces'} of {what} could "
            f"not be analysed (FAILED rows): {names}; first reason: {next(iter(failed.values()))}")


def cmd_analyze(args: argparse.Namespace) -> int:
    """``analyze``: the main job (:func:`gradience_jax.app.report.analyze`).

    A progress bar while it runs, then a summary table (or the report as JSON with
    ``--json``).

    Args:
        args: the parsed arguments.

    Returns:
        The exit code: 0, or 1 when a weight matrix could not be analysed (the report is
        written and lists it under ``weights.failed``).

    Raises:
        UsageError: ``--iters`` below ``--k``, ``--k`` above the model's parameter count, a
            ``--checkpoint`` path that does not exist.
        CheckpointError: an unreadable / mismatched ``--checkpoint`` (before any slow
            work), or one with NaN / Inf parameters when curvature is measured.
        OSError: ``--out`` or ``--save-checkpoint``'s folder is not writable.
    """
    from gradience_jax.app import markdown as md  # noqa: PLC0415
    from gradience_jax.app import report as rp  # noqa: PLC0415
    from gradience_jax.models.external import FactoryError  # noqa: PLC0415

    cfg = _analysis_config(args)
    restored = _resolve_model(cfg, "analyze")  # fail before any slow work
    _check_k_fits(cfg, restored)
    rp.check_writable(args.out)
    if args.save_checkpoint:
        rp.check_writable(Path(args.save_checkpoint).expanduser().resolve().parent)
    with _Stages(rp.plan(cfg), enabled=not args.json) as stages:
        try:
            result = rp.analyze(cfg, out=args.out, progress=stages,
                                save_params_to=args.save_checkpoint, model=restored)
        except FactoryError as exc:  # a --data factory failing when called
            raise UsageError(f"{PROG} analyze: {exc}") from None
    failed = (result.get("weights") or {}).get("failed") or {}
    message = _failed_layers_message(failed, "the model") if failed else None
    if args.json:
        if message:
            return _partial_failure(message, True, result)
        _print_json(result)
        return 0
    con = _console()
    con.print(_summary_table(md.summary_rows(result), "gradience-jax analyze"))
    not_passed = [c["name"] for c in result.get("checks") or [] if not c["passed"]]
    if not_passed:
        con.print(f"[yellow]checks not passed:[/] {', '.join(not_passed)}")
    con.print(f"report written to {Path(args.out) / 'report.md'} and report.html")
    return _partial_failure(message, False, None) if message else 0


_TRACK_FLAGS = {"k": "--k", "iters": "--iters", "tol": "--tol", "seed": "--seed",
                "trace_samples": "--trace-samples", "batches": "--batches"}


def _track_config(args: argparse.Namespace) -> Any:
    """The :class:`~gradience_jax.app.track.TrackConfig` of ``track``'s flags.

    Raises:
        UsageError: a value the config refuses (the message names the flag), or
            ``--weights-only`` with ``--no-weights``.
    """
    from gradience_jax.app.track import TrackConfig  # noqa: PLC0415

    if args.weights_only and args.no_weights:
        raise UsageError(f"{PROG} track: --weights-only and --no-weights leave nothing to "
                         "measure")
    kw: dict[str, Any] = {"model": args.model, "data": args.data, "batches": args.batches,
                          "head": args.head, "input_key": args.input_key,
                          "weights": not args.no_weights, "warm_start": not args.no_warm_start,
                          "figures": not args.no_figures}
    kw["operators"] = () if args.weights_only else tuple(dict.fromkeys(args.operator or
                                                                       ("hessian",)))
    for name in ("k", "iters", "tol", "reorth", "seed", "trace_samples"):
        value = getattr(args, name)
        if value is not None:
            kw[name] = value
    try:
        return TrackConfig(**kw)
    except ValueError as exc:
        text = str(exc)
        for name, flag in _TRACK_FLAGS.items():
            text = text.replace(f"{name} (", f"{flag} (").replace(f"{name} must", f"{flag} must")
            if text.startswith(f"{name} "):
                text = flag + text[len(name):]
        raise UsageError(f"{PROG} track: {text}") from None


def cmd_track(args: argparse.Namespace) -> int:
    """``track RUN_DIR``: metrics over a run's checkpoints (:func:`gradience_jax.app.track.track`).

    A progress bar over the steps, then a table of the last step's metrics (or the
    summary as JSON with ``--json``).

    Args:
        args: the parsed arguments.

    Returns:
        The exit code (0).

    Raises:
        UsageError: ``RUN_DIR`` does not exist, a bad flag value, a ``--model`` / ``--data``
            spec that cannot be resolved, a ``module:factory`` model without ``--data``,
            ``--k`` above the parameter count, a log in ``--out`` written with other
            settings (pass ``--restart`` or another ``--out``).
        CheckpointError: no checkpoint in ``RUN_DIR``, or one that cannot be read / does
            not match the model.
        OSError: ``--out`` is not writable.
    """
    from gradience_jax.app import checkpoints as ck  # noqa: PLC0415
    from gradience_jax.app import track as tk  # noqa: PLC0415
    from gradience_jax.app.report import check_writable  # noqa: PLC0415
    from gradience_jax.models.external import FactoryError  # noqa: PLC0415
    from gradience_jax.tree import size  # noqa: PLC0415

    cfg = _track_config(args)
    if not Path(args.run_dir).expanduser().exists():
        raise UsageError(f"{PROG} track: run directory not found: {args.run_dir} (RUN_DIR must "
                         "be an orbax CheckpointManager directory or a folder of per-step "
                         "checkpoints)")
    steps = ck.checkpoint_steps(args.run_dir)
    first = _Probe(cfg, str(steps[0][1]))
    restored = _resolve_model(first, "track")
    if restored is not None and cfg.operators and cfg.k > size(restored.adapted.params):
        n = size(restored.adapted.params)
        raise UsageError(f"{PROG} track: --k {cfg.k} exceeds the number of parameters of the "
                         f"model ({n:,}): at most {n} eigenvalues exist")
    out = check_writable(args.out)
    log = out / tk.LOG_NAME
    if log.exists() and log.stat().st_size and not args.restart:
        try:
            header, _ = tk.read_log(log)
            tk._check_resume(header, cfg, log)
        except ValueError as exc:
            raise UsageError(f"{PROG} track: {exc}") from None
    with _Stages([(f"step:{s}", f"step {s}") for s, _ in steps], enabled=not args.json) as st:
        try:
            summary = tk.track(args.run_dir, cfg, out, restart=args.restart, progress=st)
        except FactoryError as exc:
            raise UsageError(f"{PROG} track: {exc}") from None
    if args.json:
        _print_json(summary)
        return 0
    cols = summary["columns"]
    rows = [("run", f"{summary['run_dir']} ({len(summary['steps'])} steps: "
                    f"{summary['measured']} measured, {summary['skipped']} from the log)"),
            ("model", str(summary["model"]))]
    last = summary["steps"][-1] if summary["steps"] else None
    for k, v in cols.items():
        if v and isinstance(v[-1], (int, float)) and not isinstance(v[-1], bool):
            rows.append((k, f"{v[-1]:.6g}"))
    con = _console()
    con.print(_summary_table(rows, f"gradience-jax track (step {last})"))
    con.print(f"log {out / tk.LOG_NAME}, report {out / 'report.md'} and report.html")
    return 0


def cmd_influence(args: argparse.Namespace) -> int:
    """``influence``: helpful / harmful training examples (:mod:`gradience_jax.app.influence`).

    Args:
        args: the parsed arguments.

    Returns:
        The exit code: 0, or 1 when the result is unusable (after writing its files).

    Raises:
        UsageError: bad flags, or flags that do not fit the model / data.
    """
    from gradience_jax.app import influence_command  # noqa: PLC0415
    from gradience_jax.app.influence import InfluenceInputError  # noqa: PLC0415

    try:
        return influence_command.command(args)
    except InfluenceInputError as exc:
        raise UsageError(str(exc)) from None


class _Probe:
    """What :func:`_resolve_model` reads of a config: the track settings at one checkpoint."""

    def __init__(self, cfg: Any, checkpoint: str):
        self.model, self.checkpoint, self.data = cfg.model, checkpoint, cfg.data
        self.seed, self.head, self.input_key = cfg.seed, cfg.head, cfg.input_key
        self.operators, self.weights_only = cfg.operators, not cfg.operators


def _safetensors_weights(path: str, out: str | None) -> tuple[dict, Any]:
    """Weight spectra of a ``.safetensors`` checkpoint, one tensor at a time.

    :func:`gradience_jax.weights.weight_spectra_from_file` (PyTorch layouts matricized by
    ``file_reshape``; LoRA pairs as their product); NaN / Inf tensors are ``FAILED`` rows.

    Raises:
        CheckpointError: an unreadable / corrupt file, or ``safetensors`` not installed.
    """
    from gradience_jax.app import checkpoints as ck  # noqa: PLC0415
    from gradience_jax.app import report as rp  # noqa: PLC0415
    from gradience_jax.weights import weight_spectra_from_file  # noqa: PLC0415

    try:
        rep = weight_spectra_from_file(path, check_finite=False)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ck.CheckpointError(f"cannot read checkpoint {path} ({ck._first_line(exc)})"
                                 ) from None
    return rp.write_weights_files(rep, out), rep


def cmd_weights(args: argparse.Namespace) -> int:
    """``weights PATH``: weight spectra of a checkpoint (a table, or JSON with ``--json``).

    A weight matrix that cannot be analysed (NaN / Inf entries, an empty axis) is a
    ``FAILED`` row of the table (``failed`` in the JSON) with its reason, and the command
    exits 1 after printing (and writing ``--out``); leaves that are not weight matrices
    (biases, vectors, integer arrays) are listed as skipped.

    Args:
        args: the parsed arguments.

    Returns:
        The exit code: 0, or 1 when a weight matrix failed.

    Raises:
        UsageError: ``PATH`` does not exist.
        CheckpointError: an unreadable / corrupt checkpoint.
        CLIError: the checkpoint holds no weight matrix.
    """
    from gradience_jax.app import checkpoints as ck  # noqa: PLC0415
    from gradience_jax.app import report as rp  # noqa: PLC0415

    path = _existing_checkpoint(args.path, "weights", "PATH")
    if ck.is_safetensors(path):
        data, rep = _safetensors_weights(path, args.out)
    else:
        data, rep = rp.write_weights_report(ck.load_checkpoint(path), args.out)
    if not len(rep) and not rep.failed:
        raise CLIError(f"no weight matrices in {args.path} ({len(rep.skipped)} leaves skipped)")
    data = {"path": str(args.path), **data}
    message = _failed_layers_message(rep.failed, str(args.path)) if rep.failed else None
    if args.json:
        if message:
            return _partial_failure(message, True, data)
        _print_json(data)
    else:
        _console().print(rep.to_table())
        if message:
            return _partial_failure(message, False, None)
    return 0


def summarise(obj: Any, max_items: int = 256, depth: int = 0) -> Any:
    """A JSON-safe summary of a result (what ``protocol`` writes and prints).

    NamedTuples / dataclasses / mappings become dicts, arrays with more than ``max_items``
    entries become ``{shape, min, max, mean, last}`` (finite values), flax objects a
    one-line description; non-finite floats become ``None``.

    Args:
        obj: any result.
        max_items: arrays up to this size are kept whole.
        depth: recursion depth (deeper than 12 levels: the type name).

    Returns:
        Data that ``json.dumps(..., allow_nan=False)`` accepts.
    """
    import numpy as np  # noqa: PLC0415 - only the protocol command summarises

    from gradience_jax._json import jsonable  # noqa: PLC0415 - as numpy

    if depth > 12:
        return str(type(obj).__name__)
    if hasattr(obj, "_asdict"):
        return {k: summarise(v, max_items, depth + 1) for k, v in obj._asdict().items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: summarise(getattr(obj, f.name), max_items, depth + 1)
                for f in dataclasses.fields(obj) if not f.name.startswith("_")}
    if isinstance(obj, dict):
        return {str(k): summarise(v, max_items, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [summarise(v, max_items, depth + 1) for v in obj]
    if hasattr(obj, "shape") and hasattr(obj, "dtype"):
        arr = np.asarray(obj)
        if arr.size <= max_items or not np.issubdtype(arr.dtype, np.number):
            return jsonable(arr) if arr.size <= max_items else f"array{arr.shape}"
        finite = arr[np.isfinite(arr)] if np.issubdtype(arr.dtype, np.floating) else arr
        stats = {"shape": list(arr.shape)}
        if finite.size:
            stats.update(min=finite.min(), max=finite.max(), mean=finite.mean(),
                         last=arr.reshape(-1)[-1])
        return jsonable(stats)
    if type(obj).__module__.startswith("flax"):
        return f"<{type(obj).__name__}>"
    return jsonable(obj)


def _protocol_config(name: str, fast: bool, seed: int | None) -> Any:
    """The settings ``protocol NAME`` runs with.

    None (the protocol's default, full or fast) without ``--seed``, else those defaults
    with the seed replaced.
    """
    if seed is None:
        return None
    from gradience_jax.app.protocols import PROTOCOLS  # noqa: PLC0415

    entry = PROTOCOLS[name]
    base = entry.fast_config if fast else entry.config()
    return base._replace(seed=seed)


def cmd_protocol(args: argparse.Namespace) -> int:
    """``protocol {A,B,C,D}``: one research protocol; logs, figures and a JSON summary.

    The protocol (:data:`gradience_jax.app.protocols.PROTOCOLS`) runs with its full (or,
    with ``--fast``, small) settings, ``--seed`` replacing their seed; logs go to
    ``OUT/logs``, figures to ``OUT/figures``, the summary to ``OUT/protocol_<name>.json``.

    Args:
        args: the parsed arguments.

    Returns:
        The exit code (0).

    Raises:
        OSError: ``--out`` is not writable.
    """
    from gradience_jax.app.protocols import run_protocol  # noqa: PLC0415
    from gradience_jax.app.report import check_writable  # noqa: PLC0415
    from gradience_jax.environment import fast_mode  # noqa: PLC0415

    fast = args.fast or fast_mode()
    out = check_writable(args.out or f"protocol_{args.name}")
    config = _protocol_config(args.name, fast, args.seed)
    label = f"protocol {args.name}{' (fast)' if fast else ''}"
    t0 = time.perf_counter()
    with _Stages([("run", label)], enabled=not args.json) as stages:
        stages("run", label)
        result = run_protocol(args.name, config, fast=fast, log_dir=str(out / "logs"),
                              figure_dir=str(out / "figures"))
    data = {"protocol": args.name, "fast": fast, "seed": args.seed,
            "wall_time_s": time.perf_counter() - t0, "out": str(out), "result": summarise(result)}
    (out / f"protocol_{args.name}.json").write_text(json.dumps(data, indent=1, allow_nan=False))
    if args.json:
        _print_json(data)
    else:
        _console().print(f"{label} done in {data['wall_time_s']:.1f} s: logs and figures in "
                         f"{out}, summary in {out / f'protocol_{args.name}.json'}")
    return 0


def _source_root() -> Path:
    import gradience_jax  # noqa: PLC0415 - the package imports jax

    return Path(gradience_jax.__file__).resolve().parents[1]


def cmd_figures(args: argparse.Namespace) -> int:
    """``figures``: regenerate the four seed figures (default into docs/figures/).

    Each figure of :data:`gradience_jax.app.seed_figures.SEED_FIGURES` runs its experiment
    (quick settings with ``--fast``) and is drawn from the result.

    Args:
        args: the parsed arguments.

    Returns:
        The exit code (0).

    Raises:
        OSError: the folder is not writable.
    """
    from gradience_jax.app.report import check_writable  # noqa: PLC0415
    from gradience_jax.app.seed_figures import draw_seed_figure  # noqa: PLC0415
    from gradience_jax.environment import fast_mode  # noqa: PLC0415

    fast = args.fast or fast_mode()
    out = check_writable(args.out or _source_root() / "docs" / "figures")
    names = list(dict.fromkeys(args.only or FIGURES))
    times: dict[str, float] = {}
    with _Stages([(n, n) for n in names], enabled=not args.json) as stages:
        for name in names:
            stages(name, name.replace("_", " "))
            t0 = time.perf_counter()
            draw_seed_figure(name, out / f"{name}.png", fast=fast)
            times[name] = time.perf_counter() - t0
    files = [f"{n}.png" for n in names]
    data = {"out": str(out), "fast": fast, "files": files, "wall_times": times}
    if args.json:
        _print_json(data)
    else:
        _console().print(f"{len(files)} figures in {out} ({sum(times.values()):.1f} s): "
                         + ", ".join(files))
    return 0


def _bench_commands(only: Sequence[str] | None, full: bool) -> list[tuple[str, list[str], Path]]:
    """``(name, command, cwd)`` of the benchmark run.

    ``benchmarks/run_all.py [--quick] [--only a,b]`` when the suite runner exists, else
    every ``benchmarks/*.py`` script.
    """
    root = _source_root() / "benchmarks"
    if not root.is_dir():
        raise CLIError(f"benchmarks/ not found next to the package ({root}); "
                       "run from a source checkout")
    scripts = {p.stem: p for p in sorted(root.glob("*.py"))
               if not p.stem.startswith("_") and p.stem != "run_all"}
    if not scripts:
        raise CLIError(f"no benchmark scripts in {root}")
    unknown = [n for n in only or () if n not in scripts]
    if unknown:
        raise UsageError(f"{PROG} bench: unknown benchmark(s) {', '.join(unknown)}; "
                         f"available: {', '.join(scripts)}")
    quick = [] if full else ["--quick"]
    runner = root / "run_all.py"
    if runner.exists():
        extra = ["--only", ",".join(dict.fromkeys(only))] if only else []
        return [("run_all", [sys.executable, str(runner), *quick, *extra], root.parent)]
    names = list(dict.fromkeys(only)) if only else list(scripts)
    return [(n, [sys.executable, str(scripts[n]), *quick], root.parent) for n in names]


def _run(name: str, cmd: list[str], cwd: Path, capture: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, text=True, stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None)
    shown = " ".join(Path(c).name if i < 2 else c for i, c in enumerate(cmd))
    out = {"name": name, "command": shown, "returncode": proc.returncode,
           "wall_time_s": time.perf_counter() - t0}
    if capture:
        out["stdout"] = proc.stdout[-20000:]
        if proc.returncode:
            out["stderr"] = proc.stderr[-4000:]
    return out


def cmd_bench(args: argparse.Namespace) -> int:
    """``bench``: the benchmark suite in quick mode (``benchmarks/run_all.py --quick``).

    Each suite prints its tables and writes JSON to ``benchmarks/results/``.

    Args:
        args: the parsed arguments.

    Returns:
        The exit code (0).

    Raises:
        CLIError: no benchmarks found, or a benchmark failed.
        UsageError: an unknown ``--only`` name.
    """
    runs = []
    for name, cmd, cwd in _bench_commands(args.only, args.full):
        if not args.json:
            _console(stderr=True).rule(f"benchmarks: {' '.join(Path(c).name for c in cmd[1:])}")
        runs.append(_run(name, cmd, cwd, capture=args.json))
    failed = [r["name"] for r in runs if r["returncode"] != 0]
    if args.json:
        _print_json({"quick": not args.full, "runs": runs, "failed": failed})
    if failed:
        raise CLIError(f"benchmark(s) failed: {', '.join(failed)}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "analyze": cmd_analyze,
    "track": cmd_track,
    "influence": cmd_influence,
    "weights": cmd_weights,
    "protocol": cmd_protocol,
    "figures": cmd_figures,
    "bench": cmd_bench,
}


# =========================================================================================
# entry point
# =========================================================================================


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, (CLIError, OSError, ValueError)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fail(message: str, code: int, as_json: bool) -> int:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    if as_json:
        _print_json({"ok": False, "exit_code": code, "error": message})
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gradience-jax``.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit code: 0 ok, 1 failure (one line on stderr), 2 bad usage, 130 interrupted.
        Nothing is raised: every failure becomes a one-line message (the traceback too
        with ``--debug``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        return _fail(str(exc), 2, as_json)
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    try:
        _configure_jax()
        return COMMANDS[args.command](args)
    except UsageError as exc:
        return _fail(str(exc), 2, as_json)
    except KeyboardInterrupt:
        return _fail("interrupted", 130, as_json)
    except Exception as exc:  # noqa: BLE001 - the CLI turns every failure into one line
        if debug:
            traceback.print_exc()
        hint = "" if debug or isinstance(exc, (CLIError, OSError, ValueError)) else \
            " (run with --debug for the traceback)"
        return _fail(_one_line(exc) + hint, 1, as_json)


if __name__ == "__main__":
    sys.exit(main())
