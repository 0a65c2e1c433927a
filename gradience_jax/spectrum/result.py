"""``SpectrumResult`` (eigenvalues with every diagnostic) and the quality checks behind it.

:func:`quality_warnings` produces the result's ``warnings``.

Supported names: ``SpectrumResult``, ``quality_warnings`` (the ``__all__`` list).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import numpy as np

from gradience_jax import tree as tu
from gradience_jax._json import jsonable

PyTree = Any

__all__ = ["SpectrumResult", "quality_warnings"]


@dataclasses.dataclass(frozen=True)
class SpectrumResult:
    """Extreme eigenvalues of an operator with diagnostics (host values; JSON via ``to_dict``).

    Attributes:
        eigenvalues: ``(k,)`` float64 in the order of ``which`` (``LA`` descending, ``SA``
            ascending, ``LM`` by decreasing magnitude, ``BE`` ascending as scipy).
        eigenvectors: ``None`` or a pytree stack (leaves ``(k, *leaf.shape)``, unit norm) in
            the operator's leaf dtypes.
        operator: operator name; is_psd: PSD by construction; n_params: dimension.
        iterations: Lanczos iterations (first pass); operator_calls: all matvecs
            (including the Ritz-vector pass and true residuals).
        converged: all ``k`` meet ``ritz_residuals <= max(tol |eigenvalue|, floor ||A||)``
            (``floor = 10 eps`` of the Lanczos arithmetic; for bfloat16 / float16 operators
            also ``true_residuals <= max(tol |eigenvalue|, eps_op ||A||)``);
            converged_mask: per eigenvalue.
        ritz_residuals: ``(k,)`` residual bounds ``|beta_m s_{m,i}|`` from the Lanczos relation.
        true_residuals: ``(k,)`` ``||A y - lambda y||`` of the returned vectors (in the
            operator's dtype) when eigenvectors were formed.
        orthogonality_loss: measured loss of orthogonality: ``"full"``: ``max |Y^T Y - I|``
            of the Ritz vectors and their overlap with the residual row; ``"window"`` /
            ``"none"``: ``max |<q_i, q_(j+1)>|`` against the oldest stored row (``q_(j-1)``
            for ``"none"``), from what the recurrence already holds.
        asymmetry: max measured ``|<q_(j-1), A q_j> - beta_(j-1)|`` (0 for a symmetric
            operator up to rounding).
        ghosts_removed: Ritz values removed by the Cullum-Willoughby test (spurious or
            merged copies).
        breakdowns: restarts after an invariant subspace was found.
        restarts: thick restarts (``"full"``); window: ring-buffer rows (``"window"``);
        basis_size: rows of a thick-restart cycle (``"full"``); dtype: operator dtype.
        regularization_applied: shift added to the eigenvalues (PSD operators only).
        warnings: quality warnings (strings a person can act on).
    """

    eigenvalues: np.ndarray
    eigenvectors: PyTree | None
    operator: str
    is_psd: bool
    iterations: int
    converged: bool
    n_params: int
    seed: int | None
    reorth_mode: str
    regularization_applied: float
    warnings: tuple[str, ...]
    ritz_residuals: np.ndarray
    operator_calls: int
    wall_time_s: float
    which: str = "LA"
    k: int = 0
    tol: float = 0.0
    converged_mask: np.ndarray | None = None
    true_residuals: np.ndarray | None = None
    orthogonality_loss: float = 0.0
    asymmetry: float = 0.0
    ghosts_removed: int = 0
    breakdowns: int = 0
    restarts: int = 0
    window: int | None = None
    dtype: str = ""
    basis_size: int | None = None

    # -- PSD metrics ------------------------------------------------------------------------
    @property
    def max_eigenvalue(self) -> float:
        """Largest computed eigenvalue."""
        return float(np.max(self.eigenvalues))

    @property
    def min_eigenvalue(self) -> float:
        """Smallest computed eigenvalue."""
        return float(np.min(self.eigenvalues))

    @property
    def spectral_gap(self) -> float | None:
        """``lambda_1 - lambda_2`` of the computed values (descending)."""
        if len(self.eigenvalues) < 2:
            return None
        s = np.sort(self.eigenvalues)[::-1]
        return float(s[0] - s[1])

    @property
    def ritz_condition_number(self) -> float:
        """``max / min`` of the computed values (``inf`` if the smallest is ``<= 0``)."""
        lo = self.min_eigenvalue
        return float(self.max_eigenvalue / lo) if lo > 0 else float("inf")

    @property
    def ritz_effective_rank(self) -> float:
        """``exp(entropy(p))``, ``p = lambda / sum(lambda)`` over the positive computed values.

        Roy & Vetterli (2007); between 1 and ``k`` (0 when no value is positive).
        """
        lam = self.eigenvalues[self.eigenvalues > 0]
        if lam.size == 0:
            return 0.0
        p = lam / lam.sum()
        return float(np.exp(-np.sum(p * np.log(p))))

    # -- indefinite metrics -----------------------------------------------------------------
    @property
    def has_negative_eigenvalues(self) -> bool:
        """Whether any computed eigenvalue is negative."""
        return bool(np.any(self.eigenvalues < 0))

    @property
    def n_negative(self) -> int:
        """Number of negative computed eigenvalues."""
        return int(np.sum(self.eigenvalues < 0))

    @property
    def range_ratio(self) -> float:
        """``|lambda_max| / |lambda_min|`` of the computed values (``inf`` if 0)."""
        lo = abs(self.min_eigenvalue)
        return float(abs(self.max_eigenvalue) / lo) if lo > 0 else float("inf")

    @property
    def sharpness_score(self) -> float:
        """``max |lambda|`` of the computed values."""
        return float(np.max(np.abs(self.eigenvalues)))

    @property
    def negative_fraction(self) -> float:
        """Fraction of the computed eigenvalues that are negative."""
        return self.n_negative / max(len(self.eigenvalues), 1)

    @property
    def negative_mass(self) -> float:
        """``sum |lambda_neg| / sum |lambda|`` over the computed values."""
        total = float(np.sum(np.abs(self.eigenvalues)))
        neg = float(np.sum(np.abs(self.eigenvalues[self.eigenvalues < 0])))
        return neg / total if total > 0 else 0.0

    @property
    def most_negative_eigenvalue(self) -> float | None:
        """The smallest computed eigenvalue if it is negative, else ``None``."""
        return self.min_eigenvalue if self.has_negative_eigenvalues else None

    def metrics(self) -> dict[str, Any]:
        """The PSD metrics (PSD operators) or the indefinite ones (others)."""
        if self.is_psd:
            return {
                "max_eigenvalue": self.max_eigenvalue,
                "min_eigenvalue": self.min_eigenvalue,
                "spectral_gap": self.spectral_gap,
                "ritz_condition_number": self.ritz_condition_number,
                "ritz_effective_rank": self.ritz_effective_rank,
            }
        return {
            "max_eigenvalue": self.max_eigenvalue,
            "min_eigenvalue": self.min_eigenvalue,
            "has_negative_eigenvalues": self.has_negative_eigenvalues,
            "n_negative": self.n_negative,
            "range_ratio": self.range_ratio,
            "sharpness_score": self.sharpness_score,
            "negative_fraction": self.negative_fraction,
            "negative_mass": self.negative_mass,
            "most_negative_eigenvalue": self.most_negative_eigenvalue,
        }

    def to_dict(self, include_eigenvectors: bool = False) -> dict[str, Any]:
        """JSON-safe dict (non-finite floats become ``None``).

        Args:
            include_eigenvectors: include ``eigenvectors`` as ``{leaf path: nested lists}``
                (large for big models); otherwise it is ``None``.

        Returns:
            Every field of the result plus :meth:`metrics`.
        """
        vecs = None
        if include_eigenvectors and self.eigenvectors is not None:
            vecs = {
                tu.path_str(p) or "<root>": np.asarray(x, np.float64)
                for p, x in jax.tree_util.tree_flatten_with_path(self.eigenvectors)[0]
            }
        out = {
            "eigenvalues": self.eigenvalues,
            "eigenvectors": vecs,
            "operator": self.operator,
            "is_psd": self.is_psd,
            "iterations": self.iterations,
            "converged": self.converged,
            "n_params": self.n_params,
            "seed": self.seed,
            "reorth_mode": self.reorth_mode,
            "regularization_applied": self.regularization_applied,
            "warnings": list(self.warnings),
            "ritz_residuals": self.ritz_residuals,
            "operator_calls": self.operator_calls,
            "wall_time_s": self.wall_time_s,
            "which": self.which,
            "k": self.k,
            "tol": self.tol,
            "converged_mask": self.converged_mask,
            "true_residuals": self.true_residuals,
            "orthogonality_loss": self.orthogonality_loss,
            "asymmetry": self.asymmetry,
            "ghosts_removed": self.ghosts_removed,
            "breakdowns": self.breakdowns,
            "restarts": self.restarts,
            "window": self.window,
            "dtype": self.dtype,
            "basis_size": self.basis_size,
        }
        out.update(self.metrics())
        return jsonable(out)

    def to_json(self, **kwargs: Any) -> str:
        """:meth:`to_dict` (without eigenvectors) as a JSON string.

        Args:
            **kwargs: passed to ``json.dumps`` (e.g. ``indent``).

        Returns:
            The JSON text.
        """
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

    def __repr__(self) -> str:
        vals = ", ".join(f"{v:.6g}" for v in self.eigenvalues[:10])
        max_res = float(np.max(self.ritz_residuals)) if len(self.ritz_residuals) else 0.0
        more = ", ..." if len(self.eigenvalues) > 10 else ""
        status = "converged" if self.converged else (
            f"NOT converged ({int(np.sum(~np.asarray(self.converged_mask)))}/{self.k} open)"
            if self.converged_mask is not None else "NOT converged")
        lines = [
            f"SpectrumResult({self.operator}, n_params={self.n_params:,}, "
            f"{'PSD' if self.is_psd else 'indefinite'}, which={self.which!r}, k={self.k})",
            f"  eigenvalues: [{vals}{more}]",
            f"  {status} after {self.iterations} iterations, {self.operator_calls} matvecs, "
            f"{self.wall_time_s:.3g} s; reorth={self.reorth_mode!r}"
            + (f" (window {self.window})" if self.reorth_mode == "window" else ""),
            f"  max ritz residual {max_res:.2e}, orthogonality loss "
            f"{self.orthogonality_loss:.1e}, ghosts removed {self.ghosts_removed}",
        ]
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def quality_warnings(
    *,
    values: np.ndarray,
    bounds: np.ndarray,
    conv: np.ndarray,
    k: int,
    iterations: int,
    tol: float,
    reorth: str,
    orth_loss: float,
    anorm: float,
    eps_work: float,
    filter_ghosts: bool,
    ghost_flags: np.ndarray | None,
    eigenvectors_overlap: np.ndarray | None,
    fixed_iters: bool,
    restarts: int,
    n_params: int,
    matvec_cap: int = 0,
    basis_size: int | None = None,
    asym: float = 0.0,
    eps_op: float | None = None,
) -> list[str]:
    """Warnings a person can act on; each names the setting to change.

    Checks: convergence, too few iterations (``< 3k``), ghost / repeated eigenvalues, loss
    of orthogonality and measured asymmetry. Host-side, ``O(k^2)``.

    Args:
        values: ``(k,)`` reported eigenvalues.
        bounds: ``(k,)`` their Ritz residual bounds.
        conv: ``(k,)`` bool convergence flags.
        k: number of wanted eigenvalues.
        iterations: Lanczos matvecs of the first pass.
        tol: relative residual tolerance.
        reorth: ``"full"``, ``"window"`` or ``"none"``.
        orth_loss: measured loss of orthogonality.
        anorm: estimate of ``||A||``.
        eps_work: machine epsilon of the Lanczos arithmetic.
        filter_ghosts: whether Cullum-Willoughby filtering was applied.
        ghost_flags: ``(k,)`` Cullum-Willoughby flags of the reported values (0 kept), or
            ``None``.
        eigenvectors_overlap: ``(k, k)`` Gram matrix of the Ritz vectors, or ``None``.
        fixed_iters: the run had a fixed ``num_iters``.
        restarts: thick restarts done.
        n_params: dimension of the operator.
        matvec_cap: the matvec cap of a convergence-driven run.
        basis_size: thick-restart rows (``"full"``), or ``None``.
        asym: max measured asymmetry (absolute).
        eps_op: machine epsilon of the operator's dtype, or ``None``.

    Returns:
        The warning strings (empty when all checks pass).
    """
    out = []
    if not np.all(conv):
        bad = np.flatnonzero(~conv)
        worst = float(np.max(bounds[bad] / np.maximum(np.abs(values[bad]), 1e-300)))
        if fixed_iters:
            advice = [f"raise num_iters (now {iterations}) or pass num_iters=None to run "
                      "until tol"]
        else:
            advice = [f"raise max_iters (the matvec cap, reached at {matvec_cap})"]
        if reorth == "full" and basis_size is not None:
            advice.append(f"raise basis_size (now {basis_size}; clustered eigenvalues converge "
                          "faster with a larger basis)")
        else:
            advice.append("use reorth='full' (thick restart, the default)")
        advice.append(f"or loosen tol (now {tol:g})")
        out.append(
            f"not converged: {len(bad)} of {k} eigenvalues have Ritz residual > tol * |lambda| "
            f"(worst relative residual {worst:.2e}): " + ", ".join(advice)
        )
    if iterations < min(3 * k, n_params) and restarts == 0:
        out.append(
            f"only {iterations} Lanczos iterations for k={k} (< 3k = {3 * k}): clustered "
            "eigenvalues may be missed even when the residuals are small; raise the iteration "
            "count to at least 3k"
        )
    # ghosts / repeated eigenvalues among the reported values
    order = np.argsort(values)
    sv = values[order]
    # copies of a converged eigenvalue agree to round-off of the Ritz pairs (~1e3 eps ||A||);
    # with the ghost filter on, values that close were merged already (within a block at
    # 10 eps ||A||, across restarts at 1e3 eps ||A||): what is left closer than 10 eps ||A||
    # is suspect. A wider width there would flag genuine clusters in float32 (x64 off), where
    # 1e3 eps ||A|| is 1e-4 ||A||
    width = 10.0 if (filter_ghosts and reorth != "full") else 1e3
    if filter_ghosts and reorth == "none":
        # converged copies of one value in a long un-reorthogonalised run can disagree by
        # ~ sqrt(m) 10 eps ||A|| with bounds ~ 0 (float32, 600 steps: 91 eps ||A|| measured),
        # beyond the filter's reach: pairs that close are suspect
        width = 10.0 * max(1.0, math.sqrt(iterations))
    close_tol = width * eps_work * max(anorm, 1e-300)
    pairs = [
        (int(order[i]), int(order[i + 1]))
        for i in range(len(sv) - 1)
        if sv[i + 1] - sv[i] <= close_tol
    ]
    n_flagged = int(np.sum(ghost_flags != 0)) if ghost_flags is not None else 0
    if reorth != "full" and (pairs or n_flagged):
        if eigenvectors_overlap is not None:
            pairs = [(i, j) for i, j in pairs if abs(eigenvectors_overlap[i, j]) > 0.5]
        if pairs or n_flagged:
            desc = ", ".join(f"{values[i]:.10g}~{values[j]:.10g}" for i, j in pairs[:3])
            out.append(
                f"ghost eigenvalues: {len(pairs)} pair(s) of reported eigenvalues closer than "
                f"{close_tol:.1e} ({desc}) and {n_flagged} reported value(s) flagged spurious "
                f"by the Cullum-Willoughby test; reorth={reorth!r} lost orthogonality "
                "(copies of converged eigenvalues are not true multiplicities). Use "
                + ("reorth='window' or reorth='full'" if filter_ghosts else
                   "filter_ghosts=True, reorth='window' or reorth='full'")
            )
    elif reorth == "full" and pairs and orth_loss > math.sqrt(eps_work):
        out.append(
            f"repeated eigenvalues: {len(pairs)} pair(s) closer than {close_tol:.1e} while the "
            f"basis lost orthogonality ({orth_loss:.1e}): they may be ghosts, not true "
            "multiplicities; pass return_eigenvectors=True and check their overlap"
        )
    orth_thresh = math.sqrt(eps_work)
    if orth_loss > orth_thresh and (reorth == "full" or not filter_ghosts):
        out.append(
            f"loss of orthogonality: measured max |<q_i, q_j>| = {orth_loss:.2e} > "
            f"{orth_thresh:.1e} with reorth={reorth!r}; "
            + ("the operator may be non-symmetric or badly scaled"
               if reorth == "full" else "enable filter_ghosts or use reorth='full'")
        )
    eps_sym = max(eps_op or eps_work, eps_work)
    asym_thresh = math.sqrt(eps_sym) * max(anorm, 1e-300)
    if asym > asym_thresh:
        out.append(
            f"tridiagonal asymmetry: |<q_(j-1), A q_j> - <A q_(j-1), q_j>| reached {asym:.2e} "
            f"(> {asym_thresh:.1e} = sqrt(eps) ||A||): the operator is not symmetric at its "
            "working precision (lower-precision internals?); results are accurate to about "
            "that level"
        )
    return out
