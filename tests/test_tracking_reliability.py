"""MLflow writes survive outages and contention, and a trial whose metrics cannot be written fails loudly.

- `tracking.retry`: transient errors are retried with exponential backoff, permanent ones raised at once.
- A real `mlflow server` (HTTP) behind a TCP proxy that the test takes down and brings back: a flush during a
  short outage waits, retries and writes every buffered point; an outage longer than the retry budget makes
  the flush (and `finish`) raise, with the points still buffered and written once the server is back, and
  the run never marked FINISHED meanwhile.
- SQLite: a store locked by another connection's write transaction; 4 processes logging at once into one
  fresh store (every point read back, count and values).
- A trial whose metric writes keep failing raises and its run ends FAILED with the reason, not FINISHED.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from conftest import tiny_sst2
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient

from kdplatform import tracking


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def fast_retries(monkeypatch):
    """A retry budget in seconds, not minutes; MLflow's own HTTP retries off, so ours do the work."""
    monkeypatch.setattr(tracking, "RETRY_ATTEMPTS", 10)
    monkeypatch.setattr(tracking, "RETRY_DELAY", 0.2)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def history(c: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in c.get_metric_history(run_id, key))


# --------------------------------------------------------------------------------------------- retry()
def test_retry_backs_off_on_transient_errors_then_succeeds(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(tracking.time, "sleep", sleeps.append)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise MlflowException("(sqlite3.OperationalError) database is locked", TEMPORARILY_UNAVAILABLE)
        return "ok"

    assert tracking.retry(flaky, "log metrics", attempts=6, base_delay=0.5) == "ok"
    assert len(calls) == 4 and sleeps == [0.5, 1.0, 2.0]


def test_retry_gives_up_after_the_budget_and_raises(monkeypatch):
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    calls = []

    def down():
        calls.append(1)
        raise MlflowException("API request to http://127.0.0.1:1/api failed: Connection refused")

    with pytest.raises(MlflowException, match="Connection refused"):
        tracking.retry(down, "log metrics", attempts=3)
    assert len(calls) == 3


def test_retry_does_not_retry_a_permanent_error(monkeypatch):
    monkeypatch.setattr(tracking.time, "sleep", lambda s: pytest.fail("slept on a permanent error"))
    calls = []

    def bad():
        calls.append(1)
        raise MlflowException("Changing param values is not allowed", INVALID_PARAMETER_VALUE)

    with pytest.raises(MlflowException):
        tracking.retry(bad, "log params", attempts=5)
    assert len(calls) == 1


def test_retry_delays_are_capped(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(tracking.time, "sleep", sleeps.append)
    with pytest.raises(OSError):
        tracking.retry(lambda: (_ for _ in ()).throw(OSError("disk")), "x", attempts=10, base_delay=1.0)
    assert max(sleeps) == tracking.RETRY_MAX_DELAY


# ------------------------------------------------------------------------------------- HTTP server
class Proxy:
    """A TCP forwarder to the MLflow server that can be taken down (connections refused, open ones cut)."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        srv.settimeout(0.1)
        self._listener = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def down(self) -> None:
        srv, self._listener = self._listener, None
        if srv is not None:
            srv.close()
        with self._lock:
            for s in self._open:
                _close(s)
            self._open.clear()

    def _accept(self, srv: socket.socket) -> None:
        while self._listener is srv:
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                back = socket.create_connection(self.target)
            except OSError:
                _close(conn)
                continue
            conn.settimeout(None)
            with self._lock:
                self._open += [conn, back]
            for a, b in ((conn, back), (back, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a SQLite store, started once for the module (it takes a while to boot)."""
    d = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = open(d / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{d / 'srv.db'}",
         "--artifacts-destination", str(d / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {(d / 'server.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail("mlflow server did not start in 300 s")
                time.sleep(0.5)
        yield port
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a throwaway server on a temporary store
        proc.wait(timeout=60)
        log.close()


@pytest.fixture()
def proxy(mlflow_server):
    p = Proxy(mlflow_server)
    p.up()
    yield p
    p.down()


@pytest.mark.slow
def test_a_flush_during_a_short_outage_waits_and_loses_nothing(proxy, mlflow_server, fast_retries, caplog):
    logger = tracking.RunLogger(proxy.uri, "reliability", "outage", {"kdp.role": "student"})
    logger.log_params({"lr": 0.1})
    for step in range(50):
        logger.add_metrics({"loss": 1.0 / (step + 1), "acc": step / 100}, step)
    logger.flush()

    proxy.down()
    for step in range(50, 100):  # buffered while the server is unreachable
        logger.add_metrics({"loss": 1.0 / (step + 1), "acc": step / 100}, step)
    errors: list[BaseException] = []

    def flush() -> None:
        try:
            logger.flush()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    with caplog.at_level(logging.WARNING, logger="kdplatform"):
        t = threading.Thread(target=flush)
        t.start()
        time.sleep(3.0)  # the outage
        assert t.is_alive(), "the flush returned while the server was down"
        proxy.up()
        t.join(timeout=120)
    assert not t.is_alive() and not errors, errors
    assert any("retrying" in r.getMessage() for r in caplog.records), "the outage was not noticed"
    logger.finish()

    c = MlflowClient(f"http://127.0.0.1:{mlflow_server}")
    run = c.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    assert history(c, logger.run_id, "loss") == [(s, 1.0 / (s + 1)) for s in range(100)]
    assert history(c, logger.run_id, "acc") == [(s, s / 100) for s in range(100)]


@pytest.mark.slow
def test_an_outage_longer_than_the_retries_raises_and_keeps_the_points(proxy, mlflow_server, monkeypatch,
                                                                       fast_retries):
    logger = tracking.RunLogger(proxy.uri, "reliability", "long-outage", {})
    for step in range(20):
        logger.add_metrics({"loss": float(step)}, step)
    proxy.down()
    monkeypatch.setattr(tracking, "RETRY_ATTEMPTS", 3)
    monkeypatch.setattr(tracking, "RETRY_DELAY", 0.05)
    started = time.time()
    with pytest.raises(MlflowException):
        logger.flush()  # in a trial: the exception ends it (loudly), it does not finish with holes
    with pytest.raises(MlflowException):
        logger.finish()  # nor can it be marked FINISHED while its metrics are unwritten
    assert time.time() - started < 60

    proxy.up()
    c = MlflowClient(f"http://127.0.0.1:{mlflow_server}")
    assert c.get_run(logger.run_id).info.status == "RUNNING", "never FINISHED with missing metrics"
    logger.finish()  # the server is back: everything buffered is written, then the run ends
    assert history(c, logger.run_id, "loss") == [(s, float(s)) for s in range(20)]
    assert c.get_run(logger.run_id).info.status == "FINISHED"


# ------------------------------------------------------------------------------------------- SQLite
def test_a_flush_against_a_locked_sqlite_store_waits_and_succeeds(tmp_path, fast_retries):
    db = tmp_path / "m.db"
    uri = f"sqlite:///{db}"
    logger = tracking.RunLogger(uri, "reliability", "locked", {})
    for step in range(200):
        logger.add_metrics({"a": step * 0.5, "b": -step}, step)

    lock = sqlite3.connect(db, timeout=30, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # another process's write transaction holds the whole file
    done = threading.Event()
    errors: list[BaseException] = []

    def flush() -> None:
        try:
            logger.flush()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        done.set()

    t = threading.Thread(target=flush)
    t.start()
    time.sleep(2.0)
    assert not done.is_set(), "the flush got through an exclusive lock"
    lock.execute("COMMIT")
    lock.close()
    t.join(timeout=120)
    assert done.is_set() and not errors, errors
    logger.finish()
    c = MlflowClient(uri)
    assert history(c, logger.run_id, "a") == [(s, s * 0.5) for s in range(200)]
    assert history(c, logger.run_id, "b") == [(s, float(-s)) for s in range(200)]


def _writer(uri: str, idx: int, go, out) -> None:
    """One trial's logging: 100 log_batch calls of 5 points each, all four writers at once."""
    logger = tracking.RunLogger(uri, "concurrent", f"writer-{idx}", {"kdp.writer": str(idx)})
    go.wait(timeout=300)
    for step in range(100):
        logger.add_metrics({f"m{j}": idx * 1000 + step + j / 10 for j in range(5)}, step)
        logger.flush()
    logger.finish()
    out.put((idx, logger.run_id))


@pytest.mark.slow
def test_four_processes_log_to_one_fresh_sqlite_store_and_lose_nothing(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")  # separate processes, without paying mlflow's import four times
    uri = f"sqlite:///{tmp_path / 'shared.db'}"  # not created yet: the writers also race to create it
    go, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(uri, i, go, out)) for i in range(4)]
    for p in procs:
        p.start()
    go.set()
    run_ids = dict(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    c = MlflowClient(uri)
    for idx, run_id in sorted(run_ids.items()):
        run = c.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["kdp.writer"] == str(idx)
        total = 0
        for j in range(5):
            h = history(c, run_id, f"m{j}")
            assert h == [(step, idx * 1000 + step + j / 10) for step in range(100)], f"writer {idx} m{j}"
            total += len(h)
        assert total == 500


# --------------------------------------------------------------------------------- a trial, end to end
TRIAL = """
name: unwritable
task: sst2
method: kd
{tiny}
train:
  - {{name: pred, max_steps: 4, eval_every: 2, batch_size: 16}}
"""


@pytest.mark.slow
def test_a_trial_whose_metrics_cannot_be_written_fails_loudly(tmp_path, glue_dir, tiny_bert_dir, monkeypatch):
    from kdplatform.config import load_trials
    from kdplatform.distill.worker import run_trial

    cfg = tmp_path / "t.yaml"
    cfg.write_text(TRIAL.format(tiny=tiny_sst2(glue_dir, tiny_bert_dir)))
    _, (trial,), _ = load_trials(cfg)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setattr(tracking, "RETRY_ATTEMPTS", 2)
    monkeypatch.setattr(tracking, "RETRY_DELAY", 0.01)
    real = MlflowClient.log_batch

    def log_batch(self, run_id, metrics=(), params=(), tags=(), *args, **kwargs):
        if any(m.key.startswith("loss/logit_kd") for m in metrics):  # the student's eval points only
            raise MlflowException("(sqlite3.OperationalError) database is locked", TEMPORARILY_UNAVAILABLE)
        return real(self, run_id, metrics, params, tags, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    with pytest.raises(MlflowException, match="database is locked"):
        run_trial(trial, tracking_uri=uri)

    monkeypatch.setattr(MlflowClient, "log_batch", real)
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("unwritable")
    runs = c.search_runs([exp.experiment_id], filter_string="tags.`kdp.role` = 'student'")
    assert len(runs) == 1
    assert runs[0].info.status == "FAILED", "a trial with unwritten metrics must not end FINISHED or RUNNING"
    assert "database is locked" in runs[0].data.tags["kdp.failure_reason"]
