"""The ``gradience-jax`` command: every subcommand and every bad-input case, in-process.

Heavy work is kept small: one quick ``analyze`` run (module fixture) whose checkpoint feeds
the checkpoint tests, which reuse its compiled programs; ``protocol``, ``figures`` and
``bench`` run on monkeypatched tiny workloads (their real workloads are tested elsewhere).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from helpers import json_numbers

from gradience_jax.app import checkpoints as ck
from gradience_jax.app import cli, seed_figures
from gradience_jax.app import protocols as app_protocols
from gradience_jax.app import report as rp
from gradience_jax.app.families import default_spec


def run(argv, capsys=None):
    """``(exit code, stdout, stderr)`` of ``main(argv)``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code, err, expected_code, fragment, *, after_output=False):
    """Exit code as expected; the error is one line (the only stderr line, or the last one
    after a command's own output when ``after_output``) and there is no traceback."""
    assert code == expected_code, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert after_output or len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[-1].startswith("gradience-jax: error: ") and fragment in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    """One quick ``analyze`` with ``--save-checkpoint`` and ``--json``."""
    root = tmp_path_factory.mktemp("analyze")
    out, ckpt = root / "report", root / "ckpt.msgpack"
    code, stdout, err = run(["analyze", "--fast", "--out", out,
                             "--save-checkpoint", ckpt, "--json"])
    assert code == 0, err
    return {"out": out, "ckpt": ckpt, "stdout": json.loads(stdout), "root": root,
            "report": json.loads((out / "report.json").read_text())}


# -- analyze ---------------------------------------------------------------------------------


