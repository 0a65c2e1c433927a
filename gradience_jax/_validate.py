"""Input checks at API boundaries: clear errors that name the leaf path and the problem."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax.errors import ArgumentTypeError
from gradience_jax.tree import path_str

PyTree = Any


def is_traced(tree: PyTree) -> bool:
    """True when any leaf is a tracer (we are inside jit / vmap / grad): skip eager checks.

    Args:
        tree: any pytree.

    Returns:
        Whether a leaf of ``tree`` is a ``jax.core.Tracer``.
    """
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(tree))


def check_params(params: PyTree, name: str = "params") -> None:
    """Parameters must be a non-empty pytree of floating-point arrays.

    Args:
        params: the parameters to check.
        name: the argument's name, for the error message.

    Raises:
        ValueError: ``params`` is an empty pytree.
        TypeError: a leaf is not an array, or not floating point.
    """
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    if not flat:
        raise ValueError(f"{name} is an empty pytree: there is nothing to differentiate")
    for path, leaf in flat:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:
            raise TypeError(
                f"{name} leaf '{path_str(path)}' is a {type(leaf).__name__}, not an array"
            )
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{name} leaf '{path_str(path)}' has dtype {dtype}: curvature needs floating "
                "point parameters (integer and complex leaves are not differentiable here; "
                "split them off, e.g. nnx.split(model, nnx.Param))"
            )


def check_batch(batch: PyTree, name: str = "batch") -> int:
    """All leaves of ``batch`` must share a leading batch axis; returns its size.

    Args:
        batch: the data pytree to check.
        name: the argument's name, for the error message.

    Returns:
        The batch size (``>= 1``).

    Raises:
        ValueError: an empty pytree, a scalar leaf, inconsistent leading axes or size 0.
        ArgumentTypeError: a leaf that is not numeric (strings, objects).
    """
    flat = jax.tree_util.tree_flatten_with_path(batch)[0]
    if not flat:
        raise ValueError(f"{name} is an empty pytree")
    sizes = {}
    for path, leaf in flat:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None and not isinstance(leaf, (int, float, bool, complex)):
            dtype = np.asarray(leaf).dtype if isinstance(leaf, (list, tuple, str)) else None
            if dtype is None:
                raise ArgumentTypeError(f"{name} leaf '{path_str(path)}' is a "
                                        f"{type(leaf).__name__}, not an array")
        if dtype is not None and not (jnp.issubdtype(dtype, jnp.number)
                                      or jnp.issubdtype(dtype, jnp.bool_)
                                      or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)):
            raise ArgumentTypeError(
                f"{name} leaf '{path_str(path)}' has dtype {dtype}: batch leaves must be numeric "
                "arrays (move strings / object data out of the batch)")
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"{name} leaf '{path_str(path)}' is a scalar: every leaf needs a leading batch axis"
            )
        sizes[path_str(path)] = shape[0]
    if len(set(sizes.values())) > 1:
        desc = ", ".join(f"'{p}': {n}" for p, n in sizes.items())
        raise ValueError(f"{name} leaves have inconsistent leading (batch) axes: {desc}")
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError(f"{name} has batch size 0")
    return int(n)


def check_like(v: PyTree, like: PyTree, name: str = "v", like_name: str = "params") -> None:
    """``v`` must have the structure, shapes and dtypes of ``like``.

    Args:
        v: the pytree to check.
        like: the reference pytree.
        name: the name of ``v``, for the error message.
        like_name: the name of ``like``, for the error message.

    Raises:
        ValueError: a different structure (naming missing / unexpected leaves) or shape.
        TypeError: a different dtype.
    """
    v_def = jax.tree_util.tree_structure(v)
    l_def = jax.tree_util.tree_structure(like)
    if v_def != l_def:
        v_paths = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(v)[0]}
        l_paths = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(like)[0]}
        missing, extra = sorted(l_paths - v_paths), sorted(v_paths - l_paths)
        detail = ""
        if missing:
            detail += f" missing leaves {missing[:5]}"
        if extra:
            detail += f" unexpected leaves {extra[:5]}"
        if not detail:
            detail = f" (structure {v_def} vs {l_def})"
        raise ValueError(f"{name} does not match the pytree structure of {like_name}:{detail}")
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(v)[0], jax.tree_util.tree_leaves(like)
    ):
        if tuple(np.shape(a)) != tuple(np.shape(b)):
            raise ValueError(
                f"{name} leaf '{path_str(path)}' has shape {tuple(np.shape(a))}, "
                f"{like_name} has {tuple(np.shape(b))}"
            )
        if jnp.result_type(a) != jnp.result_type(b):
            raise TypeError(
                f"{name} leaf '{path_str(path)}' has dtype {jnp.result_type(a)}, "
                f"{like_name} has {jnp.result_type(b)}"
            )


def check_all_finite(tree: PyTree, what: str) -> None:
    """Raise ``FloatingPointError`` naming the first leaf with NaN / Inf (eager values only).

    Args:
        tree: the pytree to check (skipped when traced).
        what: what ``tree`` is, for the error message.

    Raises:
        FloatingPointError: a floating-point leaf holds NaN or Inf.
    """
    if is_traced(tree):
        return
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = np.asarray(leaf)
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            where = path_str(path) or "<root>"
            raise FloatingPointError(f"{what} is not finite at leaf '{where}'")


def check_scalar_fn(fn: Callable, args: tuple, name: str) -> None:
    """``fn(*args)`` must return a real scalar (checked by shape inference only).

    Args:
        fn: the function to check (e.g. a ``loss_fn``).
        args: its positional arguments.
        name: the function's name, for the error message.

    Raises:
        ValueError: ``fn`` fails on ``args`` or does not return a scalar.
        TypeError: the scalar is not floating point.
    """
    try:
        out = jax.eval_shape(fn, *args)
    except Exception as exc:  # re-raise with context, keep the cause
        raise ValueError(f"{name} failed on the given params / batch: {exc}") from exc
    leaves = jax.tree_util.tree_leaves(out)
    if len(leaves) != 1 or leaves[0].shape != ():
        shapes = [tuple(x.shape) for x in leaves]
        raise ValueError(
            f"{name} must return a scalar (the mean loss over the batch), got shape(s) {shapes}"
        )
    if not jnp.issubdtype(leaves[0].dtype, jnp.floating):
        raise TypeError(f"{name} must return a floating-point scalar, got {leaves[0].dtype}")


@functools.lru_cache(maxsize=64)
def _jitted_value_and_grad(loss_fn: Callable) -> Callable:
    return jax.jit(jax.value_and_grad(loss_fn))


def check_loss_at_point(loss_fn: Callable, params: PyTree, batch: PyTree, name: str) -> None:
    """The loss and its gradient must be finite at ``(params, batch)`` (one jitted pass).

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params: the evaluation point (skipped when traced).
        batch: the data.
        name: the loss's name, for the error message.

    Raises:
        FloatingPointError: the loss or a gradient leaf is not finite.
    """
    if is_traced((params, batch)):
        return
    try:
        fn = _jitted_value_and_grad(loss_fn)
    except TypeError:  # unhashable callable
        fn = jax.jit(jax.value_and_grad(loss_fn))
    value, grad = fn(params, batch)
    if not np.isfinite(np.asarray(value)):
        raise FloatingPointError(
            f"{name} is not finite at the evaluation point (value {float(value)})"
        )
    check_all_finite(grad, f"the gradient of {name}")


@functools.lru_cache(maxsize=64)
def _jitted(fn: Callable) -> Callable:
    return jax.jit(fn)


def check_outputs_finite(model_fn: Callable, params: PyTree, batch: PyTree, name: str) -> None:
    """``model_fn(params, batch)`` must be finite (one jitted forward pass).

    Args:
        model_fn: ``model_fn(params, batch) -> outputs``.
        params: the evaluation point (skipped when traced).
        batch: the data.
        name: the outputs' name, for the error message.

    Raises:
        FloatingPointError: an output leaf is not finite.
    """
    if is_traced((params, batch)):
        return
    try:
        fn = _jitted(model_fn)
    except TypeError:  # unhashable callable
        fn = jax.jit(model_fn)
    check_all_finite(fn(params, batch), name)


DEFAULT_SEED = 42
"""The one default seed: ``key=None`` means ``jax.random.key(DEFAULT_SEED)`` everywhere."""


@functools.lru_cache(maxsize=8)
def _default_key(impl: str, device: str) -> jax.Array:
    """``jax.random.key(DEFAULT_SEED)``, made once per PRNG implementation and device.

    Creating a key runs a small compiled program (~40 ms on a fresh process or after
    ``jax.clear_caches()``); the default one is reused.
    """
    del impl, device  # cache keys only
    return jax.random.key(DEFAULT_SEED)


def check_key(key: Any, name: str = "key", *, default: bool = True) -> jax.Array:
    """One PRNG key, checked: typed (``jax.random.key``) or raw (``jax.random.PRNGKey``).

    Args:
        key: the key; ``None`` gives ``jax.random.key(DEFAULT_SEED)`` when ``default``.
        name: the argument's name, for the error message.
        default: whether ``None`` is allowed.

    Returns:
        The key, unchanged (or the default key).

    Raises:
        TypeError: ``key`` is an int, a float array, or not a key at all.
        ValueError: ``key`` is a batch of keys, or ``None`` where no default applies.
    """
    if key is None:
        if default:
            return _default_key(str(jax.config.jax_default_prng_impl),
                                str(jax.config.jax_default_device))
        raise ValueError(f"{name} is required: pass {name}=jax.random.key(seed)")
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        raise TypeError(f"{name} must be a PRNG key, got the int {key}: pass "
                        f"{name}=jax.random.key({key})")
    dtype = getattr(key, "dtype", None)
    if dtype is None:
        raise TypeError(f"{name} must be a PRNG key (jax.random.key(seed)), got "
                        f"{type(key).__name__}")
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        shape = tuple(key.shape)
        if shape:
            raise ValueError(f"{name} must be a single PRNG key, got a batch of shape {shape}"
                             f" (index it, e.g. {name}[0], or split inside a vmap)")
        return key
    if dtype == jnp.uint32 and tuple(key.shape) == (2,):
        return key  # legacy raw key from jax.random.PRNGKey
    if dtype == jnp.uint32 and len(key.shape) == 2 and key.shape[-1] == 2:
        raise ValueError(f"{name} must be a single PRNG key, got a batch of {key.shape[0]} "
                         "raw keys")
    raise TypeError(f"{name} must be a PRNG key (jax.random.key(seed)), got an array of dtype "
                    f"{dtype} and shape {tuple(key.shape)}")


def _type_name(value: Any) -> str:
    return type(value).__name__


def check_int(value: Any, name: str, *, lo: int | None = 1, hi: int | None = None) -> int:
    """``value`` as a Python ``int`` in ``[lo, hi]``: counts, sizes, iteration caps.

    Args:
        value: an ``int`` or NumPy integer (a 0-d integer array is accepted; ``bool``,
            floats and strings are not).
        name: the argument's name, for the error message.
        lo: the smallest allowed value (``None``: no lower bound).
        hi: the largest allowed value (``None``: no upper bound).

    Returns:
        ``int(value)``.

    Raises:
        ArgumentTypeError: ``value`` is not an integer.
        ValueError: ``value`` is out of range.
    """
    if isinstance(value, (bool, np.bool_)):
        raise ArgumentTypeError(f"{name} must be an integer, got the bool {value!r}")
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0 and not isinstance(
            value, jax.core.Tracer) and jnp.issubdtype(value.dtype, jnp.integer):
        value = int(value)
    if not isinstance(value, (int, np.integer)):
        raise ArgumentTypeError(f"{name} must be an integer, got {value!r} ({_type_name(value)})")
    value = int(value)
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")
    return value


def check_real(value: Any, name: str, *, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False, finite: bool = True) -> float:
    """``value`` as a Python ``float``: tolerances, damping, step sizes, widths.

    Args:
        value: a Python or NumPy real number, or a 0-d real array (not a string, ``bool``,
            complex number or traced value).
        name: the argument's name, for the error message.
        lo: the smallest allowed value (``None``: no lower bound).
        hi: the largest allowed value (``None``: no upper bound).
        lo_open: whether ``lo`` itself is excluded (``> lo`` instead of ``>= lo``).
        finite: whether ``nan`` and ``inf`` are refused.

    Returns:
        ``float(value)``.

    Raises:
        ArgumentTypeError: ``value`` is not a real number.
        ValueError: ``value`` is not finite (when ``finite``) or out of range.
    """
    if isinstance(value, (bool, np.bool_, str, bytes, complex)) or value is None:
        raise ArgumentTypeError(f"{name} must be a real number, got {value!r} "
                                f"({_type_name(value)})")
    if isinstance(value, jax.core.Tracer):
        raise ArgumentTypeError(f"{name} must be a concrete real number, not a traced value "
                                "(pass it as a static argument)")
    if np.ndim(value) != 0 or jnp.iscomplexobj(value):
        raise ArgumentTypeError(f"{name} must be a real scalar, got {_type_name(value)} of "
                                f"shape {np.shape(value)}")
    try:
        x = float(value)
    except (TypeError, ValueError) as exc:
        raise ArgumentTypeError(f"{name} must be a real number, got {value!r}") from exc
    if finite and not np.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    if lo is not None and (x < lo or (lo_open and x == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {x}")
    if hi is not None and x > hi:
        raise ValueError(f"{name} must be <= {hi}, got {x}")
    return x


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """``value`` must be one of the strings ``choices``.

    Args:
        value: the value to check.
        name: the argument's name, for the error message.
        choices: the allowed strings.

    Returns:
        ``value``.

    Raises:
        ValueError: ``value`` is not one of ``choices`` (a non-string included).
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_labels(labels: Any, num_classes: int, name: str = "labels") -> None:
    """Integer class labels must lie in ``[0, num_classes)`` (checked on the host).

    A label of ``-1`` would otherwise be scored as the last class, and one past the end
    would turn the loss into NaN. Skipped for traced labels (inside ``jit`` the probes flag
    non-finite metrics instead).

    Args:
        labels: an integer array (any shape).
        num_classes: the number of classes (the size of the logits' last axis).
        name: the argument's name, for the error message.

    Raises:
        ArgumentTypeError: ``labels`` is not an integer array.
        ValueError: a label is negative or ``>= num_classes``.
    """
    if isinstance(labels, jax.core.Tracer):
        return
    dtype = getattr(labels, "dtype", None)
    if dtype is None:
        labels = np.asarray(labels)
        dtype = labels.dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ArgumentTypeError(f"{name} must be integer class labels, got dtype {dtype}")
    arr = np.asarray(labels)
    if arr.size == 0:
        return
    bad = (arr < 0) | (arr >= num_classes)
    if bad.any():
        idx = np.argwhere(bad)[:5].tolist()
        vals = arr[bad][:5].tolist()
        raise ValueError(
            f"{name} must lie in [0, {num_classes}) for {num_classes} classes: "
            f"{int(bad.sum())} label(s) out of range, e.g. {vals} at index {idx}"
        )
