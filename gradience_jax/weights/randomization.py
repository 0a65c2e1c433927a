"""The randomization baseline of a layer: its spectrum against an element-wise shuffle.

Shuffling the entries of ``W`` destroys the correlations between them but keeps their
distribution. If the top ESD eigenvalue drops to the Marchenko-Pastur edge, the layer's
large eigenvalues came from learned structure; if the shuffled copy still has a spike above
its Tracy-Widom corrected edge, a few very large entries dominate the spectrum (Martin &
Mahoney's "correlation trap").

Supported names: ``RandomizationBaseline``, ``randomization_baseline``.

Reference: Martin & Mahoney, JMLR 22 (2021).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax._validate import ArgumentTypeError, check_key
from gradience_jax.weights.random_matrix import mp_median, tracy_widom_edge, tw_quantile
from gradience_jax.weights.reshape import apply_reshape_rule, check_finite, resolve_rule

__all__ = ["RandomizationBaseline", "randomization_baseline"]


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


def _shuffle(w: np.ndarray, key: jax.Array) -> np.ndarray:
    """Element-wise shuffle of ``w`` determined by ``key``.

    128 bits drawn from ``key`` (one small compiled program for every matrix size) seed
    numpy's PCG64, which draws the permutation: same key, same permutation.
    """
    seed = np.asarray(jax.random.bits(key, (4,), jnp.uint32))
    perm = np.random.default_rng(seed).permutation(w.size)
    return w.ravel()[perm].reshape(w.shape)


def randomization_baseline(
    matrix: Any,
    key: jax.Array,
    *,
    reshape: str = "auto",
    path: str | None = None,
    tw_level: float = 0.99,
    singular_values: np.ndarray | None = None,
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
      reshape: ``"auto"``, ``"matrix"``, ``"leading"`` or ``"trailing"``, as in
        ``layer_spectrum``.
      path: the layer's path (used by ``reshape="auto"``), as in ``layer_spectrum``.
      tw_level: Tracy-Widom quantile level (0.90, 0.95, 0.99).
      singular_values: the matrix's singular values (descending) when already known, as
        in ``layer_spectrum``; saves one SVD.

    Returns:
      ``RandomizationBaseline``. Cost: two SVDs (one with ``singular_values``).

    Raises:
      ArgumentTypeError: ``key`` is not a PRNG key, a non-real ``matrix``.
      ValueError: as ``layer_spectrum``; an untabulated ``tw_level``; ``singular_values``
        not of length ``min(shape)``.
    """
    key = check_key(key, "key", default=False)
    tw_quantile(tw_level)
    arr = np.asarray(matrix)
    if arr.dtype.kind not in "fiub" and arr.dtype.name != "bfloat16":
        raise ArgumentTypeError(f"matrix must be real, got dtype {arr.dtype}")
    rule = resolve_rule(reshape, path or "", tuple(arr.shape))
    w = np.asarray(apply_reshape_rule(arr, rule), dtype=np.float64)
    if min(w.shape) < 1:
        raise ValueError(f"matrix must have positive dimensions, got shape {w.shape}")
    check_finite(w, "matrix")
    n, m = max(w.shape), min(w.shape)
    shuffled = _shuffle(w, key)
    if singular_values is None:
        s = np.linalg.svd(w, compute_uv=False)
    else:
        s = np.asarray(singular_values, dtype=np.float64)
        if s.shape != (m,):
            raise ValueError(f"singular_values must have shape ({m},) for a matrix of shape "
                             f"{w.shape}, got {s.shape}")
    s_sh = np.linalg.svd(shuffled, compute_uv=False)
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
