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

Interception (how activations and output gradients are captured). ``model_fn`` is traced
once to a jaxpr (``jax.make_jaxpr``, batch of one) and K-FAC recognises the layers from the
primitives that consume parameter leaves: framework-agnostic (Flax NNX, Linen, plain
functions), no model changes, no ``sow``. A small jaxpr interpreter then re-evaluates the
model, records each layer's input and adds a zero "probe" to each layer's output; the
output gradients are the ``jax.vjp`` of the outputs w.r.t. the probes. Nested ``jit`` /
``custom_jvp`` / ``custom_vjp`` calls that receive a raw parameter are evaluated inline (so
``jnp.take`` embeddings and ``jnp.einsum`` projections are found); control flow (``scan``,
``while``, ``cond``) is not looked into.

Coverage: every parameter leaf is either covered (a kernel or folded bias of exactly one
recognised layer) or listed in ``K.coverage.uncovered`` with the reason (LayerNorm scales,
unfoldable biases, grouped convolutions, weight tying, parameters inside control flow,
unused parameters). Uncovered parameters get a zero block (so ``K.inverse(damping)`` acts
there as ``damping^power I``). The report is also emitted once as a
:class:`KFACCoverageWarning`.

Supported names: ``FISHER_TYPES``, ``KFACCoverage``, ``KFACCoverageWarning``, ``KFACLayer``,
``KFACOperator``, ``KroneckerFactors``, ``kfac``, ``kfac_inverse`` (the ``__all__`` list);
``KFAC_APPROX`` lists the ``kfac_approx`` choices.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex

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
from gradience_jax.tree import path_str

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


class KFACCoverageWarning(UserWarning):
    """Some parameters are not covered by K-FAC (they get a zero curvature block)."""


# ---------------------------------------------------------------------------------------
# coverage report
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KFACLayer:
    """One Kronecker-factored block.

    Attributes:
        name: layer name (the kernel's path without its last component).
        kind: ``"dense"``, ``"conv"`` or ``"embed"``.
        kernel: path of the kernel / embedding leaf.
        bias: path of the folded bias leaf, or ``None``.
        in_dim: ``d_in`` (rows of ``A``; ``+1`` for the folded bias is not included).
        out_dim: ``d_out`` (rows of ``B``).
        positions: shared positions ``R`` per example (tokens, pixels; 1 for plain Dense).
    """

    name: str
    kind: str
    kernel: str
    bias: str | None
    in_dim: int
    out_dim: int
    positions: int

    @property
    def paths(self) -> tuple[str, ...]:
        """The leaves of this block: ``(kernel,)`` or ``(kernel, bias)``."""
        return (self.kernel,) if self.bias is None else (self.kernel, self.bias)


@dataclasses.dataclass(frozen=True)
class KFACCoverage:
    """Which parameters K-FAC covers, and why the others are not.

    Attributes:
        layers: the covered blocks (:class:`KFACLayer`), in parameter order.
        uncovered: ``(path, reason)`` for every parameter leaf without a K-FAC block.
        n_params: total number of scalar parameters.
        n_covered: scalar parameters inside covered blocks.
    """

    layers: tuple[KFACLayer, ...]
    uncovered: tuple[tuple[str, str], ...]
    n_params: int
    n_covered: int

    @property
    def covered_paths(self) -> tuple[str, ...]:
        """Paths of all covered leaves (kernels and folded biases)."""
        return tuple(p for layer in self.layers for p in layer.paths)

    @property
    def uncovered_paths(self) -> tuple[str, ...]:
        """Paths of all leaves without a K-FAC block (reasons in ``uncovered``)."""
        return tuple(p for p, _ in self.uncovered)

    @property
    def blocks(self) -> tuple[tuple[str, ...], ...]:
        """Parameter paths of each Kronecker block (for block-diagonal comparisons)."""
        return tuple(layer.paths for layer in self.layers)

    @property
    def fraction(self) -> float:
        """Fraction of scalar parameters covered."""
        return self.n_covered / max(self.n_params, 1)

    def to_dict(self) -> dict:
        """JSON-safe dict."""
        return {
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
            "uncovered": [{"path": p, "reason": r} for p, r in self.uncovered],
            "n_params": self.n_params,
            "n_covered": self.n_covered,
            "fraction": self.fraction,
        }

    def __str__(self) -> str:
        lines = [
            f"K-FAC coverage: {self.n_covered}/{self.n_params} parameters "
            f"({100 * self.fraction:.1f}%) in {len(self.layers)} blocks"
        ]
        for layer in self.layers:
            bias = f" + {layer.bias}" if layer.bias else ""
            lines.append(
                f"  [{layer.kind}] {layer.kernel}{bias}: "
                f"A {layer.in_dim + (layer.bias is not None)}^2, B {layer.out_dim}^2, "
                f"R={layer.positions}"
            )
        for path, reason in self.uncovered:
            lines.append(f"  not covered: {path}: {reason}")
        return "\n".join(lines)


