"""The README's two set-up commands, tested literally.

The main-job command is read from the README and its ``gradience-jax analyze`` part is run
in a fresh temporary directory (as ``python -m gradience_jax.app.cli``, the console
script's target; the ``pip install`` part is what CI already did). The report it writes must exist,
hold finite numbers, and agree with direct API calls on the same seed. CI sets
``GRADIENCE_FAST=1`` (the quick settings); the test sets it too.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import tomllib
from helpers import json_numbers

import gradience_jax as gj
from gradience_jax.app import checkpoints as ck
from gradience_jax.app import families
from gradience_jax.app import report as rp

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAIN_COMMAND = "pip install -e . && gradience-jax analyze"
TEST_INSTALL = 'pip install -e ".[test,torch]" -c constraints.txt'
TEST_RUN = "python -m pytest -q"


def setup_commands() -> list[str]:
    """The shell commands of the README's set-up section, in order."""
    text = README.read_text()
    match = re.search(r"^## Set-up.*?(?=^## )", text, flags=re.S | re.M)
    assert match, "README has no '## Set-up' section"
    blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", match.group(0), flags=re.S)
    return [line.strip() for b in blocks for line in b.strip().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_readme_has_the_two_setup_commands():
    commands = setup_commands()
    assert len(commands) == 2
    assert commands[0] == MAIN_COMMAND
    parts = [p.strip() for p in commands[1].split("&&")]
    assert parts[0] == TEST_INSTALL and parts[-1] == TEST_RUN


def test_test_command_is_what_ci_runs():
    test_command = setup_commands()[1]
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines
    assert (ROOT / "constraints.txt").is_file()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert {"test", "torch"} <= set(extras)


def _job_argv() -> list[str]:
    """``gradience-jax analyze`` from the README, as ``python -m gradience_jax.app.cli analyze``."""
    install, job = (part.strip() for part in setup_commands()[0].split("&&"))
    assert install == "pip install -e ."
    words = shlex.split(job)
    assert words[0] == "gradience-jax"
    return [sys.executable, "-m", "gradience_jax.app.cli", *words[1:]]


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("readme_job")
    env = {**os.environ, "GRADIENCE_FAST": "1", "GRADIENCE_JAX_CACHE": str(cwd / ".xla_cache")}
    proc = subprocess.run(_job_argv(), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = cwd / "gradience_report"
    return out, json.loads((out / "report.json").read_text()), proc


def test_main_job_writes_the_report(main_job):
    out, rep, proc = main_job
    assert "gradience_report/" in README.read_text()
    for name in ["report.json", "report.md", "params.msgpack"] + list(rep["figures"].values()):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert {"training", "curvature_top_k", "spectral_density", "landscape_2d",
            "weight_spectra"} <= set(rep["figures"])
    assert "report written to" in proc.stdout
    assert all(math.isfinite(v) for v in json_numbers(rep))
    assert set(rep["curvature"]) == {"hessian", "ggn"}
    for c in rep["curvature"].values():
        assert all(math.isfinite(v) for v in c["top_k"]["eigenvalues"])
        assert math.isfinite(c["trace"]["estimate"]) and c["trace"]["stderr"] > 0
    assert all(c["passed"] for c in rep["checks"]), rep["checks"]


def test_main_job_agrees_with_direct_api_calls(main_job):
    out, rep, _ = main_job
    seed, cfg = rep["seed"], rep["config"]
    # same seed, same model, data and training -> the same parameters (up to float32
    # rounding, which Adam's normalisation amplifies: the job ran without x64 and with the
    # CLI's cheap-compile XLA flags, this test session runs with x64)
    model = ck.init_model(rep["model"]["name"], seed=seed)
    data, _ = families.dataset(model.model, model.spec, jax.random.fold_in(jax.random.key(seed), 0))
    batch, _ = families.split(data)
    params, curve = rp.train(model.adapted, batch, cfg["train_steps"], cfg["learning_rate"])
    saved = ck.restore_model(ck.load_checkpoint(out / "params.msgpack"), "mlp").adapted.params
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(saved)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b)
    assert rep["training"]["loss_final"] == pytest.approx(curve[-1], rel=1e-3)
    ad = model.adapted
    assert float(ad.loss_fn(saved, batch)) == pytest.approx(rep["loss"]["train"], rel=1e-5)
    # the public API on the saved parameters reproduces the report's curvature numbers
    key = jax.random.key(seed)
    H = gj.hessian(ad.loss_fn, saved, batch)
    top = rep["curvature"]["hessian"]["top_k"]
    from gradience_jax.spectrum import eigsh

    res = eigsh(H, k=top["k"], key=key, tol=top["tol"], max_iters=cfg["iters"])
    np.testing.assert_allclose(res.eigenvalues, top["eigenvalues"], rtol=1e-4)
    from gradience_jax.estimators import hutchinson_trace

    with jax.enable_x64(False):  # the probes' dtype (and so their draws) follow the x64 flag
        H32 = gj.hessian(ad.loss_fn, saved, batch)
        t = hutchinson_trace(H32, jax.random.fold_in(key, 1), cfg["trace_samples"])
    trace = rep["curvature"]["hessian"]["trace"]["estimate"]
    assert float(t.estimate) == pytest.approx(trace, rel=1e-4)
    G = gj.ggn(ad.model_fn, ad.head, saved, batch)
    g = eigsh(G, k=top["k"], key=key, tol=top["tol"], max_iters=cfg["iters"])
    np.testing.assert_allclose(g.eigenvalues, rep["curvature"]["ggn"]["top_k"]["eigenvalues"],
                               rtol=1e-4)
    ws = gj.weight_spectra(saved)
    for path, layer in rep["weights"]["layers"].items():
        assert ws[path].stable_rank == pytest.approx(layer["stable_rank"], rel=1e-5)


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path):
    """Every ```python block of the README runs as written (one fresh interpreter each)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2  # the ten-line example and the jitted probe
    for i, code in enumerate(blocks):
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"README block {i}:\n{code}\n{proc.stderr[-3000:]}"
    records = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    probed = [r for r in records if "hessian_top/eigenvalue" in r.get("metrics", {})]
    assert [r["step"] for r in probed] == list(range(0, 100, 20))
    assert all(math.isfinite(r["metrics"]["hessian_top/eigenvalue"]) for r in probed)
