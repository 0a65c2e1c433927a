"""The seed experiments behind the landscape figures (they train; figures only draw).

``pseudo_spectral_experiment`` trains the seed 2-3-1 sigmoid MLP and computes its full
Hessian spectrum, principal-direction slices, the loss surface on the top-2 eigenvectors,
the trajectory's PCA plane and the curvature along training. ``sharp_vs_flat_experiment``
trains one MLP with several recipes (small / large batch SGD, gradient noise, SAM) and
compares their sharpness, landscapes and mode connectivity.

Supported names: ``PseudoSpectralResult``, ``pseudo_spectral_experiment``,
``SharpFlatRun``, ``SharpFlatResult``, ``sharp_vs_flat_experiment``, ``METHODS`` and the
quick settings ``PSEUDO_SPECTRAL_FAST`` / ``SHARP_VS_FLAT_FAST`` (keyword arguments for
CI and ``--fast`` runs). Training goes through
:func:`gradience_jax.experiments.training.train_scan`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gradience_jax import data as gdata
from gradience_jax import tree as tu
from gradience_jax._validate import check_key
from gradience_jax.experiments.training import TrainResult, sam_optimizer, train_scan
from gradience_jax.landscape.common import DENSE_LIMIT, PyTree, check_direction, static_callable
from gradience_jax.landscape.connectivity import BezierResult, bezier_connect, interpolate
from gradience_jax.landscape.directions import gaussian_like, normalize_direction
from gradience_jax.landscape.eigen import (
    dense_hessian_eigvals_stacked,
    small_hessian_eigh,
    top_eigenpairs,
    unravel_columns,
)
from gradience_jax.landscape.sharpness import SharpnessReport, sharpness_report
from gradience_jax.landscape.slices import Slice2D, slice_1d, slice_2d
from gradience_jax.landscape.trajectory import TrajectoryPCA, trajectory_pca
from gradience_jax.models import MLP, SeedMLP, from_nnx
from gradience_jax.operators import heads
from gradience_jax.operators.hessian import hessian

__all__ = [
    "METHODS",
    "PSEUDO_SPECTRAL_FAST",
    "PseudoSpectralResult",
    "SHARP_VS_FLAT_FAST",
    "SharpFlatResult",
    "SharpFlatRun",
    "pseudo_spectral_experiment",
    "sharp_vs_flat_experiment",
]

#: Quick settings of :func:`pseudo_spectral_experiment` (``--fast`` figures, CI).
PSEUDO_SPECTRAL_FAST = {"num_steps": 600, "record_every": 60, "resolution": 15}
#: Quick settings of :func:`sharp_vs_flat_experiment` (``--fast`` figures, CI).
SHARP_VS_FLAT_FAST = {"num_steps": 200, "record_every": 50, "resolution": 9, "bezier_steps": 20}


@dataclasses.dataclass(frozen=True)
class PseudoSpectralResult:
    """Data of the ``pseudo_spectral_analysis`` figure (see :func:`pseudo_spectral_experiment`).

    Attributes:
        params: trained parameters; n_params: their number.
        eigenvalues: Hessian eigenvalues at ``params`` (ascending; all of them when dense).
        principal_slices: ``{label: Slice1D}`` along the eigenvectors of the largest,
            middle and smallest eigenvalue.
        surface: ``Slice2D`` along the top-2 Hessian eigenvectors.
        plane: ``Slice2D`` in the trajectory's PCA plane, centred at ``params``;
            pca: the ``TrajectoryPCA`` (its ``coords`` place the trajectory on the plane).
        history: ``{"steps", "loss", "lambda_max", "lambda_min", "trace"}`` arrays at the
            recorded steps.
    """

    params: PyTree
    n_params: int
    eigenvalues: np.ndarray
    principal_slices: dict
    surface: Slice2D
    plane: Slice2D
    pca: TrajectoryPCA
    history: dict


def pseudo_spectral_experiment(
    key: jax.Array | None = None,
    *,
    num_train: int = 50,
    hidden: int = 3,
    num_steps: int = 3000,
    learning_rate: float = 0.5,
    record_every: int = 100,
    resolution: int = 41,
    surface_span: float = 1.0,
) -> PseudoSpectralResult:
    """The seed notebook's analysis of a trained 2-``hidden``-1 sigmoid MLP.

    Train the MLP on ``y = sin(x0) + 0.5 x1^2 + noise`` by full-batch gradient descent,
    then compute the full Hessian spectrum, slices along principal curvature directions,
    the loss surface on the top-2 eigenvectors and the trajectory's PCA plane, and
    ``lambda_max`` / ``lambda_min`` / ``tr H`` along training (float64 when x64 is on; a
    few seconds on a CPU).

    Args:
        key: ``jax.random`` key (default ``jax.random.key(42)``, the one default seed).
        num_train: training examples.
        hidden: hidden units of the seed MLP.
        num_steps: steps of the full-batch SGD run
            (:func:`~gradience_jax.experiments.training.train_scan`).
        learning_rate: SGD learning rate.
        record_every: recording period in steps (must divide ``num_steps``).
        resolution: grid points per axis of every slice.
        surface_span: half-width of the slices along the eigenvectors.

    Returns:
        :class:`PseudoSpectralResult`. Quick settings: :data:`PSEUDO_SPECTRAL_FAST`.

    Raises:
        ValueError: ``num_steps`` not a multiple of ``record_every``.
    """
    key = check_key(key)
    k_data, k_init, k_train = jax.random.split(key, 3)
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    model = SeedMLP(hidden=hidden, param_dtype=dtype,
                    rngs=nnx.Rngs(int(jax.random.randint(k_init, (), 0, 2**30))))
    adapted = from_nnx(model, heads.mse())
    batch = jax.tree_util.tree_map(lambda x: x.astype(dtype),
                                   gdata.seed_regression(k_data, n=num_train))
    res = train_scan(adapted.loss_fn, adapted.params, batch, optimizer=optax.sgd(learning_rate),
                num_steps=num_steps, key=k_train, record_every=record_every)
    params = res.params
    n_params = tu.size(params)
    if n_params <= DENSE_LIMIT:
        evals, evecs = small_hessian_eigh(adapted.loss_fn, params, batch)
        cols = unravel_columns(evecs, params)
        picks = {"largest": (evals[-1], cols[-1]), "middle": (evals[len(evals) // 2],
                 cols[len(cols) // 2]), "smallest": (evals[0], cols[0])}
        second = cols[-2]
    else:  # large model: top eigenpairs only (Lanczos)
        top = top_eigenpairs(hessian(adapted.loss_fn, params, batch), min(20, n_params), key=key)
        evals = top.eigenvalues
        picks = {"largest": (evals[0], top.directions[0])}
        second = top.directions[1]
    picks = {k: (lam, check_direction(v, params, "eigenvector")) for k, (lam, v) in picks.items()}
    second = check_direction(second, params, "eigenvector")
    alphas = np.linspace(-surface_span, surface_span, resolution)
    principal = {
        f"{name} (lambda={lam:.3g})": slice_1d(adapted.loss_fn, params, batch, d, alphas)
        for name, (lam, d) in picks.items()
    }
    surface = slice_2d(adapted.loss_fn, params, batch, picks["largest"][1], second, alphas, alphas)
    pca = trajectory_pca(res.trajectory, 2)
    lo = pca.coords.min(axis=0)
    hi = pca.coords.max(axis=0)
    pad = 0.25 * np.maximum(hi - lo, 1e-3)
    plane = slice_2d(adapted.loss_fn, params, batch, pca.directions[0], pca.directions[1],
                     np.linspace(lo[0] - pad[0], hi[0] + pad[0], resolution),
                     np.linspace(lo[1] - pad[1], hi[1] + pad[1], resolution))
    if n_params <= DENSE_LIMIT:
        ev = np.asarray(dense_hessian_eigvals_stacked(static_callable(adapted.loss_fn),
                                                      res.trajectory, batch))
    else:  # pragma: no cover - the seed model is tiny
        ev = np.full((len(res.steps), 1), np.nan)
    history = {"steps": res.steps, "loss": res.train_loss, "lambda_max": ev[:, -1],
               "lambda_min": ev[:, 0], "trace": ev.sum(axis=1), "step_loss": res.step_loss}
    return PseudoSpectralResult(params, n_params, np.sort(evals), principal, surface, plane,
                                pca, history)


@dataclasses.dataclass(frozen=True)
class SharpFlatRun:
    """One training recipe of :func:`sharp_vs_flat_experiment`.

    Attributes:
        name: the key in :data:`METHODS`; label: its display name.
        params: the trained parameters; train: the :class:`TrainResult`.
        sharpness: :class:`SharpnessReport` at ``params`` on the training data.
        landscape: ``Slice2D`` along filter-normalised random directions.
    """

    name: str
    label: str
    params: PyTree
    train: TrainResult
    sharpness: SharpnessReport
    landscape: Slice2D


@dataclasses.dataclass(frozen=True)
class SharpFlatResult:
    """Data of the ``sharp_vs_flat_minima`` figure.

    Attributes:
        runs: ``{name: SharpFlatRun}`` in the order trained.
        barriers: ``{(name_a, name_b): Interpolation}`` between the final solutions.
        bezier: a :class:`BezierResult` between the first two runs (or None).
        config: the experiment's settings.
    """

    runs: dict
    barriers: dict
    bezier: BezierResult | None
    config: dict


#: The training recipes of :func:`sharp_vs_flat_experiment`: ``name -> label``.
METHODS = {
    "sgd_small": "SGD, small batch",
    "sgd_large": "SGD, large batch",
    "sgd_noise": "SGD + gradient noise",
    "sam": "SAM",
}


def sharp_vs_flat_experiment(
    key: jax.Array | None = None,
    *,
    methods: Sequence[str] = ("sgd_small", "sgd_large", "sgd_noise", "sam"),
    hidden: Sequence[int] = (20, 20),
    num_train: int = 64,
    num_test: int = 512,
    label_noise: float = 0.3,
    num_steps: int = 2000,
    learning_rate: float = 0.1,
    small_batch: int = 8,
    large_batch: int | None = None,
    noise_eta: float = 0.01,
    noise_gamma: float = 0.55,
    sam_rho: float = 0.05,
    record_every: int = 50,
    resolution: int = 25,
    span: float = 1.0,
    bezier_steps: int = 150,
    epsilon: float = 1e-3,
) -> SharpFlatResult:
    """Train one MLP with several recipes from the same initialisation and compare them.

    The MLP is ``2 -> hidden -> 1`` (tanh), the data the seed regression with few, noisy
    training points. The recipes:

    * ``sgd_small``: SGD with ``small_batch`` examples per step;
    * ``sgd_large``: SGD with ``large_batch`` (default all ``num_train``) per step;
    * ``sgd_noise``: large-batch SGD plus Gaussian gradient noise of variance
      ``noise_eta / (1 + step)^noise_gamma`` (``optax.add_noise``, Neelakantan et al. 2015;
      ``noise_gamma = 0``: constant noise);
    * ``sam``: large-batch SAM with radius ``sam_rho`` (:func:`sam_optimizer`).

    For each: train / test loss curves, a :class:`SharpnessReport` and a 2-D slice along
    filter-normalised random directions (same key for all runs). Between every pair of
    solutions: the straight-line barrier; between the first two a trained Bezier curve.
    Whether the small-batch / noisy / SAM solutions come out flatter is measured, not
    assumed.

    Args:
        key: ``jax.random`` key (default ``jax.random.key(42)``, the one default seed).
        methods: a non-empty subset of :data:`METHODS`, trained in this order.
        hidden: hidden layer widths of the tanh MLP.
        num_train: training examples.
        num_test: test examples.
        label_noise: noise level of the regression targets (train and test).
        num_steps: training steps of every recipe.
        learning_rate: learning rate of every recipe.
        small_batch: batch size of ``sgd_small``.
        large_batch: batch size of the other recipes (default ``num_train``).
        noise_eta: gradient-noise variance scale of ``sgd_noise``.
        noise_gamma: gradient-noise decay exponent of ``sgd_noise``.
        sam_rho: SAM radius of ``sam``.
        record_every: recording period in steps (must divide ``num_steps``).
        resolution: grid points per axis of the 2-D slices.
        span: the slices cover ``[-span, span]`` along both directions.
        bezier_steps: training steps of the Bezier curve (0: none).
        epsilon: box of the epsilon-sharpness.

    Returns:
        :class:`SharpFlatResult`. Quick settings: :data:`SHARP_VS_FLAT_FAST`.

    Raises:
        ValueError: unknown ``methods``, bad step counts or batch sizes.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {sorted(METHODS)}, "
                         f"got {list(methods)}")
    key = check_key(key)
    k_data, k_init, k_train, k_dir, k_bez, k_noise = jax.random.split(key, 6)
    k_tr, k_te = jax.random.split(k_data)
    train_data = gdata.seed_regression(k_tr, n=num_train, noise=label_noise)
    test_data = gdata.seed_regression(k_te, n=num_test, noise=label_noise)
    model = MLP([2, *hidden, 1], activation=jnp.tanh,
                rngs=nnx.Rngs(int(jax.random.randint(k_init, (), 0, 2**30))))
    adapted = from_nnx(model, heads.mse())
    loss_fn, params0 = adapted.loss_fn, adapted.params
    large = num_train if large_batch is None else int(large_batch)
    recipes = {
        "sgd_small": (optax.sgd(learning_rate), small_batch),
        "sgd_large": (optax.sgd(learning_rate), large),
        "sgd_noise": (optax.chain(optax.add_noise(noise_eta, noise_gamma, k_noise),
                                  optax.sgd(learning_rate)), large),
        "sam": (sam_optimizer(learning_rate, sam_rho), large),
    }
    d1 = gaussian_like(jax.random.fold_in(k_dir, 1), params0)
    d2 = gaussian_like(jax.random.fold_in(k_dir, 2), params0)
    grid = np.linspace(-span, span, resolution)
    runs = {}
    for name in methods:
        opt, bs = recipes[name]
        res = train_scan(loss_fn, params0, train_data, optimizer=opt, num_steps=num_steps,
                    key=k_train, batch_size=bs, eval_data=test_data, record_every=record_every)
        rep = sharpness_report(loss_fn, res.params, train_data, epsilon=epsilon)
        n1 = normalize_direction(d1, res.params)
        n2 = normalize_direction(d2, res.params)
        land = slice_2d(loss_fn, res.params, train_data, n1, n2, grid, grid)
        runs[name] = SharpFlatRun(name, METHODS[name], res.params, res, rep, land)
    names = list(runs)
    barriers = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            barriers[(a, b)] = interpolate(loss_fn, runs[a].params, runs[b].params, train_data,
                                           num_points=25)
    bez = None
    if len(names) >= 2 and bezier_steps > 0:
        bez = bezier_connect(loss_fn, runs[names[0]].params, runs[names[1]].params, train_data,
                             key=k_bez, num_steps=bezier_steps)
    config = dict(methods=list(methods), hidden=list(hidden), num_train=num_train,
                  num_test=num_test, label_noise=label_noise, num_steps=num_steps,
                  learning_rate=learning_rate, small_batch=small_batch, large_batch=large,
                  noise_eta=noise_eta, noise_gamma=noise_gamma, sam_rho=sam_rho, span=span,
                  epsilon=epsilon)
    return SharpFlatResult(runs, barriers, bez, config)

