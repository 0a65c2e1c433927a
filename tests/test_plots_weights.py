"""Weight-spectra figures: PNGs are written, non-empty, with the expected number of axes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gradience_jax import weights as gw
from gradience_jax.plots_weights import plot_layer_metrics, plot_weight_esd

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 2000 and data[:8] == PNG_MAGIC


@pytest.fixture(scope="module")
def heavy():
    rng = np.random.default_rng(0)
    n, m = 300, 150
    lam = (1.0 - rng.random(m)) ** (-1.0 / 2.0)  # Pareto, density exponent 3
    u = np.linalg.qr(rng.standard_normal((n, m)))[0]
    v = np.linalg.qr(rng.standard_normal((m, m)))[0]
    return gw.layer_spectrum((u * np.sqrt(n * lam)) @ v.T, path="blocks/0/mlp/kernel")


def test_esd_plot_writes_png_with_fits(tmp_path, heavy):
    out = tmp_path / "esd.png"
    fig = plot_weight_esd(heavy, path=str(out))
    assert _is_png(out)
    assert len(fig.axes) == 1
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    labels = [line.get_label() for line in ax.get_lines()]
    assert any("Marchenko-Pastur" in s for s in labels)
    assert any("power law" in s for s in labels)


def test_esd_plot_accepts_array_and_degenerate_input(tmp_path):
    fig = plot_weight_esd(np.random.default_rng(1).standard_normal((60, 30)))
    assert len(fig.axes) == 1
    out = tmp_path / "zero.png"
    fig = plot_weight_esd(gw.layer_spectrum(np.zeros((8, 4))), path=str(out))
    assert out.stat().st_size > 0 and len(fig.axes) == 1
    with pytest.raises(ValueError, match="bins"):
        plot_weight_esd(np.eye(3), bins=0)


def test_layer_metrics_bar_chart(tmp_path, heavy):
    rng = np.random.default_rng(2)
    params = {f"layer_{i}": {"kernel": rng.standard_normal((40, 20)) * (i + 1)} for i in range(3)}
    params["tiny"] = {"kernel": rng.standard_normal((3, 2))}  # alpha missing -> "n/a"
    rep = gw.weight_spectra(params)
    out = tmp_path / "bars.png"
    fig = plot_layer_metrics(rep, path=str(out))
    assert _is_png(out)
    assert len(fig.axes) == 2
    bars = [p for p in fig.axes[0].patches if p.get_height() > 0 and p.get_width() < 1]
    assert len(bars) == sum(rep[p].alpha is not None for p in rep)
    fig3 = plot_layer_metrics(
        {"a": heavy, "b": heavy}, metrics=("alpha", "stable_rank", "num_spikes")
    )
    assert len(fig3.axes) == 3
    with pytest.raises(ValueError, match="not a numeric"):
        plot_layer_metrics(rep, metrics=("verdict",))
    with pytest.raises(ValueError, match="no layers"):
        plot_layer_metrics({})


def test_weights_module_imports_neither_matplotlib_nor_scipy():
    """weights.py stays on the core import path: numpy / jax only (checked on its source)."""
    import ast

    tree = ast.parse(Path(gw.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    assert not roots & {"matplotlib", "scipy"}
