"""A user's own Flax NNX model and data, in the form ``gradience-jax`` reads them.

``--model examples/my_model.py:model`` and ``--data examples/my_model.py:data`` name the
two factories below: each is called with no arguments. ``model()`` returns a freshly
initialised :class:`SpiralClassifier` (its ``nnx.Param`` variables are the parameters;
checkpoints are matched to them by path, ``hidden/kernel``, ``out/bias``, ...); ``data()``
returns the batch ``{"inputs": x, "labels": y}`` that the training script trains on and
``analyze`` / ``track`` measure on (softmax cross-entropy on integer labels, the default
``--head xent``). Nothing here imports gradience_jax.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

NUM_CLASSES = 3
WIDTH = 48
POINTS_PER_CLASS = 128
LABEL_NOISE = 0.1


class SpiralClassifier(nnx.Module):
    """A two-hidden-layer GELU network, 2 -> 48 -> 48 -> 3 (2,643 parameters)."""

    def __init__(self, width: int, num_classes: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(2, width, rngs=rngs)
        self.mid = nnx.Linear(width, width, rngs=rngs)
        self.out = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Class logits of a batch of 2-D points.

        Args:
            x: points, shape ``(batch, 2)``.

        Returns:
            Logits, shape ``(batch, num_classes)``.
        """
        x = nnx.gelu(self.hidden(x))
        x = nnx.gelu(self.mid(x))
        return self.out(x)


def model() -> SpiralClassifier:
    """The model at its initial parameters (seed 0).

    Returns:
        A new :class:`SpiralClassifier`.
    """
    return SpiralClassifier(WIDTH, NUM_CLASSES, rngs=nnx.Rngs(0))


def data() -> dict[str, np.ndarray]:
    """Three interleaved noisy spirals, a tenth of the labels redrawn at random (seed 0).

    Returns:
        ``{"inputs": float32 (384, 2), "labels": int32 (384,)}`` (128 points a class).
    """
    rng = np.random.default_rng(0)
    radius = np.linspace(0.1, 1.0, POINTS_PER_CLASS)
    xs, ys = [], []
    for label in range(NUM_CLASSES):
        angle = 4.0 * radius + 2.0 * np.pi * label / NUM_CLASSES
        angle = angle + rng.normal(scale=0.3, size=POINTS_PER_CLASS)
        xs.append(np.stack([radius * np.sin(angle), radius * np.cos(angle)], axis=1))
        ys.append(np.full(POINTS_PER_CLASS, label))
    labels = np.concatenate(ys)
    flip = rng.random(labels.shape) < LABEL_NOISE  # some points carry a random label
    labels = np.where(flip, rng.integers(0, NUM_CLASSES, labels.shape), labels)
    return {"inputs": np.concatenate(xs).astype(np.float32), "labels": labels.astype(np.int32)}
