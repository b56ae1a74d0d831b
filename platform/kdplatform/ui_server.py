"""`kdplatform ui`: the MLflow UI as a child process group that ends with us.

Checked before the URL is printed: the store exists (the UI never creates an empty `mlflow.db` in the wrong
folder) and the port is free. The server runs in its own process group (MLflow starts uvicorn or gunicorn
workers under it); SIGTERM/SIGINT/SIGHUP to `kdplatform ui` are forwarded to the whole group, and the group is
killed if it has not ended STOP_GRACE_S later, so no server or worker outlives the command.

Who may use it (`check_access`): on a loopback address (the default) this machine only. Any other `--host`
must say who may write: `--auth` (MLflow's basic-auth app: a login for every request, the admin password from
MLFLOW_AUTH_ADMIN_PASSWORD) or `--read-only` (ui_read_only.py: write endpoints answer 403). Otherwise the
command refuses, since MLflow's UI deletes runs and experiments for anyone who can reach it. The Host check
MLflow applies (`--allowed-hosts`) is passed through, and widened to the name the printed URL uses.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kdplatform import tracking
from kdplatform.store_check import StoreUnusable, check_store, sqlite_path

STOP_GRACE_S = 10.0
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
AUTH_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"
MIN_PASSWORD = 12  # MLflow's basic-auth refuses shorter passwords


@dataclass(frozen=True)
class Access:
    """Who may use the UI: `auth` (basic-auth login), `read_only` (writes refused), `allowed_hosts` (the
    Host headers MLflow accepts, comma-separated, None for MLflow's default: localhost and private IPs)."""

    auth: bool = False
    read_only: bool = False
    allowed_hosts: str | None = None


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
        check_store(uri, write=False)  # browsing a read-only store is fine
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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: whatever it resolves to, other machines may resolve it too
        return False


def check_access(host: str, access: Access) -> None:
    """A UI reachable from other machines must say who may write (UiError naming the options otherwise)."""
    if access.auth and access.read_only:
        raise UiError("--auth and --read-only exclude each other.\n  fix: --read-only (anyone who reaches it "
                      "may browse, nobody may change anything) or --auth (a login; the admin may change runs)")
    if not is_loopback(host) and not (access.auth or access.read_only):
        raise UiError(f"--host {host} lets other machines reach the UI, and MLflow's UI deletes runs and "
                      "creates experiments for anyone who reaches it.\n  fix: add --read-only (browse only) or "
                      f"--auth (MLflow's basic-auth login; export {AUTH_PASSWORD_ENV}=<12+ characters> first), "
                      "or leave --host at 127.0.0.1")
    if access.auth:
        import importlib.util

        if importlib.util.find_spec("flask_wtf") is None:  # what mlflow[auth] adds
            raise UiError("--auth needs MLflow's auth extra, which is not installed.\n  fix: pip install "
                          "'mlflow[auth]'")
        password = os.environ.get(AUTH_PASSWORD_ENV, "")
        if len(password) < MIN_PASSWORD and not os.environ.get("MLFLOW_AUTH_CONFIG_PATH"):
            raise UiError(f"--auth needs the admin password in {AUTH_PASSWORD_ENV} ({MIN_PASSWORD} characters "
                          "or more; the login is user admin).\n  fix: export "
                          f"{AUTH_PASSWORD_ENV}=<password> and run again")


def url_of(host: str, port: int) -> str:
    """The address to print: this machine's name for a wildcard bind, else the host itself."""
    shown = socket.gethostname() if host in WILDCARD_HOSTS else host
    return f"http://{f'[{shown}]' if ':' in shown else shown}:{port}"


def allowed_hosts_for(host: str, access: Access) -> str | None:
    """The Host headers MLflow accepts: the user's list, else MLflow's default (localhost, private IPs)
    plus the name the printed URL uses (MLflow would answer that URL with 403)."""
    if access.allowed_hosts or host in ("127.0.0.1", "localhost", "::1"):  # MLflow's default covers these
        return access.allowed_hosts
    from mlflow.server.security_utils import get_default_allowed_hosts

    names = {socket.gethostname(), socket.getfqdn()} if host in WILDCARD_HOSTS else {host}
    return ",".join([*get_default_allowed_hosts(), *sorted(names), *sorted(f"{n}:*" for n in names)])


def server_command(uri: str, host: str, port: int, access: Access = Access()) -> tuple[list[str], dict[str, str]]:
    """The child's command line and environment: `mlflow ui`, with basic-auth or our read-only app."""
    options = ["--backend-store-uri", uri, "--host", host, "--port", str(port)]
    env = dict(os.environ)
    allowed = allowed_hosts_for(host, access)
    if allowed:
        options += ["--allowed-hosts", allowed]
    if access.read_only:
        return [sys.executable, "-m", "kdplatform.ui_read_only", *options], env
    if access.auth:
        options += ["--app-name", "basic-auth"]
        env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))  # one per server: all workers
        env.setdefault("MLFLOW_AUTH_CONFIG_PATH", _auth_config(uri))
    return [sys.executable, "-m", "mlflow", "ui", *options], env


def _auth_config(uri: str) -> str:
    """MLflow's basic-auth settings with its user database beside the store (not in the current folder)."""
    store = sqlite_path(uri)
    folder = store.parent if store is not None else Path.cwd()
    users = folder / "mlflow-auth.db"
    fd, path = tempfile.mkstemp(prefix="kdp-ui-auth-", suffix=".ini")
    with os.fdopen(fd, "w") as fh:  # no password in it: MLflow reads that from MLFLOW_AUTH_ADMIN_PASSWORD
        fh.write(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{users}\n"
                 "admin_username = admin\nauthorization_function = mlflow.server.auth:"
                 "authenticate_request_basic_auth\n")
    return path


def serve(uri: str, host: str, port: int, access: Access = Access(), log: Path | None = None) -> int:
    """Run `mlflow ui` in its own process group until it ends or we are signalled; returns its exit code.

    With `log`, the server's output (uvicorn's access lines, Starlette's deprecation warnings) goes to that
    file rather than the user's console."""
    cmd, env = server_command(uri, host, port, access)
    out = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "ab")  # noqa: SIM115  (closed in the finally below, after the server ends)
    try:
        # its own group: forwarded signals reach its workers
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=out,
                                stderr=subprocess.STDOUT if out else None)
        return _watch(proc, env)
    finally:
        if out is not None:
            out.close()


def log_tail(log: Path, lines: int = 15) -> str:
    """The last lines of the server's log (shown when it ends with an error)."""
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _watch(proc: subprocess.Popen, env: dict[str, str]) -> int:
    """Wait for the server; our SIGTERM/SIGINT/SIGHUP go to its whole group (killed STOP_GRACE_S later); the
    auth settings file made for it is removed when it ends."""
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
        made = env.get("MLFLOW_AUTH_CONFIG_PATH")
        if made and made != os.environ.get("MLFLOW_AUTH_CONFIG_PATH"):
            Path(made).unlink(missing_ok=True)
    return 0 if stop else code


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass
