"""``eigsh`` (checked), ``eigsh_fast`` (jittable), ``top_eigenpairs``: one engine behind all three.

``eigsh`` is checked and reports every diagnostic, ``eigsh_fast`` is jittable and
``top_eigenpairs`` has the one dense fallback for tiny operators; all three run the one
engine of :mod:`gradience_jax.spectrum.engine`.

``eigsh`` reads as plan -> run -> finish: :func:`~gradience_jax.spectrum.plan.make_plan`
checks the arguments and fixes the static plan, one compiled program runs the whole
restarted Lanczos on device, and the host turns its arrays into a :class:`SpectrumResult`.

Supported names: ``DENSE_LIMIT``, ``Eigenpairs``, ``FastEigshResult``, ``eigsh``,
``eigsh_fast``, ``start_vector``, ``top_eigenpairs`` (the ``__all__`` list), and ``LAYOUTS``
(the ``layout`` choices of ``eigsh``).
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax import tree as tu
from gradience_jax._validate import check_choice, check_int, check_key
from gradience_jax.lanczos import (
    NonFiniteError,
    check_operator_output,
    check_vector,
    random_vector,
    scalar_dtype,
)
from gradience_jax.operators.base import LinearOperator, check_operator
from gradience_jax.spectrum.engine import (
    ASYMMETRIC,
    NONFINITE,
    Plan,
    run_engine,
    run_engine_traced,
)
from gradience_jax.spectrum.plan import (
    check_k,
    flat_layout,
    make_plan,
    reachable_residual,
)
from gradience_jax.spectrum.result import SpectrumResult, quality_warnings
from gradience_jax.spectrum.ritz import WHICH, ritz_values, select

PyTree = Any

#: operators with at most this many parameters are solved densely by ``top_eigenpairs``
DENSE_LIMIT = 2000
#: a true eigenvector residual may exceed its Ritz bound by the rounding of the products,
#: a few eps ||A||; beyond this many (eps_work ||A||) the result warns
VECTOR_RESIDUAL_SLACK = 20.0

__all__ = [
    "DENSE_LIMIT",
    "Eigenpairs",
    "FastEigshResult",
    "eigsh",
    "eigsh_fast",
    "start_vector",
    "top_eigenpairs",
]


def start_vector(op: LinearOperator, v0: PyTree | None, key: jax.Array,
                 ) -> tuple[PyTree | None, jax.Array]:
    """The Krylov start vector of ``eigsh`` and the key of its restarts.

    Args:
        op: the operator (its ``params_like`` shapes the vector).
        v0: a given start vector, returned as it is; ``None`` stays ``None``: the engine
            then makes :func:`~gradience_jax.lanczos.hash_vector` of the restart key inside
            its program (no host array, no PRNG kernel).
        key: the run's key.

    Returns:
        ``(v0, key)``: the key is used as it is (no ``fold_in`` program to compile): the
        start vector hashes its data, and every restart vector also mixes in its iteration,
        so they never repeat the start vector.
    """
    del op  # the vector is made in the program, shaped by the operator there
    return v0, key


LAYOUTS = ("auto", "flat", "tree")


def _layout_flag(layout: Any, op: LinearOperator, v0: PyTree | None) -> bool:
    check_choice(layout, "layout", LAYOUTS)
    return flat_layout(op, v0) if layout == "auto" else layout == "flat"


def half_precision(op: LinearOperator) -> bool:
    """Whether ``op`` is less precise than its Lanczos arithmetic (bfloat16 / float16 params).

    Args:
        op: the operator.

    Returns:
        ``True`` when the operator's epsilon exceeds ``10 eps_work``: its true residuals then
        stop near ``eps_op ||A||`` (see
        :func:`~gradience_jax.spectrum.plan.reachable_residual`).
    """
    like = op.params_like
    eps_work = float(jnp.finfo(scalar_dtype(like)).eps)
    return reachable_residual(like, op.dtype) > 10.0 * eps_work


def _to_params_dtype(vecs: PyTree, like: PyTree) -> PyTree:
    """A stack of vectors (leading axis ``k``) in the operator's leaf dtypes."""
    return jax.tree_util.tree_map(lambda x, s: x.astype(s.dtype), vecs, like)


