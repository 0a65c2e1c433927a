"""K-FAC's layer discovery: find the Dense / Conv / Embed layers of a model in its jaxpr.

``model_fn`` is traced once to a jaxpr (``jax.make_jaxpr``, batch of one) and the layers
are recognised from the primitives that consume parameter leaves: framework-agnostic (Flax
NNX, Linen, plain functions), no model changes, no ``sow``. A small jaxpr interpreter
(:func:`_run`) re-evaluates the model, records each layer's input and adds a zero "probe" to
each layer's output, so the output gradients are the ``jax.vjp`` of the outputs w.r.t. the
probes. Nested ``jit`` / ``custom_jvp`` / ``custom_vjp`` calls that receive a raw
parameter are evaluated inline (so ``jnp.take`` embeddings and ``jnp.einsum`` projections
are found); control flow (``scan``, ``while``, ``cond``) is not looked into. The coverage
report (:class:`KFACCoverage`) lists every parameter leaf no layer covers, with the reason
(LayerNorm scales, unfoldable biases, grouped convolutions, weight tying, parameters inside
control flow, unused parameters). The factors and the operator built on this live in
:mod:`gradience_jax.operators.kfac`.

Supported names: ``KFACCoverage``, ``KFACCoverageWarning``, ``KFACLayer`` (the ``__all__``
list; re-exported by :mod:`~gradience_jax.operators.kfac`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex

from gradience_jax.tree import path_str

PyTree = Any

__all__ = ["KFACCoverage", "KFACCoverageWarning", "KFACLayer"]

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
