"""Laplace building blocks: log-determinants, GGN diagonal, posteriors, predictive, evidence.

The Laplace approximation puts a Gaussian ``N(theta*, Sigma)`` on the parameters at a
minimum ``theta*`` of the regularised loss, with posterior precision

    ``P = H + tau I``,  ``H = scale * C``,

where ``C`` is a curvature operator of the *mean* loss (``gj.ggn`` / ``gj.kfac`` of
``head(model_fn(params, batch), batch)``), ``tau`` is the prior precision (an isotropic
Gaussian prior ``N(0, tau^-1 I)``) and ``scale`` turns the mean loss into the negative
log-likelihood: ``-log p(D | theta) = scale * loss(theta) + const``. For the built-in heads
:func:`head_log_likelihood` returns both: softmax cross-entropy over ``N`` examples has
``scale = N`` (the sum of the token weights), MSE with Gaussian noise ``sigma^2`` has
``scale = N C / (2 sigma^2)``.

Building blocks (all pure functions over pytrees; results are NamedTuples; the array work
is jitted and the NamedTuples pass through ``jax.jit``):

1. Spectra and closed-form log-determinants. :class:`LaplaceSpectrum` holds the non-zero
   part of the spectrum of ``H``; ``logdet(H + tau I) = sum_i log(lambda_i + tau) +
   (P - m) log tau`` and the trace follow in ``O(m)``. Constructors: :func:`kfac_spectrum`
   (per K-FAC block the eigenvalues of ``A (x) B`` are ``outer(eig(A), eig(B))``),
   :func:`dense_spectrum` (tiny models), :func:`lowrank_spectrum`, :func:`diagonal_spectrum`.
   :func:`kfac_logdet` returns the K-FAC log-determinant and trace with a per-layer split.
   Parameters K-FAC does not cover (``K.coverage.uncovered``: LayerNorm scales, unfoldable
   biases, ...) have a zero curvature block, so there the posterior precision is the prior
   precision only: they add ``n_uncovered * log tau`` to the log-determinant and
   ``n_uncovered * tau`` to the trace (exactly what ``K.to_dense() + tau I`` gives).
2. :func:`ggn_diagonal`: the exact diagonal of the GGN ``J^T H_out J`` (not a stochastic
   estimate), from one vector-Jacobian product per example, position and column of an
   explicit factor of the head's Hessian.
3. :class:`LowRankPosterior`: precision ``U diag(lam) U^T + diag(tau + d)`` from the top-r
   eigenpairs of the Krylov engine (:func:`lowrank_posterior`, via ``gj.top_eigenpairs``),
   optionally with the diagonal correction ``d = max(diag(H) - diag(U diag(lam) U^T), 0)``
   that makes the precision's diagonal exact (``ggn_diag=``); precision / covariance
   products, samples and the log-determinant by the Woodbury identity in ``O(r P + r^3)``.
4. :func:`predictive_variance`: the linearised-Laplace predictive covariance
   ``J(x*) Sigma J(x*)^T`` per test example by ``vjp`` columns, for ``Sigma`` from (3)
   (:func:`lowrank_covariance`), from K-FAC (:func:`kfac_covariance`), a dense inverse
   (:func:`dense_covariance`) or any covariance matvec.
5. :func:`log_marginal_likelihood` (MacKay 1992; Immer et al. 2021)::

       log p(D) ~= log p(D | theta*) - tau/2 ||theta*||^2 + P/2 log tau
                   - 1/2 logdet(H + tau I)

   (the ``P/2 log(2 pi)`` of the Gaussian prior and of the Laplace integral cancel), and
   :func:`optimize_prior_precision`, which maximises it over ``tau`` at fixed ``theta*``:
   the stationarity condition is MacKay's fixed point ``tau = gamma(tau) / ||theta*||^2``
   with ``gamma = P - tau tr((H + tau I)^-1)`` the effective number of parameters; the
   root is found by ``scipy.optimize.brentq`` in ``log tau`` (default) or by the fixed-point
   iteration itself.
6. laplax interop (:func:`to_laplax_low_rank`, :func:`to_laplax_diagonal`,
   :func:`to_laplax_full`, :func:`to_laplax_mv`): the curvature in the shapes laplax's
   ``set_posterior_fn`` / ``create_posterior_fn`` take (``docs/laplace.md``).

Supported names: the ``__all__`` list.

References:
    D. MacKay (1992), "A Practical Bayesian Framework for Backpropagation Networks";
    H. Ritter, A. Botev, D. Barber (2018), "A Scalable Laplace Approximation for Neural
    Networks"; A. Immer et al. (2021), "Scalable Marginal Likelihood Estimation for Model
    Selection in Deep Learning"; E. Daxberger et al. (2021), "Laplace Redux".
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
from gradience_jax._validate import (
    ArgumentTypeError,
    check_all_finite,
    check_batch,
    check_choice,
    check_int,
    check_key,
    check_like,
    check_loss_at_point,
    check_params,
    check_real,
    check_scalar_fn,
    is_traced,
)
from gradience_jax.operators._common import check_callable
from gradience_jax.operators.base import (
    DEFAULT_MAX_DENSE_PARAMS,
    LinearOperator,
    check_operator,
    from_matvec,
)
from gradience_jax.operators.heads import (
    Head,
    MeanSquaredError,
    SoftmaxCrossEntropy,
    check_targets,
    compose,
)
from gradience_jax.operators.kfac import KFACOperator, kfac_inverse
from gradience_jax.spectrum import DENSE_LIMIT, top_eigenpairs

PyTree = Any

__all__ = [
    "KFACLogdet",
    "LaplaceSpectrum",
    "LaplaceWarning",
    "LogLikelihood",
    "LowRankPosterior",
    "LowRankTerms",
    "MarginalLikelihood",
    "PredictiveVariance",
    "PriorPrecision",
    "PRIOR_METHODS",
    "dense_covariance",
    "dense_spectrum",
    "diagonal_spectrum",
    "effective_params",
    "ggn_diagonal",
    "head_log_likelihood",
    "kfac_covariance",
    "kfac_logdet",
    "kfac_spectrum",
    "log_marginal_likelihood",
    "logdet",
    "lowrank_covariance",
    "lowrank_posterior",
    "lowrank_posterior_from_eigenpairs",
    "lowrank_spectrum",
    "optimize_prior_precision",
    "predictive_variance",
    "to_laplax_diagonal",
    "to_laplax_full",
    "to_laplax_low_rank",
    "to_laplax_mv",
    "trace",
]

#: the ``method`` choices of :func:`optimize_prior_precision`
PRIOR_METHODS = ("brentq", "fixed_point")

#: elements (``chunk x columns x P``) of per-example gradients held at once by default
_CHUNK_BUDGET = 2**24


class LaplaceWarning(UserWarning):
    """A Laplace quantity was computed from a doubtful input (e.g. clipped eigenvalues)."""


# ---------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------


def _positive(value: Any, name: str) -> Any:
    """A ``> 0`` real scalar: checked when concrete, passed through (0-d) when traced."""
    if is_traced(value):
        value = jnp.asarray(value)
        if value.ndim != 0:
            raise ValueError(f"{name} must be a scalar, got shape {value.shape}")
        return value
    return check_real(value, name, lo=0.0, lo_open=True)


def _params_dtype(params: PyTree) -> jnp.dtype:
    return tu.promote_dtypes(*jax.tree_util.tree_leaves(params))


@dataclasses.dataclass(frozen=True, eq=False)
class _ByIdentity:
    """Hash / compare an unhashable callable by identity (for jit's static arguments)."""

    fn: Callable

    def __call__(self, *args):
        return self.fn(*args)

    def __hash__(self) -> int:
        return id(self.fn)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByIdentity) and other.fn is self.fn


def _static(fn: Callable) -> Callable:
    try:
        hash(fn)
        return fn
    except TypeError:
        return _ByIdentity(fn)


def _rows_dot(rows: PyTree, v: PyTree) -> jax.Array:
    """``(<rows_k, v>)_k`` for a stack ``rows`` (leaves ``(r, *leaf)``) and a vector ``v``."""
    parts = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, x: jnp.tensordot(a, x.astype(a.dtype), axes=x.ndim), rows, v))
    return functools.reduce(jnp.add, parts)


def _rows_combine(rows: PyTree, coeffs: jax.Array, like: PyTree) -> PyTree:
    """``sum_k coeffs_k rows_k`` cast to ``like``'s leaf dtypes."""
    return jax.tree_util.tree_map(
        lambda a, x: jnp.tensordot(coeffs.astype(a.dtype), a, axes=1).astype(x.dtype),
        rows, like)


