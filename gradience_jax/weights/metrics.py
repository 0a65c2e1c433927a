"""Per-matrix spectral metrics from the singular values: norms, ranks, MP edge.

Every weight matrix ``W`` is analysed through its singular values
``sigma_1 >= ... >= sigma_M`` and its ESD, the eigenvalues ``lambda_i = sigma_i^2 / N`` of
``W^T W / N`` (``N >= M`` the larger and smaller dimensions of ``W``):

* norms: spectral ``sigma_1``, Frobenius ``sqrt(sum sigma_i^2)``, nuclear ``sum sigma_i``;
* ``condition_number = sigma_1 / sigma_M`` (``inf`` for a singular non-zero matrix,
  ``nan`` for the zero matrix);
* ``stable_rank = ||W||_F^2 / ||W||_2^2``;
* ``effective_rank = exp(-sum p_i log p_i)`` with ``p_i = sigma_i / sum_j sigma_j``
  (Roy & Vetterli, 2007); defined as 0 for the zero matrix;
* ``numerical_rank`` = number of ``sigma_i > rtol * sigma_1``, ``0 <= rtol < 1``; the
  default ``rtol`` is ``max(shape) * eps(dtype of the input)`` (the
  ``numpy.linalg.matrix_rank`` rule);
* the median-based Marchenko-Pastur bulk scale and edges, the Tracy-Widom corrected edge
  and the spikes above it (:mod:`gradience_jax.weights.random_matrix`).

:func:`core_metrics` computes them from descending singular values with either ``numpy``
(the float64 host report, ``layer_spectrum``) or ``jax.numpy`` (the jittable
:func:`matrix_metrics`, ``spectral_truncate``): one formula for both paths.

Supported names: ``MatrixMetrics``, ``matrix_metrics``, ``effective_rank``,
``core_metrics``, ``default_rtol``, ``check_rtol``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradience_jax._validate import ArgumentTypeError, check_int, check_real
from gradience_jax.weights.random_matrix import mp_edges, mp_median, tracy_widom_edge, tw_quantile
from gradience_jax.weights.reshape import check_finite

__all__ = ["MatrixMetrics", "check_rtol", "core_metrics", "default_rtol", "effective_rank",
           "matrix_metrics"]


class MatrixMetrics(NamedTuple):
    """Jittable per-matrix metrics (all 0-d arrays except ``top_singular_values``).

    Attributes:
      spectral_norm, frobenius_norm, nuclear_norm: norms of ``W``.
      condition_number: ``sigma_1 / sigma_M`` (inf if singular, nan if zero).
      stable_rank: ``||W||_F^2 / ||W||_2^2``.
      effective_rank: Roy-Vetterli entropy rank.
      numerical_rank: count of ``sigma_i > rtol * sigma_1`` (integer).
      top_singular_values: ``(k_top,)`` largest singular values, zero padded.
      lambda_max: ``sigma_1^2 / N``, the top ESD eigenvalue.
      mp_sigma2: median-based Marchenko-Pastur bulk scale.
      mp_edge: ``lambda_+``; mp_edge_tw: edge plus the Tracy-Widom margin.
      num_spikes: ESD eigenvalues above ``mp_edge_tw`` (integer).
    """

    spectral_norm: jax.Array
    frobenius_norm: jax.Array
    nuclear_norm: jax.Array
    condition_number: jax.Array
    stable_rank: jax.Array
    effective_rank: jax.Array
    numerical_rank: jax.Array
    top_singular_values: jax.Array
    lambda_max: jax.Array
    mp_sigma2: jax.Array
    mp_edge: jax.Array
    mp_edge_tw: jax.Array
    num_spikes: jax.Array


def effective_rank(singular_values: Any, axis: int = -1, *, xp: Any = None) -> Any:
    """Roy & Vetterli (2007) effective rank ``exp(-sum p_i log p_i)``, ``p = s / sum(s)``.

    1 for a rank-one matrix, ``n`` for ``n`` equal singular values, 0 for all-zero. The
    one implementation in the package (``matrix_metrics``, ``layer_spectrum``,
    ``spectral_merge`` and the attention / landscape analyses use it). Cost ``O(n)``.

    Args:
        singular_values: array of singular values (signs are ignored).
        axis: the axis holding one spectrum; the others are batch axes.
        xp: array namespace: ``jax.numpy`` (default; jittable, differentiable through
            ``xlogy``) or ``numpy`` (host float64, for the NumPy reports).

    Returns:
        The effective rank, shaped like ``singular_values`` without ``axis`` (a jax array,
        or a NumPy array / scalar for ``xp=numpy``).
    """
    xp = jnp if xp is None else xp
    s = xp.abs(xp.asarray(singular_values))
    total = xp.sum(s, axis=axis, keepdims=True)
    p = s / xp.where(total > 0, total, 1.0)
    if xp is jnp:
        plogp = jax.scipy.special.xlogy(p, p)
    else:
        plogp = xp.where(p > 0, p * xp.log(xp.where(p > 0, p, 1.0)), 0.0)
    h = -xp.sum(plogp, axis=axis)
    return xp.where(xp.squeeze(total, axis) > 0, xp.exp(h), 0.0)


def core_metrics(
    s: Any, n: int, m: int, rtol: float, tw_level: float, xp: Any
) -> dict[str, Any]:
    """Metrics from the descending singular values ``s`` (length m) of an n x m matrix.

    Args:
      s: singular values in descending order, shape ``(m,)``.
      n: the larger dimension of the matrix (``n >= m``).
      m: the smaller dimension of the matrix (the length of ``s``).
      rtol: numerical-rank tolerance relative to ``sigma_1``.
      tw_level: Tracy-Widom quantile level of the spike threshold.
      xp: ``numpy`` (host path) or ``jax.numpy`` (jittable path).

    Returns:
      Dict of 0-d arrays: ``spectral_norm``, ``frobenius_norm``, ``nuclear_norm``,
      ``condition_number``, ``stable_rank``, ``effective_rank``, ``numerical_rank``,
      ``rank_tolerance``, ``lambda_max``, ``mp_sigma2``, ``mp_lower``, ``mp_edge``,
      ``mp_edge_tw``, ``tw_scale``, ``num_spikes``, ``tail_mass_fraction``. Cost ``O(m)``.

    Raises:
      ValueError: an untabulated ``tw_level``.
    """
    s0 = s[0]
    smin = s[-1]
    sq = s * s
    fro2 = xp.sum(sq)
    nuc = xp.sum(s)
    safe = lambda d: xp.where(d > 0, d, 1.0)  # noqa: E731
    cond = xp.where(s0 == 0, xp.nan, xp.where(smin == 0, xp.inf, s0 / safe(smin)))
    stable = xp.where(s0 > 0, fro2 / safe(s0 * s0), 0.0)
    erank = effective_rank(s, xp=xp)
    tol = rtol * s0
    nrank = xp.sum(s > tol)
    esd = sq / n
    ratio = m / n
    sigma2 = xp.median(esd) / mp_median(ratio)
    lower, upper = mp_edges(ratio, sigma2)
    edge_tw, tw_scale = tracy_widom_edge(n, m, sigma2, tw_level)
    thr = xp.maximum(edge_tw, tol * tol / n)
    above = (esd > thr) & (s > tol)
    return dict(
        spectral_norm=s0,
        frobenius_norm=xp.sqrt(fro2),
        nuclear_norm=nuc,
        condition_number=cond,
        stable_rank=stable,
        effective_rank=erank,
        numerical_rank=nrank,
        rank_tolerance=tol,
        lambda_max=esd[0],
        mp_sigma2=sigma2,
        mp_lower=lower,
        mp_edge=upper,
        mp_edge_tw=edge_tw,
        tw_scale=tw_scale,
        num_spikes=xp.sum(above),
        tail_mass_fraction=xp.where(
            fro2 > 0, xp.sum(xp.where(above, esd, 0.0)) / safe(esd.sum()), 0.0
        ),
    )


def default_rtol(shape: tuple[int, ...], dtype: Any) -> float:
    """Default numerical-rank tolerance ``max(shape) * eps`` (``matrix_rank``'s rule).

    ``eps`` is that of the dtype the singular values are computed in: float32 or wider.
    Half-precision entries are exact numbers that the SVD (run in float32) resolves to
    float32 accuracy; bfloat16's own eps (2^-8) times a width above 128 would exceed 1 and
    give every bfloat16 layer rank 0.

    Args:
      shape: the matrix shape.
      dtype: the input dtype (non-float dtypes use float64's eps).

    Returns:
      The relative tolerance.
    """
    dt = dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float64
    dt = jnp.promote_types(dt, jnp.float32)
    return float(max(shape) * jnp.finfo(dt).eps)


def check_rtol(rtol: Any) -> float:
    """The numerical-rank tolerance ``rtol`` (relative to ``sigma_1``) as a float in [0, 1).

    Args:
      rtol: the tolerance (``0`` counts every non-zero singular value).

    Returns:
      ``float(rtol)``.

    Raises:
      ArgumentTypeError: ``rtol`` is not a real number.
      ValueError: ``rtol`` is negative, not finite, or ``>= 1`` (no singular value exceeds
        ``sigma_1`` itself, so the numerical rank would be 0).
    """
    x = check_real(rtol, "rtol", lo=0.0)
    if x >= 1.0:
        raise ValueError(f"rtol must be < 1 (it is relative to sigma_1, so rtol >= 1 gives "
                         f"numerical rank 0), got {x}")
    return x


def matrix_metrics(
    matrix: jax.Array, *, k_top: int = 5, rtol: float | None = None, tw_level: float = 0.99
) -> MatrixMetrics:
    """Norms, ranks, top singular values and MP edge of one 2-D matrix, with ``jnp`` only.

    Runs under ``jax.jit`` / ``vmap`` (shapes are static), so a train step can log it every N
    steps; called eagerly it runs one compiled program (cached per shape, dtype and options).
    Cost: one singular-value decomposition, ``O(N M^2)``.

    Args:
      matrix: ``(a, b)`` array (reshape kernels first with ``matricize``).
      k_top: number of leading singular values returned (zero padded past ``min(a, b)``).
      rtol: relative tolerance of the numerical rank; default ``max(a, b) * eps(dtype)``.
      tw_level: Tracy-Widom quantile level of the spike threshold (0.90, 0.95 or 0.99).

    Returns:
      ``MatrixMetrics`` of 0-d arrays (``top_singular_values``: ``(k_top,)``).

    Raises:
      ArgumentTypeError: a non-real ``matrix``, or an argument of the wrong kind.
      ValueError: ``matrix`` not 2-D, empty or (called eagerly) with NaN / Inf entries;
        ``k_top < 1``; ``rtol`` outside [0, 1); an untabulated ``tw_level``.
    """
    k_top = check_int(k_top, "k_top")
    rtol = None if rtol is None else check_rtol(rtol)
    tw_quantile(tw_level)
    w = jnp.asarray(matrix)
    if not (jnp.issubdtype(w.dtype, jnp.floating) or jnp.issubdtype(w.dtype, jnp.integer)
            or w.dtype == jnp.bool_):
        raise ArgumentTypeError(f"matrix must be real, got dtype {w.dtype}")
    if w.ndim != 2:
        raise ValueError(f"matrix must be 2-D, got shape {w.shape}; use matricize() first")
    if min(w.shape) < 1:
        raise ValueError(f"matrix must have positive dimensions, got shape {w.shape}")
    check_finite(w, "matrix")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        w = w.astype(jnp.result_type(float))
    if rtol is None:
        rtol = default_rtol(w.shape, w.dtype)
    return _matrix_metrics_jit(w, k_top, float(rtol), float(tw_level))


def _matrix_metrics_impl(w: jax.Array, k_top: int, rtol: float, tw_level: float) -> MatrixMetrics:
    n, m = max(w.shape), min(w.shape)
    s = jnp.linalg.svd(w, compute_uv=False)
    c = core_metrics(s, n, m, rtol, tw_level, jnp)
    top = jnp.zeros((k_top,), s.dtype).at[: min(k_top, m)].set(s[:k_top])
    return MatrixMetrics(
        spectral_norm=c["spectral_norm"],
        frobenius_norm=c["frobenius_norm"],
        nuclear_norm=c["nuclear_norm"],
        condition_number=c["condition_number"],
        stable_rank=c["stable_rank"],
        effective_rank=c["effective_rank"],
        numerical_rank=c["numerical_rank"],
        top_singular_values=top,
        lambda_max=c["lambda_max"],
        mp_sigma2=c["mp_sigma2"],
        mp_edge=c["mp_edge"],
        mp_edge_tw=c["mp_edge_tw"],
        num_spikes=c["num_spikes"],
    )


# One compiled program per (shape, dtype, options) instead of op-by-op dispatch; inside an
# outer jit it is simply inlined.
_matrix_metrics_jit = jax.jit(_matrix_metrics_impl, static_argnums=(1, 2, 3))
