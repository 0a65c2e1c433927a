"""The README's "Your own model and training run" section, run literally.

Its ```bash block (the training script, ``gradience-jax analyze --model`` and
``gradience-jax track``) is read from README.md and each command is run as written in a
fresh temporary directory holding a copy of ``examples/`` (``gradience-jax`` as ``python -m
gradience_jax.app.cli``, the console script's target; ``python`` as this interpreter), in
the environment a user's shell has: no ``JAX_ENABLE_X64``, ``XLA_FLAGS`` or
``GRADIENCE_FAST`` (the README's numbers come from the default settings in float32).

Checked: the run directory is a real orbax ``CheckpointManager`` directory with the steps
0, 100, ..., 400, whose saved losses a float64 forward pass of this file's own reproduces;
``track`` wrote ``track.jsonl`` (one record per step), ``report.md`` and ``report.html``,
and its top-3 Hessian eigenvalues at every step are those of the dense float64 Hessian;
``analyze``'s report agrees with the same dense reference; and every line of output pasted
in the README is one the commands printed.

Tolerance of the pasted numbers: each agrees with the printed one to one unit in its last
printed digit plus 1e-4 relative, Lanczos iteration / matvec counts to +-2, every other
integer (steps, parameter count, checks passed) exactly. On the machine that made the
README they agree digit for digit; the tolerance covers float32 rounding that differs
between CPUs: training and analysing under other XLA code generation
(``--xla_backend_optimization_level=0``) moved the step-400 parameters by 1e-5 relative and
lambda_max by one unit in its sixth digit (4e-6 relative), the iteration counts not at all.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.flatten_util import ravel_pytree

from gradience_jax.app import checkpoints as ck
from gradience_jax.telemetry import load_telemetry

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION = "## Your own model and training run"
STEPS = [0, 100, 200, 300, 400]
MODEL_SPEC = "examples/my_model.py:model"
DATA_SPEC = "examples/my_model.py:data"
RUN_DIR = "runs/my_run"
K = 3  # track's default --k
REL = 1e-4  # pasted numbers: one unit in the last printed digit plus this, relative
COUNT_SLACK = 2  # Lanczos iteration / matvec counts
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:,\d{3})*(?:\.\d+)?(?:e[-+]?\d+)?(?!\w)")


# -- the README section -----------------------------------------------------------------------


def section() -> str:
    """The README's section, up to the next ``## `` heading."""
    text = README.read_text()
    match = re.search(rf"^{re.escape(SECTION)}\n.*?(?=^## )", text, flags=re.S | re.M)
    assert match, f"README has no '{SECTION}' section"
    return match.group(0)


def commands() -> list[str]:
    """The section's shell commands (``\\`` continuations joined), in order."""
    blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", section(), flags=re.S)
    joined = "\n".join(b.replace("\\\n", " ") for b in blocks)
    return [" ".join(ln.split()) for ln in joined.splitlines()
            if ln.strip() and not ln.strip().startswith("#")]


def pasted_outputs() -> list[list[str]]:
    """The section's ```text block: one list of lines per command (parts split by blanks)."""
    blocks = re.findall(r"```text\n(.*?)```", section(), flags=re.S)
    assert len(blocks) == 1, "the section should paste the output in one ```text block"
    parts = re.split(r"\n\s*\n", blocks[0].strip("\n"))
    return [[ln for ln in p.splitlines() if ln.strip()] for p in parts]


def _argv(command: str) -> list[str]:
    words = shlex.split(command)
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    assert words[0] == "gradience-jax", command
    return [sys.executable, "-m", "gradience_jax.app.cli", *words[1:]]


# -- comparing printed lines ------------------------------------------------------------------


def _normal(line: str) -> str:
    return " ".join(line.split())


def _skeleton(line: str) -> str:
    return NUMBER.sub("#", _normal(line))


def _is_count(line: str, match: re.Match) -> bool:
    """A Lanczos iteration / matvec count (``38 it.``, the ``matvecs`` row)."""
    return (line[match.end():].startswith(" it.") or "/matvecs " in line
            or "/iterations " in line)