def _raise_status(status: int, op: LinearOperator, matvecs: int, asym: float, anorm: float,
                  asym_tol: float) -> None:
    if status == NONFINITE:
        raise NonFiniteError(
            f"the {op.name} operator's matvec returned non-finite values (NaN / Inf) at "
            f"Lanczos iteration {matvecs - 1} (the run stopped there): check the loss / model at "
            "these params, or the operator's dtype (bf16 / fp16 overflow)"
        )
    if status == ASYMMETRIC:
        raise ValueError(
            f"the {op.name} operator is not symmetric: the measured asymmetry "
            f"|<q_(j-1), A q_j> - <A q_(j-1), q_j>| = {asym:.2e} exceeds {asym_tol:g} ||A|| = "
            f"{asym_tol * anorm:.2e} (the run stopped after {matvecs} matvecs); eigsh needs "
            "a symmetric operator: check the matvec, or compute in float32 / float64"
        )


def eigsh(
    op: LinearOperator,
    k: int = 10,
    num_iters: int | None = None,
    which: str = "LA",
    reorth: str = "full",
    window: int | None = None,
    key: jax.Array | None = None,
    tol: float = 1e-10,
    return_eigenvectors: bool = False,
    *,
    v0: PyTree | None = None,
    max_iters: int | None = None,
    memory_budget_bytes: int | None = None,
    filter_ghosts: bool | None = None,
    true_residuals: bool | None = None,
    chunk: int | None = None,
    seed: int | None = None,
    basis_size: int | None = None,
    basis_dtype: Any = None,
    layout: str = "auto",
) -> SpectrumResult:
    """``k`` extreme eigenvalues (and optionally eigenvectors) of a symmetric operator.

    ``reorth="full"`` (default): thick-restart Lanczos (Wu & Simon 2000) on a basis of
    ``basis_size`` rows with converged pairs locked; the restart cycles run on device in
    one compiled program and the small projected eigenproblem is solved in float64, so the
    run stops at ``tol`` without host round trips. ``"window"`` / ``"none"``: the plain
    recurrence without a stored basis (a ring buffer of ``window`` rows, or nothing), ghost
    Ritz values removed by the Cullum-Willoughby test, eigenvectors from a second pass.

    Convergence: a wanted Ritz value ``theta`` has converged when its residual bound
    ``|beta_m s_mi| <= max(tol |theta|, floor ||A||)``, ``floor = 10 eps`` of the Lanczos
    arithmetic. With ``num_iters=None`` the run goes on until all ``k`` have converged or
    ``max_iters`` matvecs were spent (and says which).

    Half precision (bfloat16 / float16 params): the operator itself is only accurate to about
    ``eps_op ||A||``. The Ritz bounds must reach ``0.1 eps_op ||A||`` (the floor), the true
    residuals ``||A y - lambda y||`` of the returned vectors are computed in the operator's
    dtype (by default with ``reorth="full"`` or eigenvectors: ``k`` matvecs) and a pair counts
    as converged only if its true residual is ``<= max(tol |theta|, eps_op ||A||)``; a
    warning says so when ``tol`` asks for more than the dtype can reach.
    Eigenvectors come back in the operator's dtype; eigenvalues and residuals in float64.

    Cost: ``iterations`` matvecs (``"window"`` / ``"none"`` with eigenvectors: twice; ``+ k``
    for true residuals) plus, per step, ``~4 (basis_size + 1) P`` flops of Gram-Schmidt
    (``"full"``) or ``~4 window P`` (``"window"``). Memory: ``basis_size + 1`` rows
    (``"full"``, in ``basis_dtype``), ``window`` rows (``"window"``) or none, plus about four
    working vectors and ``k`` for eigenvectors.

    Args:
        op: symmetric :class:`LinearOperator`.
        k: number of eigenvalues, ``1 <= k <= n_params``.
        num_iters: exact number of Lanczos matvecs (``>= k``; no early stop); ``None``:
            convergence-driven.
        which: ``"LA"`` largest, ``"SA"`` smallest, ``"BE"`` both ends (``k // 2`` smallest
            and the rest largest, ascending), ``"LM"`` largest magnitude.
        reorth: ``"full"``, ``"window"`` or ``"none"``.
        window: ring-buffer size for ``"window"`` (default 8, >= 2).
        key: PRNG key for the start vector and restarts (default ``jax.random.key(42)``).
        tol: relative residual tolerance (a traced argument: changing it does not recompile).
        return_eigenvectors: also return unit Ritz vectors (a pytree stack, leading axis k).
        v0: start vector (warm start) instead of a random one.
        max_iters: matvec cap of a convergence-driven run (default ``max(1000, 20 basis_size)``
            for ``"full"``, ``max(1000, 10 k)`` otherwise; traced for ``"full"``).
        memory_budget_bytes: bytes for the stored basis (default: 25% of device memory or
            2 GiB); ``basis_size`` shrinks to fit.
        filter_ghosts: Cullum-Willoughby filtering (default: on for ``"window"`` / ``"none"``).
        true_residuals: compute ``||A y - lambda y||`` (default: with eigenvectors, and for
            half-precision operators with ``reorth="full"``).
        chunk: steps between convergence checks for ``"window"`` / ``"none"`` (default
            ``max(10, k)``).
        seed: recorded in the result (informational).
        basis_size: rows of a thick-restart cycle (default ``max(2k + 10, 30)``, at most
            ``n_params``).
        basis_dtype: storage dtype of the thick-restart basis (e.g. ``"bfloat16"``: half the
            memory, float32 arithmetic; accuracy ~1e-3 relative, for PSD operators at scale).
        layout: how the program holds Krylov vectors: ``"flat"`` (one ``(P,)`` array: one
            kernel per operation, fastest to compile), ``"tree"`` (pytrees like the params:
            shardings kept) or ``"auto"`` (flat unless an operand spans several devices, or
            the operator has >= 4M parameters in <= 16 leaves: see
            :func:`~gradience_jax.spectrum.plan.flat_layout`).

    Returns:
        :class:`SpectrumResult`.

    Raises:
        TypeError: ``op`` is not a :class:`LinearOperator`, ``key`` is not a PRNG key, or a
            count / ``tol`` of the wrong kind (``ArgumentTypeError``, also a ``ValueError``).
        ValueError: bad ``k`` / ``num_iters`` / ``which`` / ``reorth`` / ``window`` / ``tol`` /
            ``basis_size`` / ``basis_dtype`` / ``layout``, a batch of keys, a ``v0`` that does
            not match the params or is zero / not finite, a matvec whose output does not match
            the params, or a non-symmetric operator (stops the run early).
        NonFiniteError: non-finite matvec values (stops the run early; a
            ``FloatingPointError`` that is also a ``ValueError``).

    References:
        K. Wu & H. Simon (2000), "Thick-Restart Lanczos Method for Large Symmetric
        Eigenvalue Problems"; J. Cullum & R. Willoughby (1985), *Lanczos Algorithms for
        Large Symmetric Eigenvalue Computations* (the ghost filter).
    """
    t_start = time.perf_counter()
    op = check_operator(op)
    want_vecs = bool(return_eigenvectors)
    if true_residuals is None:
        true_residuals = want_vecs or (half_precision(op) and reorth == "full")
    true_residuals = bool(true_residuals)
    if seed is not None:
        seed = check_int(seed, "seed", lo=None)
    plan, cap = make_plan(
        op, k=k, num_iters=num_iters, which=which, reorth=reorth, window=window, tol=tol,
        max_iters=max_iters, memory_budget_bytes=memory_budget_bytes,
        filter_ghosts=filter_ghosts, vectors=want_vecs, true_residuals=true_residuals,
        chunk=chunk, basis_size=basis_size, basis_dtype=basis_dtype,
        flat=_layout_flag(layout, op, v0),
    )
    key = check_key(key)
    like = op.params_like
    check_operator_output(op, like)
    if v0 is not None:
        check_vector(v0, like, "v0", f"the {op.name} operator's params", nonzero=True)
    v0, key_r = start_vector(op, v0, key)
    out = run_engine(op, v0, key_r, float(tol), cap, plan=plan)
    return _finish(op, plan, cap, out, tol=float(tol), seed=seed, t_start=t_start)


