"""Jittable probes for a train step: curvature, gradient and weight metrics every N steps.

A :class:`Probe` is a pair of pure functions, optax style::

    state = probe.init(params)
    metrics, state = probe(params, batch, key, state)   # jittable, no side effects

``metrics`` is a flat dict ``{"<probe name>/<field>": array}``; ``state`` is a pytree of
arrays carried in the train state (e.g. the previous top eigenvector, which warm-starts the
next Lanczos run). :func:`every` wraps a probe so that it runs under ``lax.cond`` only on
steps divisible by ``n``: it goes *inside* an existing ``@jax.jit`` / ``nnx.jit`` step,
compiles once and costs nothing on the other steps (skipped metrics are NaN and the flag
``"<name>/probed"`` is False). :func:`combine` merges several probes into one;
:func:`select_probed` keeps, on the host, only what was measured on a step.

Probes never raise and never print inside ``jit``: when a probe's metrics (or its new state)
are not finite, e.g. because training diverged, the metrics are logged as they are (NaN),
the flag ``"<name>/nonfinite"`` is True and the previous state is kept, so a training run is
never killed or poisoned by its telemetry. :class:`gradience_jax.telemetry.TelemetryWriter`
stores such values as ``null``. Integer labels out of range for a built-in head (``-1``, or
``>= num_classes``, on a token of non-zero weight) count as non-finite: inside ``jit`` the
head makes the loss and its curvature NaN, so ``"<name>/nonfinite"`` is True; called eagerly,
the operator a probe builds raises a ``ValueError`` naming ``batch['labels']``.

Arguments are checked when a probe is built (counts, choices, callables) and when it is
called (at trace time, free inside ``jit``): ``key`` must be one PRNG key, ``state`` the
structure ``probe.init(params)`` returns.

Example (optax; the probes see the same ``loss_fn(params, batch)`` as the operators)::

    probe = gj.probes.combine(
        gj.probes.every(10, gj.probes.hessian_eigenvalues(loss_fn, num_iters=5)),
        gj.probes.every(10, gj.probes.weight_metrics()),
    )

    @jax.jit
    def train_step(params, opt_state, pstate, batch, key):
        metrics, pstate = probe(params, batch, key, pstate)
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, pstate, loss, metrics

    pstate = probe.init(params)

With NNX, pass ``nnx.state(model, nnx.Param)`` as ``params`` and the ``loss_fn`` of
``gj.models.from_nnx(model, head)``; the probe state is an ordinary argument / return value
of the ``nnx.jit`` step. Build the probe (and the adapter) once: the adapter's ``loss_fn``
takes the params as an argument, so it stays valid after every optimizer update (calling
``from_nnx`` again gives an equal ``loss_fn`` and reuses the compiled programs too).

References:
    J. Cohen, S. Kaur, Y. Li, Z. Kolter, A. Talwalkar (2021), "Gradient descent on neural
    networks typically occurs at the edge of stability" (sharpness tracking);
    S. McCandlish, J. Kaplan, D. Amodei (2018), "An empirical model of large-batch
    training", appendix A (unbiased gradient noise scale from two batch sizes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax import tree as tu
from gradience_jax._validate import (
    ArgumentTypeError,
    check_choice,
    check_int,
    check_key,
    check_real,
)
from gradience_jax.estimators import DISTRIBUTIONS, hutchinson_trace
from gradience_jax.lanczos import REORTH_MODES, restart_vector
from gradience_jax.operators._common import check_callable
from gradience_jax.operators.ggn import ggn
from gradience_jax.operators.heads import check_loss_targets
from gradience_jax.operators.hessian import hessian
from gradience_jax.spectrum import eigsh_fast
from gradience_jax.weights import (
    MatrixMetrics,
    apply_reshape_rule,
    matrix_metrics,
    reshape_rule_for,
)

PyTree = Any
Metrics = dict[str, jax.Array]
ApplyFn = Callable[[PyTree, PyTree, jax.Array, PyTree], tuple[Metrics, PyTree]]

#: matrix metrics logged per layer by :func:`weight_metrics` unless told otherwise
DEFAULT_WEIGHT_FIELDS = (
    "frobenius_norm",
    "spectral_norm",
    "stable_rank",
    "effective_rank",
    "top_singular_values",
)
WHICH = ("LA", "SA")

__all__ = [
    "DEFAULT_WEIGHT_FIELDS",
    "EigenProbeState",
    "EveryState",
    "Probe",
    "combine",
    "every",
    "ggn_eigenvalues",
    "gradient_stats",
    "hessian_eigenvalues",
    "hessian_trace",
    "select_probed",
    "update_ratios",
    "update_to_weight_ratios",
    "weight_metrics",
]


class Probe(NamedTuple):
    """A jittable probe: ``init(params) -> state``, ``apply(params, batch, key, state)``.

    ``apply`` returns ``(metrics, state)``.

    Attributes:
        name: prefix of every metric key (``"<name>/<field>"``) and of the flags.
        init: builds the initial probe state (a pytree of arrays) from the params.
        apply: the probe itself; pure and jittable. ``probe(...)`` calls it.
    """

    name: str
    init: Callable[[PyTree], PyTree]
    apply: ApplyFn

    def __call__(
        self, params: PyTree, batch: PyTree, key: jax.Array, state: PyTree
    ) -> tuple[Metrics, PyTree]:
        """Run the probe: ``self.apply(params, batch, key, state)``, arguments checked.

        The checks run at trace time (no cost in the compiled step): ``key`` must be one
        PRNG key and ``state`` must have the structure of ``init(params)``.

        Args:
            params: the parameters.
            batch: the data of the step.
            key: one ``jax.random`` key (typed or raw; not ``None``, an int or a batch).
            state: the probe state (from ``init`` or the previous call).

        Returns:
            ``(metrics, new_state)``.

        Raises:
            ValueError: ``key`` is ``None`` or a batch of keys; ``state`` is ``None`` or has
                another structure than ``init(params)``.
            TypeError: ``key`` is not a PRNG key (e.g. the int ``42``).
        """
        key = check_key(key, "key", default=False)
        _check_state(self, params, state)
        return self.apply(params, batch, key, state)


class EveryState(NamedTuple):
    """State of :func:`every`: the number of calls so far and the wrapped probe's state.

    Set ``step`` to your global step when resuming (``state._replace(step=jnp.int32(s))``).
    """

    step: jax.Array
    inner: PyTree


class EigenProbeState(NamedTuple):
    """State of the eigenvalue probes.

    Attributes:
        vectors: pytree stack ``(k, ...)`` of the last Ritz vectors (work dtype, float32 or
            wider); all zeros until the first successful run (then a cold start is used).
    """

    vectors: PyTree


# -- helpers ----------------------------------------------------------------------------------


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name must be a non-empty string without '/', got {name!r}")
    return name


def _check_state(probe: Probe, params: PyTree, state: PyTree) -> None:
    """``state`` must have the pytree structure of ``probe.init(params)`` (shape inference)."""
    if state is None:
        raise ValueError(f"state of probe {probe.name!r} is None: pass state=probe.init(params) "
                         "on the first call, then the state the previous call returned")
    want = jax.tree_util.tree_structure(jax.eval_shape(probe.init, params))
    got = jax.tree_util.tree_structure(state)
    if got != want:
        raise ValueError(f"state of probe {probe.name!r} does not match probe.init(params): "
                         f"structure {got} vs {want} (a state of another probe, or of other "
                         "params?)")


def _check_linearize(linearize: Any) -> bool | str:
    if linearize is True or linearize is False or (isinstance(linearize, str)
                                                     and linearize == "auto"):
        return linearize
    raise ValueError(f"linearize must be True, False or 'auto', got {linearize!r}")


def _is_inexact(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _all_finite(tree: PyTree) -> jax.Array:
    """Scalar bool: every inexact leaf of ``tree`` is finite (integer leaves always are)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree) if _is_inexact(x)]
    if not flags:
        return jnp.asarray(True)
    return jnp.all(jnp.stack(flags))


