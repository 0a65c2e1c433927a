"""Agreement with PyTorch and its curvature libraries on identical weights and batches.

Needs the ``[torch]`` extra (torch, curvlinops, BackPACK, PyHessian, hessian-eigenthings);
skips cleanly without torch, and each peer comparison skips when that peer is missing.
Everything here is float32 (both frameworks), so tolerances are float32 ones:
products <= 1e-4 relative, the loss <= 1e-5 relative.
"""

from __future__ import annotations

import functools
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch threads: no spin-waiting on busy CPUs

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

import gradience_jax as gj  # noqa: E402
from gradience_jax import torch_bridge as tb  # noqa: E402
from gradience_jax.models import CNN, MLP, TinyTransformerLM, from_nnx  # noqa: E402

pytestmark = [
    pytest.mark.torch,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]
torch.set_num_threads(2)

PRODUCT_RTOL = 1e-4
LOSS_RTOL = 1e-5
MODELS = ("mlp", "cnn", "transformer")


def _eigsh():
    return getattr(gj, "eigsh", None) or __import__("gradience_jax.spectrum").spectrum.eigsh


def _hutchinson():
    return (getattr(gj, "hutchinson_trace", None)
            or __import__("gradience_jax.estimators").estimators.hutchinson_trace)


@functools.cache
def case(name: str):
    """``(adapted, batch, TorchModel)``: tiny float32 models, identical weights."""
    head = gj.heads.softmax_cross_entropy()
    if name == "mlp":
        model = MLP([6, 10, 3], activation=jnp.tanh, rngs=nnx.Rngs(0))
        batch = gj.data.classification(jax.random.key(1), n=16, dim=6, num_classes=3)
    elif name == "cnn":
        model = CNN(in_channels=2, channels=(3,), image_size=4, num_classes=3, rngs=nnx.Rngs(0))
        batch = gj.data.images(jax.random.key(2), n=5, size=4, channels=2, num_classes=3)
    else:
        model = TinyTransformerLM(vocab_size=7, d_model=8, num_heads=2, num_layers=1, d_ff=16,
                                  max_len=6, rngs=nnx.Rngs(0))
        batch = gj.data.token_sequences(jax.random.key(3), n=3, seq_len=5, vocab_size=7)
    adapted = from_nnx(model, head)
    return adapted, batch, tb.to_torch(model, adapted.params)


def assert_close(ours, theirs_torch, tm, what: str, rtol: float = PRODUCT_RTOL, batched=False):
    """``ours`` (Flax layout) vs PyTorch tensors; fails with the worst leaf and difference."""
    theirs = tm.from_torch(theirs_torch, batched=batched)
    rel, leaf, diff = tb.compare_trees(ours, theirs)
    assert rel <= rtol, f"{what}: relative error {rel:.2e} > {rtol:g}; worst leaf '{leaf}' " \
                        f"(max |difference| {diff:.2e})"


def _vector(adapted):
    return gj.tree.random_like(jax.random.key(7), adapted.params)


# -- weight transfer ---------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_transfer_gives_identical_function(name):
    adapted, batch, tm = case(name)
    tm.check_weights(adapted.params)  # exact copy
    ours = float(jax.jit(adapted.loss_fn)(adapted.params, batch))
    with torch.no_grad():
        theirs = float(tm.loss(batch, adapted.head))
    assert abs(ours - theirs) <= LOSS_RTOL * abs(ours), (ours, theirs)
    logits = np.asarray(jax.jit(adapted.model_fn)(adapted.params, batch))
    logits = logits.reshape(-1, logits.shape[-1])
    with torch.no_grad():
        logits_t = tm.module(tm.inputs(batch)).numpy()
    np.testing.assert_allclose(logits_t.reshape(logits.shape), logits, rtol=1e-5, atol=1e-5)
    # vectors round-trip through the layout maps exactly
    v = _vector(adapted)
    rel, _, _ = tb.compare_trees(tm.from_torch(tm.to_torch(v)), v)
    assert rel == 0.0


