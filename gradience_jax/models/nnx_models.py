"""Small Flax NNX models used by tests, protocols, the CLI and benchmarks.

All take ``param_dtype`` (float32 default) and an ``nnx.Rngs``; none keeps RNG or batch
statistics state, so ``nnx.split(model, nnx.Param)`` captures everything that varies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gradience_jax._validate import ArgumentTypeError, check_int


class MLP(nnx.Module):
    """Dense layers ``sizes[0] -> ... -> sizes[-1]`` with ``activation`` between them.

    Input ``(B, sizes[0])`` (extra trailing axes are flattened); output ``(B, sizes[-1])``.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        *,
        activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__len__"):
            raise ArgumentTypeError(f"sizes must be a sequence of layer widths, got {sizes!r}")
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least input and output sizes, got {sizes}")
        sizes = [check_int(w, f"sizes[{i}]") for i, w in enumerate(sizes)]
        if not callable(activation):
            raise ArgumentTypeError(f"activation must be callable, got {activation!r}")
        self.activation = activation
        self.layers = nnx.List(
            [
                nnx.Linear(a, b, param_dtype=param_dtype, dtype=param_dtype, rngs=rngs)
                for a, b in zip(sizes[:-1], sizes[1:])
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Outputs ``(B, sizes[-1])`` of inputs ``(B, ...)`` (flattened to ``(B, sizes[0])``)."""
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


class SeedMLP(MLP):
    """The seed notebook's 2-3-1 network with sigmoid hidden units (regression)."""

    def __init__(self, *, hidden: int = 3, param_dtype=jnp.float32, rngs: nnx.Rngs):
        hidden = check_int(hidden, "hidden")
        super().__init__(
            [2, hidden, 1], activation=jax.nn.sigmoid, param_dtype=param_dtype, rngs=rngs
        )


class CNN(nnx.Module):
    """Two 3x3 conv layers (ReLU, 2x2 average pooling) and a dense classifier.

    Input ``(B, H, W, C)``; output logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        channels: Sequence[int] = (8, 16),
        image_size: int = 8,
        num_classes: int = 10,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        in_channels = check_int(in_channels, "in_channels")
        channels = [check_int(c, f"channels[{i}]") for i, c in enumerate(channels)]
        image_size = check_int(image_size, "image_size", lo=2 ** len(channels))
        num_classes = check_int(num_classes, "num_classes")
        chans = [in_channels, *channels]
        self.convs = nnx.List(
            [
                nnx.Conv(a, b, (3, 3), param_dtype=param_dtype, dtype=param_dtype, rngs=rngs)
                for a, b in zip(chans[:-1], chans[1:])
            ]
        )
        side = image_size // (2 ** len(channels))
        self.head = nnx.Linear(
            side * side * chans[-1], num_classes, param_dtype=param_dtype, dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits ``(B, num_classes)`` of images ``(B, H, W, C)``."""
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
            x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        return self.head(x.reshape(x.shape[0], -1))


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    is_causal: bool = False,
    module: nnx.Module | None = None,
    **unused,
) -> jax.Array:
    """Softmax attention computed in the inputs' dtype.

    Flax's version upcasts to float32, which would cap float64 reference checks at float32
    accuracy. With ``module`` given (``sow_weights=True``), the ``(..., H, T, S)`` weights are
    sown as ``nnx.Intermediate`` ``"attention_weights"``.

    Args:
        query: ``(..., T, H, Dh)`` queries.
        key: ``(..., S, H, Dh)`` keys.
        value: ``(..., S, H, Dh)`` values.
        bias: optional additive logit bias, broadcastable to ``(..., H, T, S)``.
        mask: optional boolean mask (True: attend), broadcastable to ``(..., H, T, S)``.
        is_causal: also mask keys after the query position (``s > t``).
        module: the calling attention module, whose ``sow`` records the weights.
        **unused: further Flax ``attention_fn`` arguments (dropout, precision, ...), ignored.

    Returns:
        ``(..., T, H, Dh)`` attention outputs, in the inputs' dtype.
    """
    depth = query.shape[-1]
    logits = jnp.einsum("...thd,...shd->...hts", query, key) / jnp.sqrt(depth).astype(query.dtype)
    if bias is not None:
        logits = logits + bias
    keep = None
    if is_causal:
        t, s = logits.shape[-2:]
        keep = jnp.tril(jnp.ones((t, s), bool))
    if mask is not None:
        keep = mask if keep is None else jnp.logical_and(keep, mask)
    if keep is not None:
        logits = jnp.where(keep, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    if module is not None:
        module.sow(nnx.Intermediate, "attention_weights", weights)
    return jnp.einsum("...hts,...shd->...thd", weights, value)


class Block(nnx.Module):
    """Pre-LN transformer block: causal multi-head attention and a GELU MLP."""

    def __init__(self, d_model: int, num_heads: int, d_ff: int, *, param_dtype, rngs):
        kw = dict(param_dtype=param_dtype, dtype=param_dtype, rngs=rngs)
        self.ln1 = nnx.LayerNorm(d_model, **kw)
        self.attention = nnx.MultiHeadAttention(
            num_heads, d_model, decode=False, keep_rngs=False,
            attention_fn=dot_product_attention, **kw
        )
        self.ln2 = nnx.LayerNorm(d_model, **kw)
        self.fc1 = nnx.Linear(d_model, d_ff, **kw)
        self.fc2 = nnx.Linear(d_ff, d_model, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """The block applied to hidden states ``(B, T, d_model)`` (same shape out)."""
        x = x + self.attention(self.ln1(x), is_causal=True, deterministic=True)
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class TinyTransformerLM(nnx.Module):
    """A decoder-only language model with untied input and output embeddings.

    Token + position embeddings, ``num_layers`` blocks, a final layer norm and an untied
    output projection.

    ``features(tokens)`` gives the last hidden state ``(B, T, d_model)``; ``readout(h)`` the
    logits ``(B, T, vocab_size)``; ``__call__`` composes them (used by ``SplitModel`` and
    ``ggn(..., vocab_chunk=...)``).
    """

    def __init__(
        self,
        *,
        vocab_size: int = 32,
        d_model: int = 32,
        num_heads: int = 2,
        num_layers: int = 1,
        d_ff: int | None = None,
        max_len: int = 64,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        vocab_size = check_int(vocab_size, "vocab_size")
        d_model = check_int(d_model, "d_model")
        num_heads = check_int(num_heads, "num_heads")
        num_layers = check_int(num_layers, "num_layers", lo=0)
        max_len = check_int(max_len, "max_len")
        if d_ff is not None:
            d_ff = check_int(d_ff, "d_ff")
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
        kw = dict(param_dtype=param_dtype, dtype=param_dtype, rngs=rngs)
        self.embed = nnx.Embed(vocab_size, d_model, **kw)
        self.pos_embed = nnx.Embed(max_len, d_model, **kw)
        self.blocks = nnx.List(
            [
                Block(d_model, num_heads, d_ff or 4 * d_model, param_dtype=param_dtype, rngs=rngs)
                for _ in range(num_layers)
            ]
        )
        self.ln_f = nnx.LayerNorm(d_model, **kw)
        self.unembed = nnx.Linear(d_model, vocab_size, **kw)

    def features(self, tokens: jax.Array) -> jax.Array:
        """The last hidden state.

        Args:
            tokens: ``(B, T)`` integer token ids, ``T <= max_len``.

        Returns:
            ``(B, T, d_model)`` hidden states after the final layer norm.
        """
        x = self.embed(tokens) + self.pos_embed(jnp.arange(tokens.shape[-1]))[None]
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def readout(self, hidden: jax.Array) -> jax.Array:
        """The output projection.

        Args:
            hidden: ``(B, T, d_model)`` hidden states (from :meth:`features`).

        Returns:
            ``(B, T, vocab_size)`` logits.
        """
        return self.unembed(hidden)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits ``(B, T, vocab_size)`` of tokens ``(B, T)``: ``readout(features(tokens))``."""
        return self.readout(self.features(tokens))
