"""The team deployment with its real pieces on loopback: PostgreSQL (Debian package), `mlflow server` on it
started with docker/compose.yaml's command and environment through the image's entry point (basic-auth
app, artifacts served through the server), and a small `kdplatform sweep` on a local Ray cluster logging
to it over HTTP with credentials from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD only.

Checks: runs land in PostgreSQL and artifacts in the server's artifact store; a request without
credentials and one with a wrong password are refused (401); the password (and its Basic-auth token)
appears in no param, tag, metric key, artifact, output or log line (the job's, the server's, Ray's
session logs), cache or results file, or database row.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import write_yaml
from deploy_fixtures import MlflowServer, missing_server_packages, start_postgres, why_no_postgres

SEARCH = "/api/2.0/mlflow/experiments/search?max_results=10"
USER = "researcher"

SWEEP = """
name: deploy
task: sst2
method: kd
seeds: [42, 43]
data: {{glue_dir: {glue}, source: glue_dir, max_train_examples: 64, max_dev_examples: 32,
        train_eval_examples: 32, max_seq_length: 32}}
teacher: {{model: {teacher}, finetune: {{epochs: 1, max_steps: 4, batch_size: 16, lr: 1.0e-3}}}}
student: {{init: truncate, layers: 2}}
train:
  - {{name: pred, max_steps: 4, eval_every: 2, batch_size: 16}}
