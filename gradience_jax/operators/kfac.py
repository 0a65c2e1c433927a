"""Kronecker-factored approximate curvature (K-FAC) as a :class:`LinearOperator`.

For a layer ``s = a W (+ b)`` with kernel matrix ``W`` of shape ``(d_in, d_out)`` the
GGN / Fisher block of ``W`` is approximated by ``A (x) B`` (Martens & Grosse 2015):

* ``A`` ``(d_in, d_in)``: second moment of the layer's input activations ``a``
  (with a trailing 1 appended when the bias is folded into the kernel: ``[W; b]``),
* ``B`` ``(d_out, d_out)``: second moment of the backpropagated output gradients ``g``
  (gradients of the loss's output-space square-root factor w.r.t. ``s``).

The operator acts on a kernel direction ``V`` as ``V -> A V B`` (row-major
``vec(A V B) = (A (x) B) vec(V)``), evaluated in the factors' eigenbases
``A = Q_A L_A Q_A^T``, ``B = Q_B L_B Q_B^T``: ``A V B = Q_A [(l_A l_B^T) * (Q_A^T V Q_B)] Q_B^T``.
The dense ``A (x) B`` is never formed; a product costs ``O(d_in^2 d_out + d_in d_out^2)``
per layer. :meth:`KFACOperator.inverse` applies ``(A (x) B + damping I)^power`` the same way
(eigenvalue-wise damping, so it is the exact inverse of ``damped(K, damping)``).

Layers (found automatically, see "Interception" below):
    Dense: ``lax.dot_general`` of an activation with a parameter, no dot batch dimensions;
        covers ``nnx.Linear`` / ``nn.Dense`` and the Dense-General / einsum projections of
        attention (``nnx.LinearGeneral``: query / key / value kernels ``(d, heads, d_head)``,
        output kernel ``(heads, d_head, d)``): contracted kernel axes form ``d_in``, the
        others ``d_out``.
    Conv: ``lax.conv_general_dilated`` with a parameter kernel and one feature group,
        as a Dense layer on image patches (KFC, Grosse & Martens 2016); the spatial output
        locations are the shared positions.
    Embed: a row ``gather`` from a 2-D parameter (``jnp.take`` / ``nnx.Embed``): a Dense
        layer on one-hot inputs, whose ``A`` is diagonal (token frequencies) and is stored
        as a vector.
    Bias: folded into its layer (``[W; b]``, homogeneous coordinate) when it is added to the
        layer's output and broadcast over all positions; otherwise reported as uncovered.

Sequence / spatial axes (Eschenhagen et al. 2023, "Kronecker-Factored Approximate
Curvature for Modern Neural Network Architectures"). Each example ``n`` is fed to
``model_fn`` as a batch of one (``vmap``), so a layer sees ``R`` positions ``r`` per example
(tokens, pixels, or ``R = 1``). With ``g_{k,n,r}`` the output gradient of column ``k`` of
the loss Hessian's square root (or of a sampled / observed label):

* ``kfac_approx="expand"`` (default; language models, per-position losses):
  ``A = 1/(N R) sum_{n,r} a_nr a_nr^T``, ``B = sum_{k,n,r} g_knr g_knr^T``.
* ``kfac_approx="reduce"`` (losses of pooled representations, e.g. classification after
  mean pooling): ``A = 1/N sum_n abar_n abar_n^T`` with ``abar_n = 1/R sum_r a_nr`` and
  ``B = sum_{k,n} gbar_kn gbar_kn^T`` with ``gbar_kn = sum_r g_knr``.

Both coincide when ``R = 1``. Embeddings always use "expand" (their ``A`` stays diagonal).
As in curvlinops, each square-root column is backpropagated for all tokens at once, so for
layers whose positions interact before the loss (attention inputs, embeddings) ``B`` also
holds cross-token terms (``"mc"`` samples are independent per token, so there these terms
vanish in expectation).

The gradients ``g`` carry the head's token weights and normaliser (``sqrt(w_t / Z)``), so
``sum_{n,r} a a^T (x) g g^T`` is exactly the GGN block; K-FAC replaces that sum of
Kronecker products by a product of sums. Exact cases (tested): a batch of one example with
``R = 1`` (any depth, any head), identical activations (e.g. one input repeated with
different labels or token weights), a linear model with MSE (``B`` constant), and "reduce"
for a single linear layer followed by mean pooling with one example. Otherwise: on the test
models (random init, synthetic data) the relative Frobenius distance to the block-diagonal
GGN is 0.34-0.49 (``tests/test_kfac.py`` bounds it by 0.85); ``benchmarks/kfac_vs_ggn.py``
tabulates it with eigenvalue ratios and subspace overlaps.

Fisher types (``fisher_type``), following curvlinops' naming:

* ``"type-2"`` (default): ``g`` from each column of the exact per-token square root of the
  head's Hessian (softmax CE: ``sqrt(p_c) (e_c - p)``; MSE: ``sqrt(2) e_c``): ``C`` backward
  passes (vmapped), deterministic, the K-FAC of the GGN. For large vocabularies prefer
  ``"mc"``.
* ``"mc"``: labels sampled from the model (the Monte-Carlo / sampled-label Fisher,
  ``num_samples`` backward passes, needs ``key``); its expectation is ``"type-2"``.
* ``"empirical"``: the observed labels' per-example gradients (K-FAC of the empirical
  Fisher ``1/N sum_n g_n g_n^T``); works with any head callable.

Interception (how activations and output gradients are captured) and coverage:
:mod:`gradience_jax.operators.kfac_layers` finds the layers in the model's jaxpr and
re-evaluates it with probes on the layer outputs (no model changes, no ``sow``). Every
parameter leaf is either covered (a kernel or folded bias of exactly one recognised layer)
or listed in ``K.coverage.uncovered`` with the reason; uncovered parameters get a zero block
(so ``K.inverse(damping)`` acts there as ``damping^power I``), and the report is emitted once
as a :class:`KFACCoverageWarning`.

Supported names: ``FISHER_TYPES``, ``KFACCoverage``, ``KFACCoverageWarning``, ``KFACLayer``,
``KFACOperator``, ``KroneckerFactors``, ``kfac``, ``kfac_inverse`` (the ``__all__`` list);
``KFAC_APPROX`` lists the ``kfac_approx`` choices.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradience_jax._validate import (
    ArgumentTypeError,
    check_batch,
    check_choice,
    check_int,
    check_key,
    check_loss_at_point,
    check_params,
    check_real,
    check_scalar_fn,
    is_traced,
)
from gradience_jax.operators._common import check_callable
from gradience_jax.operators.base import LinearOperator
from gradience_jax.operators.heads import (
    Head,
    MeanSquaredError,
    SoftmaxCrossEntropy,
    check_targets,
    compose,
)
from gradience_jax.operators.kfac_layers import (
    KFACCoverage,
    KFACCoverageWarning,
    KFACLayer,
    _apply_eqns,
    _get_plan,
    _Plan,
    _run,
    _Tag,
    _warn_coverage,
)

PyTree = Any

FISHER_TYPES = ("type-2", "mc", "empirical")
KFAC_APPROX = ("expand", "reduce")

__all__ = [
    "FISHER_TYPES",
    "KFACCoverage",
    "KFACCoverageWarning",
    "KFACLayer",
    "KFACOperator",
    "KroneckerFactors",
    "kfac",
    "kfac_inverse",
]


# ---------------------------------------------------------------------------------------
# output-space factors
# ---------------------------------------------------------------------------------------


def head_hessian_factor(head: Head, outputs: jax.Array, targets: Any) -> tuple:
    """Rows ``q_k`` and weights ``c_k`` with ``H_t = sum_k c_k q_k q_k^T`` per token.

    ``H_t``: the head's unweighted per-token output Hessian (as ``Head.token_hvp``). Softmax
    CE: ``q_k = sqrt(p_k) (e_k - p)``, ``c_k = sum_c y_c`` (soft targets; integer labels:
    ones); MSE: ``q_k = e_k``, ``c_k = 2``; other heads: the eigendecomposition (signed
    eigenvalues). K-FAC uses ``sqrt(max(c_k, 0)) q_k``; the exact GGN diagonal
    (:func:`gradience_jax.laplace.ggn_diagonal`) the signed weights.

    Args:
        head: a :class:`Head`.
        outputs: ``(*lead, C)`` model outputs.
        targets: ``head.targets(batch)`` (or ``None``).

    Returns:
        ``q`` ``(*lead, K, C)`` and ``c`` broadcastable to ``(*lead, K)`` (``None``: ones).
    """
    lead, num_classes = outputs.shape[:-1], outputs.shape[-1]
    dt = outputs.dtype
    eye = jnp.eye(num_classes, dtype=dt)
    if isinstance(head, SoftmaxCrossEntropy):
        p = jax.nn.softmax(outputs, axis=-1)
        q = jnp.sqrt(p)[..., :, None] * (eye - p[..., None, :])
        if targets is not None and not jnp.issubdtype(jnp.result_type(targets), jnp.integer):
            return q, jnp.asarray(targets, dt).sum(-1)[..., None]
        return q, None
    if isinstance(head, MeanSquaredError):
        return jnp.broadcast_to(eye, lead + (num_classes, num_classes)), jnp.asarray(2.0, dt)
    basis = jnp.moveaxis(jnp.broadcast_to(eye, lead + (num_classes, num_classes)), -2, 0)
    cols = jax.vmap(lambda u: head.token_hvp(outputs, targets, u))(basis)  # (C, *lead, C)
    hmat = jnp.moveaxis(cols, 0, -1)  # (*lead, C_out, C_in)
    evals, evecs = jnp.linalg.eigh(0.5 * (hmat + jnp.swapaxes(hmat, -1, -2)))
    return jnp.swapaxes(evecs, -1, -2), evals


def _hessian_sqrt(head: Head, outputs: jax.Array, targets: Any) -> jax.Array:
    """Columns ``q_k`` with ``sum_k q_k q_k^T = H_t`` per token: ``(K, *lead, C)``.

    Negative curvature of a non-convex head (or of soft targets with a negative sum) is
    clipped to 0.
    """
    q, c = head_hessian_factor(head, outputs, targets)
    if c is not None:
        q = q * jnp.sqrt(jnp.maximum(c, 0.0))[..., None]
    return jnp.moveaxis(q, -2, 0)


@dataclasses.dataclass(frozen=True)
class _Config:
    head: Any
    fisher_type: str
    approx: str
    num_samples: int


def _cotangents(cfg: _Config, outputs: jax.Array, batch: PyTree, key) -> jax.Array:
    """Output-space vectors ``u_k`` ``(K, N, *rest, C)`` whose ``J^T u u^T J`` sum is the Fisher.

    ``sum_k J^T u_k u_k^T J`` is the (GGN / MC / empirical) Fisher.
    """
    head = cfg.head
    n = outputs.shape[0]
    if cfg.fisher_type == "empirical":
        def one(f, ex):
            ex1 = jax.tree_util.tree_map(lambda x: x[None], ex)
            return jax.grad(lambda o: head(o[None], ex1))(f)

        g = jax.vmap(one)(outputs, batch)
        return (g / jnp.sqrt(jnp.asarray(n, outputs.dtype)))[None]
    lead = outputs.shape[:-1]
    w = head.weights(batch, lead, outputs.dtype)
    z = head.normalizer(w, outputs.shape[-1])
    if cfg.fisher_type == "type-2":
        q = _hessian_sqrt(head, outputs, head.targets(batch))
        return q * jnp.sqrt(w / z)[None, ..., None].astype(outputs.dtype)
    s = cfg.num_samples
    keys = jax.random.split(key, s)
    g = jax.vmap(lambda k: head.token_sample_grad(outputs, k))(keys)
    return jax.lax.stop_gradient(g) * jnp.sqrt(w / (z * s))[None, ..., None].astype(outputs.dtype)


# ---------------------------------------------------------------------------------------
# factors
# ---------------------------------------------------------------------------------------


class KroneckerFactors(NamedTuple):
    """Eigendecomposed factors of one block: ``A = Q_A diag(l_A) Q_A^T`` and ``B`` alike.

    ``B = Q_B diag(l_B) Q_B^T``; ``Q_A = None``: ``A`` is diagonal, as for embeddings.

    Attributes:
        a_evals: ``(d_in (+1),)`` eigenvalues of ``A`` (clipped at 0).
        a_evecs: ``(d_in (+1), d_in (+1))`` eigenvectors of ``A`` (columns), or ``None``.
        b_evals: ``(d_out,)`` eigenvalues of ``B`` (clipped at 0).
        b_evecs: ``(d_out, d_out)`` eigenvectors of ``B`` (columns).
    """

    a_evals: jax.Array
    a_evecs: jax.Array | None
    b_evals: jax.Array
    b_evecs: jax.Array


def _conv_patches(tag: _Tag, image: jax.Array) -> jax.Array:
    cv = tag.conv
    return jax.lax.conv_general_dilated_patches(
        image, cv["filter_shape"], cv["window_strides"], cv["padding"],
        lhs_dilation=cv["lhs_dilation"], rhs_dilation=cv["rhs_dilation"],
        dimension_numbers=cv["dimension_numbers"],
    )


def _activation_matrix(tag: _Tag, act: jax.Array, n: int) -> jax.Array:
    """Per-example activations ``(N, *shape)`` -> ``(N, R, d_in)``."""
    if tag.kind == "conv":
        patches = jax.vmap(lambda x: _conv_patches(tag, x))(act)
        perm = (0,) + tuple(1 + d for d in tag.out_perm)
        return jnp.transpose(patches, perm).reshape(n, -1, tag.d_in)
    perm = (0,) + tuple(1 + d for d in tag.act_perm)
    return jnp.transpose(act, perm).reshape(n, -1, tag.d_in)


def _input_matrix(tag: _Tag, act: jax.Array, n: int, dtype: Any) -> jax.Array:
    """Activations ``(N, *a)`` -> ``(N, R, d_in (+1))`` in ``dtype``, a 1 appended for a bias."""
    am = _activation_matrix(tag, act, n).astype(dtype)
    if tag.bias is not None:
        am = jnp.concatenate([am, jnp.ones(am.shape[:-1] + (1,), am.dtype)], axis=-1)
    return am


def _output_gradient_matrix(tag: _Tag, g: jax.Array) -> jax.Array:
    """Output gradients ``(K, N, *out)`` -> ``(K, N, R, d_out)``."""
    k, n = g.shape[:2]
    perm = (0, 1) + tuple(2 + d for d in tag.out_perm)
    return jnp.transpose(g, perm).reshape(k, n, -1, tag.d_out)


def _layer_factors(tag: _Tag, act: jax.Array, g: jax.Array, approx: str) -> KroneckerFactors:
    """``A`` from activations ``(N, *a)`` and ``B`` from gradients ``(K, N, *out)``."""
    n = g.shape[1]
    gm = _output_gradient_matrix(tag, g)
    if tag.kind == "embed":
        idx = act[..., 0].reshape(-1)
        if "CLIP" in str(tag.gather_mode):
            idx = jnp.clip(idx, 0, tag.d_in - 1)
        counts = jnp.zeros((tag.d_in,), gm.dtype).at[idx].add(1.0, mode="drop")
        a_evals = counts / idx.shape[0]
        bmat = jnp.einsum("knri,knrj->ij", gm, gm)
        b_evals, b_evecs = _eigh(bmat)
        return KroneckerFactors(a_evals, None, b_evals, b_evecs)
    am = _input_matrix(tag, act, n, gm.dtype)
    if approx == "expand":
        amat = jnp.einsum("nri,nrj->ij", am, am) / (am.shape[0] * am.shape[1])
        bmat = jnp.einsum("knri,knrj->ij", gm, gm)
    else:
        abar = am.mean(1)
        gbar = gm.sum(2)
        amat = abar.T @ abar / n
        bmat = jnp.einsum("kni,knj->ij", gbar, gbar)
    a_evals, a_evecs = _eigh(amat)
    b_evals, b_evecs = _eigh(bmat)
    return KroneckerFactors(a_evals, a_evecs, b_evals, b_evecs)


def _eigh(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    evals, evecs = jnp.linalg.eigh(0.5 * (m + m.T))
    return jnp.maximum(evals, 0.0), evecs


def _layer_acts_and_grads(plan: _Plan, cfg: _Config, params, batch, key) -> tuple:
    """Per layer: inputs ``(N, *a)`` and gradients ``(K, N, *out)`` of :func:`_cotangents`."""
    p_leaves = jax.tree_util.tree_leaves(params)
    b_leaves = jax.tree_util.tree_leaves(batch)
    n = b_leaves[0].shape[0]

    def per_example(probes, ex_leaves):
        return _run(plan, p_leaves, [x[None] for x in ex_leaves], probes)

    probes0 = tuple(
        jnp.zeros((n,) + layer.tag.out_shape, layer.tag.out_dtype) for layer in plan.layers
    )
    outs, vjp_fn, acts = jax.vjp(
        lambda pr: jax.vmap(per_example)(pr, b_leaves), probes0, has_aux=True
    )
    outputs = outs.reshape((n,) + outs.shape[2:])
    u = _cotangents(cfg, outputs, batch, key).astype(outs.dtype)
    grads = jax.vmap(lambda ui: vjp_fn(ui.reshape(outs.shape))[0])(u)
    acts = tuple(jnp.broadcast_to(a, (n,) + a.shape[1:]) for a in acts)
    return acts, grads


@functools.partial(jax.jit, static_argnums=(0, 1))
def _compute_factors(plan: _Plan, cfg: _Config, params, batch, key) -> tuple:
    acts, grads = _layer_acts_and_grads(plan, cfg, params, batch, key)
    return tuple(
        _layer_factors(layer.tag, a, g, cfg.approx)
        for layer, a, g in zip(plan.layers, acts, grads)
    )


# ---------------------------------------------------------------------------------------
# the operator
# ---------------------------------------------------------------------------------------


def _kernel_to_matrix(tag: _Tag, v: jax.Array) -> jax.Array:
    used = _apply_eqns(tag.kernel_eqns, v)
    return jnp.transpose(used, tag.kernel_perm).reshape(tag.d_in, tag.d_out)


def _to_block(tag: _Tag, leaves: list) -> jax.Array:
    mat = _kernel_to_matrix(tag, leaves[tag.kernel])
    if tag.bias is not None:
        b = leaves[tag.bias].reshape(1, tag.d_out).astype(mat.dtype)
        mat = jnp.concatenate([mat, b], axis=0)
    return mat


def _from_block(tag: _Tag, mat: jax.Array, like: list) -> dict:
    """Scatter a ``(d_in (+1), d_out)`` block back to ``{leaf index: array}``."""
    k_like = like[tag.kernel]
    kmat = mat[: tag.d_in]
    back = jax.linear_transpose(lambda x: _kernel_to_matrix(tag, x), k_like)
    out = {tag.kernel: back(kmat.astype(_kernel_dtype(tag, k_like)))[0].astype(k_like.dtype)}
    if tag.bias is not None:
        b_like = like[tag.bias]
        out[tag.bias] = mat[tag.d_in].reshape(b_like.shape).astype(b_like.dtype)
    return out


def _kernel_dtype(tag: _Tag, k_like) -> Any:
    return jax.eval_shape(lambda x: _kernel_to_matrix(tag, x), k_like).dtype


def _apply_in_eigenbasis(f: KroneckerFactors, mat: jax.Array, fn: Callable,
                         eigenvalues: jax.Array | None = None) -> jax.Array:
    """``Q_A [fn(S) * (Q_A^T M Q_B)] Q_B^T``, ``S = l_A l_B^T`` unless ``eigenvalues`` given.

    ``Q_A = I`` for embeddings; EK-FAC passes its re-fitted ``S`` as ``eigenvalues``.
    """
    dtype = f.b_evals.dtype
    if eigenvalues is None:
        eigenvalues = f.a_evals[:, None] * f.b_evals[None, :]
    m = mat.astype(dtype)
    if f.a_evecs is not None:
        m = f.a_evecs.T @ m
    m = (m @ f.b_evecs) * fn(eigenvalues.astype(dtype))
    m = m @ f.b_evecs.T
    if f.a_evecs is not None:
        m = f.a_evecs @ m
    return m.astype(mat.dtype)


@dataclasses.dataclass(frozen=True)
class _KFACPrepare:
    """``prepare(operands)``: operands are ``(factors,)`` or ``(factors, damping)``."""

    plan: _Plan
    power: float | None = None

    def __call__(self, operands):
        damping = None if self.power is None else operands[1]
        return _eigenbasis_matvec(self.plan, operands[0], None, damping, self.power)


def _eigenbasis_matvec(plan: _Plan, factors: tuple, eigenvalues: tuple | None,
                       damping: Any, power: float | None) -> Callable[[PyTree], PyTree]:
    """Matvec of a block operator in Kronecker eigenbases (K-FAC, EK-FAC), optionally damped.

    Per block ``V -> Q_A [fn(S) * (Q_A^T V Q_B)] Q_B^T``, ``S`` the per-layer ``eigenvalues``
    (``None``: ``l_A l_B^T``), ``fn(x) = x`` or ``(x + damping)^power``; uncovered
    parameters are scaled by 0 or ``damping^power``.
    """
    like = jax.tree_util.tree_leaves(plan.params_like)
    treedef = jax.tree_util.tree_structure(plan.params_like)
    if power is None:
        fn = lambda x: x  # noqa: E731
        uncovered_scale = 0.0
    else:
        fn = lambda x: (x + damping.astype(x.dtype)) ** power  # noqa: E731
        uncovered_scale = damping ** power
    eigenvalues = (None,) * len(factors) if eigenvalues is None else eigenvalues

    def matvec(v):
        leaves = jax.tree_util.tree_leaves(v)
        out = [(uncovered_scale * x).astype(x.dtype) for x in leaves]
        for layer, f, s in zip(plan.layers, factors, eigenvalues):
            mat = _apply_in_eigenbasis(f, _to_block(layer.tag, leaves), fn, s)
            for i, x in _from_block(layer.tag, mat, like).items():
                out[i] = x
        return jax.tree_util.tree_unflatten(treedef, out)

    return matvec


class BlockCurvatureOperator(LinearOperator):
    """Base of the Kronecker-structured operators (:class:`KFACOperator`, EK-FAC).

    A :class:`LinearOperator` whose first operand is the per-layer
    :class:`KroneckerFactors` and whose static data carries the :class:`KFACCoverage`.
    Subclasses set their default ``name`` through :attr:`default_name`.
    """

    default_name = "kfac"

    def __init__(self, prepare, operands, params_like, *, coverage: KFACCoverage,
                 is_psd: bool = True, name: str | None = None, _spec=None):
        super().__init__(prepare, operands, params_like, is_psd=is_psd,
                         name=self.default_name if name is None else name, _spec=_spec)
        self.coverage = coverage

    def tree_flatten(self):
        """Pytree protocol: as :meth:`LinearOperator.tree_flatten`, plus the coverage.

        Returns:
            ``((operands,), (prepare, spec, is_psd, name, coverage))``.
        """
        return (self.operands,), (self.prepare, self._spec, self.is_psd, self.name, self.coverage)

    @classmethod
    def tree_unflatten(cls, aux, children):
        """Pytree protocol: rebuild the operator from :meth:`tree_flatten`'s output.

        Args:
            aux: ``(prepare, spec, is_psd, name, coverage)``.
            children: ``(operands,)``.

        Returns:
            An operator of this class.
        """
        prepare, spec, is_psd, name, coverage = aux
        return cls(prepare, children[0], None, coverage=coverage, is_psd=is_psd, name=name,
                   _spec=spec)

    @property
    def factors(self) -> dict[str, KroneckerFactors]:
        """``{layer name: KroneckerFactors}`` in the order of ``coverage.layers``."""
        return {layer.name: f for layer, f in zip(self.prepare.plan.layers, self.operands[0])}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n_params={self.n_params}, "
                f"blocks={len(self.coverage.layers)}, covered={self.coverage.fraction:.3f}, "
                f"dtype={self.dtype})")


@jax.tree_util.register_pytree_node_class
class KFACOperator(BlockCurvatureOperator):
    """A :class:`LinearOperator` holding eigendecomposed Kronecker factors.

    Extra attributes:
        coverage: :class:`KFACCoverage` (covered blocks, uncovered paths with reasons).
        factors: ``{layer name: KroneckerFactors}``.

    Methods:
        inverse(damping, power=-1.0): the operator ``(K + damping I)^power`` applied in the
            eigenbasis (:func:`kfac_inverse`).
        kronecker_factors(): dense ``(A, B)`` per layer (inspection and tests).
    """

    def kronecker_factors(self) -> dict[str, tuple[jax.Array, jax.Array]]:
        """Dense ``(A, B)`` per layer, rebuilt from the eigendecompositions.

        ``A`` has a trailing row / column for a folded bias; the block acts on the
        ``(d_in (+1), d_out)`` matrix ``[W; b]`` as ``V -> A V B``.

        Returns:
            ``{layer name: (A, B)}``, ``A`` ``(d_in (+1), d_in (+1))`` and ``B``
            ``(d_out, d_out)``. Cost ``O(d_in^3 + d_out^3)`` per layer.
        """
        out = {}
        for name, f in self.factors.items():
            a = jnp.diag(f.a_evals) if f.a_evecs is None else (f.a_evecs * f.a_evals) @ f.a_evecs.T
            out[name] = (a, (f.b_evecs * f.b_evals) @ f.b_evecs.T)
        return out

    def inverse(self, damping: Any, power: float = -1.0) -> LinearOperator:
        """``(K + damping I)^power`` (see :func:`kfac_inverse`).

        Args:
            damping: scalar ``>= 0``; ``> 0`` for a negative ``power``.
            power: static exponent (``-1`` inverse, ``-0.5`` inverse square root).

        Returns:
            A PSD :class:`LinearOperator`; a product costs as much as a K-FAC product.

        Raises:
            ValueError: as :func:`kfac_inverse`.
        """
        return kfac_inverse(self, damping, power)


def _damping_operand(damping: Any, power: float, dtype: Any) -> jax.Array:
    """``damping`` of ``(K + damping I)^power`` checked (``> 0`` if ``power < 0``), 0-d."""
    if is_traced(damping):
        damping = jnp.asarray(damping, dtype)
        if damping.ndim != 0:
            raise ValueError(f"damping must be a scalar, got shape {damping.shape}")
        return damping
    return jnp.asarray(check_real(damping, "damping", lo=0.0, lo_open=power < 0), dtype)


def kfac_inverse(K: KFACOperator, damping: Any, power: float = -1.0) -> LinearOperator:
    """The operator ``(K + damping I)^power``, applied in the factors' eigenbases.

    On a block with eigenvalues ``l_A[i] l_B[j]`` it multiplies the eigen-coordinates by
    ``(l_A[i] l_B[j] + damping)^power``; uncovered parameters (zero block) are scaled by
    ``damping^power``. So ``kfac_inverse(K, lam) @ (K @ v + lam v) == v``. Cost: the same as a
    K-FAC product; no dense factor or Kronecker product is formed.

    Args:
        K: an operator returned by :func:`kfac`.
        damping: scalar ``>= 0``; must be ``> 0`` for a negative ``power``.
        power: static exponent (``-1`` inverse, ``-0.5`` inverse square root, ``1`` damped K).

    Returns:
        A PSD :class:`LinearOperator` named ``"kfac_inverse"`` (``"kfac_power"`` unless
        ``power == -1``).

    Raises:
        ArgumentTypeError: ``K`` is not a :class:`KFACOperator`, or ``damping`` / ``power``
            is not a real scalar.
        ValueError: if ``damping`` is not finite, is negative, or is zero while
            ``power < 0`` (an inverse needs ``damping > 0``).
    """
    if not isinstance(K, KFACOperator):
        raise ArgumentTypeError(
            f"K must be an operator returned by kfac(), got {type(K).__name__}")
    power = check_real(power, "power")
    damping = _damping_operand(damping, power, K.dtype)
    name = "kfac_inverse" if power == -1.0 else "kfac_power"
    prep = _KFACPrepare(K.prepare.plan, power)
    return LinearOperator(prep, (K.operands[0], damping), None, is_psd=True, name=name,
                          _spec=K._spec)


def kfac(
    model_fn: Callable[[PyTree, PyTree], jax.Array],
    head: Callable[[jax.Array, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    *,
    fisher_type: str = "type-2",
    kfac_approx: str = "expand",
    key: jax.Array | None = None,
    num_samples: int = 1,
    check: bool = True,
    warn: bool = True,
) -> KFACOperator:
    """K-FAC approximation of the GGN / Fisher of ``head(model_fn(params, batch), batch)``.

    Construction costs one forward pass and ``K`` backward passes (``K = C`` classes for
    ``"type-2"``, ``num_samples`` for ``"mc"``, 1 for ``"empirical"``) plus one symmetric
    eigendecomposition per factor; products and inverse products then cost
    ``O(sum_layers d_in^2 d_out + d_in d_out^2)``.

    Args:
        model_fn: ``model_fn(params, batch) -> outputs (N, ..., C)``; examples must not
            interact (each is fed as a batch of one under ``vmap``).
        head: a built-in head (``gj.heads.softmax_cross_entropy`` / ``mse``) for
            ``"type-2"`` and ``"mc"``; any ``head(outputs, batch) -> scalar`` for
            ``"empirical"``.
        params: parameter pytree.
        batch: pytree with a shared leading batch axis ``N``.
        fisher_type: ``"type-2"`` (exact head-Hessian square root), ``"mc"`` (sampled
            labels, needs ``key``) or ``"empirical"`` (observed labels).
        kfac_approx: ``"expand"`` or ``"reduce"`` treatment of shared positions (module
            docstring; Eschenhagen et al. 2023).
        key: ``jax.random`` key for ``"mc"``.
        num_samples: label samples per token for ``"mc"``.
        check: raise on a non-finite loss / gradient at the point.
        warn: emit the coverage report once as a :class:`KFACCoverageWarning` when some
            parameters are not covered.

    Returns:
        A PSD :class:`KFACOperator` with ``.coverage``, ``.inverse(damping, power)`` and
        ``.factors``.

    Raises:
        ValueError: on an unknown ``fisher_type`` / ``kfac_approx``, a missing ``key`` for
            ``"mc"`` or a batch of keys, ``num_samples < 1``, a head that cannot provide the
            Fisher type, or integer labels out of ``[0, C)`` (built-in heads).
        TypeError: a ``key`` that is not a PRNG key, a ``num_samples`` that is not an
            integer, a ``model_fn`` / ``head`` that is not callable.

    References:
        Martens & Grosse (2015), "Optimizing Neural Networks with Kronecker-factored
        Approximate Curvature"; Grosse & Martens (2016), "A Kronecker-factored approximate
        Fisher matrix for convolution layers"; Eschenhagen et al. (2023), "Kronecker-Factored
        Approximate Curvature for Modern Neural Network Architectures".
    """
    check_callable(model_fn, "model_fn")
    check_callable(head, "head")
    check_choice(fisher_type, "fisher_type", FISHER_TYPES)
    check_choice(kfac_approx, "kfac_approx", KFAC_APPROX)
    num_samples = check_int(num_samples, "num_samples")
    if fisher_type in ("type-2", "mc") and not isinstance(head, Head):
        raise ValueError(
            f"fisher_type={fisher_type!r} needs a built-in head (gj.heads.softmax_cross_entropy "
            f"/ mse) with an analytic Hessian; got {type(head).__name__}. Use "
            "fisher_type='empirical' for other heads."
        )
    if fisher_type == "mc" and key is None:
        raise ValueError("key is required for fisher_type='mc' (it samples labels): pass "
                         "key=jax.random.key(seed)")
    key = check_key(key, "key")  # deterministic types ignore it (None: the default key)
    check_params(params)
    check_batch(batch)
    loss_fn = compose(model_fn, head)
    check_scalar_fn(loss_fn, (params, batch), "head(model_fn(params, batch), batch)")
    check_targets(head, model_fn, params, batch)
    if check:
        check_loss_at_point(loss_fn, params, batch, "the loss head(model_fn(params, batch))")
    plan = _get_plan(model_fn, params, batch)
    if warn:
        _warn_coverage(plan.coverage)
    cfg = _Config(static_callable(head), fisher_type, kfac_approx,
                  num_samples if fisher_type == "mc" else 1)
    factors = _compute_factors(plan, cfg, params, batch, key)
    return KFACOperator(_KFACPrepare(plan), (factors,), params, coverage=plan.coverage,
                        is_psd=True, name="kfac")


@dataclasses.dataclass(frozen=True, eq=False)
class _ByIdentity:
    """An unhashable callable, hashed and compared by the identity of the callable."""

    fn: Callable

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __hash__(self) -> int:
        return id(self.fn)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByIdentity) and other.fn is self.fn


def static_callable(fn: Callable) -> Callable:
    """``fn`` itself when it is hashable, else a wrapper hashed by the identity of ``fn``.

    ``jax.jit`` needs static arguments to be hashable; closures and bound methods of
    unhashable objects are not always. The same function object keeps one compiled
    program (the wrapper of each call compares equal to the last one).

    Args:
        fn: any callable (a head, a ``model_fn``).

    Returns:
        A hashable callable that behaves as ``fn``.
    """
    try:
        hash(fn)
        return fn
    except TypeError:
        return _ByIdentity(fn)
