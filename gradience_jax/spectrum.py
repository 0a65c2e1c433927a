"""Extreme eigenvalues of curvature operators: ``eigsh``, ``compute_spectrum``, quality checks.

The Lanczos iterations run on device in jitted ``lax.scan`` chunks
(:mod:`gradience_jax.lanczos`); between chunks the host solves the small tridiagonal (or,
after a thick restart, arrowhead-plus-tridiagonal) eigenproblem in float64 with numpy,
removes Lanczos "ghosts" by the Cullum-Willoughby test (``reorth="window"`` / ``"none"``)
and stops once the ``k`` wanted Ritz values meet ``tol``.

``eigsh_fast`` is the fully jittable variant for train steps: static ``num_iters``, a
warm-start vector, arrays out, no Python warnings; it solves the tridiagonal problem with
``jnp.linalg.eigh`` in the available precision (float32 unless ``jax_enable_x64``).

References:
    J. Cullum & R. Willoughby (1985), *Lanczos Algorithms for Large Symmetric Eigenvalue
    Computations*, vol. 1, ch. 4 (identification test for spurious Ritz values);
    K. Wu & H. Simon (2000), "Thick-restart Lanczos method for large symmetric eigenvalue
    problems", SIAM J. Matrix Anal. Appl. 22(2); B. Parlett (1998), *The Symmetric
    Eigenvalue Problem* (residual bounds ``|beta_m s_mi|``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from gradience_jax._json import jsonable
from gradience_jax import tree as tu
from gradience_jax.lanczos import (
    REORTH_MODES,
    LanczosState,
    _scalar_dtype,
    _to_like,
    _to_work,
    _zeros_work,
    basis_dot,
    check_operator_output,
    check_reorth,
    check_vector,
    default_breakdown_tol,
    host_random_vector,
    lanczos_init,
    random_vector,
    lanczos_run,
)
from gradience_jax.operators.base import LinearOperator

PyTree = Any

WHICH = ("LA", "SA", "BE", "LM")
OPERATORS = ("hessian", "ggn", "empirical_fisher", "ef", "mc_fisher", "kfac")
REGULARIZATION_MODES = ("off", "fixed", "relative", "auto")
#: default memory for a stored Lanczos basis when the device does not report its size
DEFAULT_MEMORY_BUDGET_BYTES = 2 * 1024**3
#: a full Gram matrix of the basis is measured when ``rows^2 * P`` is at most this
GRAM_CHECK_MAX_FLOPS = 1e8

__all__ = [
    "FastEigshResult",
    "LanczosConfig",
    "SpectrumResult",
    "compute_spectrum",
    "eigsh",
    "eigsh_fast",
    "ritz_values",
]


# ============================================================================================
# Host-side tridiagonal analysis (numpy float64)
# ============================================================================================


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
    """Dense symmetric tridiagonal ``T`` (float64) from ``alphas (m,)`` and ``betas (m-1,)``."""
    a = np.asarray(alphas, np.float64)
    b = np.asarray(betas, np.float64)[: max(len(a) - 1, 0)]
    return np.diag(a) + np.diag(b, 1) + np.diag(b, -1)


def _eigh_tridiagonal(d: np.ndarray, e: np.ndarray, vectors: bool = True):
    """Eigenpairs of the symmetric tridiagonal ``(d, e)`` (LAPACK stemr via scipy, float64).

    Much faster than a dense ``eigh`` for long runs (``O(m^2)``)."""
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
    """Flags per ascending Ritz value: 0 keep, 1 copy (merged), 2 spurious."""
    m = len(theta)
    flags = np.zeros(m, np.int8)
    i = 0
    while i < m:
        j = i
        while j + 1 < m and theta[j + 1] - theta[j] <= tol_mult:
            j += 1
        if j > i:  # a numerically multiple eigenvalue of T: genuine, keep the best copy
            best = i + int(np.argmin(bounds[i : j + 1]))
            flags[i : j + 1] = 1
            flags[best] = 0
        elif len(mu) and np.min(np.abs(mu - theta[i])) <= tol_spur:
            flags[i] = 2  # simple and an eigenvalue of T-hat: spurious
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
    arrow: tuple[np.ndarray, np.ndarray] | None = None,
    dropped: np.ndarray | None = None,
) -> RitzValues:
    """Ritz values, residual bounds and ``T``-eigenvectors from a Lanczos run (float64).

    Args:
        alphas: ``(m,)`` diagonal (entries of a thick-restart block are ignored).
        betas: ``(m,)``; ``betas[:m-1]`` off-diagonal, ``betas[m-1]`` the residual norm.
        filter_ghosts: apply the Cullum-Willoughby test per unreduced block and merge
            numerically multiple copies (for runs that lost orthogonality).
        eps_work: machine epsilon of the Lanczos arithmetic (default float64's).
        anorm: estimate of ``||A||`` (default ``max |theta|``).
        arrow: ``(theta, sigma)`` of a thick restart: ``T[:l, :l] = diag(theta)``,
            ``T[l, :l] = sigma``, tridiagonal from row ``l`` on.
        dropped: ``(m,)`` the ``beta_j`` dropped where a breakdown closed a block (its
            residual bound); zeros if ``None``.

    Returns:
        :class:`RitzValues`.
    """
    a = np.asarray(alphas, np.float64)
    b = np.asarray(betas, np.float64)
    m = len(a)
    eps_work = float(np.finfo(np.float64).eps) if eps_work is None else float(eps_work)
    if arrow is not None:
        theta_k, sigma = (np.asarray(x, np.float64) for x in arrow)
        lk = len(theta_k)
        t = tridiagonal(a, b)
        t[:lk, :lk] = np.diag(theta_k)
        t[lk, :lk] = sigma
        t[:lk, lk] = sigma
        theta, s = scipy.linalg.eigh(t)
        bounds = np.abs(b[m - 1] * s[m - 1])
        return RitzValues(theta, bounds, s, 0, 0, np.zeros(m, np.int8), theta, bounds)
    vals, bnds, vecs, flags_all = [], [], [], []
    for lo, hi in _blocks(b, m):
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
    theta = np.concatenate(vals)
    bounds = np.concatenate(bnds)
    s = np.concatenate(vecs, axis=1)
    flags = np.concatenate(flags_all)
    order = np.argsort(theta, kind="stable")
    theta, bounds, s, flags = theta[order], bounds[order], s[:, order], flags[order]
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
    keep = flags == 0
    return RitzValues(
        values=theta[keep],
        bounds=bounds[keep],
        coeffs=s[:, keep],
        spurious=int(np.sum(flags == 2)),
        copies=int(np.sum(flags == 1)),
        flags=flags,
        raw_values=theta,
        raw_bounds=bounds,
    )


def _select(values: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices of the ``k`` wanted values, in the output order of ``which``."""
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


def _converged(values: np.ndarray, bounds: np.ndarray, tol: float, anorm: float,
               eps_work: float) -> np.ndarray:
    """``bound <= tol |theta|``, or at working precision (``bound <= 10 eps ||A||``)."""
    return bounds <= np.maximum(tol * np.abs(values), 10.0 * eps_work * anorm)


# ============================================================================================
# Jitted pieces (the operator is an argument: new params of the same shapes reuse programs)
# ============================================================================================


@functools.partial(jax.jit, static_argnames=("capacity", "reorth", "window", "rows"))
def _init_jit(op, v0, key, capacity, reorth, window, rows):
    return lanczos_init(op, v0, capacity, reorth, window, key=key, rows=rows)


def _start(op: LinearOperator, v0: PyTree | None, key: jax.Array) -> tuple[PyTree, jax.Array]:
    """Start vector (host-drawn normal from ``fold_in(key, 0)`` unless given) and restart key."""
    if v0 is None:
        v0 = host_random_vector(jax.random.fold_in(key, 0), op.params_like)
    return v0, jax.random.fold_in(key, 1)


@functools.partial(jax.jit, static_argnames=("num_steps", "reorth"), donate_argnums=(1,))
def _run_jit(op, state, num_steps, reorth):
    return lanczos_run(op, state, num_steps, reorth)


@functools.partial(jax.jit, static_argnames=("num_steps", "reorth"), donate_argnums=(1, 3))
def _run_acc_jit(op, state, coeffs, acc, num_steps, reorth):
    return lanczos_run(op, state, num_steps, reorth, ritz_coeffs=coeffs, ritz_acc=acc)


def _grown_capacity(needed: int, cap: int) -> int:
    """Rows for a growing full-reorth basis: the next power of two >= ``needed`` (at least
    32), at most ``cap``, so that a run compiles for a few sizes only."""
    return min(cap, max(32, 1 << (max(needed, 1) - 1).bit_length()))


@functools.partial(jax.jit, static_argnames=("capacity",))
def _grow_jit(state: LanczosState, capacity: int) -> LanczosState:
    """``state`` with its per-iteration buffers and full basis padded to ``capacity``."""
    def pad(x):
        return jnp.pad(x, [(0, capacity - x.shape[0])] + [(0, 0)] * (x.ndim - 1))

    return state._replace(
        alphas=pad(state.alphas), betas=pad(state.betas), breakdowns=pad(state.breakdowns),
        dropped=pad(state.dropped), orthogonality=pad(state.orthogonality),
        asymmetry=pad(state.asymmetry), basis=jax.tree_util.tree_map(pad, state.basis),
    )


@functools.partial(jax.jit, donate_argnums=(0,))
def _thick_restart_jit(state: LanczosState, keep: jax.Array) -> LanczosState:
    """Rotate the basis to the kept Ritz vectors ``Y = Q keep`` and continue from ``q``."""
    nrows = keep.shape[0]
    lk = keep.shape[1]

    def rot(b):
        y = jnp.tensordot(keep.T.astype(b.dtype), b, axes=1)
        return jnp.concatenate([y, jnp.zeros((nrows - lk,) + b.shape[1:], b.dtype)])

    return state._replace(
        basis=jax.tree_util.tree_map(rot, state.basis),
        q_prev=jax.tree_util.tree_map(jnp.zeros_like, state.q_prev),
        aq_prev=jax.tree_util.tree_map(jnp.zeros_like, state.aq_prev),
        beta=jnp.zeros_like(state.beta),
        step=jnp.asarray(lk, state.step.dtype),
    )


def _normalize_stack(vecs: PyTree) -> tuple[PyTree, jax.Array]:
    sq = sum(
        jnp.sum(jnp.reshape(x.astype(tu.accumulation_dtype(x.dtype)) ** 2, (x.shape[0], -1)), 1)
        for x in jax.tree_util.tree_leaves(vecs)
    )
    nrm = jnp.sqrt(sq)
    inv = 1.0 / jnp.maximum(nrm, jnp.finfo(nrm.dtype).tiny)
    return jax.tree_util.tree_map(
        lambda x: x * inv.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1)), vecs
    ), nrm


