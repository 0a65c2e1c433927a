"""Landscape: directions, slices, barriers, sharpness, rescaling (float64 references)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import dense_hessian, model_case
from jax.flatten_util import ravel_pytree

import gradience_jax as gj
from gradience_jax import landscape as gl
from gradience_jax.experiments import training
from gradience_jax.models import CNN, MLP, TinyTransformerLM, from_nnx

# -- a separable quadratic on a two-leaf pytree -------------------------------------------

A = {"u": jnp.array([1.0, 3.0, 0.5]), "v": jnp.array([[2.0, 0.25], [4.0, 1.5]])}
B = {"u": jnp.array([0.3, -0.2, 0.1]), "v": jnp.array([[0.0, 0.5], [-0.4, 0.2]])}
W = {"u": jnp.array([0.7, -1.2, 0.4]), "v": jnp.array([[-0.3, 0.9], [1.1, -0.6]])}
X0 = {"x": jnp.zeros((1,))}  # a dummy batch


def quad(params, batch):
    """``0.5 sum a w^2 + b . w + 0.1`` (separable, Hessian diag(a))."""
    del batch
    terms = jax.tree_util.tree_map(lambda a, b, w: jnp.sum(0.5 * a * w**2 + b * w), A, B, params)
    return sum(jax.tree_util.tree_leaves(terms)) + 0.1


def pure_quad(params, batch):
    """``0.5 sum a w^2`` (minimum 0 at the origin)."""
    del batch
    return sum(jnp.sum(0.5 * a * w**2) for a, w in zip(jax.tree_util.tree_leaves(A),
                                                        jax.tree_util.tree_leaves(params)))


# -- slices -------------------------------------------------------------------------------


def test_slice_at_origin_equals_loss():
    adapted, batch = model_case("mlp")
    d1 = gl.random_direction(jax.random.key(0), adapted.params)
    d2 = gl.random_direction(jax.random.key(1), adapted.params)
    grid = np.linspace(-1.0, 1.0, 5)
    s = gl.slice_2d(adapted.loss_fn, adapted.params, batch, d1, d2, grid, grid)
    s1 = gl.slice_1d(adapted.loss_fn, adapted.params, batch, d1, grid)
    loss = float(adapted.loss_fn(adapted.params, batch))
    assert s.loss.shape == (5, 5)
    np.testing.assert_allclose(s.loss[2, 2], loss, rtol=1e-12)
    np.testing.assert_allclose(s1.loss[2], loss, rtol=1e-12)
    np.testing.assert_allclose(s.loss[:, 2], s1.loss, rtol=1e-12)
    assert s.nonfinite_fraction == 0.0


def test_slice_1d_of_quadratic_is_closed_form_parabola():
    d = {"u": jnp.array([0.5, -1.0, 2.0]), "v": jnp.array([[1.0, 0.0], [-0.5, 0.3]])}
    ts = np.linspace(-2.0, 3.0, 11)
    s = gl.slice_1d(quad, W, X0, d, ts)
    f0 = float(quad(W, X0))
    g = jax.grad(quad)(W, X0)
    gd = float(gj.tree.vdot(g, d))
    dad = float(sum(jnp.sum(a * x**2) for a, x in zip(jax.tree_util.tree_leaves(A),
                                                        jax.tree_util.tree_leaves(d))))
    np.testing.assert_allclose(s.loss, f0 + ts * gd + 0.5 * ts**2 * dad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_vmapped_grid_equals_python_loop(chunk_size):
    adapted, batch = model_case("mlp")
    p = adapted.params
    d1 = gl.random_direction(jax.random.key(2), p)
    d2 = gl.random_direction(jax.random.key(3), p, mode="layer")
    g1, g2 = np.linspace(-0.5, 0.5, 3), np.linspace(-1.0, 1.0, 5)
    s = gl.slice_2d(adapted.loss_fn, p, batch, d1, d2, g1, g2, chunk_size=chunk_size,
                    metric_fn=gl.accuracy_metric(adapted.model_fn))
    loss = jax.jit(adapted.loss_fn)
    acc = gl.accuracy_metric(adapted.model_fn)
    for i, a in enumerate(g1):
        for j, b in enumerate(g2):
            q = jax.tree_util.tree_map(lambda w, x, y: w + a * x + b * y, p, d1, d2)
            np.testing.assert_allclose(s.loss[i, j], float(loss(q, batch)), rtol=1e-10)
            np.testing.assert_allclose(s.metric[i, j], float(acc(q, batch)), rtol=1e-12)
    assert np.all((s.metric >= 0) & (s.metric <= 1))


def test_nonfinite_part_of_the_grid_is_masked_and_reported():
    def log_loss(params, batch):
        del batch
        return jnp.sum(jnp.log(params["w"]))

    p = {"w": jnp.array([1.0, 2.0])}
    d = {"w": jnp.array([1.0, 0.0])}
    grid = np.linspace(-3.0, 1.0, 9)  # w0 = 1 + t <= 0 for t <= -1: 5 of 9 points
    with pytest.warns(RuntimeWarning, match="not finite"):
        s = gl.slice_1d(log_loss, p, X0, d, grid)
    assert s.nonfinite_fraction == pytest.approx(5 / 9)
    assert np.isnan(s.loss[:5]).all() and np.isfinite(s.loss[5:]).all()


def test_bad_input():
    adapted, batch = model_case("mlp")
    p = adapted.params
    d = gl.random_direction(jax.random.key(0), p)
    with pytest.raises(ValueError, match="d1|direction"):
        gl.slice_1d(adapted.loss_fn, p, batch, {"w": jnp.ones(3)}, [0.0, 1.0])
    with pytest.raises(ValueError, match="grid1"):
        gl.slice_1d(adapted.loss_fn, p, batch, d, [])
    with pytest.raises(ValueError, match="grid1"):
        gl.slice_1d(adapted.loss_fn, p, batch, d, [0.0, 1.0, 0.5])
    with pytest.raises(ValueError, match="grid2"):
        gl.slice_2d(adapted.loss_fn, p, batch, d, d, [0.0, 1.0], [[0.0, 1.0]])
    with pytest.raises(ValueError, match="grid1"):
        gl.slice_1d(adapted.loss_fn, p, batch, d, [0.0, np.nan])
    with pytest.raises(ValueError, match="mode"):
        gl.normalize_direction(d, p, mode="row")
    with pytest.raises(ValueError, match="params_b"):
        gl.interpolate(quad, W, {"u": W["u"]}, X0)


# -- directions ---------------------------------------------------------------------------


def _random_params(name):
    """Random params with a model's paths and shapes, without running its initialisers."""
    makers = {
        "mlp": lambda: MLP([4, 5, 3], rngs=nnx.Rngs(0)),
        "cnn": lambda: CNN(channels=(2, 3), image_size=4, num_classes=3, rngs=nnx.Rngs(0)),
        "transformer": lambda: TinyTransformerLM(vocab_size=5, d_model=8, num_heads=2,
                                                 num_layers=1, d_ff=8, max_len=4, rngs=nnx.Rngs(0)),
    }
    _, state = nnx.split(nnx.eval_shape(makers[name]), nnx.Param)
    rng = np.random.default_rng(1)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape)), state)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_filter_normalised_direction_matches_filter_norms(name):
    p = _random_params(name)
    d = gl.random_direction(jax.random.key(5), p)
    nd, nw = gl.filter_norms(d), gl.filter_norms(p)
    for (path, dx), x, a, b in zip(jax.tree_util.tree_flatten_with_path(d)[0],
                                   jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(nd),
                                   jax.tree_util.tree_leaves(nw)):
        if np.ndim(x) <= 1:  # biases and norm parameters: zeroed (Li et al.'s default)
            assert np.all(np.asarray(dx) == 0), gj.tree.path_str(path)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-10, err_msg=gj.tree.path_str(path))


