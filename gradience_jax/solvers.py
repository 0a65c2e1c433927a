"""Linear solves with curvature operators, matrix-free on pytrees.

:func:`solve` computes ``(A + damping I)^{-1} b`` by one of five methods and reports how
well it did: the true relative residual ``||(A + damping I) x - b|| / ||b||`` (recomputed
with the real operator ``A``, also when the method inverts an approximation of it), the
iterations, the damping used and warnings (:class:`SolveWarning`) when the solve did not
converge or ``A + damping I`` is indefinite.

Methods:
* ``"cg"``: preconditioned conjugate gradients (Hestenes & Stiefel 1952; Saad 2003, s. 9.2)
  in one ``lax.while_loop``; preconditioner a K-FAC / EK-FAC operator (its damped inverse
  is used), any operator approximating ``(A + damping I)^{-1}``, a diagonal (pytree) or
  none.
* ``"lissa"``: the LiSSA recursion (Agarwal, Bullins & Hazan 2017)
  ``x_{j+1} = b + (I - (A + d I) / s) x_j``, ``x = x_J / s``; ``s`` is chosen from the
  measured ``lambda_max`` (``s = 1.1 (lambda_max + d)``) so the recursion provably
  contracts when ``A + d I`` is positive definite; since ``x_j - x_{j+1}`` is the residual
  of ``x_j / s``, it stops at ``tol`` exactly. Deterministic: it uses the operator it is
  given (the stochastic variant of the paper draws a new mini-batch operator per step; to
  get it, give ``solve`` an operator on a mini-batch).
* ``"arnoldi"``: low-rank eigen-inverse (Schioppa et al. 2022): the top-``rank`` eigenpairs
  ``(U, lambda)`` from :func:`gradience_jax.eigsh` (the Krylov engine; largest algebraic for
  PSD operators, largest magnitude otherwise), the exact inverse on their span and
  ``1 / d`` on the complement: ``x = U diag(1 / (lambda + d)) U^T b + (b - U U^T b) / d``.
  Exact only when ``rank(A) <= rank`` (else the complement's eigenvalues are taken as 0).
* ``"kfac"`` / ``"ekfac"``: ``x = (K + d I)^{-1} b`` for the K-FAC operator ``K``
  (Martens & Grosse 2015) or the eigenvalue-corrected EK-FAC (George et al. 2018) of the
  curvature; direct (no iterations), and the residual measures how far the approximation is
  from ``A``.

``damping="auto"`` (:func:`auto_damping`): from the measured extreme eigenvalues,
``d = 1e-3 rho + 1.1 max(0, -lambda_min)`` with ``rho = max(|lambda_max|, |lambda_min|)``,
so ``lambda_min + d >= 0.1 |lambda_min| + 1e-3 rho > 0``: ``A + d I`` is positive definite
with a margin that covers the eigenvalue estimates' error (they are converged to 1e-4
relative). For an operator that is PSD by construction ``lambda_min`` is not measured and
``d = 1e-3 lambda_max``.

Supported names: ``solve``, ``SolveResult``, ``SolveWarning``, ``SpectralBounds``,
``spectral_bounds``, ``auto_damping``, ``METHODS``; ``conjugate_gradient``, ``CGResult``,
``CGNotConvergedWarning``, ``cg_loop`` (the jittable core), ``default_cg_maxiter``. The
natural gradient and the effective dimension of :mod:`gradience_jax.geometry` solve with
these.

References:
    M. Hestenes & E. Stiefel (1952) "Methods of conjugate gradients for solving linear
    systems"; Y. Saad (2003) "Iterative methods for sparse linear systems", s. 9.2 (PCG);
    N. Agarwal, B. Bullins & E. Hazan (2017) "Second-order stochastic optimization for
    machine learning in linear time" (LiSSA); A. Schioppa, P. Zablotskaia, D. Vilar &
    A. Sokolov (2022) "Scaling up influence functions" (Arnoldi); J. Martens & R. Grosse
    (2015) "Optimizing neural networks with Kronecker-factored approximate curvature";
    T. George et al. (2018) "Fast approximate natural gradient descent in a
    Kronecker-factored eigenbasis".
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax import tree as tu
from gradience_jax._json import jsonable
from gradience_jax._validate import (
    ArgumentTypeError,
    check_all_finite,
    check_choice,
    check_int,
    check_key,
    check_like,
    check_real,
    is_traced,
)
from gradience_jax.lanczos import NonFiniteError
from gradience_jax.operators.base import LinearOperator, check_operator
from gradience_jax.operators.ekfac import EKFACOperator
from gradience_jax.operators.kfac import KFACOperator
from gradience_jax.spectrum.eigsh import eigsh

PyTree = Any

__all__ = [
    "METHODS",
    "CGNotConvergedWarning",
    "CGResult",
    "SolveResult",
    "SolveWarning",
    "SpectralBounds",
    "auto_damping",
    "cg_loop",
    "conjugate_gradient",
    "default_cg_maxiter",
    "solve",
    "spectral_bounds",
]

#: the methods of :func:`solve`
METHODS = ("cg", "lissa", "arnoldi", "kfac", "ekfac")
#: ``damping="auto"``: this fraction of the spectral radius ...
AUTO_DAMPING_RELATIVE = 1e-3
#: ... plus ``(1 + AUTO_DAMPING_MARGIN) |lambda_min|`` for an indefinite operator
AUTO_DAMPING_MARGIN = 0.1
#: LiSSA's scale is ``LISSA_SCALE_MARGIN * (lambda_max + damping)``
LISSA_SCALE_MARGIN = 1.1
#: relative accuracy of the measured extreme eigenvalues (damping, LiSSA scale, checks)
SPECTRUM_TOL = 1e-4
#: default number of eigenpairs of ``method="arnoldi"``
DEFAULT_RANK = 20
#: default iteration cap of ``method="lissa"``
DEFAULT_LISSA_MAXITER = 1000
#: the true residual may exceed the iteration's stopping residual by this factor (rounding)
_RESIDUAL_SLACK = 10.0


class CGNotConvergedWarning(UserWarning):
    """Conjugate gradients stopped at ``maxiter`` above the requested tolerance."""


class SolveWarning(UserWarning):
    """A :func:`solve` did not converge, or ``A + damping I`` is not positive definite."""


_check_op = check_operator  # the old local name


class CGResult(NamedTuple):
    """Solution of ``A x = b`` by conjugate gradients.

    Attributes:
        x: the solution (pytree like ``b``).
        residual: true relative residual ``||b - A x|| / ||b||`` (recomputed at the end).
        iterations: CG iterations (= products with ``A``, plus one for the residual).
        converged: ``residual <= tol`` (up to a factor 10 of rounding slack).
    """

    x: PyTree
    residual: float
    iterations: int
    converged: bool


def cg_loop(mv: Callable, b: PyTree, x0: PyTree, tol: Any, maxiter: Any,
            precond: Callable | None = None) -> tuple[PyTree, jax.Array, jax.Array]:
    """Preconditioned CG on pytrees in one ``lax.while_loop`` (jittable).

    Stops when ``||r|| <= tol ||b||`` or after ``maxiter`` iterations. A non-positive
    curvature ``p^T A p <= 0`` freezes the iterate (step 0) instead of dividing by it.

    Args:
        mv: ``v -> A v`` on pytrees like ``b`` (symmetric positive definite ``A``).
        b: right-hand side pytree.
        x0: initial guess like ``b``.
        tol: relative tolerance (scalar, may be traced).
        maxiter: iteration cap (int scalar, may be traced).
        precond: ``r -> M r`` with ``M ~ A^-1`` SPD, or ``None``.

    Returns:
        ``(x, iterations, ||r||)``: the iterate, the number of products with ``A`` and the
        recurrence residual norm (not recomputed). Cost: one ``mv`` and one ``precond`` per
        iteration, ``O(P)`` memory (four vectors).
    """
    m = precond if precond is not None else (lambda r: r)
    r = tu.sub(b, mv(x0))
    z = m(r)
    p = z
    rz = tu.vdot(r, z)
    stop = tol * tu.norm(b)

    def cond(state):
        _, r, _, _, k = state
        return jnp.logical_and(tu.norm(r) > stop, k < maxiter)

    def body(state):
        x, r, p, rz, k = state
        ap = mv(p)
        pap = tu.vdot(p, ap)
        alpha = jnp.where(pap > 0, rz / jnp.where(pap > 0, pap, 1.0), 0.0)
        x = tu.axpy(alpha, p, x)
        r = tu.axpy(-alpha, ap, r)
        z = m(r)
        rz_new = tu.vdot(r, z)
        beta = jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1.0), 0.0)
        p = tu.axpy(beta, p, z)
        return x, r, p, rz_new, k + 1

    x, r, _, _, k = jax.lax.while_loop(cond, body, (x0, r, p, rz, jnp.asarray(0, jnp.int32)))
    return x, k, tu.norm(r)


@jax.jit
def _cg_jit(op, precond, b, x0, tol, maxiter):
    mv = op.bind()
    pm = None if precond is None else precond.bind()
    x, k, _ = cg_loop(mv, b, x0, tol, maxiter, pm)
    res = tu.norm(tu.sub(b, mv(x))) / tu.norm(b)
    return x, k, res


def default_cg_maxiter(op: LinearOperator, maxiter: int | None) -> int:
    """``maxiter`` checked (``>= 1``), or the default ``min(2 n, 1000)``.

    Args:
        op: the operator (``n = op.n_params``).
        maxiter: the requested iteration cap, or None for the default.

    Returns:
        The iteration cap as an int.

    Raises:
        ArgumentTypeError: ``maxiter`` is not an integer.
        ValueError: ``maxiter < 1``.
    """
    if maxiter is None:
        return int(min(2 * op.n_params, 1000))
    return check_int(maxiter, "maxiter", lo=1)


def _check_rhs(op: LinearOperator, b: PyTree, name: str = "b") -> None:
    """``b`` like ``op.params_like``, finite, nonzero (eager values only)."""
    check_like(b, op.params_like, name, f"the {op.name} operator's params")
    if is_traced(b):
        return
    check_all_finite(b, name)
    if float(tu.norm(b)) == 0.0:
        raise ValueError(f"{name} has zero norm: the solution is zero and residuals are "
                         "undefined")


def conjugate_gradient(
    op: LinearOperator,
    b: PyTree,
    *,
    tol: float = 1e-8,
    maxiter: int | None = None,
    x0: PyTree | None = None,
    preconditioner: LinearOperator | None = None,
) -> CGResult:
    """Solve ``op x = b`` for a symmetric positive-definite operator by (P)CG on pytrees.

    Args:
        op: SPD operator (e.g. ``gj.damped(F, lam)``).
        b: right-hand side, a pytree like ``op.params_like``.
        tol: relative residual target ``||b - A x|| <= tol ||b||``.
        maxiter: iteration cap (default ``min(2 n, 1000)``).
        x0: initial guess (default zeros).
        preconditioner: an operator approximating ``op^-1`` (e.g.
            ``K.inverse(lam)`` of a K-FAC operator).

    Returns:
        :class:`CGResult`; a :class:`CGNotConvergedWarning` is emitted when the residual is
        above ``tol`` at the end (the result is still returned).

    Raises:
        ArgumentTypeError: ``op`` / ``preconditioner`` is not a ``LinearOperator``, ``tol``
            not a real number or ``maxiter`` not an integer.
        ValueError: ``b`` has zero norm or does not match ``op``'s parameters, ``tol <= 0``,
            ``maxiter < 1``.
    """
    check_operator(op)
    _check_rhs(op, b)
    if preconditioner is not None:
        check_operator(preconditioner, "preconditioner")
    tol = check_real(tol, "tol", lo=0.0, lo_open=True)
    maxiter = default_cg_maxiter(op, maxiter)
    if x0 is None:
        x0 = tu.zeros_like(b)
    else:
        check_like(x0, op.params_like, "x0", f"the {op.name} operator's params")
    x, k, res = _cg_jit(op, preconditioner, b, x0, jnp.asarray(tol, op.dtype),
                        jnp.asarray(maxiter, jnp.int32))
    res, k = float(res), int(k)
    converged = res <= _RESIDUAL_SLACK * tol
    if not converged:
        warnings.warn(
            f"conjugate gradients stopped after {k} iterations with relative residual "
            f"{res:.3e} > tol={tol:.1e}",
            CGNotConvergedWarning,
            stacklevel=2,
        )
    return CGResult(x, res, k, converged)


# ============================================================================================
# the measured spectrum: damping and LiSSA's scale
# ============================================================================================


class SpectralBounds(NamedTuple):
    """Measured extreme eigenvalues of an operator (host floats).

    Attributes:
        lambda_max: the largest eigenvalue.
        lambda_min: the smallest eigenvalue, or ``None`` when the operator is PSD by
            construction (not measured; ``>= 0``).
        matvecs: products spent measuring them.
        converged: whether the Lanczos estimates met their tolerance.
    """

    lambda_max: float
    lambda_min: float | None
    matvecs: int
    converged: bool


def spectral_bounds(op: LinearOperator, *, key: jax.Array | None = None,
                    tol: float = SPECTRUM_TOL) -> SpectralBounds:
    """``lambda_max`` (and ``lambda_min`` unless PSD by construction) by :func:`gj.eigsh`.

    One thick-restart Lanczos run: ``which="LA"``, ``k=1`` for a PSD operator, ``"BE"``,
    ``k=2`` (both ends at once) otherwise; operators of dimension 1 are read densely.

    Args:
        op: a symmetric :class:`LinearOperator`.
        key: PRNG key of the Lanczos start vector (default ``jax.random.key(42)``).
        tol: relative accuracy of the eigenvalues (Lanczos residual bound).

    Returns:
        :class:`SpectralBounds`.

    Raises:
        ArgumentTypeError: ``op`` is not a ``LinearOperator``, ``key`` not a key.
        ValueError: what :func:`gradience_jax.eigsh` raises (e.g. non-finite products).
    """
    check_operator(op)
    tol = check_real(tol, "tol", lo=0.0, lo_open=True)
    key = check_key(key)
    if op.n_params == 1:
        lam = float(np.asarray(op.to_dense(), np.float64)[0, 0])
        return SpectralBounds(lam, None if op.is_psd else lam, 1, True)
    if op.is_psd:
        res = eigsh(op, k=1, which="LA", tol=tol, key=key)
        return SpectralBounds(float(res.eigenvalues[0]), None, int(res.operator_calls),
                              bool(res.converged))
    res = eigsh(op, k=2, which="BE", tol=tol, key=key)
    lo, hi = (float(x) for x in res.eigenvalues)
    return SpectralBounds(hi, lo, int(res.operator_calls), bool(res.converged))


def _auto_damping(bounds: SpectralBounds) -> float:
    lam_min = 0.0 if bounds.lambda_min is None else bounds.lambda_min
    rho = max(abs(bounds.lambda_max), abs(lam_min))
    if not rho > 0:
        raise ValueError(
            "damping='auto' is relative to the spectrum, but the measured extreme eigenvalues "
            f"are {lam_min} and {bounds.lambda_max} (a zero operator): pass damping=<number>"
        )
    return AUTO_DAMPING_RELATIVE * rho + (1.0 + AUTO_DAMPING_MARGIN) * max(0.0, -lam_min)


def auto_damping(op: LinearOperator, *, key: jax.Array | None = None,
                 bounds: SpectralBounds | None = None) -> float:
    """The damping ``damping="auto"`` uses: ``A + d I`` positive definite with a margin.

    ``d = 1e-3 rho + 1.1 max(0, -lambda_min)``, ``rho = max(|lambda_max|, |lambda_min|)``
    (``lambda_min = 0`` for an operator that is PSD by construction), so
    ``lambda_min + d >= 0.1 |lambda_min| + 1e-3 rho > 0``.

    Args:
        op: a symmetric :class:`LinearOperator`.
        key: PRNG key of the Lanczos start vector.
        bounds: already measured :class:`SpectralBounds` (skips the measurement).

    Returns:
        The damping (a float ``> 0``).

    Raises:
        ValueError: the measured spectrum is zero (no scale to be relative to).
    """
    check_operator(op)
    if bounds is None:
        bounds = spectral_bounds(op, key=key)
    return _auto_damping(bounds)


# ============================================================================================
# solve
# ============================================================================================


class SolveResult(NamedTuple):
    """``x = (A + damping I)^{-1} b`` with the diagnostics of the solve.

    Attributes:
        x: the solution (pytree like ``b``).
        residual: ``||(A + damping I) x - b|| / ||b||`` with the real operator ``A``
            (for ``"kfac"`` / ``"ekfac"`` it tells how far the approximation is).
        iterations: products with ``A`` in the solve (``"cg"`` / ``"lissa"``), the Lanczos
            products of the eigenpairs (``"arnoldi"``), 0 for ``"kfac"`` / ``"ekfac"``; the
            residual and the spectrum measurement are not counted (see ``info``).
        damping: the damping used.
        method: the method.
        converged: ``"cg"`` / ``"lissa"``: ``residual <= tol`` (a factor 10 of rounding
            slack); ``"arnoldi"``: the eigenpairs converged (and ``residual <= tol`` when
            ``tol`` was given); ``"kfac"`` / ``"ekfac"``: ``residual <= tol`` when ``tol``
            was given, else True.
        warnings: the warnings of this solve (also emitted as :class:`SolveWarning`).
        info: method details (JSON-safe): ``lambda_max`` / ``lambda_min`` measured,
            ``damping_rule``, ``scale`` (LiSSA), ``rank`` / ``eigenvalues`` (Arnoldi),
            ``tol``, ``maxiter``, ``spectrum_matvecs``, ``preconditioner``.
    """

    x: PyTree
    residual: float
    iterations: int
    damping: float
    method: str
    converged: bool
    warnings: tuple[str, ...] = ()
    info: dict = {}

    def to_dict(self) -> dict:
        """JSON-safe dict of everything but ``x``."""
        return jsonable({
            "method": self.method, "residual": self.residual, "iterations": self.iterations,
            "damping": self.damping, "converged": self.converged,
            "warnings": list(self.warnings), "info": dict(self.info),
        })


@dataclasses.dataclass(frozen=True)
class _DiagPrepare:
    """``prepare(inv_diag)``: ``v -> inv_diag * v`` leaf-wise."""

    def __call__(self, inv_diag: PyTree):
        return lambda v: jax.tree_util.tree_map(
            lambda a, x: (a.astype(tu.promote_dtypes(a, x)) * x).astype(x.dtype), inv_diag, v)


def _diagonal_preconditioner(op: LinearOperator, diag: PyTree, damping: Any) -> LinearOperator:
    """``M = diag(1 / (D + damping))`` from a diagonal ``D`` like the params."""
    check_like(diag, op.params_like, "preconditioner", f"the {op.name} operator's params")
    shifted = jax.tree_util.tree_map(lambda x: x + damping, diag)
    if not is_traced(shifted):
        for path, leaf in jax.tree_util.tree_flatten_with_path(shifted)[0]:
            arr = np.asarray(leaf)
            if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
                raise ValueError(
                    f"preconditioner (a diagonal) + damping must be finite and > 0, got "
                    f"min {float(np.min(arr))} at leaf '{tu.path_str(path) or '<root>'}'")
    inv = jax.tree_util.tree_map(lambda x: 1.0 / x, shifted)
    return LinearOperator(_DiagPrepare(), inv, op.params_like, is_psd=True, name="diagonal")


def _cg_preconditioner(op: LinearOperator, pre: Any, damping: Any) -> LinearOperator | None:
    if pre is None:
        return None
    if isinstance(pre, (KFACOperator, EKFACOperator)):
        if pre._spec != op._spec:
            raise ValueError(f"preconditioner ({pre.name}) acts on other parameters than op "
                             f"({op.name})")
        return pre.inverse(damping)
    if isinstance(pre, LinearOperator):
        if pre._spec != op._spec:
            raise ValueError(f"preconditioner ({pre.name}) acts on other parameters than op "
                             f"({op.name})")
        return pre
    return _diagonal_preconditioner(op, pre, damping)


def _lissa_loop(amv: Callable, b: PyTree, scale: Any, tol: Any, maxiter: Any):
    """LiSSA: ``x_{j+1} = b + x_j - (A + d I) x_j / s``; returns ``(x_J / s, J)``.

    ``x_j - x_{j+1} = (A + d I) x_j / s - b`` is the residual of ``x_j / s``: the loop stops
    when it is below ``tol ||b||``.
    """
    stop = tol * tu.norm(b)
    inv_s = 1.0 / scale

    def cond(state):
        _, rnorm, k = state
        return jnp.logical_and(rnorm > stop, k < maxiter)

    def body(state):
        x, _, k = state
        step = tu.sub(b, tu.scale(inv_s, amv(x)))
        return tu.add(x, step), tu.norm(step), k + 1

    init = (tu.zeros_like(b), tu.norm(b), jnp.asarray(0, jnp.int32))
    x, _, k = jax.lax.while_loop(cond, body, init)
    return tu.scale(inv_s, x), k


def _lowrank_inverse(values: jax.Array, vectors: PyTree, damping: Any, b: PyTree) -> PyTree:
    """``b / d + U diag(1 / (lambda + d) - 1 / d) U^T b``."""
    coef = jax.vmap(lambda u: tu.vdot(u, b))(vectors)
    lam = values.astype(coef.dtype)
    d = jnp.asarray(damping, coef.dtype)
    w = coef * (-lam / (d * (lam + d)))
    corr = jax.tree_util.tree_map(
        lambda u: jnp.tensordot(w.astype(tu.promote_dtypes(u, w)), u, axes=1), vectors)
    return tu.add(tu.scale(1.0 / d, b), corr)


def _inverse_fn(method: str, op: LinearOperator, damping: Any, extra: Any, tol: Any,
                maxiter: Any):
    """Inside a trace: ``(run(b, x0) -> (x, iterations), amv)`` with ``amv = A + d I``."""
    mv = op.bind()

    def amv(v):
        return tu.axpy(damping, v, mv(v))

    if method == "cg":
        pm = None if extra is None else extra.bind()

        def run(b, x0):
            x, k, _ = cg_loop(amv, b, x0, tol, maxiter, pm)
            return x, k
    elif method == "lissa":
        def run(b, x0):
            return _lissa_loop(amv, b, extra, tol, maxiter)
    elif method == "arnoldi":
        values, vectors = extra

        def run(b, x0):
            return _lowrank_inverse(values, vectors, damping, b), jnp.asarray(0, jnp.int32)
    else:
        im = extra.bind()

        def run(b, x0):
            return im(b), jnp.asarray(0, jnp.int32)
    return run, amv


def _relative_residual(amv: Callable, x: PyTree, b: PyTree) -> jax.Array:
    nb = tu.norm(b)
    r = tu.norm(tu.sub(amv(x), b))
    return jnp.where(nb > 0, r / jnp.where(nb > 0, nb, 1.0), 0.0)


@functools.partial(jax.jit, static_argnums=0)
def _solve_one(method, op, damping, extra, tol, maxiter, b, x0):
    run, amv = _inverse_fn(method, op, damping, extra, tol, maxiter)
    x, k = run(b, x0)
    return x, k, _relative_residual(amv, x, b)


@functools.partial(jax.jit, static_argnums=0)
def _solve_stack(method, op, damping, extra, tol, maxiter, bs):
    run, amv = _inverse_fn(method, op, damping, extra, tol, maxiter)

    def one(b):
        x, k = run(b, tu.zeros_like(b))
        return x, k, _relative_residual(amv, x, b)

    return jax.vmap(one)(bs)


def _default_tol(method: str, dtype: Any) -> float | None:
    if method in ("cg", "lissa"):
        return 1e-8 if jnp.finfo(dtype).bits >= 64 else 1e-5
    return None


def _eig_tol(dtype: Any) -> float:
    return 1e-10 if jnp.finfo(dtype).bits >= 64 else 1e-5


_OPTIONS = {
    "x0": ("cg",), "preconditioner": ("cg",), "scale": ("lissa",),
    "rank": ("arnoldi",), "eigenpairs": ("arnoldi",), "approx": ("kfac", "ekfac"),
    "maxiter": ("cg", "lissa"),
}


def _check_options(method: str, given: dict) -> None:
    for name, value in given.items():
        if value is not None and method not in _OPTIONS[name]:
            allowed = " / ".join(repr(m) for m in _OPTIONS[name])
            raise ValueError(f"{name} applies to method={allowed} only, not method={method!r}")


def _check_damping(damping: Any, method: str) -> Any:
    """``"auto"``, a traced scalar, or a checked float (``> 0`` where the method needs it)."""
    if isinstance(damping, str):
        if damping != "auto":
            raise ValueError(f"damping must be a number >= 0 or 'auto', got {damping!r}")
        return damping
    if isinstance(damping, jax.core.Tracer):
        return damping
    strict = method in ("arnoldi", "kfac", "ekfac")
    return check_real(damping, "damping", lo=0.0, lo_open=strict)


def _eigenpairs_of(value: Any, op: LinearOperator) -> tuple[jax.Array, PyTree]:
    """``(values, vectors)`` from a tuple, a ``SpectrumResult`` or an ``Eigenpairs``."""
    if hasattr(value, "eigenvalues"):
        values, vectors = value.eigenvalues, value.eigenvectors
    elif hasattr(value, "values") and hasattr(value, "vectors"):
        values, vectors = value.values, value.vectors
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        values, vectors = value
    else:
        raise ArgumentTypeError("eigenpairs must be (values, vectors), a SpectrumResult or "
                                f"an Eigenpairs, got {type(value).__name__}")
    if vectors is None:
        raise ValueError("eigenpairs has no eigenvectors (pass return_eigenvectors=True)")
    values = jnp.asarray(values)
    if values.ndim != 1 or values.shape[0] < 1:
        raise ValueError(f"eigenpairs values must be a 1-D array, got shape {values.shape}")
    r = values.shape[0]
    like = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct((r,) + tuple(s.shape), s.dtype), op.params_like)
    check_like(vectors, like, "eigenpairs vectors", f"{r} stacked vectors like the params")
    return values.astype(op.dtype), vectors


def _approx_of(method: str, op: LinearOperator, approx: Any) -> LinearOperator:
    kind = KFACOperator if method == "kfac" else EKFACOperator
    maker = "gj.kfac" if method == "kfac" else "gj.operators.ekfac.ekfac"
    if approx is None:
        if isinstance(op, kind):
            return op
        raise ValueError(f"method={method!r} inverts an approximation of op: pass "
                         f"approx={maker}(model_fn, head, params, batch) (or op itself as one)")
    if not isinstance(approx, kind):
        raise ArgumentTypeError(f"approx for method={method!r} must be a {kind.__name__} "
                                f"({maker}(...)), got {type(approx).__name__}")
    if approx._spec != op._spec:
        raise ValueError(f"approx ({approx.name}) acts on other parameters than op ({op.name})")
    return approx


class _Prepared(NamedTuple):
    """What a solve needs besides the right-hand side (host-side preparation done)."""

    method: str
    op: LinearOperator
    damping: Any  # float or traced scalar
    extra: Any  # preconditioner / scale / (values, vectors) / inverse operator
    tol: float | None
    maxiter: int
    warnings: tuple
    info: dict
    eig_converged: bool


def _prepare(op, *, method, damping, tol, maxiter, preconditioner, scale, rank, eigenpairs,
             approx, bounds, key, check, traced) -> _Prepared:
    """Validate the options, measure the spectrum where needed, build the method's data."""
    check_operator(op)
    method = check_choice(method, "method", METHODS)
    _check_options(method, dict(preconditioner=preconditioner, scale=scale, rank=rank,
                                eigenpairs=eigenpairs, approx=approx, maxiter=maxiter))
    damping = _check_damping(damping, method)
    tol = _default_tol(method, op.dtype) if tol is None else check_real(
        tol, "tol", lo=0.0, lo_open=True)
    if method == "cg":
        maxiter = default_cg_maxiter(op, maxiter)
    elif method == "lissa":
        maxiter = (DEFAULT_LISSA_MAXITER if maxiter is None
                   else check_int(maxiter, "maxiter", lo=1))
    else:
        maxiter = 0
    if scale is not None and not isinstance(scale, jax.core.Tracer):
        scale = check_real(scale, "scale", lo=0.0, lo_open=True)
    if rank is not None:
        rank = check_int(rank, "rank", lo=1, hi=op.n_params)
    if not isinstance(check, (bool, np.bool_)):
        raise ArgumentTypeError(f"check must be a bool, got {check!r}")
    if bounds is not None and not isinstance(bounds, SpectralBounds):
        raise ArgumentTypeError(f"bounds must be a SpectralBounds (gj.solvers.spectral_bounds"
                                f"(op)), got {type(bounds).__name__}")
    if traced:
        if damping == "auto":
            raise ValueError("damping='auto' measures the spectrum on the host: inside "
                             "jax.jit pass damping=<number>")
        if method == "lissa" and scale is None:
            raise ValueError("method='lissa' inside jax.jit needs scale=<number> (> "
                             "lambda_max + damping); outside jit it is measured")
        if method == "arnoldi" and eigenpairs is None:
            raise ValueError("method='arnoldi' inside jax.jit needs eigenpairs=(values, "
                             "vectors); outside jit they are computed by gj.eigsh")
        bounds, check = None, False
    needs_min = check and not op.is_psd
    if bounds is None and not traced and (damping == "auto" or method == "lissa" or needs_min):
        bounds = spectral_bounds(op, key=key)
    info: dict = {"tol": tol}
    warns: list[str] = []
    if bounds is not None:
        info.update(lambda_max=bounds.lambda_max, lambda_min=bounds.lambda_min,
                    spectrum_matvecs=bounds.matvecs)
        if not bounds.converged:
            warns.append("the extreme eigenvalues (damping / scale / definiteness) did not "
                         f"converge to {SPECTRUM_TOL:g}: treat them as estimates")
    if damping == "auto":
        damping = _auto_damping(bounds)
        info["damping_rule"] = (f"{AUTO_DAMPING_RELATIVE:g} * max(|lambda_max|, |lambda_min|)"
                                f" + {1 + AUTO_DAMPING_MARGIN:g} * max(0, -lambda_min)")
    else:
        info["damping_rule"] = "given"
    if bounds is not None and bounds.lambda_min is not None and not is_traced(damping):
        if bounds.lambda_min + damping <= 0:
            msg = (f"A + damping I is indefinite: lambda_min = {bounds.lambda_min:.4g}, "
                   f"damping = {damping:.4g} (use damping > |lambda_min|, e.g. "
                   f"damping='auto' -> {_auto_damping(bounds):.4g})")
            if method == "lissa":
                raise ValueError(f"method='lissa' diverges: {msg}")
            warns.append(msg)
    eig_converged = True
    if method == "cg":
        extra = _cg_preconditioner(op, preconditioner, damping)
        info["preconditioner"] = None if extra is None else extra.name
        info["maxiter"] = maxiter
    elif method == "lissa":
        top = bounds.lambda_max + damping if bounds is not None else None
        if scale is None:
            scale = LISSA_SCALE_MARGIN * top
        elif top is not None and not scale > top / 2:
            raise ValueError(f"scale must be > (lambda_max + damping) / 2 = {top / 2:.4g} for "
                             f"the LiSSA recursion to contract, got {scale}")
        extra = jnp.asarray(scale, op.dtype)
        info.update(scale=scale, maxiter=maxiter)
        if bounds is not None and top is not None and not is_traced(damping):
            lo = (0.0 if bounds.lambda_min is None else bounds.lambda_min) + damping
            if lo > 0:
                rate = 1.0 - lo / scale
                info["contraction"] = rate
                info["predicted_iterations"] = (
                    int(math.ceil(math.log(tol) / math.log(rate))) if 0 < rate < 1 else 1)
    elif method == "arnoldi":
        if eigenpairs is None:
            r = min(op.n_params, DEFAULT_RANK) if rank is None else rank
            res = eigsh(op, k=r, which="LA" if op.is_psd else "LM", tol=_eig_tol(op.dtype),
                        key=check_key(key), return_eigenvectors=True)
            eig_converged = bool(res.converged)
            warns.extend(f"eigsh: {w}" for w in res.warnings if not eig_converged)
            info["eigen_matvecs"] = int(res.operator_calls)
            eigenpairs = res
        values, vectors = _eigenpairs_of(eigenpairs, op)
        extra = (values, vectors)
        info.update(rank=int(values.shape[0]))
        if not is_traced(values):
            info["eigenvalues"] = np.asarray(values, np.float64)
            if int(values.shape[0]) < op.n_params:
                info["exact"] = "only when rank(A) <= rank"
    else:
        extra = _approx_of(method, op, approx).inverse(damping)
    return _Prepared(method, op, damping, extra, tol, maxiter, tuple(warns), info,
                     eig_converged)


