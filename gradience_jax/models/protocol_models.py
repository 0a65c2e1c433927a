"""Models of the research protocols (fixtures).

Supported names: :class:`ModularAdditionMLP` (Protocol B, grokking of modular addition).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gradience_jax._validate import check_int

__all__ = ["ModularAdditionMLP"]


class ModularAdditionMLP(nnx.Module):
    """``logits = W (U[a] + V[b] + c)^2 + d``: the quadratic-activation MLP of Gromov (2023).

    The one-hot pair ``(a, b)`` goes through a linear layer (``embed``, kernel rows ``U``
    then ``V``, computed by gathering rows instead of a one-hot matmul), a quadratic
    activation and a linear read-out (``readout``).

    Args:
        p: the modulus (``2 p`` inputs, ``p`` outputs).
        width: hidden units ``N``.
        param_dtype: dtype of the parameters and of the computation.
        rngs: initialisation keys.

    Call: ``(B, 2)`` int pairs -> ``(B, p)`` logits; cost ``O(B * width * p)``.
    """

    def __init__(self, p: int, width: int, *, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        p = check_int(p, "p", lo=2)
        width = check_int(width, "width")
        kw = dict(param_dtype=param_dtype, dtype=param_dtype, rngs=rngs)
        self.p = p
        self.embed = nnx.Linear(2 * p, width, **kw)
        self.readout = nnx.Linear(width, p, **kw)

    def __call__(self, pairs: jax.Array) -> jax.Array:
        """Logits of the pairs.

        Args:
            pairs: ``(B, 2)`` integers in ``[0, p)``.

        Returns:
            ``(B, p)`` logits.
        """
        kernel = self.embed.kernel[...]
        h = kernel[pairs[:, 0]] + kernel[self.p + pairs[:, 1]] + self.embed.bias[...]
        return self.readout(h * h)
