"""The optional PyTorch import of the bridge, and dtype / array conversion.

PyTorch is imported lazily inside the functions (:func:`_torch`): ``import gradience_jax``
never imports torch. Install the ``[torch]`` extra to use the bridge.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = ["torch_available"]


def torch_available() -> bool:
    """Whether ``import torch`` works (without importing it when it is absent)."""
    return importlib.util.find_spec("torch") is not None


def _torch():
    try:
        import torch  # noqa: PLC0415 - optional dependency, the [torch] extra
    except ImportError as exc:  # pragma: no cover - exercised only without torch
        raise ImportError(
            "gradience_jax.torch_bridge needs PyTorch: pip install 'gradience-jax[torch]'"
        ) from exc
    return torch


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _torch_dtype(dtype: Any):
    torch = _torch()
    if isinstance(dtype, torch.dtype):
        return dtype
    name = jnp.dtype(dtype).name
    table = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
             "bfloat16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {dtype!r}")
    return table[name]
