"""MLflow run bookkeeping, in one place: tag names, run queries, and creating / finding / claiming /
reattaching / closing runs for `run`, `sweep`, the teacher stage and the report.

`tracking.py` is the layer below (client, retried writes, `RunLogger`); this module decides WHICH runs exist
and what state they are in. Every `kdp.*` tag name and every search filter string is built here.

Claims (one run per config, across processes): before a config's run starts, its process takes an exclusive
`flock` on a file named after (experiment, config hash) in the store's claim folder (`claims_dir`): beside a
SQLite file (`<db>.kdp-claims/`), inside a `file:` store, and for any other store (an MLflow server, a
database) in this machine's kdplatform cache. The kernel releases the lock when the process dies, even by
SIGKILL, so a RUNNING run whose config nobody holds belongs to a dead process: `close_orphans` closes it
KILLED with the reason. Guarantee: processes on one machine (or sharing the SQLite/file store's folder
through a filesystem with working `flock`) never run one config twice at once; against a server, processes
on DIFFERENT machines are not coordinated (give a team sweep one driver).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdplatform import tracking

# ------------------------------------------------------------------------------------------ tag names
# (every `kdp.*` name of the package; tracking.py, the layer below, knows none of them)
TAG_PREFIX = "kdp."  # every kdplatform tag starts with it (the report reads those, and no others)
ROLE, CFG_HASH, TEACHER_HASH, SWEEP = "kdp.role", "kdp.cfg_hash", "kdp.teacher_hash", "kdp.sweep"
PARENT = tracking.PARENT  # MLflow's own nesting tag
TASK, METHOD, SEED, BITS = "kdp.task", "kdp.method", "kdp.seed", "kdp.bits"
TEACHER_MODEL, CHECKPOINT, DEV_SCORE, BEST_DEV_SCORE = ("kdp.teacher_model", "kdp.checkpoint", "kdp.dev_score",
                                                        "kdp.best_dev_score")
FAILURE_REASON, RETRIED_AFTER, ATTEMPTS, RESUMED_FROM_STEP = ("kdp.failure_reason", "kdp.retried_after",
                                                              "kdp.attempts", "kdp.resumed_from_step")
EARLY_STOPPED, EARLY_STOPPED_STEP = "kdp.early_stopped", "kdp.early_stopped_step"
INTERRUPTED = "kdp.interrupted"
SPEC_HASH, SPEC_FILE, RAY_EXPERIMENT, RUNNER = "kdp.spec_hash", "kdp.spec_file", "kdp.ray_experiment", "kdp.runner"
FAILED_TRIALS, FINISHED_TRIALS = "kdp.failed_trials", "kdp.finished_trials"
SEARCH, SEARCH_AXES = "kdp.search", "kdp.search_axes"  # an Optuna search: the report's importance page
GIT_COMMIT = "kdp.git_commit"
MODEL_TAG, MODEL_NOTE = "kdp.model.{which}", "kdp.model.note"  # a saved student folder's artifact URI (best/last)
NODE = "kdp.node"  # the Ray node that trained a student run
# torch's intra-op thread count: float sums are split by thread, so a config gives bit-identical numbers only
# at the same count (a sweep's trial gets int(resources.cpu) threads from Ray, `kdplatform run` every core)
TORCH_THREADS = "kdp.torch_threads"
# where `kdplatform bench` measured a run's deploy/* metrics: CPU model, threads, sequence length, repetitions
DEPLOY_CPU, DEPLOY_THREADS = "kdp.deploy.cpu", "kdp.deploy.threads"
DEPLOY_SEQ_LEN, DEPLOY_REPETITIONS = "kdp.deploy.seq_len", "kdp.deploy.repetitions"
STUDENT, TEACHER, SWEEP_ROLE = "student", "teacher", "sweep"  # values of ROLE


# ------------------------------------------------------------------------------------------ filters
def where(*clauses: str) -> str:
    """Join filter clauses with `and` (empty clauses dropped)."""
    return " and ".join(c for c in clauses if c)


def tag_is(name: str, value: str) -> str:
    return f"tags.`{name}` = '{value}'"


def status_is(status: str) -> str:
    return f"attributes.status = '{status}'"


def student_filter(cfg_hash: str | None = None, status: str | None = None, parent: str | None = None,
                   sweep: str | None = None) -> str:
    return where(tag_is(ROLE, STUDENT), cfg_hash and tag_is(CFG_HASH, cfg_hash), status and status_is(status),
                 parent and tag_is(PARENT, parent), sweep and tag_is(SWEEP, sweep))


def teacher_filter(teacher_hash: str, status: str | None = "FINISHED") -> str:
    return where(tag_is(ROLE, TEACHER), tag_is(TEACHER_HASH, teacher_hash), status and status_is(status))


def sweep_filter(spec_hash: str | None = None, status: str | None = None) -> str:
    return where(tag_is(ROLE, SWEEP_ROLE), spec_hash and tag_is(SPEC_HASH, spec_hash), status and status_is(status))


# ------------------------------------------------------------------------------------------ queries
def store_missing(uri: str) -> bool:
    """A SQLite store whose file does not exist yet: nothing logged, and looking must not create it."""
    return uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists()


def search(uri: str, experiment: str | None, filter_string: str = "", max_results: int | None = None) -> list:
    """Runs matching `filter_string` in `experiment` (every experiment when None), all pages, retried."""
    if store_missing(uri):
        return []
    c = tracking.client(uri)
    if experiment is None:
        ids = [e.experiment_id for e in tracking.retry(lambda: c.search_experiments(max_results=50_000),
                                                      "list experiments")]
    else:
        exp = tracking.retry(lambda: c.get_experiment_by_name(experiment), "find experiment")
        ids = [exp.experiment_id] if exp is not None else []
    out: list = []
    token = None
    while ids:
        page_size = min(5000, max_results - len(out)) if max_results else 5000
        page = tracking.retry(lambda: c.search_runs(ids, filter_string=filter_string, max_results=page_size,
                                                    page_token=token), "search runs")
        out += page
        token = page.token
        if not token or (max_results and len(out) >= max_results):
            break
    return out


def finished_cfg_hashes(uri: str, experiment: str, wanted: set[str] | None = None) -> dict[str, str]:
    """cfg_hash -> run id of every FINISHED student run of the experiment (dedupe), in one paged query."""
    out: dict[str, str] = {}
    for r in search(uri, experiment, student_filter(status="FINISHED")):
        h = r.data.tags.get(CFG_HASH)
        if h and (wanted is None or h in wanted):
            out.setdefault(h, r.info.run_id)
    return out


def finished_run(uri: str, experiment: str, cfg_hash: str):
    """The FINISHED student run of a config, if any."""
    runs = search(uri, experiment, student_filter(cfg_hash, "FINISHED"), max_results=1)
    return runs[0] if runs else None


def finished_teacher_run(uri: str, experiment: str, teacher_hash: str):
    """The FINISHED teacher fine-tune with this teacher hash, if any (for distill/teacher.py)."""
    runs = search(uri, experiment, teacher_filter(teacher_hash), max_results=5)
    return runs[0] if runs else None


def trial_run_id(uri: str, experiment: str, parent_run_id: str, cfg_hash: str) -> str | None:
    """The newest student run a sweep (its parent run) already opened for a config, in any state."""
    runs = search(uri, experiment, student_filter(cfg_hash, parent=parent_run_id), max_results=10)
    runs = sorted(runs, key=lambda r: r.info.start_time or 0, reverse=True)
    return runs[0].info.run_id if runs else None


def open_sweeps(uri: str, experiment: str, spec_hash: str) -> list:
    """Parent runs of this spec still RUNNING (live, or left behind by a dead process)."""
    return search(uri, experiment, sweep_filter(spec_hash, "RUNNING"))


def get_run(uri: str, run_id: str):
    c = tracking.client(uri)
    return tracking.retry(lambda: c.get_run(run_id), "get run")


# ------------------------------------------------------------------------------------------ lifecycle
def open_run(uri: str, experiment: str, run_name: str, tags: dict[str, str], *, run_id: str | None = None,
             parent_run_id: str | None = None) -> tracking.RunLogger:
    """Open a run (student, teacher or parent) with the commit tags, or reattach to `run_id`. A run whose
    metrics cannot be written ends FAILED with the reason under `kdp.failure_reason`."""
    if run_id is None:
        tags = {**tags, GIT_COMMIT: tracking.git_commit()}
    return tracking.RunLogger(uri, experiment, run_name, tags, run_id=run_id, parent_run_id=parent_run_id,
                              failure_tag=FAILURE_REASON)


def student_tags(trial, sweep_id: str | None = None) -> dict[str, str]:
    """The tags of a student run of a resolved trial (`sweep_id`: the sweep, or the parent run, it belongs to)."""
    tags = {ROLE: STUDENT, CFG_HASH: trial.cfg_hash, TEACHER_HASH: trial.teacher_hash, TASK: trial.task,
            METHOD: trial.method, SEED: str(trial.seed), BITS: str(trial.bits)}
    if sweep_id:
        tags[SWEEP] = sweep_id
    return tags


def teacher_tags(trial) -> dict[str, str]:
    """The tags of a teacher fine-tune run."""
    return {ROLE: TEACHER, TEACHER_HASH: trial.teacher_hash, TASK: trial.task, TEACHER_MODEL: trial.teacher.model}


def finished_teacher_tags(checkpoint: str | Path, dev_score: float) -> dict[str, str]:
    return {CHECKPOINT: str(checkpoint), DEV_SCORE: f"{dev_score:.4f}"}


def teacher_checkpoint(run) -> str | None:
    """The checkpoint folder a teacher run recorded, if any."""
    return run.data.tags.get(CHECKPOINT) if run is not None else None


def create_parent(uri: str, experiment: str, run_name: str, *, spec_hash: str, spec_file: str | Path,
                  runner: str, search_axes: list[str] | None = None,
                  ray_experiment: str | Path | None = None) -> tracking.RunLogger:
    """Open the parent run of a `sweep` or `run` (role sweep). With `search_axes` it is tagged as an Optuna
    search so the report draws the parameter-importance page."""
    tags = {ROLE: SWEEP_ROLE, SPEC_HASH: spec_hash, SPEC_FILE: str(spec_file), RUNNER: runner}
    if ray_experiment is not None:
        tags[RAY_EXPERIMENT] = str(ray_experiment)
    if search_axes:
        tags[SEARCH], tags[SEARCH_AXES] = "optuna", ",".join(search_axes)
    return open_run(uri, experiment, run_name, tags)


def reopen(uri: str, experiment: str, run_id: str) -> tracking.RunLogger:
    """Reattach to an existing run (RUNNING again), e.g. a resumed sweep's parent."""
    return open_run(uri, experiment, "", {}, run_id=run_id)


