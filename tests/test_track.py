"""``gradience-jax track``: curvature over a real training run's orbax checkpoints.

A short training run of a tiny MLP (full-batch Adam) writes a real orbax
``CheckpointManager`` directory with 3 saved steps; ``track`` must measure at each step
what an independent cold ``gj.eigsh`` (and a dense float64 eigendecomposition) gives for
that step's parameters, resume without measuring a step twice, and read the other run
layouts (composite items, per-step msgpack files, NNX states).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx, serialization
from helpers import FLOAT, tol
from jax.flatten_util import ravel_pytree

import gradience_jax as gj
from gradience_jax.app import checkpoints as ck
from gradience_jax.app import cli
from gradience_jax.app import track as tk
from gradience_jax.models import MLP, from_nnx
from gradience_jax.telemetry import load_telemetry

SIZES = [3, 6, 3]
STEPS = (10, 20, 30)
K = 3
TOL = tol(1e-9, 1e-5)


def batch():
    """The training (and measurement) batch: ``--data test_track:batch``."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, SIZES[0])).astype(FLOAT)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] + x[:, 2] > 0.5).astype(np.int32)
    return {"inputs": x, "labels": y}


def _train(save, steps=STEPS, start=None):
    """Full-batch Adam on the MLP; ``save(step, pure_params)`` at each step of ``steps``."""
    model = MLP(SIZES, param_dtype=FLOAT, rngs=nnx.Rngs(0))
    adapted = from_nnx(model, gj.heads.softmax_cross_entropy())
    params = adapted.params if start is None else start
    opt = optax.adam(0.05)
    state = opt.init(params)
    grad = jax.jit(jax.grad(adapted.loss_fn))
    b = batch()
    for step in range(1, max(steps) + 1):
        updates, state = opt.update(grad(params, b), state)
        params = optax.apply_updates(params, updates)
        if step in steps:
            save(step, nnx.to_pure_dict(params))
    return params


def _manager_run(root, steps=STEPS):
    with ocp.CheckpointManager(root) as mngr:
        _train(lambda s, p: mngr.save(s, args=ocp.args.StandardSave({"params": p, "step": s})),
               steps)
        mngr.wait_until_finished()
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _manager_run(tmp_path_factory.mktemp("run") / "ckpts")


@pytest.fixture(scope="module")
def tracked(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("track")
    cfg = tk.TrackConfig(model="mlp", data="test_track:batch", k=K, tol=TOL, trace_samples=8)
    return out, cfg, tk.track(run_dir, cfg, out)


def _adapted(path):
    return ck.restore_model(ck.load_checkpoint(path), "mlp").adapted


def _dense_top(adapted, b, k):
    flat, unravel = ravel_pytree(adapted.params)
    h = np.asarray(jax.hessian(lambda f: adapted.loss_fn(unravel(f), b))(flat), np.float64)
    return np.sort(np.linalg.eigvalsh(0.5 * (h + h.T)))[::-1][:k]


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


# -- loading a run --------------------------------------------------------------------------


def test_load_checkpoint_run_step_and_item_directories(run_dir):
    steps = ck.checkpoint_steps(run_dir)
    assert [s for s, _ in steps] == list(STEPS)
    saved = {}
    _train(lambda s, p: saved.__setitem__(s, p))
    last = jax.tree_util.tree_map(np.asarray, saved[30])
    for path in (run_dir, run_dir / "30", run_dir / "30" / "default"):
        got = ck.load_checkpoint(path)  # run dir: its latest step
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, last)
    tree = ck.load_tree(run_dir / "20")
    assert int(tree["step"]) == 20 and set(tree) == {"params", "step"}
    (run_dir.parent / "40.orbax-checkpoint-tmp-123").mkdir()  # an unfinished save: ignored
    assert [s for s, _ in ck.checkpoint_steps(run_dir)] == list(STEPS)


