"""Every operator's matvec against its dense reference, on every small model.

The reference is dense float64 (x64 on, the default of the suite) or dense float32 ``jax``
(``GRADIENCE_X64=0``: the float32 case of each model); tolerances come from the precision
(``helpers.tol``). The per-constructor checks (symmetry, PSD, dtypes, compile once, operator algebra,
params_filter, dataset_operator of the Hessian) live in ``test_registry.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    FLOAT,
    MODELS,
    X64,
    dense_empirical_fisher,
    dense_ggn,
    dense_hessian,
    dense_jacobian,
    dense_mc_fisher,
    model_case,
    rel_err,
    strict_dtype_promotion,
    tol,
)
from jax.flatten_util import ravel_pytree

import gradience_jax as gj

strict_promotion = pytest.fixture(autouse=True, scope="module")(strict_dtype_promotion)

OPERATORS = ["hessian", "ggn", "ef_cached", "ef_streaming"]

#: the precision of the reference cases: float64 with x64, else float32
DT = "float64" if X64 else "float32"
#: relative error of a product against the dense reference in this precision
TOL = tol(1e-10, 1e-4)


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
    (loss_fn, model_fn, params, head), batch = model_case(model, DT)
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
def test_matvec_matches_dense_reference(kind, model):
    adapted, batch = model_case(model, DT)
    ref = reference(kind, model)
    for linearize in (True, False):
        op = build(kind, adapted, batch, linearize)
        products_match(op, ref, adapted.params, TOL)
    if model == "seed":  # the whole matrix, through to_dense, on the smallest model
        assert rel_err(op.to_dense(), ref) <= TOL


@pytest.mark.parametrize("model", ["mlp", "transformer"])
@pytest.mark.parametrize("kind", OPERATORS)
def test_matvec_float32_within_1e_4(kind, model):
    adapted, batch = model_case(model, "float32")
    op = build(kind, adapted, batch, "auto")
    v = gj.tree.random_like(jax.random.key(1), adapted.params)
    out = op @ v
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(out))
    # the float64 case holds the same weights and batch upcast (see helpers.model_case);
    # with x64 off the reference is the float32 dense matrix of the same case
    ref = reference(kind, model)
    expected = ref @ np.asarray(gj.tree.ravel(v), np.float64)
    assert rel_err(gj.tree.ravel(out), expected) <= 1e-4


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_ggn_of_softmax_ce_is_true_fisher(model):
    """GGN = E_{y ~ p(y|x)}[g g^T] computed exactly by summing over every class."""
    (loss_fn, model_fn, params, head), batch = model_case(model, DT)
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
    products_match(gj.ggn(model_fn, head, params, batch), fisher, params, TOL)


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_mc_fisher_matches_its_samples_and_the_fisher_in_expectation(model):
    (loss_fn, model_fn, params, head), batch = model_case(model, DT)
    key = jax.random.key(7)
    mhead = gj.heads.softmax_cross_entropy(None, mask_key=head.mask_key)
    M = gj.mc_fisher(model_fn, params, batch, key, num_samples=3, head=mhead)
    # exact reference for the same draws: J^T (sum_s g_s g_s^T / (S Z)) J
    ref = dense_mc_fisher(model_fn, mhead, params, batch, key, 3)
    products_match(M, ref, params, TOL)
    # many samples: the MC Fisher approaches the GGN (= Fisher for softmax CE)
    big = gj.mc_fisher(model_fn, params, batch, key, num_samples=4000, head=mhead)
    products_match(big, reference("ggn", model), params, 0.1)


def test_mc_fisher_gaussian_matches_mse_ggn_in_expectation():
    (loss_fn, model_fn, params, head), batch = model_case("seed", DT)
    big = gj.mc_fisher(model_fn, params, batch, jax.random.key(0), likelihood="gaussian",
                       num_samples=20000)
    G = gj.ggn(model_fn, head, params, batch).to_dense()
    assert rel_err(big.to_dense(), G) <= 0.05


def test_params_filter_selecting_nothing_raises():
    (loss_fn, _, params, _), batch = model_case("seed", DT)
    H = gj.hessian(loss_fn, params, batch)
    with pytest.raises(ValueError, match="selected no parameters"):
        gj.params_filter(H, lambda path, leaf: False)


@pytest.mark.parametrize("make", ["ggn", "ef", "mc"])  # hessian: test_registry.py
def test_dataset_operator_equals_concatenated_batch(make):
    (loss_fn, model_fn, params, head), _ = model_case("mlp", DT)
    full = gj.data.classification(jax.random.key(11), n=10, dim=4, num_classes=3)
    full["inputs"] = full["inputs"].astype(FLOAT)
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
    assert rel_err(op.to_dense(), ref.to_dense()) <= TOL


def test_vocab_chunk_equals_unchunked_ggn():
    (loss_fn, model_fn, params, head), batch = model_case("transformer", DT)
    ref = reference("ggn", "transformer")
    # chunks that divide the 6 tokens, leave a ragged last chunk, and exceed them
    for chunk, lin in ((4, True), (1, False), (100, True)):
        Gc = gj.ggn(model_fn, head, params, batch, vocab_chunk=chunk, linearize=lin)
        products_match(Gc, ref, params, TOL)


def test_heads_match_autodiff_and_soft_targets():
    key = jax.random.key(5)
    logits = jax.random.normal(key, (3, 4, 6), FLOAT)
    labels = jax.random.randint(key, (3, 4), 0, 6)
    mask = jnp.array([[1, 1, 0, 1], [1, 0, 0, 0], [1, 1, 1, 1]], FLOAT)
    u = jax.random.normal(jax.random.key(6), logits.shape, FLOAT)
    exact = tol(1e-12, 1e-6)  # two evaluations of the same quantity
    for batch, head in (
        ({"labels": labels, "mask": mask}, gj.heads.softmax_cross_entropy("labels", "mask")),
        ({"labels": jax.nn.one_hot(labels, 6) * 0.7 + 0.05}, gj.heads.softmax_cross_entropy()),
        ({"targets": logits[::-1] * 0.5}, gj.heads.mse()),
    ):
        auto = jax.jvp(jax.grad(lambda o: head(o, batch)), (logits,), (u,))[1]
        assert rel_err(head.hvp(logits, batch, u), auto) <= exact
    # integer labels and one-hot targets give the same loss
    onehot = {"labels": jax.nn.one_hot(labels, 6, dtype=FLOAT)}
    ce = gj.heads.softmax_cross_entropy()
    assert abs(ce(logits, {"labels": labels}) - ce(logits, onehot)) <= exact
    import optax

    ref = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    assert abs(ce(logits, {"labels": labels}) - ref) <= exact


def test_user_head_without_hvp_falls_back_to_autodiff():
    (loss_fn, model_fn, params, head), batch = model_case("mlp", DT)

    def my_head(outputs, batch):  # plain callable: no .hvp
        return head(outputs, batch)

    G1 = gj.ggn(model_fn, my_head, params, batch).to_dense()
    G2 = gj.ggn(model_fn, head, params, batch).to_dense()
    assert rel_err(G1, G2) <= tol(1e-12, 1e-5)


def test_nnx_and_linen_models_give_the_same_matvecs():
    from flax import nnx

    from gradience_jax.models import MLP, LinenMLP, from_linen, from_nnx, nnx_mlp_to_linen

    sizes = [4, 5, 3]
    model = MLP(sizes, activation=jnp.tanh, param_dtype=FLOAT, rngs=nnx.Rngs(3))
    head = gj.heads.softmax_cross_entropy()
    a = from_nnx(model, head)
    variables = nnx_mlp_to_linen(a.params)
    b = from_linen(LinenMLP(sizes, activation=jnp.tanh, param_dtype=FLOAT), variables, head)
    _, batch = model_case("mlp", DT)
    assert abs(a.loss_fn(a.params, batch) - b.loss_fn(b.params, batch)) <= tol(1e-12, 1e-6)
    # map an NNX-layout vector to the Linen layout and compare the products leaf by leaf
    v = gj.tree.random_like(jax.random.key(0), a.params)
    v_linen = nnx_mlp_to_linen(v)["params"]
    for make in ("hessian", "ggn", "ef_streaming"):
        out_a = nnx_mlp_to_linen(build(make, a, batch, True) @ v)["params"]
        out_b = build(make, b, batch, True) @ v_linen
        assert rel_err(gj.tree.ravel(out_a), gj.tree.ravel(out_b)) <= TOL


def test_operator_compiles_once_for_new_params():
    (loss_fn, model_fn, params, head), batch = model_case("mlp", DT)
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
                   @ np.asarray(gj.tree.ravel(v), np.float64)) <= TOL


def test_to_dense_refuses_large_operators():
    (loss_fn, _, params, _), batch = model_case("mlp", DT)
    H = gj.hessian(loss_fn, params, batch)
    with pytest.raises(ValueError, match="max_params"):
        H.to_dense(max_params=10)


# -- bad input: one test each ------------------------------------------------------------


def _seed():
    return model_case("seed", DT)


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
    wrong_dtype = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), v)
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
    adapted, batch = model_case("mlp", DT)
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    out = gj.per_example_grads(adapted.loss_fn, adapted.params, batch, chunk_size=chunk_size)
    grad = jax.jit(jax.grad(adapted.loss_fn))
    for i in range(n):
        ex = jax.tree_util.tree_map(lambda x: x[i : i + 1], batch)
        ref = grad(adapted.params, ex)
        got = jax.tree_util.tree_map(lambda x: x[i], out)
        assert rel_err(ravel_pytree(got)[0], ravel_pytree(ref)[0]) <= tol(1e-12, 1e-5)


# -- labels, keys and counts at the boundary ------------------------------------------------


def _labelled(labels, mask=None):
    """The mlp case (3 classes, 6 examples) with ``labels`` (and an optional mask)."""
    adapted, batch = model_case("mlp", DT)
    batch = dict(batch, labels=jnp.asarray(labels, jnp.int32))
    if mask is None:
        return adapted, batch
    head = gj.heads.softmax_cross_entropy("labels", mask_key="mask")
    adapted = adapted._replace(loss_fn=gj.operators.heads.compose(adapted.model_fn, head),
                               head=head)
    return adapted, dict(batch, mask=jnp.asarray(mask, FLOAT))


@pytest.mark.parametrize("bad", [-1, 3, 100])
@pytest.mark.parametrize("make", ["hessian", "ggn", "ef", "kfac", "ggn_chunked"])
def test_out_of_range_labels_raise_naming_the_batch_field(make, bad):
    labels = [0, 1, 2, bad, 1, 0]
    if make == "ggn_chunked":
        (_, model_fn, params, head), batch = model_case("transformer", DT)
        bad = bad if bad < 0 else bad + 2  # 5 classes here
        batch = dict(batch, labels=batch["labels"].at[1, 2].set(bad))  # a weighted token
        with pytest.raises(ValueError, match=rf"batch\['labels'\] must lie in \[0, 5\).*\[{bad}\]"):
            gj.ggn(model_fn, head, params, batch, vocab_chunk=2)
        return
    (loss_fn, model_fn, params, head), batch = _labelled(labels)
    call = {
        "hessian": lambda: gj.hessian(loss_fn, params, batch),
        "ggn": lambda: gj.ggn(model_fn, head, params, batch),
        "ef": lambda: gj.empirical_fisher(loss_fn, params, batch),
        "kfac": lambda: gj.kfac(model_fn, head, params, batch),
    }[make]
    with pytest.raises(ValueError, match=rf"batch\['labels'\] must lie in \[0, 3\).*\[{bad}\]"):
        call()


def test_padding_tokens_may_carry_any_label():
    """A zero-weight token's label is never read: -100 padding gives the loss without it."""
    (loss_fn, model_fn, params, head), batch = _labelled([0, 1, 2, -100, 1, 7],
                                                         mask=[1, 1, 1, 0, 1, 0])
    H = gj.hessian(loss_fn, params, batch)  # no error: the bad labels are masked out
    keep = np.array([0, 1, 2, 4])
    sub = jax.tree_util.tree_map(lambda x: x[keep], batch)
    plain = gj.heads.softmax_cross_entropy()
    ref_loss = plain(model_fn(params, sub), sub)
    assert abs(float(loss_fn(params, batch)) - float(ref_loss)) <= tol(1e-12, 1e-6)
    ref = dense_hessian(gj.operators.heads.compose(model_fn, plain), params, sub)
    products_match(H, ref, params, TOL)
    products_match(gj.ggn(model_fn, head, params, batch),
                   dense_ggn(model_fn, plain, params, sub), params, TOL)


