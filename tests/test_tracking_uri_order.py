"""Which MLflow store a command uses: `--tracking-uri`, else `MLFLOW_TRACKING_URI`, else the YAML file's
`tracking_uri:`, else `./mlflow.db` (README). The environment beats the file so that one sweep file runs
unchanged on a cluster whose deployment exports MLFLOW_TRACKING_URI."""

from __future__ import annotations

import os
import subprocess
import sys

from mlflow.tracking import MlflowClient

from conftest import small_kd_yaml, tiny_sst2, write_yaml



def test_the_store_is_the_flag_then_the_environment_then_the_file_then_mlflow_db(tmp_path, monkeypatch):
    from kdplatform.sweep.expand import plan_sweep

    flag, env, file = (f"sqlite:///{tmp_path / n}.db" for n in ("flag", "env", "file"))
    spec = write_yaml(tmp_path / "s.yaml", small_kd_yaml("order", f"tracking_uri: {file}\n"))
    no_field = write_yaml(tmp_path / "plain.yaml", small_kd_yaml("order", "tracking_uri: null\n"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    assert plan_sweep(spec, query_done=False).tracking_uri == env, "the environment beats the file"
    assert plan_sweep(spec, flag, query_done=False).tracking_uri == flag, "the flag beats the environment"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert plan_sweep(spec, query_done=False).tracking_uri == file, "the file when the environment is unset"
    assert plan_sweep(no_field, query_done=False).tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_the_readme_dry_run_shows_the_environment_store(tmp_path):
    """The user's command: MLFLOW_TRACKING_URI=env.db kdplatform sweep FILE tracking_uri=file.db --dry-run."""
    spec = write_yaml(tmp_path / "s.yaml", small_kd_yaml("order", "tracking_uri: null\n"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'env.db'}", "HF_HUB_OFFLINE": "1",
           "COLUMNS": "300"}  # the plan table on one line per row, paths unfolded
    proc = subprocess.run([sys.executable, "-m", "kdplatform.cli", "sweep", str(spec),
                           f"tracking_uri=sqlite:///{tmp_path / 'file.db'}", "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"sqlite:///{tmp_path / 'env.db'}" in proc.stdout and "file.db" not in proc.stdout, proc.stdout
    assert not (tmp_path / "env.db").exists() and not (tmp_path / "file.db").exists(), "a dry run writes nothing"


def test_a_trial_run_from_python_logs_to_the_environment_store(tmp_path, monkeypatch, glue_dir, tiny_bert_dir):
    """`run_trial` without `tracking_uri` (the public API, and what a worker does) follows the same order."""
    from kdplatform import load_spec, expand, run_trial

    file_db, env_db = tmp_path / "file.db", tmp_path / "env.db"
    cfg = write_yaml(tmp_path / "t.yaml", f"name: order\ntask: sst2\nmethod: kd\ntracking_uri: sqlite:///{file_db}\n"
                     f"{tiny_sst2(glue_dir, tiny_bert_dir)}\ntrain: [{{name: pred, max_steps: 2, eval_every: 2, "
                     f"batch_size: 16}}]\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{env_db}")
    monkeypatch.setenv("KDP_CACHE_DIR", str(tmp_path / "cache"))
    trials, _ = expand(load_spec(cfg))
    result = run_trial(trials[0])
    assert MlflowClient(f"sqlite:///{env_db}").get_run(result.run_id).info.status == "FINISHED"
    assert not file_db.exists(), "the file's tracking_uri must not beat MLFLOW_TRACKING_URI"
