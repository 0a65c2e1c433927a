"""gradience_jax: curvature and spectral geometry of neural networks, JAX-native.

The public API is re-exported here; everything else is internal.
"""

from gradience_jax import (
    attention,
    data,
    geometry,
    landscape,
    models,
    probes,
    telemetry,
    tree,
    weights,
)
from gradience_jax.estimators import (
    SpectralDensity,
    TraceEstimate,
    diagonal,
    hutchinson_trace,
    hutchpp_trace,
    spectral_density,
    trace_of_square,
)
from gradience_jax.lanczos import LanczosState, lanczos
from gradience_jax.operators import heads
from gradience_jax.operators.base import LinearOperator, damped, from_dense, from_matvec
from gradience_jax.operators.data import dataset_operator
from gradience_jax.operators.fisher import empirical_fisher, mc_fisher, per_example_grads
from gradience_jax.operators.ggn import SplitModel, ggn
from gradience_jax.operators.hessian import hessian
from gradience_jax.operators.kfac import KFACOperator, kfac, kfac_inverse
from gradience_jax.operators.select import params_filter
from gradience_jax.spectrum import (
    LanczosConfig,
    SpectrumResult,
    compute_spectrum,
    eigsh,
    eigsh_fast,
)
from gradience_jax.weights import LayerSpectrum, WeightSpectraReport, layer_spectrum, weight_spectra

__version__ = "0.1.0"

__all__ = [
    "KFACOperator",
    "LanczosConfig",
    "LanczosState",
    "LayerSpectrum",
    "LinearOperator",
    "SpectralDensity",
    "SpectrumResult",
    "TraceEstimate",
    "WeightSpectraReport",
    "compute_spectrum",
    "diagonal",
    "eigsh",
    "eigsh_fast",
    "hutchinson_trace",
    "hutchpp_trace",
    "kfac",
    "kfac_inverse",
    "lanczos",
    "spectral_density",
    "trace_of_square",
    "SplitModel",
    "damped",
    "attention",
    "data",
    "geometry",
    "landscape",
    "probes",
    "dataset_operator",
    "empirical_fisher",
    "from_dense",
    "from_matvec",
    "ggn",
    "heads",
    "hessian",
    "mc_fisher",
    "models",
    "params_filter",
    "per_example_grads",
    "telemetry",
    "tree",
    "layer_spectrum",
    "weight_spectra",
    "weights",
]
