"""Report figures: the data behind each trace, checked against the synthetic runs' known values."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

import report_fixtures as rf
from kdplatform.report import figures as F
from kdplatform.report.collect import collect_runs

METHODS = ["kd", "pkd", "ild_last", "cr_ild", "ternarybert", "kdqat_unified"]  # in the platform's order


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return rf.cached_test_store(tmp_path_factory.mktemp("report-figures"))


@pytest.fixture(scope="module")
def data(store):
    return collect_runs(store["uri"], experiment=rf.MAIN)


def _specs(task, method, **axes):
    return [r for r in rf.main_runs() if r.task == task and r.method == method
            and all(getattr(r, k) == v for k, v in axes.items())]


def _lines(fig, split):
    return {t.meta["group"]: t for t in fig.data if isinstance(t.meta, dict) and t.meta.get("split") == split}


def test_score_curves_one_train_and_one_dev_line_per_method(data):
    figs = F.score_curves(data, ["method"])
    assert [f.name for f in figs] == ["curves-score-mrpc", "curves-score-rte"]
    fig = figs[1].fig
    dev, train = _lines(fig, "dev"), _lines(fig, "train")
    assert list(dev) == METHODS and list(train) == METHODS
    assert all(t.line.dash == "solid" for t in dev.values()) and all(t.line.dash == "dash" for t in train.values())
    # kd on RTE: dev curve = mean over the three seeds of each eval's dev score (x100)
    specs = _specs("rte", "kd")
    expected = np.mean([np.array(s.dev_scores()) * 100 for s in specs], axis=0)
    # one-stage kd is shifted right by the two-stage runs' ILD (4 evals every 50 steps): prediction KD
    # starts at the same x for every method
    assert list(dev["kd"].x) == [200 + 50 * (i + 1) for i in range(specs[0].n_points)]
    assert np.allclose(dev["kd"].y, expected)
    train_expected = np.mean([(np.array(s.dev_scores()) + np.array(s.gaps())) * 100 for s in specs], axis=0)
    assert np.allclose(train["kd"].y, train_expected)


def test_curves_of_a_group_with_several_configs_draw_its_best_config(data):
    fig = F.score_curves(data, ["method"])[1].fig
    cr = _lines(fig, "dev")["cr_ild"]
    specs = _specs("rte", "cr_ild", layer_map="last", consistency_weight="0.1")  # best mean on RTE (68.0)
    assert np.allclose(cr.y, np.mean([np.array(s.dev_scores()) * 100 for s in specs], axis=0))
    # a two-stage method logs task metrics only in its prediction stage
    assert list(cr.x) == [50 * (i + 1) for i in range(specs[0].n_points // 2, specs[0].n_points)]
    assert "w=0.1" in cr.hovertemplate or "CR weight=0.1" in cr.hovertemplate


def test_curves_grouped_by_more_axes(data):
    fig = F.score_curves(data, ["method", "layer_map", "consistency_weight"])[1].fig
    groups = list(_lines(fig, "dev"))
    assert "cr_ild map=last w=0.1" in groups and "cr_ild map=uniform w=0.5" in groups
    assert len(groups) == 9


def test_distill_loss_curves(data):
    figs = F.distill_loss_curves(data, ["method"])
    fig = figs[1].fig
    dev, train = _lines(fig, "dev"), _lines(fig, "train")
    assert list(dev) == METHODS
    specs = _specs("rte", "kd")
    n = specs[0].n_points
    tr = np.mean([[1.0 / (1 + 0.1 * i) + 0.01 * (s.seed - 42) for i in range(n)] for s in specs], axis=0)
    assert np.allclose(train["kd"].y, tr)
    assert np.allclose(dev["kd"].y, tr + 0.02 * np.arange(n))


def test_gap_bars_hold_the_final_gap_per_method_and_task(data):
    [fig] = F.gap_bars(data, ["method"], "score")
    bars = {t.name: t for t in fig.fig.data}
    assert list(bars) == METHODS
    for method, bar in bars.items():
        assert list(bar.x) == ["MRPC", "RTE"]
        for task, mean, err in zip(("mrpc", "rte"), bar.y, bar.error_y.array):
            specs = _specs(task, method)
            if method == "cr_ild":  # the best config of the task
                specs = _specs(task, method, layer_map="last", consistency_weight="0.1" if task == "rte" else "0.5")
            if method in rf.QAT_METHODS:  # 8 bits is the best of 2, 4, 8
                specs = _specs(task, method, bits="8")
            gaps = [rf.final_gap(method, s.seed) * 100 for s in specs]
            assert mean == pytest.approx(statistics.mean(gaps))
            assert err == pytest.approx(statistics.stdev(gaps))
    assert bars["kd"].y[1] == pytest.approx(6.0)  # seeds 42..44: gaps 5, 6, 7 points


def test_gap_bars_of_the_distillation_loss(data):
    [fig] = F.gap_bars(data, ["method"], "distill_loss")
    kd = next(t for t in fig.fig.data if t.name == "kd")
    n = _specs("rte", "kd")[0].n_points
    assert kd.y[1] == pytest.approx(0.02 * (n - 1))  # dev - train at the last eval


def test_bits_and_size_figures(data):
    figs = F.bits_figures(data, "bits")
    assert [f.name for f in figs] == ["bits-mrpc", "bits-rte"]
    lines = {t.name: t for t in figs[1].fig.data}
    assert list(lines) == ["ternarybert", "kdqat_unified"]
    assert list(lines["ternarybert"].x) == [2, 4, 8]
    assert list(lines["ternarybert"].y) == pytest.approx([56.0, 61.0, 63.0])
    assert list(lines["kdqat_unified"].y) == pytest.approx([59.0, 63.0, statistics.mean([64, 64, 65])])
    size = {t.name: t for t in F.bits_figures(data, "size")[1].fig.data}
    assert list(size["kdqat_unified"].x) == [6.0, 11.0, 22.0]


def test_heatmap_of_consistency_weight_by_layer_map(data):
    figs = F.heatmaps(data, "consistency_weight", "layer_map")
    assert [f.name for f in figs] == ["heatmap-mrpc-cr_ild", "heatmap-rte-cr_ild"]
    hm = figs[1].fig.data[0]
    assert list(hm.x) == ["0.1", "0.5"] and list(hm.y) == ["uniform", "last"]
    assert np.allclose(hm.z, [[63.0, 62.0], [68.0, 66.0]])


def test_parallel_coordinates(data):
    figs = F.parallel_coordinates(data)
    pc = figs[1].fig.data[0]
    labels = [d.label for d in pc.dimensions]
    assert labels == ["Method", "Layer map", "CR weight", "W bits", "A bits", "best dev score (x100)"]
    n_rte = int((data.runs.task == "rte").sum())
    assert all(len(d["values"]) == n_rte for d in pc.dimensions)
    method = pc.dimensions[0]
    assert list(method.ticktext) == METHODS


def test_param_importance_only_with_optuna(store, data):
    with pytest.raises(F.NoData, match="Optuna"):
        F.param_importance(data)
    opt = collect_runs(store["uri"], experiment=rf.OPTUNA)
    [fig] = F.param_importance(opt)
    bar = fig.fig.data[0]
    assert sorted(bar.y) == ["consistency_weight", "train.pred.lr"]
    assert sum(bar.x) == pytest.approx(1.0)
    [pc] = F.parallel_coordinates(opt)
    assert [d.label for d in pc.fig.data[0].dimensions] == ["CR weight", "train.pred.lr", "best dev score (x100)"]


def test_no_data_is_reported_not_drawn(data):
    kd_only = data.subset(data.runs.method == "kd")
    with pytest.raises(F.NoData, match="quantized"):
        F.bits_figures(kd_only)
    with pytest.raises(F.NoData):
        F.heatmaps(kd_only)