def test_filter_axes_follow_flax_layouts():
    p = _random_params("cnn")
    d = gl.random_direction(jax.random.key(6), p)
    k, dk = np.asarray(p["convs"][0]["kernel"]), np.asarray(d["convs"][0]["kernel"])
    for c in range(k.shape[-1]):  # one filter per output channel
        np.testing.assert_allclose(np.linalg.norm(dk[..., c]), np.linalg.norm(k[..., c]), rtol=1e-10)
    w, dw = np.asarray(p["head"]["kernel"]), np.asarray(d["head"]["kernel"])  # Dense (in, out)
    np.testing.assert_allclose(np.linalg.norm(dw, axis=0), np.linalg.norm(w, axis=0), rtol=1e-10)
    t = _random_params("transformer")
    dq = gl.random_direction(jax.random.key(7), t)
    q, dqk = np.asarray(t["blocks"][0]["attention"]["query"]["kernel"]), \
        np.asarray(dq["blocks"][0]["attention"]["query"]["kernel"])  # (d_in, H, Dh)
    np.testing.assert_allclose(np.linalg.norm(dqk, axis=0), np.linalg.norm(q, axis=0), rtol=1e-10)
    e, de = np.asarray(t["embed"]["embedding"]), np.asarray(dq["embed"]["embedding"])  # rows
    np.testing.assert_allclose(np.linalg.norm(de, axis=1), np.linalg.norm(e, axis=1), rtol=1e-10)
    assert gl.default_filter_axes("blocks/0/attention/query/kernel", (8, 2, 4)) == (1, 2)
    assert gl.default_filter_axes("blocks/0/attention/out/kernel", (2, 4, 8)) == (2,)
    assert gl.default_filter_axes("embed/embedding", (5, 8)) == (0,)
    assert gl.default_filter_axes("fc/bias", (8,)) is None