def _finish(prep: _Prepared, residual: float, iterations: int) -> tuple[bool, list[str]]:
    """``converged`` and the warnings of a solve (host)."""
    warns = list(prep.warnings)
    method, tol = prep.method, prep.tol
    if method in ("cg", "lissa"):
        converged = residual <= _RESIDUAL_SLACK * tol
        if not converged:
            extra = ""
            if method == "lissa" and "predicted_iterations" in prep.info:
                extra = (f" (contraction {prep.info['contraction']:.6f} per step: about "
                         f"{prep.info['predicted_iterations']} iterations needed)")
            warns.append(f"{method} stopped after {iterations} iterations with relative "
                         f"residual {residual:.3e} > tol={tol:.1e}{extra}")
    else:
        converged = prep.eig_converged and (tol is None or residual <= tol)
        if tol is not None and residual > tol:
            warns.append(f"{method}: relative residual {residual:.3e} > tol={tol:.1e} (the "
                         f"inverse is of an approximation of {prep.op.name})")
        elif not prep.eig_converged:
            warns.append("arnoldi: the eigenpairs did not converge")
    return converged, warns


def _raise_nonfinite(prep: _Prepared, residual: Any, what: str = "the solve") -> None:
    """``NonFiniteError`` (a ``FloatingPointError``) when a residual is NaN / Inf."""
    bad = ~np.isfinite(np.asarray(residual, np.float64))
    if np.any(bad):
        raise NonFiniteError(
            f"solve(method={prep.method!r}) on the {prep.op.name} operator: {what} gave "
            f"{int(np.sum(bad))} non-finite residual(s): the operator or the right-hand side "
            f"is not finite, or A + damping I (damping={float(prep.damping):.4g}) is singular")