def _sq_norm(params: PyTree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(params)
    dt = tu.accumulation_dtype(_params_dtype(params))
    return functools.reduce(jnp.add, [jnp.sum(jnp.square(x.astype(dt))) for x in leaves])


def _warn_clipped(values: np.ndarray, what: str) -> None:
    big = float(np.max(np.abs(values))) if values.size else 0.0
    low = float(np.min(values)) if values.size else 0.0
    if low < -1e-6 * max(big, 1e-300):
        warnings.warn(
            f"{what} has negative eigenvalues (min {low:.3e}, max |.| {big:.3e}); they are "
            "clipped to 0 (a Laplace posterior needs a PSD curvature: use the GGN / Fisher)",
            LaplaceWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------
# 1. spectra, log-determinants, traces
# ---------------------------------------------------------------------------------------


class LaplaceSpectrum(NamedTuple):
    """The non-zero part of the spectrum of a curvature ``H`` (``P`` parameters).

    ``H`` has the eigenvalues ``eigenvalues`` (``m`` of them, ``>= 0``) and ``P - m``
    zeros, so ``logdet(H + tau I) = sum_i log(lambda_i + tau) + (P - m) log tau``.

    Attributes:
        eigenvalues: ``(m,)`` eigenvalues of ``H = scale * C`` (already scaled).
        n_params: ``P``, the dimension (a Python int when built eagerly).
    """

    eigenvalues: jax.Array
    n_params: Any


def _spectrum_parts(spec: LaplaceSpectrum, prior_prec: Any):
    lam = spec.eigenvalues
    tau = jnp.asarray(prior_prec, lam.dtype)
    rest = jnp.asarray(spec.n_params - lam.shape[0], lam.dtype)
    return lam, tau, rest


def logdet(spec: LaplaceSpectrum, prior_prec: Any) -> jax.Array:
    """``logdet(H + tau I) = sum_i log(lambda_i + tau) + (P - m) log tau``.

    Args:
        spec: a :class:`LaplaceSpectrum`.
        prior_prec: ``tau > 0`` (may be traced).

    Returns:
        The scalar log-determinant in the eigenvalues' dtype. Cost ``O(m)``.

    Raises:
        ValueError: ``prior_prec`` is not ``> 0`` (concrete values).
        ArgumentTypeError: ``spec`` is not a :class:`LaplaceSpectrum`.

    Example:
        >>> import jax.numpy as jnp
        >>> from gradience_jax.laplace import LaplaceSpectrum, logdet
        >>> spec = LaplaceSpectrum(jnp.array([1.0, 3.0]), 3)  # eigenvalues 1, 3 and 0
        >>> round(float(logdet(spec, 1.0)), 6)  # log 2 + log 4 + log 1
        2.079442
    """
    _check_spectrum(spec)
    lam, tau, rest = _spectrum_parts(spec, _positive(prior_prec, "prior_prec"))
    return jnp.sum(jnp.log(lam + tau)) + rest * jnp.log(tau)


def trace(spec: LaplaceSpectrum, prior_prec: Any = 0.0) -> jax.Array:
    """``tr(H + tau I) = sum_i lambda_i + P tau``.

    Args:
        spec: a :class:`LaplaceSpectrum`.
        prior_prec: ``tau >= 0`` (may be traced).

    Returns:
        The scalar trace. Cost ``O(m)``.

    Raises:
        ArgumentTypeError: ``spec`` is not a :class:`LaplaceSpectrum`.
        ValueError: ``prior_prec < 0`` (concrete values).
    """
    _check_spectrum(spec)
    if not is_traced(prior_prec):
        check_real(prior_prec, "prior_prec", lo=0.0)
    lam = spec.eigenvalues
    return jnp.sum(lam) + jnp.asarray(spec.n_params, lam.dtype) * jnp.asarray(prior_prec,
                                                                              lam.dtype)


def effective_params(spec: LaplaceSpectrum, prior_prec: Any) -> jax.Array:
    """MacKay's effective number of parameters ``gamma = sum_i lambda_i / (lambda_i + tau)``.

    Args:
        spec: a :class:`LaplaceSpectrum`.
        prior_prec: ``tau > 0``.

    Returns:
        ``gamma`` in ``[0, m]``.

    Raises:
        ArgumentTypeError: ``spec`` is not a :class:`LaplaceSpectrum`.
        ValueError: ``prior_prec`` is not ``> 0`` (concrete values).
    """
    _check_spectrum(spec)
    lam, tau, _ = _spectrum_parts(spec, _positive(prior_prec, "prior_prec"))
    return jnp.sum(lam / (lam + tau))


def _check_spectrum(spec: Any) -> None:
    if not isinstance(spec, LaplaceSpectrum):
        raise ArgumentTypeError(
            f"spec must be a LaplaceSpectrum (from kfac_spectrum / dense_spectrum / "
            f"lowrank_spectrum / diagonal_spectrum), got {type(spec).__name__}")


def _check_kfac(K: Any) -> KFACOperator:
    if not isinstance(K, KFACOperator):
        raise ArgumentTypeError(f"K must be an operator returned by gj.kfac(), got "
                                f"{type(K).__name__}")
    return K


def _block_eigenvalues(K: KFACOperator) -> list[jax.Array]:
    return [(f.a_evals[:, None] * f.b_evals[None, :]).reshape(-1) for f in K.operands[0]]


def kfac_spectrum(K: KFACOperator, *, scale: Any = 1.0) -> LaplaceSpectrum:
    """The eigenvalues of ``scale * K`` in closed form (no dense Kronecker product).

    Per block the eigenvalues of ``A (x) B`` are ``outer(eig(A), eig(B))`` (the factors'
    stored eigendecompositions); parameters K-FAC does not cover have a zero block and are
    the ``P - m`` zeros of the spectrum.

    Args:
        K: an operator returned by :func:`gradience_jax.kfac`.
        scale: ``> 0``, the factor from the mean loss to the negative log-likelihood.

    Returns:
        :class:`LaplaceSpectrum` with ``m = K.coverage.n_covered`` eigenvalues. Cost
        ``O(m)`` (the factors are already eigendecomposed). Jittable (``K`` is a pytree).

    Raises:
        ArgumentTypeError: ``K`` is not a :class:`KFACOperator`.
        ValueError: ``scale`` is not ``> 0``.
    """
    _check_kfac(K)
    scale = _positive(scale, "scale")
    blocks = _block_eigenvalues(K)
    lam = jnp.concatenate(blocks) if blocks else jnp.zeros((0,), K.dtype)
    return LaplaceSpectrum(lam * jnp.asarray(scale, lam.dtype), K.n_params)


class KFACLogdet(NamedTuple):
    """Closed-form log-determinant and trace of ``scale * K + damping * I``.

    Attributes:
        logdet: ``sum_layers sum log(scale * outer(eig A, eig B) + damping) +
            n_uncovered * log(damping)``.
        trace: ``sum_layers sum (scale * outer + damping) + n_uncovered * damping``.
        layer_logdets: ``{layer name: that layer's log-determinant}``.
        uncovered_logdet: ``n_uncovered * log(damping)`` (prior precision only there).
        n_covered: parameters inside K-FAC blocks.
        n_uncovered: parameters without a block (``K.coverage.uncovered``).
    """

    logdet: jax.Array
    trace: jax.Array
    layer_logdets: dict
    uncovered_logdet: jax.Array
    n_covered: int
    n_uncovered: int


def kfac_logdet(K: KFACOperator, damping: Any, *, scale: Any = 1.0) -> KFACLogdet:
    """``logdet`` and ``trace`` of ``scale * K + damping * I`` from the Kronecker factors.

    In Laplace terms ``damping`` is the prior precision ``tau`` and ``scale`` the number of
    examples (see the module docstring); the uncovered parameters get the prior precision
    only. Exact (to rounding) for the K-FAC matrix itself: equal to
    ``slogdet(scale * K.to_dense() + damping I)``.

    Args:
        K: an operator returned by :func:`gradience_jax.kfac`.
        damping: ``> 0`` (may be traced).
        scale: ``> 0`` multiplier of ``K``.

    Returns:
        :class:`KFACLogdet`. Cost ``O(n_params)`` after the factors' eigendecompositions
        (which :func:`gradience_jax.kfac` already did). Jittable.

    Raises:
        ArgumentTypeError: ``K`` is not a :class:`KFACOperator`, or ``damping`` / ``scale``
            is not a real scalar.
        ValueError: ``damping`` or ``scale`` is not ``> 0``.
    """
    _check_kfac(K)
    damping = _positive(damping, "damping")
    scale = _positive(scale, "scale")
    blocks = _block_eigenvalues(K)
    dt = blocks[0].dtype if blocks else K.dtype
    d, s = jnp.asarray(damping, dt), jnp.asarray(scale, dt)
    n_cov = int(sum(b.shape[0] for b in blocks))
    n_unc = K.n_params - n_cov
    layers = {layer.name: jnp.sum(jnp.log(s * b + d))
              for layer, b in zip(K.coverage.layers, blocks)}
    unc = jnp.asarray(n_unc, dt) * jnp.log(d)
    total = functools.reduce(jnp.add, layers.values(), unc)
    tr = functools.reduce(jnp.add, [jnp.sum(s * b) for b in blocks], jnp.zeros((), dt))
    tr = tr + jnp.asarray(K.n_params, dt) * d
    return KFACLogdet(total, tr, layers, unc, n_cov, n_unc)


def dense_spectrum(curvature: Any, *, scale: Any = 1.0,
                   max_params: int = DEFAULT_MAX_DENSE_PARAMS) -> LaplaceSpectrum:
    """All eigenvalues of ``scale * C`` from a dense float64 ``eigh`` (tiny models).

    Args:
        curvature: a :class:`LinearOperator` (``to_dense()`` is called) or a symmetric
            ``(P, P)`` matrix.
        scale: ``> 0`` multiplier.
        max_params: the largest ``P`` densified.

    Returns:
        :class:`LaplaceSpectrum` with ``m = P``; negative eigenvalues (round-off, or an
        indefinite Hessian) are clipped to 0, with a :class:`LaplaceWarning` when one is
        below ``-1e-6`` of the largest magnitude. Cost ``O(P^3)``, ``P^2`` memory.

    Raises:
        ArgumentTypeError: ``curvature`` is neither an operator nor a matrix.
        ValueError: a non-square matrix, ``P > max_params``, or a bad ``scale``.
        FloatingPointError: non-finite entries.
    """
    scale = check_real(scale, "scale", lo=0.0, lo_open=True)
    if isinstance(curvature, LinearOperator):
        mat = np.asarray(curvature.to_dense(max_params=max_params), np.float64)
        dtype = curvature.dtype
    else:
        if not hasattr(curvature, "shape"):
            raise ArgumentTypeError(f"curvature must be a LinearOperator or a (P, P) matrix, "
                                    f"got {type(curvature).__name__}")
        mat = np.asarray(curvature, np.float64)
        dtype = jnp.result_type(curvature)
        if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
            raise ValueError(f"curvature must be a square (P, P) matrix, got shape {mat.shape}")
    check_all_finite(mat, "the dense curvature")
    evals = np.linalg.eigvalsh(0.5 * (mat + mat.T)) * scale
    _warn_clipped(evals, "the curvature")
    dtype = dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32
    return LaplaceSpectrum(jnp.asarray(np.maximum(evals, 0.0), dtype), int(mat.shape[0]))


def lowrank_spectrum(values: Any, n_params: int, *, scale: Any = 1.0) -> LaplaceSpectrum:
    """The spectrum of a rank-``r`` curvature ``scale * U diag(values) U^T`` in ``P`` dims.

    The ``P - r`` directions outside the subspace get curvature 0 (prior precision only):
    the low-rank Laplace approximation.

    Args:
        values: ``(r,)`` eigenvalues (e.g. ``gj.top_eigenpairs(G, r).values``).
        n_params: ``P >= r``.
        scale: ``> 0`` multiplier.

    Returns:
        :class:`LaplaceSpectrum`; negative values are clipped to 0.

    Raises:
        ValueError: ``values`` is not 1-D, ``n_params < r`` or a bad ``scale``.
        ArgumentTypeError: ``n_params`` is not an integer.
    """
    scale = _positive(scale, "scale")
    values = jnp.asarray(values)
    if values.ndim != 1:
        raise ValueError(f"values must be a 1-D array of eigenvalues, got shape {values.shape}")
    n_params = check_int(n_params, "n_params", lo=values.shape[0])
    lam = jnp.maximum(values, 0.0) * jnp.asarray(scale, values.dtype)
    return LaplaceSpectrum(lam, n_params)


def diagonal_spectrum(diag: PyTree, *, scale: Any = 1.0) -> LaplaceSpectrum:
    """The "spectrum" of a diagonal curvature (e.g. :func:`ggn_diagonal`): its entries.

    Args:
        diag: pytree like the params (the curvature's diagonal).
        scale: ``> 0`` multiplier.

    Returns:
        :class:`LaplaceSpectrum` with ``m = P`` (negative entries clipped to 0).

    Raises:
        ValueError: a bad ``scale`` or an empty pytree.
        TypeError: a non-floating leaf.
    """
    check_params(diag, "diag")
    scale = _positive(scale, "scale")
    flat = tu.ravel(diag)
    return LaplaceSpectrum(jnp.maximum(flat, 0.0) * jnp.asarray(scale, flat.dtype), flat.size)


# ---------------------------------------------------------------------------------------
# 2. exact GGN diagonal
# ---------------------------------------------------------------------------------------


def _output_factor(head: Head, outputs: jax.Array, batch: PyTree) -> tuple:
    """Rows ``q_tk`` and weights ``c_tk`` with ``H_t = sum_k c_tk q_tk q_tk^T`` per token.

    ``H_t`` is the head's Hessian w.r.t. token ``t``'s outputs, with the token weight and the
    normaliser (``w_t / Z``), soft-target sums and the NaN flag of invalid labels included.
    Softmax CE: ``q_k = sqrt(p_k) (e_k - p)``, ``c = w / Z`` (``sum_k q_k q_k^T = diag(p) -
    p p^T``); MSE: ``q_k = e_k``, ``c = 2 w / Z``; other :class:`Head` subclasses: the
    eigendecomposition of the per-token Hessian (signed eigenvalues as weights).

    Returns:
        ``q`` ``(*lead, K, C)`` and ``c`` ``(*lead, K)`` in the outputs' dtype.
    """
    lead, num_classes = outputs.shape[:-1], outputs.shape[-1]
    dt = outputs.dtype
    w = head.weights(batch, lead, dt)
    targets = head.targets(batch)
    coef = w / head.normalizer(w, num_classes)
    flag = head.target_factor(outputs, targets, w)
    if flag is not None:
        coef = coef * flag
    eye = jnp.eye(num_classes, dtype=dt)
    if isinstance(head, SoftmaxCrossEntropy):
        p = jax.nn.softmax(outputs, axis=-1)
        q = jnp.sqrt(p)[..., :, None] * (eye - p[..., None, :])
        if targets is not None and not jnp.issubdtype(jnp.result_type(targets), jnp.integer):
            coef = coef * jnp.asarray(targets, dt).sum(-1)
        return q, jnp.broadcast_to(coef[..., None], lead + (num_classes,))
    if isinstance(head, MeanSquaredError):
        q = jnp.broadcast_to(eye, lead + (num_classes, num_classes))
        return q, jnp.broadcast_to(2.0 * coef[..., None], lead + (num_classes,))
    basis = jnp.moveaxis(jnp.broadcast_to(eye, lead + (num_classes, num_classes)), -2, 0)
    cols = jax.vmap(lambda u: head.token_hvp(outputs, targets, u))(basis)  # (C, *lead, C)
    hmat = jnp.moveaxis(cols, 0, -1)
    evals, evecs = jnp.linalg.eigh(0.5 * (hmat + jnp.swapaxes(hmat, -1, -2)))
    return jnp.swapaxes(evecs, -1, -2), coef[..., None] * evals


def _pad_examples(tree: PyTree, pad: int, mode: str) -> PyTree:
    if pad == 0:
        return tree
    return jax.tree_util.tree_map(
        lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), mode=mode), tree)


