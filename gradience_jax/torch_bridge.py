"""Weight transfer to PyTorch: the MLP, CNN and tiny transformer LM as ``torch.nn`` modules.

Each ``torch.nn`` module holds a copy of the Flax parameters, so both frameworks evaluate the
identical function (used by the agreement tests and the benchmarks against PyTorch peers:
PyHessian, curvlinops, BackPACK, hessian-eigenthings).

PyTorch is imported lazily inside the functions: ``import gradience_jax`` never imports
torch. Install the ``[torch]`` extra to use this module.

Layout conversions (Flax -> PyTorch; every one is a pure transpose / reshape, so the same
map carries parameters, tangent vectors, HVPs and gradients between the frameworks):

============================  ==========================  =================================
Flax leaf                     Flax shape                  PyTorch parameter
============================  ==========================  =================================
``nnx.Linear`` kernel         ``(in, out)``               ``nn.Linear.weight (out, in)``
                                                          = ``kernel.T``
``nnx.Linear`` / Conv bias    ``(out,)``                  ``bias (out,)`` unchanged
``nnx.Conv`` kernel           ``(kh, kw, in, out)``       ``nn.Conv2d.weight (out, in, kh, kw)``
                                                          = ``kernel.transpose(3, 2, 0, 1)``
CNN ``head`` kernel           ``(H*W*C, out)``, rows in   ``weight (out, C*H*W)``: rows re-ordered
                              NHWC-flatten order          to NCHW-flatten order
                                                          (``nn.Flatten`` of NCHW)
attention query/key/value     ``(d, heads, head_dim)``    ``nn.Linear.weight (heads*head_dim, d)``
                                                          = ``reshape(d, -1).T``
attention q/k/v bias          ``(heads, head_dim)``       ``bias (heads*head_dim,)``
attention ``out`` kernel      ``(heads, head_dim, d)``    ``nn.Linear.weight (d, heads*head_dim)``
                                                          = ``reshape(-1, d).T``
``nnx.LayerNorm`` scale/bias  ``(d,)``                    ``nn.LayerNorm.weight / bias``
                                                          (eps copied, 1e-6)
``nnx.Embed`` embedding       ``(V, d)``                  ``nn.Embedding.weight (V, d)`` unchanged
============================  ==========================  =================================

Inputs: images are NHWC in Flax and NCHW in PyTorch (``TorchModel.inputs`` permutes);
token and label ids become ``int64``. The PyTorch transformer returns logits flattened to
``(B*T, V)`` (and ``TorchModel.targets`` flattens the labels to ``(B*T,)``) so that
``nn.CrossEntropyLoss()`` -- which PyHessian, curvlinops and BackPACK expect -- computes the
same token-mean cross-entropy as ``gj.heads.softmax_cross_entropy``. GELU is the tanh
approximation (``jax.nn.gelu``'s default) and attention is written out (einsum, causal mask
with ``finfo.min``, softmax) exactly like ``gradience_jax.models.dot_product_attention``.

Example:
    The PyTorch steps need the ``[torch]`` extra, so the doctests skip them.

    >>> from gradience_jax import data, heads, models
    >>> model = models.MLP([16, 8, 4], rngs=nnx.Rngs(0))
    >>> batch = data.classification(jax.random.key(0), n=32)
    >>> adapted = models.from_nnx(model, heads.softmax_cross_entropy())
    >>> tm = to_torch(model)  # doctest: +SKIP
    >>> x, y = tm.batch(batch)  # doctest: +SKIP
    >>> loss = tm.criterion()(tm.module(x), y)  # doctest: +SKIP
    >>> bool(abs(loss.item() - adapted.loss_fn(adapted.params, batch)) < 1e-5)  # doctest: +SKIP
    True
    >>> v = jax.tree_util.tree_map(jnp.ones_like, adapted.params)
    >>> hv_torch = tm.products(batch).hvp_func(tm.to_torch(v))  # doctest: +SKIP
    >>> hv = tm.from_torch(hv_torch)  # back in the Flax layout  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gradience_jax.models import CNN, MLP, TinyTransformerLM
from gradience_jax.operators.heads import MeanSquaredError, SoftmaxCrossEntropy
from gradience_jax.tree import leaf_paths

PyTree = Any

__all__ = [
    "TorchModel",
    "TorchProducts",
    "LeafMap",
    "compare_trees",
    "torch_available",
    "to_torch",
    "torch_cnn",
    "torch_mlp",
    "torch_transformer",
]


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


# ---------------------------------------------------------------------------------------
# Layouts: numpy maps Flax leaf <-> PyTorch parameter (pure transposes / reshapes)
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# The bridge object
# ---------------------------------------------------------------------------------------


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


class TorchProducts:
    """Curvature products computed by PyTorch alone, on one batch.

    Vectors are lists of tensors in ``module.parameters()`` layout (``TorchModel.to_torch`` /
    ``from_torch``).

    Methods (each returns a list of tensors; per-example gradients have a leading ``N``):
        hvp_double_backprop(v): ``grad(grad(loss) . v)``, forward and both backward passes
            every call (Pearlmutter's R-op by double backprop).
        hvp_retained(v): double backprop re-using one gradient graph built on first use
            (PyHessian's scheme: each product pays only the second backward pass).
        hvp_func(v): ``torch.func.jvp(torch.func.grad(loss))`` (forward-over-reverse).
        ggn_func(v): ``J^T H_loss J v`` by ``torch.func`` jvp -> loss-Hessian jvp -> vjp.
        per_example_func(): ``torch.func.vmap(torch.func.grad(loss_of_one_example))``.
        per_example_loop(): a Python loop of ``autograd.grad`` over examples.
        ef_func(v): empirical Fisher ``G^T (G v) / N`` from ``per_example_func`` gradients.
    """

    def __init__(self, tm: TorchModel, batch: PyTree, head: Any = None):
        torch = _torch()
        from torch import func  # noqa: PLC0415 - optional dependency, the [torch] extra

        self.tm = tm
        targets_key = getattr(head, "targets_key", None) or "labels"
        self.x = tm.inputs(batch)
        y = _np(batch[targets_key])
        self.y = tm.targets(batch, targets_key)  # flattened over tokens for the transformer
        self.y_examples = (torch.tensor(y.astype(np.int64)) if np.issubdtype(y.dtype, np.integer)
                           else torch.tensor(np.array(y)).to(tm.parameters[0].dtype))
        self.criterion = tm.criterion(head)
        self.names = [m.torch_name for m in tm.leaves]
        self.params = [p.detach() for p in tm.parameters]
        self.n = int(self.x.shape[0])
        module, crit, names = tm.module, self.criterion, self.names

        def loss_of(params, x, y):
            out = func.functional_call(module, dict(zip(names, params)), (x,))
            return crit(out, y.reshape(-1) if tm.kind == "transformer" else y)

        def model_of(params):
            return func.functional_call(module, dict(zip(names, params)), (self.x,))

        self._loss_of = loss_of
        self._model_of = model_of
        self._grad = func.grad(lambda p: loss_of(p, self.x, self.y_examples))
        self._example_grad = func.vmap(
            func.grad(lambda p, x, y: loss_of(p, x[None], y[None])), in_dims=(None, 0, 0)
        )
        self._retained = None

    def loss(self):
        """The loss value (no graph)."""
        torch = _torch()
        with torch.no_grad():
            return self._loss_of(self.params, self.x, self.y_examples)

    def grad(self) -> list:
        """The gradient by ``torch.func.grad``."""
        return list(self._grad(self.params))

    def hvp_double_backprop(self, v: Sequence[Any]) -> list:
        """Hessian-vector product ``grad(grad(loss) . v)`` by double backprop.

        Forward and both backward passes run on every call (Pearlmutter's R-op).

        Args:
            v: tensors in ``module.parameters()`` layout.

        Returns:
            ``H v`` as a list of tensors.
        """
        torch = _torch()
        params = self.tm.parameters
        loss = self.criterion(self.tm.module(self.x), self.y)
        g = torch.autograd.grad(loss, params, create_graph=True)
        return list(torch.autograd.grad(g, params, grad_outputs=list(v)))

    def hvp_retained(self, v: Sequence[Any]) -> list:
        """Hessian-vector product by double backprop through one retained gradient graph.

        The graph is built on the first call (PyHessian's scheme: each product pays only
        the second backward pass).

        Args:
            v: tensors in ``module.parameters()`` layout.

        Returns:
            ``H v`` as a list of tensors.
        """
        torch = _torch()
        params = self.tm.parameters
        if self._retained is None:
            loss = self.criterion(self.tm.module(self.x), self.y)
            self._retained = torch.autograd.grad(loss, params, create_graph=True)
        return list(torch.autograd.grad(self._retained, params, grad_outputs=list(v),
                                        retain_graph=True))

    def hvp_func(self, v: Sequence[Any]) -> list:
        """Hessian-vector product ``torch.func.jvp(torch.func.grad(loss))`` (forward-over-reverse).

        Args:
            v: tensors in ``module.parameters()`` layout.

        Returns:
            ``H v`` as a list of tensors.
        """
        from torch import func  # noqa: PLC0415 - optional dependency, the [torch] extra

        return list(func.jvp(self._grad, (tuple(self.params),), (tuple(v),))[1])

    def ggn_func(self, v: Sequence[Any]) -> list:
        """GGN-vector product ``J^T H_loss J v`` by ``torch.func`` jvp, loss-Hessian jvp, vjp.

        Args:
            v: tensors in ``module.parameters()`` layout.

        Returns:
            ``G v`` as a list of tensors.
        """
        from torch import func  # noqa: PLC0415 - optional dependency, the [torch] extra

        y = self.y
        out, jv = func.jvp(self._model_of, (tuple(self.params),), (tuple(v),))
        crit = self.criterion
        _, hjv = func.jvp(func.grad(lambda o: crit(o, y)), (out.detach(),), (jv,))
        _, vjp = func.vjp(self._model_of, tuple(self.params))
        return list(vjp(hjv)[0])

    def per_example_func(self) -> list:
        """Per-example gradients by ``torch.func.vmap(torch.func.grad(loss_of_one_example))``.

        Returns:
            One tensor per parameter, with a leading axis ``N`` (examples).
        """
        return list(self._example_grad(tuple(self.params), self.x, self.y_examples))

    def per_example_loop(self) -> list:
        """Per-example gradients by a Python loop of ``autograd.grad`` over the examples.

        Returns:
            One tensor per parameter, with a leading axis ``N`` (examples).
        """
        torch = _torch()
        params = self.tm.parameters
        rows = []
        for i in range(self.n):
            yi = self.y_examples[i : i + 1]
            loss = self.criterion(self.tm.module(self.x[i : i + 1]),
                                  yi.reshape(-1) if self.tm.kind == "transformer" else yi)
            rows.append(torch.autograd.grad(loss, params))
        return [torch.stack(col) for col in zip(*rows)]

    def ef_func(self, v: Sequence[Any], grads: Sequence[Any] | None = None) -> list:
        """Empirical-Fisher-vector product ``G^T (G v) / N`` from per-example gradients.

        Args:
            v: tensors in ``module.parameters()`` layout.
            grads: per-example gradients (default: :meth:`per_example_func`).

        Returns:
            ``F v`` as a list of tensors.
        """
        torch = _torch()
        grads = self.per_example_func() if grads is None else grads
        gv = sum(torch.einsum("n...,...->n", g, x) for g, x in zip(grads, v))
        return [torch.einsum("n,n...->...", gv, g) / self.n for g in grads]


def compare_trees(ours: PyTree, theirs: PyTree) -> tuple[float, str, float]:
    """Relative error, worst leaf and its max difference of two pytrees (float64 arithmetic).

    Args:
        ours: the pytree ``a`` to check.
        theirs: the reference pytree ``b``, with the same structure.

    Returns:
        ``(||a - b|| / ||b||, worst leaf path, its max |difference|)``.

    Raises:
        ValueError: the trees have different numbers of leaves.
    """
    paths = leaf_paths(theirs)
    la = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(ours)]
    lb = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(theirs)]
    if len(la) != len(lb):
        raise ValueError(f"trees have {len(la)} and {len(lb)} leaves")
    num = math.sqrt(sum(float(np.sum((a - b) ** 2)) for a, b in zip(la, lb)))
    den = math.sqrt(sum(float(np.sum(b**2)) for b in lb))
    diffs = [float(np.max(np.abs(a - b))) if a.size else 0.0 for a, b in zip(la, lb)]
    i = int(np.argmax(diffs))
    return num / max(den, 1e-300), paths[i], diffs[i]


# ---------------------------------------------------------------------------------------
# PyTorch modules (defined on first use so that torch is imported lazily)
# ---------------------------------------------------------------------------------------


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
