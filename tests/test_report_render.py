"""`kdplatform report` end to end (through `report_command`, the CLI entry): output folder, every format,
dashboards, missing data (exit 2, nothing written), no Chromium, and no torch import."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import report_fixtures as rf
from kdplatform.report import render
from kdplatform.report.collect import collect_runs
from kdplatform.report.dashboards import BUILTIN_DASHBOARDS, dashboard_dirs, load_dashboards, parse_dashboard

REPO = Path(__file__).resolve().parents[1]
HAS_CHROMIUM = render.find_chromium() is not None


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return rf.cached_test_store(tmp_path_factory.mktemp("report-render"))


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_report_writes_page_tables_and_runs(store, tmp_path, capsys):
    out = tmp_path / "report"
    rc = render.report_command(rf.MAIN, None, None, str(out), "html,md,tex,csv", store["uri"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "report written" in stdout and "1 failed or killed run" in stdout
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert names == [".kdplatform-report", "index.html", "plotly.min.js", "runs.csv",
                     "tables/paper_table-accuracy.csv",
                     "tables/paper_table-accuracy.html", "tables/paper_table-accuracy.md",
                     "tables/paper_table-accuracy.tex", "tables/paper_table-final.csv",
                     "tables/paper_table-final.html", "tables/paper_table-final.md",
                     "tables/paper_table-final.tex"]
    page = (out / "index.html").read_text()
    # plotly.js once, from one shared file beside the page (the page is sized to the data); nothing loaded
    # from elsewhere
    assert "plotly.js v" not in page and page.count('<script type="text/javascript" src="plotly.min.js">') == 1
    assert "plotly.js v" in (out / "plotly.min.js").read_text()[:1000]
    assert not re.search(r"<(script|link|img)[^>]*(src|href)=\"(https?:)?//", page)
    assert "<link" not in page.split("</head>")[0]
    n_figs = page.count("Plotly.newPlot(")
    # 2 tasks x (ILD loss, pred score, pred KD loss, whole-run score, bits, size, heatmap, parallel)
    # + 3 stage-gap charts + the final-gap chart
    assert n_figs == 20
    assert page.count('class="figure"') == n_figs
    for anchor in ("paper_table", "overfitting", "quantization", "sweep_overview", "runs"):
        assert f'href="#{anchor}"' in page and f'id="{anchor}"' in page
    # a block without data is not drawn empty: listed once at the end, with why
    assert "Nothing to show" not in page and 'id="sweep_overview-param-importance"' not in page
    not_drawn = page.split('<section id="not-drawn">')[1]
    assert "Parameter importance (Optuna): no Optuna search" in not_drawn
    assert 'href="tables/paper_table-accuracy.tex"' in page
    assert "<strong>" not in page and "68.0 ± 2.0" in page
    assert len(_leftovers(tmp_path)) == 0
    runs = (out / "runs.csv").read_text().splitlines()
    assert len(runs) == 1 + len(rf.main_runs())


def test_runs_link_to_the_mlflow_ui_for_a_server(store):
    data = collect_runs(store["uri"], experiment=rf.MAIN)
    report = render.build_report(data, load_dashboards(["paper_table"]))
    assert "Runs are not linked" in render.render_html(report)
    data.tracking_uri = "http://bob:pw@mlflow.lab:5000"
    page = render.render_html(report)
    run = data.runs.iloc[0]
    assert f'href="http://mlflow.lab:5000/#/experiments/{run.experiment_id}/runs/{run.run_id}"' in page
    assert "pw@" not in page


@pytest.mark.skipif(not HAS_CHROMIUM, reason="no Chromium for kaleido static export")
def test_static_export_in_every_image_format(store, tmp_path):
    dash = tmp_path / "gaps.yaml"
    dash.write_text("title: Gaps\nitems:\n  - kind: gap_bars\n  - kind: accuracy_table\n    rows: [method]\n")
    out = tmp_path / "report"
    rc = render.report_command(rf.MAIN, None, [str(dash)], str(out), "all", store["uri"])
    assert rc == 0
    fig = out / "figures" / "gaps-final-gap-score"
    png, svg, pdf = (fig.with_suffix(f".{x}").read_bytes() for x in ("png", "svg", "pdf"))
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and pdf.startswith(b"%PDF-") and b"<svg" in svg[:500]
    Image = pytest.importorskip("PIL.Image", reason="Pillow decodes the PNG")
    im = Image.open(fig.with_suffix(".png"))
    assert im.size == (900, 520) and len(im.convert("RGB").getcolors(1 << 20)) > 50
    assert b"kdqat_unified" in svg  # the legend is real text in the SVG
    for ext in ("html", "md", "tex", "csv"):
        assert (out / "tables" / f"gaps-accuracy.{ext}").stat().st_size > 100
    page = (out / "index.html").read_text()
    assert 'href="figures/gaps-final-gap-score.pdf"' in page


def test_without_chromium_html_and_tables_are_still_written(store, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(render, "find_chromium", lambda: None)
    out = tmp_path / "report"
    rc = render.report_command(rf.MAIN, None, ["overfitting", "paper_table"], str(out), "html,png,svg,md",
                               store["uri"])
    assert rc == 0
    err = capsys.readouterr().err
    assert err.count("no Chromium found") == 1
    assert (out / "index.html").exists() and (out / "tables" / "paper_table-accuracy.md").exists()
    assert not (out / "figures").exists()
    assert "no Chromium found" in (out / "index.html").read_text()


@pytest.mark.parametrize("experiment, sweep, message", [
    ("nope", None, "experiment 'nope' not found"),
    (rf.EMPTY, None, "no student runs"),
    (rf.NODEV, None, "none has dev metrics"),
    (None, "0" * 32, "not found"),
    (None, None, "several experiments"),
])
def test_missing_data_exits_2_and_writes_nothing(store, tmp_path, capsys, experiment, sweep, message):
    out = tmp_path / "sub" / "report"
    rc = render.report_command(experiment, sweep, None, str(out), "html,csv", store["uri"])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "sub").exists()


def test_user_mistakes_exit_2(store, tmp_path, capsys):
    out = tmp_path / "r"
    assert render.report_command(rf.MAIN, None, None, str(out), "html,docx", store["uri"]) == 2
    assert "unknown --format docx" in capsys.readouterr().err
    assert render.report_command(rf.MAIN, None, ["no_such_page"], str(out), "html", store["uri"]) == 2
    assert "dashboard 'no_such_page' not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("title: Bad\nitems:\n  - kind: heatmapp\n")
    assert render.report_command(rf.MAIN, None, [str(bad)], str(out), "html", store["uri"]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "unknown kind 'heatmapp'" in err
    assert render.report_command(None, None, None, str(out), "html", f"sqlite:///{tmp_path}/none.db") == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "none.db").exists()


def test_an_existing_folder_is_replaced_only_if_it_is_a_report(store, tmp_path, capsys):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("precious")
    assert render.report_command(rf.MAIN, None, ["paper_table"], str(mine), "md", store["uri"]) == 2
    assert "not a kdplatform report folder" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["chapter1.tex"]

    out = tmp_path / "report"
    assert render.report_command(rf.MAIN, None, ["paper_table"], str(out), "md,csv", store["uri"]) == 0
    (out / "stale.txt").write_text("from an older report")
    assert render.report_command(rf.MAIN, None, ["paper_table"], str(out), "md", store["uri"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".kdplatform-report", "tables"]
    assert _leftovers(tmp_path) == []


def test_a_failure_while_writing_leaves_no_folder(store, tmp_path, monkeypatch):
    def boom(report):
        raise RuntimeError("disk full")

    monkeypatch.setattr(render, "render_html", boom)
    out = tmp_path / "deep" / "report"
    with pytest.raises(RuntimeError, match="disk full"):
        render.generate(store["uri"], out, experiment=rf.MAIN, dashboards=["paper_table"], formats="md,html")
    assert not out.exists() and not (tmp_path / "deep").exists()
    assert _leftovers(tmp_path) == []


def test_user_dashboard_with_filters(store, tmp_path):
    dash = tmp_path / "mine.yaml"
    dash.write_text("""
