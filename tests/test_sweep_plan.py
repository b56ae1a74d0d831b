"""`kdplatform sweep` without a Ray cluster: planning, --dry-run, dedupe, schema, Ray wiring, MLflow repairs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from conftest import GLUE_OK, REPO, write_yaml
from kdplatform import runs, tracking
from kdplatform.cli import app
from kdplatform.config import ConfigError, load_trials
from kdplatform.sweep.expand import apply_sample, plan_sweep, spec_hash

SPEC = """
name: plantest
task: sst2
data: {{glue_dir: {glue}, source: glue_dir, max_train_examples: 64}}
teacher: {{model: {teacher}}}
student: {{layers: 2}}
grid:
  method: [kd, pkd, cr_ild]
  layer_map: [uniform, last]
  consistency_weight: [0.0, 0.5]
seeds: [1, 2]
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One MLflow store for this module's tests (each uses its own experiment): creating one costs seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('sweep_plan') / 'mlflow.db'}"


def _teacher_folder(tmp_path: Path) -> Path:
    """A model folder with a config.json is all planning needs (depth for layer maps)."""
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "config.json").write_text('{"num_hidden_layers": 4, "model_type": "bert"}')
    return folder


def _spec(tmp_path: Path, extra: str = "", glue: str | Path = "/nowhere") -> Path:
    """The plan-test spec; its data folder does not exist unless `glue` says otherwise (planning never reads
    it; a sweep that gets past planning checks it first, before anything is written)."""
    return write_yaml(tmp_path / "spec.yaml", SPEC.format(teacher=_teacher_folder(tmp_path), glue=glue) + extra)


def test_dry_run_prints_plan_and_starts_nothing(tmp_path, monkeypatch):
    spec = _spec(tmp_path, glue=GLUE_OK)  # a dry run checks the data files, as the sweep would
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = CliRunner().invoke(app, ["sweep", str(spec), "--dry-run", "--tracking-uri", uri])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    # kd: 1 x 2 seeds; pkd: 2 maps x 2 seeds; cr_ild (last layer whatever the map): 2 weights x 2 seeds
    # -> 10 distinct of 24
    assert "10 distinct, 0 already done" in out and "10 to run" in out
    assert "1 needed, 1 to train" in out
    assert "collapsed: layer_map has no effect on method kd" in out
    assert "consistency_weight has no effect on method kd" in out
    assert "layer_map has no effect on method cr_ild" in out
    # what each trial computes: cr_ild distils the last layers (2 of the student, 4 of the teacher)
    assert "relation_kl x1 on (2,4) [q,k,v]" in out and "pkd x1 on (1,2) (2,4) projected" in out
    assert "dry run: nothing was started" in out
    assert not (tmp_path / "mlflow.db").exists(), "a dry run must not create the store"
    assert not (tmp_path / "ray_results").exists()


def test_dedupe_counts_finished_runs_as_done(tmp_path, monkeypatch, store):
    spec = _spec(tmp_path, glue=GLUE_OK)  # the dry run below checks the data files
    monkeypatch.chdir(tmp_path)
    uri = store
    _, trials, _ = load_trials(spec)
    c = MlflowClient(uri)
    exp = c.create_experiment("plantest")
    for t, status in ((trials[0], "FINISHED"), (trials[1], "FAILED"), (trials[2], "RUNNING")):
        run = c.create_run(exp, tags={runs.ROLE: "student", runs.CFG_HASH: t.cfg_hash})
        if status != "RUNNING":
            c.set_terminated(run.info.run_id, status=status)
    plan = plan_sweep(spec, uri)
    assert set(plan.done) == {trials[0].cfg_hash}, "only FINISHED runs count as done"
    assert len(plan.to_run) == len(trials) - 1
    res = CliRunner().invoke(app, ["sweep", str(spec), "--dry-run", "--tracking-uri", uri])
    assert "1 already done" in " ".join(res.output.split())


def test_spec_hash_names_the_ray_folder(tmp_path):
    spec = _spec(tmp_path)
    plan = plan_sweep(spec, query_done=False)
    assert plan.experiment_dir_name == f"plantest-{plan.spec_hash[:8]}"
    moved = write_yaml(tmp_path / "other.yaml", spec.read_text() + "tracking_uri: sqlite:////x.db\n"
                       "max_concurrent_trials: 3\n")
    assert plan_sweep(moved, query_done=False).spec_hash == plan.spec_hash, "where/how fast: same sweep"
    wider = write_yaml(tmp_path / "wider.yaml", spec.read_text().replace("seeds: [1, 2]", "seeds: [1, 2, 3]"))
    assert spec_hash(plan_sweep(wider, query_done=False).spec) != plan.spec_hash


