"""One registry of operator constructors, every one through the same checks (as lineax's
``make_operators``): dense reference (float64; float32 ``jax`` with ``GRADIENCE_X64=0``),
symmetry, PSD where claimed, dtype in = dtype out (float64 and float32), one compile for
repeated matvecs; then ``registry.build``.

Models: ``split`` is a pure-JAX token model (``(B, T)`` positions, a padding mask,
softmax cross-entropy) given as a :class:`gj.SplitModel`, so the same model serves
``vocab_chunk``; ``seed`` is the 2-3-1 MLP with MSE from ``helpers``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    X64,
    as_f64,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    dense_mc_fisher,
    model_case,
    rel_err,
    strict_dtype_promotion,
    tol,
)

import gradience_jax as gj
from gradience_jax.operators import registry
from gradience_jax.operators.heads import compose

strict_promotion = pytest.fixture(autouse=True, scope="module")(strict_dtype_promotion)

MASKED_CE = gj.heads.softmax_cross_entropy("labels", mask_key="mask")
MC_KEY = jax.random.key(7)
#: the precision of the reference contexts: float64 with x64, else float32
DT = "float64" if X64 else "float32"
#: relative error of products / dense matrices against the reference in this precision
TOL = tol(1e-10, 1e-5)


# -- models ------------------------------------------------------------------------------


def split_features(params, batch):
    return jnp.tanh(batch["inputs"] @ params["w1"] + params["b1"])


def split_readout(params, hidden):
    return hidden @ params["w2"]


SPLIT = gj.SplitModel(split_features, split_readout)


@dataclasses.dataclass(frozen=True)
class Ctx:
    """What a constructor needs: a model, its head and loss, a point, a dense matrix."""

    loss_fn: Callable
    model_fn: Callable
    head: Any
    params: Any
    batch: Any
    matrix: Any  # for from_dense / from_matvec
    like: Any  # the pytree vectors of from_matvec

    def scaled(self, factor: float) -> Ctx:
        """The same model at params (and matrix) times ``factor``: same shapes."""
        scale = lambda t: jax.tree_util.tree_map(lambda x: x * factor, t)  # noqa: E731
        return dataclasses.replace(self, params=scale(self.params), matrix=self.matrix * factor)


def _f32(tree):
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(x, jnp.float32) if np.issubdtype(np.asarray(x).dtype, np.floating)
        else jnp.asarray(x), tree)


@functools.cache
def ctx(model: str, dtype_name: str = DT) -> Ctx:
    """A model at a point, in float32 or float64; the float64 values are the float32 ones
    upcast, so one float64 reference serves both precisions (with x64 off the default
    context is the float32 one)."""
    up = as_f64 if dtype_name == "float64" else (lambda t: t)
    dtype = jnp.dtype(dtype_name)
    rng = np.random.default_rng(0)
    root = rng.standard_normal((7, 7))
    matrix = up(_f32(root + root.T))  # symmetric, indefinite
    like = {"a": jax.ShapeDtypeStruct((3,), dtype), "b": jax.ShapeDtypeStruct((2, 2), dtype)}
    if model == "split":
        params = up(_f32({"w1": rng.standard_normal((3, 4)) * 0.7,
                          "b1": rng.standard_normal(4) * 0.1,
                          "w2": rng.standard_normal((4, 5)) * 0.7}))
        batch = up(_f32({"inputs": rng.standard_normal((3, 2, 3)),
                         "labels": rng.integers(0, 5, (3, 2)),
                         "mask": np.array([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])}))
        return Ctx(compose(SPLIT, MASKED_CE), SPLIT, MASKED_CE, params, batch, matrix, like)
    adapted, batch = model_case("seed", dtype_name)
    if model == "seed1":  # one example: K-FAC is exactly the GGN's layer blocks
        batch = jax.tree_util.tree_map(lambda x: x[:1], batch)
    return Ctx(adapted.loss_fn, adapted.model_fn, adapted.head, adapted.params, batch, matrix,
               like)


# -- the registry of constructors --------------------------------------------------------


def _index(like) -> dict[str, np.ndarray]:
    sizes = [int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(like)]
    offsets = np.cumsum([0] + sizes)
    return {p: np.arange(offsets[i], offsets[i + 1])
            for i, p in enumerate(gj.tree.leaf_paths(like))}


def _block_diag(mat, like, blocks) -> np.ndarray:
    idx, out = _index(like), np.zeros_like(mat)
    for block in blocks:
        ii = np.concatenate([idx[p] for p in block])
        out[np.ix_(ii, ii)] = mat[np.ix_(ii, ii)]
    return out


def _dataset(c: Ctx) -> gj.LinearOperator:
    cuts = ((0, 3), (3, 6), (6, 8))  # uneven: 3, 3, 2
    parts = [jax.tree_util.tree_map(lambda x, a=a, b=b: x[a:b], c.batch) for a, b in cuts]
    return gj.dataset_operator(gj.hessian, c.loss_fn, c.params, parts)


def _mc_reference(c: Ctx, c32: Ctx | None) -> np.ndarray:
    # the labels are drawn from the operator's own outputs (float32 draws for float32)
    outs = None if c32 is None else c32.model_fn(c32.params, c32.batch)
    return dense_mc_fisher(c.model_fn, MASKED_CE, c.params, c.batch, MC_KEY, 3, outs)


def _kernels(path: str, leaf) -> bool:
    return path.endswith("kernel")


def _sub_block(c: Ctx) -> np.ndarray:
    """The Hessian's kernel-kernel block, rows in the sub-vector's order (sorted paths)."""
    idx = _index(c.params)
    ii = np.concatenate([idx[p] for p in sorted(filter(lambda p: _kernels(p, None), idx))])
    return _h(c)[np.ix_(ii, ii)]


@dataclasses.dataclass(frozen=True)
class Case:
    """``make(ctx) -> operator``; ``reference(ctx64, ctx32_or_None, op) -> dense float64``."""

    model: str
    make: Callable[[Ctx], gj.LinearOperator]
    reference: Callable[[Ctx, Ctx | None, gj.LinearOperator], np.ndarray]
    is_psd: bool
    rebuild: bool = True  # new params / matrix of the same shapes reuse the compiled program


def _h(c):
    return dense_hessian(c.loss_fn, c.params, c.batch)


def _g(c):
    return dense_ggn(c.model_fn, c.head, c.params, c.batch)


CASES = {
    "hessian": Case("split", lambda c: gj.hessian(c.loss_fn, c.params, c.batch),
                    lambda c, c32, op: _h(c), False),
    "ggn": Case("split", lambda c: gj.ggn(c.model_fn, c.head, c.params, c.batch),
                lambda c, c32, op: _g(c), True),
    "ggn_vocab_chunk": Case(  # 6 tokens in chunks of 4: a ragged last chunk
        "split", lambda c: gj.ggn(c.model_fn, c.head, c.params, c.batch, vocab_chunk=4),
        lambda c, c32, op: _g(c), True),
    "empirical_fisher_cached": Case(
        "split", lambda c: gj.empirical_fisher(c.loss_fn, c.params, c.batch, mode="cached"),
        lambda c, c32, op: dense_empirical_fisher(c.loss_fn, c.params, c.batch), True),
    "empirical_fisher_streaming": Case(
        "split", lambda c: gj.empirical_fisher(c.loss_fn, c.params, c.batch, mode="streaming"),
        lambda c, c32, op: dense_empirical_fisher(c.loss_fn, c.params, c.batch), True),
    "mc_fisher": Case(
        "split", lambda c: gj.mc_fisher(c.model_fn, c.params, c.batch, MC_KEY, num_samples=3,
                                        head=gj.heads.softmax_cross_entropy(None, "mask")),
        lambda c, c32, op: _mc_reference(c, c32), True),
    "kfac": Case("seed1", lambda c: gj.kfac(c.model_fn, c.head, c.params, c.batch),
                 lambda c, c32, op: _block_diag(_g(c), c.params, op.coverage.blocks), True),
    "params_filter": Case(  # nested NNX paths ("layers/0/kernel"): flat dict sub-vectors
        "seed", lambda c: gj.params_filter(gj.hessian(c.loss_fn, c.params, c.batch), _kernels),
        lambda c, c32, op: _sub_block(c), False),
    "dataset_operator": Case("seed", _dataset, lambda c, c32, op: _h(c), False),
    "damped": Case("split", lambda c: gj.damped(gj.ggn(c.model_fn, c.head, c.params, c.batch),
                                                0.3),
                   lambda c, c32, op: _g(c) + 0.3 * np.eye(gj.tree.size(c.params)), True),
    "sum": Case("split", lambda c: gj.hessian(c.loss_fn, c.params, c.batch)
                + gj.ggn(c.model_fn, c.head, c.params, c.batch),
                lambda c, c32, op: _h(c) + _g(c), False),
    "difference_and_scaling": Case(
        "split", lambda c: gj.hessian(c.loss_fn, c.params, c.batch)
        - 2.0 * gj.ggn(c.model_fn, c.head, c.params, c.batch),
        lambda c, c32, op: _h(c) - 2.0 * _g(c), False),
    "scaled": Case("split", lambda c: 2.5 * gj.ggn(c.model_fn, c.head, c.params, c.batch),
                   lambda c, c32, op: 2.5 * _g(c), True),
    "from_dense": Case("split", lambda c: gj.from_dense(c.matrix @ c.matrix.T),
                       lambda c, c32, op: np.asarray(c.matrix @ c.matrix.T), True),
    "from_matvec": Case(
        "split", lambda c: gj.from_matvec(
            lambda v: gj.tree.unravel_like(c.matrix @ gj.tree.ravel(v), v), c.like),
        lambda c, c32, op: np.asarray(c.matrix), False, rebuild=False),  # closes over matrix
}


@functools.cache
def reference(name: str) -> np.ndarray:
    case = CASES[name]
    c = ctx(case.model)
    return np.asarray(case.reference(c, None, case.make(c)), np.float64)


def _vectors(like, num, seed=0):
    return [gj.tree.random_like(jax.random.key(seed + i), like) for i in range(num)]


def _flat64(v) -> np.ndarray:
    return np.asarray(gj.tree.ravel(v), np.float64)


# -- the checks ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_matches_dense_float64_reference(name):
    case = CASES[name]
    op = case.make(ctx(case.model))
    ref = reference(name)
    assert op.n_params == ref.shape[0]
    for v in _vectors(op.params_like, 2):
        assert rel_err(_flat64(op @ v), ref @ _flat64(v)) <= TOL, name
    assert rel_err(op.to_dense(), ref) <= TOL, name


@pytest.mark.parametrize("name", list(CASES))
def test_symmetric_and_psd_as_claimed(name):
    case = CASES[name]
    op = case.make(ctx(case.model))
    assert op.is_psd is case.is_psd
    u, v = _vectors(op.params_like, 2, seed=3)
    lhs, rhs = gj.tree.vdot(u, op @ v), gj.tree.vdot(v, op @ u)
    scale = max(1.0, abs(float(lhs)), float(gj.tree.norm(u) * gj.tree.norm(op @ v)))
    assert abs(float(lhs - rhs)) <= TOL * scale, name
    evals = np.linalg.eigvalsh(reference(name))
    if op.is_psd:
        assert evals[0] >= -TOL * max(1.0, abs(evals[-1])), (name, evals[0])
    else:  # an indefinite claim is only honest if the fixture is indefinite
        assert evals[0] < 0 < evals[-1], (name, evals[[0, -1]])


@pytest.mark.parametrize("name", list(CASES))
def test_float32_in_float32_out(name):
    case = CASES[name]
    c32 = ctx(case.model, "float32")
    op = case.make(c32)
    assert op.dtype == jnp.float32
    (v,) = _vectors(op.params_like, 1, seed=5)
    out = op @ v
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(v)
    for x, y in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(v)):
        assert x.dtype == y.dtype == jnp.float32 and x.shape == y.shape
    # a float32 reference for the float32 draws (mc_fisher), else the shared float64 one
    ref = reference(name) if name != "mc_fisher" else _mc_reference(ctx(case.model), c32)
    assert rel_err(_flat64(out), ref @ _flat64(v)) <= 1e-4, name


@pytest.mark.parametrize("name", list(CASES))
def test_repeated_matvecs_compile_once(name):
    case = CASES[name]
    c = ctx(case.model)
    chex.clear_trace_counter()  # chex counts per function body, across parametrisations

    @jax.jit
    @chex.assert_max_traces(n=1)
    def apply(op, v):
        return op @ v

    op = case.make(c)
    for v in _vectors(op.params_like, 3, seed=7):
        apply(op, v)
    if case.rebuild:
        op2 = case.make(c.scaled(1.1))
        out = apply(op2, v)
        ref2 = np.asarray(case.reference(c.scaled(1.1), None, op2), np.float64)
        assert rel_err(_flat64(out), ref2 @ _flat64(v)) <= TOL, name


# -- registry.build -------------------------------------------------------------------------


def test_names_and_aliases():
    assert registry.names() == ("hessian", "ggn", "empirical_fisher", "mc_fisher", "kfac")
    assert registry.ALIASES == {"ef": "empirical_fisher"}
    assert registry.canonical_name("ef") == "empirical_fisher"
    assert "vocab_chunk" in registry.options("ggn") and "mode" in registry.options("ef")
    assert "params" not in registry.options("kfac") and "key" not in registry.options("kfac")


BUILD = {  # name -> (build kwargs beyond params / batch, the direct construction)
    "hessian": ({"loss_fn": True}, lambda c: gj.hessian(c.loss_fn, c.params, c.batch)),
    "ggn": ({"model_fn": True, "head": True},
            lambda c: gj.ggn(c.model_fn, c.head, c.params, c.batch)),
    "ef": ({"loss_fn": True}, lambda c: gj.empirical_fisher(c.loss_fn, c.params, c.batch)),
    "mc_fisher": ({"model_fn": True, "head": True, "key": True},
                  lambda c: gj.mc_fisher(c.model_fn, c.params, c.batch, MC_KEY, head=c.head)),
    "kfac": ({"model_fn": True, "head": True},
             lambda c: gj.kfac(c.model_fn, c.head, c.params, c.batch)),
}


@pytest.mark.parametrize("name", list(BUILD))
def test_build_equals_the_factory(name):
    c = ctx("seed1" if name == "kfac" else "split")
    if name == "mc_fisher":
        c = dataclasses.replace(c, head=gj.heads.softmax_cross_entropy(None, "mask"))
    wanted, direct = BUILD[name]
    kwargs = {k: {"loss_fn": c.loss_fn, "model_fn": c.model_fn, "head": c.head,
                  "key": MC_KEY}[k] for k in wanted}
    op = registry.build(name, params=c.params, batch=c.batch, **kwargs)
    ref = direct(c)
    assert op.name == ref.name and op.is_psd == ref.is_psd
    assert rel_err(op.to_dense(), ref.to_dense()) == 0.0


def test_build_composes_loss_and_forwards_options():
    c = ctx("split")
    op = registry.build("hessian", model_fn=c.model_fn, head=c.head, params=c.params,
                        batch=c.batch, key=MC_KEY, linearize=False)  # key: ignored
    assert op.prepare.linearize is False
    assert rel_err(op.to_dense(), reference("hessian")) <= TOL
    chunked = registry.build("ggn", model_fn=c.model_fn, head=c.head, params=c.params,
                             batch=c.batch, vocab_chunk=4)
    assert rel_err(chunked.to_dense(), reference("ggn")) <= TOL


def test_build_errors_name_the_argument():
    c = ctx("split")
    point = {"params": c.params, "batch": c.batch}
    with pytest.raises(ValueError, match="name must be one of .*'hessian'.*got 'jacobian'"):
        registry.build("jacobian", loss_fn=c.loss_fn, **point)
    with pytest.raises(ValueError, match="needs loss_fn"):
        registry.build("hessian", model_fn=c.model_fn, **point)
    with pytest.raises(ValueError, match="missing: model_fn, head"):
        registry.build("ggn", loss_fn=c.loss_fn, **point)
    with pytest.raises(ValueError, match="missing: head"):
        registry.build("kfac", model_fn=c.model_fn, **point)
    with pytest.raises(ValueError, match="missing: key"):
        registry.build("mc_fisher", model_fn=c.model_fn, **point)
    with pytest.raises(ValueError, match="built-in head"):
        registry.build("mc_fisher", model_fn=c.model_fn, head=lambda o, b: o.sum(),
                       key=MC_KEY, **point)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['vocab_chunk'\].*'mode'"):
        registry.build("ef", loss_fn=c.loss_fn, vocab_chunk=4, **point)


def test_compute_spectrum_builds_through_the_registry(monkeypatch):
    c = ctx("split")
    calls = []
    build = registry.build
    monkeypatch.setattr(registry, "build", lambda name, **kw: calls.append(name) or build(
        name, **kw))
    cfg = gj.LanczosConfig(k=2, max_iters=20)
    res = gj.compute_spectrum(c.loss_fn, c.params, c.batch, "ef", cfg)
    assert calls == ["empirical_fisher"] and res.operator == "empirical_fisher"
    top = np.linalg.eigvalsh(reference("empirical_fisher_cached"))[::-1][:2]
    np.testing.assert_allclose(res.eigenvalues, top, rtol=tol(1e-8, 1e-4))


def test_old_import_paths():
    from gradience_jax.operators.ggn import _composed_loss
    from gradience_jax.operators.heads import Head, _Head

    assert _Head is Head and _composed_loss is compose
    assert isinstance(gj.heads.mse(), Head)
    c = ctx("split")
    assert compose(c.model_fn, c.head) == _composed_loss(c.model_fn, c.head)
    assert float(compose(c.model_fn, c.head)(c.params, c.batch)) == \
        float(c.head(c.model_fn(c.params, c.batch), c.batch))


def test_core_tests_run_under_strict_promotion():
    assert jax.config.jax_numpy_dtype_promotion == "strict"
    with pytest.raises(jax.dtypes.TypePromotionError):  # float16 + float32: in both precisions
        jnp.ones(2, jnp.float16) + jnp.ones(2, jnp.float32)
