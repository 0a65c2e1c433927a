"""Loss landscapes: directions, 1-D / 2-D slices, interpolation and barriers, sharpness.

Directions
    ``random_direction`` draws a Gaussian direction and normalises it per filter (Li et al.
    2018, "Visualizing the loss landscape of neural nets"), per layer or not at all;
    ``hessian_directions`` gives top Hessian eigenvectors; ``trajectory_pca`` the principal
    components of a training trajectory (Li et al. s.7). Directions are pytrees like
    ``params``.

Slices
    ``slice_1d`` / ``slice_2d`` evaluate ``loss_fn(params + a d1 + b d2, batch)`` on a whole
    grid in one compiled program: ``jax.lax.map`` over the grid points, vmapped in chunks
    whose size fits a memory budget. Non-finite losses are masked (NaN in the result) and
    their fraction is reported, never raised.

Interpolation and mode connectivity
    ``interpolate`` / ``loss_barrier`` along the straight line between two solutions;
    ``bezier_connect`` trains the control point of a quadratic Bezier curve to lower the
    barrier (Garipov et al. 2018, "Loss surfaces, mode connectivity, and fast ensembling").

Sharpness
    ``lambda_max`` and ``hessian_trace`` (dense for small models, Lanczos / Hutchinson
    otherwise), ``epsilon_sharpness`` (Keskar et al. 2017), ``adaptive_sharpness`` (Kwon
    et al. 2021, ASAM), ``sharpness_report`` (all of them) and ``rescaling_check`` (the
    Dinh et al. 2017 caveat: ``W1 -> a W1``, ``W2 -> W2 / a`` leaves a ReLU network's
    function unchanged but changes ``lambda_max``; the adaptive sharpness does not change).

Experiments (data for the seed figures; ``plots`` only draws them)
    ``train`` (optax, minibatch SGD in one ``lax.scan``), ``sam_optimizer``,
    ``pseudo_spectral_experiment`` and ``sharp_vs_flat_experiment``.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradience_jax import tree as tu
from gradience_jax._validate import check_batch, check_like, check_params, check_scalar_fn
from gradience_jax.operators.base import LinearOperator
from gradience_jax.operators.hessian import hessian

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

#: Operators with at most this many parameters are made dense (exact eigenvalues / trace).
DENSE_LIMIT = 2000
#: Default memory budget of one vmapped chunk of grid points.
DEFAULT_MEMORY_BUDGET = 256 * 1024**2

__all__ = [
    "AdaptiveSharpness",
    "BezierResult",
    "DENSE_LIMIT",
    "EigenDirections",
    "EpsilonSharpness",
    "Interpolation",
    "PseudoSpectralResult",
    "RescalingCheck",
    "SharpFlatResult",
    "SharpFlatRun",
    "SharpnessReport",
    "Slice1D",
    "Slice2D",
    "TrainResult",
    "TrajectoryPCA",
    "accuracy_metric",
    "adaptive_sharpness",
    "bezier_connect",
    "bezier_point",
    "default_filter_axes",
    "epsilon_sharpness",
    "evaluate_points",
    "filter_norms",
    "hessian_directions",
    "hessian_trace",
    "interpolate",
    "lambda_max",
    "loss_barrier",
    "normalize_direction",
    "project_onto_plane",
    "pseudo_spectral_experiment",
    "random_direction",
    "rescale_layers",
    "rescaling_check",
    "restrict_direction",
    "sam_optimizer",
    "sharp_vs_flat_experiment",
    "sharpness_report",
    "slice_1d",
    "slice_2d",
    "train",
    "trajectory_pca",
]


# =========================================================================================
# small helpers
# =========================================================================================


@dataclasses.dataclass(frozen=True, eq=False)
class _ById:
    """Makes an unhashable callable usable as a static ``jit`` argument (hashed by id)."""

    fn: Callable

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def _static(fn: Optional[Callable]) -> Optional[Callable]:
    if fn is None:
        return None
    try:
        hash(fn)
    except TypeError:
        return _ById(fn)
    return fn


def _check_direction(direction: PyTree, params: PyTree, name: str) -> PyTree:
    """``direction`` must match ``params``' structure and shapes; dtypes are cast to params'."""
    try:
        check_like(direction, params, name, "params")
    except TypeError:  # dtype only: harmless, cast below
        pass
    return jax.tree_util.tree_map(lambda d, p: jnp.asarray(d, jnp.result_type(p)), direction, params)


def _check_grid(grid: Any, name: str) -> np.ndarray:
    try:
        g = np.asarray(grid, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a 1-D array of numbers: {exc}") from exc
    if g.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {g.shape}")
    if g.size == 0:
        raise ValueError(f"{name} is empty: give at least one grid point")
    if not np.all(np.isfinite(g)):
        raise ValueError(f"{name} contains non-finite values")
    if g.size > 1 and not np.all(np.diff(g) > 0):
        raise ValueError(f"{name} must be strictly increasing (monotone, no repeats)")
    return g


def _tree_bytes(t: PyTree) -> int:
    return int(
        sum(int(np.prod(np.shape(x))) * jnp.dtype(jnp.result_type(x)).itemsize
            for x in jax.tree_util.tree_leaves(t))
    )


def _spec(t: PyTree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(t)
    return treedef, tuple((tuple(np.shape(x)), str(jnp.result_type(x))) for x in leaves)


def _jaxpr_bytes(jaxpr: Any) -> int:
    """Sum of the sizes of every intermediate value of a jaxpr (recursing into sub-jaxprs):
    an upper bound of the temporary memory one evaluation needs (XLA fuses most away)."""
    total = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            aval = getattr(v, "aval", None)
            if aval is not None and hasattr(aval, "shape") and hasattr(aval, "dtype"):
                total += int(np.prod(aval.shape)) * jnp.dtype(aval.dtype).itemsize
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _jaxpr_bytes(inner)
    return total


_TEMP_BYTES_CACHE: dict = {}


def _temp_bytes(loss_fn: Callable, params: PyTree, batch: PyTree) -> int:
    """Upper bound of the temporary memory of one loss evaluation (traced, not compiled)."""
    key = (loss_fn, _spec(params), _spec(batch))
    if key not in _TEMP_BYTES_CACHE:
        try:
            value = _jaxpr_bytes(jax.make_jaxpr(loss_fn)(params, batch).jaxpr)
        except Exception:  # pragma: no cover - exotic callables
            value = 4 * _tree_bytes(batch)
        if len(_TEMP_BYTES_CACHE) > 256:
            _TEMP_BYTES_CACHE.clear()
        _TEMP_BYTES_CACHE[key] = value
    return _TEMP_BYTES_CACHE[key]


def _chunk_size(loss_fn, params, batch, n_points: int, chunk_size, budget) -> int:
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return int(min(int(chunk_size), n_points))
    if budget is None or budget <= 0:
        raise ValueError(f"memory_budget_bytes must be positive, got {budget}")
    per_point = 2 * _tree_bytes(params) + _temp_bytes(loss_fn, params, batch) + 1
    return int(max(1, min(n_points, budget // per_point)))


def _offset(params: PyTree, directions: Sequence[PyTree], c: jax.Array) -> PyTree:
    """``params + sum_j c[j] * directions[j]`` leaf-wise, keeping params' dtypes."""

    def leaf(w, *ds):
        out = w
        for j, d in enumerate(ds):
            out = out + c[j].astype(w.dtype) * d.astype(w.dtype)
        return out

    return jax.tree_util.tree_map(leaf, params, *directions)


@functools.partial(jax.jit, static_argnames=("loss_fn", "metric_fn", "chunk_size"))
def _eval_points(loss_fn, metric_fn, params, batch, directions, coords, chunk_size):
    def at(c):
        p = _offset(params, directions, c)
        value = loss_fn(p, batch)
        extra = metric_fn(p, batch) if metric_fn is not None else jnp.zeros((), value.dtype)
        return value, extra

    return jax.lax.map(at, coords, batch_size=chunk_size)


_tree_sub = jax.jit(tu.sub)


