"""Your own model and data: ``"module:factory"`` specs resolved into what the operators need.

The command line's ``--model module:factory`` and ``--data module:factory`` (and the
analysis job's ``AnalysisConfig(model=..., data=...)``) name a Python callable, as
``"package.module:name"`` (imported with :mod:`importlib`) or ``"path/to/file.py:name"``
(loaded from that file; its folder is put on ``sys.path`` while it runs, so it can import
its neighbours). ``name`` may be dotted (``"mod:Class.build"``). The callable is called
with no arguments; an attribute that already *is* a model (or a batch) is used as it is.

A model factory returns one of

* an ``nnx.Module``: :func:`~gradience_jax.models.from_nnx`; the module is cloned and put
  in inference mode (``model.eval()``: running batch statistics, no dropout); its
  non-``Param`` state (``nnx.BatchStat``) is held fixed.
* a Linen module with its variables, ``(module, variables)`` or
  ``(module, variables, apply_kwargs)``: ``'params'`` are the parameters, every other
  collection (``batch_stats``, ...) is held fixed:
  ``module.apply({"params": p, **fixed}, x, mutable=False, **apply_kwargs)``. Without
  ``apply_kwargs``, a ``__call__`` argument named ``train`` / ``training`` /
  ``is_training`` is passed ``False`` and one named ``deterministic`` /
  ``use_running_average`` is passed ``True`` (inference mode, as for NNX). With only
  ``'params'`` and no keyword arguments this is :func:`~gradience_jax.models.from_linen`.
* an Equinox module: ``params, static = eqx.partition(model, eqx.is_inexact_array)``
  (floating-point arrays are the parameters, everything else is static) and
  ``model_fn(params, batch) = jax.vmap(eqx.combine(params, static))(batch[input_key])``
  (Equinox layers take one example; ``vmap=False`` calls the module on the whole batch);
  the module is put in inference mode (``eqx.nn.inference_mode``). Stateful Equinox
  models (``eqx.nn.State``) are not supported.
* plain functions, ``(loss_fn, model_fn, params)`` or ``(loss_fn, model_fn, params, head)``
  (``loss_fn`` may be ``None``: ``head(model_fn(...))``; ``model_fn`` may be ``None``: the
  Hessian and the empirical Fisher only), or an :class:`~gradience_jax.models.Adapted`.

The head (the loss on the model's outputs) is ``head=`` (default
``gj.heads.softmax_cross_entropy()``: integer ``batch["labels"]``), the inputs are
``batch[input_key]`` (default ``"inputs"``).

A data factory returns a batch (a dict of arrays sharing a leading axis, e.g.
``{"inputs": x, "labels": y}``) or an iterable of such batches (a list, a generator, a data
loader): the first ``batches`` of them are concatenated.

Checkpoints of such a model: :func:`restore` puts the arrays of a checkpoint tree into the
model (matched by their paths, ``"layers/0/kernel"``, against the model's parameters; the
tree may be the parameters themselves, a training state or Linen variables holding them
under ``"params"``, or an NNX state); non-trainable state stored with them (Linen
``batch_stats``, NNX batch statistics) replaces the factory's.

Supported names: :class:`ExternalModel`, :class:`FactoryError`, :class:`FactoryTypeError`,
:func:`load_factory`, :func:`adapt`, :func:`load_model`, :func:`load_data`,
:func:`restore`, :func:`is_spec`.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import itertools
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from gradience_jax._validate import ArgumentTypeError, check_batch, check_int, check_params
from gradience_jax.models.adapters import Adapted, from_linen, from_nnx
from gradience_jax.operators.heads import compose, softmax_cross_entropy

PyTree = Any

__all__ = [
    "ExternalModel",
    "FactoryError",
    "FactoryTypeError",
    "adapt",
    "is_spec",
    "load_data",
    "load_factory",
    "load_model",
    "restore",
]

KINDS = ("nnx", "linen", "equinox", "functions")
"""The kinds of model :func:`adapt` accepts (:attr:`ExternalModel.kind`)."""

_FALSE_FLAGS = ("train", "training", "is_training")
_TRUE_FLAGS = ("deterministic", "use_running_average")


def _input(batch: PyTree, input_key: str) -> Any:
    try:
        return batch[input_key]
    except (KeyError, TypeError, IndexError) as exc:
        keys = sorted(map(str, batch)) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"the model reads its inputs from batch[{input_key!r}] (input_key); "
                         f"the batch has {keys}") from exc


def _state_key(state: PyTree) -> tuple:
    """Hashable identity of fixed state: its structure and its leaf objects."""
    leaves, treedef = jax.tree_util.tree_flatten(state)
    return treedef, tuple(id(x) for x in leaves)


class FactoryError(ValueError):
    """A ``module:factory`` spec that cannot be resolved (bad spec, import, call or result)."""


class FactoryTypeError(FactoryError, ArgumentTypeError):
    """A factory returned something that is neither a supported model nor a batch."""


# -- specs ---------------------------------------------------------------------------------


def is_spec(text: Any) -> bool:
    """Whether ``text`` looks like a ``module:factory`` spec (a string with a ``:``).

    Args:
        text: anything.

    Returns:
        True for a string holding a colon with text on both sides.
    """
    if not isinstance(text, str) or ":" not in text:
        return False
    target, _, name = text.rpartition(":")
    return bool(target.strip()) and bool(name.strip())


def _split_spec(spec: Any, what: str) -> tuple[str, str]:
    if not isinstance(spec, str):
        raise FactoryTypeError(f"{what} must be a 'module:factory' string, got "
                               f"{type(spec).__name__}")
    target, sep, name = spec.rpartition(":")
    if not sep:
        raise FactoryError(f"{what} {spec!r} has no ':': write 'package.module:factory' or "
                           "'path/to/file.py:factory'")
    if not target.strip() or not name.strip():
        raise FactoryError(f"{what} {spec!r} needs a module and a name on both sides of ':' "
                           "('package.module:factory' or 'path/to/file.py:factory')")
    return target.strip(), name.strip()


def _import_file(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FactoryError(f"{what}: file not found: {path}")
    name = "_gradience_user_" + "".join(c if c.isalnum() else "_" for c in str(path.resolve()))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FactoryError(f"{what}: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise FactoryError(f"{what}: importing {path} raised {_first_line(exc)}") from exc
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:
            pass
    return module


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def load_factory(spec: str, what: str = "factory") -> Any:
    """The object a ``"module:name"`` (or ``"path/to/file.py:name"``) spec names.

    Args:
        spec: ``"package.module:name"`` (imported) or ``"path/file.py:name"`` (a target
            ending in ``.py`` or holding a path separator is a file); ``name`` may be
            dotted (attributes of attributes).
        what: how errors name the spec (e.g. ``"--model"``).

    Returns:
        The object (not called).

    Raises:
        FactoryError: no ``:``, a missing module or file, an import that raises, a missing
            attribute. :class:`FactoryTypeError`: ``spec`` is not a string.
    """
    target, name = _split_spec(spec, what)
    if target.endswith(".py") or "/" in target or "\\" in target:
        module = _import_file(Path(target).expanduser(), what)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            missing = f" ({exc.name} is not installed or not on sys.path)" if exc.name else ""
            raise FactoryError(f"{what} {spec!r}: cannot import module {target!r}{missing}"
                               ) from exc
        except Exception as exc:
            raise FactoryError(f"{what} {spec!r}: importing {target!r} raised "
                               f"{_first_line(exc)}") from exc
    obj = module
    for i, part in enumerate(name.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            where = ".".join([target, *name.split(".")[:i]]) if i else target
            public = sorted(n for n in dir(obj) if not n.startswith("_"))[:8]
            raise FactoryError(f"{what} {spec!r}: {where} has no attribute {part!r} "
                               f"(it has: {', '.join(public) or 'nothing public'})") from None
    return obj


def _call(obj: Any, spec: str, what: str, is_value: Callable[[Any], bool]) -> Any:
    """``obj()`` unless ``obj`` already is a value; a raising factory is a FactoryError."""
    if is_value(obj):
        return obj
    if not callable(obj):
        raise FactoryTypeError(f"{what} {spec!r} is a {type(obj).__name__}, not a callable "
                               "factory")
    try:
        return obj()
    except Exception as exc:
        raise FactoryError(f"{what} {spec!r}: the factory raised {_first_line(exc)}") from exc


# -- models --------------------------------------------------------------------------------


def _linen_module_type() -> type | None:
    try:
        from flax import linen  # noqa: PLC0415 - only for the isinstance check
    except ImportError:  # pragma: no cover - flax ships linen
        return None
    return linen.Module


def _is_linen(obj: Any) -> bool:
    cls = _linen_module_type()
    return cls is not None and isinstance(obj, cls)


def _is_equinox(obj: Any) -> bool:
    eqx = sys.modules.get("equinox")  # a factory returning one has imported equinox
    return eqx is not None and isinstance(obj, eqx.Module)


def _is_model(obj: Any) -> bool:
    if isinstance(obj, (Adapted, nnx.Module)) or _is_equinox(obj):
        return True
    return isinstance(obj, (tuple, list)) and 2 <= len(obj) <= 4 and (
        _is_linen(obj[0]) or any(callable(x) for x in obj[:2]))


def _kind(obj: Any) -> str:
    if isinstance(obj, Adapted):
        return "functions"
    if isinstance(obj, nnx.Module):
        return "nnx"
    if _is_equinox(obj):
        return "equinox"
    if _is_linen(obj):
        raise FactoryTypeError(
            f"a Linen module needs its variables: return (module, variables) with "
            f"variables = module.init(...), not the {type(obj).__name__} module alone")
    if isinstance(obj, (tuple, list)) and obj and _is_linen(obj[0]):
        if len(obj) not in (2, 3):
            raise FactoryTypeError("a Linen model is (module, variables) or (module, "
                                   f"variables, apply_kwargs), got {len(obj)} items")
        return "linen"
    if isinstance(obj, (tuple, list)) and len(obj) in (3, 4):
        return "functions"
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and _is_equinox(obj[0]):
        raise FactoryTypeError("stateful Equinox models ((model, eqx.nn.State)) are not "
                               "supported: return the module alone (inference mode)")
    raise FactoryTypeError(
        f"unsupported model: got {type(obj).__name__}"
        + (f" of {len(obj)} items" if isinstance(obj, (tuple, list)) else "")
        + "; a model factory returns an nnx.Module, (linen_module, variables), an Equinox "
        "module, (loss_fn, model_fn, params[, head]) or an Adapted")


@dataclasses.dataclass(frozen=True, eq=False)
class _LinenApply:
    """``module.apply({"params": p, **fixed}, batch[input_key], mutable=False, **kwargs)``.

    Equal (and equally hashed) for an equal module, the same fixed-collection arrays,
    ``input_key`` and keyword arguments: compiled programs are reused across adapters.
    """

    module: Any
    fixed: Any
    input_key: str
    kwargs: tuple

    def _key(self) -> tuple:
        return (type(self.module), _state_key(self.fixed), self.input_key, self.kwargs)

    def __eq__(self, other: object) -> bool:
        return (type(other) is type(self) and self._key() == other._key()
                and (self.module is other.module or self.module == other.module))

    def __hash__(self) -> int:
        return hash(self._key())

    def __call__(self, params, batch):
        return self.module.apply({"params": params, **self.fixed},
                                 _input(batch, self.input_key), mutable=False,
                                 **dict(self.kwargs))


@dataclasses.dataclass(frozen=True)
class _EquinoxApply:
    """``jax.vmap(eqx.combine(params, static))(batch[input_key])`` (or without vmap)."""

    static: Any
    input_key: str
    vmap: bool = True

    def __call__(self, params, batch):
        import equinox as eqx  # noqa: PLC0415 - only for Equinox models

        model = eqx.combine(params, self.static)
        x = _input(batch, self.input_key)
        return jax.vmap(model)(x) if self.vmap else model(x)


def _inference_kwargs(module: Any) -> dict[str, bool]:
    try:
        names = set(inspect.signature(type(module).__call__).parameters)
    except (TypeError, ValueError):
        return {}
    out = {n: False for n in _FALSE_FLAGS if n in names}
    out.update({n: True for n in _TRUE_FLAGS if n in names})
    return out


def _adapt_linen(obj: Any, head: Callable, input_key: str) -> Adapted:
    module, variables, *rest = obj
    if not isinstance(variables, Mapping):
        raise FactoryTypeError(f"Linen variables must be the mapping module.init(...) "
                               f"returns, got {type(variables).__name__}")
    if "params" not in variables:
        raise FactoryError(f"Linen variables have no 'params' collection (collections: "
                           f"{sorted(map(str, variables))})")
    if rest and not isinstance(rest[0], Mapping):
        raise FactoryTypeError(f"Linen apply_kwargs must be a dict, got "
                               f"{type(rest[0]).__name__}")
    kwargs = dict(rest[0]) if rest else _inference_kwargs(module)
    fixed = {k: v for k, v in variables.items() if k != "params"}
    if not fixed and not kwargs:
        return from_linen(module, dict(variables), head, input_key)
    check_params(variables["params"], "variables['params']")
    model_fn = _LinenApply(module, fixed, input_key, tuple(sorted(kwargs.items())))
    return Adapted(compose(model_fn, head), model_fn, variables["params"], head)


def _adapt_equinox(model: Any, head: Callable, input_key: str, vmap: bool) -> Adapted:
    import equinox as eqx  # noqa: PLC0415 - only for Equinox models

    model = eqx.nn.inference_mode(model)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    check_params(params, "the Equinox model's floating-point arrays")
    model_fn = _EquinoxApply(static, input_key, bool(vmap))
    return Adapted(compose(model_fn, head), model_fn, params, head)


def _adapt_functions(obj: Any, head: Callable) -> Adapted:
    if isinstance(obj, Adapted):
        return obj
    loss_fn, model_fn, params, *rest = obj
    head = rest[0] if rest else head
    if model_fn is not None and not callable(model_fn):
        raise FactoryTypeError(f"model_fn must be callable or None, got "
                               f"{type(model_fn).__name__}")
    if loss_fn is None:
        if model_fn is None:
            raise FactoryError("(loss_fn, model_fn, params): loss_fn and model_fn are both None")
        loss_fn = compose(model_fn, head)
    elif not callable(loss_fn):
        raise FactoryTypeError(f"loss_fn must be callable or None, got {type(loss_fn).__name__}")
    check_params(params, "params")
    return Adapted(loss_fn, model_fn, params, head)


def adapt(obj: Any, head: Callable | None = None, input_key: str = "inputs", *,
          vmap: bool = True) -> Adapted:
    """Turn what a model factory returned into :class:`~gradience_jax.models.Adapted`.

    Args:
        obj: an ``nnx.Module``, ``(linen_module, variables[, apply_kwargs])``, an Equinox
            module, ``(loss_fn, model_fn, params[, head])`` or an ``Adapted`` (module
            docstring).
        head: the loss on the outputs (default ``softmax_cross_entropy()``); a 4-tuple's
            own head wins.
        input_key: the key of the model inputs in the batch.
        vmap: Equinox only: call the module per example under ``jax.vmap``.

    Returns:
        ``Adapted(loss_fn, model_fn, params, head)`` (hashable functions: operators
        reuse compiled programs across parameter values).

    Raises:
        FactoryTypeError: an unsupported object (the message lists the accepted kinds).
        FactoryError: Linen variables without ``'params'``, both functions ``None``.
        TypeError / ValueError: no floating-point parameters (``check_params``).
    """
    head = softmax_cross_entropy() if head is None else head
    if not callable(head):
        raise ArgumentTypeError(f"head must be callable head(outputs, batch) -> scalar, got "
                                f"{type(head).__name__}")
    if not isinstance(input_key, str):
        raise ArgumentTypeError(f"input_key must be a string, got {input_key!r}")
    kind = _kind(obj)
    if kind == "nnx":
        model = nnx.clone(obj)
        model.eval()
        return from_nnx(model, head, input_key)
    if kind == "linen":
        return _adapt_linen(obj, head, input_key)
    if kind == "equinox":
        return _adapt_equinox(obj, head, input_key, vmap)
    return _adapt_functions(obj, head)


class ExternalModel(NamedTuple):
    """A user model resolved from a spec.

    Attributes:
        spec: the ``module:factory`` spec.
        kind: ``"nnx"``, ``"linen"``, ``"equinox"`` or ``"functions"``.
        adapted: :class:`~gradience_jax.models.Adapted` at the factory's values.
        source: what the factory returned (rebuilt by :func:`restore` with checkpoint state).
        head: the head; input_key: the batch key of the inputs; vmap: Equinox per-example.
    """

    spec: str
    kind: str
    adapted: Adapted
    source: Any
    head: Callable
    input_key: str = "inputs"
    vmap: bool = True


def load_model(spec: str, head: Callable | None = None, input_key: str = "inputs", *,
               vmap: bool = True, what: str = "--model") -> ExternalModel:
    """Import, call and adapt a model factory.

    Args:
        spec: ``"package.module:factory"`` or ``"path/to/file.py:factory"``.
        head: the loss head (default softmax cross-entropy).
        input_key: the key of the model inputs in the batch.
        vmap: Equinox only: call the module per example under ``jax.vmap``.
        what: how errors name the spec.

    Returns:
        :class:`ExternalModel`.

    Raises:
        FactoryError: a bad spec, a failing import or factory, an unsupported result
            (:class:`FactoryTypeError`), or a model without floating-point parameters.
    """
    obj = _call(load_factory(spec, what), spec, what, _is_model)
    try:
        adapted = adapt(obj, head, input_key, vmap=vmap)
    except FactoryError as exc:
        raise type(exc)(f"{what} {spec!r}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise FactoryError(f"{what} {spec!r}: {_first_line(exc)}") from None
    return ExternalModel(spec, _kind(obj), adapted, obj, adapted.head, input_key, vmap)


# -- data ----------------------------------------------------------------------------------


def _is_batch(obj: Any) -> bool:
    return isinstance(obj, Mapping)


def _concat(batches: list[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]),
                                  *batches)


def load_data(spec: str, batches: int = 1, what: str = "--data") -> dict:
    """Import and call a data factory; the batch it gives (or its first ``batches``).

    Args:
        spec: ``"package.module:factory"`` or ``"path/to/file.py:factory"``; the factory
            returns a batch (a dict of arrays) or an iterable of batches.
        batches: how many batches of an iterable to concatenate (``>= 1``).
        what: how errors name the spec.

    Returns:
        The batch as a dict of NumPy arrays sharing the leading axis.

    Raises:
        FactoryError: a bad spec, a failing import or factory, an iterable with fewer
            than ``batches`` batches, leaves without a common leading axis;
            :class:`FactoryTypeError`: something that is neither a dict nor an iterable
            of dicts.
    """
    batches = check_int(batches, "batches")
    obj = _call(load_factory(spec, what), spec, what,
                lambda o: _is_batch(o) or (isinstance(o, Iterable) and not callable(o)))
    if not _is_batch(obj):
        if isinstance(obj, (str, bytes)) or hasattr(obj, "shape") or not isinstance(
                obj, Iterable):
            raise FactoryTypeError(
                f"{what} {spec!r} returned a {type(obj).__name__}; a data factory returns a "
                "batch dict like {'inputs': x, 'labels': y} or an iterable of them")
        try:
            got = list(itertools.islice(iter(obj), batches))
        except Exception as exc:
            raise FactoryError(f"{what} {spec!r}: iterating the data raised "
                               f"{_first_line(exc)}") from exc
        if len(got) < batches:
            raise FactoryError(f"{what} {spec!r} gave {len(got)} batch(es), {batches} "
                               "requested")
        bad = [type(b).__name__ for b in got if not _is_batch(b)]
        if bad:
            raise FactoryTypeError(f"{what} {spec!r} yields {bad[0]}s; each batch must be a "
                                   "dict like {'inputs': x, 'labels': y}")
        try:
            obj = _concat(got) if len(got) > 1 else got[0]
        except (ValueError, TypeError) as exc:
            raise FactoryError(f"{what} {spec!r}: cannot concatenate {batches} batches "
                               f"({_first_line(exc)})") from None
    try:
        batch = jax.tree_util.tree_map(np.asarray, dict(obj))
        check_batch(batch, f"the {what} batch")
    except (TypeError, ValueError) as exc:
        raise FactoryError(f"{what} {spec!r}: {exc}") from None
    return batch


# -- checkpoints ---------------------------------------------------------------------------


def _flat(tree: Any) -> dict[str, Any]:
    from gradience_jax.tree import path_str  # noqa: PLC0415

    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _candidates(tree: Any) -> list[tuple[str, Any]]:
    out = [("the checkpoint", tree)]
    if isinstance(tree, Mapping) and isinstance(tree.get("params"), Mapping):
        out.append(("its 'params'", tree["params"]))
    return out


def _match(found: Mapping[str, Any], like: Mapping[str, Any]) -> list[str]:
    out = [f"missing {p}" for p in like if p not in found]
    out += [f"{p} has shape {tuple(np.shape(found[p]))}, expected {tuple(np.shape(like[p]))}"
            for p in like if p in found and tuple(np.shape(found[p])) != tuple(np.shape(like[p]))]
    return out


def _fill(like: PyTree, found: Mapping[str, Any]) -> PyTree:
    """``like`` with each leaf whose path is in ``found`` replaced (cast to its dtype)."""
    from gradience_jax.tree import path_str  # noqa: PLC0415

    def put(path: Any, leaf: Any) -> Any:
        p = path_str(path)
        if p not in found:
            return leaf
        return jax.numpy.asarray(np.asarray(found[p]), dtype=leaf.dtype)

    return jax.tree_util.tree_map_with_path(put, like)


def _find(tree: Any, like: PyTree, what: str) -> tuple[dict[str, Any], Any]:
    """The checkpoint's arrays for ``like`` (paths -> arrays) and the root they came from."""
    want = _flat(like)
    best = None
    for name, root in _candidates(tree):
        found = _flat(root)
        diffs = _match(found, want)
        if not diffs:
            return found, root
        if best is None or len(diffs) < len(best[1]):
            best = (name, diffs)
    more = f" (and {len(best[1]) - 3} more)" if len(best[1]) > 3 else ""
    raise ValueError(f"checkpoint tree does not match {what}: in {best[0]}: "
                     f"{'; '.join(best[1][:3])}{more}")