_WARNED: set = set()


def _warn_coverage(coverage: KFACCoverage) -> None:
    """Emit the uncovered parameters once per distinct report."""
    if not coverage.uncovered or coverage.uncovered in _WARNED:
        return
    _WARNED.add(coverage.uncovered)
    listing = "; ".join(f"{p} ({r})" for p, r in coverage.uncovered)
    warnings.warn(
        f"K-FAC covers {coverage.n_covered}/{coverage.n_params} parameters; "
        f"{len(coverage.uncovered)} leaves get a zero block: {listing}",
        KFACCoverageWarning,
        stacklevel=3,
    )


# ---------------------------------------------------------------------------------------
# layer discovery on the jaxpr
# ---------------------------------------------------------------------------------------

#: unary, size-preserving (a permutation / reshape / cast) ops a kernel may pass through
_KERNEL_TRANSPARENT = frozenset(
    ["convert_element_type", "reshape", "transpose", "copy", "copy_p", "squeeze",
     "sharding_constraint", "broadcast_in_dim"]
)
#: extra (size-changing) ops allowed between a bias and the add that applies it
_BIAS_TRANSPARENT = frozenset(["broadcast_in_dim"])
#: call-like primitives whose body is scanned / interpreted inline when given a parameter
_CALLS = frozenset(
    ["jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
     "custom_vjp_call_jaxpr", "remat", "remat2", "checkpoint"]
)


def _sub_jaxpr(eqn: Any) -> tuple[Any, list]:
    """The body ``(Jaxpr, consts)`` of a call-like equation."""
    sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(sub, jex.ClosedJaxpr):
        return sub.jaxpr, list(sub.consts)
    return sub, []


@dataclasses.dataclass(frozen=True, eq=False)
class _Chain:
    """A value derived from one parameter leaf by transparent ops ``eqns``."""

    leaf: int
    eqns: tuple = ()
    bias_only: bool = False

    def then(self, eqn: Any) -> _Chain:
        bias_only = self.bias_only or eqn.primitive.name in _BIAS_TRANSPARENT
        return _Chain(self.leaf, self.eqns + (eqn,), bias_only)


def _apply_eqns(eqns: Sequence[Any], x: jax.Array) -> jax.Array:
    """Re-apply a chain of unary equations to ``x`` (linear, order-preserving)."""
    for eqn in eqns:
        x = eqn.primitive.bind(x, **eqn.primitive.get_bind_params(eqn.params))
    return x


@dataclasses.dataclass(eq=False)
class _Tag:
    """A recognised layer in the jaxpr (mutable while scanning)."""

    kind: str
    site: tuple  # eqn path of the dot / conv / gather
    act_index: int  # operand index of the activation (indices for embed)
    kernel: int
    kernel_eqns: tuple
    kernel_perm: tuple  # used kernel -> (in axes..., out axes...)
    kernel_shape: tuple  # used kernel shape
    act_perm: tuple  # activation -> (position axes..., in axes...) [dense]
    out_perm: tuple  # layer output -> (position axes..., out axes...)
    out_shape: tuple  # per-example layer output shape
    out_dtype: Any
    d_in: int
    d_out: int
    positions: int
    conv: dict | None = None
    gather_mode: Any = None
    out_site: tuple = ()
    bias: int | None = None


