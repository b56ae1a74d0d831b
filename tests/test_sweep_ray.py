"""`kdplatform sweep` end to end on a local Ray cluster (2 CPUs, 2 concurrent trials, the tiny BERT).

Each test drives the real command in a subprocess, as a user would, then reads the results back with the
plain mlflow client and Ray's own result API (the first test in a process where kdplatform cannot import).
The grid: kd and pkd x seeds, on 64 SST-2 examples: kd trains 2 epochs of 4 steps (evals at steps 2, 4, 6,
8), pkd one ILD epoch (2, 4) then the same prediction stage (6 ... 12). Trials checkpoint at every epoch end
(stage boundaries included).
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import cli_env, kill_session, write_yaml
from ray_sweeps import teacher_checkpoint
from kdplatform.sweep.expand import plan_sweep
from kdplatform.sweep.teachers import teacher_status

pytestmark = pytest.mark.slow

SPEC = """
name: {name}
task: sst2
data: {{glue_dir: {glue}, source: glue_dir, max_train_examples: 64, max_dev_examples: 32,
        train_eval_examples: 32, max_seq_length: 32}}
teacher: {{model: {teacher}, finetune: {{epochs: 1, max_steps: 4, batch_size: 16}}}}
student: {{init: truncate, layers: 2}}
train:
  - {{name: ild, epochs: 1, batch_size: 16, eval_every: 2}}
  - {{name: pred, epochs: 2, batch_size: 16, eval_every: 2}}
grid:
  method: [kd, pkd]