def test_out_of_range_labels_under_jit_are_nan_not_the_last_class():
    """Traced labels cannot be checked on the host: the loss, its gradient and the head's
    Hessian products are NaN (label -1 used to score as the last class)."""
    (loss_fn, model_fn, params, head), batch = _labelled([0, 1, 2, 1, 1, 0])
    v = gj.tree.random_like(jax.random.key(0), params)

    @jax.jit
    def everything(labels):
        b = dict(batch, labels=labels)
        hv = gj.hessian(loss_fn, params, b, check=False) @ v
        gv = gj.ggn(model_fn, head, params, b, check=False) @ v
        return loss_fn(params, b), jax.grad(loss_fn)(params, b), hv, gv

    finite = lambda t: all(bool(np.all(np.isfinite(x))) for x in jax.tree_util.tree_leaves(t))  # noqa: E731
    assert finite(everything(batch["labels"]))
    for bad in (-1, 3):
        loss, grad, hv, gv = everything(batch["labels"].at[3].set(bad))
        assert np.isnan(loss) and not finite(grad) and not finite(hv) and not finite(gv)
    # the valid-label loss is the plain cross-entropy (optax), not changed by the check
    import optax

    logits = model_fn(params, batch)
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    assert abs(float(loss_fn(params, batch)) - float(ref)) <= tol(1e-12, 1e-6)


