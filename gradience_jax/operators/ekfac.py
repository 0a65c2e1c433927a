"""Eigenvalue-corrected K-FAC (EK-FAC) as a :class:`LinearOperator`.

K-FAC approximates a layer's GGN / Fisher block by ``A (x) B``; in the Kronecker eigenbasis
``Q = Q_A (x) Q_B`` its eigenvalues are the products ``l_A[i] l_B[j]``. EK-FAC (George et al.
2018) keeps the eigenbasis and re-fits the eigenvalues: the diagonal ``S[i, j]`` is the
block's exact second moment along each basis direction,

    ``S[i, j] = sum_{n, k} (Q_A^T G_nk Q_B)[i, j]^2``,    ``G_nk = sum_r a_nr g_knr^T``,

where ``G_nk`` is the ``(d_in (+1), d_out)`` gradient of example ``n`` for the ``k``-th
pseudo-gradient (the same output-space vectors K-FAC's ``B`` is built from: columns of the
head-Hessian square root for ``"type-2"``, sampled labels for ``"mc"``, the observed labels
for ``"empirical"``; they carry the ``sqrt(w / Z)`` normaliser, so ``sum_{n,k} vec G vec G^T``
is the block the K-FAC factors approximate). ``S`` is the best diagonal in that basis: the
Frobenius-closest ``Q diag(s) Q^T`` to the block (George et al., Lemma 1), so EK-FAC is never
further from the block than K-FAC. Both are exact when the block is one Kronecker product
(a batch of one example with one position per layer; a linear model with MSE).

The operator acts on a block ``V`` as ``Q_A [S * (Q_A^T V Q_B)] Q_B^T``; the damped inverse
``(E + damping I)^power`` replaces ``S`` by ``(S + damping)^power`` (exact: same basis), so
influence queries (Grosse et al. 2023) cost two small matrix products per layer once the
factors exist. Uncovered parameters (see :class:`~gradience_jax.operators.kfac.KFACCoverage`)
get a zero block, as in K-FAC.

Construction: :func:`~gradience_jax.operators.kfac.kfac` (one forward, ``K`` backward passes,
the eigendecompositions) plus one more pass over the same pseudo-gradients for ``S``; memory
``O(K N R (d_in + d_out))`` per layer for the rotated activations / gradients, ``O(K d_in
d_out)`` for the running sum when a layer has ``R > 1`` positions.

Supported names: ``EKFACOperator``, ``ekfac``, ``ekfac_inverse`` (the ``__all__`` list).

References:
    T. George, C. Laurent, X. Bouthillier, N. Ballas & P. Vincent (2018), "Fast Approximate
    Natural Gradient Descent in a Kronecker-factored Eigenbasis"; R. Grosse et al. (2023),
    "Studying Large Language Model Generalization with Influence Functions".
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from gradience_jax._validate import ArgumentTypeError, check_key, check_real
from gradience_jax.operators.base import LinearOperator
from gradience_jax.operators.kfac import (
    BlockCurvatureOperator,
    KFACOperator,
    KroneckerFactors,
    _Config,
    _damping_operand,
    _eigenbasis_matvec,
    _input_matrix,
    _KFACPrepare,
    _layer_acts_and_grads,
    _output_gradient_matrix,
    kfac,
    static_callable,
)
from gradience_jax.operators.kfac_layers import _Plan, _Tag

PyTree = Any

__all__ = ["EKFACOperator", "ekfac", "ekfac_inverse"]


# ---------------------------------------------------------------------------------------
# the corrected eigenvalues
# ---------------------------------------------------------------------------------------


def _layer_scales(tag: _Tag, act: jax.Array, g: jax.Array, f: KroneckerFactors) -> jax.Array:
    """``S = sum_{n,k} (Q_A^T G_nk Q_B)^2`` from activations ``(N, *a)``, grads ``(K, N, *out)``."""
    n = g.shape[1]
    gm = _output_gradient_matrix(tag, g)
    gr = jnp.einsum("knro,oj->knrj", gm.astype(f.b_evecs.dtype), f.b_evecs)
    if tag.kind == "embed":
        idx = act[..., 0].reshape(n, -1)
        if "CLIP" in str(tag.gather_mode):
            idx = jnp.clip(idx, 0, tag.d_in - 1)

        def one(acc, xs):  # Q_A = I: the example's gradient is a scatter-add of its rows
            ids, gk = xs  # (R,), (K, R, d_out)
            rows = jax.vmap(lambda gg: jnp.zeros((tag.d_in, tag.d_out), gg.dtype)
                            .at[ids].add(gg, mode="drop"))(gk)
            return acc + jnp.sum(rows * rows, axis=0), None

        init = jnp.zeros((tag.d_in, tag.d_out), gr.dtype)
        return jax.lax.scan(one, init, (idx, jnp.swapaxes(gr, 0, 1)))[0]
    ar = _input_matrix(tag, act, n, gr.dtype) @ f.a_evecs  # (N, R, d_in')
    if ar.shape[1] == 1:  # one position: G_nk is an outer product, S a product of squares
        return jnp.einsum("ni,knj->ij", ar[:, 0] ** 2, gr[:, :, 0] ** 2)

    def one(acc, xs):
        a_n, g_n = xs  # (R, d_in'), (K, R, d_out)
        gk = jnp.einsum("ri,krj->kij", a_n, g_n)
        return acc + jnp.sum(gk * gk, axis=0), None

    init = jnp.zeros((ar.shape[-1], tag.d_out), gr.dtype)
    return jax.lax.scan(one, init, (ar, jnp.swapaxes(gr, 0, 1)))[0]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _compute_scales(plan: _Plan, cfg: _Config, params, batch, key, factors) -> tuple:
    """The per-layer ``S`` from the same pseudo-gradients as K-FAC's factor pass."""
    acts, grads = _layer_acts_and_grads(plan, cfg, params, batch, key)
    return tuple(
        _layer_scales(layer.tag, a, g, f)
        for layer, a, g, f in zip(plan.layers, acts, grads, factors)
    )


