"""`kdplatform sweep`: plan, teacher stage, student trials on Ray Tune, one MLflow parent run, summary.

Read `run_sweep` top to bottom:

1. plan (`expand.plan_sweep`): validated trials, which config hashes already have a FINISHED run (those
   are skipped: re-running or widening a grid runs only what is missing), which teachers are ready;
2. the Ray experiment folder `<storage>/<spec name>-<spec hash>` and its `kdp_sweep.json` (the parent run
   id), which `--resume` reads back;
3. one MLflow parent run per sweep (tags: spec hash, git commit; the spec file as an artifact), reopened
   by `--resume`;
4. Ray: a local cluster (`include_dashboard=False`, bounded object store) or `--address`;
5. the teacher stage (`teachers.py`), then the students (`tune.py`) through `Tuner.fit()`, or
   `Tuner.restore(...)` with `--resume`;
6. the summary: per task x method counts and scores, failures, and the commands to read the results.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from kdplatform import tracking
from kdplatform.config import describe_trials
from kdplatform.distill.preflight import preflight
from kdplatform.sweep.expand import SweepPlan, plan_sweep
from kdplatform.sweep.progress import SweepMonitor, failures_table, plan_tables, summary_table
from kdplatform.sweep.teachers import TeacherOutcome, teacher_status, train_teachers

STATE_FILE = "kdp_sweep.json"
OBJECT_STORE_BYTES = 1 << 30  # the sweep ships configs, not tensors: 1 GiB is plenty
# Environment a trial needs on every node (a local cluster inherits it anyway; --address does not).
ENV_PREFIXES = ("KDP_", "HF_", "TRANSFORMERS_", "MLFLOW_", "TOKENIZERS_")
DRIVER_ENV = {
    # the trial function reports dev/score only in stages that train the head: ASHA/Optuna skip the others
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
    # num_to_keep=1 snapshots the experiment at every checkpoint on purpose (resume consistency)
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
    # Ray's own console reporter: off (verbose=0 alone still prints its banner); our progress view reports
    "RAY_AIR_NEW_OUTPUT": "0",
}


class SweepError(Exception):
    """A user-facing problem with the sweep's state (nothing to resume, an interrupted sweep, ...)."""

    def __init__(self, message: str, fix: str = ""):
        self.message, self.fix = message, fix
        super().__init__(message + (f"\n  fix: {fix}" if fix else ""))


@dataclass
class SweepOutcome:
    exit_code: int
    parent_run_id: str | None = None
    experiment_path: Path | None = None
    counts: dict[str, int] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)