@jax.jit
def _gaussian_like(key: jax.Array, params: PyTree) -> PyTree:
    """A standard Gaussian pytree like ``params`` from ONE draw split into the leaves (one
    threefry call: far cheaper to compile than a draw per leaf)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    sizes = [int(np.prod(np.shape(x))) for x in leaves]
    dtype = jnp.result_type(*leaves) if leaves else jnp.float32
    flat = jax.random.normal(key, (max(sum(sizes), 1),), dtype)
    out, start = [], 0
    for x, n in zip(leaves, sizes):
        out.append(flat[start:start + n].reshape(np.shape(x)).astype(jnp.result_type(x)))
        start += n
    return jax.tree_util.tree_unflatten(treedef, out)


@jax.jit
def _bezier_offsets(a, control, b):
    """``phi(t) = a + 2t d1 + t^2 d2`` with ``d1 = theta - a``, ``d2 = a - 2 theta + b``."""
    d1 = tu.sub(control, a)
    d2 = jax.tree_util.tree_map(lambda x, c, y: x - 2 * c + y, a, control, b)
    return d1, d2


def _mask_nonfinite(values: np.ndarray) -> tuple[np.ndarray, float]:
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    frac = float(1.0 - finite.mean()) if values.size else 0.0
    return np.where(finite, values, np.nan), frac


# =========================================================================================
# directions
# =========================================================================================


def default_filter_axes(path: str, shape: Sequence[int]) -> Optional[tuple[int, ...]]:
    """The axes that index *filters* (output units) of a parameter leaf in Flax layout.

    * 0-D / 1-D leaves (biases, LayerNorm scales and offsets): ``None`` (handled by the
      ``bias`` rule of :func:`normalize_direction`);
    * ``.../embedding`` ``(vocab, d)``: one filter per token row, ``(0,)``;
    * attention ``query`` / ``key`` / ``value`` kernels ``(d_in, heads, head_dim)``: one
      filter per output unit ``(head, j)``, ``(1, 2)``;
    * any other kernel (Dense ``(in, out)``, Conv ``(kh, kw, in, out)``, attention ``out``
      ``(heads, head_dim, d_out)``): the last (output) axis.

    A filter is then the slice of the leaf at one index of these axes (a Dense column, a
    Conv output channel: the PyTorch row / output channel of Li et al. 2018).
    """
    nd = len(shape)
    if nd <= 1:
        return None
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "embedding":
        return (0,)
    parts = path.split("/")
    qkv = len(parts) >= 2 and parts[-1] == "kernel" and parts[-2] in ("query", "key", "value")
    if nd == 3 and qkv:
        return (1, 2)
    return (nd - 1,)


def _reduce_axes(path, x, filter_axes_fn):
    axes = filter_axes_fn(path, np.shape(x))
    if axes is None:
        return None
    nd = np.ndim(x)
    axes = tuple(a % nd for a in axes)
    return tuple(a for a in range(nd) if a not in axes)


def filter_norms(tree: PyTree, *, filter_axes: Optional[Callable] = None) -> PyTree:
    """Per-filter Euclidean norms of every leaf (keepdims, so they broadcast against it).

    Leaves without filters (``filter_axes`` returns ``None``: biases) get their whole norm.

    Args:
        tree: parameters or a direction.
        filter_axes: ``(path, shape) -> axes or None``; default :func:`default_filter_axes`.
    """
    return _filter_norms_core(tree, _static(filter_axes or default_filter_axes))


@functools.partial(jax.jit, static_argnames=("fa",))
def _filter_norms_core(tree, fa):
    def leaf(path, x):
        red = _reduce_axes(path, x, fa)
        if red is None:
            red = tuple(range(np.ndim(x)))
        return jnp.sqrt(jnp.sum(jnp.square(x), axis=red, keepdims=True))

    return tu.map_with_path(leaf, tree)


def normalize_direction(
    direction: PyTree,
    params: PyTree,
    *,
    mode: str = "filter",
    bias: Optional[str] = None,
    filter_axes: Optional[Callable] = None,
    eps: float = 1e-12,
) -> PyTree:
    """Rescale a direction to the scale of the weights (Li et al. 2018).

    Args:
        direction: pytree like ``params``.
        params: the weights the direction lives at.
        mode: ``"filter"``: every filter ``d_f`` becomes ``d_f * ||w_f|| / ||d_f||``
            (filters as in :func:`default_filter_axes`); ``"layer"``: every leaf becomes
            ``d * ||w|| / ||d||``; ``"none"``: unchanged.
        bias: what happens to leaves without filters (biases, norm scales / offsets):
            ``"zero"`` (Li et al.'s default ``ignore='biasbn'``: they are not perturbed),
            ``"keep"`` (left as given) or ``"normalize"`` (scaled to the leaf's norm like a
            layer). Default ``"zero"`` for ``mode`` filter / layer, ``"keep"`` for none.
        filter_axes: ``(path, shape) -> axes or None``; default :func:`default_filter_axes`.
        eps: added to ``||d_f||`` against division by zero.

    Returns:
        A pytree like ``params`` (params' dtypes).

    Raises:
        ValueError: unknown ``mode`` / ``bias``, or ``direction`` does not match ``params``.
    """
    if mode not in ("filter", "layer", "none"):
        raise ValueError(f"mode must be 'filter', 'layer' or 'none', got {mode!r}")
    if bias is None:
        bias = "keep" if mode == "none" else "zero"
    if bias not in ("zero", "keep", "normalize"):
        raise ValueError(f"bias must be 'zero', 'keep' or 'normalize', got {bias!r}")
    direction = _check_direction(direction, params, "direction")
    return _normalize_core(direction, params, mode, bias, _static(filter_axes or default_filter_axes),
                           float(eps))


@functools.partial(jax.jit, static_argnames=("mode", "bias", "fa", "eps"))
def _normalize_core(direction, params, mode, bias, fa, eps):
    def rescale(d, w, axes):
        nd = jnp.sqrt(jnp.sum(jnp.square(d), axis=axes, keepdims=True))
        nw = jnp.sqrt(jnp.sum(jnp.square(w), axis=axes, keepdims=True))
        return (d * (nw / (nd + eps))).astype(w.dtype)

    def leaf(path, d, w):
        red = _reduce_axes(path, w, fa)
        if red is None:  # bias-like leaf
            if bias == "zero":
                return jnp.zeros_like(w)
            if bias == "keep":
                return d
            return rescale(d, w, tuple(range(np.ndim(w))))
        if mode == "none":
            return d
        if mode == "layer":
            return rescale(d, w, tuple(range(np.ndim(w))))
        return rescale(d, w, red)

    return jax.tree_util.tree_map_with_path(
        lambda p, d, w: leaf(tu.path_str(p), d, w), direction, params
    )


def random_direction(
    key: jax.Array,
    params: PyTree,
    *,
    mode: str = "filter",
    bias: Optional[str] = None,
    filter_axes: Optional[Callable] = None,
) -> PyTree:
    """A Gaussian direction normalised by :func:`normalize_direction` (default per filter).

    >>> d = random_direction(jax.random.key(0), params)   # doctest: +SKIP
    """
    check_params(params)
    d = _gaussian_like(key, params)
    return normalize_direction(d, params, mode=mode, bias=bias, filter_axes=filter_axes)


def restrict_direction(direction: PyTree, predicate: Callable[[str, Any], bool]) -> PyTree:
    """Zero every leaf whose ``"/"``-joined path does not satisfy ``predicate(path, leaf)``
    (e.g. a landscape of the attention parameters only)."""
    return tu.map_with_path(lambda p, x: x if predicate(p, x) else jnp.zeros_like(x), direction)


class EigenDirections(NamedTuple):
    """Hessian eigenpairs: ``eigenvalues`` (descending for ``which='LA'``) and the unit
    eigenvectors as a list of pytrees like ``params``."""

    eigenvalues: np.ndarray
    directions: list


@jax.jit
def _sym_eigh(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    # XLA's solver: numpy's (OpenBLAS) can be 20x slower on busy machines (thread contention)
    m = m.astype(jnp.result_type(float))
    return jnp.linalg.eigh(0.5 * (m + m.T))


def _eigh_np(m: Any) -> tuple[np.ndarray, np.ndarray]:
    w, v = _sym_eigh(jnp.asarray(m))
    return np.asarray(w, np.float64), np.asarray(v, np.float64)


def _dense_eigh(op: LinearOperator) -> tuple[np.ndarray, np.ndarray]:
    return _eigh_np(op.to_dense(max_params=op.n_params))


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def _dense_hessian(loss_fn, params, batch):
    """The dense Hessian of a small model in one compiled program (``tree.ravel`` order)."""
    op = hessian(loss_fn, params, batch, linearize=False, check=False)
    return op.to_dense(max_params=op.n_params)


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def _dense_hessian_eigvals_stacked(loss_fn, stacked_params, batch):
    """Eigenvalues (ascending) of the dense Hessian at every point of a stacked pytree."""
    return jax.vmap(lambda p: _sym_eigh(_dense_hessian(loss_fn, p, batch))[0])(stacked_params)


def _small_hessian_eigh(loss_fn, params, batch) -> tuple[np.ndarray, np.ndarray]:
    """All eigenpairs (ascending) of the dense Hessian of a small model, validated."""
    check_params(params)
    check_batch(batch)
    fn = _static(loss_fn)
    check_scalar_fn(fn, (params, batch), "loss_fn")
    m = _dense_hessian(fn, params, batch)
    if not bool(jnp.all(jnp.isfinite(m))):
        raise FloatingPointError("the Hessian of loss_fn is not finite at params")
    return _eigh_np(m)


def _unravel_columns(vecs: np.ndarray, like: PyTree) -> list:
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(np.shape(s), jnp.result_type(s)), like)
    return [tu.unravel_like(jnp.asarray(vecs[:, i], tu.ravel(zeros).dtype), zeros)
            for i in range(vecs.shape[1])]


def top_eigenpairs(
    op: LinearOperator,
    k: int,
    *,
    which: str = "LA",
    key: Optional[jax.Array] = None,
    dense_limit: int = DENSE_LIMIT,
    return_eigenvectors: bool = True,
) -> EigenDirections:
    """``k`` extreme eigenpairs of ``op``: dense ``eigh`` when ``n_params <= dense_limit``
    (exact), otherwise the Krylov engine (:func:`gradience_jax.spectrum.top_eigenpairs`).

    ``which``: ``"LA"`` largest algebraic (descending), ``"SA"`` smallest (ascending).
    """
    if which not in ("LA", "SA"):
        raise ValueError(f"which must be 'LA' or 'SA', got {which!r}")
    n = op.n_params
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n_params={n}], got {k}")
    from gradience_jax.spectrum import top_eigenpairs as _top  # noqa: PLC0415 (the engine)

    try:
        pairs = _top(op, int(k), which=which, key=key, dense_limit=dense_limit,
                     return_eigenvectors=return_eigenvectors)
    except ValueError as exc:
        if "non-finite" in str(exc):
            raise FloatingPointError(f"the {op.name} operator is not finite") from exc
        raise
    dirs = tu.unstack(pairs.vectors) if return_eigenvectors else []
    return EigenDirections(np.asarray(pairs.values, np.float64), dirs)


def hessian_directions(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    k: int = 2,
    *,
    which: str = "LA",
    key: Optional[jax.Array] = None,
    dense_limit: int = DENSE_LIMIT,
) -> EigenDirections:
    """The top-``k`` (``which="LA"``) or bottom-``k`` (``"SA"``) Hessian eigenvectors as
    unit-norm directions like ``params`` (dense below ``dense_limit`` params, else Lanczos)."""
    if which not in ("LA", "SA"):
        raise ValueError(f"which must be 'LA' or 'SA', got {which!r}")
    n = tu.size(params)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n_params={n}], got {k}")
    if n <= dense_limit:
        evals, evecs = _small_hessian_eigh(loss_fn, params, batch)
        idx = np.argsort(evals)[::-1][:k] if which == "LA" else np.argsort(evals)[:k]
        res = EigenDirections(evals[idx], _unravel_columns(evecs[:, idx], params))
    else:
        res = top_eigenpairs(hessian(loss_fn, params, batch), k, which=which, key=key,
                             dense_limit=dense_limit)
    dirs = [_check_direction(d, params, "eigenvector") for d in res.directions]
    return EigenDirections(res.eigenvalues, dirs)


class TrajectoryPCA(NamedTuple):
    """Principal components of a trajectory (Li et al. 2018 s.7).

    Attributes:
        directions: ``k`` orthonormal directions (pytrees like params).
        explained_variance_ratio: ``(k,)`` share of the trajectory's variance.
        coords: ``(T, k)`` coordinates of every trajectory point relative to ``center``.
        center: the plane's origin (default the last point, the final solution).
    """

    directions: list
    explained_variance_ratio: np.ndarray
    coords: np.ndarray
    center: PyTree


def _as_stacked(trajectory: Any, name: str) -> PyTree:
    if isinstance(trajectory, (list, tuple)):
        if len(trajectory) < 2:
            raise ValueError(f"{name} needs at least 2 points, got {len(trajectory)}")
        return tu.stack(list(trajectory))
    leaves = jax.tree_util.tree_leaves(trajectory)
    if not leaves or np.ndim(leaves[0]) == 0 or np.shape(leaves[0])[0] < 2:
        raise ValueError(f"{name} must be a list of params or a stacked pytree with >= 2 points")
    return trajectory


def _gram(a: PyTree, b: PyTree) -> jax.Array:
    """``G[i, j] = <a_i, b_j>`` in float64 when x64 is on, else float32."""
    return tu.stacked_gram(a, b, dtype=jnp.result_type(float))


def trajectory_pca(trajectory: Any, k: int = 2, *, center: Optional[PyTree] = None) -> TrajectoryPCA:
    """PCA directions of a training trajectory, computed pytree-natively through the
    ``T x T`` Gram matrix of the (mean-centred) displacements ``theta_t - center``.

    Args:
        trajectory: a list of params pytrees or a stacked pytree (leading axis ``T``).
        k: number of components (``<= T - 1``).
        center: origin of the plane; default the last point.
    """
    stacked = _as_stacked(trajectory, "trajectory")
    t = int(jax.tree_util.tree_leaves(stacked)[0].shape[0])
    if not 1 <= k <= t - 1:
        raise ValueError(f"k must be in [1, T-1={t - 1}], got {k}")
    if center is None:
        center = jax.tree_util.tree_map(lambda x: x[-1], stacked)
    else:
        center = _check_direction(center, jax.tree_util.tree_map(lambda x: x[0], stacked), "center")
    g = np.asarray(_pca_gram(stacked, center), np.float64)
    evals, evecs = np.linalg.eigh(0.5 * (g + g.T))
    order = np.argsort(evals)[::-1]
    evals, evecs = np.clip(evals[order], 0.0, None), evecs[:, order]
    total = float(evals.sum())
    coef = evecs[:, :k] / np.sqrt(np.maximum(evals[:k], 1e-300))
    stacked_dirs, coords = _pca_directions(stacked, center, jnp.asarray(coef))
    ratio = evals[:k] / total if total > 0 else np.zeros(k)
    return TrajectoryPCA(tu.unstack(stacked_dirs), ratio, np.asarray(coords, np.float64), center)


def _centred_displacements(stacked, center):
    disp = jax.tree_util.tree_map(lambda x, c: x - c[None], stacked, center)
    y = jax.tree_util.tree_map(lambda x: x - x.mean(axis=0, keepdims=True), disp)
    return disp, y


@jax.jit
def _pca_gram(stacked, center):
    _, y = _centred_displacements(stacked, center)
    return _gram(y, y)


@jax.jit
def _pca_directions(stacked, center, coef):
    disp, y = _centred_displacements(stacked, center)
    dirs = jax.tree_util.tree_map(
        lambda x: jnp.tensordot(coef.T.astype(x.dtype), x, axes=1), y)  # (k, ...)
    return dirs, _gram(disp, dirs)


def project_onto_plane(points: Any, center: PyTree, directions: Sequence[PyTree]) -> np.ndarray:
    """Least-squares coordinates ``c`` of ``points - center`` in ``span(directions)``
    (solves the Gram system, so the directions need not be orthogonal). ``(T, k)``."""
    stacked = _as_stacked(points, "points") if isinstance(points, (list, tuple)) else points
    disp = jax.tree_util.tree_map(lambda x, c: x - c[None], stacked, center)
    dstack = tu.stack(list(directions))
    gram = np.asarray(_gram(dstack, dstack), np.float64)
    rhs = np.asarray(_gram(disp, dstack), np.float64)
    return np.linalg.lstsq(gram, rhs.T, rcond=None)[0].T


# =========================================================================================
# slices
# =========================================================================================


class Slice1D(NamedTuple):
    """``loss[i] = loss_fn(params + alphas[i] * d1, batch)``; NaN where not finite."""

    alphas: np.ndarray
    loss: np.ndarray
    metric: Optional[np.ndarray]
    nonfinite_fraction: float


class Slice2D(NamedTuple):
    """``loss[i, j] = loss_fn(params + alphas[i] d1 + betas[j] d2, batch)``; NaN where not
    finite. Plot with ``contourf(alphas, betas, loss.T)``."""

    alphas: np.ndarray
    betas: np.ndarray
    loss: np.ndarray
    metric: Optional[np.ndarray]
    nonfinite_fraction: float


def _bucket(n: int) -> int:
    """Pad small point counts to a power of two (at least 32) so that paths, refinements
    and short 1-D slices share one compiled program; large grids run at their size."""
    return max(32, 1 << (n - 1).bit_length()) if n <= 256 else n


class _Evaluator:
    """Validated once, then evaluates many coordinate arrays with one compiled program per
    padded size (see :func:`evaluate_points`)."""

    def __init__(self, loss_fn, params, batch, directions, *, metric_fn=None, chunk_size=None,
                 memory_budget_bytes=DEFAULT_MEMORY_BUDGET):
        check_params(params)
        check_batch(batch)
        self.dirs = tuple(_check_direction(d, params, f"directions[{i}]")
                          for i, d in enumerate(directions))
        if not self.dirs:
            raise ValueError("directions is empty")
        self.num_dirs = len(self.dirs)
        # 1-D slices run the 2-D program with a zero second direction: one compiled grid
        self._dirs = self.dirs + (tu.zeros_like(self.dirs[0]),) * max(0, 2 - self.num_dirs)
        self.loss_fn, self.metric_fn = _static(loss_fn), _static(metric_fn)
        check_scalar_fn(self.loss_fn, (params, batch), "loss_fn")
        if self.metric_fn is not None:
            check_scalar_fn(self.metric_fn, (params, batch), "metric_fn")
        self.params, self.batch = params, batch
        self.chunk_size, self.budget = chunk_size, memory_budget_bytes
        self.dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))

    def __call__(self, coords: Any) -> tuple[np.ndarray, Optional[np.ndarray]]:
        coords = np.asarray(coords, np.float64)
        if coords.ndim != 2 or coords.shape[1] != self.num_dirs:
            raise ValueError(f"coords must have shape (M, {self.num_dirs}), got {coords.shape}")
        m = coords.shape[0]
        if m == 0:
            raise ValueError("coords is empty")
        padded = np.zeros((_bucket(m), len(self._dirs)))
        padded[:m, : self.num_dirs] = coords
        chunk = _chunk_size(self.loss_fn, self.params, self.batch, padded.shape[0],
                            self.chunk_size, self.budget)
        values, extra = _eval_points(self.loss_fn, self.metric_fn, self.params, self.batch,
                                     self._dirs, jnp.asarray(padded, self.dtype), chunk)
        values = np.asarray(values, np.float64)[:m]
        extra = np.asarray(extra, np.float64)[:m] if self.metric_fn is not None else None
        return values, extra


def evaluate_points(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    directions: Sequence[PyTree],
    coords: Any,
    *,
    metric_fn: Optional[LossFn] = None,
    chunk_size: Optional[int] = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Loss (and metric) at ``params + sum_j coords[m, j] directions[j]`` for every row ``m``.

    One jitted program (``params``, ``batch``, directions and coords are arguments, so the
    compiled grid is reused for new points of the same shapes; point counts are padded to
    powers of two): ``lax.map`` over points, vmapped ``chunk_size`` at a time (default: as
    many as fit ``memory_budget_bytes``, from an upper bound of one evaluation's
    intermediates).

    Returns:
        ``(loss (M,), metric (M,) or None)`` as float64 numpy arrays (raw, not masked).

    Raises:
        ValueError: directions not like ``params``, coords not ``(M, len(directions))``.
    """
    return _Evaluator(loss_fn, params, batch, directions, metric_fn=metric_fn,
                      chunk_size=chunk_size, memory_budget_bytes=memory_budget_bytes)(coords)


def _warn_nonfinite(frac: float, what: str) -> None:
    if frac > 0:
        warnings.warn(f"{what}: the loss is not finite on {100 * frac:.1f}% of the grid; "
                      "those points are NaN (masked) in the result", RuntimeWarning, stacklevel=3)


def slice_1d(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    d1: PyTree,
    grid1: Any,
    *,
    metric_fn: Optional[LossFn] = None,
    chunk_size: Optional[int] = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
) -> Slice1D:
    """The loss along ``params + alpha * d1`` for ``alpha`` in ``grid1``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params, batch: the centre of the slice and the data.
        d1: direction, a pytree like ``params`` (e.g. :func:`random_direction`).
        grid1: strictly increasing 1-D grid of coefficients.
        metric_fn: optional second function ``(params, batch) -> scalar`` (e.g.
            :func:`accuracy_metric`) evaluated on the same grid.
        chunk_size / memory_budget_bytes: points per vmapped chunk, or the budget that
            picks it.

    Raises:
        ValueError: empty / non-monotone / non-finite grid, direction not like params.
    """
    g1 = _check_grid(grid1, "grid1")
    d1 = _check_direction(d1, params, "d1")
    loss, metric = evaluate_points(loss_fn, params, batch, [d1], g1[:, None], metric_fn=metric_fn,
                                   chunk_size=chunk_size, memory_budget_bytes=memory_budget_bytes)
    loss, frac = _mask_nonfinite(loss)
    _warn_nonfinite(frac, "slice_1d")
    if metric is not None:
        metric = np.where(np.isfinite(loss), metric, np.nan)
    return Slice1D(g1, loss, metric, frac)


def slice_2d(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    d1: PyTree,
    d2: PyTree,
    grid1: Any,
    grid2: Any,
    *,
    metric_fn: Optional[LossFn] = None,
    chunk_size: Optional[int] = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET,
) -> Slice2D:
    """The loss on the plane ``params + a d1 + b d2``, ``a`` in ``grid1``, ``b`` in ``grid2``.

    The whole ``len(grid1) x len(grid2)`` grid runs in one compiled program (see
    :func:`evaluate_points`). ``result.loss[i, j]`` is at ``(grid1[i], grid2[j])``.

    Raises:
        ValueError: bad grids or directions (see :func:`slice_1d`).
    """
    g1 = _check_grid(grid1, "grid1")
    g2 = _check_grid(grid2, "grid2")
    d1 = _check_direction(d1, params, "d1")
    d2 = _check_direction(d2, params, "d2")
    aa, bb = np.meshgrid(g1, g2, indexing="ij")
    coords = np.stack([aa.ravel(), bb.ravel()], axis=1)
    loss, metric = evaluate_points(loss_fn, params, batch, [d1, d2], coords, metric_fn=metric_fn,
                                   chunk_size=chunk_size, memory_budget_bytes=memory_budget_bytes)
    loss, frac = _mask_nonfinite(loss.reshape(aa.shape))
    _warn_nonfinite(frac, "slice_2d")
    if metric is not None:
        metric = np.where(np.isfinite(loss), metric.reshape(aa.shape), np.nan)
    return Slice2D(g1, g2, loss, metric, frac)


@dataclasses.dataclass(frozen=True)
class accuracy_metric:  # noqa: N801 - used like a function
    """``metric_fn(params, batch)``: classification accuracy of ``model_fn`` (argmax over the
    last axis against integer ``batch[labels_key]``); hashable, so grids stay compiled."""

    model_fn: Callable
    labels_key: str = "labels"

    def __call__(self, params, batch):
        logits = self.model_fn(params, batch)
        return jnp.mean((jnp.argmax(logits, axis=-1) == batch[self.labels_key]).astype(logits.dtype))


# =========================================================================================
# interpolation, barriers, Bezier curves
# =========================================================================================


class Interpolation(NamedTuple):
    """Loss along a path ``t in [0, 1]`` between two solutions.

    Attributes:
        ts: ``(n,)`` path parameters; loss / metric: values there (NaN if not finite).
        barrier: ``max_t loss(t) - (loss(0) + loss(1)) / 2``.
        barrier_t: the ``t`` of the maximum (refined between grid points when asked).
        endpoint_loss: ``(loss(0), loss(1))``.
        nonfinite_fraction: share of path points with a non-finite loss.
    """

    ts: np.ndarray
    loss: np.ndarray
    metric: Optional[np.ndarray]
    barrier: float
    barrier_t: float
    endpoint_loss: tuple[float, float]
    nonfinite_fraction: float


def _path_barrier(path_loss: Callable[[np.ndarray], np.ndarray], ts: np.ndarray,
                  refine: bool, zooms: int = 3, points: int = 32):
    """Evaluate a path loss on ``ts`` (+ the endpoints) and find its barrier.

    With ``refine`` the maximum is refined by ``zooms`` rounds of a ``points``-point grid on
    the bracket around the current best (each round one compiled, vmapped call), shrinking
    the bracket ``points / 2``-fold per round.
    """
    full = np.unique(np.concatenate([ts, [0.0, 1.0]]))
    values = path_loss(full)
    masked, frac = _mask_nonfinite(values)
    ends = (float(masked[np.searchsorted(full, 0.0)]), float(masked[np.searchsorted(full, 1.0)]))
    on_ts = masked[np.searchsorted(full, ts)]
    if np.all(np.isnan(masked)):
        return on_ts, float("nan"), float("nan"), ends, frac
    i = int(np.nanargmax(masked))
    t_best, v_best = float(full[i]), float(masked[i])
    if refine and 0 < i < len(full) - 1:
        lo, hi = float(full[i - 1]), float(full[i + 1])
        for _ in range(zooms):
            grid = np.linspace(lo, hi, points)
            vals, _ = _mask_nonfinite(path_loss(grid))
            if np.all(np.isnan(vals)):
                break
            j = int(np.nanargmax(vals))
            if vals[j] > v_best:
                t_best, v_best = float(grid[j]), float(vals[j])
            step = grid[1] - grid[0]
            lo, hi = t_best - step, t_best + step
    barrier = v_best - 0.5 * (ends[0] + ends[1])
    return on_ts, float(barrier), t_best, ends, frac


def interpolate(
    loss_fn: LossFn,
    params_a: PyTree,
    params_b: PyTree,
    batch: PyTree,
    *,
    num_points: int = 25,
    ts: Any = None,
    metric_fn: Optional[LossFn] = None,
    refine: bool = True,
    chunk_size: Optional[int] = None,
) -> Interpolation:
    """The loss on the straight line ``(1 - t) a + t b`` and its barrier.

    Args:
        loss_fn, batch: the loss and data.
        params_a, params_b: the two solutions (same pytree structure).
        num_points: points of an even grid on ``[0, 1]`` (ignored when ``ts`` is given).
        ts: explicit strictly increasing path parameters (may leave ``[0, 1]``).
        metric_fn: optional extra function on the same points.
        refine: refine the maximum between grid points by golden-section search.

    Raises:
        ValueError: mismatched pytrees, bad ``ts`` / ``num_points``.
    """
    if ts is None:
        if int(num_points) < 2:
            raise ValueError(f"num_points must be >= 2, got {num_points}")
        ts = np.linspace(0.0, 1.0, int(num_points))
    ts = _check_grid(ts, "ts")
    check_params(params_a, "params_a")
    params_b = _check_direction(params_b, params_a, "params_b")
    direction = _tree_sub(params_b, params_a)
    evaluator = _Evaluator(loss_fn, params_a, batch, [direction], chunk_size=chunk_size)
    on_ts, barrier, t_best, ends, frac = _path_barrier(
        lambda t: evaluator(np.asarray(t)[:, None])[0], ts, refine)
    metric = None
    if metric_fn is not None:
        metric = evaluate_points(loss_fn, params_a, batch, [direction], ts[:, None],
                                 metric_fn=metric_fn, chunk_size=chunk_size)[1]
    return Interpolation(ts, on_ts, metric, barrier, t_best, ends, frac)


def loss_barrier(
    loss_fn: LossFn,
    params_a: PyTree,
    params_b: PyTree,
    batch: PyTree,
    *,
    num_points: int = 25,
    refine: bool = True,
) -> float:
    """``max_t L((1-t) a + t b) - (L(a) + L(b)) / 2`` on the straight path (0 for ``a == b``).

    Positive: the solutions are separated by a ridge (different basins, or one basin that is
    not convex along the line); about zero: linearly mode-connected (Frankle et al. 2020).
    """
    return interpolate(loss_fn, params_a, params_b, batch, num_points=num_points,
                       refine=refine).barrier


def bezier_point(params_a: PyTree, control: PyTree, params_b: PyTree, t: Any) -> PyTree:
    """The quadratic Bezier curve ``(1-t)^2 a + 2 t (1-t) theta + t^2 b`` at ``t``."""
    t = jnp.asarray(t)
    return jax.tree_util.tree_map(
        lambda a, c, b: ((1 - t) ** 2 * a + 2 * t * (1 - t) * c + t**2 * b).astype(a.dtype),
        params_a, control, params_b,
    )


class BezierResult(NamedTuple):
    """A trained quadratic Bezier path between two solutions (Garipov et al. 2018).

    Attributes:
        control: the trained control point ``theta`` (pytree like params).
        ts, loss: loss along the curve on ``ts``; barrier, barrier_t: as in
            :class:`Interpolation` but along the curve.
        linear: the straight-line :class:`Interpolation` for comparison.
        train_loss: ``(num_steps,)`` mean sampled curve loss during training.
    """

    control: PyTree
    ts: np.ndarray
    loss: np.ndarray
    barrier: float
    barrier_t: float
    linear: Interpolation
    train_loss: np.ndarray


def bezier_connect(
    loss_fn: LossFn,
    params_a: PyTree,
    params_b: PyTree,
    batch: PyTree,
    *,
    key: jax.Array,
    num_steps: int = 200,
    learning_rate: float = 1e-2,
    optimizer: Optional[optax.GradientTransformation] = None,
    samples_per_step: int = 4,
    num_points: int = 25,
    init: Optional[PyTree] = None,
) -> BezierResult:
    """Train the control point of a quadratic Bezier curve from ``a`` to ``b`` to minimise
    ``E_{t ~ U(0, 1)} L(phi(t))`` (Garipov et al. 2018), then measure its barrier.

    ``phi(t) = a + 2t (theta - a) + t^2 (a - 2 theta + b)``: a 2-D affine family, so the
    final curve is evaluated by the same compiled grid program as a 2-D slice.

    Args:
        key: ``jax.random`` key for the sampled ``t``.
        num_steps, learning_rate, optimizer: the training (default ``optax.adam``).
        samples_per_step: ``t`` samples per step (vmapped).
        num_points: points of the evaluation grid on ``[0, 1]``.
        init: initial control point (default the midpoint ``(a + b) / 2``).
    """
    check_params(params_a, "params_a")
    params_b = _check_direction(params_b, params_a, "params_b")
    if int(num_steps) < 0 or int(samples_per_step) < 1:
        raise ValueError("num_steps must be >= 0 and samples_per_step >= 1")
    control = (jax.jit(lambda a, b: tu.scale(0.5, tu.add(a, b)))(params_a, params_b) if init is None
               else _check_direction(init, params_a, "init"))
    opt = optimizer if optimizer is not None else optax.adam(learning_rate)
    fn = _static(loss_fn)

    def curve_loss(theta, a, b, batch, ts):
        return jnp.mean(jax.vmap(lambda t: fn(bezier_point(a, theta, b, t), batch))(ts))

    @jax.jit
    def run(theta, a, b, batch, key):
        state = opt.init(theta)

        def step(carry, k):
            th, st = carry
            ts = jax.random.uniform(k, (samples_per_step,), jnp.result_type(float))
            value, g = jax.value_and_grad(curve_loss)(th, a, b, batch, ts)
            upd, st = opt.update(g, st, th)
            return (optax.apply_updates(th, upd), st), value

        (th, _), losses = jax.lax.scan(step, (theta, state), jax.random.split(key, num_steps))
        return th, losses

    control, losses = run(control, params_a, params_b, batch, key)
    ts = np.linspace(0.0, 1.0, int(num_points))
    d1, d2 = _bezier_offsets(params_a, control, params_b)

    evaluator = _Evaluator(loss_fn, params_a, batch, [d1, d2])

    def path_loss(t):
        t = np.asarray(t)
        return evaluator(np.stack([2 * t, t**2], 1))[0]

    on_ts, barrier, t_best, _, _ = _path_barrier(path_loss, ts, refine=True)
    linear = interpolate(loss_fn, params_a, params_b, batch, num_points=num_points)
    return BezierResult(control, ts, on_ts, barrier, t_best, linear, np.asarray(losses))


# =========================================================================================
# sharpness
# =========================================================================================


def lambda_max(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    key: Optional[jax.Array] = None,
    dense_limit: int = DENSE_LIMIT,
) -> float:
    """The largest Hessian eigenvalue (exact for ``n_params <= dense_limit``, else Lanczos)."""
    if tu.size(params) <= dense_limit:
        return float(_small_hessian_eigh(loss_fn, params, batch)[0][-1])
    op = hessian(loss_fn, params, batch)
    return float(top_eigenpairs(op, 1, key=key, dense_limit=dense_limit,
                                return_eigenvectors=False).eigenvalues[0])


def hessian_trace(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    key: Optional[jax.Array] = None,
    num_samples: int = 100,
    dense_limit: int = DENSE_LIMIT,
) -> float:
    """``tr H``: exact for ``n_params <= dense_limit``, else Hutchinson's estimator."""
    if tu.size(params) <= dense_limit:
        return float(np.sum(_small_hessian_eigh(loss_fn, params, batch)[0]))
    op = hessian(loss_fn, params, batch)
    from gradience_jax.estimators import hutchinson_trace  # noqa: PLC0415

    key = key if key is not None else jax.random.key(0)
    return float(hutchinson_trace(op, key, num_samples=num_samples).estimate)


def _sign_nz(g):
    return jnp.where(g >= 0, 1.0, -1.0).astype(g.dtype)


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_steps"))
def _ascent(loss_fn, params, batch, scale, u0, radius, step_size, num_steps, box):
    """Projected gradient ascent of ``L(w + scale * u)`` over ``||u|| <= radius``: the box
    ``||u||_inf`` with sign steps when ``box`` is true, else the 2-ball with normalised
    steps (``box`` is traced, so both share one compiled program)."""

    def f(u):
        return loss_fn(jax.tree_util.tree_map(
            lambda w, s, x: w + (s * x).astype(w.dtype), params, scale, u), batch)

    def project(u):
        n = tu.norm(u)
        shrink = jnp.minimum(1.0, radius / jnp.maximum(n, 1e-300))
        return jax.tree_util.tree_map(
            lambda x: jnp.where(box, jnp.clip(x, -radius, radius), shrink * x), u)

    u0 = project(u0)
    v0 = f(u0)

    def body(k, carry):
        u, best_v, best_u = carry
        g = jax.grad(f)(u)
        eta = step_size * radius / (k + 1.0)
        gn = tu.norm(g)
        g_scale = jnp.where(gn > 0, eta / jnp.maximum(gn, 1e-300), 0.0)
        u = jax.tree_util.tree_map(
            lambda x, gx: x + jnp.where(box, eta * _sign_nz(gx), g_scale * gx).astype(x.dtype),
            u, g)
        u = project(u)
        v = f(u)
        better = v > best_v
        best_u = jax.tree_util.tree_map(lambda a, b: jnp.where(better, a, b), u, best_u)
        return u, jnp.where(better, v, best_v), best_u

    _, best_v, best_u = jax.lax.fori_loop(0, num_steps, body, (u0, v0, u0))
    return f(tu.zeros_like(u0)), best_v, best_u


class EpsilonSharpness(NamedTuple):
    """Keskar et al. (2017) sharpness.

    Attributes:
        value: ``100 * (max_loss - loss) / (1 + loss)`` (their normalised measure, in %).
        loss: loss at the point; max_loss: largest loss found in the box.
        perturbation: the maximising ``delta`` (pytree like params).
        epsilon: the box size.
    """

    value: float
    loss: float
    max_loss: float
    perturbation: PyTree
    epsilon: float


def _start(key, params, radius, ball):
    if key is None:
        return tu.zeros_like(params)
    if ball == "inf":
        leaves, treedef = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(key, len(leaves))
        return jax.tree_util.tree_unflatten(treedef, [
            jax.random.uniform(k, x.shape, x.dtype, -radius, radius) for k, x in zip(keys, leaves)])
    u = tu.random_like(key, params)
    return tu.scale(radius / tu.norm(u), u)


def epsilon_sharpness(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    epsilon: float = 1e-3,
    *,
    relative: bool = True,
    num_steps: int = 20,
    step_size: float = 1.0,
    key: Optional[jax.Array] = None,
) -> EpsilonSharpness:
    """Keskar et al. (2017) epsilon-sharpness: the largest loss in a box around ``params``.

    ``max L(w + delta)`` over ``|delta_i| <= epsilon (|w_i| + 1)`` (``relative=True``, their
    ``C_epsilon`` with ``A = I``) or ``|delta_i| <= epsilon`` (``relative=False``), found by
    projected sign-gradient ascent (``num_steps`` steps of ``step_size * epsilon / k`` in the
    scaled box; Keskar et al. used L-BFGS-B). The best point seen is kept, so the value is a
    lower bound of the true maximum; for a convex separable loss it is exact.

    Args:
        epsilon: box size (``> 0``).
        relative: box proportional to ``|w| + 1`` (Keskar) or absolute.
        num_steps, step_size: the ascent.
        key: random start inside the box (default: the centre, with ties of a zero
            gradient broken upwards).

    Raises:
        ValueError: ``epsilon <= 0`` or ``num_steps < 1``.
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    check_params(params)
    check_batch(batch)
    scale = jax.tree_util.tree_map(
        lambda w: (jnp.abs(w) + 1.0) if relative else jnp.ones_like(w), params)
    u0 = _start(key, params, epsilon, "inf")
    loss, best, u = _ascent(_static(loss_fn), params, batch, scale, u0, epsilon, step_size,
                            int(num_steps), True)
    loss, best = float(loss), float(best)
    delta = jax.tree_util.tree_map(lambda s, x: s * x, scale, u)
    return EpsilonSharpness(100.0 * (best - loss) / (1.0 + loss), loss, best, delta, float(epsilon))


class AdaptiveSharpness(NamedTuple):
    """Kwon et al. (2021) adaptive sharpness.

    Attributes:
        value: ``max_loss - loss``; loss, max_loss, perturbation ``delta``, rho, p as given.
    """

    value: float
    loss: float
    max_loss: float
    perturbation: PyTree
    rho: float
    p: str


def adaptive_sharpness(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    rho: float = 0.05,
    *,
    p: Any = 2,
    eta: float = 0.0,
    num_steps: int = 20,
    step_size: float = 1.0,
    key: Optional[jax.Array] = None,
) -> AdaptiveSharpness:
    """Adaptive (scale-invariant) sharpness, Kwon et al. 2021 (ASAM):
    ``max_{||T_w^{-1} delta||_p <= rho} L(w + delta) - L(w)`` with ``T_w = diag(|w| + eta)``.

    With ``eta = 0`` the value is invariant under the rescalings that leave a ReLU
    network's function unchanged (``W1 -> a W1, b1 -> a b1, W2 -> W2 / a``), unlike
    ``lambda_max`` (Dinh et al. 2017); see :func:`rescaling_check`. ASAM itself uses
    ``eta = 0.01``. Solved by projected gradient ascent in ``u = T_w^{-1} delta``
    (``p=2``: normalised steps on the ball; ``p="inf"``: sign steps in the box).

    Raises:
        ValueError: ``rho <= 0``, ``p`` not 2 / ``"inf"``, ``eta < 0``, ``num_steps < 1``.
    """
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    ball = {2: "2", "2": "2", "inf": "inf", float("inf"): "inf"}.get(p)
    if ball is None:
        raise ValueError(f"p must be 2 or 'inf', got {p!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    check_params(params)
    check_batch(batch)
    scale = jax.tree_util.tree_map(lambda w: jnp.abs(w) + eta, params)
    u0 = _start(key, params, rho, ball)
    loss, best, u = _ascent(_static(loss_fn), params, batch, scale, u0, rho, step_size,
                            int(num_steps), ball == "inf")
    delta = jax.tree_util.tree_map(lambda s, x: s * x, scale, u)
    return AdaptiveSharpness(float(best) - float(loss), float(loss), float(best), delta,
                             float(rho), ball)


@dataclasses.dataclass(frozen=True)
class SharpnessReport:
    """All sharpness measures at one point (see :func:`sharpness_report`)."""

    loss: float
    lambda_max: float
    lambda_min: Optional[float]
    trace: float
    epsilon_sharpness: float
    adaptive_sharpness: float
    epsilon: float
    rho: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def sharpness_report(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    key: Optional[jax.Array] = None,
    epsilon: float = 1e-3,
    rho: float = 0.05,
    num_steps: int = 20,
    trace_samples: int = 100,
    dense_limit: int = DENSE_LIMIT,
) -> SharpnessReport:
    """``lambda_max``, ``tr H`` (and ``lambda_min`` when dense), Keskar's epsilon-sharpness
    and the adaptive sharpness (``p=2``, ``eta=0``) at ``params``.

    For ``n_params <= dense_limit`` the Hessian is built once densely and gives exact
    eigenvalues and trace; above, Lanczos (``spectrum.eigsh``) and Hutchinson estimate them.
    """
    if tu.size(params) <= dense_limit:
        evals = _small_hessian_eigh(loss_fn, params, batch)[0]
        lmax, lmin, tr = float(evals[-1]), float(evals[0]), float(evals.sum())
    else:
        k1, k2 = jax.random.split(key if key is not None else jax.random.key(0))
        op = hessian(loss_fn, params, batch)
        lmax = float(top_eigenpairs(op, 1, key=k1, dense_limit=dense_limit,
                                    return_eigenvectors=False).eigenvalues[0])
        lmin = None
        tr = hessian_trace(loss_fn, params, batch, key=k2, num_samples=trace_samples,
                           dense_limit=dense_limit)
    eps = epsilon_sharpness(loss_fn, params, batch, epsilon, num_steps=num_steps)
    ada = adaptive_sharpness(loss_fn, params, batch, rho, num_steps=num_steps)
    return SharpnessReport(eps.loss, lmax, lmin, tr, eps.value, ada.value, float(epsilon), float(rho))


def _leaves_under(params: PyTree, prefix: str) -> list[str]:
    pre = prefix.rstrip("/") + "/"
    return [p for p in tu.leaf_paths(params) if p.startswith(pre)]


def rescale_layers(
    params: PyTree,
    alpha: float,
    *,
    first: str = "layers/0",
    second: str = "layers/1",
) -> PyTree:
    """Dinh et al. (2017) reparametrisation: ``W1 -> a W1``, ``b1 -> a b1``, ``W2 -> W2 / a``.

    For a positively homogeneous activation between the two layers (ReLU, leaky ReLU) and
    ``a > 0`` the network computes the same function. ``first`` / ``second`` are path
    prefixes (``tree.path_str``) of the two consecutive layers; every leaf of ``first`` is
    scaled by ``a``, the ``kernel`` of ``second`` by ``1 / a`` (its bias is unchanged).

    Raises:
        ValueError: ``alpha <= 0`` or a prefix matching no parameter.
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (ReLU is only positively homogeneous), got {alpha}")
    for name, prefix in (("first", first), ("second", second)):
        if not _leaves_under(params, prefix):
            raise ValueError(f"{name}={prefix!r} matches no parameter; paths: "
                             f"{tu.leaf_paths(params)[:12]}")
    pre1, pre2 = first.rstrip("/") + "/", second.rstrip("/") + "/"

    def leaf(path, x):
        if path.startswith(pre1):
            return (x * alpha).astype(x.dtype)
        if path.startswith(pre2) and path.rsplit("/", 1)[-1] == "kernel":
            return (x / alpha).astype(x.dtype)
        return x

    return tu.map_with_path(leaf, params)


class RescalingCheck(NamedTuple):
    """The Dinh et al. (2017) caveat, measured (see :func:`rescaling_check`)."""

    alpha: float
    loss: float
    loss_rescaled: float
    max_output_change: Optional[float]
    lambda_max: float
    lambda_max_rescaled: float
    adaptive_sharpness: float
    adaptive_sharpness_rescaled: float


def rescaling_check(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    alpha: float = 10.0,
    *,
    first: str = "layers/0",
    second: str = "layers/1",
    model_fn: Optional[Callable] = None,
    rho: float = 0.05,
    num_steps: int = 20,
    key: Optional[jax.Array] = None,
    dense_limit: int = DENSE_LIMIT,
) -> RescalingCheck:
    """Check Dinh et al. (2017): rescale two consecutive layers of a ReLU network
    (:func:`rescale_layers`) and compare the function, ``lambda_max`` and the adaptive
    sharpness before and after.

    Expected for a ReLU network: same loss and outputs (up to rounding), a different
    ``lambda_max`` (sharpness by curvature is not reparametrisation invariant), the same
    adaptive sharpness (``eta = 0``: scale invariant by construction).
    """
    rescaled = rescale_layers(params, alpha, first=first, second=second)
    out_change = None
    if model_fn is not None:
        out_change = float(jnp.max(jnp.abs(model_fn(params, batch) - model_fn(rescaled, batch))))
    lm = lambda_max(loss_fn, params, batch, key=key, dense_limit=dense_limit)
    lm2 = lambda_max(loss_fn, rescaled, batch, key=key, dense_limit=dense_limit)
    a1 = adaptive_sharpness(loss_fn, params, batch, rho, num_steps=num_steps, key=key)
    a2 = adaptive_sharpness(loss_fn, rescaled, batch, rho, num_steps=num_steps, key=key)
    return RescalingCheck(float(alpha), a1.loss, a2.loss, out_change, lm, lm2, a1.value, a2.value)


# =========================================================================================
# training
# =========================================================================================


class TrainResult(NamedTuple):
    """Outcome of :func:`train`.

    Attributes:
        params: final parameters.
        steps: ``(R,)`` steps at which the state was recorded (``0, every, ..., num_steps``).
        train_loss / eval_loss: ``(R,)`` full-data losses at those steps (eval: None
            without ``eval_data``).
        trajectory: stacked params at those steps (leading axis ``R``).
        step_loss: ``(num_steps,)`` minibatch loss of every step.
    """

    params: PyTree
    steps: np.ndarray
    train_loss: np.ndarray
    eval_loss: Optional[np.ndarray]
    trajectory: PyTree
    step_loss: np.ndarray


@functools.partial(jax.jit, static_argnames=("n", "bs", "num_steps"))
def _minibatch_indices(key, n, bs, num_steps):
    """``(num_steps, bs)`` example indices, each row drawn without replacement."""
    keys = jax.random.split(key, num_steps)
    return jax.vmap(lambda k: jax.random.permutation(k, n)[:bs])(keys)


def sam_optimizer(learning_rate: float, rho: float = 0.05, *, momentum: Optional[float] = None
                  ) -> optax.GradientTransformationExtraArgs:
    """SAM (Foret et al. 2021) as ``optax.contrib.sam`` in opaque mode: every ``update``
    takes one normalised ascent step of radius ``rho`` and one SGD step with the gradient
    there. Needs ``update(..., grad_fn=lambda p, i: grad)`` (:func:`train` passes it)."""
    adv = optax.chain(optax.contrib.normalize(), optax.sgd(rho))
    return optax.contrib.sam(optax.sgd(learning_rate, momentum=momentum), adv,
                             sync_period=2, opaque_mode=True)


def train(
    loss_fn: LossFn,
    params: PyTree,
    data: PyTree,
    *,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    key: jax.Array,
    batch_size: Optional[int] = None,
    eval_data: Optional[PyTree] = None,
    record_every: Optional[int] = None,
) -> TrainResult:
    """Minibatch training in one jitted ``lax.scan`` (``record_every`` steps per outer step).

    Every step samples ``batch_size`` examples of ``data`` without replacement (all of them
    when None) and calls ``optimizer.update(grads, state, params, grad_fn=...)`` so that
    SAM-style transformations (:func:`sam_optimizer`) work; plain optax transformations
    ignore ``grad_fn``.

    Raises:
        ValueError: ``num_steps`` not a multiple of ``record_every``, bad ``batch_size``.
    """
    check_params(params)
    n = check_batch(data, "data")
    num_steps = int(num_steps)
    every = int(record_every) if record_every is not None else max(num_steps, 1)
    if num_steps < 0 or every < 1 or (num_steps and num_steps % every):
        raise ValueError(f"num_steps={num_steps} must be a non-negative multiple of "
                         f"record_every={every}")
    bs = n if batch_size is None else int(batch_size)
    if not 1 <= bs <= n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
    opt = optax.with_extra_args_support(optimizer)
    fn = _static(loss_fn)

    def full_losses(p, data, eval_data):
        ev = fn(p, eval_data) if eval_data is not None else jnp.zeros(())
        return fn(p, data), ev

    @jax.jit
    def run(params, data, eval_data, indices):
        def step(carry, idx):
            p, s = carry
            mb = jax.tree_util.tree_map(lambda x: x[idx], data) if bs < n else data
            value, g = jax.value_and_grad(fn)(p, mb)
            upd, s = opt.update(g, s, p, grad_fn=lambda q, _: jax.grad(fn)(q, mb))
            return (optax.apply_updates(p, upd), s), value

        def outer(carry, idx):
            carry, values = jax.lax.scan(step, carry, idx)
            return carry, (carry[0], full_losses(carry[0], data, eval_data), values)

        state = opt.init(params)
        (p, _), (traj, (tr, ev), values) = jax.lax.scan(outer, (params, state), indices)
        return p, traj, tr, ev, values.reshape(-1), full_losses(params, data, eval_data)

    if bs < n:
        indices = _minibatch_indices(key, n, bs, num_steps)
    else:
        indices = jnp.zeros((num_steps, 0), jnp.int32)
    indices = indices.reshape(num_steps // every, every, -1)
    p, traj, tr, ev, values, (tr0, ev0) = run(params, data, eval_data, indices)
    traj = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), params, traj)
    steps = np.arange(0, num_steps + 1, every) if num_steps else np.array([0])
    tr = np.concatenate([[float(tr0)], np.asarray(tr, np.float64)])
    ev = np.concatenate([[float(ev0)], np.asarray(ev, np.float64)]) if eval_data is not None else None
    return TrainResult(p, steps, tr, ev, traj, np.asarray(values, np.float64))


# =========================================================================================
# experiments behind the seed figures
# =========================================================================================


@dataclasses.dataclass(frozen=True)
class PseudoSpectralResult:
    """Data of the ``pseudo_spectral_analysis`` figure (see
    :func:`pseudo_spectral_experiment`).

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
    key: Optional[jax.Array] = None,
    *,
    num_train: int = 50,
    hidden: int = 3,
    num_steps: int = 3000,
    learning_rate: float = 0.5,
    record_every: int = 100,
    resolution: int = 41,
    surface_span: float = 1.0,
) -> PseudoSpectralResult:
    """The seed notebook's analysis: train the 2-``hidden``-1 sigmoid MLP on
    ``y = sin(x0) + 0.5 x1^2 + noise`` by full-batch gradient descent, then compute the full
    Hessian spectrum, slices along principal curvature directions, the loss surface on the
    top-2 eigenvectors and the trajectory's PCA plane, and ``lambda_max`` / ``lambda_min`` /
    ``tr H`` along training (float64 throughout; a few seconds on a CPU).
    """
    from flax import nnx  # noqa: PLC0415

    from gradience_jax import data as gdata  # noqa: PLC0415
    from gradience_jax.models import SeedMLP, from_nnx  # noqa: PLC0415
    from gradience_jax.operators import heads  # noqa: PLC0415

    key = key if key is not None else jax.random.key(42)
    k_data, k_init, k_train = jax.random.split(key, 3)
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    model = SeedMLP(hidden=hidden, param_dtype=dtype,
                    rngs=nnx.Rngs(int(jax.random.randint(k_init, (), 0, 2**30))))
    adapted = from_nnx(model, heads.mse())
    batch = jax.tree_util.tree_map(lambda x: x.astype(dtype),
                                   gdata.seed_regression(k_data, n=num_train))
    res = train(adapted.loss_fn, adapted.params, batch, optimizer=optax.sgd(learning_rate),
                num_steps=num_steps, key=k_train, record_every=record_every)
    params = res.params
    n_params = tu.size(params)
    if n_params <= DENSE_LIMIT:
        evals, evecs = _small_hessian_eigh(adapted.loss_fn, params, batch)
        cols = _unravel_columns(evecs, params)
        picks = {"largest": (evals[-1], cols[-1]), "middle": (evals[len(evals) // 2],
                 cols[len(cols) // 2]), "smallest": (evals[0], cols[0])}
        second = cols[-2]
    else:  # large model: top eigenpairs only (Lanczos)
        top = top_eigenpairs(hessian(adapted.loss_fn, params, batch), min(20, n_params), key=key)
        evals = top.eigenvalues
        picks = {"largest": (evals[0], top.directions[0])}
        second = top.directions[1]
    picks = {k: (lam, _check_direction(v, params, "eigenvector")) for k, (lam, v) in picks.items()}
    second = _check_direction(second, params, "eigenvector")
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
        ev = np.asarray(_dense_hessian_eigvals_stacked(_static(adapted.loss_fn), res.trajectory,
                                                       batch))
    else:  # pragma: no cover - the seed model is tiny
        ev = np.full((len(res.steps), 1), np.nan)
    history = {"steps": res.steps, "loss": res.train_loss, "lambda_max": ev[:, -1],
               "lambda_min": ev[:, 0], "trace": ev.sum(axis=1), "step_loss": res.step_loss}
    return PseudoSpectralResult(params, n_params, np.sort(evals), principal, surface, plane,
                                pca, history)


@dataclasses.dataclass(frozen=True)
class SharpFlatRun:
    """One training recipe of :func:`sharp_vs_flat_experiment`."""

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
    bezier: Optional[BezierResult]
    config: dict


METHODS = {
    "sgd_small": "SGD, small batch",
    "sgd_large": "SGD, large batch",
    "sgd_noise": "SGD + gradient noise",
    "sam": "SAM",
}


def sharp_vs_flat_experiment(
    key: Optional[jax.Array] = None,
    *,
    methods: Sequence[str] = ("sgd_small", "sgd_large", "sgd_noise", "sam"),
    hidden: Sequence[int] = (20, 20),
    num_train: int = 64,
    num_test: int = 512,
    label_noise: float = 0.3,
    num_steps: int = 2000,
    learning_rate: float = 0.1,
    small_batch: int = 8,
    large_batch: Optional[int] = None,
    noise_eta: float = 0.01,
    noise_gamma: float = 0.55,
    sam_rho: float = 0.05,
    record_every: int = 50,
    resolution: int = 25,
    span: float = 1.0,
    bezier_steps: int = 150,
    epsilon: float = 1e-3,
) -> SharpFlatResult:
    """Train one MLP (``2 -> hidden -> 1``, tanh) from the same initialisation with several
    recipes on the seed regression with few, noisy training points, and compare them:

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
    """
    from flax import nnx  # noqa: PLC0415

    from gradience_jax import data as gdata  # noqa: PLC0415
    from gradience_jax.models import MLP, from_nnx  # noqa: PLC0415
    from gradience_jax.operators import heads  # noqa: PLC0415

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {sorted(METHODS)}, "
                         f"got {list(methods)}")
    key = key if key is not None else jax.random.key(0)
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
    d1 = _gaussian_like(jax.random.fold_in(k_dir, 1), params0)
    d2 = _gaussian_like(jax.random.fold_in(k_dir, 2), params0)
    grid = np.linspace(-span, span, resolution)
    runs = {}
    for name in methods:
        opt, bs = recipes[name]
        res = train(loss_fn, params0, train_data, optimizer=opt, num_steps=num_steps,
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