"""


@pytest.fixture(scope="module")
def server():
    missing = missing_server_packages()
    if missing:  # pip-installable: CI must have them, so there it is a failure
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"not installed: {', '.join(missing)} "
                                                               "(pip install 'psycopg[binary]' 'mlflow[auth]')")
    reason = why_no_postgres()
    if reason:
        pytest.skip(reason)
    pg = start_postgres()
    srv = MlflowServer(pg, Path(tempfile.mkdtemp(prefix="kdp-mlflow-")))
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        pg.stop()


@pytest.fixture(scope="module")
def researcher(server) -> tuple[str, str]:
    password = "pw-" + secrets.token_urlsafe(24)  # generated per run: no real password in the repository
    server.create_user(USER, password)
    return USER, password


@pytest.mark.slow
def test_requests_without_or_with_wrong_credentials_are_refused(server, researcher):
    assert server.request("GET", "/health")[0] == 200  # liveness stays open for health checks
    status, _ = server.request("GET", SEARCH)
    assert status == 401
    assert server.request("GET", SEARCH, auth=(USER, researcher[1] + "x"))[0] == 401
    assert server.request("GET", SEARCH, auth=("nobody", researcher[1]))[0] == 401
    status, body = server.request("POST", "/api/2.0/mlflow/experiments/create", {"name": "intruder"})
    assert status == 401, body
    assert server.request("GET", SEARCH, auth=researcher)[0] == 200
    # the tracking store is the PostgreSQL database, not a local file
    assert server.pg.psql("SELECT count(*) FROM experiments", db="mlflow").isdigit()
    assert not list(server.workdir.glob("*.db"))


@pytest.mark.slow
@pytest.mark.parametrize("credentials", ["none", "wrong password"])
def test_refused_credentials_exit_2_before_any_work(server, researcher, credentials, tmp_path, glue_dir,
                                                    tiny_bert_dir):
    """The store check: a 401 from the team server is one message naming the fix, in seconds, nothing run."""
    import time

    user, password = researcher
    cfg = write_yaml(tmp_path / "sweep.yaml", SWEEP.format(glue=glue_dir, teacher=tiny_bert_dir))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "PG"))}
    env["KDP_CACHE_DIR"] = str(tmp_path / "cache")
    if credentials == "wrong password":
        env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password + "-wrong")
    for command in ("run", "sweep"):
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "kdplatform.cli", command, str(cfg), "--tracking-uri",
                               server.url], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        seconds = time.monotonic() - start
        print(f"{command} with {credentials} credentials: exit {proc.returncode} after {seconds:.1f}s")
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert seconds < 30
        assert "refused the credentials" in proc.stderr and "MLFLOW_TRACKING_PASSWORD" in proc.stderr
        assert "Traceback" not in proc.stderr and password not in proc.stdout + proc.stderr
    assert not (tmp_path / "cache" / "teachers").exists() and not (tmp_path / "ray_results").exists()


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []


@pytest.mark.slow
def test_sweep_logs_over_http_and_never_leaks_the_password(server, researcher, tmp_path, monkeypatch, glue_dir,
                                                           tiny_bert_dir):
    from mlflow.tracking import MlflowClient

    user, password = researcher
    basic_token = base64.b64encode(f"{user}:{password}".encode()).decode()
    cache, results = tmp_path / "cache", tmp_path / "results"
    ray_tmp = Path(tempfile.mkdtemp(prefix="kdp-ray-"))  # short: Ray's socket paths have a length limit
    cfg = write_yaml(tmp_path / "sweep.yaml", SWEEP.format(glue=glue_dir, teacher=tiny_bert_dir))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "PG", "RAY_"))}
    env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password, KDP_CACHE_DIR=str(cache),
               RAY_TMPDIR=str(ray_tmp))
    try:
        proc = subprocess.run([sys.executable, "-m", "kdplatform.cli", "sweep", str(cfg), "--tracking-uri",
                               server.url, "--storage", str(results), "--num-cpus", "2"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        ray_logs = _files(ray_tmp)
        assert any(p.name.startswith("runtime_env_agent") for p in ray_logs), "Ray's session logs not found"
        leaked = [p for p in ray_logs if any(x.encode() in p.read_bytes() for x in (password, basic_token))]
        assert not leaked, f"credential in Ray's logs: {leaked}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    # read everything back as the researcher, over HTTP
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    c = MlflowClient(server.url)
    exp = c.get_experiment_by_name("deploy")
    assert exp is not None
    runs = c.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["kdp.role"] for r in runs) == ["student", "student", "sweep", "teacher"]
    assert all(r.info.status == "FINISHED" for r in runs)
    student = next(r for r in runs if r.data.tags["kdp.role"] == "student")
    assert "dev/best_score" in student.data.metrics
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in runs)  # served by the server

    # runs are rows in PostgreSQL; artifacts are files in the server's artifact store
    assert server.pg.psql("SELECT count(*) FROM runs", db="mlflow") == str(len(runs))
    stored = _files(server.workdir / "artifacts")
    assert any(p.name == "config.yaml" for p in stored), stored
    downloads = tmp_path / "download"
    for r in runs:
        c.download_artifacts(r.info.run_id, "", str(downloads / r.info.run_id))
    assert (downloads / student.info.run_id / "config.yaml").is_file()

    # the password is nowhere: params, tags, metric keys, names, artifacts, logs, caches, the database
    secrets_ = (password, basic_token)
    for r in runs:
        texts = [r.info.run_name, *r.data.params, *r.data.params.values(), *r.data.tags, *r.data.tags.values(),
                 *r.data.metrics]
        for s in secrets_:
            assert not any(s in t for t in texts), f"credential in params/tags of run {r.info.run_name}"
    for s in secrets_:
        assert s not in proc.stdout and s not in proc.stderr, "credential in the job's output"
        assert s not in server.log_file.read_text(errors="replace"), "credential in the server log"
    for f in _files(downloads) + stored + _files(cache) + _files(results):
        data = f.read_bytes()
        assert not any(s.encode() in data for s in secrets_), f"credential in {f}"
    dump = subprocess.run(["pg_dump", "-h", "127.0.0.1", "-p", str(server.pg.port), "-U", server.pg.user, "mlflow"],
                          env=server.pg.env(), capture_output=True, text=True, timeout=120, check=True).stdout
    assert "INSERT" in dump or "COPY" in dump
    assert password not in dump and basic_token not in dump
    assert student.info.run_id in dump  # the dump really holds the runs
