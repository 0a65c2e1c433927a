"""``report.html``: the analysis (and ``track``) report as one self-contained web page.

The page carries everything in one file: the figures are embedded as base64 PNG
(``data:`` URIs), the style is inline, there is no script and nothing is fetched. It reads
on a phone (``<meta name="viewport">``, a ``max-width`` column, images scaled to the
width, wide tables scrolling inside their own box) and every number of the summary links
(``#anchor``) to the section holding its diagnostics: an eigenvalue to its row of Ritz
residuals and convergence, a trace to its standard error and probe count, a layer's alpha
to its row of the weight-spectra table, a check to its detail.

Supported names: :func:`analysis_html`, :func:`track_html`, :func:`page`,
:func:`embed_image`.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gradience_jax.app.markdown import _fmt, summary_rows

__all__ = ["analysis_html", "embed_image", "page", "track_html"]

_CSS = """
:root { color-scheme: light dark; --fg: #1b1f24; --bg: #ffffff; --muted: #57606a;
  --line: #d0d7de; --accent: #0969da; --bad: #cf222e; --good: #1a7f37; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6edf3; --bg: #0d1117;
  --muted: #8d96a0; --line: #30363d; --accent: #4493f8; --bad: #f85149; --good: #3fb950; } }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 60rem; padding: 0.75rem 1rem 3rem; color: var(--fg);
  background: var(--bg); font: 16px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif;
  overflow-wrap: break-word; }
h1 { font-size: 1.5rem; margin: 0.5rem 0; } h2 { font-size: 1.25rem; margin-top: 2rem;
  border-bottom: 1px solid var(--line); } h3 { font-size: 1.05rem; }
