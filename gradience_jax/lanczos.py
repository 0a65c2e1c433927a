"""Lanczos tridiagonalisation of a symmetric :class:`LinearOperator`, as one ``lax.scan``.

Vectors stay pytrees shaped like the parameters; the stored Lanczos basis is a pytree whose
leaves carry a leading axis (``m`` rows for ``reorth="full"``, a ring buffer of ``window``
rows for ``"window"``). Re-orthogonalisation is block classical Gram-Schmidt,
``w <- w - B (B^T w)``, where ``B^T w`` sums one ``tensordot`` per leaf: no loop over basis
vectors.

Storage precision: the basis, the recurrence and the dot products run in the *work dtype*
``promote(leaf dtype, float32)`` leaf by leaf (bf16 / fp16 models keep float32 Lanczos
vectors); the operator itself is applied to vectors cast back to its own dtype. The
tridiagonal ``alphas`` / ``betas`` come back in the work dtype; :mod:`gradience_jax.spectrum`
solves the tridiagonal eigenproblem in float64 on the host.

Breakdown (``beta_j ~ 0``: ``span(q_0..q_j)`` is an invariant subspace) is handled by a
restart with a fresh random vector orthogonalised against what is stored; ``betas[j]`` is
then set to exactly ``0`` (``T`` decouples into blocks) and ``breakdowns[j]`` is ``True``.

References:
    C. Lanczos (1950); C. C. Paige (1976) on loss of orthogonality; L. Giraud, J. Langou,
    M. Rozloznik (2005) "twice is enough" for classical Gram-Schmidt; K. Wu & H. Simon
    (2000) thick-restart Lanczos.

Supported names: ``DEFAULT_WINDOW``, ``LanczosState``, ``REORTH_MODES``, ``lanczos``,
``lanczos_init``, ``lanczos_run``, ``make_step``, ``random_vector``, ``reorth_passes``,
``restart_vector``, ``safe_normalize``, ``scalar_dtype``, ``to_like``, ``to_work``,
``zeros_work`` (the ``__all__`` list). The other public-looking helpers (``check_reorth``,
``check_vector``, ``hash_vector``, ``NonFiniteError``, ``first_nonfinite``, ...)
serve :mod:`gradience_jax.spectrum`, :mod:`gradience_jax.estimators` and
:mod:`gradience_jax.geometry`; the underscored aliases at the end are old private names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax import tree as tu
from gradience_jax._validate import check_choice, check_int, check_key, is_traced
from gradience_jax.errors import NonFiniteError  # noqa: F401 - re-exported here
from gradience_jax.operators.base import LinearOperator, check_operator

PyTree = Any

REORTH_MODES = ("full", "window", "none")
DEFAULT_WINDOW = 8
#: breakdown threshold, in units of the work dtype's machine epsilon times ``||T||``
BREAKDOWN_EPS_FACTOR = 100.0

__all__ = [
    "DEFAULT_WINDOW",
    "LanczosState",
    "REORTH_MODES",
    "lanczos",
    "lanczos_init",
    "lanczos_run",
    "make_step",
    "random_vector",
    "reorth_passes",
    "restart_vector",
    "safe_normalize",
    "scalar_dtype",
    "to_like",
    "to_work",
    "zeros_work",
]


class LanczosState(NamedTuple):
    """Lanczos state after ``step`` iterations (all arrays: passes through ``jit``/``scan``).

    With ``Q = [q_0, ..., q_{m-1}]`` and ``T = tridiag(betas[:m-1], alphas, betas[:m-1])``
    the Lanczos relation is ``A Q = Q T + betas[m-1] q_m e_m^T`` where ``q_m`` is ``q``.

    Attributes:
        alphas: ``(capacity,)`` diagonal of ``T`` (work dtype); entries ``>= step`` are 0.
        betas: ``(capacity,)`` ``betas[j] = ||r_j||`` couples ``q_j`` and ``q_{j+1}``;
            exactly 0 where a breakdown restarted the recurrence.
        basis: pytree, leaves ``(rows, *leaf.shape)`` in the work dtype: all Lanczos vectors
            (``"full"``, row ``j`` is ``q_j``), a ring buffer of the last ``window`` vectors
            (``"window"``, ``q_j`` in row ``j % window``) or no rows (``"none"``).
        q: the next Lanczos vector ``q_step`` (unit norm).
        q_prev: ``q_{step-1}`` (zeros at the start); ``None`` for ``"window"``, whose ring
            buffer already holds it in row ``(step - 1) % window`` (a separate copy was two
            more parameter-sized buffers in the compiled loop: the vector and the copy XLA
            inserts for the ``q_prev <- q`` rotation of the carry).
        beta: scalar ``betas[step-1]``, the coupling between ``q_prev`` and ``q``.
        step: int32 scalar, iterations done (= operator calls).
        breakdowns: ``(capacity,)`` bool, ``True`` at ``j`` if ``q_{j+1}`` is a restart vector.
        dropped: ``(capacity,)`` the (tiny) ``beta_j`` dropped at a breakdown, 0 elsewhere:
            the residual bound of the block it closed.
        orthogonality: ``(capacity,)`` measured ``|<q_i, q_{j+1}>|`` against the oldest
            stored row ``i`` (``q_0`` for ``"full"``, ``q_{j+1-window}`` for ``"window"``,
            ``q_{j-1}`` for ``"none"``): no extra vector is kept for it.
        asymmetry: ``(capacity,)`` measured ``|<q_{j-1}, A q_j> - beta_{j-1}|``: for a
            symmetric operator ``<q_{j-1}, A q_j> = <A q_{j-1}, q_j> = beta_{j-1}`` up to
            rounding (local orthogonality), so this needs no stored ``A q_{j-1}``. With
            ``"none"`` the terms of the measured loss of orthogonality are discounted.
        anorm: scalar running estimate of ``||A||`` (max Gershgorin row sum of ``T``).
        key: PRNG key for restart vectors.
    """

    alphas: jax.Array
    betas: jax.Array
    basis: PyTree
    q: PyTree
    q_prev: PyTree
    beta: jax.Array
    step: jax.Array
    breakdowns: jax.Array
    dropped: jax.Array
    orthogonality: jax.Array
    asymmetry: jax.Array
    anorm: jax.Array
    key: jax.Array


def first_nonfinite(values: Any) -> int | None:
    """Index of the first non-finite entry of a 1-D host array (``None`` when all are finite).

    Args:
        values: array-like of per-probe / per-step values (any shape; flattened).

    Returns:
        The flat index, or ``None``.
    """
    arr = np.asarray(values)
    if arr.dtype.kind not in "fc":
        return None
    bad = np.flatnonzero(~np.isfinite(arr))
    return int(bad[0]) if bad.size else None


# -- small pytree helpers ------------------------------------------------------------------


def work_dtype(dtype: Any) -> jnp.dtype:
    """Dtype of stored Lanczos vectors for leaves of ``dtype``: float32 or wider.

    Args:
        dtype: a leaf dtype.

    Returns:
        :func:`gradience_jax.tree.accumulation_dtype` of ``dtype``.
    """
    return tu.accumulation_dtype(dtype)


def to_work(v: PyTree) -> PyTree:
    """``v`` with every leaf cast to its work dtype (:func:`work_dtype`: float32 or wider).

    Args:
        v: pytree vector.

    Returns:
        A pytree like ``v`` in the work dtypes.
    """
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, work_dtype(jnp.result_type(x))), v)


def to_like(v: PyTree, like: PyTree) -> PyTree:
    """Cast every leaf of ``v`` to the dtype of the matching leaf of ``like``.

    Args:
        v: pytree vector.
        like: template pytree (arrays or ``jax.ShapeDtypeStruct``) with ``v``'s structure.

    Returns:
        A pytree like ``v`` in ``like``'s dtypes (e.g. the operator's, before a matvec).
    """
    return jax.tree_util.tree_map(lambda x, s: x.astype(s.dtype), v, like)


def zeros_work(like: PyTree, rows: int | None = None) -> PyTree:
    """Zeros shaped like ``like`` in the work dtypes, optionally with a leading row axis.

    Args:
        like: template pytree (arrays or ``jax.ShapeDtypeStruct``).
        rows: ``None`` for one vector, else the number of stacked rows.

    Returns:
        A pytree with leaves ``leaf.shape`` or ``(rows, *leaf.shape)``.
    """
    lead = () if rows is None else (rows,)
    return jax.tree_util.tree_map(
        lambda s: jnp.zeros(lead + tuple(s.shape), work_dtype(s.dtype)), like
    )


def scalar_dtype(like: PyTree) -> jnp.dtype:
    """Dtype of the Lanczos scalars (``alphas``, ``betas``, dot products) for ``like``.

    Args:
        like: template pytree (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
        The promoted work dtype of the leaves (float32 for a pytree without leaves).
    """
    dts = [work_dtype(s.dtype) for s in jax.tree_util.tree_leaves(like)]
    return tu.promote_dtypes(*dts) if dts else jnp.dtype(jnp.float32)


def basis_dot(basis: PyTree, w: PyTree) -> jax.Array:
    """``B^T w``: one inner product per stored row, ``(rows,)`` (one tensordot per leaf).

    Args:
        basis: stacked pytree, leaves ``(rows, *leaf.shape)``.
        w: pytree vector like one row.

    Returns:
        ``(rows,)`` array in the promoted dtype of the per-leaf products. Cost ``rows x P``.
    """
    parts = jax.tree_util.tree_map(
        lambda b, x: jnp.tensordot(b, x.astype(b.dtype), axes=x.ndim), basis, w
    )
    leaves = jax.tree_util.tree_leaves(parts)
    acc = tu.promote_dtypes(*[x.dtype for x in leaves])
    return sum((x.astype(acc) for x in leaves[1:]), leaves[0].astype(acc))


def basis_combine(basis: PyTree, coeffs: jax.Array) -> PyTree:
    """``B c``: the linear combination ``sum_i c_i b_i`` of the stored rows.

    Args:
        basis: stacked pytree, leaves ``(rows, *leaf.shape)``.
        coeffs: ``(rows,)`` coefficients.

    Returns:
        A pytree like one row, in the basis dtypes. Cost ``rows x P``.
    """
    return jax.tree_util.tree_map(
        lambda b: jnp.tensordot(coeffs.astype(b.dtype), b, axes=1), basis
    )


def _basis_rows(basis: PyTree) -> int:
    leaves = jax.tree_util.tree_leaves(basis)
    return int(leaves[0].shape[0]) if leaves else 0


def orthogonalize(w: PyTree, basis: PyTree, passes: int) -> PyTree:
    """Block classical Gram-Schmidt: ``passes`` times ``w <- w - B (B^T w)``.

    Args:
        w: pytree vector like one row.
        basis: stacked pytree, leaves ``(rows, *leaf.shape)`` (orthonormal rows).
        passes: number of passes (static; 2 for "twice is enough").

    Returns:
        ``w`` with its components along the rows removed (``w`` itself when ``rows == 0``).
        Cost ``2 x passes x rows x P``.
    """
    if _basis_rows(basis) == 0:
        return w
    for _ in range(passes):
        w = tu.sub(w, basis_combine(basis, basis_dot(basis, w)))
    return w


def _set_row(basis: PyTree, row: jax.Array, v: PyTree) -> PyTree:
    return jax.tree_util.tree_map(
        lambda b, x: jax.lax.dynamic_update_index_in_dim(b, x.astype(b.dtype), row, 0), basis, v
    )


def _get_row(basis: PyTree, row: jax.Array) -> PyTree:
    return jax.tree_util.tree_map(
        lambda b: jax.lax.dynamic_index_in_dim(b, row, 0, keepdims=False), basis
    )


def safe_normalize(v: PyTree) -> tuple[PyTree, jax.Array]:
    """``v / ||v||`` without a division by zero, and ``||v||``.

    Args:
        v: pytree vector.

    Returns:
        ``(unit, norm)``: ``v`` scaled by ``1 / max(||v||, tiny)`` (a zero ``v`` stays zero)
        and the scalar norm (float32 or wider).
    """
    nrm = tu.norm(v)
    tiny = jnp.finfo(nrm.dtype).tiny
    return tu.scale(1.0 / jnp.maximum(nrm, tiny), v), nrm


def unit_start(v0: PyTree, key: jax.Array) -> PyTree:
    """``v0 / ||v0||`` in the work dtype; a zero ``v0`` becomes a pseudo-random unit vector.

    The fallback is a ``lax.cond`` branch, so it is only made when needed: a ``where``
    over both held two more parameter-sized vectors at the start of the run, the peak of
    the whole program for ``"window"`` (12 live vectors against 10 inside the loop).

    Args:
        v0: start vector (pytree).
        key: ``jax.random`` key of the fallback (:func:`restart_vector` with ``j = -1``).

    Returns:
        A unit pytree vector like ``v0`` in the work dtype. Cost ``O(P)``.
    """
    q, nrm = safe_normalize(to_work(v0))

    def fallback(q):
        return safe_normalize(restart_vector(q, key, jnp.asarray(-1)))[0]

    return jax.lax.cond(nrm > 0, lambda q: q, fallback, q)


# -- validation ------------------------------------------------------------------------------


def check_reorth(reorth: str, window: int | None) -> int:
    """Validate ``reorth`` / ``window`` and give the ring-buffer size.

    Args:
        reorth: ``"full"``, ``"window"`` or ``"none"``.
        window: ring-buffer rows for ``"window"`` (``None``: :data:`DEFAULT_WINDOW`).

    Returns:
        The window for ``"window"``, 0 for the other modes.

    Raises:
        ValueError: an unknown ``reorth``, or a ``window`` below 2.
        ArgumentTypeError: a ``window`` that is not an integer.
    """
    check_choice(reorth, "reorth", REORTH_MODES)
    if reorth == "window":
        if window is None:
            window = DEFAULT_WINDOW
        return check_int(window, "window", lo=2)
    return 0


def check_vector(v: PyTree, like: PyTree, name: str, like_name: str, *,
                 nonzero: bool = False) -> None:
    """``v`` must have the pytree structure and leaf shapes of ``like`` (dtypes may differ).

    Args:
        v: the vector to check (skipped when traced).
        like: template pytree (arrays or ``jax.ShapeDtypeStruct``).
        name: ``v``'s name, for the message.
        like_name: ``like``'s name, for the message.
        nonzero: also refuse an all-zero ``v`` (a start vector must have a direction).

    Raises:
        ValueError: a different structure (naming missing / unexpected leaves), the first leaf
            of a different shape (by path), a non-floating or non-finite leaf, or (with
            ``nonzero``) a zero vector.
    """
    v_def, l_def = jax.tree_util.tree_structure(v), jax.tree_util.tree_structure(like)
    if v_def != l_def:
        v_paths = {tu.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(v)[0]}
        l_paths = {tu.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(like)[0]}
        missing, extra = sorted(l_paths - v_paths), sorted(v_paths - l_paths)
        detail = ""
        if missing:
            detail += f" missing leaves {missing[:5]}"
        if extra:
            detail += f" unexpected leaves {extra[:5]}"
        if not detail:
            detail = f" ({v_def} vs {l_def})"
        raise ValueError(f"{name} does not match the pytree structure of {like_name}:{detail}")
    flat = jax.tree_util.tree_flatten_with_path(v)[0]
    for (path, a), b in zip(flat, jax.tree_util.tree_leaves(like)):
        if tuple(np.shape(a)) != tuple(np.shape(b)):
            raise ValueError(
                f"{name} leaf '{tu.path_str(path)}' has shape {tuple(np.shape(a))}, "
                f"{like_name} has {tuple(np.shape(b))}"
            )
        dtype = jnp.result_type(a)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{name} leaf '{tu.path_str(path)}' has dtype {dtype}: a vector "
                             "needs floating-point leaves")
    if is_traced(v):
        return
    for path, a in flat:
        if not np.all(np.isfinite(np.asarray(a, np.float64))):
            raise ValueError(f"{name} leaf '{tu.path_str(path)}' is not finite (NaN / Inf)")
    if nonzero and not any(np.any(np.asarray(a) != 0) for _, a in flat):
        raise ValueError(f"{name} is the zero vector: a start vector needs a direction (pass "
                         f"a nonzero {name}, or {name}=None for a random one)")


_CHECKED_OPERATORS: set = set()


def check_operator_output(op: LinearOperator, v: PyTree) -> None:
    """The matvec must return a pytree with the structure and shapes of ``op.params_like``.

    Checked by shape inference (no FLOPs) once per operator kind and operand shapes: the
    abstract trace of a model can take a good fraction of a second.

    Args:
        op: the operator.
        v: a vector like ``op.params_like`` (arrays or ``jax.ShapeDtypeStruct``).

    Raises:
        ValueError: naming the mismatch.
    """
    leaves, treedef = jax.tree_util.tree_flatten(op)
    try:
        sig = (treedef, tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves))
        hash(sig)
    except TypeError:  # unhashable aux data: check every time
        sig = None
    if sig is not None and sig in _CHECKED_OPERATORS:
        return
    _check_operator_output(op, v)
    if sig is not None:
        if len(_CHECKED_OPERATORS) > 256:
            _CHECKED_OPERATORS.clear()
        _CHECKED_OPERATORS.add(sig)


def _check_operator_output(op: LinearOperator, v: PyTree) -> None:
    like = op.params_like
    try:
        out = jax.eval_shape(lambda o, x: o.bind()(x), op, v)
    except Exception as exc:  # keep the cause
        raise ValueError(
            f"the {op.name} operator's matvec failed on a params-shaped vector: {exc}"
        ) from exc
    out_def, like_def = jax.tree_util.tree_structure(out), jax.tree_util.tree_structure(like)
    if out_def != like_def:
        raise ValueError(
            f"the {op.name} operator's matvec returned a pytree of structure {out_def}, "
            f"expected the structure of its params {like_def}"
        )
    for (path, o), s in zip(
        jax.tree_util.tree_flatten_with_path(out)[0], jax.tree_util.tree_leaves(like)
    ):
        if tuple(o.shape) != tuple(s.shape):
            raise ValueError(
                f"the {op.name} operator's matvec returned leaf '{tu.path_str(path)}' of shape "
                f"{tuple(o.shape)}, expected {tuple(s.shape)}"
            )
        if not jnp.issubdtype(o.dtype, jnp.floating):
            raise ValueError(
                f"the {op.name} operator's matvec returned leaf '{tu.path_str(path)}' of "
                f"non-floating dtype {o.dtype}"
            )


# -- the recurrence ------------------------------------------------------------------------


def lanczos_init(
    op: LinearOperator,
    v0: PyTree,
    capacity: int,
    reorth: str = "window",
    window: int | None = DEFAULT_WINDOW,
    *,
    key: jax.Array | None = None,
    rows: int | None = None,
) -> LanczosState:
    """The state before the first iteration: ``q_0 = v0 / ||v0||`` (jittable).

    Args:
        op: the operator (only its ``params_like`` is used).
        v0: start vector, a pytree like ``op.params_like``; a zero ``v0`` is replaced by a
            pseudo-random vector derived from ``key``.
        capacity: length of the ``alphas`` / ``betas`` buffers (max iterations).
        reorth: ``"full"``, ``"window"`` or ``"none"``.
        window: ring-buffer rows for ``"window"``.
        key: PRNG key for breakdown restarts (default ``jax.random.key(42)``, the one default seed).
        rows: stored basis rows for ``"full"`` (default ``capacity``).

    Returns:
        A :class:`LanczosState` with ``step = 0``: zero buffers of length ``capacity`` and a
        zero basis of ``rows`` (``"full"``), ``window`` (``"window"``) or no rows.

    Raises:
        ValueError: a bad ``reorth`` / ``window``, or a batch of keys.
        TypeError: ``key`` is not a PRNG key.
    """
    like = op.params_like
    nwin = check_reorth(reorth, window)
    nrows = {"full": capacity if rows is None else rows, "window": nwin, "none": 0}[reorth]
    key = check_key(key)
    sdt = scalar_dtype(like)
    q = unit_start(v0, key)
    zeros_m = jnp.zeros((capacity,), sdt)
    return LanczosState(
        alphas=zeros_m,
        betas=zeros_m,
        basis=zeros_work(like, nrows),
        q=q,
        q_prev=None if reorth == "window" else zeros_work(like),
        beta=jnp.zeros((), sdt),
        step=jnp.zeros((), jnp.int32),
        breakdowns=jnp.zeros((capacity,), bool),
        dropped=zeros_m,
        orthogonality=zeros_m,
        asymmetry=zeros_m,
        anorm=jnp.zeros((), sdt),
        key=key,
    )


def restart_vector(like: PyTree, key: jax.Array, j: jax.Array) -> PyTree:
    """A pseudo-random vector for a breakdown restart, drawn without a PRNG kernel.

    :func:`hash_vector` with the iteration mixed into the seed: integer multiply / xor /
    shift only (no PRNG kernel and no transcendental in the loop body: a ``sin``-based hash
    cost ~0.1 s of XLA:CPU compile per use), a different vector for every ``j``.

    Args:
        like: template pytree of arrays; the entries take its leaf shapes and dtypes.
        key: ``jax.random`` key.
        j: int scalar, the iteration (``-1`` for the fallback of a zero start vector).

    Returns:
        A pytree like ``like`` (not normalised), entries uniform on ``[-0.5, 0.5)``.
        Cost ``O(P)`` elementwise.
    """
    j = jnp.asarray(j).astype(jnp.uint32) + jnp.uint32(1)
    return _hashed_entries(like, _murmur_finalise(_key_seed(key) ^ (j * jnp.uint32(0x9E3779B1))))


def random_vector(key: jax.Array, like: PyTree, distribution: str = "normal") -> PyTree:
    """A random vector in the work dtype, drawn by :func:`gradience_jax.tree.random_like`.

    One flat draw in the promoted work dtype, each leaf then cast to its work dtype. Same
    key, same numbers as ``tree.random_like(key, like, distribution)``.

    Args:
        key: ``jax.random`` key.
        like: template pytree (arrays or ``jax.ShapeDtypeStruct``).
        distribution: ``"normal"`` or ``"rademacher"``.

    Returns:
        A pytree shaped like ``like``, leaves in their work dtypes. Cost: one PRNG draw of
        ``P`` numbers.

    Raises:
        ValueError: an unknown ``distribution``.
    """
    v = tu.random_like(key, like, distribution, dtype=scalar_dtype(like))
    return jax.tree_util.tree_map(lambda x, s: x.astype(work_dtype(s.dtype)), v, like)


def hash_vector(like: PyTree, key: jax.Array) -> PyTree:
    """A pseudo-random start vector made inside the program: a hash of the entry's index.

    Each entry hashes its index over the whole vector (leaves in flatten order, so a flat
    ``(P,)`` template gives the raveled pytree's entries) and the key's data with the
    murmur3 finaliser on ``uint32``: uniform on ``[-0.5, 0.5)`` at 24-bit resolution, exact
    in float32. No PRNG kernel to compile and no host array: the vector is born in the
    program's own buffers (a host-drawn ``v0`` held two more parameter-sized vectors).

    Args:
        like: template pytree (arrays or ``jax.ShapeDtypeStruct``); at most ``2**32`` entries.
        key: ``jax.random`` key (a single key).

    Returns:
        A pytree shaped like ``like``, leaves in their work dtypes. Cost ``O(P)`` elementwise.
    """
    return _hashed_entries(like, _key_seed(key))


def _key_seed(key: jax.Array) -> jax.Array:
    """FNV-1a of a ``jax.random`` key's data: a ``uint32`` scalar."""
    u32 = jnp.uint32
    data = jax.random.key_data(key).astype(u32).ravel()
    return functools.reduce(lambda acc, d: (acc ^ d) * u32(0x01000193), data, u32(0x811C9DC5))


def _murmur_finalise(h: jax.Array) -> jax.Array:
    """The murmur3 32-bit finaliser (an avalanche of every input bit)."""
    u32 = jnp.uint32
    h = (h ^ (h >> u32(16))) * u32(0x85EBCA6B)
    h = (h ^ (h >> u32(13))) * u32(0xC2B2AE35)
    return h ^ (h >> u32(16))


def _hashed_entries(like: PyTree, seed: jax.Array) -> PyTree:
    """Entries ``murmur3(global index * golden + seed)`` mapped to ``[-0.5, 0.5)``."""
    u32 = jnp.uint32
    leaves, treedef = jax.tree_util.tree_flatten(like)
    out, offset = [], 0
    for x in leaves:
        size = int(np.prod(x.shape))
        h = _murmur_finalise((jnp.arange(size, dtype=u32) + u32(offset)) * u32(0x9E3779B1) + seed)
        dt = work_dtype(x.dtype)
        unit = (h >> u32(8)).astype(dt) * jnp.asarray(2.0**-24, dt) - jnp.asarray(0.5, dt)
        out.append(unit.reshape(x.shape))
        offset += size
    return jax.tree_util.tree_unflatten(treedef, out)


#: columns per block of the in-place update of :func:`subtract_rows` (leaves of at least
#: 16 blocks: below that the blocked loop cost more time than the temporary's memory is worth,
#: 1M-parameter MLP window steps 1.2-1.35x slower with 64k-entry blocks)
SUBTRACT_BLOCK = 1 << 20


def subtract_rows(w: PyTree, basis: PyTree, h: jax.Array, q: PyTree | None = None,
                  c: jax.Array | None = None) -> PyTree:
    """``w - B h - c q``, leaf by leaf; leaves of ``16 SUBTRACT_BLOCK`` entries or more in place.

    A large leaf is updated in column blocks of ``SUBTRACT_BLOCK`` entries
    (``lax.fori_loop`` over in-place writes of ``w``), so ``B h`` never exists as a
    parameter-sized temporary: at GPT-2 size that vector is 0.6 GiB of the program's peak.

    Args:
        w: pytree vector.
        basis: stacked pytree, leaves ``(rows, *leaf.shape)``.
        h: ``(rows,)`` coefficients.
        q: pytree vector like ``w``, or ``None`` (no ``c q`` term).
        c: scalar coefficient of ``q`` (with ``q``).

    Returns:
        A pytree like ``w`` (its dtypes). Cost ``(rows + 2) x P``.
    """
    block = SUBTRACT_BLOCK

    def leaf(x, b, z=None):
        hb = h.astype(b.dtype)
        if x.size < 16 * block:
            x = x - jnp.tensordot(hb, b, axes=1).astype(x.dtype)
            return x if z is None else x - c.astype(x.dtype) * z
        xf, bf = x.reshape(-1), b.reshape(b.shape[0], -1)
        zf = None if z is None else z.reshape(-1)

        def update(xf, start, width):
            cols = jax.lax.dynamic_slice_in_dim(bf, start, width, 1)
            new = jax.lax.dynamic_slice_in_dim(xf, start, width) - (hb @ cols).astype(x.dtype)
            if zf is not None:
                new = new - c.astype(x.dtype) * jax.lax.dynamic_slice_in_dim(zf, start, width)
            return jax.lax.dynamic_update_slice_in_dim(xf, new, start, 0)

        n_blocks, tail = divmod(xf.shape[0], block)
        xf = jax.lax.fori_loop(0, n_blocks, lambda i, f: update(f, i * block, block), xf)
        if tail:
            xf = update(xf, n_blocks * block, tail)
        return xf.reshape(x.shape)

    if q is None:
        return jax.tree_util.tree_map(leaf, w, basis)
    return jax.tree_util.tree_map(leaf, w, basis, q)


def _orth_step(w: PyTree, basis: PyTree, q: PyTree | None, passes: int,
               mask: jax.Array | None = None) -> PyTree:
    """``passes`` times block CGS of ``w`` against the stored rows (and ``q``, if given).

    ``mask`` (``(rows,)`` bool) leaves out the rows it marks ``False``: in a ring buffer, the
    rows from before the last breakdown restart.
    """
    for _ in range(passes):
        h = basis_dot(basis, w)
        if mask is not None:
            h = jnp.where(mask, h, jnp.zeros_like(h))
        w = subtract_rows(w, basis, h, q, None if q is None else tu.vdot(q, w))
    return w


def make_step(mv: Callable, like: PyTree, reorth: str, passes: int, breakdown_tol: float):
    """One Lanczos iteration ``state -> state`` (a closure over the bound matvec).

    Live parameter-sized vectors: ``q``, ``q_prev``, ``A q`` / ``w`` and the stored rows.

    Args:
        mv: the bound matvec (``op.bind()``), applied to vectors in ``like``'s dtypes.
        like: the operator's ``params_like``.
        reorth: ``"full"``, ``"window"`` or ``"none"``.
        passes: block Gram-Schmidt passes per iteration (:func:`reorth_passes`).
        breakdown_tol: restart when ``beta_j <= breakdown_tol * ||T||``.

    Returns:
        ``step(state: LanczosState) -> LanczosState`` (jittable). Cost per call: one matvec
        plus ``2 x passes x rows x P`` for re-orthogonalisation.
    """

    def restart(args):
        basis, q, q_prev, key, _w, j, _beta = args
        r = restart_vector(q, key, j)
        if reorth == "none":  # nothing stored: orthogonalise against q_j, q_{j-1} (twice)
            for _ in range(2):
                r = tu.sub(r, tu.scale(tu.vdot(q, r), q))
                r = tu.sub(r, tu.scale(tu.vdot(q_prev, r), q_prev))
        else:  # the stored rows hold q_j (and older)
            r = _orth_step(r, basis, None, 2)
        return safe_normalize(r)[0]

    def proceed(args):
        w, beta = args[4], args[6]
        return tu.scale(1.0 / beta, w)

    def step(state: LanczosState) -> LanczosState:
        j = state.step
        q, q_prev = state.q, state.q_prev
        aq = to_work(mv(to_like(q, like)))
        alpha = tu.vdot(q, aq)
        if reorth == "window":  # row (j - 1) % window: zeros before the first step
            # read after the matvec (the index depends on ``alpha``, ``0 * alpha > 1`` is
            # false), so the row copy is not live through the matvec: one vector less at peak
            late = (jnp.zeros((), alpha.dtype) * alpha > 1).astype(j.dtype)
            q_prev = _get_row(state.basis, (j - 1 + late) % _basis_rows(state.basis))
        asym = jnp.abs(tu.vdot(q_prev, aq) - state.beta)
        if reorth == "none":
            # for a symmetric A, <q_(j-1), A q_j> = <A q_(j-1), q_j> = beta_(j-1) |q_j|^2
            # + alpha_(j-1) <q_(j-1), q_j> + beta_(j-2) <q_(j-2), q_j>: once the plain
            # recurrence lost orthogonality (orthogonality[j-1] is |<q_(j-2), q_j>|) these
            # terms are not asymmetry (in float32 they reach sqrt(eps) ||A||)
            jm1, jm2 = jnp.maximum(j - 1, 0), jnp.maximum(j - 2, 0)
            drift = (jnp.abs(state.alphas[jm1]) * jnp.abs(tu.vdot(q_prev, q))
                     + jnp.where(j >= 2, state.betas[jm2] * state.orthogonality[jm1], 0.0)
                     + state.beta * jnp.abs(tu.vdot(q, q) - 1.0))
            asym = jnp.maximum(asym - drift.astype(asym.dtype), jnp.zeros_like(asym))
        # ``beta_w`` equals ``state.beta`` for finite ``asym``; the dependence makes XLA reduce
        # ``<q_prev, A q>`` before ``w`` overwrites ``A q``, so ``A q`` is not held beside ``w``
        beta_w = state.beta + jnp.zeros((), asym.dtype) * asym
        w = jax.tree_util.tree_map(
            lambda x, a, b: x - alpha.astype(x.dtype) * a - beta_w.astype(x.dtype) * b,
            aq,
            q,
            q_prev,
        )
        basis, fresh = state.basis, None
        if reorth == "window":
            # rows written since the last breakdown restart: a restart vector need not be
            # orthogonal to invariant subspaces found before the ring forgot them, and
            # projecting the new recurrence on their rows would break its three-term relation
            # (wrong tridiagonal entries, spurious "converged" Ritz values)
            nrows = _basis_rows(basis)
            cap = state.breakdowns.shape[0]
            seg = jnp.max(jnp.where(state.breakdowns, jnp.arange(1, cap + 1, dtype=j.dtype), 0))
            row_step = (j - 1) - jnp.mod(j - 1 - jnp.arange(nrows, dtype=j.dtype), nrows)
            fresh = row_step >= seg
        if reorth != "none":
            w = _orth_step(w, basis, q, passes, fresh)
        beta = tu.norm(w)
        anorm = jnp.maximum(state.anorm, jnp.abs(alpha) + state.beta + beta)
        broke = beta <= breakdown_tol * anorm
        if reorth != "none":
            # q_j is stored before the branch (its last read, so the loop carry's q buffer
            # is not copied to keep q_j live through the matvec: one vector less at peak);
            # the write waits for this step's reads of the ring (``asym`` reads q_prev; a
            # finite ``0 * asym`` leaves q unchanged), so XLA updates the row in place
            # instead of copying the whole basis to keep the reads apart
            tie = jnp.zeros((), asym.dtype) * (asym + beta.astype(asym.dtype))
            basis = _set_row(basis, j if reorth == "full" else j % _basis_rows(basis),
                             jax.tree_util.tree_map(lambda x: x + tie.astype(x.dtype), q))
        q_next = jax.lax.cond(
            broke, restart, proceed, (basis, q, q_prev, state.key, w, j, beta)
        )
        if reorth == "none":
            ortho = jnp.abs(tu.vdot(q_prev, q_next))
        else:  # row 0 (full) or the oldest row (window, zero if from before a restart)
            oldest = 0 if reorth == "full" else (j + 1) % _basis_rows(basis)
            ortho = jnp.abs(tu.vdot(_get_row(basis, oldest), q_next))
            if reorth == "window":
                ortho = jnp.where(j + 1 - _basis_rows(basis) >= seg, ortho,
                                  jnp.zeros_like(ortho))
        dropped = jnp.where(broke, beta, jnp.zeros_like(beta))
        beta = jnp.where(broke, jnp.zeros_like(beta), beta)
        return state._replace(
            alphas=state.alphas.at[j].set(alpha.astype(state.alphas.dtype)),
            betas=state.betas.at[j].set(beta.astype(state.betas.dtype)),
            basis=basis,
            q=q_next,
            q_prev=None if reorth == "window" else q,
            beta=beta.astype(state.beta.dtype),
            step=j + 1,
            breakdowns=state.breakdowns.at[j].set(broke),
            dropped=state.dropped.at[j].set(dropped.astype(state.dropped.dtype)),
            orthogonality=state.orthogonality.at[j].set(ortho.astype(state.orthogonality.dtype)),
            asymmetry=state.asymmetry.at[j].set(asym.astype(state.asymmetry.dtype)),
            anorm=anorm.astype(state.anorm.dtype),
        )

    return step


def reorth_passes(reorth: str) -> int:
    """Block Gram-Schmidt passes per iteration for a re-orthogonalisation mode.

    Args:
        reorth: ``"full"``, ``"window"`` or ``"none"``.

    Returns:
        2 for ``"full"`` ("twice is enough"), 1 for ``"window"``, 0 for ``"none"``.

    Raises:
        KeyError: an unknown ``reorth`` (validate it with :func:`check_reorth` first).
    """
    return {"full": 2, "window": 1, "none": 0}[reorth]


def default_breakdown_tol(like: PyTree) -> float:
    """Relative threshold on ``beta_j / ||T||`` below which the recurrence restarts.

    Args:
        like: template pytree (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
        ``BREAKDOWN_EPS_FACTOR`` times the machine epsilon of :func:`scalar_dtype`.
    """
    return float(BREAKDOWN_EPS_FACTOR * jnp.finfo(scalar_dtype(like)).eps)


def lanczos_run(
    op: LinearOperator,
    state: LanczosState,
    num_steps: int,
    reorth: str,
    *,
    ritz_coeffs: jax.Array | None = None,
    ritz_acc: PyTree | None = None,
    breakdown_tol: float | None = None,
) -> LanczosState | tuple[LanczosState, PyTree]:
    """Run ``num_steps`` more iterations from ``state`` in one ``lax.scan`` (jittable).

    ``op.bind()`` is called once, so a linearising operator pays its one-off work once.

    With ``ritz_coeffs`` (shape ``(capacity, k)``) the pass also accumulates
    ``ritz_acc += sum_j ritz_coeffs[j] q_j`` (a pytree stack of ``k`` vectors): the second
    pass that regenerates the Lanczos vectors to form Ritz vectors without storing them.

    Args:
        op: the symmetric :class:`LinearOperator` the state was initialised for.
        state: a :class:`LanczosState` (from :func:`lanczos_init` or an earlier run).
        num_steps: iterations to run (static; the buffers hold ``capacity`` steps in all).
        reorth: the mode the state was initialised with.
        ritz_coeffs: ``(capacity, k)`` Ritz coefficients of a first pass, or ``None``.
        ritz_acc: pytree stack, leaves ``(k, *leaf.shape)``, the accumulator (with
            ``ritz_coeffs``).
        breakdown_tol: relative breakdown threshold (default
            :func:`default_breakdown_tol`).

    Cost: ``num_steps`` matvecs plus the re-orthogonalisation of :func:`make_step`
    (``+ k x P`` per step with ``ritz_coeffs``).

    Returns:
        The new state, or ``(state, ritz_acc)`` when ``ritz_coeffs`` is given.
    """
    like = op.params_like
    tol = default_breakdown_tol(like) if breakdown_tol is None else breakdown_tol
    step = make_step(op.bind(), like, reorth, reorth_passes(reorth), tol)
    if ritz_coeffs is None:
        def body(s, _):
            return step(s), None

        return jax.lax.scan(body, state, None, length=num_steps)[0]

    def body_acc(carry, _):
        s, acc = carry
        c = ritz_coeffs[s.step]
        acc = jax.tree_util.tree_map(
            lambda a, x: a + c.astype(a.dtype).reshape((-1,) + (1,) * x.ndim) * x[None], acc, s.q
        )
        return (step(s), acc), None

    return jax.lax.scan(body_acc, (state, ritz_acc), None, length=num_steps)[0]


@functools.partial(jax.jit, static_argnames=("num_iters", "reorth", "window", "breakdown_tol"))
def _lanczos_jit(op, v0, key, num_iters, reorth, window, breakdown_tol):
    state = lanczos_init(op, v0, num_iters, reorth, window, key=key)
    return lanczos_run(op, state, num_iters, reorth, breakdown_tol=breakdown_tol)


def lanczos(
    op: LinearOperator,
    v0: PyTree,
    num_iters: int,
    reorth: str = "window",
    window: int | None = DEFAULT_WINDOW,
    *,
    key: jax.Array | None = None,
    breakdown_tol: float | None = None,
) -> LanczosState:
    """``num_iters`` Lanczos iterations on ``op`` from ``v0``: the jittable core.

    Cost: ``num_iters`` matvecs plus, per iteration, ``2 x 2 x rows x P`` (``"full"``:
    ``rows = num_iters``, twice), ``2 x window x P`` (``"window"``, once) or ``O(P)``
    (``"none"``) for re-orthogonalisation. Memory: ``rows x P`` in the work dtype.

    Args:
        op: a symmetric :class:`LinearOperator`.
        v0: start vector (pytree like ``op.params_like``); normalised internally.
        num_iters: number of iterations ``m`` (static).
        reorth: ``"full"`` (against all stored vectors, twice), ``"window"`` (against a
            ring buffer of the last ``window`` vectors) or ``"none"`` (three-term recurrence).
        window: ring-buffer size for ``"window"`` (>= 2).
        key: PRNG key for breakdown restart vectors.
        breakdown_tol: restart when ``beta_j <= breakdown_tol * ||T||`` (default
            ``100 eps`` of the work dtype).

    Returns:
        A :class:`LanczosState`; ``T = tridiag(betas[:-1], alphas, betas[:-1])``.

    Raises:
        TypeError: ``op`` is not a :class:`LinearOperator` (an ``ArgumentTypeError``), a
            non-integer ``num_iters`` / ``window``, or ``key`` is not a PRNG key.
        ValueError: bad ``num_iters`` / ``reorth`` / ``window``, a ``v0`` that does not match
            the params (structure, shapes) or is not finite, a matvec whose output pytree
            does not match the params, ``reorth="full"`` with ``num_iters > n_params``.

    References:
        C. Lanczos (1950); C. C. Paige (1976) on loss of orthogonality; Giraud, Langou &
        Rozloznik (2005) for the two classical Gram-Schmidt passes of ``"full"``.

    Example:
        >>> import jax.numpy as jnp, gradience_jax as gj
        >>> op = gj.from_dense(jnp.diag(jnp.arange(1.0, 6.0)))
        >>> st = lanczos(op, jnp.ones(5), 5, reorth="full")
        >>> t = (jnp.diag(st.alphas) + jnp.diag(st.betas[:-1], 1)
        ...      + jnp.diag(st.betas[:-1], -1))
        >>> round(float(jnp.max(jnp.linalg.eigvalsh(t))), 4)
        5.0
    """
    check_operator(op)
    num_iters = check_int(num_iters, "num_iters", lo=1)
    check_reorth(reorth, window)
    if reorth == "full" and num_iters > op.n_params:
        raise ValueError(
            f"num_iters={num_iters} exceeds n_params={op.n_params}: a full-reorthogonalised "
            "basis cannot hold more vectors than the dimension"
        )
    if not is_traced(v0):
        check_vector(v0, op.params_like, "v0", f"the {op.name} operator's params")
        check_operator_output(op, op.params_like)
    key = check_key(key)
    win = window if reorth == "window" else None
    if win is None and reorth == "window":
        win = DEFAULT_WINDOW
    return _lanczos_jit(op, v0, key, int(num_iters), reorth, win, breakdown_tol)


# old private names (kept for code written against them)
_to_work = to_work
_to_like = to_like
_zeros_work = zeros_work
_scalar_dtype = scalar_dtype
_safe_normalize = safe_normalize
_make_step = make_step
_passes = reorth_passes