def run_sweep(file: str | Path, *, tracking_uri: str | None = None, dry_run: bool = False, resume: bool = False,
              fresh: bool = False, address: str | None = None, max_concurrent: int | None = None,
              storage: str | Path | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
              console: Console | None = None) -> SweepOutcome:
    """Run (or with `dry_run` only print) the sweep of `file`. Raises ConfigError / SweepError for user errors."""
    console = console or Console()
    plan = plan_sweep(file, tracking_uri)
    uri = plan.tracking_uri
    spec = plan.spec
    exp_path = Path(storage or "ray_results").resolve() / plan.experiment_dir_name
    state_file = exp_path / STATE_FILE
    state = json.loads(state_file.read_text()) if state_file.is_file() else None

    outcomes = [teacher_status(t, uri) for t in plan.teachers().values()]
    if dry_run:
        for r in plan_tables(plan, outcomes, uri):
            console.print(r)
        for line in describe_trials(plan.trials):  # what each trial computes: loss terms, layer pairs, weights
            console.print(escape(line))
        if state is not None:
            console.print(f"Ray experiment folder exists: {escape(str(exp_path))}")
        console.print("[bold]dry run:[/] nothing was started.")
        return SweepOutcome(0, experiment_path=exp_path)

    if resume:
        if state is None:
            raise SweepError(f"nothing to resume for this spec: no {STATE_FILE} in {exp_path}",
                             "run the sweep without --resume (a changed spec has another hash, so a new folder)")
        if state.get("tracking_uri") != tracking.redact(uri):
            raise SweepError(f"this sweep logged to {state.get('tracking_uri')}, not {tracking.redact(uri)}",
                             "pass the same --tracking-uri (or MLFLOW_TRACKING_URI) as the first run")
        if not _interrupted(state, uri):
            console.print(f"nothing to resume: the last run of this sweep ended (parent run "
                          f"{state.get('parent_run_id')}). Run it without --resume to run what is missing.")
            return SweepOutcome(0, state.get("parent_run_id"), exp_path)
    else:
        if state is not None and _interrupted(state, uri) and not fresh:
            raise SweepError(f"an interrupted run of this sweep exists ({exp_path}, parent run "
                             f"{state.get('parent_run_id')})", "continue it with --resume, or abandon it with --fresh")
        if not plan.to_run and spec.search is None:
            console.print(f"[green]nothing new to run:[/] all {len(plan.trials)} trial(s) of {escape(str(file))} "
                          f"already have a FINISHED run in experiment '{escape(spec.name)}' "
                          f"({escape(tracking.redact(uri))}).")
            for n in plan.notes:
                console.print(f"[yellow]note:[/] {escape(n)}")
            return SweepOutcome(0, experiment_path=exp_path, counts={"already_done": len(plan.done)})
        if state is not None:
            _retire_previous(state, exp_path, uri)
            state = None

    for r in plan_tables(plan, outcomes, uri)[:2 + len(plan.notes)]:
        console.print(r)  # the header and notes; the full tables are --dry-run's
    # every data file and ready checkpoint the trials read, checked before the parent run or Ray exist
    preflight(plan.trials if spec.search is not None else plan.to_run)

    # ---- the parent run
    dir_name = plan.experiment_dir_name
    if state is None:
        parent = tracking.RunLogger(uri, spec.name, f"sweep/{dir_name}", {
            tracking.ROLE: "sweep", "kdp.spec_hash": plan.spec_hash, "kdp.spec_file": str(plan.spec_file),
            "kdp.ray_experiment": str(exp_path)})
        parent.log_params({"trials": len(plan.trials), "already_done": len(plan.done),
                           "to_run": len(plan.to_run), "teachers": len(outcomes),
                           "search": spec.search is not None, "scheduler": spec.scheduler is not None,
                           "max_failures": spec.max_failures})
        parent.log_artifact(plan.spec_file, "spec")
        parent.log_text("\n".join(t.run_name for t in plan.to_run) + "\n", "spec/trials_to_run.txt")
        state = {"spec_hash": plan.spec_hash, "parent_run_id": parent.run_id, "experiment": spec.name,
                 "tracking_uri": tracking.redact(uri), "spec_file": str(plan.spec_file), "sessions": 0,
                 "already_done": len(plan.done),
                 "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    else:
        parent = tracking.RunLogger(uri, spec.name, f"sweep/{dir_name}", {}, run_id=state["parent_run_id"])
    state["sessions"] = state.get("sessions", 0) + 1
    exp_path.mkdir(parents=True, exist_ok=True)
    _write_json(state_file, state)
    console.print(f"parent run [bold]{parent.run_id}[/] (session {state['sessions']}), Ray experiment "
                  f"{escape(str(exp_path))}")

    if address and uri.startswith("sqlite:"):
        console.print("[yellow]warning:[/] trials on other nodes cannot write to a local SQLite file: point "
                      "--tracking-uri at an MLflow server (and --storage at storage every node can reach)")

    import ray

    os.environ.update(DRIVER_ENV)
    if console.is_terminal:  # the live view owns the terminal; failures are in its summary and error files
        logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    os.environ.update(_worker_env())  # absolute paths: a local cluster's workers inherit this environment
    started_ray = False
    try:
        if address:
            ray.init(address=address, runtime_env={"env_vars": _worker_env()}, log_to_driver=True)
        else:
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                     object_store_memory=OBJECT_STORE_BYTES, log_to_driver=not console.is_terminal)
        started_ray = True
        outcome = _run_stages(plan, parent, state, exp_path, resume, max_concurrent, console)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted.[/] Continue with: [bold]kdplatform sweep {escape(str(file))} "
                      "--resume[/]")
        return SweepOutcome(130, parent.run_id, exp_path)
    finally:
        if started_ray:
            ray.shutdown()
    return outcome


