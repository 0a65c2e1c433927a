"""Argument checks of the telemetry modules (NumPy and the standard library only).

Shared by the writer (:mod:`~gradience_jax.telemetry.io`), the reader
(:mod:`~gradience_jax.telemetry.load`) and the sinks (:mod:`~gradience_jax.telemetry.sinks`);
``gradience_jax._validate`` imports jax, which the telemetry side does not.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gradience_jax.errors import ArgumentTypeError


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_int(value: Any, name: str, *, lo: int | None = None) -> int:
    """``value`` as an ``int``: Python / NumPy integers or a 0-d integer array, not a bool."""
    if isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be an integer, got the bool {value!r}")
    if not isinstance(value, (int, np.integer, str, bytes)) and hasattr(value, "__array__"):
        try:
            arr = np.asarray(value)
        except Exception as exc:  # e.g. a jax tracer inside jit
            raise ArgumentTypeError(
                f"{name} must be a concrete integer, got {type(value).__name__} (a traced "
                "value? telemetry is written on the host, outside jit)"
            ) from exc
        if arr.ndim == 0 and arr.dtype.kind in "iu":
            value = int(arr)
    if not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(
            f"{name} must be an integer, got {_short(value)} ({type(value).__name__})"
        )
    value = int(value)
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return value


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(
            f"{name} must be True or False, got {_short(value)} ({type(value).__name__})"
        )
    return bool(value)


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {_short(value)}")
    return value


def _check_path(value: Any, name: str) -> Path:
    """A ``str`` or ``os.PathLike`` naming a file (not bytes, not empty)."""
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if isinstance(text, str):
            if not text:
                raise ValueError(f"{name} must not be empty")
            return Path(text)
    raise ArgumentTypeError(
        f"{name} must be a str or os.PathLike file path, got {_short(value)} "
        f"({type(value).__name__})"
    )


def _check_mapping(value: Any, name: str) -> Mapping | None:
    if value is not None and not isinstance(value, Mapping):
        raise ArgumentTypeError(
            f"{name} must be a dict (a Mapping) or None, got {type(value).__name__}"
        )
    return value