@dataclasses.dataclass(eq=False)
class _Scan:
    tags: list = dataclasses.field(default_factory=list)
    uses: dict = dataclasses.field(default_factory=dict)  # leaf -> list of (tag id | reason)
    descend: set = dataclasses.field(default_factory=set)
    leaf_avals: list = dataclasses.field(default_factory=list)

    def use(self, leaf: int, what: Any) -> None:
        self.uses.setdefault(leaf, []).append(what)


def _is_var(v: Any) -> bool:
    return not isinstance(v, jex.Literal)


def _size_preserving(eqn: Any) -> bool:
    ins = eqn.invars[0].aval
    out = eqn.outvars[0].aval
    same_size = int(np.prod(ins.shape)) == int(np.prod(out.shape))
    floats = jnp.issubdtype(ins.dtype, jnp.floating) and jnp.issubdtype(out.dtype, jnp.floating)
    return same_size and floats


def _scan_jaxpr(jaxpr: Any, chains: dict, prefix: tuple, acc: _Scan) -> None:
    """Find layers that consume parameter chains; record every other parameter use."""
    counts = Counter(v for e in jaxpr.eqns for v in e.invars if _is_var(v))
    counts.update(v for v in jaxpr.outvars if _is_var(v))
    producer: dict = {}  # layer output var -> tag index (while a bias may still be folded)
    for i, eqn in enumerate(jaxpr.eqns):
        site = prefix + (i,)
        ins = [chains.get(v) if _is_var(v) else None for v in eqn.invars]
        name = eqn.primitive.name
        if name == "add" and any(_is_var(v) and v in producer for v in eqn.invars):
            if _try_fold_bias(eqn, site, ins, producer, counts, acc):
                continue
        if _follow_layer_output(eqn, site, producer, counts, acc):
            continue
        if not any(ins):
            continue
        if len(eqn.invars) == 1 and len(eqn.outvars) == 1:
            if name in _KERNEL_TRANSPARENT and _size_preserving(eqn):
                chains[eqn.outvars[0]] = ins[0].then(eqn)
                continue
            if name in _BIAS_TRANSPARENT:
                chains[eqn.outvars[0]] = ins[0].then(eqn)
                continue
        if name in _CALLS:
            sub, _ = _sub_jaxpr(eqn)
            if sub is not None and len(sub.invars) == len(eqn.invars):
                inner = {iv: c for iv, c in zip(sub.invars, ins) if c is not None}
                acc.descend.add(site)
                _scan_jaxpr(sub, inner, site, acc)
                continue
        tag_or_reason = _match_layer(eqn, site, ins)
        if isinstance(tag_or_reason, _Tag):
            acc.tags.append(tag_or_reason)
            tid = len(acc.tags) - 1
            acc.use(tag_or_reason.kernel, tid)
            producer[eqn.outvars[0]] = tid
            continue
        for c in ins:
            if c is not None:
                acc.use(c.leaf, tag_or_reason)
    for v in jaxpr.outvars:
        if _is_var(v) and v in chains:
            acc.use(chains[v].leaf, "returned as an output (no layer consumes it)")


