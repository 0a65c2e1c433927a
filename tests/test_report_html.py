"""``report.html``: self-contained, readable on a phone, numbers linked to their diagnostics.

One small real ``analyze`` run (slow: about 40 s of compilation on a busy 2-core machine)
writes the report; the page is parsed (every figure embedded
as the PNG file it came from, every ``#anchor`` resolving, nothing fetched) and rendered by
a real headless browser (Debian's ``chromium``) at phone width, which must show every
figure (decoded, non-zero ``naturalWidth`` equal to the PNG's) without horizontal
scrolling. The browser test is skipped, with the reason, where ``chromium`` is not
installed (``apt-get install chromium``).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from gradience_jax.app import html as report_html
from gradience_jax.app import report as rp
from gradience_jax.app.markdown import _fmt

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium here (Debian: apt-get install -y chromium)")

_PROBE = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => ({complete: i.complete, w: i.naturalWidth,
    h: i.naturalHeight, shown: i.getBoundingClientRect().width}));
  const p = document.createElement('pre'); p.id = 'gj-probe';
  p.textContent = JSON.stringify({imgs, scroll: document.documentElement.scrollWidth,
    inner: window.innerWidth});
  document.body.appendChild(p);
});</script>"""


_FACTORY = """
import numpy as np
from flax import nnx
from gradience_jax.models import MLP

def model():
    return MLP([4, 6, 3], rngs=nnx.Rngs(0))

def batch():
    x = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    return {"inputs": x, "labels": (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0)}
"""


class _Page(HTMLParser):
    """Ids, local links, image sources, scripts and external references of a page."""

    def __init__(self):
        super().__init__()
        self.ids, self.links, self.imgs, self.tags, self.external = set(), [], [], [], []
        self.meta = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and a.get("href", "").startswith("#"):
            self.links.append(a["href"][1:])
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "meta":
            self.meta.append(a)
        for key in ("src", "href"):
            if re.match(r"^(https?:)?//", a.get(key, "")):
                self.external.append(a[key])


def _parse(text):
    page = _Page()
    page.feed(text)
    return page


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _render(page: Path, tmp_path: Path) -> dict:
    """What chromium shows of ``page`` at phone width (images, scroll width)."""
    probe = tmp_path / f"probe_{page.parent.name}.html"
    probe.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--window-size=390,844", "--virtual-time-budget=5000", f"--user-data-dir={tmp_path}/p",
         "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="gj-probe">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"chromium rc={proc.returncode}: {proc.stderr[-800:]}"
    return json.loads(m.group(1).replace("&quot;", '"'))


def _check_rendered(shown: dict, pngs: list[bytes]) -> None:
    assert len(shown["imgs"]) == len(pngs) > 0
    for img, data in zip(shown["imgs"], pngs):
        w, h = _png_size(data)
        assert img["complete"] and (img["w"], img["h"]) == (w, h), img
        assert 0 < img["shown"] <= shown["inner"], img  # scaled to the screen
    assert shown["scroll"] <= shown["inner"], shown  # no horizontal scrolling on a phone


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    out = tmp_path_factory.mktemp("html_report")
    factory = out.parent / "html_models.py"
    factory.write_text(_FACTORY)
    cfg = rp.AnalysisConfig(model=f"{factory}:model", data=f"{factory}:batch",
                            operators=("hessian",), k=2, iters=24, train_steps=5,
                            trace_samples=4, density_probes=1, density_iters=8, grid=3)
    return out, rp.analyze(cfg, out=out)


@pytest.mark.slow
def test_report_html_is_self_contained(analyzed):
    out, report = analyzed
    text = (out / "report.html").read_text()
    page = _parse(text)
    assert report["files"]["html"] == "report.html"
    assert not page.external and "script" not in page.tags and "link" not in page.tags
    assert {"name": "viewport", "content": "width=device-width, initial-scale=1"} in page.meta
    assert "max-width: 60rem" in text and "img { display: block; max-width: 100%" in text
    embedded = []
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,"), src[:40]
        embedded.append(base64.b64decode(src.split(",", 1)[1]))
    files = [(out / name).read_bytes() for name in report["figures"].values()]
    assert sorted(embedded) == sorted(files) and len(files) == 5


@pytest.mark.slow
def test_every_number_links_to_its_diagnostics(analyzed):
    out, report = analyzed
    text = (out / "report.html").read_text()
    page = _parse(text)
    missing = [a for a in page.links if a not in page.ids]
    assert not missing and len(page.links) > 20, missing
    top = report["curvature"]["hessian"]["top_k"]
    lam = _fmt(top["eigenvalues"][0], 6)
    summary_row = re.search(r"hessian lambda_max</td><td><a href=\"#([^\"]+)\">([^<]+)</a>", text)
    assert summary_row and summary_row.group(1) == "curvature-hessian"
    assert summary_row.group(2).startswith(lam)
    row = re.search(r'<tr id="curvature-hessian-eig-1">(.*?)</tr>', text).group(1)
    assert lam in row and _fmt(top["ritz_residuals"][0], 6) in row
    trace = re.search(r'<p id="curvature-hessian-trace">(.*?)</p>', text).group(1)
    assert _fmt(report["curvature"]["hessian"]["trace"]["estimate"], 6) in trace
    for layer, x in report["weights"]["layers"].items():
        row = re.search(rf'<tr id="layer-{re.escape(report_html._slug(layer))}">(.*?)</tr>',
                        text).group(1)
        assert _fmt(x["alpha"], 6) in row if x.get("alpha") is not None else True
    for c in report["checks"]:
        assert f'id="check-{report_html._slug(c["name"])}"' in text


@pytest.mark.slow
@needs_browser
def test_browser_shows_the_figures_on_a_phone(analyzed, tmp_path):
    out, report = analyzed
    shown = _render(out / "report.html", tmp_path)
    pngs = [base64.b64decode(s.split(",", 1)[1])
            for s in _parse((out / "report.html").read_text()).imgs]
    _check_rendered(shown, pngs)


@needs_browser
def test_browser_shows_a_track_report(tmp_path):
    from gradience_jax.plots.track import draw_track_figures

    steps = [0, 100, 200, 300]
    lam = np.array([[4.0, 2.0], [6.0, 2.5], [9.0, 3.0], [8.5, 3.2]])
    cols = {"loss": [2.0, 1.0, 0.5, 0.4], "hessian/lambda_1": list(lam[:, 0]),
            "hessian/lambda_2": list(lam[:, 1]), "hessian/trace": [20.0, 25.0, 30.0, 29.0],
            "hessian/trace_stderr": [1.0, 1.0, 2.0, 1.5], "hessian/matvecs": [40, 22, 20, 21],
            "hessian/converged": [True] * 4, "weights/mean_alpha": [None, 3.0, 2.8, 2.5],
            "weights/mean_effective_rank": [10.0, 9.0, 8.0, 7.5]}
    summary = {"steps": steps, "columns": cols, "run_dir": "run", "model": "mlp",
               "config": {"k": 2}}
    out = tmp_path / "track"
    out.mkdir()
    summary["figures"] = draw_track_figures(out, summary)
    assert set(summary["figures"]) == {"track_curvature", "track_weights", "track_loss"}
    (out / "report.html").write_text(report_html.track_html(summary, out))
    page = _parse((out / "report.html").read_text())
    assert not [a for a in page.links if a not in page.ids]
    pngs = [(out / f).read_bytes() for f in summary["figures"].values()]
    _check_rendered(_render(out / "report.html", tmp_path), pngs)
