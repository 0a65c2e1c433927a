"""Spectral analysis of weight matrices: norms, ranks, power-law tails, Marchenko-Pastur.

Every weight matrix ``W`` is analysed through its singular values
``sigma_1 >= ... >= sigma_M`` and its empirical spectral density (ESD), the eigenvalues of
``X = W^T W / N`` where ``N >= M`` are the larger and smaller dimensions of ``W`` (the
matrix is transposed when needed, so the ESD has ``M = min(shape)`` eigenvalues
``lambda_i = sigma_i^2 / N``). This is the normalisation of Martin & Mahoney (2021) and
WeightWatcher.

Metrics (``layer_spectrum``; the host-free subset also in the jittable ``matrix_metrics``):

* norms: spectral ``sigma_1``, Frobenius ``sqrt(sum sigma_i^2)``, nuclear ``sum sigma_i``;
* ``condition_number = sigma_1 / sigma_M`` (``inf`` for a singular non-zero matrix,
  ``nan`` for the zero matrix);
* ``stable_rank = ||W||_F^2 / ||W||_2^2``;
* ``effective_rank = exp(-sum p_i log p_i)`` with ``p_i = sigma_i / sum_j sigma_j``
  (Roy & Vetterli, 2007); defined as 0 for the zero matrix;
* ``numerical_rank`` = number of ``sigma_i > rtol * sigma_1``; the default ``rtol`` is
  ``max(shape) * eps(dtype of the input)`` (the ``numpy.linalg.matrix_rank`` rule);
* power-law fit of the ESD tail ``p(lambda) ~ lambda^-alpha`` (the density exponent that
  WeightWatcher reports) by the continuous maximum-likelihood estimator
  ``alpha = 1 + n / sum_i log(lambda_i / xmin)`` with ``xmin`` chosen to minimise the
  Kolmogorov-Smirnov distance (Clauset, Shalizi & Newman, 2009). All candidate ``xmin``
  are evaluated at once with array operations. ``weighted_alpha = alpha * log10(lambda_max)``;
* ``decay_exponent``: least-squares slope ``a`` of ``log sigma_i = c - a log i``;
* Marchenko-Pastur (MP) fit: the bulk scale ``sigma^2`` is estimated robustly from the
  median eigenvalue, ``sigma^2 = median(lambda) / m_MP(gamma)`` with ``m_MP`` the median of
  the unit MP law and ``gamma = M / N`` (the idea of Gavish & Donoho, 2014); the bulk edges
  are ``lambda_pm = sigma^2 (1 pm sqrt(gamma))^2``. The largest eigenvalue of a white
  Wishart matrix fluctuates on the Tracy-Widom scale (Johnstone, 2001):
  ``mu = (sqrt(N-1) + sqrt(M))^2``, ``s = (sqrt(N-1) + sqrt(M)) (1/sqrt(N-1) + 1/sqrt(M))^(1/3)``,
  and ``mp_edge_tw = sigma^2 (mu + q s) / N`` with ``q`` the TW1 quantile at ``tw_level``.
  Eigenvalues above ``mp_edge_tw`` are *spikes*; ``tail_mass_fraction`` is their share of
  ``sum lambda_i``.

Verdict (heuristics, not theorems; the ranges are those used with WeightWatcher):
``alpha < 2`` "very heavy-tailed" (possible over-fit / over-regularisation),
``2 <= alpha <= 6`` "typical trained", ``alpha > 6`` "random-like". A layer whose ESD is
consistent with MP (no spike above the TW edge and MP KS distance at most
``mp_ks_threshold(M) = max(0.1, 1.36 / sqrt(M))``) is also
called random-like, whatever the fitted alpha: without a tail a power-law exponent means
nothing. When alpha cannot be fitted the verdict is "undetermined (<reason>)".

Reshape conventions (``matricize``; Flax stores kernels as ``(inputs..., outputs...)``):

* 2-D arrays (Dense kernels ``(in, out)``, embeddings ``(vocab, features)``): as they are;
* rule ``"leading"``: ``(a_0, ..., a_{k-1}) -> (a_0 * ... * a_{k-2}, a_{k-1})``. Convolution
  kernels ``(kh, kw, in, out) -> (kh*kw*in, out)`` (any number of spatial axes), attention
  output projections ``(heads, head_dim, d_model) -> (heads*head_dim, d_model)``, and
  ``DenseGeneral`` kernels contracting several input axes into one output axis;
* rule ``"trailing"``: ``(a_0, a_1, ..., a_{k-1}) -> (a_0, a_1 * ... * a_{k-1})``. Attention
  query / key / value kernels ``(d_model, heads, head_dim) -> (d_model, heads*head_dim)``;
* rule ``"auto"`` (used by ``weight_spectra``) picks by the leaf's path: leaves named
  ``bias`` / ``scale`` and arrays with fewer than 2 axes are skipped; 2-D arrays are kept;
  a kernel with more than 2 axes whose parent module is an attention input projection
  (``query``, ``key``, ``value``, ``q``, ``k``, ``v``, ``q_proj``, ``k_proj``, ``v_proj``,
  ``qkv``, ``kv``) uses ``"trailing"``, one in an output projection (``out``, ``o``,
  ``o_proj``, ``out_proj``) and every other ``kernel`` uses ``"leading"``; anything else
  has no rule and is reported as skipped with the reason. ``weight_spectra(reshape=...)``
  overrides the rule for layouts this cannot guess (e.g. a ``DenseGeneral`` with several
  output axes outside attention).
* ``head_matrices`` gives the per-head view of attention kernels: input projections
  ``(d_model, heads, head_dim) -> (heads, d_model, head_dim)``, output projections
  ``(heads, head_dim, d_model)`` unchanged.

Bad input: ``layer_spectrum`` raises ``ValueError`` for arrays with fewer than 2 axes,
with more than 2 axes and no reshape rule, non-real dtypes and NaN / Inf entries;
``weight_spectra`` never raises for one bad leaf: it lists the leaf in ``report.skipped``
with the reason. An all-zero matrix has all norms and ranks 0, ``condition_number`` NaN,
and ``alpha`` missing with a reason; a matrix with fewer than ``min_tail`` positive
eigenvalues gets ``alpha = None`` with ``alpha_missing_reason`` set.

Tools: ``randomization_baseline`` (element-wise shuffle, the "correlation trap" check),
``spectral_truncate`` (STAR-style truncation at the MP edge) and ``spectral_merge``
(spectrum-aware interpolation of two layers or of their task vectors).

References: Martin & Mahoney, JMLR 22 (2021); Clauset, Shalizi & Newman, SIAM Review 51
(2009); Roy & Vetterli, EUSIPCO (2007); Marchenko & Pastur (1967); Johnstone, Ann. Stat. 29
(2001); Gavish & Donoho, IEEE Trans. Inf. Theory 60 (2014); Baik, Ben Arous & Peche (2005);
STAR: Lee et al., NAACL (2025).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax._json import jsonable
from gradience_jax.tree import path_str

__all__ = [
    "LayerSpectrum",
    "MatrixMetrics",
    "MergeResult",
    "ModelSummary",
    "PowerLawFit",
    "RandomizationBaseline",
    "TruncationResult",
    "WeightSpectraReport",
    "apply_reshape_rule",
    "fit_power_law",
    "head_matrices",
    "layer_spectrum",
    "marchenko_pastur_cdf",
    "marchenko_pastur_pdf",
    "matricize",
    "matrix_metrics",
    "mp_ks_threshold",
    "mp_median",
    "randomization_baseline",
    "reshape_rule_for",
    "spectral_merge",
    "spectral_truncate",
    "tracy_widom_edge",
    "weight_spectra",
]

PyTree = Any

# Quantiles of the Tracy-Widom (beta = 1) law, Johnstone (2001), Table 1.
TW1_QUANTILES: dict[float, float] = {0.90: 0.4501, 0.95: 0.9793, 0.99: 2.0234}

ALPHA_HEAVY = 2.0
ALPHA_RANDOM = 6.0
MP_KS_RANDOM = 0.1

RULES = ("auto", "matrix", "leading", "trailing")
_SKIP_NAMES = frozenset({"bias", "scale"})
_ATTN_IN = frozenset(
    {"query", "key", "value", "q", "k", "v", "q_proj", "k_proj", "v_proj", "qkv", "kv"}
)
_ATTN_OUT = frozenset({"out", "o", "o_proj", "out_proj"})


# ----------------------------------------------------------------------------------------
# Result types
# ----------------------------------------------------------------------------------------


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


class PowerLawFit(NamedTuple):
    """Continuous power-law fit ``p(x) ~ x^-alpha`` for ``x >= xmin``.

    ``alpha``, ``alpha_stderr`` (``(alpha - 1) / sqrt(n)``), ``xmin`` and ``ks_distance``
    are None when no fit is possible; ``missing_reason`` then says why.
    """

    alpha: float | None
    alpha_stderr: float | None
    xmin: float | None
    ks_distance: float | None
    num_tail: int
    num_total: int
    missing_reason: str | None


class RandomizationBaseline(NamedTuple):
    """Layer vs its element-wise shuffled copy (the "correlation trap" check).

    Attributes:
      lambda_max: top ESD eigenvalue of the layer.
      lambda_max_shuffled: top ESD eigenvalue of the shuffled copy.
      delta: ``lambda_max - lambda_max_shuffled``; large when the layer's top direction
        comes from correlations between entries (learned structure), ~0 for i.i.d. entries.
      shuffled_mp_edge_tw: TW-corrected MP edge fitted to the shuffled copy.
      correlation_trap: True when the shuffled copy still has an eigenvalue above its
        TW-corrected MP edge: a few very large entries dominate (a "correlation trap").
    """

    lambda_max: float
    lambda_max_shuffled: float
    delta: float
    shuffled_mp_edge_tw: float
    correlation_trap: bool


class TruncationResult(NamedTuple):
    """``spectral_truncate`` output.

    Attributes:
      matrix: truncated copy, same shape and dtype as the input.
      rank: number of singular values kept (0-d integer array).
      retained_energy: kept share of ``||W||_F^2`` (before any rescale).
      retained_nuclear: kept share of ``||W||_*`` (before any rescale).
      threshold: singular-value threshold used (``sqrt(N * mp_edge_tw)`` for the MP rule,
        else the smallest kept singular value).
    """

    matrix: jax.Array
    rank: jax.Array
    retained_energy: jax.Array
    retained_nuclear: jax.Array
    threshold: jax.Array


class MergeResult(NamedTuple):
    """``spectral_merge`` output.

    Attributes:
      matrix: merged matrix, shape of the inputs.
      rule: ``"spectrum_interpolation"`` or ``"task_vectors"``.
      effective_rank_a, effective_rank_b: of ``a`` and ``b`` (of the task vectors when a
        base is given).
      subspace_overlap: ``||U_a[:, :k]^T U_b[:, :k]||_F^2 / k`` in [0, 1], the overlap of the
        top-k left singular subspaces, ``k = max(1, round(min(effective ranks)))``; near 1
        means the two layers use the same directions (safe to merge).
      retained_energy_a, retained_energy_b: kept energy of each task vector (1.0 for the
        spectrum-interpolation rule).
    """

    matrix: jax.Array
    rule: str
    effective_rank_a: float
    effective_rank_b: float
    subspace_overlap: float
    retained_energy_a: float
    retained_energy_b: float


_ARRAY_FIELDS = ("singular_values", "esd")


@dataclasses.dataclass(frozen=True, eq=False)
class LayerSpectrum:
    """Spectral report of one weight matrix (see the module docstring for definitions).

    Arrays: ``singular_values`` ``(M,)`` and ``esd`` ``(M,)`` (eigenvalues of
    ``W^T W / N``), both in descending order, float64 numpy. Optional fields are None when
    undefined; ``alpha_missing_reason`` explains a missing power-law fit and the
    ``*_shuffled`` / ``correlation_trap`` fields are filled only when a key is given.
    """

    path: str | None
    original_shape: tuple[int, ...]
    shape: tuple[int, int]
    reshape_rule: str
    n_rows: int
    n_cols: int
    aspect_ratio: float
    singular_values: np.ndarray
    esd: np.ndarray
    spectral_norm: float
    frobenius_norm: float
    nuclear_norm: float
    condition_number: float
    stable_rank: float
    effective_rank: float
    numerical_rank: int
    rank_tolerance: float
    lambda_max: float
    log10_lambda_max: float | None
    alpha: float | None
    alpha_stderr: float | None
    xmin: float | None
    ks_distance: float | None
    num_tail: int
    weighted_alpha: float | None
    alpha_missing_reason: str | None
    decay_exponent: float | None
    mp_sigma2: float
    mp_edge: float
    mp_lower: float
    mp_edge_tw: float
    tw_scale: float
    tw_level: float
    num_spikes: int
    tail_mass_fraction: float
    mp_ks_distance: float | None
    verdict: str
    lambda_max_shuffled: float | None = None
    lambda_max_delta: float | None = None
    correlation_trap: bool | None = None

    def to_dict(self, include_arrays: bool = True) -> dict[str, Any]:
        """JSON-safe dict: Python scalars, lists, NaN / Inf -> None.

        Args:
          include_arrays: include ``singular_values`` and ``esd`` as lists.
        """
        out = {}
        for f in dataclasses.fields(self):
            if f.name in _ARRAY_FIELDS and not include_arrays:
                continue
            out[f.name] = jsonable(getattr(self, f.name))
        return out

    def to_json(self, include_arrays: bool = True, indent: int | None = None) -> str:
        """``json.dumps(self.to_dict(include_arrays))``."""
        return json.dumps(self.to_dict(include_arrays), indent=indent)


class ModelSummary(NamedTuple):
    """Model-level summary of a ``WeightSpectraReport`` (None where undefined).

    ``weighted_alpha`` is the mean over layers of ``alpha * log10(lambda_max)``
    (WeightWatcher's ``alpha_weighted``); ``trends`` maps a metric name to the
    least-squares slope of that metric against layer position (natural sort of paths).
    Per-head views (``weight_spectra(per_head=True)``) are not counted.
    """

    num_layers: int
    num_skipped: int
    num_alpha_missing: int
    mean_alpha: float | None
    median_alpha: float | None
    weighted_alpha: float | None
    mean_log10_lambda_max: float | None
    mean_stable_rank: float | None
    mean_effective_rank: float | None
    total_spikes: int
    verdict_counts: dict[str, int]
    trends: dict[str, float | None]


# ----------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------


def _tw_quantile(tw_level: float) -> float:
    for level, q in TW1_QUANTILES.items():
        if abs(float(tw_level) - level) < 1e-12:
            return q
    raise ValueError(
        f"tw_level={tw_level!r} is not tabulated; choose one of {sorted(TW1_QUANTILES)}"
    )


def _natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# ----------------------------------------------------------------------------------------
# Marchenko-Pastur and Tracy-Widom
# ----------------------------------------------------------------------------------------


def _mp_edges(ratio: float, sigma2: Any = 1.0) -> tuple[Any, Any]:
    r = math.sqrt(ratio)
    return sigma2 * (1.0 - r) ** 2, sigma2 * (1.0 + r) ** 2


def effective_rank(singular_values: Any, axis: int = -1) -> jax.Array:
    """Roy & Vetterli (2007) effective rank ``exp(-sum p_i log p_i)``, ``p = s / sum(s)``.

    1 for a rank-one matrix, ``n`` for ``n`` equal singular values, 0 for all-zero.

    Args:
        singular_values: array of singular values (signs are ignored).
        axis: the axis holding one spectrum; the others are batch axes.

    Returns:
        The effective rank, shaped like ``singular_values`` without ``axis``.
    """
    s = jnp.abs(jnp.asarray(singular_values))
    total = jnp.sum(s, axis=axis, keepdims=True)
    p = s / jnp.where(total > 0, total, 1.0)
    h = -jnp.sum(jax.scipy.special.xlogy(p, p), axis=axis)
    return jnp.where(jnp.squeeze(total, axis) > 0, jnp.exp(h), 0.0)


def marchenko_pastur_pdf(x: Any, ratio: float, sigma2: float = 1.0) -> np.ndarray:
    """Marchenko-Pastur density of the eigenvalues of ``W^T W / N``.

    ``rho(x) = sqrt((l_+ - x)(x - l_-)) / (2 pi sigma2 ratio x)`` on ``[l_-, l_+]``,
    ``l_pm = sigma2 (1 pm sqrt(ratio))^2``, zero elsewhere.

    Args:
      x: evaluation points, any shape.
      ratio: ``gamma = M / N`` in (0, 1].
      sigma2: entry variance.

    Returns:
      Density values, shape of ``x`` (float64).
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if sigma2 <= 0:
        raise ValueError(f"sigma2 must be positive, got {sigma2}")
    x = np.asarray(x, dtype=np.float64)
    lo, hi = _mp_edges(ratio, sigma2)
    inside = (x > lo) & (x < hi) & (x > 0)
    xs = np.where(inside, x, 1.0)
    val = np.sqrt(np.clip((hi - xs) * (xs - lo), 0.0, None)) / (2 * np.pi * sigma2 * ratio * xs)
    return np.where(inside, val, 0.0)


@functools.lru_cache(maxsize=256)
def _mp_cdf_table(ratio: float, num: int = 4097) -> tuple[np.ndarray, np.ndarray]:
    """Unit-variance MP CDF on a grid: substitution ``x = a + (b-a)(1-cos t)/2``.

    The substitution removes the square-root singularities at both edges, so a trapezoid
    rule on a uniform ``t`` grid is accurate; the table is renormalised to end at 1.
    """
    a, b = _mp_edges(ratio)
    t = np.linspace(0.0, np.pi, num)
    x = a + (b - a) * (1.0 - np.cos(t)) / 2.0
    half = (b - a) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        f = half**2 * np.sin(t) ** 2 / (2 * np.pi * ratio * x)
    if a == 0.0:  # ratio == 1: sin^2 t / x -> 4 / b at t = 0
        f[0] = half**2 * 4.0 / b / (2 * np.pi * ratio)
    cdf = np.concatenate([[0.0], np.cumsum((f[1:] + f[:-1]) / 2.0 * np.diff(t))])
    return x, cdf / cdf[-1]


def marchenko_pastur_cdf(x: Any, ratio: float, sigma2: float = 1.0) -> np.ndarray:
    """Marchenko-Pastur CDF (numerical quadrature, accurate to ~1e-7).

    Args:
      x: evaluation points, any shape.
      ratio: ``gamma = M / N`` in (0, 1].
      sigma2: entry variance.

    Returns:
      CDF values in [0, 1], shape of ``x``.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if sigma2 <= 0:
        raise ValueError(f"sigma2 must be positive, got {sigma2}")
    grid, cdf = _mp_cdf_table(float(ratio))
    return np.interp(np.asarray(x, dtype=np.float64) / sigma2, grid, cdf, left=0.0, right=1.0)


@functools.lru_cache(maxsize=256)
def mp_median(ratio: float) -> float:
    """Median of the unit-variance Marchenko-Pastur law with ``gamma = ratio``."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    grid, cdf = _mp_cdf_table(float(ratio))
    return float(np.interp(0.5, cdf, grid))


def tracy_widom_edge(
    n_rows: int, n_cols: int, sigma2: Any = 1.0, tw_level: float = 0.99
) -> tuple[Any, Any]:
    """Tracy-Widom corrected MP edge for the ESD of an ``N x M`` white matrix (N >= M).

    Johnstone (2001): ``mu = (sqrt(N-1) + sqrt(M))^2``,
    ``s = (sqrt(N-1) + sqrt(M)) (1/sqrt(N-1) + 1/sqrt(M))^(1/3)``; the top eigenvalue of
    ``W^T W / N`` is ~ ``sigma2 (mu + s * TW1) / N``.

    Args:
      n_rows, n_cols: matrix dimensions (either order).
      sigma2: entry variance (float or array).
      tw_level: TW1 quantile level, one of 0.90, 0.95, 0.99.

    Returns:
      ``(edge, scale)``: ``sigma2 (mu + q s) / N`` and ``sigma2 s / N``.
    """
    n, m = max(n_rows, n_cols), min(n_rows, n_cols)
    if m < 1:
        raise ValueError(f"matrix dimensions must be positive, got {(n_rows, n_cols)}")
    q = _tw_quantile(tw_level)
    a, b = math.sqrt(max(n - 1, 1)), math.sqrt(m)
    mu = (a + b) ** 2
    s = (a + b) * (1.0 / a + 1.0 / b) ** (1.0 / 3.0)
    return sigma2 * (mu + q * s) / n, sigma2 * s / n


# ----------------------------------------------------------------------------------------
# Core metrics (shared by the numpy host path and the jittable jnp path)
# ----------------------------------------------------------------------------------------


def _core(s: Any, n: int, m: int, rtol: float, tw_level: float, xp: Any) -> dict[str, Any]:
    """Metrics from descending singular values ``s`` (length m) of an n x m matrix."""
    s0 = s[0]
    smin = s[-1]
    sq = s * s
    fro2 = xp.sum(sq)
    nuc = xp.sum(s)
    safe = lambda d: xp.where(d > 0, d, 1.0)  # noqa: E731
    cond = xp.where(s0 == 0, xp.nan, xp.where(smin == 0, xp.inf, s0 / safe(smin)))
    stable = xp.where(s0 > 0, fro2 / safe(s0 * s0), 0.0)
    p = s / safe(nuc)
    plogp = xp.where(p > 0, p * xp.log(xp.where(p > 0, p, 1.0)), 0.0)
    erank = xp.where(nuc > 0, xp.exp(-xp.sum(plogp)), 0.0)
    tol = rtol * s0
    nrank = xp.sum(s > tol)
    esd = sq / n
    ratio = m / n
    sigma2 = xp.median(esd) / mp_median(ratio)
    lower, upper = _mp_edges(ratio, sigma2)
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


def _default_rtol(shape: tuple[int, ...], dtype: Any) -> float:
    dt = dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float64
    return float(max(shape) * jnp.finfo(dt).eps)


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
      ValueError: if ``matrix`` is not 2-D or ``k_top < 1``.
    """
    w = jnp.asarray(matrix)
    if w.ndim != 2:
        raise ValueError(f"matrix must be 2-D, got shape {w.shape}; use matricize() first")
    if k_top < 1:
        raise ValueError(f"k_top must be >= 1, got {k_top}")
    _tw_quantile(tw_level)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        w = w.astype(jnp.result_type(float))
    if rtol is None:
        rtol = _default_rtol(w.shape, w.dtype)
    return _matrix_metrics_jit(w, int(k_top), float(rtol), float(tw_level))


def _matrix_metrics_impl(w: jax.Array, k_top: int, rtol: float, tw_level: float) -> MatrixMetrics:
    n, m = max(w.shape), min(w.shape)
    s = jnp.linalg.svd(w, compute_uv=False)
    c = _core(s, n, m, rtol, tw_level, jnp)
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


# ----------------------------------------------------------------------------------------
# Power-law fit (host side, vectorised over xmin candidates)
# ----------------------------------------------------------------------------------------


def _missing_fit(reason: str, num_total: int) -> PowerLawFit:
    return PowerLawFit(None, None, None, None, 0, num_total, reason)


def fit_power_law(
    samples: Any,
    *,
    xmin: float | None = None,
    min_tail: int = 10,
    block_elements: int = 1 << 22,
) -> PowerLawFit:
    """Continuous power-law MLE with KS-optimal ``xmin`` (Clauset, Shalizi & Newman 2009).

    For each candidate ``xmin`` (every distinct sample leaving ``>= min_tail`` points in the
    tail) ``alpha = 1 + n / sum(log(x / xmin))`` over the ``n`` samples ``x >= xmin``, and the
    KS distance between the tail's empirical CDF and ``1 - (x / xmin)^(1 - alpha)``; the
    candidate with the smallest KS distance wins. All candidates are scored with array
    operations, in blocks of at most ``block_elements`` (candidate, sample) pairs, so memory
    stays bounded; cost ``O(n^2)``.

    Args:
      samples: 1-D positive samples (values <= 0 and non-finite values are discarded).
      xmin: fix ``xmin`` instead of searching (then only alpha and KS are computed).
      min_tail: smallest tail size accepted.
      block_elements: memory bound of the vectorised KS scan.

    Returns:
      ``PowerLawFit`` (alpha etc. None with ``missing_reason`` when no fit is possible).

    Raises:
      ValueError: if ``min_tail < 2``.
    """
    if min_tail < 2:
        raise ValueError(f"min_tail must be >= 2, got {min_tail}")
    x = np.asarray(samples, dtype=np.float64).ravel()
    num_total = int(x.size)
    x = np.sort(x[np.isfinite(x) & (x > 0)])
    if x.size < min_tail:
        return _missing_fit(
            f"only {x.size} positive values; a tail fit needs at least min_tail={min_tail}",
            num_total,
        )
    lx = np.log(x)
    if xmin is not None:
        if not xmin > 0:
            raise ValueError(f"xmin must be positive, got {xmin}")
        k = int(np.searchsorted(x, xmin, side="left"))
        if x.size - k < min_tail:
            return _missing_fit(
                f"only {x.size - k} values >= xmin={xmin}; need min_tail={min_tail}", num_total
            )
        cands = np.array([k])
        log_xmin = np.array([math.log(xmin)])
    else:
        last = x.size - min_tail
        cands = np.arange(last + 1)
        distinct = np.concatenate([[True], x[1:] != x[:-1]])[: last + 1]
        cands = cands[distinct]
        log_xmin = lx[cands]
    suffix = np.concatenate([np.cumsum(lx[::-1])[::-1], [0.0]])  # sum_{i>=k} log x_i
    n_tail = x.size - cands
    log_sum = suffix[cands] - n_tail * log_xmin
    ok = log_sum > 1e-12 * n_tail
    alpha = np.where(ok, 1.0 + n_tail / np.where(ok, log_sum, 1.0), np.nan)
    if not ok.any():
        return _missing_fit("all tail values are equal (degenerate spectrum): no tail", num_total)
    ks = _ks_scan(lx, cands, log_xmin, alpha, block_elements)
    ks = np.where(ok, ks, np.inf)
    best = int(np.argmin(ks))
    a, n = float(alpha[best]), int(n_tail[best])
    return PowerLawFit(
        alpha=a,
        alpha_stderr=(a - 1.0) / math.sqrt(n),
        xmin=float(math.exp(log_xmin[best])),
        ks_distance=float(ks[best]),
        num_tail=n,
        num_total=num_total,
        missing_reason=None,
    )


def _ks_scan(
    lx: np.ndarray, cands: np.ndarray, log_xmin: np.ndarray, alpha: np.ndarray, block: int
) -> np.ndarray:
    """KS distance of the fitted power law for every candidate (vectorised in blocks)."""
    m = lx.size
    out = np.empty(cands.size)
    step = max(1, block // max(m, 1))
    for start in range(0, cands.size, step):
        k = cands[start : start + step][:, None]
        lo = int(k.min())
        i = np.arange(lo, m)[None, :]
        a = np.nan_to_num(alpha[start : start + step], nan=2.0)[:, None]
        valid = i >= k
        lr = np.where(valid, lx[None, lo:] - log_xmin[start : start + step][:, None], 0.0)
        model = -np.expm1((1.0 - a) * lr)  # 1 - (x / xmin)^(1 - alpha)
        n = (m - k).astype(np.float64)
        j = (i - k).astype(np.float64)
        d = np.maximum(np.abs((j + 1.0) / n - model), np.abs(j / n - model))
        out[start : start + step] = np.where(valid, d, 0.0).max(axis=1)
    return out


def _decay_exponent(s: np.ndarray) -> float | None:
    """Slope ``a`` of the least-squares fit ``log s_i = c - a log i`` (needs >= 2 points)."""
    if s.size < 2:
        return None
    li = np.log(np.arange(1, s.size + 1, dtype=np.float64))
    ls = np.log(s)
    li_c = li - li.mean()
    return float(-np.dot(li_c, ls - ls.mean()) / np.dot(li_c, li_c))


def _mp_ks(esd_desc: np.ndarray, ratio: float, sigma2: float) -> float | None:
    if not sigma2 > 0:
        return None
    x = esd_desc[::-1]
    f = marchenko_pastur_cdf(x, ratio, sigma2)
    m = x.size
    i = np.arange(1, m + 1)
    return float(np.max(np.maximum(np.abs(i / m - f), np.abs((i - 1) / m - f))))


def mp_ks_threshold(num_eigs: int) -> float:
    """KS distance below which an ESD of ``num_eigs`` eigenvalues counts as MP-like.

    ``max(0.1, 1.36 / sqrt(num_eigs))``: 1.36 / sqrt(n) is the 95% critical value of the
    one-sample KS test for i.i.d. samples, which is conservative for (rigid) eigenvalues.
    """
    return max(MP_KS_RANDOM, 1.36 / math.sqrt(max(num_eigs, 1)))


def _verdict(
    alpha: float | None, reason: str | None, num_spikes: int, mp_ks: float | None, num_eigs: int
) -> str:
    if alpha is None:
        return f"undetermined ({reason})"
    if num_spikes == 0 and mp_ks is not None and mp_ks <= mp_ks_threshold(num_eigs):
        return "random-like (ESD fits Marchenko-Pastur, no spikes)"
    if alpha < ALPHA_HEAVY:
        return "very heavy-tailed (alpha < 2: possible over-fit)"
    if alpha <= ALPHA_RANDOM:
        return "typical trained (2 <= alpha <= 6)"
    return "random-like (alpha > 6)"


# ----------------------------------------------------------------------------------------
# Reshape rules
# ----------------------------------------------------------------------------------------


def reshape_rule_for(path: str, shape: tuple[int, ...]) -> tuple[str | None, str]:
    """(rule, reason) chosen by the ``"auto"`` convention for a leaf at ``path``."""
    parts = [p for p in path.split("/") if p] if path else []
    name = parts[-1] if parts else ""
    module = parts[-2] if len(parts) >= 2 else ""
    if name in _SKIP_NAMES:
        return None, f"'{name}' parameter (bias / normalisation), not a weight matrix"
    if len(shape) < 2:
        return None, f"{len(shape)}-D array (shape {shape}): not a weight matrix"
    if len(shape) == 2:
        return "matrix", ""
    if name == "kernel":
        if module in _ATTN_IN:
            return "trailing", ""
        return "leading", ""
    return None, (
        f"no reshape rule for a {len(shape)}-D array named '{name or '?'}' (shape {shape}); "
        "pass reshape='leading' or 'trailing'"
    )


def matricize(array: Any, rule: str = "auto", path: str = "") -> jax.Array:
    """Reshape a kernel to the 2-D matrix analysed (conventions in the module docstring).

    Args:
      array: the parameter array.
      rule: ``"auto"`` (by ``path`` and shape), ``"matrix"``, ``"leading"`` or ``"trailing"``.
      path: the leaf's ``"/"``-joined path, used by ``"auto"``.

    Returns:
      A 2-D array (a reshape, no copy of data under jit).

    Raises:
      ValueError: unknown rule, fewer than 2 axes, or no rule for this array.
    """
    a = jnp.asarray(array)
    rule = _resolve_rule(rule, path, a.shape)
    return apply_reshape_rule(a, rule)


def _resolve_rule(rule: str, path: str, shape: tuple[int, ...]) -> str:
    if rule not in RULES:
        raise ValueError(f"reshape rule must be one of {RULES}, got {rule!r}")
    if len(shape) < 2:
        raise ValueError(f"matrix must have at least 2 axes, got shape {shape}")
    if rule == "auto":
        if len(shape) == 2:
            return "matrix"
        if not path:
            raise ValueError(
                f"matrix has shape {shape} and no reshape rule applies without a path; pass "
                "reshape='leading' (conv / output kernels, (..., out)) or 'trailing' "
                "(attention q/k/v kernels, (in, ...))"
            )
        chosen, reason = reshape_rule_for(path, shape)
        if chosen is None:
            raise ValueError(f"matrix at '{path}': {reason}")
        return chosen
    if rule == "matrix" and len(shape) != 2:
        raise ValueError(f"reshape='matrix' needs a 2-D array, got shape {shape}")
    return rule


def apply_reshape_rule(a: Any, rule: str) -> Any:
    """A parameter leaf as a 2-D matrix by ``rule`` (from :func:`reshape_rule_for`):
    ``"leading"`` folds all but the last axis into rows, ``"trailing"`` all but the first
    into columns, anything else leaves ``a`` as it is. Works on NumPy and JAX arrays."""
    if rule == "leading":
        return a.reshape(-1, a.shape[-1])
    if rule == "trailing":
        return a.reshape(a.shape[0], -1)
    return a


def head_matrices(kernel: Any, *, kind: str) -> jax.Array:
    """Per-head matrices of a multi-head attention kernel.

    Args:
      kernel: ``(d_model, heads, head_dim)`` for ``kind="in"`` (query / key / value), or
        ``(heads, head_dim, d_model)`` for ``kind="out"``.
      kind: ``"in"`` or ``"out"``.

    Returns:
      ``(heads, d_model, head_dim)`` for ``"in"``; ``(heads, head_dim, d_model)`` for ``"out"``.

    Raises:
      ValueError: if ``kernel`` is not 3-D or ``kind`` is unknown.
    """
    k = jnp.asarray(kernel)
    if k.ndim != 3:
        raise ValueError(f"kernel must be 3-D (a multi-head attention kernel), got {k.shape}")
    if kind == "in":
        return jnp.moveaxis(k, 1, 0)
    if kind == "out":
        return k
    raise ValueError(f"kind must be 'in' or 'out', got {kind!r}")


# ----------------------------------------------------------------------------------------
# One layer
# ----------------------------------------------------------------------------------------


def _check_finite(w: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(w)
    if bad.any():
        n_nan, n_inf = int(np.isnan(w).sum()), int(np.isinf(w).sum())
        raise ValueError(f"{what} has non-finite entries ({n_nan} NaN, {n_inf} Inf)")


def _host_svd(w: np.ndarray) -> np.ndarray:
    return np.linalg.svd(w, compute_uv=False)


def layer_spectrum(
    matrix: Any,
    *,
    path: str | None = None,
    reshape: str = "auto",
    rtol: float | None = None,
    min_tail: int = 10,
    tw_level: float = 0.99,
    key: jax.Array | None = None,
) -> LayerSpectrum:
    """Full spectral report of one weight matrix (host side, float64).

    Args:
      matrix: a 2-D array, or a kernel with a reshape rule (see ``matricize``).
      path: the layer's path (used by ``reshape="auto"`` and stored in the report).
      reshape: ``"auto"``, ``"matrix"``, ``"leading"`` or ``"trailing"``.
      rtol: numerical-rank tolerance relative to ``sigma_1``; default
        ``max(shape) * eps(input dtype)``.
      min_tail: smallest number of tail eigenvalues for a power-law fit.
      tw_level: Tracy-Widom quantile level of the spike threshold (0.90, 0.95, 0.99).
      key: if given, also run ``randomization_baseline`` with this key.

    Returns:
      ``LayerSpectrum``. Cost: one SVD ``O(N M^2)`` plus the ``O(M^2)`` power-law scan.

    Raises:
      ValueError: fewer than 2 axes, no reshape rule, non-real dtype, NaN / Inf entries.
    """
    arr = np.asarray(matrix)
    original_shape = tuple(int(d) for d in arr.shape)
    rule = _resolve_rule(reshape, path or "", original_shape)
    if not (
        np.issubdtype(arr.dtype, np.floating)
        or np.issubdtype(arr.dtype, np.integer)
        or arr.dtype == np.bool_
        or arr.dtype.name == "bfloat16"
    ):
        raise ValueError(f"matrix must be real, got dtype {arr.dtype}")
    w2 = apply_reshape_rule(arr, rule)
    if min(w2.shape) < 1:
        raise ValueError(f"matrix must have positive dimensions, got shape {w2.shape}")
    w = np.asarray(w2, dtype=np.float64)
    _check_finite(w, f"matrix '{path}'" if path else "matrix")
    if rtol is None:
        is_float = np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16"
        dtype = arr.dtype if is_float else np.float64
        rtol = _default_rtol(w.shape, jnp.dtype(dtype))
    n, m = max(w.shape), min(w.shape)
    ratio = m / n
    s = _host_svd(w)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = {k: np.asarray(v).item() for k, v in _core(s, n, m, rtol, tw_level, np).items()}
    esd = s * s / n
    positive = s > c["rank_tolerance"]
    if c["spectral_norm"] == 0:
        fit = _missing_fit("all-zero matrix", m)
    else:
        fit = fit_power_law(esd[positive], min_tail=min_tail)
    lmax = float(c["lambda_max"])
    log_lmax = math.log10(lmax) if lmax > 0 else None
    weighted = fit.alpha * log_lmax if fit.alpha is not None and log_lmax is not None else None
    decay = _decay_exponent(s[positive]) if positive.sum() >= 2 else None
    mp_ks = _mp_ks(esd, ratio, c["mp_sigma2"])
    num_spikes = int(c["num_spikes"])
    shuffled = delta = trap = None
    if key is not None:
        rb = _randomization(w, key, tw_level, s)
        shuffled, delta, trap = rb.lambda_max_shuffled, rb.delta, rb.correlation_trap
    return LayerSpectrum(
        path=path,
        original_shape=original_shape,
        shape=(int(w.shape[0]), int(w.shape[1])),
        reshape_rule=rule,
        n_rows=n,
        n_cols=m,
        aspect_ratio=n / m,
        singular_values=s,
        esd=esd,
        spectral_norm=float(c["spectral_norm"]),
        frobenius_norm=float(c["frobenius_norm"]),
        nuclear_norm=float(c["nuclear_norm"]),
        condition_number=float(c["condition_number"]),
        stable_rank=float(c["stable_rank"]),
        effective_rank=float(c["effective_rank"]),
        numerical_rank=int(c["numerical_rank"]),
        rank_tolerance=float(c["rank_tolerance"]),
        lambda_max=lmax,
        log10_lambda_max=log_lmax,
        alpha=fit.alpha,
        alpha_stderr=fit.alpha_stderr,
        xmin=fit.xmin,
        ks_distance=fit.ks_distance,
        num_tail=fit.num_tail,
        weighted_alpha=weighted,
        alpha_missing_reason=fit.missing_reason,
        decay_exponent=decay,
        mp_sigma2=float(c["mp_sigma2"]),
        mp_edge=float(c["mp_edge"]),
        mp_lower=float(c["mp_lower"]),
        mp_edge_tw=float(c["mp_edge_tw"]),
        tw_scale=float(c["tw_scale"]),
        tw_level=float(tw_level),
        num_spikes=num_spikes,
        tail_mass_fraction=float(c["tail_mass_fraction"]),
        mp_ks_distance=mp_ks,
        verdict=_verdict(fit.alpha, fit.missing_reason, num_spikes, mp_ks, m),
        lambda_max_shuffled=shuffled,
        lambda_max_delta=delta,
        correlation_trap=trap,
    )


# ----------------------------------------------------------------------------------------
# Randomisation baseline, truncation, merging
# ----------------------------------------------------------------------------------------


def _shuffle(w: np.ndarray, key: jax.Array) -> np.ndarray:
    """Element-wise shuffle of ``w`` determined by ``key``.

    128 bits drawn from ``key`` (one small compiled program for every matrix size) seed
    numpy's PCG64, which draws the permutation: same key, same permutation.
    """
    seed = np.asarray(jax.random.bits(key, (4,), jnp.uint32))
    perm = np.random.default_rng(seed).permutation(w.size)
    return w.ravel()[perm].reshape(w.shape)


def _randomization(
    w: np.ndarray, key: jax.Array, tw_level: float, s: np.ndarray | None = None
) -> RandomizationBaseline:
    n, m = max(w.shape), min(w.shape)
    shuffled = _shuffle(w, key)
    if s is None:
        s = _host_svd(w)
    s_sh = _host_svd(shuffled)
    esd_sh = s_sh * s_sh / n
    sigma2 = float(np.median(esd_sh)) / mp_median(m / n)
    edge_tw, _ = tracy_widom_edge(n, m, sigma2, tw_level)
    lmax, lmax_sh = float(s[0] ** 2 / n), float(esd_sh[0])
    return RandomizationBaseline(
        lambda_max=lmax,
        lambda_max_shuffled=lmax_sh,
        delta=lmax - lmax_sh,
        shuffled_mp_edge_tw=float(edge_tw),
        correlation_trap=bool(lmax_sh > edge_tw and lmax_sh > 0),
    )


def randomization_baseline(
    matrix: Any,
    key: jax.Array,
    *,
    reshape: str = "auto",
    path: str | None = None,
    tw_level: float = 0.99,
) -> RandomizationBaseline:
    """Compare a layer with its element-wise shuffled copy (the "correlation trap" check).

    Shuffling destroys the correlations between entries but keeps their distribution. If
    the top eigenvalue drops to the MP edge, the layer's large eigenvalues came from learned
    structure (``delta > 0``); if the shuffled copy still has a spike above its TW edge, a
    few large entries dominate the spectrum (Martin & Mahoney's correlation trap).

    Args:
      matrix: 2-D array (or kernel with a reshape rule).
      key: ``jax.random`` key of the permutation (same key, same numbers): 128 bits drawn
        from it seed numpy's PCG64, which draws the permutation on the host.
      reshape, path: as in ``layer_spectrum``.
      tw_level: Tracy-Widom quantile level (0.90, 0.95, 0.99).

    Returns:
      ``RandomizationBaseline``. Cost: two SVDs.

    Raises:
      ValueError: as ``layer_spectrum``.
    """
    arr = np.asarray(matrix)
    rule = _resolve_rule(reshape, path or "", tuple(arr.shape))
    w = np.asarray(apply_reshape_rule(arr, rule), dtype=np.float64)
    _check_finite(w, "matrix")
    return _randomization(w, key, tw_level)


def spectral_truncate(
    matrix: Any,
    *,
    rank: int | None = None,
    energy: float | None = None,
    rescale: bool = False,
    tw_level: float = 0.99,
) -> TruncationResult:
    """STAR-style spectral truncation of a 2-D matrix (compiled once per shape and options).

    Keeps the singular components selected by one rule:
    ``rank`` -> the top ``rank``; ``energy`` -> the fewest leading components whose share of
    ``||W||_F^2`` reaches ``energy``; neither -> the components whose ESD eigenvalue
    ``sigma_i^2 / N`` lies above the Tracy-Widom corrected Marchenko-Pastur edge (the noise
    bulk is dropped). With ``rescale=True`` the kept singular values are multiplied by
    ``sum(sigma) / sum(kept sigma)`` so the nuclear norm is preserved (the "rescale" of STAR,
    Lee et al. 2025).

    Args:
      matrix: ``(a, b)`` array.
      rank: number of components to keep (>= 0).
      energy: target Frobenius energy fraction in (0, 1].
      rescale: preserve the nuclear norm after truncation.
      tw_level: Tracy-Widom level of the MP rule (0.90, 0.95, 0.99).

    Returns:
      ``TruncationResult`` with the truncated ``(a, b)`` copy (same dtype).

    Raises:
      ValueError: non 2-D input, both ``rank`` and ``energy`` given, or out-of-range values.
    """
    w = jnp.asarray(matrix)
    if w.ndim != 2:
        raise ValueError(f"matrix must be 2-D, got shape {w.shape}; use matricize() first")
    if rank is not None and energy is not None:
        raise ValueError("give at most one of rank and energy")
    if rank is not None and int(rank) < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    if energy is not None and not 0.0 < float(energy) <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    _tw_quantile(tw_level)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        w = w.astype(jnp.result_type(float))
    return _truncate_jit(
        w,
        None if rank is None else int(rank),
        None if energy is None else float(energy),
        bool(rescale),
        float(tw_level),
    )


def _truncate_impl(
    w: jax.Array, rank: int | None, energy: float | None, rescale: bool, tw_level: float
) -> TruncationResult:
    n, m = max(w.shape), min(w.shape)
    u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    sq = s * s
    total = jnp.sum(sq)
    safe_total = jnp.where(total > 0, total, 1.0)
    idx = jnp.arange(m)
    if rank is not None:
        keep = idx < rank
        threshold = jnp.min(jnp.where(keep, s, jnp.inf))
    elif energy is not None:
        cum = jnp.cumsum(sq) / safe_total
        prev = jnp.concatenate([jnp.zeros((1,), cum.dtype), cum[:-1]])
        keep = (prev < energy - 1e-12) & (s > 0)
        threshold = jnp.min(jnp.where(keep, s, jnp.inf))
    else:
        c = _core(s, n, m, _default_rtol(w.shape, w.dtype), tw_level, jnp)
        edge = jnp.maximum(c["mp_edge_tw"], c["rank_tolerance"] ** 2 / n)
        keep = (sq / n > edge) & (s > 0)
        threshold = jnp.sqrt(n * edge)
    kept = jnp.where(keep, s, 0.0)
    nuc_all, nuc_kept = jnp.sum(s), jnp.sum(kept)
    if rescale:
        kept = kept * jnp.where(nuc_kept > 0, nuc_all / jnp.where(nuc_kept > 0, nuc_kept, 1.0), 0.0)
    out = (u * kept[None, :]) @ vt
    return TruncationResult(
        matrix=out.astype(w.dtype),
        rank=jnp.sum(keep),
        retained_energy=jnp.where(total > 0, jnp.sum(jnp.where(keep, sq, 0.0)) / safe_total, 1.0),
        retained_nuclear=jnp.where(
            nuc_all > 0, nuc_kept / jnp.where(nuc_all > 0, nuc_all, 1.0), 1.0
        ),
        threshold=threshold,
    )


_truncate_jit = jax.jit(_truncate_impl, static_argnums=(1, 2, 3, 4))


def _erank_np(s: np.ndarray) -> float:
    tot = s.sum()
    if tot <= 0:
        return 0.0
    p = s[s > 0] / tot
    return float(np.exp(-np.sum(p * np.log(p))))


def _overlap(ua: np.ndarray, ub: np.ndarray, k: int) -> float:
    return float(np.sum((ua[:, :k].T @ ub[:, :k]) ** 2) / k)


def spectral_merge(
    a: Any,
    b: Any,
    *,
    t: float = 0.5,
    base: Any | None = None,
    rank: int | None = None,
    energy: float | None = None,
    tw_level: float = 0.99,
) -> MergeResult:
    """Spectrum-aware merge of two layers (same shape), by one of two documented rules.

    * ``base is None`` -- "spectrum_interpolation": take the singular vectors of the linear
      interpolation ``L = (1 - t) a + t b = U diag(s_L) V^T`` and replace its spectrum by the
      interpolated spectra, ``merged = U diag((1 - t) s_a + t s_b) V^T`` (both spectra sorted
      in descending order). Averaging misaligned matrices shrinks singular values; this
      keeps the merged layer's scale at the interpolated scale. When ``a`` and ``b`` share
      singular vectors, it equals the linear interpolation.
    * ``base`` given -- "task_vectors": ``tau_a = a - base`` and ``tau_b = b - base`` are each
      truncated with ``spectral_truncate(..., rescale=True)`` (STAR: keep the top ``rank``
      components, or an ``energy`` fraction, or by default those above the MP edge, then
      restore the nuclear norm) and ``merged = base + (1 - t) tau_a' + t tau_b'``.

    Args:
      a, b: ``(p, q)`` matrices.
      t: interpolation weight of ``b`` in [0, 1].
      base: optional common ancestor, ``(p, q)``.
      rank, energy, tw_level: truncation of the task vectors (as ``spectral_truncate``).

    Returns:
      ``MergeResult`` (merged matrix in the dtype of ``a``, diagnostics as floats).

    Raises:
      ValueError: shape mismatch, non 2-D inputs, ``t`` outside [0, 1], non-finite entries.
    """
    dtype = jnp.asarray(a).dtype
    wa, wb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if wa.ndim != 2 or wb.ndim != 2:
        raise ValueError(f"a and b must be 2-D, got shapes {wa.shape} and {wb.shape}")
    if wa.shape != wb.shape:
        raise ValueError(f"a and b must have the same shape, got {wa.shape} and {wb.shape}")
    if not 0.0 <= float(t) <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    _check_finite(wa, "a")
    _check_finite(wb, "b")
    if base is None:
        rule = "spectrum_interpolation"
        xa, xb = wa, wb
        u, _, vt = np.linalg.svd((1.0 - t) * wa + t * wb, full_matrices=False)
        sa = np.linalg.svd(wa, compute_uv=False)
        sb = np.linalg.svd(wb, compute_uv=False)
        merged = (u * ((1.0 - t) * sa + t * sb)[None, :]) @ vt
        ea = eb = 1.0
    else:
        wbase = np.asarray(base, dtype=np.float64)
        if wbase.shape != wa.shape:
            raise ValueError(f"base must have shape {wa.shape}, got {wbase.shape}")
        _check_finite(wbase, "base")
        rule = "task_vectors"
        xa, xb = wa - wbase, wb - wbase
        ta = spectral_truncate(xa, rank=rank, energy=energy, rescale=True, tw_level=tw_level)
        tb = spectral_truncate(xb, rank=rank, energy=energy, rescale=True, tw_level=tw_level)
        merged = wbase + (1.0 - t) * np.asarray(ta.matrix) + t * np.asarray(tb.matrix)
        ea, eb = float(ta.retained_energy), float(tb.retained_energy)
    ua, sa_np, _ = np.linalg.svd(xa, full_matrices=False)
    ub, sb_np, _ = np.linalg.svd(xb, full_matrices=False)
    era, erb = _erank_np(sa_np), _erank_np(sb_np)
    k = max(1, int(round(min(era, erb))))
    return MergeResult(
        matrix=jnp.asarray(merged, dtype=dtype),
        rule=rule,
        effective_rank_a=era,
        effective_rank_b=erb,
        subspace_overlap=_overlap(ua, ub, k),
        retained_energy_a=ea,
        retained_energy_b=eb,
    )


# ----------------------------------------------------------------------------------------
# Whole model
# ----------------------------------------------------------------------------------------


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def _slope(ys: list[float | None]) -> float | None:
    pts = [(i, y) for i, y in enumerate(ys) if y is not None and math.isfinite(y)]
    if len(pts) < 2:
        return None
    x = np.array([p[0] for p in pts], dtype=np.float64)
    y = np.array([p[1] for p in pts], dtype=np.float64)
    xc = x - x.mean()
    return float(np.dot(xc, y - y.mean()) / np.dot(xc, xc))


@dataclasses.dataclass(frozen=True, eq=False)
class WeightSpectraReport(Mapping):
    """Mapping ``layer_path -> LayerSpectrum`` (in depth order), plus skipped leaves.

    Attributes:
      layers: the analysed layers, ordered by a natural sort of their paths.
      skipped: ``path -> reason`` for every leaf that was not analysed (biases, scales,
        arrays without a reshape rule, non-finite or non-float arrays).
    """

    layers: dict[str, LayerSpectrum]
    skipped: dict[str, str]

    def __getitem__(self, key: str) -> LayerSpectrum:
        return self.layers[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def summary(self) -> ModelSummary:
        """Model-level means, verdict counts and layer-wise trends (per-head views excluded)."""
        ls = [x for x in self.layers.values() if not x.reshape_rule.startswith("head_")]
        alphas = [x.alpha for x in ls if x.alpha is not None]
        weighted = [x.weighted_alpha for x in ls if x.weighted_alpha is not None]
        loglam = [x.log10_lambda_max for x in ls if x.log10_lambda_max is not None]
        counts: dict[str, int] = {}
        for x in ls:
            head = x.verdict.split(" (")[0]
            counts[head] = counts.get(head, 0) + 1
        return ModelSummary(
            num_layers=len(ls),
            num_skipped=len(self.skipped),
            num_alpha_missing=sum(x.alpha is None for x in ls),
            mean_alpha=_mean(alphas),
            median_alpha=float(np.median(alphas)) if alphas else None,
            weighted_alpha=_mean(weighted),
            mean_log10_lambda_max=_mean(loglam),
            mean_stable_rank=_mean([x.stable_rank for x in ls]),
            mean_effective_rank=_mean([x.effective_rank for x in ls]),
            total_spikes=sum(x.num_spikes for x in ls),
            verdict_counts=counts,
            trends={
                "alpha": _slope([x.alpha for x in ls]),
                "weighted_alpha": _slope([x.weighted_alpha for x in ls]),
                "effective_rank": _slope([x.effective_rank for x in ls]),
                "stable_rank": _slope([x.stable_rank for x in ls]),
                "log10_lambda_max": _slope([x.log10_lambda_max for x in ls]),
            },
        )

    def to_dict(self, include_arrays: bool = False) -> dict[str, Any]:
        """JSON-safe dict ``{"layers": {...}, "skipped": {...}, "summary": {...}}``.

        Args:
          include_arrays: also store every layer's singular values and ESD.
        """
        return {
            "layers": {p: x.to_dict(include_arrays) for p, x in self.layers.items()},
            "skipped": dict(self.skipped),
            "summary": jsonable(self.summary._asdict()),
        }

    def to_json(self, include_arrays: bool = False, indent: int | None = 2) -> str:
        """The report as a JSON string (NaN / Inf written as null)."""
        return json.dumps(self.to_dict(include_arrays), indent=indent)

    _COLUMNS = (
        "layer",
        "shape",
        "alpha",
        "w.alpha",
        "KS",
        "tail",
        "spec.norm",
        "stable r",
        "eff. r",
        "num r",
        "spikes",
        "verdict",
    )

    def _rows(self) -> list[tuple[str, ...]]:
        f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
        rows = []
        for p, x in self.layers.items():
            rows.append(
                (
                    p,
                    f"{x.shape[0]}x{x.shape[1]}",
                    f(x.alpha),
                    f(x.weighted_alpha),
                    f(x.ks_distance, 3),
                    str(x.num_tail),
                    f"{x.spectral_norm:.3g}",
                    f(x.stable_rank),
                    f(x.effective_rank),
                    str(x.numerical_rank),
                    str(x.num_spikes),
                    x.verdict.split(" (")[0],
                )
            )
        return rows

    def _summary_line(self) -> str:
        s = self.summary
        f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        return (
            f"{s.num_layers} layers, {s.num_skipped} skipped; mean alpha {f(s.mean_alpha)}, "
            f"weighted alpha {f(s.weighted_alpha)}, mean eff. rank "
            f"{f(s.mean_effective_rank)}, alpha trend/layer {f(s.trends['alpha'])}"
        )

    def to_text(self) -> str:
        """Plain-text table of the layers, skipped leaves and the summary."""
        rows = [self._COLUMNS] + self._rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(self._COLUMNS))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        notable = {
            p: r
            for p, r in self.skipped.items()
            if "bias / normalisation" not in r and "1-D array" not in r and "0-D array" not in r
        }
        vectors = len(self.skipped) - len(notable)
        if vectors:
            lines.append(f"skipped {vectors} bias / scale / vector leaves")
        for p, r in notable.items():
            lines.append(f"skipped {p}: {r}")
        lines.append(self._summary_line())
        return "\n".join(lines)

    def to_table(self, plain: bool = False) -> Any:
        """A ``rich.table.Table`` (or the plain-text table when ``plain`` or rich is absent)."""
        if plain:
            return self.to_text()
        try:
            from rich.table import Table
        except ImportError:  # pragma: no cover - rich is a dependency
            return self.to_text()
        table = Table(title="weight spectra", caption=self._summary_line())
        for c in self._COLUMNS:
            table.add_column(c, justify="left" if c in ("layer", "verdict") else "right")
        for r in self._rows():
            table.add_row(*r)
        return table

    def __str__(self) -> str:
        return self.to_text()


def _as_state(params: PyTree) -> PyTree:
    """An ``nnx.Module`` becomes its ``nnx.Param`` state; anything else is returned as is."""
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover
        return params
    if isinstance(params, nnx.Module):
        return nnx.state(params, nnx.Param)
    return params


def weight_spectra(
    params: PyTree,
    filter: Callable[[str, Any], bool] | None = None,  # noqa: A002 - fixed public name
    *,
    reshape: Callable[[str, Any], Any] | None = None,
    per_head: bool = False,
    key: jax.Array | None = None,
    rtol: float | None = None,
    min_tail: int = 10,
    tw_level: float = 0.99,
) -> WeightSpectraReport:
    """Spectral report of every weight matrix of a Flax model (NNX or Linen).

    Leaves are found with ``jax.tree_util.tree_flatten_with_path`` and named by their
    ``"/"``-joined path (NNX's trailing ``.value`` dropped), e.g. ``"params/Dense_0/kernel"``
    (Linen) or ``"blocks/0/attn/query/kernel"`` (``nnx.state(model, nnx.Param)``). Kernels are
    reshaped by the ``"auto"`` rule of the module docstring.

    Args:
      params: Linen params dict, ``nnx.State`` or an ``nnx.Module`` (its ``nnx.Param`` state).
      filter: predicate ``(path, leaf) -> bool``; leaves where it is False are ignored.
      reshape: optional ``(path, leaf) -> 2-D array | None`` overriding the auto rule; None
        falls back to the auto rule.
      per_head: also report every head of 3-D attention kernels as ``path/head_<h>``
        (``reshape_rule`` ``"head_in"`` / ``"head_out"``; left out of ``report.summary``).
      key: if given, run the randomisation baseline per layer (key folded with the index).
      rtol, min_tail, tw_level: as in ``layer_spectrum``.

    Returns:
      ``WeightSpectraReport``. Never raises for a bad leaf: it lands in ``report.skipped``.

    Example::

        rep = gj.weight_spectra(nnx.state(model, nnx.Param))
        rep["blocks/0/mlp/kernel"].alpha        # one layer
        rep.summary.mean_alpha, rep.summary.trends["effective_rank"]
        rich.print(rep.to_table()); open("spectra.json", "w").write(rep.to_json())

    Raises:
      ValueError: if ``params`` has no leaves or an argument is invalid.
    """
    _tw_quantile(tw_level)
    flat = jax.tree_util.tree_flatten_with_path(_as_state(params))[0]
    if not flat:
        raise ValueError("params is an empty pytree: there are no weight matrices")
    layers: dict[str, LayerSpectrum] = {}
    skipped: dict[str, str] = {}
    index = 0
    for kp, leaf in flat:
        p = path_str(kp)
        if filter is not None and not filter(p, leaf):
            continue
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            skipped[p] = f"not a floating-point array ({type(leaf).__name__}, dtype {dtype})"
            continue
        shape = tuple(np.shape(leaf))
        mats: list[tuple[str, Any, str]] = []
        custom = reshape(p, leaf) if reshape is not None else None
        if custom is not None:
            if np.ndim(custom) != 2:
                skipped[p] = f"reshape returned shape {np.shape(custom)}, not a 2-D matrix"
                continue
            mats.append((p, custom, "custom"))
        else:
            rule, reason = reshape_rule_for(p, shape)
            if rule is None:
                skipped[p] = reason
                continue
            mats.append((p, apply_reshape_rule(np.asarray(leaf), rule), rule))
            parts = p.split("/")
            if per_head and len(shape) == 3 and parts[-1] == "kernel" and len(parts) >= 2:
                kind = "in" if parts[-2] in _ATTN_IN else "out" if parts[-2] in _ATTN_OUT else None
                if kind is not None:
                    heads = np.asarray(head_matrices(leaf, kind=kind))
                    mats.extend(
                        (f"{p}/head_{h}", heads[h], f"head_{kind}") for h in range(heads.shape[0])
                    )
        for name, mat, rule in mats:
            try:
                rep = layer_spectrum(
                    mat,
                    path=name,
                    reshape="matrix",
                    rtol=rtol,
                    min_tail=min_tail,
                    tw_level=tw_level,
                    key=None if key is None else jax.random.fold_in(key, index),
                )
            except ValueError as e:
                skipped[name] = str(e)
                continue
            finally:
                index += 1
            layers[name] = dataclasses.replace(rep, original_shape=shape, reshape_rule=rule)
    order = sorted(layers, key=_natural_key)
    return WeightSpectraReport(layers={p: layers[p] for p in order}, skipped=skipped)
