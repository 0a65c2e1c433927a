"""The four seed figures: layout from synthetic results (fast) and from small experiment runs."""

from __future__ import annotations

import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gradience_jax import attention as ga
from gradience_jax import landscape as gl
from gradience_jax.experiments import attention as ea
from gradience_jax.experiments import seed, training

plots = pytest.importorskip("gradience_jax.plots")

AXES = {"pseudo": 8, "sharp_flat_4_runs": 8, "attention": 9, "dynamics": 6}


def _slice2d(n=9, nan_fraction=0.0, seed=0):
    g = np.linspace(-1, 1, n)
    a, b = np.meshgrid(g, g, indexing="ij")
    z = 0.1 + a**2 + 0.3 * b**2 + 0.01 * np.random.default_rng(seed).normal(size=a.shape) ** 2
    if nan_fraction:
        z[a > 1 - 2 * nan_fraction] = np.nan
    return gl.Slice2D(g, g, z, None, float(np.mean(np.isnan(z))))


def _slice1d(curv):
    g = np.linspace(-1, 1, 11)
    return gl.Slice1D(g, 0.1 + curv * g**2, None, 0.0)


def _train(steps=5, offset=0.0):
    s = np.arange(0, 10 * steps + 1, 10)
    tr = 1.0 / (1 + s) + 0.05 + offset
    return training.TrainResult(None, s, tr, tr + 0.1, None, np.full(10 * steps, 0.5))


def _sharp(lmax):
    return gl.SharpnessReport(0.1, lmax, -0.1, 3 * lmax, lmax / 10, lmax / 100, 1e-3, 0.05)


def _interp(peak):
    t = np.linspace(0, 1, 9)
    return gl.Interpolation(t, 0.1 + peak * np.sin(np.pi * t), None, peak, 0.5, (0.1, 0.1), 0.0)


def _pseudo_result():
    ev = np.array([3.7, 1.7, 0.7, 0.1, 1e-3, -2e-3])
    h = {"steps": np.arange(5) * 10, "loss": np.geomspace(2, 0.02, 5), "lambda_max": np.linspace(3, 4, 5),
         "lambda_min": np.linspace(-0.5, 0, 5), "trace": np.linspace(5, 7, 5)}
    pca = gl.TrajectoryPCA([], np.array([0.8, 0.15]), np.c_[np.linspace(2, 0, 5), np.linspace(1, 0, 5)], None)
    return seed.PseudoSpectralResult(None, 6, np.sort(ev), {"largest": _slice1d(3.7), "smallest": _slice1d(0.01)},
                                   _slice2d(), _slice2d(seed=1), pca, h)


def _sharp_flat_result(names=("sgd_small", "sgd_large", "sgd_noise", "sam")):
    runs = {n: seed.SharpFlatRun(n, seed.METHODS[n], None, _train(offset=0.01 * i), _sharp(5.0 + 5 * i),
                               _slice2d(seed=i)) for i, n in enumerate(names)}
    barriers = {(a, b): _interp(0.05) for i, a in enumerate(names) for b in names[i + 1:]}
    bez = gl.BezierResult(None, np.linspace(0, 1, 9), np.full(9, 0.1), 0.0, 0.0, _interp(0.05), np.ones(3))
    return seed.SharpFlatResult(runs, barriers, bez, {})


def _geometry(h=2, t=4, dh=4):
    rng = np.random.default_rng(0)
    w = rng.random((3, h, t, t)) * np.tril(np.ones((t, t)))
    w /= w.sum(-1, keepdims=True)
    svs = {n: np.sort(rng.random((h, dh)))[:, ::-1] for n in ("query", "key", "value", "out", "qk", "ov")}
    svd = ga.AttentionSVD(svs, {n: np.full(h, 2.0) for n in svs}, {n: np.full(h, 1.5) for n in svs},
                          {n: np.full(h, 3.0) for n in svs})
    return ga.AttentionGeometry("blocks/0/attention", h, dh, svd, w, np.full(h, 0.6), np.full(h, 0.7),
                                np.full(h, 2.5), rng.random((h, t)), np.eye(h * dh),
                                np.zeros((h, dh, dh)), np.linspace(5, -1, 40))


def _dynamics_result(r=6, h=2, t=6):
    s = np.arange(r) * 10
    w = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]
    maps = np.broadcast_to(w, (h, t, t))
    return ea.AttentionDynamicsResult(s, np.geomspace(3, 0.2, r), np.geomspace(3, 0.3, r),
                                      np.ones((r, h)), np.full((r, h), 0.8), np.full((r, h), 4.0),
                                      np.full((r, h), 3.0), maps, maps, {"d_model": 8})


def _check_png(path):
    data = path.read_bytes()
    assert len(data) > 10_000 and data[:8] == b"\x89PNG\r\n\x1a\n"


# -- fast: drawing only -------------------------------------------------------------------


