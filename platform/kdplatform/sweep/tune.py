"""Ray Tune side of a sweep: the trainable that wraps the worker, and the Tuner built around it.

`student_trainable(config, ctx)` runs ONE student trial through `distill.worker.run_trial` and adapts the
worker's callbacks to Ray: every eval becomes a `tune.report(metrics)`, every epoch end a
`tune.report(metrics, checkpoint=...)` whose folder holds the worker's `state.pt` and `run.json` (the
trial's MLflow run id). On a retry or a resumed sweep, `tune.get_checkpoint()` gives that folder back and
the worker continues from it in the SAME MLflow run; a trial that crashed before its first checkpoint finds
its run through MLflow (parent run + config hash), so one trial never gets a second run.

A diverged trial (NaN/inf loss) is not retried, nor is one that fails on the user's data or config: the
worker marks its run FAILED with the reason, the trainable reports `kdp_status: FAILED` and returns, and the
sweep goes on. Other exceptions (crashes) propagate and `FailureConfig(max_failures)` retries the trial.

`SweepCallback` runs in the driver: it feeds the progress view, repairs MLflow runs a worker could not
close itself (a trial stopped early by ASHA, a worker process that died) and deletes a completed trial's
checkpoints (its student is in MLflow; the checkpoints only served resume).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from kdplatform import runs, tracking
from kdplatform.config import ResolvedTrial
from kdplatform.distill.heap import release_memory
from kdplatform.sweep.live_steps import StepWriter, read_steps, step_file

STATUS, REASON, RUN_ID = "kdp_status", "kdp_failure_reason", "mlflow_run_id"
EARLY_STOPPED = runs.EARLY_STOPPED
NODE = runs.NODE


@dataclass
class TrialContext:
    """What every trial needs besides its Ray config; shipped once with `tune.with_parameters`."""

    tracking_uri: str
    experiment: str
    parent_run_id: str
    sweep_id: str
    cwd: str
    spec_file: str | None = None
    trials: dict[str, dict] = field(default_factory=dict)  # cfg_hash -> ResolvedTrial JSON (grid)
    bases: dict[str, dict] = field(default_factory=dict)  # cfg_hash -> raw TrialConfig (search)
    force: bool = False  # --force: run configs that already have a FINISHED run again
    # live step counts: each trial writes <progress_dir>/<trial id>.json (sweep/live_steps.py)
    progress_dir: str | None = None

    def resolve(self, config: dict[str, Any]) -> ResolvedTrial:
        if "trial" in config:
            return ResolvedTrial.model_validate(self.trials[config["trial"]["cfg_hash"]])
        from kdplatform.sweep.expand import apply_sample

        return apply_sample(self.bases[config["base"]], config.get("space", {}), self.spec_file)


def grid_entry(trial: ResolvedTrial) -> dict[str, Any]:
    """The small, readable config Ray stores per trial (the full config travels in the context)."""
    return {"cfg_hash": trial.cfg_hash, "run_name": trial.run_name, "task": trial.task, "method": trial.method,
            "layer_map": None if trial.layer_map is None else str(trial.layer_map),
            "consistency_weight": trial.consistency_weight, "bits": trial.bits, "seed": trial.seed,
            "teacher_hash": trial.teacher_hash}


# ------------------------------------------------------------------------------------------- trainable
class _Reporter:
    """Worker callbacks -> tune.report. Each eval is reported once; the eval that ends an epoch is
    reported together with that epoch's checkpoint (reports are held back by one eval for that)."""

    def __init__(self, trial: ResolvedTrial, workdir: Path, progress_file: Path | None = None):
        self.on_progress = StepWriter(progress_file)  # the live step count, to the driver's view
        self.ids = {"kdp_cfg_hash": trial.cfg_hash, "kdp_run_name": trial.run_name, "kdp_task": trial.task,
                    "kdp_method": trial.method}
        self.workdir = workdir
        self.pending: dict[str, Any] | None = None
        self.last: dict[str, Any] = {}
        self.run_id: str | None = None

    def _with_ids(self, metrics: dict[str, Any]) -> dict[str, Any]:
        out = {**metrics, **self.ids}
        if self.run_id:
            out[RUN_ID] = self.run_id
        return out

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        if self.pending is not None:
            tune.report(self._with_ids(self.pending))
        self.pending = {**metrics, "step": step}
        self.last = self.pending

    def on_checkpoint(self, save, info: dict[str, Any]) -> None:
        folder = self.workdir / f"checkpoint_step{info['step']}"
        save(folder)
        self.run_id = json.loads((folder / "run.json").read_text())["run_id"]
        metrics = self.pending if self.pending is not None else {**self.last, "step": info["step"]}
        # Ray copies the folder into the trial's storage during report; ours is only a staging copy.
        tune.report(self._with_ids({**metrics, "epoch": info["epoch"], "stage": info["stage"]}),
                    checkpoint=tune.Checkpoint.from_directory(str(folder)))
        shutil.rmtree(folder, ignore_errors=True)
        self.pending = None

    def final(self, status: str, extra: dict[str, Any]) -> None:
        metrics = {**(self.pending or self.last), **extra, STATUS: status}
        tune.report(self._with_ids(metrics))


