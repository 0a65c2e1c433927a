"""Spectral surgery on weight matrices: STAR truncation and spectrum-aware merging.

* :func:`spectral_truncate` keeps the singular components selected by a rank, an energy
  fraction or (default) the Tracy-Widom corrected Marchenko-Pastur edge, optionally
  restoring the nuclear norm (STAR, Lee et al., NAACL 2025); jittable core, compiled once
  per shape and options.
* :func:`spectral_merge` interpolates two layers with their spectra interpolated, or merges
  their truncated task vectors over a common base.

Supported names: ``TruncationResult``, ``spectral_truncate``, ``MergeResult``,
``spectral_merge``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax._validate import ArgumentTypeError, check_int, check_real
from gradience_jax.weights.metrics import core_metrics, default_rtol, effective_rank
from gradience_jax.weights.random_matrix import tw_quantile
from gradience_jax.weights.reshape import check_finite

__all__ = ["MergeResult", "TruncationResult", "spectral_merge", "spectral_truncate"]


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
      ArgumentTypeError: a non-real ``matrix`` or an argument of the wrong kind.
      ValueError: non 2-D or empty input, NaN / Inf entries (called eagerly), both ``rank``
        and ``energy`` given, ``rank`` outside ``[0, min(shape)]``, ``energy`` outside
        (0, 1], an untabulated ``tw_level``.
    """
    w = jnp.asarray(matrix)
    if not (jnp.issubdtype(w.dtype, jnp.floating) or jnp.issubdtype(w.dtype, jnp.integer)
            or w.dtype == jnp.bool_):
        raise ArgumentTypeError(f"matrix must be real, got dtype {w.dtype}")
    if w.ndim != 2:
        raise ValueError(f"matrix must be 2-D, got shape {w.shape}; use matricize() first")
    if min(w.shape) < 1:
        raise ValueError(f"matrix must have positive dimensions, got shape {w.shape}")
    if rank is not None and energy is not None:
        raise ValueError("give at most one of rank and energy")
    if rank is not None:
        rank = check_int(rank, "rank", lo=0, hi=min(w.shape))
    if energy is not None:
        energy = check_real(energy, "energy", lo=0.0, lo_open=True, hi=1.0)
    tw_quantile(tw_level)
    check_finite(w, "matrix")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        w = w.astype(jnp.result_type(float))
    return _truncate_jit(w, rank, energy, bool(rescale), float(tw_level))


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
        c = core_metrics(s, n, m, default_rtol(w.shape, w.dtype), tw_level, jnp)
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


def _real(x: Any, name: str) -> np.ndarray:
    """``x`` as a float64 host array; non-real input is refused."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiub" and arr.dtype.name != "bfloat16":
        raise ArgumentTypeError(f"{name} must be a real array, got dtype {arr.dtype}")
    return np.asarray(arr, dtype=np.float64)


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
      a: the first ``(p, q)`` matrix.
      b: the second ``(p, q)`` matrix.
      t: interpolation weight of ``b`` in [0, 1].
      base: optional common ancestor, ``(p, q)``.
      rank: components kept per task vector (>= 0), as in ``spectral_truncate``.
      energy: Frobenius energy fraction kept per task vector in (0, 1], as in
        ``spectral_truncate``.
      tw_level: Tracy-Widom level of the default MP rule (0.90, 0.95, 0.99), as in
        ``spectral_truncate``.

    Returns:
      ``MergeResult`` (merged matrix in the dtype of ``a``, diagnostics as floats).

    Raises:
      ArgumentTypeError: an argument of the wrong kind (e.g. a string ``t``).
      ValueError: shape mismatch, non 2-D or empty inputs, ``t`` outside [0, 1], non-finite
        entries, bad ``rank`` / ``energy`` / ``tw_level`` (as ``spectral_truncate``).
    """
    t = check_real(t, "t", lo=0.0, hi=1.0)
    tw_quantile(tw_level)
    if rank is not None and energy is not None:
        raise ValueError("give at most one of rank and energy")
    dtype = jnp.asarray(a).dtype
    wa, wb = _real(a, "a"), _real(b, "b")
    if wa.ndim != 2 or wb.ndim != 2:
        raise ValueError(f"a and b must be 2-D, got shapes {wa.shape} and {wb.shape}")
    if wa.shape != wb.shape:
        raise ValueError(f"a and b must have the same shape, got {wa.shape} and {wb.shape}")
    if min(wa.shape) < 1:
        raise ValueError(f"a and b must have positive dimensions, got shape {wa.shape}")
    check_finite(wa, "a")
    check_finite(wb, "b")
    if base is None:
        rule = "spectrum_interpolation"
        xa, xb = wa, wb
        u, _, vt = np.linalg.svd((1.0 - t) * wa + t * wb, full_matrices=False)
        sa = np.linalg.svd(wa, compute_uv=False)
        sb = np.linalg.svd(wb, compute_uv=False)
        merged = (u * ((1.0 - t) * sa + t * sb)[None, :]) @ vt
        ea = eb = 1.0
    else:
        wbase = _real(base, "base")
        if wbase.shape != wa.shape:
            raise ValueError(f"base must have shape {wa.shape}, got {wbase.shape}")
        check_finite(wbase, "base")
        rule = "task_vectors"
        xa, xb = wa - wbase, wb - wbase
        ta = spectral_truncate(xa, rank=rank, energy=energy, rescale=True, tw_level=tw_level)
        tb = spectral_truncate(xb, rank=rank, energy=energy, rescale=True, tw_level=tw_level)
        merged = wbase + (1.0 - t) * np.asarray(ta.matrix) + t * np.asarray(tb.matrix)
        ea, eb = float(ta.retained_energy), float(tb.retained_energy)
    ua, sa_np, _ = np.linalg.svd(xa, full_matrices=False)
    ub, sb_np, _ = np.linalg.svd(xb, full_matrices=False)
    era = float(effective_rank(sa_np, xp=np))
    erb = float(effective_rank(sb_np, xp=np))
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