def _eps(dtype: Any) -> float | None:
    return float(jnp.finfo(dtype).eps) if jnp.issubdtype(dtype, jnp.floating) else None


def _finish(op: LinearOperator, plan: Plan, cap: int, out, *, tol: float, seed: int | None,
            t_start: float) -> SpectrumResult:
    """The engine's arrays -> :class:`SpectrumResult` (host, float64)."""
    vecs = out.vectors
    host = jax.device_get(out._replace(vectors=None))
    matvecs = int(host.matvecs)
    anorm = float(host.anorm)
    _raise_status(int(host.status), op, matvecs, float(host.asym), anorm, plan.asym_tol)
    k, n = plan.k, plan.n
    nv = min(k, int(host.n_valid))
    values = np.asarray(host.values, np.float64)[:nv]
    perm = select(values, nv, plan.which)  # output order of `which`
    values = values[perm]
    bounds = np.asarray(host.bounds, np.float64)[:nv][perm]
    conv = np.asarray(host.conv, bool)[:nv][perm]
    if not (np.all(np.isfinite(values)) and np.all(np.isfinite(bounds))):
        raise NonFiniteError(
            f"eigsh on the {op.name} operator: non-finite Ritz values / bounds after "
            f"{matvecs} matvecs (||A|| estimate {anorm:.3g}): the operator overflows its dtype"
        )
    half = half_precision(op)
    reach = reachable_residual(op.params_like, op.dtype)
    true_res = None
    calls = matvecs
    if plan.reorth != "full" and (plan.vectors or plan.true_residuals):
        calls += matvecs
    if host.true_res is not None:
        true_res = np.asarray(host.true_res, np.float64)[:nv][perm]
        calls += k
        if half:  # the operator is less precise than the bounds: judge the true residuals
            conv = conv & (true_res <= np.maximum(tol * np.abs(values), reach * anorm))
    overlap = None
    if host.gram is not None:
        overlap = np.asarray(host.gram, np.float64)[:nv, :nv][np.ix_(perm, perm)]
    if vecs is not None:
        if nv < k or not np.array_equal(perm, np.arange(nv)):
            vecs = jax.tree_util.tree_map(lambda x: x[jnp.asarray(perm)], vecs)
        vecs = _to_params_dtype(vecs, op.params_like)
    ghosts_removed = 0
    ghost_flags = None
    if plan.reorth != "full":
        chk = ritz_values(
            np.asarray(host.alphas, np.float64)[:matvecs],
            np.asarray(host.betas, np.float64)[:matvecs],
            filter_ghosts=True, eps_work=plan.eps_work, anorm=anorm,
            dropped=np.asarray(host.dropped, np.float64)[:matvecs],
        )
        if plan.filter_ghosts:
            ghosts_removed = int(chk.spurious + chk.copies)
        else:  # classify the reported raw values for the warning
            ghost_flags = np.array([chk.flags[int(np.argmin(np.abs(chk.raw_values - v)))]
                                    for v in values])
    half_gate = true_res is not None and half
    warns = quality_warnings(
        values=values, bounds=np.maximum(bounds, true_res) if half_gate else bounds, conv=conv,
        k=k, iterations=matvecs, tol=tol,
        reorth=plan.reorth, orth_loss=float(host.orth), anorm=anorm, eps_work=plan.eps_work,
        filter_ghosts=plan.filter_ghosts, ghost_flags=ghost_flags,
        eigenvectors_overlap=overlap, fixed_iters=plan.fixed, restarts=int(host.restarts),
        n_params=n, matvec_cap=cap, basis_size=plan.basis_size if plan.reorth == "full" else None,
        asym=float(host.asym), eps_op=_eps(op.dtype),
    )
    if nv < k:
        warns.insert(0, f"only {nv} distinct Ritz values available for k={k}: "
                        "increase the number of iterations")
    if half and nv and np.any(tol * np.abs(values) < reach * anorm):
        dt = jnp.dtype(op.dtype).name
        if true_res is not None:
            how = (f"a pair counts as converged when its true residual ||A y - lambda y|| "
                   f"(in {dt}) is below that; they reached {float(np.max(true_res)):.2e}")
        else:
            how = ("the Ritz bounds of the float32 recurrence are not true residuals here: "
                   "pass return_eigenvectors=True or true_residuals=True to measure them")
        warns.append(
            f"tol={tol:g} is below what a {dt} operator can reach, about eps({dt}) ||A|| = "
            f"{reach * anorm:.2e}: the run stopped once the Ritz bounds were below "
            f"{plan.floor * anorm:.1e} and {how}; compute the operator in float32 for "
            "tighter eigenpairs"
        )
    dev = float(host.second_pass_dev)
    if dev > 1e3 * plan.eps_work:
        warns.append(
            f"the second Lanczos pass (Ritz vectors) diverged from the first by {dev:.1e} "
            "(relative, in alphas): eigenvectors may be inaccurate; use reorth='full'"
        )
    if true_res is not None and not half and nv:
        slack = VECTOR_RESIDUAL_SLACK * plan.eps_work * anorm
        over = np.flatnonzero(true_res > bounds + slack)
        if len(over):
            i = over[int(np.argmax(true_res[over] - bounds[over]))]
            fix = ("use reorth='window' or 'full' for sharper vectors" if plan.reorth == "none"
                   else "use reorth='full'" if plan.reorth == "window" else
                   "check that the operator is symmetric and deterministic")
            warns.append(
                f"{len(over)} eigenvector(s) have a true residual ||A y - lambda y|| above their "
                f"Ritz bound plus {VECTOR_RESIDUAL_SLACK:g} eps ||A|| (worst: "
                f"{true_res[i]:.2e} against {bounds[i]:.2e} at lambda={values[i]:.6g}): with "
                f"reorth={plan.reorth!r} the basis lost orthogonality and the vectors mix "
                f"copies; the eigenvalues stand, each vector is accurate to about its true "
                f"residual over the gap to its neighbours; {fix}"
            )
    if int(host.breakdowns):
        warns.append(
            f"{int(host.breakdowns)} Lanczos breakdown(s): an invariant subspace was found and "
            "the recurrence restarted with a random vector orthogonal to the stored basis "
            "(expected for low-rank operators; informational)"
        )
    return SpectrumResult(
        eigenvalues=values,
        eigenvectors=vecs,
        operator=op.name,
        is_psd=op.is_psd,
        iterations=matvecs,
        converged=bool(np.all(conv)) and nv == k,
        n_params=n,
        seed=seed,
        reorth_mode=plan.reorth,
        regularization_applied=0.0,
        warnings=tuple(warns),
        ritz_residuals=bounds,
        operator_calls=int(calls),
        wall_time_s=time.perf_counter() - t_start,
        which=plan.which,
        k=k,
        tol=float(tol),
        converged_mask=conv,
        true_residuals=true_res,
        orthogonality_loss=float(host.orth),
        asymmetry=float(host.asym),
        ghosts_removed=ghosts_removed,
        breakdowns=int(host.breakdowns),
        restarts=int(host.restarts),
        window=plan.window,
        dtype=str(jnp.dtype(op.dtype)),
        basis_size=plan.basis_size if plan.reorth == "full" else None,
    )


