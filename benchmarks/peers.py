"""Shared pieces of the benchmarks against PyTorch peers (PyHessian, curvlinops, BackPACK,
hessian-eigenthings, torch.func): machine info, timing, peer discovery, models on both sides,
tables and JSON.

The suites are separate scripts (``peers_operators.py``, ``peers_eigen.py``,
``peers_trace.py``, ``peers_memory.py``, ``scale_gpt2.py``); ``run_all.py --quick`` runs them
all small and writes ``benchmarks/RESULTS.md``. Every suite times both frameworks in the same
process run (medians of repeated runs after warm-up) and records the machine, versions and
``os.getloadavg()`` in its JSON, so the ratios are what to read on a shared machine.

A peer library that is not installed gets ``"not installed"`` in its column; the rest runs.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# PyTorch's OpenMP threads spin-wait by default; on a shared (oversubscribed) CPU that makes
# 2-thread torch ~30x slower (measured here: 424 ms vs 14 ms for one MLP gradient). Passive
# waiting fixes it and costs little on an idle machine; it must be set before torch loads
# libgomp. An explicit OMP_WAIT_POLICY in the environment wins; the JSON records the value.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_HERE = Path(__file__).resolve().parent
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import gradience_jax as gj  # noqa: E402
from benchmarks.operators import median_time as jax_median_time  # noqa: E402,F401
from benchmarks.operators import temp_bytes  # noqa: E402,F401
from gradience_jax.models import CNN, MLP, TinyTransformerLM, from_nnx  # noqa: E402

NOT_INSTALLED = "not installed"
NOT_APPLICABLE = "n/a"
RESULTS_DIR = _HERE / "results"
TORCH_THREADS = 2

#: distribution name -> import name of every peer
PEERS = {
    "torch": "torch",
    "curvlinops-for-pytorch": "curvlinops",
    "backpack-for-pytorch": "backpack",
    "pyhessian": "pyhessian",
    "matfree": "matfree",
    "hessian-eigenthings": "hessian_eigenthings",
}


# -- peers and machine ---------------------------------------------------------------------


def peer(import_name: str):
    """The imported peer module, or ``None`` when it is not installed (or fails to import)."""
    try:
        mod = importlib.import_module(import_name)
    except Exception:  # noqa: BLE001 - a broken peer counts as missing
        return None
    if import_name == "torch":
        mod.set_num_threads(TORCH_THREADS)
    return mod


def curvlinops_arpack(cl, tm, x, y, k: int, which: str, tol: float) -> tuple[np.ndarray, int]:
    """Top-``k`` Hessian eigenvalues by curvlinops' ``HessianLinearOperator`` + scipy ARPACK
    (float32, seeded start vector). Returns ``(values, matvecs)``."""
    import scipy.sparse.linalg as sla

    count = [0]
    h = cl.HessianLinearOperator(tm.module, tm.criterion(), tm.parameters, [(x, y)],
                                 check_deterministic=False, num_data=int(x.shape[0]))
    a = h.to_scipy(np.float32)

    def mv(v):
        count[0] += 1
        return a @ v

    lin = sla.LinearOperator(a.shape, matvec=mv, dtype=np.float32)
    v0 = np.random.default_rng(0).standard_normal(a.shape[0]).astype(np.float32)
    vals = sla.eigsh(lin, k=k, which=which, tol=tol, v0=v0, return_eigenvectors=False)
    return vals, count[0]


def versions() -> dict[str, str]:
    """Versions of the numeric stack and of every peer (``gradience_jax.environment``)."""
    return gj.environment.versions(("jax", "jaxlib", "flax", *PEERS, "scipy"))


def machine() -> dict[str, Any]:
    """Platform, CPU, devices, versions, thread settings and the current load."""
    info = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "jax_devices": [str(d) for d in jax.devices()],
        "jax_x64": bool(jax.config.jax_enable_x64),
        "torch_threads": TORCH_THREADS,
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "versions": versions(),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
        with open("/proc/meminfo") as fh:
            info["mem_total_GiB"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


# -- timing ------------------------------------------------------------------------------


def median_time(fn: Callable[[], Any], repeats: int = 7, warmup: int = 2,
                block: bool = False) -> float:
    """Median wall time (s) of ``fn()`` over ``repeats`` runs after ``warmup`` runs.
    ``block=True`` waits for jax results (``jax.block_until_ready``)."""
    run = (lambda: jax.block_until_ready(fn())) if block else fn
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class PeakRSS:
    """Context manager sampling RSS every ``interval`` s in a thread; ``.peak_delta`` is the
    peak above the RSS at entry (bytes). Both frameworks release the GIL while computing."""

    def __init__(self, interval: float = 0.0005):
        self.interval = interval
        self.peak_delta = 0

    def __enter__(self):
        self._stop = threading.Event()
        self.base = rss_bytes()
        self._peak = self.base

        def loop():
            while not self._stop.is_set():
                self._peak = max(self._peak, rss_bytes())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._peak = max(self._peak, rss_bytes())
        self._stop.set()
        self._thread.join()
        self.peak_delta = max(0, self._peak - self.base)
        return False


# -- models on both sides --------------------------------------------------------------------


def build(name: str, quick: bool):
    """``(nnx model, Adapted, batch)``: the benchmark models (same as ``operators.py``)."""
    key = jax.random.key(0)
    head = gj.heads.softmax_cross_entropy()
    if name == "mlp":
        model = MLP([784, 256, 256, 10], rngs=nnx.Rngs(0))
        batch = gj.data.classification(key, n=128 if quick else 512, dim=784, num_classes=10)
    elif name == "cnn":
        model = CNN(in_channels=3, channels=(16, 32), image_size=16, num_classes=10,
                    rngs=nnx.Rngs(0))
        batch = gj.data.images(key, n=32 if quick else 128, size=16, channels=3)
    elif name == "transformer":
        model = TinyTransformerLM(vocab_size=512, d_model=128, num_heads=4, num_layers=2,
                                  max_len=64, rngs=nnx.Rngs(0))
        batch = gj.data.token_sequences(key, n=8 if quick else 16, seq_len=64, vocab_size=512)
    else:
        raise ValueError(f"model must be 'mlp', 'cnn' or 'transformer', got {name!r}")
    return model, from_nnx(model, head), batch


def describe(adapted, batch) -> str:
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    return f"P={gj.tree.size(adapted.params):,}, B={n}"


# -- output ------------------------------------------------------------------------------


def fmt(x: Any) -> str:
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        if x != x:  # nan
            return "-"
        return f"{x:.3g}"
    return str(x)


def print_table(title: str, rows: list[dict], columns: list[str] | None = None) -> None:
    """A rich table (plain text if rich is missing)."""
    if not rows:
        return
    columns = columns or list(rows[0])
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(title)
        print(" | ".join(columns))
        for r in rows:
            print(" | ".join(fmt(r.get(c, "")) for c in columns))
        return
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[fmt(r.get(c, "")) for c in columns])
    Console(width=200).print(table)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_json(path: str | Path, result: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def default(o):
        try:
            return float(o)
        except (TypeError, ValueError):
            return str(o)

    path.write_text(json.dumps(result, indent=2, default=default))
    print(f"wrote {path}")
    return path


def cell(ms: float | str, ratio: float | None = None) -> str:
    """``"12.3 ms (2.1x)"``: a peer's time and its ratio to ours (> 1: ours is faster)."""
    if isinstance(ms, str):
        return ms
    return f"{ms:.3g} ms" + (f" ({ratio:.2g}x)" if ratio is not None else "")
