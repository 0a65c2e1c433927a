"""Protocol C: Fisher geometry during training, at a small and a large learning rate.

Supported names: :class:`ProtocolCConfig`, :data:`FAST_C`, :class:`ProtocolCRun`,
:class:`ProtocolCResult`, :func:`fisher_report`, :func:`kappa_correlations`,
:func:`run_protocol_c`. The figure is :func:`gradience_jax.plots.protocols.plot_protocol_c`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gradience_jax import data as gdata
from gradience_jax import probes
from gradience_jax import tree as tu
from gradience_jax.environment import fast_mode
from gradience_jax.experiments import protocol_runner as runner
from gradience_jax.experiments.protocol_columns import layer_keys, series, short_name
from gradience_jax.geometry import fisher_geometry
from gradience_jax.models import MLP, Adapted, from_nnx
from gradience_jax.operators import heads
from gradience_jax.operators.ggn import ggn

PyTree = Any

__all__ = [
    "FAST_C",
    "ProtocolCConfig",
    "ProtocolCResult",
    "ProtocolCRun",
    "fisher_report",
    "kappa_correlations",
    "run_protocol_c",
]


class ProtocolCConfig(NamedTuple):
    """Settings of :func:`run_protocol_c`.

    Attributes:
        learning_rates, labels: one full-batch GD run per rate.
        steps: GD steps per run.
        num_points, input_dim, num_classes, separation: the Gaussian-blob classification.
        hidden: tanh hidden widths (keep ``n_params <= 2000`` for exact dense geometry).
        geometry_every: steps between Fisher-geometry reports (host side, the chunk size).
        probe_every: steps between the jitted GGN-top and weight probes.
        damping: ``lam`` in ``kappa(F + lam I)``, ``d_eff(lam)`` and ``(F + lam I)^-1 g``.
        k: top eigenvalues reported.
        seed: data, initialisation and keys.
    """

    learning_rates: tuple[float, ...] = (0.1, 2.0)
    labels: tuple[str, ...] = ("small lr", "large lr")
    steps: int = 400
    num_points: int = 256
    input_dim: int = 8
    num_classes: int = 4
    separation: float = 1.0
    hidden: tuple[int, ...] = (32, 32)
    geometry_every: int = 20
    probe_every: int = 5
    damping: float = 1e-3
    k: int = 5
    seed: int = 0


FAST_C = ProtocolCConfig(steps=120, hidden=(16,), geometry_every=20, probe_every=5)
"""The small settings of Protocol C (``fast=True``)."""


class ProtocolCRun(NamedTuple):
    """One learning rate of Protocol C.

    Attributes:
        label, lr: the run's name and learning rate.
        columns: telemetry columns: ``loss``, ``accuracy``, ``ggn_top/eigenvalue`` and
            ``weights/...`` from the jitted probes; ``fisher/trace``, ``fisher/trace_sq``,
            ``fisher/participation_ratio``, ``fisher/top_eigenvalues`` ``(T, k)``,
            ``fisher/condition_number``, ``fisher/effective_dimension``,
            ``fisher/ng_alignment``, ``fisher/cg_converged`` from the host-side reports.
        log_path: the JSONL log.
    """

    label: str
    lr: float
    columns: dict[str, np.ndarray]
    log_path: str


class ProtocolCResult(NamedTuple):
    """Result of :func:`run_protocol_c`.

    Attributes:
        config: settings used.
        runs: one :class:`ProtocolCRun` per learning rate.
        correlations: per run label, :func:`kappa_correlations` of its columns.
        figures: written figure paths (empty until drawn by
            :func:`gradience_jax.plots.protocols.plot_protocol_c`).
    """

    config: ProtocolCConfig
    runs: list[ProtocolCRun]
    correlations: dict[str, dict[str, float | None]]
    figures: list[str]


def fisher_report(adapted: Adapted, params: PyTree, batch: PyTree, config: ProtocolCConfig,
                  key: jax.Array) -> dict[str, Any]:
    """Host-side Fisher geometry of the GGN (the Fisher information for softmax CE).

    :func:`gradience_jax.geometry.fisher_geometry` with ``config.damping``, the top
    ``config.k`` eigenvalues and 30 Hutchinson samples (its warnings silenced).

    Args:
        adapted: the model (``model_fn``, ``head``, ``loss_fn``).
        params: where to measure.
        batch: the full batch.
        config: damping and ``k``.
        key: the estimators' key.

    Returns:
        ``{"fisher/trace", "fisher/trace_sq", "fisher/participation_ratio",
        "fisher/top_eigenvalues", "fisher/condition_number", "fisher/effective_dimension",
        "fisher/ng_alignment", "fisher/cg_converged"}``, or ``{}`` when the gradient is
        zero or not finite.
    """
    op = ggn(adapted.model_fn, adapted.head, params, batch, check=False)
    grad = jax.grad(adapted.loss_fn)(params, batch)
    if not (np.isfinite(float(tu.norm(grad))) and float(tu.norm(grad)) > 0):
        return {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = fisher_geometry(op, grad, damping=config.damping, key=key,
                              k=min(config.k, op.n_params), num_samples=30)
    d = rep.to_dict()
    return {
        "fisher/trace": d["trace"],
        "fisher/trace_sq": d["trace_sq"],
        "fisher/participation_ratio": d["participation_ratio"],
        "fisher/top_eigenvalues": np.asarray(d["top_eigenvalues"]),
        "fisher/condition_number": d["condition_number"],
        "fisher/effective_dimension": d["effective_dimension"],
        "fisher/ng_alignment": d["natural_gradient_alignment"],
        "fisher/cg_converged": bool(d["cg_converged"]),
    }


def kappa_correlations(cols: Mapping[str, np.ndarray]) -> dict[str, float | None]:
    """Pearson correlation of ``log kappa(F)`` with each layer's ``log kappa(W)``.

    Args:
        cols: a run's telemetry columns (``fisher/condition_number`` at the report steps,
            ``weights/<layer>/condition_number`` from the probes).

    Returns:
        ``{layer short name: correlation}``, None where fewer than 3 finite pairs or a
        constant series.
    """
    fs, fk = series(cols, "fisher/condition_number")
    out: dict[str, float | None] = {}
    for key in layer_keys(cols, "weights/", "condition_number"):
        v = np.asarray(cols[key], np.float64)
        idx = np.searchsorted(cols["step"], fs)
        x, y = np.log(fk), np.log(v[idx])
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() < 3 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
            out[short_name(key)] = None
        else:
            out[short_name(key)] = float(np.corrcoef(x[ok], y[ok])[0, 1])
    return out


@runner.closes_logs_on_error
def run_protocol_c(
    config: ProtocolCConfig | None = None,
    *,
    fast: bool | None = None,
    log_dir: str | os.PathLike | None = runner.DEFAULT_LOG_DIR,
) -> ProtocolCResult:
    """Protocol C: the Fisher metric during training at a small and a large learning rate.

    A tanh MLP classifies Gaussian blobs (softmax cross-entropy, full-batch GD). Every
    ``geometry_every`` steps the host computes :func:`fisher_report` (exact dense linear
    algebra for small models, matrix-free otherwise): ``tr F``, ``tr F^2``, participation
    ratio, top-``k`` eigenvalues, ``kappa(F + lam I)``, ``d_eff(lam)`` and the
    natural-gradient alignment ``cos(g, (F + lam I)^-1 g)`` (conjugate gradients), and the
    accuracy. Inside the jitted step the warm-started GGN top eigenvalue and the weight
    matrices' condition numbers are probed every ``probe_every`` steps.

    Args:
        config: settings (default: full, or :data:`FAST_C` in fast mode).
        fast: small settings (default: the ``GRADIENCE_FAST`` environment variable).
        log_dir: directory of the JSONL logs ``protocol_C_<label>.jsonl``.

    Returns:
        :class:`ProtocolCResult` (no figures: draw them with
        :func:`gradience_jax.plots.protocols.plot_protocol_c`).

    Raises:
        ValueError: bad settings; OSError: unwritable ``log_dir`` (before any training).
    """
    fast = fast_mode(fast)
    if config is None:
        config = FAST_C if fast else ProtocolCConfig()
    runner.check_labels(config)
    steps, chunk = runner.check_steps(config.steps, config.geometry_every)
    writers = [runner.open_log(log_dir, f"protocol_C_{lab.replace(' ', '_')}", config,
                               {"lr": lr})
               for lab, lr in zip(config.labels, config.learning_rates)]
    batch = gdata.classification(jax.random.key(config.seed + 1), n=config.num_points,
                                 dim=config.input_dim, num_classes=config.num_classes,
                                 separation=config.separation)
    model = MLP([config.input_dim, *config.hidden, config.num_classes], activation=jnp.tanh,
                rngs=nnx.Rngs(config.seed))
    adapted = from_nnx(model, heads.softmax_cross_entropy())
    probe = probes.combine(
        probes.every(config.probe_every, probes.ggn_eigenvalues(adapted.model_fn, adapted.head)),
        probes.every(config.probe_every, probes.weight_metrics(
            fields=("condition_number", "stable_rank", "spectral_norm"))),
    )
    chunk_fn = runner.train_chunk(adapted.loss_fn, probe, optax.sgd,
                                  key=jax.random.key(config.seed), low_opt=fast)
    key = jax.random.key(config.seed + 2)

    def with_accuracy(carry, s):
        params = carry.params
        out = dict(fisher_report(adapted, params, batch, config, jax.random.fold_in(key, s)))
        logits = adapted.model_fn(params, batch)
        out["accuracy"] = float(jnp.mean(jnp.argmax(logits, -1) == batch["labels"]))
        return out

    runs = []
    for lab, lr, writer in zip(config.labels, config.learning_rates, writers):
        hyper = jnp.asarray(lr, jnp.float32)
        carry = runner.init_carry(adapted.params, optax.sgd, hyper, probe)
        runner.run_chunks(chunk_fn, carry, (hyper, batch, None), steps=steps, chunk=chunk,
                          writer=writer, at_chunk_start=with_accuracy)
        runs.append(ProtocolCRun(lab, float(lr), runner.read_columns(writer), str(writer.path)))
    corr = {run.label: kappa_correlations(run.columns) for run in runs}
    return ProtocolCResult(config, runs, corr, [])
