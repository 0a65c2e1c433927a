"""Turn a Flax model (NNX or Linen) into ``(loss_fn, model_fn, params)``.

The returned functions are hashable callables, so operators built from them reuse
compiled programs across parameter updates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from flax import nnx

from gradience_jax.operators.ggn import SplitModel
from gradience_jax.operators.heads import compose

PyTree = Any


class Adapted(NamedTuple):
    """What the operators need: the loss, the model function, the params and the head.

    Attributes:
        loss_fn: ``loss_fn(params, batch) -> scalar``, equal to
            ``head(model_fn(params, batch), batch)``.
        model_fn: ``model_fn(params, batch) -> outputs``.
        params: the parameter pytree.
        head: ``head(outputs, batch) -> scalar`` loss.
    """

    loss_fn: Callable[[PyTree, PyTree], jax.Array]
    model_fn: Callable[[PyTree, PyTree], jax.Array]
    params: PyTree
    head: Callable


@dataclasses.dataclass(frozen=True, eq=False)
class _NNXApply:
    graphdef: Any
    rest: Any
    input_key: str
    method: str | None = None

    def __call__(self, params, batch):
        model = nnx.merge(self.graphdef, params, *self.rest)
        fn = model if self.method is None else getattr(model, self.method)
        return fn(batch[self.input_key])


@dataclasses.dataclass(frozen=True, eq=False)
class _NNXReadout:
    graphdef: Any
    rest: Any
    method: str

    def __call__(self, params, hidden):
        return getattr(nnx.merge(self.graphdef, params, *self.rest), self.method)(hidden)


def from_nnx(model: nnx.Module, head: Callable, input_key: str = "inputs") -> Adapted:
    """Adapt an NNX module: ``params = nnx.split(model, nnx.Param, ...)[1]``.

    Models with ``features`` and ``readout`` methods (e.g. :class:`TinyTransformerLM`) get a
    :class:`~gradience_jax.SplitModel` as ``model_fn``, which ``ggn(vocab_chunk=...)`` needs.

    Args:
        model: the NNX module; its graph and non-``Param`` state are captured once.
        head: ``head(outputs, batch) -> scalar`` loss on the model's outputs.
        input_key: the key of the model inputs in ``batch``.

    Returns:
        :class:`Adapted` with hashable ``loss_fn`` / ``model_fn``.
    """
    graphdef, params, *rest = nnx.split(model, nnx.Param, ...)
    rest = tuple(rest)
    if hasattr(model, "features") and hasattr(model, "readout"):
        model_fn = SplitModel(
            _NNXApply(graphdef, rest, input_key, "features"), _NNXReadout(graphdef, rest, "readout")
        )
    else:
        model_fn = _NNXApply(graphdef, rest, input_key)
    return Adapted(compose(model_fn, head), model_fn, params, head)


@dataclasses.dataclass(frozen=True, eq=False)
class _LinenApply:
    module: Any
    input_key: str

    def __call__(self, params, batch):
        return self.module.apply({"params": params}, batch[self.input_key])


def from_linen(
    module: Any, variables: PyTree, head: Callable, input_key: str = "inputs"
) -> Adapted:
    """Adapt a Linen module with ``variables = module.init(...)``; params are its ``'params'``.

    Other variable collections are not supported here.

    Args:
        module: the Linen module.
        variables: ``module.init(...)``, with the ``'params'`` collection only.
        head: ``head(outputs, batch) -> scalar`` loss on the module's outputs.
        input_key: the key of the model inputs in ``batch``.

    Returns:
        :class:`Adapted` with ``params = variables['params']``.

    Raises:
        ValueError: if ``variables`` holds collections other than ``'params'``.
    """
    extra = set(variables) - {"params"}
    if extra:
        raise ValueError(
            "from_linen supports only the 'params' collection; got extra collections "
            f"{sorted(extra)}"
        )
    model_fn = _LinenApply(module, input_key)
    return Adapted(compose(model_fn, head), model_fn, variables["params"], head)
