"""MLflow naming, tags and batched, retried logging (no torch here).

Runs are written through `MlflowClient` (no global active run), so one process can hold several runs and a
trial can reattach to its own run after a restart. Metrics are buffered per eval step and written with one
`log_batch` (60x faster than one call per point on SQLite).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# One retry layer: kdplatform's `retry` below. MLflow's own HTTP retries (default 7, with backoff, per request)
# would multiply with it (8 x 7 attempts: a closed port took 37 minutes to give up), so they are off unless the
# user sets them; a request that hangs gives up after 30 s instead of MLflow's 120 s. Set here, at import, so the
# CLI process and every Ray trial (which imports this module, and inherits the environment) use the same bound.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

log = logging.getLogger("kdplatform")
T = TypeVar("T")

PARENT = "mlflow.parentRunId"  # MLflow's own nesting tag (kdplatform's tag names live in runs.py)


def pick_tracking_uri(flag: str | None = None, file_uri: str | None = None) -> str:
    """The store to log to or read from, the one place this order lives: `--tracking-uri` (`flag`), else
    `MLFLOW_TRACKING_URI`, else the YAML file's `tracking_uri:` (`file_uri`), else `./mlflow.db`.

    The environment beats the file so that one sweep file runs unchanged on a laptop (its own field, or the
    default) and on a cluster whose deployment exports MLFLOW_TRACKING_URI for every process.
    """
    local = "sqlite:///" + str(Path("mlflow.db").resolve())  # absolute: trials run in other working directories
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or file_uri or local


def resolve_tracking_uri(flag: str | None = None, file_uri: str | None = None) -> str:
    """`pick_tracking_uri`, made absolute (`absolute_uri`: trials run in other working directories) and refused
    when it holds a password (`CredentialsInUri`)."""
    return absolute_uri(pick_tracking_uri(flag, file_uri))


class CredentialsInUri(ValueError):
    """A tracking URI with a password in it (`http://user:pass@host`): refused before anything runs."""


# The userinfo of a URI (`scheme://user:password@host`): everything up to the LAST `@` of the authority, so a
# password holding `@` (`alice:p@ss@host`), an empty user (`://:pw@host`) and percent-encoding are covered. A
# bare `user:pass@host` (no scheme) counts too when it starts a word.
_USERINFO = re.compile(r"(?P<lead>://|(?<![^\s\"'(=<,;]))(?P<user>[^\s/@:?#\"']*):(?P<pw>[^\s/?#\"']*)@"
                       r"(?=[^\s/@?#\"']+)")


def absolute_uri(uri: str) -> str:
    """Make a relative `sqlite:///x.db` or plain path absolute: trials run in temporary working dirs.

    A URI carrying a password is refused: MLflow prints run links with the tracking URI and Ray passes
    environment variables through its logs, so the password would end up in output and logs.
    """
    if any(m.group("pw") for m in _USERINFO.finditer(uri)):
        raise CredentialsInUri(
            f"the tracking URI {redact(uri)} holds a password; it would be printed in run links and logs.\n"
            "  fix: drop `user:password@` from the URI and export MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (for a database URI: PGPASSWORD or ~/.pgpass)")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def redact(text: str) -> str:
    """Hide the password of every URI in `text` (`scheme://user:pass@host` -> `scheme://user:***@host`)."""
    return _USERINFO.sub(lambda m: f"{m.group('lead')}{m.group('user')}:***@", text)


_CREDENTIAL_ENV = re.compile(r"PASSWORD|TOKEN|SECRET|^MLFLOW_TRACKING_USERNAME$")


def is_credential_env(name: str) -> bool:
    """Whether an environment variable holds a credential (MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN, HF_TOKEN, ...).

    Such variables reach trials through each node's own environment (a local Ray cluster inherits the
    driver's; the compose stack and the KubeRay manifests set them on every node), never through Ray's
    `runtime_env`, which Ray writes into its session logs.
    """
    return bool(_CREDENTIAL_ENV.search(name))


@lru_cache(maxsize=1)
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# Retry budget of every MLflow call (env-tunable): attempts, first delay, longest delay. The defaults ride out
# about a minute of server downtime or SQLite locking: 7 waits of 0.5, 1, 2, 4, 8, 16, 30 s (61.5 s) between
# 8 attempts, each bounded by MLFLOW_HTTP_REQUEST_TIMEOUT (MLflow's own retries are off, see the top).
RETRY_ATTEMPTS = int(os.environ.get("KDP_MLFLOW_RETRIES", "8"))
RETRY_DELAY = float(os.environ.get("KDP_MLFLOW_RETRY_DELAY", "0.5"))
RETRY_MAX_DELAY = 30.0
# Answers that no retry can change (a bad request, a missing run): raised at once.
PERMANENT_ERRORS = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                              "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED", "ENDPOINT_NOT_FOUND"})


def retry(fn: Callable[[], T], what: str, attempts: int | None = None, base_delay: float | None = None) -> T:
    """Call `fn`, retrying MLflow write failures (server down, SQLite locked) with exponential backoff.

    After the last attempt the error propagates: a trial must fail loudly rather than finish with holes.
    Errors that cannot heal (`PERMANENT_ERRORS`: a bad value, a missing run) propagate at once.
    """
    from mlflow.exceptions import MlflowException

    attempts = RETRY_ATTEMPTS if attempts is None else attempts
    base_delay = RETRY_DELAY if base_delay is None else base_delay
    for i in range(attempts):
        try:
            return fn()
        except (MlflowException, OSError, ConnectionError) as e:  # noqa: PERF203
            if i == attempts - 1 or getattr(e, "error_code", None) in PERMANENT_ERRORS:
                raise
            delay = min(base_delay * 2**i, RETRY_MAX_DELAY)
            log.warning("MLflow %s failed (%s); retrying in %.1fs", what, redact(str(e))[:200], delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


_SQLITE_READY: set[str] = set()


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    if not tracking_uri.startswith("sqlite:") or tracking_uri in _SQLITE_READY:
        return MlflowClient(tracking_uri=tracking_uri)
    # The client creates (and migrates) the SQLite schema; several processes doing that at once on a new
    # file (parallel trials on a fresh mlflow.db) break each other's migrations, so it is serialised.
    import fcntl
    import hashlib
    import tempfile

    key = hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"kdp-sqlite-{key}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            c = MlflowClient(tracking_uri=tracking_uri)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    _SQLITE_READY.add(tracking_uri)
    return c


def experiment_id(c, name: str) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(name)
    except Exception:  # created meanwhile by a concurrent trial
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class RunLogger:
    """One MLflow run: buffered metrics, params in batches, tags, text artifacts, retried writes."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, tags: dict[str, str],
                 run_id: str | None = None, parent_run_id: str | None = None, failure_tag: str | None = None):
        """`failure_tag`: the tag `finish` writes the reason under when metrics cannot be written (runs.py
        names it; this layer knows no kdplatform tag names)."""
        self.tracking_uri = tracking_uri
        self.failure_tag = failure_tag
        self.client = client(tracking_uri)
        if run_id is not None:  # reattach (resume): never open a second run for one trial
            self.run_id = run_id
            retry(lambda: self.client.update_run(run_id, status="RUNNING"), "reopen run")
            # A resumed trial recomputes the steps between its checkpoint and the interruption: points
            # already logged are not logged again, so metric histories hold no duplicate steps.
            self._logged_upto = retry(lambda: last_steps(self.client, run_id), "read metric steps")
        else:
            exp_id = retry(lambda: experiment_id(self.client, experiment), "create experiment")
            all_tags = {**tags, "mlflow.source.git.commit": git_commit()}
            if parent_run_id:
                all_tags[PARENT] = parent_run_id
            run = retry(lambda: self.client.create_run(exp_id, run_name=run_name, tags=all_tags), "create run")
            self.run_id = run.info.run_id
            self._logged_upto: dict[str, int] = {}
        self._metrics: list[Any] = []

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            chunk = items[i:i + 100]
            retry(lambda: self.client.log_batch(self.run_id, params=chunk), "log params")

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        retry(lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]),
              "set tags")

    def add_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._metrics += [Metric(k, float(v), ts, step) for k, v in metrics.items()
                          if step > self._logged_upto.get(k, -1)]

    def flush(self) -> None:
        while self._metrics:
            chunk = self._metrics[:1000]
            retry(lambda: self.client.log_batch(self.run_id, metrics=chunk), "log metrics")
            del self._metrics[:1000]

    def log_text(self, text: str, artifact_file: str) -> None:
        retry(lambda: self.client.log_text(self.run_id, text, artifact_file), "log artifact")

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        retry(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path), "log artifact")

    def finish(self, status: str = "FINISHED") -> None:
        """Write what is buffered, then end the run. Metrics that cannot be written end it FAILED (when the
        store still answers), never FINISHED with holes; the error propagates."""
        try:
            self.flush()
        except Exception as e:
            reason = f"metrics could not be written: {redact(str(e))[:4000]}"
            try:
                if status == "FINISHED" and self.failure_tag:
                    retry(lambda: self.client.set_tag(self.run_id, self.failure_tag, reason), "set tags",
                          attempts=2)
                retry(lambda: self.client.set_terminated(self.run_id, status="FAILED"), "end run", attempts=2)
            except Exception:  # noqa: BLE001 - the store is gone too: the run stays RUNNING for resume to see
                log.error("could not mark run %s FAILED after its metrics failed to write", self.run_id)
            raise
        retry(lambda: self.client.set_terminated(self.run_id, status=status), "end run")


def last_steps(c, run_id: str) -> dict[str, int]:
    """The highest step logged so far for each metric key of a run."""
    keys = list(c.get_run(run_id).data.metrics)
    return {k: max((m.step for m in c.get_metric_history(run_id, k)), default=-1) for k in keys}