def _run_stages(plan: SweepPlan, parent: tracking.RunLogger, state: dict, exp_path: Path, resume: bool,
                max_concurrent: int | None, console: Console) -> SweepOutcome:
    from ray import tune as ray_tune

    from kdplatform.sweep import tune as kdp_tune

    spec, uri = plan.spec, plan.tracking_uri
    concurrency = max_concurrent or spec.max_concurrent_trials
    total = spec.search.num_samples if spec.search is not None else len(plan.to_run)
    restorable = resume and ray_tune.Tuner.can_restore(str(exp_path))
    ended = 0
    if restorable:
        n_trials, ended = _ray_trial_counts(exp_path)
        total = max(total, n_trials)
    with SweepMonitor(console, total, concurrency or 1) as monitor:
        monitor.already_ended(ended)
        # ---- teacher stage: every teacher the remaining trials need, once, before any student starts
        outcomes = [teacher_status(t, uri) for t in plan.teachers().values()]
        outcomes = train_teachers(outcomes, spec=spec, tracking_uri=uri, parent_run_id=parent.run_id,
                                  max_concurrent=concurrency, on_update=monitor.teacher_update)
        failed_teachers = {o.teacher_hash: o for o in outcomes if o.status == "failed"}
        rows = [_teacher_failure_row(t, failed_teachers[t.teacher_hash]) for t in plan.to_run
                if t.teacher_hash in failed_teachers]
        run_trials = [t for t in plan.to_run if t.teacher_hash not in failed_teachers]

        # ---- students
        ctx = kdp_tune.TrialContext(tracking_uri=uri, experiment=spec.name, parent_run_id=parent.run_id,
                                    sweep_id=parent.run_id, cwd=os.getcwd(), spec_file=spec.source_file,
                                    trials={t.cfg_hash: t.model_dump(mode="json") for t in plan.trials},
                                    bases=plan.bases)
        kdp_tune.set_driver_hooks(kdp_tune.DriverHooks(ctx, monitor))
        trainable = kdp_tune.trainable_for(ctx, spec.resources)
        results = None
        try:
            if restorable:
                tuner = ray_tune.Tuner.restore(str(exp_path), trainable=trainable, resume_unfinished=True,
                                               resume_errored=True)
                results = tuner.fit()
            elif run_trials or spec.search is not None:
                space = kdp_tune.param_space(run_trials if spec.search is None else plan.trials, spec.search)
                tuner = ray_tune.Tuner(trainable, param_space=space,
                                       tune_config=kdp_tune.tune_config(spec, concurrency),
                                       run_config=kdp_tune.run_config(exp_path.name, exp_path.parent,
                                                                      spec.max_failures))
                results = tuner.fit()
        finally:
            kdp_tune.set_driver_hooks(None)
    if results is not None:
        rows += _result_rows(results)
        left = _unfinished_trials(exp_path)
        if left:  # Ctrl-C: Ray saved the experiment and returned; the parent stays open for --resume
            console.print(f"[yellow]interrupted with {left} trial(s) unfinished.[/] Continue with: [bold]"
                          f"kdplatform sweep {escape(str(plan.spec_file))} --resume[/]")
            return SweepOutcome(130, parent.run_id, exp_path, {"unfinished": left}, rows)
        kdp_tune.finish_early_stopped(ctx, rows)

    # ---- summary
    counts = {"trials": len(plan.trials), "already_done": state.get("already_done", len(plan.done)),
              "ran": len(rows),
              "finished": sum(r["status"] in ("FINISHED", "SKIPPED") for r in rows),
              "failed": sum(r["status"] == "FAILED" for r in rows),
              "stopped_early": sum(r["status"] == "STOPPED" for r in rows),
              "teachers_trained": sum(o.status == "trained" for o in outcomes),
              "teachers_failed": len(failed_teachers)}
    parent.add_metrics({f"sweep/{k}": v for k, v in counts.items()}, state["sessions"])
    parent.set_tags({"kdp.failed_trials": counts["failed"], "kdp.finished_trials": counts["finished"]})
    parent.finish("FINISHED")

    console.print(summary_table(rows, f"sweep '{spec.name}': {counts['finished']} finished, {counts['failed']} "
                                f"failed, {counts['stopped_early']} stopped early; {counts['already_done']} were "
                                "already done"))
    ft = failures_table(rows)
    if ft is not None:
        console.print(ft)
    console.print(f"teachers: {counts['teachers_trained']} trained, "
                  f"{len(outcomes) - counts['teachers_trained'] - counts['teachers_failed']} reused, "
                  f"{counts['teachers_failed']} failed")
    redacted = tracking.redact(uri)
    console.print(f"MLflow: parent run {parent.run_id} in experiment '{escape(spec.name)}' ({escape(redacted)})")
    console.print(f"Ray results: {escape(str(exp_path))}  (ray.tune.ExperimentAnalysis or Tuner.restore)")
    console.print(f"Open the report: [bold]kdplatform report --experiment {escape(spec.name)} --sweep "
                  f"{parent.run_id} --tracking-uri {escape(redacted)}[/]")
    code = 1 if counts["failed"] or counts["teachers_failed"] else 0
    return SweepOutcome(code, parent.run_id, exp_path, counts, rows)