def test_other_run_layouts(tmp_path):
    saved = {}
    _train(lambda s, p: saved.__setitem__(s, p), steps=(5, 15))
    # composite items (params + JSON metrics), as many training loops save them
    comp = tmp_path / "composite"
    with ocp.CheckpointManager(comp) as mngr:
        for s, p in saved.items():
            mngr.save(s, args=ocp.args.Composite(params=ocp.args.StandardSave(p),
                                                 metrics=ocp.args.JsonSave({"loss": 1.0})))
        mngr.wait_until_finished()
    # per-step msgpack files and an NNX state ({"value": ...} leaves) named by their step
    files = tmp_path / "files"
    files.mkdir()
    model = MLP(SIZES, param_dtype=FLOAT, rngs=nnx.Rngs(0))
    for s, p in saved.items():
        (files / f"params_{s}.msgpack").write_bytes(serialization.msgpack_serialize(p))
    (files / "notes.txt").write_text("not a checkpoint")
    nnx_dir = tmp_path / "nnx_state"
    nnx.replace_by_pure_dict(state := nnx.state(model), saved[15])
    with ocp.StandardCheckpointer() as c:
        c.save(nnx_dir, state)
    legacy = tmp_path / "legacy"
    ocp.PyTreeCheckpointer().save(legacy, jax.tree_util.tree_map(
        np.asarray, ck._str_keys(saved[15])))
    want = jax.tree_util.tree_map(np.asarray, saved[15])
    for path in (comp, comp / "15", comp / "15" / "params", files / "params_15.msgpack",
                 nnx_dir, legacy):
        jax.tree_util.tree_map(np.testing.assert_allclose, ck.load_checkpoint(path), want)
    assert [s for s, _ in ck.checkpoint_steps(files)] == [5, 15]
    assert [s for s, _ in ck.checkpoint_steps(comp)] == [5, 15]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ck.CheckpointError, match="no checkpoint in it"):
        ck.checkpoint_steps(empty)
    (files / "params_015.msgpack").write_bytes(b"x")
    with pytest.raises(ck.CheckpointError, match="two checkpoints of step 15"):
        ck.checkpoint_steps(files)


# -- what track measures -----------------------------------------------------------------------


def test_track_equals_independent_per_step_eigsh(run_dir, tracked):
    """Warm-started track results are each step's converged top-k: a cold eigsh on that
    step's parameters, and the dense float64 eigenvalues, agree; trace and weights too."""
    _, cfg, summary = tracked
    assert summary["steps"] == list(STEPS) and summary["measured"] == 3
    cols = summary["columns"]
    assert cols["hessian/warm_start"] == [False, True, True]
    b = batch()
    for i, (_, path) in enumerate(ck.checkpoint_steps(run_dir)):
        adapted = _adapted(path)
        op = gj.hessian(adapted.loss_fn, adapted.params, b)
        cold = gj.eigsh(op, k=K, tol=TOL, max_iters=cfg.iters, key=jax.random.key(123))
        got = np.array([cols[f"hessian/lambda_{j + 1}"][i] for j in range(K)])
        assert cols["hessian/converged"][i]
        np.testing.assert_allclose(got, cold.eigenvalues, rtol=tol(1e-7, 1e-3))
        np.testing.assert_allclose(got, _dense_top(adapted, b, K), rtol=tol(1e-7, 2e-3))
        t = gj.hutchinson_trace(op, jax.random.fold_in(jax.random.key(cfg.seed), 1), 8)
        np.testing.assert_allclose(cols["hessian/trace"][i], float(t.estimate),
                                   rtol=tol(1e-10, 1e-5))
        loss = float(adapted.loss_fn(adapted.params, b))
        np.testing.assert_allclose(cols["loss"][i], loss, rtol=tol(1e-12, 1e-6))
        w = gj.weight_spectra(adapted.params).summary
        np.testing.assert_allclose(cols["weights/mean_effective_rank"][i], w.mean_effective_rank,
                                   rtol=1e-6)
    # training changed the curvature: the steps are not all the same measurement
    assert len({round(v, 6) for v in cols["hessian/lambda_1"]}) == 3


