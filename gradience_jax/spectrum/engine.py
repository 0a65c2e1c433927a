"""The Krylov engine: restarted Lanczos on device, one compiled program per configuration.

``reorth="full"`` runs thick-restart Lanczos (Wu & Simon 2000) on a fixed basis of ``m + 1``
rows: a cycle expands the basis from the ``l`` kept Ritz vectors to ``m`` rows (classical
Gram-Schmidt against the stored rows with the DGKS second pass only when the first one
cancelled, Daniel, Gragg, Kaufman & Stewart 1976), the ``(m, m)`` projected matrix
(arrowhead of kept Ritz values + tridiagonal tail) is solved in float64
(:func:`~gradience_jax.spectrum.ritz.cycle_analysis`), the basis is rotated to the Ritz vectors
ordered by how wanted they are, and the next cycle keeps the best ``l`` of them. Converged
wanted pairs are always among the kept (locked) ones and ``l`` grows with their number, as
ARPACK's ``nev + min(nconv, np / 2)`` rule; so the cycle loop (``lax.while_loop``) decides
convergence without leaving the program.

``reorth="window"`` / ``"none"`` run the plain recurrence of :mod:`gradience_jax.lanczos`
(a ring buffer of ``window`` rows, or nothing stored) without restarts; every
``check_every`` steps a host callback analyses the tridiagonal ``T`` in float64 with the
Cullum-Willoughby ghost filter and the loop stops once the wanted values meet ``tol``.
Eigenvectors come from a second pass that regenerates the Lanczos vectors.

Both paths stop early, with a status instead of a number, on non-finite products and on an
operator whose measured asymmetry ``|<q_(j-1), A q_j> - beta_(j-1)|`` exceeds
``sqrt(eps) ||A||``. ``tol`` and the matvec cap are traced arguments: changing them does
not recompile.

Memory (parameter-sized vectors, work dtype unless ``basis_dtype``): ``"full"``: ``m + 1``
stored rows + ~4 (the rotation at a restart is done leaf by leaf); ``"window"``:
``window`` rows + ~4; ``"none"``: ~4; plus ``k`` for eigenvectors.

Supported names: none for users (the module has no ``__all__``; call
:func:`~gradience_jax.spectrum.eigsh` or :func:`~gradience_jax.spectrum.eigsh_fast`). The
other spectrum modules, the tests and the benchmarks use ``Plan``, ``EngineOut``,
``run_engine``, ``run_engine_traced``, ``rotate_rows``, ``keep_count``, ``small_dtype``,
the status codes (``RUNNING``, ``CONVERGED``, ``BUDGET``, ``NONFINITE``, ``ASYMMETRIC``,
``STATUS_NAMES``) and the constants ``DGKS_ETA``, ``ROTATE_BLOCK``, ``CHECK_EVERY``,
``LEAN_SCHEDULE_OPTIONS``, ``FAST_COMPILE_OPTIONS``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax import tree as tu
from gradience_jax.lanczos import (
    LanczosState,
    hash_vector,
    lanczos_init,
    make_step,
    reorth_passes,
    restart_vector,
    scalar_dtype,
    to_like,
    to_work,
    unit_start,
    zeros_work,
)
from gradience_jax.spectrum.ritz import (
    CycleAnalysis,
    converged_mask,
    cycle_analysis,
    cycle_analysis_host,
    ritz_values,
    select,
)

PyTree = Any

RUNNING, CONVERGED, BUDGET, NONFINITE, ASYMMETRIC = 0, 1, 2, 3, 4
STATUS_NAMES = ("running", "converged", "budget", "non-finite", "asymmetric")
#: DGKS criterion: a second Gram-Schmidt pass when the first kept less than this fraction
DGKS_ETA = 0.7071067811865476


class Plan(NamedTuple):
    """Static configuration of one engine program (hashable: a ``jit`` static argument).

    Attributes:
        k: wanted eigenpairs; which: ``"LA" | "SA" | "BE" | "LM"``.
        reorth: ``"full"`` (thick restart), ``"window"`` or ``"none"`` (plain recurrence).
        basis_size: ``m``, rows of a thick-restart cycle (``"full"``).
        window: ring-buffer rows (``"window"``).
        capacity: length of the ``alphas`` / ``betas`` buffers (``"window"`` / ``"none"``).
        check_every: steps between convergence checks (``"window"`` / ``"none"``).
        n: dimension of the operator.
        fixed: run exactly the matvec cap (no convergence stop).
        filter_ghosts: Cullum-Willoughby filtering (``"window"`` / ``"none"``).
        vectors: form the Ritz vectors; true_residuals: ``||A y - theta y||`` (k matvecs).
        solver: ``"device"`` (x64 on) or ``"host"`` (pure_callback) small eigensolver.
        basis_dtype: storage dtype name of the basis rows (``None``: work dtype).
        breakdown_tol: relative ``beta / ||A||`` threshold of a breakdown.
        asym_tol: relative asymmetry that stops the run.
        eps_work: machine epsilon of the Lanczos arithmetic.
        conv_floor: smallest certifiable residual relative to ``||A||``
            (:func:`~gradience_jax.spectrum.plan.convergence_floor`: ``10 eps_work``, or the
            operator's epsilon for bfloat16 / float16 operators); 0: ``10 eps_work``.
        flat: Krylov vectors as one contiguous ``(P,)`` array inside the program (single
            device: one kernel per operation instead of one per leaf, 3x faster to compile);
            ``False`` keeps them as pytrees shaped like the params (sharded meshes).
        lean_schedule: compile with XLA:CPU's memory-optimised schedule
            (``LEAN_SCHEDULE_OPTIONS``; :func:`~gradience_jax.spectrum.plan.lean_schedule`).
        cpu_program: the program compiles for XLA:CPU (``FAST_COMPILE_OPTIONS``).
    """

    k: int
    which: str
    reorth: str
    basis_size: int
    window: int | None
    capacity: int
    check_every: int
    n: int
    fixed: bool
    filter_ghosts: bool
    vectors: bool
    true_residuals: bool
    solver: str
    basis_dtype: str | None
    breakdown_tol: float
    asym_tol: float
    eps_work: float
    flat: bool = False
    conv_floor: float = 0.0
    lean_schedule: bool = False
    cpu_program: bool = False

    @property
    def floor(self) -> float:
        """The relative convergence floor (``conv_floor``, or ``10 eps_work`` when unset)."""
        return self.conv_floor or 10.0 * self.eps_work


class EngineOut(NamedTuple):
    """What one engine program returns (device arrays).

    Attributes:
        values: ``(k,)`` wanted Ritz values, most wanted first (``BE``: see ``which_scores``).
        bounds: ``(k,)`` residual bounds; conv: ``(k,)`` bool.
        n_valid: number of (non-spurious) Ritz values available.
        matvecs: Lanczos matvecs (first pass); restarts: thick restarts done.
        breakdowns: invariant subspaces found (excluding the natural end at ``n``).
        anorm: estimate of ``||A||``; asym: max measured asymmetry (absolute).
        orth: measured loss of orthogonality; status: see ``STATUS_NAMES``.
        vectors: ``None`` or a pytree stack of ``k`` unit Ritz vectors (work dtype).
        true_res: ``None`` or ``(k,)``.
        gram: ``None`` or ``(k, k)`` Gram matrix of the Ritz vectors.
        second_pass_dev: relative deviation of the second pass's ``alphas`` (plain runs).
        tdiag, toff: diagonal / sub-diagonal of the last projected ``T``.
        alphas, betas, dropped, breakdown_flags: the plain run's buffers (empty for full).
    """

    values: jax.Array
    bounds: jax.Array
    conv: jax.Array
    n_valid: jax.Array
    matvecs: jax.Array
    restarts: jax.Array
    breakdowns: jax.Array
    anorm: jax.Array
    asym: jax.Array
    orth: jax.Array
    status: jax.Array
    vectors: PyTree
    true_res: jax.Array | None
    gram: jax.Array | None
    second_pass_dev: jax.Array
    tdiag: jax.Array
    toff: jax.Array
    alphas: jax.Array
    betas: jax.Array
    dropped: jax.Array
    breakdown_flags: jax.Array


def small_dtype() -> jnp.dtype:
    """Dtype of the projected matrix: float64 when ``jax_enable_x64`` is on, else float32.

    With float32 the eigenproblem itself is still solved in float64, on the host.

    Returns:
        ``float64`` or ``float32``.
    """
    return jnp.dtype(jnp.float64) if jax.config.jax_enable_x64 else jnp.dtype(jnp.float32)


# ============================================================================================
# pytree row helpers
# ============================================================================================


def _row(basis: PyTree, i: jax.Array, like: PyTree) -> PyTree:
    """Row ``i`` of a stacked basis in the work dtype."""
    return jax.tree_util.tree_map(
        lambda b, s: jax.lax.dynamic_index_in_dim(b, i, 0, keepdims=False).astype(s.dtype),
        basis, like,
    )


def _set_row(basis: PyTree, i: jax.Array, v: PyTree) -> PyTree:
    return jax.tree_util.tree_map(
        lambda b, x: jax.lax.dynamic_update_index_in_dim(b, x.astype(b.dtype), i, 0), basis, v
    )


def _rows_dot(basis: PyTree, w: PyTree) -> jax.Array:
    """``B^T w`` with the rows upcast to ``w``'s dtype (bfloat16 storage, float32 math)."""
    parts = [jnp.tensordot(b.astype(x.dtype), x, axes=x.ndim)
             for b, x in zip(jax.tree_util.tree_leaves(basis), jax.tree_util.tree_leaves(w))]
    acc = tu.promote_dtypes(*[x.dtype for x in parts])
    return sum((x.astype(acc) for x in parts[1:]), parts[0].astype(acc))


def _masked_dot(basis: PyTree, w: PyTree, mask: jax.Array, dtype) -> jax.Array:
    return jnp.where(mask, _rows_dot(basis, w).astype(dtype), jnp.zeros((), dtype))


def _subtract(w: PyTree, basis: PyTree, h: jax.Array) -> PyTree:
    """``w - B h`` with the rows upcast to ``w``'s dtype."""
    return jax.tree_util.tree_map(
        lambda x, b: x - jnp.tensordot(h.astype(x.dtype), b.astype(x.dtype), axes=1), w, basis
    )


def _unit_stack(vecs: PyTree) -> PyTree:
    sq = sum(
        jnp.sum(jnp.reshape(x.astype(tu.accumulation_dtype(x.dtype)) ** 2, (x.shape[0], -1)), 1)
        for x in jax.tree_util.tree_leaves(vecs)
    )
    inv = 1.0 / jnp.maximum(jnp.sqrt(sq), jnp.finfo(sq.dtype).tiny)
    return jax.tree_util.tree_map(
        lambda x: x * inv.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1)), vecs
    )