# ============================================================================================
# eigsh_fast: the jittable path (probes, train steps)
# ============================================================================================


class FastEigshResult(NamedTuple):
    """Arrays out of :func:`eigsh_fast` (jittable).

    Attributes:
        eigenvalues: ``(k,)`` in the order of ``which`` (``BE``: ascending), work dtype.
        eigenvectors: pytree stack, leaves ``(k, *leaf.shape)``, unit norm, in the
            operator's leaf dtypes.
        residuals: ``(k,)`` Ritz residual bounds; for a half-precision operator the true
            residuals ``||A y - lambda y||`` of the returned vectors.
        alphas, betas: diagonal / off-diagonal of the last projected ``T``.
        breakdowns: int32 scalar, invariant subspaces found.
        converged: ``(k,)`` bool, ``residuals <= max(tol |eigenvalues|, floor ||A||)``.
        status: int32 scalar (0 running, 1 converged, 2 cap reached, 3 non-finite,
            4 asymmetric).
    """

    eigenvalues: jax.Array
    eigenvectors: PyTree
    residuals: jax.Array
    alphas: jax.Array
    betas: jax.Array
    breakdowns: jax.Array
    converged: jax.Array | None = None
    status: jax.Array | None = None

    @property
    def finite(self) -> jax.Array:
        """Scalar bool: the run met no NaN / Inf and the eigenvalues are finite (jittable)."""
        ok = jnp.all(jnp.isfinite(self.eigenvalues)) & jnp.all(jnp.isfinite(self.residuals))
        return ok if self.status is None else ok & (self.status != NONFINITE)

    def check(self) -> FastEigshResult:
        """Raise on a non-finite run (concrete values: after a ``jit``-ed call).

        Returns:
            ``self``, when finite.

        Raises:
            NonFiniteError: the operator's products were NaN / Inf, or the eigenvalues are.
        """
        if not bool(self.finite):
            raise NonFiniteError(
                "eigsh_fast: the operator's matvec returned non-finite values (NaN / Inf): "
                "check the loss / model at these params, or the operator's dtype")
        return self


