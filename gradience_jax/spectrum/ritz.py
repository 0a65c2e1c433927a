"""Float64 Ritz analysis: tridiagonal / arrowhead eigenproblems, ghost filtering, selection.

Two kinds of small eigenproblem come out of the Krylov engine:

* the dense ``(m, m)`` projected matrix of a thick-restart cycle (arrowhead block of kept
  Ritz values plus a tridiagonal tail), solved by :func:`small_eigh` inside the compiled
  program: ``jnp.linalg.eigh`` on device when ``jax_enable_x64`` is on, otherwise float64
  numpy on the host through ``jax.pure_callback``;
* the long tridiagonal ``T`` of an un-restarted run (``reorth="window"`` / ``"none"``),
  analysed on the host by :func:`ritz_values` with the Cullum-Willoughby test.

References:
    J. Cullum & R. Willoughby (1985), *Lanczos Algorithms for Large Symmetric Eigenvalue
    Computations*, vol. 1, ch. 4; B. Parlett (1998), *The Symmetric Eigenvalue Problem*
    (residual bounds ``|beta_m s_mi|``); K. Wu & H. Simon (2000), thick-restart Lanczos.

Supported names: ``RitzValues``, ``WHICH``, ``converged_mask``, ``ritz_values``, ``select``,
``small_eigh``, ``which_scores`` (the ``__all__`` list); ``tridiagonal`` (a dense ``T``) is
a helper outside ``__all__``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

WHICH = ("LA", "SA", "BE", "LM")

__all__ = [
    "RitzValues",
    "WHICH",
    "converged_mask",
    "ritz_values",
    "select",
    "small_eigh",
    "which_scores",
]


class RitzValues(NamedTuple):
    """Ritz values of ``T`` after ghost filtering (host, float64).

    Attributes:
        values: ``(r,)`` kept Ritz values, ascending.
        bounds: ``(r,)`` residual bounds ``|beta_m s_{m,i}|`` (min over merged copies).
        coeffs: ``(m, r)`` eigenvectors of ``T`` (Ritz vector ``y_i = Q coeffs[:, i]``).
        spurious: number of Ritz values removed as spurious (Cullum-Willoughby).
        copies: number of numerically repeated copies merged into one.
        flags: ``(m,)`` raw classification of every Ritz value of ``T`` (ascending):
            0 kept, 1 merged copy, 2 spurious.
        raw_values: ``(m,)`` all Ritz values of ``T`` ascending.
        raw_bounds: ``(m,)`` their residual bounds.
    """

    values: np.ndarray
    bounds: np.ndarray
    coeffs: np.ndarray
    spurious: int
    copies: int
    flags: np.ndarray
    raw_values: np.ndarray
    raw_bounds: np.ndarray


def tridiagonal(alphas: np.ndarray, betas: np.ndarray) -> np.ndarray:
    """Dense symmetric tridiagonal ``T`` (float64) from ``alphas (m,)`` and ``betas (m-1,)``.

    Args:
        alphas: ``(m,)`` diagonal.
        betas: off-diagonal; the first ``m - 1`` entries are used.

    Returns:
        ``(m, m)`` float64 array.
    """
    a = np.asarray(alphas, np.float64)
    b = np.asarray(betas, np.float64)[: max(len(a) - 1, 0)]
    return np.diag(a) + np.diag(b, 1) + np.diag(b, -1)


def _eigh_tridiagonal(d: np.ndarray, e: np.ndarray, vectors: bool = True):
    """Eigenpairs of the symmetric tridiagonal ``(d, e)`` (LAPACK stemr via scipy, float64).

    Much faster than a dense ``eigh`` for long runs (``O(m^2)``).
    """
    m = len(d)
    if m == 0:
        return np.zeros(0), np.zeros((0, 0))
    if m == 1:
        return np.asarray(d, np.float64), np.ones((1, 1))
    if not vectors:
        return scipy.linalg.eigh_tridiagonal(d, e, eigvals_only=True), None
    return scipy.linalg.eigh_tridiagonal(d, e)


def _cw_tolerances(anorm: float, m: int, eps_work: float) -> tuple[float, float]:
    """(multiplicity tolerance, spurious tolerance), absolute."""
    eps64 = float(np.finfo(np.float64).eps)
    scale = max(anorm, np.finfo(np.float64).tiny)
    tol_spur = max(5.0 * m * eps64, eps_work**1.5) * scale
    # grouping must be at least as wide as the spurious test: a ghost converging onto a
    # genuine value is itself (nearly) an eigenvalue of T-hat, so the genuine value would
    # otherwise fail the test while the pair is closer than tol_spur but not yet merged
    tol_mult = max(10.0 * eps_work * scale, tol_spur)
    return tol_mult, tol_spur


def _cullum_willoughby(theta: np.ndarray, mu: np.ndarray, bounds: np.ndarray, tol_mult: float,
                       tol_spur: float) -> np.ndarray:
    """Flags per ascending Ritz value: 0 keep, 1 copy (merged), 2 spurious.

    Neighbours join one group when their gap is at most ``tol_mult`` plus the smaller of
    their two residual bounds: numerically multiple values, and copies of one eigenvalue
    that are still converging (in float32 a chain of such copies spreads over ~50 eps ||A||,
    wider than ``tol_mult``, while each link stays within its bounds). A converged value
    (bound ~ 0) only joins values within ``tol_mult``, so distinct eigenvalues it resolves
    stay apart. A group with a numerically multiple pair is genuine (a ghost converging
    onto a genuine value is itself nearly an eigenvalue of ``T-hat``): its best-bounded
    member is kept. A group joined by bounds alone keeps its best-bounded member that
    passes the spurious test; a simple value that is an eigenvalue of ``T-hat`` (within
    ``tol_spur``) is spurious.
    """
    m = len(theta)
    spur = np.zeros(m, bool)
    if len(mu):  # distance to the nearest eigenvalue of T-hat (mu ascending): O(m log m)
        mu = np.sort(mu)
        at = np.clip(np.searchsorted(mu, theta), 1, len(mu) - 1) if len(mu) > 1 else 0
        near = np.abs(theta - mu[at])
        if len(mu) > 1:
            near = np.minimum(near, np.abs(theta - mu[at - 1]))
        spur = near <= tol_spur
    flags = np.zeros(m, np.int8)
    i = 0
    while i < m:
        j, multiple = i, False
        while j + 1 < m:
            gap = theta[j + 1] - theta[j]
            if gap > tol_mult + min(bounds[j], bounds[j + 1]):
                break
            multiple |= gap <= tol_mult
            j += 1
        members = np.arange(i, j + 1)
        candidates = members if multiple else members[~spur[i : j + 1]]
        if len(candidates) == 0:
            flags[i : j + 1] = 2
        else:
            flags[i : j + 1] = np.where(spur[i : j + 1] & (not multiple), 2, 1)
            flags[candidates[int(np.argmin(bounds[candidates]))]] = 0
        i = j + 1
    return flags


def _blocks(betas: np.ndarray, m: int) -> list[tuple[int, int]]:
    """Unreduced diagonal blocks of ``T`` (split where a breakdown set ``beta_j = 0``)."""
    cuts = [j + 1 for j in range(m - 1) if betas[j] == 0.0]
    edges = [0] + cuts + [m]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def ritz_values(
    alphas: np.ndarray,
    betas: np.ndarray,
    *,
    filter_ghosts: bool = False,
    eps_work: float | None = None,
    anorm: float | None = None,
    dropped: np.ndarray | None = None,
    complete: bool = False,
) -> RitzValues:
    """Ritz values, residual bounds and ``T``-eigenvectors from a Lanczos run (float64).

    Args:
        alphas: ``(m,)`` diagonal (entries of a thick-restart block are ignored).
        betas: ``(m,)``; ``betas[:m-1]`` off-diagonal, ``betas[m-1]`` the residual norm.
        filter_ghosts: apply the Cullum-Willoughby test per unreduced block and merge
            numerically multiple copies (for runs that lost orthogonality).
        eps_work: machine epsilon of the Lanczos arithmetic (default float64's).
        anorm: estimate of ``||A||`` (default ``max |theta|``).
        dropped: ``(m,)`` the ``beta_j`` dropped where a breakdown closed a block (its
            residual bound); zeros if ``None``.
        complete: the Ritz values are the whole spectrum (the run found that the operator is
            a multiple of the identity beyond them): each kept bound ``b`` tightens to the
            gap theorem's ``b^2 / delta``, ``delta`` the distance to the other kept values
            less their bounds (Parlett, *The Symmetric Eigenvalue Problem*, Thm 11.7.1).

    Returns:
        :class:`RitzValues`.
    """
    a = np.asarray(alphas, np.float64)
    b = np.asarray(betas, np.float64)
    m = len(a)
    eps_work = float(np.finfo(np.float64).eps) if eps_work is None else float(eps_work)
    vals, bnds, vecs, flags_all, block_ids = [], [], [], [], []
    for block_id, (lo, hi) in enumerate(_blocks(b, m)):
        theta, s = _eigh_tridiagonal(a[lo:hi], b[lo : hi - 1])
        beta_end = b[m - 1] if hi == m else (0.0 if dropped is None else dropped[hi - 1])
        bounds = np.abs(beta_end * s[-1])
        full = np.zeros((m, len(theta)))
        full[lo:hi] = s
        if filter_ghosts:
            scale = max(anorm or 0.0, float(np.max(np.abs(theta))) if len(theta) else 0.0)
            tol_mult, tol_spur = _cw_tolerances(scale, hi - lo, eps_work)
            mu = _eigh_tridiagonal(a[lo + 1 : hi], b[lo + 1 : hi - 1], vectors=False)[0]
            flags = _cullum_willoughby(theta, mu, bounds, tol_mult, tol_spur)
        else:
            flags = np.zeros(len(theta), np.int8)
        vals.append(theta)
        bnds.append(bounds)
        vecs.append(full)
        flags_all.append(flags)
        block_ids.append(np.full(len(theta), block_id))
    theta = np.concatenate(vals)
    bounds = np.concatenate(bnds)
    s = np.concatenate(vecs, axis=1)
    flags = np.concatenate(flags_all)
    block_of = np.concatenate(block_ids)
    order = np.argsort(theta, kind="stable")
    theta, bounds, s, flags = theta[order], bounds[order], s[:, order], flags[order]
    block_of = block_of[order]
    if filter_ghosts and len(_blocks(b, m)) > 1:  # copies across blocks (restarts)
        # a restart vector orthogonal to a window only re-finds converged eigenvalues: such
        # copies agree to round-off of the Ritz pairs, ~1e3 eps ||A|| (the ghost-warning width)
        scale = max(anorm or 0.0, float(np.max(np.abs(theta))))
        tol_mult = max(_cw_tolerances(scale, m, eps_work)[0], 1e3 * eps_work * scale)
        best = -1  # the kept member of the current group of copies
        for i in np.flatnonzero(flags == 0):
            if best >= 0 and theta[i] - theta[best] <= tol_mult:
                worse, best = (best, i) if bounds[best] > bounds[i] else (i, best)
                flags[worse] = 1
            else:
                best = i
        # a copy still converging in another block: a restart vector that is not orthogonal
        # to an invariant subspace the ring forgot re-finds its eigenvalues, and the copy in
        # progress would displace a wanted eigenvalue. Merged when its interval
        # theta +- bound holds a value another block converged to round-off and lies in
        # that value's own neighbourhood (within half its gap to every other value), so
        # an unresolved interval that could hold a further eigenvalue is kept
        for i in np.flatnonzero((flags == 0) & (bounds > tol_mult)):
            kept = np.flatnonzero(flags == 0)
            done = kept[(bounds[kept] <= tol_mult) & (block_of[kept] != block_of[i])]
            for c in done[np.abs(theta[done] - theta[i]) <= bounds[i]]:
                rest = kept[(kept != c) & (kept != i)]
                gap = np.min(np.abs(theta[rest] - theta[c])) if len(rest) else np.inf
                if abs(theta[i] - theta[c]) + bounds[i] < gap / 2:
                    flags[i] = 1
                    break
    keep = flags == 0
    raw_bounds = bounds
    if complete and np.sum(keep) > 1:
        kv, kb = theta[keep], bounds[keep]
        dist = np.abs(kv[:, None] - kv[None, :]) - kb[None, :]
        np.fill_diagonal(dist, np.inf)
        delta = np.min(dist, axis=1)
        gap_bound = np.where(delta > kb, kb**2 / np.maximum(delta, np.finfo(float).tiny), kb)
        bounds = bounds.copy()
        bounds[keep] = np.minimum(kb, gap_bound)
    return RitzValues(
        values=theta[keep],
        bounds=bounds[keep],
        coeffs=s[:, keep],
        spurious=int(np.sum(flags == 2)),
        copies=int(np.sum(flags == 1)),
        flags=flags,
        raw_values=theta,
        raw_bounds=raw_bounds,
    )


def select(values: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices of the ``k`` wanted values, in the output order of ``which``.

    Args:
        values: ``(n,)`` Ritz values.
        k: number wanted (at most ``n`` are returned).
        which: ``"LA"`` (descending), ``"SA"`` (ascending), ``"LM"`` (by decreasing
            magnitude) or ``"BE"`` (``k // 2`` smallest and the rest largest, ascending, as
            scipy).

    Returns:
        ``(min(k, n),)`` integer indices into ``values``.
    """
    n = len(values)
    k = min(k, n)
    asc = np.argsort(values, kind="stable")
    if which == "LA":
        return asc[::-1][:k]
    if which == "SA":
        return asc[:k]
    if which == "LM":
        return np.argsort(-np.abs(values), kind="stable")[:k]
    n_low = k // 2
    n_high = k - n_low
    high = asc[n - n_high :] if n_high else asc[:0]
    return np.concatenate([asc[:n_low], high])  # BE: ascending, as scipy


def converged_mask(values: np.ndarray, bounds: np.ndarray, tol: float, anorm: float,
                   eps_work: float, floor: float | None = None) -> np.ndarray:
    """``bound <= tol |theta|``, or at the reachable precision (``bound <= floor ||A||``).

    Args:
        values: Ritz values ``theta``.
        bounds: their residual bounds, same shape.
        tol: relative tolerance.
        anorm: estimate of ``||A||``.
        eps_work: machine epsilon of the Lanczos arithmetic.
        floor: relative floor (``Plan.conv_floor``: ``max(10 eps_work, eps_op)``); ``None``:
            ``10 eps_work``.

    Returns:
        Bool array shaped like ``values``.
    """
    rel = 10.0 * eps_work if floor is None else float(floor)
    return bounds <= np.maximum(tol * np.abs(values), rel * anorm)


# ============================================================================================
# In-program pieces (jittable)
# ============================================================================================


def which_scores(theta: Any, valid: Any, which: str, xp: Any = jnp) -> Any:
    """A score per Ritz value: the ``k`` wanted ones are the ``k`` highest (jittable).

    Scores are ``-inf`` where not ``valid``. ``"BE"`` alternates ends (largest, smallest,
    2nd largest, ...), so its top ``k`` are ``k - k // 2`` largest and ``k // 2`` smallest,
    as :func:`select`.

    Args:
        theta: ``(m,)`` Ritz values.
        valid: ``(m,)`` bool, which entries are real Ritz values.
        which: ``"LA"``, ``"SA"``, ``"LM"`` or ``"BE"`` (static).
        xp: the array module, ``jax.numpy`` (in a program) or ``numpy`` (on the host).

    Returns:
        ``(m,)`` scores in ``theta``'s dtype.
    """
    neg = xp.full_like(theta, -np.inf)
    if which == "LA":
        s = theta
    elif which == "SA":
        s = -theta
    elif which == "LM":
        s = xp.abs(theta)
    else:  # BE: rank from each end among the valid values
        big = xp.where(valid, theta, np.inf)
        pos = xp.argsort(xp.argsort(big, stable=True), stable=True)  # ascending rank
        nv = xp.sum(valid).astype(pos.dtype)
        r_hi = nv - 1 - pos
        # ranks are small integers: exact in theta's dtype
        r_f, p_f = r_hi.astype(theta.dtype), pos.astype(theta.dtype)
        s = xp.where(r_hi <= pos, -2.0 * r_f, -2.0 * p_f - 1.0)
    return xp.where(valid, s, neg)


def block_eigh(t: Any, n_valid: Any, xp: Any = np) -> tuple[Any, Any, Any]:
    """:func:`small_eigh`'s computation in array module ``xp`` (``numpy`` or ``jax.numpy``).

    Args:
        t: ``(m, m)`` symmetric projected matrix (entries outside the block are ignored).
        n_valid: int scalar, size of the block.
        xp: the array module.

    Returns:
        ``(theta (m,), s (m, m), valid (m,))`` as :func:`small_eigh`.
    """
    m = t.shape[0]
    inside = xp.arange(m, dtype=xp.asarray(n_valid).dtype) < n_valid
    block = xp.where(inside[:, None] & inside[None, :], t, xp.zeros_like(t))
    gersh = xp.max(xp.sum(xp.abs(block), axis=1))
    sentinel = 2.0 * gersh + 1.0
    padded = block + xp.diag(xp.where(inside, xp.zeros((), t.dtype), sentinel))
    theta, s = xp.linalg.eigh((padded + padded.T) / 2)
    return theta, s, theta < 1.5 * gersh + 0.5


def small_eigh(t: jax.Array, n_valid: jax.Array, solver: str) -> tuple[jax.Array, jax.Array,
                                                                         jax.Array]:
    """Eigenpairs of the leading ``n_valid x n_valid`` block of a padded ``(m, m)`` matrix.

    The padding rows / columns are decoupled and given a sentinel diagonal above the
    Gershgorin bound of the block, so their eigenpairs never mix with the block's; they
    come back marked invalid.

    Args:
        t: ``(m, m)`` symmetric projected matrix (entries outside the block are ignored).
        n_valid: int scalar, size of the block.
        solver: ``"device"`` (``jnp.linalg.eigh`` in ``t``'s dtype: float64 under x64) or
            ``"host"`` (float64 numpy through ``jax.pure_callback``).

    Returns:
        ``(theta (m,), s (m, m), valid (m,))``, ascending ``theta``; columns of ``s`` are
        eigenvectors.
    """
    if solver == "device":
        return block_eigh(t, n_valid, jnp)
    m = t.shape[0]
    shapes = (jax.ShapeDtypeStruct((m,), t.dtype), jax.ShapeDtypeStruct((m, m), t.dtype),
              jax.ShapeDtypeStruct((m,), bool))
    return jax.pure_callback(
        lambda x, n: tuple(np.asarray(y, x.dtype) if y.dtype.kind == "f" else y
                           for y in block_eigh(np.asarray(x, np.float64), int(n))),
        shapes, t, n_valid, vmap_method="sequential",
    )


class CycleAnalysis(NamedTuple):
    """The Ritz analysis of one thick-restart cycle and the set-up of the next one.

    Attributes:
        values: ``(k,)`` wanted Ritz values, most wanted first.
        bounds: ``(k,)`` residual bounds ``|beta_res s_last,i|``.
        conv: ``(k,)`` bool, converged.
        n_valid: number of Ritz values of the filled block.
        coeff: ``(m + 1, keep)`` rotation of the basis onto the ``keep`` best Ritz vectors
            (zero in the residual's row).
        tmat: ``(m + 1, m + 1)`` the next cycle's projected matrix (kept Ritz values on the
            diagonal, arrowhead couplings ``sigma`` in row / column ``keep``).
    """

    values: Any
    bounds: Any
    conv: Any
    n_valid: Any
    coeff: Any
    tmat: Any


def cycle_analysis(tmat: Any, filled: Any, anorm: Any, tol: Any, *, k: int, keep: int,
                   which: str, floor: float, xp: Any = jnp) -> CycleAnalysis:
    """Ritz pairs of the filled ``(filled, filled)`` block, convergence, next arrowhead.

    One implementation for both places it runs: inside the engine's program (``xp`` =
    ``jax.numpy``, float64 under x64) and on the host in float64 (``xp`` = ``numpy``,
    through one ``jax.pure_callback`` per analysis, instead of ~30 small kernels: compile
    1.56 -> 1.22 s for the engine on a trivial operator).

    Args:
        tmat: ``(m + 1, m + 1)`` projected matrix of the cycle.
        filled: rows filled (``j``); ``tmat[filled, filled - 1]`` is the residual coupling.
        anorm: estimate of ``||A||``.
        tol: relative tolerance.
        k: wanted pairs (static).
        keep: Ritz vectors kept at the restart (static).
        which: ``"LA" | "SA" | "BE" | "LM"``.
        floor: relative convergence floor (``Plan.floor``).
        xp: ``jax.numpy`` or ``numpy``.

    Returns:
        :class:`CycleAnalysis` in ``tmat``'s dtype.
    """
    m = tmat.shape[0] - 1
    theta, s, valid = block_eigh(tmat[:m, :m], filled, xp)
    beta_res = tmat[filled, filled - 1]
    last = s[filled - 1]
    order = xp.argsort(-which_scores(theta, valid, which, xp), stable=True)
    wanted = order[:k]
    values, bounds = theta[wanted], xp.abs(beta_res * last[wanted])
    conv = (bounds <= xp.maximum(tol * xp.abs(values), floor * anorm)) & valid[wanted]
    best = order[:keep]
    coeff = xp.pad(s[:, best], ((0, 1), (0, 0)))
    # next cycle: diag(theta_best) with the arrowhead sigma = beta_res * last in row keep
    th = xp.pad(theta[best], (0, m + 1 - keep))
    sg = xp.pad(beta_res * last[best], (0, m + 1 - keep))
    i, j = xp.arange(m + 1)[:, None], xp.arange(m + 1)[None, :]
    zero = xp.zeros((), tmat.dtype)
    nxt = (xp.where((i == j) & (i < keep), th[i], zero)
           + xp.where((i == keep) & (j < keep), sg[j], zero)
           + xp.where((j == keep) & (i < keep), sg[i], zero))
    return CycleAnalysis(values, bounds, conv, xp.sum(valid).astype(xp.int32), coeff, nxt)


def cycle_analysis_host(tmat: jax.Array, filled: jax.Array, anorm: jax.Array, tol: jax.Array,
                        *, k: int, keep: int, which: str, floor: float) -> CycleAnalysis:
    """:func:`cycle_analysis` in float64 numpy through one ``jax.pure_callback``.

    Args:
        tmat: ``(m + 1, m + 1)`` projected matrix (traced).
        filled: rows filled (traced int).
        anorm: estimate of ``||A||`` (traced).
        tol: relative tolerance (traced).
        k: wanted pairs (static).
        keep: Ritz vectors kept at the restart (static).
        which: ``"LA" | "SA" | "BE" | "LM"``.
        floor: relative convergence floor.

    Returns:
        :class:`CycleAnalysis`, arrays in ``tmat``'s dtype (``conv`` bool, ``n_valid``
        int32).
    """
    m1 = tmat.shape[0]
    dt = tmat.dtype

    def host(t, f, a, tl):
        out = cycle_analysis(np.asarray(t, np.float64), int(f), float(a), float(tl), k=k,
                             keep=keep, which=which, floor=floor, xp=np)
        return CycleAnalysis(*(np.asarray(x, dt) if np.asarray(x).dtype.kind == "f"
                               else np.asarray(x) for x in out))

    shapes = CycleAnalysis(
        jax.ShapeDtypeStruct((k,), dt), jax.ShapeDtypeStruct((k,), dt),
        jax.ShapeDtypeStruct((k,), bool), jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((m1, keep), dt), jax.ShapeDtypeStruct((m1, m1), dt),
    )
    return jax.pure_callback(host, shapes, tmat, filled, anorm.astype(dt), tol.astype(dt),
                             vmap_method="sequential")