def solve(
    op: LinearOperator,
    b: PyTree,
    *,
    method: str = "cg",
    damping: float | str = "auto",
    tol: float | None = None,
    maxiter: int | None = None,
    x0: PyTree | None = None,
    preconditioner: Any = None,
    scale: float | None = None,
    rank: int | None = None,
    eigenpairs: Any = None,
    approx: LinearOperator | None = None,
    bounds: SpectralBounds | None = None,
    key: jax.Array | None = None,
    check: bool = True,
    warn: bool = True,
) -> SolveResult:
    """``x = (A + damping I)^{-1} b`` on parameter pytrees, with its residual and damping.

    Methods (module docstring): ``"cg"`` (preconditioned CG), ``"lissa"`` (Agarwal et al.
    2017), ``"arnoldi"`` (low-rank eigen-inverse, Schioppa et al. 2022), ``"kfac"`` /
    ``"ekfac"`` (direct inverse of the (EK-)FAC approximation). Jittable: inside ``jax.jit``
    pass a number as ``damping`` (and ``scale`` for LiSSA, ``eigenpairs`` for Arnoldi);
    then no spectrum is measured, nothing is checked on the host, ``residual`` /
    ``iterations`` / ``converged`` are arrays and no warnings are emitted.

    Cost: spectrum measurement (``damping="auto"``, LiSSA, or the definiteness check of an
    operator that is not PSD by construction): one Lanczos run, typically 20-100 products;
    ``"cg"``: one product (+ one preconditioner) per iteration; ``"lissa"``: one product per
    iteration; ``"arnoldi"``: the Lanczos products of ``rank`` eigenpairs, then ``O(rank P)``;
    ``"kfac"`` / ``"ekfac"``: one inverse product; plus one product for the residual.

    Args:
        op: the symmetric operator ``A`` (e.g. ``gj.hessian(...)``, ``gj.ggn(...)``).
        b: right-hand side, a pytree like ``op.params_like``.
        method: one of :data:`METHODS`.
        damping: ``d >= 0`` (``> 0`` for ``"arnoldi"`` / ``"kfac"`` / ``"ekfac"``), or
            ``"auto"`` (:func:`auto_damping`: from the measured spectrum).
        tol: relative residual target; default ``1e-8`` (float64) / ``1e-5`` (float32) for
            ``"cg"`` / ``"lissa"``, none for the direct methods (then ``converged`` does not
            look at the residual).
        maxiter: iteration cap of ``"cg"`` (default ``min(2 n, 1000)``) / ``"lissa"``
            (default 1000).
        x0: initial guess of ``"cg"`` (default zeros).
        preconditioner: ``"cg"`` only: a :class:`~gradience_jax.KFACOperator` or EK-FAC
            operator (its inverse at ``damping`` is used), a :class:`LinearOperator`
            approximating ``(A + d I)^{-1}``, or a pytree like the params holding a diagonal
            ``D ~ diag(A)`` (then ``M = 1 / (D + d)``, which must be positive).
        scale: LiSSA's ``s``; default ``1.1 (lambda_max + d)``; must exceed
            ``(lambda_max + d) / 2``.
        rank: ``"arnoldi"``: number of eigenpairs (default ``min(20, n)``).
        eigenpairs: ``"arnoldi"``: precomputed ``(values, vectors)`` (vectors a pytree
            stack), a ``SpectrumResult`` or an ``Eigenpairs`` (reuse across solves).
        approx: ``"kfac"``: a ``KFACOperator``; ``"ekfac"``: an ``EKFACOperator``; default
            ``op`` itself when it is one.
        bounds: precomputed :class:`SpectralBounds` (skips the measurement).
        key: PRNG key of the Lanczos runs (default ``jax.random.key(42)``).
        check: measure ``lambda_min`` of an operator that is not PSD by construction and
            warn when ``A + d I`` is indefinite.
        warn: emit the result's warnings as :class:`SolveWarning`.

    Returns:
        :class:`SolveResult`.

    Raises:
        ArgumentTypeError: ``op`` is not a ``LinearOperator``, a number of the wrong kind,
            ``approx`` of the wrong class.
        ValueError: unknown ``method``; ``b`` zero, non-finite or not like the params;
            ``damping`` / ``tol`` / ``maxiter`` / ``scale`` / ``rank`` out of range; an
            option for another method; LiSSA on an indefinite ``A + d I`` (it diverges);
            ``"kfac"`` / ``"ekfac"`` without an approximation.
        FloatingPointError: ``b`` has NaN / Inf; ``NonFiniteError`` (a subclass): the
            residual is not finite (a non-finite operator, or a singular ``A + d I``).

    Example:
        >>> import jax.numpy as jnp
        >>> from gradience_jax import from_dense
        >>> from gradience_jax.solvers import solve
        >>> A = from_dense(jnp.array([[2.0, 0.0], [0.0, 4.0]]))
        >>> sol = solve(A, jnp.array([2.0, 4.0]), method="cg", damping=0.0)
        >>> [round(float(v), 4) for v in sol.x], sol.converged, sol.damping
        ([1.0, 1.0], True, 0.0)
    """
    check_operator(op)
    _check_rhs(op, b)
    traced = is_traced((op, b)) or isinstance(damping, jax.core.Tracer)
    _check_options(check_choice(method, "method", METHODS), {"x0": x0})
    if x0 is not None:
        check_like(x0, op.params_like, "x0", f"the {op.name} operator's params")
    prep = _prepare(op, method=method, damping=damping, tol=tol, maxiter=maxiter,
                    preconditioner=preconditioner, scale=scale, rank=rank,
                    eigenpairs=eigenpairs, approx=approx, bounds=bounds, key=key, check=check,
                    traced=traced)
    x0 = tu.zeros_like(b) if x0 is None or prep.method != "cg" else x0
    tol_arr = jnp.asarray(0.0 if prep.tol is None else prep.tol, op.dtype)
    x, k, res = _solve_one(prep.method, op, jnp.asarray(prep.damping, op.dtype), prep.extra,
                           tol_arr, jnp.asarray(prep.maxiter, jnp.int32), b, x0)
    if traced:
        if prep.method in ("cg", "lissa"):
            conv = res <= _RESIDUAL_SLACK * prep.tol
        else:
            conv = jnp.asarray(True) if prep.tol is None else res <= prep.tol
        return SolveResult(x, res, k, prep.damping, prep.method, conv, (), prep.info)
    _raise_nonfinite(prep, res)
    res, k = float(res), int(k)
    if prep.method == "arnoldi":
        k = int(prep.info.get("eigen_matvecs", 0))
    converged, warns = _finish(prep, res, k)
    if warn:
        for w in warns:
            warnings.warn(w, SolveWarning, stacklevel=2)
    return SolveResult(x, res, k, float(prep.damping), prep.method, converged, tuple(warns),
                       prep.info)