# ---------------------------------------------------------------------------------------
# the operator
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _EKFACPrepare:
    """``prepare(operands)``: ``(factors, scales)`` or ``(factors, scales, damping)``."""

    plan: _Plan
    power: float | None = None

    def __call__(self, operands):
        damping = None if self.power is None else operands[2]
        return _eigenbasis_matvec(self.plan, operands[0], operands[1], damping, self.power)


@jax.tree_util.register_pytree_node_class
class EKFACOperator(BlockCurvatureOperator):
    """A :class:`LinearOperator` holding K-FAC eigenbases and re-fitted eigenvalues.

    Extra attributes:
        coverage: :class:`~gradience_jax.operators.kfac.KFACCoverage` (as the K-FAC it was
            built from).
        factors: ``{layer name: KroneckerFactors}`` (the K-FAC eigenbases; their
            eigenvalues are K-FAC's, unused by this operator).
        scales: ``{layer name: S}``, the corrected eigenvalues, ``(d_in (+1), d_out)``.

    Methods:
        inverse(damping, power=-1.0): ``(E + damping I)^power`` (:func:`ekfac_inverse`).
        kfac(): the K-FAC operator with the same factors.
    """

    default_name = "ekfac"

    @property
    def scales(self) -> dict[str, jax.Array]:
        """``{layer name: S}``: the corrected eigenvalues ``(d_in (+1), d_out)`` per layer."""
        return {layer.name: s for layer, s in zip(self.prepare.plan.layers, self.operands[1])}

    def kfac(self) -> KFACOperator:
        """The K-FAC operator with the same Kronecker factors (no recomputation).

        Returns:
            A :class:`~gradience_jax.operators.kfac.KFACOperator`.
        """
        return KFACOperator(_KFACPrepare(self.prepare.plan), (self.operands[0],), None,
                            coverage=self.coverage, is_psd=True, name="kfac", _spec=self._spec)

    def inverse(self, damping: Any, power: float = -1.0) -> LinearOperator:
        """``(E + damping I)^power`` (see :func:`ekfac_inverse`).

        Args:
            damping: scalar ``>= 0``; ``> 0`` for a negative ``power``.
            power: static exponent (``-1`` inverse, ``-0.5`` inverse square root).

        Returns:
            A PSD :class:`LinearOperator`; a product costs as much as an EK-FAC product.

        Raises:
            ValueError: as :func:`ekfac_inverse`.
        """
        return ekfac_inverse(self, damping, power)


