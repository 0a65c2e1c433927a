"""Peer cross-checks: curvature products computed by PyTorch alone, and tree comparison.

:class:`TorchProducts` gives PyTorch's own HVPs, GGN and empirical-Fisher products and
per-example gradients on one batch (the references the agreement tests and the
benchmarks compare against); :func:`compare_trees` measures how far two pytrees differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from gradience_jax.torch_bridge._optional import _np, _torch
from gradience_jax.tree import leaf_paths

if TYPE_CHECKING:
    from gradience_jax.torch_bridge.model import TorchModel

PyTree = Any

__all__ = ["TorchProducts", "compare_trees"]


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
