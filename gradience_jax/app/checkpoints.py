"""Checkpoints: parameter files in and out, and built-in models rebuilt from them.

Supported names:

* :class:`CheckpointError`: a missing, unreadable or mismatched checkpoint (a
  ``ValueError``).
* :func:`to_pure_dict`, :func:`save_checkpoint`, :func:`load_checkpoint`: a flax msgpack
  file or an orbax directory of the pure parameter dict; :func:`load_checkpoint` also reads
  an orbax ``CheckpointManager`` run directory (its latest step) or step directory.
* :func:`load_tree` (everything stored, e.g. a whole training state), :func:`params_of`
  (its parameters), :func:`checkpoint_steps` (the per-step checkpoints of a run),
  :data:`MSGPACK_SUFFIXES`.
* :func:`match_spec`, :func:`infer_model`: the family / sizes of a checkpoint, inferred
  from its shapes (families of :mod:`gradience_jax.app.families`).
* :func:`nonfinite_leaves`: the leaves of a parameter tree holding NaN / Inf;
  :func:`param_count`: the number of parameters of a built-in family (no compile).
* :class:`Restored`, :func:`restore_model`, :func:`init_model`: a built-in model with its
  adapter, from a checkpoint or freshly initialised (compiled programs are reused for the
  same family and sizes).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax.app.families import MODELS, build_model, default_spec

__all__ = [
    "MSGPACK_SUFFIXES",
    "CheckpointError",
    "Restored",
    "checkpoint_steps",
    "infer_model",
    "init_model",
    "is_safetensors",
    "load_checkpoint",
    "load_tree",
    "match_spec",
    "nonfinite_leaves",
    "param_count",
    "params_of",
    "restore_model",
    "save_checkpoint",
    "to_pure_dict",
]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not match the requested model."""


# -- files ---------------------------------------------------------------------------------


def _plain(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def _int_keys(tree: Any) -> Any:
    """Digit-string keys (orbax) back to ints (``nnx.List`` indices)."""
    if isinstance(tree, Mapping):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v)
                for k, v in tree.items()}
    return tree


