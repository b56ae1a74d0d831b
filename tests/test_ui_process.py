"""`kdplatform ui` as a real process: refuses a busy port and a folder without a store (exit 2, one message,
before printing a URL), listens on 127.0.0.1 only, and SIGTERM ends the MLflow server and its uvicorn
workers with it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_store(path: Path) -> str:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{path}"
    MlflowClient(uri).search_experiments()  # creates the schema, as a first `kdplatform run` does
    return uri


def ui(args: list[str], cwd: Path, **kw):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run([sys.executable, "-m", "kdplatform.cli", "ui", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, **kw)


def test_a_busy_port_exits_2_before_printing_a_url(tmp_path):
    uri = make_store(tmp_path / "mlflow.db")
    with socket.socket() as other:  # another server holds the port
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        start = time.monotonic()
        proc = ui(["--tracking-uri", uri, "--port", str(port)], tmp_path)
        seconds = time.monotonic() - start
    print(f"busy port: exit {proc.returncode} after {seconds:.1f}s")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert seconds < 30
    assert f"port {port} on 127.0.0.1 is already in use" in proc.stderr and "fix:" in proc.stderr
    assert "http://" not in proc.stdout and "Traceback" not in proc.stderr


def test_a_folder_without_a_store_exits_2_and_creates_nothing(tmp_path):
    proc = ui(["--port", str(free_port())], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"no MLflow store at {tmp_path / 'mlflow.db'}" in " ".join(proc.stderr.split())
    assert not (tmp_path / "mlflow.db").exists(), "an empty store was created"
    assert "http://" not in proc.stdout


def _session_pids(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            pids.append(int(stat.parent.name))
    return pids


def _children(pid: int) -> set[int]:
    """Every descendant of `pid`, from /proc (the server starts in its own process group)."""
    parent_of = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parent_of[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent_of.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


@pytest.mark.slow
def test_sigterm_ends_the_server_and_its_workers_and_it_listens_on_loopback_only(tmp_path):
    uri = make_store(tmp_path / "mlflow.db")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    log = open(tmp_path / "ui.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "kdplatform.cli", "ui", "--tracking-uri", uri, "--port",
                             str(port)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    children: set[int] = set()
    try:
        deadline = time.time() + 240
        listening = ""
        while time.time() < deadline and proc.poll() is None:
            listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                                       text=True).stdout
            if listening.strip():
                break
            time.sleep(1)
        assert listening.strip(), (tmp_path / "ui.log").read_text()[-3000:]
        assert all(line.split()[3].startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:"))
                   for line in listening.splitlines() if line.strip()), listening
        children = _children(proc.pid)
        assert len(children) >= 2, "the MLflow server and its uvicorn workers run"
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        gone = time.time() + 20
        while time.time() < gone and any(_alive(p) for p in children):
            time.sleep(0.5)
        print(f"ui: {len(children)} child processes, all ended {time.monotonic() - start:.1f}s after SIGTERM")
        assert code == 0
        assert not [p for p in children if _alive(p)], "a server process outlived `kdplatform ui`"
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))  # the port is free again
    finally:
        log.close()
        for p in children | {proc.pid}:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