def _gram(basis: PyTree) -> jax.Array:
    parts = [
        jnp.tensordot(b, b, axes=(tuple(range(1, b.ndim)), tuple(range(1, b.ndim))))
        for b in jax.tree_util.tree_leaves(basis)
    ]
    return sum(parts[1:], parts[0])


def _true_residuals(mv: Callable, like: PyTree, vecs: PyTree, values: jax.Array) -> jax.Array:
    """``||A y_i - theta_i y_i||`` for a stack of vectors (``lax.map`` over the stack)."""

    def one(args):
        y, lam = args
        ay = _to_work(mv(_to_like(y, like)))
        return tu.norm(tu.sub(ay, tu.scale(lam.astype(_scalar_dtype(like)), y)))

    return jax.lax.map(one, (vecs, values))


@functools.partial(jax.jit, static_argnames=("vectors", "true_res", "basis_check"))
def _post_jit(op, basis, q, coeffs, values, acc, vectors, true_res, basis_check):
    """One program for everything after the Lanczos run.

    ``vectors``: ``None`` | ``"basis"`` (``Y = coeffs^T B``) | ``"acc"`` (second-pass stack);
    ``basis_check``: ``None`` | ``"gram"`` (``B B^T``) | ``"dots"`` (``B^T q``).
    """
    out = {}
    if vectors is not None:
        if vectors == "basis":
            vecs = jax.tree_util.tree_map(
                lambda b: jnp.tensordot(coeffs.T.astype(b.dtype), b, axes=1), basis
            )
        else:
            vecs = acc
        vecs, _ = _normalize_stack(vecs)
        out["vecs"] = vecs
        out["overlap"] = _gram(vecs)
        if true_res:
            out["res"] = _true_residuals(op.bind(), op.params_like, vecs, values)
    if basis_check == "gram":
        out["gram"] = _gram(basis)
    elif basis_check == "dots":
        out["dots"] = basis_dot(basis, q)
    return out


class _Host(NamedTuple):
    alphas: np.ndarray
    betas: np.ndarray
    orthogonality: np.ndarray
    asymmetry: np.ndarray
    breakdowns: np.ndarray
    dropped: np.ndarray
    anorm: float
    step: int


def _host(state: LanczosState) -> _Host:
    """The small arrays of a state, fetched to the host in one transfer (float64)."""
    a, b, o, s, br, dr, an, st = jax.device_get(
        (state.alphas, state.betas, state.orthogonality, state.asymmetry, state.breakdowns,
         state.dropped, state.anorm, state.step)
    )
    f = lambda x: np.asarray(x, np.float64)  # noqa: E731
    return _Host(f(a), f(b), f(o), f(s), np.asarray(br, bool), f(dr), float(an), int(st))


