"""Modular addition with one-hot targets (Protocol B's data set).

Supported names: :func:`modular_addition`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gradience_jax.data import modular_arithmetic

__all__ = ["modular_addition"]


def modular_addition(key: jax.Array, p: int = 97, train_fraction: float = 0.3) -> tuple[dict, dict]:
    """All pairs ``(a, b)`` labelled ``a + b mod p``, split at random, with one-hot targets.

    :func:`gradience_jax.data.modular_arithmetic` (``op="add"``) with float32 one-hot
    ``"targets"`` added for the MSE head.

    Args:
        key: the split's key.
        p: the modulus.
        train_fraction: share of the ``p^2`` pairs in the training set, in ``(0, 1)``.

    Returns:
        ``(train, test)``, each ``{"inputs": (m, 2) int32, "labels": (m,) int32,
        "targets": (m, p) float32}``.

    Raises:
        ValueError: ``train_fraction`` outside ``(0, 1)``.
    """
    train, test = modular_arithmetic(key, p=p, train_fraction=train_fraction, op="add")
    add = lambda d: dict(d, targets=jax.nn.one_hot(d["labels"], p, dtype=jnp.float32))  # noqa: E731
    return add(train), add(test)