def student_trainable(config: dict[str, Any], ctx: TrialContext) -> None:
    """Ray Tune function trainable: one student trial, resumable, one MLflow run.

    The trial claims its config first (`runs.claim`): a concurrent sweep or `run` holding it makes this
    one wait, and then it finds that config FINISHED and reports SKIPPED."""
    if os.path.isdir(ctx.cwd):
        os.chdir(ctx.cwd)  # relative paths in the spec mean the driver's working directory
    trial = ctx.resolve(config)
    workdir = Path(tempfile.mkdtemp(prefix="kdp_trial_"))
    reporter = _Reporter(trial, workdir, progress_file(ctx, tune.get_context().get_trial_id()))
    try:
        with runs.claimed(ctx.tracking_uri, ctx.experiment, trial.cfg_hash):
            _run_claimed(trial, ctx, reporter, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        release_memory()  # this worker is reused for the next trial: do not carry this one's heap into it


def _run_claimed(trial: ResolvedTrial, ctx: TrialContext, reporter: _Reporter, workdir: Path) -> None:
    from kdplatform.config import ConfigError
    from kdplatform.distill.tasks import DataError
    from kdplatform.distill.teacher import TeacherError
    from kdplatform.distill.worker import Callbacks, DivergedError, TrialSetupError, run_trial

    uri = ctx.tracking_uri
    done = None if ctx.force else runs.finished_run(uri, ctx.experiment, trial.cfg_hash)
    if done is not None:  # finished meanwhile (another sweep, or just before the driver was killed)
        reporter.run_id = done.info.run_id
        reporter.final("SKIPPED", {k: v for k, v in done.data.metrics.items() if k.startswith("dev/")})
        return
    runs.close_orphans(uri, ctx.experiment, trial.cfg_hash, keep_parent=ctx.parent_run_id)
    resume_dir, run_id, from_step = None, None, None
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        resume_dir = Path(ckpt.to_directory(str(workdir / "resume")))
        saved = json.loads((resume_dir / "run.json").read_text())
        run_id, from_step = saved["run_id"], saved.get("global_step")
    else:
        run_id = runs.trial_run_id(uri, ctx.experiment, ctx.parent_run_id, trial.cfg_hash)
        if run_id is not None and runs.get_run(uri, run_id).info.status == "FINISHED":
            run_id = None  # --force: a new run beside the finished one
    if run_id is not None:
        reporter.run_id = run_id
        runs.note_retry(uri, run_id, from_step)
    callbacks = Callbacks(on_eval=reporter.on_eval, on_checkpoint=reporter.on_checkpoint,
                          on_progress=reporter.on_progress)
    try:
        result = run_trial(trial, tracking_uri=uri, parent_run_id=ctx.parent_run_id, run_id=run_id,
                           callbacks=callbacks, resume_dir=resume_dir, sweep_id=ctx.sweep_id)
    except (DivergedError, TrialSetupError, DataError, TeacherError, ConfigError) as e:
        # deterministic: a retry would fail the same way. The worker has marked its run FAILED.
        reporter.final("FAILED", {REASON: f"{type(e).__name__}: {e}"[:500]})
        return
    reporter.run_id = result.run_id
    _tag_node(uri, result.run_id)
    reporter.final("FINISHED", {**result.best, "minutes": result.seconds / 60})


def progress_file(ctx: TrialContext, trial_id: str | None) -> Path | None:
    """Where a trial's live step count is written (None: no live steps for this sweep)."""
    return step_file(ctx.progress_dir, trial_id)


def read_progress(ctx: TrialContext, trial_id: str) -> dict[str, Any] | None:
    """A running trial's last written step count ({label, step, total}), or None."""
    return read_steps(step_file(ctx.progress_dir, trial_id, create=False))


def _tag_node(uri: str, run_id: str) -> None:
    """`kdp.node`: the Ray node that trained the run (its node id; the IP alone is ambiguous when several
    nodes share a host), so a multi-node sweep shows where each trial ran."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    tracking.retry(lambda: tracking.client(uri).set_tag(run_id, NODE, node), "set tag")


# ------------------------------------------------------------------------------------------- the tuner
def trial_namers():
    """(trial_name, trial_dirname) for Ray: `<trial id>_<run name>` folders.

    Closures that use nothing from kdplatform: Ray pickles them BY VALUE into the experiment state, so
    `tune.ExperimentAnalysis` and `Tuner.restore` read a sweep's results without kdplatform installed.
    """

    def trial_name(trial) -> str:
        cfg = trial.config
        return cfg["trial"]["run_name"] if "trial" in cfg else f"sample-{trial.trial_id}"

    def trial_dirname(trial) -> str:
        import re

        return f"{trial.trial_id}_{re.sub(r'[^A-Za-z0-9._-]+', '-', trial_name(trial)).strip('-')[:80]}"

    return trial_name, trial_dirname


trial_name, trial_dirname = trial_namers()


def param_space(trials: list[ResolvedTrial], search=None) -> dict[str, Any]:
    if search is None:
        return {"trial": tune.grid_search([grid_entry(t) for t in trials])}
    space = {}
    for key, dim in search.space.items():
        if dim.type == "uniform":
            space[key] = tune.uniform(dim.low, dim.high)
        elif dim.type == "loguniform":
            space[key] = tune.loguniform(dim.low, dim.high)
        elif dim.type == "randint":
            space[key] = tune.randint(int(dim.low), int(dim.high))
        else:
            space[key] = tune.choice(list(dim.values))
    return {"base": tune.choice([t.cfg_hash for t in trials]), "space": space}


def trainable_for(ctx: TrialContext, resources) -> Any:
    res = {"cpu": resources.cpu, "gpu": resources.gpu}
    return tune.with_resources(tune.with_parameters(student_trainable, ctx=ctx), res)


def tune_config(spec, max_concurrent: int | None) -> tune.TuneConfig:
    search_alg, scheduler, num_samples = None, None, 1
    namer, dirnamer = trial_namers()
    if spec.search is not None:
        from kdplatform.sweep.optuna_search import StageAwareOptunaSearch

        search_alg = StageAwareOptunaSearch(metric=spec.search.metric, mode=spec.search.mode,
                                            seed=spec.search.seed)
        num_samples = spec.search.num_samples
    if spec.scheduler is not None:
        from ray.tune.schedulers import ASHAScheduler

        s = spec.scheduler
        scheduler = ASHAScheduler(time_attr=s.time_attr, metric=s.metric, mode=s.mode, max_t=s.max_t or 10**9,
                                  grace_period=s.grace_period, reduction_factor=s.reduction_factor,
                                  brackets=s.brackets)
    return tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
                           max_concurrent_trials=max_concurrent, reuse_actors=True,
                           trial_name_creator=namer, trial_dirname_creator=dirnamer)


def run_config(name: str, storage: Path, max_failures: int) -> tune.RunConfig:
    return tune.RunConfig(name=name, storage_path=str(storage), verbose=0, callbacks=[SweepCallback()],
                          failure_config=tune.FailureConfig(max_failures=max_failures),
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1))


# ------------------------------------------------------------------------------------ driver callback
_DRIVER: Any = None  # the running sweep's DriverHooks (driver process only; the callback is pickled)


def set_driver_hooks(hooks: Any) -> None:
    global _DRIVER
    _DRIVER = hooks


class SweepCallback(tune.Callback):
    """Stateless, so it survives Ray pickling it into the experiment; forwards to the live driver."""

    def on_trial_start(self, iteration, trials, trial, **info):
        if _DRIVER is not None:
            _DRIVER.trial_start(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if _DRIVER is not None:
            _DRIVER.trial_result(trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if _DRIVER is not None:
            _DRIVER.trial_complete(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        if _DRIVER is not None:
            _DRIVER.trial_error(trial)

    def on_step_end(self, iteration, trials, **info):
        if _DRIVER is not None:
            _DRIVER.step(trials)


class DriverHooks:
    """Driver-side bookkeeping: progress view updates and MLflow repairs for runs a worker left open."""

    def __init__(self, ctx: TrialContext, monitor):
        self.ctx = ctx
        self.monitor = monitor
        self.progress_read_at = 0.0

    def trial_start(self, trial) -> None:
        self.monitor.trial_started(trial.trial_id, trial_name(trial))

    def trial_result(self, trial, result: dict) -> None:
        self.monitor.trial_result(trial.trial_id, result)

    def trial_complete(self, trial) -> None:
        last = trial.last_result or {}
        # No final status: the scheduler stopped it (its run is closed by `finish_early_stopped` after fit)
        self.monitor.trial_done(trial.trial_id, last.get(STATUS) or "STOPPED", last)
        try:
            delete_checkpoints(trial)
        except Exception as e:  # noqa: BLE001 - bookkeeping must never stop the sweep
            self.monitor.note(f"could not delete the checkpoints of {trial_name(trial)}: {e}")

    def trial_error(self, trial) -> None:
        last = trial.last_result or {}
        reason = ""
        if trial.error_file and os.path.isfile(trial.error_file):
            reason = Path(trial.error_file).read_text()[-2000:]
        self._close_run(trial, last, "FAILED", {runs.FAILURE_REASON: reason or "trial errored in Ray"})
        self.monitor.trial_done(trial.trial_id, "FAILED", last)

    def step(self, trials) -> None:
        """Every Tune loop iteration: read the running trials' step counts (at most once a second)."""
        now = time.monotonic()
        if now - self.progress_read_at >= 1.0:
            self.progress_read_at = now
            for trial_id in list(self.monitor.running):
                steps = read_progress(self.ctx, trial_id)
                if steps is not None:
                    self.monitor.trial_steps(trial_id, steps)
        self.monitor.refresh()

    def _close_run(self, trial, last: dict, status: str, tags: dict[str, Any]) -> None:
        """Terminate the trial's MLflow run if it is still RUNNING (never touch a closed one)."""
        ctx = self.ctx
        try:
            cfg_hash = last.get("kdp_cfg_hash") or trial.config.get("trial", {}).get("cfg_hash")
            run_id = last.get(RUN_ID) or (cfg_hash and runs.trial_run_id(
                ctx.tracking_uri, ctx.experiment, ctx.parent_run_id, cfg_hash))
            if run_id:
                runs.close_run(ctx.tracking_uri, run_id, status, tags)
        except Exception as e:  # noqa: BLE001 - bookkeeping must never stop the sweep
            self.monitor.note(f"could not close the MLflow run of {trial_name(trial)}: {e}")


def delete_checkpoints(trial) -> int:
    """Delete a completed trial's resume checkpoints (`checkpoint_*` in its folder, ~180 MB each for a 2-layer
    student); returns how many. Only a running or errored trial resumes from them: an errored one keeps them."""
    from pyarrow.fs import FileSelector, FileType

    fs, root = trial.storage.storage_filesystem, trial.path
    found = fs.get_file_info(FileSelector(root, allow_not_found=True))
    folders = [f.path for f in found if f.type == FileType.Directory and f.base_name.startswith("checkpoint_")]
    for folder in folders:
        fs.delete_dir(folder)
    return len(folders)


def finish_early_stopped(ctx: TrialContext, rows: list[dict[str, Any]], wait_s: float = 15.0) -> list[str]:
    """Close the runs of trials the scheduler stopped: FINISHED, tagged `kdp.early_stopped=asha`.

    Ray stops such a trial by ending its `tune.report` with SystemExit, so its worker closes the run as
    KILLED on the way out. Called after `Tuner.fit()` returns; a run still RUNNING is given `wait_s` for
    that last write (the worker's final one), so this correction is never overwritten.
    """
    fixed = []
    for row in rows:
        if row["status"] != "STOPPED":
            continue
        run_id = row.get("run_id") or (row.get("cfg_hash") and runs.trial_run_id(
            ctx.tracking_uri, ctx.experiment, ctx.parent_run_id, row["cfg_hash"]))
        if run_id and runs.mark_early_stopped(ctx.tracking_uri, run_id, row.get("step"), wait_s):
            fixed.append(run_id)
    return fixed