# ============================================================================================
# Results
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class SpectrumResult:
    """Extreme eigenvalues of an operator with diagnostics (host values; JSON via ``to_dict``).

    Attributes:
        eigenvalues: ``(k,)`` float64 in the order of ``which`` (``LA`` descending, ``SA``
            ascending, ``LM`` by decreasing magnitude, ``BE`` ascending as scipy).
        eigenvectors: ``None`` or a pytree stack (leaves ``(k, *leaf.shape)``, unit norm).
        operator: operator name; is_psd: PSD by construction; n_params: dimension.
        iterations: Lanczos iterations (first pass); operator_calls: all matvecs
            (including the Ritz-vector pass and true residuals).
        converged: all ``k`` meet ``ritz_residuals <= tol * |eigenvalue|``;
            converged_mask: per eigenvalue.
        ritz_residuals: ``(k,)`` residual bounds ``|beta_m s_{m,i}|`` from the Lanczos relation.
        true_residuals: ``(k,)`` ``||A y - lambda y||`` when eigenvectors were formed.
        orthogonality_loss: measured ``max |<q_i, q_j>|`` (``i != j``) over what was stored
            and ``|<q_0, q_j>|`` for every ``j``.
        ghosts_removed: Ritz values removed by the Cullum-Willoughby test (spurious or
            merged copies).
        breakdowns: restarts after an invariant subspace was found.
        regularization_applied: shift added to the eigenvalues (PSD operators only).
        warnings: quality warnings (strings a person can act on).
    """

    eigenvalues: np.ndarray
    eigenvectors: PyTree | None
    operator: str
    is_psd: bool
    iterations: int
    converged: bool
    n_params: int
    seed: int | None
    reorth_mode: str
    regularization_applied: float
    warnings: tuple[str, ...]
    ritz_residuals: np.ndarray
    operator_calls: int
    wall_time_s: float
    which: str = "LA"
    k: int = 0
    tol: float = 0.0
    converged_mask: np.ndarray | None = None
    true_residuals: np.ndarray | None = None
    orthogonality_loss: float = 0.0
    asymmetry: float = 0.0
    ghosts_removed: int = 0
    breakdowns: int = 0
    restarts: int = 0
    window: int | None = None
    dtype: str = ""

    # -- PSD metrics ------------------------------------------------------------------------
    @property
    def max_eigenvalue(self) -> float:
        return float(np.max(self.eigenvalues))

    @property
    def min_eigenvalue(self) -> float:
        return float(np.min(self.eigenvalues))

    @property
    def spectral_gap(self) -> float | None:
        """``lambda_1 - lambda_2`` of the computed values (descending)."""
        if len(self.eigenvalues) < 2:
            return None
        s = np.sort(self.eigenvalues)[::-1]
        return float(s[0] - s[1])

    @property
    def ritz_condition_number(self) -> float:
        """``max / min`` of the computed values (``inf`` if the smallest is ``<= 0``)."""
        lo = self.min_eigenvalue
        return float(self.max_eigenvalue / lo) if lo > 0 else float("inf")

    @property
    def ritz_effective_rank(self) -> float:
        """``exp(entropy(p))``, ``p = lambda / sum(lambda)`` over the positive computed values
        (Roy & Vetterli 2007); between 1 and ``k``."""
        lam = self.eigenvalues[self.eigenvalues > 0]
        if lam.size == 0:
            return 0.0
        p = lam / lam.sum()
        return float(np.exp(-np.sum(p * np.log(p))))

    # -- indefinite metrics -----------------------------------------------------------------
    @property
    def has_negative_eigenvalues(self) -> bool:
        return bool(np.any(self.eigenvalues < 0))

    @property
    def n_negative(self) -> int:
        return int(np.sum(self.eigenvalues < 0))

    @property
    def range_ratio(self) -> float:
        """``|lambda_max| / |lambda_min|`` of the computed values (``inf`` if 0)."""
        lo = abs(self.min_eigenvalue)
        return float(abs(self.max_eigenvalue) / lo) if lo > 0 else float("inf")

    @property
    def sharpness_score(self) -> float:
        """``max |lambda|`` of the computed values."""
        return float(np.max(np.abs(self.eigenvalues)))

    @property
    def negative_fraction(self) -> float:
        return self.n_negative / max(len(self.eigenvalues), 1)

    @property
    def negative_mass(self) -> float:
        """``sum |lambda_neg| / sum |lambda|`` over the computed values."""
        total = float(np.sum(np.abs(self.eigenvalues)))
        neg = float(np.sum(np.abs(self.eigenvalues[self.eigenvalues < 0])))
        return neg / total if total > 0 else 0.0

    @property
    def most_negative_eigenvalue(self) -> float | None:
        return self.min_eigenvalue if self.has_negative_eigenvalues else None

    def metrics(self) -> dict[str, Any]:
        """The PSD metrics (PSD operators) or the indefinite ones (others)."""
        if self.is_psd:
            return {
                "max_eigenvalue": self.max_eigenvalue,
                "min_eigenvalue": self.min_eigenvalue,
                "spectral_gap": self.spectral_gap,
                "ritz_condition_number": self.ritz_condition_number,
                "ritz_effective_rank": self.ritz_effective_rank,
            }
        return {
            "max_eigenvalue": self.max_eigenvalue,
            "min_eigenvalue": self.min_eigenvalue,
            "has_negative_eigenvalues": self.has_negative_eigenvalues,
            "n_negative": self.n_negative,
            "range_ratio": self.range_ratio,
            "sharpness_score": self.sharpness_score,
            "negative_fraction": self.negative_fraction,
            "negative_mass": self.negative_mass,
            "most_negative_eigenvalue": self.most_negative_eigenvalue,
        }

    def to_dict(self, include_eigenvectors: bool = False) -> dict[str, Any]:
        """JSON-safe dict (non-finite floats become ``None``).

        ``eigenvectors`` is ``None`` unless ``include_eigenvectors`` (then
        ``{leaf path: nested lists}``; large for big models).
        """
        vecs = None
        if include_eigenvectors and self.eigenvectors is not None:
            vecs = {
                tu.path_str(p) or "<root>": np.asarray(x, np.float64)
                for p, x in jax.tree_util.tree_flatten_with_path(self.eigenvectors)[0]
            }
        out = {
            "eigenvalues": self.eigenvalues,
            "eigenvectors": vecs,
            "operator": self.operator,
            "is_psd": self.is_psd,
            "iterations": self.iterations,
            "converged": self.converged,
            "n_params": self.n_params,
            "seed": self.seed,
            "reorth_mode": self.reorth_mode,
            "regularization_applied": self.regularization_applied,
            "warnings": list(self.warnings),
            "ritz_residuals": self.ritz_residuals,
            "operator_calls": self.operator_calls,
            "wall_time_s": self.wall_time_s,
            "which": self.which,
            "k": self.k,
            "tol": self.tol,
            "converged_mask": self.converged_mask,
            "true_residuals": self.true_residuals,
            "orthogonality_loss": self.orthogonality_loss,
            "asymmetry": self.asymmetry,
            "ghosts_removed": self.ghosts_removed,
            "breakdowns": self.breakdowns,
            "restarts": self.restarts,
            "window": self.window,
            "dtype": self.dtype,
        }
        out.update(self.metrics())
        return jsonable(out)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

    def __repr__(self) -> str:
        vals = ", ".join(f"{v:.6g}" for v in self.eigenvalues[:10])
        max_res = float(np.max(self.ritz_residuals)) if len(self.ritz_residuals) else 0.0
        more = ", ..." if len(self.eigenvalues) > 10 else ""
        status = "converged" if self.converged else (
            f"NOT converged ({int(np.sum(~np.asarray(self.converged_mask)))}/{self.k} open)"
            if self.converged_mask is not None else "NOT converged")
        lines = [
            f"SpectrumResult({self.operator}, n_params={self.n_params:,}, "
            f"{'PSD' if self.is_psd else 'indefinite'}, which={self.which!r}, k={self.k})",
            f"  eigenvalues: [{vals}{more}]",
            f"  {status} after {self.iterations} iterations, {self.operator_calls} matvecs, "
            f"{self.wall_time_s:.3g} s; reorth={self.reorth_mode!r}"
            + (f" (window {self.window})" if self.reorth_mode == "window" else ""),
            f"  max ritz residual {max_res:.2e}, orthogonality loss "
            f"{self.orthogonality_loss:.1e}, ghosts removed {self.ghosts_removed}",
        ]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# ============================================================================================
# Quality checks
# ============================================================================================