@pytest.mark.parametrize("key, exc, match", [
    (None, ValueError, "key is required"),
    (42, TypeError, "key must be a PRNG key, got the int 42"),
    (jax.random.split(jax.random.key(0), 3), ValueError, "single PRNG key"),
    (np.ones(2, np.float32), TypeError, "key must be a PRNG key"),
])
def test_mc_fisher_checks_its_key_when_built(key, exc, match):
    (_, model_fn, params, _), batch = _seed()
    with pytest.raises(exc, match=match):
        gj.mc_fisher(model_fn, params, batch, key, likelihood="gaussian")
    # a legacy raw key is one key
    gj.mc_fisher(model_fn, params, batch, jax.random.PRNGKey(0), likelihood="gaussian")


def test_counts_scalars_and_strings_are_checked():
    from gradience_jax._validate import ArgumentTypeError
    from gradience_jax.operators.base import scale

    (loss_fn, model_fn, params, head), batch = model_case("transformer", DT)
    H = gj.hessian(loss_fn, params, batch)
    cases = [
        (lambda: gj.ggn(model_fn, head, params, batch, vocab_chunk="4"), ArgumentTypeError,
         "vocab_chunk must be an integer"),
        (lambda: gj.ggn(model_fn, head, params, batch, vocab_chunk=-2), ValueError,
         "vocab_chunk must be >= 1, got -2"),
        (lambda: gj.per_example_grads(loss_fn, params, batch, chunk_size=-1), ValueError,
         "chunk_size must be >= 1, got -1"),
        (lambda: gj.mc_fisher(model_fn, params, batch, jax.random.key(0), num_samples=0),
         ValueError, "num_samples must be >= 1"),
        (lambda: gj.damped(H, "1e-3"), ArgumentTypeError, "lam must be a real number"),
        (lambda: gj.damped(H, float("nan")), ValueError, "lam must be finite"),
        (lambda: scale(H, float("nan")), ValueError, "alpha must be finite"),
        (lambda: float("inf") * H, ValueError, "alpha must be finite"),
        (lambda: H * jnp.ones(3), ArgumentTypeError, "alpha must be a real scalar"),
        (lambda: H + 1.0, ArgumentTypeError, "b must be a gradience_jax.LinearOperator"),
        (lambda: gj.damped(np.eye(3), 0.1), ArgumentTypeError, "op must be a gradience_jax"),
        (lambda: H.to_dense(max_params="10"), ArgumentTypeError, "max_params must be an int"),
        (lambda: gj.from_dense("abc"), ArgumentTypeError, "matrix must be a floating-point"),
        (lambda: gj.from_dense(np.full((2, 2), np.nan)), ValueError, "matrix must be finite"),
        (lambda: gj.empirical_fisher(loss_fn, params, batch, mode=3), ValueError,
         "mode must be one of"),
        (lambda: gj.hessian("loss", params, batch), ArgumentTypeError, "loss_fn must be a call"),
        (lambda: gj.dataset_operator(gj.hessian, loss_fn, params, batch), ArgumentTypeError,
         r"batches must be an iterable of batches.*\[batch\]"),
        (lambda: gj.dataset_operator(gj.mc_fisher, model_fn, params, [batch], key=42),
         TypeError, "key must be a PRNG key"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()
    # traced scalars are operands, taken as they are (no host check inside jit)
    v = gj.tree.random_like(jax.random.key(0), params)
    out = jax.jit(lambda lam: gj.damped(H, lam) @ v)(jnp.asarray(0.5, FLOAT))
    ref = gj.tree.axpy(0.5, v, H @ v)
    assert rel_err(gj.tree.ravel(out), gj.tree.ravel(ref)) <= TOL


def test_adapter_errors_name_the_argument():
    from flax import nnx

    from gradience_jax._validate import ArgumentTypeError
    from gradience_jax.models import MLP, LinenMLP, from_linen, from_nnx

    head = gj.heads.softmax_cross_entropy()
    with pytest.raises(ArgumentTypeError, match="model must be an nnx.Module.*from_linen"):
        from_nnx(LinenMLP([4, 3]), head)
    model = MLP([4, 3], rngs=nnx.Rngs(0))
    with pytest.raises(ArgumentTypeError, match="head must be a callable"):
        from_nnx(model, "ce")
    with pytest.raises(ArgumentTypeError, match="variables must be the mapping"):
        from_linen(LinenMLP([4, 3]), [1, 2], head)
    with pytest.raises(ValueError, match="sizes\\[1\\] must be >= 1, got 0"):
        MLP([4, 0, 3], rngs=nnx.Rngs(0))
    adapted = from_nnx(model, head)
    batch = {"x": jnp.ones((2, 4)), "labels": jnp.array([0, 1])}
    with pytest.raises(ValueError, match=r"batch\['inputs'\] \(input_key\).*\['labels', 'x'\]"):
        gj.hessian(adapted.loss_fn, adapted.params, batch)
    with pytest.raises(ValueError, match="missing leaves"):
        adapted.with_params({"w": jnp.ones(3)})


# -- adapters: compiled programs survive parameter updates ---------------------------------


class _CompileCounter:
    """Counts XLA backend compilations (``jax.monitoring``) while active."""

    def __init__(self):
        self.count = 0

    def _listen(self, event, duration, **kwargs):
        if "backend_compile" in event:
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


def _analyse(adapted, batch):
    """A Hessian and a GGN product and a Lanczos eigsh at the adapter's params."""
    H = gj.hessian(adapted.loss_fn, adapted.params, batch)
    v = gj.tree.random_like(jax.random.key(0), adapted.params)
    hv = H @ v
    gv = gj.ggn(adapted.model_fn, adapted.head, adapted.params, batch) @ v
    return hv, gv, gj.eigsh(H, k=2)


@pytest.mark.parametrize("framework", ["nnx", "linen"])
def test_adapting_again_after_optimizer_updates_compiles_nothing_new(framework):
    """``from_nnx(model)`` / ``from_linen(module, variables)`` called again after each of
    three optax updates: equal ``loss_fn`` / ``model_fn``, so the rounds after the first
    compile nothing; the results are those at the new params."""
    import optax
    from flax import nnx

    from gradience_jax.models import MLP, LinenMLP, from_linen, from_nnx

    head = gj.heads.softmax_cross_entropy()
    batch = gj.data.classification(jax.random.key(1), n=8, dim=4, num_classes=3)
    batch["inputs"] = batch["inputs"].astype(FLOAT)
    tx = optax.sgd(0.5, momentum=0.9)
    if framework == "nnx":
        model = MLP([4, 5, 3], activation=jnp.tanh, param_dtype=FLOAT, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

        @nnx.jit
        def update(model, optimizer):
            grads = nnx.grad(lambda m: head(m(batch["inputs"]), batch))(model)
            optimizer.update(model, grads)

        def adapt():
            update(model, optimizer)
            return from_nnx(model, head)
    else:
        module = LinenMLP([4, 5, 3], activation=jnp.tanh, param_dtype=FLOAT)
        state = {"params": module.init(jax.random.key(0), batch["inputs"])["params"]}
        state["opt"] = tx.init(state["params"])

        @jax.jit
        def update(params, opt_state):
            grads = jax.grad(lambda p: head(module.apply({"params": p}, batch["inputs"]),
                                            batch))(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        def adapt():
            state["params"], state["opt"] = update(state["params"], state["opt"])
            # a new, equal module object each round, as a training script would write it
            fresh = LinenMLP([4, 5, 3], activation=jnp.tanh, param_dtype=FLOAT)
            return from_linen(fresh, {"params": state["params"]}, head)

    first = adapt()
    _analyse(first, batch)  # the first round compiles
    rounds = []
    with _CompileCounter() as compiles:
        for _ in range(3):
            adapted = adapt()
            rounds.append((adapted, _analyse(adapted, batch)))
    assert compiles.count == 0
    v = gj.tree.random_like(jax.random.key(0), first.params)
    tops = []
    for adapted, (hv, gv, res) in rounds:
        assert adapted.loss_fn == first.loss_fn and hash(adapted.loss_fn) == hash(first.loss_fn)
        ref = dense_hessian(adapted.loss_fn, adapted.params, batch)
        want = ref @ np.asarray(gj.tree.ravel(v), np.float64)
        assert rel_err(gj.tree.ravel(hv), want) <= TOL
        g_ref = dense_ggn(adapted.model_fn, head, adapted.params, batch)
        assert rel_err(gj.tree.ravel(gv), g_ref @ np.asarray(gj.tree.ravel(v), np.float64)) <= TOL
        np.testing.assert_allclose(res.eigenvalues[0], np.linalg.eigvalsh(ref)[-1],
                                   rtol=tol(1e-8, 1e-4))
        tops.append(float(res.eigenvalues[0]))
    assert len(set(tops)) == 3  # the params really changed


def test_with_params_reuses_the_programs():
    from flax import nnx

    from gradience_jax.models import MLP, from_nnx

    _, batch = model_case("mlp", DT)
    model = MLP([4, 5, 3], activation=jnp.tanh, param_dtype=FLOAT, rngs=nnx.Rngs(5))
    adapted = from_nnx(model, gj.heads.softmax_cross_entropy())
    _analyse(adapted, batch)
    moved = adapted.with_params(jax.tree_util.tree_map(lambda x: 1.1 * x, adapted.params))
    with _CompileCounter() as compiles:
        hv, _, _ = _analyse(moved, batch)
    assert compiles.count == 0
    ref = dense_hessian(moved.loss_fn, moved.params, batch)
    v = gj.tree.random_like(jax.random.key(0), moved.params)
    assert rel_err(gj.tree.ravel(hv), ref @ np.asarray(gj.tree.ravel(v), np.float64)) <= TOL


def test_from_nnx_params_are_a_snapshot_not_the_live_model():
    """An optimizer update changes the model, not the params an adapter already handed out
    (``nnx.split`` alone returns the model's own mutable Variables)."""
    import optax
    from flax import nnx

    from gradience_jax.models import MLP, from_nnx

    head = gj.heads.softmax_cross_entropy()
    model = MLP([4, 3], param_dtype=FLOAT, rngs=nnx.Rngs(0))
    adapted = from_nnx(model, head)
    before = [np.array(x) for x in jax.tree_util.tree_leaves(adapted.params)]
    optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)
    grads = jax.tree_util.tree_map(jnp.ones_like, nnx.state(model, nnx.Param))
    optimizer.update(model, grads)
    after = [np.asarray(x) for x in jax.tree_util.tree_leaves(adapted.params)]
    live = [np.asarray(x) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))]
    for b, a, m in zip(before, after, live):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(m, b - 1.0, rtol=1e-6)
