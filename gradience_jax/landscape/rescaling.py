"""The Dinh et al. (2017) caveat: sharpness under a function-preserving rescaling.

``rescale_layers`` maps ``W1 -> a W1``, ``b1 -> a b1``, ``W2 -> W2 / a``, which leaves a
ReLU network's function unchanged; ``rescaling_check`` measures that ``lambda_max`` changes
while the adaptive sharpness (``eta = 0``) does not (numerics only).

Supported names: ``rescale_layers``, ``RescalingCheck``, ``rescaling_check``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradience_jax import tree as tu
from gradience_jax.landscape.common import DENSE_LIMIT, LossFn, PyTree
from gradience_jax.landscape.sharpness import adaptive_sharpness, lambda_max

__all__ = ["RescalingCheck", "rescale_layers", "rescaling_check"]


def _leaves_under(params: PyTree, prefix: str) -> list[str]:
    pre = prefix.rstrip("/") + "/"
    return [p for p in tu.leaf_paths(params) if p.startswith(pre)]


def rescale_layers(
    params: PyTree,
    alpha: float,
    *,
    first: str = "layers/0",
    second: str = "layers/1",
) -> PyTree:
    """Dinh et al. (2017) reparametrisation: ``W1 -> a W1``, ``b1 -> a b1``, ``W2 -> W2 / a``.

    For a positively homogeneous activation between the two layers (ReLU, leaky ReLU) and
    ``a > 0`` the network computes the same function. ``first`` / ``second`` are path
    prefixes (``tree.path_str``) of the two consecutive layers; every leaf of ``first`` is
    scaled by ``a``, the ``kernel`` of ``second`` by ``1 / a`` (its bias is unchanged).

    Args:
        params: the parameters.
        alpha: the factor ``a > 0``.
        first: path prefix of the first layer (every leaf scaled by ``a``).
        second: path prefix of the second layer (its ``kernel`` scaled by ``1 / a``).

    Returns:
        The rescaled parameters (same pytree and dtypes).

    Raises:
        ValueError: ``alpha <= 0`` or a prefix matching no parameter.
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (ReLU is only positively homogeneous), got {alpha}")
    for name, prefix in (("first", first), ("second", second)):
        if not _leaves_under(params, prefix):
            raise ValueError(f"{name}={prefix!r} matches no parameter; paths: "
                             f"{tu.leaf_paths(params)[:12]}")
    pre1, pre2 = first.rstrip("/") + "/", second.rstrip("/") + "/"

    def leaf(path, x):
        if path.startswith(pre1):
            return (x * alpha).astype(x.dtype)
        if path.startswith(pre2) and path.rsplit("/", 1)[-1] == "kernel":
            return (x / alpha).astype(x.dtype)
        return x

    return tu.map_with_path(leaf, params)


class RescalingCheck(NamedTuple):
    """The Dinh et al. (2017) caveat, measured (see :func:`rescaling_check`)."""

    alpha: float
    loss: float
    loss_rescaled: float
    max_output_change: float | None
    lambda_max: float
    lambda_max_rescaled: float
    adaptive_sharpness: float
    adaptive_sharpness_rescaled: float


def rescaling_check(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    alpha: float = 10.0,
    *,
    first: str = "layers/0",
    second: str = "layers/1",
    model_fn: Callable | None = None,
    rho: float = 0.05,
    num_steps: int = 20,
    key: jax.Array | None = None,
    dense_limit: int = DENSE_LIMIT,
) -> RescalingCheck:
    """Check Dinh et al. (2017): sharpness under a function-preserving rescaling.

    Rescale two consecutive layers of a ReLU network (:func:`rescale_layers`) and compare
    the function, ``lambda_max`` and the adaptive sharpness before and after.

    Expected for a ReLU network: same loss and outputs (up to rounding), a different
    ``lambda_max`` (sharpness by curvature is not reparametrisation invariant), the same
    adaptive sharpness (``eta = 0``: scale invariant by construction).

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params: the point (pytree) at which everything is measured.
        batch: the data passed to ``loss_fn``.
        alpha: the factor ``a > 0``, as in :func:`rescale_layers`.
        first: path prefix of the first layer, as in :func:`rescale_layers`.
        second: path prefix of the second layer, as in :func:`rescale_layers`.
        model_fn: optional ``model_fn(params, batch) -> outputs`` to measure the largest
            output change.
        rho: radius of :func:`adaptive_sharpness`.
        num_steps: ascent steps of :func:`adaptive_sharpness`.
        key: start key of :func:`adaptive_sharpness` and Lanczos key of :func:`lambda_max`.
        dense_limit: of :func:`lambda_max`.

    Returns:
        :class:`RescalingCheck`.

    Raises:
        ValueError: bad ``alpha`` or layer prefixes.
    """
    rescaled = rescale_layers(params, alpha, first=first, second=second)
    out_change = None
    if model_fn is not None:
        out_change = float(jnp.max(jnp.abs(model_fn(params, batch) - model_fn(rescaled, batch))))
    lm = lambda_max(loss_fn, params, batch, key=key, dense_limit=dense_limit)
    lm2 = lambda_max(loss_fn, rescaled, batch, key=key, dense_limit=dense_limit)
    a1 = adaptive_sharpness(loss_fn, params, batch, rho, num_steps=num_steps, key=key)
    a2 = adaptive_sharpness(loss_fn, rescaled, batch, rho, num_steps=num_steps, key=key)
    return RescalingCheck(float(alpha), a1.loss, a2.loss, out_change, lm, lm2, a1.value, a2.value)
