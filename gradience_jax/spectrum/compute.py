"""``compute_spectrum``: build a curvature operator by name and run :func:`eigsh` on it.

Supported names: ``LanczosConfig``, ``OPERATORS``, ``compute_spectrum`` (the ``__all__``
list), and ``REGULARIZATION_MODES`` (the ``regularization_mode`` choices).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax._validate import check_choice, check_int, check_real
from gradience_jax.lanczos import REORTH_MODES
from gradience_jax.operators import registry
from gradience_jax.operators.base import LinearOperator
from gradience_jax.operators.heads import Head
from gradience_jax.spectrum.eigsh import eigsh
from gradience_jax.spectrum.plan import (
    default_basis_size,
    default_memory_budget,
    row_bytes,
)
from gradience_jax.spectrum.result import SpectrumResult
from gradience_jax.spectrum.ritz import WHICH

PyTree = Any

#: Operator names ``compute_spectrum`` accepts: the registry's names and aliases.
OPERATORS = registry.names() + tuple(registry.ALIASES)
REGULARIZATION_MODES = ("off", "fixed", "relative", "auto")

__all__ = ["LanczosConfig", "OPERATORS", "compute_spectrum"]


@dataclasses.dataclass(frozen=True)
class LanczosConfig:
    """Settings of :func:`compute_spectrum`.

    Attributes:
        k: number of eigenvalues.
        max_iters: matvec cap of the convergence-driven run (rule of thumb: ``>= 3k``).
        tol: relative residual tolerance.
        reorth_mode: ``"auto"`` (``"full"`` while the thick-restart basis fits
            ``memory_budget_bytes``, else ``"window"``), ``"full"``, ``"window"``, ``"none"``.
        reorth_window: ring-buffer size for ``"window"`` (default 8).
        dtype_compute: dtype of the operator's params (``None``: the model's, except that
            bf16 / fp16 Hessians are computed in float32: indefinite spectra need it).
        seed: start-vector seed (``jax.random.key(seed)``).
        regularization_mode: PSD operators only: ``"off"``; ``"fixed"`` adds
            ``regularization``; ``"relative"`` adds ``regularization * lambda_max``;
            ``"auto"`` adds the relative shift when ``lambda_max / lambda_min > 1e12``.
        regularization: the shift size for the modes above.
        which: ``"LA"``, ``"SA"``, ``"BE"`` or ``"LM"``.
        return_eigenvectors: also return the Ritz vectors.
        memory_budget_bytes: bytes a stored basis may use (``None``: 25% of device memory
            or 2 GiB).
    """

    k: int = 10
    max_iters: int = 30
    tol: float = 1e-10
    reorth_mode: str = "auto"
    reorth_window: int | None = None
    dtype_compute: Any = None
    seed: int = 42
    regularization_mode: str = "off"
    regularization: float = 1e-8
    which: str = "LA"
    return_eigenvectors: bool = False
    memory_budget_bytes: int | None = None

    def __post_init__(self):
        check_choice(self.reorth_mode, "reorth_mode", ("auto",) + REORTH_MODES)
        check_choice(self.regularization_mode, "regularization_mode", REGULARIZATION_MODES)
        check_choice(self.which, "which", WHICH)
        check_int(self.k, "k", lo=1)
        check_int(self.max_iters, "max_iters", lo=1)
        check_real(self.tol, "tol", lo=0.0, lo_open=True)
        check_real(self.regularization, "regularization", lo=0.0)
        check_int(self.seed, "seed", lo=None)
        if self.reorth_window is not None:
            check_int(self.reorth_window, "reorth_window", lo=2)
        if self.memory_budget_bytes is not None:
            check_int(self.memory_budget_bytes, "memory_budget_bytes", lo=1)


def _cast_params(params: PyTree, dtype: Any) -> PyTree:
    dt = jnp.dtype(dtype)
    return jax.tree_util.tree_map(
        lambda x: x.astype(dt) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, params
    )


def _compute_dtype(params: PyTree, operator: str, dtype_compute: Any) -> Any:
    if dtype_compute is not None:
        return jnp.dtype(dtype_compute)
    if operator != "hessian":
        return None
    low = [
        x for x in jax.tree_util.tree_leaves(params)
        if jnp.result_type(x) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    ]
    return jnp.dtype(jnp.float32) if low else None


def compute_spectrum(
    loss_fn: Callable[[PyTree, PyTree], jax.Array] | None,
    params: PyTree,
    batch: PyTree,
    operator: str | LinearOperator = "hessian",
    config: LanczosConfig | None = None,
    model_fn: Callable[[PyTree, PyTree], jax.Array] | None = None,
    head: Callable | None = None,
) -> SpectrumResult:
    """Top-k (or ``config.which``) eigenvalues of a curvature operator, with quality checks.

    Builds the operator at ``(params, batch)``, runs :func:`eigsh` with the config and adds
    the seed, the regularisation and the PSD / indefinite metrics to the result.

    Precision: bf16 / fp16 params are upcast to float32 for the Hessian (indefinite spectra
    need it); GGN / Fisher run in the model dtype. Lanczos vectors, dot products and norms
    are float32 or wider; the tridiagonal eigenproblem is float64.

    Cost: building the operator (the factory's checks: one loss and gradient evaluation;
    ``"kfac"``: its factors) plus :func:`eigsh`'s, at most ``max(config.max_iters, k)``
    matvecs. Memory: the thick-restart basis (``"full"``, within
    ``config.memory_budget_bytes``), ``reorth_window`` rows (``"window"``) or none
    (``"none"``), plus a few parameter-sized vectors.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar`` (hessian, empirical_fisher).
        params: parameter pytree.
        batch: batch pytree.
        operator: ``"hessian"``, ``"ggn"``, ``"empirical_fisher"`` (alias ``"ef"``),
            ``"mc_fisher"``, ``"kfac"``, or a ready :class:`LinearOperator`.
        config: :class:`LanczosConfig` (default ``LanczosConfig()``).
        model_fn: ``model_fn(params, batch) -> outputs (*lead, C)``, with ``head``
            ``loss = head(model_fn(params, batch), batch)``, for ggn / mc_fisher / kfac
            (hessian / empirical_fisher compose the two when ``loss_fn`` is ``None``). The
            operator is built by :func:`gradience_jax.operators.registry.build`.
        head: ``head(outputs, batch) -> scalar`` (see ``model_fn``); for mc_fisher a
            built-in head's likelihood is sampled (other heads: categorical).

    Returns:
        :class:`SpectrumResult`: ``eigenvalues`` ``(k,)`` in the order of ``config.which``
        (plus the regularisation shift), ``eigenvectors`` a pytree stack when asked for.

    Raises:
        TypeError: ``config`` is not a :class:`LanczosConfig`.
        ValueError: unknown operator, missing model_fn / head, bad config, ``k > n_params``,
            non-finite values.
        FloatingPointError: non-finite loss or gradient at the point (the factory's check).

    References:
        K. Wu & H. Simon (2000), thick-restart Lanczos (the engine of :func:`eigsh`).
    """
    t0 = time.perf_counter()
    cfg = LanczosConfig() if config is None else config
    if not isinstance(cfg, LanczosConfig):
        raise TypeError(f"config must be a LanczosConfig, got {type(cfg).__name__}")
    key = jax.random.key(cfg.seed)
    if isinstance(operator, LinearOperator):
        op = operator
    else:
        if operator not in OPERATORS:
            raise ValueError(
                f"operator must be one of {OPERATORS} or a LinearOperator, got {operator!r}"
            )
        name = registry.canonical_name(operator)
        dt = _compute_dtype(params, name, cfg.dtype_compute)
        p = params if dt is None else _cast_params(params, dt)
        if name == "mc_fisher" and not isinstance(head, Head):
            head = None  # mc_fisher samples a built-in head's likelihood, else categorical
        op = registry.build(name, loss_fn=loss_fn, model_fn=model_fn, head=head, params=p,
                            batch=batch, key=jax.random.fold_in(key, 7))
    n = op.n_params
    if cfg.k > n:
        raise ValueError(f"config.k={cfg.k} exceeds n_params={n}")
    reorth = cfg.reorth_mode
    budget = default_memory_budget() if cfg.memory_budget_bytes is None else cfg.memory_budget_bytes
    if reorth == "auto":  # the thick-restart basis if it fits the budget
        rows = min(default_basis_size(cfg.k), n) + 1
        reorth = "full" if rows * row_bytes(op.params_like) <= budget else "window"
    max_iters = max(cfg.max_iters, cfg.k)
    res = eigsh(
        op, k=cfg.k, num_iters=None, which=cfg.which, reorth=reorth,
        window=cfg.reorth_window, key=key, tol=cfg.tol,
        return_eigenvectors=cfg.return_eigenvectors, max_iters=max_iters,
        memory_budget_bytes=budget, seed=cfg.seed,
    )
    shift = 0.0
    warns = list(res.warnings)
    if cfg.regularization_mode != "off":
        if not op.is_psd:
            warns.append(
                f"regularization_mode={cfg.regularization_mode!r} ignored: the {op.name} "
                "operator is indefinite (negative eigenvalues are preserved)"
            )
        else:
            lam_max = float(np.max(res.eigenvalues))
            lam_min = float(np.min(res.eigenvalues))
            if cfg.regularization_mode == "fixed":
                shift = cfg.regularization
            elif cfg.regularization_mode == "relative":
                shift = cfg.regularization * abs(lam_max)
            elif lam_min <= 0 or lam_max / lam_min > 1e12:
                shift = cfg.regularization * abs(lam_max)
    return dataclasses.replace(
        res,
        eigenvalues=res.eigenvalues + shift,
        regularization_applied=float(shift),
        warnings=tuple(warns),
        seed=cfg.seed,
        wall_time_s=time.perf_counter() - t0,
    )