def test_analyze_writes_report_folder(analyzed):
    out, rep = analyzed["out"], analyzed["report"]
    for name in ("report.json", "report.md", "params.msgpack", "training.png",
                 "curvature_top_k.png", "spectral_density.png", "landscape_2d.png",
                 "weight_spectra.png"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    assert "![landscape](landscape_2d.png)" in md and "| hessian |" in md
    assert rep["schema"] == rp.SCHEMA and rep["seed"] == 0 and rep["config"]["fast"]
    assert set(rep["versions"]) >= {"python", "jax", "flax", "gradience-jax"}
    assert rep["wall_times"]["total"] > 0 and "top_k:hessian" in rep["wall_times"]
    assert set(rep["curvature"]) == {"hessian", "ggn"}
    top = rep["curvature"]["hessian"]["top_k"]
    assert len(top["eigenvalues"]) == 5 and top["operator"] == "hessian"
    assert all(math.isfinite(v) for v in top["eigenvalues"] + top["ritz_residuals"])
    assert np.all(np.diff(top["eigenvalues"]) <= 0)
    assert rep["training"]["loss_final"] < rep["training"]["loss_initial"]
    assert all(c["passed"] for c in rep["checks"]), rep["checks"]
    assert all(math.isfinite(v) for v in json_numbers(rep))
    # --json prints the same report (wall times and file lists are added on writing)
    assert analyzed["stdout"]["curvature"] == rep["curvature"]


def test_analyze_checkpoint_msgpack_matches_the_trained_run(analyzed, tmp_path):
    code, stdout, err = run(["analyze", "--checkpoint", analyzed["ckpt"], "--model", "mlp",
                             "--operator", "hessian", "--fast", "--no-figures", "--out",
                             tmp_path / "r", "--json"])
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["model"]["source"].startswith("checkpoint") and rep["training"] is None
    ref = analyzed["report"]["curvature"]["hessian"]["top_k"]["eigenvalues"]
    got = rep["curvature"]["hessian"]["top_k"]["eigenvalues"]
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert rep["loss"]["train"] == pytest.approx(analyzed["report"]["loss"]["train"], rel=1e-6)
    assert not list(Path(tmp_path / "r").glob("*.png"))


def test_analyze_orbax_checkpoint_weights_only_infers_model(analyzed, tmp_path):
    pure = ck.load_checkpoint(analyzed["ckpt"])
    orbax_dir = ck.save_checkpoint(pure, tmp_path / "orbax_ckpt")
    assert orbax_dir.is_dir()
    code, stdout, err = run(["analyze", "--checkpoint", orbax_dir, "--weights-only", "--out",
                             tmp_path / "w", "--json"])
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["model"]["name"] == "mlp" and rep["curvature"] is None and rep["data"] is None
    ref = analyzed["report"]["weights"]["layers"]["layers/1/kernel"]
    assert rep["weights"]["layers"]["layers/1/kernel"]["alpha"] == pytest.approx(ref["alpha"])
    assert (tmp_path / "w" / "weight_spectra.png").is_file()


def test_analyze_rich_table_output(analyzed, tmp_path):
    code, stdout, err = run(["analyze", "--checkpoint", analyzed["ckpt"], "--weights-only",
                             "--no-figures", "--out", tmp_path / "t"])
    assert code == 0, err
    assert "gradience-jax analyze" in stdout and "report written to" in stdout


def test_transformer_and_cnn_checkpoints_round_trip(tmp_path):
    for model in ("transformer", "cnn"):
        restored = ck.init_model(model, seed=1)
        path = ck.save_checkpoint(restored.module, tmp_path / f"{model}.msgpack")
        pure = ck.load_checkpoint(path)
        assert ck.infer_model(pure) == (model, default_spec(model))
        again = ck.restore_model(pure, model)
        a = ck.to_pure_dict(again.adapted.params)
        b = ck.to_pure_dict(restored.adapted.params)
        assert all(np.array_equal(x, y) for x, y in zip(
            __import__("jax").tree_util.tree_leaves(a), __import__("jax").tree_util.tree_leaves(b)))


# -- weights ---------------------------------------------------------------------------------


def test_weights_table_and_json(analyzed, tmp_path):
    code, stdout, err = run(["weights", analyzed["ckpt"]])
    assert code == 0, err
    assert "layers/0/kernel" in stdout and "weight spectra" in stdout
    code, stdout, err = run(["weights", analyzed["ckpt"], "--json", "--out", tmp_path])
    assert code == 0, err
    data = json.loads(stdout)
    assert set(data["layers"]) == {"layers/0/kernel", "layers/1/kernel", "layers/2/kernel"}
    assert data["failed"] == {} and "ok" not in data
    assert (tmp_path / "weights.json").is_file() and (tmp_path / "weights.md").is_file()
    # the weighted alpha is WeightWatcher's: alpha * log10(sigma_1^2)
    for x in data["layers"].values():
        if x["alpha"] is not None:
            assert x["weighted_alpha"] == pytest.approx(
                x["alpha"] * 2 * math.log10(x["spectral_norm"]), rel=1e-9)


@pytest.fixture()
def nan_ckpt(analyzed, tmp_path):
    """The trained MLP's checkpoint with 3 NaN entries in layers/1/kernel."""
    pure = ck.load_checkpoint(analyzed["ckpt"])
    kernel = np.array(pure["layers"][1]["kernel"])
    kernel[0, :3] = np.nan
    pure["layers"][1]["kernel"] = kernel
    return ck.save_checkpoint(pure, tmp_path / "nan.msgpack")


def test_weights_nan_kernel_is_a_failed_row_and_exit_1(nan_ckpt, tmp_path):
    """Not silently dropped: the NaN layer is a FAILED row with its reason, the other layers
    are reported, --out is written, and the exit code is 1 (one error line, after the table)."""
    code, stdout, err = run(["weights", nan_ckpt, "--out", tmp_path / "w"])
    assert_one_line_error(code, err, 1, "could not be analysed", after_output=True)
    assert "layers/1/kernel" in err and "3 NaN" in err
    row = next(ln for ln in stdout.splitlines() if "layers/1/kernel" in ln)
    assert "FAILED" in row
    assert "layers/0/kernel" in stdout and "layers/2/kernel" in stdout
    written = json.loads((tmp_path / "w" / "weights.json").read_text())
    assert set(written["failed"]) == {"layers/1/kernel"}
    assert "FAILED" in (tmp_path / "w" / "weights.md").read_text()
    code, stdout, err = run(["weights", nan_ckpt, "--json"])
    assert code == 1
    data = json.loads(stdout)  # one JSON document: the report with ok / exit_code / error
    assert data["ok"] is False and data["exit_code"] == 1 and "could not be analysed" in data["error"]
    assert set(data["failed"]) == {"layers/1/kernel"} and "3 NaN" in data["failed"]["layers/1/kernel"]
    assert set(data["layers"]) == {"layers/0/kernel", "layers/2/kernel"}
    assert data["summary"]["num_failed"] == 1


def test_analyze_refuses_nan_checkpoint_but_weights_only_reports_it(nan_ckpt, tmp_path):
    code, _, err = run(["analyze", "--checkpoint", nan_ckpt, "--out", tmp_path / "a"])
    assert_one_line_error(code, err, 1, "non-finite parameters")
    assert "layers/1/kernel (3 NaN, 0 Inf)" in err
    assert not (tmp_path / "a" / "report.json").exists()  # refused before any work
    code, stdout, err = run(["analyze", "--checkpoint", nan_ckpt, "--weights-only",
                             "--no-figures", "--out", tmp_path / "w"])
    assert_one_line_error(code, err, 1, "could not be analysed", after_output=True)
    rep = json.loads((tmp_path / "w" / "report.json").read_text())
    assert set(rep["weights"]["failed"]) == {"layers/1/kernel"}
    assert "FAILED" in (tmp_path / "w" / "report.md").read_text()


# -- bad input -------------------------------------------------------------------------------


def test_missing_checkpoint_is_bad_usage(tmp_path):
    """A path that does not exist is a usage error (exit 2) naming the argument."""
    for argv, flag in (
            (["analyze", "--checkpoint", tmp_path / "nope.msgpack", "--out", tmp_path / "o"],
             "--checkpoint must be"),
            (["weights", tmp_path / "nope"], "PATH must be")):
        code, _, err = run(argv)
        assert_one_line_error(code, err, 2, "checkpoint not found")
        assert flag in err
    assert not (tmp_path / "o").exists()


def test_corrupt_checkpoints(tmp_path):
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(b"\xc1\x00garbage" * 10)
    empty = tmp_path / "empty.msgpack"
    empty.write_bytes(b"")
    not_dict = tmp_path / "list.msgpack"
    from flax import serialization

    not_dict.write_bytes(serialization.msgpack_serialize([1, 2, 3]))
    empty_dir = tmp_path / "empty_orbax"
    empty_dir.mkdir()
    for path, fragment in ((bad, "cannot read checkpoint"), (empty, "is empty"),
                           (not_dict, "does not hold a dict"), (empty_dir, "cannot read orbax")):
        code, _, err = run(["weights", path])
        assert_one_line_error(code, err, 1, fragment)
    code, _, err = run(["analyze", "--checkpoint", bad, "--out", tmp_path / "o"])
    assert_one_line_error(code, err, 1, "cannot read checkpoint")


def test_checkpoint_tree_does_not_match_model(analyzed, tmp_path):
    for model in ("transformer", "cnn"):
        code, _, err = run(["analyze", "--checkpoint", analyzed["ckpt"], "--model", model,
                            "--out", tmp_path / "o"])
        assert_one_line_error(code, err, 1, f"does not match --model {model}")
    # an MLP-like tree with a wrong bias shape
    pure = ck.load_checkpoint(analyzed["ckpt"])
    pure["layers"][1]["bias"] = np.zeros(3, np.float32)
    path = ck.save_checkpoint(pure, tmp_path / "odd.msgpack")
    code, _, err = run(["analyze", "--checkpoint", path, "--model", "mlp", "--out", tmp_path / "o"])
    assert_one_line_error(code, err, 1, "layers/1/bias has shape (3,)")
    code, _, err = run(["analyze", "--checkpoint", path, "--out", tmp_path / "o"])
    assert_one_line_error(code, err, 1, "matches none of the built-in models")


@pytest.mark.parametrize("argv, fragment", [
    (["analyze", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["analyze", "--model", "resnet"], "invalid choice: 'resnet'"),
    (["analyze", "--operator", "lobpcg"], "invalid choice: 'lobpcg'"),
    (["analyze", "--k", "0"], "argument --k: expected a positive integer, got '0'"),
    (["analyze", "--k", "abc"], "argument --k: expected a positive integer, got 'abc'"),
    (["analyze", "--train-steps", "-3"], "argument --train-steps: expected an integer in [0,"),
    (["analyze", "--train-steps", "100000000000"], "expected an integer in [0, 10000000]"),
    (["analyze", "--iters", "0"], "argument --iters: expected an integer in [1, 10000000]"),
    (["analyze", "--seed", "-1"], "argument --seed: expected an integer in [0, 4294967295]"),
    (["analyze", "--seed", "4294967296"], "argument --seed: expected an integer in [0,"),
    (["protocol", "A", "--seed", "-3"], "argument --seed: expected an integer in [0,"),
    # impossible combinations are refused, not clamped
    (["analyze", "--k", "100000", "--iters", "2"], "--iters 2 is less than --k 100000"),
    (["analyze", "--k", "100"], "--k 100 needs --iters >= 100 (the default cap is 60)"),
    (["analyze", "--fast", "--k", "40"], "the default cap is 30 with --fast"),
    (["analyze", "--k", "6000", "--iters", "6000"],
     "--k 6000 exceeds the number of parameters of the mlp model (5,508)"),
    (["analyze", "--reorth", "partial"], "invalid choice"),
    (["protocol", "E"], "invalid choice: 'E'"),
    (["teleport"], "invalid choice: 'teleport'"),
    ([], "required"),
])
def test_bad_usage_exits_2_with_one_line(argv, fragment):
    code, _, err = run(argv)
    assert_one_line_error(code, err, 2, fragment)


def test_k_above_checkpoint_parameter_count_is_refused(analyzed, tmp_path):
    code, _, err = run(["analyze", "--checkpoint", analyzed["ckpt"], "--k", "5509", "--iters",
                        "6000", "--out", tmp_path / "o"])
    assert_one_line_error(code, err, 2, "--k 5509 exceeds the number of parameters")
    assert not (tmp_path / "o").exists()


def test_analysis_config_refuses_bad_values():
    """The API refuses what the CLI refuses (nothing is clamped in the measurements)."""
    for kw, fragment in (({"k": 100}, "iters (60) must be >= k (100)"),
                         ({"seed": -1}, "seed must be >= 0"),
                         ({"iters": 0}, "iters must be >= 1"),
                         ({"train_steps": 10**8}, "train_steps must be <= 10000000"),
                         ({"tol": float("nan")}, "tol must be finite"),
                         ({"span": 0.0}, "span must be > 0"),
                         ({"grid": 2}, "grid must be >= 3"),
                         ({"reorth": "partial"}, "reorth must be one of")):
        with pytest.raises(ValueError, match=re.escape(fragment)):
            rp.AnalysisConfig(**kw)
    with pytest.raises(TypeError, match="k must be an integer"):
        rp.AnalysisConfig(k=2.5)


def test_unreadable_checkpoint_file_is_one_line(monkeypatch, tmp_path):
    """A file that cannot be read (permissions) and a directory that is not an orbax
    checkpoint are one-line failures naming the path."""
    d = tmp_path / "dir.msgpack"
    d.mkdir()
    code, _, err = run(["weights", d])
    assert_one_line_error(code, err, 1, "cannot read orbax checkpoint")
    f = tmp_path / "c.msgpack"
    f.write_bytes(b"x")

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    code, _, err = run(["weights", f])
    assert_one_line_error(code, err, 1, f"cannot read checkpoint {f}: Permission denied")


def test_unwritable_out(analyzed, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, _, err = run(["analyze", "--fast", "--out", blocker / "sub"])
    assert_one_line_error(code, err, 1, "cannot write to output folder")
    code, _, err = run(["analyze", "--fast", "--out", tmp_path / "ok",
                        "--save-checkpoint", blocker / "sub" / "c.msgpack"])
    assert_one_line_error(code, err, 1, "cannot write to output folder")
    code, _, err = run(["weights", analyzed["ckpt"], "--out", blocker / "sub"])
    assert_one_line_error(code, err, 1, "cannot write to output folder")


def test_debug_shows_traceback_and_json_reports_errors(tmp_path):
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(b"\xc1\x00garbage")
    code, _, err = run(["weights", bad, "--debug"])
    assert code == 1 and "Traceback" in err
    code, stdout, err = run(["weights", bad, "--json"])
    data = json.loads(stdout)
    assert code == 1 and data["ok"] is False and data["exit_code"] == 1
    assert data["error"].startswith(f"cannot read checkpoint {bad} as flax msgpack")
    code, stdout, err = run(["weights", tmp_path / "nope", "--json"])
    assert code == 2 and json.loads(stdout)["exit_code"] == 2
    assert "checkpoint not found" in json.loads(stdout)["error"]
    code, stdout, _ = run(["analyze", "--bogus", "--json"])
    assert code == 2 and json.loads(stdout)["exit_code"] == 2


def test_unexpected_errors_are_one_line(monkeypatch, tmp_path):
    def boom(*a, **k):
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setattr(ck, "load_checkpoint", boom)
    code, _, err = run(["weights", tmp_path])
    assert_one_line_error(code, err, 1, "RuntimeError: kaboom second line")
    assert "--debug" in err


def test_help_and_version():
    code, out, _ = run(["--help"])
    assert code == 0 and "analyze" in out and "bench" in out
    code, out, _ = run(["analyze", "--help"])
    assert code == 0 and "--checkpoint" in out and "--reorth" in out
    code, out, _ = run(["--version"])
    assert code == 0 and "gradience-jax" in out


# -- protocol, figures, bench (tiny workloads) -----------------------------------------------


class _FakeResult(NamedTuple):
    config: object
    lead_lag: object
    series: object
    figures: list


def _fake_protocol(monkeypatch, name, calls, error=None):
    """Replace protocol ``name`` in the app's table by a tiny run and plot."""

    def runner(config, *, fast, log_dir):
        if error is not None:
            raise error
        calls.append(("run", config, fast, log_dir))
        return _FakeResult(config, np.float64(3.0), np.arange(3), [])

    def plot(result, figure_dir):
        calls.append(("plot", figure_dir))
        return [str(Path(figure_dir) / "fig.png")]

    entry = app_protocols.PROTOCOLS[name]
    monkeypatch.setitem(app_protocols.PROTOCOLS, name, entry._replace(runner=runner, plot=plot))


def test_protocol_runs_and_writes_summary(monkeypatch, tmp_path):
    calls = []
    _fake_protocol(monkeypatch, "B", calls)
    code, stdout, err = run(["protocol", "b", "--fast", "--out", tmp_path, "--json"])
    assert code == 0, err
    data = json.loads(stdout)
    assert data["protocol"] == "B" and data["result"] == {
        "config": None, "lead_lag": 3.0, "series": [0, 1, 2],
        "figures": [str(tmp_path / "figures" / "fig.png")]}
    assert calls == [("run", None, True, str(tmp_path / "logs")),
                     ("plot", str(tmp_path / "figures"))]
    assert json.loads((tmp_path / "protocol_B.json").read_text())["protocol"] == "B"


def test_protocol_failure_is_one_line(monkeypatch, tmp_path):
    _fake_protocol(monkeypatch, "A", [], ValueError("protocol A needs at least 2 checkpoints"))
    code, _, err = run(["protocol", "A", "--out", tmp_path])
    assert_one_line_error(code, err, 1, "needs at least 2 checkpoints")


def test_protocol_seed_replaces_the_default_settings_seed(monkeypatch, tmp_path):
    calls = []
    for name in ("A", "C"):
        _fake_protocol(monkeypatch, name, calls)
    code, stdout, err = run(["protocol", "A", "--fast", "--seed", "3", "--out", tmp_path, "--json"])
    assert code == 0, err
    fast_a = app_protocols.PROTOCOLS["A"].fast_config
    assert calls[0] == ("run", fast_a._replace(seed=3), True, str(tmp_path / "logs"))
    assert json.loads(stdout)["result"]["config"]["seed"] == 3
    calls.clear()
    code, _, err = run(["protocol", "C", "--seed", "5", "--out", tmp_path])
    assert code == 0, err
    assert calls[0][1] == app_protocols.PROTOCOLS["C"].config()._replace(seed=5)


def test_cli_tables_match_the_app_tables():
    assert set(cli.PROTOCOLS) == set(app_protocols.PROTOCOLS)
    assert tuple(cli.FIGURES) == tuple(seed_figures.SEED_FIGURES)


def test_summarise_shortens_long_series():
    data = cli.summarise({"x": np.arange(1000.0), "y": (np.float32(2.0), np.array([np.nan])),
                          "z": np.full(300, np.nan)})
    assert data["x"] == {"shape": [1000], "min": 0.0, "max": 999.0, "mean": 499.5, "last": 999.0}
    assert data["y"] == [2.0, [None]] and data["z"] == {"shape": [300]}


def test_figures_tiny(monkeypatch, tmp_path):
    """``figures`` runs each figure's experiment (quick settings with ``--fast``) and draws
    the figure from its result."""
    drawn = {}

    def fake(name):
        def experiment(**kw):
            return {"experiment": name, "settings": kw}

        def plot(result, *, path):
            drawn[name] = result["settings"]
            Path(path).write_bytes(b"\x89PNG\r\n")

        entry = seed_figures.SEED_FIGURES[name]
        return entry._replace(experiment=experiment, plot=plot)

    for n in list(seed_figures.SEED_FIGURES):
        monkeypatch.setitem(seed_figures.SEED_FIGURES, n, fake(n))
    code, stdout, err = run(["figures", "--fast", "--out", tmp_path, "--json"])
    assert code == 0, err
    files = json.loads(stdout)["files"]
    assert files == [f"{n}.png" for n in cli.FIGURES]
    assert all((tmp_path / f).is_file() for f in files)
    assert drawn["sharp_vs_flat_minima"] == seed_figures.SEED_FIGURES["sharp_vs_flat_minima"].fast
    code, _, err = run(["figures", "--only", "attention_geometry", "--out", tmp_path])
    assert code == 0 and drawn["attention_geometry"] == {}


def test_figures_default_folder_is_docs_figures():
    assert cli._source_root().joinpath("docs").is_dir()
    assert set(cli.FIGURES) == {"pseudo_spectral_analysis", "sharp_vs_flat_minima",
                                "attention_geometry", "attention_training_dynamics"}
    with pytest.raises(ValueError, match="figure must be one of"):
        seed_figures.draw_seed_figure("nope", "x.png")


def test_bench_runs_the_suite_runner_quick(monkeypatch, tmp_path):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "run_all.py").write_text("import sys\nprint(' '.join(sys.argv[1:]))\n")
    (bench / "tiny.py").write_text("")
    (bench / "other.py").write_text("")
    monkeypatch.setattr(cli, "_source_root", lambda: tmp_path)
    code, stdout, err = run(["bench", "--json"])
    assert code == 0, err
    data = json.loads(stdout)
    assert data["runs"][0]["stdout"].strip() == "--quick" and data["failed"] == []
    code, stdout, err = run(["bench", "--only", "tiny", "--only", "other", "--full", "--json"])
    assert json.loads(stdout)["runs"][0]["stdout"].strip() == "--only tiny,other"
    code, _, err = run(["bench", "--only", "nope"])
    assert_one_line_error(code, err, 2, "unknown benchmark(s) nope; available: other, tiny")


def test_bench_without_runner_runs_each_script(monkeypatch, tmp_path):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "tiny.py").write_text(
        "import sys\nprint('quick' if '--quick' in sys.argv else 'full')\n")
    (bench / "broken.py").write_text("raise SystemExit(3)\n")
    (bench / "_helpers.py").write_text("")
    monkeypatch.setattr(cli, "_source_root", lambda: tmp_path)
    code, stdout, err = run(["bench", "--only", "tiny", "--json"])
    assert code == 0, err
    assert json.loads(stdout)["runs"][0]["stdout"].strip() == "quick"
    code, _, err = run(["bench"])
    assert_one_line_error(code, err, 1, "benchmark(s) failed: broken", after_output=True)
    monkeypatch.setattr(cli, "_source_root", lambda: tmp_path / "nowhere")
    code, _, err = run(["bench"])
    assert_one_line_error(code, err, 1, "benchmarks/ not found")


def test_real_benchmark_suite_is_found():
    (name, cmd, cwd), = cli._bench_commands(None, full=False)
    assert name == "run_all" and cmd[-1] == "--quick" and Path(cmd[1]).is_file()


# -- old import paths and the console script ---------------------------------------------------


def test_old_import_paths_and_console_script():
    """``gradience_jax.cli`` and ``gradience_jax.report`` keep every old name (the same
    objects as in ``gradience_jax.app``); the console script points at the new home."""
    import tomllib

    import gradience_jax.cli as old_cli
    import gradience_jax.report as old_report
    from gradience_jax import environment
    from gradience_jax.app import families, markdown, measurements

    assert old_cli.main is cli.main and old_cli.build_parser is cli.build_parser
    assert old_cli.summarise is cli.summarise and old_cli.CLIError is cli.CLIError
    homes = (rp, ck, families, markdown, measurements, environment)
    for name in old_report.__all__:
        obj = getattr(old_report, name)
        assert any(getattr(home, name, None) is obj for home in homes), name
    for name in ("AnalysisConfig", "CheckpointError", "FAST_ENV", "MODELS", "OPERATORS",
                 "Restored", "analyze", "build_model", "dataset", "default_spec", "fast_mode",
                 "evaluate", "infer_model", "init_model", "load_checkpoint", "plan",
                 "restore_model", "save_checkpoint", "split", "to_pure_dict", "train",
                 "write_weights_report", "SCHEMA", "REORTH", "match_spec", "summary_rows",
                 "versions", "check_writable"):
        assert hasattr(old_report, name), name
    root = Path(__file__).resolve().parents[1]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["gradience-jax"] == "gradience_jax.app.cli:main"


def test_report_versions_keep_their_keys():
    v = rp.versions()
    assert {"python", "platform", "gradience-jax", "jax", "jaxlib", "flax", "optax", "numpy",
            "orbax-checkpoint", "matplotlib", "device", "x64"} <= set(v)
