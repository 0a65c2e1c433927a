"""Run a research protocol and draw its figures: the table behind ``gradience-jax protocol``.

Supported names: :data:`PROTOCOLS` (``{name: Protocol(runner, config, fast_config,
plot)}``), :class:`Protocol`, :func:`run_protocol` and the one-call
:func:`run_protocol_a` ... :func:`run_protocol_d` (the run of
:mod:`gradience_jax.experiments.protocols` followed by the figures of
:mod:`gradience_jax.plots.protocols`, with the signature the notebooks and scripts use).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

from gradience_jax.experiments import protocols as ex
from gradience_jax.plots import protocols as figs

DEFAULT_FIGURE_DIR = "docs/figures"
"""Where the protocols' figures go by default (relative to the working directory)."""
DEFAULT_LOG_DIR = ex.DEFAULT_LOG_DIR

PathLike = str | os.PathLike | None

__all__ = [
    "DEFAULT_FIGURE_DIR",
    "DEFAULT_LOG_DIR",
    "PROTOCOLS",
    "Protocol",
    "run_protocol",
    "run_protocol_a",
    "run_protocol_b",
    "run_protocol_c",
    "run_protocol_d",
]


class Protocol(NamedTuple):
    """One protocol of :data:`PROTOCOLS`.

    Attributes:
        runner: ``runner(config, *, fast, log_dir) -> result`` (trains, logs, analyses).
        config: the settings class (its defaults are the full settings).
        fast_config: the small settings.
        plot: ``plot(result, figure_dir) -> [paths]``.
    """

    runner: Callable[..., Any]
    config: type
    fast_config: NamedTuple
    plot: Callable[[Any, PathLike], list[str]]


PROTOCOLS: dict[str, Protocol] = {
    "A": Protocol(ex.run_protocol_a, ex.ProtocolAConfig, ex.FAST_A, figs.plot_protocol_a),
    "B": Protocol(ex.run_protocol_b, ex.ProtocolBConfig, ex.FAST_B, figs.plot_protocol_b),
    "C": Protocol(ex.run_protocol_c, ex.ProtocolCConfig, ex.FAST_C, figs.plot_protocol_c),
    "D": Protocol(ex.run_protocol_d, ex.ProtocolDConfig, ex.FAST_D, figs.plot_protocol_d),
}
"""The protocols by name: Protocol A (edge of stability), B (grokking), C (Fisher
geometry), D (rank evolution)."""


def run_protocol(name: str, config: Any = None, *, fast: bool | None = None,
                 log_dir: PathLike = DEFAULT_LOG_DIR,
                 figure_dir: PathLike = DEFAULT_FIGURE_DIR) -> Any:
    """Run protocol ``name``, then draw its figures from the result.

    Args:
        name: a key of :data:`PROTOCOLS` (``"A"`` ... ``"D"``).
        config: its settings (None: full, or the fast ones in fast mode).
        fast: small settings (default: the ``GRADIENCE_FAST`` environment variable).
        log_dir: directory of the JSONL logs.
        figure_dir: where the figures go (None: no figures).

    Returns:
        The protocol's result with ``figures`` set to the written paths.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid ones) or bad settings.
        OSError: unwritable ``log_dir`` (before any training).
    """
    if name not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {name!r}")
    entry = PROTOCOLS[name]
    result = entry.runner(config, fast=fast, log_dir=log_dir)
    if figure_dir is None:
        return result
    return result._replace(figures=entry.plot(result, figure_dir))


def run_protocol_a(config: ex.ProtocolAConfig | None = None, *, fast: bool | None = None,
                   log_dir: PathLike = DEFAULT_LOG_DIR,
                   figure_dir: PathLike = DEFAULT_FIGURE_DIR) -> ex.ProtocolAResult:
    """Protocol A with its figures (see :func:`run_protocol`).

    :func:`gradience_jax.experiments.protocols.run_protocol_a`, then
    ``protocol_A_edge_of_stability.png`` and ``protocol_A_lead_lag.png``.

    Args:
        config: the protocol's settings (None: full, or the fast ones in fast mode).
        fast: small settings (default: the ``GRADIENCE_FAST`` environment variable).
        log_dir: directory of the JSONL logs.
        figure_dir: where the figures go (None: no figures).

    Returns:
        The protocol's result with ``figures`` set to the written paths.

    Raises:
        ValueError: bad settings.
        OSError: unwritable ``log_dir`` (before any training).
    """
    return run_protocol("A", config, fast=fast, log_dir=log_dir, figure_dir=figure_dir)


def run_protocol_b(config: ex.ProtocolBConfig | None = None, *, fast: bool | None = None,
                   log_dir: PathLike = DEFAULT_LOG_DIR,
                   figure_dir: PathLike = DEFAULT_FIGURE_DIR) -> ex.ProtocolBResult:
    """Protocol B with its figure (see :func:`run_protocol`).

    :func:`gradience_jax.experiments.protocols.run_protocol_b`, then
    ``protocol_B_grokking.png``.

    Args:
        config: the protocol's settings (None: full, or the fast ones in fast mode).
        fast: small settings (default: the ``GRADIENCE_FAST`` environment variable).
        log_dir: directory of the JSONL logs.
        figure_dir: where the figures go (None: no figures).

    Returns:
        The protocol's result with ``figures`` set to the written paths.

    Raises:
        ValueError: bad settings.
        OSError: unwritable ``log_dir`` (before any training).
    """
    return run_protocol("B", config, fast=fast, log_dir=log_dir, figure_dir=figure_dir)


def run_protocol_c(config: ex.ProtocolCConfig | None = None, *, fast: bool | None = None,
                   log_dir: PathLike = DEFAULT_LOG_DIR,
                   figure_dir: PathLike = DEFAULT_FIGURE_DIR) -> ex.ProtocolCResult:
    """Protocol C with its figure (see :func:`run_protocol`).

    :func:`gradience_jax.experiments.protocols.run_protocol_c`, then
    ``protocol_C_fisher_geometry.png``.

    Args:
        config: the protocol's settings (None: full, or the fast ones in fast mode).
        fast: small settings (default: the ``GRADIENCE_FAST`` environment variable).
        log_dir: directory of the JSONL logs.
        figure_dir: where the figures go (None: no figures).

    Returns:
        The protocol's result with ``figures`` set to the written paths.

    Raises:
        ValueError: bad settings.
        OSError: unwritable ``log_dir`` (before any training).
    """
    return run_protocol("C", config, fast=fast, log_dir=log_dir, figure_dir=figure_dir)


def run_protocol_d(config: ex.ProtocolDConfig | None = None, *, fast: bool | None = None,
                   log_dir: PathLike = DEFAULT_LOG_DIR,
                   figure_dir: PathLike = DEFAULT_FIGURE_DIR) -> ex.ProtocolDResult:
    """Protocol D with its figure (see :func:`run_protocol`).

    :func:`gradience_jax.experiments.protocols.run_protocol_d`, then
    ``protocol_D_rank_evolution.png``.

    Args:
        config: the protocol's settings (None: full, or the fast ones in fast mode).
        fast: small settings (default: the ``GRADIENCE_FAST`` environment variable).
        log_dir: directory of the JSONL logs.
        figure_dir: where the figures go (None: no figures).

    Returns:
        The protocol's result with ``figures`` set to the written paths.

    Raises:
        ValueError: bad settings.
        OSError: unwritable ``log_dir`` (before any training).
    """
    return run_protocol("D", config, fast=fast, log_dir=log_dir, figure_dir=figure_dir)
