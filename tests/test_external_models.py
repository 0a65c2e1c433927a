"""Your own model through ``--model module:factory`` (gradience_jax.models.external).

The factories below are this module's own functions, so ``"test_external_models:<name>"``
is a real ``module:factory`` spec (pytest puts tests/ on ``sys.path``); file specs are
written to a temporary folder. References are dense float64 Hessians (``jax.hessian`` of
the loss written out by hand, here) and ``numpy.linalg.eigh``.
"""

from __future__ import annotations

import contextlib
import io
import json
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import FLOAT, tol
from jax.flatten_util import ravel_pytree

import gradience_jax as gj
from gradience_jax.app import cli
from gradience_jax.models import MLP, Adapted, external
from gradience_jax.models.external import FactoryError, FactoryTypeError

# -- factories (specs "test_external_models:<name>") -----------------------------------------


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 4)).astype(FLOAT)
    y = ((x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.3).astype(np.int32))
    return {"inputs": x, "labels": y}


def data_batches():
    full = data()
    for i in range(3):
        yield {k: v[8 * i:8 * (i + 1)] for k, v in full.items()}


DATA_LIST = [{"inputs": np.ones((2, 4), FLOAT), "labels": np.zeros(2, np.int32)}] * 2


def nnx_mlp():
    return MLP([4, 5, 3], activation=jnp.tanh, param_dtype=FLOAT, rngs=nnx.Rngs(0))


