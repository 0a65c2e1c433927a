"""The ``gradience-jax`` command line: its parser, flag types and usage errors.

One ``_add_<command>`` per subcommand (``influence`` adds its own, from
:mod:`gradience_jax.app.influence_command`); flag types state their range in the message, and the
parser raises :class:`UsageError` (one line, exit code 2) instead of printing usage. The
commands themselves are in :mod:`gradience_jax.app.cli`.

Supported names: :func:`build_parser`, :class:`UsageError`, :class:`CLIError`,
:data:`PROG`, :data:`PROTOCOLS`, :data:`FIGURES`, :data:`MAX_STEPS`, :data:`MAX_SEED`
(re-exported by :mod:`gradience_jax.app.cli`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

PROG = "gradience-jax"
PROTOCOLS = ("A", "B", "C", "D")
"""Names of ``protocol``'s choices: the keys of :data:`gradience_jax.app.protocols.PROTOCOLS`."""
FIGURES = ("pseudo_spectral_analysis", "sharp_vs_flat_minima", "attention_geometry",
           "attention_training_dynamics")
"""Names of ``figures``' choices: the keys of
:data:`gradience_jax.app.seed_figures.SEED_FIGURES` (the files' stems)."""

__all__ = ["CLIError", "FIGURES", "MAX_SEED", "MAX_STEPS", "PROG", "PROTOCOLS", "UsageError",
           "build_parser"]


class UsageError(Exception):
    """Bad command-line usage (exit code 2)."""


class CLIError(Exception):
    """An expected failure with a one-line reason (exit code 1)."""


