"""Arguments and plan of an ``eigsh`` run: every check at the boundary, one static plan out.

The plan is a :class:`~gradience_jax.spectrum.engine.Plan` (a ``jit`` static argument).

Supported names (the module has no ``__all__``): ``default_memory_budget`` (re-exported by
:mod:`gradience_jax.spectrum`); ``make_plan``, ``check_k``, ``check_int`` (now
:func:`gradience_jax._validate.check_int`: ``check_int(value, name, lo=..., hi=...)``),
``row_bytes``, ``convergence_floor``, ``reachable_residual``,
``default_basis_size``, ``small_solver``, ``flat_layout``, ``program_platform``,
``lean_schedule`` and the
constants ``LEAN_SCHEDULE_MIN_PARAMS``,
``DEFAULT_MEMORY_BUDGET_BYTES``, ``MIN_BASIS_SIZE``, ``MIN_MATVEC_CAP``,
``ASYMMETRY_ERROR``, ``BASIS_DTYPES``, ``TREE_LAYOUT_MIN_PARAMS``,
``TREE_LAYOUT_MAX_LEAVES`` serve the other spectrum modules, tests and
benchmarks.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax import tree as tu
from gradience_jax._validate import check_choice, check_int, check_real
from gradience_jax.lanczos import (
    check_reorth,
    default_breakdown_tol,
    scalar_dtype,
)
from gradience_jax.operators.base import LinearOperator, check_operator
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
#: the convergence floor of the Lanczos arithmetic, in units of its epsilon times ``||A||``
WORK_FLOOR_FACTOR = 10.0
#: Ritz bounds a half-precision run must reach, in units of the operator's epsilon x ``||A||``
HALF_STOP_FACTOR = 0.1


def _eps_pair(like: PyTree, op_dtype: Any) -> tuple[float, float]:
    eps_work = float(jnp.finfo(scalar_dtype(like)).eps)
    eps_op = (float(jnp.finfo(op_dtype).eps) if jnp.issubdtype(op_dtype, jnp.floating)
              else eps_work)
    return eps_work, eps_op


def reachable_residual(like: PyTree, op_dtype: Any) -> float:
    """Smallest true residual, relative to ``||A||``, an operator of this dtype can certify.

    The Lanczos arithmetic (float32 or wider) reaches ``10 eps_work ||A||``. An operator of
    lower precision (bfloat16 / float16 params) is itself only accurate to about
    ``eps_op ||A||``: its true residuals ``||A y - lambda y||`` stop there, however small the
    float32 recurrence makes the Ritz bounds. Measured on SPD test matrices: the true
    residuals of the exact eigenvectors rounded to the dtype are ``0.05 .. 0.25 eps_op ||A||``.

    Args:
        like: the operator's ``params_like``.
        op_dtype: the operator's dtype.

    Returns:
        ``max(10 eps_work, eps_op)``.
    """
    eps_work, eps_op = _eps_pair(like, op_dtype)
    return max(WORK_FLOOR_FACTOR * eps_work, eps_op)


def convergence_floor(like: PyTree, op_dtype: Any) -> float:
    """The floor of the Ritz-bound test ``bound <= max(tol |theta|, floor ||A||)``.

    ``10 eps_work`` for operators as precise as the Lanczos arithmetic; for a half-precision
    operator ``0.1 eps_op``: below it the true residuals (noise of the operator, see
    :func:`reachable_residual`) no longer improve, above it they still do.

    Args:
        like: the operator's ``params_like``.
        op_dtype: the operator's dtype.

    Returns:
        ``max(10 eps_work, 0.1 eps_op)``.
    """
    eps_work, eps_op = _eps_pair(like, op_dtype)
    return max(WORK_FLOOR_FACTOR * eps_work, HALF_STOP_FACTOR * eps_op)


def check_k(k: Any, n: int) -> int:
    """``k`` as an ``int`` with ``1 <= k <= n`` (the number of wanted eigenpairs).

    Args:
        k: the value to check.
        n: the operator's dimension ``n_params``.

    Returns:
        ``int(k)``.

    Raises:
        ArgumentTypeError: ``k`` is not an integer.
        ValueError: ``k < 1`` or ``k > n``.
    """
    k = check_int(k, "k", lo=1)
    if k > n:
        raise ValueError(f"k must be <= n_params={n}, got {k}")
    return k


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


#: the pytree layout above this many parameters (when the pytree has few leaves)
TREE_LAYOUT_MIN_PARAMS = 1 << 22
#: the flat layout for pytrees with more leaves than this (compile time grows per leaf)
TREE_LAYOUT_MAX_LEAVES = 16
#: XLA:CPU's memory-optimised instruction schedule from this many parameters on
LEAN_SCHEDULE_MIN_PARAMS = 1 << 22


def program_platform(op: LinearOperator) -> str:
    """The platform the engine program compiles for.

    That of the operator's first concrete array operand, else the default backend.

    Args:
        op: the operator.

    Returns:
        ``"cpu"``, ``"gpu"``, ``"tpu"``, ... (``jax.Device.platform``).
    """
    for x in jax.tree_util.tree_leaves(op.operands):
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            return next(iter(x.devices())).platform
    return jax.default_backend()


def lean_schedule(op: LinearOperator) -> bool:
    """Whether the engine program is compiled with XLA:CPU's memory-optimised schedule.

    On CPU, at ``LEAN_SCHEDULE_MIN_PARAMS`` parameters or more. The schedule orders the
    instructions to shorten buffer lifetimes; measured on 10M- and 20M-parameter MLP
    Hessians (``k=3``, 30 steps) it holds 1.3 (``"window"``), 0.9 (``"full"``) and 0.4
    (``"none"``) fewer parameter-sized vectors at a step time within +-4% of the default
    one. On small operators it only costs time (0.27M parameters: 9% slower), so they keep
    the default schedule. Other backends ignore it.

    Args:
        op: the operator (:func:`program_platform`).

    Returns:
        ``True`` for the memory-optimised schedule.
    """
    return op.n_params >= LEAN_SCHEDULE_MIN_PARAMS and program_platform(op) == "cpu"


def flat_layout(op: LinearOperator, v0: PyTree | None = None) -> bool:
    """Whether the engine may hold Krylov vectors as one flat array.

    It may when no operand is spread over several devices (a traced operand counts as
    spread when more than one device exists). Sharded params keep the pytree layout, so
    vectors keep their sharding. Large operators with few leaves (at least
    ``TREE_LAYOUT_MIN_PARAMS`` parameters in at most ``TREE_LAYOUT_MAX_LEAVES`` leaves)
    also keep it: each product then skips the flatten / unflatten copies (measured on a
    10M-parameter MLP, 6 leaves: 163 against 189 ms a Lanczos step), while the extra
    compile time per leaf stays small (GPT-2 size, ~150 leaves: 141 s against 24 s, so it
    stays flat).

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
    leaves = jax.tree_util.tree_leaves(op.params_like)
    return not (op.n_params >= TREE_LAYOUT_MIN_PARAMS and len(leaves) <= TREE_LAYOUT_MAX_LEAVES)


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
    op = check_operator(op)
    n = op.n_params
    k = check_k(k, n)
    check_choice(which, "which", WHICH)
    win = check_reorth(reorth, window)
    check_real(tol, "tol", lo=0.0, lo_open=True)
    like = op.params_like
    if basis_dtype is not None:
        try:
            name = str(jnp.dtype(basis_dtype))
        except TypeError:
            name = None
        if name not in BASIS_DTYPES:
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
        num_iters = check_int(num_iters, "num_iters", lo=1)
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
        max_iters = check_int(max_iters, "max_iters", lo=1)
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
        m = (default_basis_size(k) if basis_size is None
             else check_int(basis_size, "basis_size", lo=1))
        m = min(m, n)
        if fixed:
            m = min(m, num_iters)
        if max_iters is not None:
            m = min(m, max(max_iters, k))
        budget = (default_memory_budget() if memory_budget_bytes is None
                  else check_int(memory_budget_bytes, "memory_budget_bytes", lo=1))
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
        check_every = max(10, k) if chunk is None else check_int(chunk, "chunk", lo=1)
    if chunk is not None:
        check_int(chunk, "chunk", lo=1)
    plan = Plan(
        k=k, which=which, reorth=reorth, basis_size=m,
        window=win if reorth == "window" else None, capacity=capacity,
        check_every=check_every, n=n, fixed=fixed, filter_ghosts=filter_ghosts,
        vectors=bool(vectors), true_residuals=bool(true_residuals), solver=small_solver(),
        basis_dtype=basis_dtype, breakdown_tol=default_breakdown_tol(like),
        asym_tol=asym_tol, eps_work=eps_work, flat=bool(flat),
        conv_floor=convergence_floor(like, op.dtype), lean_schedule=lean_schedule(op),
        cpu_program=program_platform(op) == "cpu",
    )
    return plan, int(cap)
