"""One run per config, across processes; `run` = `sweep` without Ray; `ls`; the Optuna importance page.

Every test drives the real command in subprocesses on a real SQLite store, with the tiny random BERT as
teacher (2 training steps per stage), and reads the store back with the plain mlflow client.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import cli_env, tiny_sst2, write_yaml

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SPEC = """
name: {name}
task: sst2
method: kd
{tiny}
train:
  - {{name: pred, max_steps: 2, eval_every: 1, batch_size: 16}}
seeds: [1, 2]
resources: {{cpu: 1}}
"""




def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdplatform.cli", *args]


def _cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(*args), cwd=tmp_path, env=cli_env(tmp_path, **env), capture_output=True, text=True,
                          timeout=600)
    proc.out = " ".join((proc.stdout + proc.stderr).split())  # type: ignore[attr-defined]
    return proc


def _students(uri: str, experiment: str) -> list:
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], "tags.`kdp.role` = 'student'", max_results=1000) if exp else []


def _all_runs(uri: str, experiment: str) -> list:
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], max_results=1000)


def _student_logged(db: Path) -> bool:
    """Read-only look at the SQLite file (an MlflowClient here would race the writer's schema migration)."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return bool(con.execute("SELECT 1 FROM tags WHERE key = 'kdp.role' AND value = 'student'").fetchall())
    except sqlite3.Error:
        return False


def _finished_per_config(uri: str, experiment: str) -> Counter:
    return Counter(r.data.tags["kdp.cfg_hash"] for r in _students(uri, experiment) if r.info.status == "FINISHED")


def _spec(tmp_path: Path, glue_dir, teacher, name: str, extra: str = "") -> Path:
    return write_yaml(tmp_path / f"{name}.yaml", SPEC.format(name=name, tiny=tiny_sst2(glue_dir, teacher, seq=32, layers=2)) + extra)


def test_run_dedupes_like_sweep_force_reruns_and_ls_counts(tmp_path, glue_dir, tiny_bert_dir, mlflow_uri):
    spec = _spec(tmp_path, glue_dir, tiny_bert_dir, "dedupe")
    first = _cli(tmp_path, "run", str(spec), "--tracking-uri", mlflow_uri)
    assert first.returncode == 0, first.out[-3000:]
    students = _students(mlflow_uri, "dedupe")
    assert sorted(r.info.status for r in students) == ["FINISHED", "FINISHED"]
    parents = [r for r in _all_runs(mlflow_uri, "dedupe") if r.data.tags.get("kdp.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in students)
    for r in students:  # full run ids in the summary, and the report hint
        assert r.info.run_id in first.out
    assert f"kdplatform report --experiment dedupe --sweep {parents[0].info.run_id}" in first.out

    n_runs = len(_all_runs(mlflow_uri, "dedupe"))
    again = _cli(tmp_path, "run", str(spec), "--tracking-uri", mlflow_uri)
    assert again.returncode == 0 and "nothing new to run" in again.out, again.out[-3000:]
    assert len(_all_runs(mlflow_uri, "dedupe")) == n_runs, "a second run writes no run"

    forced = _cli(tmp_path, "run", str(spec), "--tracking-uri", mlflow_uri, "--force")
    assert forced.returncode == 0, forced.out[-3000:]
    assert set(_finished_per_config(mlflow_uri, "dedupe").values()) == {2}, "--force: one more run per config"

    ls = _cli(tmp_path, "ls", "--tracking-uri", mlflow_uri)
    assert ls.returncode == 0, ls.out
    assert ls.out.count("dedupe") >= 2 and "2 FINISHED" in ls.out and parents[0].info.run_id in ls.out


def test_two_concurrent_runs_leave_one_finished_run_per_config(tmp_path, glue_dir, tiny_bert_dir, mlflow_uri):
    spec = _spec(tmp_path, glue_dir, tiny_bert_dir, "twice")
    env = cli_env(tmp_path, KDP_FAULTS="sst2/*:slow@0:0.5")
    procs = [subprocess.Popen(_cmd("run", str(spec), "--tracking-uri", mlflow_uri), cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert any("nothing new to run" in " ".join(o.split()) for o in outs), outs
    runs = _all_runs(mlflow_uri, "twice")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert _finished_per_config(mlflow_uri, "twice") == Counter(
        {h: 1 for h in {r.data.tags["kdp.cfg_hash"] for r in _students(mlflow_uri, "twice")}})
    assert len(_students(mlflow_uri, "twice")) == 2


def test_sigkill_of_run_then_run_again_closes_the_orphan(tmp_path, glue_dir, tiny_bert_dir, mlflow_uri):
    spec = _spec(tmp_path, glue_dir, tiny_bert_dir, "killed")
    env = cli_env(tmp_path, KDP_FAULTS="sst2/kd/b32/s1:slow@0:5")
    proc = subprocess.Popen(_cmd("run", str(spec), "--tracking-uri", mlflow_uri), cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not _student_logged(tmp_path / "mlflow.db"):
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    left = [r for r in _all_runs(mlflow_uri, "killed") if r.info.status == "RUNNING"]
    assert len(left) >= 2, "the parent and the student are left RUNNING by the killed process"

    again = _cli(tmp_path, "run", str(spec), "--tracking-uri", mlflow_uri)
    assert again.returncode == 0, again.out[-3000:]
    runs = _all_runs(mlflow_uri, "killed")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert sorted(_finished_per_config(mlflow_uri, "killed").values()) == [1, 1]
    for r in left:
        closed = MlflowClient(mlflow_uri).get_run(r.info.run_id)
        assert closed.info.status == "KILLED" and "without closing" in closed.data.tags["kdp.failure_reason"]


def test_two_concurrent_sweeps_leave_one_finished_run_per_config(tmp_path, glue_dir, tiny_bert_dir, mlflow_uri):
    spec = _spec(tmp_path, glue_dir, tiny_bert_dir, "sweeps")
    env = cli_env(tmp_path, RAY_DEDUP_LOGS="0")
    cmd = _cmd("sweep", str(spec), "--tracking-uri", mlflow_uri, "--num-cpus", "2")
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [" ".join(p.communicate(timeout=600)[0].split()) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
    assert any("nothing new to run" in o for o in outs), [o[-2000:] for o in outs]
    runs = _all_runs(mlflow_uri, "sweeps")
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert sorted(_finished_per_config(mlflow_uri, "sweeps").values()) == [1, 1]
    assert len(_students(mlflow_uri, "sweeps")) == 2


def test_optuna_sweep_tags_its_search_and_the_report_draws_importance(tmp_path, glue_dir, tiny_bert_dir,
                                                                        mlflow_uri):
    from kdplatform.report.render import generate

    # cr_ild: two stages, and the first (ild) reports no dev score, which Optuna must wait through
    spec = _spec(tmp_path, glue_dir, tiny_bert_dir, "optuna",
                 "search: {num_samples: 3, seed: 0, space: {consistency_weight: {type: uniform, low: 0, high: 1}, "
                 "train.pred.lr: {type: loguniform, low: 1.0e-4, high: 3.0e-1}}}\n")
    # 64 dev examples and 4 steps, so the sampled learning rates give different scores (fANOVA needs variance)
    spec.write_text(spec.read_text().replace("seeds: [1, 2]", "seeds: [1]").replace("method: kd", "method: cr_ild")
                    .replace("max_dev_examples: 32", "max_dev_examples: 64")
                    .replace("  - {name: pred, max_steps: 2, eval_every: 1",
                             "  - {name: ild, max_steps: 3, eval_every: 1, batch_size: 16}\n"  # 2 epochs
                             "  - {name: pred, max_steps: 4, eval_every: 2"))
    proc = _cli(tmp_path, "sweep", str(spec), "--tracking-uri", mlflow_uri, "--num-cpus", "2")
    assert proc.returncode == 0, proc.out[-3000:]
    [parent] = [r for r in _all_runs(mlflow_uri, "optuna") if r.data.tags.get("kdp.role") == "sweep"]
    assert parent.data.tags["kdp.search"] == "optuna"
    assert parent.data.tags["kdp.search_axes"] == "consistency_weight,train.pred.lr"
    students = _students(mlflow_uri, "optuna")
    assert len(students) == 3 and {r.info.status for r in students} == {"FINISHED"}
    assert len({r.data.params["consistency_weight"] for r in students}) == 3  # sampled, one value per trial
    summary = generate(mlflow_uri, tmp_path / "report", experiment="optuna", sweep=parent.info.run_id,
                       dashboards=["sweep_overview"], formats="html")
    html = Path(summary["index"]).read_text()
    assert "parameter importance for the best dev score" in html
