"""The Protocol A-D notebooks execute top to bottom in fast mode (``GRADIENCE_FAST=1``), with
figures and logs redirected to a temporary directory; one test per notebook."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PROTOCOL_NOTEBOOKS = [
    "protocol_A_edge_of_stability.ipynb",
    "protocol_B_grokking.ipynb",
    "protocol_C_fisher_geometry.ipynb",
    "protocol_D_rank_evolution.ipynb",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", PROTOCOL_NOTEBOOKS)
def test_protocol_notebook_executes_in_fast_mode(name, tmp_path, monkeypatch):
    # The kernel inherits this process's environment.
    monkeypatch.setenv("GRADIENCE_FAST", "1")
    monkeypatch.setenv("GRADIENCE_FIGURE_DIR", str(tmp_path / "figures"))
    monkeypatch.setenv("GRADIENCE_LOG_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # One BLAS thread: small SVDs are ~50x cheaper than with threads spinning on shared cores.
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("JAX_ENABLE_X64", raising=False)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    figures = sorted(p.name for p in (tmp_path / "figures").glob("protocol_*.png"))
    assert figures, "the notebook wrote no figure"
    assert list((tmp_path / "runs").glob("protocol_*.jsonl")), "the notebook wrote no log"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    assert os.environ["GRADIENCE_FAST"] == "1"


@pytest.mark.slow
def test_influence_notebook_finds_the_planted_labels(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIENCE_FAST", "1")
    monkeypatch.setenv("GRADIENCE_FIGURE_DIR", str(tmp_path / "figures"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("JAX_ENABLE_X64", raising=False)
    nb = nbformat.read(NOTEBOOKS / "05_influence_mislabelled.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute()
    assert {p.name for p in (tmp_path / "figures").glob("*.png")} >= {
        "influence_self.png", "influence_examples.png"}
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    recalls = [float(line.rsplit(":", 1)[1]) for line in text.splitlines()
               if "recall of the planted labels" in line]
    assert len(recalls) == 3 and min(recalls[:2]) >= 0.5, text
