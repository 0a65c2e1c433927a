"""Fisher geometry of a PSD curvature operator (GGN, empirical / MC Fisher, K-FAC).

Protocol C of the research agenda: how the Fisher metric ``F`` stretches parameter space
and how the gradient sits in it. Every function takes any PSD :class:`LinearOperator`:

* :func:`fisher_trace`: ``tr F`` and ``tr F^2`` (exact from the dense matrix on small
  models; Hutchinson with Rademacher probes otherwise, ``E[z^T F z] = tr F`` and
  ``E[||F z||^2] = tr F^2``, one product per probe for both) and the participation ratio
  ``(tr F)^2 / tr F^2``.
* :func:`top_eigenvalues`: the ``k`` largest eigenvalues (dense ``eigh`` or
  :func:`gradience_jax.spectrum.eigsh`).
* :func:`condition_number`: ``kappa(F + lam I) = (l_max + lam) / (l_min + lam)``.
* :func:`effective_dimension`: ``d_eff(lam) = sum_i l_i / (l_i + lam) = tr F (F + lam I)^-1``
  (MacKay 1992; exact, or Hutchinson with a conjugate-gradient solve per probe).
* :func:`natural_gradient`: ``(F + lam I)^-1 g`` by (preconditioned) conjugate gradients on
  pytrees, with the true relative residual, the iterations and the alignment
  ``cos(g, F^-1 g)`` (Amari 1998).
* :func:`fisher_geometry`: all of the above in one JSON-safe report.
* :func:`compare_curvature`: how well an approximation (e.g. K-FAC) matches a reference
  (e.g. the GGN): top-eigenvalue ratio, top-``k`` subspace overlap, relative Frobenius
  error (also against the reference's block-diagonal part on K-FAC's blocks).

``method="auto"`` uses dense linear algebra when ``n_params <= dense_limit`` (default 2000;
``max_exact`` is the old name, still accepted)
and matrix-free estimators otherwise (``method="exact"`` / ``"matrix-free"`` force one).
Matrix-free paths need an explicit ``key``.

Every reported number is finite or an error: a non-finite operator (dense entries, a probe's
product, a CG solve) raises :class:`~gradience_jax.lanczos.NonFiniteError` (a
``FloatingPointError``) naming the function and the probe.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax import tree as tu
from gradience_jax._validate import check_choice, check_int, check_key, check_real
from gradience_jax.lanczos import NonFiniteError, first_nonfinite
from gradience_jax.operators.base import LinearOperator, check_operator, damped
from gradience_jax.solvers import (
    CGNotConvergedWarning,
    CGResult,
    cg_loop,
    conjugate_gradient,
    default_cg_maxiter,
)
from gradience_jax.spectrum import DENSE_LIMIT, top_eigenpairs
from gradience_jax.spectrum.plan import check_k

PyTree = Any

DEFAULT_MAX_EXACT = DENSE_LIMIT  # the old name
#: "hutchinson" is accepted as an alias of "matrix-free"
METHODS = ("auto", "exact", "matrix-free", "hutchinson")

__all__ = [
    "CGNotConvergedWarning",
    "CGResult",
    "ConditionNumber",
    "CurvatureComparison",
    "EffectiveDimension",
    "Eigenpairs",
    "FisherGeometry",
    "NaturalGradient",
    "TraceMoments",
    "compare_curvature",
    "condition_number",
    "conjugate_gradient",
    "effective_dimension",
    "fisher_geometry",
    "fisher_trace",
    "natural_gradient",
    "top_eigenvalues",
]


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _check_op(op: Any, name: str = "op") -> LinearOperator:
    """The old local name of :func:`gradience_jax.operators.base.check_operator`."""
    return check_operator(op, name)


def _resolve_method(method: str, op: LinearOperator, dense_limit: int,
                    max_exact: int | None = None) -> str:
    check_choice(method, "method", METHODS)
    limit = (check_int(dense_limit, "dense_limit", lo=0) if max_exact is None
             else check_int(max_exact, "max_exact", lo=0))
    if method == "auto":
        return "exact" if op.n_params <= limit else "matrix-free"
    return "matrix-free" if method == "hutchinson" else method


def _need_key(key: Any, what: str) -> jax.Array:
    if key is None:
        raise ValueError(
            f"key is required for the matrix-free {what} (pass key=jax.random.key(...), or "
            "method='exact' on a small model)"
        )
    return check_key(key, "key", default=False)


def _check_damping(damping: Any, name: str = "damping", strict: bool = True) -> float:
    """``damping`` as a finite float, ``> 0`` (``strict``: an inverse is needed) or ``>= 0``."""
    return check_real(damping, name, lo=0.0, lo_open=strict)


#: the default conjugate-gradient tolerance where the operator's precision allows it
DEFAULT_CG_TOL = 1e-8


def default_cg_tol(op: LinearOperator, tol: Any = None) -> float:
    """``tol`` checked, or the default relative CG residual target for ``op``.

    ``1e-8`` (float64), but never below ``100 eps`` of the operator's work dtype: a float32
    solve (x64 off) cannot reach ``1e-8`` and would warn on every default call.

    Args:
        op: the operator (its dtype sets the floor of the default).
        tol: a positive finite tolerance, or ``None`` for the default.

    Returns:
        The tolerance as a float.

    Raises:
        ArgumentTypeError: ``tol`` is not a real number.
        ValueError: ``tol <= 0`` or not finite.
    """
    if tol is not None:
        return check_real(tol, "tol", lo=0.0, lo_open=True)
    eps = float(jnp.finfo(tu.accumulation_dtype(op.dtype)).eps)
    return max(DEFAULT_CG_TOL, 100.0 * eps)


def _dense(op: LinearOperator, what: str = "") -> np.ndarray:
    m = np.asarray(op.to_dense(max_params=op.n_params), dtype=np.float64)
    if not np.all(np.isfinite(m)):
        i, j = (int(x) for x in np.argwhere(~np.isfinite(m))[0])
        where = f"{what}: " if what else ""
        raise NonFiniteError(
            f"{where}the {op.name} operator's dense matrix is not finite (NaN / Inf first at "
            f"row {i}, column {j}): check the loss / model at these params"
        )
    return 0.5 * (m + m.T)


def _check_samples(what: str, samples: Any, quantity: str) -> None:
    """``NonFiniteError`` naming the first probe whose value is NaN / Inf."""
    i = first_nonfinite(samples)
    if i is not None:
        raise NonFiniteError(
            f"{what}: probe {i} of {np.size(samples)} gave a non-finite {quantity} "
            f"({float(np.asarray(samples).ravel()[i])}): the operator's matvec returned "
            "NaN / Inf; check the loss / model at these params"
        )


def _zeros(like: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), like)


def _stats(samples: np.ndarray) -> tuple[float, float]:
    samples = np.asarray(samples, np.float64)
    se = float(samples.std(ddof=1) / math.sqrt(samples.size)) if samples.size > 1 else float("nan")
    return float(samples.mean()), se


def _cosine(a: PyTree, b: PyTree) -> float:
    """``<a, b> / (||a|| ||b||)`` of two pytree vectors."""
    return float(tu.vdot(a, b) / (tu.norm(a) * tu.norm(b)))


# ---------------------------------------------------------------------------------------
# traces
# ---------------------------------------------------------------------------------------


class TraceMoments(NamedTuple):
    """``tr F`` and ``tr F^2`` with standard errors (0 when exact).

    Attributes:
        trace, trace_sq: the estimates.
        trace_stderr, trace_sq_stderr: standard errors of the means (0 for ``"exact"``).
        method: ``"exact"`` or ``"hutchinson"``.
        num_matvecs: operator products used (0 for exact: the dense matrix is used).
    """

    trace: float
    trace_sq: float
    trace_stderr: float
    trace_sq_stderr: float
    method: str
    num_matvecs: int

    @property
    def participation_ratio(self) -> float:
        """``(tr F)^2 / tr F^2``: the effective number of directions carrying curvature."""
        return self.trace**2 / self.trace_sq if self.trace_sq > 0 else 0.0


@functools.partial(jax.jit, static_argnums=(2,))
def _hutchinson_moments(op: LinearOperator, key: jax.Array, num_samples: int):
    mv = op.bind()
    like = op.params_like

    def one(k):
        z = tu.random_like(k, like, "rademacher")
        fz = mv(z)
        return tu.vdot(z, fz), tu.vdot(fz, fz)

    return jax.lax.map(one, jax.random.split(key, num_samples))


def fisher_trace(
    op: LinearOperator,
    key: jax.Array | None = None,
    *,
    num_samples: int = 100,
    method: str = "auto",
    dense_limit: int = DENSE_LIMIT,
    max_exact: int | None = None,
) -> TraceMoments:
    """``tr F`` and ``tr F^2`` of a PSD operator.

    Args:
        op: the operator ``F``.
        key: ``jax.random`` key (Hutchinson only).
        num_samples: Rademacher probes; each costs one product and serves both moments.
        method: ``"exact"`` (dense matrix), ``"matrix-free"`` (Hutchinson) or ``"auto"``.
        dense_limit: largest ``n_params`` for which ``"auto"`` goes dense.
        max_exact: old name of ``dense_limit`` (used when given).

    Returns:
        :class:`TraceMoments`; Hutchinson estimates are unbiased with the given stderr.

    Raises:
        TypeError: ``op`` is not a :class:`LinearOperator`, ``key`` is not a PRNG key, or
            ``num_samples`` is not an integer.
        ValueError: an unknown ``method``, ``num_samples < 2``, or the matrix-free path
            without a ``key``.
        NonFiniteError: the dense matrix or a probe's ``z^T F z`` / ``||F z||^2`` is NaN /
            Inf.
    """
    _check_op(op)
    method = _resolve_method(method, op, dense_limit, max_exact)
    if method == "exact":
        m = _dense(op, "fisher_trace")
        return TraceMoments(float(np.trace(m)), float(np.sum(m * m)), 0.0, 0.0, "exact", 0)
    num_samples = check_int(num_samples, "num_samples", lo=2)
    key = _need_key(key, "trace estimate")
    t, q = jax.device_get(_hutchinson_moments(op, key, num_samples))
    _check_samples(f"fisher_trace of the {op.name} operator", t, "z^T F z")
    _check_samples(f"fisher_trace of the {op.name} operator", q, "||F z||^2")
    (tr, tr_se), (sq, sq_se) = _stats(t), _stats(q)
    return TraceMoments(tr, sq, tr_se, sq_se, "hutchinson", int(num_samples))


# ---------------------------------------------------------------------------------------
# eigenvalues, condition number, effective dimension
# ---------------------------------------------------------------------------------------


class Eigenpairs(NamedTuple):
    """Top eigenvalues (descending) and optionally eigenvectors.

    Attributes:
        values: ``(k,)`` eigenvalues, descending.
        vectors: the eigenvectors, a pytree whose leaves have a leading axis of size ``k``
            (None unless requested).
        method: ``"exact"`` or ``"lanczos"``.
    """

    values: np.ndarray
    vectors: PyTree | None
    method: str


def top_eigenvalues(
    op: LinearOperator,
    k: int = 5,
    *,
    key: jax.Array | None = None,
    method: str = "auto",
    return_eigenvectors: bool = False,
    dense_limit: int = DENSE_LIMIT,
    max_exact: int | None = None,
) -> Eigenpairs:
    """The ``k`` largest eigenvalues of a symmetric operator.

    ``"exact"``: dense ``numpy.linalg.eigh`` (float64). Otherwise the Krylov engine
    (:func:`gradience_jax.spectrum.top_eigenpairs`, thick-restart Lanczos).

    Args:
        op: a symmetric operator.
        k: number of eigenvalues, ``1 <= k <= n_params``.
        key: ``jax.random`` key of the Lanczos start vector (matrix-free path only).
        method: ``"auto"``, ``"exact"`` or ``"matrix-free"``.
        return_eigenvectors: also return the eigenvectors (as stacked pytrees).
        dense_limit: largest ``n_params`` for which ``"auto"`` goes dense.
        max_exact: old name of ``dense_limit`` (used when given).

    Returns:
        :class:`Eigenpairs`. Cost: ``n_params`` products and one ``eigh`` (exact), else one
        Lanczos run.

    Raises:
        TypeError: ``op`` is not a :class:`LinearOperator`, ``k`` is not an integer or
            ``key`` is not a PRNG key.
        ValueError: if ``k`` is not in ``[1, n_params]``, or the matrix-free path is needed
            but ``key`` is missing.
        NonFiniteError: the operator is not finite.
    """
    _check_op(op)
    k = check_k(k, op.n_params)
    exact = _resolve_method(method, op, dense_limit, max_exact) == "exact"
    if not exact:
        key = _need_key(key, "eigenvalue computation")
    pairs = top_eigenpairs(op, k, which="LA", key=key, dense_limit=op.n_params if exact else 0,
                           return_eigenvectors=return_eigenvectors)
    return Eigenpairs(pairs.values, pairs.vectors, "exact" if exact else "lanczos")


class ConditionNumber(NamedTuple):
    """``kappa = (lam_max + damping) / (lam_min + damping)``.

    ``method`` is ``"exact"`` (dense spectrum), ``"lanczos, lam_min given"`` or
    ``"lanczos, lam_min=0 assumed"`` (then ``kappa`` is an upper bound for a PSD ``F``;
    exact whenever ``F`` is rank-deficient, e.g. ``N * C < n_params``).
    """

    kappa: float
    lam_max: float
    lam_min: float
    damping: float
    method: str


def condition_number(
    op: LinearOperator,
    damping: float,
    *,
    lam_min: float | None = None,
    key: jax.Array | None = None,
    method: str = "auto",
    dense_limit: int = DENSE_LIMIT,
    max_exact: int | None = None,
) -> ConditionNumber:
    """Condition number of ``F + damping I`` for a PSD operator ``F``.

    Args:
        op: PSD operator.
        damping: ``>= 0`` (``kappa`` is infinite for a singular ``F`` without damping).
        lam_min: smallest eigenvalue if known (matrix-free path only).
        key: for the Lanczos path.
        method: ``"auto"``, ``"exact"`` or ``"matrix-free"`` (Lanczos).
        dense_limit: largest ``n_params`` for which ``"auto"`` goes dense.
        max_exact: old name of ``dense_limit`` (used when given).

    Returns:
        :class:`ConditionNumber`.

    Raises:
        TypeError: ``op`` is not a :class:`LinearOperator`, ``damping`` / ``lam_min`` not a
            real number.
        ValueError: on negative or non-finite ``damping``, a non-finite ``lam_min``, or the
            matrix-free path without a ``key``.
        NonFiniteError: the operator is not finite.
    """
    _check_op(op)
    lam = _check_damping(damping, strict=False)
    if lam_min is not None:
        lam_min = check_real(lam_min, "lam_min")
    if _resolve_method(method, op, dense_limit, max_exact) == "exact":
        evals = np.linalg.eigvalsh(_dense(op, "condition_number"))
        hi, lo, how = float(evals[-1]), max(float(evals[0]), 0.0), "exact"
    else:
        hi = float(top_eigenvalues(op, 1, key=key, method="matrix-free").values[0])
        lo = 0.0 if lam_min is None else lam_min
        how = "lanczos, lam_min=0 assumed" if lam_min is None else "lanczos, lam_min given"
    den = lo + lam
    kappa = (hi + lam) / den if den > 0 else float("inf")
    return ConditionNumber(float(kappa), hi, lo, lam, how)


class EffectiveDimension(NamedTuple):
    """``d_eff = sum_i l_i / (l_i + damping)`` with a standard error (0 when exact).

    For the stochastic path, ``cg_max_residual`` is the largest relative CG residual over
    the probes.
    """

    value: float
    stderr: float
    damping: float
    method: str
    cg_max_residual: float


@functools.partial(jax.jit, static_argnums=(3,))
def _hutchinson_deff(op, lam, key, num_samples, tol, maxiter):
    mv = op.bind()
    shifted = lambda v: tu.axpy(lam, v, mv(v))  # noqa: E731
    like = op.params_like

    def one(k):
        z = tu.random_like(k, like, "rademacher")
        x, _, _ = cg_loop(shifted, z, tu.zeros_like(z), tol, maxiter, None)
        res = tu.norm(tu.sub(z, shifted(x))) / tu.norm(z)
        return tu.vdot(mv(z), x), res

    return jax.lax.map(one, jax.random.split(key, num_samples))


def effective_dimension(
    op: LinearOperator,
    damping: float,
    *,
    key: jax.Array | None = None,
    num_samples: int = 30,
    method: str = "auto",
    tol: float | None = None,
    maxiter: int | None = None,
    dense_limit: int = DENSE_LIMIT,
    max_exact: int | None = None,
) -> EffectiveDimension:
    """Effective dimension ``tr F (F + damping I)^-1`` of a PSD operator.

    Stochastic path: ``z^T F (F + lam)^-1 z`` per Rademacher probe, with one CG solve per
    probe (``maxiter`` defaults to ``min(2 n, 1000)``).

    Args:
        op: PSD operator ``F``.
        damping: ``lam > 0``.
        key: ``jax.random`` key of the probes (stochastic path only).
        num_samples: Rademacher probes (``>= 2``), one CG solve each.
        method: ``"auto"``, ``"exact"`` or ``"matrix-free"``.
        tol: relative residual target of each CG solve (default :func:`default_cg_tol`:
            ``1e-8``, or ``100 eps`` for a float32 operator).
        maxiter: CG iteration cap (default ``min(2 n, 1000)``).
        dense_limit: largest ``n_params`` for which ``"auto"`` goes dense.
        max_exact: old name of ``dense_limit`` (used when given).

    Returns:
        :class:`EffectiveDimension`; a :class:`CGNotConvergedWarning` is emitted when a
        probe's CG residual stays above ``10 * tol``.

    Raises:
        TypeError: ``op`` is not a :class:`LinearOperator`, a number of the wrong kind, or
            ``key`` is not a PRNG key.
        ValueError: if ``damping <= 0`` (the resolvent needs it), ``tol <= 0``,
            ``num_samples < 2`` or the stochastic path has no ``key``.
        NonFiniteError: the dense matrix or a probe's estimate / CG residual is NaN / Inf.
    """
    _check_op(op)
    lam = _check_damping(damping)
    tol = default_cg_tol(op, tol)
    if _resolve_method(method, op, dense_limit, max_exact) == "exact":
        evals = np.clip(np.linalg.eigvalsh(_dense(op, "effective_dimension")), 0.0, None)
        return EffectiveDimension(float(np.sum(evals / (evals + lam))), 0.0, lam, "exact", 0.0)
    num_samples = check_int(num_samples, "num_samples", lo=2)
    key = _need_key(key, "effective dimension")
    maxiter = default_cg_maxiter(op, maxiter)
    samples, res = jax.device_get(
        _hutchinson_deff(op, jnp.asarray(lam, op.dtype), key, num_samples,
                         jnp.asarray(tol, op.dtype), jnp.asarray(maxiter))
    )
    what = f"effective_dimension of the {op.name} operator"
    _check_samples(what, samples, "z^T F (F + damping I)^-1 z")
    _check_samples(what, res, "CG residual")
    value, se = _stats(samples)
    max_res = float(np.max(res))
    if max_res > 10 * tol:
        warnings.warn(
            f"effective_dimension: CG reached a relative residual of {max_res:.2e} > tol={tol:.0e} "
            f"within maxiter={maxiter}; the estimate is biased accordingly",
            CGNotConvergedWarning,
            stacklevel=2,
        )
    return EffectiveDimension(value, se, lam, "hutchinson+cg", max_res)


# ---------------------------------------------------------------------------------------
# conjugate gradients and the natural gradient
# ---------------------------------------------------------------------------------------


class NaturalGradient(NamedTuple):
    """``(F + damping I)^-1 g`` and its diagnostics.

    Attributes:
        direction: the natural-gradient direction (pytree like ``g``).
        alignment: ``cos(g, direction)`` (1 when ``F`` is a multiple of the identity).
        residual: CG's true relative residual.
        iterations: CG iterations.
        converged: whether CG reached ``tol``.
        damping: the damping used.
    """

    direction: PyTree
    alignment: float
    residual: float
    iterations: int
    converged: bool
    damping: float


def natural_gradient(
    op: LinearOperator,
    grad: PyTree,
    damping: float,
    *,
    tol: float | None = None,
    maxiter: int | None = None,
    x0: PyTree | None = None,
    preconditioner: LinearOperator | None = None,
) -> NaturalGradient:
    """Natural-gradient direction ``(F + damping I)^-1 g`` by conjugate gradients.

    Args:
        op: PSD Fisher / GGN / K-FAC operator ``F``.
        grad: the gradient ``g`` (pytree like the parameters).
        damping: Tikhonov damping ``> 0``.
        tol: relative residual target, see :func:`conjugate_gradient` (default
            :func:`default_cg_tol`: ``1e-8``, or ``100 eps`` for a float32 operator).
        maxiter: iteration cap (default ``min(2 n, 1000)``), see :func:`conjugate_gradient`.
        x0: initial guess (default zeros), see :func:`conjugate_gradient`.
        preconditioner: an operator approximating ``(F + damping I)^-1``, see
            :func:`conjugate_gradient`.

    Returns:
        :class:`NaturalGradient` with the direction, ``cos(g, F^-1 g)``, the CG residual
        and iteration count.

    Raises:
        TypeError: ``op`` is not a :class:`LinearOperator`, ``damping`` / ``tol`` not a real
            number.
        ValueError: if ``damping <= 0`` or ``grad`` is zero / mismatched.
        NonFiniteError: the solve gave a non-finite direction or residual (a non-finite
            operator or gradient).
    """
    _check_op(op)
    lam = _check_damping(damping)
    tol = default_cg_tol(op, tol)
    cg = conjugate_gradient(damped(op, jnp.asarray(lam, op.dtype)), grad, tol=tol,
                            maxiter=maxiter, x0=x0, preconditioner=preconditioner)
    alignment = _cosine(grad, cg.x)
    if not (np.isfinite(cg.residual) and np.isfinite(alignment)):
        raise NonFiniteError(
            f"natural_gradient with the {op.name} operator: conjugate gradients gave a "
            f"non-finite {'residual' if not np.isfinite(cg.residual) else 'direction'} after "
            f"{cg.iterations} iterations: the operator (or grad) is not finite"
        )
    return NaturalGradient(cg.x, alignment, cg.residual, cg.iterations, cg.converged, lam)


# ---------------------------------------------------------------------------------------
# one-call report
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FisherGeometry:
    """Protocol C metrics of one operator at one point (:func:`fisher_geometry`)."""

    operator: str
    n_params: int
    trace: TraceMoments
    top_eigenvalues: np.ndarray
    condition: ConditionNumber
    effective_dimension: EffectiveDimension
    natural_gradient: NaturalGradient | None

    def to_dict(self) -> dict:
        """JSON-safe summary (the natural-gradient direction itself is left out)."""
        ng = self.natural_gradient
        return {
            "operator": self.operator,
            "n_params": self.n_params,
            "trace": self.trace.trace,
            "trace_stderr": self.trace.trace_stderr,
            "trace_sq": self.trace.trace_sq,
            "trace_sq_stderr": self.trace.trace_sq_stderr,
            "participation_ratio": self.trace.participation_ratio,
            "trace_method": self.trace.method,
            "top_eigenvalues": [float(x) for x in self.top_eigenvalues],
            "damping": self.condition.damping,
            "condition_number": self.condition.kappa,
            "lam_max": self.condition.lam_max,
            "lam_min": self.condition.lam_min,
            "condition_method": self.condition.method,
            "effective_dimension": self.effective_dimension.value,
            "effective_dimension_stderr": self.effective_dimension.stderr,
            "natural_gradient_alignment": None if ng is None else ng.alignment,
            "cg_residual": None if ng is None else ng.residual,
            "cg_iterations": None if ng is None else ng.iterations,
            "cg_converged": None if ng is None else ng.converged,
        }


def fisher_geometry(
    op: LinearOperator,
    grad: PyTree | None = None,
    *,
    damping: float = 1e-3,
    key: jax.Array | None = None,
    k: int = 5,
    num_samples: int = 100,
    method: str = "auto",
    tol: float | None = None,
    dense_limit: int = DENSE_LIMIT,
    max_exact: int | None = None,
) -> FisherGeometry:
    """All Fisher-geometry metrics of ``op`` (and of ``grad`` in its metric) at once.

    Args:
        op: PSD operator (``gj.ggn``, ``gj.empirical_fisher``, ``gj.mc_fisher``, ``gj.kfac``).
        grad: optional gradient for the natural-gradient direction and alignment.
        damping: ``lam > 0`` used for ``kappa(F + lam I)``, ``d_eff(lam)`` and ``F + lam I``.
        key: needed by matrix-free paths (split internally).
        k: number of top eigenvalues.
        num_samples: Hutchinson probes for the traces (a third of them for ``d_eff``).
        method: ``"auto"``, ``"exact"`` or ``"matrix-free"`` for every metric.
        tol: conjugate-gradient tolerance of the natural gradient (default
            :func:`default_cg_tol`; ``d_eff`` uses ``max(tol, 1e-6)``).
        dense_limit: largest ``n_params`` for which ``"auto"`` goes dense.
        max_exact: old name of ``dense_limit`` (used when given).

    Returns:
        :class:`FisherGeometry` (``.to_dict()`` is JSON-safe).

    Raises:
        TypeError: ``op`` is not an operator (an ``ArgumentTypeError``, also a
            ``ValueError``), a number of the wrong kind, or ``key`` is not a PRNG key.
        ValueError: ``damping <= 0``, ``k < 1``, ``num_samples < 2``, ``tol <= 0``, or a
            matrix-free path has no ``key``.
        NonFiniteError: a metric is not finite (see the functions above).
    """
    _check_op(op)
    _check_damping(damping)
    k = check_int(k, "k", lo=1)
    num_samples = check_int(num_samples, "num_samples", lo=2)
    tol = default_cg_tol(op, tol)
    dense_limit = dense_limit if max_exact is None else max_exact
    if key is not None:
        key = check_key(key, "key")
    keys = [None] * 3 if key is None else list(jax.random.split(key, 3))
    trace = fisher_trace(op, keys[0], num_samples=num_samples, method=method,
                         dense_limit=dense_limit)
    top = top_eigenvalues(op, min(k, op.n_params), key=keys[1], method=method,
                          dense_limit=dense_limit)
    cond = condition_number(op, damping, key=keys[1], method=method, dense_limit=dense_limit)
    deff = effective_dimension(op, damping, key=keys[2], num_samples=max(num_samples // 3, 2),
                               method=method, tol=max(tol, 1e-6), dense_limit=dense_limit)
    ng = None if grad is None else natural_gradient(op, grad, damping, tol=tol)
    return FisherGeometry(op.name, op.n_params, trace, top.values, cond, deff, ng)


# ---------------------------------------------------------------------------------------
# comparing an approximation with a reference
# ---------------------------------------------------------------------------------------


class CurvatureComparison(NamedTuple):
    """How well ``approx`` matches ``reference``.

    Attributes:
        top_approx, top_reference: top-``k`` eigenvalues (descending).
        top_eigenvalue_ratio: ``lambda_1(approx) / lambda_1(reference)``.
        subspace_overlap: ``||U_a^T U_r||_F^2 / k`` for the top-``k`` eigenvectors (1: same
            subspace, ``k / n``: chance).
        rel_frobenius_error: ``||approx - reference||_F / ||reference||_F`` (Hutchinson
            estimate on large models).
        rel_frobenius_error_blocks: the same against the reference's block-diagonal part on
            ``blocks`` (both restricted to those blocks); ``None`` without blocks / on large
            models.
        k: number of eigenpairs compared.
        method: ``"exact"`` or ``"matrix-free"``.
    """

    top_approx: np.ndarray
    top_reference: np.ndarray
    top_eigenvalue_ratio: float
    subspace_overlap: float
    rel_frobenius_error: float
    rel_frobenius_error_blocks: float | None
    k: int
    method: str

    def to_dict(self) -> dict:
        """The fields as a plain dict, the eigenvalue arrays as lists of floats."""
        d = self._asdict()
        d["top_approx"] = [float(x) for x in self.top_approx]
        d["top_reference"] = [float(x) for x in self.top_reference]
        return d


def _block_mask(like: PyTree, blocks: Sequence[Sequence[str]]) -> np.ndarray:
    paths = tu.leaf_paths(like)
    sizes = [int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(like)]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    where = {p: np.arange(offsets[i], offsets[i + 1]) for i, p in enumerate(paths)}
    n = int(offsets[-1])
    mask = np.zeros((n, n), bool)
    for block in blocks:
        missing = [p for p in block if p not in where]
        if missing:
            raise ValueError(f"blocks name unknown parameter paths {missing}; known: {paths}")
        idx = np.concatenate([where[p] for p in block])
        mask[np.ix_(idx, idx)] = True
    return mask


@functools.partial(jax.jit, static_argnums=(3,))
def _diff_norms(a, r, key, num_samples):
    ma, mr = a.bind(), r.bind()
    like = a.params_like

    def one(k):
        z = tu.random_like(k, like, "rademacher")
        rz = mr(z)
        d = tu.sub(ma(z), rz)
        return tu.vdot(d, d), tu.vdot(rz, rz)

    return jax.lax.map(one, jax.random.split(key, num_samples))


def _overlap(ua: PyTree, ur: PyTree) -> float:
    gram = tu.stacked_gram(ua, ur)
    k = gram.shape[0]
    return float(jnp.sum(gram**2) / k)


def compare_curvature(
    approx: LinearOperator,
    reference: LinearOperator,
    *,
    k: int = 5,
    key: jax.Array | None = None,
    blocks: Sequence[Sequence[str]] | str | None = "auto",
    method: str = "auto",
    num_samples: int = 50,
    dense_limit: int = DENSE_LIMIT,
    max_exact: int | None = None,
) -> CurvatureComparison:
    """Compare an approximate curvature operator (e.g. K-FAC) with a reference (e.g. GGN).

    Args:
        approx: the approximate operator (e.g. K-FAC).
        reference: the reference operator (e.g. GGN), over the same parameters.
        k: top eigenpairs compared (ratio of the largest, overlap of the subspaces).
        key: for matrix-free paths.
        blocks: parameter-path groups for the block-diagonal comparison; ``"auto"`` takes
            ``approx.coverage.blocks`` when ``approx`` is a K-FAC operator.
        method: ``"auto"``, ``"exact"`` (dense) or ``"matrix-free"``.
        num_samples: probes for the matrix-free Frobenius error.
        dense_limit: largest ``n_params`` for which ``"auto"`` goes dense.
        max_exact: old name of ``dense_limit`` (used when given).

    Returns:
        :class:`CurvatureComparison`. Cost: two dense matrices and ``eigh`` (exact), else two
        Lanczos runs and ``num_samples`` products of each operator.

    Raises:
        TypeError: an operator is not a :class:`LinearOperator`, ``k`` / ``num_samples`` not
            an integer, or ``key`` is not a PRNG key.
        ValueError: if the operators act on different parameter trees, ``k < 1``, or the
            matrix-free path has no ``key``.
        NonFiniteError: an operator is not finite.
    """
    _check_op(approx, "approx")
    _check_op(reference, "reference")
    if approx._spec != reference._spec:
        raise ValueError("approx and reference act on different parameter trees")
    if blocks == "auto":
        cov = getattr(approx, "coverage", None)
        blocks = None if cov is None else cov.blocks
    k = min(check_int(k, "k", lo=1), approx.n_params)
    exact = _resolve_method(method, approx, dense_limit, max_exact) == "exact"
    if exact:
        a, r = _dense(approx, "compare_curvature"), _dense(reference, "compare_curvature")
        ea, va = np.linalg.eigh(a)
        er, vr = np.linalg.eigh(r)
        top_a, top_r = ea[::-1][:k], er[::-1][:k]
        overlap = float(np.sum((va[:, ::-1][:, :k].T @ vr[:, ::-1][:, :k]) ** 2) / k)
        err = float(np.linalg.norm(a - r) / np.linalg.norm(r))
        err_b = None
        if blocks:
            mask = _block_mask(approx.params_like, blocks)
            rb = np.where(mask, r, 0.0)
            err_b = float(np.linalg.norm(np.where(mask, a, 0.0) - rb) / np.linalg.norm(rb))
        how = "exact"
    else:
        key = _need_key(key, "comparison")
        k1, k2, k3 = jax.random.split(key, 3)
        pa = top_eigenvalues(approx, k, key=k1, method="matrix-free", return_eigenvectors=True)
        pr = top_eigenvalues(reference, k, key=k2, method="matrix-free", return_eigenvectors=True)
        top_a, top_r = pa.values, pr.values
        overlap = _overlap(pa.vectors, pr.vectors)
        num_samples = check_int(num_samples, "num_samples", lo=1)
        d, rr = jax.device_get(_diff_norms(approx, reference, k3, num_samples))
        _check_samples("compare_curvature", d, "||(approx - reference) z||^2")
        _check_samples("compare_curvature", rr, "||reference z||^2")
        err = float(math.sqrt(np.mean(d) / np.mean(rr)))
        err_b, how = None, "matrix-free"
    ratio = float(top_a[0] / top_r[0]) if top_r[0] != 0 else float("inf")
    return CurvatureComparison(np.asarray(top_a), np.asarray(top_r), ratio, overlap, err, err_b,
                               k, how)
