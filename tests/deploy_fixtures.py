"""Real deployment pieces on loopback for the deploy tests: a throwaway PostgreSQL cluster and an
`mlflow server` on it, both bound to 127.0.0.1 on free ports. The server runs docker/compose.yaml's own
`mlflow` command and environment (basic-auth app, artifacts served through the server) through the
image's entry point docker/mlflow/entrypoint.sh; only addresses and paths are swapped for local ones.

Nothing here needs Docker. PostgreSQL comes from the Debian package (`apt-get install postgresql`):
its binaries under /usr/lib/postgresql/<major>/bin (or `KDP_PG_BINDIR`). `initdb` refuses to run as
root, so as root the cluster runs as the package's `postgres` user (through `runuser`) in a temporary
folder that user owns. Every secret is generated per test session, and the database password only ever
travels in `PGPASSWORD` (libpq reads it), never in a URI or a command line.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"

# ---------------------------------------------------------------------------------- compose helpers
_VAR = re.compile(r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
                  r"|\$(?P<plain>[A-Za-z_][A-Za-z0-9_]*)")


class MissingVariable(KeyError):
    pass


def interpolate_str(text: str, env: dict[str, str]) -> str:
    """Compose-spec interpolation of one string: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error},
    ${VAR?error}, ${VAR:+alt}, $VAR, and $$ for a literal $."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("braced") or m.group("plain")
        op, arg = m.group("op"), m.group("arg") or ""
        val = env.get(name)
        unset, empty = val is None, not val
        if op == ":-":
            return arg if empty else val
        if op == "-":
            return arg if unset else val
        if op in (":?", "?") and (empty if op == ":?" else unset):
            raise MissingVariable(f"{name}: {arg}")
        if op == ":+":
            return "" if empty else arg
        if op == "+":
            return "" if unset else arg
        return val or ""

    return _VAR.sub(sub, text)


def interpolate(obj: Any, env: dict[str, str]) -> Any:
    if isinstance(obj, str):
        return interpolate_str(obj, env)
    if isinstance(obj, list):
        return [interpolate(v, env) for v in obj]
    if isinstance(obj, dict):
        return {k: interpolate(v, env) for k, v in obj.items()}
    return obj


