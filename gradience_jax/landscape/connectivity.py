"""Interpolation, barriers and mode connectivity between two solutions (numerics only).

``interpolate`` / ``loss_barrier`` along the straight line between two solutions;
``bezier_connect`` trains the control point of a quadratic Bezier curve to lower the
barrier (Garipov et al. 2018, "Loss surfaces, mode connectivity, and fast ensembling");
optax is imported inside it, not at module level.

Supported names: ``Interpolation``, ``interpolate``, ``loss_barrier``, ``bezier_point``,
``BezierResult``, ``bezier_connect``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax import tree as tu
from gradience_jax._validate import check_int, check_key, check_params, check_real
from gradience_jax.landscape.common import (
    LossFn,
    PyTree,
    check_direction,
    check_grid,
    mask_nonfinite,
    static_callable,
)
from gradience_jax.landscape.slices import PointEvaluator, evaluate_points

if TYPE_CHECKING:  # pragma: no cover
    import optax

__all__ = [
    "BezierResult",
    "Interpolation",
    "bezier_connect",
    "bezier_point",
    "interpolate",
    "loss_barrier",
]


_tree_sub = jax.jit(tu.sub)


@jax.jit
def _bezier_offsets(a, control, b):
    """``phi(t) = a + 2t d1 + t^2 d2`` with ``d1 = theta - a``, ``d2 = a - 2 theta + b``."""
    d1 = tu.sub(control, a)
    d2 = jax.tree_util.tree_map(lambda x, c, y: x - 2 * c + y, a, control, b)
    return d1, d2


class Interpolation(NamedTuple):
    """Loss along a path ``t in [0, 1]`` between two solutions.

    Attributes:
        ts: ``(n,)`` path parameters; loss / metric: values there (NaN if not finite).
        barrier: ``max_t loss(t) - (loss(0) + loss(1)) / 2``.
        barrier_t: the ``t`` of the maximum (refined between grid points when asked).
        endpoint_loss: ``(loss(0), loss(1))``.
        nonfinite_fraction: share of path points with a non-finite loss.
    """

    ts: np.ndarray
    loss: np.ndarray
    metric: np.ndarray | None
    barrier: float
    barrier_t: float
    endpoint_loss: tuple[float, float]
    nonfinite_fraction: float


def _path_barrier(path_loss: Callable[[np.ndarray], np.ndarray], ts: np.ndarray,
                  refine: bool, zooms: int = 3, points: int = 32):
    """Evaluate a path loss on ``ts`` (+ the endpoints) and find its barrier.

    With ``refine`` the maximum is refined by ``zooms`` rounds of a ``points``-point grid on
    the bracket around the current best (each round one compiled, vmapped call), shrinking
    the bracket ``points / 2``-fold per round.
    """
    full = np.unique(np.concatenate([ts, [0.0, 1.0]]))
    values = path_loss(full)
    masked, frac = mask_nonfinite(values)
    ends = (float(masked[np.searchsorted(full, 0.0)]), float(masked[np.searchsorted(full, 1.0)]))
    on_ts = masked[np.searchsorted(full, ts)]
    if np.all(np.isnan(masked)):
        return on_ts, float("nan"), float("nan"), ends, frac
    i = int(np.nanargmax(masked))
    t_best, v_best = float(full[i]), float(masked[i])
    if refine and 0 < i < len(full) - 1:
        lo, hi = float(full[i - 1]), float(full[i + 1])
        for _ in range(zooms):
            grid = np.linspace(lo, hi, points)
            vals, _ = mask_nonfinite(path_loss(grid))
            if np.all(np.isnan(vals)):
                break
            j = int(np.nanargmax(vals))
            if vals[j] > v_best:
                t_best, v_best = float(grid[j]), float(vals[j])
            step = grid[1] - grid[0]
            lo, hi = t_best - step, t_best + step
    barrier = v_best - 0.5 * (ends[0] + ends[1])
    return on_ts, float(barrier), t_best, ends, frac


def interpolate(
    loss_fn: LossFn,
    params_a: PyTree,
    params_b: PyTree,
    batch: PyTree,
    *,
    num_points: int = 25,
    ts: Any = None,
    metric_fn: LossFn | None = None,
    refine: bool = True,
    chunk_size: int | None = None,
) -> Interpolation:
    """The loss on the straight line ``(1 - t) a + t b`` and its barrier.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params_a: the solution at ``t = 0``.
        params_b: the solution at ``t = 1`` (same pytree structure as ``params_a``).
        batch: the data passed to ``loss_fn``.
        num_points: points of an even grid on ``[0, 1]`` (ignored when ``ts`` is given).
        ts: explicit strictly increasing path parameters (may leave ``[0, 1]``).
        metric_fn: optional extra function on the same points.
        refine: refine the maximum between grid points (a few zoomed grids).
        chunk_size: points per vmapped chunk (default: from the memory budget).

    Returns:
        :class:`Interpolation`.

    Raises:
        ValueError: mismatched pytrees, bad ``ts`` / ``num_points``.
    """
    if ts is None:
        ts = np.linspace(0.0, 1.0, check_int(num_points, "num_points", lo=2))
    ts = check_grid(ts, "ts")
    check_params(params_a, "params_a")
    params_b = check_direction(params_b, params_a, "params_b")
    direction = _tree_sub(params_b, params_a)
    evaluator = PointEvaluator(loss_fn, params_a, batch, [direction], chunk_size=chunk_size)
    on_ts, barrier, t_best, ends, frac = _path_barrier(
        lambda t: evaluator(np.asarray(t)[:, None])[0], ts, refine)
    metric = None
    if metric_fn is not None:
        metric = evaluate_points(loss_fn, params_a, batch, [direction], ts[:, None],
                                 metric_fn=metric_fn, chunk_size=chunk_size)[1]
    return Interpolation(ts, on_ts, metric, barrier, t_best, ends, frac)


def loss_barrier(
    loss_fn: LossFn,
    params_a: PyTree,
    params_b: PyTree,
    batch: PyTree,
    *,
    num_points: int = 25,
    refine: bool = True,
) -> float:
    """``max_t L((1-t) a + t b) - (L(a) + L(b)) / 2`` on the straight path (0 for ``a == b``).

    Positive: the solutions are separated by a ridge (different basins, or one basin that is
    not convex along the line); about zero: linearly mode-connected (Frankle et al. 2020).

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params_a: the first solution (``t = 0``).
        params_b: the second solution (``t = 1``, same pytree structure).
        batch: the data passed to ``loss_fn``.
        num_points: points of the even grid on ``[0, 1]``, as in :func:`interpolate`.
        refine: refine the maximum between grid points, as in :func:`interpolate`.

    Returns:
        The barrier (a float; NaN when the loss is nowhere finite on the path).

    Raises:
        ValueError: mismatched pytrees, ``num_points < 2``.
    """
    return interpolate(loss_fn, params_a, params_b, batch, num_points=num_points,
                       refine=refine).barrier


def bezier_point(params_a: PyTree, control: PyTree, params_b: PyTree, t: Any) -> PyTree:
    """The quadratic Bezier curve ``(1-t)^2 a + 2 t (1-t) theta + t^2 b`` at ``t``.

    Args:
        params_a: the end point at ``t = 0``.
        control: the control point ``theta`` (same pytree structure as the end points).
        params_b: the end point at ``t = 1``.
        t: the curve parameter (a scalar; traceable).

    Returns:
        A pytree like ``params_a`` (its dtypes).
    """
    t = jnp.asarray(t)
    return jax.tree_util.tree_map(
        lambda a, c, b: ((1 - t) ** 2 * a + 2 * t * (1 - t) * c + t**2 * b).astype(a.dtype),
        params_a, control, params_b,
    )


class BezierResult(NamedTuple):
    """A trained quadratic Bezier path between two solutions (Garipov et al. 2018).

    Attributes:
        control: the trained control point ``theta`` (pytree like params).
        ts, loss: loss along the curve on ``ts``; barrier, barrier_t: as in
            :class:`Interpolation` but along the curve.
        linear: the straight-line :class:`Interpolation` for comparison.
        train_loss: ``(num_steps,)`` mean sampled curve loss during training.
    """

    control: PyTree
    ts: np.ndarray
    loss: np.ndarray
    barrier: float
    barrier_t: float
    linear: Interpolation
    train_loss: np.ndarray


def bezier_connect(
    loss_fn: LossFn,
    params_a: PyTree,
    params_b: PyTree,
    batch: PyTree,
    *,
    key: jax.Array,
    num_steps: int = 200,
    learning_rate: float = 1e-2,
    optimizer: optax.GradientTransformation | None = None,
    samples_per_step: int = 4,
    num_points: int = 25,
    init: PyTree | None = None,
) -> BezierResult:
    """Train a quadratic Bezier curve from ``a`` to ``b``, then measure its barrier.

    The control point minimises ``E_{t ~ U(0, 1)} L(phi(t))`` (Garipov et al. 2018).

    ``phi(t) = a + 2t (theta - a) + t^2 (a - 2 theta + b)``: a 2-D affine family, so the
    final curve is evaluated by the same compiled grid program as a 2-D slice.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params_a: the end point at ``t = 0``.
        params_b: the end point at ``t = 1`` (same pytree structure as ``params_a``).
        batch: the data passed to ``loss_fn``.
        key: ``jax.random`` key for the sampled ``t``.
        num_steps: training steps of the control point.
        learning_rate: learning rate of the default optimizer ``optax.adam``.
        optimizer: an optax optimizer (default ``optax.adam(learning_rate)``).
        samples_per_step: ``t`` samples per step (vmapped).
        num_points: points of the evaluation grid on ``[0, 1]``.
        init: initial control point (default the midpoint ``(a + b) / 2``).

    Returns:
        :class:`BezierResult`. Cost: ``num_steps * samples_per_step`` loss gradients (one
        ``lax.scan``), then one grid evaluation of the curve and of the straight line.

    Raises:
        ValueError: ``params_b`` / ``init`` not like ``params_a``, ``num_steps < 0`` or
            ``samples_per_step < 1``.
    """
    import optax  # noqa: PLC0415 (analyses keep optax off the import path)

    check_params(params_a, "params_a")
    params_b = check_direction(params_b, params_a, "params_b")
    key = check_key(key, default=False)
    num_steps = check_int(num_steps, "num_steps", lo=0)
    samples_per_step = check_int(samples_per_step, "samples_per_step")
    num_points = check_int(num_points, "num_points", lo=2)
    if optimizer is None:
        learning_rate = check_real(learning_rate, "learning_rate", lo=0.0, lo_open=True)
    control = (jax.jit(lambda a, b: tu.scale(0.5, tu.add(a, b)))(params_a, params_b) if init is None
               else check_direction(init, params_a, "init"))
    opt = optimizer if optimizer is not None else optax.adam(learning_rate)
    fn = static_callable(loss_fn)

    def curve_loss(theta, a, b, batch, ts):
        return jnp.mean(jax.vmap(lambda t: fn(bezier_point(a, theta, b, t), batch))(ts))

    @jax.jit
    def run(theta, a, b, batch, key):
        state = opt.init(theta)

        def step(carry, k):
            th, st = carry
            ts = jax.random.uniform(k, (samples_per_step,), jnp.result_type(float))
            value, g = jax.value_and_grad(curve_loss)(th, a, b, batch, ts)
            upd, st = opt.update(g, st, th)
            return (optax.apply_updates(th, upd), st), value

        (th, _), losses = jax.lax.scan(step, (theta, state), jax.random.split(key, num_steps))
        return th, losses

    control, losses = run(control, params_a, params_b, batch, key)
    ts = np.linspace(0.0, 1.0, int(num_points))
    d1, d2 = _bezier_offsets(params_a, control, params_b)

    evaluator = PointEvaluator(loss_fn, params_a, batch, [d1, d2])

    def path_loss(t):
        t = np.asarray(t)
        return evaluator(np.stack([2 * t, t**2], 1))[0]

    on_ts, barrier, t_best, _, _ = _path_barrier(path_loss, ts, refine=True)
    linear = interpolate(loss_fn, params_a, params_b, batch, num_points=num_points)
    return BezierResult(control, ts, on_ts, barrier, t_best, linear, np.asarray(losses))

