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

import errno
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.markup import escape

from kdplatform import runs, tracking
from kdplatform.config import describe_trials
from kdplatform.sweep.expand import SweepPlan, plan_sweep, preflight_plan
from kdplatform.sweep.machine import cpu_only_resources, gpu_refusal
from kdplatform.sweep.progress import SweepMonitor, machine_table, plan_tables
from kdplatform.sweep.session import (SweepError, SweepOutcome, close_orphans_of, close_parent, counts_of, hold_spec,
                                      nothing_new, open_parent, print_results, refresh_done, sweep_command)
from kdplatform.sweep.teachers import TO_TRAIN, TeacherOutcome, teacher_status, train_teachers

STATE_FILE = "kdp_sweep.json"
LOOPBACK = "127.0.0.1"  # a local cluster started by kdplatform listens here only
OBJECT_STORE_BYTES = 1 << 30  # the sweep ships configs, not tensors: 1 GiB is plenty
# Environment a trial needs on every node (a local cluster inherits it anyway; --address does not).
ENV_PREFIXES = ("KDP_", "HF_", "TRANSFORMERS_", "MLFLOW_", "TOKENIZERS_")
DRIVER_ENV = {
    # the trial function reports dev/score only in stages that train the head: ASHA skips the others, and
    # so does our Optuna searcher (sweep/optuna_search.py)
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",
    # num_to_keep=1 snapshots the experiment at every checkpoint on purpose (resume consistency)
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
    # Ray's own console reporter: off (verbose=0 alone still prints its banner); our progress view reports
    "RAY_AIR_NEW_OUTPUT": "0",
}


def run_sweep(file: str | Path, *, tracking_uri: str | None = None, dry_run: bool = False, resume: bool = False,
              fresh: bool = False, force: bool = False, address: str | None = None,
              max_concurrent: int | None = None, storage: str | Path | None = None, num_cpus: int | None = None,
              num_gpus: int | None = None, console: Console | None = None,
              overrides: Sequence[str] = ()) -> SweepOutcome:
    """Run (or with `dry_run` only print) the sweep of `file`. Raises ConfigError / SweepError for user errors.

    `force` runs configs that already have a FINISHED run again (a new run each).
    """
    console = console or Console()
    plan = plan_sweep(file, tracking_uri, force=force, overrides=overrides)
    exp_path = Path(storage or "ray_results").resolve() / plan.experiment_dir_name
    if resume and max_concurrent is not None:  # Tuner.restore keeps the saved TuneConfig: it would do nothing
        again = sweep_command(plan, "--fresh", "--max-concurrent", str(max_concurrent), storage=exp_path.parent,
                              address=address)
        raise SweepError("--max-concurrent cannot change a resumed sweep: Ray restores the limit it started with",
                         f"resume without --max-concurrent, or start again with: {again} (finished trials are "
                         "kept and skipped)")
    refusal = None if dry_run else gpu_refusal(plan.spec, address, num_gpus)
    if refusal:  # before the data checks, which would fetch hub data for a sweep that cannot start here
        raise SweepError(refusal, "run them on this machine's CPU: "
                         f"{sweep_command(plan, '--num-gpus', '0')}; or run on a machine with GPUs, or join a "
                         "GPU cluster with --address")
    if num_gpus == 0 and not address:  # --num-gpus 0: CPU only, so GPU requests would never be met
        plan.spec = cpu_only_resources(plan.spec)
    # every data file and ready checkpoint the trials read, checked before anything is written (the spec's
    # claim, the parent run, Ray); a dry run checks them too, without downloading hub data
    preflight_plan(plan, runs_here=not address, fetch=not dry_run)
    if dry_run:
        teachers = [teacher_status(t, plan.tracking_uri) for t in plan.teachers().values()]
        for r in plan_tables(plan, teachers, plan.tracking_uri):
            console.print(r)
        for line in describe_trials(plan.trials):  # what each trial computes: loss terms, layer pairs, weights
            console.print(escape(line))
        console.print(machine_table(plan, [o.trial for o in teachers if o.status == TO_TRAIN], address=address,
                                    num_gpus=num_gpus, storage=storage))
        if (exp_path / STATE_FILE).is_file():
            console.print(f"Ray experiment folder exists: {escape(str(exp_path))}")
        console.print("[bold]dry run:[/] nothing was started.")
        return SweepOutcome(0, experiment_path=exp_path)
    waited: list[str] = []
    spec_claim = hold_spec(plan, console, on_wait=waited.append)
    try:
        if waited:  # the other run/sweep of this file may have finished trials meanwhile
            refresh_done(plan)
        return _claimed_sweep(plan, file, exp_path, resume=resume, fresh=fresh, address=address,
                              max_concurrent=max_concurrent, num_cpus=num_cpus, num_gpus=num_gpus, console=console)
    finally:
        spec_claim.release()