def test_layer_normalisation_and_bias_rules():
    adapted, _ = model_case("mlp")
    p = adapted.params
    raw = gj.tree.random_like(jax.random.key(7), p)
    d = gl.normalize_direction(raw, p, mode="layer", bias="normalize")
    for x, y in zip(jax.tree_util.tree_leaves(d), jax.tree_util.tree_leaves(p)):
        np.testing.assert_allclose(np.linalg.norm(x), np.linalg.norm(y), rtol=1e-10)
    kept = gl.normalize_direction(raw, p, mode="filter", bias="keep")
    np.testing.assert_array_equal(kept["layers"][0]["bias"], raw["layers"][0]["bias"])
    assert gl.normalize_direction(raw, p, mode="none") is not None


def test_hessian_directions_are_eigenvectors():
    adapted, batch = model_case("seed")
    p = adapted.params
    res = gl.hessian_directions(adapted.loss_fn, p, batch, k=2)
    h = dense_hessian(adapted.loss_fn, p, batch)
    ref = np.linalg.eigvalsh(h)[::-1][:2]
    np.testing.assert_allclose(res.eigenvalues, ref, rtol=1e-10)
    for lam, v in zip(res.eigenvalues, res.directions):
        flat = np.asarray(ravel_pytree(v)[0])
        np.testing.assert_allclose(np.linalg.norm(flat), 1.0, rtol=1e-10)
        np.testing.assert_allclose(h @ flat, lam * flat, atol=1e-9)
    low = gl.hessian_directions(adapted.loss_fn, p, batch, k=1, which="SA")
    np.testing.assert_allclose(low.eigenvalues[0], np.linalg.eigvalsh(h)[0], rtol=1e-8, atol=1e-12)