def _match_layer(eqn: Any, site: tuple, ins: list) -> _Tag | str:
    """A :class:`_Tag` when ``eqn`` is a supported layer, else the reason it is not."""
    name = eqn.primitive.name
    if name == "dot_general":
        return _match_dense(eqn, site, ins)
    if name == "conv_general_dilated":
        return _match_conv(eqn, site, ins)
    if name == "gather":
        return _match_embed(eqn, site, ins)
    hint = {
        "mul": " (a scale, e.g. LayerNorm / RMSNorm)",
        "add": " (a shift not folded into a Dense / Conv output, e.g. LayerNorm bias)",
    }.get(name, "")
    if name in ("scan", "while", "cond"):
        hint = " (control flow is not looked into)"
    return f"used by `{name}`{hint}, not a Dense / Conv / Embed pattern"


def _kernel_chain(ins: list, index: int) -> _Chain | str:
    c = ins[index]
    if c is None:
        return "no parameter operand"
    if c.bias_only:
        return "the parameter is broadcast before use"
    if any(o is not None for j, o in enumerate(ins) if j != index):
        return "both operands are parameters"
    return c


def _match_dense(eqn: Any, site: tuple, ins: list) -> _Tag | str:
    ki = 1 if ins[1] is not None else 0
    c = _kernel_chain(ins, ki)
    if isinstance(c, str):
        return f"used by `dot_general`: {c}"
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if len(lb) or len(rb):
        return "used by `dot_general` with batch dimensions (per-group weights), not supported"
    ai = 1 - ki
    kc = tuple(rc if ki == 1 else lc)
    ac = tuple(lc if ki == 1 else rc)
    k_shape = tuple(eqn.invars[ki].aval.shape)
    a_shape = tuple(eqn.invars[ai].aval.shape)
    kf = tuple(d for d in range(len(k_shape)) if d not in kc)
    af = tuple(d for d in range(len(a_shape)) if d not in ac)
    out_shape = tuple(eqn.outvars[0].aval.shape)
    if ki == 1:
        out_perm = tuple(range(len(out_shape)))
    else:
        out_perm = tuple(range(len(kf), len(out_shape))) + tuple(range(len(kf)))
    d_in = int(np.prod([k_shape[d] for d in kc]))
    d_out = int(np.prod([k_shape[d] for d in kf]))
    return _Tag(
        kind="dense", site=site, act_index=ai, kernel=c.leaf, kernel_eqns=c.eqns,
        kernel_perm=kc + kf, kernel_shape=k_shape, act_perm=af + ac, out_perm=out_perm,
        out_shape=out_shape, out_dtype=eqn.outvars[0].aval.dtype, d_in=d_in, d_out=d_out,
        positions=int(np.prod([a_shape[d] for d in af])), out_site=site,
    )


