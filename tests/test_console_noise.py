"""Other libraries' messages stay out of the user's console and land in the log file the command names:
MLflow's "Creating initial MLflow database tables" on a store's first use, and the MLflow UI server's own
output (uvicorn, Starlette deprecation warnings)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_env, small_kd_yaml, write_yaml

FIRST_USE = """
import sys
from pathlib import Path
from kdplatform import runs
from kdplatform.library_logs import send_library_logs_to_file, wrote_library_log
log = send_library_logs_to_file()
parent = runs.create_parent(sys.argv[1], "noise", "noise", spec_hash="h", spec_file=Path(sys.argv[2]), runner="run")
parent.finish()
quiet = wrote_library_log()  # INFO lines only: kept in the file, announced by run/sweep only
assert wrote_library_log(warnings_only=False)
import logging
logging.getLogger("mlflow.store").warning("a library warning")
print(log, quiet, wrote_library_log())
"""


@pytest.mark.slow  # a CLI process that creates a store (about 5 s)
def test_a_new_store_creates_its_tables_without_a_console_line(tmp_path):
    spec = write_yaml(tmp_path / "noise.yaml", small_kd_yaml("noise"))
    env = cli_env(tmp_path, KDP_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", FIRST_USE, f"sqlite:///{tmp_path / 'new.db'}", str(spec)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Creating initial MLflow database tables" not in proc.stderr + proc.stdout, proc.stderr
    log, quiet, wrote = proc.stdout.split()
    assert (quiet, wrote) == ("False", "True") and Path(log) == tmp_path / "cache" / "logs" / "libraries.log"
    assert "Creating initial MLflow database tables" in Path(log).read_text()
    assert "a library warning" in Path(log).read_text() and "a library warning" not in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ui_server_output_goes_to_the_log_it_names(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    port = _free_port()
    env = {k: v for k, v in cli_env(tmp_path, KDP_CACHE_DIR=str(tmp_path / "cache")).items()
           if not k.startswith("MLFLOW_")}
    log = tmp_path / "cache" / "logs" / f"ui-{port}.log"
    proc = subprocess.Popen([sys.executable, "-m", "kdplatform.cli", "ui", "--tracking-uri", uri, "--port",
                             str(port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and "Uvicorn running" not in (log.read_text() if log.exists() else ""):
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, errs = proc.communicate(timeout=60)
    assert "Uvicorn running" in log.read_text(), "the server's output is in its log"
    assert f"server log: {log}" in " ".join(out.split()), out
    assert "Warning" not in errs and "INFO" not in errs and "INFO" not in out, errs
    assert os.path.getsize(log) > 0
