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

Modules (one idea each; every name below is re-exported here): ``spectrum``
(:class:`LaplaceSpectrum`, ``logdet`` / ``trace`` / ``effective_params``, dense / low-rank /
diagonal spectra), ``kfac`` (K-FAC spectrum and log-determinant), ``diagonal`` (exact GGN
diagonal), ``posterior`` (low-rank + diagonal posterior), ``covariance`` (``Sigma`` operators),
``predictive`` (linearised predictive variance), ``evidence`` (log-likelihood, marginal
likelihood, prior precision), ``laplax_interop`` (laplax exports); ``_common`` holds the shared
checks.

Supported names: the ``__all__`` list.

References:
    D. MacKay (1992), "A Practical Bayesian Framework for Backpropagation Networks";
    H. Ritter, A. Botev, D. Barber (2018), "A Scalable Laplace Approximation for Neural
    Networks"; A. Immer et al. (2021), "Scalable Marginal Likelihood Estimation for Model
    Selection in Deep Learning"; E. Daxberger et al. (2021), "Laplace Redux".
"""

from gradience_jax.laplace._common import LaplaceWarning
from gradience_jax.laplace.covariance import (
    dense_covariance,
    kfac_covariance,
    lowrank_covariance,
)
from gradience_jax.laplace.diagonal import ggn_diagonal
from gradience_jax.laplace.evidence import (
    PRIOR_METHODS,
    LogLikelihood,
    MarginalLikelihood,
    PriorPrecision,
    head_log_likelihood,
    log_marginal_likelihood,
    optimize_prior_precision,
)
from gradience_jax.laplace.kfac import KFACLogdet, kfac_logdet, kfac_spectrum
from gradience_jax.laplace.laplax_interop import (
    LowRankTerms,
    to_laplax_diagonal,
    to_laplax_full,
    to_laplax_low_rank,
    to_laplax_mv,
)
from gradience_jax.laplace.posterior import (
    LowRankPosterior,
    lowrank_posterior,
    lowrank_posterior_from_eigenpairs,
)
from gradience_jax.laplace.predictive import PredictiveVariance, predictive_variance
from gradience_jax.laplace.spectrum import (
    LaplaceSpectrum,
    dense_spectrum,
    diagonal_spectrum,
    effective_params,
    logdet,
    lowrank_spectrum,
    trace,
)

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
