"""The measurements of the analysis job and the consistency checks between them.

Supported names: :func:`evaluate`, :func:`losses`, :func:`build_operator`, :func:`top_k`,
:func:`trace`, :func:`density`, :func:`landscape_slice`, :func:`weights`,
:func:`consistency_checks`. Each measurement returns JSON-safe data (NumPy arrays allowed;
the report converts them) plus, where the figures need it, the object it measured. The
settings come from :class:`gradience_jax.app.report.AnalysisConfig` (any object with the
same attributes works).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax.operators import registry

PyTree = Any

__all__ = [
    "build_operator",
    "consistency_checks",
    "density",
    "evaluate",
    "landscape_slice",
    "losses",
    "top_k",
    "trace",
    "weights",
]


@functools.partial(jax.jit, static_argnames=("model_fn", "head"))
def _metrics_jit(model_fn: Callable, head: Callable, params: PyTree, batch: dict) -> tuple:
    logits = model_fn(params, batch)
    return head(logits, batch), jnp.mean(jnp.argmax(logits, -1) == batch["labels"])


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def _loss_jit(loss_fn: Callable, params: PyTree, batch: dict) -> jax.Array:
    return loss_fn(params, batch)


def _classifier(adapted: Any, batch: Any) -> bool:
    from gradience_jax.operators.heads import SoftmaxCrossEntropy  # noqa: PLC0415

    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    return (adapted.model_fn is not None and isinstance(adapted.head, SoftmaxCrossEntropy)
            and labels is not None and np.issubdtype(np.asarray(labels).dtype, np.integer))


def evaluate(adapted: Any, params: PyTree, batch: dict) -> dict[str, float | None]:
    """Loss and accuracy of a classifier / language model.

    Args:
        adapted: the model (``loss_fn``, ``model_fn``, ``head``).
        params: its parameters.
        batch: the data.

    Returns:
        ``{"loss", "accuracy"}``: the accuracy (argmax of the last axis against integer
        ``"labels"``) for a softmax cross-entropy head, else None.
    """
    if _classifier(adapted, batch):
        loss, acc = _metrics_jit(adapted.model_fn, adapted.head, params, batch)
        return {"loss": float(loss), "accuracy": float(acc)}
    return {"loss": float(_loss_jit(adapted.loss_fn, params, batch)), "accuracy": None}


def losses(adapted: Any, params: PyTree, train_batch: dict, test_batch: dict | None
           ) -> dict[str, float | None]:
    """``{"train", "test", "train_accuracy", "test_accuracy"}`` (:func:`evaluate` on both).

    Args:
        adapted: the model (``model_fn``, ``head``).
        params: where to measure.
        train_batch: the training data.
        test_batch: the held-out data (None: ``test`` entries are None).

    Returns:
        The train / test losses and accuracies as floats (None where undefined).
    """
    tr = evaluate(adapted, params, train_batch)
    te = evaluate(adapted, params, test_batch) if test_batch is not None else \
        {"loss": None, "accuracy": None}
    return {"train": tr["loss"], "test": te["loss"], "train_accuracy": tr["accuracy"],
            "test_accuracy": te["accuracy"]}


def build_operator(name: str, adapted: Any, params: PyTree, batch: dict) -> Any:
    """The curvature operator ``name`` of the model at ``params`` on ``batch``.

    Args:
        name: a name of :func:`gradience_jax.operators.registry.build` (the report uses
            ``"hessian"``, ``"ggn"``, ``"ef"`` (empirical Fisher) and ``"kfac"``).
        adapted: the model (``loss_fn``, ``model_fn``, ``head``).
        params: where to measure.
        batch: the data.

    Returns:
        A :class:`gradience_jax.LinearOperator`.
    """
    return registry.build(name, loss_fn=adapted.loss_fn, model_fn=adapted.model_fn,
                          head=adapted.head, params=params, batch=batch)


def top_k(op: Any, cfg: Any) -> Any:
    """Top-``cfg.k`` eigenvalues of ``op`` (Lanczos, :func:`gradience_jax.eigsh`).

    Args:
        op: the operator.
        cfg: ``k``, ``iters``, ``reorth``, ``tol``, ``seed``.

    Returns:
        :class:`gradience_jax.SpectrumResult`; at most ``iters`` matvecs (the cap of the
        convergence-driven run).

    Raises:
        ValueError: ``k`` exceeds the operator's ``n_params`` or ``iters < k`` (nothing is
            clamped: the report's settings are the ones used).
    """
    from gradience_jax.spectrum import eigsh  # noqa: PLC0415

    if cfg.k > op.n_params:
        raise ValueError(f"k={cfg.k} exceeds the number of parameters of the {op.name} "
                         f"operator (n_params={op.n_params})")
    if cfg.iters < cfg.k:
        raise ValueError(f"iters={cfg.iters} must be >= k={cfg.k} (Lanczos needs at least k "
                         "matvecs)")
    return eigsh(op, k=cfg.k, which="LA", reorth=cfg.reorth, key=jax.random.key(cfg.seed),
                 tol=cfg.tol, max_iters=cfg.iters, seed=cfg.seed)


def trace(op: Any, cfg: Any) -> dict[str, Any]:
    """Hutchinson trace of ``op`` with ``cfg.trace_samples`` Rademacher probes.

    Args:
        op: the operator.
        cfg: ``trace_samples``, ``seed``.

    Returns:
        ``{"estimate", "stderr", "num_samples", "estimator"}``.
    """
    from gradience_jax.estimators import hutchinson_trace  # noqa: PLC0415

    t = hutchinson_trace(op, jax.random.fold_in(jax.random.key(cfg.seed), 1), cfg.trace_samples)
    return {"estimate": float(t.estimate), "stderr": float(t.stderr),
            "num_samples": cfg.trace_samples, "estimator": "hutchinson (rademacher)"}


def density(op: Any, cfg: Any) -> dict[str, Any]:
    """Spectral density of ``op`` by stochastic Lanczos quadrature, on a 400-point grid.

    Args:
        op: the operator.
        cfg: ``density_probes``, ``density_iters``, ``seed``.

    Returns:
        ``{"operator", "num_probes", "num_iters", "sigma", "grid", "density", "support",
        "nodes", "weights", "trace"}``; the Gaussian width ``sigma`` is 1% of the support,
        ``trace`` the SLQ trace estimate with its standard error over probes.
    """
    from gradience_jax.estimators import spectral_density  # noqa: PLC0415

    iters = min(cfg.density_iters, op.n_params)
    dens = spectral_density(op, jax.random.fold_in(jax.random.key(cfg.seed), 2),
                            num_probes=cfg.density_probes, num_iters=iters)
    nodes = np.asarray(dens.nodes, np.float64)
    weights_ = np.asarray(dens.weights, np.float64)
    lo, hi = float(nodes.min()), float(nodes.max())
    width = max(hi - lo, 1e-12 * max(abs(hi), 1.0), 1e-30)
    sigma = 0.01 * width
    grid = np.linspace(lo - 0.05 * width, hi + 0.05 * width, 400)
    values = np.asarray(dens.evaluate(jnp.asarray(grid), sigma), np.float64)
    per_probe = op.n_params * np.sum(weights_ * nodes, axis=1)
    n = len(per_probe)
    stderr = float(np.std(per_probe, ddof=1) / math.sqrt(n)) if n > 1 else None
    return {
        "operator": op.name, "num_probes": cfg.density_probes, "num_iters": iters,
        "sigma": sigma, "grid": grid, "density": values, "support": [lo, hi],
        "nodes": nodes, "weights": weights_,
        "trace": {"estimate": float(np.mean(per_probe)), "stderr": stderr,
                  "estimator": "stochastic Lanczos quadrature"},
    }


def landscape_slice(adapted: Any, params: PyTree, batch: dict, cfg: Any) -> dict[str, Any]:
    """A 2-D loss slice along two filter-normalised random directions (Li et al. 2018).

    Args:
        adapted: the model (``loss_fn``).
        params: the centre.
        batch: the data.
        cfg: ``grid`` points per axis on ``[-span, span]``, ``seed``.

    Returns:
        ``{"directions", "alphas", "betas", "loss", "center_loss", "min_loss",
        "max_loss", "nonfinite_fraction"}``; ``grid**2`` loss evaluations.
    """
    from gradience_jax import landscape  # noqa: PLC0415

    key = jax.random.fold_in(jax.random.key(cfg.seed), 3)
    d1 = landscape.random_direction(jax.random.fold_in(key, 1), params)
    d2 = landscape.random_direction(jax.random.fold_in(key, 2), params)
    axis = np.linspace(-cfg.span, cfg.span, cfg.grid)
    sl = landscape.slice_2d(adapted.loss_fn, params, batch, d1, d2, axis, axis)
    loss = np.asarray(sl.loss, np.float64)
    i, j = int(np.argmin(np.abs(sl.alphas))), int(np.argmin(np.abs(sl.betas)))
    return {
        "directions": "filter-normalised Gaussian (Li et al. 2018)", "alphas": sl.alphas,
        "betas": sl.betas, "loss": loss, "center_loss": float(loss[i, j]),
        "min_loss": float(np.nanmin(loss)), "max_loss": float(np.nanmax(loss)),
        "nonfinite_fraction": float(sl.nonfinite_fraction),
    }


def weights(params: PyTree) -> tuple[dict[str, Any], Any]:
    """Weight spectra of every layer.

    Args:
        params: the parameter pytree.

    Returns:
        ``(report dict, WeightSpectraReport)`` (:func:`gradience_jax.weight_spectra`).
    """
    from gradience_jax.weights import weight_spectra  # noqa: PLC0415

    rep = weight_spectra(params)
    return rep.to_dict(), rep


def _check(name: str, passed: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "detail": detail}


def consistency_checks(curv: Mapping[str, dict], density_: dict | None) -> list[dict[str, Any]]:
    """Checks between the measurements.

    Per operator: Lanczos converged; for PSD operators the top-k sum is below the trace
    (3 standard errors of slack) and the smallest computed eigenvalue is not negative.
    With a density: Hutchinson vs SLQ trace within 4 combined standard errors, and the
    largest SLQ node not above the Lanczos ``lambda_max``.

    Args:
        curv: ``{operator: {"top_k": SpectrumResult.to_dict(), "trace": ...}}``.
        density_: :func:`density`'s dict (with ``"operator"``) or None.

    Returns:
        ``[{"name", "passed", "detail"}]``.
    """
    out = []
    for name, c in curv.items():
        top = c["top_k"]
        lam = np.asarray(top["eigenvalues"], np.float64)
        out.append(_check(f"{name}_converged", top["converged"],
                          f"{top['iterations']} Lanczos iterations, max Ritz residual "
                          f"{max(top['ritz_residuals']):.2e}"))
        tr = c["trace"]
        if top["is_psd"]:
            slack = 3.0 * tr["stderr"] + 1e-6 * abs(tr["estimate"])
            out.append(_check(f"{name}_topk_below_trace", lam.sum() <= tr["estimate"] + slack,
                              f"sum of top-{len(lam)} = {lam.sum():.6g} <= trace "
                              f"{tr['estimate']:.6g} "
                              f"+ 3 stderr"))
            out.append(_check(f"{name}_psd", lam.min() >= -1e-5 * abs(lam.max()),
                              f"smallest computed eigenvalue {lam.min():.3g}"))
    if density_ is not None and density_["operator"] in curv:
        c = curv[density_["operator"]]
        h, s = c["trace"], density_["trace"]
        err = math.sqrt(h["stderr"] ** 2 + (s["stderr"] or 0.0) ** 2)
        diff = abs(h["estimate"] - s["estimate"])
        out.append(_check("trace_hutchinson_vs_slq", diff <= 4.0 * err + 1e-6 * abs(h["estimate"]),
                          f"|{h['estimate']:.6g} - {s['estimate']:.6g}| = {diff:.3g} vs 4 x "
                          f"combined stderr {err:.3g}"))
        lam_max = max(c["top_k"]["eigenvalues"])
        hi = density_["support"][1]
        out.append(_check("density_support_vs_lambda_max",
                          hi <= lam_max * (1 + 1e-3) + 1e-9 * abs(lam_max),
                          f"largest SLQ node {hi:.6g} vs Lanczos lambda_max {lam_max:.6g}"))
    return out
