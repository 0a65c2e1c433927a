"""Protocol D: rank evolution across architectures (MLP, CNN, transformer).

Supported names: :class:`ProtocolDConfig`, :data:`FAST_D`, :data:`ARCHITECTURES`,
:class:`ProtocolDResult`, :func:`protocol_d_case`, :func:`matrix_shapes`,
:func:`run_protocol_d`. The figure is :func:`gradience_jax.plots.protocols.plot_protocol_d`.
"""

from __future__ import annotations

import os
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
from gradience_jax.models import CNN, MLP, Adapted, TinyTransformerLM, from_nnx
from gradience_jax.operators import heads
from gradience_jax.weights import apply_reshape_rule, reshape_rule_for

PyTree = Any

__all__ = [
    "ARCHITECTURES",
    "FAST_D",
    "ProtocolDConfig",
    "ProtocolDResult",
    "matrix_shapes",
    "protocol_d_case",
    "run_protocol_d",
]

ARCHITECTURES = ("mlp", "cnn", "transformer")
"""The architectures Protocol D knows."""


class ProtocolDConfig(NamedTuple):
    """Settings of :func:`run_protocol_d`.

    Attributes:
        architectures: any of ``"mlp"`` (classification), ``"cnn"`` (tiny images),
            ``"transformer"`` (next-token prediction).
        learning_rates, labels: one Adam run per rate and architecture (the second rate is
            10x too large: induced instability).
        steps: full-batch Adam steps per run.
        probe_every: steps between the jitted weight-metric probes.
        alpha_every: steps between host-side power-law fits (the chunk size).
        width: hidden width of the MLP / model width of the transformer.
        num_layers: transformer blocks.
        seed: data, initialisation.
    """

    architectures: tuple[str, ...] = ARCHITECTURES
    learning_rates: tuple[float, ...] = (3e-3, 3e-2)
    labels: tuple[str, ...] = ("normal", "10x lr")
    steps: int = 600
    probe_every: int = 10
    alpha_every: int = 100
    width: int = 64
    num_layers: int = 2
    seed: int = 0


FAST_D = ProtocolDConfig(steps=60, probe_every=5, alpha_every=60, width=32, num_layers=1)
"""The small settings of Protocol D (``fast=True``)."""


class ProtocolDResult(NamedTuple):
    """Result of :func:`run_protocol_d`.

    Attributes:
        config: settings used.
        runs: ``{architecture: {label: columns}}`` (``loss``, ``weights/<layer>/
            effective_rank`` / ``stable_rank`` / ``spectral_norm``, ``alpha/<layer>``).
        shapes: ``{architecture: {layer: (rows, cols)}}`` of the analysed matrices.
        log_paths: the JSONL logs.
        figures: written figure paths (empty until drawn by
            :func:`gradience_jax.plots.protocols.plot_protocol_d`).
    """

    config: ProtocolDConfig
    runs: dict[str, dict[str, dict[str, np.ndarray]]]
    shapes: dict[str, dict[str, tuple[int, int]]]
    log_paths: list[str]
    figures: list[str]


def protocol_d_case(arch: str, config: ProtocolDConfig) -> tuple[Adapted, dict]:
    """The model and full batch of one architecture.

    Args:
        arch: ``"mlp"`` (Gaussian blobs, 8 classes), ``"cnn"`` (8x8 template images, 10
            classes) or ``"transformer"`` (arithmetic token sequences).
        config: width, layers, seed.

    Returns:
        ``(adapter with the softmax cross-entropy head, batch)``.

    Raises:
        ValueError: unknown ``arch``.
    """
    key = jax.random.key(config.seed + 1)
    rngs = nnx.Rngs(config.seed)
    w = config.width
    if arch == "mlp":
        batch = gdata.classification(key, n=512, dim=32, num_classes=8, separation=1.0)
        model = MLP([32, 2 * w, 2 * w, 8], activation=jax.nn.relu, rngs=rngs)
    elif arch == "cnn":
        batch = gdata.images(key, n=256, size=8, num_classes=10)
        model = CNN(channels=(16, 32), image_size=8, num_classes=10, rngs=rngs)
    elif arch == "transformer":
        batch = gdata.token_sequences(key, n=64, seq_len=16, vocab_size=32)
        model = TinyTransformerLM(vocab_size=32, d_model=w, num_heads=2,
                                  num_layers=config.num_layers, max_len=16, rngs=rngs)
    else:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {arch!r}")
    return from_nnx(model, heads.softmax_cross_entropy()), batch


