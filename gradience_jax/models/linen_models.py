"""Flax Linen twins of some NNX models (same function, same parameter layout)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn


class LinenMLP(nn.Module):
    """Linen twin of :class:`gradience_jax.models.MLP` (params ``Dense_i/{kernel,bias}``)."""

    sizes: Sequence[int]
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits ``(B, sizes[-1])`` of inputs ``(B, ...)`` (flattened to ``(B, sizes[0])``)."""
        x = x.reshape(x.shape[0], -1)
        n = len(self.sizes) - 1
        for i, width in enumerate(self.sizes[1:]):
            x = nn.Dense(width, param_dtype=self.param_dtype, dtype=self.param_dtype)(x)
            if i < n - 1:
                x = self.activation(x)
        return x


def nnx_mlp_to_linen(nnx_params) -> dict:
    """Copy an NNX :class:`MLP`'s ``nnx.State`` into the Linen twin's ``{'params': ...}``.

    Args:
        nnx_params: the MLP's ``nnx.State`` (``nnx.split(model, nnx.Param, ...)[1]``) or its
            pure dict, with ``layers/{i}/{kernel,bias}``.

    Returns:
        ``{"params": {"Dense_i": {"kernel", "bias"}}}`` for :class:`LinenMLP`.
    """
    pure = nnx_params.to_pure_dict() if hasattr(nnx_params, "to_pure_dict") else nnx_params
    layers = pure["layers"]
    return {
        "params": {
            f"Dense_{i}": {"kernel": jnp.asarray(layers[i]["kernel"]),
                           "bias": jnp.asarray(layers[i]["bias"])}
            for i in sorted(layers)
        }
    }