def _claimed_sweep(plan: SweepPlan, file: str | Path, exp_path: Path, *, resume: bool, fresh: bool,
                   address: str | None, max_concurrent: int | None, num_cpus: int | None, num_gpus: int | None,
                   console: Console) -> SweepOutcome:
    """The sweep, with this spec claimed: reconcile an interrupted run, open the parent, then Ray."""
    uri, spec = plan.tracking_uri, plan.spec
    state, exp_path = _find_state(plan, exp_path, console)
    interrupted = state is not None and _interrupted(state, uri)
    if resume:
        if state is None:
            raise SweepError(f"nothing to resume for this spec: no {STATE_FILE} in {exp_path}",
                             "run the sweep without --resume (a changed spec has another hash, so a new folder)")
        if state.get("tracking_uri") != tracking.redact(uri):
            raise SweepError(f"this sweep logged to {state.get('tracking_uri')}, not {tracking.redact(uri)}",
                             "pass the same --tracking-uri (or MLFLOW_TRACKING_URI) as the first run")
        if not interrupted:
            console.print(f"nothing to resume: the last run of this sweep ended (parent run "
                          f"{state.get('parent_run_id')}). Run it without --resume to run what is missing.")
            return SweepOutcome(0, state.get("parent_run_id"), exp_path)
        close_orphans_of(plan, console, keep={state["parent_run_id"]})
    else:
        if interrupted and not fresh:
            raise SweepError(f"an interrupted run of this sweep exists ({exp_path}, parent run "
                             f"{state.get('parent_run_id')})", "continue it with --resume, or abandon it with --fresh")
        nothing_to_run = not plan.to_run and spec.search is None
        # a new run takes the folder (the last one is archived); a rerun with nothing new leaves the finished
        # sweep's folder where its parent run's kdp.ray_experiment tag says it is (--fresh still abandons an
        # interrupted one)
        if state is not None and (interrupted or not nothing_to_run):
            _retire_previous(state, exp_path, uri)
            state = None
        close_orphans_of(plan, console)
        if nothing_to_run:
            return nothing_new(plan, file, console)

    outcomes = [teacher_status(t, uri) for t in plan.teachers().values()]
    for r in plan_tables(plan, outcomes, uri)[:2 + len(plan.notes)]:
        console.print(r)  # the header and notes; the full tables are --dry-run's
    parent, state = _open_parent(plan, state, exp_path, len(outcomes))
    console.print(f"parent run [bold]{parent.run_id}[/] (session {state['sessions']}), Ray experiment "
                  f"{escape(str(exp_path))}")
    if address and uri.startswith("sqlite:"):
        console.print("[yellow]warning:[/] trials on other nodes cannot write to a local SQLite file: point "
                      "--tracking-uri at an MLflow server (and --storage at storage every node can reach)")
    outcome = _on_ray(plan, parent, state, exp_path, resume=resume, address=address, max_concurrent=max_concurrent,
                      num_cpus=num_cpus, num_gpus=num_gpus, console=console)
    if outcome.exit_code == 130:
        _close_open_runs(parent, uri, spec.name, "KILLED", {runs.INTERRUPTED: time.strftime("%Y-%m-%d %H:%M:%S")})
        resume_hint = sweep_command(plan, "--resume", storage=exp_path.parent, address=address)
        console.print(f"[yellow]interrupted:[/] open runs closed KILLED. Continue with: [bold]{escape(resume_hint)}[/]",
                      soft_wrap=True)  # one line however wide the terminal, to paste
    return outcome


def _find_state(plan: SweepPlan, exp_path: Path, console: Console) -> tuple[dict | None, Path]:
    """The saved state of this spec's last sweep: in `exp_path`, else in the Ray folder named by a parent
    run of this spec still RUNNING in the store (a sweep started from another directory or --storage)."""
    state_file = exp_path / STATE_FILE
    if state_file.is_file():
        return json.loads(state_file.read_text()), exp_path
    for r in runs.open_sweeps(plan.tracking_uri, plan.experiment, plan.spec_hash):
        folder = r.data.tags.get(runs.RAY_EXPERIMENT)
        if folder and (Path(folder) / STATE_FILE).is_file():
            console.print(f"found this sweep's interrupted run through the store: {escape(folder)}")
            return json.loads((Path(folder) / STATE_FILE).read_text()), Path(folder)
    return None, exp_path