a { color: var(--accent); text-decoration: none; } a:hover { text-decoration: underline; }
nav { display: flex; flex-wrap: wrap; gap: 0.25rem 0.75rem; font-size: 0.9rem; }
figure { margin: 1rem 0; } figcaption { color: var(--muted); font-size: 0.85rem; }
img { display: block; max-width: 100%; height: auto; background: #fff; }
.table { overflow-x: auto; -webkit-overflow-scrolling: touch; margin: 0.5rem 0; }
table { border-collapse: collapse; font-size: 0.9rem; min-width: 50%; }
th, td { border-bottom: 1px solid var(--line); padding: 0.25rem 0.5rem; text-align: left;
  vertical-align: top; }
td.num { font-variant-numeric: tabular-nums; text-align: right; white-space: nowrap; }
.muted { color: var(--muted); } .bad { color: var(--bad); } .good { color: var(--good); }
:target { background: rgba(255, 200, 0, 0.25); }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.85rem; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _slug(text: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", str(text)).strip("-").lower() or "x"


def embed_image(path: str | Path, alt: str, caption: str | None = None) -> str:
    """A ``<figure>`` with the PNG at ``path`` embedded as a base64 ``data:`` URI.

    Args:
        path: the image file (PNG; SVG files are embedded as ``image/svg+xml``).
        alt: the alternative text.
        caption: an optional caption.

    Returns:
        The HTML (empty when the file does not exist).
    """
    path = Path(path)
    if not path.is_file():
        return ""
    mime = "image/svg+xml" if path.suffix == ".svg" else "image/png"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return (f'<figure><img src="data:{mime};base64,{data}" alt="{_e(alt)}">{cap}</figure>')


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], row_ids: Sequence[str] = ()
           ) -> str:
    """An HTML table in a horizontally scrolling box; cells are pre-rendered HTML."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        rid = f' id="{row_ids[i]}"' if i < len(row_ids) and row_ids[i] else ""
        body.append(f"<tr{rid}>" + "".join(_cell(c) for c in row) + "</tr>")
    return (f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>'
            + "".join(body) + "</tbody></table></div>")


class _Raw(str):
    """A cell that is already HTML."""


def _cell(value: Any) -> str:
    if isinstance(value, _Raw):
        return f"<td>{value}</td>"
    if isinstance(value, bool) or value is None:
        return f"<td>{_e(_fmt(value))}</td>"
    if isinstance(value, (int, float)):
        return f'<td class="num">{_e(_fmt(value, 6))}</td>'
    return f"<td>{_e(value)}</td>"


def _link(text: Any, anchor: str, cls: str = "") -> _Raw:
    c = f' class="{cls}"' if cls else ""
    return _Raw(f'<a href="#{anchor}"{c}>{_e(text)}</a>')


def page(title: str, sections: Sequence[tuple[str, str, str]], intro: str = "") -> str:
    """A whole self-contained page.

    Args:
        title: the ``<title>`` and heading.
        sections: ``(anchor, heading, html body)`` in order (a navigation bar links them).
        intro: HTML under the heading.

    Returns:
        The document (UTF-8 text).
    """
    nav = "".join(f'<a href="#{a}">{_e(h)}</a>' for a, h, _ in sections)
    body = "".join(f'<section id="{a}"><h2>{_e(h)}</h2>{b}</section>' for a, h, b in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
            f"<header><h1>{_e(title)}</h1>{intro}<nav>{nav}</nav></header>"
            f"<main>{body}</main></body></html>\n")


# -- analysis report -------------------------------------------------------------------------


def _summary_anchor(quantity: str, operators: Iterable[str]) -> str:
    for op in operators:
        if quantity.startswith(f"{op} "):
            return f"curvature-{_slug(op)}"
    return {"model": "model", "loss / accuracy": "loss", "density support": "density",
            "weights": "weights", "landscape": "landscape", "checks": "checks",
            "wall time": "reproducibility"}.get(quantity, "summary")


def _figure(out: Path, figures: Mapping[str, str], key: str, alt: str) -> str:
    name = figures.get(key)
    return embed_image(out / name, alt, alt) if name else ""


def _curvature_section(report: Mapping[str, Any], out: Path) -> str:
    parts = []
    curv = report.get("curvature") or {}
    rows, ids = [], []
    for name, c in curv.items():
        t, tr = c["top_k"], c["trace"]
        a = f"curvature-{_slug(name)}"
        rows.append([_link(name, a), _link(_fmt(t["eigenvalues"][0], 6), f"{a}-eig-1"),
                     _link(_fmt(tr["estimate"], 6), f"{a}-trace"), t["converged"],
                     t["iterations"], t["operator_calls"], t["wall_time_s"]])
        ids.append("")
    parts.append(_table(["operator", "lambda_1", "trace", "converged", "iterations",
                         "matvecs", "time (s)"], rows, ids))
    for name, c in curv.items():
        t, tr = c["top_k"], c["trace"]
        a = f"curvature-{_slug(name)}"
        mask = t.get("converged_mask") or [t["converged"]] * len(t["eigenvalues"])
        true_res = t.get("true_residuals") or [None] * len(t["eigenvalues"])
        erows = [[i + 1, lam, res, tres, bool(ok)] for i, (lam, res, tres, ok) in
                 enumerate(zip(t["eigenvalues"], t["ritz_residuals"], true_res, mask))]
        eids = [f"{a}-eig-{i + 1}" for i in range(len(erows))]
        diag = [["operator", t["operator"]], ["PSD by construction", t["is_psd"]],
                ["parameters", t["n_params"]], ["reorthogonalisation", t["reorth_mode"]],
                ["tolerance", t.get("tol")], ["restarts", t.get("restarts")],
                ["orthogonality loss", t.get("orthogonality_loss")],
                ["ghosts removed", t.get("ghosts_removed")], ["seed", t.get("seed")]]
        warn = "".join(f"<li>{_e(w)}</li>" for w in t["warnings"] + c.get("warnings", []))
        cover = c.get("coverage")
        parts.append(
            f'<h3 id="{a}">{_e(name)}</h3>'
            + _table(["i", "eigenvalue", "Ritz residual bound", "true residual", "converged"],
                     erows, eids)
            + f'<p id="{a}-trace">Trace (Hutchinson, {_e(tr["num_samples"])} '
              f"{_e(tr['estimator'])} probes): {_e(_fmt(tr['estimate'], 6))} &plusmn; "
              f"{_e(_fmt(tr['stderr'], 3))} (standard error).</p>"
            + _table(["diagnostic", "value"], diag)
            + (f"<p>K-FAC coverage: <code>{_e(json.dumps(cover))}</code></p>" if cover else "")
            + (f'<ul class="bad">{warn}</ul>' if warn else ""))
    parts.append(_figure(out, report.get("figures") or {}, "curvature_top_k",
                         "top-k eigenvalues and Ritz residuals"))
    return "".join(parts)


def _weights_section(report: Mapping[str, Any], out: Path) -> str:
    w = report["weights"]
    rows, ids = [], []
    for p, x in w["layers"].items():
        rows.append([_Raw(f"<code>{_e(p)}</code>"), "x".join(map(str, x["shape"])),
                     x.get("alpha"), x.get("weighted_alpha"), x.get("stable_rank"),
                     x.get("effective_rank"), x.get("num_spikes"),
                     str(x.get("verdict", "")).split(" (")[0]])
        ids.append(f"layer-{_slug(p)}")
    for p, reason in (w.get("failed") or {}).items():
        rows.append([_Raw(f"<code>{_e(p)}</code>"), "-", None, None, None, None, None,
                     _Raw(f'<span class="bad">FAILED: {_e(reason)}</span>')])
        ids.append(f"layer-{_slug(p)}")
    s = w["summary"]
    summary = (f"<p>{_e(s['num_layers'])} layers, {_e(s['num_skipped'])} leaves skipped "
               f"(biases, vectors); mean alpha {_e(_fmt(s['mean_alpha'], 4))}, weighted alpha "
               f"{_e(_fmt(s['weighted_alpha'], 4))}, mean effective rank "
               f"{_e(_fmt(s['mean_effective_rank'], 4))}.</p>")
    return (summary + _table(["layer", "shape", "alpha", "weighted alpha", "stable rank",
                              "eff. rank", "spikes", "verdict"], rows, ids)
            + _figure(out, report.get("figures") or {}, "weight_spectra", "weight spectra"))


def analysis_html(report: Mapping[str, Any], out: str | Path) -> str:
    """``report.html`` of an ``analyze`` report.

    Args:
        report: the JSON-safe report dict (:func:`gradience_jax.app.report.analyze`).
        out: the report folder (the figures named in ``report["figures"]`` are read from
            it and embedded).

    Returns:
        The HTML document.
    """
    out = Path(out)
    m = report["model"]
    figs = report.get("figures") or {}
    curv = report.get("curvature") or {}
    rows = [[_Raw(_e(q)), _link(v, _summary_anchor(q, curv))] for q, v in summary_rows(report)]
    sections = [("summary", "Summary", _table(["quantity", "value"], rows))]
    model_rows = [["name", str(m["name"])], ["parameters", m["n_params"]],
                  ["source", str(m["source"])],
                  ["spec", _Raw(f"<code>{_e(json.dumps(m.get('spec')))}</code>")]]
    data = report.get("data")
    if data:
        model_rows += [["data", data["description"]], ["examples", data["train_examples"]],
                       ["held-out examples", data.get("test_examples")]]
    sections.append(("model", "Model and data", _table(["", ""], model_rows)))
    loss = report.get("loss")
    if loss or "training" in figs:
        body = ""
        if loss:
            body += _table(["", "train", "test"],
                           [["loss", loss.get("train"), loss.get("test")],
                            ["accuracy", loss.get("train_accuracy"), loss.get("test_accuracy")]])
        tr = report.get("training")
        if tr:
            body += (f"<p>{_e(tr['steps'])} steps of {_e(tr['optimizer'])}: loss "
                     f"{_e(_fmt(tr['loss_initial']))} &rarr; {_e(_fmt(tr['loss_final']))}.</p>")
        body += _figure(out, figs, "training", "training loss")
        sections.append(("loss", "Loss and training", body))
    if curv:
        sections.append(("curvature", "Curvature", _curvature_section(report, out)))
    dens = report.get("density")
    if dens:
        lo, hi = dens["support"]
        tr = dens["trace"]
        body = (f"<p>{_e(dens['operator'])} spectral density by stochastic Lanczos quadrature"
                f" ({_e(dens['num_probes'])} probes x {_e(dens['num_iters'])} steps, Gaussian "
                f"width {_e(_fmt(dens['sigma'], 3))}); support [{_e(_fmt(lo))}, "
                f"{_e(_fmt(hi))}]; SLQ trace {_e(_fmt(tr['estimate'], 6))} &plusmn; "
                f"{_e(_fmt(tr['stderr'], 3))}.</p>"
                + _figure(out, figs, "spectral_density", "spectral density"))
        sections.append(("density", "Spectral density", body))
    sections.append(("weights", "Weight spectra", _weights_section(report, out)))
    land = report.get("landscape")
    if land:
        body = (f"<p>{_e(land['directions'])}; {len(land['alphas'])} x {len(land['betas'])} "
                f"grid; loss at the centre {_e(_fmt(land['center_loss']))}, range "
                f"{_e(_fmt(land['min_loss']))} .. {_e(_fmt(land['max_loss']))}, non-finite "
                f"fraction {_e(_fmt(land['nonfinite_fraction']))}.</p>"
                + _figure(out, figs, "landscape_2d", "2-D loss landscape"))
        sections.append(("landscape", "Loss landscape", body))
    checks = report.get("checks") or []
    if checks:
        rows = [[_Raw(f'<span class="{"good" if c["passed"] else "bad"}">'
                      f'{"passed" if c["passed"] else "FAILED"}</span>'),
                 _Raw(f"<code>{_e(c['name'])}</code>"), c["detail"]] for c in checks]
        sections.append(("checks", "Consistency checks",
                         _table(["", "check", "detail"], rows,
                                [f"check-{_slug(c['name'])}" for c in checks])))
    repro = (_table(["package", "version"], [[k, str(v)] for k, v in
                                             (report.get("versions") or {}).items()])
             + _table(["stage", "wall time (s)"],
                      [[k, v] for k, v in (report.get("wall_times") or {}).items()])
             + f"<p>Configuration:</p><pre>{_e(json.dumps(report.get('config'), indent=1))}"
               "</pre>")
    sections.append(("reproducibility", "Reproducibility", repro))
    intro = (f'<p class="muted">Model <code>{_e(m["name"])}</code> '
             f"({int(m['n_params']):,} parameters, {_e(m['source'])}), seed "
             f"{_e(report.get('seed'))}, created {_e(report.get('created'))}.</p>")
    return page("gradience_jax analysis report", sections, intro)


# -- track report ----------------------------------------------------------------------------


def track_html(summary: Mapping[str, Any], out: str | Path) -> str:
    """``report.html`` of a ``track`` run: the metrics over the checkpoints' steps.

    Args:
        summary: the track summary (:func:`gradience_jax.app.track.track`): ``steps``,
            ``columns`` (metric name -> one value per step), ``figures``, ``run_dir``,
            ``model``, ``config``.
        out: the output folder (figures are read from it and embedded).

    Returns:
        The HTML document.
    """
    out = Path(out)
    steps = list(summary["steps"])
    cols = summary["columns"]
    figs = summary.get("figures") or {}
    scalar = [k for k, v in cols.items()
              if all(x is None or isinstance(x, (int, float)) for x in v)]
    last = {k: cols[k][-1] if cols[k] else None for k in scalar}
    head_rows = [[_Raw(f"<code>{_e(k)}</code>"), _link(_fmt(last[k], 6), f"metric-{_slug(k)}")]
                 for k in scalar]
    sections = [("summary", f"Last step ({steps[-1] if steps else '-'})",
                 _table(["metric", "value"], head_rows))]
    body = "".join(embed_image(out / f, k.replace("_", " "), k.replace("_", " "))
                   for k, f in figs.items())
    if body:
        sections.append(("figures", "Over the steps", body))
    rows = [[s] + [cols[k][i] for k in scalar] for i, s in enumerate(steps)]
    per_step = _table(["step"] + scalar, rows, [f"step-{s}" for s in steps])
    sections.append(("steps", "Every step", per_step))
    metric_parts = []
    for k in scalar:
        vals = [[s, cols[k][i]] for i, s in enumerate(steps)]
        metric_parts.append(f'<h3 id="metric-{_slug(k)}"><code>{_e(k)}</code></h3>'
                            + _table(["step", k], vals))
    sections.append(("metrics", "Metrics one by one", "".join(metric_parts)))
    sections.append(("config", "Settings",
                     f"<pre>{_e(json.dumps(summary.get('config'), indent=1))}</pre>"))
    intro = (f'<p class="muted">Run <code>{_e(summary.get("run_dir"))}</code>, model '
             f"<code>{_e(summary.get('model'))}</code>, {len(steps)} checkpoint steps.</p>")
    return page("gradience_jax track report", sections, intro)
