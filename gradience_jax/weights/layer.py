"""The full spectral report of one weight matrix: ``layer_spectrum`` and ``LayerSpectrum``.

Host side, float64: one SVD, the metrics of :mod:`gradience_jax.weights.metrics`, the ESD
tail fit and singular-value decay of :mod:`gradience_jax.weights.power_law`, the
Marchenko-Pastur fit of :mod:`gradience_jax.weights.random_matrix` and, with a key, the
randomization baseline. Eigenvalues above the TW-corrected MP edge are *spikes* and
``tail_mass_fraction`` is their share of ``sum lambda_i``.

Two ESD conventions: this package's ESD (``esd``, ``lambda_max``, ``log10_lambda_max``, the
MP and TW fields) is the eigenvalues of ``W^T W / N``; WeightWatcher's is the eigenvalues
``sigma_i^2`` of ``W^T W`` (no ``1 / N``). The power-law ``alpha`` is the same in both
(the fit is scale invariant; ``xmin`` scales by ``N``). The weighted alpha follows
WeightWatcher:

* ``weighted_alpha = alpha * log10(sigma_1^2)``, WeightWatcher's ``alpha_weighted``
  (``alpha * log10(lambda_max)`` in its convention);
* ``weighted_alpha_normalized = alpha * log10(sigma_1^2 / N) = alpha * log10(lambda_max)``
  on this package's ESD, ``= weighted_alpha - alpha * log10(N)`` (WeightWatcher's value
  with ``normalize=True``). It is negative whenever ``lambda_max < 1``, as for most
  trained layers, so compare it only between layers of the same ``N``.

Verdict (heuristics, not theorems; the ranges are those used with WeightWatcher):
``alpha < 2`` "very heavy-tailed" (possible over-fit / over-regularisation),
``2 <= alpha <= 6`` "typical trained", ``alpha > 6`` "random-like". A layer whose ESD is
consistent with MP (no spike above the TW edge and MP KS distance at most
``mp_ks_threshold(M) = max(0.1, 1.36 / sqrt(M))``) is also called random-like, whatever the
fitted alpha: without a tail a power-law exponent means nothing. When alpha cannot be
fitted the verdict is "undetermined (<reason>)".

Bad input: ``layer_spectrum`` raises ``ValueError`` for arrays with fewer than 2 axes, with
more than 2 axes and no reshape rule, an empty axis, NaN / Inf entries, ``rtol`` outside
[0, 1), ``min_tail < 2`` and an untabulated ``tw_level``; ``ArgumentTypeError`` (a
``TypeError`` and ``ValueError``) for non-real dtypes and arguments of the wrong kind. An all-zero
matrix has all norms and ranks 0, ``condition_number`` NaN, and ``alpha`` missing with a
reason; a matrix with fewer than ``min_tail`` positive eigenvalues gets ``alpha = None``
with ``alpha_missing_reason`` set.

Supported names: ``LayerSpectrum``, ``layer_spectrum``, ``ALPHA_HEAVY``, ``ALPHA_RANDOM``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax._json import jsonable
from gradience_jax._validate import ArgumentTypeError, check_int, check_key
from gradience_jax.weights.metrics import check_rtol, core_metrics, default_rtol
from gradience_jax.weights.power_law import decay_exponent, fit_power_law, missing_fit
from gradience_jax.weights.random_matrix import mp_ks_distance, mp_ks_threshold, tw_quantile
from gradience_jax.weights.randomization import randomization_baseline
from gradience_jax.weights.reshape import apply_reshape_rule, check_finite, resolve_rule

__all__ = ["ALPHA_HEAVY", "ALPHA_RANDOM", "LayerSpectrum", "layer_spectrum"]

ALPHA_HEAVY = 2.0
"""Below this ESD tail exponent a layer is "very heavy-tailed"."""
ALPHA_RANDOM = 6.0
"""Above this ESD tail exponent a layer is "random-like"."""

_ARRAY_FIELDS = ("singular_values", "esd")


@dataclasses.dataclass(frozen=True, eq=False)
class LayerSpectrum:
    """Spectral report of one weight matrix.

    Definitions are in :mod:`gradience_jax.weights.metrics` and this module's docstring.
    Arrays: ``singular_values`` ``(M,)`` and ``esd`` ``(M,)`` (eigenvalues of
    ``W^T W / N``), both in descending order, float64 numpy. ``weighted_alpha`` is
    WeightWatcher's ``alpha_weighted`` (``alpha * log10(sigma_1^2)``);
    ``weighted_alpha_normalized`` is ``alpha * log10(lambda_max)`` on the ``W^T W / N`` ESD.
    Optional fields are None when undefined; ``alpha_missing_reason`` explains a missing
    power-law fit and the ``*_shuffled`` / ``correlation_trap`` fields are filled only when
    a key is given.
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
    weighted_alpha_normalized: float | None
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

        Returns:
          ``{field: value}`` for every field.
        """
        out = {}
        for f in dataclasses.fields(self):
            if f.name in _ARRAY_FIELDS and not include_arrays:
                continue
            out[f.name] = jsonable(getattr(self, f.name))
        return out

    def to_json(self, include_arrays: bool = True, indent: int | None = None) -> str:
        """``json.dumps(self.to_dict(include_arrays))``.

        Args:
          include_arrays: include ``singular_values`` and ``esd`` as lists.
          indent: ``json.dumps`` indentation (None: one line).

        Returns:
          The JSON text.
        """
        return json.dumps(self.to_dict(include_arrays), indent=indent)


def _verdict(
    alpha: float | None, reason: str | None, num_spikes: int, mp_ks: float | None, num_eigs: int
) -> str:
    """The heuristic verdict of the module docstring, as a string."""
    if alpha is None:
        return f"undetermined ({reason})"
    if num_spikes == 0 and mp_ks is not None and mp_ks <= mp_ks_threshold(num_eigs):
        return "random-like (ESD fits Marchenko-Pastur, no spikes)"
    if alpha < ALPHA_HEAVY:
        return "very heavy-tailed (alpha < 2: possible over-fit)"
    if alpha <= ALPHA_RANDOM:
        return "typical trained (2 <= alpha <= 6)"
    return "random-like (alpha > 6)"


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
      rtol: numerical-rank tolerance relative to ``sigma_1``, in [0, 1); default
        ``max(shape) * eps(input dtype)``.
      min_tail: smallest number of tail eigenvalues for a power-law fit (``>= 2``).
      tw_level: Tracy-Widom quantile level of the spike threshold (0.90, 0.95, 0.99).
      key: if given, also run ``randomization_baseline`` with this key.

    Returns:
      ``LayerSpectrum``. Cost: one SVD ``O(N M^2)`` plus the ``O(M^2)`` power-law scan.

    Raises:
      ArgumentTypeError: non-real dtype, or an argument of the wrong kind.
      ValueError: fewer than 2 axes, no reshape rule, an empty axis, NaN / Inf entries,
        ``rtol`` outside [0, 1), ``min_tail < 2``, an untabulated ``tw_level``, a batch of
        keys.
    """
    rtol = None if rtol is None else check_rtol(rtol)
    min_tail = check_int(min_tail, "min_tail", lo=2)
    tw_quantile(tw_level)
    tw_level = float(tw_level)
    if key is not None:
        key = check_key(key, "key")
    if path is not None and not isinstance(path, str):
        raise ArgumentTypeError(f"path must be a string or None, got {type(path).__name__}")
    arr = np.asarray(matrix)
    if not (
        np.issubdtype(arr.dtype, np.floating)
        or np.issubdtype(arr.dtype, np.integer)
        or arr.dtype == np.bool_
        or arr.dtype.name == "bfloat16"
    ):
        raise ArgumentTypeError(f"matrix must be real, got dtype {arr.dtype}")
    original_shape = tuple(int(d) for d in arr.shape)
    rule = resolve_rule(reshape, path or "", original_shape)
    w2 = apply_reshape_rule(arr, rule)
    if min(w2.shape) < 1:
        raise ValueError(f"matrix must have positive dimensions, got shape {w2.shape}")
    w = np.asarray(w2, dtype=np.float64)
    check_finite(w, f"matrix '{path}'" if path else "matrix")
    if rtol is None:
        is_float = np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16"
        dtype = arr.dtype if is_float else np.float64
        rtol = default_rtol(w.shape, jnp.dtype(dtype))
    n, m = max(w.shape), min(w.shape)
    ratio = m / n
    s = np.linalg.svd(w, compute_uv=False)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = {k: np.asarray(v).item() for k, v in core_metrics(s, n, m, rtol, tw_level, np).items()}
    esd = s * s / n
    positive = s > c["rank_tolerance"]
    if c["spectral_norm"] == 0:
        fit = missing_fit("all-zero matrix", m)
    else:
        fit = fit_power_law(esd[positive], min_tail=min_tail)
    lmax = float(c["lambda_max"])
    log_lmax = math.log10(lmax) if lmax > 0 else None
    weighted = weighted_norm = None
    if fit.alpha is not None and log_lmax is not None:
        weighted = fit.alpha * 2.0 * math.log10(float(s[0]))  # log10(sigma_1^2): WeightWatcher
        weighted_norm = fit.alpha * log_lmax
    decay = decay_exponent(s[positive]) if positive.sum() >= 2 else None
    mp_ks = mp_ks_distance(esd, ratio, c["mp_sigma2"])
    num_spikes = int(c["num_spikes"])
    shuffled = delta = trap = None
    if key is not None:
        rb = randomization_baseline(w, key, reshape="matrix", tw_level=tw_level,
                                    singular_values=s)
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
        weighted_alpha_normalized=weighted_norm,
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
