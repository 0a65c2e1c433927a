"""Attention geometry of a Flax multi-head attention block.

Weights (per head ``h``, Flax layout: ``query/key/value`` kernels ``(d_in, H, Dh)``, ``out``
kernel ``(H, Dh, d_out)``):

* ``attention_svd``: singular values of ``W_Q^h``, ``W_K^h``, ``W_V^h`` (``d_in x Dh``),
  ``W_O^h`` (``Dh x d_out``), the bilinear logit form ``W_Q^h W_K^h^T`` (``d_in x d_in``,
  rank ``<= Dh``; the logits are ``x_t^T W_Q W_K^T x_s / sqrt(Dh)`` without biases) and the
  OV circuit ``W_V^h W_O^h``; their effective rank (Roy & Vetterli 2007), stable rank and
  condition number.

Activations (from ``capture_attention``, which records queries, keys, values and the
attention weights of every ``nnx.MultiHeadAttention`` during one forward pass):

* ``attention_entropy``: ``-sum_s p_ts log p_ts`` averaged over batch and query positions,
  per head (``log S`` for a uniform map); the normalised version divides every row by
  ``log`` of its number of attendable keys (causal rows see ``t + 1``).
* ``attention_effective_rank``: effective rank of every ``T x S`` attention map, averaged.
* ``value_norms``: ``||v_s^h||`` per head and key position.
* ``query_correlation``: Pearson correlation of the ``H * Dh`` query features over tokens
  (feature redundancy within and across heads); ``query_key_correlation``: per head, the
  correlation of query feature ``i`` with key feature ``j`` over tokens.
* ``attention_hessian_eigenvalues``: the Hessian restricted to the block's parameters
  (``params_filter``), dense for small blocks, Lanczos otherwise.

``attention_geometry`` bundles all of it. Numerics only: the experiments that train a
model and produce the data of the two attention figures moved to
:mod:`gradience_jax.experiments.attention` (``attention_geometry_experiment``,
``attention_dynamics_experiment``, their results and ``TASKS``); they stay reachable here
through a lazy module ``__getattr__`` (see ``_MOVED``), which imports them on first use only.

Supported names: those in ``__all__``.

Linen: ``attention_svd`` and the Hessian work on Linen params (same names and layouts); for
maps call the module with ``sow_weights=True`` and pass the weights to the map functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax import tree as tu
from gradience_jax._compat import lazy_exports
from gradience_jax.weights import effective_rank

PyTree = Any

__all__ = [
    "AttentionCapture",
    "AttentionGeometry",
    "AttentionParams",
    "AttentionSVD",
    "attention_capture_fn",
    "attention_effective_rank",
    "attention_entropy",
    "attention_geometry",
    "attention_hessian_eigenvalues",
    "attention_params",
    "attention_svd",
    "capture_attention",
    "effective_rank",
    "qk_effective_rank",
    "query_correlation",
    "query_key_correlation",
    "row_entropy",
    "value_norms",
]


# =========================================================================================
# parameters and their SVD
# =========================================================================================


class AttentionParams(NamedTuple):
    """The projection weights of one multi-head attention block (Flax layout).

    ``wq``, ``wk``, ``wv``: ``(d_in, H, Dh)``; ``wo``: ``(H, Dh, d_out)``; biases ``(H, Dh)``
    / ``(d_out,)`` or None.
    """

    wq: jax.Array
    wk: jax.Array
    wv: jax.Array
    wo: jax.Array
    bq: jax.Array | None = None
    bk: jax.Array | None = None
    bv: jax.Array | None = None
    bo: jax.Array | None = None

    @property
    def num_heads(self) -> int:
        """Number of heads ``H`` (``wq.shape[1]``)."""
        return int(self.wq.shape[1])

    @property
    def head_dim(self) -> int:
        """Per-head dimension ``Dh`` (``wq.shape[2]``)."""
        return int(self.wq.shape[2])


def _flat_params(tree: PyTree) -> dict[str, Any]:
    return {tu.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def attention_params(source: Any, layer: str | None = None) -> AttentionParams:
    """Extract the Q / K / V / O weights of one attention block.

    Args:
        source: an ``nnx.MultiHeadAttention`` module, its parameter state / dict (with
            ``query``, ``key``, ``value``, ``out`` sub-trees), a whole model's params, or a
            whole NNX model.
        layer: path prefix of the block inside ``source`` (e.g. ``"blocks/0/attention"``);
            needed when ``source`` holds more than the block.

    Returns:
        :class:`AttentionParams` with the kernels (and biases, None where absent).

    Raises:
        ValueError: if the kernels are not found or have inconsistent shapes.
    """
    from flax import nnx  # noqa: PLC0415 - flax only to unwrap NNX modules

    if isinstance(source, nnx.Module):
        source = nnx.state(source, nnx.Param)
    flat = _flat_params(source)
    prefix = "" if not layer else layer.rstrip("/") + "/"
    flat = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    names = {"wq": "query/kernel", "wk": "key/kernel", "wv": "value/kernel", "wo": "out/kernel",
             "bq": "query/bias", "bk": "key/bias", "bv": "value/bias", "bo": "out/bias"}
    missing = [names[n] for n in ("wq", "wk", "wv", "wo") if names[n] not in flat]
    if missing:
        blocks = sorted({k.rsplit("/", 2)[0] for k in _flat_params(source)
                         if k.endswith("query/kernel")})
        raise ValueError(
            f"no attention block at layer={layer!r}: missing {missing}. Attention blocks found: "
            f"{[b.rsplit('/query', 1)[0] for b in blocks] or 'none'}"
        )
    out = AttentionParams(**{n: flat.get(p) for n, p in names.items()})
    d_in, h, dh = out.wq.shape if out.wq.ndim == 3 else (None, None, None)
    if out.wq.ndim != 3 or out.wk.shape != out.wq.shape or out.wv.shape[1:] != (h, dh) \
            or out.wo.ndim != 3 or out.wo.shape[:2] != (h, dh):
        raise ValueError(
            "attention kernels must be query/key/value (d_in, H, Dh) and out (H, Dh, d_out); got "
            f"{out.wq.shape}, {out.wk.shape}, {out.wv.shape}, {out.wo.shape}"
        )
    return out


@dataclasses.dataclass(frozen=True)
class AttentionSVD:
    """Per-head singular values and rank metrics of an attention block's matrices.

    Attributes:
        singular_values: ``{name: (H, r)}`` descending, for ``name`` in ``query``, ``key``,
            ``value``, ``out``, ``qk`` (``W_Q^h W_K^h^T``, top ``Dh``) and ``ov``
            (``W_V^h W_O^h``, top ``Dh``).
        effective_rank, stable_rank, condition_number: ``{name: (H,)}``; stable rank
            ``sum s^2 / s_max^2``; condition number ``s_max / s_min`` over the ``r`` values.
    """

    singular_values: dict
    effective_rank: dict
    stable_rank: dict
    condition_number: dict

    @property
    def names(self) -> list[str]:
        """The matrix names (``query``, ``key``, ``value``, ``out``, ``qk``, ``ov``)."""
        return list(self.singular_values)


@jax.jit
def _svd_core(p: AttentionParams) -> dict:
    dh = p.wq.shape[2]
    mats = {
        "query": jnp.moveaxis(p.wq, 1, 0),  # (H, d_in, Dh)
        "key": jnp.moveaxis(p.wk, 1, 0),
        "value": jnp.moveaxis(p.wv, 1, 0),
        "out": p.wo,  # (H, Dh, d_out)
        "qk": jnp.einsum("ihd,jhd->hij", p.wq, p.wk),  # (H, d_in, d_in)
        "ov": jnp.einsum("ihd,hdo->hio", p.wv, p.wo),  # (H, d_in, d_out)
    }
    out = {}
    for name, m in mats.items():
        s = jnp.linalg.svd(m, compute_uv=False)
        out[name] = s[:, :dh] if name in ("qk", "ov") else s
    return out


def attention_svd(source: Any, layer: str | None = None) -> AttentionSVD:
    """Per-head SVD metrics of ``W_Q``, ``W_K``, ``W_V``, ``W_O``, ``W_Q W_K^T`` and ``W_V W_O``.

    Args:
        source: the block, its params or a whole model, as in :func:`attention_params`.
        layer: path prefix of the block inside ``source``, as in :func:`attention_params`.

    Returns:
        :class:`AttentionSVD` (float64 NumPy arrays). Cost: ``6 H`` SVDs, the largest
        ``d_in x d_in`` (``qk``) and ``d_in x d_out`` (``ov``).

    Raises:
        ValueError: as :func:`attention_params`.
    """
    p = attention_params(source, layer)
    svs = {k: np.asarray(v, np.float64) for k, v in _svd_core(p._replace(
        bq=None, bk=None, bv=None, bo=None)).items()}
    erank = {k: np.asarray(effective_rank(v), np.float64) for k, v in svs.items()}
    smax = {k: v[:, 0] for k, v in svs.items()}
    stable = {k: np.where(smax[k] > 0, np.sum(v**2, axis=1) / np.maximum(smax[k], 1e-300) ** 2, 0.0)
              for k, v in svs.items()}
    with np.errstate(divide="ignore", invalid="ignore"):
        cond = {k: np.where(v[:, -1] > 0, v[:, 0] / v[:, -1], np.inf) for k, v in svs.items()}
    return AttentionSVD(svs, erank, stable, cond)


def qk_effective_rank(p: AttentionParams) -> jax.Array:
    """Effective rank (Roy & Vetterli 2007) of every head's logit form ``W_Q^h W_K^h^T``.

    Jittable and vmappable (e.g. over a stacked training trajectory of the kernels).

    Args:
        p: :class:`AttentionParams` with ``wq`` / ``wk`` ``(d_in, H, Dh)`` (biases ignored).

    Returns:
        ``(H,)`` effective ranks, from the top ``Dh`` singular values of the
        ``d_in x d_in`` matrix. Cost: ``H`` SVDs of ``d_in x d_in``.
    """
    return effective_rank(_svd_core(p)["qk"])


# =========================================================================================
# attention maps and activations
# =========================================================================================


def row_entropy(weights: Any) -> jax.Array:
    """Entropy (nats) of every row (last axis) of an attention map; ``0 log 0 = 0``.

    Args:
        weights: attention probabilities ``(..., S)``, rows summing to 1.

    Returns:
        ``(...)`` entropies (the last axis reduced).
    """
    w = jnp.asarray(weights)
    return -jnp.sum(jax.scipy.special.xlogy(w, w), axis=-1)


def _check_weights(weights: Any) -> jax.Array:
    w = jnp.asarray(weights)
    if w.ndim == 3:
        w = w[None]
    if w.ndim != 4:
        raise ValueError(f"weights must have shape (B, H, T, S) or (H, T, S), got {w.shape}")
    return w


def attention_entropy(weights: Any, *, normalized: bool = False) -> jax.Array:
    """Mean attention entropy per head, ``(H,)``.

    Args:
        weights: ``(B, H, T, S)`` or ``(H, T, S)`` attention probabilities.
        normalized: divide every row's entropy by ``log`` of its number of non-zero
            (attendable) keys, so 1 means uniform over what the row can see; rows with a
            single key are skipped.

    Returns:
        ``(H,)`` mean entropies. A uniform map over ``S`` keys has entropy ``log S``
        (normalised: 1).

    Raises:
        ValueError: if ``weights`` is not 3-D or 4-D.
    """
    w = _check_weights(weights)
    h = row_entropy(w)  # (B, H, T)
    if not normalized:
        return jnp.mean(h, axis=(0, 2))
    n = jnp.sum(w > 0, axis=-1)
    valid = n > 1
    ratio = jnp.where(valid, h / jnp.log(jnp.maximum(n, 2)), 0.0)
    return jnp.sum(ratio, axis=(0, 2)) / jnp.maximum(jnp.sum(valid, axis=(0, 2)), 1)


def attention_effective_rank(weights: Any) -> jax.Array:
    """Mean effective rank (Roy & Vetterli) of the ``T x S`` attention maps, per head ``(H,)``.

    Args:
        weights: ``(B, H, T, S)`` or ``(H, T, S)`` attention probabilities.

    Returns:
        ``(H,)`` effective ranks averaged over the batch. Cost: ``B H`` SVDs of ``T x S``.

    Raises:
        ValueError: if ``weights`` is not 3-D or 4-D.
    """
    w = _check_weights(weights)
    s = jnp.linalg.svd(w, compute_uv=False)  # (B, H, min(T, S))
    return jnp.mean(effective_rank(s), axis=0)


def value_norms(value: Any) -> jax.Array:
    """``||v_s^h||`` averaged over the batch: ``(H, S)`` from values ``(B, S, H, Dh)``.

    Args:
        value: ``(B, S, H, Dh)`` or ``(S, H, Dh)`` values.

    Returns:
        ``(H, S)`` mean value norms per head and key position.

    Raises:
        ValueError: if ``value`` is not 3-D or 4-D.
    """
    v = jnp.asarray(value)
    if v.ndim == 3:
        v = v[None]
    if v.ndim != 4:
        raise ValueError(f"value must have shape (B, S, H, Dh), got {v.shape}")
    return jnp.mean(jnp.linalg.norm(v, axis=-1), axis=0).T


def _pearson(x: jax.Array, y: jax.Array) -> jax.Array:
    """Correlation matrix between the columns of ``x (N, a)`` and ``y (N, b)``."""
    xc = x - x.mean(axis=0)
    yc = y - y.mean(axis=0)
    sx = jnp.sqrt(jnp.sum(xc**2, axis=0))
    sy = jnp.sqrt(jnp.sum(yc**2, axis=0))
    denom = jnp.outer(sx, sy)
    return jnp.where(denom > 0, (xc.T @ yc) / jnp.where(denom > 0, denom, 1.0), 0.0)


def query_correlation(query: Any) -> jax.Array:
    """Pearson correlation of the ``H * Dh`` query features over all tokens.

    Args:
        query: ``(..., T, H, Dh)`` queries; all leading axes are tokens.

    Returns:
        ``(H*Dh, H*Dh)`` correlations (head-major order); constant features get 0.

    Raises:
        ValueError: if ``query`` has fewer than 3 axes.
    """
    q = jnp.asarray(query)
    if q.ndim < 3:
        raise ValueError(f"query must have shape (..., T, H, Dh), got {q.shape}")
    flat = q.reshape(-1, q.shape[-2] * q.shape[-1])
    return _pearson(flat, flat)


def query_key_correlation(query: Any, key: Any) -> jax.Array:
    """Per head, the correlation of query feature ``i`` with key feature ``j`` over tokens.

    Self-attention: queries and keys are taken at the same positions.

    Args:
        query: ``(..., T, H, Dh)`` queries.
        key: keys of the same shape as ``query``.

    Returns:
        ``(H, Dh, Dh)`` correlations; constant features get 0.

    Raises:
        ValueError: if the shapes differ or have fewer than 3 axes.
    """
    q, k = jnp.asarray(query), jnp.asarray(key)
    if q.shape != k.shape or q.ndim < 3:
        raise ValueError(
            f"query and key must share a shape (..., T, H, Dh), got {q.shape}, {k.shape}")
    h, dh = q.shape[-2:]
    qf, kf = q.reshape(-1, h, dh), k.reshape(-1, h, dh)
    return jax.vmap(_pearson, in_axes=(1, 1))(qf, kf)


@dataclasses.dataclass(frozen=True)
class AttentionCapture:
    """What one attention block saw and computed in a forward pass.

    ``query (B, T, H, Dh)``, ``key`` / ``value`` ``(B, S, H, Dh)``, ``weights (B, H, T, S)``.
    """

    query: Any
    key: Any
    value: Any
    weights: Any


jax.tree_util.register_dataclass(
    AttentionCapture, data_fields=["query", "key", "value", "weights"], meta_fields=[])


def _attention_modules(model: Any) -> list[tuple[str, Any]]:
    from flax import nnx  # noqa: PLC0415

    return [("/".join(str(p) for p in path), m) for path, m in nnx.iter_modules(model)
            if isinstance(m, nnx.MultiHeadAttention)]


_TAGS = ("gj_query", "gj_key", "gj_value")


def _patched(mha: Any) -> Callable:
    original = mha.attention_fn

    def attention_fn(query, key, value, *args, module=None, **kwargs):
        del module
        for tag, x in zip(_TAGS, (query, key, value)):
            mha.sow(_intermediate(), tag, x)
        return original(query, key, value, *args, module=mha, **kwargs)

    return attention_fn


def _intermediate():
    from flax import nnx  # noqa: PLC0415

    return nnx.Intermediate


def _run_captured(model: Any, call: Callable[[Any], Any]) -> tuple[Any, dict]:
    from flax import nnx  # noqa: PLC0415

    mods = _attention_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__} contains no nnx.MultiHeadAttention")
    originals = [m.attention_fn for _, m in mods]
    try:
        for _, m in mods:
            m.attention_fn = _patched(m)
        out, inter = nnx.capture(lambda mdl: call(mdl), nnx.Intermediate)(model)
    finally:
        for (_, m), fn in zip(mods, originals):
            m.attention_fn = fn
    tree = nnx.to_pure_dict(inter)
    result = {}
    for path, _ in mods:
        node = tree
        for part in path.split("/") if path else []:
            node = node[int(part)] if isinstance(node, (list, tuple)) or (
                isinstance(node, dict) and part.isdigit() and int(part) in node) else node[part]
        if "attention_weights" not in node:
            raise ValueError(
                f"the attention_fn of '{path}' does not sow 'attention_weights' when given "
                "module=...; use flax's or gradience_jax's dot_product_attention")
        result[path] = AttentionCapture(node["gj_query"][0], node["gj_key"][0],
                                        node["gj_value"][0], node["attention_weights"][0])
    return out, result


def capture_attention(model: Any, *args: Any, method: str | None = None, **kwargs: Any
                      ) -> dict[str, AttentionCapture]:
    """Run the model once and return what every ``nnx.MultiHeadAttention`` block computed.

    Calls ``model(*args, **kwargs)`` (or ``getattr(model, method)(...)``) and records every
    ``nnx.MultiHeadAttention``'s queries, keys, values and attention weights. The model is
    left unchanged.

    Works with any ``attention_fn`` that sows ``"attention_weights"`` when passed
    ``module=`` (Flax's and gradience_jax's ``dot_product_attention`` do). If a block runs
    several times in one pass, the first call is reported.

    Args:
        model: an NNX model containing attention blocks.
        *args: positional arguments of the call.
        method: name of the method to call instead of ``model`` itself.
        **kwargs: keyword arguments of the call.

    Returns:
        ``{module path: AttentionCapture}``, keyed like ``"blocks/0/attention"``.

    Raises:
        ValueError: no attention module, or an ``attention_fn`` that does not sow weights.
    """
    from flax import nnx  # noqa: PLC0415

    fn = jax.jit(attention_capture_fn(model, method=method, **kwargs))
    return fn(nnx.split(model, nnx.Param, ...)[1], *args)


def attention_capture_fn(model: Any, *, method: str | None = None, **kwargs: Any) -> Callable:
    """A pure ``fn(params, *args) -> {path: AttentionCapture}`` for ``model``'s graph.

    ``params = nnx.split(model, nnx.Param, ...)[1]`` (the ``from_nnx`` params). The function
    can be jitted and vmapped, e.g. over a stacked training trajectory.

    Args:
        model: an NNX model containing attention blocks (its graph is captured once).
        method: name of the method to call instead of the model itself.
        **kwargs: keyword arguments passed to every call.

    Returns:
        ``fn(params, *args)`` returning ``{module path: AttentionCapture}`` as
        :func:`capture_attention`.
    """
    from flax import nnx  # noqa: PLC0415

    graphdef, _, *rest = nnx.split(model, nnx.Param, ...)

    def fn(params, *args):
        mdl = nnx.merge(graphdef, params, *rest)

        def call(m):
            f = m if method is None else getattr(m, method)
            return f(*args, **kwargs)

        return _run_captured(mdl, call)[1]

    return fn


# =========================================================================================
# Hessian restricted to the attention block
# =========================================================================================


def attention_hessian_eigenvalues(
    loss_fn: Callable,
    params: PyTree,
    batch: PyTree,
    *,
    layer: str | None = None,
    predicate: Callable[[str, Any], bool] | None = None,
    k: int | None = None,
    key: jax.Array | None = None,
    dense_limit: int = 2000,
) -> np.ndarray:
    """Eigenvalues (descending) of the Hessian restricted to an attention block's parameters.

    The restriction is ``P^T H P`` through :func:`gradience_jax.params_filter`.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params: the model parameters (pytree) at which the Hessian is taken.
        batch: the data passed to ``loss_fn``.
        layer: path prefix of the block (``"blocks/0/attention"``); default: every leaf
            whose path contains ``"attention"``. ``predicate`` overrides it.
        predicate: ``predicate(path, leaf) -> bool`` selecting the leaves; overrides ``layer``.
        k: number of top eigenvalues; default all of them when the block has at most
            ``dense_limit`` parameters (dense, exact), else 10 by Lanczos.
        key: PRNG key of the Lanczos start vector (large blocks only).
        dense_limit: largest selected parameter count handled by a dense eigendecomposition.

    Returns:
        ``(k,)`` float64 eigenvalues, descending. Cost: ``n`` Hessian-vector products and
        one ``eigh`` when dense (``n`` selected parameters), else one Lanczos run.

    Raises:
        ValueError: no parameter selected.
        FloatingPointError: the restricted Hessian is not finite.
    """
    from gradience_jax.landscape.eigen import top_eigenpairs  # noqa: PLC0415
    from gradience_jax.operators.hessian import hessian  # noqa: PLC0415
    from gradience_jax.operators.select import params_filter  # noqa: PLC0415

    if predicate is None:
        if layer is None:
            predicate = lambda path, leaf: "attention" in path  # noqa: E731
        else:
            pre = layer.rstrip("/") + "/"
            predicate = lambda path, leaf: path.startswith(pre)  # noqa: E731
    # check=False: the dense / Lanczos result is checked for finiteness instead (one compile
    # fewer); linearize=False: the operator is applied in one vmapped program.
    op = params_filter(hessian(loss_fn, params, batch, linearize=False, check=False), predicate)
    n = op.n_params
    if k is None:
        k = n if n <= dense_limit else min(10, n)
    return np.asarray(top_eigenpairs(op, int(k), key=key, dense_limit=dense_limit,
                                     return_eigenvectors=False).eigenvalues, np.float64)


# =========================================================================================
# everything at once
# =========================================================================================


@dataclasses.dataclass(frozen=True)
class AttentionGeometry:
    """Geometry of one attention block (see :func:`attention_geometry`).

    Attributes:
        layer: the block's path; num_heads, head_dim.
        svd: :class:`AttentionSVD` of its weights.
        weights: ``(B, H, T, S)`` attention maps on the given inputs.
        entropy / normalized_entropy / effective_rank: ``(H,)`` map statistics.
        value_norms: ``(H, S)``; query_correlation ``(H*Dh, H*Dh)``;
        query_key_correlation ``(H, Dh, Dh)``.
        hessian_eigenvalues: descending, of the Hessian restricted to the block (or None).
    """

    layer: str
    num_heads: int
    head_dim: int
    svd: AttentionSVD
    weights: np.ndarray
    entropy: np.ndarray
    normalized_entropy: np.ndarray
    effective_rank: np.ndarray
    value_norms: np.ndarray
    query_correlation: np.ndarray
    query_key_correlation: np.ndarray
    hessian_eigenvalues: np.ndarray | None

    def summary(self) -> dict:
        """Per-head scalars as plain lists (JSON-safe)."""
        return {
            "layer": self.layer,
            "entropy": self.entropy.tolist(),
            "normalized_entropy": self.normalized_entropy.tolist(),
            "map_effective_rank": self.effective_rank.tolist(),
            "mean_value_norm": self.value_norms.mean(axis=1).tolist(),
            "qk_effective_rank": self.svd.effective_rank["qk"].tolist(),
            "ov_effective_rank": self.svd.effective_rank["ov"].tolist(),
            "hessian_lambda_max": (None if self.hessian_eigenvalues is None
                                   else float(self.hessian_eigenvalues[0])),
        }


def _pick_layer(model: Any, layer: str | None) -> str:
    paths = [p for p, _ in _attention_modules(model)]
    if not paths:
        raise ValueError(f"{type(model).__name__} contains no nnx.MultiHeadAttention")
    if layer is None:
        if len(paths) > 1:
            raise ValueError(f"the model has several attention blocks {paths}: pass layer=")
        return paths[0]
    layer = layer.rstrip("/")
    if layer not in paths:
        raise ValueError(f"layer={layer!r} is not an attention block; choose one of {paths}")
    return layer


def attention_geometry(
    model: Any,
    inputs: Any,
    *,
    layer: str | None = None,
    loss_fn: Callable | None = None,
    batch: PyTree | None = None,
    hessian_k: int | None = None,
    key: jax.Array | None = None,
) -> AttentionGeometry:
    """All attention-geometry measures of one ``nnx.MultiHeadAttention`` block of ``model``.

    Args:
        model: an NNX model (or the attention module itself).
        inputs: what ``model`` is called with (one positional argument).
        layer: the block's path (``"blocks/0/attention"``); may be omitted if there is one.
        loss_fn: when given (with ``batch``), the Hessian restricted to the block's parameters
            is computed at ``params = nnx.split(model, nnx.Param, ...)[1]`` (the params of
            ``models.from_nnx``, whose ``loss_fn`` fits here).
        batch: the data of ``loss_fn`` (required with it).
        hessian_k: number of Hessian eigenvalues (default all for a small block).
        key: Lanczos key for large blocks.

    Returns:
        :class:`AttentionGeometry` of the block.

    Raises:
        ValueError: no attention block, an unknown or ambiguous ``layer``, or ``loss_fn``
            without ``batch``.
    """
    from flax import nnx  # noqa: PLC0415

    layer = _pick_layer(model, layer)
    cap = capture_attention(model, inputs)[layer]
    svd = attention_svd(model, layer or None)
    w = cap.weights
    stats = {k: np.asarray(v, np.float64) for k, v in _map_stats(cap).items()}
    h_eigs = None
    if loss_fn is not None:
        if batch is None:
            raise ValueError("batch is required with loss_fn (the Hessian's data)")
        params = nnx.split(model, nnx.Param, ...)[1]
        pred = None if layer else (lambda path, leaf: True)  # the model is the block
        h_eigs = attention_hessian_eigenvalues(loss_fn, params, batch, layer=layer or None,
                                               predicate=pred, k=hessian_k, key=key)
    return AttentionGeometry(
        layer=layer,
        num_heads=int(w.shape[1]),
        head_dim=int(cap.query.shape[-1]),
        svd=svd,
        weights=np.asarray(w, np.float64),
        hessian_eigenvalues=h_eigs,
        **stats,
    )


@jax.jit
def _map_stats(cap: AttentionCapture) -> dict:
    w = cap.weights
    return dict(
        entropy=attention_entropy(w),
        normalized_entropy=attention_entropy(w, normalized=True),
        effective_rank=attention_effective_rank(w),
        value_norms=value_norms(cap.value),
        query_correlation=query_correlation(cap.query),
        query_key_correlation=query_key_correlation(cap.query, cap.key),
    )


# =========================================================================================
# names that moved up to gradience_jax.experiments.attention
# =========================================================================================

#: Names that moved up to the experiments layer: ``name -> new home`` (imported lazily).
_MOVED = {
    "AttentionDynamicsResult": "gradience_jax.experiments.attention",
    "AttentionGeometryResult": "gradience_jax.experiments.attention",
    "TASKS": "gradience_jax.experiments.attention",
    "attention_dynamics_experiment": "gradience_jax.experiments.attention",
    "attention_geometry_experiment": "gradience_jax.experiments.attention",
}


__getattr__, __dir__ = lazy_exports(globals(), _MOVED)