@pytest.mark.slow
def test_hessian_directions_by_lanczos_match_dense():
    adapted, batch = model_case("mlp")
    p = adapted.params
    dense = gl.hessian_directions(adapted.loss_fn, p, batch, k=2)
    lanczos = gl.hessian_directions(adapted.loss_fn, p, batch, k=2, dense_limit=0,
                                    key=jax.random.key(0))
    np.testing.assert_allclose(lanczos.eigenvalues, dense.eigenvalues, rtol=1e-6)
    for a, b in zip(lanczos.directions, dense.directions):
        assert abs(float(gj.tree.vdot(a, b))) == pytest.approx(1.0, abs=1e-5)


def test_trajectory_pca_recovers_the_plane():
    rng = np.random.default_rng(0)
    shapes = {"a": (3, 2), "b": (4,)}
    rand = lambda: {k: jnp.asarray(rng.normal(size=s)) for k, s in shapes.items()}  # noqa: E731
    u, v, c = rand(), rand(), rand()
    xs, ys = rng.normal(size=12), 0.3 * rng.normal(size=12)
    points = [jax.tree_util.tree_map(lambda c_, u_, v_: c_ + x * u_ + y * v_, c, u, v)
              for x, y in zip(xs, ys)]
    pca = gl.trajectory_pca(points, 2)
    assert pca.explained_variance_ratio.sum() == pytest.approx(1.0, abs=1e-10)
    gram = np.array([[float(gj.tree.vdot(a, b)) for b in pca.directions] for a in pca.directions])
    np.testing.assert_allclose(gram, np.eye(2), atol=1e-10)
    for t, pt in enumerate(points):  # the plane reproduces every point exactly
        rec = jax.tree_util.tree_map(lambda c0, d0, d1: c0 + pca.coords[t, 0] * d0 + pca.coords[t, 1] * d1,
                                     pca.center, *pca.directions)
        for x, y in zip(jax.tree_util.tree_leaves(rec), jax.tree_util.tree_leaves(pt)):
            np.testing.assert_allclose(x, y, atol=1e-10)
    np.testing.assert_allclose(gl.project_onto_plane(points, pca.center, pca.directions),
                               pca.coords, atol=1e-10)


# -- interpolation and barriers -----------------------------------------------------------


def test_barrier_of_identical_endpoints_is_zero():
    adapted, batch = model_case("mlp")
    assert gl.loss_barrier(adapted.loss_fn, adapted.params, adapted.params, batch) == 0.0


def test_barrier_of_two_basin_function_matches_closed_form():
    c = 0.3

    def double_well(params, batch):
        del batch
        x = params["x"][0]
        return (x**2 - 1.0) ** 2 + c * x

    a, b = {"x": jnp.array([-1.0])}, {"x": jnp.array([1.0])}
    roots = np.roots([4.0, 0.0, -4.0, c])  # f'(x) = 4x^3 - 4x + c
    x_star = float(np.real(roots[np.argmin(np.abs(roots))]))
    expected = (x_star**2 - 1) ** 2 + c * x_star - 0.5 * ((-c) + c)
    it = gl.interpolate(double_well, a, b, X0, num_points=8)  # the peak is between grid points
    assert it.barrier == pytest.approx(expected, rel=1e-8)
    assert it.barrier_t == pytest.approx((x_star + 1) / 2, abs=1e-4)
    assert it.endpoint_loss == pytest.approx((-c, c))
    coarse = gl.interpolate(double_well, a, b, X0, num_points=8, refine=False)
    assert coarse.barrier < it.barrier


def test_bezier_curve_lowers_the_barrier_of_a_ring_valley():
    def ring(params, batch):
        del batch
        x, y = params["p"][0], params["p"][1]
        return (x**2 + y**2 - 1.0) ** 2

    a, b = {"p": jnp.array([-1.0, 0.0])}, {"p": jnp.array([1.0, 0.0])}
    res = gl.bezier_connect(ring, a, b, X0, key=jax.random.key(0), num_steps=300,
                            learning_rate=0.05, init={"p": jnp.array([0.0, 0.1])})
    assert res.linear.barrier == pytest.approx(1.0, rel=1e-8)
    assert res.barrier < 0.3 * res.linear.barrier
    mid = gl.bezier_point(a, res.control, b, 0.0)
    np.testing.assert_allclose(mid["p"], a["p"])