def _open_parent(plan: SweepPlan, state: dict | None, exp_path: Path, teachers: int) -> tuple:
    """A new parent run (and state file), or the interrupted one reopened for --resume."""
    if state is None:
        parent = open_parent(plan, "sweep", ray_experiment=exp_path)
        parent.log_params({"teachers": teachers})
        state = {"spec_hash": plan.spec_hash, "parent_run_id": parent.run_id, "experiment": plan.spec.name,
                 "tracking_uri": tracking.redact(plan.tracking_uri), "spec_file": str(plan.spec_file),
                 "sessions": 0, "already_done": len(plan.done), "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    else:
        parent = runs.reopen(plan.tracking_uri, plan.spec.name, state["parent_run_id"])
    state["sessions"] = state.get("sessions", 0) + 1
    exp_path.mkdir(parents=True, exist_ok=True)
    _write_json(exp_path / STATE_FILE, state)
    return parent, state


def _on_ray(plan: SweepPlan, parent: tracking.RunLogger, state: dict, exp_path: Path, *, resume: bool,
            address: str | None, max_concurrent: int | None, num_cpus: int | None, num_gpus: int | None,
            console: Console) -> SweepOutcome:
    """Start (or join) Ray, run the stages, stop Ray. An interruption is exit 130; a fault closes the runs
    FAILED with the reason (a full disk becomes a SweepError saying what to do)."""
    uri, name = plan.tracking_uri, plan.spec.name
    if not address:
        _local_cluster_on_loopback()
    import ray

    os.environ.update(DRIVER_ENV)
    ray_log = ray_logs_to_file(exp_path)
    os.environ.update(_worker_env())  # absolute paths: a local cluster's workers inherit this environment
    _no_secrets_in_tune_runtime_env()
    started_ray = False
    previous_sigterm = None
    try:
        if address:
            ray.init(address=address, runtime_env={"env_vars": _worker_env()}, log_to_driver=True)
        else:
            # workers' own output (Ray Train's "Checkpoint successfully created", warnings) stays in the
            # session's worker logs; our view reports trial results and failures (with their error files)
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                     object_store_memory=OBJECT_STORE_BYTES, log_to_driver=False, _node_ip_address=LOOPBACK)
            _reap_cluster_after_exit()
        started_ray = True
        ray_log = ray_logs_to_file(exp_path)  # again: ray.init may reinstall its console handler
        # after ray.init, which installs its own SIGTERM handler (exit with a native stack dump): `kill` and
        # `timeout` stop the sweep as Ctrl-C does (Tune saves its state; runs are closed KILLED below)
        previous_sigterm = signal.signal(signal.SIGTERM, _sigterm_as_sigint)
        outcome = _run_stages(plan, parent, state, exp_path, resume, max_concurrent, console)
        console.print(f"Ray's log: {escape(str(ray_log))}" + (f" (workers: {escape(_ray_session_logs())})"
                                                               if not address else ""), soft_wrap=True)
    except KeyboardInterrupt:
        outcome = SweepOutcome(130, parent.run_id, exp_path)
    except Exception as e:  # a full disk, Ray's state unreadable, ...: the parent ends FAILED, saying why
        _close_open_runs(parent, uri, name, "FAILED", {runs.FAILURE_REASON: f"{type(e).__name__}: {e}"})
        if _disk_full(e) or _storage_full(exp_path):
            raise SweepError(f"the disk holding Ray's storage {exp_path.parent} is full ({type(e).__name__}: "
                             f"{tracking.redact(str(e))[:200]}); the sweep's open runs were closed FAILED",
                             f"free space under {exp_path.parent}, then continue with: "
                             f"{sweep_command(plan, '--resume', storage=exp_path.parent, address=address)}") from None
        if _out_of_memory(e):  # Ray's memory monitor killed a trial's worker: Tune itself gives up
            raise SweepError("a trial's worker was killed by Ray's memory monitor (this node ran out of memory); "
                             "finished trials are kept, the open runs were closed FAILED",
                             "run fewer trials at once; a resumed sweep keeps its old limit, so start again: "
                             f"{sweep_command(plan, '--fresh', '--max-concurrent', '1', storage=exp_path.parent, address=address)}"
                             " (finished trials are kept and skipped)") from None
        raise
    finally:
        if started_ray:
            ray.shutdown()
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
    return outcome


