"""Who may use `kdplatform ui`, over real HTTP on loopback addresses (127.0.0.x) only.

A UI other machines can reach must say who may write: without --read-only or --auth, `--host 0.0.0.0` is
refused in seconds with one message. With --read-only, reads answer and every write endpoint (create, delete,
a GraphQL mutation) answers 403, the store unchanged. With --auth (MLflow's basic-auth app), a request without
credentials is refused (401) and the admin's is allowed, read back through the plain MLflow client.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from test_ui_process import free_port, make_store

PASSWORD = "a-long-admin-password-1"


def ui(args: list[str], cwd: Path, env_extra: dict[str, str] | None = None, **kw):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | (env_extra or {})
    return subprocess.run([sys.executable, "-m", "kdplatform.cli", "ui", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, **kw)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.11.12.13", "example.org"])
def test_a_host_other_machines_reach_is_refused_without_an_access_setting(tmp_path, host):
    uri = make_store(tmp_path / "mlflow.db")
    start = time.monotonic()
    proc = ui(["--tracking-uri", uri, "--host", host, "--port", str(free_port())], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert time.monotonic() - start < 30
    assert proc.stderr.startswith("error: ") and f"--host {host}" in proc.stderr
    assert "--read-only" in proc.stderr and "--auth" in proc.stderr and "Traceback" not in proc.stderr
    assert "http://" not in proc.stdout


def test_auth_without_a_password_is_refused_with_the_variable_to_set(tmp_path):
    uri = make_store(tmp_path / "mlflow.db")
    proc = ui(["--tracking-uri", uri, "--host", "0.0.0.0", "--auth", "--port", str(free_port())], tmp_path)
    assert proc.returncode == 2 and "MLFLOW_AUTH_ADMIN_PASSWORD" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "mlflow-auth.db").exists()


def test_the_read_only_filter_lets_reads_through_and_nothing_else():
    from kdplatform.ui_read_only import is_read

    assert is_read("GET", "/ajax-api/2.0/mlflow/experiments/search")
    assert is_read("POST", "/ajax-api/2.0/mlflow/runs/search")
    assert is_read("POST", "/graphql", b'{"query": "query MlflowGetRun { mlflowGetRun { run { info { runId } } } }"}')
    for method, path in [("POST", "/api/2.0/mlflow/experiments/create"), ("POST", "/ajax-api/2.0/mlflow/runs/delete"),
                         ("DELETE", "/api/2.0/mlflow/traces"), ("PATCH", "/api/2.0/mlflow/registered-models/update"),
                         ("POST", "/api/2.0/mlflow/runs/log-batch"), ("PUT", "/x/search")]:
        assert not is_read(method, path), (method, path)
    assert not is_read("POST", "/graphql", b'{"query": "mutation { testMutation(input: {}) { output } }"}')
    assert not is_read("POST", "/graphql", b"not json")


class Server:
    """`kdplatform ui` on 127.0.0.x in a process of its own; ended with SIGTERM (it ends its workers)."""

    def __init__(self, tmp_path: Path, host: str, args: list[str], env_extra: dict[str, str]):
        self.base = f"http://{host}:{free_port()}"
        port = self.base.rsplit(":", 1)[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | env_extra
        self.log = tmp_path / "ui.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "kdplatform.cli", "ui", "--host", host, "--port", port,
                                      *args], cwd=tmp_path, env=env, stdout=open(self.log, "w"),  # noqa: SIM115
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while time.time() < deadline and self.proc.poll() is None:
            try:
                urllib.request.urlopen(f"{self.base}/health", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        self.stop()
        pytest.fail(f"the UI did not answer:\n{self.log.read_text()[-3000:]}")

    def call(self, method: str, path: str, body: dict | None = None, user: tuple[str, str] | None = None):
        headers = {"Content-Type": "application/json"}
        if user:
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(user).encode()).decode()
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)


def _store_with_a_run(tmp_path: Path) -> tuple[str, str]:
    from mlflow.tracking import MlflowClient

    uri = make_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("kept"))
    return uri, run.info.run_id


@pytest.mark.slow
def test_read_only_ui_answers_reads_and_refuses_writes_over_http(tmp_path):
    from mlflow.tracking import MlflowClient

    uri, run_id = _store_with_a_run(tmp_path)
    server = Server(tmp_path, "127.0.0.2", ["--tracking-uri", uri, "--read-only"], {})
    try:
        status, body = server.call("POST", "/ajax-api/2.0/mlflow/runs/search",
                                   {"experiment_ids": ["1"], "max_results": 10})
        assert status == 200 and run_id in body.decode(), (status, body[:300])
        assert server.call("GET", "/ajax-api/2.0/mlflow/experiments/search?max_results=10")[0] == 200
        writes = [("POST", "/api/2.0/mlflow/experiments/create", {"name": "planted"}),
                  ("POST", "/ajax-api/2.0/mlflow/runs/delete", {"run_id": run_id}),
                  ("POST", "/api/2.0/mlflow/runs/set-tag", {"run_id": run_id, "key": "k", "value": "v"}),
                  ("POST", "/graphql", {"query": "mutation { testMutation(input: {}) { output } }"})]
        for method, path, body in writes:
            status, text = server.call(method, path, body)
            assert status == 403 and b"read-only" in text, (path, status, text[:300])
    finally:
        server.stop()
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.lifecycle_stage == "active" and "k" not in client.get_run(run_id).data.tags
    assert client.get_experiment_by_name("planted") is None


@pytest.mark.slow
def test_auth_ui_refuses_writes_without_credentials_and_allows_the_admin(tmp_path):
    from mlflow.tracking import MlflowClient

    uri, run_id = _store_with_a_run(tmp_path)
    server = Server(tmp_path, "127.0.0.3", ["--tracking-uri", uri, "--auth"],
                    {"MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD})
    admin = ("admin", PASSWORD)
    try:
        for method, path, body in [("POST", "/api/2.0/mlflow/experiments/create", {"name": "planted"}),
                                   ("POST", "/ajax-api/2.0/mlflow/runs/delete", {"run_id": run_id})]:
            assert server.call(method, path, body)[0] == 401, path
            assert server.call(method, path, body, user=("admin", "wrong-password-123"))[0] == 401, path
        assert MlflowClient(uri).get_experiment_by_name("planted") is None
        assert MlflowClient(uri).get_run(run_id).info.lifecycle_stage == "active"
        status, _ = server.call("POST", "/api/2.0/mlflow/experiments/create", {"name": "planted"}, user=admin)
        assert status == 200
        assert server.call("POST", "/ajax-api/2.0/mlflow/runs/delete", {"run_id": run_id}, user=admin)[0] == 200
    finally:
        server.stop()
    client = MlflowClient(uri)
    assert client.get_experiment_by_name("planted") is not None
    assert client.get_run(run_id).info.lifecycle_stage == "deleted"
    assert (tmp_path / "mlflow-auth.db").is_file(), "the user database lives beside the store"
