"""Protocol B: grokking of modular addition, with dense telemetry.

Supported names: :class:`ProtocolBConfig`, :data:`FAST_B`, :class:`ProtocolBResult`,
:class:`GrokkingSummary`, :func:`grokking_summary`, :data:`TRANSITION_METRICS`,
:func:`transition_statistics`, :func:`evaluation_probe`, :func:`run_protocol_b`. The model is
:class:`gradience_jax.models.ModularAdditionMLP`, the data
:func:`gradience_jax.data.modular_addition`, the figure
:func:`gradience_jax.plots.protocols.plot_protocol_b`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gradience_jax import probes, telemetry
from gradience_jax.data import modular_addition
from gradience_jax.environment import fast_mode
from gradience_jax.experiments import protocol_runner as runner
from gradience_jax.experiments.protocol_columns import series
from gradience_jax.models import ModularAdditionMLP, from_nnx
from gradience_jax.operators import heads

PyTree = Any

__all__ = [
    "FAST_B",
    "GrokkingSummary",
    "ProtocolBConfig",
    "ProtocolBResult",
    "TRANSITION_METRICS",
    "evaluation_probe",
    "grokking_summary",
    "run_protocol_b",
    "transition_statistics",
]


class ProtocolBConfig(NamedTuple):
    """Settings of :func:`run_protocol_b`.

    Attributes:
        p: the modulus.
        width: hidden units ``N``.
        train_fraction: share of the ``p^2`` pairs used for training (full batch).
        learning_rate, b1, b2, weight_decay: AdamW.
        steps: full-batch AdamW steps.
        test_every: steps between test-set evaluations.
        weights_every: steps between weight-metric probes.
        sharpness_every: steps between sharpness probes (0: off).
        num_iters: warm-started Lanczos iterations per sharpness probe.
        window: rolling window (samples) of the transition statistics.
        chunk: steps per jitted ``lax.scan``.
        seed: data split, initialisation and probe keys.
    """

    p: int = 97
    width: int = 500
    train_fraction: float = 0.3
    learning_rate: float = 1e-2
    b1: float = 0.9
    b2: float = 0.98
    weight_decay: float = 1.0
    steps: int = 400
    test_every: int = 1
    weights_every: int = 1
    sharpness_every: int = 10
    num_iters: int = 5
    window: int = 20
    chunk: int = 50
    seed: int = 0


FAST_B = ProtocolBConfig(p=31, width=256, train_fraction=0.6, steps=200, window=10)
"""The small settings of Protocol B (``fast=True``: ``p = 31``)."""

TRANSITION_METRICS = ("log_loss", "grad_norm", "weights/global_norm",
                      "weights/embed/kernel/stable_rank", "weights/readout/kernel/stable_rank",
                      "weights/embed/kernel/effective_rank", "sharpness/eigenvalue")
"""The metrics whose statistics :func:`run_protocol_b` reports around the transition."""


class GrokkingSummary(NamedTuple):
    """Where the grokking run memorised and where it generalised.

    Attributes:
        fit_step: first step with train accuracy ``>= train_threshold`` (None: never).
        generalization_step: first step with test accuracy ``>= test_threshold``.
        transition_step: first step with test accuracy ``>= 0.5`` (the transition's middle).
        delay: ``generalization_step - fit_step`` (None if either is missing).
        grokked: both reached, the training set first.
    """

    fit_step: int | None
    generalization_step: int | None
    transition_step: int | None
    delay: int | None
    grokked: bool


def _first(steps: np.ndarray, values: np.ndarray, threshold: float) -> int | None:
    hit = np.flatnonzero(np.isfinite(values) & (values >= threshold))
    return int(steps[hit[0]]) if hit.size else None


def grokking_summary(
    steps: Any, train_accuracy: Any, test_accuracy: Any, *,
    train_threshold: float = 0.99, test_threshold: float = 0.9,
) -> GrokkingSummary:
    """First steps at which the train and the test accuracy reach their thresholds.

    Args:
        steps: the logged steps.
        train_accuracy: train accuracy per step.
        test_accuracy: test accuracy per step (NaN where it was not evaluated).
        train_threshold: "fit" threshold.
        test_threshold: "generalised" threshold.

    Returns:
        :class:`GrokkingSummary`.

    Raises:
        ValueError: the three arrays differ in shape.
    """
    steps = np.asarray(steps)
    tr = np.asarray(train_accuracy, np.float64)
    te = np.asarray(test_accuracy, np.float64)
    if not (steps.shape == tr.shape == te.shape):
        raise ValueError(
            f"steps {steps.shape}, train_accuracy {tr.shape} and test_accuracy {te.shape} "
            "must have the same shape"
        )
    fit = _first(steps, tr, train_threshold)
    gen = _first(steps, te, test_threshold)
    mid = _first(steps, te, 0.5)
    delay = gen - fit if fit is not None and gen is not None else None
    return GrokkingSummary(fit, gen, mid, delay, bool(delay is not None and delay > 0))


class ProtocolBResult(NamedTuple):
    """Result of :func:`run_protocol_b`.

    Attributes:
        config: settings used.
        columns: the telemetry as NumPy columns (``step``, ``loss``, ``train_accuracy``,
            ``test/loss``, ``test/accuracy``, ``weights/...``, ``sharpness/eigenvalue``,
            ``grad_norm``, ``update_ratio``; NaN where not measured).
        summary: :class:`GrokkingSummary`.
        statistics: per metric of :data:`TRANSITION_METRICS`, the
            :func:`transition_statistics` (None where undefined).
        log_path: the JSONL log.
        figures: written figure paths (empty until drawn by
            :func:`gradience_jax.plots.protocols.plot_protocol_b`).
    """

    config: ProtocolBConfig
    columns: dict[str, np.ndarray]
    summary: GrokkingSummary
    statistics: dict[str, dict[str, Any] | None]
    log_path: str
    figures: list[str]


def _loss_and_accuracy(model_fn: Callable, head: Callable, params: PyTree, batch: PyTree
                       ) -> tuple[jax.Array, jax.Array]:
    out = model_fn(params, batch)
    acc = jnp.mean((jnp.argmax(out, -1) == batch["labels"]).astype(jnp.float32))
    return head(out, batch), acc


def evaluation_probe(model_fn: Callable, head: Callable, name: str) -> probes.Probe:
    """A probe of the loss and accuracy on whatever batch it is given (e.g. the test set).

    Args:
        model_fn: ``model_fn(params, batch) -> logits``.
        head: ``head(logits, batch) -> loss``.
        name: metric prefix.

    Returns:
        A stateless :class:`gradience_jax.probes.Probe` measuring ``<name>/loss`` and
        ``<name>/accuracy`` (argmax of the logits against ``batch["labels"]``); one
        forward pass.
    """

    def apply(params, batch, key, state):
        loss, acc = _loss_and_accuracy(model_fn, head, params, batch)
        return {f"{name}/loss": loss, f"{name}/accuracy": acc}, state

    return probes.Probe(name, lambda params: (), apply)


def transition_statistics(cols: Mapping[str, np.ndarray], key: str, fit: int | None,
                          mid: int | None, window: int, seed: int) -> dict[str, Any] | None:
    """Statistics of one metric's increments before and after the grokking transition.

    Args:
        cols: telemetry columns.
        key: the metric.
        fit: the step the training set was fit (:attr:`GrokkingSummary.fit_step`).
        mid: the transition's middle (:attr:`GrokkingSummary.transition_step`).
        window: rolling window in samples (capped at a third of the plateau, at least 3).
        seed: the surrogates' seed.

    Returns:
        ``{"window", "samples_before", "tau_before", "tau_after", "var_before",
        "var_after", "variance_trend_tau", "variance_trend_p",
        "autocorrelation_trend_tau", "autocorrelation_trend_p"}``: integrated
        autocorrelation times and variances of the increments between fitting and the
        transition / after it, and the precursor trends (Kendall tau and surrogate
        p-value of the rolling variance and lag-1 autocorrelation before the transition);
        entries None where undefined. None when ``fit`` / ``mid`` is missing or the
        metric has fewer than 8 samples.
    """
    if fit is None or mid is None or key not in cols:
        return None
    st, x = series(cols, key)
    if x.size < 8:
        return None
    dx = np.diff(x)
    ds = st[1:]
    i0, i1 = int(np.searchsorted(ds, fit)), int(np.searchsorted(ds, mid))
    before, after = dx[i0:i1], dx[i1:]
    w = max(3, min(window, (i1 - i0) // 3))
    out: dict[str, Any] = {"window": w, "samples_before": int(before.size)}

    def tau(seg):
        try:
            return float(telemetry.autocorrelation_time(seg).tau) if seg.size >= 8 else None
        except ValueError:
            return None

    out["tau_before"], out["tau_after"] = tau(before), tau(after)
    out["var_before"] = float(np.var(before)) if before.size > 1 else None
    out["var_after"] = float(np.var(after)) if after.size > 1 else None
    for kind in ("variance", "autocorrelation"):
        try:
            pt = telemetry.precursor_trend(dx, i1, window=w, start=i0, indicator=kind,
                                           num_surrogates=99, seed=seed)
            out[f"{kind}_trend_tau"] = float(pt.kendall_tau)
            out[f"{kind}_trend_p"] = float(pt.p_value)
        except ValueError:
            out[f"{kind}_trend_tau"] = out[f"{kind}_trend_p"] = None
    return out


@runner.closes_logs_on_error
def run_protocol_b(
    config: ProtocolBConfig | None = None,
    *,
    fast: bool | None = None,
    log_dir: str | os.PathLike | None = runner.DEFAULT_LOG_DIR,
) -> ProtocolBResult:
    """Protocol B: grokking of modular addition with dense telemetry.

    :class:`gradience_jax.models.ModularAdditionMLP` (quadratic activation) learns
    ``a + b mod p`` from a fraction of all pairs with full-batch AdamW and weight decay,
    MSE on one-hot targets (``gj.heads.mse``). Measured on CPU with the defaults
    (``p = 97``, ``N = 500``, train fraction 0.3, lr 1e-2, betas (0.9, 0.98), weight decay
    1): train accuracy reaches 0.99 by step ~20, test accuracy 0.9 only at step ~130 (with
    weight decay 5 and fraction 0.5 there is no delay). Every step logs train / test loss
    and accuracy, the gradient norm, the update-to-weight ratio and the weight metrics
    (norm, effective / stable rank per layer); the sharpness (warm-started Lanczos) every
    ``sharpness_every`` steps. The transition statistics (:func:`transition_statistics`)
    compare the plateau between fitting and the transition with the time after it.

    Args:
        config: settings (default: full, or :data:`FAST_B` in fast mode: ``p = 31``).
        fast: small settings (default: the ``GRADIENCE_FAST`` environment variable).
        log_dir: directory of the JSONL log ``protocol_B_grokking.jsonl``.

    Returns:
        :class:`ProtocolBResult` (no figures: draw them with
        :func:`gradience_jax.plots.protocols.plot_protocol_b`).

    Raises:
        ValueError: bad settings; OSError: unwritable ``log_dir`` (before any training).
    """
    fast = fast_mode(fast)
    if config is None:
        config = FAST_B if fast else ProtocolBConfig()
    steps, chunk = runner.check_steps(config.steps, config.chunk)
    writer = runner.open_log(log_dir, "protocol_B_grokking", config)
    train, test = modular_addition(jax.random.key(config.seed), config.p, config.train_fraction)
    model = ModularAdditionMLP(config.p, config.width, rngs=nnx.Rngs(config.seed))
    adapted = from_nnx(model, heads.mse())
    tx = optax.adamw(config.learning_rate, b1=config.b1, b2=config.b2,
                     weight_decay=config.weight_decay)
    optimizer = lambda _: tx  # noqa: E731 - the learning rate is fixed (one run)
    train_probe = runner.combine_probes(
        *runner.probe_every(config.weights_every, probes.weight_metrics(
            fields=("frobenius_norm", "stable_rank", "effective_rank"))),
        *runner.probe_every(config.sharpness_every, probes.hessian_eigenvalues(
            adapted.loss_fn, num_iters=config.num_iters, name="sharpness")),
    )
    test_probe = probes.every(config.test_every,
                              evaluation_probe(adapted.model_fn, adapted.head, "test"))

    def loss_fn(params, batch):
        loss, acc = _loss_and_accuracy(adapted.model_fn, adapted.head, params, batch)
        return loss, {"log_loss": jnp.log(loss), "train_accuracy": acc}

    chunk_fn = runner.train_chunk(loss_fn, train_probe, optimizer,
                                  key=jax.random.key(config.seed + 1), low_opt=fast,
                                  has_aux=True, eval_probe=test_probe)
    carry = runner.init_carry(adapted.params, optimizer, None, train_probe, test_probe)
    runner.run_chunks(chunk_fn, carry, (None, train, test), steps=steps, chunk=chunk,
                      writer=writer)
    cols = runner.read_columns(writer)
    summary = grokking_summary(cols["step"], cols["train_accuracy"], cols["test/accuracy"])
    stats = {key: transition_statistics(cols, key, summary.fit_step, summary.transition_step,
                                        config.window, config.seed)
             for key in TRANSITION_METRICS}
    return ProtocolBResult(config, cols, summary, stats, str(writer.path), [])