def ekfac_inverse(E: EKFACOperator, damping: Any, power: float = -1.0) -> LinearOperator:
    """The operator ``(E + damping I)^power``, applied in the Kronecker eigenbases.

    On a block it multiplies the eigen-coordinates by ``(S[i, j] + damping)^power``;
    uncovered parameters (zero block) are scaled by ``damping^power``. So
    ``ekfac_inverse(E, lam) @ (E @ v + lam v) == v``. Cost: the same as an EK-FAC product.

    Args:
        E: an operator returned by :func:`ekfac`.
        damping: scalar ``>= 0``; must be ``> 0`` for a negative ``power`` (may be traced).
        power: static exponent (``-1`` inverse, ``-0.5`` inverse square root, ``1`` damped E).

    Returns:
        A PSD :class:`LinearOperator` named ``"ekfac_inverse"`` (``"ekfac_power"`` unless
        ``power == -1``).

    Raises:
        ArgumentTypeError: ``E`` is not an :class:`EKFACOperator`, ``damping`` / ``power``
            not real numbers.
        ValueError: ``damping`` is not finite, negative, zero while ``power < 0``, or (traced)
            not a scalar.
    """
    if not isinstance(E, EKFACOperator):
        raise ArgumentTypeError(f"E must be an operator returned by ekfac(), got "
                                f"{type(E).__name__}")
    power = check_real(power, "power")
    damping = _damping_operand(damping, power, E.dtype)
    name = "ekfac_inverse" if power == -1.0 else "ekfac_power"
    return LinearOperator(_EKFACPrepare(E.prepare.plan, power),
                          (E.operands[0], E.operands[1], damping), None, is_psd=True,
                          name=name, _spec=E._spec)


def ekfac(
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
) -> EKFACOperator:
    """EK-FAC approximation of the GGN / Fisher of ``head(model_fn(params, batch), batch)``.

    The K-FAC eigenbases come from :func:`~gradience_jax.operators.kfac.kfac` with the same
    arguments; the eigenvalues are re-fitted from the per-example pseudo-gradients (module
    docstring). Construction costs one K-FAC construction plus one more forward and ``K``
    backward passes; products and inverse products cost as much as K-FAC's.

    Args:
        model_fn: ``model_fn(params, batch) -> outputs (N, ..., C)``; examples must not
            interact.
        head: a built-in head for ``"type-2"`` / ``"mc"``; any head for ``"empirical"``.
        params: parameter pytree.
        batch: pytree with a shared leading batch axis ``N``.
        fisher_type: ``"type-2"``, ``"mc"`` or ``"empirical"`` (as :func:`kfac`).
        kfac_approx: ``"expand"`` or ``"reduce"``: how K-FAC's eigenbases treat shared
            positions (the re-fitted diagonal always uses the true per-example gradients).
        key: ``jax.random`` key for ``"mc"`` (the same labels for the factors and ``S``).
        num_samples: label samples per token for ``"mc"``.
        check: raise on a non-finite loss / gradient at the point.
        warn: emit K-FAC's coverage report once when some parameters are not covered.

    Returns:
        A PSD :class:`EKFACOperator` with ``.coverage``, ``.factors``, ``.scales`` and
        ``.inverse(damping, power)``.

    Raises:
        ValueError: as :func:`~gradience_jax.operators.kfac.kfac`.

    References:
        George et al. (2018), "Fast Approximate Natural Gradient Descent in a
        Kronecker-factored Eigenbasis".
    """
    K = kfac(model_fn, head, params, batch, fisher_type=fisher_type, kfac_approx=kfac_approx,
             key=key, num_samples=num_samples, check=check, warn=warn)
    plan = K.prepare.plan
    cfg = _Config(static_callable(head), fisher_type, kfac_approx,
                  int(num_samples) if fisher_type == "mc" else 1)
    key = check_key(key)  # kfac's default key too: the same labels for "mc"
    factors = K.operands[0]
    scales = _compute_scales(plan, cfg, params, batch, key, factors)
    return EKFACOperator(_EKFACPrepare(plan), (factors, scales), None, coverage=K.coverage,
                         is_psd=True, name="ekfac", _spec=K._spec)
