"""Crash-safe telemetry logs: the JSON Lines writer, the reader and NumPy columns.

Host side only (no jax import; jitted probes live in :mod:`gradience_jax.probes`).
:class:`TelemetryWriter` appends one JSON object per probed step to a JSON Lines file,
flushing (and optionally ``fsync``-ing) after every record, so a crash loses at most the
record being written; it can mirror finite scalars to TensorBoard. :func:`load_telemetry`
reads a log back, tolerating a torn last line; :func:`to_columns` turns the records into
NumPy columns aligned with the steps.

Supported names: ``TelemetryWriter``, ``TelemetryRecord``, ``TelemetryWarning``,
``load_telemetry``, ``to_columns``, ``FORMAT_NAME``, ``FORMAT_VERSION``.

File format (one JSON object per line, UTF-8, strict JSON: no ``NaN`` tokens)::

    {"kind": "header", "format": "gradience_jax.telemetry", "format_version": 1,
     "config": {...}, "seed": 0, "start_time": "2025-...Z", "start_unix": 1.7e9,
     "hostname": "...", "pid": 123,
     "versions": {"python": "3.11.9", "platform": "...", "gradience_jax": ..., "jax": ...},
     "metadata": {...}}
    {"step": 0, "time": 1.7e9, "metrics": {"loss": 2.3, "top_eigs": [5.1, 3.2]}}
    {"step": 10, "time": 1.7e9, "metrics": {"loss": null}, "nonfinite": ["loss"]}
    {"kind": "resume", ...}                     # only when re-opened with mode="a"
    {"kind": "end", "status": "ok", "num_records": 2, "time": 1.7e9}   # clean close only

Records carry no ``"kind"`` key; non-finite floats are stored as ``null`` and their keys are
listed in ``"nonfinite"`` (omitted when empty). The header's ``"versions"`` come from
:func:`gradience_jax.environment.versions` (a missing package reads ``"not installed"``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from gradience_jax.environment import versions

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "TelemetryRecord",
    "TelemetryWarning",
    "TelemetryWriter",
    "load_telemetry",
    "to_columns",
]

FORMAT_NAME = "gradience_jax.telemetry"
"""The header's ``"format"`` value."""
FORMAT_VERSION = 1
"""The header's ``"format_version"`` value."""
_RESERVED_METRIC_NAMES = frozenset({"step"})
_VERSION_PACKAGES = ("jax", "jaxlib", "flax", "numpy")