def _guarded(name: str, fn: ApplyFn) -> ApplyFn:
    """Wrap ``fn`` so non-finite metrics set ``"<name>/nonfinite"`` and keep the old state."""

    def apply(params, batch, key, state):
        metrics, new_state = fn(params, batch, key, state)
        ok = _all_finite(metrics) & _all_finite(new_state)
        kept = jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new_state, state)
        out = dict(metrics)
        out[f"{name}/nonfinite"] = jnp.logical_not(ok)
        return out, kept

    return apply


def _stateless_init(params: PyTree) -> tuple:
    return ()


def _work_zeros(params: PyTree, rows: int) -> PyTree:
    """Zeros ``(rows, *leaf.shape)`` per leaf in the leaf's work dtype (float32 or wider)."""
    return jax.tree_util.tree_map(
        lambda x: jnp.zeros((rows,) + tuple(np.shape(x)),
                            tu.accumulation_dtype(jnp.result_type(x))),
        params,
    )


def _skipped_like(value: jax.ShapeDtypeStruct) -> jax.Array:
    """The placeholder of a metric on a skipped step: NaN, -1 for integers, False for flags."""
    if jnp.issubdtype(value.dtype, jnp.inexact):
        return jnp.full(value.shape, jnp.nan, value.dtype)
    if jnp.issubdtype(value.dtype, jnp.bool_):
        return jnp.zeros(value.shape, value.dtype)
    return jnp.full(value.shape, -1, value.dtype)


