"""The evidence: ``log p(D | theta)``, the Laplace log marginal likelihood, the prior precision.

:func:`log_marginal_likelihood` (MacKay 1992; Immer et al. 2021)::

    log p(D) ~= log p(D | theta*) - tau/2 ||theta*||^2 + P/2 log tau
                - 1/2 logdet(H + tau I)

(the ``P/2 log(2 pi)`` of the Gaussian prior and of the Laplace integral cancel), and
:func:`optimize_prior_precision`, which maximises it over ``tau`` at fixed ``theta*``: the
stationarity condition is MacKay's fixed point ``tau = gamma(tau) / ||theta*||^2`` with
``gamma = P - tau tr((H + tau I)^-1)`` the effective number of parameters; the root is found
by ``scipy.optimize.brentq`` in ``log tau`` (default) or by the fixed-point iteration itself.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax import tree as tu
from gradience_jax._validate import (
    ArgumentTypeError,
    check_batch,
    check_choice,
    check_int,
    check_params,
    check_real,
    is_traced,
)
from gradience_jax.laplace._common import params_dtype, positive_scalar
from gradience_jax.laplace.posterior import LowRankPosterior
from gradience_jax.laplace.spectrum import LaplaceSpectrum, effective_params, logdet
from gradience_jax.operators._common import check_callable
from gradience_jax.operators.heads import Head, MeanSquaredError, SoftmaxCrossEntropy
from gradience_jax.operators.kfac import static_callable

PyTree = Any

#: the ``method`` choices of :func:`optimize_prior_precision`
PRIOR_METHODS = ("brentq", "fixed_point")


def _sq_norm(params: PyTree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(params)
    dt = tu.accumulation_dtype(params_dtype(params))
    return functools.reduce(jnp.add, [jnp.sum(jnp.square(x.astype(dt))) for x in leaves])


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
    return _log_lik_jit(static_callable(model_fn), head, sig, params, batch)


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
    tau = positive_scalar(prior_prec, "prior_prec")
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