def _reap_cluster_after_exit() -> None:
    """Our local cluster's processes end when this process does, even by SIGKILL (sweep/reaper.py)."""
    import ray

    from kdplatform.sweep import reaper

    try:
        reaper.start(ray._private.worker._global_node.get_session_dir_path())
    except Exception as e:  # noqa: BLE001 - ray.shutdown still ends the cluster on an ordinary exit
        logging.getLogger("kdplatform").warning("cannot watch the local Ray cluster: %s", e)


def ray_logs_to_file(exp_path: Path) -> Path:
    """Ray's own INFO/WARNING lines (driver side) go to `<experiment>/ray.log`, not the user's console."""
    path = exp_path / "ray.log"
    exp_path.mkdir(parents=True, exist_ok=True)
    ray_logger = logging.getLogger("ray")
    for h in list(ray_logger.handlers):
        if not (isinstance(h, logging.FileHandler) and h.baseFilename == str(path)):
            ray_logger.removeHandler(h)
    if not ray_logger.handlers:
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ray_logger.addHandler(handler)
    ray_logger.propagate = False
    return path


def _ray_session_logs() -> str:
    """The local cluster's log folder (worker stdout/stderr), while Ray runs."""
    try:
        import ray

        return str(ray._private.worker.global_worker.node.get_logs_dir_path())
    except Exception:  # noqa: BLE001 - only a hint in the summary
        return "/tmp/ray/session_latest/logs"


def _chain(e: BaseException | None):
    """`e` and what it wraps, outermost first."""
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def _disk_full(e: BaseException | None) -> bool:
    return any(getattr(x, "errno", None) == errno.ENOSPC or "No space left on device" in str(x) for x in _chain(e))


def _out_of_memory(e: BaseException | None) -> bool:
    """Whether `e` (or what it wraps) is Ray's OutOfMemoryError; Tune re-raises it as a plain RuntimeError
    when the killed worker was a reused trial actor."""
    return any(type(x).__name__ == "OutOfMemoryError" or "killed due to the node running low on memory" in str(x)
               for x in _chain(e))


def _storage_full(exp_path: Path) -> bool:
    """Whether Ray's storage has run out of space (its errors reach the driver wrapped, or as a truncated
    file read back: an EOFError rather than ENOSPC)."""
    import shutil

    try:
        return shutil.disk_usage(exp_path if exp_path.exists() else exp_path.parent).free < (1 << 20)
    except OSError:
        return False


def _sigterm_as_sigint(_signum, _frame) -> None:
    os.kill(os.getpid(), signal.SIGINT)


def _local_cluster_on_loopback() -> None:
    """Make the local Ray cluster listen on 127.0.0.1 only.

    Ray's gRPC servers bind 127.0.0.1 only when the node address is 127.0.0.1, and `ray.init` turns a given
    127.0.0.1 into the machine's address unless this switch (read by Ray at import; its workers inherit it)
    is off. Not for `--address`: a real cluster's nodes must reach each other.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # Ray may have been imported before the variable was set


def _no_secrets_in_tune_runtime_env() -> None:
    """Ray Tune copies AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN from the driver into each
    trial's runtime_env, which Ray writes to its world-readable session log (runtime_env_agent.log). Only
    Ray's own switches stay on that list: trials on a local cluster inherit credentials from the driver's
    environment anyway, and nodes of a real cluster have their own."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE.difference_update(
        [k for k in class_cache.ENV_VARS_TO_PROPAGATE if k.startswith("AWS_") or tracking.is_credential_env(k)])


def _close_open_runs(parent: tracking.RunLogger, uri: str, experiment: str, status: str,
                     tags: dict[str, str]) -> None:
    """A sweep that stopped before its end: its open trial runs and its parent end `status` (KILLED after an
    interruption, FAILED after a fault), never FINISHED; `--resume` reopens them."""
    try:
        for run in runs.search(uri, experiment, runs.where(runs.tag_is(runs.PARENT, parent.run_id),
                                                           runs.status_is("RUNNING"))):
            runs.close_run(uri, run.info.run_id, status, tags)
        if runs.INTERRUPTED in tags:  # Ctrl-C/SIGTERM: say so, not the SystemExit Ray stopped the trials with
            runs.mark_interrupted(uri, experiment, parent.run_id)
        parent.set_tags({k: v[:5000] for k, v in tags.items()})
        parent.finish(status)
    except Exception as e:  # noqa: BLE001 - the store is gone: the runs stay RUNNING, --resume still finds them
        logging.getLogger("kdplatform").error("could not close the interrupted sweep's runs: %s",
                                              tracking.redact(str(e))[:300])


