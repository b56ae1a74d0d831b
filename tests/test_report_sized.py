"""A report sized to its sweep: a quickstart-shaped store (4 methods on SST-2, one seed, no QAT, no Optuna)
gives a page under 1.5 MB with no empty section. Blocks without data are listed once at the end ("Not
drawn": why), plotly.js comes from one shared file beside the page, and the store is shown relative to the
working folder."""

from __future__ import annotations

import re

import report_fixtures as rf
from kdplatform.report import render

QUICKSTART = [rf.SynthRun("sst2", m, 42, best, n_points=24, eval_every=25)
              for m, best in (("kd", 0.80), ("tinybert", 0.81), ("ild_last", 0.82), ("cr_ild", 0.83))]
PAGE_LIMIT = 1_500_000


def test_a_quickstart_report_is_small_and_draws_no_empty_section(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri, client, exp = rf.small_store(tmp_path, "quickstart", [])
    sweep = rf.create_sweep(client, exp)
    for run in QUICKSTART:
        run.sweep_id = sweep
        rf.log_run(client, exp, run)
    assert render.report_command("quickstart", None, None, "report", "html", uri) == 0
    out = tmp_path / "report"
    page = (out / "index.html").read_text()
    size = (out / "index.html").stat().st_size
    print(f"quickstart-shaped report: index.html {size / 1e3:.0f} kB, plotly.min.js "
          f"{(out / 'plotly.min.js').stat().st_size / 1e6:.1f} MB")
    assert size < PAGE_LIMIT

    main = page.split("<main>")[1]
    sections = re.findall(r'<section id="([^"]+)">(.*?)</section>', main, re.S)
    drawn = [(name, body) for name, body in sections if name not in ("runs", "not-drawn")]
    assert drawn, "no dashboard section drawn"
    for name, body in drawn:
        assert 'class="figure"' in body or 'class="kdp-table"' in body or "<table" in body, name
        # every block heading is followed by its table or figures, never by a "nothing to show"
        for block in re.split(r"<h3 ", body)[1:]:
            assert "<table" in block or 'class="figure"' in block, block[:200]
    assert "Nothing to show" not in page
    not_drawn = dict(sections)["not-drawn"]
    assert "no quantized (QAT) runs" in not_drawn and "no Optuna search" in not_drawn
    assert 'id="quantization"' not in page, "a section with nothing drawn is left out"
    assert 'href="#not-drawn"' in page

    assert "plotly.js v" not in page and page.count('src="plotly.min.js"') == 1
    assert "sqlite:///mlflow.db" in page and str(tmp_path) not in page