def _result_rows(results) -> list[dict[str, Any]]:
    from kdplatform.sweep.tune import REASON, STATUS

    rows = []
    for r in results:
        m = r.metrics or {}
        cfg = (r.config or {}).get("trial", {})
        status = m.get(STATUS) or ("FAILED" if r.error else "STOPPED")
        reason = m.get(REASON) or (f"{type(r.error).__name__}: {str(r.error)[-300:]}" if r.error else "")
        rows.append({"cfg_hash": m.get("kdp_cfg_hash") or cfg.get("cfg_hash"), "step": m.get("step"),
                     "run_name": m.get("kdp_run_name") or cfg.get("run_name", "?"),
                     "task": m.get("kdp_task") or cfg.get("task", "?"),
                     "method": m.get("kdp_method") or cfg.get("method", "?"), "status": status,
                     "score": m.get("dev/best_score"), "reason": reason, "run_id": m.get("mlflow_run_id")})
    return rows


def _teacher_failure_row(trial, outcome: TeacherOutcome) -> dict[str, Any]:
    return {"run_name": trial.run_name, "task": trial.task, "method": trial.method, "status": "FAILED",
            "score": None, "reason": f"teacher {outcome.teacher_hash[:8]} failed: {outcome.error}"}


def _unfinished_trials(exp_path: Path) -> int:
    """Trials Ray has not ended (after an interrupted `fit`), read from the saved experiment state."""
    try:
        from ray.tune import ExperimentAnalysis

        return sum(t.status not in ("TERMINATED", "ERROR") for t in ExperimentAnalysis(str(exp_path)).trials)
    except Exception:  # noqa: BLE001 - no state written: nothing ran
        return 0


def _ray_trial_counts(exp_path: Path) -> tuple[int, int]:
    """(trials, trials already ended) in Ray's saved experiment state: the progress view's starting point."""
    try:
        from ray.tune import ExperimentAnalysis

        trials = ExperimentAnalysis(str(exp_path)).trials
        return len(trials), sum(t.status == "TERMINATED" for t in trials)
    except Exception:  # noqa: BLE001 - only for the progress view
        return 0, 0


def _interrupted(state: dict, uri: str) -> bool:
    """Whether the previous run of this spec stopped before its end (its parent run is still RUNNING)."""
    parent_id = state.get("parent_run_id")
    try:
        run = tracking.client(uri).get_run(parent_id) if parent_id else None
    except Exception:  # noqa: BLE001 - a parent in another store: nothing to reconcile
        return False
    return run is not None and run.info.status == "RUNNING"


def _retire_previous(state: dict, exp_path: Path, uri: str) -> None:
    """Archive the Ray folder of a previous run of this spec (with --fresh: close its open runs as KILLED)."""
    c = tracking.client(uri)
    parent_id = state.get("parent_run_id")
    if _interrupted(state, uri):
        for run in tracking.find_runs(uri, state["experiment"], f"tags.`{tracking.PARENT}` = '{parent_id}' and "
                                      "attributes.status = 'RUNNING'"):
            tracking.retry(lambda r=run: c.set_terminated(r.info.run_id, status="KILLED"), "end run")
        tracking.retry(lambda: c.set_terminated(parent_id, status="KILLED"), "end run")
    archive = exp_path.with_name(f"{exp_path.name}.{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(exp_path, archive)


def _worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES) and not tracking.is_credential_env(k)}
    for k in ("KDP_CACHE_DIR", "KDP_GLUE_DIR", "KDP_FAULTS_DIR", "HF_HOME"):
        if env.get(k):
            env[k] = str(Path(env[k]).expanduser().resolve())
    env["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    return env


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


__all__ = ["SweepError", "SweepOutcome", "run_sweep"]
