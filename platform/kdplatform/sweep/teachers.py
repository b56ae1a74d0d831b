"""The teacher stage: every distinct teacher a sweep needs is fine-tuned once, before any student starts.

A teacher is keyed by `config.teacher_hash` (task x model x fine-tune config x seed x train-data config).
`teacher_status` says where each one stands: given as a checkpoint, in the local cache, found through a
FINISHED teacher run in MLflow whose checkpoint folder still exists (linked into the cache so the worker
finds it), or to train. `train_teachers` fine-tunes the missing ones as Ray tasks, in parallel across
teachers; the worker's own file lock and atomic rename keep a teacher from being trained twice.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from kdplatform import runs, tracking
from kdplatform.config import ResolvedTrial, SweepSpec
from kdplatform.sweep.live_steps import StepWriter, read_steps, step_file

GIVEN, CACHED, FROM_MLFLOW, TO_TRAIN = "checkpoint", "cached", "from MLflow", "to train"


@dataclass
class TeacherOutcome:
    teacher_hash: str
    trial: ResolvedTrial
    status: str  # one of the constants above, then "trained" or "failed"
    folder: str | None = None
    error: str | None = None


def teacher_status(trial: ResolvedTrial, tracking_uri: str | None) -> TeacherOutcome:
    """Where this trial's teacher stands, without training anything (fast: files and one MLflow query)."""
    from kdplatform.distill.teacher import MARKER, teacher_dir, teacher_from_mlflow

    folder = teacher_dir(trial)
    h = trial.teacher_hash
    if trial.teacher.checkpoint:
        return TeacherOutcome(h, trial, GIVEN, str(folder))
    if (folder / MARKER).is_file():
        return TeacherOutcome(h, trial, CACHED, str(folder))
    if tracking_uri and not runs.store_missing(tracking_uri):
        found = teacher_from_mlflow(tracking_uri, trial)
        if found is not None:
            return TeacherOutcome(h, trial, FROM_MLFLOW, str(found))
    return TeacherOutcome(h, trial, TO_TRAIN, str(folder))


def link_from_mlflow(outcome: TeacherOutcome) -> None:
    """Make a teacher found through MLflow (another cache folder) visible at this cache's path."""
    from kdplatform.distill.teacher import link_into_cache

    link_into_cache(outcome.trial, Path(outcome.folder))


def _fine_tune(trial_json: dict, tracking_uri: str, parent_run_id: str | None, cwd: str,
               steps_path: str | None = None) -> str:
    """Ray task body: fine-tune one teacher (or find it ready), its step count written to `steps_path`;
    returns its folder."""
    from kdplatform.config import ResolvedTrial
    from kdplatform.distill.teacher import ensure_teacher

    if os.path.isdir(cwd):
        os.chdir(cwd)  # relative paths in the spec mean the driver's working directory
    on_progress = StepWriter(Path(steps_path)) if steps_path else None
    return str(ensure_teacher(ResolvedTrial.model_validate(trial_json), tracking_uri, parent_run_id, on_progress))


def train_teachers(outcomes: list[TeacherOutcome], *, spec: SweepSpec, tracking_uri: str,
                   parent_run_id: str | None, max_concurrent: int | None, on_update=None,
                   steps_dir: str | None = None, on_steps=None) -> list[TeacherOutcome]:
    """Fine-tune the teachers marked TO_TRAIN as Ray tasks (Ray must be initialised); others pass through.

    `on_update(outcome, state)` at each start and end; with `steps_dir`, each teacher writes its step count
    to `<steps_dir>/teacher-<hash>.json` and `on_steps(outcome, {label, step, total})` hears it about once a
    second while it trains."""
    import ray

    res = spec.resources
    todo = [o for o in outcomes if o.status == TO_TRAIN]
    for o in outcomes:
        if o.status == FROM_MLFLOW:
            link_from_mlflow(o)
    limit = max_concurrent or len(todo) or 1
    cpu = res.teacher_cpu
    if cpu is None:  # no student runs yet: share the cluster's CPUs (torch threads = assigned CPUs in Ray)
        cluster_cpus = ray.cluster_resources().get("CPU", res.cpu)
        cpu = max(res.cpu, math.floor(cluster_cpus / max(1, min(limit, len(todo)))))
    gpu = res.teacher_gpu if res.teacher_gpu is not None else res.gpu
    task = ray.remote(_fine_tune).options(num_cpus=cpu, num_gpus=gpu, max_retries=spec.max_failures,
                                         retry_exceptions=_retryable(), name="kdp_teacher")
    running: dict = {}
    steps_at: dict[str, Path | None] = {}  # teacher hash -> its step file
    queue = list(todo)
    while queue or running:
        while queue and len(running) < limit:
            o = queue.pop(0)
            path = steps_at[o.teacher_hash] = step_file(steps_dir, f"teacher-{o.teacher_hash}")
            ref = task.remote(o.trial.model_dump(mode="json"), tracking_uri, parent_run_id, os.getcwd(),
                              str(path) if path else None)
            running[ref] = o
            if on_update:
                on_update(o, "running")
        ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
        if not ready:  # still training: pass on their step counts
            for o in running.values():
                steps = read_steps(steps_at[o.teacher_hash])
                if steps is not None and on_steps:
                    on_steps(o, steps)
            continue
        o = running.pop(ready[0])
        try:
            o.folder = ray.get(ready[0])
            o.status = "trained"
        except Exception as e:  # noqa: BLE001 - one failed teacher must not stop the others
            o.status, o.error = "failed", _error_text(e)
        if on_update:
            on_update(o, o.status)
    return outcomes


def _retryable() -> list[type[Exception]]:
    """Exceptions worth a retry: not the user's own mistakes, which fail the same way again."""
    return [OSError, RuntimeError, ConnectionError]


def _error_text(e: Exception) -> str:
    cause = getattr(e, "cause", None) or e
    return tracking.redact(f"{type(cause).__name__}: {cause}")[:500]
