"""Influence of training examples on test measurements: influence functions, TracIn.

Influence functions (Koh & Liang 2017): with ``g(z) = grad_params loss(params, z)`` (each
example fed to ``loss_fn`` as a batch of one) and ``H`` the curvature of the training
objective ``loss_fn(params, train)`` at ``params``,

    ``I(z_train, z_test) = - g_test^T (H + d I)^{-1} g_train``

is the derivative of the test measurement when ``z_train`` is up-weighted in the (mean)
training objective. So **positive scores are harmful** (up-weighting the example raises
the test loss) and negative ones helpful, and removing training example ``i`` (a weight of
``-1/n``) changes the test measurement by about ``-scores[t, i] / n_train``. At a minimum
of the objective this first-order prediction matches leave-one-out retraining
(``tests/test_influence.py`` checks it against actual retraining).

Vectorised: per-example gradients by ``jax.vmap(jax.grad)``, ``chunk_size`` examples at a
time; one solve per test example (:func:`gradience_jax.solvers.solve`'s methods, the
preparation -- spectrum, eigenpairs, K-FAC / EK-FAC factors -- done once and the solves
vmapped), then one matrix product with each chunk of training gradients. Memory:
``O((n_test + chunk_size) P)``; time: ``n_test`` solves plus ``n_train + n_test`` gradients.

* ``method="ekfac"``: EK-FAC influence as in Grosse et al. (2023): the factors are computed
  once from the training set, each query is two small matrix products per layer.
* :func:`self_influence`: ``g_i^T (H + d I)^{-1} g_i``; large values flag examples the model
  finds surprising (mislabelled, atypical), Koh & Liang s. 5.4.
* :func:`tracin`: TracIn (Pruthi et al. 2020), the cheap baseline without an inverse:
  ``sum_c lr_c g_test(params_c) . g_train(params_c)`` over checkpoints. Its sign is the
  paper's: **positive = proponent** (a step on the example lowered the test loss).

Every result is an :class:`InfluenceResult`: the score array plus an
:class:`InfluenceRecord` (method, damping, the true residual of every solve, iterations,
warnings) that serialises to JSON (``to_dict``).

Supported names: ``influence``, ``self_influence``, ``tracin``, ``InfluenceResult``,
``InfluenceRecord``, ``InfluenceWarning`` (the ``__all__`` list).

References:
    P. W. Koh & P. Liang (2017), "Understanding black-box predictions via influence
    functions"; G. Pruthi, F. Liu, S. Kale & M. Sundararajan (2020), "Estimating training
    data influence by tracing gradient descent"; R. Grosse et al. (2023), "Studying large
    language model generalization with influence functions"; A. Schioppa et al. (2022),
    "Scaling up influence functions".
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax import tree as tu
from gradience_jax._json import jsonable
from gradience_jax._validate import (
    ArgumentTypeError,
    check_batch,
    check_int,
    check_like,
    check_loss_at_point,
    check_params,
    check_real,
    check_scalar_fn,
)
from gradience_jax.operators.base import LinearOperator, check_operator
from gradience_jax.operators.ekfac import EKFACOperator, ekfac
from gradience_jax.operators.fisher import CHUNK_BYTES
from gradience_jax.operators.hessian import hessian
from gradience_jax.operators.kfac import KFACOperator, kfac
from gradience_jax.solvers import _finish, _prepare, _raise_nonfinite, _solve_stack

PyTree = Any

__all__ = [
    "InfluenceRecord",
    "InfluenceResult",
    "InfluenceWarning",
    "influence",
    "self_influence",
    "tracin",
]

_SIGN_IF = ("positive: up-weighting the training example raises the test measurement "
            "(harmful); removing example i changes it by about -score / n_train")
_SIGN_SELF = "g_i^T (H + d I)^{-1} g_i: large = surprising to the model (e.g. mislabelled)"
_SIGN_TRACIN = "positive: proponent (training on the example lowered the test loss)"


class InfluenceWarning(UserWarning):
    """Some inverse solves of an influence computation did not converge, or are indefinite."""


@dataclasses.dataclass(frozen=True)
class InfluenceRecord:
    """How the scores were computed (JSON via :meth:`to_dict`).

    Attributes:
        method: the solve method (``"cg"``, ``"lissa"``, ``"arnoldi"``, ``"kfac"``,
            ``"ekfac"``) or ``"tracin"``.
        kind: ``"influence"``, ``"self_influence"`` or ``"tracin"``.
        sign: what a positive score means.
        damping: the damping used (``None`` for TracIn).
        n_train: training examples; n_test: test examples (0 for self-influence);
            n_params: parameters.
        residuals: ``(n_solves,)`` true relative residuals ``||(H + d I) x - g|| / ||g||``
            (one per test example, per training example for self-influence; empty for
            TracIn).
        iterations: ``(n_solves,)`` iterations of each solve.
        converged: all solves converged (see :class:`~gradience_jax.solvers.SolveResult`).
        operator: the curvature's name.
        warnings: what went wrong (also emitted as :class:`InfluenceWarning`).
        info: the solve's details (``damping_rule``, ``lambda_max``, ...), the checkpoints
            and learning rates for TracIn.
        wall_time_s: seconds, the preparation included.
    """

    method: str
    kind: str
    sign: str
    damping: float | None
    n_train: int
    n_test: int
    n_params: int
    residuals: np.ndarray
    iterations: np.ndarray
    converged: bool
    operator: str | None
    warnings: tuple[str, ...]
    info: dict
    wall_time_s: float

    @property
    def max_residual(self) -> float:
        """The largest residual (0 when no solve was made)."""
        return float(np.max(self.residuals)) if self.residuals.size else 0.0

    def to_dict(self) -> dict:
        """JSON-safe dict (``max_residual`` included)."""
        out = dataclasses.asdict(self)
        out["max_residual"] = self.max_residual
        return jsonable(out)


class InfluenceResult(NamedTuple):
    """Scores and how they were computed.

    Attributes:
        scores: float64 ``(n_test, n_train)`` (:func:`influence`, :func:`tracin`) or
            ``(n_train,)`` (:func:`self_influence`).
        record: :class:`InfluenceRecord`.
    """

    scores: np.ndarray
    record: InfluenceRecord

    def top(self, k: int = 10, test_index: int | None = None) -> dict[str, np.ndarray]:
        """Indices of the ``k`` highest and lowest scores (of one test example's row).

        Args:
            k: how many of each.
            test_index: the row for 2-D scores (required there); ``None`` for 1-D scores.

        Returns:
            ``{"highest": idx, "lowest": idx}``, each ordered from the extreme inwards.
            For influence ``"highest"`` are the most harmful, ``"lowest"`` the most helpful;
            for self-influence ``"highest"`` the most surprising; for TracIn ``"highest"``
            the proponents.

        Raises:
            ValueError: ``k < 1`` or a missing / out-of-range ``test_index``.
        """
        k = check_int(k, "k", lo=1)
        row = self.scores
        if row.ndim == 2:
            if test_index is None:
                raise ValueError("test_index is required for (n_test, n_train) scores")
            row = row[check_int(test_index, "test_index", lo=0, hi=row.shape[0] - 1)]
        elif test_index is not None:
            raise ValueError("test_index applies to 2-D scores only")
        order = np.argsort(row, kind="stable")
        k = min(k, row.shape[0])
        return {"highest": order[::-1][:k], "lowest": order[:k]}

    def to_dict(self, scores: bool = True) -> dict:
        """JSON-safe dict: the record, and the scores unless ``scores=False``.

        Args:
            scores: include the score array (as nested lists).

        Returns:
            A dict for ``json.dumps``.
        """
        out = self.record.to_dict()
        if scores:
            out["scores"] = jsonable(self.scores)
        return out


# ---------------------------------------------------------------------------------------
# per-example gradients, chunked
# ---------------------------------------------------------------------------------------


def _example_grad(fn: Callable) -> Callable:
    def one(p, ex):
        return fn(p, jax.tree_util.tree_map(lambda x: x[None], ex))

    return jax.grad(one)


@functools.partial(jax.jit, static_argnums=0)
def _grads(fn, params, chunk):
    return jax.vmap(_example_grad(fn), in_axes=(None, 0))(params, chunk)


@functools.partial(jax.jit, static_argnums=0)
def _neg_scores(fn, params, chunk, xs):
    g = jax.vmap(_example_grad(fn), in_axes=(None, 0))(params, chunk)
    return -tu.stacked_gram(xs, g)


@functools.partial(jax.jit, static_argnums=0)
def _dot_scores(fn, params, chunk, xs):
    g = jax.vmap(_example_grad(fn), in_axes=(None, 0))(params, chunk)
    return tu.stacked_gram(xs, g)


def _default_chunk(params: PyTree, n: int) -> int:
    row = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
    return int(max(1, min(n, (4 * CHUNK_BYTES) // max(row, 1))))


def _chunks(batch: PyTree, n: int, size: int):
    """``(start, stop, chunk)`` with every chunk ``size`` long (the last padded by example 0)."""
    for start in range(0, n, size):
        stop = min(start + size, n)
        idx = np.arange(start, start + size)
        idx[idx >= n] = 0
        yield start, stop, jax.tree_util.tree_map(lambda x, i=idx: x[i], batch)


def _stacked_grads(fn: Callable, params: PyTree, batch: PyTree, n: int, size: int) -> PyTree:
    parts = [jax.tree_util.tree_map(lambda x, m=stop - start: x[:m], _grads(fn, params, chunk))
             for start, stop, chunk in _chunks(batch, n, size)]
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *parts)


# ---------------------------------------------------------------------------------------
# the inverse, prepared once
# ---------------------------------------------------------------------------------------


def _split(loss_fn: Any, model_fn: Any, head: Any) -> tuple[Any, Any]:
    if model_fn is None and head is None and hasattr(loss_fn, "model_fn") and hasattr(
            loss_fn, "head"):
        return loss_fn.model_fn, loss_fn.head
    return model_fn, head


def _approximation(method: str, approx: Any, loss_fn: Any, model_fn: Any, head: Any,
                   params: PyTree, train: PyTree, fisher_type: str, key: Any) -> Any:
    if method not in ("kfac", "ekfac") or approx is not None:
        return approx
    model_fn, head = _split(loss_fn, model_fn, head)
    if model_fn is None or head is None:
        raise ValueError(
            f"method={method!r} builds a K-FAC from model_fn and head: pass model_fn=..., "
            "head=... (or loss_fn=gj.compose(model_fn, head), or approx=<operator>)")
    build = kfac if method == "kfac" else ekfac
    return build(model_fn, head, params, train, fisher_type=fisher_type, key=key)


def _check_fn(fn: Any, name: str) -> Callable:
    if not callable(fn):
        raise ArgumentTypeError(f"{name} must be a callable fn(params, batch) -> scalar, got "
                                f"{type(fn).__name__}")
    return fn


class _Setup(NamedTuple):
    prep: Any
    loss_fn: Callable
    n_train: int
    chunk: int


def _setup(loss_fn, params, train, *, operator, method, damping, approx, model_fn, head,
           fisher_type, chunk_size, key, tol, maxiter, rank, preconditioner, scale,
           check) -> _Setup:
    loss_fn = _check_fn(loss_fn, "loss_fn")
    check_params(params)
    n_train = check_batch(train, "train")
    check_scalar_fn(loss_fn, (params, train), "loss_fn")
    if check:
        check_loss_at_point(loss_fn, params, train, "loss_fn on the training batch")
    if operator is None:
        operator = hessian(loss_fn, params, train, check=False)
    else:
        check_operator(operator, "operator")
        check_like(params, operator.params_like, "params", f"the {operator.name} operator's "
                   "params")
    chunk = (_default_chunk(params, n_train) if chunk_size is None
             else check_int(chunk_size, "chunk_size", lo=1))
    approx = _approximation(method, approx, loss_fn, model_fn, head, params, train,
                            fisher_type, key)
    prep = _prepare(operator, method=method, damping=damping, tol=tol, maxiter=maxiter,
                    preconditioner=preconditioner, scale=scale, rank=rank, eigenpairs=None,
                    approx=approx, bounds=None, key=key, check=check, traced=False)
    return _Setup(prep, loss_fn, n_train, chunk)


def _solve_all(prep, gs: PyTree, n: int, chunk: int) -> tuple[PyTree, np.ndarray, np.ndarray]:
    """``(H + d I)^{-1} g`` for stacked ``gs`` (``n`` rows), ``chunk`` at a time."""
    op = prep.op
    d = jnp.asarray(prep.damping, op.dtype)
    tol = jnp.asarray(0.0 if prep.tol is None else prep.tol, op.dtype)
    maxiter = jnp.asarray(prep.maxiter, jnp.int32)
    xs, ks, rs = [], [], []
    for start, stop, part in _chunks(gs, n, chunk):
        x, k, r = _solve_stack(prep.method, op, d, prep.extra, tol, maxiter, part)
        m = stop - start
        xs.append(jax.tree_util.tree_map(lambda a, m=m: a[:m], x))
        ks.append(np.asarray(k)[:m])
        rs.append(np.asarray(r, np.float64)[:m])
    x = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *xs)
    return x, np.concatenate(ks), np.concatenate(rs)


def _summarise(prep, residuals: np.ndarray, iterations: np.ndarray,
               warn: bool) -> tuple[bool, list[str], np.ndarray]:
    """Aggregate the per-solve ``converged`` flags and warnings; returns iterations too."""
    _raise_nonfinite(prep, residuals, f"{len(residuals)} solves")
    if prep.method == "arnoldi":
        iterations = np.full_like(iterations, int(prep.info.get("eigen_matvecs", 0)))
    flags, messages = [], []
    for r, k in zip(residuals, iterations):
        ok, w = _finish(prep, float(r), int(k))
        flags.append(ok)
        messages.append([m for m in w if m not in prep.warnings])
    warns = list(prep.warnings)
    bad = [i for i, ok in enumerate(flags) if not ok]
    if bad:
        first = messages[bad[0]][0] if messages[bad[0]] else "not converged"
        warns.append(f"{len(bad)} of {len(flags)} solves did not converge (max residual "
                     f"{float(np.max(residuals)):.3e}); first: {first}")
    if warn:
        for w in warns:
            warnings.warn(w, InfluenceWarning, stacklevel=3)
    return not bad, warns, iterations


def _record(prep, *, kind, sign, n_train, n_test, residuals, iterations, converged, warns,
            t0) -> InfluenceRecord:
    return InfluenceRecord(
        method=prep.method, kind=kind, sign=sign, damping=float(prep.damping),
        n_train=n_train, n_test=n_test, n_params=prep.op.n_params,
        residuals=np.asarray(residuals, np.float64), iterations=np.asarray(iterations),
        converged=bool(converged), operator=prep.op.name, warnings=tuple(warns),
        info=dict(prep.info), wall_time_s=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------


def influence(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    train: PyTree,
    test: PyTree,
    *,
    method: str = "arnoldi",
    damping: float | str = "auto",
    operator: LinearOperator | None = None,
    test_fn: Callable[[PyTree, PyTree], jax.Array] | None = None,
    model_fn: Callable | None = None,
    head: Callable | None = None,
    approx: KFACOperator | EKFACOperator | None = None,
    fisher_type: str = "type-2",
    chunk_size: int | None = None,
    key: jax.Array | None = None,
    tol: float | None = None,
    maxiter: int | None = None,
    rank: int | None = None,
    preconditioner: Any = None,
    scale: float | None = None,
    check: bool = True,
    warn: bool = True,
) -> InfluenceResult:
    """Influence ``-g_test^T (H + d I)^{-1} g_train`` of every training on every test example.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss (the training objective,
            regulariser included; each example is fed as a batch of one for its gradient).
        params: parameter pytree (a minimum of the training objective, for the scores to
            predict retraining).
        train: training examples, a pytree with a leading example axis ``n_train``.
        test: test examples, a pytree with a leading example axis ``n_test``.
        method: a :func:`~gradience_jax.solvers.solve` method: ``"arnoldi"`` (default),
            ``"cg"``, ``"lissa"``, ``"kfac"``, ``"ekfac"``.
        damping: ``d`` or ``"auto"`` (from the measured spectrum; above ``|lambda_min|`` for
            an indefinite Hessian).
        operator: the curvature ``H`` (default ``gj.hessian(loss_fn, params, train)``; e.g.
            ``gj.ggn(...)`` for the GGN); the residuals are measured against it.
        test_fn: the test measurement ``test_fn(params, batch) -> scalar`` (default
            ``loss_fn``; e.g. a logit for the influence on a prediction).
        model_fn: for ``"kfac"`` / ``"ekfac"``: the model (default ``loss_fn.model_fn``
            when ``loss_fn = gj.compose(model_fn, head)``).
        head: for ``"kfac"`` / ``"ekfac"``: the head (default ``loss_fn.head``).
        approx: a prebuilt K-FAC / EK-FAC operator (reuse across calls).
        fisher_type: K-FAC / EK-FAC's ``fisher_type`` when they are built here.
        chunk_size: examples per vectorised gradient / solve chunk (default: as many as fit
            in 64 MiB of gradients).
        key: PRNG key of the Lanczos runs (and of ``fisher_type="mc"``).
        tol: the solves' residual target (see :func:`~gradience_jax.solvers.solve`).
        maxiter: iteration cap of ``"cg"`` / ``"lissa"``.
        rank: eigenpairs of ``"arnoldi"``.
        preconditioner: of ``"cg"``.
        scale: of ``"lissa"``.
        check: check the loss at the point and the definiteness of ``H + d I``.
        warn: emit the record's warnings as :class:`InfluenceWarning`.

    Returns:
        :class:`InfluenceResult` with float64 ``scores`` ``(n_test, n_train)``; positive =
        harmful (module docstring).

    Raises:
        ArgumentTypeError: a non-callable ``loss_fn`` / ``test_fn``, arguments of the wrong
            kind.
        ValueError: empty or inconsistent batches, a non-scalar loss, bad solve options,
            ``"kfac"`` / ``"ekfac"`` without ``model_fn`` / ``head``.
        FloatingPointError: a non-finite loss or gradient at ``params``, or a non-finite
            solve residual (``NonFiniteError``).
    """
    t0 = time.perf_counter()
    loss_fn = _check_fn(loss_fn, "loss_fn")
    test_fn = loss_fn if test_fn is None else _check_fn(test_fn, "test_fn")
    n_test = check_batch(test, "test")
    s = _setup(loss_fn, params, train, operator=operator, method=method, damping=damping,
               approx=approx, model_fn=model_fn, head=head, fisher_type=fisher_type,
               chunk_size=chunk_size, key=key, tol=tol, maxiter=maxiter, rank=rank,
               preconditioner=preconditioner, scale=scale, check=check)
    check_scalar_fn(test_fn, (params, test), "test_fn")
    g_test = _stacked_grads(test_fn, params, test, n_test, s.chunk)
    xs, its, res = _solve_all(s.prep, g_test, n_test, s.chunk)
    cols = [np.asarray(_neg_scores(s.loss_fn, params, chunk, xs), np.float64)[:, :stop - start]
            for start, stop, chunk in _chunks(train, s.n_train, s.chunk)]
    scores = np.concatenate(cols, axis=1)
    converged, warns, its = _summarise(s.prep, res, its, warn)
    rec = _record(s.prep, kind="influence", sign=_SIGN_IF, n_train=s.n_train, n_test=n_test,
                  residuals=res, iterations=its, converged=converged, warns=warns, t0=t0)
    return InfluenceResult(scores, rec)


def self_influence(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    train: PyTree,
    *,
    method: str = "arnoldi",
    damping: float | str = "auto",
    operator: LinearOperator | None = None,
    model_fn: Callable | None = None,
    head: Callable | None = None,
    approx: KFACOperator | EKFACOperator | None = None,
    fisher_type: str = "type-2",
    chunk_size: int | None = None,
    key: jax.Array | None = None,
    tol: float | None = None,
    maxiter: int | None = None,
    rank: int | None = None,
    preconditioner: Any = None,
    scale: float | None = None,
    check: bool = True,
    warn: bool = True,
) -> InfluenceResult:
    """Self-influence ``g_i^T (H + d I)^{-1} g_i`` of every training example.

    Rank the examples by it (``result.top(k)["highest"]``) to find mislabelled or atypical
    ones (Koh & Liang 2017, s. 5.4). One solve per training example (vmapped, ``chunk_size``
    at a time): cheap with ``"arnoldi"`` / ``"kfac"`` / ``"ekfac"`` (prepared once).

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss (the training objective).
        params: parameter pytree.
        train: training examples, leading axis ``n_train``.
        method: a :func:`~gradience_jax.solvers.solve` method (default ``"arnoldi"``).
        damping: ``d`` or ``"auto"``.
        operator: the curvature (default the Hessian of ``loss_fn`` on ``train``).
        model_fn: the model for ``"kfac"`` / ``"ekfac"``.
        head: the head for ``"kfac"`` / ``"ekfac"``.
        approx: a prebuilt K-FAC / EK-FAC operator.
        fisher_type: K-FAC / EK-FAC's ``fisher_type`` when they are built here.
        chunk_size: examples per vectorised chunk.
        key: PRNG key of the Lanczos runs.
        tol: the solves' residual target.
        maxiter: iteration cap of ``"cg"`` / ``"lissa"``.
        rank: eigenpairs of ``"arnoldi"``.
        preconditioner: of ``"cg"``.
        scale: of ``"lissa"``.
        check: check the loss at the point and the definiteness of ``H + d I``.
        warn: emit the record's warnings as :class:`InfluenceWarning`.

    Returns:
        :class:`InfluenceResult` with float64 ``scores`` ``(n_train,)``.

    Raises:
        ArgumentTypeError: as :func:`influence`.
        ValueError: as :func:`influence`.
        FloatingPointError: as :func:`influence`.
    """
    t0 = time.perf_counter()
    s = _setup(loss_fn, params, train, operator=operator, method=method, damping=damping,
               approx=approx, model_fn=model_fn, head=head, fisher_type=fisher_type,
               chunk_size=chunk_size, key=key, tol=tol, maxiter=maxiter, rank=rank,
               preconditioner=preconditioner, scale=scale, check=check)
    g = _stacked_grads(s.loss_fn, params, train, s.n_train, s.chunk)
    xs, its, res = _solve_all(s.prep, g, s.n_train, s.chunk)
    per_leaf = jax.tree_util.tree_map(
        lambda a, b: jnp.sum((a * b).reshape(a.shape[0], -1), axis=1), g, xs)
    scores = np.asarray(sum(jax.tree_util.tree_leaves(per_leaf)), np.float64)
    converged, warns, its = _summarise(s.prep, res, its, warn)
    rec = _record(s.prep, kind="self_influence", sign=_SIGN_SELF, n_train=s.n_train,
                  n_test=0, residuals=res, iterations=its, converged=converged, warns=warns,
                  t0=t0)
    return InfluenceResult(scores, rec)


def tracin(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    checkpoints: Sequence[PyTree],
    train: PyTree,
    test: PyTree,
    *,
    learning_rates: float | Sequence[float] = 1.0,
    test_fn: Callable[[PyTree, PyTree], jax.Array] | None = None,
    chunk_size: int | None = None,
) -> InfluenceResult:
    """TracIn-CP (Pruthi et al. 2020): ``sum_c lr_c g_test(params_c) . g_train(params_c)``.

    No inverse: ``len(checkpoints) (n_train + n_test)`` per-example gradients and one
    matrix product per checkpoint and chunk. Positive = proponent.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss.
        checkpoints: parameter pytrees (same structure) saved during training.
        train: training examples, leading axis ``n_train``.
        test: test examples, leading axis ``n_test``.
        learning_rates: one learning rate for all checkpoints, or one per checkpoint (the
            step size in effect around each).
        test_fn: the test measurement (default ``loss_fn``).
        chunk_size: examples per vectorised gradient chunk.

    Returns:
        :class:`InfluenceResult` with float64 ``scores`` ``(n_test, n_train)``; the record has
        ``method="tracin"``, no damping and no residuals.

    Raises:
        ArgumentTypeError: a non-callable ``loss_fn`` / ``test_fn``, non-real learning rates.
        ValueError: no checkpoints, checkpoints of different structures, a learning-rate list
            of another length, bad batches.
    """
    t0 = time.perf_counter()
    loss_fn = _check_fn(loss_fn, "loss_fn")
    test_fn = loss_fn if test_fn is None else _check_fn(test_fn, "test_fn")
    if isinstance(checkpoints, dict) or not isinstance(checkpoints, Sequence) or not checkpoints:
        raise ValueError("checkpoints must be a non-empty list of parameter pytrees")
    checkpoints = list(checkpoints)
    for i, ck in enumerate(checkpoints):
        check_params(ck, f"checkpoints[{i}]")
        if i:
            check_like(ck, checkpoints[0], f"checkpoints[{i}]", "checkpoints[0]")
    if isinstance(learning_rates, Sequence) and not isinstance(learning_rates, str):
        lrs = [check_real(x, f"learning_rates[{i}]") for i, x in enumerate(learning_rates)]
        if len(lrs) != len(checkpoints):
            raise ValueError(f"learning_rates has {len(lrs)} entries for {len(checkpoints)} "
                             "checkpoints")
    else:
        lrs = [check_real(learning_rates, "learning_rates")] * len(checkpoints)
    n_train = check_batch(train, "train")
    n_test = check_batch(test, "test")
    check_scalar_fn(loss_fn, (checkpoints[0], train), "loss_fn")
    check_scalar_fn(test_fn, (checkpoints[0], test), "test_fn")
    chunk = (_default_chunk(checkpoints[0], max(n_train, n_test)) if chunk_size is None
             else check_int(chunk_size, "chunk_size", lo=1))
    scores = np.zeros((n_test, n_train))
    for lr, ck in zip(lrs, checkpoints):
        g_test = _stacked_grads(test_fn, ck, test, n_test, chunk)
        for start, stop, part in _chunks(train, n_train, chunk):
            block = np.asarray(_dot_scores(loss_fn, ck, part, g_test), np.float64)
            scores[:, start:stop] += lr * block[:, :stop - start]
    rec = InfluenceRecord(
        method="tracin", kind="tracin", sign=_SIGN_TRACIN, damping=None, n_train=n_train,
        n_test=n_test, n_params=tu.size(checkpoints[0]), residuals=np.zeros(0),
        iterations=np.zeros(0, np.int64), converged=True, operator=None, warnings=(),
        info={"checkpoints": len(checkpoints), "learning_rates": lrs},
        wall_time_s=time.perf_counter() - t0)
    return InfluenceResult(scores, rec)
