"""The one training loop of the experiments: optax minibatch training in one ``lax.scan``.

Supported names: ``train_scan`` (alias ``train``), ``TrainResult`` and ``sam_optimizer``
(SAM as an optax transformation that :func:`train_scan` drives). The seed experiments
(``experiments.seed``) and the attention experiments (``experiments.attention``) train with
it; analyses below this layer never train.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradience_jax._validate import check_batch, check_params
from gradience_jax.landscape.common import LossFn, PyTree, static_callable

__all__ = ["TrainResult", "sam_optimizer", "train", "train_scan"]


class TrainResult(NamedTuple):
    """Outcome of :func:`train_scan`.

    Attributes:
        params: final parameters.
        steps: ``(R,)`` steps at which the state was recorded (``0, every, ..., num_steps``).
        train_loss / eval_loss: ``(R,)`` full-data losses at those steps (eval: None
            without ``eval_data``).
        trajectory: stacked params at those steps (leading axis ``R``).
        step_loss: ``(num_steps,)`` minibatch loss of every step.
    """

    params: PyTree
    steps: np.ndarray
    train_loss: np.ndarray
    eval_loss: np.ndarray | None
    trajectory: PyTree
    step_loss: np.ndarray


@functools.partial(jax.jit, static_argnames=("n", "bs", "num_steps"))
def _minibatch_indices(key, n, bs, num_steps):
    """``(num_steps, bs)`` example indices, each row drawn without replacement."""
    keys = jax.random.split(key, num_steps)
    return jax.vmap(lambda k: jax.random.permutation(k, n)[:bs])(keys)


def sam_optimizer(learning_rate: float, rho: float = 0.05, *, momentum: float | None = None
                  ) -> optax.GradientTransformationExtraArgs:
    """SAM (Foret et al. 2021) as ``optax.contrib.sam`` in opaque mode.

    Every ``update`` takes one normalised ascent step of radius ``rho`` and one SGD step
    with the gradient there (two gradients per step). Needs
    ``update(..., grad_fn=lambda p, i: grad)``; :func:`train_scan` passes it.

    Args:
        learning_rate: the SGD step size.
        rho: the ascent radius.
        momentum: SGD momentum of the descent step (None: plain SGD).

    Returns:
        An ``optax.GradientTransformationExtraArgs``.
    """
    adv = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
    return optax.contrib.sam(optax.sgd(learning_rate, momentum=momentum), adv,
                             sync_period=2, opaque_mode=True)


def train_scan(
    loss_fn: LossFn,
    params: PyTree,
    data: PyTree,
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    key: jax.Array,
    batch_size: int | None = None,
    eval_data: PyTree | None = None,
    record_every: int | None = None,
) -> TrainResult:
    """Minibatch training in one jitted ``lax.scan`` (``record_every`` steps per outer step).

    The inner scan runs ``record_every`` optimiser steps; the outer scan records the
    parameters (the trajectory) and the full-data train / eval losses after each of them,
    so curvature along training (``lambda_max``, ``tr H``, Hessian eigenvalues) can be
    computed afterwards from ``TrainResult.trajectory`` in one vmapped program. Every step
    samples ``batch_size`` examples of ``data`` without replacement (all of them when None)
    and calls ``optimizer.update(grads, state, params, grad_fn=...)`` so that SAM-style
    transformations (:func:`sam_optimizer`) work; plain optax transformations ignore
    ``grad_fn``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params: the initial parameters (a pytree of floating-point arrays).
        data: the training set, a pytree whose leaves share a leading axis ``N``.
        optimizer: any optax transformation.
        num_steps: number of optimiser steps (a multiple of ``record_every``).
        key: ``jax.random`` key of the minibatch indices.
        batch_size: examples per step, ``1 <= batch_size <= N`` (None: full batch).
        eval_data: optional held-out data, evaluated at every recorded step.
        record_every: steps between records (None: only the start and the end).

    Returns:
        A :class:`TrainResult`; ``R = num_steps / record_every + 1`` records (step 0
        included). Memory: ``R`` copies of the parameters for the trajectory.

    Raises:
        ValueError: ``num_steps`` not a non-negative multiple of ``record_every``, bad
            ``batch_size``, invalid ``params`` / ``data``.
    """
    check_params(params)
    n = check_batch(data, "data")
    num_steps = int(num_steps)
    every = int(record_every) if record_every is not None else max(num_steps, 1)
    if num_steps < 0 or every < 1 or (num_steps and num_steps % every):
        raise ValueError(f"num_steps={num_steps} must be a non-negative multiple of "
                         f"record_every={every}")
    bs = n if batch_size is None else int(batch_size)
    if not 1 <= bs <= n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
    opt = optax.with_extra_args_support(optimizer)
    fn = static_callable(loss_fn)

    def full_losses(p, data, eval_data):
        ev = fn(p, eval_data) if eval_data is not None else jnp.zeros(())
        return fn(p, data), ev

    @jax.jit
    def run(params, data, eval_data, indices):
        def step(carry, idx):
            p, s = carry
            mb = jax.tree_util.tree_map(lambda x: x[idx], data) if bs < n else data
            value, g = jax.value_and_grad(fn)(p, mb)
            upd, s = opt.update(g, s, p, grad_fn=lambda q, _: jax.grad(fn)(q, mb))
            return (optax.apply_updates(p, upd), s), value

        def outer(carry, idx):
            carry, values = jax.lax.scan(step, carry, idx)
            return carry, (carry[0], full_losses(carry[0], data, eval_data), values)

        state = opt.init(params)
        (p, _), (traj, (tr, ev), values) = jax.lax.scan(outer, (params, state), indices)
        return p, traj, tr, ev, values.reshape(-1), full_losses(params, data, eval_data)

    if bs < n:
        indices = _minibatch_indices(key, n, bs, num_steps)
    else:
        indices = jnp.zeros((num_steps, 0), jnp.int32)
    indices = indices.reshape(num_steps // every, every, -1)
    p, traj, tr, ev, values, (tr0, ev0) = run(params, data, eval_data, indices)
    traj = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), params, traj)
    steps = np.arange(0, num_steps + 1, every) if num_steps else np.array([0])
    tr = np.concatenate([[float(tr0)], np.asarray(tr, np.float64)])
    ev = (np.concatenate([[float(ev0)], np.asarray(ev, np.float64)])
          if eval_data is not None else None)
    return TrainResult(p, steps, tr, ev, traj, np.asarray(values, np.float64))



#: The historical name of :func:`train_scan` (``gradience_jax.landscape.train``).
train = train_scan