def eigsh_fast(
    op: LinearOperator,
    v0: PyTree | None = None,
    *,
    k: int = 1,
    num_iters: int = 20,
    which: str = "LA",
    reorth: str = "full",
    window: int | None = None,
    key: jax.Array | None = None,
    filter_ghosts: bool | None = None,
    tol: float = 1e-10,
    basis_size: int | None = None,
) -> FastEigshResult:
    """Jittable ``eigsh`` for train steps: the same engine, exactly ``num_iters`` matvecs.

    Call it inside your own ``jax.jit`` (the operator is an argument, so new params of the
    same shapes reuse the program), or eagerly. Carry ``result.eigenvectors`` (e.g. their
    sum) into the next call as ``v0`` to warm-start. The small eigenproblem is float64
    (on device under x64, else on the host through ``jax.pure_callback``). No Python-side
    warnings; ``status`` says whether the operator was non-finite / asymmetric (``.finite``
    is the flag, ``.check()`` raises on concrete values).

    Half precision (bfloat16 / float16 params): ``k`` more matvecs give the true residuals
    of the returned vectors, and ``converged`` compares them with ``eps_op ||A||`` (what such
    an operator can reach) when ``tol`` asks for more.

    Cost: ``num_iters`` matvecs (``2 x num_iters`` for ``"window"`` / ``"none"``, whose Ritz
    vectors need a second pass).

    Args:
        op: symmetric operator.
        v0: warm-start vector (pytree like params); ``None``: a normal vector from ``key``;
            all zeros: a pseudo-random vector derived from ``key``.
        k: number of eigenpairs (static).
        num_iters: Lanczos matvecs (static, ``>= k``).
        which: ``"LA"``, ``"SA"``, ``"LM"`` or ``"BE"``.
        reorth: ``"full"``, ``"window"`` or ``"none"``.
        window: ring-buffer size for ``"window"``.
        key: PRNG key (default ``jax.random.key(42)``, the one default seed).
        filter_ghosts: Cullum-Willoughby filter (default: not ``"full"``).
        tol: tolerance of the ``converged`` flags.
        basis_size: thick-restart rows (default ``min(num_iters, max(2k + 10, 30))``).

    Returns:
        :class:`FastEigshResult`.

    Raises:
        TypeError: ``op`` is not a :class:`LinearOperator`, ``key`` is not a PRNG key, or a
            count / ``tol`` of the wrong kind.
        ValueError: bad ``k`` / ``num_iters`` / ``which`` / ``reorth`` / ``window`` /
            ``tol``, a batch of keys, or a concrete ``v0`` that does not match the params.
    """
    op = check_operator(op)
    k = check_int(k, "k", lo=1)
    num_iters = check_int(num_iters, "num_iters", lo=1)
    check_choice(which, "which", WHICH)
    half = half_precision(op)
    plan, cap = make_plan(
        op, k=k, num_iters=num_iters, which=which, reorth=reorth, window=window, tol=tol,
        max_iters=None, memory_budget_bytes=None, filter_ghosts=filter_ghosts, vectors=True,
        true_residuals=half, chunk=num_iters, basis_size=basis_size, basis_dtype=None,
        flat=flat_layout(op, v0),
    )
    key = check_key(key)
    if v0 is None:
        v0 = random_vector(jax.random.fold_in(key, 0), op.params_like, "normal")
    else:
        check_vector(v0, op.params_like, "v0", f"the {op.name} operator's params")
    out = run_engine_traced(op, v0, key, tol, cap, plan)
    sdt = scalar_dtype(op.params_like)  # the work dtype, as the vectors (x64 or not)
    values, bounds = out.values.astype(sdt), out.bounds.astype(sdt)
    conv, vecs = out.conv, _to_params_dtype(out.vectors, op.params_like)
    if half:  # the true residuals of the returned vectors, judged at the dtype's floor
        bounds = out.true_res.astype(sdt)
        floor = (reachable_residual(op.params_like, op.dtype) * out.anorm).astype(sdt)
        conv = conv & (bounds <= jnp.maximum(jnp.asarray(tol, sdt) * jnp.abs(values), floor))
    if which == "BE":  # ascending, as eigsh
        perm = jnp.argsort(values)
        values, bounds, conv = values[perm], bounds[perm], conv[perm]
        vecs = jax.tree_util.tree_map(lambda x: x[perm], vecs)
    return FastEigshResult(
        eigenvalues=values, eigenvectors=vecs, residuals=bounds, alphas=out.tdiag.astype(sdt),
        betas=out.toff.astype(sdt), breakdowns=out.breakdowns, converged=conv, status=out.status,
    )


