"""gradience_jax: curvature and spectral geometry of neural networks, JAX-native.

The public API is re-exported here; everything else is internal.
"""

from gradience_jax import attention
from gradience_jax import data
from gradience_jax import geometry
from gradience_jax import landscape
from gradience_jax import models
from gradience_jax import probes
from gradience_jax import telemetry
from gradience_jax import tree
from gradience_jax import weights
from gradience_jax.estimators import SpectralDensity
from gradience_jax.estimators import TraceEstimate
from gradience_jax.estimators import diagonal
from gradience_jax.estimators import hutchinson_trace
from gradience_jax.estimators import hutchpp_trace
from gradience_jax.estimators import spectral_density
from gradience_jax.estimators import trace_of_square
from gradience_jax.lanczos import LanczosState
from gradience_jax.lanczos import lanczos
from gradience_jax.operators import heads
from gradience_jax.operators.base import LinearOperator
from gradience_jax.operators.base import damped
from gradience_jax.operators.base import from_dense
from gradience_jax.operators.base import from_matvec
from gradience_jax.operators.data import dataset_operator
from gradience_jax.operators.fisher import empirical_fisher
from gradience_jax.operators.fisher import mc_fisher
from gradience_jax.operators.fisher import per_example_grads
from gradience_jax.operators.ggn import SplitModel
from gradience_jax.operators.ggn import ggn
from gradience_jax.operators.hessian import hessian
from gradience_jax.operators.kfac import KFACOperator
from gradience_jax.operators.kfac import kfac
from gradience_jax.operators.kfac import kfac_inverse
from gradience_jax.operators.select import params_filter
from gradience_jax.spectrum import LanczosConfig
from gradience_jax.spectrum import SpectrumResult
from gradience_jax.spectrum import compute_spectrum
from gradience_jax.spectrum import eigsh
from gradience_jax.spectrum import eigsh_fast
from gradience_jax.weights import LayerSpectrum
from gradience_jax.weights import WeightSpectraReport
from gradience_jax.weights import layer_spectrum
from gradience_jax.weights import weight_spectra

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
