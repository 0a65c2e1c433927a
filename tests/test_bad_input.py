"""Bad input across the public API: each case raises the right exception, naming the argument.

One table, one row per misuse a user makes: a string where a number belongs, a negative
size, ``key=42``, a batch of keys, a vector that does not match the parameters, labels out of
range, non-finite operators and scalars, corrupt files. Every row states the exception type
and a regular expression the message must match, which always contains the argument's name
(or, for a bad value inside an argument, the leaf / label / file it concerns). The telemetry
two-writer, empty-file and resume cases live in ``tests/test_telemetry.py``; the CLI rows
here check exit code 2 and the flag named on stderr.

The docs page ``docs/guarantees.md`` states what these checks promise.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gradience_jax as gj
from gradience_jax import geometry, heads, landscape, probes, telemetry, weights
from gradience_jax._validate import ArgumentTypeError

NAN = float("nan")


@dataclasses.dataclass(frozen=True)
class Fixture:
    """A tiny regression MLP and a tiny classifier, with their operators."""

    params: Any
    batch: Any
    loss_fn: Callable
    model_fn: Callable
    H: gj.LinearOperator
    cls_params: Any
    cls_batch: Any
    cls_model: Callable
    key: Any
    tmp: Any


def _mlp(params, batch):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return h @ params["w2"]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(k1, (3, 4)) / 2, "b1": jnp.zeros(4),
              "w2": jax.random.normal(k2, (4, 2)) / 2}
    batch = {"x": jax.random.normal(k3, (8, 3)), "y": jnp.ones((8, 2))}

    def loss_fn(p, b):
        return jnp.mean((_mlp(p, b) - b["y"]) ** 2)

    cls_batch = {"x": batch["x"], "labels": jnp.array([0, 1, 0, 1, 1, 0, 0, 1])}
    return Fixture(params, batch, loss_fn, _mlp, gj.hessian(loss_fn, params, batch), params,
                   cls_batch, _mlp, jax.random.key(1), tmp_path_factory.mktemp("bad_input"))


def _like(fx, scale=1.0):
    return jax.tree_util.tree_map(lambda x: jnp.full(x.shape, scale, x.dtype), fx.params)


def _nan_op(fx):
    """An operator whose products are all NaN (a diverged model's curvature)."""
    return gj.from_matvec(lambda v: jax.tree_util.tree_map(lambda x: x * NAN, v), fx.params)


def _cls_labels(fx, labels):
    return dict(fx.cls_batch, labels=jnp.asarray(labels))


def _cli(*argv):
    """Run the CLI in-process; return (exit code, stderr text)."""
    import contextlib
    import io

    from gradience_jax.app import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:  # argparse usage errors
            code = exc.code
    return code, err.getvalue()


@dataclasses.dataclass(frozen=True)
class Case:
    """One misuse: ``call(fx)`` must raise ``exc`` with a message matching ``match``."""

    id: str
    call: Callable[[Fixture], Any]
    exc: type[BaseException] | tuple[type[BaseException], ...]
    match: str


KEY_BATCH = jax.random.split(jax.random.key(0), 3)

CASES = [
    # -- operators ----------------------------------------------------------------------
    Case("hessian/params-empty", lambda f: gj.hessian(f.loss_fn, {}, f.batch), ValueError,
         "params"),
    Case("hessian/params-int-leaf", lambda f: gj.hessian(f.loss_fn, {"w": jnp.arange(3)},
                                                         f.batch), TypeError, "params"),
    Case("hessian/batch-mismatched-lead", lambda f: gj.hessian(
        f.loss_fn, f.params, {"x": f.batch["x"], "y": f.batch["y"][:3]}), ValueError, "batch"),
    Case("hessian/batch-string-field", lambda f: gj.hessian(
        f.loss_fn, f.params, dict(f.batch, name="abc")), (TypeError, ValueError), "batch"),
    Case("hessian/batch-string-array", lambda f: gj.hessian(
        f.loss_fn, f.params, dict(f.batch, name=np.array(["a"] * 8))), TypeError, "batch"),
    Case("hessian/loss-not-callable", lambda f: gj.hessian("loss", f.params, f.batch),
         TypeError, "loss_fn"),
    Case("damped/op-array", lambda f: gj.damped(np.eye(3), 0.1), TypeError, "op"),
    Case("scale/alpha-array", lambda f: f.H * jnp.ones(3), TypeError, "alpha"),
    Case("to_dense/max-params-string", lambda f: f.H.to_dense(max_params="10"), TypeError,
         "max_params"),
    Case("dataset_operator/batches-dict", lambda f: gj.dataset_operator(
        gj.hessian, f.loss_fn, f.params, f.batch), TypeError, "batches"),
    Case("probes.every/offset-float", lambda f: probes.every(2, probes.update_ratios(),
                                                             offset=0.5), TypeError, "offset"),
    Case("probes.hessian_eigenvalues/reorth-bad", lambda f: probes.hessian_eigenvalues(
        f.loss_fn, reorth="partial"), ValueError, "reorth"),
    Case("probes.update_to_weight_ratios/eps-negative", lambda f: probes.update_to_weight_ratios(
        f.params, f.params, eps=-1.0), ValueError, "eps"),
    Case("solve/method-bad", lambda f: gj.solve(f.H, _like(f), method="newton"), ValueError,
         "method"),
    Case("solve/damping-negative", lambda f: gj.solve(f.H, _like(f), damping=-1.0), ValueError,
         "damping"),
    Case("solve/b-zero", lambda f: gj.solve(f.H, _like(f, 0.0), damping=0.1), ValueError, "b"),
    Case("influence/loss-not-callable", lambda f: gj.influence("loss", f.params, f.batch,
                                                               f.batch), TypeError, "loss_fn"),
    Case("laplace.lowrank_posterior/prior-negative", lambda f: gj.laplace.lowrank_posterior(
        f.H, 2, -1.0), ValueError, "prior_prec"),
    Case("load_safetensors/missing", lambda f: gj.load_safetensors(f.tmp / "none.safetensors"),
         FileNotFoundError, "safetensors"),
    Case("hessian/loss-not-scalar", lambda f: gj.hessian(
        lambda p, b: _mlp(p, b), f.params, f.batch), ValueError, "loss_fn"),
    Case("hessian/loss-nan", lambda f: gj.hessian(
        lambda p, b: NAN * f.loss_fn(p, b), f.params, f.batch), FloatingPointError, "loss"),
    Case("hessian/linearize-bad", lambda f: gj.hessian(f.loss_fn, f.params, f.batch,
                                                       linearize="yes"), ValueError,
         "linearize"),
    Case("matvec/vector-missing-leaf", lambda f: f.H @ {"w1": f.params["w1"]}, ValueError,
         "v"),
    Case("matvec/vector-wrong-shape", lambda f: f.H @ dict(_like(f), w1=jnp.ones((4, 3))),
         ValueError, "w1"),
    Case("damped/lam-nan", lambda f: gj.damped(f.H, NAN), ValueError, "lam"),
    Case("damped/lam-string", lambda f: gj.damped(f.H, "1e-3"), TypeError, "lam"),
    Case("scale/alpha-nan", lambda f: NAN * f.H, ValueError, "alpha|scal"),
    Case("scale/alpha-inf", lambda f: gj.operators.base.scale(f.H, float("inf")), ValueError,
         "alpha|scal"),
    Case("add/not-operator", lambda f: f.H + np.eye(3), TypeError, "LinearOperator"),
    Case("from_dense/not-square", lambda f: gj.from_dense(np.ones((3, 4))), ValueError,
         "matrix"),
    Case("from_dense/nan", lambda f: gj.from_dense(np.full((3, 3), NAN)), ValueError,
         "matrix"),
    Case("from_matvec/not-callable", lambda f: gj.from_matvec(3, f.params), TypeError,
         "matvec"),
    Case("ggn/vocab-chunk-string", lambda f: gj.ggn(f.model_fn, heads.mse("y"), f.params,
                                                    f.batch, vocab_chunk="8"), TypeError,
         "vocab_chunk"),
    Case("ggn/vocab-chunk-negative", lambda f: gj.ggn(f.model_fn, heads.mse("y"), f.params,
                                                      f.batch, vocab_chunk=-2), ValueError,
         "vocab_chunk"),
    Case("ggn/labels-negative", lambda f: gj.ggn(
        f.cls_model, heads.softmax_cross_entropy("labels"), f.cls_params,
        _cls_labels(f, [0, 1, -1, 1, 1, 0, 0, 1])), ValueError, "labels"),
    Case("ggn/labels-too-large", lambda f: gj.ggn(
        f.cls_model, heads.softmax_cross_entropy("labels"), f.cls_params,
        _cls_labels(f, [0, 1, 2, 1, 1, 0, 0, 1])), ValueError, "labels"),
    Case("ggn/labels-float", lambda f: gj.ggn(
        f.cls_model, heads.softmax_cross_entropy("labels"), f.cls_params,
        _cls_labels(f, np.full(8, 0.5, np.float32))), (TypeError, ValueError), "labels"),
    Case("mc_fisher/key-none", lambda f: gj.mc_fisher(f.cls_model, f.cls_params, f.cls_batch,
                                                      None), ValueError, "key"),
    Case("mc_fisher/key-int", lambda f: gj.mc_fisher(f.cls_model, f.cls_params, f.cls_batch,
                                                     42), TypeError, "key"),
    Case("mc_fisher/key-batch", lambda f: gj.mc_fisher(f.cls_model, f.cls_params, f.cls_batch,
                                                       KEY_BATCH), ValueError, "key"),
    Case("mc_fisher/num-samples-zero", lambda f: gj.mc_fisher(
        f.cls_model, f.cls_params, f.cls_batch, f.key, num_samples=0), ValueError,
         "num_samples"),
    Case("mc_fisher/likelihood-bad", lambda f: gj.mc_fisher(
        f.cls_model, f.cls_params, f.cls_batch, f.key, likelihood="poisson"), ValueError,
         "likelihood"),
    Case("empirical_fisher/mode-bad", lambda f: gj.empirical_fisher(
        f.loss_fn, f.params, f.batch, mode="fast"), ValueError, "mode"),
    Case("per_example_grads/chunk-negative", lambda f: gj.per_example_grads(
        f.loss_fn, f.params, f.batch, chunk_size=-1), ValueError, "chunk_size"),
    Case("per_example_grads/chunk-string", lambda f: gj.per_example_grads(
        f.loss_fn, f.params, f.batch, chunk_size="4"), TypeError, "chunk_size"),
    Case("kfac/fisher-type-bad", lambda f: gj.kfac(
        f.model_fn, heads.mse("y"), f.params, f.batch, fisher_type="type-3"), ValueError,
         "fisher_type"),
    Case("kfac/approx-bad", lambda f: gj.kfac(
        f.model_fn, heads.mse("y"), f.params, f.batch, kfac_approx="full"), ValueError,
         "kfac_approx"),
    Case("kfac/key-int", lambda f: gj.kfac(f.model_fn, heads.mse("y"), f.params, f.batch,
                                           fisher_type="mc", key=3), TypeError, "key"),
    Case("kfac_inverse/damping-negative", lambda f: gj.kfac_inverse(
        gj.kfac(f.model_fn, heads.mse("y"), f.params, f.batch, warn=False), -1.0), ValueError,
         "damping"),
    Case("build_operator/unknown", lambda f: gj.build_operator(
        "hessain", loss_fn=f.loss_fn, params=f.params, batch=f.batch), ValueError,
         "hessain|name"),
    Case("params_filter/not-callable", lambda f: gj.params_filter(f.H, "w1"), TypeError,
         "predicate"),
    Case("params_filter/selects-nothing", lambda f: gj.params_filter(
        f.H, lambda path, x: False), ValueError, "predicate|select"),
    # -- spectra ------------------------------------------------------------------------
    Case("eigsh/op-array", lambda f: gj.eigsh(np.eye(3), 1), TypeError, "op"),
    Case("eigsh/k-string", lambda f: gj.eigsh(f.H, "2"), (TypeError, ValueError), "k"),
    Case("eigsh/k-zero", lambda f: gj.eigsh(f.H, 0), ValueError, "k"),
    Case("eigsh/k-too-large", lambda f: gj.eigsh(f.H, 1000), ValueError, "k"),
    Case("eigsh/which-bad", lambda f: gj.eigsh(f.H, 1, which="XX"), ValueError, "which"),
    Case("eigsh/reorth-bad", lambda f: gj.eigsh(f.H, 1, reorth="some"), ValueError, "reorth"),
    Case("eigsh/tol-string", lambda f: gj.eigsh(f.H, 1, tol="1e-6"), (TypeError, ValueError),
         "tol"),
    Case("eigsh/tol-negative", lambda f: gj.eigsh(f.H, 1, tol=-1.0), ValueError, "tol"),
    Case("eigsh/num-iters-negative", lambda f: gj.eigsh(f.H, 1, num_iters=-5), ValueError,
         "num_iters"),
    Case("eigsh/key-int", lambda f: gj.eigsh(f.H, 1, key=42), TypeError, "key"),
    Case("eigsh/key-batch", lambda f: gj.eigsh(f.H, 1, key=KEY_BATCH), ValueError, "key"),
    Case("eigsh/v0-mismatch", lambda f: gj.eigsh(f.H, 1, v0={"w1": f.params["w1"]}),
         ValueError, "v0"),
    Case("eigsh/v0-zero", lambda f: gj.eigsh(f.H, 1, v0=_like(f, 0.0)), ValueError, "v0"),
    Case("eigsh/nan-operator", lambda f: gj.eigsh(_nan_op(f), 1),
         (FloatingPointError, ValueError), "finite"),
    Case("eigsh_fast/k-zero", lambda f: gj.eigsh_fast(f.H, k=0), ValueError, "k"),
    Case("eigsh_fast/key-int", lambda f: gj.eigsh_fast(f.H, key=7), TypeError, "key"),
    Case("top_eigenpairs/k-string", lambda f: gj.top_eigenpairs(f.H, "1"),
         (TypeError, ValueError), "k"),
    Case("lanczos/num-iters-zero", lambda f: gj.lanczos(f.H, _like(f), 0), ValueError,
         "num_iters"),
    Case("lanczos/window-one", lambda f: gj.lanczos(f.H, _like(f), 5, window=1), ValueError,
         "window"),
    Case("lanczos/v0-mismatch", lambda f: gj.lanczos(f.H, {"w1": f.params["w1"]}, 5),
         ValueError, "v0"),
    Case("compute_spectrum/operator-unknown", lambda f: gj.compute_spectrum(
        f.loss_fn, f.params, f.batch, operator="fishr"), ValueError, "fishr|operator"),
    # -- estimators ---------------------------------------------------------------------
    Case("hutchinson/num-samples-zero", lambda f: gj.hutchinson_trace(f.H, f.key, 0),
         ValueError, "num_samples"),
    Case("hutchinson/num-samples-string", lambda f: gj.hutchinson_trace(f.H, f.key, "10"),
         (TypeError, ValueError), "num_samples"),
    Case("hutchinson/distribution-bad", lambda f: gj.hutchinson_trace(
        f.H, f.key, 4, distribution="uniform"), ValueError, "distribution"),
    Case("hutchinson/key-int", lambda f: gj.hutchinson_trace(f.H, 42, 4), TypeError, "key"),
    Case("hutchinson/key-batch", lambda f: gj.hutchinson_trace(f.H, KEY_BATCH, 4), ValueError,
         "key"),
    Case("hutchinson/batch-size-negative", lambda f: gj.hutchinson_trace(
        f.H, f.key, 4, batch_size=-1), ValueError, "batch_size"),
    Case("hutchinson/nan-operator", lambda f: gj.hutchinson_trace(_nan_op(f), f.key, 4),
         FloatingPointError, "finite"),
    Case("hutchpp/num-matvecs-small", lambda f: gj.hutchpp_trace(f.H, f.key, 2), ValueError,
         "num_matvecs"),
    Case("trace_of_square/op-none", lambda f: gj.trace_of_square(None, f.key), TypeError,
         "op"),
    Case("diagonal/num-samples-negative", lambda f: gj.diagonal(f.H, f.key, -3), ValueError,
         "num_samples"),
    Case("spectral_density/num-probes-zero", lambda f: gj.spectral_density(f.H, f.key, 0),
         ValueError, "num_probes"),
    Case("spectral_density/num-iters-string", lambda f: gj.spectral_density(
        f.H, f.key, 2, "20"), (TypeError, ValueError), "num_iters"),
    Case("spectral_density/nan-operator", lambda f: gj.spectral_density(_nan_op(f), f.key, 2, 8),
         FloatingPointError, "finite"),
    Case("density.evaluate/sigma-zero", lambda f: gj.spectral_density(
        f.H, f.key, 2, 8).evaluate(np.linspace(-1, 1, 5), sigma=0.0), ValueError, "sigma"),
    Case("density.evaluate/sigma-negative", lambda f: gj.spectral_density(
        f.H, f.key, 2, 8).evaluate(np.linspace(-1, 1, 5), sigma=-0.1), ValueError, "sigma"),
    Case("density.evaluate/grid-nan", lambda f: gj.spectral_density(
        f.H, f.key, 2, 8).evaluate(np.array([0.0, NAN]), 0.1), ValueError, "grid"),
    # -- geometry / solvers -------------------------------------------------------------
    Case("cg/tol-string", lambda f: gj.conjugate_gradient(f.H, _like(f), tol="small"),
         (TypeError, ValueError), "tol"),
    Case("cg/maxiter-zero", lambda f: gj.conjugate_gradient(f.H, _like(f), maxiter=0),
         ValueError, "maxiter"),
    Case("cg/b-mismatch", lambda f: gj.conjugate_gradient(f.H, {"w1": f.params["w1"]}),
         ValueError, "b"),
    Case("natural_gradient/damping-zero", lambda f: geometry.natural_gradient(
        f.H, _like(f), 0.0), ValueError, "damping"),
    Case("natural_gradient/damping-string", lambda f: geometry.natural_gradient(
        f.H, _like(f), "0.1"), (TypeError, ValueError), "damping"),
    Case("condition_number/op-none", lambda f: geometry.condition_number(None, 0.1),
         (TypeError, ValueError), "op"),
    Case("fisher_trace/method-bad", lambda f: geometry.fisher_trace(f.H, f.key, method="mc"),
         ValueError, "method"),
    Case("fisher_trace/key-int", lambda f: geometry.fisher_trace(
        f.H, 3, method="matrix-free"), TypeError, "key"),
    Case("effective_dimension/num-samples-zero", lambda f: geometry.effective_dimension(
        f.H, 0.1, num_samples=0, method="matrix-free", key=f.key), ValueError, "num_samples"),
    # -- weights ------------------------------------------------------------------------
    Case("layer_spectrum/rtol-negative", lambda f: gj.layer_spectrum(np.eye(4), rtol=-1.0),
         ValueError, "rtol"),
    Case("layer_spectrum/rtol-string", lambda f: gj.layer_spectrum(np.eye(4), rtol="1e-3"),
         (TypeError, ValueError), "rtol"),
    Case("layer_spectrum/nan", lambda f: gj.layer_spectrum(np.full((4, 4), NAN)),
         (ValueError, FloatingPointError), "finite"),
    Case("layer_spectrum/1d", lambda f: gj.layer_spectrum(np.ones(4), reshape="none"),
         ValueError, "matrix|2-D|reshape"),
    Case("layer_spectrum/min-tail-one", lambda f: gj.layer_spectrum(np.eye(4), min_tail=1),
         ValueError, "min_tail"),
    Case("layer_spectrum/tw-level-out", lambda f: gj.layer_spectrum(np.eye(4), tw_level=1.5),
         ValueError, "tw_level"),
    Case("layer_spectrum/reshape-bad", lambda f: gj.layer_spectrum(np.eye(4), reshape="rows"),
         ValueError, "reshape"),
    Case("weight_spectra/filter-not-callable", lambda f: gj.weight_spectra(
        f.params, filter="w1"), TypeError, "filter"),
    Case("weight_spectra/empty", lambda f: gj.weight_spectra({}), ValueError, "params"),
    Case("weights.marchenko_pastur/sigma2-zero", lambda f: weights.marchenko_pastur_pdf(
        np.linspace(0, 2, 5), 0.5, 0.0), ValueError, "sigma2"),
    # -- landscape ----------------------------------------------------------------------
    Case("random_direction/key-none", lambda f: landscape.random_direction(None, f.params),
         ValueError, "key"),
    Case("random_direction/key-int", lambda f: landscape.random_direction(42, f.params),
         TypeError, "key"),
    Case("random_direction/mode-bad", lambda f: landscape.random_direction(
        f.key, f.params, mode="bad"), ValueError, "mode"),
    Case("slice_1d/grid-nan", lambda f: landscape.slice_1d(
        f.loss_fn, f.params, f.batch, _like(f), [0.0, NAN]), ValueError, "grid1"),
    Case("slice_1d/chunk-string", lambda f: landscape.slice_1d(
        f.loss_fn, f.params, f.batch, _like(f), [0.0, 1.0], chunk_size="2"), TypeError,
         "chunk_size"),
    Case("slice_1d/direction-mismatch", lambda f: landscape.slice_1d(
        f.loss_fn, f.params, f.batch, {"w1": f.params["w1"]}, [0.0, 1.0]), ValueError, "d1"),
    Case("slice_2d/grid2-2d", lambda f: landscape.slice_2d(
        f.loss_fn, f.params, f.batch, _like(f), _like(f), [0.0, 1.0], [[0.0, 1.0]]),
         ValueError, "grid2"),
    Case("interpolate/num-points-string", lambda f: landscape.interpolate(
        f.loss_fn, f.params, f.params, f.batch, num_points="5"), TypeError, "num_points"),
    Case("interpolate/params-b-mismatch", lambda f: landscape.interpolate(
        f.loss_fn, f.params, {"w1": f.params["w1"]}, f.batch), ValueError, "params_b"),
    Case("bezier/key-none", lambda f: landscape.bezier_connect(
        f.loss_fn, f.params, f.params, f.batch, key=None), ValueError, "key"),
    Case("bezier/learning-rate-string", lambda f: landscape.bezier_connect(
        f.loss_fn, f.params, f.params, f.batch, key=f.key, learning_rate="x"), TypeError,
         "learning_rate"),
    Case("epsilon_sharpness/epsilon-string", lambda f: landscape.epsilon_sharpness(
        f.loss_fn, f.params, f.batch, "0.1"), TypeError, "epsilon"),
    Case("epsilon_sharpness/step-size-nan", lambda f: landscape.epsilon_sharpness(
        f.loss_fn, f.params, f.batch, step_size=NAN), ValueError, "step_size"),
    Case("adaptive_sharpness/p-bad", lambda f: landscape.adaptive_sharpness(
        f.loss_fn, f.params, f.batch, p=3), ValueError, "p must"),
    Case("sharpness_report/key-int", lambda f: landscape.sharpness_report(
        f.loss_fn, f.params, f.batch, key=42), TypeError, "key"),
    Case("trajectory_pca/point-mismatch", lambda f: landscape.trajectory_pca(
        [f.params, {"w1": f.params["w1"]}], k=1), ValueError, r"trajectory\[1\]"),
    Case("top_eigenpairs/op-none", lambda f: landscape.top_eigenpairs(None, 1), TypeError,
         "op"),
    # -- probes -------------------------------------------------------------------------
    Case("probes.hessian_eigenvalues/k-zero", lambda f: probes.hessian_eigenvalues(
        f.loss_fn, k=0), ValueError, "k"),
    Case("probes.hessian_eigenvalues/num-iters-string", lambda f: probes.hessian_eigenvalues(
        f.loss_fn, num_iters="5"), (TypeError, ValueError), "num_iters"),
    Case("probes.hessian_trace/distribution-bad", lambda f: probes.hessian_trace(
        f.loss_fn, distribution="normal01"), ValueError, "distribution"),
    Case("probes.every/n-zero", lambda f: probes.every(0, probes.update_ratios()), ValueError,
         "n"),
    Case("probes.gradient_stats/microbatches-zero", lambda f: probes.gradient_stats(
        f.loss_fn, num_microbatches=0), ValueError, "num_microbatches"),
    Case("probes.weight_metrics/field-bad", lambda f: probes.weight_metrics(
        fields=("spectral_norm", "bogus")), ValueError, "fields|bogus"),
    Case("probes.combine/not-probe", lambda f: probes.combine(3), TypeError, "probe"),
    # -- telemetry ----------------------------------------------------------------------
    Case("telemetry/load-missing", lambda f: telemetry.load_telemetry(f.tmp / "missing.jsonl"),
         FileNotFoundError, "missing.jsonl"),
    Case("telemetry/load-empty", lambda f: telemetry.load_telemetry(_write(f, "empty.jsonl",
                                                                           "")),
         ValueError, "empty.jsonl"),
    Case("telemetry/load-text", lambda f: telemetry.load_telemetry(_write(
        f, "notes.txt", "hello world\n")), ValueError, "notes.txt"),
    Case("telemetry/load-foreign-json", lambda f: telemetry.load_telemetry(_write(
        f, "other.jsonl", json.dumps({"loss": 1.0}) + "\n")), ValueError, "other.jsonl"),
    Case("telemetry/writer-mode-bad", lambda f: telemetry.TelemetryWriter(
        f.tmp / "m.jsonl", mode="x+"), ValueError, "mode"),
    Case("telemetry/write-step-string", lambda f: _writer(f, "s.jsonl").write(
        "3", {"loss": 1.0}), (TypeError, ValueError), "step"),
    Case("telemetry/write-metrics-not-mapping", lambda f: _writer(f, "m2.jsonl").write(
        1, [1.0, 2.0]), (TypeError, ValueError), "metrics"),
    Case("telemetry/rolling-window-zero", lambda f: telemetry.rolling_variance(
        np.ones(10), 0), ValueError, "window"),
    Case("telemetry/cross-correlation-lengths", lambda f: telemetry.cross_correlation(
        np.ones(10), np.ones(9), max_lag=2), ValueError, "x|y"),
    # interior NaNs are gaps (probes every n steps) and are interpolated; an all-NaN series
    # is refused
    Case("telemetry/autocorrelation-all-nan", lambda f: telemetry.autocorrelation_time(
        np.full(30, NAN)), ValueError, "x has only 0"),
    Case("telemetry/autocorrelation-c-negative", lambda f: telemetry.autocorrelation_time(
        np.arange(30.0), c=-1.0), ValueError, "c must"),
]


def _write(f, name, text):
    path = f.tmp / name
    path.write_text(text)
    return path


_WRITERS: list = []


def _writer(f, name):
    w = telemetry.TelemetryWriter(f.tmp / name)
    _WRITERS.append(w)
    return w


@pytest.fixture(scope="module", autouse=True)
def _close_writers():
    yield
    for w in _WRITERS:
        w.close()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_raises_naming_the_argument(case, fx):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(case.exc, match=case.match) as info:
            case.call(fx)
    # never a bare XLA / JAX-internal message as the only text
    assert "XlaRuntimeError" not in type(info.value).__name__
    assert "Traceback" not in str(info.value)


def test_wrong_kind_errors_are_type_errors_that_old_value_error_handlers_catch():
    from gradience_jax._validate import check_int, check_real

    for call in (lambda: check_int("3", "k"), lambda: check_real("1e-3", "tol"),
                 lambda: check_int(True, "k")):
        with pytest.raises(ArgumentTypeError) as info:
            call()
        assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


CLI_CASES = [
    ("analyze/k-absurd", ("analyze", "--k", "100000", "--iters", "2"), "--k|--iters"),
    ("analyze/k-zero", ("analyze", "--k", "0"), "--k"),
    ("analyze/iters-negative", ("analyze", "--iters", "-3"), "--iters"),
    ("analyze/k-string", ("analyze", "--k", "ten"), "--k"),
    ("analyze/family-bad", ("analyze", "--model", "resnet9000"), "--model|resnet9000"),
    ("weights/missing-file", ("weights", "/nonexistent/ckpt.msgpack"), "nonexistent"),
    ("protocol/unknown", ("protocol", "Z"), "protocol|Z"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c[0])
def test_cli_bad_input_exits_2_naming_the_flag(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _cli(*case[1])
    assert code == 2, (code, err)
    import re

    assert re.search(case[2], err), err


def test_table_is_large_enough():
    assert len(CASES) + len(CLI_CASES) >= 80
