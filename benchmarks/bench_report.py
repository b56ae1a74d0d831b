"""Benchmark of `kdplatform report` at scale: 2,000 synthetic student runs x 40 eval points (not a test).

Builds a SQLite MLflow store through the MLflow client, exactly as the worker logs (about 20 metric keys per
eval: train/dev/gap scores and task metrics, distillation losses, loss terms, lr, stage), then times each
phase of the report and prints the times. The store is kept (--store) so later runs skip the build.

    python benchmarks/bench_report.py                       # 2,000 runs x 40 points, HTML + tables
    python benchmarks/bench_report.py --images              # also PNG export through kaleido/Chromium
    python benchmarks/bench_report.py --runs 200 --points 10 --store /tmp/small

It also times the history fetch two ways on a sample of runs: one SQL query per 500 runs on the store's
`metrics` table (what the report uses for database stores) against one `get_metric_history` call per
(run, key) on a thread pool (what it uses for an HTTP server), and extrapolates the latter.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the synthetic-run writer

from report_fixtures import SynthRun, create_sweep, log_run  # noqa: E402

TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")


def configs():
    """41 configs: baselines, CR-ILD over layer map x weight, QAT methods over bits (and mixing)."""
    out = [dict(method=m) for m in ("kd", "tinybert", "minilm")]
    out += [dict(method="pkd", layer_map="uniform"), dict(method="ild_last", layer_map="last")]
    out += [dict(method="cr_ild", layer_map=lm, consistency_weight=w)
            for lm in ("uniform", "last") for w in ("0.1", "0.2", "0.5", "1.0", "2.0")]
    out += [dict(method="supplementary_ild", layer_map=lm) for lm in ("uniform", "last")]
    for bits in ("2", "4", "8"):
        q = dict(bits=bits, act_bits="8", size_mb={"2": 6.0, "4": 11.0, "8": 22.0}[bits])
        out += [dict(method="ternarybert", **q), dict(method="kdqat_map", **q), dict(method="kdqat_output", **q)]
        out += [dict(method="kdqat_unified", map_coeff=c, output_coeff="1.0", **q)
                for c in ("0.1", "0.3", "0.5", "0.7", "0.9")]
    return out


def synthetic_runs(n: int, points: int, sweep_id: str) -> list[SynthRun]:
    runs = []
    cfgs = configs()
    for i, (task, (ci, cfg), seed) in enumerate(itertools.product(TASKS, enumerate(cfgs), range(42, 48))):
        if i >= n:
            break
        cfg = dict(cfg)
        size = cfg.pop("size_mb", None)
        best = 0.5 + 0.4 * ((ci * 7 + TASKS.index(task) * 3) % 17) / 17 + 0.004 * (seed - 42)
        runs.append(SynthRun(task=task, seed=seed, best=best, final_gap=0.02 + 0.01 * (ci % 9),
                             n_points=points, size_mb=size, full_metrics=True, sweep_id=sweep_id, **cfg))
    return runs


def build(store: Path, n: int, points: int) -> str:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{store / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("bench")
    sweep = create_sweep(client, exp)
    t0 = time.perf_counter()
    runs = synthetic_runs(n, points, sweep)
    for i, r in enumerate(runs):
        log_run(client, exp, r)
        if (i + 1) % 250 == 0:
            print(f"  built {i + 1}/{len(runs)} runs ({time.perf_counter() - t0:.0f} s)", flush=True)
    return uri


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--points", type=int, default=40)
    ap.add_argument("--store", type=Path, default=None, help="folder of the store (kept; reused if present)")
    ap.add_argument("--images", action="store_true", help="also time PNG export (needs Chromium)")
    ap.add_argument("--sample", type=int, default=50, help="runs for the per-call history fetch comparison")
    args = ap.parse_args()

    store = args.store or Path(tempfile.gettempdir()) / f"kdp-bench-report-{args.runs}x{args.points}"
    store.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    if not (store / "mlflow.db").exists():
        print(f"building {args.runs} runs x {args.points} eval points in {store} ...", flush=True)
        t = time.perf_counter()
        uri = build(store, args.runs, args.points)
        print(f"build: {time.perf_counter() - t:.1f} s (not part of the report time)")
    else:
        print(f"reusing the store in {store}")

    from kdplatform.report import collect as C
    from kdplatform.report.dashboards import load_dashboards
    from kdplatform.report.render import build_report, find_chromium, generate, render_html

    timings: dict[str, tuple[float, float]] = {}

    class timed:
        def __init__(self, name: str):
            self.name = name

        def __enter__(self):
            self.wall, self.cpu = time.perf_counter(), time.process_time()

        def __exit__(self, *exc):
            timings[self.name] = (time.perf_counter() - self.wall, time.process_time() - self.cpu)

    dashes = load_dashboards(None)
    client = C._client(uri)
    exp_id = client.get_experiment_by_name("bench").experiment_id
    with timed("runs via MLflow search_runs (paged, one query per 50,000 runs)"):
        api_runs = C.search_all_runs(client, [exp_id], "tags.`kdp.role` = 'student'")
    engine = C._sql_engine(client)
    with timed("runs via SQL on the store's tables (what the report uses)"):
        sql_runs = C._runs_from_sql(engine, [exp_id], None, {exp_id: "bench"})
    assert len(sql_runs) == len(api_runs)
    run_ids = sql_runs.run_id.tolist()
    keys = list(C.DEFAULT_HISTORY_KEYS)
    with timed(f"histories via SQL ({len(run_ids)} runs x {len(keys)} keys)"):
        hist = C.fetch_histories(client, run_ids, keys)
    sample = run_ids[:args.sample]
    with timed(f"histories via get_metric_history per (run, key), {len(sample)} runs"):
        C.fetch_histories(client, sample, keys, sql=False)
    _, (w, c) = timings.popitem()
    scale = len(run_ids) / max(1, len(sample))
    timings[f"histories via get_metric_history per (run, key), extrapolated to {len(run_ids)} runs"] = \
        (w * scale, c * scale)

    with timed("collect: runs + histories + best scores"):
        data = C.collect_runs(uri, experiment="bench")
    with timed("tables + figures in memory"):
        report = build_report(data, dashes)
    with timed("HTML page"):
        page = render_html(report)
    out = store / "report"
    with timed("TOTAL: kdplatform report --format html,md,tex,csv"):
        generate(uri, out, experiment="bench", formats="html,md,tex,csv")
    if args.images:
        if find_chromium() is None:
            print("no Chromium: image export not timed")
        else:
            with timed("TOTAL with PNG export (kaleido)"):
                generate(uri, out, experiment="bench", formats="html,png,md,tex,csv")

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nreport benchmark: {len(data.runs)} runs x {args.points} eval points, {len(hist)} history points of "
          f"{len(keys)} keys, {len(report.figures)} figures, page {len(page) / 1e6:.1f} MB "
          f"(load average {load:.1f} on {os.cpu_count()} cores)")
    print(f"  {'wall':>8}  {'cpu':>8}")
    for name, (wall, cpu) in timings.items():
        print(f"  {wall:7.2f}s  {cpu:7.2f}s  {name}")


if __name__ == "__main__":
    main()
