"""Randomised estimators of trace, ``tr(A^2)``, diagonal and spectral density.

All estimators take the operator as an argument of a jitted function (new params of the
same shapes reuse the compiled program), draw their probes from an explicit key (same key,
same numbers) and are jittable themselves for a fixed number of samples: wrap them in
``jax.jit`` with the sample counts static. Probes are applied one at a time
(``lax.map``) so memory stays ``O(P)`` per probe; pass ``batch_size`` to vectorise.

References:
    M. Hutchinson (1990); R. Meyer, C. Musco, C. Musco, D. Woodruff (2021) "Hutch++";
    C. Bekas, E. Kokiopoulou, Y. Saad (2007) diagonal estimation; S. Ubaru, J. Chen, Y. Saad
    (2017) stochastic Lanczos quadrature; B. Ghorbani, S. Krishnan, Y. Xiao (2019).

Supported names: ``SpectralDensity``, ``TraceEstimate``, ``diagonal``, ``hutchinson_trace``,
``hutchpp_trace``, ``spectral_density``, ``trace_of_square`` (the ``__all__`` list), and the
constants ``DISTRIBUTIONS`` and ``SLQ_BASIS_BUDGET_BYTES``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax import tree as tu
from gradience_jax.lanczos import (
    check_reorth,
    lanczos_init,
    lanczos_run,
    random_vector,
    scalar_dtype,
    to_like,
    to_work,
    zeros_work,
)
from gradience_jax.operators.base import LinearOperator

PyTree = Any

DISTRIBUTIONS = ("rademacher", "normal")
#: bytes a stored Lanczos basis may use per probe under ``reorth="auto"``
SLQ_BASIS_BUDGET_BYTES = 1024**3

__all__ = [
    "SpectralDensity",
    "TraceEstimate",
    "diagonal",
    "hutchinson_trace",
    "hutchpp_trace",
    "spectral_density",
    "trace_of_square",
]


class TraceEstimate(NamedTuple):
    """A Monte-Carlo estimate.

    Attributes:
        estimate: scalar, the mean of ``samples``.
        stderr: scalar standard error ``std(samples, ddof=1) / sqrt(len(samples))``
            (``nan`` for a single sample).
        samples: ``(num_samples,)`` the per-probe values (for Hutch++ the low-rank part plus
            each residual probe, so their mean is the estimate).
    """

    estimate: jax.Array
    stderr: jax.Array
    samples: jax.Array


def _check_op(op: Any) -> None:
    if not isinstance(op, LinearOperator):
        raise TypeError(f"op must be a gradience_jax.LinearOperator, got {type(op).__name__}")


def _check_count(name: str, value: Any, lo: int = 1) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _check_dist(distribution: str) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    return distribution


def _probe(key: jax.Array, like: PyTree, distribution: str) -> PyTree:
    """A probe in the work dtype (float32 or wider) with ``E[v v^T] = I`` (one flat draw)."""
    return random_vector(key, like, distribution)


def _apply(mv, like, v):
    return to_work(mv(to_like(v, like)))


def _summary(samples: jax.Array) -> TraceEstimate:
    n = samples.shape[0]
    est = jnp.mean(samples)
    if n > 1:
        err = jnp.std(samples, ddof=1) / jnp.sqrt(jnp.asarray(n, samples.dtype))
    else:
        err = jnp.full((), jnp.nan, samples.dtype)
    return TraceEstimate(est, err, samples)


# -- Hutchinson -----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("num_samples", "distribution", "batch_size", "square"))
def _hutchinson_jit(op, key, num_samples, distribution, batch_size, square):
    like = op.params_like
    mv = op.bind()

    def one(k):
        v = _probe(k, like, distribution)
        av = _apply(mv, like, v)
        return tu.vdot(av, av) if square else tu.vdot(v, av)

    keys = jax.random.split(key, num_samples)
    return _summary(jax.lax.map(one, keys, batch_size=batch_size))


def hutchinson_trace(
    op: LinearOperator,
    key: jax.Array,
    num_samples: int = 100,
    distribution: str = "rademacher",
    *,
    batch_size: int | None = None,
) -> TraceEstimate:
    """Hutchinson's estimator ``tr(A) ~ mean_i v_i^T A v_i`` (unbiased).

    Cost: ``num_samples`` matvecs. Variance: ``2 ||A||_F^2 - 2 sum_i A_ii^2`` (Rademacher),
    ``2 ||A||_F^2`` (normal).

    Args:
        op: symmetric :class:`LinearOperator`.
        key: PRNG key.
        num_samples: number of probes (static).
        distribution: ``"rademacher"`` or ``"normal"``.
        batch_size: probes per vectorised batch (``None``: one at a time).

    Returns:
        :class:`TraceEstimate` (``.estimate``, ``.stderr``, ``.samples`` of shape
        ``(num_samples,)``).

    Raises:
        TypeError: ``op`` is not a :class:`LinearOperator`.
        ValueError: ``num_samples < 1`` or an unknown ``distribution``.

    References:
        M. Hutchinson (1990), "A stochastic estimator of the trace of the influence matrix
        for Laplacian smoothing splines".
    """
    _check_op(op)
    num_samples = _check_count("num_samples", num_samples)
    return _hutchinson_jit(op, key, num_samples, _check_dist(distribution), batch_size, False)


def trace_of_square(
    op: LinearOperator,
    key: jax.Array,
    num_samples: int = 100,
    distribution: str = "rademacher",
    *,
    batch_size: int | None = None,
) -> TraceEstimate:
    """``tr(A^2) = ||A||_F^2 ~ mean_i ||A v_i||^2`` (unbiased; symmetric ``A``).

    Cost: ``num_samples`` matvecs. Used for ``tr(F^2)`` and participation ratios
    ``tr(A)^2 / tr(A^2)``.

    Args:
        op: symmetric :class:`LinearOperator`.
        key: PRNG key.
        num_samples: number of probes (static).
        distribution: ``"rademacher"`` or ``"normal"``.
        batch_size: probes per vectorised batch (``None``: one at a time).

    Returns:
        :class:`TraceEstimate` of ``tr(A^2)`` (``.samples``: ``(num_samples,)`` values
        ``||A v_i||^2``).

    Raises:
        TypeError: ``op`` is not a :class:`LinearOperator`.
        ValueError: ``num_samples < 1`` or an unknown ``distribution``.
    """
    _check_op(op)
    num_samples = _check_count("num_samples", num_samples)
    return _hutchinson_jit(op, key, num_samples, _check_dist(distribution), batch_size, True)


# -- Hutch++ -----------------------------------------------------------------------------------


def _orthonormalize(stack: PyTree, eps: float) -> PyTree:
    """Rows of ``stack`` -> an orthonormal set spanning them (dependent rows become zero).

    Eigen-decomposition of the Gram matrix, applied twice for stability.
    """
    for _ in range(2):
        g = tu.stacked_gram(stack)
        lam, vec = jnp.linalg.eigh(g)
        keep = lam > eps * jnp.maximum(jnp.max(lam), jnp.finfo(lam.dtype).tiny) * lam.shape[0]
        inv = jnp.where(keep, 1.0 / jnp.sqrt(jnp.where(keep, lam, 1.0)), 0.0)
        coef = (vec * inv[None, :]).T  # (k, k): new_i = sum_j coef[i, j] old_j
        stack = jax.tree_util.tree_map(
            lambda x, coef=coef: jnp.tensordot(coef.astype(x.dtype), x, axes=1), stack
        )
    return stack


@functools.partial(jax.jit, static_argnames=("num_matvecs", "distribution", "batch_size"))
def _hutchpp_jit(op, key, num_matvecs, distribution, batch_size):
    like = op.params_like
    mv = op.bind()
    k = num_matvecs // 3
    g = num_matvecs - 2 * k
    k_s, k_g = jax.random.split(key)
    s_stack = jax.vmap(lambda kk: _probe(kk, like, distribution))(jax.random.split(k_s, k))
    y = jax.lax.map(lambda v: _apply(mv, like, v), s_stack, batch_size=batch_size)
    eps = float(jnp.finfo(scalar_dtype(like)).eps)
    q = _orthonormalize(y, eps)
    low = jnp.sum(jax.lax.map(lambda v: tu.vdot(v, _apply(mv, like, v)), q, batch_size=batch_size))

    def resid(kk):
        v = _probe(kk, like, distribution)
        c = jax.tree_util.tree_map(lambda qq, x: jnp.tensordot(qq, x, axes=x.ndim), q, v)
        coeff = sum(jax.tree_util.tree_leaves(c))
        p = jax.tree_util.tree_map(lambda x, qq: x - jnp.tensordot(coeff, qq, axes=1), v, q)
        return tu.vdot(p, _apply(mv, like, p))

    samples = jax.lax.map(resid, jax.random.split(k_g, g), batch_size=batch_size)
    return _summary(low + samples)


def hutchpp_trace(
    op: LinearOperator,
    key: jax.Array,
    num_matvecs: int = 99,
    distribution: str = "rademacher",
    *,
    batch_size: int | None = None,
) -> TraceEstimate:
    """Hutch++ (Meyer et al. 2021): exact trace on a sketched subspace, Hutchinson on the rest.

    The trace of ``Q^T A Q`` on a sketched top subspace ``Q`` is exact; Hutchinson
    estimates the deflated rest. Error ``O(1/m)`` instead of ``O(1/sqrt(m))`` for decaying
    spectra.

    Cost: ``m`` matvecs. The budget splits as ``k = m // 3`` sketch matvecs, ``k`` for
    ``tr(Q^T A Q)`` and ``m - 2k`` residual probes. Memory: ``2k`` vectors.

    Args:
        op: symmetric operator.
        key: PRNG key.
        num_matvecs: total matvec budget ``m >= 3`` (static).
        distribution: probe distribution, ``"rademacher"`` or ``"normal"``.
        batch_size: probes per vectorised batch (``None``: one at a time).

    Returns:
        :class:`TraceEstimate`; ``.samples`` ``(m - 2k,)`` (the low-rank part plus each
        residual probe); ``stderr`` is that of the residual Hutchinson part.

    Raises:
        TypeError: ``op`` is not a :class:`LinearOperator`.
        ValueError: ``num_matvecs < 3`` or an unknown ``distribution``.

    References:
        R. Meyer, C. Musco, C. Musco, D. Woodruff (2021), "Hutch++: Optimal Stochastic Trace
        Estimation".
    """
    _check_op(op)
    num_matvecs = _check_count("num_matvecs", num_matvecs, 3)
    return _hutchpp_jit(op, key, num_matvecs, _check_dist(distribution), batch_size)


# -- diagonal ---------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("num_samples", "distribution"))
def _diagonal_jit(op, key, num_samples, distribution):
    like = op.params_like
    mv = op.bind()

    def body(carry, k):
        num, den = carry
        v = _probe(k, like, distribution)
        av = _apply(mv, like, v)
        num = jax.tree_util.tree_map(lambda n_, a, b: n_ + a * b, num, v, av)
        den = jax.tree_util.tree_map(lambda d, a: d + a * a, den, v)
        return (num, den), None

    zeros = zeros_work(like)
    (num, den), _ = jax.lax.scan(body, (zeros, zeros), jax.random.split(key, num_samples))
    return jax.tree_util.tree_map(lambda n_, d: n_ / d, num, den)


def diagonal(
    op: LinearOperator,
    key: jax.Array,
    num_samples: int = 100,
    distribution: str = "rademacher",
) -> PyTree:
    """Stochastic diagonal ``diag(A) ~ sum_i v_i * A v_i / sum_i v_i * v_i`` (Bekas et al.).

    With Rademacher probes the denominator is ``num_samples`` and the estimate is unbiased.
    Cost: ``num_samples`` matvecs; memory two params-sized accumulators.

    Args:
        op: symmetric :class:`LinearOperator`.
        key: PRNG key.
        num_samples: number of probes (static).
        distribution: ``"rademacher"`` or ``"normal"``.

    Returns:
        A pytree like the params (float32 or wider leaves).

    Raises:
        TypeError: ``op`` is not a :class:`LinearOperator`.
        ValueError: ``num_samples < 1`` or an unknown ``distribution``.

    References:
        C. Bekas, E. Kokiopoulou, Y. Saad (2007), "An estimator for the diagonal of a
        matrix".
    """
    _check_op(op)
    num_samples = _check_count("num_samples", num_samples)
    return _diagonal_jit(op, key, num_samples, _check_dist(distribution))


# -- stochastic Lanczos quadrature ------------------------------------------------------------


class SpectralDensity(NamedTuple):
    """Stochastic Lanczos quadrature: per probe, Gauss nodes and weights of a spectral measure.

    The measure of probe ``v`` is ``mu_v = sum_i (v^T u_i)^2 delta_{lambda_i}``.

    Attributes:
        nodes: ``(num_probes, num_iters)`` Ritz values of each probe's ``T``.
        weights: ``(num_probes, num_iters)`` squared first components (each row sums to 1).
        n_params: dimension ``n``.
    """

    nodes: jax.Array
    weights: jax.Array
    n_params: Any

    def evaluate(self, grid: Any, sigma: float) -> jax.Array:
        """Density on ``grid`` with Gaussian broadening of width ``sigma``.

        ``phi(t) = mean_probes sum_j w_j N(t; theta_j, sigma^2)`` (integrates to 1).

        Args:
            grid: points ``t``, any shape.
            sigma: width of the Gaussian kernel (``> 0``).

        Returns:
            The density at each point, shaped like ``grid``. Cost
            ``O(|grid| x num_probes x num_iters)``.
        """
        t = jnp.asarray(grid)
        z = (t[..., None, None] - self.nodes) / sigma
        kern = jnp.exp(-0.5 * z * z) / (sigma * jnp.sqrt(2.0 * jnp.pi))
        return jnp.mean(jnp.sum(self.weights * kern, axis=-1), axis=-1)

    def moment(self, p: int) -> jax.Array:
        """``tr(A^p) / n`` estimated by the quadrature.

        Args:
            p: the moment's order.

        Returns:
            A scalar, ``mean_probes sum_j w_j theta_j^p``.
        """
        return jnp.mean(jnp.sum(self.weights * self.nodes**p, axis=-1))

    def trace(self) -> jax.Array:
        """``tr(A) ~ n * mean_probes sum_j w_j theta_j``."""
        return self.n_params * self.moment(1)

    def trace_of_square(self) -> jax.Array:
        """``tr(A^2) ~ n * mean_probes sum_j w_j theta_j^2``."""
        return self.n_params * self.moment(2)

    def support(self) -> tuple[jax.Array, jax.Array]:
        """Smallest and largest node (bounds of the estimated spectrum)."""
        return jnp.min(self.nodes), jnp.max(self.nodes)


@functools.partial(jax.jit, static_argnames=("num_probes", "num_iters", "reorth", "window"))
def _slq_jit(op, key, num_probes, num_iters, reorth, window):
    like = op.params_like

    def one(k):
        k_v, k_r = jax.random.split(k)
        v = _probe(k_v, like, "rademacher")
        state = lanczos_init(op, v, num_iters, reorth, window, key=k_r)
        state = lanczos_run(op, state, num_iters, reorth)
        a, b = state.alphas, state.betas
        t = jnp.diag(a) + jnp.diag(b[:-1], 1) + jnp.diag(b[:-1], -1)
        theta, s = jnp.linalg.eigh(t)
        return theta, s[0] ** 2

    return jax.lax.map(one, jax.random.split(key, num_probes))


def spectral_density(
    op: LinearOperator,
    key: jax.Array,
    num_probes: int = 8,
    num_iters: int = 80,
    reorth: str = "auto",
    window: int | None = None,
) -> SpectralDensity:
    """Stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; Ghorbani et al. 2019).

    Each Rademacher probe ``v / ||v||`` runs ``num_iters`` Lanczos steps; the eigenpairs
    ``(theta_j, s_j)`` of ``T`` give an ``m``-point Gauss quadrature of ``v^T f(A) v``, so
    ``nodes = theta`` and ``weights = s_1j^2``. Breakdowns (few distinct eigenvalues)
    restart the recurrence; the later blocks get weight 0, keeping the rule exact.

    Cost: ``num_probes x num_iters`` matvecs. Memory: ``num_iters x P`` (``"full"``),
    ``window x P`` (``"window"``) or ``O(P)`` (``"none"``) per probe; probes run one by one.

    Args:
        op: symmetric operator.
        key: PRNG key.
        num_probes: number of probe vectors (static).
        num_iters: Lanczos steps per probe (static; ``<= n_params`` for ``"full"``).
        reorth: ``"auto"`` (``"full"`` if ``num_iters`` vectors fit
            ``SLQ_BASIS_BUDGET_BYTES``, else ``"none"``: Gauss quadrature is robust to
            loss of orthogonality), ``"full"``, ``"window"``, ``"none"``.
        window: ring-buffer size for ``"window"``.

    Returns:
        :class:`SpectralDensity` (``.nodes`` and ``.weights`` ``(num_probes, num_iters)``,
        ``.evaluate(grid, sigma)``, ``.trace()``).

    Raises:
        TypeError: ``op`` is not a :class:`LinearOperator`.
        ValueError: ``num_probes`` / ``num_iters`` below 1, a bad ``reorth`` / ``window``, or
            ``reorth="full"`` with ``num_iters > n_params``.
    """
    _check_op(op)
    num_probes = _check_count("num_probes", num_probes)
    num_iters = _check_count("num_iters", num_iters)
    n = op.n_params
    if reorth == "auto":
        row_bytes = sum(
            int(np.prod(s.shape)) * jnp.dtype(tu.promote_dtypes(s.dtype, jnp.float32)).itemsize
            for s in jax.tree_util.tree_leaves(op.params_like)
        )
        reorth = "full" if num_iters * row_bytes <= SLQ_BASIS_BUDGET_BYTES else "none"
    win = check_reorth(reorth, window)
    if reorth == "full" and num_iters > n:
        raise ValueError(
            f"num_iters={num_iters} exceeds n_params={n} for reorth='full' (at most n steps)"
        )
    nodes, weights = _slq_jit(op, key, num_probes, num_iters, reorth,
                              win if reorth == "window" else None)
    return SpectralDensity(nodes, weights, n)
