"""Spectral analysis of weight matrices: norms, ranks, power-law tails, Marchenko-Pastur.

Every weight matrix ``W`` is analysed through its singular values
``sigma_1 >= ... >= sigma_M`` and its empirical spectral density (ESD), the eigenvalues of
``X = W^T W / N`` where ``N >= M`` are the larger and smaller dimensions of ``W`` (the
matrix is transposed when needed, so the ESD has ``M = min(shape)`` eigenvalues
``lambda_i = sigma_i^2 / N``). This is the normalisation of Martin & Mahoney (2021) and of
the Marchenko-Pastur law; the WeightWatcher package (0.7.x, default settings) takes the
eigenvalues ``sigma_i^2`` of ``W^T W`` instead. The power-law ``alpha`` does not depend on
the convention; ``weighted_alpha = alpha * log10(sigma_1^2)`` is WeightWatcher's
``alpha_weighted``, and ``weighted_alpha_normalized = alpha * log10(lambda_max)`` the same
on this package's ESD (see :mod:`~gradience_jax.weights.layer`). Numerics only: NumPy and
JAX, no matplotlib (figures are in the plotting layer), no training.

One idea per module; every name below is supported and importable from here:

* :mod:`~gradience_jax.weights.metrics`: the jittable per-matrix metrics
  (``matrix_metrics``, ``MatrixMetrics``) and ``effective_rank``, the package's one
  entropy-rank implementation (definitions of norms and ranks there);
* :mod:`~gradience_jax.weights.layer`: the float64 host report of one matrix
  (``layer_spectrum``, ``LayerSpectrum``) and its verdict (``ALPHA_HEAVY``,
  ``ALPHA_RANDOM``);
* :mod:`~gradience_jax.weights.power_law`: the ESD tail fit ``p(lambda) ~ lambda^-alpha``
  (``fit_power_law``, ``PowerLawFit``; Clauset, Shalizi & Newman) and the singular-value
  decay exponent;
* :mod:`~gradience_jax.weights.random_matrix`: Marchenko-Pastur pdf / cdf / median,
  the Tracy-Widom edge, the MP KS threshold;
* :mod:`~gradience_jax.weights.reshape`: reshape rules of kernels (``matricize``,
  ``reshape_rule_for``, ``apply_reshape_rule``) and per-head views (``head_matrices``);
* :mod:`~gradience_jax.weights.randomization`: the element-wise shuffle baseline (the
  "correlation trap" check, ``randomization_baseline``);
* :mod:`~gradience_jax.weights.surgery`: ``spectral_truncate`` (STAR-style truncation at
  the MP edge) and ``spectral_merge`` (spectrum-aware interpolation of two layers or of
  their task vectors);
* :mod:`~gradience_jax.weights.report`: the whole model (``weight_spectra``,
  ``WeightSpectraReport``, ``ModelSummary``);
* :mod:`~gradience_jax.weights.files`: checkpoint files: ``.safetensors`` single or
  sharded (``load_safetensors``, ``safetensors_files``, ``weight_spectra_from_file``,
  ``file_reshape``) and LoRA factor pairs (``lora_pairs``, ``lora_deltas``).

References: Martin & Mahoney, JMLR 22 (2021); Clauset, Shalizi & Newman, SIAM Review 51
(2009); Roy & Vetterli, EUSIPCO (2007); Marchenko & Pastur (1967); Johnstone, Ann. Stat. 29
(2001); Gavish & Donoho, IEEE Trans. Inf. Theory 60 (2014); Baik, Ben Arous & Peche (2005);
STAR: Lee et al., NAACL (2025).
"""

from gradience_jax.weights.files import (
    file_reshape,
    load_safetensors,
    lora_deltas,
    lora_pairs,
    safetensors_files,
    weight_spectra_from_file,
)
from gradience_jax.weights.layer import ALPHA_HEAVY, ALPHA_RANDOM, LayerSpectrum, layer_spectrum
from gradience_jax.weights.metrics import MatrixMetrics, effective_rank, matrix_metrics
from gradience_jax.weights.power_law import PowerLawFit, fit_power_law
from gradience_jax.weights.random_matrix import (
    MP_KS_RANDOM,
    TW1_QUANTILES,
    marchenko_pastur_cdf,
    marchenko_pastur_pdf,
    mp_ks_threshold,
    mp_median,
    tracy_widom_edge,
)
from gradience_jax.weights.randomization import RandomizationBaseline, randomization_baseline
from gradience_jax.weights.report import ModelSummary, WeightSpectraReport, weight_spectra
from gradience_jax.weights.reshape import (
    RULES,
    apply_reshape_rule,
    head_matrices,
    matricize,
    reshape_rule_for,
)
from gradience_jax.weights.surgery import (
    MergeResult,
    TruncationResult,
    spectral_merge,
    spectral_truncate,
)

__all__ = [
    "ALPHA_HEAVY",
    "ALPHA_RANDOM",
    "MP_KS_RANDOM",
    "RULES",
    "TW1_QUANTILES",
    "LayerSpectrum",
    "MatrixMetrics",
    "MergeResult",
    "ModelSummary",
    "PowerLawFit",
    "RandomizationBaseline",
    "TruncationResult",
    "WeightSpectraReport",
    "apply_reshape_rule",
    "effective_rank",
    "file_reshape",
    "fit_power_law",
    "head_matrices",
    "layer_spectrum",
    "load_safetensors",
    "lora_deltas",
    "lora_pairs",
    "marchenko_pastur_cdf",
    "marchenko_pastur_pdf",
    "matricize",
    "matrix_metrics",
    "mp_ks_threshold",
    "mp_median",
    "randomization_baseline",
    "reshape_rule_for",
    "safetensors_files",
    "spectral_merge",
    "spectral_truncate",
    "tracy_widom_edge",
    "weight_spectra",
    "weight_spectra_from_file",
]
