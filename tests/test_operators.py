"""Every operator's matvec against its dense float64 reference, on every small model.

The per-constructor checks (symmetry, PSD, dtypes, compile once, operator algebra,
params_filter, dataset_operator of the Hessian) live in ``test_registry.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    MODELS,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    dense_jacobian,
    dense_mc_fisher,
    model_case,
    rel_err,
    strict_dtype_promotion,
)
from jax.flatten_util import ravel_pytree

import gradience_jax as gj

strict_promotion = pytest.fixture(autouse=True, scope="module")(strict_dtype_promotion)

OPERATORS = ["hessian", "ggn", "ef_cached", "ef_streaming"]


def build(kind, adapted, batch, linearize):
    loss_fn, model_fn, params, head = adapted
    if kind == "hessian":
        return gj.hessian(loss_fn, params, batch, linearize=linearize)
    if kind == "ggn":
        return gj.ggn(model_fn, head, params, batch, linearize=linearize)
    if kind == "ef_cached":
        return gj.empirical_fisher(loss_fn, params, batch, mode="cached")
    if kind == "ef_streaming":
        return gj.empirical_fisher(loss_fn, params, batch, mode="streaming", linearize=linearize)
    raise AssertionError(kind)


@functools.cache
def reference(kind, model):
    (loss_fn, model_fn, params, head), batch = model_case(model, "float64")
    if kind == "hessian":
        return dense_hessian(loss_fn, params, batch)
    if kind == "ggn":
        return dense_ggn(model_fn, head, params, batch)
    return dense_empirical_fisher(loss_fn, params, batch)


def products_match(op, dense, like, tol, num=2, seed=0):
    """``op @ v`` equals ``dense @ ravel(v)`` for ``num`` random pytree vectors."""
    for i in range(num):
        v = gj.tree.random_like(jax.random.key(seed + i), like)
        got = gj.tree.ravel(op @ v)
        want = np.asarray(dense) @ np.asarray(gj.tree.ravel(v), np.float64)
        err = rel_err(got, want)
        assert err <= tol, (op.name, err)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("kind", OPERATORS)
def test_matvec_matches_dense_float64(kind, model):
    adapted, batch = model_case(model, "float64")
    ref = reference(kind, model)
    for linearize in (True, False):
        op = build(kind, adapted, batch, linearize)
        products_match(op, ref, adapted.params, 1e-10)
    if model == "seed":  # the whole matrix, through to_dense, on the smallest model
        assert rel_err(op.to_dense(), ref) <= 1e-10


@pytest.mark.parametrize("model", ["mlp", "transformer"])
@pytest.mark.parametrize("kind", OPERATORS)
def test_matvec_float32_within_1e_4(kind, model):
    adapted, batch = model_case(model, "float32")
    op = build(kind, adapted, batch, "auto")
    v = gj.tree.random_like(jax.random.key(1), adapted.params)
    out = op @ v
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(out))
    # the float64 case holds the same weights and batch upcast (see helpers.model_case)
    ref = reference(kind, model)
    expected = ref @ np.asarray(gj.tree.ravel(v), np.float64)
    assert rel_err(gj.tree.ravel(out), expected) <= 1e-4


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_ggn_of_softmax_ce_is_true_fisher(model):
    """GGN = E_{y ~ p(y|x)}[g g^T] computed exactly by summing over every class."""
    (loss_fn, model_fn, params, head), batch = model_case(model, "float64")
    jac, out = dense_jacobian(model_fn, params, batch)
    p = np.asarray(jax.nn.softmax(out, axis=-1)).reshape(-1, out.shape[-1])
    weights = np.asarray(head.weights(batch, out.shape[:-1], out.dtype)).reshape(-1)
    norm = weights.sum()
    c = out.shape[-1]
    jac = jac.reshape(p.shape[0], c, -1)
    fisher = np.zeros((jac.shape[-1],) * 2)
    for t in range(p.shape[0]):
        for y in range(c):
            g = (p[t] - np.eye(c)[y]) @ jac[t]  # grad of -log p(y) for token t
            fisher += weights[t] * p[t, y] * np.outer(g, g)
    fisher /= norm
    products_match(gj.ggn(model_fn, head, params, batch), fisher, params, 1e-10)


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_mc_fisher_matches_its_samples_and_the_fisher_in_expectation(model):
    (loss_fn, model_fn, params, head), batch = model_case(model, "float64")
    key = jax.random.key(7)
    mhead = gj.heads.softmax_cross_entropy(None, mask_key=head.mask_key)
    M = gj.mc_fisher(model_fn, params, batch, key, num_samples=3, head=mhead)
    # exact reference for the same draws: J^T (sum_s g_s g_s^T / (S Z)) J
    ref = dense_mc_fisher(model_fn, mhead, params, batch, key, 3)
    products_match(M, ref, params, 1e-10)
    # many samples: the MC Fisher approaches the GGN (= Fisher for softmax CE)
    big = gj.mc_fisher(model_fn, params, batch, key, num_samples=4000, head=mhead)
    products_match(big, reference("ggn", model), params, 0.1)


def test_mc_fisher_gaussian_matches_mse_ggn_in_expectation():
    (loss_fn, model_fn, params, head), batch = model_case("seed", "float64")
    big = gj.mc_fisher(model_fn, params, batch, jax.random.key(0), likelihood="gaussian",
                       num_samples=20000)
    G = gj.ggn(model_fn, head, params, batch).to_dense()
    assert rel_err(big.to_dense(), G) <= 0.05


def test_params_filter_selecting_nothing_raises():
    (loss_fn, _, params, _), batch = model_case("seed", "float64")
    H = gj.hessian(loss_fn, params, batch)
    with pytest.raises(ValueError, match="selected no parameters"):
        gj.params_filter(H, lambda path, leaf: False)


@pytest.mark.parametrize("make", ["ggn", "ef", "mc"])  # hessian: test_registry.py
def test_dataset_operator_equals_concatenated_batch(make):
    (loss_fn, model_fn, params, head), _ = model_case("mlp", "float64")
    full = gj.data.classification(jax.random.key(11), n=10, dim=4, num_classes=3)
    full["inputs"] = full["inputs"].astype(jnp.float64)
    # uneven batches (4, 4, 2) exercise the weighting and shape grouping
    batches = [jax.tree_util.tree_map(lambda x: x[s], full) for s in
               (slice(0, 4), slice(4, 8), slice(8, 10))]
    if make == "ggn":
        op = gj.dataset_operator(gj.ggn, model_fn, params, batches, head=head)
        ref = gj.ggn(model_fn, head, params, full)
    elif make == "ef":
        op = gj.dataset_operator(gj.empirical_fisher, loss_fn, params, batches, mode="cached")
        ref = gj.empirical_fisher(loss_fn, params, full)
    else:
        # MC Fisher: per-batch keys differ from the full-batch draw, so compare in the
        # many-sample limit against the full-batch GGN.
        op = gj.dataset_operator(gj.mc_fisher, model_fn, params, batches,
                                 key=jax.random.key(0), num_samples=4000)
        ref = gj.ggn(model_fn, head, params, full)
        assert rel_err(op.to_dense(), ref.to_dense()) <= 0.1
        return
    assert rel_err(op.to_dense(), ref.to_dense()) <= 1e-10


def test_vocab_chunk_equals_unchunked_ggn():
    (loss_fn, model_fn, params, head), batch = model_case("transformer", "float64")
    ref = reference("ggn", "transformer")
    # chunks that divide the 6 tokens, leave a ragged last chunk, and exceed them
    for chunk, lin in ((4, True), (1, False), (100, True)):
        Gc = gj.ggn(model_fn, head, params, batch, vocab_chunk=chunk, linearize=lin)
        products_match(Gc, ref, params, 1e-10)


def test_heads_match_autodiff_and_soft_targets():
    key = jax.random.key(5)
    logits = jax.random.normal(key, (3, 4, 6), jnp.float64)
    labels = jax.random.randint(key, (3, 4), 0, 6)
    mask = jnp.array([[1, 1, 0, 1], [1, 0, 0, 0], [1, 1, 1, 1]], jnp.float64)
    u = jax.random.normal(jax.random.key(6), logits.shape, jnp.float64)
    for batch, head in (
        ({"labels": labels, "mask": mask}, gj.heads.softmax_cross_entropy("labels", "mask")),
        ({"labels": jax.nn.one_hot(labels, 6) * 0.7 + 0.05}, gj.heads.softmax_cross_entropy()),
        ({"targets": logits[::-1] * 0.5}, gj.heads.mse()),
    ):
        auto = jax.jvp(jax.grad(lambda o: head(o, batch)), (logits,), (u,))[1]
        assert rel_err(head.hvp(logits, batch, u), auto) <= 1e-12
    # integer labels and one-hot targets give the same loss
    onehot = {"labels": jax.nn.one_hot(labels, 6)}
    ce = gj.heads.softmax_cross_entropy()
    assert abs(ce(logits, {"labels": labels}) - ce(logits, onehot)) <= 1e-12
    import optax

    ref = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    assert abs(ce(logits, {"labels": labels}) - ref) <= 1e-12


def test_user_head_without_hvp_falls_back_to_autodiff():
    (loss_fn, model_fn, params, head), batch = model_case("mlp", "float64")

    def my_head(outputs, batch):  # plain callable: no .hvp
        return head(outputs, batch)

    G1 = gj.ggn(model_fn, my_head, params, batch).to_dense()
    G2 = gj.ggn(model_fn, head, params, batch).to_dense()
    assert rel_err(G1, G2) <= 1e-12


def test_nnx_and_linen_models_give_the_same_matvecs():
    from flax import nnx

    from gradience_jax.models import MLP, LinenMLP, from_linen, from_nnx, nnx_mlp_to_linen

    sizes = [4, 5, 3]
    model = MLP(sizes, activation=jnp.tanh, param_dtype=jnp.float64, rngs=nnx.Rngs(3))
    head = gj.heads.softmax_cross_entropy()
    a = from_nnx(model, head)
    variables = nnx_mlp_to_linen(a.params)
    b = from_linen(LinenMLP(sizes, activation=jnp.tanh, param_dtype=jnp.float64), variables, head)
    _, batch = model_case("mlp", "float64")
    assert abs(a.loss_fn(a.params, batch) - b.loss_fn(b.params, batch)) <= 1e-12
    # map an NNX-layout vector to the Linen layout and compare the products leaf by leaf
    v = gj.tree.random_like(jax.random.key(0), a.params)
    v_linen = nnx_mlp_to_linen(v)["params"]
    for make in ("hessian", "ggn", "ef_streaming"):
        out_a = nnx_mlp_to_linen(build(make, a, batch, True) @ v)["params"]
        out_b = build(make, b, batch, True) @ v_linen
        assert rel_err(gj.tree.ravel(out_a), gj.tree.ravel(out_b)) <= 1e-10


def test_operator_compiles_once_for_new_params():
    (loss_fn, model_fn, params, head), batch = model_case("mlp", "float64")
    H = gj.hessian(loss_fn, params, batch, linearize=False)
    v = gj.tree.random_like(jax.random.key(0), params)
    _ = H @ v
    from gradience_jax.operators.base import apply

    before = apply._cache_size()
    params2 = jax.tree_util.tree_map(lambda x: x * 1.1, params)
    H2 = gj.hessian(loss_fn, params2, batch, linearize=False)
    out2 = H2 @ v
    assert apply._cache_size() == before
    assert rel_err(gj.tree.ravel(out2), dense_hessian(loss_fn, params2, batch)
                   @ np.asarray(gj.tree.ravel(v))) <= 1e-10


def test_to_dense_refuses_large_operators():
    (loss_fn, _, params, _), batch = model_case("mlp", "float64")
    H = gj.hessian(loss_fn, params, batch)
    with pytest.raises(ValueError, match="max_params"):
        H.to_dense(max_params=10)


# -- bad input: one test each ------------------------------------------------------------


def _seed():
    return model_case("seed", "float64")


def test_mismatched_vector_structure_names_the_leaf():
    (loss_fn, _, params, _), batch = _seed()
    H = gj.hessian(loss_fn, params, batch)
    v = gj.tree.random_like(jax.random.key(0), params)
    bad = {"not": "params"}
    with pytest.raises(ValueError, match="structure"):
        H @ bad
    leaves, treedef = jax.tree_util.tree_flatten(v)
    wrong_shape = jax.tree_util.tree_unflatten(treedef, [jnp.zeros((7,))] + leaves[1:])
    with pytest.raises(ValueError, match="shape"):
        H @ wrong_shape
    wrong_dtype = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), v)
    with pytest.raises(TypeError, match="dtype"):
        H @ wrong_dtype


def test_non_scalar_loss_raises():
    (_, model_fn, params, _), batch = _seed()
    with pytest.raises(ValueError, match="scalar"):
        gj.hessian(lambda p, b: model_fn(p, b), params, batch)


def test_non_finite_loss_or_gradient_raises():
    (loss_fn, _, params, _), batch = _seed()
    bad = dict(batch, inputs=batch["inputs"].at[0, 0].set(jnp.nan))
    with pytest.raises(FloatingPointError, match="not finite"):
        gj.hessian(loss_fn, params, bad)
    with pytest.raises(FloatingPointError, match="gradient"):
        gj.hessian(lambda p, b: jnp.sqrt(jnp.abs(gj.tree.ravel(p)[0]) * 0.0), params, batch)


def test_inconsistent_batch_axes_raise():
    (loss_fn, _, params, _), batch = _seed()
    bad = dict(batch, targets=batch["targets"][:-1])
    with pytest.raises(ValueError, match="inconsistent leading"):
        gj.hessian(loss_fn, params, bad)


def test_integer_params_raise_naming_the_leaf():
    (loss_fn, _, params, _), batch = _seed()
    leaves, treedef = jax.tree_util.tree_flatten(params)
    bad = jax.tree_util.tree_unflatten(treedef, [leaves[0].astype(jnp.int32)] + leaves[1:])
    with pytest.raises(TypeError, match=gj.tree.leaf_paths(params)[0]):
        gj.hessian(loss_fn, bad, batch)


def test_bad_options_raise():
    (loss_fn, model_fn, params, head), batch = _seed()
    with pytest.raises(ValueError, match="mode"):
        gj.empirical_fisher(loss_fn, params, batch, mode="fast")
    with pytest.raises(ValueError, match="linearize"):
        gj.hessian(loss_fn, params, batch, linearize="yes")
    with pytest.raises(ValueError, match="likelihood"):
        gj.mc_fisher(model_fn, params, batch, jax.random.key(0), likelihood="poisson")
    with pytest.raises(ValueError, match="SplitModel"):
        gj.ggn(model_fn, head, params, batch, vocab_chunk=4)
    with pytest.raises(ValueError, match="labels"):
        gj.ggn(model_fn, gj.heads.softmax_cross_entropy("labels"), params, batch)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 4])
def test_per_example_grads_chunked_equal_single_example_gradients(chunk_size):
    # reference: jax.grad of the loss on each example alone (a Python loop); chunk 3 leaves a
    # remainder, chunk 4 divides the batch
    adapted, batch = model_case("mlp")
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    out = gj.per_example_grads(adapted.loss_fn, adapted.params, batch, chunk_size=chunk_size)
    grad = jax.jit(jax.grad(adapted.loss_fn))
    for i in range(n):
        ex = jax.tree_util.tree_map(lambda x: x[i : i + 1], batch)
        ref = grad(adapted.params, ex)
        got = jax.tree_util.tree_map(lambda x: x[i], out)
        assert rel_err(ravel_pytree(got)[0], ravel_pytree(ref)[0]) <= 1e-12
