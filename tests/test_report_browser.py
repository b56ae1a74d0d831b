"""The HTML report in a real browser (headless Chromium): every figure renders, no console errors, and a
screenshot that is not blank. Skipped where there is no Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import report_fixtures as rf
from kdplatform.report import render

CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium") if p and Path(p).exists()), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (Debian: apt-get install chromium)")


def chromium(url: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           # the parallel-coordinates plot is WebGL: without a GPU Chromium uses SwiftShader, and says so
           # in the console unless this opts in
           "--enable-unsafe-swiftshader",
           "--virtual-time-budget=10000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


# Chromium's own WebGL driver notes ("GPU stall due to ReadPixels" with software GL) reach the console log
# too; they say nothing about the page.
BROWSER_NOTES = re.compile(r':CONSOLE:\d+\] "\[\.WebGL-[^\]]*\]GL Driver Message')


def console_messages(stderr: str) -> list[str]:
    """Page console output (console.log/error and uncaught exceptions) as Chromium logs it."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line and not BROWSER_NOTES.search(line)]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """The default report of the test store, opened once: DOM after scripts ran, console log, screenshot."""
    root = tmp_path_factory.mktemp("report-browser")
    store = rf.cached_test_store(root / "store")
    out = root / "report"
    assert render.report_command(rf.MAIN, None, None, str(out), "html", store["uri"]) == 0
    page = out / "index.html"
    shot = root / "report.png"
    res = chromium(page.as_uri(), root, "--dump-dom", f"--screenshot={shot}", "--window-size=1400,5000")
    return {"page": page.read_text(), "dom": res.stdout, "stderr": res.stderr, "shot": shot}


@pytest.mark.slow
def test_every_figure_renders_without_console_errors(browser):
    n_figures = browser["page"].count("Plotly.newPlot(")
    assert n_figures >= 10
    dom = browser["dom"]
    assert "</html>" in dom, browser["stderr"][-3000:]
    # plotly marks a div as drawn (js-plotly-plot) and puts its SVG layers in it
    drawn = re.findall(r'<div id="plot-[^"]+" class="plotly-graph-div js-plotly-plot"', dom)
    assert len(drawn) == n_figures
    assert dom.count('class="main-svg"') >= n_figures
    assert console_messages(browser["stderr"]) == []


@pytest.mark.slow
def test_screenshot_is_not_blank(browser):
    Image = pytest.importorskip("PIL.Image", reason="Pillow decodes the screenshot")

    assert browser["shot"].exists(), browser["stderr"][-3000:]
    pixels = np.asarray(Image.open(browser["shot"]).convert("RGB")).astype(int)
    assert pixels.shape == (5000, 1400, 3)
    colours = len(np.unique((pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]))
    saturated = int(((pixels.max(axis=2) - pixels.min(axis=2)) > 60).sum())  # plot lines/bands, not text
    assert colours > 2000, colours
    assert saturated > 20_000, saturated


def test_the_checks_catch_a_broken_page(tmp_path):
    """Negative control: the same checks fail on a page whose plot cannot render and that logs errors."""
    page = tmp_path / "broken.html"
    page.write_text('<html><body><div id="plot-x" class="plotly-graph-div"></div>'
                    '<script>console.error("boom");</script>'
                    '<script>Plotly.newPlot("plot-x", [{"y": [1, 2]}]);</script></body></html>')
    res = chromium(page.as_uri(), tmp_path, "--dump-dom")
    messages = console_messages(res.stderr)
    assert any("boom" in m for m in messages)
    assert any("Uncaught ReferenceError: Plotly is not defined" in m for m in messages)
    assert "js-plotly-plot" not in res.stdout