def _agree(pasted: str, printed: str) -> bool:
    """Same words; every number equal within the stated tolerance."""
    a_line, b_line = _normal(pasted), _normal(printed)
    if _skeleton(a_line) != _skeleton(b_line):
        return False
    for a, b in zip(NUMBER.finditer(a_line), NUMBER.finditer(b_line)):
        ta, tb = a.group().replace(",", ""), b.group().replace(",", "")
        if re.fullmatch(r"[-+]?\d+", ta) and re.fullmatch(r"[-+]?\d+", tb):
            slack = COUNT_SLACK if _is_count(a_line, a) else 0
            if abs(int(ta) - int(tb)) > slack:
                return False
            continue
        mantissa, _, exponent = ta.lower().partition("e")
        decimals = len(mantissa.partition(".")[2])
        unit = 10.0 ** (int(exponent or 0) - decimals)
        if abs(float(ta) - float(tb)) > unit + REL * abs(float(tb)):
            return False
    return True


# -- the run ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """Run the section's commands in a fresh folder; ``(folder, stdout of each command)``."""
    cwd = tmp_path_factory.mktemp("readme_run")
    shutil.copytree(ROOT / "examples", cwd / "examples",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_ENABLE_X64", "XLA_FLAGS", "GRADIENCE_FAST", "JAX_PLATFORMS")}
    env.update(GRADIENCE_JAX_CACHE=str(cwd / ".xla_cache"), JAX_PLATFORMS="cpu")
    outputs = []
    for command in commands():
        proc = subprocess.run(_argv(command), cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout)
    return cwd, outputs


def _dataset(cwd: Path) -> dict:
    """``examples/my_model.py:data()``, imported from the copy the commands ran."""
    spec = importlib.util.spec_from_file_location("readme_my_model", cwd / "examples" /
                                                  "my_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.data()


def _restored(cwd: Path) -> dict[int, dict]:
    """Each step's ``params`` and ``metrics`` items, restored with orbax directly."""
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager((cwd / RUN_DIR).resolve(), options=options) as mngr:
        assert list(mngr.all_steps()) == STEPS
        return {s: mngr.restore(s, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(), metrics=ocp.args.JsonRestore()))
            for s in STEPS}


def _loss64(params: dict, batch: dict):
    """The network of my_model.py written out in float64: 2 -> GELU -> GELU -> 3, mean CE."""

    def layer(name, x):
        return x @ params[name]["kernel"] + params[name]["bias"]

    x = jnp.asarray(batch["inputs"], jnp.float64)
    logits = layer("out", jax.nn.gelu(layer("mid", jax.nn.gelu(layer("hidden", x)))))
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, batch["labels"][:, None], axis=1))


def _unbox(tree: dict) -> dict:
    return {k: (_unbox(v) if "value" not in v else v["value"]) for k, v in tree.items()}


@pytest.fixture(scope="module")
def dense(readme_run):
    """Per step: the float64 loss and the top-K eigenvalues of the dense float64 Hessian."""
    if not jax.config.jax_enable_x64:
        pytest.skip("the dense reference needs float64 (GRADIENCE_X64=0)")
    cwd, _ = readme_run
    batch = _dataset(cwd)
    out, hessian = {}, None
    for step, item in _restored(cwd).items():
        params = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64),
                                        _unbox(item["params"]))
        flat, unravel = ravel_pytree(params)
        if hessian is None:  # every step has the same structure: compile once
            hessian = jax.jit(jax.hessian(lambda f, u=unravel: _loss64(u(f), batch)))
        hess = np.asarray(hessian(flat))
        eig = np.linalg.eigvalsh(0.5 * (hess + hess.T))[::-1]
        out[step] = {"loss": float(_loss64(params, batch)), "top": eig[:K],
                     "saved_loss": item["metrics"]["loss"], "n": flat.size}
    return out


# -- tests ------------------------------------------------------------------------------------


def test_section_holds_the_three_commands():
    text = README.read_text()
    assert text.index("## The command line") < text.index(SECTION) < text.index("## Layout")
    train, analyze, track = commands()
    assert _argv(train)[1:] == ["examples/train_my_model.py", RUN_DIR]
    for command, sub in ((analyze, "analyze"), (track, "track")):
        words = shlex.split(command)
        assert words[:2] == ["gradience-jax", sub]
        assert words[words.index("--model") + 1] == MODEL_SPEC
        assert words[words.index("--data") + 1] == DATA_SPEC
    assert shlex.split(analyze)[shlex.split(analyze).index("--checkpoint") + 1] == RUN_DIR
    assert shlex.split(track)[2] == RUN_DIR
    assert len(pasted_outputs()) == 3


