"""edge_msd.bench.report: merged reports (markdown, HTML with plots) and the schema check."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from bench_helpers import _opts

from edge_msd.artifacts import atomic_write_json
from edge_msd.bench.report import load_report, merge_reports
from edge_msd.bench.run import run_bench
from edge_msd.errors import ArtifactError


@pytest.mark.slow
def test_report_merges_and_refuses_other_schema(bundle, tmp_path):
    a = tmp_path / "a.json"
    run_bench(_opts(bundle, a, label="board-a", batch=[1]))
    b = json.loads(a.read_text())
    b["device"]["label"] = "board-b"
    atomic_write_json(tmp_path / "b.json", b)
    written = merge_reports([a, tmp_path / "b.json"], tmp_path / "out")
    md = written["markdown"].read_text()
    assert "board-a · onnxruntime · fp32" in md and "board-b" in md and "![recall_vs_latency]" in md
    assert {"latency_image", "latency_text", "recall_vs_latency"} <= set(written)
    assert written["html"].read_text().count("data:image/png;base64,") == 3
    b["schema"] = "edge-msd-bench/2"
    atomic_write_json(tmp_path / "v2.json", b)
    with pytest.raises(ArtifactError, match=r"v2\.json: report schema 'edge-msd-bench/2' is not supported"):
        load_report(tmp_path / "v2.json")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ArtifactError, match="not an edge-msd bench report"):
        merge_reports([tmp_path / "x.json"], tmp_path / "out2")


def _png_sources(page: str) -> dict[str, bytes]:
    """alt → decoded bytes of every embedded image, read with the standard HTML parser."""
    import base64
    from html.parser import HTMLParser

    found: dict[str, bytes] = {}

    class Images(HTMLParser):
        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "img":
                found[a["alt"]] = base64.b64decode(a["src"].split(",", 1)[1])

    Images().feed(page)
    return found


def _html_tables(page: str) -> dict[str, list[list[str]]]:
    """h2 title → rows of cell texts."""
    from html.parser import HTMLParser

    tables: dict[str, list[list[str]]] = {}

    class Tables(HTMLParser):
        title, cell, in_h2 = "", None, False

        def handle_starttag(self, tag, attrs):
            if tag == "h2":
                self.in_h2, self.title = True, ""
            elif tag == "tr":
                tables.setdefault(self.title, []).append([])
            elif tag in ("td", "th"):
                self.cell = ""

        def handle_endtag(self, tag):
            if tag == "h2":
                self.in_h2 = False
            elif tag in ("td", "th"):
                tables[self.title][-1].append(self.cell)
                self.cell = None

        def handle_data(self, data):
            if self.in_h2:
                self.title += data
            elif self.cell is not None:
                self.cell += data

    Tables().feed(page)
    return tables


@pytest.fixture(scope="module")
def merged(bundle, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("merged")
    run_bench(_opts(bundle, tmp / "a.json", label="board-a", batch=[1], sustained=0.3))
    return merge_reports([tmp / "a.json"], tmp / "out")


@pytest.mark.slow
def test_html_report_has_placement_and_sustained_plot(merged):
    page = merged["html"].read_text()
    tables = _html_tables(page)
    placement = tables["Op placement"]
    assert placement[0][:4] == ["run", "tower", "accelerator", "ops on it"]
    assert {r[1] for r in placement[1:]} == {"image", "text"} and all(
        r[2] == "CPUExecutionProvider" for r in placement[1:]
    )
    cold = tables["Cold start and the runtime's own memory"]
    assert len(cold) == 3 and all(float(r[3]) > 0 for r in cold[1:])  # load ms
    images = _png_sources(page)
    assert {"sustained", "latency_image", "recall_vs_latency"} <= set(images)
    assert all(data.startswith(b"\x89PNG") for data in images.values())


def _headless_chromium() -> list[str] | None:
    """Debian's headless shell, else a full Chromium in its headless mode; None when neither is here."""
    import shutil

    if shell := shutil.which("chromium-headless-shell"):
        return [shell]
    full = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    return [full, "--headless=new"] if full else None


@pytest.mark.slow
def test_html_report_renders_in_headless_chromium(merged, tmp_path):
    """The page as a browser draws it: its tables' text and its embedded plots decoded (the plots'
    matplotlib blue is on the screen), not only well-formed HTML."""
    browser = _headless_chromium()
    if browser is None:
        pytest.skip("no headless Chromium (apt-get install chromium-headless-shell) to render the report")
    shot = tmp_path / "report.png"
    subprocess.run(
        [*browser, "--no-sandbox", "--disable-gpu", "--window-size=1280,4000", f"--screenshot={shot}",
         merged["html"].resolve().as_uri()],
        capture_output=True,
        timeout=120,
        env={**os.environ, "HOME": str(tmp_path)},
    )
    from PIL import Image

    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert rgb.shape == (4000, 1280, 3)
    gray = rgb.mean(axis=2)
    # rendered content: dark text/lines on the page and more than one shade (a blank page is uniform)
    assert (gray < 100).mean() > 0.002 and len(np.unique(gray)) > 50
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    plot_blue = (b > 150) & (b - r > 60) & (b - g > 20)  # matplotlib's first colour, only in the plots
    assert plot_blue.mean() > 0.001
