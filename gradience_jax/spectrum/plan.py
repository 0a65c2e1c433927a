"""Arguments and plan of an ``eigsh`` run: every check at the boundary, one static plan out.

The plan is a :class:`~gradience_jax.spectrum.engine.Plan` (a ``jit`` static argument).

Supported names (the module has no ``__all__``): ``default_memory_budget`` (re-exported by
:mod:`gradience_jax.spectrum`); ``make_plan``, ``check_int``, ``row_bytes``,
``default_basis_size``, ``small_solver``, ``flat_layout`` and the constants
``DEFAULT_MEMORY_BUDGET_BYTES``, ``MIN_BASIS_SIZE``, ``MIN_MATVEC_CAP``,
``ASYMMETRY_ERROR``, ``BASIS_DTYPES`` serve the other spectrum modules, tests and
benchmarks.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax import tree as tu
from gradience_jax.lanczos import (
    check_reorth,
    default_breakdown_tol,
    scalar_dtype,
)
from gradience_jax.operators.base import LinearOperator
from gradience_jax.spectrum.engine import Plan
from gradience_jax.spectrum.ritz import WHICH

PyTree = Any

#: default memory for the stored basis when the device does not report its size
DEFAULT_MEMORY_BUDGET_BYTES = 2 * 1024**3
#: smallest default thick-restart basis
MIN_BASIS_SIZE = 30
#: smallest default matvec cap of a convergence-driven run ("generous": the run stops at tol)
MIN_MATVEC_CAP = 1000
#: relative asymmetry ``|<q_(j-1), A q_j> - beta_(j-1)| / ||A||`` that stops a run
ASYMMETRY_ERROR = 1e-4
#: basis storage dtypes accepted by ``basis_dtype``
BASIS_DTYPES = ("float32", "bfloat16", "float16", "float64")


def check_int(name: str, value: Any, lo: int) -> int:
    """``value`` as an ``int >= lo``, else a ``ValueError`` naming ``name``.

    Args:
        name: the argument's name, for the message.
        value: the value to check (an ``int`` or numpy integer, not a ``bool``).
        lo: the smallest allowed value.

    Returns:
        ``int(value)``.

    Raises:
        ValueError: ``value`` is not an integer ``>= lo``.
    """
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def default_memory_budget() -> int:
    """Bytes a stored Lanczos basis may use: 25% of device memory if reported, else 2 GiB.

    Returns:
        ``bytes_limit / 4`` of the first device's memory stats, else
        ``DEFAULT_MEMORY_BUDGET_BYTES``.
    """
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # backends without memory stats
        stats = {}
    limit = stats.get("bytes_limit")
    return int(limit * 0.25) if limit else DEFAULT_MEMORY_BUDGET_BYTES


def row_bytes(like: PyTree, dtype: Any = None) -> int:
    """Bytes of one stored basis row (work dtype, or ``dtype``).

    Args:
        like: template pytree (arrays or ``jax.ShapeDtypeStruct``).
        dtype: storage dtype of the row (``None``: each leaf's work dtype, float32 or
            wider).

    Returns:
        ``sum_leaves size x itemsize``.
    """
    return int(sum(
        int(np.prod(s.shape)) * jnp.dtype(dtype or tu.promote_dtypes(s.dtype, jnp.float32)).itemsize
        for s in jax.tree_util.tree_leaves(like)
    ))


def default_basis_size(k: int) -> int:
    """``max(2k + 10, 30)`` rows: the default thick-restart basis for ``k`` wanted pairs.

    Room for the ``k`` wanted pairs, as many kept neighbours and enough new directions per
    cycle.

    Args:
        k: number of wanted eigenpairs.

    Returns:
        The basis size ``m``.
    """
    return max(2 * k + 10, MIN_BASIS_SIZE)


def small_solver() -> str:
    """``"device"`` when float64 is available on device (``jax_enable_x64``), else ``"host"``.

    Returns:
        The small eigensolver of the plan (``Plan.solver``).
    """
    return "device" if jax.config.jax_enable_x64 else "host"


def _capacity(cap: int) -> int:
    """``alphas`` / ``betas`` buffer length: the next power of two >= ``cap`` (>= 32).

    Rounding up lets nearby caps share one program.
    """
    return max(32, 1 << (max(cap, 1) - 1).bit_length())


def flat_layout(op: LinearOperator, v0: PyTree | None = None) -> bool:
    """Whether the engine may hold Krylov vectors as one flat array.

    It may when no operand is spread over several devices (a traced operand counts as
    spread when more than one device exists). Sharded params keep the pytree layout, so
    vectors keep their sharding.

    Args:
        op: the operator.
        v0: the start vector, or ``None``.

    Returns:
        ``True`` for the flat layout, ``False`` for the pytree layout.
    """
    for x in jax.tree_util.tree_leaves((op.operands, v0)):
        if isinstance(x, jax.core.Tracer):
            if jax.device_count() > 1:
                return False
        elif isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
            return False
    return True


def make_plan(
    op: LinearOperator,
    *,
    k: Any,
    num_iters: Any,
    which: Any,
    reorth: Any,
    window: Any,
    tol: Any,
    max_iters: Any,
    memory_budget_bytes: Any,
    filter_ghosts: Any,
    vectors: bool,
    true_residuals: bool,
    chunk: Any,
    basis_size: Any,
    basis_dtype: Any,
    flat: bool = True,
) -> tuple[Plan, int]:
    """Validate ``eigsh``'s arguments and fix the static plan.

    Args:
        op: the operator.
        k: number of eigenpairs, ``1 <= k <= n_params``.
        num_iters: exact number of matvecs, or ``None`` (convergence-driven).
        which: ``"LA"``, ``"SA"``, ``"BE"`` or ``"LM"``.
        reorth: ``"full"``, ``"window"`` or ``"none"``.
        window: ring-buffer rows for ``"window"``.
        tol: positive finite relative residual tolerance.
        max_iters: matvec cap of a convergence-driven run, or ``None`` (the default cap).
        memory_budget_bytes: bytes for the stored basis, or ``None``
            (:func:`default_memory_budget`).
        filter_ghosts: Cullum-Willoughby filtering, or ``None`` (on unless ``"full"``).
        vectors: form the Ritz vectors.
        true_residuals: compute ``||A y - theta y||`` (``k`` matvecs).
        chunk: steps between convergence checks (``"window"`` / ``"none"``), or ``None``.
        basis_size: thick-restart rows, or ``None`` (:func:`default_basis_size`).
        basis_dtype: storage dtype of the thick-restart basis, or ``None``.
        flat: hold Krylov vectors as one flat array (:func:`flat_layout`).

    Returns:
        ``(plan, matvec_cap)``: the cap is a traced argument of the engine.

    Raises:
        TypeError: ``op`` is not a :class:`LinearOperator`.
        ValueError: naming the bad argument and the valid choices.
    """
    if not isinstance(op, LinearOperator):
        raise TypeError(f"op must be a gradience_jax.LinearOperator, got {type(op).__name__}")
    n = op.n_params
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer with 1 <= k <= n_params={n}, got {k!r}")
    k = int(k)
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    win = check_reorth(reorth, window)
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating)) or not (
        tol > 0 and math.isfinite(tol)
    ):
        raise ValueError(f"tol must be a positive finite float, got {tol!r}")
    like = op.params_like
    if basis_dtype is not None:
        if str(jnp.dtype(basis_dtype)) not in BASIS_DTYPES:
            raise ValueError(f"basis_dtype must be one of {BASIS_DTYPES} or None, got "
                             f"{basis_dtype!r}")
        if reorth != "full":
            raise ValueError("basis_dtype applies to reorth='full' (the stored thick-restart "
                             f"basis), got reorth={reorth!r}")
        basis_dtype = str(jnp.dtype(basis_dtype))
    # once the stored rows can span the whole space, n iterations are exact
    exhaustible = reorth == "full" or (reorth == "window" and win >= n)
    fixed = num_iters is not None
    if fixed:
        num_iters = check_int("num_iters", num_iters, 1)
        if num_iters < k:
            raise ValueError(f"num_iters={num_iters} must be >= k={k}")
        if num_iters > n and exhaustible and reorth != "full":
            raise ValueError(
                f"num_iters={num_iters} exceeds n_params={n} with reorth={reorth!r} storing "
                f"{win} vectors: {n} iterations already span the whole space; use "
                "num_iters <= n_params"
            )
        if num_iters > n and reorth == "full":
            raise ValueError(
                f"num_iters={num_iters} exceeds n_params={n} with reorth='full': {n} "
                "iterations already span the whole space; use num_iters <= n_params"
            )
    if max_iters is not None:
        max_iters = check_int("max_iters", max_iters, 1)
        if max_iters < k:
            raise ValueError(f"max_iters={max_iters} must be >= k={k}")
    filter_ghosts = (reorth != "full") if filter_ghosts is None else bool(filter_ghosts)
    sdt = scalar_dtype(like)
    eps_work = float(jnp.finfo(sdt).eps)
    eps_op = float(jnp.finfo(op.dtype).eps) if jnp.issubdtype(op.dtype, jnp.floating) else eps_work
    # a broken (non-symmetric) matvec stops the run; asymmetry between sqrt(eps) and this is
    # reported as a warning (operators with lower-precision internals reach ~1e-7 relative)
    asym_tol = max(math.sqrt(max(eps_op, eps_work)), ASYMMETRY_ERROR)
    m = 0
    capacity = 0
    check_every = 1
    if reorth == "full":
        m = default_basis_size(k) if basis_size is None else check_int("basis_size", basis_size, 1)
        m = min(m, n)
        if fixed:
            m = min(m, num_iters)
        if max_iters is not None:
            m = min(m, max(max_iters, k))
        budget = (default_memory_budget() if memory_budget_bytes is None
                  else int(memory_budget_bytes))
        rows_fit = budget // max(row_bytes(like, basis_dtype), 1)
        if m + 1 > rows_fit:
            m = max(int(rows_fit) - 1, 0)
        cap = num_iters if fixed else (max_iters or max(MIN_MATVEC_CAP, 20 * m))
        one_cycle = m >= min(cap, n)
        if m < k or (not one_cycle and m < k + 2):
            raise ValueError(
                f"the thick-restart basis holds {m} rows (basis_size / memory budget "
                f"{budget / 2**20:.1f} MiB at {row_bytes(like, basis_dtype) / 2**20:.2f} MiB "
                f"a row) but k={k} needs at least k + 2 = {k + 2}: raise basis_size or "
                "memory_budget_bytes, use basis_dtype='bfloat16', or use reorth='window'"
            )
    else:
        if basis_size is not None:
            raise ValueError(f"basis_size applies to reorth='full', got reorth={reorth!r}")
        default_cap = max(MIN_MATVEC_CAP, 10 * k)
        cap = num_iters if fixed else (max_iters or default_cap)
        if exhaustible and not fixed:
            cap = min(cap, n)
        capacity = _capacity(cap)
        check_every = max(10, k) if chunk is None else check_int("chunk", chunk, 1)
    if chunk is not None:
        check_int("chunk", chunk, 1)
    plan = Plan(
        k=k, which=which, reorth=reorth, basis_size=m,
        window=win if reorth == "window" else None, capacity=capacity,
        check_every=check_every, n=n, fixed=fixed, filter_ghosts=filter_ghosts,
        vectors=bool(vectors), true_residuals=bool(true_residuals), solver=small_solver(),
        basis_dtype=basis_dtype, breakdown_tol=default_breakdown_tol(like),
        asym_tol=asym_tol, eps_work=eps_work, flat=bool(flat),
    )
    return plan, int(cap)