def _quality_warnings(
    *,
    values: np.ndarray,
    bounds: np.ndarray,
    conv: np.ndarray,
    k: int,
    iterations: int,
    tol: float,
    reorth: str,
    orth_loss: float,
    asym: float,
    anorm: float,
    eps_work: float,
    eps_op: float,
    filter_ghosts: bool,
    ghost_flags: np.ndarray | None,
    eigenvectors_overlap: np.ndarray | None,
    fixed_iters: bool,
    restarts: int,
    n_params: int,
) -> list[str]:
    out = []
    if not np.all(conv):
        bad = np.flatnonzero(~conv)
        worst = float(np.max(bounds[bad] / np.maximum(np.abs(values[bad]), 1e-300)))
        knob = "num_iters" if fixed_iters else "max_iters"
        out.append(
            f"not converged: {len(bad)} of {k} eigenvalues have Ritz residual > tol * |lambda| "
            f"(tol={tol:g}, worst relative residual {worst:.2e}); increase {knob}, loosen tol, "
            "or use reorth='full'"
        )
    if iterations < min(3 * k, n_params) and restarts == 0:
        out.append(
            f"only {iterations} Lanczos iterations for k={k} (< 3k = {3 * k}): clustered "
            "eigenvalues may be missed even when the residuals are small; raise the iteration "
            "count to at least 3k"
        )
    # ghosts / repeated eigenvalues among the reported values
    order = np.argsort(values)
    sv = values[order]
    close_tol = 1e3 * eps_work * max(anorm, 1e-300)
    pairs = [
        (int(order[i]), int(order[i + 1]))
        for i in range(len(sv) - 1)
        if sv[i + 1] - sv[i] <= close_tol
    ]
    n_flagged = int(np.sum(ghost_flags != 0)) if ghost_flags is not None else 0
    if reorth != "full" and (pairs or n_flagged):
        if eigenvectors_overlap is not None:
            pairs = [(i, j) for i, j in pairs if abs(eigenvectors_overlap[i, j]) > 0.5]
        if pairs or n_flagged:
            desc = ", ".join(f"{values[i]:.10g}~{values[j]:.10g}" for i, j in pairs[:3])
            out.append(
                f"ghost eigenvalues: {len(pairs)} pair(s) of reported eigenvalues closer than "
                f"{close_tol:.1e} ({desc}) and {n_flagged} reported value(s) flagged spurious "
                f"by the Cullum-Willoughby test; reorth={reorth!r} lost orthogonality "
                "(copies of converged eigenvalues are not true multiplicities). Use "
                "filter_ghosts=True, reorth='window' or reorth='full'"
            )
    elif reorth == "full" and pairs and orth_loss > math.sqrt(eps_work):
        out.append(
            f"repeated eigenvalues: {len(pairs)} pair(s) closer than {close_tol:.1e} while the "
            f"basis lost orthogonality ({orth_loss:.1e}): they may be ghosts, not true "
            "multiplicities; pass return_eigenvectors=True and check their overlap"
        )
    orth_thresh = math.sqrt(eps_work)
    if orth_loss > orth_thresh and (reorth == "full" or not filter_ghosts):
        out.append(
            f"loss of orthogonality: measured max |<q_i, q_j>| = {orth_loss:.2e} > "
            f"{orth_thresh:.1e} with reorth={reorth!r}; "
            + ("the operator may be non-symmetric or badly scaled"
               if reorth == "full" else "enable filter_ghosts or use reorth='full'")
        )
    asym_thresh = math.sqrt(max(eps_op, eps_work)) * max(anorm, 1e-300)
    if asym > asym_thresh:
        out.append(
            f"tridiagonal asymmetry: |<q_(j-1), A q_j> - <q_j, A q_(j-1)>| reached {asym:.2e} "
            f"(> {asym_thresh:.1e} = sqrt(eps) ||A||): the operator is not symmetric at its "
            "working precision (check the matvec, or compute in float32 / float64)"
        )
    return out


# ============================================================================================
# eigsh
# ============================================================================================