def close_run(uri: str, run_id: str, status: str, tags: dict[str, Any] | None = None,
              only_if_running: bool = True) -> bool:
    """Set tags and end a run; with `only_if_running` a run already ended is left alone. True if closed."""
    c = tracking.client(uri)
    if only_if_running and get_run(uri, run_id).info.status != "RUNNING":
        return False
    for k, v in (tags or {}).items():
        tracking.retry(lambda k=k, v=v: c.set_tag(run_id, k, str(v)[:5000]), "set tag")
    tracking.retry(lambda: c.set_terminated(run_id, status=status), "end run")
    return True


def close_children(uri: str, experiment: str, parent_run_id: str, status: str, reason: str) -> list[str]:
    """End the RUNNING child runs of a parent (students and teachers)."""
    runs = search(uri, experiment, where(tag_is(PARENT, parent_run_id), status_is("RUNNING")))
    return [r.info.run_id for r in runs if close_run(uri, r.info.run_id, status, {FAILURE_REASON: reason})]


INTERRUPTED_REASON = "interrupted by the user (Ctrl-C or SIGTERM); --resume continues it"
STOP_SIGNALS = ("SystemExit", "KeyboardInterrupt")  # how an interruption reaches a trial's worker


def mark_interrupted(uri: str, experiment: str, parent_run_id: str) -> None:
    """After Ctrl-C/SIGTERM: the trials Ray stopped were closed KILLED by their workers with the bare
    exception (`SystemExit: 0`); their reason becomes what happened."""
    killed = search(uri, experiment, where(tag_is(PARENT, parent_run_id), status_is("KILLED")))
    c = tracking.client(uri)
    for r in killed:
        if r.data.tags.get(FAILURE_REASON, "").startswith(STOP_SIGNALS):
            tracking.retry(lambda r=r: c.set_tag(r.info.run_id, FAILURE_REASON, INTERRUPTED_REASON), "set tag")