# -- sharpness ----------------------------------------------------------------------------


@pytest.mark.parametrize("relative", [True, False])
def test_epsilon_sharpness_of_quadratic_is_closed_form(relative):
    eps = 0.05
    res = gl.epsilon_sharpness(pure_quad, W, X0, eps, relative=relative)
    f0 = float(pure_quad(W, X0))
    box = jax.tree_util.tree_map(lambda w: eps * (jnp.abs(w) + 1) if relative else eps * jnp.ones_like(w), W)
    expected = sum(float(jnp.sum(0.5 * a * (jnp.abs(w) + r) ** 2)) for a, w, r in zip(
        jax.tree_util.tree_leaves(A), jax.tree_util.tree_leaves(W), jax.tree_util.tree_leaves(box)))
    assert res.max_loss == pytest.approx(expected, rel=1e-12)
    assert res.value == pytest.approx(100 * (expected - f0) / (1 + f0), rel=1e-10)
    for d, r in zip(jax.tree_util.tree_leaves(res.perturbation), jax.tree_util.tree_leaves(box)):
        assert np.all(np.abs(np.asarray(d)) <= np.asarray(r) * (1 + 1e-12))
    with pytest.raises(ValueError, match="epsilon"):
        gl.epsilon_sharpness(pure_quad, W, X0, 0.0)


def test_adaptive_sharpness_of_quadratic_is_closed_form():
    rho = 0.1
    res = gl.adaptive_sharpness(pure_quad, W, X0, rho, p="inf")
    expected = sum(float(jnp.sum(0.5 * a * ((1 + rho) * w) ** 2)) for a, w in zip(
        jax.tree_util.tree_leaves(A), jax.tree_util.tree_leaves(W)))
    assert res.max_loss == pytest.approx(expected, rel=1e-12)
    one = {"u": jnp.array([2.0])}
    r2 = gl.adaptive_sharpness(lambda p, b: 1.5 * jnp.sum(p["u"] ** 2), one, X0, rho, p=2)
    assert r2.value == pytest.approx(1.5 * ((1 + rho) ** 2 - 1) * 4.0, rel=1e-12)
    with pytest.raises(ValueError, match="p must"):
        gl.adaptive_sharpness(pure_quad, W, X0, rho, p=1)


def test_sharpness_report_matches_dense_hessian():
    adapted, batch = model_case("seed")
    rep = gl.sharpness_report(adapted.loss_fn, adapted.params, batch)
    ev = np.linalg.eigvalsh(dense_hessian(adapted.loss_fn, adapted.params, batch))
    assert rep.lambda_max == pytest.approx(ev[-1], rel=1e-10)
    assert rep.lambda_min == pytest.approx(ev[0], rel=1e-8, abs=1e-12)
    assert rep.trace == pytest.approx(ev.sum(), rel=1e-10)
    assert rep.epsilon_sharpness >= 0 and rep.adaptive_sharpness >= 0
    assert set(rep.to_dict()) >= {"lambda_max", "trace", "epsilon_sharpness"}
    assert gl.lambda_max(adapted.loss_fn, adapted.params, batch) == pytest.approx(ev[-1], rel=1e-10)
    assert gl.trace_sharpness(adapted.loss_fn, adapted.params, batch) == pytest.approx(ev.sum(), rel=1e-10)