# -- combinators ------------------------------------------------------------------------------


def every(n: int, probe: Probe, *, offset: int = 0) -> Probe:
    """Run ``probe`` only on calls ``step`` with ``step % n == offset % n`` (``lax.cond``).

    The returned probe counts its calls in its state (:class:`EveryState`), so it needs no
    step argument and adds no recompilation: put it inside your jitted train step. On other
    steps its metrics are NaN (integers -1, flags False), the wrapped state is unchanged
    and nothing of the probe is executed. Adds the flag ``"<prefix>/probed"`` for every
    metric prefix the probe produces (one per probe of a :func:`combine`).

    Args:
        n: period in steps (``n = 1``: every step).
        probe: the probe to run.
        offset: phase of the schedule (``0``: steps ``0, n, 2n, ...``).

    Returns:
        A :class:`Probe` with the same name.

    Raises:
        ValueError: ``n < 1``.
        ArgumentTypeError: ``n`` or ``offset`` not an integer, ``probe`` not a
            :class:`Probe`.
    """
    n = check_int(n, "n")
    offset = check_int(offset, "offset", lo=None)
    if not isinstance(probe, Probe):
        raise ArgumentTypeError(f"probe must be a Probe, got {type(probe).__name__}")
    phase = offset % n

    def init(params):
        return EveryState(jnp.zeros((), jnp.int32), probe.init(params))

    def apply(params, batch, key, state):
        do = (state.step % n) == phase
        shapes = jax.eval_shape(probe.apply, params, batch, key, state.inner)[0]
        flags = sorted({f"{k.split('/', 1)[0]}/probed" for k in shapes})
        clash = sorted(set(flags) & set(shapes))
        if clash:
            raise ValueError(f"probe {probe.name!r} already produces the metrics {clash}")

        def run(operands):
            return probe.apply(*operands)

        def skip(operands):
            return {k: _skipped_like(v) for k, v in shapes.items()}, operands[3]

        metrics, inner = jax.lax.cond(do, run, skip, (params, batch, key, state.inner))
        metrics = dict(metrics)
        for f in flags:
            metrics[f] = do
        return metrics, EveryState(state.step + 1, inner)

    return Probe(probe.name, init, apply)


def combine(*probes: Probe, name: str = "probes") -> Probe:
    """One probe running ``probes`` in order; metrics are merged, states kept in a tuple.

    Each probe gets its own key (``jax.random.fold_in(key, i)``).

    Args:
        *probes: the probes, with unique names.
        name: the name of the combined probe.

    Returns:
        A :class:`Probe` whose state is the tuple of the probes' states.

    Raises:
        ValueError: no probes, or two probes producing the same metric key (at trace time;
            rename one with its ``name`` argument).
        ArgumentTypeError: a non-:class:`Probe` argument (a ``ValueError`` too).
    """
    if not probes:
        raise ValueError("combine needs at least one probe")
    for i, p in enumerate(probes):
        if not isinstance(p, Probe):
            raise ArgumentTypeError(f"probes[{i}] is not a Probe, got {type(p).__name__}")
    names = [p.name for p in probes]
    dup = sorted({x for x in names if names.count(x) > 1})
    if dup:
        raise ValueError(f"probe names must be unique in combine, got duplicates {dup}")

    def init(params):
        return tuple(p.init(params) for p in probes)

    def apply(params, batch, key, state):
        merged: Metrics = {}
        new_states = []
        for i, (p, s) in enumerate(zip(probes, state)):
            metrics, s = p.apply(params, batch, jax.random.fold_in(key, i), s)
            clash = sorted(set(metrics) & set(merged))
            if clash:
                raise ValueError(f"probe {p.name!r} repeats metric keys {clash}")
            merged.update(metrics)
            new_states.append(s)
        return merged, tuple(new_states)

    return Probe(_check_name(name), init, apply)