@pytest.mark.parametrize("extra,where", [
    ("resources: {cpu: 1, gpus: 1}\n", "resources.gpus"),
    ("resources: {gpu: 1.5}\n", "resources.gpu"),
    ("scheduler: {type: hyperband}\n", "scheduler.type"),
    ("search: {num_samples: 2, space: {lr: {type: loguniform, low: 0, high: 1}}}\n", "search.space.lr"),
    ("search: {num_samples: 2, space: {consistency_weight: {type: choice}}}\n", "search.space"),
    ("max_concurrent_trials: 0\n", "max_concurrent_trials"),
])
def test_sweep_sections_are_validated(tmp_path, extra, where):
    with pytest.raises(ConfigError) as e:
        load_trials(_spec(tmp_path, extra))
    assert where in str(e.value)


def test_search_space_is_checked_against_the_grid(tmp_path):
    clash = "search: {num_samples: 2, space: {consistency_weight: {type: uniform, low: 0, high: 1}}}\n"
    with pytest.raises(ConfigError, match="also a grid axis"):
        plan_sweep(_spec(tmp_path, clash), query_done=False)
    ok = "search: {num_samples: 3, space: {train.pred.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}}}\n"
    plan = plan_sweep(_search_spec(tmp_path, ok), query_done=False)
    assert len(plan.bases) == len(plan.trials)
    base = next(iter(plan.bases.values()))
    sampled = apply_sample(base, {"train.pred.lr": 2e-4})
    assert next(s for s in sampled.train if s.name == "pred").lr == 2e-4
    bad = "search: {num_samples: 3, space: {train.pred.lr: {type: uniform, low: -1, high: 1}}}\n"
    with pytest.raises(ConfigError, match="search.space"):
        plan_sweep(_search_spec(tmp_path, bad, "bad.yaml"), query_done=False)


def _search_spec(tmp_path: Path, extra: str, name: str = "search.yaml") -> Path:
    folder = tmp_path / "t2"
    if not folder.exists():
        folder.mkdir()
        (folder / "config.json").write_text('{"num_hidden_layers": 4, "model_type": "bert"}')
    return write_yaml(tmp_path / name, f"name: s\nteacher: {{model: {folder}}}\nstudent: {{layers: 2}}\n"
                      "grid: {method: [kd, pkd]}\n" + extra)


def test_study_sweep_files_expand():
    spec, trials, notes = load_trials(REPO / "sweeps" / "glue_all.yaml")
    assert len(trials) == 576 and len({t.teacher_hash for t in trials}) == 8
    assert {t.task for t in trials} == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"}
    assert {t.bits for t in trials} == {2, 32} and spec.resources.gpu == 0.5
    assert any("consistency_weight has no effect on method kd" in n for n in notes)
    spec, trials, notes = load_trials(REPO / "sweeps" / "cr_ild.yaml")
    assert {t.data.max_train_examples for t in trials} == {None, 1000}
    assert not any(t.task == "stsb" and t.data.label_noise > 0 for t in trials)
    assert any("regression task stsb" in n for n in notes)


def test_ray_wiring_without_a_cluster(tmp_path):
    from ray import tune

    from kdplatform.sweep import tune as kdp_tune

    spec_file = _spec(tmp_path, "search: {num_samples: 5, seed: 1, space: {train.pred.lr: "
                      "{type: loguniform, low: 1.0e-5, high: 1.0e-3}}}\nscheduler: {metric: dev/score}\n"
                      "max_failures: 3\n")
    spec_file.write_text(spec_file.read_text().replace("  consistency_weight: [0.0, 0.5]\n", ""))
    plan = plan_sweep(spec_file, query_done=False)
    space = kdp_tune.param_space(plan.trials, plan.spec.search)
    assert set(space) == {"base", "space"} and "train.pred.lr" in space["space"]
    cfg = kdp_tune.tune_config(plan.spec, 2)
    assert cfg.num_samples == 5 and cfg.max_concurrent_trials == 2
    assert type(cfg.scheduler).__name__ == "AsyncHyperBandScheduler"
    from ray.tune.search.optuna import OptunaSearch

    assert isinstance(cfg.search_alg, OptunaSearch)
    # a result without the metric (an ILD stage's eval) is passed over, not a KeyError that ends the sweep
    cfg.search_alg.set_search_properties("dev/best_score", "max", {"x": tune.uniform(0, 1)})
    assert cfg.search_alg.suggest("t1") is not None
    cfg.search_alg.on_trial_result("t1", {"distill_loss": 0.5, "training_iteration": 1})
    rc = kdp_tune.run_config("x", tmp_path, plan.spec.max_failures)
    assert isinstance(rc, tune.RunConfig) and rc.failure_config.max_failures == 3
    grid = kdp_tune.param_space(plan.trials)["trial"]["grid_search"]
    assert [g["cfg_hash"] for g in grid] == [t.cfg_hash for t in plan.trials]
    # the Ray trial-name functions are pickled by value: readable without kdplatform
    import ray.cloudpickle as cloudpickle

    blob = cloudpickle.dumps(cfg.trial_dirname_creator)
    code = ("import sys, ray.cloudpickle as cp; sys.modules['kdplatform'] = None\n"
            "f = cp.loads(bytes.fromhex(sys.argv[1]))\n"
            "class T: trial_id = 'abc'; config = {'trial': {'run_name': 'sst2/kd/b32/s1'}}\n"
            "print(f(T()))")
    out = subprocess.run([sys.executable, "-c", code, blob.hex()], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "abc_sst2-kd-b32-s1", out.stderr


def test_reattached_run_logs_no_duplicate_steps(store):
    mlflow_uri = store
    first = tracking.RunLogger(mlflow_uri, "dup", "t", {runs.ROLE: "student"})
    for step in (1, 2, 3):
        first.add_metrics({"loss/total": float(step), "dev/score": 0.5}, step)
    first.flush()  # ... then the process dies after step 3; the checkpoint was at step 2
    again = tracking.RunLogger(mlflow_uri, "dup", "t", {}, run_id=first.run_id)
    for step in (3, 4):
        again.add_metrics({"loss/total": float(step), "dev/score": 0.6}, step)
    again.finish()
    c = MlflowClient(mlflow_uri)
    assert [m.step for m in c.get_metric_history(first.run_id, "loss/total")] == [1, 2, 3, 4]
    assert [m.step for m in c.get_metric_history(first.run_id, "dev/score")] == [1, 2, 3, 4]
    assert c.get_run(first.run_id).info.status == "FINISHED"


def test_driver_closes_runs_a_worker_left_open(store, tmp_path):
    """ASHA stops a trial by ending its tune.report with SystemExit, so the worker closes the run as KILLED;
    after fit the driver makes it FINISHED + kdp.early_stopped. A trial whose process died is FAILED."""
    from kdplatform.sweep.tune import DriverHooks, TrialContext, finish_early_stopped

    mlflow_uri = store
    c = MlflowClient(mlflow_uri)
    exp = c.create_experiment("repair")
    parent = c.create_run(exp).info.run_id
    tags = {runs.ROLE: "student", runs.CFG_HASH: "h1", runs.PARENT: parent}
    stopped = c.create_run(exp, tags={**tags, "kdp.failure_reason": "SystemExit: 0"}).info.run_id
    c.set_terminated(stopped, "KILLED")
    still_open = c.create_run(exp, tags={**tags, runs.CFG_HASH: "h4"}).info.run_id
    crashed = c.create_run(exp, tags={**tags, runs.CFG_HASH: "h2"}).info.run_id
    done = c.create_run(exp, tags={**tags, runs.CFG_HASH: "h3"}).info.run_id
    c.set_terminated(done, "FINISHED")
    seen = []
    monitor = SimpleNamespace(trial_done=lambda *a: seen.append(a[1]), note=seen.append)
    ctx = TrialContext(mlflow_uri, "repair", parent, parent, os.getcwd())
    hooks = DriverHooks(ctx, monitor)

    from pyarrow.fs import LocalFileSystem

    def trial(h, last, error_file=None):
        folder = tmp_path / f"trial_{h}"
        (folder / "checkpoint_000000").mkdir(parents=True, exist_ok=True)  # as Ray leaves a resume point
        return SimpleNamespace(trial_id=h, config={"trial": {"cfg_hash": h, "run_name": h}}, last_result=last,
                               error_file=error_file, path=str(folder),
                               storage=SimpleNamespace(storage_filesystem=LocalFileSystem()))

    hooks.trial_complete(trial("h1", {"step": 40, "mlflow_run_id": stopped, "dev/score": 0.4}))
    hooks.trial_error(trial("h2", {}))
    hooks.trial_complete(trial("h3", {"kdp_status": "FINISHED", "mlflow_run_id": done}))
    assert seen == ["STOPPED", "FAILED", "FINISHED"]
    # completed trials lose their resume checkpoints; the errored one keeps them for --resume
    assert not (tmp_path / "trial_h1" / "checkpoint_000000").exists()
    assert not (tmp_path / "trial_h3" / "checkpoint_000000").exists()
    assert (tmp_path / "trial_h2" / "checkpoint_000000").is_dir()
    rows = [{"status": "STOPPED", "run_id": stopped, "step": 40}, {"status": "STOPPED", "cfg_hash": "h4", "step": 6},
            {"status": "FINISHED", "run_id": done}]
    assert sorted(finish_early_stopped(ctx, rows, wait_s=0.5)) == sorted([stopped, still_open])
    for run_id, step in ((stopped, "40"), (still_open, "6")):
        r = c.get_run(run_id)
        assert r.info.status == "FINISHED" and r.data.tags["kdp.early_stopped"] == "asha"
        assert r.data.tags["kdp.early_stopped_step"] == step and "kdp.failure_reason" not in r.data.tags
    r = c.get_run(crashed)
    assert r.info.status == "FAILED" and r.data.tags["kdp.failure_reason"]
    assert "kdp.early_stopped" not in c.get_run(done).data.tags
    assert finish_early_stopped(ctx, rows, wait_s=0.5) == [], "idempotent"


def test_live_view_renders_in_a_terminal():
    import io

    from rich.console import Console

    from kdplatform.sweep.progress import SweepMonitor, summary_table

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100)
    with SweepMonitor(console, total=3, concurrency_hint=2) as m:
        m.trial_started("a", "sst2/kd/b32/s1")
        m.trial_started("b", "rte/kd/b32/s1")
        m.trial_result("a", {"step": 4, "dev/best_score": 0.7, "kdp_task": "sst2", "kdp_run_name": "sst2/kd/b32/s1"})
        m.trial_done("a", "FINISHED", {"dev/best_score": 0.8, "kdp_task": "sst2"})
        m.trial_done("b", "FAILED", {"kdp_failure_reason": "DivergedError: nan"})
        assert m.counts() == {"pending": 1, "running": 0, "done": 1, "failed": 1, "stopped early": 0,
                              "skipped": 0}
        assert m.eta_seconds() is not None
    text = buf.getvalue()
    assert "best dev score so far" in text and "0.7000" in text and "ETA" in text
    console.print(summary_table([{"task": "sst2", "method": "kd", "status": "FINISHED", "score": 0.8},
                                 {"task": "sst2", "method": "kd", "status": "FAILED", "score": None}], "t"))
    assert "0.8000" in buf.getvalue()