def _match_conv(eqn: Any, site: tuple, ins: list) -> _Tag | str:
    c = _kernel_chain(ins, 1)
    if isinstance(c, str):
        return f"used by `conv_general_dilated`: {c}"
    p = eqn.params
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return "used by a grouped / depthwise convolution (feature_group_count > 1), not supported"
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    k_shape = tuple(eqn.invars[1].aval.shape)
    spatial = tuple(d for d in range(len(k_shape)) if d not in (rhs_spec[0], rhs_spec[1]))
    out_shape = tuple(eqn.outvars[0].aval.shape)
    out_perm = tuple(d for d in range(len(out_shape)) if d != out_spec[1]) + (out_spec[1],)
    conv = dict(
        filter_shape=tuple(k_shape[d] for d in spatial),
        window_strides=tuple(p["window_strides"]),
        padding=tuple(tuple(x) for x in p["padding"]),
        lhs_dilation=tuple(p["lhs_dilation"]),
        rhs_dilation=tuple(p["rhs_dilation"]),
        dimension_numbers=p["dimension_numbers"],
    )
    d_in = k_shape[rhs_spec[1]] * int(np.prod(conv["filter_shape"]))
    return _Tag(
        kind="conv", site=site, act_index=0, kernel=c.leaf, kernel_eqns=c.eqns,
        kernel_perm=(rhs_spec[1],) + spatial + (rhs_spec[0],), kernel_shape=k_shape,
        act_perm=(), out_perm=out_perm, out_shape=out_shape,
        out_dtype=eqn.outvars[0].aval.dtype, d_in=int(d_in), d_out=int(k_shape[rhs_spec[0]]),
        positions=int(np.prod(out_shape) // k_shape[rhs_spec[0]]), conv=conv, out_site=site,
    )


def _match_embed(eqn: Any, site: tuple, ins: list) -> _Tag | str:
    c = _kernel_chain(ins, 0)
    if isinstance(c, str):
        return f"used by `gather`: {c}"
    p = eqn.params
    dn = p["dimension_numbers"]
    k_shape = tuple(eqn.invars[0].aval.shape)
    idx_shape = tuple(eqn.invars[1].aval.shape)
    out_shape = tuple(eqn.outvars[0].aval.shape)
    ok = (
        len(k_shape) == 2
        and tuple(dn.offset_dims) == (len(out_shape) - 1,)
        and tuple(dn.collapsed_slice_dims) == (0,)
        and tuple(dn.start_index_map) == (0,)
        and not tuple(getattr(dn, "operand_batching_dims", ()))
        and tuple(p["slice_sizes"]) == (1, k_shape[1])
        and idx_shape[-1:] == (1,)
    )
    if not ok:
        return "used by a `gather` that is not a row lookup (embedding), not supported"
    return _Tag(
        kind="embed", site=site, act_index=1, kernel=c.leaf, kernel_eqns=c.eqns,
        kernel_perm=(0, 1), kernel_shape=k_shape, act_perm=(),
        out_perm=tuple(range(len(out_shape))), out_shape=out_shape,
        out_dtype=eqn.outvars[0].aval.dtype, d_in=k_shape[0], d_out=k_shape[1],
        positions=int(np.prod(idx_shape[:-1])), gather_mode=p["mode"], out_site=site,
    )


#: ops between a layer and its bias add that only relayout or recast the output
#: (``vmap`` of a per-example ``W @ x`` gives ``transpose(dot_general(W, X))``: Equinox)
_OUTPUT_TRANSPARENT = frozenset(["transpose", "convert_element_type", "copy", "copy_p"])


def _follow_layer_output(eqn, site, producer, counts, acc: _Scan) -> bool:
    """Move a layer's output site through a transpose / cast used only by its bias add.

    The probe that measures the output gradients then sits after the relayout, where the
    bias is added, and ``out_perm`` is composed with the transpose so the layer's output
    features are still found. True when the equation was absorbed.
    """
    if eqn.primitive.name not in _OUTPUT_TRANSPARENT or len(eqn.invars) != 1:
        return False
    v = eqn.invars[0]
    if not (_is_var(v) and v in producer) or counts[v] != 1:
        return False
    tag = acc.tags[producer[v]]
    if tag.kind == "embed" or tag.bias is not None:
        return False
    if eqn.primitive.name == "transpose":
        perm = tuple(int(a) for a in eqn.params["permutation"])
        inverse = tuple(int(a) for a in np.argsort(perm))
        tag.out_perm = tuple(inverse[a] for a in tag.out_perm)
    out = eqn.outvars[0]
    tag.out_site, tag.out_shape, tag.out_dtype = site, tuple(out.aval.shape), out.aval.dtype
    producer[out] = producer.pop(v)
    return True


def _try_fold_bias(eqn, site, ins, producer, counts, acc: _Scan) -> bool:
    """Fold ``layer_out + bias`` into the layer; True when the add was consumed."""
    for j in (0, 1):
        v, other = eqn.invars[j], ins[1 - j]
        if not (_is_var(v) and v in producer) or other is None:
            continue
        tag = acc.tags[producer[v]]
        if tag.kind == "embed" or tag.bias is not None:
            return False
        if counts[v] != 1:
            acc.use(other.leaf, "added to a layer output that is also used elsewhere "
                    "(bias not foldable)")
            return True
        reason = _bias_reason(eqn, other, tag, acc.leaf_avals[other.leaf])
        if reason:
            acc.use(other.leaf, f"bias not foldable into {tag.kind} layer: {reason}")
            return True
        tid = producer.pop(v)
        tag.bias, tag.out_site = other.leaf, site
        tag.out_shape = tuple(eqn.outvars[0].aval.shape)
        tag.out_dtype = eqn.outvars[0].aval.dtype
        acc.use(other.leaf, tid)
        return True
    return False


def _bias_reason(eqn, chain: _Chain, tag: _Tag, leaf_aval) -> str:
    """Empty when the chain broadcasts the bias as ``b[out]`` at every position."""
    out_shape = tuple(eqn.outvars[0].aval.shape)
    if tuple(out_shape) != tuple(tag.out_shape):
        return "the add changes the layer output's shape"
    size = int(np.prod(leaf_aval.shape))
    if size != tag.d_out:
        return f"it has {size} entries, the layer has {tag.d_out} outputs"
    with jax.ensure_compile_time_eval():
        probe = jnp.arange(1, size + 1, dtype=leaf_aval.dtype).reshape(leaf_aval.shape)
        b = np.asarray(_apply_eqns(chain.eqns, probe))
    try:
        b = np.broadcast_to(b, out_shape)
    except ValueError:
        return f"shape {b.shape} does not broadcast to the output {out_shape}"
    rows = np.transpose(b, tag.out_perm).reshape(-1, tag.d_out)
    if not np.all(rows == np.arange(1, size + 1)[None]):
        return "it is not broadcast along the layer's output features"
    return ""


# ---------------------------------------------------------------------------------------
# the plan: jaxpr + layers + coverage (static, hashable by identity)
# ---------------------------------------------------------------------------------------


class _Layer(NamedTuple):
    """Static description of one covered layer (used by the factor pass and the matvec)."""

    name: str
    tag: _Tag


@dataclasses.dataclass(frozen=True, eq=False)
class _Plan:
    jaxpr: Any
    consts: tuple
    n_params: int
    layers: tuple  # of _Layer
    sites: dict  # act site -> layer index
    out_sites: dict  # probe site -> layer index
    descend: frozenset
    coverage: KFACCoverage
    params_like: Any
    out_shape: tuple  # per-example (batch of one) outputs shape


def _layer_name(path: str) -> str:
    parts = path.split("/")
    return "/".join(parts[:-1]) if len(parts) > 1 else path


def _build_plan(model_fn: Callable, params: PyTree, batch: PyTree) -> _Plan:
    example = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((1,) + x.shape[1:], x.dtype),
                                     batch)
    closed = jax.make_jaxpr(model_fn)(params, example)
    jaxpr = closed.jaxpr
    if len(jaxpr.outvars) != 1:
        raise ValueError(
            "model_fn must return one array of outputs (*lead, C); "
            f"got {len(jaxpr.outvars)} outputs"
        )
    out_aval = jaxpr.outvars[0].aval
    if len(out_aval.shape) < 2 or out_aval.shape[0] != 1:
        raise ValueError(
            "model_fn(params, batch) must return outputs (N, ..., C) with the batch axis "
            f"first; on a batch of one it returned shape {tuple(out_aval.shape)}"
        )
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [path_str(p) for p, _ in flat]
    sizes = [int(np.prod(np.shape(x))) for _, x in flat]
    chains = {v: _Chain(i) for i, v in enumerate(jaxpr.invars[: len(flat)])}
    acc = _Scan(leaf_avals=[jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))
                            for _, x in flat])
    _scan_jaxpr(jaxpr, chains, (), acc)

    layers, uncovered = [], []
    for tid, tag in enumerate(acc.tags):
        leaves = [tag.kernel] + ([tag.bias] if tag.bias is not None else [])
        if all(acc.uses.get(leaf) == [tid] for leaf in leaves):
            layers.append(_Layer(_layer_name(paths[tag.kernel]), tag))
    covered = {leaf for layer in layers for leaf in (layer.tag.kernel, layer.tag.bias)}
    for leaf, path in enumerate(paths):
        if leaf in covered:
            continue
        uses = acc.uses.get(leaf, [])
        reasons = sorted({u for u in uses if isinstance(u, str)})
        n_tags = len({u for u in uses if not isinstance(u, str)})
        if not uses:
            reason = "not used by model_fn (zero curvature)"
        elif len(uses) > 1 and n_tags:
            reason = ("used by more than one operation (weight tying / a layer applied "
                      "twice); shared weights are not supported")
        elif n_tags:
            reason = "its layer's other parameter is not covered"
        else:
            reason = "; ".join(reasons)
        uncovered.append((path, reason))
    layers.sort(key=lambda layer: layer.tag.kernel)
    info = tuple(
        KFACLayer(
            name=layer.name, kind=layer.tag.kind, kernel=paths[layer.tag.kernel],
            bias=None if layer.tag.bias is None else paths[layer.tag.bias],
            in_dim=layer.tag.d_in, out_dim=layer.tag.d_out, positions=layer.tag.positions,
        )
        for layer in layers
    )
    n_cov = sum(sizes[i] for i in covered if i is not None)
    coverage = KFACCoverage(info, tuple(uncovered), int(sum(sizes)), int(n_cov))
    return _Plan(
        jaxpr=jaxpr,
        consts=tuple(closed.consts),
        n_params=len(flat),
        layers=tuple(layers),
        sites={layer.tag.site: i for i, layer in enumerate(layers)},
        out_sites={layer.tag.out_site: i for i, layer in enumerate(layers)},
        descend=frozenset(acc.descend),
        coverage=coverage,
        params_like=_like(params),
        out_shape=tuple(out_aval.shape),
    )