# =========================================================================================
# parser
# =========================================================================================


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` with one line instead of printing usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _int_flag(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[lo, hi]`` (the message states the range)."""
    what = (f"an integer in [{lo}, {hi}]" if hi is not None
            else "a positive integer" if lo == 1
            else "a non-negative integer" if lo == 0 else f"an integer >= {lo}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


MAX_STEPS = 10_000_000
"""Largest ``--iters`` / ``--train-steps`` (as :data:`gradience_jax.app.report.MAX_STEPS`)."""
MAX_SEED = 2**32 - 1
"""Largest ``--seed`` (as :data:`gradience_jax.app.report.MAX_SEED`)."""
_positive_int = _int_flag(1)
_nonnegative_int = _int_flag(0)
_steps = _int_flag(1, MAX_STEPS)
_train_steps = _int_flag(0, MAX_STEPS)
_seed = _int_flag(0, MAX_SEED)


def _model_flag(text: str) -> str:
    """An argparse ``type``: a built-in family or a ``module:factory`` spec."""
    from gradience_jax.app.families import MODELS  # noqa: PLC0415

    if text in MODELS or (":" in text and text.rpartition(":")[0].strip()
                          and text.rpartition(":")[2].strip()):
        return text
    raise argparse.ArgumentTypeError(
        f"invalid choice: {text!r} (choose from {', '.join(MODELS)}, or your model as a "
        "'module:factory' spec: 'package.module:factory' or 'path/to/file.py:factory')")


def _spec_flag(text: str) -> str:
    """An argparse ``type``: a ``module:factory`` spec."""
    if ":" in text and text.rpartition(":")[0].strip() and text.rpartition(":")[2].strip():
        return text
    raise argparse.ArgumentTypeError(
        f"expected a 'module:factory' spec ('package.module:factory' or "
        f"'path/to/file.py:factory'), got {text!r}")


def _model_flags(p: argparse.ArgumentParser, model_help: str) -> None:
    """``--model``, ``--data``, ``--batches``, ``--head``, ``--input-key``."""
    from gradience_jax.app.report import HEADS  # noqa: PLC0415

    p.add_argument("--model", type=_model_flag, default=None, metavar="MODEL", help=model_help)
    p.add_argument("--data", type=_spec_flag, default=None, metavar="MODULE:FACTORY",
                   help="your batches: a callable returning a dict of arrays or an iterable "
                   "of them (default: generated data of the built-in family)")
    p.add_argument("--batches", type=_int_flag(1, 1_000_000), default=1,
                   help="batches of an iterable --data to concatenate (1)")
    p.add_argument("--head", choices=tuple(HEADS), default="xent",
                   help="loss on a MODULE:FACTORY model's outputs: xent (softmax cross-entropy "
                   "on batch['labels']) or mse (batch['targets']) (xent)")
    p.add_argument("--input-key", default="inputs",
                   help="batch key of a MODULE:FACTORY model's inputs (inputs)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    p.add_argument("--debug", action="store_true", help="show the full traceback on failure")


def _add_analyze(sub: Any) -> None:
    from gradience_jax.app.families import MODELS  # noqa: PLC0415
    from gradience_jax.app.report import OPERATORS, REORTH  # noqa: PLC0415

    p = sub.add_parser(
        "analyze", help="measure curvature, spectra and landscape; write a report folder",
        description="Train the default model on generated data (or load --checkpoint), measure "
        "Hessian / GGN top-k, traces, spectral density, weight spectra and a 2-D landscape "
        "slice, and write report.json, report.md and PNG figures to --out.")
    _model_flags(p, f"model: a built-in family ({', '.join(MODELS)}; default mlp, with "
                 "--checkpoint inferred from the tree) or your own as MODULE:FACTORY (a "
                 "callable returning an nnx.Module, (linen_module, variables), an Equinox "
                 "module or (loss_fn, model_fn, params))")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="saved params: a flax msgpack file, an orbax checkpoint directory, or "
                   "an orbax CheckpointManager step or run directory (its latest step)")
    p.add_argument("--operator", choices=OPERATORS, action="append", default=None,
                   help="curvature operator; repeat for several (default: hessian and ggn)")
    p.add_argument("--k", type=_positive_int, default=None, help="eigenvalues per operator (10)")
    p.add_argument("--iters", type=_steps, default=None,
                   help="Lanczos matvec cap, >= --k (60; 30 with --fast)")
    p.add_argument("--reorth", choices=REORTH, default=None, help="reorthogonalisation (full)")
    p.add_argument("--seed", type=_seed, default=None,
                   help=f"seed of data, init and probes, 0..{MAX_SEED} (0)")
    p.add_argument("--train-steps", type=_train_steps, default=None,
                   help="full-batch Adam steps (200; 0 for a MODULE:FACTORY model)")
    p.add_argument("--out", default="gradience_report", help="report folder (gradience_report)")
    p.add_argument("--fast", action="store_true", help="quick settings (also GRADIENCE_FAST=1)")
    p.add_argument("--weights-only", action="store_true",
                   help="weight spectra only (no data, no curvature)")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    p.add_argument("--save-checkpoint", metavar="PATH",
                   help="also save the analysed params (PATH.msgpack: msgpack, else orbax dir)")
    _common(p)


def _add_track(sub: Any) -> None:
    from gradience_jax.app.families import MODELS  # noqa: PLC0415
    from gradience_jax.app.report import OPERATORS, REORTH  # noqa: PLC0415

    p = sub.add_parser(
        "track", help="curvature and weight metrics over a training run's checkpoints",
        description="Walk the checkpoints of RUN_DIR (an orbax CheckpointManager directory, or "
        "a folder of per-step msgpack files / orbax directories) in step order; at each step "
        "measure the top-k eigenvalues (Lanczos warm-started from the previous step), the "
        "trace and the weight-spectra summary; write OUT/track.jsonl (one telemetry record "
        "per step), track.json, report.md, report.html and figures. Rerunning skips the "
        "steps already in the log.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's checkpoint directory")
    _model_flags(p, f"model: a built-in family ({', '.join(MODELS)}; default: inferred from "
                 "the first checkpoint) or your own as MODULE:FACTORY")
    p.add_argument("--operator", choices=OPERATORS, action="append", default=None,
                   help="curvature operator; repeat for several (default: hessian)")
    p.add_argument("--k", type=_positive_int, default=None, help="eigenvalues per operator (3)")
    p.add_argument("--iters", type=_steps, default=None, help="Lanczos matvec cap, >= --k (200)")
    p.add_argument("--tol", type=float, default=None, help="Lanczos relative tolerance (1e-6)")
    p.add_argument("--reorth", choices=REORTH, default=None, help="reorthogonalisation (full)")
    p.add_argument("--trace-samples", type=_nonnegative_int, default=None,
                   help="Hutchinson probes per operator and step; 0: no trace (16)")
    p.add_argument("--weights-only", action="store_true",
                   help="weight spectra only (no data, no curvature)")
    p.add_argument("--no-weights", action="store_true", help="skip the weight spectra")
    p.add_argument("--no-warm-start", action="store_true",
                   help="start Lanczos from a random vector at every step")
    p.add_argument("--seed", type=_seed, default=None, help=f"probe seed, 0..{MAX_SEED} (0)")
    p.add_argument("--out", default="gradience_track", help="output folder (gradience_track)")
    p.add_argument("--restart", action="store_true",
                   help="measure every step again (overwrite the log instead of resuming)")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    _common(p)


def _add_influence(sub: Any) -> None:
    from gradience_jax.app.influence_command import add_parser  # noqa: PLC0415

    add_parser(sub)


def _add_weights(sub: Any) -> None:
    p = sub.add_parser("weights", help="weight-spectra table of a checkpoint",
                       description="Per-layer SVD metrics (alpha, stable / effective rank, MP "
                       "spikes) of every weight matrix in a checkpoint (any Flax params tree, "
                       "or a .safetensors file / sharded checkpoint).")
    p.add_argument("path", metavar="PATH", help="flax msgpack file, orbax checkpoint directory "
                   "(item, step or run), .safetensors file, index or folder")
    p.add_argument("--out", default=None, help="also write weights.json / weights.md there")
    _common(p)


def _add_protocol(sub: Any) -> None:
    p = sub.add_parser("protocol", help="run a research protocol (A-D) of the telemetry issue")
    p.add_argument("name", choices=PROTOCOLS, type=str.upper, help="protocol A, B, C or D")
    p.add_argument("--fast", action="store_true", help="quick settings (also GRADIENCE_FAST=1)")
    p.add_argument("--out", default=None, help="output folder (default protocol_<name>)")
    p.add_argument("--seed", type=_seed, default=None,
                   help=f"seed, 0..{MAX_SEED} (default: the protocol's)")
    _common(p)


def _add_figures(sub: Any) -> None:
    p = sub.add_parser("figures", help="regenerate the seed figures into docs/figures/")
    p.add_argument("--out", default=None, help="folder (default docs/figures of the source tree)")
    p.add_argument("--fast", action="store_true", help="quick settings (also GRADIENCE_FAST=1)")
    p.add_argument("--only", choices=list(FIGURES), action="append", default=None,
                   help="draw only this figure (repeatable)")
    _common(p)


def _add_bench(sub: Any) -> None:
    p = sub.add_parser("bench", help="run the benchmark suite (quick mode)")
    p.add_argument("--only", metavar="NAME", action="append", default=None,
                   help="run only benchmarks/NAME.py (repeatable)")
    p.add_argument("--full", action="store_true", help="full settings instead of --quick")
    _common(p)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``gradience-jax``.

    Returns:
        A parser whose ``error`` raises :class:`UsageError` (one line) instead of exiting;
        one subcommand per entry of :data:`COMMANDS`.
    """
    from gradience_jax import __version__  # noqa: PLC0415 - the package imports jax

    parser = _Parser(prog=PROG, description="Curvature and spectral geometry of neural networks "
                     "(JAX). Exit codes: 0 ok, 1 failure, 2 bad usage.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in (_add_analyze, _add_track, _add_influence, _add_weights, _add_protocol,
                _add_figures, _add_bench):
        add(sub)
    return parser