def _str_keys(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def to_pure_dict(params: Any) -> dict:
    """Nested dict of NumPy arrays from an ``nnx.Module``, ``nnx.State``, a dict or a pytree.

    Args:
        params: the parameters (a module contributes its ``nnx.Param`` state; any other
            pytree, e.g. Equinox parameters, is nested by its key paths:
            ``{"layers": {0: {"weight": ...}}}``).

    Returns:
        The pure dict (NumPy leaves).

    Raises:
        TypeError: anything else.
    """
    from flax import nnx  # noqa: PLC0415

    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    if not isinstance(params, Mapping):
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        if not flat or isinstance(params, (np.ndarray, jax.Array)):
            raise TypeError("params must be an nnx.Module, nnx.State, a dict or a pytree of "
                            f"arrays, got {type(params).__name__}")
        params = _nested(flat)  # e.g. an Equinox module's arrays, by attribute path
    return jax.tree_util.tree_map(np.asarray, _plain(params))


def _nested(flat: Sequence[tuple[Any, Any]]) -> dict:
    """A nested dict from ``(key path, leaf)`` pairs (attribute / index / dict keys)."""
    from gradience_jax.tree import path_str  # noqa: PLC0415

    out: dict = {}
    for path, leaf in flat:
        parts = [int(p) if p.isdigit() else p for p in path_str(path).split("/")]
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = leaf
    return out


def _checkpoint_format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in ("msgpack", "orbax"):
            raise ValueError(f"format must be 'msgpack' or 'orbax', got {fmt!r}")
        return fmt
    return "msgpack" if path.suffix in MSGPACK_SUFFIXES else "orbax"


def save_checkpoint(params: Any, path: str | os.PathLike, format: str | None = None) -> Path:  # noqa: A002
    """Save parameters as a flax msgpack file (``*.msgpack``) or an orbax directory.

    Args:
        params: ``nnx.Module``, ``nnx.State`` or nested dict of arrays.
        path: file (msgpack) or directory (orbax; replaced if it exists).
        format: ``"msgpack"`` | ``"orbax"``; default from the suffix (``.msgpack``,
            ``.mpk``, ``.bin``: msgpack; anything else: orbax).

    Returns:
        The absolute path written.

    Raises:
        ValueError: unknown ``format``; OSError: the path cannot be written.
    """
    from flax import serialization  # noqa: PLC0415

    path = Path(path).expanduser().resolve()
    pure = to_pure_dict(params)
    if _checkpoint_format(path, format) == "msgpack":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(serialization.msgpack_serialize(pure))
        return path
    import orbax.checkpoint as ocp  # noqa: PLC0415

    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_orbax(), ocp.StandardCheckpointer() as ckpt:
        ckpt.save(path, jax.tree_util.tree_map(np.asarray, _str_keys(pure)), force=True)
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _load_msgpack(path: Path) -> Any:
    from flax import serialization  # noqa: PLC0415

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {exc.strerror or type(exc).__name__}") from None
    if not data:
        raise CheckpointError(f"checkpoint {path} is empty")
    try:
        return serialization.msgpack_restore(data)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means a corrupt file
        raise CheckpointError(
            f"cannot read checkpoint {path} as flax msgpack ({_first_line(exc)})") from None


MSGPACK_SUFFIXES = (".msgpack", ".mpk", ".bin")
"""File suffixes read (and written) as flax msgpack."""
_ITEM_PREFERENCE = ("params", "default", "state", "train_state", "model", "checkpoint")


@contextlib.contextmanager
def _quiet_orbax() -> Any:
    """Silence orbax's absl INFO / WARNING lines and Python warnings (errors still raise)."""
    import logging  # noqa: PLC0415

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        absl.setLevel(level)


def _is_pytree_dir(path: Path) -> bool:
    """An orbax PyTree / Standard checkpoint (the arrays of one item)."""
    return any((path / n).exists() for n in ("_METADATA", "manifest.ocdbt", "_sharding")) or (
        (path / "checkpoint").is_file())


def _step_items(path: Path) -> dict[str, str]:
    """``{item name: handler class name}`` of an orbax step directory (empty: not one)."""
    meta = path / "_CHECKPOINT_METADATA"
    items: dict[str, str] = {}
    if meta.is_file():
        try:
            handlers = json.loads(meta.read_text()).get("item_handlers") or {}
        except (OSError, ValueError, AttributeError):
            handlers = {}
        if isinstance(handlers, Mapping):
            items = {str(k): str(v) for k, v in handlers.items() if (path / str(k)).is_dir()}
    if not items and not _is_pytree_dir(path):
        try:
            children = sorted(p for p in path.iterdir() if p.is_dir())
        except OSError:
            children = []
        items = {p.name: "" for p in children if _is_pytree_dir(p)}
        if items and all(_step_of(n) is not None for n in items):
            return {}  # item directories named by step: a run directory, not a step
    return items


def _is_step_dir(path: Path) -> bool:
    return not _is_pytree_dir(path) and bool(_step_items(path))


def _pytree_items(items: Mapping[str, str]) -> list[str]:
    return [k for k, h in items.items() if "Json" not in h and "Proto" not in h]


def _choose_item(items: Mapping[str, str], path: Path) -> str:
    names = _pytree_items(items)
    for name in _ITEM_PREFERENCE:
        if name in names:
            return name
    if len(names) == 1:
        return names[0]
    raise CheckpointError(
        f"cannot tell which item of the orbax step directory {path} holds the parameters "
        f"(items: {', '.join(sorted(items)) or 'none'}); name the item's directory "
        f"({path}/<item>) instead")


def _restore_args(handler: str) -> Any:
    import orbax.checkpoint as ocp  # noqa: PLC0415

    return ocp.args.PyTreeRestore() if "PyTree" in handler else ocp.args.StandardRestore()


def _restore_pytree(path: Path) -> Any:
    """An orbax item directory, restored with the current API.

    ``StandardRestore``; ``PyTreeRestore`` for checkpoints written by a
    ``PyTreeCheckpointHandler`` without typed metadata.
    """
    import orbax.checkpoint as ocp  # noqa: PLC0415

    try:
        with ocp.StandardCheckpointer() as ckpt:
            return ckpt.restore(path.resolve())
    except Exception:  # noqa: BLE001 - fall back to the PyTree handler, then report
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckpt:
            return ckpt.restore(path.resolve(), args=ocp.args.PyTreeRestore())


def _restore_step(path: Path) -> Any:
    """The parameter item of an orbax ``CheckpointManager`` step directory."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    items = _step_items(path)
    name = _choose_item(items, path)
    args = ocp.args.Composite(**{name: _restore_args(items[name])})
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
        return ckpt.restore(path.resolve(), args=args)[name]


def _manager_steps(path: Path) -> list[int]:
    """Steps an orbax ``CheckpointManager`` lists in ``path`` (read only; [] if none)."""
    import orbax.checkpoint as ocp  # noqa: PLC0415

    try:
        with ocp.CheckpointManager(
                path.resolve(), options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
            return [int(s) for s in mngr.all_steps()]
    except Exception:  # noqa: BLE001 - not a manager directory
        return []


_STEP_NAME = re.compile(r"(?:.*?\D)?(\d+)(?:\.msgpack|\.mpk|\.bin)?")


def _step_of(name: str) -> int | None:
    m = _STEP_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def _is_checkpoint_entry(path: Path) -> bool:
    if path.is_file():
        return path.suffix in MSGPACK_SUFFIXES
    return path.is_dir() and (_is_pytree_dir(path) or _is_step_dir(path))


def checkpoint_steps(path: str | os.PathLike) -> list[tuple[int, Path]]:
    """The checkpoints of a training run, by step.

    ``path`` is an orbax ``CheckpointManager`` directory (one folder per step, listed by
    ``CheckpointManager.all_steps``; in-progress ``*.orbax-checkpoint-tmp-*`` folders are
    left out) or any folder of per-step checkpoints whose names end in the step number
    (``step_100.msgpack``, ``checkpoint_200/``: msgpack files, orbax step or item
    directories). A single checkpoint (file, step or item directory) is one step (the
    number in its name, else 0).

    Args:
        path: the run directory (or one checkpoint).

    Returns:
        ``[(step, path)]`` sorted by step.

    Raises:
        CheckpointError: no such path, no checkpoint in it, or two entries with one step.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_file() or _is_pytree_dir(path) or _is_step_dir(path):
        return [(_step_of(path.name.split(".")[0] if path.is_file() else path.name) or 0, path)]
    found: dict[int, Path] = {}
    with _quiet_orbax():
        managed = _manager_steps(path)
    for step in managed:
        if (path / str(step)).is_dir():
            found[step] = path / str(step)
    try:
        children = sorted(path.iterdir())
    except OSError as exc:
        raise CheckpointError(f"cannot list {path}: {exc.strerror or type(exc).__name__}"
                              ) from None
    for child in children:
        step = _step_of(child.name)
        if step is None or "tmp" in child.name or found.get(step) == child:
            continue
        if not _is_checkpoint_entry(child):
            continue
        if step in found:
            raise CheckpointError(f"two checkpoints of step {step} in {path}: "
                                  f"{found[step].name} and {child.name}")
        found[step] = child
    if not found:
        raise CheckpointError(
            f"cannot read orbax checkpoint {path} (no checkpoint in it: not an orbax item "
            "directory (_METADATA), not a CheckpointManager step directory "
            "(_CHECKPOINT_METADATA), and no per-step checkpoints named by their step)")
    return sorted(found.items())


def _strip_values(tree: Any) -> Any:
    """``{"value": x}`` wrappers (a saved ``nnx.State``) replaced by ``x``."""
    if isinstance(tree, Mapping):
        if set(tree) == {"value"} and not isinstance(tree["value"], Mapping):
            return tree["value"]
        return {k: _strip_values(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_strip_values(v) for v in tree) if isinstance(tree, list) else \
            tuple(_strip_values(v) for v in tree)
    return tree


def _load_safetensors(path: Path) -> Any:
    try:
        from gradience_jax.weights.files import load_safetensors  # noqa: PLC0415
    except ImportError:  # pragma: no cover - the module ships with the package
        raise CheckpointError(f"cannot read {path}: safetensors support is not available"
                              ) from None
    try:
        return load_safetensors(path)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path} ({_first_line(exc)})") from None


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``.safetensors`` checkpoint.

    A file, an index, or a folder of them that is not an orbax checkpoint.

    Args:
        path: a path.

    Returns:
        True for ``*.safetensors``, ``*.safetensors.index.json``, or a directory holding
        such files and no orbax checkpoint.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        if _is_pytree_dir(path) or _is_step_dir(path):
            return False
        return any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json"))
    return path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json")


def _load_dir(path: Path) -> Any:
    if _is_pytree_dir(path):
        return _restore_pytree(path)
    if _is_step_dir(path):
        return _restore_step(path)
    steps = checkpoint_steps(path)
    return load_tree(steps[-1][1])


def _load_orbax(path: Path) -> Any:
    try:
        with _quiet_orbax():
            return _load_dir(path)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any restore failure means a bad directory
        raise CheckpointError(f"cannot read orbax checkpoint {path} ({_first_line(exc)})") from None


def load_tree(path: str | os.PathLike) -> dict:
    """Everything stored at ``path``, as a nested dict of NumPy arrays.

    Accepted: a flax msgpack file (``*.msgpack``; any other file is tried as msgpack); a
    ``.safetensors`` file, sharded index or folder of them
    (:mod:`gradience_jax.weights.files`; a flat dict of tensor names); an orbax item
    directory (``StandardCheckpointer`` / ``PyTreeCheckpointer`` output: ``_METADATA``);
    an orbax ``CheckpointManager`` step directory (its ``params`` item, else ``default``,
    ``state``, ``train_state``, ``model``, or its only item); a run directory
    (:func:`checkpoint_steps`: the latest step). Restored with the current orbax API
    (``ocp.CheckpointManager`` to list steps, ``ocp.args.Composite`` / ``StandardRestore``
    / ``PyTreeRestore`` to read). A saved ``nnx.State``'s ``{"value": array}`` wrappers are
    removed; digit keys become ints.

    Args:
        path: the file or directory.

    Returns:
        The whole stored tree (a training state keeps its ``opt_state``, ``step``, ...).

    Raises:
        CheckpointError: missing path, unreadable / corrupt data, or not a dict of arrays.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if is_safetensors(path):
        tree = _load_safetensors(path)
    elif path.is_dir():
        tree = _load_orbax(path)
    else:
        tree = _load_msgpack(path)
    if not isinstance(tree, Mapping) or not jax.tree_util.tree_leaves(tree):
        raise CheckpointError(f"checkpoint {path} does not hold a dict of parameter arrays")
    leaves = jax.tree_util.tree_leaves(tree)
    if not all(isinstance(x, (np.ndarray, jax.Array, np.generic, int, float)) for x in leaves):
        raise CheckpointError(f"checkpoint {path} holds non-array leaves")
    return _int_keys(jax.tree_util.tree_map(np.asarray, _strip_values(_plain(tree))))


def params_of(tree: Mapping) -> dict:
    """The parameters in a stored tree.

    Its ``"params"`` entry when it has one (a training state, Linen variables), else the
    tree itself.

    Args:
        tree: from :func:`load_tree`.

    Returns:
        The parameter dict.
    """
    inner = tree.get("params") if isinstance(tree, Mapping) else None
    return inner if isinstance(inner, Mapping) and jax.tree_util.tree_leaves(inner) else tree


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The pure parameter dict stored at ``path``.

    A run directory (the latest step), a step directory, an orbax item directory or a
    file (:func:`load_tree`); of a training state or Linen variables, the ``"params"``
    (:func:`params_of`).

    Args:
        path: the file or directory.

    Returns:
        A nested dict of NumPy arrays (digit keys as ints, as ``nnx.List`` indices).

    Raises:
        CheckpointError: missing path, unreadable / corrupt data, or not a dict of arrays.
    """
    return params_of(load_tree(path))


def nonfinite_leaves(pure: Mapping) -> dict[str, str]:
    """The floating-point leaves holding NaN or Inf, with their counts.

    Args:
        pure: a parameter dict (e.g. from :func:`load_checkpoint`).

    Returns:
        ``{path: "3 NaN, 0 Inf"}`` in tree order (empty when every leaf is finite).
    """
    from gradience_jax.tree import path_str  # noqa: PLC0415 - as _shape_dict

    out = {}
    for p, x in jax.tree_util.tree_flatten_with_path(pure)[0]:
        arr = np.asarray(x)
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            out[path_str(p)] = f"{int(np.isnan(arr).sum())} NaN, {int(np.isinf(arr).sum())} Inf"
    return out


# -- which family a checkpoint holds -------------------------------------------------------


def _shape_dict(pure: Mapping) -> dict[str, tuple[int, ...]]:
    from gradience_jax.tree import path_str  # noqa: PLC0415

    flat = jax.tree_util.tree_flatten_with_path(pure)[0]
    return {path_str(p): tuple(np.shape(x)) for p, x in flat}


def _indexed_kernels(shapes: Mapping[str, tuple], prefix: str, ndim: int,
                     what: str) -> list[tuple]:
    """Shapes of ``<prefix>/0/kernel``, ``<prefix>/1/kernel``, ... (``KeyError`` if none)."""
    n = 0
    while f"{prefix}/{n}/kernel" in shapes:
        n += 1
    if n == 0:
        raise KeyError(f"{prefix}/0/kernel")
    kernels = [shapes[f"{prefix}/{i}/kernel"] for i in range(n)]
    if any(len(k) != ndim for k in kernels):
        raise ValueError(f"{what} must be {ndim}-D")
    return kernels


def _infer_mlp(shapes: Mapping[str, tuple]) -> dict[str, Any]:
    kernels = _indexed_kernels(shapes, "layers", 2, "MLP kernels")
    return {"sizes": [kernels[0][0]] + [k[1] for k in kernels]}


def _infer_cnn(shapes: Mapping[str, tuple]) -> dict[str, Any]:
    kernels = _indexed_kernels(shapes, "convs", 4, "CNN conv kernels")
    head = shapes["head/kernel"]
    side = math.isqrt(max(head[0] // kernels[-1][3], 0))
    return {"in_channels": kernels[0][2], "channels": [k[3] for k in kernels],
            "image_size": side * 2**len(kernels), "num_classes": head[1]}


def _infer_transformer(shapes: Mapping[str, tuple]) -> dict[str, Any]:
    vocab, d_model = shapes["embed/embedding"]
    n = 0
    while f"blocks/{n}/attention/query/kernel" in shapes:
        n += 1
    if n == 0:
        raise KeyError("blocks/0/attention/query/kernel")
    return {"vocab_size": vocab, "d_model": d_model,
            "num_heads": shapes["blocks/0/attention/query/kernel"][1], "num_layers": n,
            "d_ff": shapes["blocks/0/fc1/kernel"][1], "max_len": shapes["pos_embed/embedding"][0]}


_INFER = {"mlp": _infer_mlp, "cnn": _infer_cnn, "transformer": _infer_transformer}


def _abstract_shapes(model: str, spec: Mapping[str, Any]) -> dict[str, tuple]:
    from flax import nnx  # noqa: PLC0415

    abstract = nnx.eval_shape(lambda: build_model(model, spec, nnx.Rngs(0)))
    return _shape_dict(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))


def _diff(expected: Mapping[str, tuple], got: Mapping[str, tuple]) -> list[str]:
    out = [f"missing {p}" for p in expected if p not in got]
    out += [f"unexpected {p}" for p in got if p not in expected]
    out += [f"{p} has shape {got[p]}, expected {expected[p]}"
            for p in expected if p in got and tuple(got[p]) != tuple(expected[p])]
    return out


def _summarise(items: Sequence[str], n: int = 3) -> str:
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return "; ".join(items[:n]) + more


def match_spec(model: str, pure: Mapping) -> dict[str, Any]:
    """The spec of family ``model`` that reproduces the checkpoint's tree exactly.

    Args:
        model: one of :data:`~gradience_jax.app.families.MODELS`.
        pure: the parameter dict.

    Returns:
        The spec (sizes inferred from the shapes).

    Raises:
        ValueError: unknown ``model``.
        CheckpointError: the tree is not one of ``model``'s (names the first differences).
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    got = _shape_dict(pure)
    try:
        spec = _INFER[model](got)
    except (KeyError, ValueError, IndexError, TypeError) as exc:
        spec = default_spec(model)
        hint = f" (no {exc.args[0]})" if isinstance(exc, KeyError) else ""
        diffs = _diff(_abstract_shapes(model, spec), got)
        raise CheckpointError(
            f"checkpoint tree does not match --model {model}{hint}: {_summarise(diffs)}"
        ) from None
    diffs = _diff(_abstract_shapes(model, spec), got)
    if diffs:
        raise CheckpointError(
            f"checkpoint tree does not match --model {model}: {_summarise(diffs)}")
    return spec


def param_count(model: str, spec: Mapping[str, Any] | None = None) -> int:
    """Number of parameters of a built-in family (from abstract shapes: nothing compiles).

    Args:
        model: one of :data:`~gradience_jax.app.families.MODELS`.
        spec: its hyper-parameters (default :func:`~gradience_jax.app.families.default_spec`).

    Returns:
        The total number of parameter entries.

    Raises:
        ValueError: unknown ``model``.
    """
    spec = default_spec(model) if spec is None else dict(spec)
    return int(sum(math.prod(s) for s in _abstract_shapes(model, spec).values()))


def infer_model(pure: Mapping) -> tuple[str, dict[str, Any]]:
    """``(family, spec)`` of the first built-in family whose tree the checkpoint matches.

    Args:
        pure: the parameter dict.

    Returns:
        The family name and its spec.

    Raises:
        CheckpointError: no family matches.
    """
    for model in MODELS:
        try:
            return model, match_spec(model, pure)
        except CheckpointError:
            continue
    keys = sorted(_shape_dict(pure))
    raise CheckpointError(
        f"checkpoint tree matches none of the built-in models {MODELS} "
        f"(it has {len(keys)} arrays: {_summarise(keys)}); pass --model or use "
        "`gradience-jax weights PATH` for a weights-only report"
    )


# -- built-in models with parameters -------------------------------------------------------


class Restored(NamedTuple):
    """A built-in model with parameters.

    Attributes:
        model: the family.
        spec: its hyper-parameters.
        module: the NNX module holding the parameters.
        adapted: :class:`gradience_jax.models.Adapted` (``loss_fn``, ``model_fn``,
            ``params``, ``head``: softmax cross-entropy) for the operators.
    """

    model: str
    spec: dict
    module: Any
    adapted: Any


def _float_dtype(pure: Mapping) -> Any:
    for x in jax.tree_util.tree_leaves(pure):
        if np.issubdtype(np.asarray(x).dtype, np.floating):
            return jnp.dtype(np.asarray(x).dtype)
    return jnp.dtype(jnp.float32)


@functools.lru_cache(maxsize=32)
def _family(model: str, spec_key: str, dtype: str) -> tuple[Any, Any]:
    """``(graphdef, adapter with abstract params)`` of a family, cached.

    The same family and sizes give the same ``loss_fn`` / ``model_fn`` objects, so compiled
    programs are reused.
    """
    from flax import nnx  # noqa: PLC0415

    from gradience_jax.models import from_nnx  # noqa: PLC0415
    from gradience_jax.operators import heads  # noqa: PLC0415

    spec = json.loads(spec_key)
    abstract = nnx.eval_shape(lambda: build_model(model, spec, nnx.Rngs(0), jnp.dtype(dtype)))
    return nnx.graphdef(abstract), from_nnx(abstract, heads.softmax_cross_entropy())


def _with_params(model: str, spec: Mapping[str, Any], pure: Mapping) -> Restored:
    from flax import nnx  # noqa: PLC0415

    spec_key = json.dumps(dict(spec), sort_keys=True)
    graphdef, adapted = _family(model, spec_key, str(_float_dtype(pure)))
    state = jax.tree_util.tree_map(lambda x: x, adapted.params)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jnp.asarray, pure))
    module = nnx.merge(graphdef, state)
    return Restored(model, dict(spec), module, adapted._replace(params=state))


def restore_model(pure: Mapping, model: str | None = None) -> Restored:
    """Rebuild a built-in model from a pure parameter dict (sizes inferred from shapes).

    Args:
        pure: parameter dict (from :func:`load_checkpoint`).
        model: family to match (``None``: the first that fits).

    Returns:
        :class:`Restored`.

    Raises:
        CheckpointError: the tree does not match ``model`` (or any family).
    """
    if model is None:
        model, spec = infer_model(pure)
    else:
        spec = match_spec(model, pure)
    return _with_params(model, spec, pure)


@functools.partial(jax.jit, static_argnames=("model", "spec_key", "seed"))
def _init_pure(model: str, spec_key: str, seed: int) -> dict:
    from flax import nnx  # noqa: PLC0415

    module = build_model(model, json.loads(spec_key), nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def init_model(model: str, spec: Mapping[str, Any] | None = None, seed: int = 0) -> Restored:
    """A freshly initialised built-in model (``nnx.Rngs(seed)``), in one compiled program.

    Args:
        model: one of :data:`~gradience_jax.app.families.MODELS`.
        spec: hyper-parameters (default :func:`~gradience_jax.app.families.default_spec`).
        seed: initialisation seed.

    Returns:
        :class:`Restored`.
    """
    spec = default_spec(model) if spec is None else dict(spec)
    return _with_params(model, spec, _init_pure(model, json.dumps(spec, sort_keys=True), seed))
