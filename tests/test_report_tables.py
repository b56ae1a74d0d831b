"""Report layer: collecting runs from MLflow and the paper accuracy table, checked against known values."""

from __future__ import annotations

import io
import statistics

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import report_fixtures as rf
from kdplatform.report import collect as C
from kdplatform.report.collect import ReportData, ReportError, collect_runs
from kdplatform.report.tables import accuracy_table, auto_rows


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return rf.cached_test_store(tmp_path_factory.mktemp("report-tables"))


@pytest.fixture(scope="module")
def data(store):
    return collect_runs(store["uri"], experiment=rf.MAIN)


def expected_cells() -> dict[tuple, tuple[float, float, int]]:
    """(method, layer_map, weight, bits, task) -> (mean, std, n) of best dev score x100 over seeds."""
    out = {}
    for (method, lmap, w, bits), per_task in rf.KNOWN.items():
        for task, scores in per_task.items():
            vals = [s * 100 for s in scores if s is not None]
            out[(method, lmap, w, bits, task)] = (statistics.mean(vals), statistics.stdev(vals), len(vals))
    return out


# --------------------------------------------------------------------------------------------- collect
def test_collect_keeps_only_finished_student_runs(store, data):
    expected = {r.run_name for r in rf.main_runs()}
    assert set(data.runs.run_name) == expected
    assert len(data.runs) == len(expected)  # no teacher, no FAILED run, the older duplicate left out
    assert store["stale_duplicate"] not in set(data.runs.run_id)
    assert not any("teacher" in n for n in data.runs.run_name)
    assert any("failed" in n for n in data.notes) and any("older" in n for n in data.notes)
    assert data.experiments == {store["main_experiment_id"]: rf.MAIN}


def test_best_score_is_the_max_of_dev_score_not_the_last(data):
    specs = {r.run_name: r for r in rf.main_runs()}
    for row in data.runs.itertuples():
        spec = specs[row.run_name]
        assert row.best_score == pytest.approx(spec.best, abs=1e-12)
        last = data.history[(data.history.run_id == row.run_id) & (data.history.key == "dev/score")]
        assert last.sort_values("step").value.iloc[-1] < row.best_score  # the fixture peaks before the end


