"""The analysis report as text: the headline rows and ``report.md``.

Supported names: :func:`summary_rows` (the CLI's table and the report's first table),
:func:`markdown` (the whole ``report.md``). Both read the JSON-safe report dict of
:func:`gradience_jax.app.report.analyze`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["markdown", "summary_rows"]


def _fmt(v: Any, d: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.{d}g}"
    return str(v)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return lines + [""]


def summary_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The headline numbers of a report.

    Args:
        report: the report dict.

    Returns:
        ``(quantity, value)`` rows: model, loss / accuracy, per operator ``lambda_max``
        (with convergence), top-k and trace, density support, weights summary, landscape
        range, checks passed, wall time.
    """
    rows = [("model", f"{report['model']['name']} ({report['model']['n_params']:,} params, "
                      f"{report['model']['source']})")]
    if report.get("loss") is not None:
        rows.append(("loss / accuracy", f"{_fmt(report['loss']['train'])} / "
                                        f"{_fmt(report['loss']['train_accuracy'])}"))
    for name, c in (report.get("curvature") or {}).items():
        top = c["top_k"]
        lam = top["eigenvalues"]
        state = "converged" if top["converged"] else "NOT converged"
        rows.append((f"{name} lambda_max", f"{_fmt(lam[0], 6)} ({state}, {top['iterations']} it.)"))
        rows.append((f"{name} top-{len(lam)}", ", ".join(_fmt(v, 3) for v in lam)))
        rows.append((f"{name} trace", f"{_fmt(c['trace']['estimate'], 6)} +- "
                                      f"{_fmt(c['trace']['stderr'], 2)}"))
    if report.get("density"):
        lo, hi = report["density"]["support"]
        rows.append(("density support", f"[{_fmt(lo)}, {_fmt(hi)}]"))
    ws = report["weights"]["summary"]
    failed = report["weights"].get("failed") or {}
    rows.append(("weights", f"{ws['num_layers']} layers"
                            f"{f', {len(failed)} FAILED' if failed else ''}, mean alpha "
                            f"{_fmt(ws['mean_alpha'], 3)}, weighted alpha "
                            f"{_fmt(ws['weighted_alpha'], 3)}, mean eff. rank "
                            f"{_fmt(ws['mean_effective_rank'], 3)}"))
    if report.get("landscape"):
        land = report["landscape"]
        rows.append(("landscape", f"loss {_fmt(land['min_loss'])} .. {_fmt(land['max_loss'])} "
                                  f"on the {len(land['alphas'])}x{len(land['betas'])} slice"))
    checks = report.get("checks") or []
    rows.append(("checks", f"{sum(c['passed'] for c in checks)}/{len(checks)} passed"))
    rows.append(("wall time", f"{report['wall_times']['total']:.1f} s"))
    return rows


def markdown(report: Mapping[str, Any]) -> str:
    """``report.md``, the whole report as markdown.

    The summary table, curvature, spectral density, weight spectra, landscape, consistency
    checks and reproducibility sections, with the figures of ``report["figures"]``
    embedded by relative path.

    Args:
        report: the report dict (with ``wall_times["total"]``).

    Returns:
        The markdown text.
    """
    m = report["model"]
    lines = ["# gradience_jax analysis report", "",
             f"Model `{m['name']}` ({m['n_params']:,} parameters, {m['source']}), seed "
             f"{report['seed']}, created {report['created']}.", ""]
    lines += _md_table(["quantity", "value"], summary_rows(report))
    figs = report.get("figures") or {}
    if "training" in figs:
        lines += ["## Training", "", f"![training]({figs['training']})", ""]
    if report.get("curvature"):
        lines += ["## Curvature", ""]
        rows = []
        for name, c in report["curvature"].items():
            t = c["top_k"]
            rows.append([name, t["eigenvalues"][0], t["eigenvalues"][-1], c["trace"]["estimate"],
                         c["trace"]["stderr"], t["converged"], t["iterations"], t["operator_calls"],
                         t["wall_time_s"]])
        lines += _md_table(["operator", "lambda_1", "lambda_k", "trace", "stderr", "converged",
                            "iterations", "matvecs", "time (s)"], rows)
        for name, c in report["curvature"].items():
            for w in c["top_k"]["warnings"] + c.get("warnings", []):
                lines.append(f"- {name}: {w}")
        lines.append("")
        if "curvature_top_k" in figs:
            lines += [f"![top-k]({figs['curvature_top_k']})", ""]
    if "spectral_density" in figs:
        lines += ["## Spectral density", "", f"![density]({figs['spectral_density']})", ""]
    lines += ["## Weight spectra", ""]
    layer_rows = [[p, "x".join(map(str, x["shape"])), x.get("alpha"), x.get("stable_rank"),
                   x.get("effective_rank"), x.get("num_spikes"),
                   str(x.get("verdict", "")).split(" (")[0]]
                  for p, x in report["weights"]["layers"].items()]
    layer_rows += [[p, "-", None, None, None, None, f"FAILED: {reason}"]
                   for p, reason in (report["weights"].get("failed") or {}).items()]
    lines += _md_table(["layer", "shape", "alpha", "stable rank", "eff. rank", "spikes", "verdict"],
                       layer_rows)
    if "weight_spectra" in figs:
        lines += [f"![weights]({figs['weight_spectra']})", ""]
    if "landscape_2d" in figs:
        lines += ["## Loss landscape", "", f"![landscape]({figs['landscape_2d']})", ""]
    if report.get("checks"):
        lines += ["## Consistency checks", ""]
        lines += [f"- [{'x' if c['passed'] else ' '}] `{c['name']}`: {c['detail']}"
                  for c in report["checks"]]
        lines.append("")
    lines += ["## Reproducibility", ""]
    lines += _md_table(["package", "version"], list(report["versions"].items()))
    lines += ["Configuration: `" + json.dumps(report["config"]) + "`", ""]
    return "\n".join(lines)
