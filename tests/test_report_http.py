"""The report against an MLflow tracking server (HTTP): same numbers as the SQL fast path on the same file,
read through MLflow's public REST API only, and every run linked to its MLflow UI page."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import pytest

import report_fixtures as rf
from kdplatform.report import collect as C
from kdplatform.report import render

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-http")
    store = rf.cached_test_store(root)
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store["uri"], "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 150
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.skip("mlflow server did not start")
                time.sleep(0.5)
        yield {**store, "url": url}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: the group this fixture started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_server_reads_the_same_as_the_database(server):
    remote = C.collect_runs(server["url"], experiment=rf.MAIN)  # public REST API only
    local = C.collect_runs(server["uri"], experiment=rf.MAIN)  # the SQL fast path on the same file
    a = remote.runs.sort_values("run_id").reset_index(drop=True)
    b = local.runs.sort_values("run_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(a[sorted(b.columns)], b[sorted(b.columns)])
    key = ["run_id", "key", "step"]
    pd.testing.assert_frame_equal(remote.history.sort_values(key).reset_index(drop=True),
                                  local.history.sort_values(key).reset_index(drop=True))


def test_report_over_http_links_every_run(server, tmp_path):
    out = tmp_path / "report"
    assert render.report_command(rf.MAIN, None, ["paper_table"], str(out), "html,csv", server["url"]) == 0
    page = (out / "index.html").read_text()
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == len(rf.main_runs())
    for url in runs.url:
        assert url.startswith(f"{server['url']}/#/experiments/") and f'href="{url}"' in page
