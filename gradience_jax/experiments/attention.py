"""The attention experiments behind the two attention figures (they train; figures draw).

``attention_geometry_experiment`` trains the seed's attention layer inside a one-block
causal transformer LM and measures its geometry (``attention.attention_geometry``), the
Hessian restricted to the block and a 2-D loss slice in its parameters;
``attention_dynamics_experiment`` records the attention maps' entropy and effective rank
and the rank of ``W_Q W_K^T`` along training.

Supported names: ``AttentionGeometryResult``, ``attention_geometry_experiment``,
``AttentionDynamicsResult``, ``attention_dynamics_experiment``, ``TASKS`` and the quick
settings ``ATTENTION_GEOMETRY_FAST`` / ``ATTENTION_DYNAMICS_FAST``. Training goes through
:func:`gradience_jax.experiments.training.train_scan`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gradience_jax import data as gdata
from gradience_jax import tree as tu
from gradience_jax._validate import check_key
from gradience_jax.attention import (
    AttentionGeometry,
    AttentionParams,
    attention_capture_fn,
    attention_effective_rank,
    attention_entropy,
    attention_geometry,
    qk_effective_rank,
)
from gradience_jax.experiments.training import train_scan
from gradience_jax.landscape.directions import random_direction, restrict_direction
from gradience_jax.landscape.slices import slice_2d
from gradience_jax.models import TinyTransformerLM, from_nnx
from gradience_jax.operators import heads

__all__ = [
    "ATTENTION_DYNAMICS_FAST",
    "ATTENTION_GEOMETRY_FAST",
    "AttentionDynamicsResult",
    "AttentionGeometryResult",
    "TASKS",
    "attention_dynamics_experiment",
    "attention_geometry_experiment",
]

#: Quick settings of :func:`attention_geometry_experiment` (``--fast`` figures, CI).
ATTENTION_GEOMETRY_FAST = {"num_steps": 60, "resolution": 9}
#: Quick settings of :func:`attention_dynamics_experiment` (``--fast`` figures, CI).
ATTENTION_DYNAMICS_FAST = {"num_steps": 100, "record_every": 20}


def _tiny_lm(key, vocab_size, d_model, num_heads, seq_len, d_ff=None):
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    seed = int(jax.random.randint(key, (), 0, 2**30))
    return TinyTransformerLM(vocab_size=vocab_size, d_model=d_model, num_heads=num_heads,
                             num_layers=1, d_ff=d_ff or 2 * d_model, max_len=seq_len,
                             param_dtype=dtype, rngs=nnx.Rngs(seed))


@dataclasses.dataclass(frozen=True)
class AttentionGeometryResult:
    """Data of the ``attention_geometry`` figure (``plots.plot_attention_geometry``).

    Attributes:
        geometry: :class:`AttentionGeometry` of the trained block on the training inputs.
        landscape: ``Slice2D`` of the loss along filter-normalised random directions in the
            attention parameters only (everything else fixed).
        steps, train_loss: the short training run; config: the settings.
    """

    geometry: AttentionGeometry
    landscape: Any
    steps: np.ndarray
    train_loss: np.ndarray
    config: dict


def attention_geometry_experiment(
    key: jax.Array | None = None,
    *,
    vocab_size: int = 16,
    d_model: int = 8,
    num_heads: int = 2,
    seq_len: int = 4,
    num_train: int = 64,
    num_steps: int = 300,
    learning_rate: float = 1e-2,
    resolution: int = 25,
    span: float = 1.0,
) -> AttentionGeometryResult:
    """Train the seed's attention layer in a tiny LM and measure its geometry.

    The seed's attention layer (``d_model`` 8, 2 heads, sequences of 4) sits inside a
    one-block causal transformer LM, trained with Adam on next-token prediction of noisy
    arithmetic progressions (``data.token_sequences``); then its geometry, the Hessian
    restricted to the attention parameters and a 2-D loss slice in those parameters.

    Args:
        key: ``jax.random`` key (default ``jax.random.key(42)``, the one default seed).
        vocab_size: vocabulary size of the LM.
        d_model: model width (one block, ``d_ff = 2 d_model``).
        num_heads: attention heads.
        seq_len: sequence length (also the LM's ``max_len``).
        num_train: training sequences.
        num_steps: steps of the full-batch Adam run
            (:func:`~gradience_jax.experiments.training.train_scan`).
        learning_rate: Adam learning rate.
        resolution: grid points per axis of the 2-D slice in the attention parameters.
        span: the slice covers ``[-span, span]`` along both directions.

    Returns:
        :class:`AttentionGeometryResult`. Quick settings: :data:`ATTENTION_GEOMETRY_FAST`.
    """
    key = check_key(key)
    k_model, k_data, k_train, k_dir = jax.random.split(key, 4)
    model = _tiny_lm(k_model, vocab_size, d_model, num_heads, seq_len)
    batch = gdata.token_sequences(k_data, n=num_train, seq_len=seq_len, vocab_size=vocab_size)
    adapted = from_nnx(model, heads.softmax_cross_entropy())
    res = train_scan(adapted.loss_fn, adapted.params, batch,
                     optimizer=optax.adam(learning_rate), num_steps=num_steps, key=k_train,
                     record_every=max(1, num_steps // 20))
    nnx.update(model, res.params)
    layer = "blocks/0/attention"
    geo = attention_geometry(model, batch["inputs"], layer=layer, loss_fn=adapted.loss_fn,
                             batch=batch)
    in_block = lambda path, leaf: path.startswith(layer + "/")  # noqa: E731
    k1, k2 = jax.random.split(k_dir)
    d1 = restrict_direction(random_direction(k1, res.params), in_block)
    d2 = restrict_direction(random_direction(k2, res.params), in_block)
    grid = np.linspace(-span, span, resolution)
    land = slice_2d(adapted.loss_fn, res.params, batch, d1, d2, grid, grid)
    config = dict(vocab_size=vocab_size, d_model=d_model, num_heads=num_heads, seq_len=seq_len,
                  num_train=num_train, num_steps=num_steps, learning_rate=learning_rate)
    return AttentionGeometryResult(geo, land, res.steps, res.train_loss, config)


@dataclasses.dataclass(frozen=True)
class AttentionDynamicsResult:
    """Data of the ``attention_training_dynamics`` figure.

    Attributes:
        steps: ``(R,)`` recorded steps; train_loss / eval_loss ``(R,)``.
        entropy, normalized_entropy, effective_rank: ``(R, H)`` per head on the eval inputs.
        qk_effective_rank: ``(R, H)`` effective rank of ``W_Q^h W_K^h^T``.
        weights_first / weights_last: ``(H, T, S)`` maps of the first eval sequence at the
            first and last recorded step.
    """

    steps: np.ndarray
    train_loss: np.ndarray
    eval_loss: np.ndarray
    entropy: np.ndarray
    normalized_entropy: np.ndarray
    effective_rank: np.ndarray
    qk_effective_rank: np.ndarray
    weights_first: np.ndarray
    weights_last: np.ndarray
    config: dict


def _copy_first_data(key: jax.Array, n: int, seq_len: int, vocab_size: int) -> dict:
    """Uniform random tokens; every position's label is the sequence's first token."""
    x = jax.random.randint(key, (n, seq_len), 0, vocab_size).astype(jnp.int32)
    return {"inputs": x, "labels": jnp.broadcast_to(x[:, :1], x.shape).astype(jnp.int32)}


#: The tasks of :func:`attention_dynamics_experiment`.
TASKS = ("copy_first", "progression")


def attention_dynamics_experiment(
    key: jax.Array | None = None,
    *,
    task: str = "copy_first",
    vocab_size: int = 16,
    d_model: int = 16,
    num_heads: int = 2,
    seq_len: int = 8,
    num_train: int = 128,
    num_eval: int = 64,
    num_steps: int = 300,
    record_every: int = 10,
    learning_rate: float = 3e-3,
    batch_size: int | None = 32,
) -> AttentionDynamicsResult:
    """Train a one-block causal transformer LM and record how its attention evolves.

    Adam on minibatches; every ``record_every`` steps it records the loss, each head's
    attention entropy and effective rank (of the maps on held-out sequences) and the
    effective rank of ``W_Q W_K^T``.

    Tasks: ``"copy_first"`` (random tokens, every label is the first token: solving it needs
    attention to position 0, so the maps collapse to rank about one) or ``"progression"``
    (next token of noisy arithmetic progressions, ``data.token_sequences``: solvable mostly
    from the previous tokens' embeddings, attention changes little).

    Args:
        key: ``jax.random`` key (default ``jax.random.key(42)``, the one default seed).
        task: one of :data:`TASKS`.
        vocab_size: vocabulary size of the LM.
        d_model: model width (one block, ``d_ff = 2 d_model``).
        num_heads: attention heads.
        seq_len: sequence length (also the LM's ``max_len``).
        num_train: training sequences.
        num_eval: held-out sequences (the maps are measured on them).
        num_steps: steps of the Adam run
            (:func:`~gradience_jax.experiments.training.train_scan`).
        record_every: recording period in steps (must divide ``num_steps``).
        learning_rate: Adam learning rate.
        batch_size: minibatch size (capped at ``num_train``; None: full batch).

    Returns:
        :class:`AttentionDynamicsResult`. Quick settings: :data:`ATTENTION_DYNAMICS_FAST`.

    Raises:
        ValueError: unknown ``task``, ``num_steps`` not a multiple of ``record_every``.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    key = check_key(key)
    k_model, k_data, k_eval, k_train = jax.random.split(key, 4)
    model = _tiny_lm(k_model, vocab_size, d_model, num_heads, seq_len)
    make = _copy_first_data if task == "copy_first" else (
        lambda k, n, t, v: gdata.token_sequences(k, n=n, seq_len=t, vocab_size=v))
    train_data = make(k_data, num_train, seq_len, vocab_size)
    eval_data = make(k_eval, num_eval, seq_len, vocab_size)
    adapted = from_nnx(model, heads.softmax_cross_entropy())
    bs = None if batch_size is None else min(int(batch_size), num_train)
    res = train_scan(adapted.loss_fn, adapted.params, train_data,
                     optimizer=optax.adam(learning_rate), num_steps=num_steps, key=k_train,
                     batch_size=bs, eval_data=eval_data, record_every=record_every)
    layer = "blocks/0/attention"
    stats = _trajectory_stats(attention_capture_fn(model), layer, res.trajectory,
                              eval_data["inputs"])
    ent, nent, erank, w0, w1 = (np.asarray(x, np.float64) for x in stats)
    flat = dict(zip(tu.leaf_paths(res.trajectory), jax.tree_util.tree_leaves(res.trajectory)))
    stacked = AttentionParams(*(flat[f"{layer}/{n}/kernel"]
                                for n in ("query", "key", "value", "out")))
    qk = np.asarray(_qk_erank_stacked(stacked), np.float64)
    config = dict(task=task, vocab_size=vocab_size, d_model=d_model, num_heads=num_heads,
                  seq_len=seq_len, num_train=num_train, num_eval=num_eval, num_steps=num_steps,
                  record_every=record_every, learning_rate=learning_rate, batch_size=bs)
    return AttentionDynamicsResult(res.steps, res.train_loss, res.eval_loss, ent, nent, erank,
                                   qk, w0, w1, config)


@jax.jit
def _qk_erank_stacked(stacked: AttentionParams) -> jax.Array:
    return jax.vmap(qk_effective_rank)(stacked)


@functools.partial(jax.jit, static_argnames=("capture", "layer"))
def _trajectory_stats(capture, layer, trajectory, inputs):
    def one(p):
        w = capture(p, inputs)[layer].weights
        return attention_entropy(w), attention_entropy(w, normalized=True), \
            attention_effective_rank(w), w[0]

    ent, nent, erank, maps = jax.lax.map(one, trajectory)
    return ent, nent, erank, maps[0], maps[-1]

