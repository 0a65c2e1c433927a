"""The whole-model report: ``weight_spectra`` over a parameter pytree.

Leaves are found with ``jax.tree_util.tree_flatten_with_path`` and named by their
``"/"``-joined path; kernels are reshaped by the ``"auto"`` rule of
:mod:`gradience_jax.weights.reshape` and analysed by ``layer_spectrum``. ``weight_spectra``
never raises for one bad leaf. A leaf that is not a weight matrix (a bias, a scale, a
vector, an integer array, a shape without a reshape rule) is listed in ``report.skipped``
with the reason; a weight matrix whose analysis fails (NaN / Inf entries, an empty axis, a
``reshape`` callable returning a non-matrix) is listed in ``report.failed`` with the reason,
and shown as a ``FAILED`` row by ``to_text`` / ``to_table``. Bad arguments (``rtol``,
``min_tail``, ``tw_level``, ``key``) raise before any leaf is analysed.
``WeightSpectraReport.summary`` gives model-level means, verdict counts and layer-wise
trends; ``to_json`` / ``to_text`` / ``to_table`` (``rich``, imported lazily) render it.

Supported names: ``WeightSpectraReport``, ``ModelSummary``, ``weight_spectra``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax._json import jsonable
from gradience_jax._validate import ArgumentTypeError, check_int, check_key
from gradience_jax.tree import path_str
from gradience_jax.weights.layer import LayerSpectrum, layer_spectrum
from gradience_jax.weights.metrics import check_rtol
from gradience_jax.weights.random_matrix import tw_quantile
from gradience_jax.weights.reshape import (
    apply_reshape_rule,
    head_kind,
    head_matrices,
    reshape_rule_for,
)

__all__ = ["ModelSummary", "WeightSpectraReport", "weight_spectra"]

PyTree = Any


class ModelSummary(NamedTuple):
    """Model-level summary of a ``WeightSpectraReport`` (None where undefined).

    ``weighted_alpha`` is the mean over layers of ``alpha * log10(sigma_1^2)``
    (WeightWatcher's model ``alpha_weighted``, on its ESD ``W^T W``);
    ``weighted_alpha_normalized`` the mean of ``alpha * log10(lambda_max)`` on this
    package's ESD ``W^T W / N``; ``trends`` maps a metric name to the least-squares slope
    of that metric against layer position (natural sort of paths). ``num_failed`` counts
    the weight matrices whose analysis failed (``report.failed``). Per-head views
    (``weight_spectra(per_head=True)``) are not counted.
    """

    num_layers: int
    num_skipped: int
    num_alpha_missing: int
    mean_alpha: float | None
    median_alpha: float | None
    weighted_alpha: float | None
    mean_log10_lambda_max: float | None
    mean_stable_rank: float | None
    mean_effective_rank: float | None
    total_spikes: int
    verdict_counts: dict[str, int]
    trends: dict[str, float | None]
    num_failed: int = 0
    weighted_alpha_normalized: float | None = None


def _natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def _slope(ys: list[float | None]) -> float | None:
    pts = [(i, y) for i, y in enumerate(ys) if y is not None and math.isfinite(y)]
    if len(pts) < 2:
        return None
    x = np.array([p[0] for p in pts], dtype=np.float64)
    y = np.array([p[1] for p in pts], dtype=np.float64)
    xc = x - x.mean()
    return float(np.dot(xc, y - y.mean()) / np.dot(xc, xc))


@dataclasses.dataclass(frozen=True, eq=False)
class WeightSpectraReport(Mapping):
    """Mapping ``layer_path -> LayerSpectrum`` (in depth order), plus skipped leaves.

    Attributes:
      layers: the analysed layers, ordered by a natural sort of their paths.
      skipped: ``path -> reason`` for every leaf that is not a weight matrix (biases,
        scales, vectors, arrays without a reshape rule, non-float arrays).
      failed: ``path -> reason`` for every weight matrix whose analysis failed (NaN / Inf
        entries, an empty axis, a ``reshape`` callable returning a non-matrix).
    """

    layers: dict[str, LayerSpectrum]
    skipped: dict[str, str]
    failed: dict[str, str] = dataclasses.field(default_factory=dict)

    def __getitem__(self, key: str) -> LayerSpectrum:
        return self.layers[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def summary(self) -> ModelSummary:
        """Model-level means, verdict counts and layer-wise trends (per-head views excluded)."""
        ls = [x for x in self.layers.values() if not x.reshape_rule.startswith("head_")]
        alphas = [x.alpha for x in ls if x.alpha is not None]
        weighted = [x.weighted_alpha for x in ls if x.weighted_alpha is not None]
        weighted_norm = [x.weighted_alpha_normalized for x in ls
                         if x.weighted_alpha_normalized is not None]
        loglam = [x.log10_lambda_max for x in ls if x.log10_lambda_max is not None]
        counts: dict[str, int] = {}
        for x in ls:
            head = x.verdict.split(" (")[0]
            counts[head] = counts.get(head, 0) + 1
        return ModelSummary(
            num_layers=len(ls),
            num_skipped=len(self.skipped),
            num_alpha_missing=sum(x.alpha is None for x in ls),
            mean_alpha=_mean(alphas),
            median_alpha=float(np.median(alphas)) if alphas else None,
            weighted_alpha=_mean(weighted),
            mean_log10_lambda_max=_mean(loglam),
            mean_stable_rank=_mean([x.stable_rank for x in ls]),
            mean_effective_rank=_mean([x.effective_rank for x in ls]),
            total_spikes=sum(x.num_spikes for x in ls),
            verdict_counts=counts,
            trends={
                "alpha": _slope([x.alpha for x in ls]),
                "weighted_alpha": _slope([x.weighted_alpha for x in ls]),
                "effective_rank": _slope([x.effective_rank for x in ls]),
                "stable_rank": _slope([x.stable_rank for x in ls]),
                "log10_lambda_max": _slope([x.log10_lambda_max for x in ls]),
            },
            num_failed=len(self.failed),
            weighted_alpha_normalized=_mean(weighted_norm),
        )

    def to_dict(self, include_arrays: bool = False) -> dict[str, Any]:
        """JSON-safe dict ``{"layers", "skipped", "failed", "summary"}``.

        Args:
          include_arrays: also store every layer's singular values and ESD.

        Returns:
          The report dict (layers by path, skipped leaves and failed layers with reasons,
          the summary).
        """
        return {
            "layers": {p: x.to_dict(include_arrays) for p, x in self.layers.items()},
            "skipped": dict(self.skipped),
            "failed": dict(self.failed),
            "summary": jsonable(self.summary._asdict()),
        }

    def to_json(self, include_arrays: bool = False, indent: int | None = 2) -> str:
        """The report as a JSON string (NaN / Inf written as null).

        Args:
          include_arrays: also store every layer's singular values and ESD.
          indent: ``json.dumps`` indentation (None: one line).

        Returns:
          The JSON text of :meth:`to_dict`.
        """
        return json.dumps(self.to_dict(include_arrays), indent=indent)

    _COLUMNS = (
        "layer",
        "shape",
        "alpha",
        "w.alpha",
        "KS",
        "tail",
        "spec.norm",
        "stable r",
        "eff. r",
        "num r",
        "spikes",
        "verdict",
    )

    def _rows(self) -> list[tuple[str, ...]]:
        f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
        rows = {}
        for p, x in self.layers.items():
            rows[p] = (
                p,
                f"{x.shape[0]}x{x.shape[1]}",
                f(x.alpha),
                f(x.weighted_alpha),
                f(x.ks_distance, 3),
                str(x.num_tail),
                f"{x.spectral_norm:.3g}",
                f(x.stable_rank),
                f(x.effective_rank),
                str(x.numerical_rank),
                str(x.num_spikes),
                x.verdict.split(" (")[0],
            )
        blank = ("-",) * (len(self._COLUMNS) - 3)
        for p, reason in self.failed.items():
            rows[p] = (p, "-", *blank, f"FAILED: {reason}")
        return [rows[p] for p in sorted(rows, key=_natural_key)]  # failures in depth order

    def _summary_line(self) -> str:
        s = self.summary
        f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        failed = f", {s.num_failed} FAILED" if s.num_failed else ""
        return (
            f"{s.num_layers} layers{failed}, {s.num_skipped} skipped; mean alpha "
            f"{f(s.mean_alpha)}, "
            f"weighted alpha {f(s.weighted_alpha)}, mean eff. rank "
            f"{f(s.mean_effective_rank)}, alpha trend/layer {f(s.trends['alpha'])}"
        )

    def to_text(self) -> str:
        """Plain-text table of the layers, skipped leaves and the summary."""
        rows = [self._COLUMNS] + self._rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(self._COLUMNS))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        notable = {
            p: r
            for p, r in self.skipped.items()
            if "bias / normalisation" not in r and "1-D array" not in r and "0-D array" not in r
        }
        vectors = len(self.skipped) - len(notable)
        if vectors:
            lines.append(f"skipped {vectors} bias / scale / vector leaves")
        for p, r in notable.items():
            lines.append(f"skipped {p}: {r}")
        lines.append(self._summary_line())
        return "\n".join(lines)

    def to_table(self, plain: bool = False) -> Any:
        """A ``rich.table.Table`` (or the plain-text table when ``plain`` or rich is absent).

        Args:
          plain: return :meth:`to_text` instead of a rich table.

        Returns:
          A ``rich.table.Table``, or a ``str``.
        """
        if plain:
            return self.to_text()
        from rich.table import Table  # noqa: PLC0415 - rich for output only
        table = Table(title="weight spectra", caption=self._summary_line())
        for c in self._COLUMNS:
            table.add_column(c, justify="left" if c in ("layer", "verdict") else "right")
        for r in self._rows():
            table.add_row(*r)
        return table

    def __str__(self) -> str:
        return self.to_text()


def _as_state(params: PyTree) -> PyTree:
    """An ``nnx.Module`` becomes its ``nnx.Param`` state; anything else is returned as is."""
    from flax import nnx  # noqa: PLC0415 - flax only to unwrap NNX modules
    if isinstance(params, nnx.Module):
        return nnx.state(params, nnx.Param)
    return params


def weight_spectra(
    params: PyTree,
    filter: Callable[[str, Any], bool] | None = None,  # noqa: A002 - fixed public name
    *,
    reshape: Callable[[str, Any], Any] | None = None,
    per_head: bool = False,
    key: jax.Array | None = None,
    rtol: float | None = None,
    min_tail: int = 10,
    tw_level: float = 0.99,
) -> WeightSpectraReport:
    """Spectral report of every weight matrix of a Flax model (NNX or Linen).

    Leaves are found with ``jax.tree_util.tree_flatten_with_path`` and named by their
    ``"/"``-joined path (NNX's trailing ``.value`` dropped), e.g. ``"params/Dense_0/kernel"``
    (Linen) or ``"blocks/0/attn/query/kernel"`` (``nnx.state(model, nnx.Param)``). Kernels are
    reshaped by the ``"auto"`` rule of :mod:`gradience_jax.weights.reshape`.

    Args:
      params: Linen params dict, ``nnx.State`` or an ``nnx.Module`` (its ``nnx.Param`` state),
        or the path of a ``.safetensors`` checkpoint (a file, a shard, an index or a
        directory: read by :func:`gradience_jax.weights.files.weight_spectra_from_file`).
      filter: predicate ``(path, leaf) -> bool``; leaves where it is False are ignored.
      reshape: optional ``(path, leaf) -> 2-D array | None`` overriding the auto rule; None
        falls back to the auto rule.
      per_head: also report every head of 3-D attention kernels as ``path/head_<h>``
        (``reshape_rule`` ``"head_in"`` / ``"head_out"``; left out of ``report.summary``).
      key: if given, run the randomisation baseline per layer (key folded with the index).
      rtol: numerical-rank tolerance relative to ``sigma_1``, as in ``layer_spectrum``.
      min_tail: smallest number of tail eigenvalues for a power-law fit, as in
        ``layer_spectrum``.
      tw_level: Tracy-Widom quantile level of the spike threshold (0.90, 0.95, 0.99), as
        in ``layer_spectrum``.

    Returns:
      ``WeightSpectraReport``. Never raises for a bad leaf: a leaf that is not a weight
      matrix lands in ``report.skipped``, a weight matrix that cannot be analysed (NaN /
      Inf entries, an empty axis, a ``reshape`` result that is not 2-D) in
      ``report.failed``, each with its reason.

    Example::

        rep = gj.weight_spectra(nnx.state(model, nnx.Param))
        rep["blocks/0/mlp/kernel"].alpha        # one layer
        rep.summary.mean_alpha, rep.summary.trends["effective_rank"]
        rich.print(rep.to_table()); open("spectra.json", "w").write(rep.to_json())

    Raises:
      ArgumentTypeError: an argument of the wrong kind (``filter`` / ``reshape`` not
        callable, ``key`` not a PRNG key, a string ``rtol``, ...).
      ValueError: if ``params`` has no leaves, ``rtol`` is outside [0, 1), ``min_tail < 2``
        or ``tw_level`` is not tabulated.
    """
    if isinstance(params, (str, os.PathLike)):
        from gradience_jax.weights.files import (  # noqa: PLC0415 - files imports this module
            weight_spectra_from_file,
        )

        if filter is not None or reshape is not None or per_head:
            raise ValueError("weight_spectra(path) takes no filter / reshape / per_head: use "
                             "weights.weight_spectra_from_file(path, select=...)")
        return weight_spectra_from_file(params, key=key, rtol=rtol, min_tail=min_tail,
                                        tw_level=tw_level)
    rtol = None if rtol is None else check_rtol(rtol)
    min_tail = check_int(min_tail, "min_tail", lo=2)
    tw_quantile(tw_level)
    if key is not None:
        key = check_key(key, "key")
    for fn, fn_name in ((filter, "filter"), (reshape, "reshape")):
        if fn is not None and not callable(fn):
            raise ArgumentTypeError(f"{fn_name} must be a callable (path, leaf) -> ..., got "
                                    f"{type(fn).__name__}")
    flat = jax.tree_util.tree_flatten_with_path(_as_state(params))[0]
    if not flat:
        raise ValueError("params is an empty pytree: there are no weight matrices")
    layers: dict[str, LayerSpectrum] = {}
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    index = 0
    for kp, leaf in flat:
        p = path_str(kp)
        if filter is not None and not filter(p, leaf):
            continue
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            skipped[p] = f"not a floating-point array ({type(leaf).__name__}, dtype {dtype})"
            continue
        shape = tuple(np.shape(leaf))
        mats: list[tuple[str, Any, str]] = []
        custom = reshape(p, leaf) if reshape is not None else None
        if custom is not None:
            if np.ndim(custom) != 2:
                failed[p] = f"reshape returned shape {np.shape(custom)}, not a 2-D matrix"
                continue
            mats.append((p, custom, "custom"))
        else:
            rule, reason = reshape_rule_for(p, shape)
            if rule is None:
                skipped[p] = reason
                continue
            mats.append((p, apply_reshape_rule(np.asarray(leaf), rule), rule))
            kind = head_kind(p, shape) if per_head else None
            if kind is not None:
                heads = np.asarray(head_matrices(leaf, kind=kind))
                mats.extend(
                    (f"{p}/head_{h}", heads[h], f"head_{kind}") for h in range(heads.shape[0])
                )
        for name, mat, rule in mats:
            try:
                rep = layer_spectrum(
                    mat,
                    path=name,
                    reshape="matrix",
                    rtol=rtol,
                    min_tail=min_tail,
                    tw_level=tw_level,
                    key=None if key is None else jax.random.fold_in(key, index),
                )
            except (ValueError, FloatingPointError) as e:  # LinAlgError is a ValueError
                failed[name] = str(e)
                continue
            finally:
                index += 1
            layers[name] = dataclasses.replace(rep, original_shape=shape, reshape_rule=rule)
    order = sorted(layers, key=_natural_key)
    return WeightSpectraReport(layers={p: layers[p] for p in order}, skipped=skipped,
                               failed=failed)