seeds: {seeds}
resources: {{cpu: 1}}
max_concurrent_trials: 2
max_failures: 1
"""
EXPECTED_STEPS = {"kd": [2, 4, 6, 8], "pkd": [2, 4, 6, 8, 10, 12]}




def _sweep_cmd(spec: Path, uri: str, *more: str) -> list[str]:
    return [sys.executable, "-m", "kdplatform.cli", "sweep", str(spec), "--tracking-uri", uri, "--num-cpus", "2",
            *more]


def _sweep(spec: Path, uri: str, env: dict, *more: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_sweep_cmd(spec, uri, *more), cwd=spec.parent, env=env, capture_output=True, text=True,
                          timeout=420)
    proc.out = " ".join((proc.stdout + proc.stderr).split())  # type: ignore[attr-defined]
    return proc


def _runs(uri: str, experiment: str, role: str | None = None) -> list:
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    flt = f"tags.`kdp.role` = '{role}'" if role else ""
    return c.search_runs([exp.experiment_id], filter_string=flt, max_results=1000)


def _steps(uri: str, run_id: str, key: str) -> list[int]:
    return [m.step for m in MlflowClient(uri).get_metric_history(run_id, key)]


def _read_without_kdplatform(exp_path: Path, uri: str, experiment: str) -> dict:
    """Ray's ExperimentAnalysis and the plain mlflow client, in a process where kdplatform cannot import."""
    code = """
import json, sys
sys.modules["kdplatform"] = None
from ray import tune
from mlflow.tracking import MlflowClient
a = tune.ExperimentAnalysis(sys.argv[1])
ray_rows = {t.config["trial"]["run_name"]: [t.status, t.last_result.get("kdp_status"),
            t.last_result.get("mlflow_run_id")] for t in a.trials}
c = MlflowClient(sys.argv[2])
exp = c.get_experiment_by_name(sys.argv[3])
runs = c.search_runs([exp.experiment_id], "tags.`kdp.role` = 'student'")
print(json.dumps({"ray": ray_rows, "mlflow": {r.info.run_id: [r.info.run_name, r.info.status] for r in runs}}))
"""
    proc = subprocess.run([sys.executable, "-c", code, str(exp_path), uri, experiment], capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _snapshot_after(checkpoint: str) -> bool:
    states = glob.glob(str(Path(checkpoint).parents[1] / "experiment_state-*.json"))
    return bool(states) and max(os.path.getmtime(f) for f in states) > os.path.getmtime(checkpoint)




def test_sweep_retries_a_crash_fails_a_divergence_then_runs_only_what_is_missing(
        tmp_path, glue_dir, tiny_bert_dir, mlflow_uri, monkeypatch):
    spec = write_yaml(tmp_path / "sweep.yaml", SPEC.format(name="faults", glue=glue_dir, teacher=tiny_bert_dir,
                                                           seeds="[1, 2]"))
    env = cli_env(tmp_path, KDP_CACHE_DIR=str(tmp_path / "cache"),
               KDP_FAULTS="sst2/kd/b32/s1:raise@3;sst2/pkd/uniform/b32/s1:nan@6")
    first = _sweep(spec, mlflow_uri, env)
    assert first.returncode == 1, first.out[-4000:]  # one trial failed; the sweep still went through all
    assert "3 finished, 1 failed" in first.out, first.out[-4000:]
    # Ray's own lines are in its log file, which the summary names, not in the user's output
    assert "Checkpoint successfully created" not in first.out, first.out[-4000:]
    ray_log = first.stdout.split("Ray's log: ", 1)[1].split()[0]
    assert Path(ray_log).is_file() and Path(ray_log).parent.name.startswith("faults-")

    parents = _runs(mlflow_uri, "faults", "sweep")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags["kdp.spec_hash"] and parent.data.tags["kdp.git_commit"]
    assert [a.path for a in MlflowClient(mlflow_uri).list_artifacts(parent.info.run_id, "spec")] == \
        ["spec/sweep.yaml", "spec/trials_to_run.txt"]
    teachers = _runs(mlflow_uri, "faults", "teacher")
    assert len(teachers) == 1, "the teacher is fine-tuned once for all four students"
    assert teachers[0].data.tags["mlflow.parentRunId"] == parent.info.run_id
    students = {r.info.run_name: r for r in _runs(mlflow_uri, "faults", "student")}
    assert sorted(students) == ["sst2/kd/b32/s1", "sst2/kd/b32/s2", "sst2/pkd/uniform/b32/s1",
                                "sst2/pkd/uniform/b32/s2"], "one run per trial, even for the retried one"
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in students.values())

    retried = students["sst2/kd/b32/s1"]
    assert retried.info.status == "FINISHED"
    assert retried.data.tags["kdp.retried_after"].startswith("InjectedFault")
    assert retried.data.tags["kdp.attempts"] == "2" and "kdp.failure_reason" not in retried.data.tags
    assert _steps(mlflow_uri, retried.info.run_id, "loss/total") == EXPECTED_STEPS["kd"]
    diverged = students["sst2/pkd/uniform/b32/s1"]
    assert diverged.info.status == "FAILED"
    assert "non-finite" in diverged.data.tags["kdp.failure_reason"]
    assert "kdp.attempts" not in diverged.data.tags, "a diverged trial is not retried"
    for name in ("sst2/kd/b32/s2", "sst2/pkd/uniform/b32/s2"):
        assert students[name].info.status == "FINISHED"
        method = name.split("/")[1]
        assert _steps(mlflow_uri, students[name].info.run_id, "loss/total") == EXPECTED_STEPS[method]

    exp_path = Path(parent.data.tags["kdp.ray_experiment"])
    # each trial wrote its live step count for the driver's view (at least at every stage end)
    files = list((exp_path / "kdp_progress").glob("*.json"))
    live = [json.loads(f.read_text()) for f in files if not f.name.startswith("teacher-")]
    assert len(live) == 4
    assert sum(s["label"].endswith(" pred") and s["step"] == s["total"] for s in live) == 3, live
    # and the teacher, a Ray task, its fine-tune's steps (shown while the students wait for it)
    teacher_steps = json.loads((exp_path / "kdp_progress" / f"teacher-{teachers[0].data.tags['kdp.teacher_hash']}.json")
                               .read_text())
    assert teacher_steps["label"].startswith("fine-tuning teacher") and teacher_steps["step"] == teacher_steps["total"]
    seen = _read_without_kdplatform(exp_path, mlflow_uri, "faults")
    assert {k: v[1] for k, v in seen["ray"].items()} == {
        "sst2/kd/b32/s1": "FINISHED", "sst2/kd/b32/s2": "FINISHED", "sst2/pkd/uniform/b32/s1": "FAILED",
        "sst2/pkd/uniform/b32/s2": "FINISHED"}
    assert {v[2] for v in seen["ray"].values()} == set(seen["mlflow"]), "Ray results point at the MLflow runs"

    assert not [r for r in _runs(mlflow_uri, "faults") if r.info.status == "RUNNING"]

    # Planning it again: only the diverged config lacks a FINISHED run, so only it would run; the teacher
    # is ready (what `kdplatform sweep --dry-run` prints).
    monkeypatch.setenv("KDP_CACHE_DIR", str(tmp_path / "cache"))
    plan = plan_sweep(spec, mlflow_uri)
    assert [t.run_name for t in plan.to_run] == ["sst2/pkd/uniform/b32/s1"] and len(plan.done) == 3
    assert [teacher_status(t, mlflow_uri).status for t in plan.teachers().values()] == ["cached"]