def note_retry(uri: str, run_id: str, from_step: int | None) -> None:
    """Tags of a reattached run: attempt count, the checkpoint step it resumes from (0: from scratch), and
    a previous failure's reason kept as history (`kdp.retried_after`), not as the current failure."""
    c = tracking.client(uri)
    tags = get_run(uri, run_id).data.tags
    attempts = int(tags.get(ATTEMPTS, "1")) + 1
    tracking.retry(lambda: c.set_tag(run_id, ATTEMPTS, str(attempts)), "set tag")
    tracking.retry(lambda: c.set_tag(run_id, RESUMED_FROM_STEP, str(from_step or 0)), "set tag")
    reason = tags.get(FAILURE_REASON)
    if reason:
        tracking.retry(lambda: c.set_tag(run_id, RETRIED_AFTER, reason), "set tag")
        tracking.retry(lambda: c.delete_tag(run_id, FAILURE_REASON), "delete tag")


def mark_early_stopped(uri: str, run_id: str, step: Any, wait_s: float = 15.0) -> bool:
    """Close a run the scheduler stopped as FINISHED + `kdp.early_stopped=asha` (after giving the worker's
    own last write `wait_s` to land). False when the run had already FINISHED."""
    deadline = time.time() + wait_s
    run = get_run(uri, run_id)
    while run.info.status == "RUNNING" and time.time() < deadline:
        time.sleep(0.5)
        run = get_run(uri, run_id)
    if run.info.status == "FINISHED":
        return False
    c = tracking.client(uri)
    tracking.retry(lambda: c.set_tag(run_id, EARLY_STOPPED, "asha"), "set tag")
    tracking.retry(lambda: c.set_tag(run_id, EARLY_STOPPED_STEP, str(step if step is not None else "")), "set tag")
    if run.data.tags.get(FAILURE_REASON, "").startswith("SystemExit"):
        tracking.retry(lambda: c.delete_tag(run_id, FAILURE_REASON), "delete tag")
    tracking.retry(lambda: c.set_terminated(run_id, status="FINISHED"), "end run")
    return True


