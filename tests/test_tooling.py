"""Tooling gates that run with the test command: ruff on the whole checkout.

The doctests of the package run through pytest itself (``--doctest-modules`` over
``gradience_jax`` in ``pyproject.toml``).
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing():
    if shutil.which("ruff") is None and subprocess.run(
            [sys.executable, "-m", "ruff", "--version"], capture_output=True).returncode != 0:
        pytest.fail("ruff is not installed: it is part of the [test] extra")
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "gradience_jax", "tests",
                          "benchmarks", "scripts"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_doctests_are_collected():
    text = (ROOT / "pyproject.toml").read_text()
    assert "--doctest-modules" in text and '"gradience_jax"' in text