def _check_int(name: str, value: Any, lo: int) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def default_memory_budget() -> int:
    """Bytes a stored Lanczos basis may use: 25% of device memory if reported, else 2 GiB."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # backends without memory stats
        stats = {}
    limit = stats.get("bytes_limit")
    return int(limit * 0.25) if limit else DEFAULT_MEMORY_BUDGET_BYTES


def _row_bytes(like: PyTree) -> int:
    return int(
        sum(int(np.prod(s.shape)) * jnp.dtype(jnp.promote_types(s.dtype, jnp.float32)).itemsize
            for s in jax.tree_util.tree_leaves(like))
    )


def _check_finite(h: _Host, m0: int, op_name: str) -> None:
    a, b = h.alphas[m0 : h.step], h.betas[m0 : h.step]
    bad = np.flatnonzero(~(np.isfinite(a) & np.isfinite(b)))
    if bad.size:
        raise ValueError(
            f"the {op_name} operator's matvec returned non-finite values (NaN / Inf) at Lanczos "
            f"iteration {m0 + int(bad[0])}: check the loss / model at these params (or the "
            "operator's dtype: bf16 / fp16 overflow)"
        )


class _Run(NamedTuple):
    state: LanczosState
    host: _Host
    steps: int
    chunks: list
    ritz: RitzValues
    idx: np.ndarray
    restarts: int
    orth: float
    asym: float
    breakdowns: int
    anorm: float


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
) -> SpectrumResult:
    """``k`` extreme eigenvalues (and optionally eigenvectors) of a symmetric operator.

    Lanczos on device in jitted ``lax.scan`` chunks, float64 tridiagonal eigensolve on the
    host between chunks. With ``num_iters=None`` the run is convergence-driven: it stops
    when the ``k`` wanted Ritz values have residual bound ``|beta_m s_mi| <= tol *
    max(|theta_i|, eps^(2/3) ||A||)`` or after ``max_iters`` iterations. With
    ``reorth="full"`` and a basis larger than ``memory_budget_bytes``, it thick-restarts
    (Wu & Simon 2000) instead of growing the basis. ``"window"`` / ``"none"`` runs are
    filtered for ghost Ritz values by the Cullum-Willoughby test and, for eigenvectors,
    regenerate the Lanczos vectors in a second pass from the same start vector.

    Cost: ``iterations`` matvecs (x2 for eigenvectors with ``"window"`` / ``"none"``, plus
    ``k`` for true residuals). Memory: ``rows x P`` (``rows = max_iters`` or the budget for
    ``"full"``, ``window`` for ``"window"``, 3 for ``"none"``) plus ``k x P`` for vectors.

    Args:
        op: symmetric :class:`LinearOperator`.
        k: number of eigenvalues, ``1 <= k <= n_params``.
        num_iters: fixed iteration count (``>= k``); ``None``: convergence-driven.
        which: ``"LA"`` largest, ``"SA"`` smallest, ``"BE"`` both ends (``k // 2`` smallest
            and the rest largest, ascending), ``"LM"`` largest magnitude.
        reorth: ``"full"``, ``"window"`` or ``"none"``.
        window: ring-buffer size for ``"window"`` (default 8, >= 2).
        key: PRNG key for the start vector and restarts (default ``jax.random.key(42)``).
        tol: relative residual tolerance.
        return_eigenvectors: also return unit Ritz vectors (a pytree stack, leading axis k).
        v0: start vector (warm start) instead of a random one.
        max_iters: cap for the convergence-driven run (default ``max(10 k, 100)``, at most
            ``n_params`` for ``"full"`` without restarts).
        memory_budget_bytes: bytes for the stored basis (default :func:`default_memory_budget`).
        filter_ghosts: Cullum-Willoughby filtering (default: on for ``"window"`` / ``"none"``).
        true_residuals: compute ``||A y - lambda y||`` (default: with eigenvectors).
        chunk: iterations per jitted chunk between convergence checks (default ``max(20, k)``).
        seed: recorded in the result (informational).

    Returns:
        :class:`SpectrumResult`.

    Raises:
        ValueError: bad ``k`` / ``num_iters`` / ``which`` / ``reorth`` / ``window`` / ``tol``,
            a matvec whose output does not match the params, non-finite matvec values.
    """
    t_start = time.perf_counter()
    if not isinstance(op, LinearOperator):
        raise TypeError(f"op must be a gradience_jax.LinearOperator, got {type(op).__name__}")
    n = op.n_params
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer with 1 <= k <= n_params={n}, got {k!r}")
    k = int(k)
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    win = check_reorth(reorth, window)
    if not (isinstance(tol, (int, float, np.floating)) and tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a positive finite float, got {tol!r}")
    # once the stored rows can span the whole space, n iterations are exact and a restart
    # vector orthogonal to them is round-off: runs stop there
    exhaustible = reorth == "full" or (reorth == "window" and win >= n)
    if num_iters is not None:
        num_iters = _check_int("num_iters", num_iters, 1)
        if num_iters < k:
            raise ValueError(f"num_iters={num_iters} must be >= k={k}")
        if num_iters > n and exhaustible:
            raise ValueError(
                f"num_iters={num_iters} exceeds n_params={n} with reorth={reorth!r} storing "
                f"{n if reorth == 'full' else win} vectors: {n} iterations already span the "
                "whole space and a re-orthogonalised basis cannot hold more vectors than the "
                "dimension; use num_iters <= n_params"
            )
    if max_iters is not None:
        max_iters = _check_int("max_iters", max_iters, 1)
        if max_iters < k:
            raise ValueError(f"max_iters={max_iters} must be >= k={k}")
    filter_ghosts = (reorth != "full") if filter_ghosts is None else bool(filter_ghosts)
    true_residuals = return_eigenvectors if true_residuals is None else bool(true_residuals)
    key = jax.random.key(42) if key is None else key
    like = op.params_like
    check_operator_output(op, like)
    if v0 is not None:
        check_vector(v0, like, "v0", f"the {op.name} operator's params")
    sdt = _scalar_dtype(like)
    eps_work = float(jnp.finfo(sdt).eps)
    eps_op = float(jnp.finfo(op.dtype).eps) if jnp.issubdtype(op.dtype, jnp.floating) else eps_work
    bd_tol = default_breakdown_tol(like)
    budget = default_memory_budget() if memory_budget_bytes is None else int(memory_budget_bytes)
    rows_fit = max(budget // max(_row_bytes(like), 1), 0)

    # -- plan ------------------------------------------------------------------------------
    fixed = num_iters is not None
    cap = num_iters if fixed else (max_iters if max_iters is not None else max(10 * k, 100))
    thick = False
    nb = 0
    if not fixed and cap > n and exhaustible:
        cap = n
    if reorth == "full":
        if cap > rows_fit:
            if fixed:
                raise ValueError(
                    f"num_iters={num_iters} with reorth='full' needs {num_iters} stored vectors "
                    f"({num_iters * _row_bytes(like) / 2**20:.0f} MiB) > memory budget "
                    f"{budget / 2**20:.0f} MiB: use num_iters=None (thick restart), "
                    "reorth='window', or raise memory_budget_bytes"
                )
            thick = True
            nb = min(rows_fit, n)
            if nb < 2 * k + 2:
                raise ValueError(
                    f"memory budget {budget / 2**20:.1f} MiB holds {rows_fit} vectors: thick "
                    f"restart needs at least 2k+2 = {2 * k + 2}; raise memory_budget_bytes or "
                    "use reorth='window'"
                )
            cap = max_iters if max_iters is not None else max(10 * k, 100)
    if chunk is None:  # ~max(20, k) iterations per chunk, splitting the cap evenly
        c0 = max(20, k)
        chunk = -(-cap // -(-cap // c0))
    else:
        chunk = _check_int("chunk", chunk, 1)
    min_iters = min(cap, 3 * k)
    capacity = nb if thick else cap
    grow = reorth == "full" and not thick and not fixed
    if grow:  # the basis grows with the run (each reorth pass reads every stored row)
        capacity = _grown_capacity(min(max(min_iters, chunk), cap), cap)
    rows = nb if thick else (capacity if reorth == "full" else None)
    wopt = win if reorth == "window" else None

    v0, key_r = _start(op, v0, key)
    state = _init_jit(op, v0, key_r, capacity, reorth, wopt, rows)
    run = _lanczos_loop(
        op, state, k=k, which=which, reorth=reorth, tol=tol, fixed=fixed, cap=cap,
        chunk=chunk, min_iters=min_iters, thick=thick, nb=nb,
        filter_ghosts=filter_ghosts, eps_work=eps_work, bd_tol=bd_tol,
        n_exhaust=n if exhaustible and not thick else None, grow=grow,
    )
    capacity = int(run.state.alphas.shape[0])
    calls = run.steps
    ritz, idx = run.ritz, run.idx
    values = ritz.values[idx]
    bounds = ritz.bounds[idx]
    conv = _converged(values, bounds, tol, run.anorm, eps_work)
    m = run.host.step

    # -- eigenvectors, true residuals, measured orthogonality (one program) ---------------
    warn_extra = []
    want_vecs = (return_eigenvectors or true_residuals) and len(idx) > 0
    vectors, acc, coeffs_dev = None, None, None
    if want_vecs:
        coeffs = np.zeros((capacity, len(idx)))
        coeffs[: ritz.coeffs.shape[0]] = ritz.coeffs[:, idx]
        coeffs_dev = jnp.asarray(coeffs, sdt)
        if reorth == "full":
            vectors = "basis"
        else:
            vectors = "acc"
            acc, dev = _second_pass(op, v0, key_r, capacity, reorth, wopt, run.chunks, coeffs_dev,
                                    run.host)
            calls += run.steps
            if dev > 1e3 * eps_work:
                warn_extra.append(
                    f"the second Lanczos pass (Ritz vectors) diverged from the first by {dev:.1e} "
                    "(relative, in alphas): eigenvectors may be inaccurate; use reorth='full'"
                )
    rows_used = 0 if reorth == "none" else (min(m, capacity) if reorth == "full" else min(m, win))
    if rows_used > 1:
        basis_check = "gram" if rows_used * rows_used * n <= GRAM_CHECK_MAX_FLOPS else "dots"
    else:
        basis_check = None
    post = {}
    if vectors is not None or basis_check is not None:
        post = dict(_post_jit(
            op, run.state.basis, run.state.q, coeffs_dev, jnp.asarray(values, sdt), acc,
            vectors, bool(true_residuals and vectors is not None), basis_check,
        ))
        # scalars to the host; Ritz vectors stay on device with the params' sharding
        post.update(jax.device_get({n: x for n, x in post.items() if n != "vecs"}))
    orth = run.orth
    if "gram" in post:
        g = np.asarray(post["gram"], np.float64)[:rows_used, :rows_used]
        orth = max(orth, float(np.max(np.abs(g - np.eye(rows_used)))))
    if "dots" in post:
        orth = max(orth, float(np.max(np.abs(np.asarray(post["dots"], np.float64)[:rows_used]))))
    vecs = post.get("vecs")
    true_res = np.asarray(post["res"], np.float64) if "res" in post else None
    if true_res is not None:
        calls += len(idx)
    overlap = np.asarray(post["overlap"], np.float64) if "overlap" in post else None
    if not return_eigenvectors:
        vecs = None

    ghost_flags = None
    if reorth != "full" and not filter_ghosts:
        # classify the reported raw values with the Cullum-Willoughby test for the warning
        chk = ritz_values(
            run.host.alphas[:m], run.host.betas[:m], filter_ghosts=True, eps_work=eps_work,
            anorm=run.anorm, dropped=run.host.dropped,
        )
        ghost_flags = np.array([chk.flags[int(np.argmin(np.abs(chk.raw_values - v)))]
                                for v in values])
    warns = _quality_warnings(
        values=values, bounds=bounds, conv=conv, k=k, iterations=run.steps, tol=tol,
        reorth=reorth, orth_loss=orth, asym=run.asym, anorm=run.anorm, eps_work=eps_work,
        eps_op=eps_op, filter_ghosts=filter_ghosts, ghost_flags=ghost_flags,
        eigenvectors_overlap=overlap, fixed_iters=fixed, restarts=run.restarts, n_params=n,
    )
    if len(values) < k:
        warns.insert(0, f"only {len(values)} distinct Ritz values available for k={k}: "
                        "increase the number of iterations")
    warns += warn_extra
    if run.breakdowns:
        warns.append(
            f"{run.breakdowns} Lanczos breakdown(s): an invariant subspace was found and the "
            "recurrence restarted with a random vector orthogonal to the stored basis "
            "(expected for low-rank operators; informational)"
        )
    return SpectrumResult(
        eigenvalues=np.asarray(values, np.float64),
        eigenvectors=vecs,
        operator=op.name,
        is_psd=op.is_psd,
        iterations=run.steps,
        converged=bool(np.all(conv)) and len(values) == k,
        n_params=n,
        seed=seed,
        reorth_mode=reorth,
        regularization_applied=0.0,
        warnings=tuple(warns),
        ritz_residuals=np.asarray(bounds, np.float64),
        operator_calls=int(calls),
        wall_time_s=time.perf_counter() - t_start,
        which=which,
        k=k,
        tol=float(tol),
        converged_mask=np.asarray(conv, bool),
        true_residuals=true_res,
        orthogonality_loss=float(orth),
        asymmetry=float(run.asym),
        ghosts_removed=int(ritz.spurious + ritz.copies),
        breakdowns=int(run.breakdowns),
        restarts=int(run.restarts),
        window=win if reorth == "window" else None,
        dtype=str(jnp.dtype(op.dtype)),
    )


def _lanczos_loop(op, state, *, k, which, reorth, tol, fixed, cap, chunk, min_iters, thick, nb,
                  filter_ghosts, eps_work, bd_tol, n_exhaust, grow=False) -> _Run:
    """Host loop: jitted chunks, float64 Ritz analysis, convergence / thick restarts.

    With ``n_exhaust = n`` (the stored rows can span the whole space), a breakdown at step
    ``n`` is the natural end of the recurrence, not an event: its restart vector,
    orthogonalised against a complete basis, is round-off, so it is left out of the
    breakdown count and the orthogonality measurement.
    """
    steps = 0  # total iterations (= matvecs)
    chunks: list[int] = []
    arrow = None
    restarts = orth = asym = breakdowns = 0
    while True:
        m0 = int(state.step) if steps else 0
        if fixed:
            n_steps = cap
        elif thick:
            n_steps = min(nb - m0, cap - steps)
        else:
            n_steps = min(chunk, cap - steps)
        if grow and steps + n_steps > state.alphas.shape[0]:
            state = _grow_jit(state, _grown_capacity(steps + n_steps, cap))
        state = _run_jit(op, state, n_steps, reorth)
        chunks.append(n_steps)
        steps += n_steps
        h = _host(state)
        m = h.step
        _check_finite(h, m0, op.name)
        live = np.ones(m - m0, bool)
        if n_exhaust is not None and m >= n_exhaust:
            live[n_exhaust - 1 - m0:] = False  # exhausted: see the docstring
        if not restarts and live.any():  # |<q_0, q_j>| is meaningless once q_0 is rotated out
            orth = max(orth, float(np.max(h.orthogonality[m0:m][live])))
        asym = max(asym, float(np.max(h.asymmetry[m0:m])))
        breakdowns += int(np.sum(h.breakdowns[m0:m][live]))
        if not fixed and not thick and steps < min_iters:
            continue
        ritz = ritz_values(
            h.alphas[:m], h.betas[:m], filter_ghosts=filter_ghosts and reorth != "full",
            eps_work=eps_work, anorm=h.anorm, arrow=arrow, dropped=h.dropped,
        )
        idx = _select(ritz.values, k, which)
        conv = _converged(ritz.values[idx], ritz.bounds[idx], tol, h.anorm, eps_work)
        if fixed or steps >= cap or (len(idx) == k and bool(np.all(conv))):
            return _Run(state, h, steps, chunks, ritz, idx, restarts, orth, asym, breakdowns,
                        h.anorm)
        if thick:  # Wu & Simon: keep the best lk Ritz vectors, continue from q_m
            lk = min(k + (nb - k) // 2, nb - 2)
            keep = _select(ritz.values, lk, which)
            s = ritz.coeffs[:, keep]
            arrow = (ritz.values[keep], h.betas[nb - 1] * s[nb - 1])
            state = _thick_restart_jit(state, jnp.asarray(s, state.alphas.dtype))
            restarts += 1


def _second_pass(op, v0, key, capacity, reorth, window, chunks, coeffs, first: _Host):
    """Regenerate the Lanczos vectors from the same start and accumulate ``Y = Q coeffs``.

    Returns the (unnormalised) stack and the relative deviation of the regenerated alphas.
    """
    like = op.params_like
    state = _init_jit(op, v0, key, capacity, reorth, window, None)
    acc = _zeros_work(like, coeffs.shape[1])
    for n_steps in chunks:
        state, acc = _run_acc_jit(op, state, coeffs, acc, n_steps, reorth)
    h = _host(state)
    m = h.step
    a1, a2 = first.alphas[:m], h.alphas[:m]
    dev = float(np.max(np.abs(a1 - a2)) / max(np.max(np.abs(a1)), 1e-300)) if m else 0.0
    return acc, dev


# ============================================================================================
# Jittable fast path
# ============================================================================================


class FastEigshResult(NamedTuple):
    """Arrays only (jit-friendly).

    Attributes:
        eigenvalues: ``(k,)`` in the order of ``which`` (``-inf``/``nan`` never: if fewer
            than ``k`` Ritz values survive the ghost filter the last slots repeat the best).
        eigenvectors: pytree stack ``(k, ...)`` of unit Ritz vectors (work dtype).
        residuals: ``(k,)`` Ritz residual bounds ``|beta_m s_mi|``.
        alphas, betas: the tridiagonal ``(num_iters,)``.
        breakdowns: int32 number of breakdown restarts.
    """

    eigenvalues: jax.Array
    eigenvectors: PyTree
    residuals: jax.Array
    alphas: jax.Array
    betas: jax.Array
    breakdowns: jax.Array


def _fast_select_scores(theta: jax.Array, which: str, k: int) -> tuple[jax.Array, jax.Array]:
    if which == "LA":
        return theta, jnp.zeros_like(theta, bool)
    if which == "SA":
        return -theta, jnp.zeros_like(theta, bool)
    if which == "LM":
        return jnp.abs(theta), jnp.zeros_like(theta, bool)
    raise ValueError(which)


def _eigsh_fast_impl(op, v0, key, k, num_iters, which, reorth, window, filter_ghosts):
    like = op.params_like
    sdt = _scalar_dtype(like)
    if v0 is None:
        v0 = random_vector(jax.random.fold_in(key, 0), like, "normal")
    key = jax.random.fold_in(key, 1)
    state = lanczos_init(op, v0, num_iters, reorth, window, key=key)
    state = lanczos_run(op, state, num_iters, reorth)
    a, b = state.alphas, state.betas
    t = jnp.diag(a) + jnp.diag(b[:-1], 1) + jnp.diag(b[:-1], -1)
    theta, s = jnp.linalg.eigh(t)
    bounds = jnp.abs(b[-1] * s[-1])
    m = num_iters
    keep = jnp.ones((m,), bool)
    if filter_ghosts and m > 1:
        eps = jnp.finfo(sdt).eps
        scale = jnp.maximum(state.anorm, jnp.max(jnp.abs(theta)))
        tol_spur = jnp.maximum(5.0 * m * jnp.finfo(theta.dtype).eps, eps**1.5) * scale
        tol_mult = jnp.maximum(10.0 * eps * scale, tol_spur)
        mu = jnp.linalg.eigvalsh(t[1:, 1:])
        dist = jnp.min(jnp.abs(theta[:, None] - mu[None, :]), axis=1)
        gap_l = jnp.concatenate([jnp.full((1,), jnp.inf, theta.dtype), jnp.diff(theta)])
        gap_r = jnp.concatenate([jnp.diff(theta), jnp.full((1,), jnp.inf, theta.dtype)])
        in_group = (gap_l <= tol_mult) | (gap_r <= tol_mult)
        first = gap_l > tol_mult
        gid = jnp.cumsum(first) - 1
        best = jax.ops.segment_min(bounds, gid, num_segments=m)
        bounds = jnp.where(in_group, best[gid], bounds)
        spurious = (~in_group) & (dist <= tol_spur)
        keep = first & ~spurious
    low = jnp.full_like(theta, -jnp.inf)
    if which == "BE":
        n_low = k // 2
        n_high = k - n_low
        _, hi_idx = jax.lax.top_k(jnp.where(keep, theta, low), n_high)
        _, lo_idx = jax.lax.top_k(jnp.where(keep, -theta, low), max(n_low, 1))
        idx = jnp.concatenate([lo_idx[:n_low][::-1], hi_idx[::-1]])
    else:
        score, _ = _fast_select_scores(theta, which, k)
        _, idx = jax.lax.top_k(jnp.where(keep, score, low), k)
    values = theta[idx]
    coeffs = s[:, idx]
    if reorth == "full":
        vecs = jax.tree_util.tree_map(
            lambda bb: jnp.tensordot(coeffs.T.astype(bb.dtype), bb, axes=1), state.basis
        )
    else:
        st2 = lanczos_init(op, v0, num_iters, reorth, window, key=key)
        _, vecs = lanczos_run(op, st2, num_iters, reorth, ritz_coeffs=coeffs.astype(sdt),
                              ritz_acc=_zeros_work(like, k))
    vecs, _ = _normalize_stack(vecs)
    return FastEigshResult(
        eigenvalues=values,
        eigenvectors=vecs,
        residuals=bounds[idx],
        alphas=a,
        betas=b,
        breakdowns=jnp.sum(state.breakdowns).astype(jnp.int32),
    )


_eigsh_fast_jit = jax.jit(
    _eigsh_fast_impl,
    static_argnames=("k", "num_iters", "which", "reorth", "window", "filter_ghosts"),
)


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
) -> FastEigshResult:
    """Jittable ``eigsh`` for train steps: static ``num_iters``, warm start, arrays out.

    Call it inside your own ``jax.jit`` (the operator is an argument, so new params of the
    same shapes reuse the program), or eagerly (it is jitted internally). Carry
    ``result.eigenvectors`` (e.g. leaf ``[0]``) into the next call as ``v0`` to warm-start.
    The tridiagonal eigenproblem uses ``jnp.linalg.eigh`` in the available precision
    (float32 unless ``jax_enable_x64``); ``eigsh`` is the float64, checked variant.

    Cost: ``num_iters`` matvecs (``2 x num_iters`` for ``"window"`` / ``"none"``, whose
    Ritz vectors need a second pass). No Python-side checks or warnings.

    Args:
        op: symmetric operator.
        v0: warm-start vector (pytree like params); ``None``: a normal vector from ``key``;
            all zeros: a pseudo-random vector derived from ``key``.
        k: number of eigenpairs (static).
        num_iters: Lanczos iterations (static, ``>= k``).
        which: ``"LA"``, ``"SA"``, ``"LM"`` or ``"BE"``.
        reorth: ``"full"``, ``"window"`` or ``"none"``.
        window: ring-buffer size for ``"window"``.
        key: PRNG key (default ``jax.random.key(0)``).
        filter_ghosts: Cullum-Willoughby filter on the whole ``T`` (default: not ``"full"``).

    Returns:
        :class:`FastEigshResult`.
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    win = check_reorth(reorth, window)
    num_iters = _check_int("num_iters", num_iters, 1)
    k = _check_int("k", k, 1)
    if num_iters < k:
        raise ValueError(f"num_iters={num_iters} must be >= k={k}")
    if k > op.n_params:
        raise ValueError(f"k must be <= n_params={op.n_params}, got {k}")
    if reorth == "full" and num_iters > op.n_params:
        raise ValueError(f"num_iters={num_iters} exceeds n_params={op.n_params} for reorth='full'")
    key = jax.random.key(0) if key is None else key
    filter_ghosts = (reorth != "full") if filter_ghosts is None else bool(filter_ghosts)
    return _eigsh_fast_jit(op, v0, key, k, num_iters, which, reorth,
                           win if reorth == "window" else None, filter_ghosts)