def test_sigkill_of_the_driver_then_resume_finishes_each_trial_in_its_own_run(
        tmp_path, glue_dir, tiny_bert_dir, mlflow_uri):
    ckpt = teacher_checkpoint(tiny_bert_dir, tmp_path / "teacher_ckpt")
    spec = write_yaml(tmp_path / "sweep.yaml", SPEC.format(name="resume", glue=glue_dir, teacher=tiny_bert_dir,
                                                           seeds="[1]").replace(
        "teacher: {model: ", f"teacher: {{checkpoint: {ckpt}, model: "))
    slow = cli_env(tmp_path, KDP_FAULTS="sst2/*:slow@0:0.8")  # 0.8 s a step: the kill lands mid-trial
    log = tmp_path / "killed_driver.log"
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would block the driver
        driver = subprocess.Popen(_sweep_cmd(spec, mlflow_uri), cwd=tmp_path, env=slow, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    checkpoints: list[str] = []
    try:
        deadline = time.time() + 300
        while time.time() < deadline and driver.poll() is None:
            checkpoints = glob.glob(str(tmp_path / "ray_results" / "*" / "*" / "checkpoint_*"))
            if checkpoints and _snapshot_after(checkpoints[0]):
                break  # Ray's experiment state, written after the checkpoint, knows it: a resume starts there
            time.sleep(0.2)
        assert checkpoints, "no trial checkpointed: " + log.read_text()[-3000:]
        os.kill(driver.pid, signal.SIGKILL)  # the sweep driver dies mid-way, no cleanup of any kind
        driver.wait(timeout=30)
    finally:
        kill_session(driver.pid)
    killed_output = log.read_text()

    parents = _runs(mlflow_uri, "resume", "sweep")
    assert len(parents) == 1 and parents[0].info.status == "RUNNING", killed_output[-3000:]
    before = {r.info.run_name: r for r in _runs(mlflow_uri, "resume", "student")}
    assert any(r.info.status == "RUNNING" for r in before.values()), "killed while trials were running"
    checkpointed = Path(checkpoints[0]).parent.name.split("_", 2)[2]  # <id>_<n>_sst2-kd-b32-s1

    resumed = _sweep(spec, mlflow_uri, cli_env(tmp_path), "--resume")
    assert resumed.returncode == 0, resumed.out[-4000:]
    # a trial whose run FINISHED before the kill (Ray had not saved it as ended) is SKIPPED now: already done
    ran_now, done_before = map(int, re.search(r"(\d+) finished, 0 failed, 0 stopped early; (\d+) were already done",
                                              " ".join(resumed.out.split())).groups())
    assert ran_now + done_before == 2, resumed.out[-4000:]

    everything = _runs(mlflow_uri, "resume")
    assert not [r.info.run_name for r in everything if r.info.status == "RUNNING"]
    parents = _runs(mlflow_uri, "resume", "sweep")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", "resume reopens the same parent run"
    students = _runs(mlflow_uri, "resume", "student")
    assert sorted(r.info.run_name for r in students) == ["sst2/kd/b32/s1", "sst2/pkd/uniform/b32/s1"], \
        "exactly one run per config: each trial reattached to its own run"
    assert checkpointed in {r.info.run_name.replace("/", "-") for r in students}
    for r in students:
        assert r.info.status == "FINISHED"
        if r.info.run_name in before:
            assert r.info.run_id == before[r.info.run_name].info.run_id
        expected = EXPECTED_STEPS[r.info.run_name.split("/")[1]]
        for key in ("loss/total", "train/distill_loss", "stage", "lr"):
            assert _steps(mlflow_uri, r.info.run_id, key) == expected, (r.info.run_name, key)
        if r.info.run_name.replace("/", "-") == checkpointed:  # killed just after its first checkpoint
            assert before[r.info.run_name].info.status == "RUNNING"
            assert r.data.tags["kdp.resumed_from_step"] == "4", "continued from its epoch checkpoint"

    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(parents[0].data.tags["kdp.ray_experiment"]).trials
    assert {t.config["trial"]["run_name"]: t.status for t in trials} == {
        "sst2/kd/b32/s1": "TERMINATED", "sst2/pkd/uniform/b32/s1": "TERMINATED"}
    assert {t.last_result["kdp_status"] for t in trials} <= {"FINISHED", "SKIPPED"}

    # The same command once more: every config has its FINISHED run, nothing starts, and it says so.
    rerun = _sweep(spec, mlflow_uri, cli_env(tmp_path))
    assert rerun.returncode == 0 and "nothing new to run" in rerun.out, rerun.out[-4000:]
    assert len(_runs(mlflow_uri, "resume", "sweep")) == 1
    # ... and leaves the finished sweep's Ray folder where its parent run says it is (no archive renaming),
    # so `--resume` still finds it and says that it ended
    folder = Path(parents[0].data.tags["kdp.ray_experiment"])
    assert (folder / "kdp_sweep.json").is_file() and not list(folder.parent.glob(f"{folder.name}.*"))
    again = _sweep(spec, mlflow_uri, cli_env(tmp_path), "--resume")
    assert again.returncode == 0 and "nothing to resume: the last run of this sweep ended" in again.out, \
        again.out[-4000:]