def test_import_gradience_jax_does_not_import_matplotlib():
    code = ("import sys, gradience_jax, gradience_jax.landscape, gradience_jax.attention, "
            "gradience_jax.plots, gradience_jax.plots_weights; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_figures_draw_from_results(tmp_path):
    cases = [
        (plots.pseudo_spectral_analysis, _pseudo_result(), AXES["pseudo"]),
        (plots.sharp_vs_flat_minima, _sharp_flat_result(), AXES["sharp_flat_4_runs"]),
        (plots.sharp_vs_flat_minima, _sharp_flat_result(("sgd_small", "sam")), 6),
        (plots.plot_attention_geometry,
         ea.AttentionGeometryResult(_geometry(), _slice2d(), None, None, {}), AXES["attention"]),
        (plots.attention_training_dynamics, _dynamics_result(), AXES["dynamics"]),
    ]
    for i, (fn, result, n_axes) in enumerate(cases):
        path = tmp_path / f"fig{i}.png"
        fig = fn(result, path=str(path))
        assert len(fig.axes) == n_axes, fn.__name__
        _check_png(path)


def test_nonfinite_landscapes_never_crash_the_plot(tmp_path):
    part = _slice2d(nan_fraction=0.3)
    assert 0 < part.nonfinite_fraction < 1
    ax = plots.landscape_contour(part)
    assert any("non-finite" in t.get_text() for t in ax.texts)
    empty = gl.Slice2D(part.alphas, part.betas, np.full_like(part.loss, np.nan), None, 1.0)
    ax = plots.landscape_contour(empty)
    assert any("no finite values" in t.get_text() for t in ax.texts)
    fig = ax.figure
    plots.landscape_surface(part, fig.add_subplot(1, 2, 2, projection="3d"))
    plots.landscape_surface(empty, fig.add_subplot(2, 2, 2, projection="3d"))
    result = _sharp_flat_result(("sgd_small", "sam"))
    result.runs["sam"] = result.runs["sam"].__class__(**{**result.runs["sam"].__dict__, "landscape": part})
    plots.sharp_vs_flat_minima(result, path=str(tmp_path / "nan.png"))
    _check_png(tmp_path / "nan.png")


def test_figures_never_train():
    for fn in (plots.pseudo_spectral_analysis, plots.sharp_vs_flat_minima,
               plots.plot_attention_geometry, plots.attention_training_dynamics):
        with pytest.raises(TypeError, match="needs result="):
            fn()
        with pytest.raises(TypeError):
            fn(None, num_steps=10)  # experiment settings are not figure arguments


def test_old_import_paths():
    import gradience_jax.plots_weights as pw
    from gradience_jax.plots import attention as pa
    from gradience_jax.plots import figure
    from gradience_jax.plots import landscape as pl

    assert plots.attention_geometry is plots.plot_attention_geometry is pa.plot_attention_geometry
    assert plots.pseudo_spectral_analysis is pl.pseudo_spectral_analysis
    assert pw.plot_weight_esd is plots.plot_weight_esd
    assert pw.plot_layer_metrics is plots.plot_layer_metrics
    assert plots.save_figure is figure.save_figure and plots.DPI == figure.DPI
    assert {f"plot_protocol_{c}" for c in "abcd"} <= set(dir(plots))


def test_save_figure_makes_folders_and_one_dpi(tmp_path):
    from gradience_jax.plots import figure

    fig = figure.new_figure((2, 1))
    fig.add_subplot(1, 1, 1).plot([0, 1])
    assert figure.save_figure(fig, None) is None
    out = figure.save_figure(fig, tmp_path / "a" / "b.png")
    assert out == str(tmp_path / "a" / "b.png")
    from matplotlib.image import imread

    assert imread(out).shape[:2] == (figure.DPI, 2 * figure.DPI)


# -- end to end: each figure from its experiment on a small model, under a minute ---------


def _end_to_end(fn, experiment, n_axes, tmp_path, **kwargs):
    path = tmp_path / f"{fn.__name__}.png"
    start, cpu = time.perf_counter(), time.process_time()
    fig = fn(experiment(jax.random.key(0), **kwargs), path=str(path))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert len(fig.axes) == n_axes
    _check_png(path)
    # CPU time of this process (all its threads): wall time on a shared, oversubscribed
    # machine measures the other tenants, not this code.
    assert cpu < 60.0, f"{fn.__name__} took {cpu:.1f} s of CPU ({wall:.1f} s wall)"


def test_pseudo_spectral_figure_end_to_end(tmp_path):
    _end_to_end(plots.pseudo_spectral_analysis, seed.pseudo_spectral_experiment, AXES["pseudo"],
                tmp_path, num_steps=200, record_every=50, resolution=9)


@pytest.mark.slow
def test_sharp_vs_flat_figure_end_to_end(tmp_path):
    _end_to_end(plots.sharp_vs_flat_minima, seed.sharp_vs_flat_experiment,
                AXES["sharp_flat_4_runs"], tmp_path, hidden=(8,), num_steps=100, record_every=50,
                resolution=7, bezier_steps=20, num_test=64)


@pytest.mark.slow
def test_attention_geometry_figure_end_to_end(tmp_path):
    _end_to_end(plots.plot_attention_geometry, ea.attention_geometry_experiment,
                AXES["attention"], tmp_path, num_steps=20, resolution=7)


@pytest.mark.slow
def test_attention_dynamics_figure_end_to_end(tmp_path):
    _end_to_end(plots.attention_training_dynamics, ea.attention_dynamics_experiment,
                AXES["dynamics"], tmp_path, num_steps=40, record_every=20, num_train=32,
                num_eval=16, d_model=8, seq_len=6)
