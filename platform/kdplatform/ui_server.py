"""`kdplatform ui`: the MLflow UI as a child process group that ends with us.

Checked before the URL is printed: the store exists (the UI never creates an empty `mlflow.db` in the wrong
folder) and the port is free. The server runs in its own process group (MLflow starts uvicorn or gunicorn
workers under it); SIGTERM/SIGINT/SIGHUP to `kdplatform ui` are forwarded to the whole group, and the group is
killed if it has not ended STOP_GRACE_S later, so no server or worker outlives the command.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from kdplatform import tracking
from kdplatform.store_check import StoreUnusable, check_store, sqlite_path

STOP_GRACE_S = 10.0


class UiError(ValueError):
    """A store or port the UI cannot use (exit 2)."""


def check_ui_store(uri: str) -> None:
    """The store must already hold runs (a SQLite file or a file-store folder) and be readable."""
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise UiError(f"no MLflow store at {path} (looked for {tracking.redact(uri)}).\n"
                      "  fix: run `kdplatform ui` in the folder where you ran `kdplatform run/sweep` (it holds "
                      "mlflow.db), or pass --tracking-uri sqlite:////path/to/mlflow.db")
    if uri.startswith("file://") and not os.path.isdir(uri[len("file://"):]):
        raise UiError(f"no MLflow store at {uri[len('file://'):]}.\n  fix: pass the folder that holds your runs "
                      "as --tracking-uri")
    try:
        check_store(uri)
    except StoreUnusable as e:
        raise UiError(str(e)) from None


def check_port_free(host: str, port: int) -> None:
    """Bind the port as the server will (SO_REUSEADDR, like uvicorn): busy -> UiError naming the fix."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UiError(f"port {port} on {host} is already in use (another `kdplatform ui` or MLflow "
                              f"server?).\n  fix: pass --port {port + 1} (or another free port), or stop the "
                              "other server") from None
            raise UiError(f"cannot listen on {host}:{port}: {e.strerror}.\n  fix: pass another --host or "
                          "--port") from None


def serve(uri: str, host: str, port: int, log: Path | None = None) -> int:
    """Run `mlflow ui` in its own process group until it ends or we are signalled; returns its exit code.

    With `log`, the server's output (uvicorn's access lines, Starlette's deprecation warnings) goes to that
    file rather than the user's console."""
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    out = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "ab")  # noqa: SIM115  (closed in the finally below, after the server ends)
    try:
        # its own group: forwarded signals reach its workers
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=out, stderr=subprocess.STDOUT if out else None)
        return _watch(proc)
    finally:
        if out is not None:
            out.close()


def log_tail(log: Path, lines: int = 15) -> str:
    """The last lines of the server's log (shown when it ends with an error)."""
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _watch(proc: subprocess.Popen) -> int:
    """Wait for the server; our SIGTERM/SIGINT/SIGHUP go to its whole group (killed STOP_GRACE_S later)."""
    stop: list[int] = []

    def forward(signum, _frame) -> None:
        stop.append(signum)
        _signal_group(proc.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    deadline = None
    try:
        while (code := proc.poll()) is None:
            if stop and deadline is None:
                deadline = time.monotonic() + STOP_GRACE_S
            if deadline is not None and time.monotonic() > deadline:  # signalled, still up: kill the group
                _signal_group(proc.pid, signal.SIGKILL)
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _signal_group(proc.pid, signal.SIGKILL)  # workers the server left behind, if any
    return 0 if stop else code


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass
