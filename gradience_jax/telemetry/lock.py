"""One writer per telemetry log: the advisory lock a ``TelemetryWriter`` holds.

Two layers, both taken by :func:`acquire` and dropped by :func:`unlock` / :func:`forget`:

* an in-process registry of the live writers, keyed by the file's ``(st_dev, st_ino)``: it
  catches a second writer in this process even where ``flock`` cannot (no ``fcntl`` on
  Windows, or locks emulated per process on some network filesystems);
* ``fcntl.flock(LOCK_EX | LOCK_NB)`` on the log file itself: it catches writers in other
  processes, and the kernel drops it when the holding process dies (``SIGKILL`` included).

A refused writer gets a :class:`TelemetryLockError` naming the holder (pid, host and start
time, read from the header or the last resume marker it wrote). A filesystem that refuses
locks gets a :class:`~gradience_jax.telemetry.schema.TelemetryWarning` and in-process
detection only.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import socket
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any

from gradience_jax.telemetry.schema import TelemetryWarning

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX (Windows): in-process detection only
    fcntl = None  # type: ignore[assignment]

__all__ = ["TelemetryLockError", "acquire", "forget", "unlock"]


class TelemetryLockError(BlockingIOError):
    """Another :class:`TelemetryWriter` holds the log: one writer per file.

    An ``OSError`` (``BlockingIOError``, ``errno.EWOULDBLOCK``) whose ``filename`` is the
    log's path and whose message names the holder.

    Attributes:
        holder: ``{"pid", "hostname", "start_time"}`` of the writer holding the lock, as it
            wrote them into the log (``None`` when unreadable).
    """

    def __init__(self, message: str, path: str | os.PathLike, holder: dict | None = None):
        super().__init__(errno.EWOULDBLOCK, message, str(path))
        self.holder = holder

    def __str__(self) -> str:
        return str(self.strerror)

    def __reduce__(self) -> tuple:
        return type(self), (self.strerror, self.filename, self.holder)


def _holder_from_log(fd: int) -> dict | None:
    """Who holds a log, from what it wrote: the last resume marker, else the header."""
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return None
        with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as view:
            start = view.rfind(b'\n{"kind":"resume"')
            start = 0 if start < 0 else start + 1
            stop = view.find(b"\n", start)
            line = view[start: size if stop < 0 else stop]
        obj = json.loads(line.decode("utf-8"))
    except (OSError, ValueError):  # unreadable, or a header not written yet
        return None
    if not isinstance(obj, dict) or obj.get("kind") not in ("header", "resume"):
        return None
    return {k: obj.get(k) for k in ("pid", "hostname", "start_time")}


def _describe_holder(holder: dict | None, same_process: bool) -> str:
    if not holder:
        return "holder unknown: its log has no readable header yet"
    text = f"pid {holder.get('pid')} on host {holder.get('hostname')!r}"
    if holder.get("start_time"):
        text += f", opened {holder['start_time']}"
    if same_process:
        text += "; this process: close that writer first"
    return text


# One live writer per file and process, keyed by (st_dev, st_ino): catches a second writer in
# this process even where flock cannot (no fcntl, or locks emulated per process on NFS).
_HELD: dict[tuple[int, int], tuple[weakref.ref, dict]] = {}
_HELD_LOCK = threading.Lock()


def _locked_error(path: Path, holder: dict | None, same_process: bool) -> TelemetryLockError:
    return TelemetryLockError(
        f"telemetry log {str(path)!r} is already open for writing by another "
        f"TelemetryWriter ({_describe_holder(holder, same_process)}); one writer per file: "
        "close it (or wait for its process to end) or log to another path",
        path,
        holder,
    )


def _flock(fd: int, path: Path) -> bool:
    """Take the exclusive advisory lock on ``fd`` without blocking; False if unsupported.

    Raises:
        TelemetryLockError: another open file (this process or another) holds the lock.
    """
    if fcntl is None:  # pragma: no cover - not POSIX
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder_from_log(fd)
        same = bool(holder) and holder.get("pid") == os.getpid() and (
            holder.get("hostname") == socket.gethostname())
        raise _locked_error(path, holder, same) from None
    except OSError as exc:  # ENOLCK, EOPNOTSUPP, EINVAL: the filesystem has no locks
        warnings.warn(
            f"{path}: cannot lock the telemetry log ({exc.strerror or exc}); a second writer "
            "in another process will not be detected",
            TelemetryWarning,
            stacklevel=5,
        )
        return False
    return True


def unlock(fd: int) -> None:
    """Drop the ``flock`` on ``fd`` (never raises: closing the descriptor drops it too)."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:  # the fd is closing anyway: closing it drops the lock too
            pass


def acquire(fd: int, path: Path, owner: Any, holder: dict) -> tuple[tuple[int, int], bool]:
    """Make ``owner`` the one writer of the open log ``fd``: the registry, then ``flock``.

    Args:
        fd: the log's open descriptor (a regular file).
        path: the log's path (for messages).
        owner: the writer taking the lock; the registry holds it weakly, so a writer
            dropped without closing stops counting.
        holder: ``{"pid", "hostname", "start_time"}`` of ``owner``, as it writes them into
            the log (named by a later writer's :class:`TelemetryLockError`).

    Returns:
        ``(key, flocked)``: the file's registry key for :func:`forget`, and whether the
        ``flock`` is held (``False`` without ``fcntl`` or on a filesystem without locks).

    Raises:
        TelemetryLockError: a live writer of this process, or a writer of another process,
            holds the log; nothing is registered then.
    """
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    with _HELD_LOCK:
        entry = _HELD.get(key)
        if entry is not None:
            other = entry[0]()  # dead: dropped unclosed, its descriptor is gone too
            # (an entry inherited through fork belongs to the parent: flock decides)
            if other is not None and entry[1]["pid"] == os.getpid():
                raise _locked_error(path, entry[1], same_process=True)
        flocked = _flock(fd, path)
        _HELD[key] = (weakref.ref(owner), dict(holder))
    return key, flocked


def forget(key: tuple[int, int], owner: Any) -> None:
    """Take ``owner`` out of the registry (after its descriptor is closed); idempotent."""
    with _HELD_LOCK:
        entry = _HELD.get(key)
        if entry is not None and entry[0]() is owner:
            del _HELD[key]
