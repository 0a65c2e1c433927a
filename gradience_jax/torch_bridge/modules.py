"""The ``torch.nn`` copies of the built-in models: MLP, CNN and the tiny transformer LM.

:func:`to_torch` dispatches on the model type to :func:`torch_mlp`, :func:`torch_cnn` or
:func:`torch_transformer`; each builds the module, maps every parameter on both sides and
copies the Flax weights in. The PyTorch classes are defined on first use, so torch is
imported lazily.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gradience_jax.models import CNN, MLP, TinyTransformerLM
from gradience_jax.torch_bridge._optional import _torch, _torch_dtype
from gradience_jax.torch_bridge.layout import LeafMap, _Layout
from gradience_jax.torch_bridge.model import TorchModel
from gradience_jax.tree import leaf_paths

PyTree = Any

__all__ = ["to_torch", "torch_cnn", "torch_mlp", "torch_transformer"]


@functools.cache
def _classes():
    torch = _torch()
    nn = torch.nn

    class CausalSelfAttention(nn.Module):
        """Flax ``nnx.MultiHeadAttention`` + ``dot_product_attention(is_causal=True)``."""

        def __init__(self, d_model: int, num_heads: int, head_dim: int, dtype):
            super().__init__()
            self.num_heads, self.head_dim = num_heads, head_dim
            inner = num_heads * head_dim
            self.query = nn.Linear(d_model, inner, dtype=dtype)
            self.key = nn.Linear(d_model, inner, dtype=dtype)
            self.value = nn.Linear(d_model, inner, dtype=dtype)
            self.out = nn.Linear(inner, d_model, dtype=dtype)

        def forward(self, x):
            b, t, _ = x.shape
            h, dh = self.num_heads, self.head_dim
            q = self.query(x).view(b, t, h, dh)
            k = self.key(x).view(b, t, h, dh)
            v = self.value(x).view(b, t, h, dh)
            logits = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dh)
            keep = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            logits = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
            weights = torch.softmax(logits, dim=-1)
            out = torch.einsum("bhts,bshd->bthd", weights, v).reshape(b, t, h * dh)
            return self.out(out)

    class Block(nn.Module):
        def __init__(self, d_model, num_heads, head_dim, d_ff, eps, dtype):
            super().__init__()
            self.ln1 = nn.LayerNorm(d_model, eps=eps, dtype=dtype)
            self.attention = CausalSelfAttention(d_model, num_heads, head_dim, dtype)
            self.ln2 = nn.LayerNorm(d_model, eps=eps, dtype=dtype)
            self.fc1 = nn.Linear(d_model, d_ff, dtype=dtype)
            self.fc2 = nn.Linear(d_ff, d_model, dtype=dtype)
            self.act = nn.GELU(approximate="tanh")

        def forward(self, x):
            x = x + self.attention(self.ln1(x))
            return x + self.fc2(self.act(self.fc1(self.ln2(x))))

    class TinyTransformerLM(nn.Module):
        """Decoder-only LM; ``forward(tokens (B, T)) -> logits (B*T, V)`` (flattened)."""

        def __init__(self, vocab_size, d_model, num_heads, head_dim, num_layers, d_ff, max_len,
                     eps, dtype):
            super().__init__()
            self.embed = nn.Embedding(vocab_size, d_model, dtype=dtype)
            self.pos_embed = nn.Embedding(max_len, d_model, dtype=dtype)
            self.blocks = nn.ModuleList(
                [Block(d_model, num_heads, head_dim, d_ff, eps, dtype) for _ in range(num_layers)]
            )
            self.ln_f = nn.LayerNorm(d_model, eps=eps, dtype=dtype)
            self.unembed = nn.Linear(d_model, vocab_size, dtype=dtype)

        def features(self, tokens):
            t = tokens.shape[-1]
            x = self.embed(tokens) + self.pos_embed(torch.arange(t, device=tokens.device))[None]
            for block in self.blocks:
                x = block(x)
            return self.ln_f(x)

        def forward(self, tokens):
            logits = self.unembed(self.features(tokens))
            return logits.reshape(-1, logits.shape[-1])

    return {"TinyTransformerLM": TinyTransformerLM}


def _activation(fn: Callable):
    torch = _torch()
    nn = torch.nn
    if fn is jax.nn.relu:
        return nn.ReLU()
    if fn is jnp.tanh or fn is jax.nn.tanh:
        return nn.Tanh()
    if fn is jax.nn.sigmoid:
        return nn.Sigmoid()
    if fn is jax.nn.gelu:
        return nn.GELU(approximate="tanh")
    if fn is jax.nn.softplus:
        return nn.Softplus()
    if fn is jax.nn.silu or fn is jax.nn.swish:
        return nn.SiLU()
    raise ValueError(
        f"MLP activation {fn!r} has no PyTorch mapping; supported: jax.nn.relu, jnp.tanh, "
        "jax.nn.sigmoid, jax.nn.gelu (tanh approximation), jax.nn.softplus, jax.nn.silu"
    )


def _params_of(model: Any, params: PyTree | None) -> PyTree:
    if params is not None:
        return params
    return nnx.split(model, nnx.Param, ...)[1]


def _finish(module, leaves, kind, params, like_tree) -> TorchModel:
    """Check that every parameter is mapped on both sides, then copy ``params`` in."""
    module.eval()
    tm = TorchModel(module, tuple(leaves), kind, tuple(leaf_paths(like_tree)),
                    jax.tree_util.tree_structure(like_tree))
    named = [name for name, _ in module.named_parameters()]
    if named != [m.torch_name for m in leaves]:  # pragma: no cover - a bug here, not user input
        raise AssertionError(f"leaf maps {[m.torch_name for m in leaves]} do not follow "
                             f"module.parameters() {named}")
    flax_mapped = {m.flax_path for m in leaves}
    if flax_mapped != set(tm.flax_paths):
        raise ValueError(
            f"the Flax params have leaves with no PyTorch counterpart: "
            f"{sorted(set(tm.flax_paths) - flax_mapped)[:5]}"
        )
    tm.load(params)
    return tm


def _dense(torch_prefix: str, flax_prefix: str, bias: bool = True) -> list[LeafMap]:
    out = [LeafMap(f"{torch_prefix}.weight", f"{flax_prefix}/kernel", _Layout("dense"))]
    if bias:
        out.append(LeafMap(f"{torch_prefix}.bias", f"{flax_prefix}/bias", _Layout("same")))
    return out


def torch_mlp(model: Any, params: PyTree | None = None, dtype: Any = "float32") -> TorchModel:
    """``gradience_jax.models.MLP`` (or ``SeedMLP``) as a ``torch.nn.Sequential``.

    The module is ``nn.Sequential(Flatten, Linear, act, ..., Linear)`` with the Flax weights
    copied in.

    Args:
        model: the NNX ``MLP``.
        params: Flax params to copy (default: the model's current ``nnx.Param`` state).
        dtype: PyTorch parameter dtype (``"float32"`` or ``"float64"``).

    Returns:
        A :class:`TorchModel` of kind ``"mlp"``.

    Raises:
        ValueError: an activation with no PyTorch mapping, or an unsupported ``dtype``.
    """
    torch = _torch()
    nn = torch.nn
    tdt = _torch_dtype(dtype)
    params = _params_of(model, params)
    layers: list = [nn.Flatten()]
    leaves = []
    n = len(model.layers)
    for i, layer in enumerate(model.layers):
        in_f, out_f = layer.kernel.shape
        use_bias = layer.bias is not None
        layers.append(nn.Linear(in_f, out_f, bias=use_bias, dtype=tdt))
        leaves += _dense(str(len(layers) - 1), f"layers/{i}", use_bias)
        if i < n - 1:
            layers.append(_activation(model.activation))
    return _finish(nn.Sequential(*layers), leaves, "mlp", params, params)


def torch_cnn(model: Any, params: PyTree | None = None, dtype: Any = "float32") -> TorchModel:
    """``gradience_jax.models.CNN`` as a ``torch.nn.Sequential`` (NCHW).

    The module is ``nn.Sequential(Conv2d(pad 1), ReLU, AvgPool2d(2), ..., Flatten, Linear)``.
    The head's rows are re-ordered from NHWC- to NCHW-flatten order, so no permutation module
    is needed (BackPACK supports every layer).

    Args:
        model: the NNX ``CNN``.
        params: Flax params to copy (default: the model's current ``nnx.Param`` state).
        dtype: PyTorch parameter dtype (``"float32"`` or ``"float64"``).

    Returns:
        A :class:`TorchModel` of kind ``"cnn"``.

    Raises:
        ValueError: convolutions other than stride-1, odd-sized SAME ones, or an
            unsupported ``dtype``.
    """
    torch = _torch()
    nn = torch.nn
    tdt = _torch_dtype(dtype)
    params = _params_of(model, params)
    layers: list = []
    leaves = []
    for i, conv in enumerate(model.convs):
        kh, kw, cin, cout = conv.kernel.shape
        strides = conv.strides if isinstance(conv.strides, Sequence) else (conv.strides,) * 2
        if (tuple(strides) != (1, 1) or conv.padding != "SAME" or kh % 2 == 0 or kw % 2 == 0
                or conv.feature_group_count != 1):
            raise ValueError("torch_cnn supports stride-1, odd-sized SAME convolutions only")
        use_bias = conv.bias is not None
        layers.append(nn.Conv2d(cin, cout, (kh, kw), padding=(kh // 2, kw // 2), bias=use_bias,
                                dtype=tdt))
        idx = str(len(layers) - 1)
        leaves.append(LeafMap(f"{idx}.weight", f"convs/{i}/kernel", _Layout("conv")))
        if use_bias:
            leaves.append(LeafMap(f"{idx}.bias", f"convs/{i}/bias", _Layout("same")))
        layers += [nn.ReLU(), nn.AvgPool2d(2, 2)]
    c = model.convs[-1].kernel.shape[-1]
    in_f, out_f = model.head.kernel.shape
    side = int(round(math.sqrt(in_f // c)))
    if side * side * c != in_f:
        raise ValueError(f"head input {in_f} is not side*side*{c}")
    layers += [nn.Flatten(), nn.Linear(in_f, out_f, dtype=tdt)]
    idx = str(len(layers) - 1)
    leaves += [
        LeafMap(f"{idx}.weight", "head/kernel", _Layout("head_nhwc", (side, side, c))),
        LeafMap(f"{idx}.bias", "head/bias", _Layout("same")),
    ]
    return _finish(nn.Sequential(*layers), leaves, "cnn", params, params)


def torch_transformer(model: Any, params: PyTree | None = None,
                      dtype: Any = "float32") -> TorchModel:
    """``gradience_jax.models.TinyTransformerLM`` as a PyTorch module with the same pre-LN blocks.

    Explicit causal attention, tanh-GELU MLP, LayerNorm eps 1e-6; its ``forward(tokens)``
    returns logits flattened to ``(B*T, V)``.

    Args:
        model: the NNX ``TinyTransformerLM``.
        params: Flax params to copy (default: the model's current ``nnx.Param`` state).
        dtype: PyTorch parameter dtype (``"float32"`` or ``"float64"``).

    Returns:
        A :class:`TorchModel` of kind ``"transformer"``.

    Raises:
        ValueError: attention without biases or with qk-normalisation, or an unsupported
            ``dtype``.
    """
    _torch()
    tdt = _torch_dtype(dtype)
    params = _params_of(model, params)
    vocab, d = model.embed.embedding.shape
    max_len = model.pos_embed.embedding.shape[0]
    blk = model.blocks[0]
    att = blk.attention
    heads, head_dim = att.num_heads, att.head_dim
    d_ff = blk.fc1.kernel.shape[1]
    eps = float(blk.ln1.epsilon)
    if not att.use_bias or att.normalize_qk:
        raise ValueError("torch_transformer supports biased attention without qk-normalisation")
    module = _classes()["TinyTransformerLM"](
        vocab, d, heads, head_dim, len(model.blocks), d_ff, max_len, eps, tdt
    )
    same = _Layout("same")
    leaves = [LeafMap("embed.weight", "embed/embedding", same),
              LeafMap("pos_embed.weight", "pos_embed/embedding", same)]
    for i in range(len(model.blocks)):
        t, f = f"blocks.{i}", f"blocks/{i}"
        leaves += [LeafMap(f"{t}.ln1.weight", f"{f}/ln1/scale", same),
                   LeafMap(f"{t}.ln1.bias", f"{f}/ln1/bias", same)]
        for name in ("query", "key", "value"):
            leaves += [
                LeafMap(f"{t}.attention.{name}.weight", f"{f}/attention/{name}/kernel",
                        _Layout("heads_in", (heads, head_dim))),
                LeafMap(f"{t}.attention.{name}.bias", f"{f}/attention/{name}/bias",
                        _Layout("heads_bias", (heads, head_dim))),
            ]
        leaves += [
            LeafMap(f"{t}.attention.out.weight", f"{f}/attention/out/kernel",
                    _Layout("heads_out", (heads, head_dim))),
            LeafMap(f"{t}.attention.out.bias", f"{f}/attention/out/bias", same),
            LeafMap(f"{t}.ln2.weight", f"{f}/ln2/scale", same),
            LeafMap(f"{t}.ln2.bias", f"{f}/ln2/bias", same),
        ]
        leaves += _dense(f"{t}.fc1", f"{f}/fc1") + _dense(f"{t}.fc2", f"{f}/fc2")
    leaves += [LeafMap("ln_f.weight", "ln_f/scale", same), LeafMap("ln_f.bias", "ln_f/bias", same)]
    leaves += _dense("unembed", "unembed")
    return _finish(module, leaves, "transformer", params, params)


def to_torch(model: Any, params: PyTree | None = None, dtype: Any = "float32") -> TorchModel:
    """The PyTorch copy of a ``gradience_jax.models`` model (dispatch on the type).

    Supported: ``MLP`` / ``SeedMLP``, ``CNN`` and ``TinyTransformerLM``.

    Args:
        model: the NNX model (its structure: sizes, activation, heads, ...).
        params: Flax params to copy (default: the model's ``nnx.Param`` state); pass
            ``Adapted.params`` or updated params after training.
        dtype: PyTorch dtype of the copy.

    Returns:
        A :class:`TorchModel`.

    Raises:
        ValueError: an unsupported model type or configuration.
    """
    if isinstance(model, MLP):
        return torch_mlp(model, params, dtype)
    if isinstance(model, CNN):
        return torch_cnn(model, params, dtype)
    if isinstance(model, TinyTransformerLM):
        return torch_transformer(model, params, dtype)
    raise ValueError(
        f"to_torch supports gradience_jax.models MLP, CNN and TinyTransformerLM, got "
        f"{type(model).__name__}"
    )