def test_resume_without_a_previous_run_is_a_clear_error(tmp_path, monkeypatch):
    spec = _spec(tmp_path, glue=GLUE_OK)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["sweep", str(spec), "--resume", "--tracking-uri",
                                   f"sqlite:///{tmp_path / 'm.db'}"])
    assert res.exit_code == 2
    assert "nothing to resume" in " ".join(res.output.split())


def test_retry_note_moves_the_old_failure_reason(store):
    mlflow_uri = store
    from kdplatform.runs import note_retry

    c = MlflowClient(mlflow_uri)
    run = c.create_run(c.create_experiment("retry"), tags={"kdp.failure_reason": "InjectedFault: boom"})
    c.set_terminated(run.info.run_id, "FAILED")
    note_retry(mlflow_uri, run.info.run_id, 8)
    tags = c.get_run(run.info.run_id).data.tags
    assert "kdp.failure_reason" not in tags and tags["kdp.retried_after"] == "InjectedFault: boom"
    assert tags["kdp.attempts"] == "2" and tags["kdp.resumed_from_step"] == "8"


def test_an_interrupted_sweep_is_not_silently_restarted(tmp_path, monkeypatch, store):
    """Its parent run is still RUNNING: a plain re-run refuses and points at --resume (or --fresh)."""
    from kdplatform.sweep.driver import STATE_FILE

    spec = _spec(tmp_path, glue=GLUE_OK)
    monkeypatch.chdir(tmp_path)
    plan = plan_sweep(spec, store)
    c = MlflowClient(store)
    parent = c.create_run(c.create_experiment("plantest-interrupted")).info.run_id
    folder = tmp_path / "ray_results" / plan.experiment_dir_name
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text(json.dumps({"parent_run_id": parent, "experiment": "plantest-interrupted",
                                                 "tracking_uri": tracking.redact(plan.tracking_uri)}))
    res = CliRunner().invoke(app, ["sweep", str(spec), "--tracking-uri", store])
    assert res.exit_code == 2
    out = " ".join(res.output.split())
    assert "an interrupted run of this sweep exists" in out and "--resume" in out and "--fresh" in out


def test_resume_refuses_a_new_concurrency_limit_it_could_not_apply(tmp_path, monkeypatch):
    # Ray's Tuner.restore keeps the TuneConfig the sweep started with: --max-concurrent would silently do nothing
    spec = _spec(tmp_path)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["sweep", str(spec), "--resume", "--max-concurrent", "1", "--tracking-uri",
                                   f"sqlite:///{tmp_path / 'm.db'}"])
    out = " ".join(res.output.split())
    assert res.exit_code == 2, out
    assert "--max-concurrent cannot change a resumed sweep" in out and "--fresh --max-concurrent 1" in out
    assert "Traceback" not in out
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "ray_results").exists()  # nothing half-written