def _run_stages(plan: SweepPlan, parent: tracking.RunLogger, state: dict, exp_path: Path, resume: bool,
                max_concurrent: int | None, console: Console) -> SweepOutcome:
    from ray import tune as ray_tune

    from kdplatform.sweep import tune as kdp_tune

    spec, uri = plan.spec, plan.tracking_uri
    concurrency = max_concurrent or spec.max_concurrent_trials
    total = spec.search.num_samples if spec.search is not None else len(plan.to_run)
    restorable = resume and ray_tune.Tuner.can_restore(str(exp_path))
    if restorable:
        _check_restorable(exp_path, sweep_command(plan, "--fresh", storage=exp_path.parent))
    ended: list[str] = []
    if restorable:
        n_trials, ended = _ray_trial_counts(exp_path)
        total = n_trials or total  # the restored experiment's trials, those ended before included
    live_steps = str(exp_path / "kdp_progress")  # teachers' and trials' step files (sweep/live_steps.py)
    with SweepMonitor(console, total, concurrency or 1) as monitor:
        monitor.already_ended(ended)
        # ---- teacher stage: every teacher the remaining trials need, once, before any student starts
        outcomes = [teacher_status(t, uri) for t in plan.teachers().values()]
        outcomes = train_teachers(outcomes, spec=spec, tracking_uri=uri, parent_run_id=parent.run_id,
                                  max_concurrent=concurrency, on_update=monitor.teacher_update,
                                  steps_dir=live_steps, on_steps=monitor.teacher_steps)
        failed_teachers = {o.teacher_hash: o for o in outcomes if o.status == "failed"}
        rows = [_teacher_failure_row(t, failed_teachers[t.teacher_hash]) for t in plan.to_run
                if t.teacher_hash in failed_teachers]
        run_trials = [t for t in plan.to_run if t.teacher_hash not in failed_teachers]

        # ---- students
        ctx = kdp_tune.TrialContext(tracking_uri=uri, experiment=spec.name, parent_run_id=parent.run_id,
                                    sweep_id=parent.run_id, cwd=os.getcwd(), spec_file=spec.source_file,
                                    trials={t.cfg_hash: t.model_dump(mode="json") for t in plan.trials},
                                    bases=plan.bases, force=plan.force,
                                    progress_dir=live_steps)
        results = _fit(plan, ctx, monitor, exp_path, restorable, run_trials, concurrency)
    if results is not None:
        rows += _result_rows(results)
        full = [r for r in rows if "No space left on device" in (r.get("reason") or "")]
        if full:  # not a failure of the trial: the sweep stops FAILED, to be resumed once there is space
            raise OSError(errno.ENOSPC, f"{len(full)} trial(s) could not write: {full[0]['reason'][:300]}")
        left = _unfinished_trials(exp_path)
        if left:  # Ctrl-C / SIGTERM: Ray saved the experiment and returned; --resume continues it
            console.print(f"[yellow]{left} trial(s) unfinished.[/]")
            return SweepOutcome(130, parent.run_id, exp_path, {"unfinished": left}, rows)
        kdp_tune.finish_early_stopped(ctx, rows)

    # ---- summary
    counts = counts_of(rows, plan, state.get("already_done", len(plan.done)))
    counts.update(teachers_trained=sum(o.status == "trained" for o in outcomes), teachers_failed=len(failed_teachers))
    close_parent(parent, counts, state["sessions"])
    print_results(console, plan, parent.run_id, rows, counts)
    console.print(f"teachers: {counts['teachers_trained']} trained, "
                  f"{len(outcomes) - counts['teachers_trained'] - counts['teachers_failed']} reused, "
                  f"{counts['teachers_failed']} failed")
    console.print(f"Ray results: {escape(str(exp_path))}  (ray.tune.ExperimentAnalysis or Tuner.restore)")
    code = 1 if counts["failed"] or counts["teachers_failed"] else 0
    return SweepOutcome(code, parent.run_id, exp_path, counts, rows)


