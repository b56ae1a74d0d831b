"""Report statistics and reading paths, checked against independent computations on MLflow stores written
through the plain MLflow client (the values and tags the worker logs): the paired difference to the
baseline (scipy by hand), both ways of reading a store, stages, the teacher and majority references, and
the LaTeX table compiled by a real LaTeX."""

from __future__ import annotations

import re
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


def _compile_latex(table_tex: str, folder) -> None:
    """Compile the table in a minimal document with a real pdflatex; fails the test on any LaTeX error."""
    doc = ("\\documentclass{article}\n\\usepackage[T1]{fontenc}\n\\usepackage{booktabs}\n"
           "\\usepackage[margin=1cm,landscape]{geometry}\n\\begin{document}\n" + table_tex +
           "\n\\end{document}\n")
    (folder / "t.tex").write_text(doc, encoding="utf-8")
    res = subprocess.run([PDFLATEX, "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=folder,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:]
    assert (folder / "t.pdf").stat().st_size > 1000


@pytest.mark.skipif(PDFLATEX is None, reason="no LaTeX (Debian: apt-get install texlive-latex-recommended)")
def test_the_latex_table_compiles(data, tmp_path):
    table = accuracy_table(data)
    _compile_latex(table.to_latex(), tmp_path)
    assert "Method & &" not in table.to_latex()


@pytest.mark.skipif(PDFLATEX is None, reason="no LaTeX (Debian: apt-get install texlive-latex-recommended)")
def test_the_latex_table_with_a_flagged_cell_compiles(tmp_path):
    glue = rf.write_dev_tsv(tmp_path / "glue", ["not_entailment"] * 3 + ["entailment"])  # majority 75%
    params = {"data.glue_dir": str(glue)}
    uri, _, _ = rf.small_store(tmp_path, "flagged", [rf.SynthRun("rte", "kd", 42, 0.70, extra_params=params),
                                                     rf.SynthRun("rte", "pkd", 42, 0.80, extra_params=params)])
    tex = accuracy_table(C.collect_runs(uri, experiment="flagged")).to_latex()
    assert r"70.0 (1) $\dagger$" in tex
    _compile_latex(tex, tmp_path)


def _worker_dev_level(glue, task: str, n: int | None) -> float:
    """The majority share of the dev examples the worker scores a run on: its own loader and downsample
    with its fixed data seed (the exact call of `prepare_data`)."""
    from kdplatform.distill.data import DATA_SEED
    from kdplatform.distill.tasks import downsample, load_split

    labels = downsample(load_split(task, "dev", glue_dir=glue), n, DATA_SEED).labels
    return Counter(labels).most_common(1)[0][1] / len(labels)


def test_the_majority_level_is_that_of_the_downsampled_dev_set_the_runs_were_scored_on(glue_dir, tmp_path):
    """SST-2 runs scored on 128 dev examples: the level of those 128 (52.3), not of the 872 (50.9); a run
    at 51.6 lies above the full set's level but at or below its own, so it is flagged."""
    level = _worker_dev_level(glue_dir, "sst2", 128)
    full = _worker_dev_level(glue_dir, "sst2", None)
    assert f"{level * 100:.1f}" == "52.3" and f"{full * 100:.1f}" == "50.9"  # the bug's example
    params = {"data.glue_dir": str(glue_dir), "data.max_dev_examples": "128"}
    uri, _, _ = rf.small_store(tmp_path, "dev128", [rf.SynthRun("sst2", "kd", 42, 0.515625, extra_params=params),
                                                    rf.SynthRun("sst2", "pkd", 42, 0.60, extra_params=params)])
    data = C.collect_runs(uri, experiment="dev128")
    assert data.majority["sst2"] == pytest.approx(level, abs=1e-12)
    table = accuracy_table(data)
    refs = table.references.set_index("label")
    assert refs.loc["majority class", "mean"] == pytest.approx(level * 100)
    assert table.stats.set_index("method").loc["kd", "flag"]  # 51.6 <= 52.3 (but > 50.9)


def test_runs_scored_on_different_dev_subsets_get_no_majority_level_but_a_note(glue_dir, tmp_path):
    """Runs of one task scored on 64 and on 128 dev examples: no one level is right for both."""
    runs = [rf.SynthRun("sst2", "kd", seed, 0.515625, extra_params={"data.glue_dir": str(glue_dir),
                                                                    "data.max_dev_examples": n})
            for seed, n in ((42, "64"), (43, "128"))]
    uri, _, _ = rf.small_store(tmp_path, "mixed", runs)
    data = C.collect_runs(uri, experiment="mixed")
    assert "sst2" not in data.majority
    [note] = [n for n in data.notes if n.startswith("majority-class level not drawn for sst2")]
    for n in (64, 128):
        assert f"{n}: {_worker_dev_level(glue_dir, 'sst2', n) * 100:.1f}" in note
    assert not accuracy_table(data).stats.flag.any()


def test_the_teacher_row_is_the_final_teacher_the_students_were_distilled_from(tmp_path):
    """The fine-tune publishes its last model (kdp.dev_score = the last dev score): the teacher row and the
    teacher line show that score (62.0), not the run's best evaluation (66.0)."""
    uri, client, exp = rf.small_store(tmp_path, "teacher", [rf.SynthRun("rte", "kd", s, 0.6) for s in (42, 43)])
    rid = rf.log_teacher_run(client, exp, "rte", [0.60, 0.66, 0.62])
    assert client.get_run(rid).data.tags["kdp.dev_score"] == "0.6200"
    data = C.collect_runs(uri, experiment="teacher")
    table = accuracy_table(data)
    teacher = table.references.set_index("label").loc["teacher"]
    assert (teacher["mean"], teacher["n"]) == (pytest.approx(62.0), 1)
    md = table.to_markdown()
    assert re.search(r"\| teacher +\| 62\.0 \(1\) +\|", md)
    assert "final dev score of the teacher model the students were distilled from" in md
    fig = score_curves(data, ["method"])[0].fig
    [line] = [t for t in fig.data if t.meta and t.meta.get("kind") == "teacher"]
    assert list(line.y) == [pytest.approx(62.0)] * 2