def test_mismatched_weights_fail_loudly():
    adapted, batch, tm = case("cnn")
    model = CNN(in_channels=2, channels=(3,), image_size=4, num_classes=3, rngs=nnx.Rngs(0))
    tm2 = tb.to_torch(model, adapted.params)  # a second copy, then corrupt one weight
    with torch.no_grad():
        tm2.parameters[0][0, 0, 1, 1] += 0.25  # PyTorch conv weight = Flax convs/0/kernel
    with pytest.raises(AssertionError) as info:
        tm2.check_weights(adapted.params)
    msg = str(info.value)
    assert "convs/0/kernel" in msg and "2.500e-01" in msg, msg
    # a product computed on the corrupted copy is caught with its leaf and difference
    v = _vector(adapted)
    hv = gj.hessian(adapted.loss_fn, adapted.params, batch) @ v
    with pytest.raises(AssertionError, match="worst leaf"):
        assert_close(hv, tm2.products(batch).hvp_double_backprop(tm2.to_torch(v)), tm2, "HVP")
    with pytest.raises(ValueError, match="missing leaves"):
        tm.to_torch({"w": jnp.zeros(3)})


# -- products ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_hvp_matches_torch(name):
    adapted, batch, tm = case(name)
    v = _vector(adapted)
    ours = gj.hessian(adapted.loss_fn, adapted.params, batch) @ v
    prods = tm.products(batch, adapted.head)
    vt = tm.to_torch(v)
    assert_close(ours, prods.hvp_double_backprop(vt), tm, "HVP vs double backprop")
    assert_close(ours, prods.hvp_func(vt), tm, "HVP vs torch.func jvp(grad)")
    curvlinops = pytest.importorskip("curvlinops")
    x, y = tm.batch(batch)
    op = curvlinops.HessianLinearOperator(tm.module, tm.criterion(), tm.parameters, [(x, y)],
                                          check_deterministic=False)
    theirs = op @ vt
    if name == "transformer":
        # curvlinops forms HVPs as torch.func.jvp(jacrev(loss)); in torch 2.13 that
        # composition gets the LayerNorm-scale rows wrong (torch.func.jvp(grad(loss)) and
        # double backprop agree with us above), so those rows are compared separately.
        ln = [i for i, m in enumerate(tm.leaves) if m.flax_path.endswith("/scale")]
        keep = lambda tree: [x if i not in ln else 0 * x for i, x in enumerate(tree)]  # noqa: E731
        assert_close(tm.from_torch(keep(tm.to_torch(ours))), keep(theirs), tm,
                     "HVP vs curvlinops (LayerNorm scales excluded)")
        return
    assert_close(ours, theirs, tm, "HVP vs curvlinops")


@pytest.mark.parametrize("name", MODELS)
def test_ggn_matches_torch(name):
    adapted, batch, tm = case(name)
    v = _vector(adapted)
    ours = gj.ggn(adapted.model_fn, adapted.head, adapted.params, batch) @ v
    prods = tm.products(batch, adapted.head)
    vt = tm.to_torch(v)
    assert_close(ours, prods.ggn_func(vt), tm, "GGN-vp vs torch.func")
    x, y = tm.batch(batch)
    try:
        from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist
    except ImportError:
        pass
    else:
        out = tm.module(x)
        loss = tm.criterion()(out, y)
        assert_close(ours, ggn_vector_product_from_plist(loss, out, tm.parameters, vt), tm,
                     "GGN-vp vs BackPACK hessianfree")
    curvlinops = pytest.importorskip("curvlinops")
    op = curvlinops.GGNLinearOperator(tm.module, tm.criterion(), tm.parameters, [(x, y)],
                                      check_deterministic=False)
    assert_close(ours, op @ vt, tm, "GGN-vp vs curvlinops")


