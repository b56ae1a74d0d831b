"""Report statistics and reading paths, checked against independent computations on MLflow stores written
through the plain MLflow client (the values and tags the worker logs): the paired difference to the
baseline (scipy by hand), both ways of reading a store, stages, the teacher and majority references, and
the LaTeX table compiled by a real LaTeX."""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

import report_fixtures as rf
from kdplatform.report import collect as C
from kdplatform.report.figures import distill_loss_curves, score_curves, stage_curves, stage_gap_bars
from kdplatform.report.reference import dev_labels, majority_levels
from kdplatform.report.stages import staged_history
from kdplatform.report.tables import accuracy_table


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return rf.cached_test_store(tmp_path_factory.mktemp("report-stats"))


@pytest.fixture(scope="module")
def data(store):
    return C.collect_runs(store["uri"], experiment=rf.MAIN)


def _best_dev_by_seed(client: MlflowClient, experiment_id: str, task: str, method: str, **axes) -> dict:
    """{seed: max dev/score} of finished runs read back with the plain client (the latest run per seed)."""
    flt = f"tags.`kdp.role` = 'student' and params.task = '{task}' and params.method = '{method}'"
    for k, v in axes.items():
        flt += f" and params.{k} = '{v}'"
    out = {}
    runs = client.search_runs([experiment_id], flt, order_by=["attributes.start_time ASC"])
    for r in runs:
        if r.info.status == "FINISHED":
            out[int(r.data.params["seed"])] = max(m.value for m in client.get_metric_history(r.info.run_id,
                                                                                           "dev/score"))
    return out


def test_paired_difference_to_the_baseline_matches_scipy_by_hand(store, data):
    client = MlflowClient(store["uri"])
    base = _best_dev_by_seed(client, store["main_experiment_id"], "rte", "kd")
    other = _best_dev_by_seed(client, store["main_experiment_id"], "rte", "cr_ild", layer_map="last",
                              consistency_weight="0.5")
    seeds = sorted(base)
    assert seeds == sorted(other) and len(seeds) == 3
    a = np.array([other[s] for s in seeds]) * 100
    b = np.array([base[s] for s in seeds]) * 100
    d = a - b
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))  # t interval from the formula
    table = accuracy_table(data, baseline="kd")
    row = table.diffs.set_index(["method", "layer_map", "consistency_weight", "bits", "task"]).loc[
        ("cr_ild", "last", "0.5", "32", "rte")]
    assert row["paired"] and row["pairs"] == 3
    assert row["diff"] == pytest.approx(d.mean(), abs=1e-9)
    assert (row["low"], row["high"]) == (pytest.approx(d.mean() - half, abs=1e-9),
                                         pytest.approx(d.mean() + half, abs=1e-9))
    assert row["significant"] == bool(d.mean() - half > 0 or d.mean() + half < 0)
    shown = table.diff_frame("-")
    cell = shown[(shown.Method == "cr_ild") & (shown["CR weight"] == "0.5") & (shown["Layer map"] == "last")].RTE
    mark = "*" if row["significant"] else ""
    assert cell.iloc[0] == f"{d.mean():+.1f}{mark} [{d.mean() - half:+.1f}, {d.mean() + half:+.1f}] (3)"


def test_no_baseline_no_difference_table(data):
    table = accuracy_table(data, baseline=None)
    assert table.diff_frame() is None and "Difference" not in table.to_markdown()


def test_fast_path_and_public_api_read_the_same(store):
    fast = C.collect_runs(store["uri"], experiment=rf.MAIN)
    api = C.collect_runs(store["uri"], experiment=rf.MAIN, sql=False)
    a = api.runs.sort_values("run_id").reset_index(drop=True)
    b = fast.runs.sort_values("run_id").reset_index(drop=True)
    assert sorted(a.columns) == sorted(b.columns)
    import pandas as pd

    pd.testing.assert_frame_equal(a[sorted(b.columns)], b[sorted(b.columns)])
    key = ["run_id", "key", "step"]
    pd.testing.assert_frame_equal(api.history.sort_values(key).reset_index(drop=True),
                                  fast.history.sort_values(key).reset_index(drop=True))
    pd.testing.assert_frame_equal(api.teachers, fast.teachers)


def test_fast_path_only_for_checked_mlflow_versions():
    import mlflow

    assert C.sql_fast_path_supported("3.10.0") and C.sql_fast_path_supported("3.17.2")
    assert not C.sql_fast_path_supported("3.18.0") and not C.sql_fast_path_supported("2.22.0")
    assert not C.sql_fast_path_supported("not-a-version")
    client = MlflowClient("sqlite:////tmp/unused-kdp-report.db")
    assert (C._sql_engine(client) is not None) == C.sql_fast_path_supported(mlflow.__version__)


