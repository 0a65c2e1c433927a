"""Layouts: NumPy maps between a Flax leaf and a PyTorch parameter (transposes / reshapes).

Every map is a pure transpose / reshape, so the same map carries parameters, tangent
vectors, HVPs and gradients between the frameworks; the table is in
:mod:`gradience_jax.torch_bridge`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["LeafMap"]


@dataclasses.dataclass(frozen=True)
class _Layout:
    """``to_torch(flax_array) -> torch-layout array`` and its inverse (numpy)."""

    kind: str
    dims: tuple[int, ...] = ()

    def to_torch(self, x: np.ndarray) -> np.ndarray:
        k = self.kind
        if k == "same":
            return x
        if k == "dense":  # (in, out) -> (out, in)
            return x.T
        if k == "conv":  # (kh, kw, in, out) -> (out, in, kh, kw)
            return x.transpose(3, 2, 0, 1)
        if k == "head_nhwc":  # (H*W*C, out) -> (out, C*H*W)
            h, w, c = self.dims
            out = x.shape[-1]
            return x.reshape(h, w, c, out).transpose(3, 2, 0, 1).reshape(out, c * h * w)
        if k == "heads_in":  # (d, heads, head_dim) -> (heads*head_dim, d)
            return x.reshape(x.shape[0], -1).T
        if k == "heads_bias":  # (heads, head_dim) -> (heads*head_dim,)
            return x.reshape(-1)
        if k == "heads_out":  # (heads, head_dim, d) -> (d, heads*head_dim)
            return x.reshape(-1, x.shape[-1]).T
        raise AssertionError(k)

    def from_torch(self, x: np.ndarray) -> np.ndarray:
        k = self.kind
        if k == "same":
            return x
        if k == "dense":
            return x.T
        if k == "conv":  # (out, in, kh, kw) -> (kh, kw, in, out)
            return x.transpose(2, 3, 1, 0)
        if k == "head_nhwc":
            h, w, c = self.dims
            out = x.shape[0]
            return x.reshape(out, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, out)
        if k == "heads_in":  # (heads*head_dim, d) -> (d, heads, head_dim)
            heads, head_dim = self.dims
            return x.T.reshape(x.shape[1], heads, head_dim)
        if k == "heads_bias":
            return x.reshape(self.dims)
        if k == "heads_out":  # (d, heads*head_dim) -> (heads, head_dim, d)
            heads, head_dim = self.dims
            return x.T.reshape(heads, head_dim, x.shape[0])
        raise AssertionError(k)


@dataclasses.dataclass(frozen=True)
class LeafMap:
    """One PyTorch parameter and the Flax leaf it holds.

    Attributes:
        torch_name: name in ``module.named_parameters()``.
        flax_path: ``"/"``-joined path of the Flax leaf (``gradience_jax.tree.leaf_paths``).
        layout: the layout conversion between them.
    """

    torch_name: str
    flax_path: str
    layout: _Layout
