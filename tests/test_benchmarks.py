"""The benchmark suite's quick mode runs end to end (no performance assertions: targets are
reported in the tables, not tested; see benchmarks/RESULTS.md).

CI runs the quick mode of the suites that fit its time budget; ``gradience-jax bench`` runs
all of them (``peers_operators``, ``peers_memory`` and the scaled-down GPT-2 add ~6 min).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import json_numbers

ROOT = Path(__file__).resolve().parent.parent
CI_SUITES = ("operators", "eigsh_clustered", "peers_eigen", "peers_trace")


@pytest.mark.slow
def test_quick_mode_writes_tables_and_json(tmp_path):
    pytest.importorskip("torch")
    md = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--only",
         ",".join(CI_SUITES), "--results", str(tmp_path), "--markdown", str(md)],
        cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = json.loads((tmp_path / "run_all_status.json").read_text())
    assert {n: s["returncode"] for n, s in status.items()} == {n: 0 for n in CI_SUITES}
    for name in CI_SUITES:
        doc = json.loads((tmp_path / f"{name}.json").read_text())
        assert any(math.isfinite(x) and x > 0 for x in json_numbers(doc)), name
    text = md.read_text()
    for heading in ("Operators vs the gradient", "Top-10 Hessian eigenvalues, clustered",
                    "Trace and spectral density"):
        assert heading in text, heading