def strings(obj: Any):
    """Every string in a loaded YAML document (keys and values)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, list):
        for v in obj:
            yield from strings(v)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from strings(k)
            yield from strings(v)


def referenced_variables(obj: Any) -> dict[str, set[str]]:
    """Variable name -> the operators it is used with ('' for plain ${VAR} / $VAR); $$VAR is not one."""
    out: dict[str, set[str]] = {}
    for s in strings(obj):
        for m in _VAR.finditer(s):
            name = m.group("braced") or m.group("plain")
            if name:
                out.setdefault(name, set()).add(m.group("op") or "")
    return out


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def env_example() -> dict[str, str]:
    """The KEY=value lines of docker/.env.example."""
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def option(argv: list[str], name: str) -> str:
    """The value after `name` in an argv list (`--opt value` or `--opt=value`)."""
    for i, a in enumerate(argv):
        if a == name:
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    raise KeyError(name)


def replace_option(argv: list[str], name: str, value: str) -> list[str]:
    out = list(argv)
    i = out.index(name)
    out[i + 1] = value
    return out



def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bindir() -> Path | None:
    """The folder holding initdb/pg_ctl: `KDP_PG_BINDIR`, else the newest /usr/lib/postgresql/*/bin."""
    env = os.environ.get("KDP_PG_BINDIR")
    if env and (Path(env) / "initdb").is_file():
        return Path(env)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def why_no_postgres() -> str | None:
    """None when a throwaway cluster can be started here, else the reason (for pytest.skip)."""
    if pg_bindir() is None:
        return "PostgreSQL server binaries not found: apt-get install postgresql (or set KDP_PG_BINDIR)"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run initdb as"
        if shutil.which("runuser") is None:
            return "running as root and `runuser` is missing (util-linux)"
    return None


def missing_server_packages() -> list[str]:
    """Python packages the MLflow team server needs that are not installed (pip, so CI must have them)."""
    import importlib.util

    wanted = {"psycopg": "psycopg[binary]",  # SQLAlchemy 2.1 maps postgresql:// to psycopg 3
              "flask_wtf": "mlflow[auth]"}  # the basic-auth app
    return [pkg for mod, pkg in wanted.items() if importlib.util.find_spec(mod) is None]


_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback never goes through a proxy


def _wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before {url} answered")
        try:
            with _LOCAL.open(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers (even if with 401): the server is up
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


@dataclass
class Postgres:
    """A throwaway cluster: user `kdp`, a generated password, databases created with `create_db`."""

    root: Path
    port: int
    user: str = "kdp"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    bindir: Path = field(default_factory=lambda: pg_bindir())  # type: ignore[arg-type]

    @property
    def data(self) -> Path:
        return self.root / "data"

    def _as_owner(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd

    def start(self) -> Postgres:
        self.root.mkdir(parents=True, exist_ok=True)
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        os.chmod(self.root, 0o700)
        os.chmod(pwfile, 0o600)
        subprocess.run(self._as_owner([str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user,
                                       f"--pwfile={pwfile}", "--auth-local=scram-sha-256",
                                       "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"]),
                       check=True, capture_output=True, text=True, timeout=120)
        pwfile.unlink()
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c shared_buffers=32MB -c max_connections=60")
        subprocess.run(self._as_owner([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l",
                                       str(self.root / "server.log"), "-o", opts, "-w", "-t", "60", "start"]),
                       check=True, capture_output=True, text=True, timeout=90)
        return self

    def env(self) -> dict[str, str]:
        """Environment for a libpq client (psql, psycopg, an mlflow server) of this cluster."""
        return {**os.environ, "PGPASSWORD": self.password, "PGHOST": "127.0.0.1", "PGPORT": str(self.port),
                "PGUSER": self.user}

    def psql(self, sql: str, db: str = "postgres") -> str:
        out = subprocess.run(["psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                              "-p", str(self.port), "-U", self.user, "-d", db, "-c", sql],
                             env=self.env(), check=True, capture_output=True, text=True, timeout=60)
        return out.stdout.strip()

    def create_db(self, name: str) -> str:
        self.psql(f'CREATE DATABASE "{name}"')
        return name

    def uri(self, db: str) -> str:
        """A SQLAlchemy URI with no password in it: libpq takes it from PGPASSWORD."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        if self.data.is_dir():
            subprocess.run(self._as_owner([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                                           "-w", "stop"]), capture_output=True, timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres() -> Postgres:
    # Not under pytest's tmp_path: its parents are 0700 root, which the postgres user cannot traverse.
    root = Path(tempfile.mkdtemp(prefix="kdp-pg-"))
    return Postgres(root=root, port=free_port()).start()


@dataclass
class MlflowServer:
    """`mlflow server --app-name basic-auth` on PostgreSQL, artifacts served through the server."""

    pg: Postgres
    workdir: Path
    port: int = field(default_factory=free_port)
    admin_user: str = "admin"
    admin_password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.workdir / "mlflow-server.log"

    def service_env(self) -> dict[str, str]:
        """What the compose file interpolates: generated secrets and the example's settings."""
        return {**env_example(), "POSTGRES_USER": self.pg.user, "POSTGRES_PASSWORD": self.pg.password,
                "MLFLOW_ADMIN_USERNAME": self.admin_user, "MLFLOW_ADMIN_PASSWORD": self.admin_password,
                "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secret_key}

    def command(self) -> list[str]:
        """The `mlflow` service's command from docker/compose.yaml, pointed at this machine's loopback."""
        svc = interpolate(load_compose()["services"]["mlflow"], self.service_env())
        argv = svc["command"]
        argv = replace_option(argv, "--backend-store-uri", self.pg.uri("mlflow"))
        argv = replace_option(argv, "--artifacts-destination", str(self.workdir / "artifacts"))
        argv = replace_option(argv, "--host", "127.0.0.1")
        argv = replace_option(argv, "--port", str(self.port))
        argv = replace_option(argv, "--workers", "1")
        if argv[0] != "mlflow":
            raise ValueError(f"the mlflow service's command should start with `mlflow`: {argv}")
        # run through the image's entry point, which writes the basic-auth config from the environment
        return ["sh", str(DOCKER / "mlflow" / "entrypoint.sh"), sys.executable, "-m", "mlflow", *argv[1:]]

    def environment(self) -> dict[str, str]:
        """The `mlflow` service's environment from docker/compose.yaml, with this machine's database."""
        svc = interpolate(load_compose()["services"]["mlflow"], self.service_env())
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG"))}
        env.update({k: str(v) for k, v in svc["environment"].items()})
        env.update(MLFLOW_AUTH_DATABASE_URI=self.pg.uri(env_example()["MLFLOW_AUTH_DB"]), HOME=str(self.workdir))
        return env

    def start(self, timeout: float = 120) -> MlflowServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pg.create_db("mlflow")
        # the users database, made by the script the postgres image runs on a fresh volume
        subprocess.run(["sh", str(DOCKER / "postgres" / "create-auth-db.sh")], check=True, capture_output=True,
                       timeout=60, env={**self.pg.env(), "POSTGRES_USER": self.pg.user, "POSTGRES_DB": "mlflow",
                                        "MLFLOW_AUTH_DB": env_example()["MLFLOW_AUTH_DB"]})
        log = open(self.log_file, "wb")  # noqa: SIM115  (closed when the process is stopped)
        self.proc = subprocess.Popen(self.command(), env=self.environment(), stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir, start_new_session=True)
        log.close()
        try:
            _wait_http(self.url + "/health", timeout, self.proc)
        except Exception as e:
            self.stop()
            raise RuntimeError(f"mlflow server did not start: {e}\n{self.log_file.read_text()[-3000:]}") from e
        return self

    def request(self, method: str, path: str, body: dict | None = None,
                auth: tuple[str, str] | None = None) -> tuple[int, str]:
        """One HTTP request to the server: (status, body text); HTTP errors are returned, not raised."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with _LOCAL.open(req, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def create_user(self, username: str, password: str) -> None:
        status, text = self.request("POST", "/api/2.0/mlflow/users/create",
                                    {"username": username, "password": password},
                                    auth=(self.admin_user, self.admin_password))
        if status != 200:
            raise RuntimeError(f"creating user {username} failed: {status} {text[:300]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its uvicorn workers
                self.proc.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc = None