class TelemetryWarning(UserWarning):
    """Recoverable telemetry problems: a torn last line, a failing TensorBoard mirror."""


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def _jsonable_metadata(value: Any) -> Any:
    """Best-effort JSON form of a config / metadata value; never fails (falls back to repr).

    Non-finite floats become ``None``; dataclasses and NamedTuples become dicts; arrays
    become (nested) lists.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable_metadata(dataclasses.asdict(value))
    if isinstance(value, tuple) and hasattr(value, "_asdict"):
        return _jsonable_metadata(value._asdict())
    if isinstance(value, Mapping):
        return {str(k): _jsonable_metadata(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable_metadata(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__array__"):
        try:
            arr = np.asarray(value)
            if arr.dtype.kind in "biu":
                return arr.tolist()
            if arr.dtype.kind in "fV":  # "V": ml_dtypes such as bfloat16
                return _jsonable_metadata(arr.astype(np.float64).tolist())
        except Exception:  # noqa: BLE001 - metadata must never kill a run
            pass
    return repr(value)


def _flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into ``"outer/inner"`` keys (TensorBoard-style tags)."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise ValueError(
                f"metrics keys must be strings, got {key!r} ({type(key).__name__})"
            )
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten_metrics(value, prefix=f"{name}/"))
        else:
            if name in flat:
                raise ValueError(f"metrics key {name!r} appears twice after flattening")
            flat[name] = value
    return flat


def _convert_metric(key: str, value: Any, max_array_size: int) -> tuple[Any, bool]:
    """One metric value -> (JSON value, has_nonfinite).

    Python / NumPy / JAX scalars become numbers, arrays become nested lists, non-finite
    floats become ``None``.

    Raises:
        TypeError: unsupported type (complex, arbitrary objects, a tracer inside ``jit``).
        ValueError: an array larger than ``max_array_size`` elements.
    """
    if value is None:
        return None, False
    if isinstance(value, (bool, np.bool_)):
        return bool(value), False
    if isinstance(value, (int, np.integer)):
        return int(value), False
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return (v, False) if math.isfinite(v) else (None, True)
    if isinstance(value, str):
        return value, False
    if not (isinstance(value, (list, tuple)) or hasattr(value, "__array__")):
        raise TypeError(
            f"metric {key!r} has unsupported type {type(value).__name__}; use numbers, "
            "strings or (small) numeric arrays"
        )
    try:
        arr = np.asarray(value)
    except Exception as exc:  # e.g. jax TracerArrayConversionError inside jit
        raise TypeError(
            f"metric {key!r} ({type(value).__name__}) cannot be converted to a host array; "
            "telemetry is written on the host: return metrics from the jitted step (or use "
            "jax.debug.callback) instead of writing from inside jit"
        ) from exc
    if arr.size > max_array_size:
        raise ValueError(
            f"metric {key!r} has {arr.size} elements > max_array_size={max_array_size}; "
            "log a summary (or raise max_array_size)"
        )
    kind = arr.dtype.kind
    if kind == "U":
        return arr.tolist(), False
    if kind == "b":
        return arr.tolist(), False
    if kind in "iu":
        return arr.tolist(), False
    if kind in "cOSM" or (kind == "m"):
        raise TypeError(f"metric {key!r} has unsupported array dtype {arr.dtype}")
    try:
        arr = arr.astype(np.float64)  # float16/32/64 and ml_dtypes (bfloat16: kind "V")
    except (TypeError, ValueError) as exc:
        raise TypeError(f"metric {key!r} has unsupported array dtype {arr.dtype}") from exc
    finite = np.isfinite(arr)
    if arr.ndim == 0:
        return (float(arr), False) if bool(finite) else (None, True)
    if finite.all():
        return arr.tolist(), False
    obj = arr.astype(object)
    obj[~finite] = None
    return obj.tolist(), True


def _as_step(step: Any) -> int:
    """Validate a step: an integer (python, NumPy or 0-d JAX array), not a bool."""
    if isinstance(step, (bool, np.bool_)):
        raise ValueError(f"step must be an integer, got bool {step!r}")
    if isinstance(step, (int, np.integer)):
        return int(step)
    if hasattr(step, "__array__"):
        arr = np.asarray(step)
        if arr.ndim == 0 and arr.dtype.kind in "iu":
            return int(arr)
    raise ValueError(f"step must be an integer, got {step!r} ({type(step).__name__})")


def _reraise_path_error(exc: OSError, path: Path, action: str) -> OSError:
    """Same OSError subclass, with a message naming the telemetry path."""
    if exc.errno is not None:
        msg = f"cannot {action} telemetry log for writing ({exc.strerror})"
        return type(exc)(exc.errno, msg, str(path))
    return OSError(f"cannot {action} telemetry log {str(path)!r} for writing: {exc}")


def _last_newline_offset(fh: Any, size: int) -> int:
    r"""Byte offset just past the last ``\n`` of a binary file (0 if none)."""
    pos = size
    chunk = 1 << 16
    while pos > 0:
        start = max(0, pos - chunk)
        fh.seek(start)
        data = fh.read(pos - start)
        idx = data.rfind(b"\n")
        if idx >= 0:
            return start + idx + 1
        pos = start
    return 0


def _make_tensorboard_writer(logdir: str | os.PathLike) -> tuple[Any, str | None]:
    """A SummaryWriter from tensorboardX or torch.utils.tensorboard, or (None, None)."""
    try:
        from tensorboardX import (  # type: ignore[import-not-found]  # noqa: PLC0415 - optional dependency
            SummaryWriter,
        )

        return SummaryWriter(str(logdir)), "tensorboardX"
    except ImportError:
        pass
    try:
        from torch.utils.tensorboard import (  # type: ignore[import-not-found]  # noqa: PLC0415 - optional dependency
            SummaryWriter,
        )

        return SummaryWriter(str(logdir)), "torch.utils.tensorboard"
    except ImportError:
        return None, None


class TelemetryWriter:
    """Append-only JSON Lines telemetry log, one record per probed step, crash safe.

    Every :meth:`write` serialises the full record first, then writes it with one call,
    flushes, and (with ``fsync=True``) forces it to disk, so a crash or ``SIGKILL`` loses
    at most the record in flight; :func:`load_telemetry` drops such a torn last line.
    Non-finite values never raise: they are stored as ``null`` and listed in the record's
    ``"nonfinite"`` keys. The log path is opened (and its header written) in the
    constructor, so an unwritable path fails before training starts.

    Args:
        path: the ``.jsonl`` file.
        metadata: free-form JSON-able dict stored under the header's ``"metadata"`` key
            (best effort: unknown objects are stored as their ``repr``).
        config: the run's configuration dict (header key ``"config"``).
        seed: the run's seed (header key ``"seed"``).
        mode: ``"w"`` truncates and writes a fresh header; ``"a"`` appends to an existing
            log (resuming after a crash): a torn last line is cut off (with a warning) and a
            ``{"kind": "resume"}`` marker is written; a missing or empty file gets a header.
        fsync: ``os.fsync`` after every record (survives power loss, costs a disk sync).
        makedirs: create missing parent directories.
        max_array_size: largest array (elements) accepted as a metric value.
        tensorboard_dir: if given and ``tensorboardX`` or ``torch.utils.tensorboard`` is
            installed, finite scalar metrics are mirrored there with ``add_scalar``
            (silently skipped when neither is installed; a failing mirror warns once and
            is switched off, never stopping the run).

    Raises:
        OSError: (the original subclass, e.g. ``PermissionError``, ``IsADirectoryError``)
            naming ``path`` when the log cannot be created or opened for writing.
        ValueError: bad ``mode``; ``mode="a"`` on a file that is not a telemetry log.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "run.jsonl"
        >>> with TelemetryWriter(path, config={"lr": 0.1}, seed=0) as log:
        ...     for step in range(3):
        ...         _ = log.write(step, {"loss": 1.0 / (step + 1), "lambda_max": float("nan")})
        >>> header, records = load_telemetry(path)
        >>> header["config"], [r.step for r in records]
        ({'lr': 0.1}, [0, 1, 2])
        >>> records[1].metrics  # non-finite values are stored as null
        {'loss': 0.5, 'lambda_max': None}
        >>> import shutil
        >>> shutil.rmtree(path.parent)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        metadata: Mapping[str, Any] | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        seed: int | None = None,
        mode: Literal["w", "a"] = "w",
        fsync: bool = False,
        makedirs: bool = True,
        max_array_size: int = 10_000,
        tensorboard_dir: str | os.PathLike | None = None,
    ) -> None:
        if mode not in ("w", "a"):
            raise ValueError(f"mode must be 'w' or 'a', got {mode!r}")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise ValueError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        if config is not None and not isinstance(config, Mapping):
            raise ValueError(f"config must be a dict or None, got {type(config).__name__}")
        if int(max_array_size) < 1:
            raise ValueError(f"max_array_size must be >= 1, got {max_array_size}")
        self.path = Path(path)
        self.fsync = bool(fsync)
        self.max_array_size = int(max_array_size)
        self._makedirs = bool(makedirs)
        self.num_records = 0
        self._lock = threading.Lock()
        self._closed = False
        self._fh = None
        self._tb = None
        self._tb_failed = False

        start = time.time()
        info = {
            "start_time": datetime.datetime.fromtimestamp(start, datetime.timezone.utc)
            .isoformat()
            .replace("+00:00", "Z"),
            "start_unix": start,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "versions": versions(_VERSION_PACKAGES),
        }
        self._tb, tb_backend = (
            _make_tensorboard_writer(tensorboard_dir) if tensorboard_dir is not None
            else (None, None)
        )
        header = {
            "kind": "header",
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "config": _jsonable_metadata(dict(config)) if config is not None else None,
            "seed": _jsonable_metadata(seed),
            **info,
            "tensorboard": tb_backend,
            "metadata": _jsonable_metadata(dict(metadata)) if metadata is not None else None,
        }
        self._open(mode, header, info)

    # -- file handling ------------------------------------------------------------------

    def _open(self, mode: str, header: dict, info: dict) -> None:
        path = self.path
        try:
            if mode == "w" or not path.exists() or path.stat().st_size == 0:
                self._fh = self._open_fresh(path, header)
            else:
                self._fh = self._open_append(path, info)
        except BaseException as exc:
            if self._tb is not None:
                self._tb.close()
            if isinstance(exc, OSError):
                raise _reraise_path_error(exc, path, "open") from exc
            raise

    def _open_fresh(self, path: Path, header: dict) -> Any:
        if self._makedirs and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "w", encoding="utf-8", newline="\n")
        self._emit(fh, header)
        return fh

    def _open_append(self, path: Path, info: dict) -> Any:
        with open(path, "rb+") as raw:
            first = raw.readline()
            try:
                head = json.loads(first.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                head = None
            if not isinstance(head, dict) or head.get("kind") != "header":
                raise ValueError(
                    f"path {str(path)!r} is not a telemetry log (no header on line 1); "
                    "use mode='w' or another path"
                )
            size = raw.seek(0, os.SEEK_END)
            cut = _last_newline_offset(raw, size)
            if cut < size:
                warnings.warn(
                    f"{path}: dropping a torn last line ({size - cut} bytes) before appending",
                    TelemetryWarning,
                    stacklevel=4,
                )
                raw.truncate(cut)
        fh = open(path, "a", encoding="utf-8", newline="\n")
        self._emit(fh, {"kind": "resume", **info})
        return fh

    def _emit(self, fh: Any, obj: dict) -> None:
        line = json.dumps(obj, allow_nan=False, separators=(",", ":")) + "\n"
        fh.write(line)
        fh.flush()
        if self.fsync:
            os.fsync(fh.fileno())

    # -- public API -----------------------------------------------------------------------

    def write(self, step: Any, metrics: Mapping[str, Any]) -> dict:
        """Append one record and flush it.

        Args:
            step: the training step (int, NumPy integer or 0-d integer JAX array).
            metrics: ``{name: value}``; values are Python / NumPy / JAX scalars, strings,
                ``None`` (missing) or small numeric arrays (stored as nested lists).
                Nested dicts are flattened to ``"outer/inner"`` names. ``"step"`` is
                reserved.

        Returns:
            The JSON record as written (``"nonfinite"`` present only when non-empty).

        Raises:
            ValueError: bad ``step``, reserved / non-string metric names, oversized arrays.
            TypeError: unsupported metric types (complex, objects, tracers).
            RuntimeError: the writer is closed.
        """
        if self._closed:
            raise RuntimeError(f"TelemetryWriter for {str(self.path)!r} is closed")
        step_i = _as_step(step)
        if not isinstance(metrics, Mapping):
            raise ValueError(f"metrics must be a dict, got {type(metrics).__name__}")
        flat = _flatten_metrics(metrics)
        bad = _RESERVED_METRIC_NAMES.intersection(flat)
        if bad:
            raise ValueError(f"metrics may not use the reserved name(s) {sorted(bad)}")
        values: dict[str, Any] = {}
        nonfinite: list[str] = []
        for key, value in flat.items():
            values[key], flagged = _convert_metric(key, value, self.max_array_size)
            if flagged:
                nonfinite.append(key)
        record: dict[str, Any] = {"step": step_i, "time": time.time(), "metrics": values}
        if nonfinite:
            record["nonfinite"] = nonfinite
        with self._lock:
            if self._closed:
                raise RuntimeError(f"TelemetryWriter for {str(self.path)!r} is closed")
            self._emit(self._fh, record)
            self.num_records += 1
        self._mirror(step_i, values)
        return record

    def _mirror(self, step: int, values: Mapping[str, Any]) -> None:
        if self._tb is None or self._tb_failed:
            return
        try:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, global_step=step)
        except Exception as exc:  # noqa: BLE001 - the mirror must never stop a run
            self._tb_failed = True
            warnings.warn(
                f"TensorBoard mirroring disabled after an error: {exc!r}",
                TelemetryWarning,
                stacklevel=3,
            )

    def close(self, status: str = "ok", error: str | None = None) -> None:
        """Write the ``{"kind": "end"}`` footer and close (idempotent).

        Args:
            status: the footer's ``"status"`` (``"ok"`` for a clean end, e.g. ``"error"``).
            error: optional error message stored as the footer's ``"error"``.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                footer = {
                    "kind": "end",
                    "status": status,
                    "num_records": self.num_records,
                    "time": time.time(),
                }
                if error is not None:
                    footer["error"] = error
                self._emit(self._fh, footer)
            finally:
                self._fh.close()
                if self._tb is not None:
                    try:
                        self._tb.close()
                    except Exception:  # noqa: BLE001
                        pass

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    def __enter__(self) -> TelemetryWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.close(status="error", error=f"{exc_type.__name__}: {exc}")

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"TelemetryWriter({str(self.path)!r}, records={self.num_records}, {state})"


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


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


def _parse_line(raw: bytes) -> Any:
    return json.loads(raw.decode("utf-8"))


def _is_record(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and "kind" not in obj
        and isinstance(obj.get("step"), int)
        and not isinstance(obj.get("step"), bool)
        and isinstance(obj.get("metrics"), dict)
    )


def load_telemetry(path: str | os.PathLike) -> tuple[dict[str, Any], list[TelemetryRecord]]:
    """Read a telemetry log written by :class:`TelemetryWriter`.

    A torn (truncated or unparsable) **last** line is the signature of a crash mid-write:
    it is dropped with a :class:`TelemetryWarning`. Corruption anywhere else is an error.

    Args:
        path: the ``.jsonl`` file.

    Returns:
        ``(metadata, records)``: ``metadata`` is the header dict (``config``, ``seed``,
        ``versions``, ``start_time``, ``hostname``, ``metadata``, ...) plus two keys added by
        the reader: ``"end"`` (the footer dict, or ``None`` when the run did not close
        cleanly) and ``"resumes"`` (list of resume markers). ``records`` is the list of
        :class:`TelemetryRecord` in file order (steps may repeat after a resume; see
        :func:`to_columns` ``deduplicate``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a corrupt line before the last one (the message gives its 1-based line
            number), or a file whose first line is not a telemetry header.
    """
    path = Path(path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    # Index of the last non-blank line: only that one may be torn.
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    metadata: dict[str, Any] | None = None
    records: list[TelemetryRecord] = []
    end: dict | None = None
    resumes: list[dict] = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        lineno = i + 1
        try:
            obj = _parse_line(raw)
            valid = isinstance(obj, dict) and (
                _is_record(obj) or obj.get("kind") in ("header", "resume", "end")
            )
        except (UnicodeDecodeError, json.JSONDecodeError):
            obj, valid = None, False
        if not valid:
            if i == last:
                warnings.warn(
                    f"{path}: dropping a truncated or corrupt last line {lineno} "
                    f"({len(raw)} bytes) - the writer probably crashed mid-record",
                    TelemetryWarning,
                    stacklevel=2,
                )
                break
            raise ValueError(
                f"{path}: line {lineno} is corrupt (not a telemetry JSON object): "
                f"{raw[:80]!r}"
            )
        kind = obj.get("kind")
        if metadata is None:
            if kind != "header":
                raise ValueError(
                    f"{path}: line {lineno} is not a telemetry header; is this a "
                    "gradience_jax telemetry log?"
                )
            metadata = dict(obj)
            continue
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
            raise ValueError(f"{path}: line {lineno} is a second header")
    if metadata is None:
        metadata = {}
    metadata["end"] = end
    metadata["resumes"] = resumes
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
        records: from :func:`load_telemetry`.
        keys: metric names to extract (default: every name seen, in first-seen order).
        deduplicate: keep only the last record of each step and sort by step (use after
            resuming from a checkpoint, where the crashed run's later steps are replayed).

    Returns:
        Dict of column arrays; ``"step"`` is always present.

    Raises:
        ValueError: a requested key never appears; a metric mixes ranks or is ragged.
    """
    recs = list(records)
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
        names = list(keys)
        missing = [k for k in names if k not in seen]
        if missing:
            raise ValueError(f"keys {missing} not found in records; available: {list(seen)}")
    out: dict[str, np.ndarray] = {"step": np.array([r.step for r in recs], dtype=np.int64)}
    for k in names:
        out[k] = _column_from_values(k, [r.metrics.get(k) for r in recs])
    return out