# ============================================================================================
# compute_spectrum
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class LanczosConfig:
    """Settings of :func:`compute_spectrum`.

    Attributes:
        k: number of eigenvalues.
        max_iters: iteration cap of the convergence-driven run (rule of thumb: ``>= 3k``).
        tol: relative residual tolerance.
        reorth_mode: ``"auto"`` (``"full"`` while ``max_iters`` vectors fit
            ``memory_budget_bytes``, else ``"window"``), ``"full"``, ``"window"``, ``"none"``.
        reorth_window: ring-buffer size for ``"window"`` (default 8).
        dtype_compute: dtype of the operator's params (``None``: the model's, except that
            bf16 / fp16 Hessians are computed in float32: indefinite spectra need it).
        seed: start-vector seed (``jax.random.key(seed)``).
        regularization_mode: PSD operators only: ``"off"``; ``"fixed"`` adds
            ``regularization``; ``"relative"`` adds ``regularization * lambda_max``;
            ``"auto"`` adds the relative shift when ``lambda_max / lambda_min > 1e12``.
        regularization: the shift size for the modes above.
        which: ``"LA"``, ``"SA"``, ``"BE"`` or ``"LM"``.
        return_eigenvectors: also return the Ritz vectors.
        memory_budget_bytes: bytes a stored basis may use (``None``: 25% of device memory
            or 2 GiB).
    """

    k: int = 10
    max_iters: int = 30
    tol: float = 1e-10
    reorth_mode: str = "auto"
    reorth_window: int | None = None
    dtype_compute: Any = None
    seed: int = 42
    regularization_mode: str = "off"
    regularization: float = 1e-8
    which: str = "LA"
    return_eigenvectors: bool = False
    memory_budget_bytes: int | None = None

    def __post_init__(self):
        if self.reorth_mode not in ("auto",) + REORTH_MODES:
            raise ValueError(
                f"reorth_mode must be one of {('auto',) + REORTH_MODES}, got {self.reorth_mode!r}"
            )
        if self.regularization_mode not in REGULARIZATION_MODES:
            raise ValueError(
                f"regularization_mode must be one of {REGULARIZATION_MODES}, "
                f"got {self.regularization_mode!r}"
            )
        if self.which not in WHICH:
            raise ValueError(f"which must be one of {WHICH}, got {self.which!r}")
        _check_int("k", self.k, 1)
        _check_int("max_iters", self.max_iters, 1)
        if not self.regularization >= 0:
            raise ValueError(f"regularization must be >= 0, got {self.regularization!r}")


