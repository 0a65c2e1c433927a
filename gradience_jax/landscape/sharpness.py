"""Sharpness of a solution (numerics only).

``lambda_max`` and ``trace_sharpness`` (``tr H``; dense for small models, Lanczos /
Hutchinson otherwise), ``epsilon_sharpness`` (Keskar et al. 2017), ``adaptive_sharpness``
(Kwon et al. 2021, ASAM) and ``sharpness_report`` (all of them). The Dinh et al. (2017)
rescaling caveat is measured in ``landscape.rescaling``.

Supported names: ``lambda_max``, ``trace_sharpness`` (alias ``hessian_trace``, the old
name), ``EpsilonSharpness``, ``epsilon_sharpness``, ``AdaptiveSharpness``,
``adaptive_sharpness``, ``SharpnessReport``, ``sharpness_report``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax import tree as tu
from gradience_jax._validate import (
    check_batch,
    check_int,
    check_key,
    check_params,
    check_real,
)
from gradience_jax.landscape.common import DENSE_LIMIT, LossFn, PyTree, static_callable
from gradience_jax.landscape.eigen import small_hessian_eigh, top_eigenpairs
from gradience_jax.operators.hessian import hessian

__all__ = [
    "AdaptiveSharpness",
    "EpsilonSharpness",
    "SharpnessReport",
    "adaptive_sharpness",
    "epsilon_sharpness",
    "hessian_trace",
    "lambda_max",
    "sharpness_report",
    "trace_sharpness",
]


def lambda_max(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    key: jax.Array | None = None,
    dense_limit: int = DENSE_LIMIT,
) -> float:
    """The largest Hessian eigenvalue (exact for ``n_params <= dense_limit``, else Lanczos).

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params: the point (pytree) at which the loss is measured.
        batch: the data passed to ``loss_fn``.
        key: Lanczos start key (large models only).
        dense_limit: at most this many parameters: dense Hessian (``n_params`` HVPs).

    Returns:
        ``lambda_max`` as a float.

    Raises:
        FloatingPointError: the Hessian is not finite.
    """
    if tu.size(params) <= dense_limit:
        return float(small_hessian_eigh(loss_fn, params, batch)[0][-1])
    op = hessian(loss_fn, params, batch)
    return float(top_eigenpairs(op, 1, key=key, dense_limit=dense_limit,
                                return_eigenvectors=False).eigenvalues[0])


def trace_sharpness(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    key: jax.Array | None = None,
    num_samples: int = 100,
    dense_limit: int = DENSE_LIMIT,
) -> float:
    """``tr H`` of the loss at ``params`` (a sharpness measure).

    Exact for ``n_params <= dense_limit``, else Hutchinson's estimator (``num_samples``
    Hessian-vector products).

    Named apart from the train-step probe :func:`gradience_jax.probes.hessian_trace`; the
    old name ``landscape.hessian_trace`` is an alias of this function.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params: the point (pytree) at which the loss is measured.
        batch: the data passed to ``loss_fn``.
        key: Hutchinson probe key (large models only; default ``jax.random.key(42)``, the one
            default seed).
        num_samples: Hutchinson probes.
        dense_limit: at most this many parameters: exact (sum of the dense eigenvalues).

    Returns:
        ``tr H`` as a float.

    Raises:
        FloatingPointError: the (dense) Hessian is not finite.
    """
    if tu.size(params) <= dense_limit:
        return float(np.sum(small_hessian_eigh(loss_fn, params, batch)[0]))
    op = hessian(loss_fn, params, batch)
    from gradience_jax.estimators import hutchinson_trace  # noqa: PLC0415

    key = check_key(key)
    return float(hutchinson_trace(op, key, num_samples=num_samples).estimate)


def _sign_nz(g):
    return jnp.where(g >= 0, 1.0, -1.0).astype(g.dtype)


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_steps"))
def _ascent(loss_fn, params, batch, scale, u0, radius, step_size, num_steps, box):
    """Projected gradient ascent of ``L(w + scale * u)`` over ``||u|| <= radius``.

    The box ``||u||_inf`` with sign steps when ``box`` is true, else the 2-ball with
    normalised steps (``box`` is traced, so both share one compiled program).
    """

    def f(u):
        return loss_fn(jax.tree_util.tree_map(
            lambda w, s, x: w + (s * x).astype(w.dtype), params, scale, u), batch)

    def project(u):
        n = tu.norm(u)
        shrink = jnp.minimum(1.0, radius / jnp.maximum(n, 1e-300))
        return jax.tree_util.tree_map(
            lambda x: jnp.where(box, jnp.clip(x, -radius, radius), shrink * x), u)

    u0 = project(u0)
    v0 = f(u0)

    def body(k, carry):
        u, best_v, best_u = carry
        g = jax.grad(f)(u)
        eta = step_size * radius / (k + 1.0)
        gn = tu.norm(g)
        g_scale = jnp.where(gn > 0, eta / jnp.maximum(gn, 1e-300), 0.0)
        u = jax.tree_util.tree_map(
            lambda x, gx: x + jnp.where(box, eta * _sign_nz(gx), g_scale * gx).astype(x.dtype),
            u, g)
        u = project(u)
        v = f(u)
        better = v > best_v
        best_u = jax.tree_util.tree_map(lambda a, b: jnp.where(better, a, b), u, best_u)
        return u, jnp.where(better, v, best_v), best_u

    _, best_v, best_u = jax.lax.fori_loop(0, num_steps, body, (u0, v0, u0))
    return f(tu.zeros_like(u0)), best_v, best_u


class EpsilonSharpness(NamedTuple):
    """Keskar et al. (2017) sharpness.

    Attributes:
        value: ``100 * (max_loss - loss) / (1 + loss)`` (their normalised measure, in %).
        loss: loss at the point; max_loss: largest loss found in the box.
        perturbation: the maximising ``delta`` (pytree like params).
        epsilon: the box size.
    """

    value: float
    loss: float
    max_loss: float
    perturbation: PyTree
    epsilon: float


def _start(key, params, radius, ball):
    if key is None:
        return tu.zeros_like(params)
    key = check_key(key)
    if ball == "inf":
        leaves, treedef = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(key, len(leaves))
        return jax.tree_util.tree_unflatten(treedef, [
            jax.random.uniform(k, x.shape, x.dtype, -radius, radius) for k, x in zip(keys, leaves)])
    u = tu.random_like(key, params)
    return tu.scale(radius / tu.norm(u), u)


def epsilon_sharpness(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    epsilon: float = 1e-3,
    *,
    relative: bool = True,
    num_steps: int = 20,
    step_size: float = 1.0,
    key: jax.Array | None = None,
) -> EpsilonSharpness:
    """Keskar et al. (2017) epsilon-sharpness: the largest loss in a box around ``params``.

    ``max L(w + delta)`` over ``|delta_i| <= epsilon (|w_i| + 1)`` (``relative=True``, their
    ``C_epsilon`` with ``A = I``) or ``|delta_i| <= epsilon`` (``relative=False``), found by
    projected sign-gradient ascent (``num_steps`` steps of ``step_size * epsilon / k`` in the
    scaled box; Keskar et al. used L-BFGS-B). The best point seen is kept, so the value is a
    lower bound of the true maximum; for a convex separable loss it is exact.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params: the point (pytree) at which the loss is measured.
        batch: the data passed to ``loss_fn``.
        epsilon: box size (``> 0``).
        relative: box proportional to ``|w| + 1`` (Keskar) or absolute.
        num_steps: number of ascent steps (one loss gradient each).
        step_size: ascent step, as a fraction of the box size (divided by the step number).
        key: random start inside the box (default: the centre, with ties of a zero
            gradient broken upwards).

    Returns:
        :class:`EpsilonSharpness` (a lower bound of the true maximum). Cost: ``num_steps``
        loss gradients in one compiled loop.

    Raises:
        ValueError: ``epsilon <= 0`` or ``num_steps < 1``.
    """
    epsilon = check_real(epsilon, "epsilon", lo=0.0, lo_open=True)
    num_steps = check_int(num_steps, "num_steps")
    step_size = check_real(step_size, "step_size", lo=0.0, lo_open=True)
    check_params(params)
    check_batch(batch)
    scale = jax.tree_util.tree_map(
        lambda w: (jnp.abs(w) + 1.0) if relative else jnp.ones_like(w), params)
    u0 = _start(key, params, epsilon, "inf")
    loss, best, u = _ascent(static_callable(loss_fn), params, batch, scale, u0, epsilon, step_size,
                            int(num_steps), True)
    loss, best = float(loss), float(best)
    delta = jax.tree_util.tree_map(lambda s, x: s * x, scale, u)
    return EpsilonSharpness(100.0 * (best - loss) / (1.0 + loss), loss, best, delta, float(epsilon))


class AdaptiveSharpness(NamedTuple):
    """Kwon et al. (2021) adaptive sharpness.

    Attributes:
        value: ``max_loss - loss``; loss, max_loss, perturbation ``delta``, rho, p as given.
    """

    value: float
    loss: float
    max_loss: float
    perturbation: PyTree
    rho: float
    p: str


def adaptive_sharpness(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    rho: float = 0.05,
    *,
    p: Any = 2,
    eta: float = 0.0,
    num_steps: int = 20,
    step_size: float = 1.0,
    key: jax.Array | None = None,
) -> AdaptiveSharpness:
    """Adaptive (scale-invariant) sharpness, Kwon et al. 2021 (ASAM).

    ``max_{||T_w^{-1} delta||_p <= rho} L(w + delta) - L(w)`` with ``T_w = diag(|w| + eta)``.

    With ``eta = 0`` the value is invariant under the rescalings that leave a ReLU
    network's function unchanged (``W1 -> a W1, b1 -> a b1, W2 -> W2 / a``), unlike
    ``lambda_max`` (Dinh et al. 2017); see :func:`rescaling_check`. ASAM itself uses
    ``eta = 0.01``. Solved by projected gradient ascent in ``u = T_w^{-1} delta``
    (``p=2``: normalised steps on the ball; ``p="inf"``: sign steps in the box).

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params: the point (pytree) at which the loss is measured.
        batch: the data passed to ``loss_fn``.
        rho: the radius (``> 0``).
        p: the norm, ``2`` or ``"inf"``.
        eta: the offset of ``T_w`` (``>= 0``).
        num_steps: number of ascent steps (one loss gradient per step).
        step_size: ascent step, as a fraction of ``rho`` (divided by the step number).
        key: random start on the ball / in the box (default: the centre).

    Returns:
        :class:`AdaptiveSharpness` (a lower bound of the true maximum).

    Raises:
        ValueError: ``rho <= 0``, ``p`` not 2 / ``"inf"``, ``eta < 0``, ``num_steps < 1``.
    """
    rho = check_real(rho, "rho", lo=0.0, lo_open=True)
    ball = {2: "2", "2": "2", "inf": "inf", float("inf"): "inf"}.get(p)
    if ball is None:
        raise ValueError(f"p must be 2 or 'inf', got {p!r}")
    eta = check_real(eta, "eta", lo=0.0)
    num_steps = check_int(num_steps, "num_steps")
    step_size = check_real(step_size, "step_size", lo=0.0, lo_open=True)
    check_params(params)
    check_batch(batch)
    scale = jax.tree_util.tree_map(lambda w: jnp.abs(w) + eta, params)
    u0 = _start(key, params, rho, ball)
    loss, best, u = _ascent(static_callable(loss_fn), params, batch, scale, u0, rho, step_size,
                            int(num_steps), ball == "inf")
    delta = jax.tree_util.tree_map(lambda s, x: s * x, scale, u)
    return AdaptiveSharpness(float(best) - float(loss), float(loss), float(best), delta,
                             float(rho), ball)


@dataclasses.dataclass(frozen=True)
class SharpnessReport:
    """All sharpness measures at one point (see :func:`sharpness_report`).

    Attributes:
        loss: the loss at the point; lambda_max / lambda_min: extreme Hessian eigenvalues
            (``lambda_min`` None when not dense); trace: ``tr H``;
        epsilon_sharpness / adaptive_sharpness: the two perturbation measures, with their
            ``epsilon`` and ``rho``.
    """

    loss: float
    lambda_max: float
    lambda_min: float | None
    trace: float
    epsilon_sharpness: float
    adaptive_sharpness: float
    epsilon: float
    rho: float

    def to_dict(self) -> dict:
        """The fields as a plain dict."""
        return dataclasses.asdict(self)


def sharpness_report(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    key: jax.Array | None = None,
    epsilon: float = 1e-3,
    rho: float = 0.05,
    num_steps: int = 20,
    trace_samples: int = 100,
    dense_limit: int = DENSE_LIMIT,
) -> SharpnessReport:
    """All sharpness measures at ``params``.

    ``lambda_max``, ``tr H`` (and ``lambda_min`` when dense), Keskar's epsilon-sharpness
    and the adaptive sharpness (``p=2``, ``eta=0``).

    For ``n_params <= dense_limit`` the Hessian is built once densely and gives exact
    eigenvalues and trace; above, Lanczos (``spectrum.eigsh``) and Hutchinson estimate them.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params: the point (pytree) at which the loss is measured.
        batch: the data passed to ``loss_fn``.
        key: Lanczos / Hutchinson key (large models only).
        epsilon: box of :func:`epsilon_sharpness`.
        rho: radius of :func:`adaptive_sharpness`.
        num_steps: ascent steps of both.
        trace_samples: Hutchinson probes (large models only).
        dense_limit: at most this many parameters: dense Hessian.

    Returns:
        :class:`SharpnessReport` (``lambda_min`` None above ``dense_limit``).

    Raises:
        ValueError: bad ``epsilon`` / ``rho`` / ``num_steps``.
        FloatingPointError: the Hessian is not finite.
    """
    key = check_key(key)
    if tu.size(params) <= dense_limit:
        evals = small_hessian_eigh(loss_fn, params, batch)[0]
        lmax, lmin, tr = float(evals[-1]), float(evals[0]), float(evals.sum())
    else:
        k1, k2 = jax.random.split(key)
        op = hessian(loss_fn, params, batch)
        lmax = float(top_eigenpairs(op, 1, key=k1, dense_limit=dense_limit,
                                    return_eigenvectors=False).eigenvalues[0])
        lmin = None
        tr = trace_sharpness(loss_fn, params, batch, key=k2, num_samples=trace_samples,
                             dense_limit=dense_limit)
    eps = epsilon_sharpness(loss_fn, params, batch, epsilon, num_steps=num_steps)
    ada = adaptive_sharpness(loss_fn, params, batch, rho, num_steps=num_steps)
    return SharpnessReport(eps.loss, lmax, lmin, tr, eps.value, ada.value, float(epsilon),
                           float(rho))


#: The old name of :func:`trace_sharpness` (kept; distinct from ``probes.hessian_trace``).
hessian_trace = trace_sharpness
