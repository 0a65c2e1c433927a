"""Checkpoints: parameter files in and out, and built-in models rebuilt from them.

Supported names:

* :class:`CheckpointError`: a missing, unreadable or mismatched checkpoint (a
  ``ValueError``).
* :func:`to_pure_dict`, :func:`save_checkpoint`, :func:`load_checkpoint`: a flax msgpack
  file or an orbax directory of the pure parameter dict.
* :func:`match_spec`, :func:`infer_model`: the family / sizes of a checkpoint, inferred
  from its shapes (families of :mod:`gradience_jax.app.families`).
* :func:`nonfinite_leaves`: the leaves of a parameter tree holding NaN / Inf;
  :func:`param_count`: the number of parameters of a built-in family (no compile).
* :class:`Restored`, :func:`restore_model`, :func:`init_model`: a built-in model with its
  adapter, from a checkpoint or freshly initialised (compiled programs are reused for the
  same family and sizes).
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax.app.families import MODELS, build_model, default_spec

__all__ = [
    "CheckpointError",
    "Restored",
    "infer_model",
    "init_model",
    "load_checkpoint",
    "match_spec",
    "nonfinite_leaves",
    "param_count",
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
    """Nested dict of NumPy arrays from an ``nnx.Module``, ``nnx.State`` or a dict.

    Args:
        params: the parameters (a module contributes its ``nnx.Param`` state).

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
        raise TypeError("params must be an nnx.Module, nnx.State or a dict, "
                        f"got {type(params).__name__}")
    return jax.tree_util.tree_map(np.asarray, _plain(params))


def _checkpoint_format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in ("msgpack", "orbax"):
            raise ValueError(f"format must be 'msgpack' or 'orbax', got {fmt!r}")
        return fmt
    return "msgpack" if path.suffix in (".msgpack", ".mpk", ".bin") else "orbax"


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
    ckpt = ocp.PyTreeCheckpointer()
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


def _load_orbax(path: Path) -> Any:
    import logging  # noqa: PLC0415

    import orbax.checkpoint as ocp  # noqa: PLC0415

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ocp.PyTreeCheckpointer().restore(path.resolve())
    except Exception as exc:  # noqa: BLE001 - any restore failure means a bad directory
        raise CheckpointError(f"cannot read orbax checkpoint {path} ({_first_line(exc)})") from None
    finally:
        absl.setLevel(level)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The pure parameter dict stored at ``path`` (msgpack file or orbax directory).

    Args:
        path: the file or directory.

    Returns:
        A nested dict of NumPy arrays (digit keys as ints, as ``nnx.List`` indices).

    Raises:
        CheckpointError: missing path, unreadable / corrupt data, or not a dict of arrays.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    tree = _load_orbax(path) if path.is_dir() else _load_msgpack(path)
    if not isinstance(tree, Mapping) or not jax.tree_util.tree_leaves(tree):
        raise CheckpointError(f"checkpoint {path} does not hold a dict of parameter arrays")
    leaves = jax.tree_util.tree_leaves(tree)
    if not all(isinstance(x, (np.ndarray, jax.Array, np.generic)) for x in leaves):
        raise CheckpointError(f"checkpoint {path} holds non-array leaves")
    return _int_keys(jax.tree_util.tree_map(np.asarray, _plain(tree)))


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
