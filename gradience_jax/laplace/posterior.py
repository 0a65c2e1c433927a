"""The low-rank (+ diagonal) Laplace posterior: Woodbury products, samples, log-determinant.

Precision ``U diag(lam) U^T + diag(tau + d)`` from the top-r eigenpairs of the Krylov engine
(:func:`lowrank_posterior`, via ``gj.top_eigenpairs``), optionally with the diagonal
correction ``d = max(diag(H) - diag(U diag(lam) U^T), 0)`` that makes the precision's
diagonal exact (``ggn_diag=``); precision / covariance products, samples and the
log-determinant by the Woodbury identity in ``O(r P + r^3)``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax import tree as tu
from gradience_jax._validate import check_int, check_key, check_like, is_traced
from gradience_jax.laplace._common import (
    check_eigenpairs,
    params_dtype,
    positive_scalar,
    warn_clipped,
)
from gradience_jax.laplace.spectrum import LaplaceSpectrum
from gradience_jax.operators.base import LinearOperator, check_operator
from gradience_jax.spectrum import DENSE_LIMIT, top_eigenpairs

PyTree = Any


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


def _sum_over_params(fn, dvec: PyTree, like: PyTree) -> jax.Array:
    """``sum_i fn(D_i)`` over every parameter, ``D`` broadcast to ``like``'s leaf shapes."""
    parts = jax.tree_util.tree_map(
        lambda d, x: jnp.sum(jnp.broadcast_to(fn(d), x.shape)), dvec, like)
    return functools.reduce(jnp.add, jax.tree_util.tree_leaves(parts))


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
        coeff = _rows_dot(self.vectors, v) * sq.astype(params_dtype(v))
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
        return _sum_over_params(jnp.log, dvec, like) + jnp.sum(
            jnp.log1p(s)).astype(params_dtype(like))

    def covariance_trace(self) -> jax.Array:
        """``tr Sigma = sum 1/D - tr((I + G)^-1 W^T D^-2 W)``.

        Returns:
            The scalar trace of the covariance.
        """
        return _post_covariance_trace(self)

    def _covariance_trace(self) -> jax.Array:
        dvec, _, dinv_w, s, vv = self._woodbury()
        h = tu.stacked_gram(dinv_w)
        corr = jnp.sum(jnp.diag(vv.T @ h.astype(vv.dtype) @ vv) / (1.0 + s))
        return _sum_over_params(lambda d: 1.0 / d, dvec, self._like()) - corr

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
    prior_prec = positive_scalar(prior_prec, "prior_prec")
    scale = positive_scalar(scale, "scale")
    values, _ = check_eigenpairs(values, vectors)
    dt = params_dtype(vectors)
    if not is_traced(values):
        warn_clipped(np.asarray(values, np.float64), "the low-rank curvature")
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
    prior_prec = positive_scalar(prior_prec, "prior_prec")
    scale = positive_scalar(scale, "scale")
    pairs = top_eigenpairs(op, rank, which="LA", key=check_key(key), dense_limit=dense_limit,
                           return_eigenvectors=True, **eigsh_kwargs)
    return lowrank_posterior_from_eigenpairs(pairs.values, pairs.vectors, prior_prec,
                                             scale=scale, ggn_diag=ggn_diag)
