"""Synthetic datasets, generated in code (never downloaded). Batches are dicts of arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def seed_regression(key: jax.Array, n: int = 50, noise: float = 0.1) -> dict:
    """The seed notebook's regression: ``x ~ N(0, I_2)``, ``y = sin(x0) + 0.5 x1^2 + noise``.

    Args:
        key: ``jax.random`` key.
        n: number of examples.
        noise: standard deviation of the Gaussian target noise.

    Returns:
        ``{"inputs": (n, 2), "targets": (n, 1)}`` float32.
    """
    kx, kn = jax.random.split(key)
    x = jax.random.normal(kx, (n, 2), jnp.float32)
    y = jnp.sin(x[:, :1]) + 0.5 * x[:, 1:2] ** 2
    return {"inputs": x, "targets": y + noise * jax.random.normal(kn, (n, 1), jnp.float32)}


def classification(
    key: jax.Array, n: int = 256, dim: int = 16, num_classes: int = 4, separation: float = 2.0
) -> dict:
    """Gaussian blobs: class means ``separation * N(0, I)``, unit noise.

    Args:
        key: ``jax.random`` key.
        n: number of examples.
        dim: input dimension.
        num_classes: number of classes (labels drawn uniformly).
        separation: scale of the random class means.

    Returns:
        ``{"inputs": (n, dim) float32, "labels": (n,) int32}``.
    """
    km, kl, kx = jax.random.split(key, 3)
    means = separation * jax.random.normal(km, (num_classes, dim), jnp.float32)
    labels = jax.random.randint(kl, (n,), 0, num_classes)
    x = means[labels] + jax.random.normal(kx, (n, dim), jnp.float32)
    return {"inputs": x, "labels": labels.astype(jnp.int32)}


def mislabelled_classification(
    key: jax.Array, n: int = 200, dim: int = 5, num_classes: int = 2, separation: float = 2.5,
    flip_fraction: float = 0.1,
) -> tuple[dict, jax.Array]:
    """Gaussian blobs with a planted fraction of wrong labels (influence tutorials, tests).

    Args:
        key: ``jax.random`` key.
        n: number of examples.
        dim: input dimension.
        num_classes: number of classes.
        separation: scale of the random class means (as :func:`classification`).
        flip_fraction: share of examples whose label is replaced by another class.

    Returns:
        ``(batch, flipped)``: the batch ``{"inputs", "labels"}`` with the wrong labels in
        place, and the sorted indices ``(round(flip_fraction n),)`` of the flipped examples.

    Raises:
        ValueError: ``flip_fraction`` outside ``[0, 1)`` or ``num_classes < 2``.
    """
    if not 0.0 <= flip_fraction < 1.0:
        raise ValueError(f"flip_fraction must be in [0, 1), got {flip_fraction}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 to flip labels, got {num_classes}")
    kd, kf, ks = jax.random.split(key, 3)
    batch = classification(kd, n, dim, num_classes, separation)
    flipped = jnp.sort(jax.random.permutation(kf, n)[: round(flip_fraction * n)])
    shift = jax.random.randint(ks, flipped.shape, 1, num_classes)  # never the true class
    labels = batch["labels"].at[flipped].set((batch["labels"][flipped] + shift) % num_classes)
    return dict(batch, labels=labels.astype(jnp.int32)), flipped


def images(
    key: jax.Array, n: int = 64, size: int = 8, channels: int = 1, num_classes: int = 10
) -> dict:
    """Tiny class-dependent images: a per-class template plus noise.

    Args:
        key: ``jax.random`` key.
        n: number of images.
        size: height and width in pixels.
        channels: number of channels (NHWC layout).
        num_classes: number of classes (labels drawn uniformly).

    Returns:
        ``{"inputs": (n, size, size, channels) float32, "labels": (n,) int32}``.
    """
    kt, kl, kx = jax.random.split(key, 3)
    templates = jax.random.normal(kt, (num_classes, size, size, channels), jnp.float32)
    labels = jax.random.randint(kl, (n,), 0, num_classes)
    x = templates[labels] + 0.5 * jax.random.normal(kx, (n, size, size, channels), jnp.float32)
    return {"inputs": x, "labels": labels.astype(jnp.int32)}


def token_sequences(
    key: jax.Array, n: int = 16, seq_len: int = 16, vocab_size: int = 32
) -> dict:
    """Next-token prediction on noisy arithmetic progressions mod ``vocab_size``.

    Each sequence is ``start + step * t (mod V)`` with a random start and step in ``1..3``;
    ``labels`` are the inputs shifted by one.

    Args:
        key: ``jax.random`` key.
        n: number of sequences.
        seq_len: sequence length ``T``.
        vocab_size: vocabulary size ``V``.

    Returns:
        ``{"inputs": (n, T) int32, "labels": (n, T) int32}``.
    """
    ks, kd = jax.random.split(key)
    start = jax.random.randint(ks, (n, 1), 0, vocab_size)
    step = jax.random.randint(kd, (n, 1), 1, 4)
    seq = (start + step * jnp.arange(seq_len + 1)[None]) % vocab_size
    return {"inputs": seq[:, :-1].astype(jnp.int32), "labels": seq[:, 1:].astype(jnp.int32)}


def modular_arithmetic(
    key: jax.Array, p: int = 97, train_fraction: float = 0.3, op: str = "add"
) -> tuple[dict, dict]:
    """All pairs ``(a, b)`` in ``Z_p^2`` labelled ``a + b mod p``, randomly split into train / test.

    Args:
        key: ``jax.random`` key of the split.
        p: the modulus.
        train_fraction: share of the ``p^2`` pairs in the training set, in ``(0, 1)``.
        op: ``"add"`` (``a + b``), ``"sub"`` (``a - b``) or ``"mul"`` (``a * b``), mod ``p``.

    Returns:
        ``(train, test)``, each ``{"inputs": (m, 2) int32, "labels": (m,) int32}``.

    Raises:
        ValueError: ``train_fraction`` outside ``(0, 1)`` or an unknown ``op``.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    a, b = jnp.meshgrid(jnp.arange(p), jnp.arange(p), indexing="ij")
    a, b = a.ravel(), b.ravel()
    ops = {"add": a + b, "sub": a - b, "mul": a * b}
    if op not in ops:
        raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}")
    labels = ops[op] % p
    perm = jax.random.permutation(key, p * p)
    n_train = int(round(train_fraction * p * p))
    x = jnp.stack([a, b], axis=1).astype(jnp.int32)
    tr, te = perm[:n_train], perm[n_train:]
    return (
        {"inputs": x[tr], "labels": labels[tr].astype(jnp.int32)},
        {"inputs": x[te], "labels": labels[te].astype(jnp.int32)},
    )


# Protocol data sets, one per module (imported after modular_arithmetic, which they use).
from gradience_jax.data.modular import modular_addition  # noqa: E402
from gradience_jax.data.sine import eos_regression  # noqa: E402

__all__ = ["classification", "eos_regression", "images", "modular_addition",
           "modular_arithmetic", "seed_regression", "token_sequences"]