class BNNet(nn.Module):
    """Dense -> BatchNorm -> tanh -> Dense; ``train`` switches the batch statistics."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dense(5, param_dtype=FLOAT, dtype=FLOAT)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.0, param_dtype=FLOAT,
                         dtype=FLOAT)(x)
        return nn.Dense(3, param_dtype=FLOAT, dtype=FLOAT)(jnp.tanh(x))


def linen_bn():
    module = BNNet()
    variables = module.init(jax.random.key(0), jnp.zeros((1, 4), FLOAT), train=False)
    x = data()["inputs"] * 2.0 + 0.5  # statistics far from the init's (0, 1)
    _, updated = module.apply(variables, x, train=True, mutable=["batch_stats"])
    return module, {"params": variables["params"], "batch_stats": updated["batch_stats"]}


def eqx_mlp():
    import equinox as eqx  # noqa: PLC0415 - an optional test dependency

    model = eqx.nn.MLP(4, 3, 5, 1, activation=jnp.tanh, key=jax.random.key(0))
    return jax.tree_util.tree_map(lambda x: x.astype(FLOAT) if eqx.is_inexact_array(x) else x,
                                  model)


def _fn_model(params, batch):
    return jnp.tanh(batch["inputs"] @ params["w"]) @ params["v"]


def functions():
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), FLOAT),
              "v": jnp.asarray(rng.normal(size=(3, 3)), FLOAT)}
    return None, _fn_model, params


class NNXBN(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(4, 5, param_dtype=FLOAT, rngs=rngs)
        self.bn = nnx.BatchNorm(5, param_dtype=FLOAT, rngs=rngs)
        self.l2 = nnx.Linear(5, 3, param_dtype=FLOAT, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.bn(self.l1(x))))


def nnx_bn():
    return NNXBN(nnx.Rngs(0))


def raising():
    raise RuntimeError("no GPU here")


def returns_int():
    return 42


# -- references -------------------------------------------------------------------------------


def _xent(logits, labels):
    logp = jax.nn.log_softmax(logits.astype(jnp.float64) if FLOAT == np.float64 else logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def _dense_hessian(loss_of_params, params):
    flat, unravel = ravel_pytree(params)
    h = jax.hessian(lambda f: loss_of_params(unravel(f)))(flat)
    return np.asarray(h, np.float64)


def _top(h, k):
    return np.sort(np.linalg.eigvalsh(0.5 * (h + h.T)))[::-1][:k]


def _eigsh_top(adapted, batch, k):
    op = gj.hessian(adapted.loss_fn, adapted.params, batch)
    res = gj.eigsh(op, k=k, tol=tol(1e-10, 1e-5), max_iters=400)
    assert res.converged
    return np.asarray(res.eigenvalues, np.float64)


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


# -- specs --------------------------------------------------------------------------------------


def test_load_factory_module_and_file_specs(tmp_path):
    assert external.load_factory("test_external_models:nnx_mlp") is nnx_mlp
    assert external.load_factory("test_external_models:BNNet.__call__") is BNNet.__call__
    (tmp_path / "helper_mod.py").write_text("VALUE = 3\n")
    f = tmp_path / "user_models.py"
    f.write_text("import helper_mod\n\ndef build():\n    return helper_mod.VALUE\n")
    assert external.load_factory(f"{f}:build")() == 3  # its folder is importable while loading
    assert external.is_spec("a.b:c") and not external.is_spec("mlp") and not external.is_spec(":x")


@pytest.mark.parametrize("spec, exc, fragment", [
    ("no_colon_here", FactoryError, "has no ':'"),
    (":build", FactoryError, "needs a module and a name"),
    ("pkg.mod:", FactoryError, "needs a module and a name"),
    ("no_such_module_xyz:build", FactoryError, "cannot import module 'no_such_module_xyz'"),
    ("test_external_models:missing", FactoryError, "has no attribute 'missing'"),
    ("test_external_models:BNNet.nope", FactoryError, "has no attribute 'nope'"),
    ("does/not/exist.py:build", FactoryError, "file not found"),
])
def test_bad_specs_raise_clear_errors(spec, exc, fragment):
    with pytest.raises(exc) as info:
        external.load_model(spec)
    assert fragment in str(info.value), str(info.value)


def test_bad_factories_raise_clear_errors(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise ImportError('needs torch')\n")
    cases = [
        (f"{broken}:x", FactoryError, "importing"),
        ("test_external_models:raising", FactoryError,
         "the factory raised RuntimeError: no GPU here"),
        ("test_external_models:returns_int", FactoryTypeError, "unsupported model: got int"),
        ("test_external_models:DATA_LIST", FactoryTypeError, "is a list, not a callable"),
        ("test_external_models:BNNet", FactoryTypeError, "needs its variables"),
    ]
    for spec, exc, fragment in cases:
        with pytest.raises(exc) as info:
            external.load_model(spec, what="--model")
        assert fragment in str(info.value) and "--model" in str(info.value), str(info.value)
    with pytest.raises(FactoryTypeError, match="must be a 'module:factory' string, got int"):
        external.load_factory(3)
    assert issubclass(FactoryTypeError, TypeError) and issubclass(FactoryError, ValueError)


# -- the kinds of model ---------------------------------------------------------------------------


def test_nnx_module_is_adapted_in_eval_mode():
    m = external.load_model("test_external_models:nnx_mlp")
    assert m.kind == "nnx" and isinstance(m.adapted, Adapted)
    batch = data()
    ref = nnx_mlp()
    logits = np.asarray(ref(batch["inputs"]), np.float64)
    np.testing.assert_allclose(np.asarray(m.adapted.model_fn(m.adapted.params, batch)), logits,
                               rtol=tol(1e-12, 1e-5))
    h = _dense_hessian(lambda p: _xent(nnx.merge(nnx.graphdef(ref), p)(batch["inputs"]),
                                       batch["labels"]), nnx.state(ref, nnx.Param))
    np.testing.assert_allclose(_eigsh_top(m.adapted, batch, 3), _top(h, 3),
                               rtol=tol(1e-8, 2e-3), atol=tol(1e-10, 1e-5))


def test_linen_batchnorm_holds_batch_stats_fixed():
    """The adapter differentiates the params only, with the running statistics held fixed
    (train=False, mutable=False); its Hessian is the one of the loss written out here."""
    module, variables = linen_bn()
    m = external.load_model("test_external_models:linen_bn")
    assert m.kind == "linen"
    batch = data()
    stats = variables["batch_stats"]
    assert not np.allclose(np.asarray(jax.tree_util.tree_leaves(stats)[0]), 0.0)

    def loss(p):
        return _xent(module.apply({"params": p, "batch_stats": stats}, batch["inputs"],
                                  train=False), batch["labels"])

    out = m.adapted.model_fn(m.adapted.params, batch)
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(module.apply(variables, batch["inputs"], train=False)),
        rtol=tol(1e-12, 1e-5))
    train_mode, _ = module.apply(variables, batch["inputs"], train=True, mutable=["batch_stats"])
    assert not np.allclose(np.asarray(out), np.asarray(train_mode))  # running stats are used
    np.testing.assert_allclose(float(m.adapted.loss_fn(m.adapted.params, batch)),
                               float(loss(variables["params"])), rtol=tol(1e-12, 1e-5))
    h = _dense_hessian(loss, variables["params"])
    np.testing.assert_allclose(_eigsh_top(m.adapted, batch, 3), _top(h, 3),
                               rtol=tol(1e-8, 2e-3), atol=tol(1e-10, 1e-5))
    # adapting the same model again gives equal functions (compiled programs are reused)
    assert external.adapt((module, variables)).model_fn == external.adapt(
        (module, variables)).model_fn


def test_linen_explicit_apply_kwargs_and_params_only():
    module, variables = linen_bn()
    batch = data()
    m = external.adapt((module, variables, {"train": False}))
    np.testing.assert_allclose(np.asarray(m.model_fn(m.params, batch)),
                               np.asarray(module.apply(variables, batch["inputs"], train=False)),
                               rtol=tol(1e-12, 1e-5))

    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, param_dtype=FLOAT)(x)

    plain = Plain()
    v = plain.init(jax.random.key(0), jnp.zeros((1, 4), FLOAT))
    a = external.adapt((plain, v))
    assert a.model_fn == gj.models.from_linen(plain, v, a.head).model_fn
    with pytest.raises(FactoryError, match="no 'params' collection"):
        external.adapt((plain, {"batch_stats": {}}))


def test_equinox_mlp_partition_and_hessian():
    eqx = pytest.importorskip("equinox")
    m = external.load_model("test_external_models:eqx_mlp")
    assert m.kind == "equinox"
    model, batch = eqx_mlp(), data()
    params, static = eqx.partition(model, eqx.is_inexact_array)
    assert gj.tree.leaf_paths(m.adapted.params) == [
        "layers/0/weight", "layers/0/bias", "layers/1/weight", "layers/1/bias"]

    def loss(p):
        return _xent(jax.vmap(eqx.combine(p, static))(batch["inputs"]), batch["labels"])

    np.testing.assert_allclose(float(m.adapted.loss_fn(m.adapted.params, batch)),
                               float(loss(params)), rtol=tol(1e-12, 1e-5))
    h = _dense_hessian(loss, params)
    np.testing.assert_allclose(_eigsh_top(m.adapted, batch, 3), _top(h, 3),
                               rtol=tol(1e-8, 2e-3), atol=tol(1e-10, 1e-5))
    ggn = gj.ggn(m.adapted.model_fn, m.adapted.head, m.adapted.params, batch)
    assert ggn.n_params == h.shape[0]
    with pytest.raises(FactoryTypeError, match="stateful Equinox"):
        external.adapt((model, eqx.nn.State(model)))


def test_plain_functions_and_adapted():
    m = external.load_model("test_external_models:functions")
    assert m.kind == "functions"
    batch = data()
    _, fn, params = functions()
    np.testing.assert_allclose(float(m.adapted.loss_fn(params, batch)),
                               float(_xent(fn(params, batch), batch["labels"])),
                               rtol=tol(1e-12, 1e-5))
    mse = gj.heads.mse()
    a = external.adapt((None, fn, params, mse))
    assert a.head is mse
    assert external.adapt(a) is a
    with pytest.raises(FactoryError, match="both None"):
        external.adapt((None, None, params))


# -- data -----------------------------------------------------------------------------------------


def test_load_data_batch_iterable_and_list():
    b = external.load_data("test_external_models:data")
    np.testing.assert_array_equal(b["inputs"], data()["inputs"])
    two = external.load_data("test_external_models:data_batches", batches=2)
    np.testing.assert_array_equal(two["inputs"], data()["inputs"][:16])
    np.testing.assert_array_equal(two["labels"], data()["labels"][:16])
    assert len(external.load_data("test_external_models:DATA_LIST")["labels"]) == 2
    with pytest.raises(FactoryError, match="gave 3 batch"):
        external.load_data("test_external_models:data_batches", batches=4)
    with pytest.raises(FactoryTypeError, match="returned a int"):
        external.load_data("test_external_models:returns_int")
    with pytest.raises(FactoryError, match="the factory raised"):
        external.load_data("test_external_models:raising")


def test_load_data_refuses_tuples_and_ragged(tmp_path):
    f = tmp_path / "d.py"
    f.write_text(textwrap.dedent("""
        import numpy as np
        def tuples():
            return [(np.ones((2, 3)), np.zeros(2))]
        def ragged():
            return {"inputs": np.ones((3, 2)), "labels": np.zeros(2, int)}
    """))
    with pytest.raises(FactoryTypeError, match="yields tuples"):
        external.load_data(f"{f}:tuples")
    with pytest.raises(FactoryError, match="leading"):
        external.load_data(f"{f}:ragged")


# -- checkpoints ----------------------------------------------------------------------------------


def test_restore_matches_paths_and_replaces_batch_stats():
    module, variables = linen_bn()
    m = external.load_model("test_external_models:linen_bn")
    new_params = jax.tree_util.tree_map(lambda x: np.asarray(x) * 1.5, variables["params"])
    new_stats = jax.tree_util.tree_map(lambda x: np.asarray(x) + 1.0, variables["batch_stats"])
    batch = data()
    a = external.restore(m, {"params": new_params, "batch_stats": new_stats, "step": 3})
    ref = module.apply({"params": new_params, "batch_stats": new_stats}, batch["inputs"],
                       train=False)
    np.testing.assert_allclose(np.asarray(a.model_fn(a.params, batch)), np.asarray(ref),
                               rtol=tol(1e-12, 1e-5))
    only = external.restore(m, new_params)  # params alone: the factory's statistics
    ref = module.apply({"params": new_params, "batch_stats": variables["batch_stats"]},
                       batch["inputs"], train=False)
    np.testing.assert_allclose(np.asarray(only.model_fn(only.params, batch)), np.asarray(ref),
                               rtol=tol(1e-12, 1e-5))
    bad = jax.tree_util.tree_map(lambda x: x, new_params)
    bad["Dense_0"]["kernel"] = np.zeros((4, 7))
    with pytest.raises(ValueError, match="Dense_0/kernel has shape"):
        external.restore(m, bad)


@pytest.mark.filterwarnings("ignore:scatter inputs:FutureWarning")  # flax's BatchNorm update
def test_restore_nnx_state_with_batch_stats():
    """A saved nnx.state(model) (params and batch statistics) replaces both."""
    trained = nnx_bn()
    x = data()["inputs"] * 3.0 + 1.0
    trained.train()
    trained(x)  # moves the running statistics
    trained.eval()
    tree = jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(nnx.state(trained)))
    tree["l1"]["kernel"] = tree["l1"]["kernel"] * 2.0
    m = external.load_model("test_external_models:nnx_bn")
    a = external.restore(m, tree)
    ref = nnx_bn()
    nnx.replace_by_pure_dict(state := nnx.state(ref), tree)
    nnx.update(ref, state)
    ref.eval()
    np.testing.assert_allclose(np.asarray(a.model_fn(a.params, {"inputs": x})),
                               np.asarray(ref(x)), rtol=tol(1e-12, 1e-5))
    assert not np.allclose(np.asarray(a.model_fn(a.params, {"inputs": x})),
                           np.asarray(m.adapted.model_fn(m.adapted.params, {"inputs": x})))


def test_restore_nnx_and_equinox():
    m = external.load_model("test_external_models:nnx_mlp")
    pure = nnx.to_pure_dict(nnx.state(nnx_mlp(), nnx.Param))
    pure = jax.tree_util.tree_map(lambda x: np.asarray(x) * 0.5, pure)
    a = external.restore(m, {"params": pure, "opt_state": {"mu": 1.0}})
    assert a.model_fn == m.adapted.model_fn  # same functions: nothing recompiles
    np.testing.assert_allclose(np.asarray(a.params["layers"][0]["kernel"][...]),
                               pure["layers"][0]["kernel"])
    pytest.importorskip("equinox")
    e = external.load_model("test_external_models:eqx_mlp")
    tree = {"layers": {i: {"weight": np.full(x.weight.shape, 0.1), "bias": np.zeros(x.bias.shape)}
                       for i, x in enumerate(eqx_mlp().layers)}}
    r = external.restore(e, tree)
    assert float(jnp.abs(r.params.layers[0].weight - 0.1).max()) == 0.0
    with pytest.raises(ValueError, match="missing layers/1/weight"):
        external.restore(e, {"layers": {0: tree["layers"][0]}})


# -- the command line -----------------------------------------------------------------------------


@pytest.mark.parametrize("argv, fragment", [
    (["--model", "nocolon"], "invalid choice: 'nocolon' (choose from mlp, cnn, transformer, "
                             "or your model as a 'module:factory' spec"),
    (["--model", "no_such_module_xyz:f", "--data", "test_external_models:data"],
     "cannot import module"),
    (["--model", "test_external_models:missing", "--data", "test_external_models:data"],
     "has no attribute 'missing'"),
    (["--model", "test_external_models:raising", "--data", "test_external_models:data"],
     "the factory raised RuntimeError"),
    (["--model", "test_external_models:returns_int", "--data", "test_external_models:data"],
     "unsupported model"),
    (["--model", "test_external_models:nnx_mlp"], "needs --data"),
    (["--model", "test_external_models:nnx_mlp", "--data", "nocolon"], "'module:factory' spec"),
    (["--model", "test_external_models:nnx_mlp", "--data", "test_external_models:nope"],
     "has no attribute 'nope'"),
])
def test_cli_bad_specs_exit_2(argv, fragment, tmp_path):
    code, _, err = _run(["analyze", *argv, "--out", tmp_path / "o"])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and fragment in lines[0], err
    assert not (tmp_path / "o").exists()


def test_cli_loss_only_model_refuses_ggn(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(textwrap.dedent("""
        import jax.numpy as jnp
        def loss_only():
            return (lambda p, b: jnp.sum(p["w"] ** 2), None, {"w": jnp.ones(3)})
    """))
    code, _, err = _run(["analyze", "--model", f"{f}:loss_only", "--data",
                         "test_external_models:data", "--operator", "ggn", "--out", tmp_path / "o"])
    assert code == 2 and "needs a model_fn" in err, err


@pytest.mark.slow
def test_cli_analyze_linen_batchnorm_model(tmp_path):
    """``analyze --model`` on the Linen BatchNorm model: the report's Hessian eigenvalues
    are those of the dense Hessian with the batch statistics held fixed."""
    out = tmp_path / "rep"
    code, stdout, err = _run(["analyze", "--model", "test_external_models:linen_bn", "--data",
                              "test_external_models:data", "--operator", "hessian", "--k", "2",
                              "--fast", "--no-figures", "--out", out, "--json"])
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["model"]["spec"] == {"factory": "test_external_models:linen_bn", "kind": "linen"}
    assert rep["training"] is None or rep["training"]["steps"] == 0
    assert rep["data"]["train_examples"] == 24 and rep["data"]["test_examples"] is None
    module, variables = linen_bn()
    batch = data()

    def loss(p):
        return _xent(module.apply({"params": p, "batch_stats": variables["batch_stats"]},
                                  batch["inputs"], train=False), batch["labels"])

    top = rep["curvature"]["hessian"]["top_k"]
    np.testing.assert_allclose(top["eigenvalues"], _top(_dense_hessian(loss, variables["params"]),
                                                        2), rtol=tol(1e-5, 2e-3))
    assert (out / "report.html").is_file() and (out / "report.md").is_file()


@pytest.mark.slow
def test_cli_analyze_equinox_model_weights_and_hessian(tmp_path):
    pytest.importorskip("equinox")
    out = tmp_path / "rep"
    code, stdout, err = _run(["analyze", "--model", "test_external_models:eqx_mlp", "--data",
                              "test_external_models:data_batches", "--batches", "3",
                              "--operator", "hessian", "--k", "2", "--fast", "--no-figures",
                              "--out", out, "--json"])
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["model"]["spec"]["kind"] == "equinox" and rep["model"]["n_params"] == 43
    assert set(rep["weights"]["layers"]) == {"layers/0/weight", "layers/1/weight"}
    m = external.load_model("test_external_models:eqx_mlp")
    np.testing.assert_allclose(rep["curvature"]["hessian"]["top_k"]["eigenvalues"],
                               _eigsh_top(m.adapted, data(), 2), rtol=tol(1e-5, 2e-3))
