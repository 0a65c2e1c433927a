"""The core test modules, run again with x64 off: the configuration users get by default.

``tests/conftest.py`` switches ``jax_enable_x64`` on for the suite (dense float64
references). Users run with it off: float32 defaults everywhere, a float32 tridiagonal in
the jittable Lanczos path, float64 requests silently narrowed by JAX. This test runs the
core modules (operators, spectra, estimators, probes, weights, telemetry) in a second
pytest process with ``GRADIENCE_X64=0``; their tolerances come from ``helpers.tol`` and
float64-only cases skip with a reason. So `.ci/run` (the README's test command) covers
both precisions.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import X64

ROOT = Path(__file__).resolve().parents[1]

#: the modules whose numbers must hold in float32 too (issue 16, item 7)
CORE_MODULES = (
    "test_operators.py",
    "test_registry.py",
    "test_linearized.py",
    "test_kfac.py",
    "test_lanczos.py",
    "test_engine.py",
    "test_spectrum.py",
    "test_estimators.py",
    "test_geometry.py",
    "test_probes.py",
    "test_weights.py",
    "test_telemetry.py",
)


def _workers() -> list[str]:
    """``pytest-xdist`` flags: two worker processes (a module each) while this one waits.

    The parent suite is idle during the subprocess, so two workers use both cores of the CI
    machine; without ``pytest-xdist`` (a test extra) or with one core it runs serially.
    """
    if (os.cpu_count() or 1) < 2 or importlib.util.find_spec("xdist") is None:
        return []
    return ["-n", "2", "--dist", "loadfile"]


@pytest.mark.slow
@pytest.mark.skipif(not X64, reason="this process already runs with x64 off")
def test_core_modules_pass_with_x64_off():
    env = dict(os.environ, GRADIENCE_X64="0")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
           *_workers(), *(str(ROOT / "tests" / m) for m in CORE_MODULES)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3000)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
    assert proc.returncode == 0, f"x64-off run of the core modules failed:\n{tail}"
    assert " passed" in proc.stdout, tail