def restore(model: ExternalModel, tree: PyTree) -> Adapted:
    """The model at a checkpoint's values.

    Parameters are matched by path (``"layers/0/kernel"``) against the model's; the tree
    may hold them at its root or under ``"params"`` (a training state, Linen variables).
    Non-trainable state found at the same paths replaces the factory's: Linen
    collections (``batch_stats``) stored next to ``params``, NNX non-``Param`` variables
    (a saved ``nnx.state(model)``). Leaves are cast to the model's dtypes.

    Args:
        model: from :func:`load_model`.
        tree: a nested dict of arrays (``gradience_jax.app.checkpoints.load_tree``).

    Returns:
        :class:`~gradience_jax.models.Adapted` (the same functions, so compiled programs
        are reused, unless non-trainable state changed: then they compile again).

    Raises:
        ValueError: the tree lacks one of the model's parameters or has another shape
            (the message names the first differences).
    """
    adapted = model.adapted
    found, root = _find(tree, adapted.params, f"--model {model.spec}")
    params = _fill(adapted.params, found)
    if model.kind == "linen":
        module, variables, *rest = model.source
        fixed = {k: v for k, v in variables.items() if k != "params"}
        stored = {k: root_k for k, root_k in (tree.items() if isinstance(tree, Mapping) else ())
                  if k in fixed and root is not tree}
        if stored:
            new_fixed = {k: (_fill(v, _flat(stored[k])) if k in stored else v)
                         for k, v in fixed.items()}
            return adapt((module, {"params": params, **new_fixed}, *rest), adapted.head,
                         model.input_key)
    if model.kind == "nnx":
        graphdef, _, *others = nnx.split(model.source, nnx.Param, ...)
        other_found = {}
        for state in others:
            pure = _flat(nnx.to_pure_dict(state))
            other_found.update({p: root_leaf for p, root_leaf in _flat(root).items()
                                if p in pure and np.shape(root_leaf) == np.shape(pure[p])})
        if other_found:
            clone = nnx.clone(model.source)
            state = nnx.state(clone)
            pure = nnx.to_pure_dict(state)
            nnx.replace_by_pure_dict(state, _fill(pure, {**other_found, **found}))
            nnx.update(clone, state)
            return adapt(clone, adapted.head, model.input_key)
    return adapted.with_params(params)
