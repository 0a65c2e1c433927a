"""gradience_jax: curvature and spectral geometry of neural networks, JAX-native.

The supported API is what ``__all__`` lists, grouped as in the design (operators, spectra,
estimators, weights, inverse curvature, analysis modules). Every submodule's docstring says
which of its names are supported; anything else (underscored or unlisted) is internal.

The layers, bottom to top (nothing imports upward):

* algebra and curvature: :mod:`~gradience_jax.tree`, :mod:`~gradience_jax.operators`;
* algorithms: :mod:`~gradience_jax.spectrum` (the Krylov engine), ``lanczos``,
  :mod:`~gradience_jax.estimators`, :mod:`~gradience_jax.solvers`;
* analyses (numerics only): :mod:`~gradience_jax.geometry`, :mod:`~gradience_jax.weights`,
  :mod:`~gradience_jax.landscape`, :mod:`~gradience_jax.attention`,
  :mod:`~gradience_jax.probes`; :mod:`~gradience_jax.telemetry`;
* fixtures: :mod:`~gradience_jax.models`, :mod:`~gradience_jax.data`;
* on top, not imported here: ``gradience_jax.experiments`` (training loops, seed
  experiments, Protocols A-D), ``gradience_jax.plots`` (figures from results) and
  ``gradience_jax.app`` (the CLI, the report, checkpoints).
"""

# ruff: noqa: I001 - the imports follow the sections of __all__, not the alphabet
from gradience_jax.errors import ArgumentTypeError, NonFiniteError

# -- operators ---------------------------------------------------------------------------
from gradience_jax.operators.base import LinearOperator, damped, from_dense, from_matvec
from gradience_jax.operators.hessian import hessian
from gradience_jax.operators.ggn import SplitModel, ggn
from gradience_jax.operators.fisher import empirical_fisher, mc_fisher, per_example_grads
from gradience_jax.operators.kfac import KFACOperator, kfac, kfac_inverse
from gradience_jax.operators.select import params_filter
from gradience_jax.operators.data import dataset_operator
from gradience_jax.operators.heads import Head, compose
from gradience_jax.operators.registry import build as build_operator
from gradience_jax.operators import heads

# -- spectra -----------------------------------------------------------------------------
from gradience_jax.spectrum import (
    LanczosConfig,
    SpectrumResult,
    compute_spectrum,
    eigsh,
    eigsh_fast,
    top_eigenpairs,
)
from gradience_jax.lanczos import LanczosState, lanczos

# -- estimators --------------------------------------------------------------------------
from gradience_jax.estimators import (
    SpectralDensity,
    TraceEstimate,
    diagonal,
    hutchinson_trace,
    hutchpp_trace,
    spectral_density,
    trace_of_square,
)

# -- weights -----------------------------------------------------------------------------
from gradience_jax.weights import (
    LayerSpectrum,
    WeightSpectraReport,
    layer_spectrum,
    load_safetensors,
    weight_spectra,
    weight_spectra_from_file,
)

# -- inverse curvature -------------------------------------------------------------------
from gradience_jax.influence import InfluenceResult, influence, self_influence, tracin
from gradience_jax.operators.ekfac import EKFACOperator, ekfac
from gradience_jax.solvers import (
    CGResult,
    SolveResult,
    SolveWarning,
    auto_damping,
    conjugate_gradient,
    solve,
    spectral_bounds,
)

# -- analysis and utility modules --------------------------------------------------------
from gradience_jax import attention
from gradience_jax import data
from gradience_jax import environment
from gradience_jax import geometry
from gradience_jax import landscape
from gradience_jax import laplace
from gradience_jax import models
from gradience_jax import probes
from gradience_jax import solvers
from gradience_jax import telemetry
from gradience_jax import tree
from gradience_jax import weights

__version__ = "0.1.0"

__all__ = [
    # operators
    "ArgumentTypeError",
    "NonFiniteError",
    "LinearOperator",
    "hessian",
    "ggn",
    "SplitModel",
    "empirical_fisher",
    "mc_fisher",
    "per_example_grads",
    "kfac",
    "kfac_inverse",
    "KFACOperator",
    "params_filter",
    "dataset_operator",
    "damped",
    "from_dense",
    "from_matvec",
    "build_operator",
    "heads",
    "Head",
    "compose",
    # spectra
    "eigsh",
    "eigsh_fast",
    "top_eigenpairs",
    "SpectrumResult",
    "LanczosConfig",
    "compute_spectrum",
    "lanczos",
    "LanczosState",
    # estimators
    "hutchinson_trace",
    "hutchpp_trace",
    "trace_of_square",
    "diagonal",
    "spectral_density",
    "TraceEstimate",
    "SpectralDensity",
    # weights
    "weight_spectra",
    "layer_spectrum",
    "LayerSpectrum",
    "WeightSpectraReport",
    "load_safetensors",
    "weight_spectra_from_file",
    # inverse curvature
    "conjugate_gradient",
    "CGResult",
    "solve",
    "SolveResult",
    "SolveWarning",
    "auto_damping",
    "spectral_bounds",
    "ekfac",
    "EKFACOperator",
    "influence",
    "self_influence",
    "tracin",
    "InfluenceResult",
    # modules
    "attention",
    "data",
    "environment",
    "geometry",
    "landscape",
    "laplace",
    "models",
    "probes",
    "solvers",
    "telemetry",
    "tree",
    "weights",
]