def test_stages_align_by_kind_with_the_step_within_the_stage(data):
    h = staged_history(data, "dev/distill_loss")
    run = data.runs[data.runs.run_name == "rte/cr_ild/last/w0.1/b32/s42"].iloc[0]
    spec = {r.run_name: r for r in rf.main_runs()}[run.run_name]  # 8 evals every 50 steps, 4 per stage
    mine = h[h.run_id == run.run_id].sort_values("step")
    assert list(mine.kind) == ["ild"] * 4 + ["pred"] * 4
    assert list(mine.stage_step) == [50, 100, 150, 200, 50, 100, 150, 200]
    assert spec.n_points == 8
    kd = data.runs[data.runs.run_name == "rte/kd/b32/s42"].iloc[0]
    assert set(h[h.run_id == kd.run_id].kind) == {"pred"}  # one-stage kd lines up with the prediction stage


def test_stage_figures_ild_loss_alone_boundaries_teacher_and_majority(data):
    figs = {f.name: f for f in stage_curves(data, ["method"])}
    ild = figs["ild-loss-rte"].fig
    groups = {t.meta["group"] for t in ild.data if t.meta and "split" in t.meta}
    assert "kd" not in groups and {"ild_last", "cr_ild"} <= groups  # kd has no ILD stage
    assert {t.meta["split"] for t in ild.data if t.meta and "split" in t.meta} == {"train", "dev"}
    assert ild.layout.xaxis.title.text == "step within the ILD stage"
    whole = {f.name: f for f in score_curves(data, ["method"])}["curves-score-rte"].fig
    assert [s.x0 for s in whole.layout.shapes] == [200.0]  # ILD ends at global step 200 in the fixture
    teacher = [t for t in whole.data if t.meta and t.meta.get("kind") == "teacher"]
    assert len(teacher) == 1 and teacher[0].y[0] == pytest.approx(99.0)
    if "rte" in data.majority:
        level = [t for t in whole.data if t.meta and t.meta.get("kind") == "majority"][0]
        assert level.y[0] == pytest.approx(data.majority["rte"] * 100)
    gaps = {f.name: f.fig for f in stage_gap_bars(data, ["method"])}
    assert {"stage-gap-ild-distill_loss", "stage-gap-pred-score"} <= set(gaps)


def test_whole_run_view_starts_every_prediction_stage_at_the_boundary(store, data):
    """One-stage kd is drawn right of the ILD | prediction KD line, shifted by the others' ILD length."""
    client = MlflowClient(store["uri"])
    by_name = {r.run_name: r.run_id for r in data.runs.itertuples()}
    stage = client.get_metric_history(by_name["rte/cr_ild/last/w0.1/b32/s42"], "stage")
    ild_end = max(m.step for m in stage if m.value == 0)  # the prediction stage starts after this eval
    kd_steps = sorted({m.step for m in client.get_metric_history(by_name["rte/kd/b32/s42"], "dev/score")})
    for fig in (score_curves(data, ["method"])[0].fig, distill_loss_curves(data, ["method"])[0].fig):
        assert [s.x0 for s in fig.layout.shapes] == [ild_end]
        assert "prediction KD starts" in fig.layout.xaxis.title.text
        curves = [t for t in fig.data if t.meta and "split" in t.meta]
        kd_dev = [t for t in curves if t.meta["group"] == "kd" and t.meta["split"] == "dev"][0]
        assert list(kd_dev.x) == [s + ild_end for s in kd_steps] and min(kd_dev.x) > ild_end
    cr_ild = [t for t in fig.data if t.meta and t.meta.get("group") == "cr_ild" and t.meta.get("split") == "dev"]
    assert min(cr_ild[0].x) < ild_end < max(cr_ild[0].x)  # two-stage runs keep their global steps


def test_majority_level_is_read_from_the_dev_labels(tmp_path):
    (tmp_path / "RTE").mkdir()
    rows = ["index\tsentence1\tsentence2\tlabel"] + [f"{i}\ta\tb\tnot_entailment" for i in range(3)] + \
        ["9\ta\tb\tentailment"]
    (tmp_path / "RTE" / "dev.tsv").write_text("\n".join(rows) + "\n")
    import pandas as pd

    runs = pd.DataFrame({"task": ["rte", "wnli"], "params.data.glue_dir": [str(tmp_path), str(tmp_path)]})
    levels, notes = majority_levels(runs)
    assert levels == {"rte": 0.75} and "wnli" in notes[0]
    assert Counter(dev_labels("rte", tmp_path)) == {"not_entailment": 3, "entailment": 1}


PDFLATEX = shutil.which("pdflatex")


@pytest.mark.skipif(PDFLATEX is None, reason="no LaTeX (Debian: apt-get install texlive-latex-recommended)")
def test_the_latex_table_compiles(data, tmp_path):
    table = accuracy_table(data)
    doc = ("\\documentclass{article}\n\\usepackage[T1]{fontenc}\n\\usepackage{booktabs}\n"
           "\\usepackage[margin=1cm,landscape]{geometry}\n\\begin{document}\n" + table.to_latex() +
           "\n\\end{document}\n")
    (tmp_path / "t.tex").write_text(doc, encoding="utf-8")
    res = subprocess.run([PDFLATEX, "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:]
    assert (tmp_path / "t.pdf").stat().st_size > 1000
    assert "Method & &" not in table.to_latex()
