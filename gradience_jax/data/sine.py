"""The edge-of-stability regression (Protocol A's data set).

Supported names: :func:`eos_regression`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["eos_regression"]


def eos_regression(key: jax.Array, n: int = 512, dim: int = 20) -> dict:
    """``x ~ N(0, I_dim)``, ``y = sin(x . w)`` with ``w ~ N(0, I_dim)``.

    A hard, oscillating target: full-batch GD on it shows strong progressive sharpening.

    Args:
        key: data key (split into the inputs' and the direction's).
        n: number of points.
        dim: input dimension.

    Returns:
        ``{"inputs": (n, dim), "targets": (n, 1)}`` float32.
    """
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, dim), jnp.float32)
    w = jax.random.normal(kw, (dim, 1), jnp.float32)
    return {"inputs": x, "targets": jnp.sin(x @ w)}