def test_track_writes_telemetry_and_report(tracked):
    out, cfg, summary = tracked
    header, records = load_telemetry(out / tk.LOG_NAME)
    assert [r.step for r in records] == list(STEPS)
    assert header["config"]["measurement"] == cfg.measurement() and header["end"] is not None
    assert all(r.metrics["hessian/lambda_1"] == v
               for r, v in zip(records, summary["columns"]["hessian/lambda_1"]))
    for name in ("track.json", "report.md", "report.html", "track_curvature.png",
                 "track_weights.png", "track_loss.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "track.json").read_text())
    assert saved["steps"] == list(STEPS) and saved["schema"] == tk.SCHEMA
    md = (out / "report.md").read_text()
    assert "![track_curvature](track_curvature.png)" in md and "| 30 |" in md
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') == 3 and 'id="step-20"' in html


def test_resume_skips_measured_steps(tmp_path, monkeypatch):
    """Tracking a run while it trains: the second call measures only the new checkpoint."""
    saved = {}
    _train(lambda s, p: saved.__setitem__(s, p))
    root = tmp_path / "run"
    with ocp.CheckpointManager(root) as mngr:
        for s in (10, 20):
            mngr.save(s, args=ocp.args.StandardSave({"params": saved[s]}))
        mngr.wait_until_finished()
    cfg = tk.TrackConfig(model="mlp", data="test_track:batch", k=2, tol=TOL, trace_samples=0,
                         figures=False)
    out = tmp_path / "out"
    first = tk.track(root, cfg, out)
    assert first["measured"] == 2
    _, before = load_telemetry(out / tk.LOG_NAME)
    with ocp.CheckpointManager(root) as mngr:
        mngr.save(30, args=ocp.args.StandardSave({"params": saved[30]}))
        mngr.wait_until_finished()
    seen = []
    measure = tk.measure_step

    def counting(adapted, b, c, warm=None):
        seen.append(1)
        return measure(adapted, b, c, warm)

    monkeypatch.setattr(tk, "measure_step", counting)
    second = tk.track(root, cfg, out)
    assert second["measured"] == 1 and second["skipped"] == 2 and len(seen) == 1
    # the resumed step is warm-started from the vectors saved after step 20: the same
    # start vector, so the same run as one uninterrupted track of all three steps
    assert second["columns"]["hessian/warm_start"] == [False, True, True]
    whole = tk.track(root, cfg, tmp_path / "whole")
    for col in ("hessian/matvecs", "hessian/lambda_1", "hessian/lambda_2"):
        assert second["columns"][col] == whole["columns"][col], col
    header, records = load_telemetry(out / tk.LOG_NAME)
    assert [r.step for r in records] == [10, 20, 30] and len(header["resumes"]) == 1
    assert [r.time for r in records[:2]] == [r.time for r in before]  # not measured again
    assert second["steps"] == [10, 20, 30]
    assert tk.track(root, cfg, out)["measured"] == 0  # nothing new
    assert tk.track(root, cfg, out, restart=True)["measured"] == 3
    with pytest.raises(ValueError, match="other settings .*k: 2 in the log, 3 now"):
        tk.track(root, cfg.__class__(**{**cfg.__dict__, "k": 3}), out)


def test_warm_start_file_stale_corrupt_or_mismatched_gives_a_cold_start(tmp_path):
    params = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    path = tmp_path / tk.WARM_NAME
    assert tk.load_warm(path, 10, params) == {}  # no file: cold, silently (a fresh run)
    vec = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    tk.save_warm(path, 10, {"hessian": vec})
    got = tk.load_warm(path, 10, params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got["hessian"], vec)
    with pytest.warns(UserWarning, match="holds step 10, the log ends at step 20"):
        assert tk.load_warm(path, 20, params) == {}
    with pytest.warns(UserWarning, match="leaf shapes differ"):
        assert tk.load_warm(path, 10, {"w": np.ones((3, 2)), "b": np.ones(3)}) == {}
    path.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.warns(UserWarning, match="cannot read the warm-start vectors"):
        assert tk.load_warm(path, 10, params) == {}


def test_nonfinite_step_is_recorded_not_fatal(tmp_path):
    saved = {}
    _train(lambda s, p: saved.__setitem__(s, p), steps=(10, 20))
    bad = jax.tree_util.tree_map(np.asarray, saved[20])
    bad["layers"][0]["kernel"] = np.full_like(bad["layers"][0]["kernel"], np.nan)
    files = tmp_path / "files"
    files.mkdir()
    ck.save_checkpoint(saved[10], files / "step_10.msgpack")
    ck.save_checkpoint(bad, files / "step_20.msgpack")
    cfg = tk.TrackConfig(model="mlp", data="test_track:batch", k=2, tol=TOL, trace_samples=0,
                         figures=False)
    s = tk.track(files, cfg, tmp_path / "o")
    assert s["columns"]["status"] == [None, s["columns"]["status"][1]]
    assert "non-finite parameters" in s["columns"]["status"][1]
    assert s["columns"]["hessian/lambda_1"][1] is None


# -- the command line ---------------------------------------------------------------------------


def test_track_cli(run_dir, tmp_path):
    out = tmp_path / "o"
    argv = ["track", run_dir, "--data", "test_track:batch", "--k", "2", "--trace-samples", "0",
            "--no-figures", "--out", out]
    code, stdout, err = _run([*argv, "--json"])
    assert code == 0, err
    data = json.loads(stdout)
    assert data["model"] == "mlp" and data["measured"] == 3  # the family inferred
    code, stdout, err = _run(argv)
    assert code == 0, err
    assert "0 measured, 3 from the log" in stdout and "hessian/lambda_1" in stdout
    code, _, err = _run([*argv[:-2], "--k", "3", "--out", out])
    assert code == 2 and "other settings" in err and "--restart" in err, err


@pytest.mark.parametrize("extra, fragment", [
    (["--k", "0"], "--k: expected a positive integer"),
    (["--k", "50", "--iters", "60"], "--k 50 exceeds the number of parameters"),
    (["--iters", "2", "--k", "3"], "--iters (2) must be >= --k (3)"),
    (["--tol", "-1"], "--tol must be"),
    (["--weights-only", "--no-weights"], "nothing to measure"),
    (["--model", "test_track:batch", "--data", "test_track:batch"], "unsupported model"),
    (["--model", "test_external_models:nnx_mlp"], "needs --data"),
    (["--data", "nocolon"], "'module:factory' spec"),
])
def test_track_cli_bad_usage_exits_2(run_dir, tmp_path, extra, fragment):
    code, _, err = _run(["track", run_dir, "--out", tmp_path / "o", *extra])
    assert code == 2, err
    assert fragment in err and len(err.strip().splitlines()) == 1, err


def test_track_cli_missing_and_empty_run_dirs(tmp_path):
    code, _, err = _run(["track", tmp_path / "nope"])
    assert code == 2 and "run directory not found" in err, err
    (tmp_path / "empty").mkdir()
    code, _, err = _run(["track", tmp_path / "empty", "--out", tmp_path / "o"])
    assert code == 1 and "no checkpoint in it" in err, err


def test_track_weights_only_external_model_needs_no_data(tmp_path):
    """A module:factory model, weights only: no --data, the checkpoints matched by path."""
    saved = {}
    _train(lambda s, p: saved.__setitem__(s, p), steps=(4, 8))
    root = tmp_path / "run"
    root.mkdir()
    for s, p in saved.items():
        ck.save_checkpoint(p, root / f"ckpt_{s}")
    f = tmp_path / "factory.py"
    f.write_text("from flax import nnx\nimport numpy as np\nfrom gradience_jax.models import MLP\n"
                 f"def build():\n    return MLP({SIZES}, param_dtype=np.{FLOAT.__name__}, "
                 "rngs=nnx.Rngs(1))\n")
    code, stdout, err = _run(["track", root, "--model", f"{f}:build", "--weights-only",
                              "--out", tmp_path / "o", "--json", "--no-figures"])
    assert code == 0, err
    cols = json.loads(stdout)["columns"]
    for i, s in enumerate((4, 8)):
        want = gj.weight_spectra(jax.tree_util.tree_map(jnp.asarray, saved[s])).summary
        np.testing.assert_allclose(cols["weights/mean_stable_rank"][i], want.mean_stable_rank,
                                   rtol=1e-6)
    shutil.rmtree(tmp_path / "o")


def test_weights_cli_reads_safetensors(tmp_path):
    """``weights FILE.safetensors``: the table equals weight_spectra of the file's arrays."""
    safetensors = pytest.importorskip("safetensors.numpy")
    from gradience_jax.weights import file_reshape

    rng = np.random.default_rng(0)
    tensors = {"fc1.weight": rng.normal(size=(30, 20)).astype(np.float32),
               "fc1.bias": np.zeros(30, np.float32),
               "conv.weight": rng.normal(size=(8, 4, 3, 3)).astype(np.float32)}
    path = tmp_path / "model.safetensors"
    safetensors.save_file(tensors, str(path))
    code, stdout, err = _run(["weights", path, "--json"])
    assert code == 0, err
    got = json.loads(stdout)["layers"]
    want = gj.weight_spectra(tensors, reshape=file_reshape)
    assert set(got) == set(want.layers) == {"fc1.weight", "conv.weight"}
    for name, layer in want.layers.items():
        np.testing.assert_allclose(got[name]["stable_rank"], layer.stable_rank, rtol=1e-6)
    code, _, err = _run(["weights", tmp_path / "missing.safetensors"])
    assert code == 2 and ".safetensors checkpoint" in err, err