def _op_rounder(op) -> Callable:
    """``y -> y`` rounded to the operator's leaf dtypes, returned in the work dtype."""
    if isinstance(op, _FlatOperator):
        return op.to_op_dtype
    return lambda y: to_work(to_like(y, op.params_like))


def _true_residuals(mv: Callable, like: PyTree, vecs: PyTree, values: jax.Array,
                    rounder: Callable) -> jax.Array:
    """``||A y_i - theta_i y_i||`` for a stack of vectors (``lax.map``: one at a time).

    ``y_i`` is taken in the operator's dtype (``rounder``: the vector ``eigsh`` returns, for
    a bfloat16 operator the bfloat16 rounding of the Ritz vector), ``A y_i`` is the
    operator's own product, and the difference is formed in the work dtype.
    """
    sdt = scalar_dtype(like)

    def one(args):
        y, lam = args
        y_op = rounder(y)
        ay = to_work(mv(to_like(y_op, like)))
        return tu.norm(tu.sub(ay, tu.scale(lam.astype(sdt), y_op)))

    return jax.lax.map(one, (vecs, values))


# ============================================================================================
# thick-restart Lanczos ("full")
# ============================================================================================


class _Cycle(NamedTuple):
    basis: PyTree  # leaves (m + 1, *shape): rows 0..j filled, row j the current vector
    tmat: jax.Array  # (m + 1, m + 1) projected matrix of this cycle
    j: jax.Array  # int32: index of the current vector (rows filled = j after a step)
    kept: jax.Array  # int32: kept Ritz vectors (``l``) at the start of this cycle
    matvecs: jax.Array
    restarts: jax.Array
    breakdowns: jax.Array
    anorm: jax.Array
    asym: jax.Array
    status: jax.Array
    values: jax.Array  # (k,) of the last analysis
    bounds: jax.Array
    conv: jax.Array
    n_valid: jax.Array
    exhausted: jax.Array  # the last cycle's rows spanned the whole space
    key: jax.Array


