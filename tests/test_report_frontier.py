"""The frontier page: one point per student config (mean over seeds of the best dev score and of the
measured cost), and a drawn Pareto front that is exactly the non-dominated set, computed here by brute force
over every pair of points."""

from __future__ import annotations


import numpy as np
import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from report_fixtures import SynthRun, log_run, log_teacher_run


def brute_force_front(costs, scores) -> set[int]:
    """Indices no other point dominates (cost <= and score >= with one strict), from the definition."""
    n = len(costs)
    return {i for i in range(n) if not any(
        costs[j] <= costs[i] and scores[j] >= scores[i] and (costs[j] < costs[i] or scores[j] > scores[i])
        for j in range(n) if j != i)}


def test_pareto_front_is_the_non_dominated_set_on_random_points_with_ties():
    from kdplatform.report.frontier import pareto_front

    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 25))
        # small integer grids force equal costs, equal scores and exact duplicates
        costs, scores = rng.integers(0, 6, n).astype(float), rng.integers(0, 6, n).astype(float)
        got = set(np.flatnonzero(pareto_front(costs, scores)))
        assert got == brute_force_front(costs, scores), (trial, costs, scores)


# depth, bits, act_bits, best scores over seeds, latency per seed, size
CONFIGS = [("2", "32", "32", [0.80, 0.82], [2.0, 2.2], 20.0), ("2", "2", "8", [0.78, 0.76], [1.6, 1.8], 15.0),
           ("4", "32", "32", [0.86, 0.84], [4.0, 4.4], 24.0), ("4", "2", "8", [0.81, 0.83], [3.0, 3.0], 16.0),
           ("6", "32", "32", [0.85, 0.85], [6.0, 6.2], 28.0), ("6", "8", "8", [0.87, 0.85], [5.0, 5.0], 18.0),
           ("3", "4", "8", [0.70, 0.72], [2.5, 2.5], 15.5)]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("frontier")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("frontier")
    for depth, bits, act, bests, lats, size in CONFIGS:
        for seed, (best, lat) in enumerate(zip(bests, lats), start=42):
            rid = log_run(c, exp, SynthRun("sst2", "kd", seed, best, bits=bits, act_bits=act,
                                           extra_params={"student_layers": depth}))
            c.log_batch(rid, metrics=[Metric("deploy/onnx_int8/latency_p50_ms", lat, 0, 0),
                                      Metric("deploy/onnx_int8/size_mb", size, 0, 0)])
    log_run(c, exp, SynthRun("sst2", "kd", 42, 0.5, extra_params={"student_layers": "1"}))  # not benched
    log_teacher_run(c, exp, "sst2", [0.88, 0.90])
    return uri


def _frontier_report(uri: str):
    from kdplatform.report.collect import collect_runs
    from kdplatform.report.dashboards import load_dashboard
    from kdplatform.report.render import build_report

    return build_report(collect_runs(uri, experiment="frontier"), [load_dashboard("frontier")])


def test_drawn_front_is_exactly_the_non_dominated_configs(store):
    section = _frontier_report(store).sections[0]
    latency_fig, latency_table, size_fig, size_table = section.blocks
    for block, table, cost_index in ((latency_fig, latency_table, 4), (size_fig, size_table, 5)):
        assert not block.note, block.note
        fig = block.figures[0].fig
        points = [(x, y) for t in fig.data if t.name != "Pareto front" for x, y in zip(t.x, t.y)]
        # one point per config: the mean over its two seeds, computed here
        expected = sorted((float(np.mean(c[cost_index])) if cost_index == 4 else c[5], float(np.mean(c[3])) * 100)
                          for c in CONFIGS)
        assert sorted(points) == pytest.approx(expected)
        costs, scores = zip(*points)
        front = {points[i] for i in brute_force_front(costs, scores)}
        drawn = next(t for t in fig.data if t.name == "Pareto front")
        assert set(zip(drawn.x, drawn.y)) == front
        assert list(drawn.x) == sorted(drawn.x)  # drawn from cheapest to dearest
        # the table lists the same front (labels name depth and bits) and the teacher as reference
        frame = table.table.frame
        assert len(frame[frame.Config != "teacher (reference)"]) == len(front)
        assert frame[frame.Config == "teacher (reference)"]["Dev score"].tolist() == ["90.0"]
        # error bars: the std over the two seeds of the score
        ys = [y for t in fig.data if t.name != "Pareto front" for y in t.error_y.array]
        assert sorted(ys) == pytest.approx(sorted(float(np.std(c[3], ddof=1)) * 100 for c in CONFIGS))
    assert "L4 kd W2A8" in latency_table.table.to_markdown()


def test_frontier_page_is_written_as_html_and_markdown(store, tmp_path):
    from kdplatform.report.render import generate

    out = generate(store, tmp_path / "report", experiment="frontier", dashboards=["frontier"], formats="html,md,csv")
    md = (tmp_path / "report" / "tables" / "frontier-frontier-latency.md").read_text()
    assert "teacher (reference)" in md and "batch-1 latency p50 (ms)" in md
    assert "Accuracy-cost frontier" in (tmp_path / "report" / "index.html").read_text()
    assert out["figures"] == 2


def test_frontier_says_what_to_run_when_nothing_was_benched(tmp_path):
    from kdplatform.report.collect import collect_runs
    from kdplatform.report.dashboards import load_dashboard
    from kdplatform.report.render import build_report

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    log_run(c, c.create_experiment("plain"), SynthRun("sst2", "kd", 42, 0.8))
    blocks = build_report(collect_runs(uri, experiment="plain"), [load_dashboard("frontier")]).sections[0].blocks
    assert all("kdplatform bench" in b.note for b in blocks)


def test_a_config_benched_on_one_seed_is_priced_by_it_and_scored_over_every_seed(tmp_path):
    """Cost belongs to the architecture: one benched seed prices the config; the score averages all seeds."""
    from kdplatform.report.collect import collect_runs
    from kdplatform.report.frontier import config_points

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("frontier")
    for seed, best in zip((42, 43, 44), (0.60, 0.70, 0.80)):
        rid = log_run(c, exp, SynthRun("cola", "kd", seed, best, extra_params={"student_layers": "3"}))
        if seed == 42:
            c.log_batch(rid, metrics=[Metric("deploy/onnx_int8/latency_p50_ms", 3.0, 0, 0)])
    log_run(c, exp, SynthRun("cola", "kd", 42, 0.90, extra_params={"student_layers": "6"}))  # never benched
    pts = config_points(collect_runs(uri, experiment="frontier"), "cola", "latency", "onnx_int8")
    assert pts.depth.tolist() == ["3"]
    row = pts.iloc[0]
    assert (row.score, row.n, row.cost, row.benched) == (pytest.approx(70.0), 3, 3.0, 1)
    assert row.score_std == pytest.approx(10.0)
