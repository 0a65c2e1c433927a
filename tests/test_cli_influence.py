"""``gradience-jax influence``, in-process: the JSON's helpful / harmful lists against the
dense float64 formula (a tiny ``--model`` factory of this module) and against direct API
calls on the built-in MLP (parameters from the run's ``params.msgpack``, data rebuilt from
the generator), the planted-noise recall recomputed from the ranking, the files, and the
exit codes of bad usage and unusable results."""

from __future__ import annotations

import contextlib
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import FLOAT, dense_ggn, dense_hessian, tol
from jax.flatten_util import ravel_pytree

import gradience_jax as gj
from gradience_jax.app import checkpoints as ck
from gradience_jax.app import cli
from gradience_jax.app import influence as app_influence
from gradience_jax.app.families import dataset, default_spec, split
from gradience_jax.influence import self_influence

PNG = b"\x89PNG\r\n\x1a\n"
CE = gj.heads.softmax_cross_entropy()


# -- a tiny model of your own (``--model test_cli_influence:tiny_model``) -------------------


def _tiny_fn(params, batch):
    return jnp.tanh(batch["inputs"] @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def _tiny_params(scale=1.0):
    rng = np.random.default_rng(3)
    shapes = {"w1": (3, 4), "b1": (4,), "w2": (4, 3), "b2": (3,)}
    return {k: jnp.asarray(scale * rng.normal(size=s), FLOAT) for k, s in shapes.items()}


def tiny_model():
    return None, _tiny_fn, _tiny_params()


def nan_model():
    params = _tiny_params()
    params["w1"] = params["w1"].at[0, 0].set(jnp.nan)
    return None, _tiny_fn, params


def tiny_data():
    batch = gj.data.classification(jax.random.key(5), n=40, dim=3, num_classes=3,
                                   separation=1.0)
    return {"inputs": np.asarray(batch["inputs"], FLOAT), "labels": np.asarray(batch["labels"])}


def tiny_test_data():
    batch = gj.data.classification(jax.random.key(6), n=7, dim=3, num_classes=3)
    return {"inputs": np.asarray(batch["inputs"], FLOAT), "labels": np.asarray(batch["labels"])}


TINY = ["--model", "test_cli_influence:tiny_model", "--data", "test_cli_influence:tiny_data"]


def run(argv):
    """``(exit code, stdout, stderr)`` of ``cli.main(argv)``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def run_json(argv):
    code, stdout, err = run([*argv, "--json"])
    assert code == 0, err
    return json.loads(stdout)


def _example_grads(loss_fn, params, batch):
    """``(n, P)`` float64 per-example gradients, by a Python loop (each a batch of one)."""
    grad = jax.jit(jax.grad(loss_fn))
    n = len(jax.tree_util.tree_leaves(batch)[0])
    return np.stack([np.asarray(ravel_pytree(grad(params, jax.tree_util.tree_map(
        lambda x, i=i: x[i:i + 1], batch)))[0], np.float64) for i in range(n)])


def _tiny_split(test_data=False):
    batch = tiny_data()
    if test_data:
        return batch, tiny_test_data()
    return split(batch)


def _check_lists(summary, scores, top, *, tracin=False, rtol=tol(1e-7, 1e-3)):
    """Every test example's helpful / harmful lists equal the extremes of ``scores`` rows."""
    tests = summary["influence"]["tests"]
    assert [t["test_index"] for t in tests] == summary["data"]["test_indices"]
    for row, t in zip(scores, tests):
        order = np.argsort(row)
        helpful, harmful = (order[::-1], order) if tracin else (order, order[::-1])
        assert [e["index"] for e in t["helpful"]] == helpful[:top].tolist()
        assert [e["index"] for e in t["harmful"]] == harmful[:top].tolist()
        np.testing.assert_allclose([e["score"] for e in t["helpful"]], row[helpful[:top]],
                                   rtol=rtol, atol=rtol * np.abs(row).max())


# -- your own model: dense float64 references ----------------------------------------------


@pytest.mark.parametrize("operator", ["ggn", "hessian"])
def test_tiny_model_lists_equal_the_dense_inverse_formula(tmp_path, operator):
    """scores = -g_test^T (C + d I)^{-1} g_train with C the dense GGN / Hessian and d the
    damping the run reports (given for the GGN, "auto" for the indefinite Hessian); the
    self-influence ranking is the dense quadratic form's."""
    damping = ["--damping", "0.05"] if operator == "ggn" else []
    s = run_json(["influence", *TINY, "--operator", operator, *damping, "--test", "0,3,19",
                  "--top", "4", "--out", tmp_path])
    train, test = _tiny_split()
    test = jax.tree_util.tree_map(lambda x: x[np.array([0, 3, 19])], test)
    params, loss_fn = _tiny_params(), gj.compose(_tiny_fn, CE)
    curv = (dense_ggn(_tiny_fn, CE, params, train) if operator == "ggn"
            else dense_hessian(loss_fn, params, train)).astype(np.float64)
    d = s["damping"]
    if operator == "ggn":
        assert d == 0.05
    else:  # auto: above |lambda_min| of the indefinite Hessian
        lam = np.linalg.eigvalsh(curv)
        assert lam[0] < 0 < lam[0] + d
    a = curv + d * np.eye(len(curv))
    g_tr, g_te = _example_grads(loss_fn, params, train), _example_grads(loss_fn, params, test)
    ref = -g_te @ np.linalg.solve(a, g_tr.T)
    _check_lists(s, ref, 4)
    assert s["operator"] == operator and s["method"] == "cg" and s["ok"]
    assert s["influence"]["record"]["converged"] and s["data"]["train"] == 20
    self_ref = np.einsum("ij,ji->i", g_tr, np.linalg.solve(a, g_tr.T))
    assert s["self_influence"]["ranking"] == np.argsort(self_ref)[::-1].tolist()
    np.testing.assert_allclose([e["score"] for e in s["self_influence"]["top"]],
                               np.sort(self_ref)[::-1][:4], rtol=tol(1e-7, 1e-3))
    saved = np.load(tmp_path / "scores.npz")
    np.testing.assert_allclose(saved["influence"], ref, rtol=tol(1e-7, 1e-3),
                               atol=tol(1e-9, 1e-4) * np.abs(ref).max())
    assert json.loads((tmp_path / "influence.json").read_text()) == s


def test_tiny_model_arnoldi_full_rank_and_tracin_equal_closed_forms(tmp_path):
    """Arnoldi with every eigenpair is the exact inverse; TracIn of an untrained factory
    model is one checkpoint of weight 1: g_test . g_train (positive = helpful), and its
    self-influence |g_i|^2. --test-data gives the test set; --data is then all training."""
    params, loss_fn = _tiny_params(), gj.compose(_tiny_fn, CE)
    train, test = _tiny_split(test_data=True)
    g_tr, g_te = _example_grads(loss_fn, params, train), _example_grads(loss_fn, params, test)
    extra = ["--test-data", "test_cli_influence:tiny_test_data", "--test-count", "7"]
    s = run_json(["influence", *TINY, *extra, "--method", "arnoldi", "--rank", "31",
                  "--damping", "0.1", "--top", "5", "--out", tmp_path / "arnoldi"])
    ggn = dense_ggn(_tiny_fn, CE, params, train).astype(np.float64)
    ref = -g_te @ np.linalg.solve(ggn + 0.1 * np.eye(31), g_tr.T)
    assert s["data"]["train"] == 40 and s["data"]["test_indices"] == list(range(7))
    _check_lists(s, ref, 5, rtol=tol(1e-6, 1e-3))
    s = run_json(["influence", *TINY, *extra, "--method", "tracin", "--top", "5",
                  "--out", tmp_path / "tracin"])
    _check_lists(s, g_te @ g_tr.T, 5, tracin=True)
    assert s["damping"] is None and s["operator"] is None
    assert s["influence"]["record"]["info"] == {"checkpoints": 1, "learning_rates": [1.0]}
    norms = np.sum(g_tr ** 2, axis=1)
    assert s["self_influence"]["ranking"] == np.argsort(norms)[::-1].tolist()
    assert (tmp_path / "tracin" / "influence_test0.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_tiny_model_kfac_lists_equal_a_direct_api_call(tmp_path, method):
    s = run_json(["influence", *TINY, "--method", method, "--damping", "0.2", "--test", "1,2",
                  "--top", "3", "--out", tmp_path])
    train, test = _tiny_split()
    test = jax.tree_util.tree_map(lambda x: x[np.array([1, 2])], test)
    params, loss_fn = _tiny_params(), gj.compose(_tiny_fn, CE)
    ref = gj.influence(loss_fn, params, train, test, method=method, damping=0.2,
                       operator=gj.ggn(_tiny_fn, CE, params, train), model_fn=_tiny_fn,
                       head=CE, warn=False)
    _check_lists(s, ref.scores, 3, rtol=1e-6)
    assert s["influence"]["record"]["method"] == method
    np.testing.assert_allclose(s["influence"]["record"]["residuals"], ref.record.residuals,
                               rtol=1e-6)


# -- the built-in MLP: direct API calls, planted noise ---------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    out = tmp_path_factory.mktemp("influence")
    s = run_json(["influence", "--train", "48", "--test", "0,3", "--train-steps", "20",
                  "--planted-noise", "0.125", "--top", "6", "--out", out])
    return out, s


def _builtin_data(s):
    """The run's training batch rebuilt: generated data, first half, first N, the JSON's
    flipped labels in place (checked to be real flips of the generated labels)."""
    spec = default_spec("mlp")
    data, _ = dataset("mlp", spec, jax.random.fold_in(jax.random.key(0), 0))
    train, test = split(data)
    n = s["data"]["train"]
    train = jax.tree_util.tree_map(lambda x: np.array(x[:n]), train)
    noise = s["planted_noise"]
    flipped = np.asarray(noise["flipped"])
    assert flipped.size == round(0.125 * n) == len(set(flipped.tolist()))
    assert train["labels"][flipped].tolist() == noise["original_labels"]
    assert np.all(np.asarray(noise["labels"]) != train["labels"][flipped])
    assert np.all((0 <= np.asarray(noise["labels"])) & (np.asarray(noise["labels"]) < 4))
    train["labels"][flipped] = noise["labels"]
    idx = np.asarray(s["data"]["test_indices"])
    return train, jax.tree_util.tree_map(lambda x: np.asarray(x)[idx], test), flipped


def test_builtin_mlp_lists_equal_a_direct_influence_call(planted):
    out, s = planted
    train, test, _ = _builtin_data(s)
    restored = ck.restore_model(ck.load_checkpoint(out / "params.msgpack"), "mlp")
    a, params = restored.adapted, restored.adapted.params
    np.testing.assert_allclose(s["loss"]["train"], float(a.loss_fn(params, train)), rtol=1e-5)
    G = gj.ggn(a.model_fn, a.head, params, train)
    ref = gj.influence(a.loss_fn, params, train, test, method="cg", damping=s["damping"],
                       operator=G, key=jax.random.key(0), warn=False)
    _check_lists(s, ref.scores, 6, rtol=1e-4)
    assert s["influence"]["tests"][1]["label"] == int(test["labels"][1])
    self_ref = self_influence(a.loss_fn, params, train, method="cg", damping=s["damping"],
                              operator=G, key=jax.random.key(0), warn=False)
    top = [e["index"] for e in s["self_influence"]["top"]]
    assert top == self_ref.top(6)["highest"].tolist()
    assert s["training"]["steps"] == 20 and s["model"]["n_params"] == 5508


def test_planted_noise_recall_is_recomputed_from_the_ranking(planted):
    out, s = planted
    _, _, flipped = _builtin_data(s)
    ranking = s["self_influence"]["ranking"]
    assert sorted(ranking) == list(range(48))
    k = round(0.1 * 48)
    recall = len(set(ranking[:k]) & set(flipped.tolist())) / flipped.size
    assert s["planted_noise"]["recall"] == recall
    assert recall > s["planted_noise"]["chance"]  # self-influence finds the flipped labels
    md = (out / "report.md").read_text()
    assert f"**{recall:.4g}**" in md and "![self_influence](self_influence.png)" in md
    for name in ("self_influence.png", "influence_test0.png", "influence_test3.png"):
        assert (out / name).read_bytes().startswith(PNG), name
    assert s["files"]["figures"] == sorted(["influence_test0.png", "influence_test3.png",
                                            "self_influence.png"])


# -- exit codes --------------------------------------------------------------------------


@pytest.mark.parametrize("argv, fragment", [
    (["--train", "0"], "argument --train: expected a positive integer"),
    (["--method", "newton"], "argument --method: invalid choice: 'newton'"),
    (["--test", "99999"], "--test index 99999 is out of range: the test set has 512"),
    (["--test-count", "600"], "--test-count 600 is out of range"),
    (["--damping", "-1"], "argument --damping: expected 'auto' or a number >= 0"),
    (["--train", "600"], "--train 600 exceeds the 512 training examples"),
    (["--train", "5", "--top", "6"], "--top 6 exceeds the 5 training examples"),
    (["--test", "1", "--test-count", "2"], "not allowed with argument --test"),
    (["--method", "tracin", "--damping", "0.1"], "--damping does not apply to method 'tracin'"),
    (["--method", "cg", "--rank", "3"], "--rank applies to the arnoldi method"),
    (["--method", "ekfac", "--damping", "0"], "--damping must be > 0"),
    (["--planted-noise", "1.5"], "expected a fraction in (0, 1)"),
    (["--model", "transformer", "--planted-noise", "0.1"], "--planted-noise applies to"),
    ([*TINY, "--planted-noise", "0.1"], "--planted-noise applies to"),
    (["--model", "test_cli_influence:tiny_model"], "needs data"),
    (["--model", "no_such_module_xyz:f", "--data", "test_cli_influence:tiny_data"],
     "cannot import module 'no_such_module_xyz'"),
])
def test_bad_usage_exits_2_with_one_line(tmp_path, argv, fragment):
    code, stdout, err = run(["influence", *argv, "--out", tmp_path / "o"])
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err and fragment in lines[0], err
    assert lines[0].startswith("gradience-jax: error: ") and not stdout
    assert not (tmp_path / "o" / "influence.json").exists()


def test_nonfinite_model_is_a_failure_with_the_report_written(tmp_path):
    code, stdout, err = run(["influence", "--model", "test_cli_influence:nan_model", "--data",
                             "test_cli_influence:tiny_data", "--out", tmp_path, "--json"])
    assert code == 1 and "influence result unusable" in err.strip().splitlines()[-1]
    s = json.loads(stdout)
    assert s["ok"] is False and s["exit_code"] == 1 and "not finite" in s["error"]
    saved = json.loads((tmp_path / "influence.json").read_text())
    assert saved["ok"] is False and saved["influence"] is None
    assert saved["error"].startswith("FloatingPointError") and saved["loss"]["train"] is None
    assert "**Failed:**" in (tmp_path / "report.md").read_text()


def test_unconverged_solves_are_warnings_and_the_table_prints(tmp_path):
    """LiSSA stopped after 3 iterations: not converged, still usable (exit 0); the human
    output is a table; the JSON of a usable run says ok."""
    code, stdout, err = run(["influence", *TINY, "--method", "lissa", "--maxiter", "3",
                             "--test", "0", "--top", "3", "--out", tmp_path])
    assert code == 0, err
    assert "gradience-jax influence" in stdout and "test 0: helpful" in stdout
    assert "did not converge" in stdout
    s = json.loads((tmp_path / "influence.json").read_text())
    rec = s["influence"]["record"]
    assert s["ok"] and not rec["converged"] and 0 < rec["max_residual"] < 1
    assert rec["iterations"] == [3] and any("did not converge" in w for w in s["warnings"])


def test_config_refuses_bad_values_naming_the_field():
    with pytest.raises(ValueError, match="top"):
        app_influence.InfluenceConfig(top=0)
    with pytest.raises(ValueError, match="planted_noise must be below 1"):
        app_influence.InfluenceConfig(planted_noise=1.0)
    with pytest.raises(ValueError, match="maxiter applies"):
        app_influence.InfluenceConfig(method="arnoldi", maxiter=3)
    with pytest.raises(ValueError, match="test must be a non-empty tuple"):
        app_influence.InfluenceConfig(test=())
    assert app_influence.InfluenceConfig().steps == 200
    assert app_influence.InfluenceConfig(fast=True).steps == 60
