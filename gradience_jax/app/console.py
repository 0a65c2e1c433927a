"""The CLI's environment and terminal output: JAX set-up, rich console, JSON, progress.

Shared by the commands of :mod:`gradience_jax.app.cli` and :mod:`gradience_jax.app.influence`;
rich is imported when something is printed, so ``--help`` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from gradience_jax.app.cli_parser import PROG

CACHE_ENV = "GRADIENCE_JAX_CACHE"
FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _configure_jax() -> None:
    """Cheap-compile XLA flags and a persistent compilation cache, if JAX has not started."""
    from jax._src import xla_bridge  # noqa: PLC0415 - before jax starts a backend

    if xla_bridge.backends_are_initialized():
        return
    if "XLA_FLAGS" not in os.environ:
        os.environ["XLA_FLAGS"] = FAST_XLA_FLAGS
    cache = os.environ.get(CACHE_ENV, "")
    if cache.lower() in ("off", "0", "false", "no"):
        return
    import jax  # noqa: PLC0415 - after XLA_FLAGS is set

    if jax.config.jax_compilation_cache_dir:
        return
    if not cache:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        cache = os.path.join(base, "gradience_jax", "xla")
    try:
        os.makedirs(cache, exist_ok=True)
    except OSError:
        return
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def _console(stderr: bool = False) -> Any:
    """A rich console, wide (160 columns) when not writing to a terminal.

    Tables in logs and pipes are then not squeezed.
    """
    from rich.console import Console  # noqa: PLC0415 - output only, --help stays fast

    stream = sys.stderr if stderr else sys.stdout
    width = None if getattr(stream, "isatty", lambda: False)() else 160
    return Console(file=stream, width=width, soft_wrap=False)


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=1, allow_nan=False) + "\n")
    sys.stdout.flush()


class _Stages:
    """A rich progress bar over named stages (on stderr, so ``--json`` stdout stays clean)."""

    def __init__(self, stages: Sequence[tuple[str, str]], enabled: bool):
        from rich.progress import (  # noqa: PLC0415 - output only, --help stays fast
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.keys = [k for k, _ in stages]
        self.seen: set[str] = set()
        self.progress = Progress(TextColumn("{task.description:<46}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                 console=_console(stderr=True), transient=True,
                                 disable=not enabled)
        self.task = self.progress.add_task("starting", total=len(self.keys))

    def __enter__(self) -> _Stages:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.progress.update(self.task, completed=len(self.keys), description="done")
        self.progress.stop()

    def __call__(self, key: str, description: str) -> None:
        if key not in self.seen:
            self.seen.add(key)
            done = len(self.seen) - 1
            self.progress.update(self.task, completed=done, description=description)


def _summary_table(rows: Sequence[tuple[str, str]], title: str) -> Any:
    from rich.table import Table  # noqa: PLC0415 - output only, --help stays fast

    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("quantity")
    table.add_column("value", overflow="fold")
    for a, b in rows:
        table.add_row(a, b)
    return table


def _partial_failure(message: str, as_json: bool, data: dict[str, Any] | None) -> int:
    """Exit code 1 after a command wrote its output.

    One line on stderr; with ``--json`` the output itself carries ``ok: false``,
    ``exit_code`` and ``error`` (no second JSON document on stdout).
    """
    sys.stderr.write(f"{PROG}: error: {message}\n")
    if as_json and data is not None:
        _print_json({**data, "ok": False, "exit_code": 1, "error": message})
    return 1
