"""The built-in model families of the app (``analyze``): sizes, modules and matching data.

Supported names: :data:`MODELS`, :func:`default_spec`, :func:`build_model`,
:func:`dataset`, :func:`split`. Checkpoints of these families are restored by
:mod:`gradience_jax.app.checkpoints`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["MODELS", "build_model", "dataset", "default_spec", "split"]

MODELS = ("mlp", "cnn", "transformer")
"""The built-in families."""


def default_spec(model: str) -> dict[str, Any]:
    """The default hyper-parameters of a built-in model family.

    Args:
        model: one of :data:`MODELS`.

    Returns:
        A fresh dict (``{"sizes": [...]}`` for the MLP; channels / image size / classes for
        the CNN; vocabulary, width, heads, layers, ``d_ff`` and ``max_len`` for the
        transformer).

    Raises:
        ValueError: unknown ``model``.
    """
    specs = {
        "mlp": {"sizes": [16, 64, 64, 4]},
        "cnn": {"in_channels": 1, "channels": [4, 8], "image_size": 8, "num_classes": 4},
        "transformer": {"vocab_size": 16, "d_model": 16, "num_heads": 2, "num_layers": 1,
                        "d_ff": 32, "max_len": 16},
    }
    if model not in specs:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    return dict(specs[model])


def build_model(model: str, spec: Mapping[str, Any], rngs: Any,
                param_dtype: Any = jnp.float32) -> Any:
    """An NNX module of family ``model`` with hyper-parameters ``spec``.

    Args:
        model: one of :data:`MODELS`.
        spec: its hyper-parameters (as :func:`default_spec`).
        rngs: ``nnx.Rngs`` of the initialisation.
        param_dtype: parameter dtype.

    Returns:
        The module (:class:`~gradience_jax.models.MLP`, :class:`~gradience_jax.models.CNN`
        or :class:`~gradience_jax.models.TinyTransformerLM`).

    Raises:
        ValueError: unknown ``model``.
    """
    from gradience_jax.models import CNN, MLP, TinyTransformerLM  # noqa: PLC0415

    if model == "mlp":
        return MLP(list(spec["sizes"]), param_dtype=param_dtype, rngs=rngs)
    if model == "cnn":
        return CNN(in_channels=spec["in_channels"], channels=tuple(spec["channels"]),
                   image_size=spec["image_size"], num_classes=spec["num_classes"],
                   param_dtype=param_dtype, rngs=rngs)
    if model == "transformer":
        return TinyTransformerLM(vocab_size=spec["vocab_size"], d_model=spec["d_model"],
                                 num_heads=spec["num_heads"], num_layers=spec["num_layers"],
                                 d_ff=spec["d_ff"], max_len=spec["max_len"],
                                 param_dtype=param_dtype, rngs=rngs)
    raise ValueError(f"model must be one of {MODELS}, got {model!r}")


def _x32() -> Any:
    """Context with ``jax_enable_x64`` off (the generated data do not depend on the flag)."""
    ctx = getattr(jax, "enable_x64", None)
    if ctx is not None:
        return ctx(False)
    from jax.experimental import disable_x64  # noqa: PLC0415 - jax < 0.5

    return disable_x64()


def dataset(model: str, spec: Mapping[str, Any], key: jax.Array) -> tuple[dict, str]:
    """Generated examples matching a built-in model's inputs.

    Generated with ``jax_enable_x64`` off, so the same key gives the same data either way.

    Args:
        model: one of :data:`MODELS`.
        spec: the model's hyper-parameters.
        key: data key.

    Returns:
        ``(batch of train + test examples as NumPy arrays, one-line description)``:
        Gaussian blobs (1024, MLP), template images (256, CNN) or arithmetic token
        sequences (64, transformer).
    """
    from gradience_jax import data  # noqa: PLC0415

    with _x32():
        if model == "mlp":
            batch = data.classification(key, n=1024, dim=spec["sizes"][0],
                                        num_classes=spec["sizes"][-1], separation=0.75)
            desc = f"Gaussian blobs, dim {spec['sizes'][0]}, {spec['sizes'][-1]} classes"
        elif model == "cnn":
            batch = data.images(key, n=256, size=spec["image_size"], channels=spec["in_channels"],
                                num_classes=spec["num_classes"])
            desc = (f"{spec['image_size']}x{spec['image_size']} template images, "
                    f"{spec['num_classes']} classes")
        else:
            seq_len = min(12, spec["max_len"])
            batch = data.token_sequences(key, n=64, seq_len=seq_len, vocab_size=spec["vocab_size"])
            desc = f"arithmetic progressions mod {spec['vocab_size']}, length {seq_len}"
        return jax.device_get(batch), desc


def split(batch: dict) -> tuple[dict, dict]:
    """First half (train) and second half (test) of a batch.

    Args:
        batch: a pytree whose leaves share a leading axis ``n``.

    Returns:
        ``(train, test)`` with ``n // 2`` and ``n - n // 2`` examples.
    """
    n = len(jax.tree_util.tree_leaves(batch)[0])
    half = n // 2
    return (jax.tree_util.tree_map(lambda x: x[:half], batch),
            jax.tree_util.tree_map(lambda x: x[half:], batch))