def test_histories_hold_every_eval_point(data):
    spec = {r.run_name: r for r in rf.main_runs()}
    run = data.runs[data.runs.run_name == "rte/cr_ild/last/w0.1/b32/s42"].iloc[0]
    h = data.history[data.history.run_id == run.run_id]
    s = spec[run.run_name]
    # two-stage method: distill loss at every eval, task metrics only in the prediction stage
    assert h[h.key == "train/distill_loss"].step.tolist() == [50 * (i + 1) for i in range(s.n_points)]
    assert h[h.key == "dev/score"].step.tolist() == [50 * (i + 1) for i in range(s.n_points // 2, s.n_points)]
    assert h[h.key == "dev/score"].value.tolist() == pytest.approx(s.dev_scores())


def test_sql_reads_the_same_as_the_mlflow_api(store, data):
    """The direct SQL path (database stores) and the API path (search_runs + get_metric_history, as for a
    server) give identical frames."""
    api = collect_runs(store["uri"], experiment=rf.MAIN, sql=False)
    a = data.runs.sort_values("run_id").reset_index(drop=True)
    b = api.runs.sort_values("run_id").reset_index(drop=True)
    assert sorted(a.columns) == sorted(b.columns)
    pd.testing.assert_frame_equal(a[sorted(a.columns)], b[sorted(a.columns)])
    key = ["run_id", "key", "step"]
    pd.testing.assert_frame_equal(data.history.sort_values(key).reset_index(drop=True),
                                  api.history.sort_values(key).reset_index(drop=True))
    assert {"metrics.model/size_mb", "params.train.pred.lr"} <= set(a.columns)


def test_collect_by_sweep_and_optuna_axes(store):
    by_sweep = collect_runs(store["uri"], sweep=store["main_sweep"])
    assert len(by_sweep.runs) == len(rf.main_runs())
    assert by_sweep.search_axes == []
    opt = collect_runs(store["uri"], sweep=store["optuna_sweep"])
    assert opt.search_axes == ["consistency_weight", "train.pred.lr"]
    assert len(opt.runs) == len(rf.OPTUNA_TRIALS)


@pytest.mark.parametrize("kwargs, message", [
    ({"experiment": "nope"}, "experiment 'nope' not found"),
    ({"experiment": rf.EMPTY}, "no student runs"),
    ({"experiment": rf.NODEV}, "none has dev metrics"),
    ({"sweep": "0123456789abcdef"}, "sweep run '0123456789abcdef' not found"),
    ({}, "several experiments"),
])
def test_missing_data_raises_a_clear_error(store, kwargs, message):
    with pytest.raises(ReportError, match=message):
        collect_runs(store["uri"], **kwargs)


def test_a_student_run_is_not_a_sweep(store, data):
    with pytest.raises(ReportError, match="not a sweep"):
        collect_runs(store["uri"], sweep=data.runs.run_id.iloc[0])


def test_missing_sqlite_file_is_not_created(tmp_path):
    uri = f"sqlite:///{tmp_path / 'none.db'}"
    with pytest.raises(ReportError, match="no MLflow store"):
        collect_runs(uri)
    assert not (tmp_path / "none.db").exists()


def test_a_task_whose_teacher_run_is_not_in_the_store_gets_a_note(data):
    """The fixture store holds a finished teacher run for rte's teacher hash, none for mrpc's (as when a
    sweep takes its teacher from the teacher cache into a new store): the row is left out with a note."""
    refs = accuracy_table(data).references
    assert refs[refs.label == "teacher"].task.tolist() == ["rte"]
    [note] = [n for n in data.notes if n.startswith("teacher row not drawn")]
    assert note.startswith("teacher row not drawn for mrpc: no finished teacher run")
    assert "teacher cache" in note and "rte" not in note


def test_a_ready_teacher_checkpoint_gets_its_own_teacher_note(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("ready")
    for seed in (42, 43):
        rf.log_run(client, exp, rf.SynthRun("rte", "kd", seed, 0.6,
                                            extra_params={"teacher.checkpoint": "/models/bert-rte"}))
    got = collect_runs(uri, experiment="ready")
    [note] = [n for n in got.notes if n.startswith("teacher row not drawn")]
    assert note.startswith("teacher row not drawn for rte: the teacher is a ready checkpoint (teacher.checkpoint)")


def test_ui_links_only_for_a_server():
    assert C.ui_base_url("sqlite:////x/mlflow.db") is None
    assert C.ui_base_url("http://alice:secret@mlflow.lab:5000/") == "http://mlflow.lab:5000"
    assert C.run_url("http://h:5000", "3", "abc") == "http://h:5000/#/experiments/3/runs/abc"


# ------------------------------------------------------------------------------------------------ table
def test_table_numbers_are_exact(data):
    table = accuracy_table(data)
    assert table.rows == ["method", "layer_map", "consistency_weight", "bits"]  # act_bits follows bits
    assert table.tasks == ["mrpc", "rte"]
    stats = table.stats[table.stats.task != "avg"]
    expected = expected_cells()
    assert len(stats) == len(expected)
    for r in stats.itertuples():
        mean, std, n = expected[(r.method, r.layer_map, r.consistency_weight, r.bits, r.task)]
        assert r.mean == pytest.approx(mean, abs=1e-9)
        assert r.std == pytest.approx(std, abs=1e-9)
        assert r.n == n
    assert stats.set_index(["method", "bits", "task"]).loc[("pkd", "32", "mrpc"), "n"] == 2


def test_average_column_and_bold_cells(data):
    table = accuracy_table(data)
    s = table.stats
    avg = s[s.task == "avg"].set_index(["method", "layer_map", "consistency_weight", "bits"])["mean"]
    expected = expected_cells()
    for key, value in avg.items():
        assert value == pytest.approx((expected[(*key, "mrpc")][0] + expected[(*key, "rte")][0]) / 2, abs=1e-9)
    bold = s[s.bold].set_index("task")
    assert sorted(bold.index) == ["avg", "mrpc", "rte"]
    assert tuple(bold.loc["rte", ["method", "layer_map", "consistency_weight"]]) == ("cr_ild", "last", "0.1")
    assert tuple(bold.loc["mrpc", ["method", "layer_map", "consistency_weight"]]) == ("cr_ild", "last", "0.5")
    assert tuple(bold.loc["avg", ["method", "layer_map", "consistency_weight"]]) == ("cr_ild", "last", "0.1")
    assert bold.loc["avg", "mean"] == pytest.approx(77.0)


def test_ties_at_the_shown_precision_are_all_bold():
    runs = pd.DataFrame({"run_id": ["a", "b"], "task": ["rte", "rte"], "seed": [42, 42],
                         "method": ["kd", "pkd"], "best_score": [0.70004, 0.69996]})
    for col in C.CONFIG_AXES[1:]:
        runs[col] = ""
    data = ReportData(runs, pd.DataFrame(columns=["run_id", "key", "step", "value"]), "sqlite://", {})
    table = accuracy_table(data)
    assert table.stats.bold.all()  # both show as 70.0


def test_table_text_formats(data):
    table = accuracy_table(data)
    md = table.to_markdown()
    assert "**68.0 ± 2.0 (3)**" in md and "**87.0 ± 1.0 (3)**" in md and "**77.0 (3)**" in md
    assert "| 62.0 ± 2.0 (3)" in md and "84.0 ± 1.4 (2)" in md  # kd on RTE; pkd has 2 seeds on MRPC
    assert "How to read" in md and "Difference to kd" in md
    tex = table.to_latex()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert tex.count(rule) == 1
    assert r"\textbf{68.0 $\pm$ 2.0 (3)}" in tex and r"\textbf{77.0 (3)}" in tex and r"cr\_ild" in tex
    assert tex.count(r"\textbf") == 3
    header = [line for line in tex.splitlines() if line.startswith("Method")]
    assert header == [r"Method & Layer map & CR weight & W bits & MRPC & RTE & Avg \\"]  # one header row
    assert "Method & &" not in tex
    html = table.to_html()
    assert html.count("font-weight: bold") == 1
    style = html.split("</style>")[0]
    assert style.count("#T_") == 3  # the three bold cells are the only styled ones
    assert "68.0 ± 2.0 (3)" in html and "How to read" in html
    csv = pd.read_csv(io.StringIO(table.to_csv()), dtype={"bits": str, "consistency_weight": str})
    assert list(csv.columns)[:11] == ["method", "layer_map", "consistency_weight", "bits", "task", "mean", "std",
                                      "n", "bold", "flag", "n_configs"]
    row = csv[(csv.method == "kd") & (csv.task == "rte")].iloc[0]
    assert (row["mean"], row["std"], row["n"]) == (pytest.approx(62.0), pytest.approx(2.0), 3)
    assert csv.bold.sum() == 3


def test_the_final_table_says_it_shows_the_last_score_and_has_no_reference_rows(data):
    best, final = accuracy_table(data), accuracy_table(data, value="final", baseline=None)
    assert len(best.references) and final.references is None  # the reference rows are in the best table only
    for text in (final.to_markdown(), final.to_html(), final.to_latex()):
        assert "How to read: last dev score of each run" in text and "best dev score" not in text
        assert "the teacher and majority-class rows are references" not in text
        assert "reference rows are in the best-score table only" in text
    for text in (best.to_markdown(), best.to_html()):  # the best-score table keeps its caption
        assert ("How to read: best dev score of each run, mean ± std over seeds (x100), (n) = number of seeds, "
                "no std where n = 1; bold = best student per column; † = at or below the majority-class level "
                "(the score of always predicting the most frequent dev label); the teacher and majority-class "
                "rows are references (teacher: the final dev score of the teacher model the students were "
                "distilled from).") in text


def test_single_seed_cells_show_no_std_and_runs_at_the_majority_level_are_flagged_not_bold():
    runs = pd.DataFrame({"run_id": ["a", "b", "c"], "task": ["rte"] * 3, "seed": [42, 42, 43],
                         "method": ["kd", "pkd", "pkd"], "best_score": [0.50, 0.52, 0.55]})
    for col in C.CONFIG_AXES[1:]:
        runs[col] = ""
    data = ReportData(runs, pd.DataFrame(columns=["run_id", "key", "step", "value"]), "sqlite://", {},
                      majority={"rte": 0.5270758})
    table = accuracy_table(data)
    s = table.stats.set_index("method")
    assert bool(s.loc["kd", "flag"]) and not s.loc["kd", "bold"]  # 50.0 <= 52.7
    assert not s.loc["pkd", "flag"] and s.loc["pkd", "bold"]  # 53.5 > 52.7
    md = table.to_markdown()
    assert "| 50.0 (1) †" in md and "53.5 ± 2.1 (2)" in md and "52.7 (1)" in md  # majority row
    # kd ran only seed 42, pkd seeds 42 and 43: not paired, and no interval below 2 seeds a side
    d = table.diffs.set_index("method").loc["pkd"]
    assert not d.paired and pd.isna(d.low) and d["diff"] == pytest.approx(3.5)


def test_rows_by_method_show_the_best_config(data):
    table = accuracy_table(data, rows=["method"])
    s = table.stats.set_index(["method", "task"])
    assert s.loc[("cr_ild", "rte"), "mean"] == pytest.approx(68.0)  # last map, w=0.1
    assert s.loc[("cr_ild", "mrpc"), "mean"] == pytest.approx(87.0)  # last map, w=0.5
    assert s.loc[("cr_ild", "rte"), "n_configs"] == 4
    assert s.loc[("ternarybert", "rte"), "mean"] == pytest.approx(63.0)  # 8 bits
    assert "Layer map" not in table.to_markdown()


def test_an_optuna_search_shows_its_best_trial(store):
    opt = collect_runs(store["uri"], experiment=rf.OPTUNA)
    table = accuracy_table(opt)
    assert table.rows == ["method"]  # searched params are not rows
    [row] = table.stats.to_dict("records")
    assert (row["method"], row["mean"], row["n"], row["n_configs"]) == ("cr_ild", pytest.approx(72.0), 1, 10)


def test_auto_rows_find_dotted_grid_axes_but_not_seeds_or_per_run_values():
    rows = []
    for n_train in ("1000", "2000"):
        for seed in (42, 43):
            rows.append({"run_id": f"{n_train}-{seed}", "task": "rte", "seed": seed, "method": "kd",
                         "params.data.max_train_examples": n_train, "params.train.seed": str(seed),
                         "params.output_dir": f"/tmp/{n_train}-{seed}", "params.train.pred.lr": "3e-05"})
    runs = pd.DataFrame(rows)
    for col in C.CONFIG_AXES[1:]:
        runs[col] = ""
    assert auto_rows(runs) == ["method", "params.data.max_train_examples"]


def _two_bit_grid(root, seeds: tuple[int, ...]) -> ReportData:
    """kdqat_output over student.two_bit [ternary, uniform] x `seeds`, logged as the worker does: each trial
    with its own cfg_hash and run_suffix (identity params, never axes); the score tells the config apart."""
    runs = []
    for two_bit, best in (("ternary", 0.60), ("uniform", 0.70)):
        for seed in seeds:
            ident = {"cfg_hash": f"{two_bit}-{seed}", "run_suffix": f"student.two_bit={two_bit}"}
            runs.append(rf.SynthRun("rte", "kdqat_output", seed, best + 0.01 * (seed - 42), bits="2", act_bits="8",
                                    extra_params={"student.two_bit": two_bit, **ident}))
    uri, _, _ = rf.small_store(root, "two_bit", runs)
    return collect_runs(uri, experiment="two_bit")


@pytest.mark.parametrize("seeds", [(42,), (42, 43)])
def test_a_grid_axis_keeps_its_configs_apart_with_one_seed_or_several(tmp_path, seeds):
    """Two configs of one seed each are two rows of n = 1, not one row averaged as if they were seeds; with
    several seeds each config is a row of n = number of its seeds."""
    table = accuracy_table(_two_bit_grid(tmp_path, seeds))
    assert table.rows == ["method", "params.student.two_bit"]
    cells = table.stats.set_index("params.student.two_bit")
    assert sorted(cells.index) == ["ternary", "uniform"]
    for two_bit, best in (("ternary", 60.0), ("uniform", 70.0)):
        assert cells.loc[two_bit, "n"] == len(seeds) and cells.loc[two_bit, "n_configs"] == 1
        assert cells.loc[two_bit, "mean"] == pytest.approx(statistics.mean(best + s - 42 for s in seeds))
    csv = pd.read_csv(io.StringIO(table.to_csv()))
    assert list(csv.n) == [len(seeds)] * 2
