"""How a parameter leaf becomes the 2-D matrix analysed: reshape rules and head views.

Conventions (Flax stores kernels as ``(inputs..., outputs...)``):

* 2-D arrays (Dense kernels ``(in, out)``, embeddings ``(vocab, features)``): as they are;
* rule ``"leading"``: ``(a_0, ..., a_{k-1}) -> (a_0 * ... * a_{k-2}, a_{k-1})``. Convolution
  kernels ``(kh, kw, in, out) -> (kh*kw*in, out)`` (any number of spatial axes), attention
  output projections ``(heads, head_dim, d_model) -> (heads*head_dim, d_model)``, and
  ``DenseGeneral`` kernels contracting several input axes into one output axis;
* rule ``"trailing"``: ``(a_0, a_1, ..., a_{k-1}) -> (a_0, a_1 * ... * a_{k-1})``. Attention
  query / key / value kernels ``(d_model, heads, head_dim) -> (d_model, heads*head_dim)``;
* rule ``"auto"`` (used by ``weight_spectra``) picks by the leaf's path: leaves named
  ``bias`` / ``scale`` and arrays with fewer than 2 axes are skipped; 2-D arrays are kept;
  a kernel with more than 2 axes whose parent module is an attention input projection
  (``query``, ``key``, ``value``, ``q``, ``k``, ``v``, ``q_proj``, ``k_proj``, ``v_proj``,
  ``qkv``, ``kv``) uses ``"trailing"``, one in an output projection (``out``, ``o``,
  ``o_proj``, ``out_proj``) and every other ``kernel`` uses ``"leading"``; anything else
  has no rule and is reported as skipped with the reason. ``weight_spectra(reshape=...)``
  overrides the rule for layouts this cannot guess (e.g. a ``DenseGeneral`` with several
  output axes outside attention).
* ``head_matrices`` gives the per-head view of attention kernels: input projections
  ``(d_model, heads, head_dim) -> (heads, d_model, head_dim)``, output projections
  ``(heads, head_dim, d_model)`` unchanged.

Supported names: ``RULES``, ``reshape_rule_for``, ``resolve_rule``, ``apply_reshape_rule``,
``matricize``, ``head_matrices``, ``head_kind``, ``check_finite``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax._validate import ArgumentTypeError, check_choice, is_traced

__all__ = [
    "RULES",
    "apply_reshape_rule",
    "check_finite",
    "head_kind",
    "head_matrices",
    "matricize",
    "reshape_rule_for",
    "resolve_rule",
]

RULES = ("auto", "matrix", "leading", "trailing")
"""The reshape rules accepted by :func:`matricize` and ``layer_spectrum(reshape=...)``."""
_SKIP_NAMES = frozenset({"bias", "scale"})
_ATTN_IN = frozenset(
    {"query", "key", "value", "q", "k", "v", "q_proj", "k_proj", "v_proj", "qkv", "kv"}
)
_ATTN_OUT = frozenset({"out", "o", "o_proj", "out_proj"})


def reshape_rule_for(path: str, shape: tuple[int, ...]) -> tuple[str | None, str]:
    """(rule, reason) chosen by the ``"auto"`` convention for a leaf at ``path``.

    Args:
      path: the leaf's ``"/"``-joined path.
      shape: the leaf's shape.

    Returns:
      ``(rule, "")`` with rule ``"matrix"``, ``"leading"`` or ``"trailing"``, or
      ``(None, reason)`` for a leaf that is not analysed (a bias, a vector, no rule).
    """
    parts = [p for p in path.split("/") if p] if path else []
    name = parts[-1] if parts else ""
    module = parts[-2] if len(parts) >= 2 else ""
    if name in _SKIP_NAMES:
        return None, f"'{name}' parameter (bias / normalisation), not a weight matrix"
    if len(shape) < 2:
        return None, f"{len(shape)}-D array (shape {shape}): not a weight matrix"
    if len(shape) == 2:
        return "matrix", ""
    if name == "kernel":
        if module in _ATTN_IN:
            return "trailing", ""
        return "leading", ""
    return None, (
        f"no reshape rule for a {len(shape)}-D array named '{name or '?'}' (shape {shape}); "
        "pass reshape='leading' or 'trailing'"
    )


def matricize(array: Any, rule: str = "auto", path: str = "") -> jax.Array:
    """Reshape a kernel to the 2-D matrix analysed (conventions in the module docstring).

    Args:
      array: the parameter array.
      rule: ``"auto"`` (by ``path`` and shape), ``"matrix"``, ``"leading"`` or ``"trailing"``.
      path: the leaf's ``"/"``-joined path, used by ``"auto"``.

    Returns:
      A 2-D array (a reshape, no copy of data under jit).

    Raises:
      ValueError: unknown rule, fewer than 2 axes, or no rule for this array.
    """
    a = jnp.asarray(array)
    rule = resolve_rule(rule, path, a.shape)
    return apply_reshape_rule(a, rule)


def resolve_rule(rule: str, path: str, shape: tuple[int, ...]) -> str:
    """The concrete rule (``"matrix"``, ``"leading"`` or ``"trailing"``) for a leaf.

    Args:
      rule: one of ``RULES``; ``"auto"`` decides by ``path`` and ``shape``.
      path: the leaf's ``"/"``-joined path (may be empty; ``"auto"`` then needs 2-D).
      shape: the leaf's shape.

    Returns:
      The rule to pass to :func:`apply_reshape_rule`.

    Raises:
      ArgumentTypeError: ``path`` is not a string.
      ValueError: unknown rule, fewer than 2 axes, ``"matrix"`` on a non 2-D array, or no
        ``"auto"`` rule for this leaf (the message says which rule to pass).
    """
    if not isinstance(rule, str) or rule not in RULES:
        raise ValueError(f"reshape rule must be one of {RULES}, got {rule!r}")
    if not isinstance(path, str):
        raise ArgumentTypeError(f"path must be a string, got {type(path).__name__}")
    if len(shape) < 2:
        raise ValueError(f"matrix must have at least 2 axes, got shape {shape}")
    if rule == "auto":
        if len(shape) == 2:
            return "matrix"
        if not path:
            raise ValueError(
                f"matrix has shape {shape} and no reshape rule applies without a path; pass "
                "reshape='leading' (conv / output kernels, (..., out)) or 'trailing' "
                "(attention q/k/v kernels, (in, ...))"
            )
        chosen, reason = reshape_rule_for(path, shape)
        if chosen is None:
            raise ValueError(f"matrix at '{path}': {reason}")
        return chosen
    if rule == "matrix" and len(shape) != 2:
        raise ValueError(f"reshape='matrix' needs a 2-D array, got shape {shape}")
    return rule


def apply_reshape_rule(a: Any, rule: str) -> Any:
    """A parameter leaf as a 2-D matrix by ``rule`` (from :func:`reshape_rule_for`).

    ``"leading"`` folds all but the last axis into rows, ``"trailing"`` all but the first
    into columns, anything else leaves ``a`` as it is. Works on NumPy and JAX arrays (a
    reshape: no copy under jit).

    Args:
      a: the leaf, NumPy or JAX array.
      rule: ``"leading"``, ``"trailing"`` or anything else (identity).

    Returns:
      ``a`` reshaped (same array type).
    """
    if rule == "leading":
        return a.reshape(-1, a.shape[-1])
    if rule == "trailing":
        return a.reshape(a.shape[0], -1)
    return a


def head_matrices(kernel: Any, *, kind: str) -> jax.Array:
    """Per-head matrices of a multi-head attention kernel.

    Args:
      kernel: ``(d_model, heads, head_dim)`` for ``kind="in"`` (query / key / value), or
        ``(heads, head_dim, d_model)`` for ``kind="out"``.
      kind: ``"in"`` or ``"out"``.

    Returns:
      ``(heads, d_model, head_dim)`` for ``"in"``; ``(heads, head_dim, d_model)`` for ``"out"``.

    Raises:
      ValueError: if ``kernel`` is not 3-D or ``kind`` is unknown.
    """
    check_choice(kind, "kind", ("in", "out"))
    k = jnp.asarray(kernel)
    if k.ndim != 3:
        raise ValueError(f"kernel must be 3-D (a multi-head attention kernel), got {k.shape}")
    return jnp.moveaxis(k, 1, 0) if kind == "in" else k



def head_kind(path: str, shape: tuple[int, ...]) -> str | None:
    """Whether a leaf is a 3-D multi-head attention kernel, and which side.

    Args:
      path: the leaf's ``"/"``-joined path; the leaf must be named ``kernel`` and its
        parent module an attention input (``query``, ``q_proj``, ...) or output (``out``,
        ``o_proj``, ...) projection.
      shape: the leaf's shape (3-D for a per-head view).

    Returns:
      ``"in"`` or ``"out"`` (the ``kind`` of :func:`head_matrices`), or None.
    """
    parts = path.split("/")
    if len(shape) != 3 or parts[-1] != "kernel" or len(parts) < 2:
        return None
    return "in" if parts[-2] in _ATTN_IN else "out" if parts[-2] in _ATTN_OUT else None


def check_finite(w: Any, what: str) -> None:
    """Raise when a concrete matrix has NaN or Inf entries (traced arrays are skipped).

    NumPy arrays are checked on the host; JAX arrays by one reduction on their device (the
    counts are computed only when the check fails).

    Args:
      w: the matrix (any shape), NumPy or JAX.
      what: how the message names it, e.g. ``"matrix 'Dense_0/kernel'"``.

    Raises:
      ValueError: naming ``what`` and the number of NaN and Inf entries.
    """
    if is_traced(w):
        return
    if isinstance(w, jax.Array):
        if not jnp.issubdtype(w.dtype, jnp.inexact) or bool(jnp.all(jnp.isfinite(w))):
            return
    w = np.asarray(w)
    if w.dtype.kind not in "fc" and w.dtype.name != "bfloat16":
        return
    bad = ~np.isfinite(w)
    if bad.any():
        n_nan, n_inf = int(np.isnan(w).sum()), int(np.isinf(w).sum())
        raise ValueError(f"{what} has non-finite entries ({n_nan} NaN, {n_inf} Inf)")