def _like(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), tree
    )


def _spec_key(tree: PyTree, drop_lead: bool) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    cut = 1 if drop_lead else 0
    return treedef, tuple((tuple(np.shape(x))[cut:], str(jnp.result_type(x))) for x in leaves)


_PLANS: dict = {}
_MAX_PLANS = 32


def _get_plan(model_fn: Callable, params: PyTree, batch: PyTree) -> _Plan:
    """The layer plan of ``model_fn`` for these parameter / example shapes (cached).

    The cache lets repeated ``kfac`` calls at new parameter values reuse the compiled factor
    pass.
    """
    key = (model_fn, _spec_key(params, False), _spec_key(batch, True))
    try:
        hash(key)
    except TypeError:
        return _build_plan(model_fn, _like(params), _like(batch))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _build_plan(model_fn, _like(params), _like(batch))
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = plan
    return plan


# ---------------------------------------------------------------------------------------
# interpreter: activations and probes
# ---------------------------------------------------------------------------------------


def _eval(plan: _Plan, jaxpr, consts, args, prefix, probes, acts) -> list:
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jex.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for i, eqn in enumerate(jaxpr.eqns):
        site = prefix + (i,)
        invals = [read(v) for v in eqn.invars]
        if site in plan.descend:
            sub, sub_consts = _sub_jaxpr(eqn)
            outs = _eval(plan, sub, sub_consts, invals, site, probes, acts)
        else:
            with eqn.ctx.manager:
                ans = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            outs = list(ans) if eqn.primitive.multiple_results else [ans]
        if site in plan.sites:
            layer = plan.sites[site]
            acts[layer] = invals[plan.layers[layer].tag.act_index]
        if site in plan.out_sites:
            layer = plan.out_sites[site]
            outs = [outs[0] + probes[layer].astype(outs[0].dtype)]
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _run(plan: _Plan, param_leaves, example_leaves, probes):
    """``(outputs, activations)`` for one example (a batch of one) with probes added."""
    acts: dict = {}
    (out,) = _eval(plan, plan.jaxpr, plan.consts, list(param_leaves) + list(example_leaves),
                   (), probes, acts)
    return out, tuple(acts[i] for i in range(len(plan.layers)))


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
