"""The telemetry log's format: its name and version, the header and the lines after it.

What makes line 1 a telemetry header and a later line a record or a marker, shared by the
writer's append mode (:mod:`~gradience_jax.telemetry.io`) and the reader
(:mod:`~gradience_jax.telemetry.load`); the format itself is described in
:mod:`gradience_jax.telemetry.io`. Also :class:`TelemetryWarning`, the one warning class of
the telemetry modules.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gradience_jax.telemetry._checks import _short

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "TelemetryWarning"]

FORMAT_NAME = "gradience_jax.telemetry"
"""The header's ``"format"`` value."""
FORMAT_VERSION = 1
"""The header's ``"format_version"`` value."""


class TelemetryWarning(UserWarning):
    """Recoverable telemetry problems: a torn last line, a failing TensorBoard mirror."""


def _header_problem(obj: Any) -> str | None:
    """Why the parsed line 1 is not a telemetry header (``None`` when it is one)."""
    if not isinstance(obj, dict):
        return f"line 1 is a JSON {type(obj).__name__}, not a telemetry header object"
    if obj.get("kind") != "header" or obj.get("format") != FORMAT_NAME:
        return (
            f'line 1 is JSON but not a telemetry header (expected "kind": "header" and '
            f'"format": "{FORMAT_NAME}", got kind={_short(obj.get("kind"), 30)}, '
            f'format={_short(obj.get("format"), 40)})'
        )
    version = obj.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return f"the header's format_version {_short(version, 30)} is not a positive integer"
    return None


def _parse_header(first: bytes, size: int, path: Path, hint: str = "") -> dict:
    """Line 1 of a log -> the header dict.

    Raises:
        ValueError: naming ``path`` and what is wrong (empty file, not JSON, not a header).
    """
    text = first.strip()
    if size == 0:
        problem = "the file is empty (0 bytes, no header)"
    elif not text:
        problem = "line 1 is blank (no header)"
    else:
        try:
            obj = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            problem = f"line 1 is not JSON (a torn or foreign first line: {text[:60]!r})"
        else:
            problem = _header_problem(obj)
            if problem is None:
                return obj
    raise ValueError(f"{str(path)!r} is not a telemetry log: {problem}{hint}")


def _parse_entry(raw: bytes) -> dict | None:
    """One line after the header -> a record / marker dict, or ``None`` if it is not one."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if _is_record(obj) or (isinstance(obj, dict) and obj.get("kind") in ("header", "resume",
                                                                         "end")):
        return obj
    return None


def _is_record(obj: Any) -> bool:
    if not isinstance(obj, dict) or "kind" in obj:
        return False
    step, when, nonfinite = obj.get("step"), obj.get("time"), obj.get("nonfinite", [])
    return (
        isinstance(step, int)
        and not isinstance(step, bool)
        and isinstance(obj.get("metrics"), dict)
        and (when is None or (isinstance(when, (int, float)) and not isinstance(when, bool)))
        and isinstance(nonfinite, list)
        and all(isinstance(k, str) for k in nonfinite)
    )