def _chunked(tree: PyTree, chunk: int) -> PyTree:
    return jax.tree_util.tree_map(lambda x: x.reshape((-1, chunk) + x.shape[1:]), tree)


def _one_example(x: jax.Array) -> jax.Array:
    return x[None]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _ggn_diagonal_jit(model_fn, head, chunk, params, batch):
    outputs = model_fn(params, batch)
    q, c = _output_factor(head, outputs, batch)
    n, rest, num_classes = outputs.shape[0], outputs.shape[1:-1], outputs.shape[-1]
    r, k = math.prod(rest), q.shape[-2]
    q = q.reshape(n, r, k, num_classes)
    c = c.reshape(n, r * k)
    eye_r = jnp.eye(r, dtype=outputs.dtype)

    def one(ex, q_n, c_n):
        ex1 = jax.tree_util.tree_map(_one_example, ex)
        _, vjp = jax.vjp(lambda p: model_fn(p, ex1), params)
        cots = jnp.einsum("ab,akc->akbc", eye_r, q_n).reshape((r * k, 1) + rest
                                                              + (num_classes,))
        g = jax.vmap(lambda u: vjp(u)[0])(cots)  # leaves (r k, *leaf)
        return jax.tree_util.tree_map(
            lambda x: jnp.tensordot(c_n.astype(x.dtype), x * x, axes=1), g)

    pad = (-n) % chunk
    xs = (_chunked(_pad_examples(batch, pad, "edge"), chunk),
          _chunked(_pad_examples(q, pad, "constant"), chunk),
          _chunked(_pad_examples(c, pad, "constant"), chunk))

    def step(acc, x):
        d = jax.vmap(one)(*x)
        return jax.tree_util.tree_map(lambda a, y: a + y.sum(0), acc, d), None

    acc, _ = jax.lax.scan(step, tu.zeros_like(params), xs)
    return acc