def matrix_shapes(params: PyTree) -> dict[str, tuple[int, int]]:
    """Shapes of the 2-D matrices the weight metrics analyse.

    The leaves :func:`gradience_jax.probes.weight_metrics` measures (floating leaves with a
    :func:`gradience_jax.weights.reshape_rule_for` rule), reshaped by that rule; no data is
    touched (``jax.eval_shape``).

    Args:
        params: a parameter pytree.

    Returns:
        ``{leaf path: (rows, cols)}``.
    """
    out = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            continue
        path = tu.path_str(kp)
        rule, _ = reshape_rule_for(path, tuple(np.shape(leaf)))
        if rule is not None:
            shape = jax.eval_shape(lambda a, r=rule: apply_reshape_rule(a, r), leaf).shape
            out[path] = tuple(int(d) for d in shape)
    return out


@runner.closes_logs_on_error
def run_protocol_d(
    config: ProtocolDConfig | None = None,
    *,
    fast: bool | None = None,
    log_dir: str | os.PathLike | None = runner.DEFAULT_LOG_DIR,
) -> ProtocolDResult:
    """Protocol D: effective / stable rank and power-law alpha of every layer over training.

    An MLP (Gaussian blobs), a CNN (tiny template images) and a 2-block transformer LM
    (arithmetic token sequences) train with full-batch Adam at a normal and a 10x larger
    learning rate. The jitted weight probe logs every layer's effective rank (entropy of
    the normalised singular values), stable rank and spectral norm every ``probe_every``
    steps; the power-law exponent ``alpha`` of each layer's eigenvalue spectrum is fitted on
    the host (:func:`gradience_jax.weight_spectra`) every ``alpha_every`` steps (NaN for
    matrices too small for a fit). The two rates of one architecture share one compilation.

    Args:
        config: settings (default: full, or :data:`FAST_D` in fast mode).
        fast: small settings (default: the ``GRADIENCE_FAST`` environment variable).
        log_dir: directory of the JSONL logs ``protocol_D_<arch>_<label>.jsonl``.

    Returns:
        :class:`ProtocolDResult` (no figures: draw them with
        :func:`gradience_jax.plots.protocols.plot_protocol_d`).

    Raises:
        ValueError: bad settings (unknown architecture); OSError: unwritable ``log_dir``.
    """
    fast = fast_mode(fast)
    if config is None:
        config = FAST_D if fast else ProtocolDConfig()
    bad = [a for a in config.architectures if a not in ARCHITECTURES]
    if bad:
        raise ValueError(f"architectures must be among {ARCHITECTURES}, got {bad}")
    runner.check_labels(config)
    steps, chunk = runner.check_steps(config.steps, config.alpha_every)
    writers = {
        (arch, lab): runner.open_log(log_dir, f"protocol_D_{arch}_{lab.replace(' ', '_')}",
                                     config, {"architecture": arch, "lr": lr})
        for arch in config.architectures
        for lab, lr in zip(config.labels, config.learning_rates)
    }
    probe = probes.every(config.probe_every, probes.weight_metrics(
        fields=("effective_rank", "stable_rank", "spectral_norm")))
    runs: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    shapes: dict[str, dict[str, tuple[int, int]]] = {}
    for arch in config.architectures:
        adapted, batch = protocol_d_case(arch, config)
        shapes[arch] = matrix_shapes(adapted.params)
        chunk_fn = runner.train_chunk(adapted.loss_fn, probe, optax.adam,
                                      key=jax.random.key(config.seed),
                                      low_opt=fast and arch != "cnn")
        runs[arch] = {}
        for lab, lr in zip(config.labels, config.learning_rates):
            writer = writers[(arch, lab)]
            hyper = jnp.asarray(lr, jnp.float32)
            carry = runner.init_carry(adapted.params, optax.adam, hyper, probe)
            runner.run_chunks(chunk_fn, carry, (hyper, batch, None), steps=steps, chunk=chunk,
                              writer=writer,
                              at_chunk_start=lambda c, s: runner.alpha_metrics(c.params))
            runs[arch][lab] = runner.read_columns(writer)
    return ProtocolDResult(config, runs, shapes, [str(w.path) for w in writers.values()], [])
