"""The bridge object: a PyTorch copy of a Flax model and the maps between the layouts.

:class:`TorchModel` carries pytrees to and from ``module.parameters()`` layout, turns Flax
batches into tensors and gives the ``torch.nn`` loss equal to a Flax head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax.operators.heads import MeanSquaredError, SoftmaxCrossEntropy
from gradience_jax.torch_bridge._optional import _np, _torch, _torch_dtype
from gradience_jax.torch_bridge.layout import LeafMap
from gradience_jax.torch_bridge.products import TorchProducts
from gradience_jax.tree import leaf_paths

PyTree = Any

__all__ = ["TorchModel"]


@dataclasses.dataclass
class TorchModel:
    """A PyTorch copy of a Flax model plus the maps between the two parameter layouts.

    Attributes:
        module: the ``torch.nn.Module`` (float32 unless built with another ``dtype``).
        leaves: one :class:`LeafMap` per PyTorch parameter, in ``module.parameters()`` order
            (so ``parameters``, ``to_torch`` and peers' per-parameter outputs line up).
        kind: ``"mlp"``, ``"cnn"`` or ``"transformer"``.
        flax_paths: the Flax params' leaf paths in ``tree_leaves`` order.
    """

    module: Any
    leaves: tuple[LeafMap, ...]
    kind: str
    flax_paths: tuple[str, ...]
    treedef: Any = dataclasses.field(default=None, repr=False)

    # -- parameters and vectors ------------------------------------------------------------
    @property
    def parameters(self) -> list:
        """``list(module.parameters())`` (the order of ``leaves``)."""
        named = dict(self.module.named_parameters())
        return [named[m.torch_name] for m in self.leaves]

    def _flat(self, tree: PyTree) -> dict[str, Any]:
        paths = leaf_paths(tree)
        if tuple(paths) != self.flax_paths:
            missing = sorted(set(self.flax_paths) - set(paths))
            extra = sorted(set(paths) - set(self.flax_paths))
            raise ValueError(
                f"pytree does not match the model's params: missing leaves {missing[:5]}, "
                f"unexpected leaves {extra[:5]}"
            )
        return dict(zip(paths, jax.tree_util.tree_leaves(tree)))

    def to_torch(self, tree: PyTree, dtype: Any = None) -> list:
        """A pytree shaped like the Flax params as tensors in ``module.parameters()`` layout.

        Args:
            tree: a pytree like the Flax params (params, a vector, a gradient).
            dtype: dtype of the tensors (default: the module's parameter dtypes).

        Returns:
            A list of tensors in ``module.parameters()`` layout and order.

        Raises:
            ValueError: ``tree`` does not match the params, or a leaf converts to the wrong
                shape.
        """
        torch = _torch()
        flat = self._flat(tree)
        ref = self.parameters
        out = []
        for m, p in zip(self.leaves, ref):
            arr = np.array(m.layout.to_torch(_np(flat[m.flax_path])), copy=True, order="C")
            if tuple(arr.shape) != tuple(p.shape):
                raise ValueError(
                    f"leaf '{m.flax_path}' converts to shape {arr.shape}, PyTorch parameter "
                    f"'{m.torch_name}' has {tuple(p.shape)}"
                )
            tdt = p.dtype if dtype is None else _torch_dtype(dtype)
            out.append(torch.as_tensor(arr, dtype=tdt))
        return out

    def from_torch(self, tensors: Sequence[Any], like: PyTree | None = None, *,
                   batched: bool = False) -> PyTree:
        """Inverse of :meth:`to_torch`: tensors in ``module.parameters()`` order to a pytree.

        Args:
            tensors: one tensor (or array) per PyTorch parameter, in ``module.parameters()``
                order and layout.
            like: the pytree whose structure and leaf shapes the result takes (default: the
                Flax params' structure; the leaves keep the tensors' dtype).
            batched: every tensor has a leading axis (e.g. per-example gradients) that is
                kept in front.

        Returns:
            A pytree of ``jax.Array`` in the Flax layout.

        Raises:
            ValueError: wrong number of tensors, or a shape that does not match ``like``.
        """
        tensors = list(tensors)
        if len(tensors) != len(self.leaves):
            raise ValueError(f"expected {len(self.leaves)} tensors, got {len(tensors)}")

        def conv(m, t):
            a = _np(t)
            if batched:
                return np.stack([m.layout.from_torch(row) for row in a])
            return m.layout.from_torch(a)

        by_path = {m.flax_path: conv(m, t) for m, t in zip(self.leaves, tensors)}
        if like is None:
            flat, treedef = [None] * len(self.flax_paths), self.treedef
        else:
            flat, treedef = jax.tree_util.tree_flatten(like)
        out = []
        for path, ref in zip(self.flax_paths, flat):
            arr = by_path[path]
            if ref is not None and tuple(arr.shape) != tuple(np.shape(ref)):
                raise ValueError(
                    f"tensor for leaf '{path}' converts to shape {arr.shape}, expected "
                    f"{tuple(np.shape(ref))}"
                )
            out.append(jnp.asarray(arr))
        return jax.tree_util.tree_unflatten(treedef, out)

    def load(self, params: PyTree) -> None:
        """Copy Flax ``params`` into the PyTorch module (in place, no autograd).

        Args:
            params: the Flax params (same structure as the model's).
        """
        torch = _torch()
        with torch.no_grad():
            for p, t in zip(self.parameters, self.to_torch(params)):
                p.copy_(t)

    def check_weights(self, params: PyTree, atol: float = 0.0, rtol: float = 0.0) -> None:
        """Check that the module's weights equal ``params`` up to ``atol + rtol * max|param|``.

        Args:
            params: the Flax params to compare with.
            atol: absolute tolerance.
            rtol: tolerance relative to the leaf's largest entry.

        Raises:
            AssertionError: naming the worst leaf and its max difference, when a leaf
                differs by more than the tolerance.
        """
        want = self.to_torch(params)
        worst = None
        for m, p, w in zip(self.leaves, self.parameters, want):
            diff = float((p.detach().to(w.dtype) - w).abs().max()) if w.numel() else 0.0
            scale = float(w.abs().max()) if w.numel() else 0.0
            if diff > atol + rtol * scale and (worst is None or diff > worst[0]):
                worst = (diff, m)
        if worst is not None:
            diff, m = worst
            raise AssertionError(
                f"transferred weights differ: max |difference| {diff:.3e} at Flax leaf "
                f"'{m.flax_path}' (PyTorch parameter '{m.torch_name}', layout {m.layout.kind})"
            )

    # -- data --------------------------------------------------------------------------------
    def inputs(self, batch: PyTree, key: str = "inputs"):
        """``batch[key]`` as a tensor in the PyTorch layout (NCHW images, int64 tokens).

        Args:
            batch: the Flax batch (a dict of arrays).
            key: the key of the inputs.

        Returns:
            A tensor (the module's dtype, or int64 tokens).
        """
        torch = _torch()
        x = _np(batch[key])
        if self.kind == "transformer":
            return torch.tensor(x.astype(np.int64))
        dtype = self.parameters[0].dtype
        if self.kind == "cnn":
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        return torch.tensor(np.array(x, copy=True)).to(dtype)

    def targets(self, batch: PyTree, key: str = "labels"):
        """``batch[key]`` as a tensor: integer labels as int64, float targets in the module's dtype.

        Args:
            batch: the Flax batch (a dict of arrays).
            key: the key of the targets.

        Returns:
            A tensor; integer labels are flattened over tokens for the transformer.
        """
        torch = _torch()
        y = _np(batch[key])
        if np.issubdtype(y.dtype, np.integer):
            y = y.astype(np.int64)
            return torch.tensor(y.reshape(-1) if self.kind == "transformer" else y)
        return torch.tensor(np.array(y, copy=True)).to(self.parameters[0].dtype)

    def batch(self, batch: PyTree, inputs_key: str = "inputs", targets_key: str = "labels"):
        """``(x, y)`` tensors for ``criterion(module(x), y)``.

        Args:
            batch: the Flax batch (a dict of arrays).
            inputs_key: the key of the inputs (see :meth:`inputs`).
            targets_key: the key of the targets (see :meth:`targets`).

        Returns:
            ``(inputs, targets)`` tensors.
        """
        return self.inputs(batch, inputs_key), self.targets(batch, targets_key)

    def criterion(self, head: Any = None):
        """The ``torch.nn`` loss equal to the Flax head, with ``reduction="mean"``.

        ``nn.CrossEntropyLoss()`` for ``gj.heads.softmax_cross_entropy`` with integer labels
        (the default) and ``nn.MSELoss()`` for ``gj.heads.mse``.

        Args:
            head: the Flax head (default: softmax cross-entropy).

        Returns:
            The ``torch.nn`` loss module.

        Raises:
            ValueError: a head with a mask or an unknown head type.
        """
        torch = _torch()

        if head is None or isinstance(head, SoftmaxCrossEntropy):
            if head is not None and head.mask_key is not None:
                raise ValueError("masked heads have no torch.nn equivalent here")
            return torch.nn.CrossEntropyLoss()
        if isinstance(head, MeanSquaredError):
            if head.mask_key is not None:
                raise ValueError("masked heads have no torch.nn equivalent here")
            return torch.nn.MSELoss()
        raise ValueError(
            "head must be gj.heads.softmax_cross_entropy or gj.heads.mse, got "
            f"{type(head).__name__}"
        )

    def loss(self, batch: PyTree, head: Any = None, targets_key: str | None = None):
        """The PyTorch loss on ``batch`` (a scalar tensor with autograd graph).

        Args:
            batch: the Flax batch (a dict of arrays).
            head: the Flax head (see :meth:`criterion`).
            targets_key: the key of the targets (default: the head's, else ``"labels"``).

        Returns:
            A scalar tensor.
        """
        if targets_key is None:
            targets_key = getattr(head, "targets_key", None) or "labels"
        x, y = self.batch(batch, targets_key=targets_key)
        return self.criterion(head)(self.module(x), y)

    def products(self, batch: PyTree, head: Any = None) -> TorchProducts:
        """PyTorch reference products on ``batch`` (see :class:`TorchProducts`).

        Args:
            batch: the Flax batch (a dict of arrays).
            head: the Flax head (see :meth:`criterion`).

        Returns:
            A :class:`TorchProducts`.
        """
        return TorchProducts(self, batch, head)
