"""Randomised estimators of trace, ``tr(A^2)``, diagonal and spectral density.

All estimators take the operator as an argument of a jitted function (new params of the
same shapes reuse the compiled program), draw their probes from an explicit key (same key,
same numbers) and are jittable themselves for a fixed number of samples: wrap them in
``jax.jit`` with the sample counts static. Probes are applied one at a time
(``lax.map``) so memory stays ``O(P)`` per probe; pass ``batch_size`` to vectorise.

Non-finite results: called eagerly, an estimator whose operator returns NaN / Inf raises
:class:`~gradience_jax.lanczos.NonFiniteError` (a ``FloatingPointError``) naming the
estimator and the first bad probe (and, for SLQ, the Lanczos step), as ``eigsh`` does. Inside
``jit`` nothing can raise: the values are NaN and the results carry a flag
(:attr:`TraceEstimate.finite`, :attr:`SpectralDensity.finite`; ``.check()`` raises later, on
concrete values), as the probes flag ``"<name>/nonfinite"``.

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
from gradience_jax._validate import (
    ArgumentTypeError,
    check_choice,
    check_int,
    check_key,
    check_real,
    is_traced,
)
from gradience_jax.lanczos import (
    REORTH_MODES,
    NonFiniteError,
    check_reorth,
    first_nonfinite,
    lanczos_init,
    lanczos_run,
    random_vector,
    scalar_dtype,
    to_like,
    to_work,
    zeros_work,
)
from gradience_jax.operators.base import LinearOperator, check_operator

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

    @property
    def finite(self) -> jax.Array:
        """Scalar bool: the estimate and every sample are finite (usable inside ``jit``)."""
        return jnp.isfinite(self.estimate) & jnp.all(jnp.isfinite(self.samples))

    def check(self, what: str = "the estimate") -> TraceEstimate:
        """Raise if a sample is NaN / Inf (concrete values: after a ``jit``-ed call).

        Args:
            what: what the estimate is, for the message.

        Returns:
            ``self``, when finite.

        Raises:
            NonFiniteError: a sample (or the estimate) is not finite, naming the first bad
                probe.
        """
        _raise_samples(what, self.samples, "a sample")
        if not np.isfinite(np.asarray(self.estimate, np.float64)):
            raise NonFiniteError(f"{what} is not finite ({float(self.estimate)})")
        return self


_NONFINITE_HINT = ("the operator's matvec returned NaN / Inf: check the loss / model at these "
                   "params, or the operator's dtype (bf16 / fp16 overflow)")


def _raise_samples(what: str, samples: Any, quantity: str) -> None:
    """``NonFiniteError`` naming the first non-finite probe of ``samples`` (host values)."""
    i = first_nonfinite(samples)
    if i is not None:
        n = int(np.size(samples))
        value = float(np.asarray(samples).ravel()[i])
        raise NonFiniteError(
            f"{what}: probe {i} of {n} gave a non-finite value ({quantity} = {value}); "
            + _NONFINITE_HINT
        )


def _check_op(op: Any) -> LinearOperator:
    """The old local name of :func:`gradience_jax.operators.base.check_operator`."""
    return check_operator(op)


def _check_count(name: str, value: Any, lo: int = 1) -> int:
    """The old local count check: :func:`gradience_jax._validate.check_int`."""
    return check_int(value, name, lo=lo)


def _check_dist(distribution: str) -> str:
    return check_choice(distribution, "distribution", DISTRIBUTIONS)


def _check_batch_size(batch_size: Any) -> int | None:
    return None if batch_size is None else check_int(batch_size, "batch_size", lo=1)


def _checked(op: Any, key: Any) -> tuple[LinearOperator, jax.Array]:
    """The operator and the (required) key of an estimator, checked."""
    return check_operator(op), check_key(key, "key", default=False)


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
        TypeError: ``op`` is not a :class:`LinearOperator`, ``key`` is not a PRNG key, or a
            count is not an integer (an ``ArgumentTypeError``).
        ValueError: ``num_samples < 1``, ``batch_size < 1``, an unknown ``distribution``,
            ``key=None`` or a batch of keys.
        NonFiniteError: (eagerly) a probe's ``v^T A v`` is NaN / Inf; inside ``jit`` the
            estimate is NaN and ``.finite`` is ``False``.

    References:
        M. Hutchinson (1990), "A stochastic estimator of the trace of the influence matrix
        for Laplacian smoothing splines".
    """
    op, key = _checked(op, key)
    num_samples = check_int(num_samples, "num_samples", lo=1)
    out = _hutchinson_jit(op, key, num_samples, _check_dist(distribution),
                          _check_batch_size(batch_size), False)
    if not is_traced(out):
        _raise_samples(f"hutchinson_trace of the {op.name} operator", out.samples, "v^T A v")
    return out


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
        TypeError: ``op`` is not a :class:`LinearOperator`, ``key`` is not a PRNG key, or a
            count is not an integer.
        ValueError: ``num_samples < 1``, ``batch_size < 1``, an unknown ``distribution``,
            ``key=None`` or a batch of keys.
        NonFiniteError: (eagerly) a probe's ``||A v||^2`` is NaN / Inf (inside ``jit``:
            ``.finite`` is ``False``).
    """
    op, key = _checked(op, key)
    num_samples = check_int(num_samples, "num_samples", lo=1)
    out = _hutchinson_jit(op, key, num_samples, _check_dist(distribution),
                          _check_batch_size(batch_size), True)
    if not is_traced(out):
        _raise_samples(f"trace_of_square of the {op.name} operator", out.samples, "||A v||^2")
    return out


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
    return _summary(low + samples), low


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
        TypeError: ``op`` is not a :class:`LinearOperator`, ``key`` is not a PRNG key, or a
            count is not an integer.
        ValueError: ``num_matvecs < 3``, ``batch_size < 1``, an unknown ``distribution``,
            ``key=None`` or a batch of keys.
        NonFiniteError: (eagerly) the sketched part or a residual probe is NaN / Inf (inside
            ``jit``: ``.finite`` is ``False``).

    References:
        R. Meyer, C. Musco, C. Musco, D. Woodruff (2021), "Hutch++: Optimal Stochastic Trace
        Estimation".
    """
    op, key = _checked(op, key)
    num_matvecs = check_int(num_matvecs, "num_matvecs", lo=3)
    out, low = _hutchpp_jit(op, key, num_matvecs, _check_dist(distribution),
                            _check_batch_size(batch_size))
    if not is_traced(out):
        what = f"hutchpp_trace of the {op.name} operator"
        if not np.isfinite(np.asarray(low, np.float64)):
            raise NonFiniteError(f"{what}: the sketched low-rank part tr(Q^T A Q) is not finite "
                                 f"({float(low)}); " + _NONFINITE_HINT)
        _raise_samples(what, out.samples, "tr(Q^T A Q) + p^T A p")
    return out


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
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                                    for x in jax.tree_util.tree_leaves(av)]))
        return (num, den), finite

    zeros = zeros_work(like)
    (num, den), finite = jax.lax.scan(body, (zeros, zeros), jax.random.split(key, num_samples))
    diag = jax.tree_util.tree_map(lambda n_, d, s: (n_ / d).astype(s.dtype), num, den, like)
    return diag, finite


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
        A pytree like the params, in the params' dtypes (accumulated in float32 or wider).
        Inside ``jit`` a non-finite operator gives NaN leaves (check them with
        ``jnp.isfinite``).

    Raises:
        TypeError: ``op`` is not a :class:`LinearOperator`, ``key`` is not a PRNG key, or
            ``num_samples`` is not an integer.
        ValueError: ``num_samples < 1``, an unknown ``distribution``, ``key=None`` or a
            batch of keys.
        NonFiniteError: (eagerly) a probe's product ``A v`` is NaN / Inf.

    References:
        C. Bekas, E. Kokiopoulou, Y. Saad (2007), "An estimator for the diagonal of a
        matrix".
    """
    op, key = _checked(op, key)
    num_samples = check_int(num_samples, "num_samples", lo=1)
    diag, finite = _diagonal_jit(op, key, num_samples, _check_dist(distribution))
    if not is_traced(finite):
        bad = np.flatnonzero(~np.asarray(finite))
        if bad.size:
            raise NonFiniteError(
                f"diagonal of the {op.name} operator: probe {int(bad[0])} of {num_samples} "
                "gave a non-finite product A v; " + _NONFINITE_HINT
            )
    return diag


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

    @property
    def finite(self) -> jax.Array:
        """Scalar bool: every node and weight is finite (usable inside ``jit``)."""
        return jnp.all(jnp.isfinite(self.nodes)) & jnp.all(jnp.isfinite(self.weights))

    def check(self) -> SpectralDensity:
        """Raise if a node or weight is NaN / Inf (concrete values: after a ``jit``-ed call).

        Returns:
            ``self``, when finite.

        Raises:
            NonFiniteError: naming the first probe with a non-finite node or weight.
        """
        bad = ~(np.isfinite(np.asarray(self.nodes, np.float64))
                & np.isfinite(np.asarray(self.weights, np.float64)))
        rows = np.flatnonzero(bad.any(axis=-1)) if bad.ndim else np.flatnonzero(bad)
        if rows.size:
            raise NonFiniteError(
                f"spectral_density: probe {int(rows[0])} of {bad.shape[0]} has non-finite "
                "quadrature nodes / weights; " + _NONFINITE_HINT
            )
        return self

    def evaluate(self, grid: Any, sigma: float) -> jax.Array:
        """Density on ``grid`` with Gaussian broadening of width ``sigma``.

        ``phi(t) = mean_probes sum_j w_j N(t; theta_j, sigma^2)`` (integrates to 1).

        Args:
            grid: points ``t``: a finite real 1-D array (or a scalar).
            sigma: width of the Gaussian kernel, a finite ``float > 0``.

        Returns:
            The density at each point, shaped like ``grid``. Cost
            ``O(|grid| x num_probes x num_iters)``.

        Raises:
            ValueError: ``sigma <= 0`` or not finite; ``grid`` not 1-D or not finite.
            ArgumentTypeError: ``sigma`` or ``grid`` is not real (a string, complex, ...).
        """
        sigma = check_real(sigma, "sigma", lo=0.0, lo_open=True)
        t = _check_grid(grid)
        dt = jnp.promote_types(self.nodes.dtype, t.dtype)
        t, nodes = t.astype(dt), self.nodes.astype(dt)
        z = (t[..., None, None] - nodes) / sigma
        kern = jnp.exp(-0.5 * z * z) / (sigma * np.sqrt(2.0 * np.pi))
        return jnp.mean(jnp.sum(self.weights.astype(dt) * kern, axis=-1), axis=-1)

    def moment(self, p: int) -> jax.Array:
        """``tr(A^p) / n`` estimated by the quadrature.

        Args:
            p: the moment's order (an integer).

        Returns:
            A scalar, ``mean_probes sum_j w_j theta_j^p``.

        Raises:
            ArgumentTypeError: ``p`` is not an integer.
        """
        p = check_int(p, "p", lo=None)
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


def _check_grid(grid: Any) -> jax.Array:
    """``grid`` as a real floating array of at most one axis, finite when concrete."""
    if isinstance(grid, (str, bytes)) or grid is None:
        raise ArgumentTypeError(f"grid must be a real 1-D array of points, got {grid!r}")
    try:
        t = jnp.asarray(grid)
    except (TypeError, ValueError) as exc:
        raise ArgumentTypeError(f"grid must be a real 1-D array of points: {exc}") from exc
    if t.dtype == jnp.bool_ or not (jnp.issubdtype(t.dtype, jnp.floating)
                                    or jnp.issubdtype(t.dtype, jnp.integer)):
        raise ArgumentTypeError(f"grid must be a real 1-D array of points, got dtype {t.dtype}")
    if t.ndim > 1:
        raise ValueError(f"grid must be 1-D (or a scalar), got shape {tuple(t.shape)}")
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.result_type(float))
    if not is_traced(t) and not np.all(np.isfinite(np.asarray(t, np.float64))):
        i = first_nonfinite(np.asarray(t, np.float64))
        raise ValueError(f"grid must be finite, got {float(np.asarray(t).ravel()[i])} at index "
                         f"{i}")
    return t


@functools.partial(jax.jit, static_argnames=("num_probes", "num_iters", "reorth", "window"))
def _slq_jit(op, key, num_probes, num_iters, reorth, window):
    like = op.params_like

    def one(k):
        k_v, k_r = jax.random.split(k)
        v = _probe(k_v, like, "rademacher")
        state = lanczos_init(op, v, num_iters, reorth, window, key=k_r)
        state = lanczos_run(op, state, num_iters, reorth)
        a, b = state.alphas, state.betas
        bad = ~(jnp.isfinite(a) & jnp.isfinite(b))
        first_bad = jnp.where(jnp.any(bad), jnp.argmax(bad), -1).astype(jnp.int32)
        t = jnp.diag(a) + jnp.diag(b[:-1], 1) + jnp.diag(b[:-1], -1)
        theta, s = jnp.linalg.eigh(t)
        return theta, s[0] ** 2, first_bad

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
        TypeError: ``op`` is not a :class:`LinearOperator`, ``key`` is not a PRNG key, or a
            count is not an integer.
        ValueError: ``num_probes`` / ``num_iters`` below 1, a bad ``reorth`` / ``window``,
            ``reorth="full"`` with ``num_iters > n_params``, ``key=None`` or a batch of keys.
        NonFiniteError: (eagerly) a probe's Lanczos recurrence hit NaN / Inf, naming the
            probe and the step (inside ``jit``: ``.finite`` is ``False``).
    """
    op, key = _checked(op, key)
    num_probes = check_int(num_probes, "num_probes", lo=1)
    num_iters = check_int(num_iters, "num_iters", lo=1)
    check_choice(reorth, "reorth", ("auto",) + REORTH_MODES)
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
    nodes, weights, first_bad = _slq_jit(op, key, num_probes, num_iters, reorth,
                                         win if reorth == "window" else None)
    if not is_traced(first_bad):
        steps = np.asarray(first_bad)
        probes = np.flatnonzero(steps >= 0)
        if probes.size:
            p = int(probes[0])
            raise NonFiniteError(
                f"spectral_density of the {op.name} operator: probe {p} of {num_probes} hit a "
                f"non-finite Lanczos coefficient at step {int(steps[p])} of {num_iters}; "
                + _NONFINITE_HINT
            )
    return SpectralDensity(nodes, weights, n)