def select_probed(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Host side: drop the metrics of probes that were skipped on this step.

    Keys ``"<name>/..."`` are removed when ``metrics["<name>/probed"]`` is False; the
    ``probed`` flags themselves are removed too. Arrays are fetched to NumPy.

    Args:
        metrics: a probe's metrics dict (device or host arrays).

    Returns:
        A new dict with only the metrics measured on this step.
    """
    host = jax.device_get(dict(metrics))
    skipped = {
        k[: -len("/probed")] for k, v in host.items() if k.endswith("/probed") and not bool(v)
    }
    return {
        k: v
        for k, v in host.items()
        if not k.endswith("/probed") and k.split("/", 1)[0] not in skipped
    }


# -- curvature probes ---------------------------------------------------------------------------


def _eigen_probe(
    name: str,
    build_op: Callable[[PyTree, PyTree], Any],
    *,
    k: int,
    which: str,
    num_iters: int,
    cold_restarts: int,
    reorth: str,
    perturbation: float,
) -> Probe:
    k = check_int(k, "k")
    num_iters = check_int(num_iters, "num_iters")
    if num_iters < k:
        raise ValueError(f"num_iters={num_iters} must be >= k={k}")
    check_choice(which, "which", WHICH)
    check_choice(reorth, "reorth", REORTH_MODES)
    cold_restarts = check_int(cold_restarts, "cold_restarts")
    perturbation = check_real(perturbation, "perturbation", lo=0.0)
    if perturbation >= 1.0:
        raise ValueError(f"perturbation must be in [0, 1), got {perturbation!r}")

    def init(params):
        return EigenProbeState(_work_zeros(params, k))

    def fn(params, batch, key, state):
        op = build_op(params, batch)
        n_params = op.n_params
        if k > n_params:
            raise ValueError(f"k={k} exceeds the number of parameters {n_params}")
        iters = min(num_iters, n_params) if reorth == "full" else num_iters
        k_noise, k_lanczos = jax.random.split(key)
        vecs = state.vectors
        v0 = jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), vecs)
        v0_norm = tu.norm(v0)
        if perturbation > 0.0:
            # cheap elementwise pseudo-random vector (no PRNG kernel per leaf)
            noise = restart_vector(v0, k_noise, jnp.asarray(0))
            tiny = jnp.finfo(v0_norm.dtype).tiny
            v0 = tu.axpy(perturbation * v0_norm / jnp.maximum(tu.norm(noise), tiny), noise, v0)

        def round_(i, carry):
            v, _, _, _ = carry
            res = eigsh_fast(op, v, k=k, num_iters=iters, which=which, reorth=reorth,
                             key=jax.random.fold_in(k_lanczos, i))
            vectors = jax.tree_util.tree_map(lambda a, b: a.astype(b.dtype), res.eigenvectors, vecs)
            v_next = jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), vectors)
            return v_next, res.eigenvalues, res.residuals, vectors

        dt = tu.accumulation_dtype(op.dtype)
        carry = (v0, jnp.zeros((k,), dt), jnp.zeros((k,), dt), vecs)
        # a cold start (zero state) restarts the Lanczos run from its own Ritz vectors
        rounds = jnp.where(v0_norm == 0, cold_restarts, 1)
        _, values, residuals, vectors = jax.lax.fori_loop(0, rounds, round_, carry)
        metrics = {f"{name}/eigenvalue": values[0], f"{name}/residual": jnp.max(residuals)}
        if k > 1:
            metrics[f"{name}/eigenvalues"] = values
        return metrics, EigenProbeState(vectors)

    return Probe(name, init, _guarded(name, fn))


def hessian_eigenvalues(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    *,
    k: int = 1,
    which: str = "LA",
    num_iters: int = 5,
    cold_restarts: int = 4,
    reorth: str = "full",
    perturbation: float = 1e-2,
    linearize: bool = True,
    name: str | None = None,
) -> Probe:
    """Top (``which="LA"``) or bottom (``"SA"``) Hessian eigenvalues by warm-started Lanczos.

    Each call runs ``num_iters`` Lanczos iterations (:func:`gradience_jax.spectrum.eigsh_fast`)
    from the previous call's Ritz vectors (summed when ``k > 1``), slightly perturbed by a
    random vector of relative norm ``perturbation`` so that a new leading direction is not
    missed. The first call (zero state) starts from a random vector and restarts the
    Lanczos run ``cold_restarts`` times from its own Ritz vectors (one compiled loop body).

    Cost per call: ``num_iters`` Hessian-vector products (``~2-3`` gradients each; with
    ``linearize=True`` the gradient is linearised once and each product pays the tangent
    pass only).

    Metrics: ``"<name>/eigenvalue"`` (the largest for ``"LA"``, the smallest for ``"SA"``),
    ``"<name>/residual"`` (largest Ritz residual bound ``|beta_m s_mi|``),
    ``"<name>/eigenvalues"`` (``(k,)``, only when ``k > 1``), ``"<name>/nonfinite"``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss.
        k: number of eigenvalues.
        which: ``"LA"`` (largest algebraic) or ``"SA"`` (smallest algebraic).
        num_iters: warm-started Lanczos iterations per call (clamped to ``n_params``).
        cold_restarts: Lanczos runs of ``num_iters`` iterations on the first (cold) call.
        reorth: Lanczos re-orthogonalisation (``"full"``, ``"window"``, ``"none"``).
        perturbation: relative norm of the random perturbation of the warm start.
        linearize: linearise the gradient once per call (see :func:`gradience_jax.hessian`).
        name: metric prefix (default ``"hessian_top"`` / ``"hessian_bottom"``).

    Returns:
        A :class:`Probe` whose state is an :class:`EigenProbeState`.

    Raises:
        ValueError: bad ``k`` / ``which`` / ``num_iters`` / ``reorth`` / ``perturbation`` /
            ``linearize`` / ``name``.
        ArgumentTypeError: ``loss_fn`` not callable, a count that is not an integer, a
            ``perturbation`` that is not a real number.
    """
    check_callable(loss_fn, "loss_fn")
    linearize = _check_linearize(linearize)
    default = "hessian_top" if which == "LA" else "hessian_bottom"
    name = _check_name(default if name is None else name)

    def build(params, batch):
        return hessian(loss_fn, params, batch, linearize=linearize, check=False)

    return _eigen_probe(name, build, k=k, which=which, num_iters=num_iters,
                        cold_restarts=cold_restarts, reorth=reorth, perturbation=perturbation)


def ggn_eigenvalues(
    model_fn: Callable[[PyTree, PyTree], jax.Array],
    head: Callable[[jax.Array, PyTree], jax.Array],
    *,
    k: int = 1,
    num_iters: int = 5,
    cold_restarts: int = 4,
    reorth: str = "full",
    perturbation: float = 1e-2,
    linearize: bool = True,
    name: str = "ggn_top",
) -> Probe:
    """Top GGN eigenvalues ``J^T H_head J`` by warm-started Lanczos.

    For softmax cross-entropy these are the Fisher's. Same state, metrics and arguments as
    :func:`hessian_eigenvalues` (``which`` is always ``"LA"``); one GGN product (a ``jvp``
    and a ``vjp`` of ``model_fn``) per iteration.

    Args:
        model_fn: ``model_fn(params, batch) -> outputs``.
        head: ``head(outputs, batch) -> scalar`` loss on the outputs.
        k: number of eigenvalues.
        num_iters: warm-started Lanczos iterations per call (clamped to ``n_params``).
        cold_restarts: Lanczos runs of ``num_iters`` iterations on the first (cold) call.
        reorth: Lanczos re-orthogonalisation (``"full"``, ``"window"``, ``"none"``).
        perturbation: relative norm of the random perturbation of the warm start.
        linearize: linearise ``model_fn`` once per call (see :func:`gradience_jax.ggn`).
        name: metric prefix.

    Returns:
        A :class:`Probe` whose state is an :class:`EigenProbeState`.

    Raises:
        ValueError: bad ``k`` / ``num_iters`` / ``reorth`` / ``perturbation`` /
            ``linearize`` / ``name``.
        ArgumentTypeError: ``model_fn`` / ``head`` not callable, a count that is not an
            integer, a ``perturbation`` that is not a real number.
    """
    check_callable(model_fn, "model_fn")
    check_callable(head, "head")
    linearize = _check_linearize(linearize)
    name = _check_name(name)

    def build(params, batch):
        return ggn(model_fn, head, params, batch, linearize=linearize, check=False)

    return _eigen_probe(name, build, k=k, which="LA", num_iters=num_iters,
                        cold_restarts=cold_restarts, reorth=reorth, perturbation=perturbation)


def hessian_trace(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    *,
    num_samples: int = 10,
    distribution: str = "rademacher",
    linearize: bool = True,
    name: str = "hessian_trace",
) -> Probe:
    """Hutchinson estimate of ``tr H`` (:func:`gradience_jax.estimators.hutchinson_trace`).

    Cost: ``num_samples`` Hessian-vector products. Metrics: ``"<name>/estimate"``,
    ``"<name>/stderr"`` (standard error over the probes), ``"<name>/nonfinite"``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss.
        num_samples: Hutchinson probes per call.
        distribution: ``"rademacher"`` or ``"normal"`` probe vectors.
        linearize: linearise the gradient once per call (see :func:`gradience_jax.hessian`).
        name: metric prefix.

    Returns:
        A stateless :class:`Probe`.

    Raises:
        ValueError: ``num_samples < 1``, an unknown ``distribution``, a bad ``linearize`` or
            ``name``.
        ArgumentTypeError: ``loss_fn`` not callable, ``num_samples`` not an integer.
    """
    check_callable(loss_fn, "loss_fn")
    name = _check_name(name)
    num_samples = check_int(num_samples, "num_samples")
    check_choice(distribution, "distribution", DISTRIBUTIONS)
    linearize = _check_linearize(linearize)

    def fn(params, batch, key, state):
        op = hessian(loss_fn, params, batch, linearize=linearize, check=False)
        est = hutchinson_trace(op, key, num_samples, distribution)
        return {f"{name}/estimate": est.estimate, f"{name}/stderr": est.stderr}, state

    return Probe(name, _stateless_init, _guarded(name, fn))


# -- gradient probe ------------------------------------------------------------------------------


def _split_batch(batch: PyTree, m: int) -> PyTree:
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError("batch has no array leaves")
    size = int(np.shape(leaves[0])[0])
    if size % m:
        raise ValueError(
            f"num_microbatches={m} must divide the batch size {size} (equal micro-batches "
            "keep the noise-scale estimator unbiased)"
        )
    return jax.tree_util.tree_map(lambda x: x.reshape((m, size // m) + x.shape[1:]), batch), size


def gradient_stats(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    *,
    num_microbatches: int = 4,
    name: str = "gradient",
) -> Probe:
    """Gradient norm and the gradient noise scale ``B_simple = tr(Sigma) / |G|^2``.

    The batch (size ``B``) is split into ``m = num_microbatches`` equal micro-batches of size
    ``b``; their gradients ``g_i`` (one ``vmap`` of ``grad``) give the full-batch gradient
    ``G = mean_i g_i`` and, with ``|g_b|^2 = mean_i |g_i|^2``, McCandlish et al.'s unbiased
    estimates (appendix A)::

        |G_true|^2 ~ (B |G|^2 - b |g_b|^2) / (B - b)
        tr(Sigma)  ~ (|g_b|^2 - |G|^2) / (1/b - 1/B)

    ``tr(Sigma)`` is the per-example gradient covariance trace. The noise-scale ratio is
    noisy for one batch (its numerator and denominator are estimated separately): average
    numerator and denominator over probes before dividing when you can.

    Cost: ``m`` gradients of size-``b`` batches (one full-batch gradient's work) and
    ``m x P`` memory.

    Metrics: ``"<name>/norm"`` (``|G|``), ``"<name>/norm_sq_unbiased"``,
    ``"<name>/trace_cov"``, ``"<name>/noise_scale"`` (NaN when ``m = 1``),
    ``"<name>/nonfinite"``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss.
        num_microbatches: ``m``, the number of equal micro-batches (must divide ``B``).
        name: metric prefix.

    Returns:
        A stateless :class:`Probe`.

    Raises:
        ValueError: ``num_microbatches < 1``, or (at trace time) not a divisor of the batch
            size; integer labels out of range (eager calls, a composed loss).
        ArgumentTypeError: ``loss_fn`` not callable, ``num_microbatches`` not an integer.
    """
    check_callable(loss_fn, "loss_fn")
    name = _check_name(name)
    m = check_int(num_microbatches, "num_microbatches")

    def fn(params, batch, key, state):
        check_loss_targets(loss_fn, params, batch)  # host check; traced labels give NaN
        micro, size = _split_batch(batch, m)
        grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, micro)
        g_mean = jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), grads)
        big_sq = tu.vdot(g_mean, g_mean)
        per = jax.vmap(lambda g: tu.vdot(g, g))(grads)
        small_sq = jnp.mean(per)
        big, small = float(size), float(size // m)
        if m > 1:
            g_sq = (big * big_sq - small * small_sq) / (big - small)
            trace_cov = (small_sq - big_sq) / (1.0 / small - 1.0 / big)
            noise = trace_cov / g_sq
        else:
            g_sq = big_sq
            trace_cov = jnp.full((), jnp.nan, big_sq.dtype)
            noise = jnp.full((), jnp.nan, big_sq.dtype)
        metrics = {
            f"{name}/norm": jnp.sqrt(big_sq),
            f"{name}/norm_sq_unbiased": g_sq,
            f"{name}/trace_cov": trace_cov,
            f"{name}/noise_scale": noise,
        }
        return metrics, state

    def apply(params, batch, key, state):
        metrics, state = fn(params, batch, key, state)
        ok = _all_finite({k: v for k, v in metrics.items() if m > 1 or k.endswith("norm")})
        out = dict(metrics)
        out[f"{name}/nonfinite"] = jnp.logical_not(ok)
        return out, state

    return Probe(name, _stateless_init, apply)


# -- weight probes --------------------------------------------------------------------------------


def _weight_leaves(
    params: PyTree, filter_fn: Callable[[str, Any], bool] | None
) -> list[tuple[str, str, Any]]:
    """``(path, rule, leaf)`` for every leaf the auto rule of ``weights`` treats as a matrix."""
    out = []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = tu.path_str(kp)
        if not _is_inexact(leaf):
            continue
        if filter_fn is not None and not filter_fn(path, leaf):
            continue
        rule, _ = reshape_rule_for(path, tuple(np.shape(leaf)))
        if rule is not None:
            out.append((path, rule, leaf))
    return out


def weight_metrics(
    *,
    fields: Sequence[str] = DEFAULT_WEIGHT_FIELDS,
    k_top: int = 3,
    filter: Callable[[str, Any], bool] | None = None,  # noqa: A002 - matches weight_spectra
    name: str = "weights",
) -> Probe:
    """Per-layer weight-matrix metrics (:func:`gradience_jax.weights.matrix_metrics`).

    Every kernel that :func:`gradience_jax.weight_spectra` analyses (2-D kernels as they are,
    conv / attention kernels reshaped by the same ``"auto"`` rule; biases and scales
    skipped) gets ``"<name>/<path>/<field>"`` for each of ``fields`` (any
    :class:`gradience_jax.weights.MatrixMetrics` field, e.g. ``effective_rank``,
    ``stable_rank``, ``spectral_norm``, ``condition_number``, ``top_singular_values``
    (``(k_top,)``)), plus ``"<name>/global_norm"`` (Euclidean norm of all parameters).
    Power-law ``alpha`` needs a host-side fit: use :func:`gradience_jax.weight_spectra`.

    Cost: one SVD per layer (``O(N M^2)``); no state.

    Args:
        fields: the :class:`~gradience_jax.weights.MatrixMetrics` fields to log.
        k_top: number of top singular values (``top_singular_values``).
        filter: optional ``(path, leaf) -> bool`` selecting the leaves analysed.
        name: metric prefix.

    Returns:
        A stateless :class:`Probe`.

    Raises:
        ValueError: unknown field, ``k_top < 1``, bad ``name``.
        ArgumentTypeError: ``k_top`` not an integer, ``filter`` not callable.
    """
    if filter is not None:
        check_callable(filter, "filter")
    name = _check_name(name)
    if isinstance(fields, str):
        raise ArgumentTypeError(f"fields must be a sequence of MatrixMetrics field names, got "
                                f"the string {fields!r} (write ({fields!r},))")
    fields = tuple(fields)
    bad = [f for f in fields if f not in MatrixMetrics._fields]
    if bad:
        raise ValueError(f"fields {bad} are not MatrixMetrics fields {MatrixMetrics._fields}")
    k_top = check_int(k_top, "k_top")

    def fn(params, batch, key, state):
        metrics: Metrics = {f"{name}/global_norm": tu.norm(params)}
        for path, rule, leaf in _weight_leaves(params, filter):
            mm = matrix_metrics(apply_reshape_rule(leaf, rule), k_top=k_top)
            for f in fields:
                metrics[f"{name}/{path}/{f}"] = getattr(mm, f)
        return metrics, state

    return Probe(name, _stateless_init, _guarded(name, fn))


def update_to_weight_ratios(
    updates: PyTree, params: PyTree, *, name: str = "update_ratio", eps: float = 1e-12
) -> Metrics:
    """``||u_l|| / ||w_l||`` per parameter leaf and globally (pure, jittable).

    Call it in the train step with the optimiser's update (``optax`` ``updates`` or
    ``new_params - params`` for ``nnx.Optimizer``) and the parameters it is applied to.

    Args:
        updates: the update, a pytree like ``params``.
        params: the parameters the update is applied to.
        name: metric prefix.
        eps: floor of ``||w||`` against division by zero.

    Returns:
        ``{"<name>/<path>": ratio, "<name>/global": ||u|| / ||w||}``.

    Raises:
        ValueError: ``updates`` and ``params`` have different numbers of leaves, or ``eps``
            is not a finite number ``> 0``.
    """
    eps = check_real(eps, "eps", lo=0.0, lo_open=True)
    out: Metrics = {}
    flat_u = jax.tree_util.tree_flatten_with_path(updates)[0]
    flat_w = jax.tree_util.tree_leaves(params)
    if len(flat_u) != len(flat_w):
        raise ValueError(
            f"updates has {len(flat_u)} leaves, params has {len(flat_w)}: they must match"
        )
    for (kp, u), w in zip(flat_u, flat_w):
        out[f"{name}/{tu.path_str(kp)}"] = tu.norm(u) / jnp.maximum(tu.norm(w), eps)
    out[f"{name}/global"] = tu.norm(updates) / jnp.maximum(tu.norm(params), eps)
    return out


class _PrevParams(NamedTuple):
    params: PyTree
    valid: jax.Array


def update_ratios(*, name: str = "update_ratio") -> Probe:
    """Relative parameter change since the previous call: ``||w_t - w_s|| / ||w_s||``.

    The state keeps a copy of the parameters (``P`` extra memory). Called every step it is
    the update-to-weight ratio of each step; under :func:`every` it spans the ``n`` steps
    between probes (use :func:`update_to_weight_ratios` on the optimiser's updates for the
    per-step ratio on sparse schedules). NaN on the first call.

    Metrics: ``"<name>/<path>"`` per leaf, ``"<name>/global"``, ``"<name>/nonfinite"``.

    Args:
        name: metric prefix.

    Returns:
        A :class:`Probe` whose state holds the previous parameters.

    Raises:
        ValueError: a bad ``name``.
    """
    name = _check_name(name)

    def init(params):
        return _PrevParams(jax.tree_util.tree_map(jnp.asarray, params), jnp.asarray(False))

    def apply(params, batch, key, state):
        delta = jax.tree_util.tree_map(jnp.subtract, params, state.params)
        ratios = update_to_weight_ratios(delta, state.params, name=name)
        nan = jnp.asarray(jnp.nan)
        ratios = {k: jnp.where(state.valid, v, nan.astype(v.dtype)) for k, v in ratios.items()}
        new = _PrevParams(jax.tree_util.tree_map(jnp.asarray, params), jnp.asarray(True))
        ok = _all_finite(params)
        kept = jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, state)
        ratios[f"{name}/nonfinite"] = state.valid & jnp.logical_not(_all_finite(ratios))
        return ratios, kept

    return Probe(name, init, apply)