@pytest.mark.parametrize("name", MODELS)
def test_per_example_grads_and_ef_match_torch(name):
    adapted, batch, tm = case(name)
    ours = gj.per_example_grads(adapted.loss_fn, adapted.params, batch)
    prods = tm.products(batch, adapted.head)
    theirs = prods.per_example_func()
    assert_close(ours, theirs, tm, "per-example grads vs torch.func vmap(grad)", batched=True)
    assert_close(ours, prods.per_example_loop(), tm, "per-example grads vs loop", batched=True)
    v = _vector(adapted)
    vt = tm.to_torch(v)
    ef = gj.empirical_fisher(adapted.loss_fn, adapted.params, batch, mode="streaming") @ v
    assert_close(ef, prods.ef_func(vt, theirs), tm, "EF-vp vs torch.func")
    if name == "transformer":
        return  # curvlinops' / BackPACK's EF and per-sample gradients are per token for (B*T, V)
    x, y = tm.batch(batch)
    curvlinops = pytest.importorskip("curvlinops")
    op = curvlinops.EFLinearOperator(tm.module, tm.criterion(), tm.parameters, [(x, y)],
                                     check_deterministic=False)
    assert_close(ef, op @ vt, tm, "EF-vp vs curvlinops")
    backpack = pytest.importorskip("backpack")
    import copy

    from backpack.extensions import BatchGrad

    module = backpack.extend(copy.deepcopy(tm.module))
    crit = backpack.extend(tm.criterion())
    loss = crit(module(x), y)
    with backpack.backpack(BatchGrad()):
        loss.backward()
    grads = [p.grad_batch * prods.n for p in module.parameters()]  # BackPACK: grads of the mean
    assert_close(ours, grads, tm, "per-example grads vs BackPACK BatchGrad", batched=True)


# -- eigenvalues and traces -----------------------------------------------------------------


@functools.cache
def _dense_spectrum(name: str):
    adapted, batch, _ = case(name)
    h = gj.hessian(adapted.loss_fn, adapted.params, batch).to_dense()
    return np.linalg.eigvalsh(np.asarray(h, np.float64))


def test_top5_hessian_eigenvalues_match_peers():
    adapted, batch, tm = case("mlp")
    exact = _dense_spectrum("mlp")[::-1][:5]
    scale = abs(exact[0])
    H = gj.hessian(adapted.loss_fn, adapted.params, batch)
    ours = np.asarray(_eigsh()(H, k=5, which="LA", key=jax.random.key(0)).eigenvalues)
    ours = np.sort(ours)[::-1]
    # float32 products: agreement to ~1e-4 of the spectral norm
    np.testing.assert_allclose(ours, exact, atol=1e-4 * scale)
    x, y = tm.batch(batch)
    curvlinops = pytest.importorskip("curvlinops")
    import scipy.sparse.linalg as sla

    op = curvlinops.HessianLinearOperator(tm.module, tm.criterion(), tm.parameters, [(x, y)],
                                          check_deterministic=False).to_scipy(np.float32)
    theirs = np.sort(sla.eigsh(op, k=5, which="LA", tol=1e-6,
                               v0=np.ones(op.shape[0], np.float32))[0])[::-1]
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * scale,
                               err_msg="top-5 vs curvlinops + scipy eigsh")
    pyhessian = pytest.importorskip("pyhessian")
    torch.manual_seed(0)
    comp = pyhessian.hessian(tm.module, tm.criterion(), data=(x, y), cuda=False)
    top, _ = comp.eigenvalues(maxIter=1000, tol=1e-6, top_n=1)
    # PyHessian's power iteration finds the dominant (largest-magnitude) eigenvalue and
    # stops on a relative change < tol between iterations
    full = _dense_spectrum("mlp")  # our top-5 equal it (checked above)
    dominant = float(full[np.argmax(np.abs(full))])
    assert abs(top[0] - dominant) <= 1e-3 * abs(dominant), (top[0], dominant)


def test_hessian_trace_agrees_within_combined_stderr():
    adapted, batch, tm = case("mlp")
    exact = float(np.sum(_dense_spectrum("mlp")))
    H = gj.hessian(adapted.loss_fn, adapted.params, batch)
    t = _hutchinson()(H, jax.random.key(3), num_samples=200)
    est, se = float(t.estimate), float(t.stderr)
    assert abs(est - exact) <= 4 * se, (est, se, exact)
    pyhessian = pytest.importorskip("pyhessian")
    x, y = tm.batch(batch)
    torch.manual_seed(0)
    comp = pyhessian.hessian(tm.module, tm.criterion(), data=(x, y), cuda=False)
    # tol=-inf: all 200 probes (PyHessian stops once |mean - prev| / (prev + 1e-6) < tol,
    # which a negative running mean satisfies for any tol >= 0)
    samples = np.asarray(comp.trace(maxIter=200, tol=float("-inf")))
    p_est, p_se = samples.mean(), samples.std(ddof=1) / np.sqrt(len(samples))
    assert abs(est - p_est) <= 4 * np.hypot(se, p_se), (est, se, p_est, p_se)
    assert abs(p_est - exact) <= 4 * p_se