def ggn_diagonal(
    model_fn: Callable[[PyTree, PyTree], jax.Array],
    head: Head,
    params: PyTree,
    batch: PyTree,
    *,
    chunk_size: int | None = None,
    check: bool = True,
) -> PyTree:
    """The exact diagonal of the GGN ``G = J^T H_out J`` of ``head(model_fn(params, batch))``.

    ``diag(G) = sum_{n, r, k} c_nrk (J_nr^T q_nrk)^2`` where, per example ``n`` and output
    position ``r``, ``H_nr = sum_k c_nrk q_nrk q_nrk^T`` is an explicit factorisation of the
    head's output Hessian (softmax CE: ``diag(p) - p p^T = sum_k p_k (e_k - p)(e_k - p)^T``;
    MSE: ``2 I``; see ``_output_factor``). Each ``J_nr^T q`` is one ``vjp`` of example
    ``n`` fed as a batch of one (examples must not interact, as for ``gj.kfac``); the
    ``R C`` columns of an example share its forward pass (``vmap``), and examples run
    ``chunk_size`` at a time in a ``lax.scan``. Deterministic, no sampling.

    Cost: one forward pass over the batch, then ``N R C`` vector-Jacobian products through
    one example (about ``R C`` backward passes over the batch; ``R`` = positions per
    example, 1 for plain classifiers / regressors, ``C`` = output size). Memory:
    ``chunk_size * R * C`` parameter-sized gradients plus ``chunk_size`` examples'
    activations. For large ``R C`` (language models) prefer ``gj.diagonal`` (stochastic)
    or K-FAC.

    Args:
        model_fn: ``model_fn(params, batch) -> (N, *rest, C)`` outputs.
        head: a built-in head (``gj.heads.softmax_cross_entropy`` / ``mse``) or another
            :class:`~gradience_jax.Head` subclass (its per-token Hessian is eigendecomposed).
        params: parameter pytree.
        batch: pytree with a shared leading batch axis ``N``.
        chunk_size: examples per scan step (default: as many as keep
            ``chunk_size * R * C * P <= 2**24``, at least 1).
        check: raise on a non-finite loss / gradient at the point, and on a non-finite
            diagonal (eager calls).

    Returns:
        A pytree like ``params`` (``>= 0`` for convex heads).

    Raises:
        ArgumentTypeError: ``head`` is not a :class:`~gradience_jax.Head`, ``model_fn`` is
            not callable, or ``chunk_size`` is not an integer.
        ValueError: ``chunk_size < 1``, inconsistent batch axes, integer labels out of range.
        FloatingPointError: a non-finite loss or diagonal (``check=True``).
    """
    check_callable(model_fn, "model_fn")
    if not isinstance(head, Head):
        raise ArgumentTypeError(
            f"head must be a gj.heads head (softmax_cross_entropy / mse or a gj.Head "
            f"subclass with a per-token Hessian), got {type(head).__name__}")
    check_params(params)
    n = check_batch(batch)
    loss_fn = compose(model_fn, head)
    check_scalar_fn(loss_fn, (params, batch), "head(model_fn(params, batch), batch)")
    check_targets(head, model_fn, params, batch)
    if check:
        check_loss_at_point(loss_fn, params, batch, "the loss head(model_fn(params, batch))")
    out = jax.eval_shape(model_fn, params, batch)
    columns = math.prod(out.shape[1:])  # R * C per example
    if chunk_size is None:
        chunk_size = max(1, min(n, _CHUNK_BUDGET // max(columns * tu.size(params), 1)))
    chunk_size = min(check_int(chunk_size, "chunk_size"), n)
    diag = _ggn_diagonal_jit(_static(model_fn), head, chunk_size, params, batch)
    if check:
        check_all_finite(diag, "the GGN diagonal")
    return diag


# ---------------------------------------------------------------------------------------
# 3. low-rank + diagonal posterior
# ---------------------------------------------------------------------------------------


class LowRankPosterior(NamedTuple):
    """Gaussian posterior with precision ``P = U diag(values) U^T + diag(prior_prec + diag)``.

    ``U`` (the rows of ``vectors``) should be orthonormal (eigenvectors); every formula
    below holds for any ``U`` through the Woodbury identity with ``W = U diag(values)^1/2``,
    ``D = prior_prec + diag`` and the ``r x r`` Gram ``G = W^T D^-1 W = V diag(s) V^T``:

    * ``Sigma = D^-1 - D^-1 W (I + G)^-1 W^T D^-1``,
    * ``logdet P = sum log D + sum log(1 + s)``,
    * samples ``D^-1/2 (I + B B^T)^-1/2 eps`` with ``B = D^-1/2 W`` (so ``cov = P^-1``).

    Each product costs ``O(r P)`` plus an ``r x r`` eigendecomposition. All methods are
    jittable (the posterior is a pytree).

    Attributes:
        values: ``(r,)`` eigenvalues ``>= 0`` of the low-rank precision part (already scaled:
            ``scale * lambda_k`` of the curvature).
        vectors: pytree stack (leaves ``(r, *leaf)``) of the eigenvectors.
        prior_prec: scalar ``tau > 0``.
        diag: ``None`` or a pytree like the params of extra diagonal precision ``>= 0``
            (the diagonal correction of :func:`lowrank_posterior`).
    """

    values: jax.Array
    vectors: PyTree
    prior_prec: Any
    diag: PyTree | None = None

    # -- internals ------------------------------------------------------------------------
    def _like(self) -> PyTree:
        return jax.tree_util.tree_map(lambda x: x[0], self.vectors)

    def _dvec(self) -> PyTree:
        """``D`` as a pytree (leaves broadcastable against params leaves)."""
        tau = self.prior_prec
        if self.diag is None:
            return jax.tree_util.tree_map(lambda x: jnp.asarray(tau, x.dtype), self._like())
        return jax.tree_util.tree_map(lambda d: d + jnp.asarray(tau, d.dtype), self.diag)

    def _woodbury(self):
        dvec = self._dvec()
        sq = jnp.sqrt(jnp.maximum(self.values, 0.0))
        w = jax.tree_util.tree_map(
            lambda u: u * sq.astype(u.dtype).reshape((-1,) + (1,) * (u.ndim - 1)), self.vectors)
        dinv_w = jax.tree_util.tree_map(lambda a, d: a / d, w, dvec)
        gram = tu.stacked_gram(w, dinv_w)
        s, v = jnp.linalg.eigh(0.5 * (gram + gram.T))
        return dvec, w, dinv_w, jnp.maximum(s, 0.0), v

    # -- products -------------------------------------------------------------------------
    def precision(self, v: PyTree) -> PyTree:
        """``P v = D v + W (W^T v)``.

        Args:
            v: a vector like the params.

        Returns:
            ``P v``, like ``v``.
        """
        return _post_precision(self, v)

    def _precision(self, v: PyTree) -> PyTree:
        dvec = self._dvec()
        sq = jnp.sqrt(jnp.maximum(self.values, 0.0))
        coeff = _rows_dot(self.vectors, v) * sq.astype(_params_dtype(v))
        low = _rows_combine(self.vectors, coeff * sq.astype(coeff.dtype), v)
        return jax.tree_util.tree_map(lambda x, d, y: (d * x + y).astype(x.dtype), v, dvec, low)

    def covariance(self, v: PyTree) -> PyTree:
        """``Sigma v = P^-1 v`` (Woodbury).

        Args:
            v: a vector like the params.

        Returns:
            ``Sigma v``, like ``v``.
        """
        return _post_covariance(self, v)

    def _covariance(self, v: PyTree) -> PyTree:
        dvec, _, dinv_w, s, vv = self._woodbury()
        a = _rows_dot(dinv_w, v)
        b = vv @ ((vv.T @ a.astype(vv.dtype)) / (1.0 + s))
        corr = _rows_combine(dinv_w, b, v)
        return jax.tree_util.tree_map(lambda x, d, y: (x / d - y).astype(x.dtype), v, dvec, corr)

    def logdet(self) -> jax.Array:
        """``logdet P = sum log D + sum_k log(1 + s_k)`` (the precision's, not Sigma's).

        Returns:
            The scalar log-determinant.
        """
        return _post_logdet(self)

    def _logdet(self) -> jax.Array:
        dvec, _, _, s, _ = self._woodbury()
        like = self._like()
        parts = jax.tree_util.tree_map(
            lambda d, x: jnp.sum(jnp.broadcast_to(jnp.log(d), x.shape)), dvec, like)
        return functools.reduce(jnp.add, jax.tree_util.tree_leaves(parts)) + jnp.sum(
            jnp.log1p(s)).astype(_params_dtype(like))

    def covariance_trace(self) -> jax.Array:
        """``tr Sigma = sum 1/D - tr((I + G)^-1 W^T D^-2 W)``.

        Returns:
            The scalar trace of the covariance.
        """
        return _post_covariance_trace(self)

    def _covariance_trace(self) -> jax.Array:
        dvec, _, dinv_w, s, vv = self._woodbury()
        like = self._like()
        parts = jax.tree_util.tree_map(
            lambda d, x: jnp.sum(jnp.broadcast_to(1.0 / d, x.shape)), dvec, like)
        h = tu.stacked_gram(dinv_w)
        corr = jnp.sum(jnp.diag(vv.T @ h.astype(vv.dtype) @ vv) / (1.0 + s))
        return functools.reduce(jnp.add, jax.tree_util.tree_leaves(parts)) - corr

    def sample(self, key: jax.Array, num_samples: int = 1, mean: PyTree | None = None) -> PyTree:
        """Draws from ``N(mean, Sigma)`` (``mean`` default 0: the perturbations).

        Args:
            key: a ``jax.random`` key.
            num_samples: number of draws (static).
            mean: ``theta*`` to add, or ``None``.

        Returns:
            A pytree stack, leaves ``(num_samples, *leaf)``. Cost ``O(num_samples r P)``.

        Raises:
            ValueError: ``num_samples < 1``.
            ArgumentTypeError: ``num_samples`` is not an integer, or ``key`` not a PRNG key.
        """
        num_samples = check_int(num_samples, "num_samples")
        return _post_sample(self, check_key(key, default=False), num_samples, mean)

    def _sample(self, key: jax.Array, num_samples: int, mean: PyTree | None) -> PyTree:
        dvec, w, _, s, vv = self._woodbury()
        like = self._like()
        isd = jax.tree_util.tree_map(lambda d: 1.0 / jnp.sqrt(d), dvec)
        b = jax.tree_util.tree_map(lambda a, e: a * e, w, isd)
        f = -1.0 / (jnp.sqrt(1.0 + s) * (1.0 + jnp.sqrt(1.0 + s)))  # ((1+s)^-1/2 - 1) / s

        def one(k):
            eps = tu.random_like(k, like, "normal")
            coeff = vv @ (f * (vv.T @ _rows_dot(b, eps).astype(vv.dtype)))
            z = tu.add(eps, _rows_combine(b, coeff, eps))
            x = jax.tree_util.tree_map(lambda zi, di: (zi * di).astype(zi.dtype), z, isd)
            return x if mean is None else tu.add(x, mean)

        return jax.vmap(one)(jax.random.split(key, num_samples))

    def spectrum(self) -> LaplaceSpectrum:
        """The spectrum of the low-rank part (``diag`` must be ``None``; else use logdet()).

        Returns:
            :class:`LaplaceSpectrum` ``(values, P)``.

        Raises:
            ValueError: the posterior has a diagonal correction.
        """
        if self.diag is not None:
            raise ValueError("a posterior with a diagonal correction has no LaplaceSpectrum "
                             "form; use its logdet() / covariance_trace()")
        return LaplaceSpectrum(self.values, tu.size(self._like()))


_post_precision = jax.jit(LowRankPosterior._precision)
_post_covariance = jax.jit(LowRankPosterior._covariance)
_post_logdet = jax.jit(LowRankPosterior._logdet)
_post_covariance_trace = jax.jit(LowRankPosterior._covariance_trace)
_post_sample = jax.jit(LowRankPosterior._sample, static_argnums=(2,))


def lowrank_posterior_from_eigenpairs(
    values: Any,
    vectors: PyTree,
    prior_prec: Any,
    *,
    scale: Any = 1.0,
    ggn_diag: PyTree | None = None,
) -> LowRankPosterior:
    """A :class:`LowRankPosterior` from eigenpairs ``(lambda, U)`` of a curvature ``C``.

    Precision ``scale * U diag(lambda) U^T + tau I`` (+ ``diag(d)`` with ``ggn_diag``:
    ``d = max(scale * ggn_diag - diag(scale * U diag(lambda) U^T), 0)``, so the precision's
    diagonal equals ``scale * diag(C) + tau`` wherever the low-rank part does not exceed it).

    Args:
        values: ``(r,)`` eigenvalues of ``C``; negative ones are clipped to 0.
        vectors: pytree stack of the eigenvectors (leaves ``(r, *leaf)``, unit norm).
        prior_prec: ``tau > 0``.
        scale: ``> 0``, mean loss -> negative log-likelihood factor.
        ggn_diag: the exact diagonal of ``C`` (e.g. :func:`ggn_diagonal`) or ``None``.

    Returns:
        :class:`LowRankPosterior` in the vectors' dtype.

    Raises:
        ValueError: ``values`` / ``vectors`` disagree on ``r``, bad ``prior_prec`` /
            ``scale``, or ``ggn_diag`` does not match the vectors' structure.
        TypeError: a ``ggn_diag`` leaf has another dtype.
    """
    prior_prec = _positive(prior_prec, "prior_prec")
    scale = _positive(scale, "scale")
    leaves = jax.tree_util.tree_leaves(vectors)
    if not leaves:
        raise ValueError("vectors is an empty pytree")
    dt = _params_dtype(vectors)
    values = jnp.asarray(values)
    if values.ndim != 1 or any(x.shape[:1] != values.shape for x in leaves):
        raise ValueError(f"values must be (r,) and every vectors leaf (r, ...); got values "
                         f"{values.shape}, leaves {[x.shape[:1] for x in leaves]}")
    if not is_traced(values):
        _warn_clipped(np.asarray(values, np.float64), "the low-rank curvature")
    lam = jnp.maximum(values.astype(dt), 0.0) * jnp.asarray(scale, dt)
    diag = None
    if ggn_diag is not None:
        like = jax.tree_util.tree_map(lambda x: x[0], vectors)
        if not is_traced(ggn_diag):
            check_like(ggn_diag, like, "ggn_diag", "the eigenvectors")
        low = jax.tree_util.tree_map(
            lambda u: jnp.tensordot(lam.astype(u.dtype), u * u, axes=1), vectors)
        diag = jax.tree_util.tree_map(
            lambda g, lo: jnp.maximum(jnp.asarray(scale, g.dtype) * g - lo.astype(g.dtype), 0.0),
            ggn_diag, low)
    return LowRankPosterior(lam, vectors, jnp.asarray(prior_prec, dt), diag)


def lowrank_posterior(
    op: LinearOperator,
    rank: int,
    prior_prec: Any,
    *,
    scale: Any = 1.0,
    ggn_diag: PyTree | None = None,
    key: jax.Array | None = None,
    dense_limit: int = DENSE_LIMIT,
    **eigsh_kwargs: Any,
) -> LowRankPosterior:
    """Low-rank (+ diagonal) Laplace posterior from the top-``rank`` eigenpairs of ``op``.

    The eigenpairs come from the Krylov engine (:func:`gradience_jax.top_eigenpairs`: dense
    ``eigh`` when ``op.n_params <= dense_limit``, thick-restart Lanczos otherwise). With
    ``rank = P`` (dense path) the covariance is the exact ``(scale C + tau I)^-1``.

    Args:
        op: a PSD curvature operator (``gj.ggn``, ``gj.mc_fisher``, ...).
        rank: ``1 <= r <= op.n_params``.
        prior_prec: ``tau > 0``.
        scale: ``> 0``, mean loss -> negative log-likelihood factor.
        ggn_diag: the exact diagonal of ``op`` (:func:`ggn_diagonal`) for the diagonal
            correction, or ``None``.
        key: PRNG key of the Lanczos start vector.
        dense_limit: as :func:`gradience_jax.top_eigenpairs`.
        **eigsh_kwargs: passed to :func:`gradience_jax.eigsh` (e.g. ``tol``).

    Returns:
        :class:`LowRankPosterior`. Cost: what ``top_eigenpairs`` costs (Lanczos: a few
        ``rank`` matvecs), then ``O(r^2 P)`` per product.

    Raises:
        ArgumentTypeError: ``op`` is not a :class:`LinearOperator`, or ``rank`` is not an
            integer.
        ValueError: ``rank`` out of range, bad ``prior_prec`` / ``scale``, or what
            ``top_eigenpairs`` raises.
    """
    check_operator(op)
    rank = check_int(rank, "rank", lo=1, hi=op.n_params)
    prior_prec = _positive(prior_prec, "prior_prec")
    scale = _positive(scale, "scale")
    pairs = top_eigenpairs(op, rank, which="LA", key=check_key(key), dense_limit=dense_limit,
                           return_eigenvectors=True, **eigsh_kwargs)
    return lowrank_posterior_from_eigenpairs(pairs.values, pairs.vectors, prior_prec,
                                             scale=scale, ggn_diag=ggn_diag)


# ---------------------------------------------------------------------------------------
# covariance operators (inputs of predictive_variance)
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _LowRankCovPrepare:
    def __call__(self, post: LowRankPosterior):
        return post.covariance


def lowrank_covariance(post: LowRankPosterior) -> LinearOperator:
    """``Sigma = P^-1`` of a :class:`LowRankPosterior` as a PSD :class:`LinearOperator`.

    Args:
        post: the posterior.

    Returns:
        A :class:`LinearOperator` named ``"lowrank_covariance"`` (the posterior is its
        operand: passing it to ``jit`` does not bake arrays into the program).

    Raises:
        ArgumentTypeError: ``post`` is not a :class:`LowRankPosterior`.
    """
    if not isinstance(post, LowRankPosterior):
        raise ArgumentTypeError(f"post must be a LowRankPosterior, got {type(post).__name__}")
    like = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                                  post.vectors)
    return LinearOperator(_LowRankCovPrepare(), post, like, is_psd=True,
                          name="lowrank_covariance")


def kfac_covariance(K: KFACOperator, prior_prec: Any, *, scale: Any = 1.0) -> LinearOperator:
    """``Sigma = (scale K + tau I)^-1 = scale^-1 (K + (tau / scale) I)^-1`` (K-FAC Laplace).

    Args:
        K: an operator returned by :func:`gradience_jax.kfac`.
        prior_prec: ``tau > 0`` (may be traced).
        scale: ``> 0`` (may be traced).

    Returns:
        A PSD :class:`LinearOperator` (products in the factors' eigenbases, as
        :func:`gradience_jax.kfac_inverse`; uncovered parameters get ``1 / tau``).

    Raises:
        ArgumentTypeError: ``K`` is not a :class:`KFACOperator`.
        ValueError: ``prior_prec`` or ``scale`` is not ``> 0``.
    """
    _check_kfac(K)
    tau = _positive(prior_prec, "prior_prec")
    s = _positive(scale, "scale")
    dt = K.dtype
    inv = kfac_inverse(K, jnp.asarray(tau, dt) / jnp.asarray(s, dt))
    return LinearOperator(_ScaledPrepare(), (inv, 1.0 / jnp.asarray(s, dt)), None,
                          is_psd=True, name="kfac_covariance", _spec=K._spec)


@dataclasses.dataclass(frozen=True)
class _ScaledPrepare:
    """``v -> alpha * (op @ v)`` with operands ``(op, alpha)`` (alpha > 0)."""

    def __call__(self, operands):
        op, alpha = operands
        mv = op.bind()
        return lambda v: jax.tree_util.tree_map(
            lambda x: (x * alpha.astype(x.dtype)).astype(x.dtype), mv(v))


@dataclasses.dataclass(frozen=True)
class _TreeDensePrepare:
    def __call__(self, matrix):
        def matvec(v):
            flat = tu.ravel(v)
            return tu.unravel_like((matrix @ flat.astype(matrix.dtype)).astype(flat.dtype), v)

        return matvec


def dense_covariance(op: LinearOperator, prior_prec: Any, *, scale: Any = 1.0,
                     max_params: int = DEFAULT_MAX_DENSE_PARAMS) -> LinearOperator:
    """``Sigma = (scale C + tau I)^-1`` by a dense float64 inverse (tiny models, references).

    Args:
        op: the curvature operator ``C``.
        prior_prec: ``tau > 0``.
        scale: ``> 0``.
        max_params: the largest ``P`` densified.

    Returns:
        A PSD :class:`LinearOperator` on pytrees like ``op.params_like`` (the ``(P, P)``
        inverse is its operand, in the operator's dtype). Cost ``O(P^3)`` once, ``O(P^2)``
        per product.

    Raises:
        ArgumentTypeError: ``op`` is not a :class:`LinearOperator`.
        ValueError: bad ``prior_prec`` / ``scale``, ``P > max_params``.
    """
    check_operator(op)
    tau = check_real(prior_prec, "prior_prec", lo=0.0, lo_open=True)
    s = check_real(scale, "scale", lo=0.0, lo_open=True)
    mat = np.asarray(op.to_dense(max_params=max_params), np.float64)
    check_all_finite(mat, "the dense curvature")
    prec = s * 0.5 * (mat + mat.T) + tau * np.eye(mat.shape[0])
    cov = np.linalg.inv(prec)
    return LinearOperator(_TreeDensePrepare(), jnp.asarray(0.5 * (cov + cov.T), op.dtype),
                          op.params_like, is_psd=True, name="dense_covariance")


def _as_covariance(covariance: Any, params: PyTree) -> LinearOperator:
    if isinstance(covariance, LowRankPosterior):
        return lowrank_covariance(covariance)
    if isinstance(covariance, LinearOperator):
        return covariance
    if callable(covariance):
        return from_matvec(covariance, params, is_psd=True, name="covariance")
    raise ArgumentTypeError(
        "covariance must be a LinearOperator (lowrank_covariance / kfac_covariance / "
        "dense_covariance), a LowRankPosterior or a callable v -> Sigma v, got "
        f"{type(covariance).__name__}")


# ---------------------------------------------------------------------------------------
# 4. linearised-Laplace predictive variance
# ---------------------------------------------------------------------------------------


class PredictiveVariance(NamedTuple):
    """Linearised-Laplace predictive of ``f(x*)``: mean ``f(x*; theta*)``, ``J Sigma J^T``.

    Attributes:
        mean: ``(N, *rest, C)`` model outputs at ``theta*``.
        variance: ``(N, *rest, C)`` the diagonal of ``J Sigma J^T`` per example.
        covariance: ``(N, *rest, C, *rest, C)`` the full per-example ``J Sigma J^T``, or
            ``None`` (``full_covariance=False``).
    """

    mean: jax.Array
    variance: jax.Array
    covariance: jax.Array | None


@functools.partial(jax.jit, static_argnums=(0, 1))
def _predictive_jit(model_fn, chunk, cov, params, batch):
    mv = cov.bind()

    def one(ex):
        ex1 = jax.tree_util.tree_map(_one_example, ex)
        out, vjp = jax.vjp(lambda p: model_fn(p, ex1), params)
        o = out.size
        basis = jnp.eye(o, dtype=out.dtype).reshape((o,) + out.shape)
        rows = jax.vmap(lambda u: vjp(u)[0])(basis)  # J^T e_j, leaves (O, *leaf)
        srows = jax.vmap(mv)(rows)
        m = tu.stacked_gram(rows, srows)
        return out[0], 0.5 * (m + m.T)

    return jax.lax.map(one, batch, batch_size=chunk)


def predictive_variance(
    model_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    covariance: Any,
    *,
    full_covariance: bool = False,
    chunk_size: int | None = None,
) -> PredictiveVariance:
    """``Var[f(x*)] = J(x*) Sigma J(x*)^T`` of the linearised model, per test example.

    For each example (fed as a batch of one) the ``O = |f(x*)|`` rows ``J^T e_j`` come from
    one ``vjp`` (vmapped over ``j``), ``Sigma`` is applied to each, and ``J Sigma J^T`` is
    their ``O x O`` Gram matrix. No Jacobian of the whole model is formed.

    Cost per example: one forward pass, ``O`` vector-Jacobian products and ``O`` products
    with ``Sigma``; memory ``2 chunk_size O`` parameter-sized vectors.

    Args:
        model_fn: ``model_fn(params, batch) -> (N, *rest, C)``; examples must not interact.
        params: ``theta*``.
        batch: test inputs, a pytree with a leading batch axis (targets are not needed
            unless ``model_fn`` reads them).
        covariance: ``Sigma``: a :class:`LowRankPosterior`, a :class:`LinearOperator`
            (:func:`lowrank_covariance`, :func:`kfac_covariance`, :func:`dense_covariance`)
            or a callable ``v -> Sigma v`` on pytrees (its arrays become constants).
        full_covariance: also return the full per-example ``O x O`` matrices.
        chunk_size: examples vmapped together (default: as many as keep
            ``chunk_size * O * P <= 2**24``).

    Returns:
        :class:`PredictiveVariance`.

    Raises:
        ArgumentTypeError: a bad ``covariance`` kind, a non-callable ``model_fn`` or a
            non-integer ``chunk_size``.
        ValueError: ``chunk_size < 1``, inconsistent batch axes, a covariance over other
            parameters.
    """
    check_callable(model_fn, "model_fn")
    check_params(params)
    n = check_batch(batch)
    cov = _as_covariance(covariance, params)
    like = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x),
                                                                 jnp.result_type(x)), params)
    cov_like = cov.params_like
    if jax.tree_util.tree_structure(cov_like) != jax.tree_util.tree_structure(like) or any(
            a.shape != b.shape for a, b in zip(jax.tree_util.tree_leaves(cov_like),
                                               jax.tree_util.tree_leaves(like))):
        raise ValueError("covariance acts on another parameter tree (structure or shapes) "
                         "than params")
    out = jax.eval_shape(lambda p, b: model_fn(p, jax.tree_util.tree_map(_one_example, b)),
                         params, jax.tree_util.tree_map(lambda x: x[0], batch))
    o = math.prod(out.shape)
    if chunk_size is None:
        chunk_size = max(1, min(n, _CHUNK_BUDGET // max(o * tu.size(params), 1)))
    chunk_size = min(check_int(chunk_size, "chunk_size"), n)
    mean, mats = _predictive_jit(_static(model_fn), chunk_size, cov, params, batch)
    shape = mean.shape[1:]
    var = jnp.diagonal(mats, axis1=1, axis2=2).reshape(mean.shape)
    full = mats.reshape((n,) + shape + shape) if full_covariance else None
    return PredictiveVariance(mean, var, full)


# ---------------------------------------------------------------------------------------
# 5. log-likelihood, marginal likelihood, prior precision
# ---------------------------------------------------------------------------------------


class LogLikelihood(NamedTuple):
    """``log p(D | theta)`` of a built-in head and the curvature scale it implies.

    Attributes:
        value: ``log p(D | theta)`` with every constant (a scalar).
        scale: ``-log p(D | theta) = scale * loss(theta) + const``: the factor from the
            mean-loss curvature (``gj.ggn``, ``gj.kfac``) to the Laplace precision.
    """

    value: jax.Array
    scale: jax.Array


def head_log_likelihood(
    model_fn: Callable[[PyTree, PyTree], jax.Array],
    head: Head,
    params: PyTree,
    batch: PyTree,
    *,
    sigma: Any = None,
) -> LogLikelihood:
    """``log p(D | theta)`` for the built-in heads, with the curvature scale.

    * softmax cross-entropy (categorical likelihood): ``log p = -sum_t w_t l_t`` and
      ``scale = Z = sum_t w_t`` (``N`` for unmasked classification);
    * MSE (Gaussian likelihood ``N(y; f, sigma^2 I)`` per token, ``C`` outputs):
      ``log p = -sum_t w_t [||f_t - y_t||^2 / (2 sigma^2) + C/2 log(2 pi sigma^2)]`` and
      ``scale = Z / (2 sigma^2)`` with ``Z = C sum_t w_t``.

    Args:
        model_fn: ``model_fn(params, batch) -> outputs``.
        head: ``gj.heads.softmax_cross_entropy`` or ``gj.heads.mse``.
        params: the parameters.
        batch: the training data.
        sigma: observation noise std ``> 0`` for MSE (default 1); must be ``None`` for
            cross-entropy.

    Returns:
        :class:`LogLikelihood`. Cost: one forward pass.

    Raises:
        ArgumentTypeError: ``head`` is not a built-in cross-entropy / MSE head.
        ValueError: ``sigma`` given for cross-entropy, or ``sigma <= 0``.
    """
    check_callable(model_fn, "model_fn")
    if not isinstance(head, (SoftmaxCrossEntropy, MeanSquaredError)):
        raise ArgumentTypeError(
            "head must be gj.heads.softmax_cross_entropy() or gj.heads.mse() (a likelihood "
            f"with known constants), got {type(head).__name__}")
    if isinstance(head, SoftmaxCrossEntropy) and sigma is not None:
        raise ValueError("sigma is the MSE (Gaussian) noise level; cross-entropy has none")
    sig = 1.0 if sigma is None else check_real(sigma, "sigma", lo=0.0, lo_open=True)
    check_params(params)
    check_batch(batch)
    return _log_lik_jit(_static(model_fn), head, sig, params, batch)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _log_lik_jit(model_fn, head, sigma, params, batch):
    outputs = model_fn(params, batch)
    loss = head(outputs, batch)
    lead, num_classes = outputs.shape[:-1], outputs.shape[-1]
    w = head.weights(batch, lead, outputs.dtype)
    z = head.normalizer(w, num_classes)
    if isinstance(head, SoftmaxCrossEntropy):
        return LogLikelihood(-z * loss, z)
    s2 = jnp.asarray(sigma**2, outputs.dtype)
    const = w.sum() * num_classes / 2.0 * jnp.log(2.0 * jnp.pi * s2)
    scale = z / (2.0 * s2)
    return LogLikelihood(-scale * loss - const, scale)


class MarginalLikelihood(NamedTuple):
    """The Laplace log marginal likelihood and its terms.

    ``value = log_likelihood + prior_term - logdet / 2`` with ``prior_term = -tau/2
    ||theta*||^2 + P/2 log tau`` and ``logdet = logdet(H + tau I)``.

    Attributes:
        value: ``log p(D)`` (Laplace).
        log_likelihood: ``log p(D | theta*)``.
        prior_term: ``-tau/2 ||theta*||^2 + P/2 log tau``.
        logdet: ``logdet(H + tau I)``.
        effective_params: ``gamma = P - tau tr((H + tau I)^-1)``.
        prior_prec: ``tau``.
    """

    value: jax.Array
    log_likelihood: jax.Array
    prior_term: jax.Array
    logdet: jax.Array
    effective_params: jax.Array
    prior_prec: jax.Array


def _curv_logdet_gamma(curvature: Any, tau: Any, n_params: int):
    """``(logdet(H + tau I), gamma)`` for a spectrum or a low-rank posterior."""
    if isinstance(curvature, LaplaceSpectrum):
        return logdet(curvature, tau), effective_params(curvature, tau)
    post = curvature._replace(prior_prec=jnp.asarray(tau, curvature.values.dtype))
    tr = post.covariance_trace()
    return post.logdet(), jnp.asarray(n_params, tr.dtype) - post.prior_prec * tr


def _check_curvature(curvature: Any, n_params: int) -> None:
    if isinstance(curvature, LaplaceSpectrum):
        if not is_traced(curvature.n_params) and int(curvature.n_params) != n_params:
            raise ValueError(f"curvature has n_params={int(curvature.n_params)}, params have "
                             f"{n_params}")
        return
    if isinstance(curvature, LowRankPosterior):
        size = tu.size(curvature._like())
        if size != n_params:
            raise ValueError(f"curvature has n_params={size}, params have {n_params}")
        return
    raise ArgumentTypeError(
        "curvature must be a LaplaceSpectrum (kfac_spectrum / dense_spectrum / "
        f"lowrank_spectrum / diagonal_spectrum) or a LowRankPosterior, got "
        f"{type(curvature).__name__}")


def log_marginal_likelihood(
    log_likelihood: Any,
    params: PyTree,
    prior_prec: Any,
    curvature: Any,
) -> MarginalLikelihood:
    """The Laplace log marginal likelihood (MacKay 1992; Immer et al. 2021, eq. 4).

    With ``P`` parameters, isotropic prior ``N(0, tau^-1 I)`` and posterior precision
    ``H + tau I``::

        log p(D) ~= log p(D | theta*) + log N(theta*; 0, tau^-1 I) + P/2 log(2 pi)
                    - 1/2 logdet(H + tau I)
                  = log p(D | theta*) - tau/2 ||theta*||^2 + P/2 log tau
                    - 1/2 logdet(H + tau I).

    Exact for a linear-Gaussian model at its MAP ``theta*(tau)`` (tested against
    ``log N(y; 0, sigma^2 I + X X^T / tau)``). ``theta*`` should be the MAP for this ``tau``
    (or, as in :func:`optimize_prior_precision`, held fixed while ``tau`` moves).

    Args:
        log_likelihood: ``log p(D | theta*)`` (e.g. :func:`head_log_likelihood` ``.value``).
        params: ``theta*``.
        prior_prec: ``tau > 0`` (may be traced).
        curvature: ``H`` as a :class:`LaplaceSpectrum` (K-FAC, dense, low-rank, diagonal)
            or a :class:`LowRankPosterior` (its ``prior_prec`` is replaced by ``tau``; the
            diagonal correction, if any, is kept).

    Returns:
        :class:`MarginalLikelihood`. Jittable; ``O(m)`` for a spectrum.

    Raises:
        ArgumentTypeError: a bad ``curvature`` kind.
        ValueError: ``prior_prec`` is not ``> 0``, or the curvature has another dimension.
    """
    check_params(params)
    n_params = tu.size(params)
    _check_curvature(curvature, n_params)
    tau = _positive(prior_prec, "prior_prec")
    return _lml(log_likelihood, params, tau, curvature, n_params)


def _lml(log_likelihood, params, tau, curvature, n_params):
    ld, gamma = _curv_logdet_gamma(curvature, tau, n_params)
    dt = ld.dtype
    t = jnp.asarray(tau, dt)
    prior = -0.5 * t * _sq_norm(params).astype(dt) + 0.5 * n_params * jnp.log(t)
    ll = jnp.asarray(log_likelihood, dt)
    return MarginalLikelihood(ll + prior - 0.5 * ld, ll, prior, ld, gamma, t)


class PriorPrecision(NamedTuple):
    """Result of :func:`optimize_prior_precision`.

    Attributes:
        prior_prec: the maximiser ``tau*`` (a Python float).
        log_marginal_likelihood: :class:`MarginalLikelihood` at ``tau*``.
        effective_params: ``gamma(tau*) = tau* ||theta*||^2`` at the optimum.
        iterations: root-finder / fixed-point iterations.
        converged: whether the stationarity residual met ``tol``.
        method: ``"brentq"`` or ``"fixed_point"``.
    """

    prior_prec: float
    log_marginal_likelihood: MarginalLikelihood
    effective_params: float
    iterations: int
    converged: bool
    method: str


def _is_zero_curvature(curvature: Any) -> bool:
    if isinstance(curvature, LaplaceSpectrum):
        lam = np.asarray(curvature.eigenvalues)
        return not bool(np.any(lam > 0))
    parts = [np.asarray(curvature.values)]
    if curvature.diag is not None:
        parts += [np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(curvature.diag)]
    return not any(bool(np.any(x > 0)) for x in parts)


def optimize_prior_precision(
    log_likelihood: Any,
    params: PyTree,
    curvature: Any,
    *,
    method: str = "brentq",
    init: float = 1.0,
    tol: float = 1e-10,
    max_iter: int = 500,
) -> PriorPrecision:
    """The prior precision ``tau`` that maximises :func:`log_marginal_likelihood`.

    At fixed ``theta*`` and ``H``, ``d/dtau log p(D) = (gamma(tau) - tau ||theta*||^2) /
    (2 tau)`` with ``gamma(tau) = P - tau tr((H + tau I)^-1)`` (the effective number of
    parameters, decreasing in ``tau``), so the maximiser is the unique root of
    ``g(t) = gamma(e^t) - e^t ||theta*||^2`` (MacKay's fixed point ``tau = gamma /
    ||theta*||^2``):

    * ``"brentq"`` (default): bracket the root in ``t = log tau`` by doubling steps from
      ``log(init)``, then ``scipy.optimize.brentq`` (``xtol = tol``): guaranteed.
    * ``"fixed_point"``: iterate ``tau <- gamma(tau) / ||theta*||^2`` until the relative
      change is below ``tol`` (MacKay 1992; monotone but can be slow when ``gamma`` is
      flat).

    Args:
        log_likelihood: ``log p(D | theta*)`` (only shifts the reported value).
        params: ``theta*`` (must not be all zeros).
        curvature: a :class:`LaplaceSpectrum` or a :class:`LowRankPosterior`.
        method: ``"brentq"`` or ``"fixed_point"``.
        init: starting ``tau > 0``.
        tol: tolerance on ``log tau`` (brentq) / relative change (fixed point), ``> 0``.
        max_iter: iteration cap.

    Returns:
        :class:`PriorPrecision`. Host-side (not jittable); each step is ``O(m)`` in float64
        numpy (spectrum) or ``O(r P)`` in the params' dtype (low-rank posterior).

    Raises:
        ArgumentTypeError: a bad ``curvature`` kind or argument type.
        ValueError: an unknown ``method``, ``init`` / ``tol`` not ``> 0``, ``theta* = 0``
            (the evidence grows without bound in ``tau``) or a zero curvature (no maximum:
            ``tau -> 0``).
    """
    from scipy import optimize  # noqa: PLC0415 - scipy only on this host-side path

    check_params(params)
    n_params = tu.size(params)
    _check_curvature(curvature, n_params)
    check_choice(method, "method", PRIOR_METHODS)
    init = check_real(init, "init", lo=0.0, lo_open=True)
    tol = check_real(tol, "tol", lo=0.0, lo_open=True)
    max_iter = check_int(max_iter, "max_iter")
    m2 = float(_sq_norm(params))
    if m2 == 0.0:
        raise ValueError("params are all zero: the marginal likelihood increases without "
                         "bound in the prior precision (no finite maximiser)")
    if isinstance(curvature, LaplaceSpectrum):  # float64 on the host, whatever the dtype
        lam = np.asarray(curvature.eigenvalues, np.float64)

        def gamma(tau: float) -> float:
            return float(np.sum(lam / (lam + tau)))
    else:
        gamma_fn = jax.jit(lambda tau, c: _curv_logdet_gamma(c, tau, n_params)[1])

        def gamma(tau: float) -> float:
            return float(gamma_fn(tau, curvature))

    g0 = gamma(init)
    if not np.isfinite(g0):
        raise FloatingPointError("the effective number of parameters is not finite at "
                                 f"tau={init}")
    if _is_zero_curvature(curvature):
        raise ValueError("the curvature is zero: the marginal likelihood has no maximum "
                         "(tau -> 0)")

    def g(t: float) -> float:
        tau = math.exp(t)
        return gamma(tau) - tau * m2

    iterations = 0
    if method == "brentq":
        t0 = math.log(init)
        lo, hi, step = t0, t0, 1.0
        while g(lo) <= 0.0 and iterations < max_iter:
            lo -= step
            step *= 2.0
            iterations += 1
        step = 1.0
        while g(hi) >= 0.0 and iterations < max_iter:
            hi += step
            step *= 2.0
            iterations += 1
        if g(lo) <= 0.0 or g(hi) >= 0.0:
            t_star, converged = (lo if g(lo) <= 0.0 else hi), False
        else:
            t_star, info = optimize.brentq(g, lo, hi, xtol=tol, rtol=4 * np.finfo(float).eps,
                                           maxiter=max_iter, full_output=True)
            iterations += info.iterations
            converged = bool(info.converged)
        tau = math.exp(t_star)
    else:
        tau, converged = init, False
        for iterations in range(1, max_iter + 1):  # noqa: B007 - reported
            new = gamma(tau) / m2
            if new <= 0.0 or not np.isfinite(new):
                raise FloatingPointError(f"the fixed-point iteration broke down at tau={tau}")
            done = abs(new - tau) <= tol * tau
            tau = new
            if done:
                converged = True
                break
    lml = _lml(log_likelihood, params, tau, curvature, n_params)
    return PriorPrecision(float(tau), lml, float(lml.effective_params), int(iterations),
                          converged, method)


# ---------------------------------------------------------------------------------------
# 6. laplax interop
# ---------------------------------------------------------------------------------------


class LowRankTerms(NamedTuple):
    """A twin of ``laplax.curv.utils.LowRankTerms`` (used when laplax is not installed).

    Same field names and the same pytree leaf order ``(U, S, scalar)`` that laplax's
    functions unpack, so laplax accepts it too.

    Attributes:
        U: ``(P, r)`` eigenvectors as columns, rows in ``jax.tree_util.tree_leaves`` order
            of the params (laplax's ``create_pytree_flattener`` order).
        S: ``(r,)`` eigenvalues.
        scalar: scalar added on the diagonal (laplax replaces it by ``prior_prec`` when it
            turns a curvature into a precision).
    """

    U: jax.Array
    S: jax.Array
    scalar: jax.Array


def _laplax_low_rank_class():
    try:
        from laplax.curv.utils import LowRankTerms as cls  # noqa: PLC0415 - optional peer
    except ImportError:
        return LowRankTerms
    return cls


def to_laplax_low_rank(values: Any, vectors: PyTree, *, scale: Any = 1.0,
                       scalar: Any = 0.0) -> Any:
    """A low-rank curvature ``scale * U diag(values) U^T`` as laplax's ``LowRankTerms``.

    laplax's ``set_posterior_fn("lanczos", terms, layout=params)`` turns it into a posterior
    with ``prior_prec`` from its ``prior_arguments`` (the ``scalar`` here is replaced).
    laplax has no low-rank + diagonal form: a :class:`LowRankPosterior`'s diagonal
    correction is not exported.

    Args:
        values: ``(r,)`` eigenvalues of the curvature (e.g. ``post.values`` with
            ``scale=1``, or ``gj.top_eigenpairs(G, r).values``).
        vectors: pytree stack of orthonormal eigenvectors (leaves ``(r, *leaf)``).
        scale: ``> 0`` multiplier (e.g. ``N`` to export the GGN of the summed loss).
        scalar: the ``scalar`` field.

    Returns:
        ``laplax.curv.utils.LowRankTerms`` when laplax is importable, else the
        :class:`LowRankTerms` twin: ``U`` ``(P, r)``, ``S`` ``(r,)``, ``scalar`` 0-d.

    Raises:
        ValueError: ``values`` / ``vectors`` disagree on ``r``, or a bad ``scale``.
    """
    scale = _positive(scale, "scale")
    values = jnp.asarray(values)
    leaves = jax.tree_util.tree_leaves(vectors)
    if not leaves or values.ndim != 1 or any(x.shape[:1] != values.shape for x in leaves):
        raise ValueError(f"values must be (r,) and every vectors leaf (r, ...); got values "
                         f"{values.shape}, leaves {[x.shape[:1] for x in leaves]}")
    dt = _params_dtype(vectors)
    u = jnp.concatenate([x.reshape(x.shape[0], -1).astype(dt) for x in leaves], axis=1).T
    s = jnp.maximum(values.astype(dt), 0.0) * jnp.asarray(scale, dt)
    return _laplax_low_rank_class()(U=u, S=s, scalar=jnp.asarray(scalar, dt))


def to_laplax_diagonal(diag: PyTree, *, scale: Any = 1.0) -> jax.Array:
    """A diagonal curvature as laplax's diagonal estimate: a flat ``(P,)`` array.

    Use with ``laplax.curv.cov.set_posterior_fn("diagonal", d, layout=params)``.

    Args:
        diag: pytree like the params (e.g. :func:`ggn_diagonal`).
        scale: ``> 0`` multiplier.

    Returns:
        ``(P,)`` in ``tree_leaves`` order (laplax's flattening order).

    Raises:
        ValueError: a bad ``scale`` or an empty pytree.
    """
    check_params(diag, "diag")
    scale = _positive(scale, "scale")
    flat = tu.ravel(diag)
    return flat * jnp.asarray(scale, flat.dtype)


def to_laplax_full(op: LinearOperator, *, scale: Any = 1.0,
                   max_params: int = DEFAULT_MAX_DENSE_PARAMS) -> jax.Array:
    """A curvature operator as laplax's full estimate: the dense ``(P, P)`` matrix.

    Use with ``laplax.curv.cov.set_posterior_fn("full", mat, layout=params)``.

    Args:
        op: the curvature operator.
        scale: ``> 0`` multiplier.
        max_params: the largest ``P`` densified.

    Returns:
        ``(P, P)`` in ``tree_leaves`` order. Cost ``P`` products.

    Raises:
        ArgumentTypeError: ``op`` is not a :class:`LinearOperator`.
        ValueError: ``P > max_params`` or a bad ``scale``.
    """
    check_operator(op)
    scale = _positive(scale, "scale")
    mat = op.to_dense(max_params=max_params)
    return mat * jnp.asarray(scale, mat.dtype)


def to_laplax_mv(op: LinearOperator, *, scale: Any = 1.0) -> Callable[[PyTree], PyTree]:
    """A curvature operator as laplax's ``mv``: a pytree -> pytree matvec.

    Pass it as ``mv`` to ``laplax.curv.cov.create_posterior_fn(curv_type, mv,
    layout=params, ...)`` (or ``estimate_curvature``), which then runs its own estimator
    (``"full"``, ``"diagonal"``, ``"lanczos"``, ``"lobpcg"``) on our operator.

    Args:
        op: the curvature operator (``gj.ggn``, ``gj.kfac``, ...).
        scale: ``> 0`` multiplier.

    Returns:
        ``v -> scale * (op @ v)`` (jittable; the operator's arrays are closed over).

    Raises:
        ArgumentTypeError: ``op`` is not a :class:`LinearOperator`.
        ValueError: a bad ``scale``.
    """
    check_operator(op)
    scale = _positive(scale, "scale")

    def mv(v: PyTree) -> PyTree:
        out = op.bind()(v)
        return jax.tree_util.tree_map(lambda x: (x * jnp.asarray(scale, x.dtype)).astype(
            x.dtype), out)

    return mv
