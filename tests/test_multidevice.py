"""Operators, Lanczos and estimators on a ``jax.sharding.Mesh`` of 8 (forced host) CPU devices.

Covered: Hessian / GGN / streaming empirical-Fisher products, ``eigsh`` with eigenvectors,
Hutchinson and stochastic Lanczos quadrature (every program is compiled twice, single-device
and sharded, so the list is kept short; Hutch++ and the cached Fisher reuse the same
machinery).

The check runs in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(the device count is fixed when jax initialises). Data parallel: the batch is sharded over
the ``"data"`` mesh axis, params are replicated; parameter sharding: on a ``4 x 2`` mesh the
hidden-layer kernels are also split over ``"model"``. Every result must equal the
single-device one (float64, same keys) and vectors must come back as ``NamedSharding``
arrays sharded like the params.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow  # one subprocess, every program compiled twice (~40 s)

#: ``"data_model"``: a 4 x 2 mesh, batch over ``"data"`` and hidden units over ``"model"``
#: (covers pure data parallelism too: the other leaves are replicated). Add ``"data"`` (an
#: 8-way data-parallel mesh) for a second layout; each layout costs one more compilation of
#: every program, so the default keeps the test short.
LAYOUTS = ("data_model",)

SCRIPT = textwrap.dedent(
    r'''
    import json, os, sys
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import gradience_jax as gj
    from gradience_jax.models import MLP, from_nnx
    eigsh = getattr(gj, "eigsh", None) or __import__("gradience_jax.spectrum").spectrum.eigsh
    est = __import__("gradience_jax.estimators").estimators
    hutchinson_trace = getattr(gj, "hutchinson_trace", None) or est.hutchinson_trace
    spectral_density = getattr(gj, "spectral_density", None) or est.spectral_density

    assert jax.device_count() == 8, jax.devices()
    model = MLP([8, 16, 4], activation=jnp.tanh, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    loss_fn, model_fn, params, head = from_nnx(model, gj.heads.softmax_cross_entropy())
    batch = gj.data.classification(jax.random.key(0), n=32, dim=8, num_classes=4)
    batch["inputs"] = batch["inputs"].astype(jnp.float64)
    v = gj.tree.random_like(jax.random.key(1), params)

    def rel(a, b):
        a = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(a)])
        b = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(b)])
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))

    def run(p, b, vec):
        ops = {
            "hessian": gj.hessian(loss_fn, p, b),
            "ggn": gj.ggn(model_fn, head, p, b),
            "ef": gj.empirical_fisher(loss_fn, p, b, mode="streaming"),
        }
        out = {name: op @ vec for name, op in ops.items()}
        res = eigsh(ops["hessian"], k=3, which="LA", key=jax.random.key(2),
                    return_eigenvectors=True)
        out["eigenvalues"] = np.asarray(res.eigenvalues)
        out["eigenvectors"] = res.eigenvectors
        out["trace"] = float(hutchinson_trace(ops["ggn"], jax.random.key(3), num_samples=8).estimate)
        out["slq_nodes"] = np.asarray(spectral_density(ops["hessian"], jax.random.key(5),
                                                       num_probes=2, num_iters=12).nodes)
        return out

    single = run(params, batch, v)
    report = {}
    layouts = sys.argv[1].split(",")
    for layout in layouts:
        if layout == "data":
            mesh = Mesh(np.array(jax.devices()), ("data",))
            pspec = lambda path, x: P()
        else:
            mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
            # split the hidden units: first kernel's columns, its bias, second kernel's rows
            def pspec(path, x):
                s = gj.tree.path_str(path)
                if s == "layers/0/kernel":
                    return P(None, "model")
                if s == "layers/0/bias":
                    return P("model")
                if s == "layers/1/kernel":
                    return P("model", None)
                return P()
        shard = lambda tree: jax.tree_util.tree_map_with_path(  # noqa: E731
            lambda path, x: jax.device_put(x, NamedSharding(mesh, pspec(path, x))), tree)
        sp, sv = shard(params), shard(v)
        sb = jax.tree_util.tree_map(lambda x: jax.device_put(x, NamedSharding(mesh, P("data"))), batch)
        out = run(sp, sb, sv)
        want = {gj.tree.path_str(path): x.sharding
                for path, x in jax.tree_util.tree_flatten_with_path(sp)[0]}
        r = {}
        for name in ("hessian", "ggn", "ef"):
            r[name + "_rel"] = rel(out[name], single[name])
        for name in ("hessian", "ggn", "ef"):
            leaves = jax.tree_util.tree_flatten_with_path(out[name])[0]
            r[name + "_named"] = all(isinstance(x.sharding, NamedSharding) for _, x in leaves)
            r[name + "_same_sharding"] = all(
                x.sharding.is_equivalent_to(want[gj.tree.path_str(p)], x.ndim) for p, x in leaves)
        r["eig_rel"] = float(np.max(np.abs(out["eigenvalues"] - single["eigenvalues"])
                                    / np.abs(single["eigenvalues"])))
        # eigenvectors up to sign
        ev_s = [np.concatenate([np.ravel(l[i]) for l in jax.tree_util.tree_leaves(single["eigenvectors"])]) for i in range(3)]
        ev_m = [np.concatenate([np.ravel(l[i]) for l in jax.tree_util.tree_leaves(out["eigenvectors"])]) for i in range(3)]
        r["eigvec_err"] = float(max(1 - abs(np.dot(a, b)) for a, b in zip(ev_s, ev_m)))
        r["eigvec_shardings"] = sorted({type(x.sharding).__name__
                                        for x in jax.tree_util.tree_leaves(out["eigenvectors"])})
        r["trace_rel"] = abs(out["trace"] - single["trace"]) / abs(single["trace"])
        r["slq_rel"] = float(np.max(np.abs(out["slq_nodes"] - single["slq_nodes"]))
                             / np.max(np.abs(single["slq_nodes"])))
        report[layout] = r
    print("REPORT" + json.dumps(report))
    '''
)


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, ",".join(LAYOUTS)], capture_output=True,
                          text=True, env=env, timeout=900, cwd=root)
    if proc.returncode != 0:
        raise AssertionError(f"multi-device subprocess failed:\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT")][-1]
    return json.loads(line[len("REPORT"):])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sharded_operators_equal_single_device(report, layout):
    r = report[layout]
    for name in ("hessian", "ggn", "ef"):
        assert r[name + "_rel"] <= 1e-12, (name, r)
    for name in ("hessian", "ggn", "ef"):
        assert r[name + "_named"], (name, "product lost its NamedSharding", r)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sharded_lanczos_and_estimators_equal_single_device(report, layout):
    r = report[layout]
    assert r["eig_rel"] <= 1e-8, r
    assert r["eigvec_err"] <= 1e-8, r
    assert r["trace_rel"] <= 1e-10, r
    assert r["slq_rel"] <= 1e-8, r


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vectors_keep_params_sharding(report, layout):
    r = report[layout]
    assert all(r[name + "_same_sharding"] for name in ("hessian", "ggn", "ef")), r
    assert r["eigvec_shardings"] == ["NamedSharding"], r