title: Last-layer methods on RTE
filters: {task: rte, method: [kd, "cr_*"]}
items:
  - kind: accuracy_table
    name: last_layer
  - kind: score_curves
    filters: {layer_map: last}
  - kind: bits
""")
    out = tmp_path / "report"
    assert render.report_command(rf.MAIN, None, [str(dash)], str(out), "html,csv", store["uri"]) == 0
    csv = (out / "tables" / "mine-last_layer.csv").read_text()
    assert set(re.findall(r"^(\w+),", csv, re.M)) == {"method", "kd", "cr_ild"}
    assert ",mrpc," not in csv
    page = (out / "index.html").read_text()
    assert page.count("Plotly.newPlot(") == 1
    assert "Score against weight bits: no quantized (QAT) runs" in page.split('<section id="not-drawn">')[1]
    assert 'id="mine-bits"' not in page
    assert "layer_map in last" in page


def test_dashboard_files_match_the_builtins_and_validate():
    folder = REPO / "dashboards"
    assert folder in dashboard_dirs() or Path.cwd() / "dashboards" in dashboard_dirs()
    for name, text in BUILTIN_DASHBOARDS.items():
        file = folder / f"{name}.yaml"
        assert parse_dashboard(file.read_text(), name, str(file)).model_dump(exclude={"source"}) == \
            parse_dashboard(text, name, "builtin").model_dump(exclude={"source"})
    names = [d.name for d in load_dashboards(None)]
    assert names[:4] == ["paper_table", "overfitting", "quantization", "sweep_overview"]


def test_default_store_comes_from_the_environment(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.chdir(tmp_path)
    assert render.report_command(rf.MAIN, None, ["paper_table"], "out", "md", None) == 0
    assert (tmp_path / "out" / "tables" / "paper_table-accuracy.md").exists()


@pytest.mark.slow
def test_the_report_never_imports_torch(store, tmp_path):
    code = f"""