# ------------------------------------------------------------------------------------------ claims
def claims_dir(uri: str) -> Path:
    """Where the claim files of a store live (see the module docstring for the guarantee)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return db.with_name(db.name + ".kdp-claims")
    if uri.startswith("file:"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        return Path(url2pathname(urlparse(uri).path)) / ".kdp-claims"
    cache = Path(os.environ.get("KDP_CACHE_DIR") or Path.home() / ".cache" / "kdplatform").expanduser()
    return cache / "claims" / hashlib.sha256(tracking.redact(uri).encode()).hexdigest()[:16]


@dataclass
class Claim:
    """An exclusive claim on one key of one store, held by this process until `release` (or its death)."""

    path: Path
    handle: Any

    def holder(self) -> str:
        return self.path.read_text(errors="replace").strip()

    def release(self) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


def _claim_path(uri: str, experiment: str, key: str) -> Path:
    name = hashlib.sha256(f"{experiment}\0{key}".encode()).hexdigest()[:24]
    return claims_dir(uri) / f"{name}.lock"


def try_claim(uri: str, experiment: str, key: str) -> Claim | None:
    """Claim `key` (a config hash, or `sweep-<spec hash>`) now, or None when a live process holds it."""
    path = _claim_path(uri, experiment, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")  # noqa: SIM115 - held open for the claim's lifetime
    except OSError as e:  # the store check found the store writable; its claim folder is not (exit 2)
        from kdplatform.store_check import StoreUnusable

        raise StoreUnusable(f"cannot write the claim file {path} of the tracking store {tracking.redact(uri)} "
                            f"({e.strerror}).\n  fix: make {path.parent} writable, or for a server store point "
                            "KDP_CACHE_DIR at a folder you can write") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}\n")
    handle.flush()
    return Claim(path, handle)


def claim(uri: str, experiment: str, key: str, on_wait=None, poll_s: float = 0.5) -> Claim:
    """Claim `key`, waiting while a live process holds it; `on_wait(holder)` is called once if it must wait."""
    waited = False
    while True:
        got = try_claim(uri, experiment, key)
        if got is not None:
            return got
        if not waited and on_wait is not None:
            with contextlib.suppress(OSError):
                on_wait(_claim_path(uri, experiment, key).read_text(errors="replace").strip())
        waited = True
        time.sleep(poll_s)


def is_claimed(uri: str, experiment: str, key: str) -> bool:
    got = try_claim(uri, experiment, key)
    if got is None:
        return True
    got.release()
    return False


@contextlib.contextmanager
def claimed(uri: str, experiment: str, key: str, on_wait=None) -> Iterator[Claim]:
    c = claim(uri, experiment, key, on_wait)
    try:
        yield c
    finally:
        c.release()


def close_orphans(uri: str, experiment: str, cfg_hash: str, keep_parent: str | None = None) -> list[str]:
    """With the config's claim held: close its RUNNING student runs (their process is gone) as KILLED with
    the reason; runs of `keep_parent` (the sweep resuming them) are left to be reattached."""
    closed = []
    for r in search(uri, experiment, student_filter(cfg_hash, "RUNNING")):
        if keep_parent and r.data.tags.get(PARENT) == keep_parent:
            continue
        reason = "its process ended without closing the run (found RUNNING by a later run of this config)"
        if close_run(uri, r.info.run_id, "KILLED", {FAILURE_REASON: reason}):
            closed.append(r.info.run_id)
    return closed


def close_orphan_parents(uri: str, experiment: str, spec_hash: str, keep: set[str] = frozenset()) -> list[str]:
    """With the spec's claim held: close RUNNING parent runs of this spec (their driver is gone) and their
    RUNNING children, KILLED with the reason; `keep` names parents a resume will reopen."""
    closed = []
    reason = "its driver ended without closing the run (found RUNNING by a later run of this file)"
    for r in open_sweeps(uri, experiment, spec_hash):
        if r.info.run_id in keep:
            continue
        close_children(uri, experiment, r.info.run_id, "KILLED", reason)
        if close_run(uri, r.info.run_id, "KILLED", {FAILURE_REASON: reason}):
            closed.append(r.info.run_id)
    return closed


# ------------------------------------------------------------------------------------------ listing
@dataclass
class SweepRow:
    experiment: str
    run_id: str
    run_name: str
    status: str
    started: str
    runner: str
    trials: dict[str, int]


def list_sweeps(uri: str) -> list[SweepRow]:
    """Every parent run (sweep or run) of the store with its student trials counted by status; student
    runs without a parent are grouped per experiment under run id '-'."""
    c = tracking.client(uri)
    names = {e.experiment_id: e.name for e in tracking.retry(lambda: c.search_experiments(max_results=50_000),
                                                            "list experiments")}
    parents = search(uri, None, tag_is(ROLE, SWEEP_ROLE))
    counts: dict[tuple[str, str], Counter] = {}
    for r in search(uri, None, tag_is(ROLE, STUDENT)):
        key = (r.info.experiment_id, r.data.tags.get(SWEEP) or r.data.tags.get(PARENT) or "-")
        counts.setdefault(key, Counter())[r.info.status] += 1
    rows = []
    for p in sorted(parents, key=lambda r: r.info.start_time or 0):
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime((p.info.start_time or 0) / 1000))
        rows.append(SweepRow(names.get(p.info.experiment_id, p.info.experiment_id), p.info.run_id,
                             p.info.run_name or "", p.info.status, started, p.data.tags.get(RUNNER, "sweep"),
                             dict(counts.pop((p.info.experiment_id, p.info.run_id), Counter()))))
    for (exp_id, parent), n in counts.items():
        rows.append(SweepRow(names.get(exp_id, exp_id), parent, "(no parent run)" if parent == "-" else
                             "(parent run missing)", "-", "-", "-", dict(n)))
    return rows


def store_contents(uri: str, limit: int = 10_000) -> dict[str, int]:
    """What a store holds whatever wrote it: experiments with runs, and runs (counted up to `limit`), for
    `ls` on a store with no kdplatform runs (one written by MLflow directly)."""
    found = search(uri, None, max_results=limit)
    return {"experiments": len({r.info.experiment_id for r in found}), "runs": len(found)}
