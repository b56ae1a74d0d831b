"""A tracking store that cannot be used fails in seconds, with one message and a fix, before any work.

Real stores only: a closed port on 127.0.0.1 (a socket bound then closed), a garbage file as `mlflow.db`, a
database URI whose driver is not installed. `kdplatform run` and `sweep` run as subprocesses, as a user runs
them, and are timed. The basic-auth server case (401) is in test_deploy_server.py, where that server runs.
Also: how long a store that goes away mid-trial is retried (one retry layer, the measured bound README
states), and the password redaction of every userinfo form.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_sst2, write_yaml
from kdplatform import tracking

TRIAL = """
name: storefail
task: sst2
method: kd
{tiny}
train:
  - {{name: pred, max_steps: 2, eval_every: 2, batch_size: 16}}
"""
LIMIT_S = 30


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kdp(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({"HF_HUB_OFFLINE": "1", "KDP_CACHE_DIR": str(cwd / "cache")})
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "kdplatform.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=LIMIT_S * 4)
    return proc, time.monotonic() - start


def assert_refused(proc: subprocess.CompletedProcess, seconds: float, *fragments: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert seconds < LIMIT_S, f"took {seconds:.1f}s"
    assert proc.stderr.startswith("error: ") and "Traceback" not in out, out[-3000:]
    for f in fragments:
        assert f in " ".join(proc.stderr.split()), (f, proc.stderr)
    assert "fix:" in proc.stderr
    assert "ended KILLED" not in out and "parent run" not in out, "nothing was started"


@pytest.fixture()
def trial_file(tmp_path, glue_dir, tiny_bert_dir) -> Path:
    return write_yaml(tmp_path / "trial.yaml", TRIAL.format(tiny=tiny_sst2(glue_dir, tiny_bert_dir, layers=2, train_eval=None)))


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "sweep", "teacher"])
def test_a_closed_port_exits_2_within_seconds(command, trial_file, tmp_path):
    uri = f"http://127.0.0.1:{closed_port()}"
    proc, seconds = kdp([command, str(trial_file), "--tracking-uri", uri], tmp_path)
    print(f"{command} against a closed port: exit {proc.returncode} after {seconds:.1f}s")
    assert_refused(proc, seconds, f"cannot use the tracking server at {uri}", "Connection refused")
    assert not (tmp_path / "cache" / "teachers").exists() and not (tmp_path / "ray_results").exists()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "sweep"])
def test_a_corrupt_mlflow_db_exits_2_and_is_left_as_it_was(command, trial_file, tmp_path):
    garbage = os.urandom(3000)
    (tmp_path / "mlflow.db").write_bytes(garbage)  # the default store of the working directory
    proc, seconds = kdp([command, str(trial_file)], tmp_path)
    assert_refused(proc, seconds, f"{tmp_path / 'mlflow.db'} is unusable: it is not an SQLite database",
                   "move it aside")
    assert (tmp_path / "mlflow.db").read_bytes() == garbage


def test_a_damaged_sqlite_store_is_refused(trial_file, tmp_path):
    """A real SQLite header over garbage pages (a half-overwritten file): SQLite itself cannot read it."""
    import sqlite3

    db = tmp_path / "m.db"
    with sqlite3.connect(db) as con:
        con.execute("create table t (x)")
        con.executemany("insert into t values (?)", [("x" * 500,)] * 200)
    data = bytearray(db.read_bytes())
    data[100:] = os.urandom(len(data) - 100)
    db.write_bytes(bytes(data))
    proc, seconds = kdp(["run", str(trial_file), "--tracking-uri", f"sqlite:///{db}"], tmp_path)
    assert_refused(proc, seconds, f"{db} is unusable: SQLite cannot read it")


@pytest.mark.parametrize(("uri", "module", "package"), [
    ("postgresql+psycopg2://kdp@127.0.0.1:5432/mlflow", "psycopg2", "psycopg2-binary"),
    ("mysql://kdp@127.0.0.1:3306/mlflow", "MySQLdb", "mysqlclient"),
])
@pytest.mark.slow
def test_a_database_uri_without_its_driver_exits_2_naming_the_package(uri, module, package, trial_file, tmp_path):
    pytest.importorskip("sqlalchemy")
    try:
        __import__(module)
        pytest.skip(f"{module} is installed here: the missing-driver case cannot be shown")
    except ImportError:
        pass
    proc, seconds = kdp(["run", str(trial_file), "--tracking-uri", uri], tmp_path)
    assert_refused(proc, seconds, f"needs the Python database driver '{module}'", f"pip install {package}")


def test_a_database_that_refuses_connections_exits_2(trial_file, tmp_path):
    from sqlalchemy.engine import make_url

    try:
        make_url("postgresql://x@h/d").get_dialect().import_dbapi()
    except ImportError:
        pytest.skip("no PostgreSQL driver installed (pip install 'psycopg[binary]')")
    uri = f"postgresql://kdp@127.0.0.1:{closed_port()}/mlflow"
    proc, seconds = kdp(["run", str(trial_file), "--tracking-uri", uri], tmp_path)
    assert_refused(proc, seconds, f"cannot use the database at {uri}", "Connection refused")


def test_mlflows_own_http_retries_are_off_so_one_layer_retries():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP")}
    out = subprocess.run([sys.executable, "-c", "import os, kdplatform.tracking; print(os.environ["
                          "'MLFLOW_HTTP_REQUEST_MAX_RETRIES'], os.environ['MLFLOW_HTTP_REQUEST_TIMEOUT'])"],
                         env=env, capture_output=True, text=True, timeout=60).stdout.split()
    assert out == ["0", "30"]


@pytest.mark.slow
def test_a_store_gone_mid_trial_is_retried_about_a_minute_then_fails_keeping_the_points(tmp_path):
    """Default budget (8 attempts, 61.5 s of waits) against a server that went away: measured, then the
    error propagates with every buffered point still held (the trial ends FAILED, nothing lost silently)."""
    from mlflow.exceptions import MlflowException

    from kdplatform.tracking import RETRY_ATTEMPTS, RETRY_DELAY, RETRY_MAX_DELAY, RunLogger

    assert (RETRY_ATTEMPTS, RETRY_DELAY) == (8, 0.5), "the README figure is for the default budget"
    logger = RunLogger(f"sqlite:///{tmp_path / 'm.db'}", "gone", "r", {})
    logger.client = tracking.client(f"http://127.0.0.1:{closed_port()}")  # the server went away mid-trial
    logger.add_metrics({"dev/acc": 0.5, "loss/total": 1.0}, step=2)
    start = time.monotonic()
    with pytest.raises((MlflowException, OSError)):
        logger.flush()
    seconds = time.monotonic() - start
    print(f"a store gone mid-trial: gave up after {seconds:.1f}s")
    waits = sum(min(RETRY_DELAY * 2**i, RETRY_MAX_DELAY) for i in range(RETRY_ATTEMPTS - 1))
    assert waits <= seconds < waits + 20, seconds
    assert len(logger._metrics) == 2, "the points are kept for a later flush"


@pytest.mark.parametrize(("text", "shown", "secret"), [
    ("http://alice:s3cret@mlflow:5000/x", "http://alice:***@mlflow:5000/x", "s3cret"),
    ("http://:pw-only-secret@host:5000", "http://:***@host:5000", "pw-only-secret"),
    ("http://alice:p@ss-secret@host", "http://alice:***@host", "ss-secret"),
    ("https://alice:a@b@c-secret@mlflow.lab/", "https://alice:***@mlflow.lab/", "c-secret"),
    ("postgresql://u:p-secret@h/db", "postgresql://u:***@h/db", "p-secret"),
    ("postgresql://u:p%40ss-secret@db/mlflow", "postgresql://u:***@db/mlflow", "ss-secret"),
    ("mysql+pymysql://u:pw%2Fsecret@db:3306/m", "mysql+pymysql://u:***@db:3306/m", "pw%2Fsecret"),
    ("alice:bare-secret@mlflow:5000", "alice:***@mlflow:5000", "bare-secret"),
    ("error at http://a:x-secret@h and mysql://b:y-secret@i/d.", "error at http://a:***@h and mysql://b:***@i/d.",
     "-secret"),
    ("uri='http://alice:q-secret@h/'", "uri='http://alice:***@h/'", "q-secret"),
])
def test_redact_hides_every_userinfo_form(text, shown, secret):
    assert tracking.redact(text) == shown
    assert secret not in tracking.redact(text)
    with pytest.raises(tracking.CredentialsInUri) as e:
        tracking.absolute_uri(text)
    assert secret not in str(e.value)


@pytest.mark.parametrize("text", ["sqlite:////tmp/m.db", "https://alice@mlflow.lab/", "http://127.0.0.1:5000",
                                  "file:///tmp/a:b@c", "error: x@y", "postgresql://mlflow@db/mlflow"])
def test_redact_leaves_uris_without_a_password_alone(text):
    assert tracking.redact(text) == text