def _cast_params(params: PyTree, dtype: Any) -> PyTree:
    dt = jnp.dtype(dtype)
    return jax.tree_util.tree_map(
        lambda x: x.astype(dt) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, params
    )


def _compute_dtype(params: PyTree, operator: str, dtype_compute: Any) -> Any:
    if dtype_compute is not None:
        return jnp.dtype(dtype_compute)
    if operator != "hessian":
        return None
    low = [
        x for x in jax.tree_util.tree_leaves(params)
        if jnp.result_type(x) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    ]
    return jnp.dtype(jnp.float32) if low else None


def _build_operator(operator, loss_fn, params, batch, model_fn, head, key):
    if operator == "hessian":
        if loss_fn is None:
            if model_fn is None or head is None:
                raise ValueError("operator='hessian' needs loss_fn (or model_fn and head)")
            from gradience_jax.operators.ggn import _composed_loss

            loss_fn = _composed_loss(model_fn, head)
        from gradience_jax.operators.hessian import hessian

        return hessian(loss_fn, params, batch)
    if operator == "empirical_fisher":
        if loss_fn is None:
            raise ValueError("operator='empirical_fisher' needs loss_fn")
        from gradience_jax.operators.fisher import empirical_fisher

        return empirical_fisher(loss_fn, params, batch)
    if model_fn is None or head is None:
        raise ValueError(
            f"operator={operator!r} needs model_fn and head "
            "(loss = head(model_fn(params, batch), batch))"
        )
    if operator == "ggn":
        from gradience_jax.operators.ggn import ggn

        return ggn(model_fn, head, params, batch)
    if operator == "mc_fisher":
        from gradience_jax.operators.fisher import mc_fisher
        from gradience_jax.operators.heads import _Head

        kw = {"head": head} if isinstance(head, _Head) else {}
        return mc_fisher(model_fn, params, batch, key, **kw)
    try:
        from gradience_jax.operators.kfac import kfac
    except ImportError as exc:
        raise ValueError(
            "operator='kfac' is not available yet (gradience_jax.operators.kfac is not "
            f"importable: {exc}); use 'ggn' or 'mc_fisher' for a PSD curvature"
        ) from exc
    return kfac(model_fn, head, params, batch)