def test_comparison_rejects_changed_numbers():
    """The line check can fail: a changed digit, count or word is caught."""
    row = "│ hessian lambda_max │ 2.28496 (converged, 38 it.) │"
    assert _agree(row, row.replace("2.28496", "2.28497"))  # one unit in the last digit
    assert not _agree(row, row.replace("2.28496", "2.28526"))
    assert _agree(row, row.replace("38 it.", "40 it."))
    assert not _agree(row, row.replace("38 it.", "41 it."))
    assert not _agree(row, row.replace("converged", "NOT converged"))
    steps = "checkpoints [0, 100, 200, 300, 400] in runs/my_run"
    assert not _agree(steps, steps.replace("300", "301"))
    assert not _agree("step 0 loss 1.1035 saved", "step 100 loss 1.1035 saved")


def test_printed_output_is_what_the_readme_shows(readme_run):
    _, outputs = readme_run
    pasted = pasted_outputs()
    assert len(pasted) == len(outputs)
    for command, lines, printed in zip(commands(), pasted, outputs):
        printed_lines = printed.splitlines()
        for line in lines:
            same_words = [p.strip() for p in printed_lines if _skeleton(p) == _skeleton(line)]
            assert any(_agree(line, p) for p in printed_lines), (
                f"README line not printed by `{command}`:\n{line}\nprinted lines with the "
                "same words:\n" + "\n".join(same_words or ["(none)"]))
    steps_line = next(ln for ln in pasted[0] if ln.startswith("checkpoints "))
    assert [int(s) for s in re.findall(r"\d+", steps_line.split("]")[0])] == STEPS


def test_run_dir_is_an_orbax_checkpoint_manager_run(readme_run, dense):
    cwd, outputs = readme_run
    assert [s for s, _ in ck.checkpoint_steps(cwd / RUN_DIR)] == STEPS
    printed = {int(m[1]): float(m[2])
               for m in re.finditer(r"^step\s+(\d+)\s+loss\s+(\S+)\s+saved$", outputs[0], re.M)}
    assert sorted(printed) == STEPS
    for step in STEPS:
        assert dense[step]["n"] == (2 + 1) * 48 + (48 + 1) * 48 + (48 + 1) * 3  # 2-48-48-3
        # the saved float32 loss is the float64 loss of the saved parameters
        assert dense[step]["saved_loss"] == pytest.approx(dense[step]["loss"], rel=1e-5)
        assert printed[step] == pytest.approx(dense[step]["loss"], abs=1e-4)  # 4 decimals
    losses = [dense[s]["loss"] for s in STEPS]
    assert losses[-1] < 0.2 * losses[0]  # it trained


def test_track_measures_every_step(readme_run, dense):
    cwd, _ = readme_run
    out = cwd / "gradience_track"
    for name in ("track.jsonl", "report.md", "report.html", "track.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    header, records = load_telemetry(out / "track.jsonl")
    assert [r.step for r in records] == STEPS
    assert header["config"]["measurement"]["model"] == MODEL_SPEC
    for r in records:
        ref = dense[r.step]
        top = np.array([r.metrics[f"hessian/lambda_{i}"] for i in range(1, K + 1)])
        assert np.all(np.isfinite(top)) and r.metrics["hessian/converged"]
        # float32 Lanczos to tol 1e-6 against the dense float64 eigenvalues
        np.testing.assert_allclose(top, ref["top"], rtol=1e-4, atol=1e-4 * ref["top"][0])
        assert r.metrics["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert math.isfinite(r.metrics["hessian/trace"])
    assert [r.metrics["hessian/warm_start"] for r in records] == [False] + [True] * 4
    md = (out / "report.md").read_text()
    assert all(str(s) in md for s in STEPS)


def test_analyze_reports_the_last_step(readme_run, dense):
    cwd, _ = readme_run
    rep = json.loads((cwd / "gradience_report" / "report.json").read_text())
    assert rep["model"]["n_params"] == dense[400]["n"]
    top = rep["curvature"]["hessian"]["top_k"]["eigenvalues"]
    np.testing.assert_allclose(top[:K], dense[400]["top"], rtol=1e-4)
    assert rep["loss"]["train"] == pytest.approx(dense[400]["loss"], rel=1e-5)
    assert all(c["passed"] for c in rep["checks"]), rep["checks"]
