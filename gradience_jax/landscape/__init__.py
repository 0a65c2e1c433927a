"""Loss landscapes: directions, 1-D / 2-D slices, interpolation and barriers, sharpness.

Numerics only (no training loops, no optax at import, no models, no matplotlib). One idea
per module:

``landscape.directions``
    ``random_direction`` (filter-normalised, Li et al. 2018), ``normalize_direction``,
    ``restrict_direction``, ``hessian_directions``.
``landscape.trajectory``
    ``trajectory_pca`` (Li et al. 2018 s.7) and ``project_onto_plane``.
``landscape.slices``
    ``slice_1d`` / ``slice_2d`` on a whole grid in one compiled program,
    ``evaluate_points``, ``accuracy_metric``.
``landscape.connectivity``
    ``interpolate`` / ``loss_barrier`` on the straight line, ``bezier_connect`` (Garipov
    et al. 2018).
``landscape.sharpness``
    ``lambda_max``, ``trace_sharpness`` (``tr H``; old name ``hessian_trace``),
    ``epsilon_sharpness`` (Keskar et al. 2017), ``adaptive_sharpness`` (Kwon et al. 2021),
    ``sharpness_report``.
``landscape.rescaling``
    ``rescale_layers`` / ``rescaling_check`` (the Dinh et al. 2017 caveat).
``landscape.eigen`` / ``landscape.common``
    extreme Hessian eigenpairs (dense or Krylov) and the shared checks.

Every name listed in ``__all__`` is supported here. The experiments that used to live in
this module moved up a layer (see ``_MOVED``): ``train``, ``TrainResult`` and
``sam_optimizer`` to :mod:`gradience_jax.experiments.training`; the seed experiments
(``pseudo_spectral_experiment``, ``sharp_vs_flat_experiment``, their results and
``METHODS``) to :mod:`gradience_jax.experiments.seed`. They stay reachable as
``landscape.<name>`` through a lazy module ``__getattr__`` (importing this package never
imports the experiments).
"""

from __future__ import annotations

from gradience_jax._compat import lazy_exports
from gradience_jax.landscape.common import DEFAULT_MEMORY_BUDGET, DENSE_LIMIT, LossFn, PyTree
from gradience_jax.landscape.connectivity import (
    BezierResult,
    Interpolation,
    bezier_connect,
    bezier_point,
    interpolate,
    loss_barrier,
)
from gradience_jax.landscape.directions import (
    default_filter_axes,
    filter_norms,
    gaussian_like,
    hessian_directions,
    normalize_direction,
    random_direction,
    restrict_direction,
)
from gradience_jax.landscape.eigen import EigenDirections, top_eigenpairs
from gradience_jax.landscape.rescaling import RescalingCheck, rescale_layers, rescaling_check
from gradience_jax.landscape.sharpness import (
    AdaptiveSharpness,
    EpsilonSharpness,
    SharpnessReport,
    adaptive_sharpness,
    epsilon_sharpness,
    hessian_trace,
    lambda_max,
    sharpness_report,
    trace_sharpness,
)
from gradience_jax.landscape.slices import (
    PointEvaluator,
    Slice1D,
    Slice2D,
    accuracy_metric,
    evaluate_points,
    slice_1d,
    slice_2d,
)
from gradience_jax.landscape.trajectory import TrajectoryPCA, project_onto_plane, trajectory_pca

__all__ = [
    "AdaptiveSharpness",
    "BezierResult",
    "DEFAULT_MEMORY_BUDGET",
    "DENSE_LIMIT",
    "EigenDirections",
    "EpsilonSharpness",
    "Interpolation",
    "LossFn",
    "PointEvaluator",
    "PyTree",
    "RescalingCheck",
    "SharpnessReport",
    "Slice1D",
    "Slice2D",
    "TrajectoryPCA",
    "accuracy_metric",
    "adaptive_sharpness",
    "bezier_connect",
    "bezier_point",
    "default_filter_axes",
    "epsilon_sharpness",
    "evaluate_points",
    "filter_norms",
    "gaussian_like",
    "hessian_directions",
    "hessian_trace",
    "interpolate",
    "lambda_max",
    "loss_barrier",
    "normalize_direction",
    "project_onto_plane",
    "random_direction",
    "rescale_layers",
    "rescaling_check",
    "restrict_direction",
    "sharpness_report",
    "slice_1d",
    "slice_2d",
    "top_eigenpairs",
    "trace_sharpness",
    "trajectory_pca",
]

#: Names that moved up to the experiments layer: ``name -> new home`` (imported lazily).
_MOVED = {
    "METHODS": "gradience_jax.experiments.seed",
    "PseudoSpectralResult": "gradience_jax.experiments.seed",
    "SharpFlatResult": "gradience_jax.experiments.seed",
    "SharpFlatRun": "gradience_jax.experiments.seed",
    "TrainResult": "gradience_jax.experiments.training",
    "pseudo_spectral_experiment": "gradience_jax.experiments.seed",
    "sam_optimizer": "gradience_jax.experiments.training",
    "sharp_vs_flat_experiment": "gradience_jax.experiments.seed",
    "train": "gradience_jax.experiments.training",
}


__getattr__, __dir__ = lazy_exports(globals(), _MOVED)