import sys, json
from kdplatform.report.render import generate
generate({store['uri']!r}, {str(tmp_path / 'r')!r}, experiment={rf.MAIN!r}, formats="html,md")
print(json.dumps([m for m in sys.modules if m == "torch" or m.startswith(("torch.", "kdplatform.distill"))]))
"""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []


def test_a_cell_flagged_at_the_majority_level_still_gets_its_latex_table(tmp_path):
    """A cell at or below the majority-class level carries †, written `$\\dagger$` in LaTeX: the report with
    tex among its formats is written whole (exit 0), with the mark in the .tex table."""
    glue = rf.write_dev_tsv(tmp_path / "glue", ["not_entailment"] * 3 + ["entailment"])  # majority 75%
    params = {"data.glue_dir": str(glue)}
    uri, _, _ = rf.small_store(tmp_path, "flagged", [rf.SynthRun("rte", "kd", 42, 0.70, extra_params=params),
                                                     rf.SynthRun("rte", "pkd", 42, 0.80, extra_params=params)])
    out = tmp_path / "report"
    assert render.report_command("flagged", None, ["paper_table"], str(out), "html,tex,md,csv", uri) == 0
    tex = (out / "tables" / "paper_table-accuracy.tex").read_text()
    assert r"70.0 (1) $\dagger$" in tex and r"\textbf{80.0 (1)}" in tex and r"75.0 (1)" in tex
    assert "70.0 (1) †" in (out / "tables" / "paper_table-accuracy.md").read_text()