def compute_spectrum(
    loss_fn: Callable[[PyTree, PyTree], jax.Array] | None,
    params: PyTree,
    batch: PyTree,
    operator: str | LinearOperator = "hessian",
    config: LanczosConfig | None = None,
    model_fn: Callable[[PyTree, PyTree], jax.Array] | None = None,
    head: Callable | None = None,
) -> SpectrumResult:
    """Top-k (or ``config.which``) eigenvalues of a curvature operator, with quality checks.

    Builds the operator at ``(params, batch)``, runs :func:`eigsh` with the config and adds
    the seed, the regularisation and the PSD / indefinite metrics to the result.

    Precision: bf16 / fp16 params are upcast to float32 for the Hessian (indefinite spectra
    need it); GGN / Fisher run in the model dtype. Lanczos vectors, dot products and norms
    are float32 or wider; the tridiagonal eigenproblem is float64.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar`` (hessian, empirical_fisher).
        params: parameter pytree.
        batch: batch pytree.
        operator: ``"hessian"``, ``"ggn"``, ``"empirical_fisher"`` (alias ``"ef"``),
            ``"mc_fisher"``, ``"kfac"``, or a ready :class:`LinearOperator`.
        config: :class:`LanczosConfig` (default ``LanczosConfig()``).
        model_fn, head: ``loss = head(model_fn(params, batch), batch)`` for ggn /
            mc_fisher / kfac.

    Returns:
        :class:`SpectrumResult`.

    Raises:
        ValueError: unknown operator, missing model_fn / head, bad config, non-finite values.
    """
    t0 = time.perf_counter()
    cfg = LanczosConfig() if config is None else config
    if not isinstance(cfg, LanczosConfig):
        raise TypeError(f"config must be a LanczosConfig, got {type(cfg).__name__}")
    key = jax.random.key(cfg.seed)
    if isinstance(operator, LinearOperator):
        op = operator
    else:
        if operator not in OPERATORS:
            raise ValueError(
                f"operator must be one of {OPERATORS} or a LinearOperator, got {operator!r}"
            )
        name = "empirical_fisher" if operator == "ef" else operator
        dt = _compute_dtype(params, name, cfg.dtype_compute)
        p = params if dt is None else _cast_params(params, dt)
        op = _build_operator(name, loss_fn, p, batch, model_fn, head, jax.random.fold_in(key, 7))
    n = op.n_params
    if cfg.k > n:
        raise ValueError(f"config.k={cfg.k} exceeds n_params={n}")
    reorth = cfg.reorth_mode
    budget = default_memory_budget() if cfg.memory_budget_bytes is None else cfg.memory_budget_bytes
    if reorth == "auto":
        rows = min(cfg.max_iters, n)
        reorth = "full" if rows * _row_bytes(op.params_like) <= budget else "window"
    max_iters = max(cfg.max_iters, cfg.k)
    if reorth == "full":
        max_iters = min(max_iters, n)
    res = eigsh(
        op, k=cfg.k, num_iters=None, which=cfg.which, reorth=reorth,
        window=cfg.reorth_window, key=key, tol=cfg.tol,
        return_eigenvectors=cfg.return_eigenvectors, max_iters=max_iters,
        memory_budget_bytes=budget, seed=cfg.seed,
    )
    shift = 0.0
    warns = list(res.warnings)
    if cfg.regularization_mode != "off":
        if not op.is_psd:
            warns.append(
                f"regularization_mode={cfg.regularization_mode!r} ignored: the {op.name} "
                "operator is indefinite (negative eigenvalues are preserved)"
            )
        else:
            lam_max = float(np.max(res.eigenvalues))
            lam_min = float(np.min(res.eigenvalues))
            if cfg.regularization_mode == "fixed":
                shift = cfg.regularization
            elif cfg.regularization_mode == "relative":
                shift = cfg.regularization * abs(lam_max)
            elif lam_min <= 0 or lam_max / lam_min > 1e12:
                shift = cfg.regularization * abs(lam_max)
    return dataclasses.replace(
        res,
        eigenvalues=res.eigenvalues + shift,
        regularization_applied=float(shift),
        warnings=tuple(warns),
        seed=cfg.seed,
        wall_time_s=time.perf_counter() - t0,
    )
