"""The ``gradience-jax influence`` subcommand: its flags, their checks and the printed summary.

The work (training, scores, files) is :func:`gradience_jax.app.influence.run_influence`;
this module turns the command line into an
:class:`~gradience_jax.app.influence.InfluenceConfig` and prints what came back.

Supported names: :func:`add_parser`, :func:`command`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gradience_jax.app.cli_parser import (
    _common,
    _model_flags,
    _positive_int,
    _seed,
    _spec_flag,
    _train_steps,
)
from gradience_jax.app.console import (
    _console,
    _partial_failure,
    _print_json,
    _Stages,
    _summary_table,
)
from gradience_jax.app.families import MODELS
from gradience_jax.app.influence import (
    _PROG,
    INSPECTED_FRACTION,
    JSON_NAME,
    METHODS,
    OPERATORS,
    InfluenceConfig,
    InfluenceInputError,
    _fmt,
    _list,
    plan,
    prepare,
    run_influence,
)
from gradience_jax.app.report import MAX_SEED, check_writable

__all__ = ["add_parser", "command"]


def _number_flag(what: str, ok: Callable[[float], bool], auto: bool = False
                 ) -> Callable[[str], Any]:
    """An argparse ``type``: a finite number with ``ok(value)`` (or ``"auto"``)."""

    def parse(text: str) -> Any:
        if auto and text == "auto":
            return text
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (np.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


def _indices_flag(text: str) -> tuple[int, ...]:
    try:
        out = tuple(int(t) for t in text.split(","))
    except ValueError:
        out = ()
    if not out or any(t < 0 for t in out):
        raise argparse.ArgumentTypeError(f"expected comma-separated indices >= 0 (e.g. 0,5,17), "
                                         f"got {text!r}")
    return out


def add_parser(sub: Any) -> None:
    """Add the ``influence`` subcommand to the CLI's subparsers.

    Args:
        sub: ``parser.add_subparsers(...)`` of :func:`gradience_jax.app.cli_parser.build_parser`.
    """
    p = sub.add_parser(
        "influence", help="the training examples that matter for chosen test examples",
        description="Train the built-in model briefly (or load --model MODULE:FACTORY with "
        "--data), then compute influence functions (or TracIn): for each chosen test example "
        "the most helpful and most harmful training examples, and the self-influence ranking "
        "of the training examples; write influence.json, report.md, scores.npz and figures "
        "to --out.")
    _model_flags(p, f"model: a built-in family ({', '.join(MODELS)}; default mlp) or "
                     "your own as MODULE:FACTORY (needs --data)")
    p.add_argument("--test-data", type=_spec_flag, default=None, metavar="MODULE:FACTORY",
                   help="the test examples (default: the second half of --data)")
    p.add_argument("--method", choices=METHODS, default="cg", help="inverse-curvature solve, "
                   "or tracin (no inverse) (cg)")
    p.add_argument("--damping", type=_number_flag("'auto' or a number >= 0", lambda v: v >= 0,
                                                  auto=True), default="auto",
                   help="damping d >= 0 of (H + d I), or auto (auto)")
    p.add_argument("--operator", choices=OPERATORS, default=None,
                   help="curvature (ggn when the model has a model_fn, else hessian)")
    p.add_argument("--train", type=_positive_int, default=None, metavar="N",
                   help="score the first N training examples (all; 128 with --fast)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--test", type=_indices_flag, default=None, metavar="I,J,...",
                       help="test examples: indices into the test set")
    which.add_argument("--test-count", type=_positive_int, default=None, metavar="M",
                       help="test examples: the first M of the test set (4)")
    p.add_argument("--top", type=_positive_int, default=10,
                   help="helpful / harmful examples listed per test example (10)")
    p.add_argument("--planted-noise", type=_number_flag("a fraction in (0, 1)",
                                                        lambda v: 0 < v < 1),
                   default=0.0, metavar="FRAC",
                   help="flip the labels of this share of the training examples before "
                   "training and report the self-influence recall (built-in mlp / cnn data)")
    p.add_argument("--train-steps", type=_train_steps, default=None,
                   help="full-batch Adam steps (200, 60 with --fast; 0 for MODULE:FACTORY)")
    p.add_argument("--seed", type=_seed, default=None,
                   help=f"seed of data, init, noise and solves, 0..{MAX_SEED} (0)")
    p.add_argument("--tol", type=_number_flag("a number > 0", lambda v: v > 0), default=None,
                   help="relative residual target of the solves (the solver's default)")
    p.add_argument("--maxiter", type=_positive_int, default=None,
                   help="iteration cap of cg / lissa (the solver's default)")
    p.add_argument("--rank", type=_positive_int, default=None,
                   help="eigenpairs of arnoldi (the solver's default)")
    p.add_argument("--no-self-influence", action="store_true",
                   help="skip the self-influence ranking (one solve per training example)")
    p.add_argument("--out", default="gradience_influence",
                   help="output folder (gradience_influence)")
    p.add_argument("--fast", action="store_true", help="quick settings (also GRADIENCE_FAST=1)")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    _common(p)


_FLAGS = {"train_steps": "--train-steps", "test_count": "--test-count",
          "planted_noise": "--planted-noise", "test_data": "--test-data", "test[": "--test[",
          "train": "--train", "test": "--test", "top": "--top", "damping": "--damping",
          "seed": "--seed", "tol": "--tol", "maxiter": "--maxiter", "rank": "--rank",
          "operator": "--operator", "method": "--method", "batches": "--batches",
          "data": "--data", "model": "--model"}


def _config(args: argparse.Namespace) -> InfluenceConfig:
    from gradience_jax.environment import fast_mode  # noqa: PLC0415

    kw = {"model": args.model or "mlp", "data": args.data, "test_data": args.test_data,
          "batches": args.batches, "head": args.head, "input_key": args.input_key,
          "method": args.method, "damping": args.damping, "operator": args.operator,
          "train": args.train, "test": args.test, "test_count": args.test_count,
          "top": args.top, "planted_noise": args.planted_noise, "train_steps": args.train_steps,
          "seed": 0 if args.seed is None else args.seed, "tol": args.tol,
          "maxiter": args.maxiter, "rank": args.rank,
          "self_influence": not args.no_self_influence, "figures": not args.no_figures,
          "fast": args.fast or fast_mode()}
    try:
        return InfluenceConfig(**kw)
    except ValueError as exc:
        text = str(exc)
        for name, flag in _FLAGS.items():
            if text.startswith(name):
                text = flag + text[len(name):]
                break
        raise InfluenceInputError(f"{_PROG} influence: {text}") from None


def _rows(s: dict) -> list[tuple[str, str]]:
    rows = [("model", f"{s['model']['name']} ({s['model']['n_params']:,} params, "
                      f"{s['model']['source']})"),
            ("data", f"{s['data']['train']} train, test {s['data']['test_indices']}")]
    inf = s["influence"]
    if inf is not None:
        rec = inf["record"]
        rows.append(("method", f"{rec['method']} on {s['operator'] or '-'}, damping "
                     f"{_fmt(rec['damping'])}, max residual {_fmt(rec['max_residual'])}"))
        first = inf["tests"][0]
        rows += [(f"test {first['test_index']}: {k}", _list(first[k][:5]))
                 for k in ("helpful", "harmful")]
    if s["self_influence"] is not None:
        rows.append(("self-influence top", _list(s["self_influence"]["top"][:5])))
    if s["planted_noise"] is not None:
        rows.append(("planted-noise recall", f"{_fmt(s['planted_noise']['recall'])} at the top "
                     f"{INSPECTED_FRACTION:.0%} (chance {INSPECTED_FRACTION:g})"))
    rows.append(("wall time", f"{s['wall_times']['total']:.1f} s"))
    return rows


def command(args: argparse.Namespace) -> int:
    """``influence``: run :func:`run_influence` with the parsed flags and print the result.

    A progress bar while it runs, then a summary table (or the summary as JSON with
    ``--json``).

    Args:
        args: the parsed arguments.

    Returns:
        The exit code: 0, or 1 (after writing the output) when the result is unusable.

    Raises:
        InfluenceInputError: a bad flag value or combination, a ``--model`` / ``--data``
            spec that cannot be resolved, ``--train`` / ``--test`` / ``--top`` out of range
            for the data (the message starts with ``gradience-jax influence:``; the CLI
            makes it a usage error, exit code 2).
        OSError: ``--out`` is not writable.
    """
    from gradience_jax.models.external import FactoryError  # noqa: PLC0415

    cfg = _config(args)
    try:
        prepared = prepare(cfg)  # before any slow work
    except (FactoryError, InfluenceInputError) as exc:
        raise InfluenceInputError(f"{_PROG} influence: {exc}") from None
    check_writable(args.out)
    with _Stages(plan(cfg), enabled=not args.json) as stages:
        summary = run_influence(cfg, args.out, progress=stages, prepared=prepared)
    if not summary["ok"]:
        reason = summary["error"] or "; ".join(summary["problems"])
        message = f"influence result unusable: {reason} (files written to {args.out})"
        return _partial_failure(message, args.json, summary)
    if args.json:
        _print_json(summary)
        return 0
    con = _console()
    con.print(_summary_table(_rows(summary), "gradience-jax influence"))
    for w in summary["warnings"]:
        con.print(f"[yellow]warning:[/] {w}")
    con.print(f"report written to {Path(args.out) / 'report.md'} and {JSON_NAME}")
    return 0
