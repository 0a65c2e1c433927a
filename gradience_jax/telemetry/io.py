"""Crash-safe telemetry logs: the JSON Lines writer (the reader and columns re-exported).

Host side only (no jax import; jitted probes live in :mod:`gradience_jax.probes`).
:class:`TelemetryWriter` appends one JSON object per probed step to a JSON Lines file,
flushing (and optionally ``fsync``-ing) after every record, so a crash loses at most the
record being written; it can mirror finite scalars to TensorBoard (other loggers:
:mod:`gradience_jax.telemetry.sinks`). :func:`load_telemetry`
reads a log back, tolerating a torn last line; :func:`to_columns` turns the records into
NumPy columns aligned with the steps.

Supported names: ``TelemetryWriter``, ``TelemetryRecord``, ``TelemetryWarning``,
``TelemetryLockError``, ``load_telemetry``, ``to_columns``, ``FORMAT_NAME``,
``FORMAT_VERSION``. This module holds the writer; the others live in sibling modules and
are re-exported here: :mod:`~gradience_jax.telemetry.schema` (the format name and version,
header checks, the warning), :mod:`~gradience_jax.telemetry.lock` (the one-writer lock) and
:mod:`~gradience_jax.telemetry.load` (the reader and its recovery, ``to_columns``).

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

One writer per file: a :class:`TelemetryWriter` holds an advisory lock on its log
(``fcntl.flock`` on the log file itself) from its constructor to :meth:`~TelemetryWriter.close`;
a second writer on the same file, in this process or another, gets a
:class:`TelemetryLockError` naming the holder (its pid, host and start time, read from the
header or the last resume marker it wrote) and changes nothing on disk. The kernel drops the
lock when the holding process dies (``SIGKILL`` included), so resuming after a crash with
``mode="a"`` just works. Only regular files are locked (``/dev/null`` and pipes are not).
Where ``fcntl`` is missing (Windows) or the filesystem refuses locks (some network or FUSE
mounts: a :class:`TelemetryWarning` says so), only writers in the same process are detected.

What :func:`load_telemetry` recovers: line 1 must be a telemetry header, otherwise the file
is refused with a ``ValueError`` that names the path and the problem (an empty file,
``/dev/null``, a text or JSON file that is not a log). After an intact header, every line
that parses as a record or marker is kept: a torn last line (a crash mid-write) is dropped
with a :class:`TelemetryWarning`; corrupt lines elsewhere and runs of NUL bytes (left by two
writers on one file in gradience_jax before the lock, or by a filesystem crash) are skipped
with one warning that lists their line numbers, the intact JSON between the NUL runs is
kept, and ``metadata["skipped_lines"]`` lists what was lost; ``strict=True`` refuses such a
file instead.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import socket
import stat
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gradience_jax.environment import versions
from gradience_jax.errors import ArgumentTypeError
from gradience_jax.telemetry import lock
from gradience_jax.telemetry._checks import (
    _check_bool,
    _check_choice,
    _check_int,
    _check_mapping,
    _check_path,
    _short,
)
from gradience_jax.telemetry.load import TelemetryRecord, load_telemetry, to_columns
from gradience_jax.telemetry.lock import TelemetryLockError
from gradience_jax.telemetry.schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    TelemetryWarning,
    _parse_entry,
    _parse_header,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "TelemetryLockError",
    "TelemetryRecord",
    "TelemetryWarning",
    "TelemetryWriter",
    "load_telemetry",
    "to_columns",
]

_RESERVED_METRIC_NAMES = frozenset({"step"})
_VERSION_PACKAGES = ("jax", "jaxlib", "flax", "numpy")
_MODES = ("w", "a")


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
            raise ArgumentTypeError(
                f"metrics keys (metric names) must be strings, got {_short(key)} "
                f"({type(key).__name__})" + (f" under {prefix[:-1]!r}" if prefix else "")
            )
        if not key:
            raise ValueError(
                "metrics keys (metric names) must be non-empty strings"
                + (f" (an empty key under {prefix[:-1]!r})" if prefix else "")
            )
        name = f"{prefix}{key}"
        inner = (_flatten_metrics(value, prefix=f"{name}/") if isinstance(value, Mapping)
                 else {name: value})
        for flat_name, flat_value in inner.items():
            if flat_name in flat:
                raise ValueError(f"metrics key {flat_name!r} appears twice after flattening")
            flat[flat_name] = flat_value
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
    """Validate a step: an integer (python, NumPy or 0-d JAX array), not a bool.

    Raises:
        ArgumentTypeError: anything else (a ``ValueError`` too, as before).
    """
    return _check_int(step, "step")


def _reraise_path_error(exc: OSError, path: Path, action: str) -> OSError:
    """Same OSError subclass, with a message naming the telemetry path."""
    if exc.errno is not None:
        msg = f"cannot {action} telemetry log for writing ({exc.strerror})"
        return type(exc)(exc.errno, msg, str(path))
    return OSError(f"cannot {action} telemetry log {str(path)!r} for writing: {exc}")


def _read_at(fd: int, offset: int, n: int) -> bytes:
    """Up to ``n`` bytes of ``fd`` from ``offset`` (portable: no ``os.pread``)."""
    os.lseek(fd, offset, os.SEEK_SET)
    chunks = []
    while n > 0:
        data = os.read(fd, n)
        if not data:
            break
        chunks.append(data)
        n -= len(data)
    return b"".join(chunks)


def _first_line(fd: int, size: int) -> bytes:
    r"""The bytes of ``fd`` before its first ``\n`` (the whole file when there is none)."""
    parts, offset = [], 0
    while offset < size:
        chunk = _read_at(fd, offset, min(1 << 16, size - offset))
        if not chunk:
            break
        idx = chunk.find(b"\n")
        if idx >= 0:
            parts.append(chunk[:idx])
            break
        parts.append(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _last_newline_offset(fd: int, size: int) -> int:
    r"""Byte offset just past the last ``\n`` of ``fd`` (0 if none)."""
    pos = size
    chunk = 1 << 16
    while pos > 0:
        start = max(0, pos - chunk)
        data = _read_at(fd, start, pos - start)
        idx = data.rfind(b"\n")
        if idx >= 0:
            return start + idx + 1
        pos = start
    return 0


def _prepare_append(fd: int, path: Path, size: int) -> None:
    """Check the header of a non-empty log and end it on a complete line before appending.

    A complete last record that lacks only its newline gets the newline; a torn
    (unparsable) last line is cut off with a :class:`TelemetryWarning`.

    Raises:
        ValueError: line 1 is not a telemetry header, or one of a newer format version.
    """
    hint = "; use mode='w' to overwrite it, or another path"
    header = _parse_header(_first_line(fd, size), size, path, hint)
    if header["format_version"] > FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has format_version {header['format_version']}, newer than this "
            f"writer's {FORMAT_VERSION}: cannot append to it{hint}"
        )
    cut = _last_newline_offset(fd, size)
    if cut == size:
        return
    tail = _read_at(fd, cut, size - cut)
    if cut == 0 or _parse_entry(tail) is not None:  # complete, only the newline is missing
        os.write(fd, b"\n")
        return
    if tail.strip():
        warnings.warn(
            f"{path}: dropping a torn last line ({size - cut} bytes) before appending",
            TelemetryWarning,
            stacklevel=4,
        )
    os.ftruncate(fd, cut)


def _tensorboard_writer_class() -> tuple[Any, str]:
    """The SummaryWriter class (tensorboardX, else torch.utils.tensorboard) and its name.

    Raises:
        MissingExtraError: (an ``ImportError``) neither is installed; the message names
            ``pip install 'gradience-jax[tensorboard]'``.
    """
    from gradience_jax.telemetry.sinks import (  # noqa: PLC0415 - sinks imports this module
        summary_writer_class,
    )

    return summary_writer_class()


class TelemetryWriter:
    """Append-only JSON Lines telemetry log, one record per probed step, crash safe.

    Every :meth:`write` serialises the full record first, then writes it with one call,
    flushes, and (with ``fsync=True``) forces it to disk, so a crash or ``SIGKILL`` loses
    at most the record in flight; :func:`load_telemetry` drops such a torn last line.
    Non-finite values never raise: they are stored as ``null`` and listed in the record's
    ``"nonfinite"`` keys. The log path is opened (and its header written) in the
    constructor, so an unwritable path fails before training starts.

    One writer per file: the constructor takes an advisory lock on the log (see the module
    docstring), held until :meth:`close` (or the end of a ``with`` block, or the death of
    the process); a second writer on the same file raises :class:`TelemetryLockError`
    before touching it. A failing constructor closes everything it opened.

    Args:
        path: the ``.jsonl`` file (``str`` or ``os.PathLike``).
        metadata: free-form JSON-able dict stored under the header's ``"metadata"`` key
            (best effort: unknown objects are stored as their ``repr``).
        config: the run's configuration dict (header key ``"config"``).
        seed: the run's integer seed (header key ``"seed"``), or ``None``.
        mode: ``"w"`` truncates and writes a fresh header; ``"a"`` appends to an existing
            log (resuming after a crash): a complete last record missing only its newline
            is kept (the newline is added), a torn last line is cut off (with a warning)
            and a ``{"kind": "resume"}`` marker is written; a missing or empty file gets a
            header.
        fsync: ``os.fsync`` after every record (survives power loss, costs a disk sync).
        makedirs: create missing parent directories.
        max_array_size: largest array (elements, ``>= 1``) accepted as a metric value.
        tensorboard_dir: if given, finite scalar metrics are mirrored there with
            ``add_scalar`` (``tensorboardX``, else ``torch.utils.tensorboard``); when
            neither is installed the constructor raises before touching the log; a mirror
            failing later warns once and is switched off, never stopping the run.

    Raises:
        TelemetryLockError: another writer (this process or another) holds ``path``; the
            message names its pid, host and start time. An ``OSError``.
        MissingExtraError: (an ``ImportError``, from
            :mod:`~gradience_jax.telemetry.sinks`) ``tensorboard_dir`` is given but neither
            tensorboardX nor torch's tensorboard is installed; the message names
            ``pip install 'gradience-jax[tensorboard]'``.
        OSError: (the original subclass, e.g. ``PermissionError``, ``IsADirectoryError``)
            naming ``path`` when the log cannot be created, opened or written (a full
            disk: ``/dev/full`` fails here).
        ArgumentTypeError: an argument of the wrong kind (a non-path ``path``, a non-dict
            ``config`` / ``metadata``, a non-int ``seed`` / ``max_array_size``, a non-bool
            ``fsync`` / ``makedirs``); a ``TypeError`` and a ``ValueError``.
        ValueError: bad ``mode``, ``max_array_size < 1``; ``mode="a"`` on a file that is
            not a telemetry log (the file is left untouched).

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
        self._fh = None
        self._closed = True  # until the log is open
        self._held_key: tuple[int, int] | None = None
        self._flocked = False
        self._tb = None
        self._tb_failed = False
        self.path = _check_path(path, "path")
        _check_mapping(metadata, "metadata")
        _check_mapping(config, "config")
        if seed is not None:
            seed = _check_int(seed, "seed")
        mode = _check_choice(mode, "mode", _MODES)
        self.fsync = _check_bool(fsync, "fsync")
        self._makedirs = _check_bool(makedirs, "makedirs")
        self.max_array_size = _check_int(max_array_size, "max_array_size", lo=1)
        tb_class = None
        if tensorboard_dir is not None:
            tensorboard_dir = _check_path(tensorboard_dir, "tensorboard_dir")
            tb_class = _tensorboard_writer_class()  # a missing extra fails before the log opens
        self.num_records = 0
        self._lock = threading.Lock()

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
        header = {
            "kind": "header",
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "config": _jsonable_metadata(dict(config)) if config is not None else None,
            "seed": seed,
            **info,
            "tensorboard": None,
            "metadata": _jsonable_metadata(dict(metadata)) if metadata is not None else None,
        }
        self._open(mode, header, info, tensorboard_dir, tb_class)
        self._closed = False

    # -- file handling ------------------------------------------------------------------

    def _open(self, mode: str, header: dict, info: dict, tensorboard_dir: Path | None,
              tb_class: tuple[Any, str] | None = None) -> None:
        """Open and lock the log, then start the mirror, then write the header / resume line.

        The file is opened without truncation and locked first, so a second writer changes
        nothing; ``"w"`` truncates only once the lock is held.
        """
        path = self.path
        fd = -1
        about_log = True  # an OSError about the log (not the mirror) gets the log's path
        try:
            if self._makedirs and not path.parent.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0)
            fd = os.open(path, flags, 0o666)
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
            if regular:
                holder = {k: info[k] for k in ("pid", "hostname", "start_time")}
                self._held_key, self._flocked = lock.acquire(fd, path, self, holder)
            size = os.fstat(fd).st_size  # after the lock: nobody else writes now
            append = mode == "a" and regular and size > 0
            if append:
                _prepare_append(fd, path, size)
            if tensorboard_dir is not None and tb_class is not None:
                about_log = False
                self._tb = tb_class[0](str(tensorboard_dir))
                header["tensorboard"] = tb_class[1]
                about_log = True
            if not append and regular and size:
                os.ftruncate(fd, 0)
            self._fh = os.fdopen(fd, "a", encoding="utf-8", newline="\n")
            fd = -1  # owned by self._fh now
            self._emit(self._fh, {"kind": "resume", **info} if append else header)
        except BaseException as exc:
            self._release(fd)
            if about_log and isinstance(exc, OSError) and not isinstance(
                    exc, TelemetryLockError):
                raise _reraise_path_error(exc, path, "open") from exc
            raise

    def _release(self, fd: int = -1) -> None:
        """Unlock and close whatever is open (never raises ``OSError``)."""
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.flush()
            except (OSError, ValueError):
                pass
            if self._flocked:
                lock.unlock(fh.fileno())
            try:
                fh.close()
            except OSError:  # a failed flush again; the descriptor is closed regardless
                pass
        elif fd >= 0:
            if self._flocked:
                lock.unlock(fd)
            os.close(fd)
        self._flocked = False
        if self._held_key is not None:
            lock.forget(self._held_key, self)
            self._held_key = None
        tb, self._tb = self._tb, None
        if tb is not None:
            try:
                tb.close()
            except Exception:  # noqa: BLE001 - the mirror must never stop a run
                pass

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
            ArgumentTypeError: ``step`` is not an integer, ``metrics`` is not a mapping or a
                metric name is not a string (a ``TypeError`` and a ``ValueError``).
            ValueError: reserved, empty or duplicate metric names, oversized arrays.
            TypeError: unsupported metric types (complex, objects, tracers).
            RuntimeError: the writer is closed.
        """
        if self._closed:
            raise RuntimeError(f"TelemetryWriter for {str(self.path)!r} is closed")
        step_i = _as_step(step)
        if not isinstance(metrics, Mapping):
            raise ArgumentTypeError(
                f"metrics must be a dict (a Mapping) of name -> value, got "
                f"{type(metrics).__name__}"
            )
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
        """Write the ``{"kind": "end"}`` footer, release the lock and close (idempotent).

        Args:
            status: the footer's ``"status"`` (``"ok"`` for a clean end, e.g. ``"error"``).
            error: optional error message stored as the footer's ``"error"``.

        Raises:
            ArgumentTypeError: ``status`` is not a non-empty string or ``error`` not a
                string or ``None`` (the writer stays open).
            OSError: the footer cannot be written (the file is closed and unlocked anyway).
        """
        if not isinstance(status, str) or not status:
            raise ArgumentTypeError(f"status must be a non-empty str, got {_short(status)}")
        if error is not None and not isinstance(error, str):
            raise ArgumentTypeError(
                f"error must be a str or None, got {type(error).__name__}"
            )
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
                self._release()

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


