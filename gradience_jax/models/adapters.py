"""Turn a Flax model (NNX or Linen) into ``(loss_fn, model_fn, params)``.

The returned ``loss_fn`` / ``model_fn`` are hashable callables that compare equal for the same
model structure: for NNX the same ``graphdef`` (and the same non-``Param`` state objects),
``input_key`` and head; for Linen an equal module, ``input_key`` and head. Operators and
``jax.jit``-compiled functions key their caches on them, so adapting the model again after
each optimizer update reuses every compiled program (only the params change)::

    for step in range(steps):
        optimizer.update(model, grads)
        adapted = from_nnx(model, head)          # equal loss_fn / model_fn: no recompile
        top = gj.eigsh(gj.hessian(adapted.loss_fn, adapted.params, batch), k=1)

Or adapt once and swap in the new params: ``adapted.with_params(nnx.state(model,
nnx.Param))`` (Linen: ``adapted.with_params(new_variables["params"])``).

Non-``Param`` state (``nnx.BatchStat``, RNG counters, ...) is captured as constants of the
model function; a new value of it (e.g. batch statistics updated by training) is a new model
function, and the programs built from it compile again.

Supported names: :class:`Adapted`, :func:`from_nnx`, :func:`from_linen` (the ``__all__``
list).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
from flax import nnx

from gradience_jax._validate import ArgumentTypeError, check_like, check_params
from gradience_jax.operators.ggn import SplitModel
from gradience_jax.operators.heads import compose

PyTree = Any

__all__ = ["Adapted", "from_linen", "from_nnx"]


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

    def with_params(self, params: PyTree) -> Adapted:
        """The same adapter at new parameters (e.g. after an optimizer update).

        ``loss_fn`` / ``model_fn`` are kept, so every compiled program is reused.

        Args:
            params: a pytree with the structure, shapes and dtypes of ``self.params``
                (NNX: ``nnx.state(model, nnx.Param)``).

        Returns:
            An :class:`Adapted` with ``params`` replaced.

        Raises:
            ValueError: ``params`` has another structure or leaf shapes.
            TypeError: ``params`` has other leaf dtypes, or non-float leaves.
        """
        check_params(params)
        check_like(params, self.params, "params", "the adapter's params")
        return self._replace(params=params)


def _input(batch: PyTree, input_key: str) -> Any:
    try:
        return batch[input_key]
    except (KeyError, TypeError, IndexError) as exc:
        keys = sorted(map(str, batch)) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(
            f"the model reads its inputs from batch[{input_key!r}] (input_key); the batch "
            f"has {keys}"
        ) from exc


def _snapshot(state: PyTree) -> PyTree:
    """The same pytree with new containers around the same (immutable) arrays."""
    return jax.tree_util.tree_map(lambda x: x, state)


def _state_key(rest: tuple) -> tuple:
    """Hashable identity of the non-``Param`` state: its structure and its leaf objects."""
    leaves, treedef = jax.tree_util.tree_flatten(rest)
    return treedef, tuple(id(x) for x in leaves)


@dataclasses.dataclass(frozen=True, eq=False)
class _NNXApply:
    """``model(batch[input_key])`` (or ``model.<method>(...)``) of ``merge(graphdef, params)``.

    Equal (and equally hashed) for the same graphdef, non-``Param`` state objects,
    ``input_key`` and method: a new adapter of the same model reuses compiled programs.
    """

    graphdef: Any
    rest: Any
    input_key: str
    method: str | None = None

    def _key(self) -> tuple:
        return (self.graphdef, _state_key(self.rest), self.input_key, self.method)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __call__(self, params, batch):
        model = nnx.merge(self.graphdef, params, *self.rest)
        fn = model if self.method is None else getattr(model, self.method)
        return fn(_input(batch, self.input_key))


@dataclasses.dataclass(frozen=True, eq=False)
class _NNXReadout:
    """``merge(graphdef, params).<method>(hidden)`` (the readout of a :class:`SplitModel`)."""

    graphdef: Any
    rest: Any
    method: str

    def _key(self) -> tuple:
        return (self.graphdef, _state_key(self.rest), self.method)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __call__(self, params, hidden):
        return getattr(nnx.merge(self.graphdef, params, *self.rest), self.method)(hidden)


def _check_head(head: Any) -> None:
    if not callable(head):
        raise ArgumentTypeError(
            f"head must be a callable head(outputs, batch) -> scalar (e.g. "
            f"gj.heads.softmax_cross_entropy()), got {type(head).__name__}")


def _check_input_key(input_key: Any) -> None:
    if not isinstance(input_key, str):
        raise ArgumentTypeError(f"input_key must be a string, got {input_key!r}")


def from_nnx(model: nnx.Module, head: Callable, input_key: str = "inputs") -> Adapted:
    """Adapt an NNX module: ``params = nnx.split(model, nnx.Param, ...)[1]``.

    Models with ``features`` and ``readout`` methods (e.g. :class:`TinyTransformerLM`) get a
    :class:`~gradience_jax.SplitModel` as ``model_fn``, which ``ggn(vocab_chunk=...)`` needs.

    Calling ``from_nnx(model, head)`` again after the model's parameters changed (an
    optimizer update) gives equal ``loss_fn`` / ``model_fn``, so operators and jitted
    functions reuse their compiled programs (module docstring).

    ``params`` is a snapshot of the model's ``nnx.Param`` values at this call: a later
    optimizer update changes the model, not ``params`` (``nnx.split`` alone would hand out the
    model's own, mutable ``Variable`` objects).

    Args:
        model: the NNX module; its graph and non-``Param`` state are captured.
        head: ``head(outputs, batch) -> scalar`` loss on the model's outputs.
        input_key: the key of the model inputs in ``batch``.

    Returns:
        :class:`Adapted` with hashable ``loss_fn`` / ``model_fn``.

    Raises:
        ArgumentTypeError: ``model`` is not an ``nnx.Module``, ``head`` is not callable or
            ``input_key`` is not a string.
        ValueError: the model has no ``nnx.Param`` leaves.
    """
    if not isinstance(model, nnx.Module):
        hint = " (use from_linen(module, variables, head) for Linen)" if hasattr(
            model, "init") and hasattr(model, "apply") else ""
        raise ArgumentTypeError(f"model must be an nnx.Module, got {type(model).__name__}{hint}")
    _check_head(head)
    _check_input_key(input_key)
    graphdef, params, *rest = nnx.split(model, nnx.Param, ...)
    # nnx.split hands out the model's own Variable objects: an optimizer update would change
    # them in place (and the operators built on them). Snapshot the values (no array copy).
    params, rest = _snapshot(params), tuple(_snapshot(r) for r in rest)
    check_params(params, "the model's nnx.Param state")
    if hasattr(model, "features") and hasattr(model, "readout"):
        model_fn = SplitModel(
            _NNXApply(graphdef, rest, input_key, "features"), _NNXReadout(graphdef, rest, "readout")
        )
    else:
        model_fn = _NNXApply(graphdef, rest, input_key)
    return Adapted(compose(model_fn, head), model_fn, params, head)


@dataclasses.dataclass(frozen=True, eq=False)
class _LinenApply:
    """``module.apply({'params': params}, batch[input_key])``; equal for equal modules."""

    module: Any
    input_key: str

    def __eq__(self, other: object) -> bool:
        return (type(other) is type(self) and self.input_key == other.input_key
                and (self.module is other.module or self.module == other.module))

    def __hash__(self) -> int:
        # equal modules may be unhashable (a list field): hash what equality implies
        return hash((type(self.module), self.input_key))

    def __call__(self, params, batch):
        return self.module.apply({"params": params}, _input(batch, self.input_key))


def from_linen(
    module: Any, variables: PyTree, head: Callable, input_key: str = "inputs"
) -> Adapted:
    """Adapt a Linen module with ``variables = module.init(...)``; params are its ``'params'``.

    Other variable collections are not supported here. Adapting an equal module again (e.g.
    with the variables after an optimizer update) gives equal ``loss_fn`` / ``model_fn``, so
    compiled programs are reused (module docstring).

    Args:
        module: the Linen module.
        variables: ``module.init(...)``, with the ``'params'`` collection only.
        head: ``head(outputs, batch) -> scalar`` loss on the module's outputs.
        input_key: the key of the model inputs in ``batch``.

    Returns:
        :class:`Adapted` with ``params = variables['params']``.

    Raises:
        ArgumentTypeError: ``module`` has no ``apply``, ``variables`` is not a mapping,
            ``head`` is not callable or ``input_key`` is not a string.
        ValueError: if ``variables`` holds collections other than ``'params'``, or none.
    """
    if not callable(getattr(module, "apply", None)):
        raise ArgumentTypeError(
            f"module must be a flax.linen Module, got {type(module).__name__}"
            + (" (use from_nnx(model, head) for NNX)" if isinstance(module, nnx.Module) else ""))
    if not isinstance(variables, Mapping):
        raise ArgumentTypeError(
            f"variables must be the mapping module.init(...) returns, got "
            f"{type(variables).__name__}")
    _check_head(head)
    _check_input_key(input_key)
    extra = set(variables) - {"params"}
    if extra:
        raise ValueError(
            "from_linen supports only the 'params' collection; got extra collections "
            f"{sorted(extra)}"
        )
    if "params" not in variables:
        raise ValueError("variables has no 'params' collection (pass module.init(...))")
    check_params(variables["params"], "variables['params']")
    model_fn = _LinenApply(module, input_key)
    return Adapted(compose(model_fn, head), model_fn, variables["params"], head)
