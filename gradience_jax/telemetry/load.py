"""Reading telemetry logs back: the header-checking loader, its recovery, NumPy columns.

:func:`load_telemetry` refuses a file whose line 1 is not a telemetry header (naming the
path and the problem) and recovers what a crash or a damaged file leaves: a torn last line
is dropped with a :class:`~gradience_jax.telemetry.schema.TelemetryWarning`; corrupt lines
and NUL-byte runs elsewhere are skipped with one warning listing their line numbers, the
intact JSON between NUL runs kept (``strict=True`` refuses such a file). :func:`to_columns`
turns the :class:`TelemetryRecord` s into NumPy columns aligned with the steps. The file
format is described in :mod:`gradience_jax.telemetry.io`.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from gradience_jax.errors import ArgumentTypeError
from gradience_jax.telemetry._checks import _check_bool, _check_path, _short
from gradience_jax.telemetry.schema import (
    FORMAT_VERSION,
    TelemetryWarning,
    _parse_entry,
    _parse_header,
)

__all__ = ["TelemetryRecord", "load_telemetry", "to_columns"]

_NUL_RUNS = re.compile(rb"\x00+")


class TelemetryRecord(NamedTuple):
    """One probed step as read back from a log.

    Attributes:
        step: training step.
        time: wall-clock UNIX time (s) at which the record was written (None if absent).
        metrics: ``{name: value}`` with ``None`` for non-finite / missing values and lists
            for arrays.
        nonfinite: names of the metrics that were non-finite when written.
    """

    step: int
    time: float | None
    metrics: dict[str, Any]
    nonfinite: tuple[str, ...] = ()


def _line_list(numbers: list[int], limit: int = 10) -> str:
    text = ", ".join(map(str, numbers[:limit]))
    return text + (f", ... ({len(numbers)} in all)" if len(numbers) > limit else "")


def load_telemetry(
    path: str | os.PathLike, *, strict: bool = False
) -> tuple[dict[str, Any], list[TelemetryRecord]]:
    """Read a telemetry log written by :class:`TelemetryWriter`.

    Line 1 must be a telemetry header. A torn (truncated or unparsable) **last** line is the
    signature of a crash mid-write: it is dropped with a :class:`TelemetryWarning`. Corrupt
    lines elsewhere and NUL bytes (a damaged file, e.g. two writers on one path before the
    lock existed) are skipped with one :class:`TelemetryWarning` naming their line numbers,
    keeping every intact record (also the JSON between NUL runs); ``strict=True`` raises
    instead.

    Args:
        path: the ``.jsonl`` file (``str`` or ``os.PathLike``).
        strict: refuse a file with a corrupt line or NUL bytes before the last line
            (a torn last line is still only dropped).

    Returns:
        ``(metadata, records)``: ``metadata`` is the header dict (``config``, ``seed``,
        ``versions``, ``start_time``, ``hostname``, ``metadata``, ...) plus three keys added
        by the reader: ``"end"`` (the footer dict, or ``None`` when the run did not close
        cleanly), ``"resumes"`` (list of resume markers) and ``"skipped_lines"`` (1-based
        numbers of the lines dropped in whole or part: torn, corrupt or NUL-damaged; empty
        for an intact log). ``records`` is the list of :class:`TelemetryRecord` in file
        order (steps may repeat after a resume; see :func:`to_columns` ``deduplicate``).

    Raises:
        FileNotFoundError: no such file (``IsADirectoryError`` for a directory).
        ArgumentTypeError: ``path`` is not a ``str`` / ``os.PathLike`` or ``strict`` not a
            bool (a ``TypeError`` and a ``ValueError``).
        ValueError: naming ``path``: the file is not a telemetry log (empty, ``/dev/null``,
            a first line that is not JSON or not a telemetry header), has a second header,
            or (``strict=True``) a corrupt line before the last one (the message gives its
            1-based line number).
    """
    path = _check_path(path, "path")
    strict = _check_bool(strict, "strict")
    data = path.read_bytes()
    lines = data.split(b"\n")
    metadata = dict(_parse_header(lines[0], len(data), path))
    if metadata["format_version"] > FORMAT_VERSION:
        warnings.warn(
            f"{path}: format_version {metadata['format_version']} is newer than this "
            f"reader's {FORMAT_VERSION}; reading the fields it knows",
            TelemetryWarning,
            stacklevel=2,
        )
    # Index of the last non-blank line: only that one may be torn.
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=0)
    records: list[TelemetryRecord] = []
    end: dict | None = None
    resumes: list[dict] = []
    skipped: list[int] = []  # corrupt or NUL-damaged lines before the last one
    torn: int | None = None
    for i in range(1, len(lines)):
        raw = lines[i]
        if not raw.strip():
            continue
        lineno = i + 1
        has_nul = b"\x00" in raw
        if has_nul and strict:
            raise ValueError(
                f"{path}: line {lineno} holds NUL bytes (part of the log was overwritten, "
                "e.g. by a second writer); load with strict=False to recover the intact "
                "records"
            )
        pieces = [p for p in _NUL_RUNS.split(raw) if p.strip()] if has_nul else [raw]
        if has_nul:
            skipped.append(lineno)
        for j, piece in enumerate(pieces):
            obj = _parse_entry(piece)
            if obj is None:
                if i == last and j == len(pieces) - 1:
                    torn = lineno
                    if not has_nul:
                        warnings.warn(
                            f"{path}: dropping a truncated or corrupt last line {lineno} "
                            f"({len(raw)} bytes) - the writer probably crashed mid-record",
                            TelemetryWarning,
                            stacklevel=2,
                        )
                    continue
                if strict:
                    raise ValueError(
                        f"{path}: line {lineno} is corrupt (not a telemetry JSON object): "
                        f"{piece[:80]!r}"
                    )
                if not has_nul:
                    skipped.append(lineno)
                continue
            kind = obj.get("kind")
            if kind is None:
                records.append(
                    TelemetryRecord(
                        step=obj["step"],
                        time=obj.get("time"),
                        metrics=obj["metrics"],
                        nonfinite=tuple(obj.get("nonfinite", ())),
                    )
                )
            elif kind == "end":
                end = obj
            elif kind == "resume":
                resumes.append(obj)
                end = None  # a resumed run is open again until its own footer
            else:
                raise ValueError(
                    f"{path}: line {lineno} is a second header (two logs concatenated?); "
                    "split the file at that line"
                )
    if skipped:
        nul = [n for n in skipped if b"\x00" in lines[n - 1]]
        what = f"NUL bytes on line(s) {_line_list(nul)}" if nul else ""
        bad = [n for n in skipped if n not in nul]
        if bad:
            what += ("; " if what else "") + f"corrupt line(s) {_line_list(bad)}"
        warnings.warn(
            f"{path}: the log is damaged ({what}): kept the {len(records)} intact records "
            "and skipped the rest (metadata['skipped_lines'] lists the lines); two writers "
            "on one file (before gradience_jax locked logs) or a crash of the filesystem "
            "leave such damage; pass strict=True to refuse it",
            TelemetryWarning,
            stacklevel=2,
        )
    metadata["end"] = end
    metadata["resumes"] = resumes
    metadata["skipped_lines"] = sorted(set(skipped) | ({torn} if torn is not None else set()))
    return metadata, records


def _column_from_values(key: str, values: list[Any]) -> np.ndarray:
    """Per-record values (None = missing) -> float array (T, *shape) or object array."""
    present = [v for v in values if v is not None]
    if any(isinstance(v, str) for v in present):
        col = np.empty(len(values), dtype=object)
        col[:] = values
        return col
    arrays: list[np.ndarray | None] = []
    for v in values:
        if v is None:
            arrays.append(None)
            continue
        obj = np.array(v, dtype=object)
        try:
            arr = np.where(obj == None, np.nan, obj).astype(np.float64)  # noqa: E711
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"metric {key!r} holds a non-numeric or ragged value {v!r}"
            ) from exc
        arrays.append(arr)
    ndims = {a.ndim for a in arrays if a is not None}
    if len(ndims) > 1:
        raise ValueError(
            f"metric {key!r} mixes scalars and arrays of different ranks {sorted(ndims)}"
        )
    ndim = ndims.pop() if ndims else 0
    shape = tuple(
        max(a.shape[d] for a in arrays if a is not None) for d in range(ndim)
    ) if ndim else ()
    col = np.full((len(values),) + shape, np.nan)
    for t, a in enumerate(arrays):
        if a is not None:
            col[(t,) + tuple(slice(0, s) for s in a.shape)] = a
    return col


def _check_records(records: Any) -> list[TelemetryRecord]:
    if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Iterable):
        raise ArgumentTypeError(
            f"records must be a sequence of TelemetryRecord (load_telemetry(path)[1]), got "
            f"{type(records).__name__}"
        )
    recs = list(records)
    for i, r in enumerate(recs):
        if not isinstance(r, TelemetryRecord):
            hint = (" (pass load_telemetry(path)[1], not the (metadata, records) pair)"
                    if isinstance(r, dict) and "kind" in r else "")
            raise ArgumentTypeError(
                f"records[{i}] must be a TelemetryRecord, got {type(r).__name__}{hint}"
            )
    return recs


def to_columns(
    records: Sequence[TelemetryRecord],
    keys: Iterable[str] | None = None,
    *,
    deduplicate: bool = False,
) -> dict[str, np.ndarray]:
    """Records -> ``{"step": int64 (T,), metric: float64 (T, *shape)}`` aligned with steps.

    Missing or non-finite values are NaN. Scalar metrics give ``(T,)`` columns; array
    metrics give ``(T, *shape)`` with shorter arrays NaN-padded to the longest; string
    metrics give object arrays (``None`` for missing).

    Args:
        records: from :func:`load_telemetry` (its second element).
        keys: metric names to extract (default: every name seen, in first-seen order); an
            iterable of strings, not one string.
        deduplicate: keep only the last record of each step and sort by step (use after
            resuming from a checkpoint, where the crashed run's later steps are replayed).

    Returns:
        Dict of column arrays; ``"step"`` is always present.

    Raises:
        ArgumentTypeError: ``records`` is not a sequence of :class:`TelemetryRecord`,
            ``keys`` is a single string or holds a non-string, ``deduplicate`` is not a
            bool (a ``TypeError`` and a ``ValueError``).
        ValueError: a requested key never appears; a metric mixes ranks or is ragged.
    """
    recs = _check_records(records)
    deduplicate = _check_bool(deduplicate, "deduplicate")
    if keys is not None:
        if isinstance(keys, (str, bytes)) or not isinstance(keys, Iterable):
            raise ArgumentTypeError(
                f"keys must be an iterable of metric names (e.g. [{keys!r}]), got "
                f"{type(keys).__name__}"
            )
        keys = list(keys)
        for k in keys:
            if not isinstance(k, str):
                raise ArgumentTypeError(
                    f"keys must hold metric names (str), got {_short(k)} ({type(k).__name__})"
                )
    if deduplicate:
        by_step: dict[int, TelemetryRecord] = {}
        for r in recs:
            by_step[r.step] = r
        recs = [by_step[s] for s in sorted(by_step)]
    seen: dict[str, None] = {}
    for r in recs:
        for k in r.metrics:
            seen.setdefault(k, None)
    if keys is None:
        names = list(seen)
    else:
        names = keys
        missing = [k for k in names if k not in seen]
        if missing:
            raise ValueError(f"keys {missing} not found in records; available: {list(seen)}")
    out: dict[str, np.ndarray] = {"step": np.array([r.step for r in recs], dtype=np.int64)}
    for k in names:
        out[k] = _column_from_values(k, [r.metrics.get(k) for r in recs])
    return out