def _fit(plan: SweepPlan, ctx, monitor: SweepMonitor, exp_path: Path, restorable: bool, run_trials: list,
         concurrency: int | None):
    """The students through Ray Tune: a new Tuner, or the interrupted one restored; None if nothing to run."""
    from ray import tune as ray_tune

    from kdplatform.sweep import tune as kdp_tune

    spec = plan.spec
    kdp_tune.set_driver_hooks(kdp_tune.DriverHooks(ctx, monitor))
    trainable = kdp_tune.trainable_for(ctx, spec.resources)
    try:
        if restorable:
            try:
                tuner = ray_tune.Tuner.restore(str(exp_path), trainable=trainable, resume_unfinished=True,
                                               resume_errored=True)
            except Exception as e:  # noqa: BLE001 - e.g. a state file truncated by a full disk
                raise SweepError(f"cannot resume: Ray's saved state in {exp_path} is unreadable "
                                 f"({type(e).__name__}: {str(e)[:200]})", "start again with: "
                                 f"{sweep_command(plan, '--fresh', storage=exp_path.parent)} (finished trials are "
                                 "kept and skipped)") from None
            return tuner.fit()
        if run_trials or spec.search is not None:
            space = kdp_tune.param_space(run_trials if spec.search is None else plan.trials, spec.search)
            return ray_tune.Tuner(trainable, param_space=space, tune_config=kdp_tune.tune_config(spec, concurrency),
                                  run_config=kdp_tune.run_config(exp_path.name, exp_path.parent,
                                                                 spec.max_failures)).fit()
        return None
    finally:
        kdp_tune.set_driver_hooks(None)


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


def _check_restorable(exp_path: Path, fresh_command: str) -> None:
    """Refuse to restore a Ray experiment whose saved state was cut short (a full disk): Ray would restore
    it without its trials' configs and run a phantom trial, then report the sweep done."""
    from ray.tune import ExperimentAnalysis

    why = ""
    tuner_file = exp_path / "tuner.pkl"
    if not tuner_file.is_file() or not tuner_file.read_bytes().endswith(b"."):  # a pickle ends with STOP
        why = f"{tuner_file.name} is missing or truncated"
    else:
        try:
            trials = ExperimentAnalysis(str(exp_path)).trials
            if not trials or any(not ({"trial", "base"} & set(t.config)) for t in trials):
                why = "its trial list is empty or lacks the trials' configs"
        except Exception as e:  # noqa: BLE001 - unreadable JSON state
            why = f"its experiment state is unreadable ({type(e).__name__}: {str(e)[:200]})"
    if why:
        raise SweepError(f"cannot resume: Ray's saved state in {exp_path} is damaged: {why}",
                         f"start again with: {fresh_command} (trials that FINISHED are kept and skipped; the "
                         "others run again)")


def _ray_trial_counts(exp_path: Path) -> tuple[int, list[str]]:
    """(trials, ids of the trials already ended) in Ray's saved experiment state: the progress view's start."""
    try:
        from ray.tune import ExperimentAnalysis

        trials = ExperimentAnalysis(str(exp_path)).trials
        return len(trials), [t.trial_id for t in trials if t.status == "TERMINATED"]
    except Exception:  # noqa: BLE001 - only for the progress view
        return 0, []


def _interrupted(state: dict, uri: str) -> bool:
    """Whether the previous run of this spec stopped before its end: its parent run is not FINISHED (RUNNING
    after a crash, KILLED after Ctrl-C/SIGTERM, FAILED after a fault such as a full disk)."""
    parent_id = state.get("parent_run_id")
    try:
        run = runs.get_run(uri, parent_id) if parent_id else None
    except Exception:  # noqa: BLE001 - a parent in another store: nothing to reconcile
        return False
    return run is not None and run.info.status != "FINISHED"


def _retire_previous(state: dict, exp_path: Path, uri: str) -> None:
    """Archive the Ray folder of a previous run of this spec (with --fresh: close its open runs as KILLED)."""
    parent_id = state.get("parent_run_id")
    if _interrupted(state, uri):
        runs.close_children(uri, state["experiment"], parent_id, "KILLED", "abandoned with --fresh")
        runs.close_run(uri, parent_id, "KILLED", {runs.FAILURE_REASON: "abandoned with --fresh"})
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