def keep_count(plan: Plan) -> int:
    """Ritz vectors kept at a thick restart (static): the ``k`` wanted plus a third of the rest.

    The ``k`` wanted plus about a third of the free rows, leaving at least two new rows per
    cycle. Converged wanted pairs are among them by construction (they are the best-scored),
    so they stay locked in the basis.

    Measured on the clustered MLP Hessian (k=10, m=30): 1/3 .. 1/2 of the free rows need the
    fewest matvecs (105, about ARPACK's); keeping more restarts more often for the same
    matvecs.

    Args:
        plan: the engine plan (``basis_size`` ``m`` and ``k``).

    Returns:
        ``min(max(k + (m - k) // 3, k), max(m - 2, k))``.
    """
    m, k = plan.basis_size, plan.k
    return int(min(max(k + (m - k) // 3, k), max(m - 2, k)))


def _gram_schmidt(w: PyTree, basis: PyTree, upto: jax.Array, sdt, fresh: Callable,
                  breakdown: Callable) -> tuple[PyTree, jax.Array, jax.Array, jax.Array]:
    """Classical Gram-Schmidt of ``w`` against the rows ``upto``, one pass at a time.

    The passes run in a ``while_loop`` (one copy of the code in the program): a second pass
    when the first kept less than ``DGKS_ETA`` of the norm (DGKS 1976). If the result is a
    breakdown (``breakdown(norm)``), ``w`` is replaced once by ``fresh()`` and
    orthogonalised twice.

    The basis travels through the loop's carry and comes back: the caller writes its next row
    into the returned buffer, so XLA needs no copy of the basis to keep the loop's reads and
    the row update apart.

    Returns:
        ``(w, h, h_first, broke, basis)``: the orthogonalised vector, the coefficients removed
        from the original ``w`` (for ``alpha``), those of the first pass, the breakdown flag
        and the basis (unchanged).
    """
    rows = upto.shape[0]

    class S(NamedTuple):
        basis: PyTree
        w: PyTree
        h: jax.Array
        h_first: jax.Array
        passes: jax.Array
        phase: jax.Array  # 0: the step's vector, 1: a fresh vector after a breakdown
        nrm_ref: jax.Array
        done: jax.Array

    def body(st: S) -> S:
        h = _masked_dot(st.basis, st.w, upto, sdt)
        w = _subtract(st.w, st.basis, h)
        nrm = tu.norm(w)
        passes = st.passes + 1
        first = (st.passes == 0) & (st.phase == 0)
        h_first = jnp.where(first, h, st.h_first)
        h_acc = jnp.where(st.phase == 0, st.h + h, st.h)
        settled = jnp.where(st.phase == 0, (nrm >= DGKS_ETA * st.nrm_ref) | (passes >= 2),
                            passes >= 2)
        broke = (st.phase == 0) & settled & breakdown(nrm)

        def swap(_):
            r = fresh()
            return r, tu.norm(r)

        w, nrm_ref = jax.lax.cond(broke, swap, lambda _: (w, st.nrm_ref), None)
        return S(st.basis, w, h_acc, h_first, jnp.where(broke, 0, passes),
                 jnp.where(broke, 1, st.phase), nrm_ref, settled & ~broke)

    zeros = jnp.zeros((rows,), sdt)
    st = S(basis, w, zeros, zeros, jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
           tu.norm(w), jnp.zeros((), bool))
    st = jax.lax.while_loop(lambda st: ~st.done, body, st)
    return st.w, st.h, st.h_first, st.phase == 1, st.basis


#: most columns rotated per block at a restart
ROTATE_BLOCK = 1 << 16


def rotate_rows(b: jax.Array, coeff: jax.Array, keep: int,
                residual: jax.Array | int | None = None) -> jax.Array:
    """``b[:keep] <- coeff^T b`` and ``b[keep] <- b[residual]`` for a stacked basis, in place.

    ``b`` has ``m + 1`` rows. The columns are rotated in blocks (``lax.fori_loop``) of at
    most ``size / (4 (m + 1))`` columns, so the temporaries (the block and its rotation)
    stay below half a parameter-sized vector instead of ``keep`` rows.

    Args:
        b: ``(m + 1, *shape)`` basis leaf.
        coeff: ``(m + 1, keep)`` rotation (zero in the residual's row).
        keep: static number of rows to rotate.
        residual: row of the residual vector (default ``m``; fewer when a cycle stopped
            early).

    Returns:
        The rotated leaf, shape and dtype of ``b``. Cost ``2 (m + 1) keep x size`` flops.
    """
    rows = b.shape[0]
    shape = b.shape
    flat = b.reshape(rows, -1)
    size = flat.shape[1]
    work = tu.promote_dtypes(b.dtype, jnp.float32)
    ct = coeff.T.astype(work)

    def rotate(flat, start, width):
        cols = jax.lax.dynamic_slice_in_dim(flat, start, width, 1).astype(work)
        return jax.lax.dynamic_update_slice(flat, (ct @ cols).astype(b.dtype), (0, start))

    width = max(min(ROTATE_BLOCK, size // (4 * rows)), min(512, size), 1)
    n_blocks, tail = divmod(size, width)
    flat = jax.lax.fori_loop(0, n_blocks, lambda i, f: rotate(f, i * width, width), flat)
    if tail:
        flat = rotate(flat, n_blocks * width, tail)
    src = rows - 1 if residual is None else residual
    row = jax.lax.dynamic_slice_in_dim(flat, src, 1, 0)
    flat = jax.lax.dynamic_update_slice_in_dim(flat, row, keep, 0)
    return flat.reshape(shape)


def _expand(c: _Cycle, mv: Callable, like: PyTree, plan: Plan) -> _Cycle:
    """One Lanczos step: ``A v_j``, Gram-Schmidt against rows ``<= j``, row ``j + 1``."""
    m = plan.basis_size
    tdt = c.tmat.dtype
    sdt = scalar_dtype(like)
    j = c.j
    rows = jnp.arange(m + 1, dtype=jnp.result_type(j))
    v = _row(c.basis, j, like)
    aq = to_work(mv(to_like(v, like)))
    alpha0 = tu.vdot(v, aq)
    local = (j > c.kept) & (j > 0)  # tridiagonal coupling to row j - 1 (not the arrowhead row)
    jm1 = jnp.maximum(j - 1, 0)
    b_prev = jnp.where(local, c.tmat[j, jm1], jnp.zeros((), tdt)).astype(sdt)
    v_prev = _row(c.basis, jm1, like)
    w = jax.tree_util.tree_map(
        lambda x, a, b: x - alpha0.astype(x.dtype) * a - b_prev.astype(x.dtype) * b, aq, v, v_prev
    )
    anorm0 = jnp.maximum(c.anorm, (jnp.abs(alpha0) + jnp.abs(b_prev)).astype(c.anorm.dtype))
    w, h, h1, broke, basis = _gram_schmidt(
        w, c.basis, rows <= j, sdt,
        fresh=lambda: restart_vector(v, c.key, j),
        breakdown=lambda nrm: (nrm <= plan.breakdown_tol * anorm0) & (j + 1 < plan.n),
    )
    # what h1 should be for a symmetric A: the arrowhead couplings right after a restart
    # (sigma_i = <y_i, A v_l>), zeros otherwise; the excess is the measured asymmetry
    expected = jnp.where((j == c.kept) & (rows < j), c.tmat[j], jnp.zeros((), tdt)).astype(sdt)
    asym = jnp.max(jnp.where(rows < j, jnp.abs(h1 - expected), jnp.zeros((), sdt)))
    alpha = alpha0 + h[j]
    beta = tu.norm(w)
    q_next = tu.scale(1.0 / jnp.maximum(beta, jnp.finfo(sdt).tiny), w)
    beta = jnp.where(broke, jnp.zeros_like(beta), beta)
    row_sum = jnp.sum(jnp.where(rows < j, jnp.abs(c.tmat[j]), jnp.zeros((), tdt)))
    bound = tu.promote_dtypes(row_sum, alpha, beta)
    row_bound = row_sum.astype(bound) + jnp.abs(alpha).astype(bound) + beta.astype(bound)
    anorm = jnp.maximum(c.anorm, row_bound.astype(c.anorm.dtype))
    tmat = c.tmat.at[j, j].set(alpha.astype(tdt))
    tmat = tmat.at[j + 1, j].set(beta.astype(tdt)).at[j, j + 1].set(beta.astype(tdt))
    finite = jnp.isfinite(alpha) & jnp.isfinite(beta) & jnp.isfinite(asym)
    status = jnp.where(
        ~finite, NONFINITE,
        jnp.where(asym > plan.asym_tol * anorm, ASYMMETRIC, c.status),
    ).astype(jnp.int32)
    return c._replace(
        basis=_set_row(basis, j + 1, q_next), tmat=tmat, j=j + 1, matvecs=c.matvecs + 1,
        breakdowns=c.breakdowns + broke.astype(jnp.int32), anorm=anorm,
        asym=jnp.maximum(c.asym, asym.astype(c.asym.dtype)), status=status,
    )


def _analysis(c: _Cycle, plan: Plan, tol: jax.Array) -> CycleAnalysis:
    """Ritz analysis of the rows filled so far and the next cycle's set-up.

    Float64 on the host (one ``pure_callback``) unless x64 is on; see
    :func:`~gradience_jax.spectrum.ritz.cycle_analysis`.
    """
    tdt = c.tmat.dtype
    kw = dict(k=plan.k, keep=keep_count(plan), which=plan.which, floor=plan.floor)
    anorm, tol = c.anorm.astype(tdt), jnp.asarray(tol, tdt)
    if plan.solver == "host":
        return cycle_analysis_host(c.tmat, c.j, anorm, tol, **kw)
    return cycle_analysis(c.tmat, c.j, anorm, tol, **kw)


#: steps between convergence checks inside a cycle (a check is one small eigensolve)
CHECK_EVERY = 4


def _converged_now(c: _Cycle, plan: Plan, tol: jax.Array) -> jax.Array:
    """Mid-cycle check: all ``k`` wanted Ritz values of the rows filled so far converged."""
    r = _analysis(c, plan, tol)
    return jnp.all(r.conv) & (r.n_valid >= plan.k)


def _analyse_and_rotate(c: _Cycle, plan: Plan, tol: jax.Array, max_matvecs: jax.Array,
                        like: PyTree) -> _Cycle:
    """Solve the projected problem, decide convergence, rotate the basis, set up the arrowhead.

    The kept rows are rotated to the Ritz vectors (most wanted first) and the next cycle's
    arrowhead is set up from them.
    """
    keep = keep_count(plan)
    filled = c.j
    r = _analysis(c, plan, tol)
    running = c.status == RUNNING
    done = jnp.all(r.conv) & (r.n_valid >= plan.k) & (not plan.fixed)
    status = jnp.where(
        running & done, CONVERGED,
        jnp.where(running & (c.matvecs >= max_matvecs), BUDGET, c.status),
    ).astype(jnp.int32)
    # rows 0..keep-1 <- the best Ritz vectors, row keep <- the residual row (in place);
    # the rotation vanishes on the rows >= filled (the padding is decoupled), so the
    # residual row is not mixed in
    basis = jax.tree_util.tree_map(lambda b: rotate_rows(b, r.coeff, keep, filled), c.basis)
    return c._replace(
        basis=basis, tmat=r.tmat, j=jnp.asarray(keep, jnp.int32),
        kept=jnp.asarray(keep, jnp.int32),
        status=status, restarts=c.restarts + (status == RUNNING).astype(jnp.int32),
        values=r.values, bounds=r.bounds, conv=r.conv, n_valid=r.n_valid,
        exhausted=filled >= plan.n,
    )


def _thick_restart(op, v0, key, tol, max_matvecs, plan: Plan) -> EngineOut:
    like = op.params_like
    mv = op.bind()
    m, k = plan.basis_size, plan.k
    sdt = scalar_dtype(like)
    tdt = small_dtype()
    bdt = None if plan.basis_dtype is None else jnp.dtype(plan.basis_dtype)
    basis = jax.tree_util.tree_map(
        lambda s: jnp.zeros((m + 1,) + tuple(s.shape), bdt or tu.accumulation_dtype(s.dtype)),
        like,
    )
    basis = _set_row(basis, jnp.asarray(0), unit_start(v0, key))
    zeros_k = jnp.zeros((k,), tdt)
    c = _Cycle(
        basis=basis, tmat=jnp.zeros((m + 1, m + 1), tdt), j=jnp.zeros((), jnp.int32),
        kept=jnp.zeros((), jnp.int32), matvecs=jnp.zeros((), jnp.int32),
        restarts=jnp.zeros((), jnp.int32), breakdowns=jnp.zeros((), jnp.int32),
        anorm=jnp.zeros((), sdt), asym=jnp.zeros((), sdt),
        status=jnp.asarray(RUNNING, jnp.int32), values=zeros_k, bounds=zeros_k,
        conv=jnp.zeros((k,), bool), n_valid=jnp.zeros((), jnp.int32),
        exhausted=jnp.zeros((), bool), key=key,
    )
    max_matvecs = jnp.asarray(max_matvecs, jnp.int32)

    def step(carry):
        c, _ = carry
        c = _expand(c, mv, like, plan)
        if plan.fixed:
            return c, jnp.zeros((), bool)
        check = ((c.j - c.kept) % CHECK_EVERY == 0) & (c.j >= k) & (c.status == RUNNING)
        done = jax.lax.cond(check, lambda c: _converged_now(c, plan, tol),
                            lambda c: jnp.zeros((), bool), c)
        return c, done

    def cycle(c):
        end = jnp.minimum(m, c.j + (max_matvecs - c.matvecs))
        c, _ = jax.lax.while_loop(
            lambda cd: (cd[0].j < end) & (cd[0].status == RUNNING) & ~cd[1],
            step, (c, jnp.zeros((), bool)),
        )
        return _analyse_and_rotate(c, plan, tol, max_matvecs, like)

    c = jax.lax.while_loop(lambda c: c.status == RUNNING, cycle, c)
    # after the last rotation rows 0..k-1 are the wanted Ritz vectors, most wanted first
    vecs = _unit_stack(jax.tree_util.tree_map(
        lambda b, s: b[:k].astype(tu.accumulation_dtype(s.dtype)), c.basis, like))
    residual = _row(c.basis, jnp.asarray(keep_count(plan)), like)
    gram = tu.stacked_gram(vecs)
    # at the natural end (n rows) the residual row is round-off: not a loss of orthogonality
    resid_dots = jnp.where(c.exhausted, jnp.zeros((), sdt),
                           jnp.max(jnp.abs(_rows_dot(vecs, residual))))
    orth = jnp.maximum(jnp.max(jnp.abs(gram - jnp.eye(k, dtype=gram.dtype))), resid_dots)
    true_res = (_true_residuals(mv, like, vecs, c.values, _op_rounder(op))
                if plan.true_residuals else None)
    empty = jnp.zeros((0,), sdt)
    return EngineOut(
        values=c.values, bounds=c.bounds, conv=c.conv, n_valid=c.n_valid, matvecs=c.matvecs,
        restarts=c.restarts, breakdowns=c.breakdowns, anorm=c.anorm, asym=c.asym, orth=orth,
        status=c.status, vectors=vecs if plan.vectors else None, true_res=true_res, gram=gram,
        second_pass_dev=jnp.zeros((), sdt), tdiag=jnp.diagonal(c.tmat)[:m],
        toff=jnp.diagonal(c.tmat, 1)[:m], alphas=empty, betas=empty, dropped=empty,
        breakdown_flags=jnp.zeros((0,), bool),
    )


# ============================================================================================
# plain recurrence ("window" / "none") with on-device stopping
# ============================================================================================


class _Plain(NamedTuple):
    state: LanczosState
    status: jax.Array
    asym: jax.Array
    values: jax.Array
    bounds: jax.Array
    conv: jax.Array
    n_valid: jax.Array
    coeffs: jax.Array  # (capacity, k)


def _host_check(plan: Plan):
    """A host function ``(alphas, betas, dropped, steps, anorm, tol, complete) -> analysis``.

    For ``jax.pure_callback``: float64 Ritz values of ``T`` with ghost filtering, the ``k``
    wanted ones (most wanted first), their bounds and ``T``-eigenvectors.
    """
    k, cap = plan.k, plan.capacity

    def check(alphas, betas, dropped, steps, anorm, tol, complete):
        m = int(steps)
        dt = alphas.dtype
        values, bounds = np.zeros(k, dt), np.zeros(k, dt)
        coeffs, conv = np.zeros((cap, k), dt), np.zeros(k, bool)
        if m == 0:
            return values, bounds, conv, np.int32(0), coeffs
        r = ritz_values(np.asarray(alphas[:m], np.float64), np.asarray(betas[:m], np.float64),
                        filter_ghosts=plan.filter_ghosts, eps_work=plan.eps_work,
                        anorm=float(anorm), dropped=np.asarray(dropped[:m], np.float64),
                        complete=bool(complete))
        idx = select(r.values, k, plan.which)
        nv = len(idx)
        values[:nv] = r.values[idx]
        bounds[:nv] = r.bounds[idx]
        coeffs[:m, :nv] = r.coeffs[:, idx]
        conv[:nv] = converged_mask(r.values[idx], r.bounds[idx], float(tol), float(anorm),
                                   plan.eps_work, plan.floor)
        return values, bounds, conv, np.int32(len(r.values)), coeffs

    return check


def _plain_analysis(st: LanczosState, tol, plan: Plan, complete):
    k, cap = plan.k, plan.capacity
    dt = st.alphas.dtype
    shapes = (jax.ShapeDtypeStruct((k,), dt), jax.ShapeDtypeStruct((k,), dt),
              jax.ShapeDtypeStruct((k,), bool), jax.ShapeDtypeStruct((), jnp.int32),
              jax.ShapeDtypeStruct((cap, k), dt))
    return jax.pure_callback(_host_check(plan), shapes, st.alphas, st.betas, st.dropped,
                             st.step, st.anorm, jnp.asarray(tol, dt), complete,
                             vmap_method="sequential")


def _plain(op, v0, key, tol, max_matvecs, plan: Plan) -> EngineOut:
    like = op.params_like
    mv = op.bind()
    k, cap = plan.k, plan.capacity
    state = lanczos_init(op, v0, cap, plan.reorth, plan.window, key=key)
    step = make_step(mv, like, plan.reorth, reorth_passes(plan.reorth), plan.breakdown_tol)
    sdt = state.alphas.dtype
    max_matvecs = jnp.minimum(jnp.asarray(max_matvecs, jnp.int32), cap)
    p = _Plain(state, jnp.asarray(RUNNING, jnp.int32), jnp.zeros((), sdt), jnp.zeros((k,), sdt),
               jnp.zeros((k,), sdt), jnp.zeros((k,), bool), jnp.zeros((), jnp.int32),
               jnp.zeros((cap, k), sdt))

    def one(p):
        st = step(p.state)
        j = st.step - 1
        a, b, asym = st.alphas[j], st.betas[j], st.asymmetry[j]
        finite = jnp.isfinite(a) & jnp.isfinite(b) & jnp.isfinite(asym)
        status = jnp.where(~finite, NONFINITE,
                           jnp.where(asym > plan.asym_tol * st.anorm, ASYMMETRIC, p.status))
        if plan.reorth == "window":
            # a restart vector (pseudo-random, orthogonal to every vector so far: none has left
            # the ring yet) that is itself an eigenvector: with probability one ``A`` is a
            # multiple of the identity on the complement of the invariant subspaces found, so
            # the spectrum is complete (a low-rank operator's null space). Going on would only
            # push those subspaces out of the ring and re-find them
            exhausted = (st.breakdowns[j] & (j >= 1) & st.breakdowns[jnp.maximum(j - 1, 0)]
                         & (j <= plan.window))
            status = jnp.where(exhausted & (status == RUNNING), CONVERGED, status)
        return p._replace(state=st, status=status.astype(jnp.int32),
                          asym=jnp.maximum(p.asym, asym))

    def chunk(p):
        end = jnp.minimum(max_matvecs, p.state.step + plan.check_every)
        p = jax.lax.while_loop(lambda p: (p.state.step < end) & (p.status == RUNNING), one, p)
        # CONVERGED before the analysis: the spectrum was found complete (see ``one``)
        values, bounds, conv, n_valid, coeffs = _plain_analysis(p.state, tol, plan,
                                                                p.status == CONVERGED)
        running = p.status == RUNNING
        done = jnp.all(conv) & (n_valid >= k) & (not plan.fixed)
        status = jnp.where(running & done, CONVERGED,
                           jnp.where(running & (p.state.step >= max_matvecs), BUDGET, p.status))
        return p._replace(status=status.astype(jnp.int32), values=values, bounds=bounds,
                          conv=conv, n_valid=n_valid, coeffs=coeffs)

    p = jax.lax.while_loop(lambda p: p.status == RUNNING, chunk, p)
    st = p.state
    vecs, dev = None, jnp.zeros((), sdt)
    if plan.vectors or plan.true_residuals:
        vecs, dev = _second_pass(op, v0, key, p.coeffs, st, plan)
    true_res = (_true_residuals(mv, like, vecs, p.values, _op_rounder(op))
                if plan.true_residuals else None)
    steps = st.step
    live = jnp.arange(cap) + 1 < plan.n  # a breakdown at step n is the natural end
    n_breaks = jnp.sum(st.breakdowns & live).astype(jnp.int32)
    gram = tu.stacked_gram(vecs) if vecs is not None else None
    return EngineOut(
        values=p.values, bounds=p.bounds, conv=p.conv, n_valid=p.n_valid, matvecs=steps,
        restarts=jnp.zeros((), jnp.int32), breakdowns=n_breaks, anorm=st.anorm, asym=p.asym,
        orth=jnp.max(jnp.where(live, st.orthogonality, jnp.zeros((), sdt))), status=p.status,
        vectors=vecs if plan.vectors else None, true_res=true_res, gram=gram,
        second_pass_dev=dev,
        tdiag=st.alphas, toff=st.betas, alphas=st.alphas, betas=st.betas, dropped=st.dropped,
        breakdown_flags=st.breakdowns,
    )


def _second_pass(op, v0, key, coeffs, first: LanczosState, plan: Plan):
    """Regenerate the Lanczos vectors from ``v0`` and accumulate ``Y = Q coeffs``."""
    like = op.params_like
    step = make_step(op.bind(), like, plan.reorth, reorth_passes(plan.reorth), plan.breakdown_tol)
    st = lanczos_init(op, v0, plan.capacity, plan.reorth, plan.window, key=key)
    acc = zeros_work(like, plan.k)

    def body(_, carry):
        s, acc = carry
        c = coeffs[s.step]
        acc = jax.tree_util.tree_map(
            lambda a, x: a + c.astype(a.dtype).reshape((-1,) + (1,) * x.ndim) * x[None], acc, s.q
        )
        return step(s), acc

    st, acc = jax.lax.fori_loop(0, first.step, body, (st, acc))
    scale = jnp.maximum(first.anorm, jnp.finfo(first.anorm.dtype).tiny)
    dev = jnp.max(jnp.abs(st.alphas - first.alphas)) / scale
    return _unit_stack(acc), dev


# ============================================================================================
# entry point
# ============================================================================================


class _FlatOperator:
    """The operator seen on flat ``(P,)`` vectors: unravel, apply, ravel (inside the trace)."""

    def __init__(self, op):
        self._op = op
        self.leaves_like, self.treedef = jax.tree_util.tree_flatten(op.params_like)
        self.sizes = [int(np.prod(s.shape)) for s in self.leaves_like]
        self.dtype = scalar_dtype(op.params_like)
        self.params_like = jax.ShapeDtypeStruct((sum(self.sizes),), self.dtype)

    def ravel(self, tree: PyTree) -> jax.Array:
        """Pytree -> ``(P,)``, leaves written in place into one buffer.

        A chain of in-place ``dynamic_update_slice`` writes, not ``jnp.concatenate``: on
        XLA:CPU a concatenate fused with its producers selects the source operand per element
        and ran 10-20x slower than the copies (36-190 ms against 10 ms per ravel at 10M
        parameters), a third of each Lanczos step.
        """
        leaves = jax.tree_util.tree_leaves(tree)
        out = jnp.zeros(self.params_like.shape, self.dtype)
        start = 0
        for x, size in zip(leaves, self.sizes):
            out = jax.lax.dynamic_update_slice_in_dim(
                out, jnp.reshape(x, (-1,)).astype(self.dtype), start, 0)
            start += size
        return out

    def unravel(self, flat: jax.Array, lead: tuple = ()) -> PyTree:
        """``(..., P)`` -> pytree with leaves ``(..., *shape)`` in their work dtypes."""
        out, start = [], 0
        for s, size in zip(self.leaves_like, self.sizes):
            x = flat[..., start:start + size].reshape(lead + tuple(s.shape))
            out.append(x.astype(tu.accumulation_dtype(s.dtype)))
            start += size
        return jax.tree_util.tree_unflatten(self.treedef, out)

    def to_op_dtype(self, flat: jax.Array) -> jax.Array:
        """``flat`` rounded to the operator's leaf dtypes, back in the work dtype."""
        return self.ravel(to_like(self.unravel(flat), self._op.params_like))

    def bind(self) -> Callable:
        mv = self._op.bind()
        return lambda x: self.ravel(mv(to_like(self.unravel(x), self._op.params_like)))


def _run(op, v0, key, tol, max_matvecs, plan: Plan) -> EngineOut:
    if plan.flat:
        flat = _FlatOperator(op)
        v0 = hash_vector(flat.params_like, key) if v0 is None else flat.ravel(to_work(v0))
        out = _run_layout(flat, v0, key, tol, max_matvecs, plan)
        if out.vectors is None:
            return out
        return out._replace(vectors=flat.unravel(out.vectors, (plan.k,)))
    if v0 is None:  # made in the program (same entries as the flat layout's)
        v0 = hash_vector(op.params_like, key)
    return _run_layout(op, v0, key, tol, max_matvecs, plan)


def _run_layout(op, v0, key, tol, max_matvecs, plan: Plan) -> EngineOut:
    if plan.reorth == "full":
        return _thick_restart(op, v0, key, tol, max_matvecs, plan)
    return _plain(op, v0, key, tol, max_matvecs, plan)


#: XLA:CPU compiler options of a ``lean_schedule`` plan: the memory-optimised instruction
#: schedule (shorter buffer lifetimes, a smaller temporary heap)
LEAN_SCHEDULE_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
#: XLA:CPU compiler options of every CPU engine program: the LLVM IR emitters instead of the
#: MLIR fusion emitters. Measured on the clustered MLP Hessian (P = 269,322, 135 fusions):
#: compile 1.3-1.55 s -> 0.6-0.8 s, run within +-5%; at 1M and 10M parameters step times
#: within the run-to-run noise and the same temporaries (diagonal operators, 0.2M-4M).
FAST_COMPILE_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


class _Engine:
    """The engine as one jitted program per set of compiler options (picked by the plan).

    ``op``, ``v0``, ``key``, ``tol`` and the matvec cap are arguments: new params of the
    same shapes, another tol or cap: no recompilation. A compiler option that this jaxlib
    does not know is dropped (once, for the rest of the process) instead of failing the run.
    """

    def __init__(self):
        self._programs: dict[tuple, Callable] = {}
        self._unsupported: set[str] = set()

    def _options(self, plan: Plan) -> dict:
        opts = {}
        if plan.cpu_program:
            opts.update(FAST_COMPILE_OPTIONS)
        if plan.lean_schedule:
            opts.update(LEAN_SCHEDULE_OPTIONS)
        return {k: v for k, v in opts.items() if k not in self._unsupported}

    def _jitted(self, plan: Plan):
        opts = self._options(plan)
        key = tuple(sorted(opts.items()))
        if key not in self._programs:
            self._programs[key] = jax.jit(_run, static_argnames=("plan",),
                                          compiler_options=opts or None)
        return self._programs[key]

    def _retry(self, err: Exception, plan: Plan) -> bool:
        """Drop the options an ``INVALID_ARGUMENT: No such compile option`` names."""
        msg = str(err)
        if "No such compile option" not in msg:
            return False
        bad = {k for k in self._options(plan) if k in msg} or set(self._options(plan))
        self._unsupported |= bad
        return True

    def __call__(self, op, v0, key, tol, max_matvecs, *, plan: Plan) -> EngineOut:
        try:
            return self._jitted(plan)(op, v0, key, tol, max_matvecs, plan=plan)
        except jax.errors.JaxRuntimeError as err:
            if not self._retry(err, plan):
                raise
            return self._jitted(plan)(op, v0, key, tol, max_matvecs, plan=plan)

    def lower(self, op, v0, key, tol, max_matvecs, *, plan: Plan):
        """``jax.stages.Lowered`` of the program (``.compile()``, ``memory_analysis()``)."""
        return self._jitted(plan).lower(op, v0, key, tol, max_matvecs, plan=plan)

    def _cache_size(self) -> int:
        """Compiled programs held (all option sets): one per configuration."""
        return sum(f._cache_size() for f in self._programs.values())


run_engine = _Engine()
#: the same program, traceable inside a user's ``jit`` (``eigsh_fast`` / probes; the
#: user's ``jit`` sets the compiler options)
run_engine_traced = _run
