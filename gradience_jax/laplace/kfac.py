"""K-FAC in closed form: the spectrum, log-determinant and trace of ``scale * K + tau I``.

Per K-FAC block the eigenvalues of ``A (x) B`` are ``outer(eig(A), eig(B))`` (the factors'
stored eigendecompositions), so no dense Kronecker product is formed. Parameters K-FAC does
not cover (``K.coverage.uncovered``: LayerNorm scales, unfoldable biases, ...) have a zero
curvature block, so there the posterior precision is the prior precision only: they add
``n_uncovered * log tau`` to the log-determinant and ``n_uncovered * tau`` to the trace
(exactly what ``K.to_dense() + tau I`` gives).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradience_jax.laplace._common import check_kfac, positive_scalar
from gradience_jax.laplace.spectrum import LaplaceSpectrum
from gradience_jax.operators.kfac import KFACOperator


def _block_eigenvalues(K: KFACOperator) -> list[jax.Array]:
    return [(f.a_evals[:, None] * f.b_evals[None, :]).reshape(-1) for f in K.operands[0]]


def kfac_spectrum(K: KFACOperator, *, scale: Any = 1.0) -> LaplaceSpectrum:
    """The eigenvalues of ``scale * K`` in closed form (no dense Kronecker product).

    Per block the eigenvalues of ``A (x) B`` are ``outer(eig(A), eig(B))`` (the factors'
    stored eigendecompositions); parameters K-FAC does not cover have a zero block and are
    the ``P - m`` zeros of the spectrum.

    Args:
        K: an operator returned by :func:`gradience_jax.kfac`.
        scale: ``> 0``, the factor from the mean loss to the negative log-likelihood.

    Returns:
        :class:`LaplaceSpectrum` with ``m = K.coverage.n_covered`` eigenvalues. Cost
        ``O(m)`` (the factors are already eigendecomposed). Jittable (``K`` is a pytree).

    Raises:
        ArgumentTypeError: ``K`` is not a :class:`KFACOperator`.
        ValueError: ``scale`` is not ``> 0``.
    """
    check_kfac(K)
    scale = positive_scalar(scale, "scale")
    blocks = _block_eigenvalues(K)
    lam = jnp.concatenate(blocks) if blocks else jnp.zeros((0,), K.dtype)
    return LaplaceSpectrum(lam * jnp.asarray(scale, lam.dtype), K.n_params)


class KFACLogdet(NamedTuple):
    """Closed-form log-determinant and trace of ``scale * K + damping * I``.

    Attributes:
        logdet: ``sum_layers sum log(scale * outer(eig A, eig B) + damping) +
            n_uncovered * log(damping)``.
        trace: ``sum_layers sum (scale * outer + damping) + n_uncovered * damping``.
        layer_logdets: ``{layer name: that layer's log-determinant}``.
        uncovered_logdet: ``n_uncovered * log(damping)`` (prior precision only there).
        n_covered: parameters inside K-FAC blocks.
        n_uncovered: parameters without a block (``K.coverage.uncovered``).
    """

    logdet: jax.Array
    trace: jax.Array
    layer_logdets: dict
    uncovered_logdet: jax.Array
    n_covered: int
    n_uncovered: int


def kfac_logdet(K: KFACOperator, damping: Any, *, scale: Any = 1.0) -> KFACLogdet:
    """``logdet`` and ``trace`` of ``scale * K + damping * I`` from the Kronecker factors.

    In Laplace terms ``damping`` is the prior precision ``tau`` and ``scale`` the number of
    examples (see the module docstring); the uncovered parameters get the prior precision
    only. Exact (to rounding) for the K-FAC matrix itself: equal to
    ``slogdet(scale * K.to_dense() + damping I)``.

    Args:
        K: an operator returned by :func:`gradience_jax.kfac`.
        damping: ``> 0`` (may be traced).
        scale: ``> 0`` multiplier of ``K``.

    Returns:
        :class:`KFACLogdet`. Cost ``O(n_params)`` after the factors' eigendecompositions
        (which :func:`gradience_jax.kfac` already did). Jittable.

    Raises:
        ArgumentTypeError: ``K`` is not a :class:`KFACOperator`, or ``damping`` / ``scale``
            is not a real scalar.
        ValueError: ``damping`` or ``scale`` is not ``> 0``.
    """
    check_kfac(K)
    damping = positive_scalar(damping, "damping")
    scale = positive_scalar(scale, "scale")
    blocks = _block_eigenvalues(K)
    dt = blocks[0].dtype if blocks else K.dtype
    d, s = jnp.asarray(damping, dt), jnp.asarray(scale, dt)
    n_cov = int(sum(b.shape[0] for b in blocks))
    n_unc = K.n_params - n_cov
    layers = {layer.name: jnp.sum(jnp.log(s * b + d))
              for layer, b in zip(K.coverage.layers, blocks)}
    unc = jnp.asarray(n_unc, dt) * jnp.log(d)
    total = functools.reduce(jnp.add, layers.values(), unc)
    tr = functools.reduce(jnp.add, [jnp.sum(s * b) for b in blocks], jnp.zeros((), dt))
    tr = tr + jnp.asarray(K.n_params, dt) * d
    return KFACLogdet(total, tr, layers, unc, n_cov, n_unc)
