"""Credentials for a team MLflow server travel only in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD:
a tracking URI holding a password is refused before anything runs, and the sweep never hands credentials
to Ray's runtime_env (which Ray writes into its session logs; remote nodes get them from their own
environment: docker/compose.yaml and docker/k8s/ set them there)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import write_yaml
from kdplatform import tracking

SECRET = "s3cr3t-" + "x" * 12
TRIAL = """
name: creds
task: sst2
method: kd
data: {source: glue_dir, glue_dir: /nonexistent}
teacher: {model: minilm-l6}
"""


@pytest.mark.parametrize("uri", [f"http://alice:{SECRET}@127.0.0.1:5000", f"https://alice:{SECRET}@mlflow.lab",
                                 f"postgresql://mlflow:{SECRET}@db:5432/mlflow"])
def test_a_uri_with_a_password_is_refused(uri):
    with pytest.raises(tracking.CredentialsInUri) as e:
        tracking.absolute_uri(uri)
    assert SECRET not in str(e.value) and "MLFLOW_TRACKING_PASSWORD" in str(e.value)


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "https://alice@mlflow.lab/", "postgresql://mlflow@db/mlflow"])
def test_uris_without_a_password_pass(uri):
    assert tracking.absolute_uri(uri) == uri


@pytest.mark.slow
@pytest.mark.parametrize("how", ["option", "env"])
@pytest.mark.parametrize("command", ["run", "sweep"])
def test_cli_refuses_a_password_in_the_tracking_uri_and_does_not_print_it(tmp_path, how, command):
    cfg = write_yaml(tmp_path / "t.yaml", TRIAL)
    uri = f"http://alice:{SECRET}@127.0.0.1:9"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    args = [sys.executable, "-m", "kdplatform.cli", command, str(cfg), "--dry-run"]
    if how == "option":
        args += ["--tracking-uri", uri]
    else:
        env["MLFLOW_TRACKING_URI"] = uri
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "MLFLOW_TRACKING_PASSWORD" in out and "Traceback" not in out
    assert SECRET not in out
    assert not (tmp_path / "mlflow.db").exists()


def test_credentials_never_enter_rays_runtime_env(monkeypatch):
    from kdplatform.sweep.driver import _worker_env

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", SECRET)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("KDP_CACHE_DIR", "/shared/cache")
    env = _worker_env()
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and env["KDP_CACHE_DIR"] == "/shared/cache"
    assert not {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "HF_TOKEN"} & set(env)
    assert SECRET not in repr(env)
