"""Models (NNX and Linen) and adapters to ``(loss_fn, model_fn, params)``."""

from gradience_jax.models.adapters import Adapted, from_linen, from_nnx
from gradience_jax.models.linen_models import LinenMLP, nnx_mlp_to_linen
from gradience_jax.models.nnx_models import CNN, MLP, Block, SeedMLP, TinyTransformerLM
from gradience_jax.models.protocol_models import ModularAdditionMLP

__all__ = [
    "Adapted",
    "Block",
    "CNN",
    "LinenMLP",
    "MLP",
    "ModularAdditionMLP",
    "SeedMLP",
    "TinyTransformerLM",
    "from_linen",
    "from_nnx",
    "nnx_mlp_to_linen",
]