# ============================================================================================
# top_eigenpairs: the helper of geometry / landscape / attention (one dense fallback)
# ============================================================================================


class Eigenpairs(NamedTuple):
    """Eigenpairs out of :func:`top_eigenpairs`.

    Attributes:
        values: ``(k,)`` float64 eigenvalues in the order of ``which``.
        vectors: a pytree stack (leaves ``(k, *leaf.shape)``, unit norm) or ``None``.
        method: ``"dense"`` or ``"lanczos"``.
    """

    values: np.ndarray
    vectors: PyTree | None
    method: str


def top_eigenpairs(
    op: LinearOperator,
    k: int,
    *,
    which: str = "LA",
    key: jax.Array | None = None,
    dense_limit: int = DENSE_LIMIT,
    return_eigenvectors: bool = True,
    **eigsh_kwargs: Any,
) -> Eigenpairs:
    """``k`` extreme eigenpairs: dense float64 ``eigh`` for small operators, else :func:`eigsh`.

    Dense (exact) when ``n_params <= dense_limit``, otherwise :func:`eigsh` with its
    defaults (thick-restart Lanczos).

    Args:
        op: symmetric operator.
        k: number of eigenpairs, ``1 <= k <= n_params``.
        which: ``"LA"``, ``"SA"``, ``"BE"`` or ``"LM"`` (output order as :func:`eigsh`).
        key: PRNG key of the Lanczos start vector (default ``jax.random.key(42)``, the one
            default seed).
        dense_limit: largest dimension solved densely (``to_dense()`` + ``eigh``: ``n^2``
            memory, ``n`` matvecs).
        return_eigenvectors: also return unit eigenvectors (pytree stack, leading axis k).
        **eigsh_kwargs: passed to :func:`eigsh` on the Lanczos path.

    Returns:
        :class:`Eigenpairs`.

    Raises:
        TypeError: ``op`` is not a :class:`LinearOperator`, or ``k`` is not an integer.
        ValueError: bad ``k`` / ``which`` / ``dense_limit``, or what :func:`eigsh` raises.
        NonFiniteError: non-finite operator entries (dense) or products (Lanczos).
    """
    op = check_operator(op)
    n = op.n_params
    k = check_k(k, n)
    check_choice(which, "which", WHICH)
    dense_limit = check_int(dense_limit, "dense_limit", lo=0)
    if n <= dense_limit:
        dense = np.asarray(op.to_dense(), np.float64)
        if not np.all(np.isfinite(dense)):
            raise NonFiniteError(f"the {op.name} operator has non-finite entries (NaN / Inf)")
        evals, evecs = np.linalg.eigh((dense + dense.T) / 2)
        idx = select(evals, int(k), which)
        vectors = None
        if return_eigenvectors:
            dt = scalar_dtype(op.params_like)
            zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), op.params_like)
            vectors = tu.stack([tu.unravel_like(jnp.asarray(evecs[:, i], dt), zeros) for i in idx])
        return Eigenpairs(evals[idx], vectors, "dense")
    res = eigsh(op, k=k, which=which, key=check_key(key),
                return_eigenvectors=return_eigenvectors, **eigsh_kwargs)
    return Eigenpairs(np.asarray(res.eigenvalues, np.float64), res.eigenvectors, "lanczos")