def test_rescaling_changes_lambda_max_but_not_the_function_dinh_caveat():
    """Dinh et al. 2017: W1 -> a W1, b1 -> a b1, W2 -> W2 / a leaves a ReLU net's outputs
    unchanged but changes lambda_max; the adaptive sharpness (eta=0) is invariant."""
    model = MLP([3, 6, 2], activation=jax.nn.relu, param_dtype=jnp.float64, rngs=nnx.Rngs(3))
    adapted = from_nnx(model, gj.heads.mse())
    batch = {"inputs": jax.random.normal(jax.random.key(0), (16, 3), jnp.float64),
             "targets": jax.random.normal(jax.random.key(1), (16, 2), jnp.float64)}
    chk = gl.rescaling_check(adapted.loss_fn, adapted.params, batch, alpha=5.0,
                             model_fn=adapted.model_fn)
    assert chk.max_output_change < 1e-12
    assert chk.loss_rescaled == pytest.approx(chk.loss, rel=1e-12)
    assert chk.lambda_max_rescaled > 1.5 * chk.lambda_max  # W2 / a: the curvature in W2 grows
    assert chk.adaptive_sharpness_rescaled == pytest.approx(chk.adaptive_sharpness, rel=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        gl.rescale_layers(adapted.params, -1.0)
    with pytest.raises(ValueError, match="first"):
        gl.rescale_layers(adapted.params, 2.0, first="nope")


# -- training -----------------------------------------------------------------------------


def test_train_sgd_and_sam_reduce_the_loss():
    adapted, batch = model_case("seed")
    for opt in (optax.sgd(0.1), training.sam_optimizer(0.1, rho=0.05)):
        res = training.train_scan(adapted.loss_fn, adapted.params, batch, optimizer=opt,
                                  num_steps=40, key=jax.random.key(0), batch_size=4,
                                  eval_data=batch, record_every=10)
        np.testing.assert_array_equal(res.steps, [0, 10, 20, 30, 40])
        assert res.train_loss[-1] < res.train_loss[0]
        np.testing.assert_allclose(res.eval_loss, res.train_loss, rtol=1e-12)
        assert jax.tree_util.tree_leaves(res.trajectory)[0].shape[0] == 5
        assert res.step_loss.shape == (40,)
    with pytest.raises(ValueError, match="record_every"):
        training.train_scan(adapted.loss_fn, adapted.params, batch, optimizer=optax.sgd(0.1),
                            num_steps=10, key=jax.random.key(0), record_every=3)


# -- layout: old import paths, numerics-only package --------------------------------------


def test_old_import_paths():
    """Every name of the old ``landscape.py`` is still reachable as ``landscape.<name>``."""
    from gradience_jax.experiments import seed
    from gradience_jax.landscape import directions, sharpness, slices

    assert gl.train is training.train_scan is training.train
    assert gl.TrainResult is training.TrainResult and gl.sam_optimizer is training.sam_optimizer
    for name in ("pseudo_spectral_experiment", "PseudoSpectralResult", "sharp_vs_flat_experiment",
                 "SharpFlatRun", "SharpFlatResult", "METHODS"):
        assert getattr(gl, name) is getattr(seed, name), name
        assert gl._MOVED[name] == "gradience_jax.experiments.seed"
    assert gl.hessian_trace is gl.trace_sharpness is sharpness.trace_sharpness
    assert gl.random_direction is directions.random_direction and gl.slice_2d is slices.slice_2d
    assert {"top_eigenpairs", "DEFAULT_MEMORY_BUDGET", "accuracy_metric"} <= set(dir(gl))
    assert set(gl._MOVED) <= set(dir(gl))
    with pytest.raises(AttributeError, match="no_such_name"):
        gl.no_such_name  # noqa: B018


def test_landscape_is_numerics_only():
    """Importing the analyses imports no experiment, and no landscape module imports optax,
    matplotlib or the models at module level (checked on the source)."""
    import ast
    import pathlib
    import subprocess
    import sys

    code = ("import sys, gradience_jax.landscape, gradience_jax.attention; "
            "bad = [m for m in sys.modules if m.startswith(('gradience_jax.experiments', "
            "'gradience_jax.plots', 'matplotlib'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    for path in pathlib.Path(gl.__file__).parent.glob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.Import):
                roots = {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                roots = {node.module}
            else:
                continue
            for root in roots:
                assert not root.startswith(("optax", "matplotlib", "gradience_jax.models",
                                            "gradience_jax.experiments", "flax")), (path.name, root)
