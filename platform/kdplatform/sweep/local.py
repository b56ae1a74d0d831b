"""`kdplatform run`: the sweep without Ray. The file's missing trials run one after the other in this process,
with the sweep's bookkeeping: dedupe by config hash, one parent run, claims, orphan reconciliation, and the
same closing summary.

Each trial claims its config before it starts (`runs.try_claim`). A config another process holds is put
aside and taken up at the end (waiting for it then), when it is usually FINISHED and skipped, so two
`run`s of overlapping files never run one config twice at once. A config's RUNNING run whose claim is free
was left by a dead process (SIGKILL, a lost machine): it is closed KILLED with the reason and the config
runs again in a new run (`run` keeps no mid-trial checkpoint to resume from).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from kdplatform import runs, tracking
from kdplatform.config import ResolvedTrial
from kdplatform.distill.heap import release_memory
from kdplatform.sweep.expand import SweepPlan, preflight_plan
from kdplatform.sweep.session import (SweepError, SweepOutcome, close_orphans_of, close_parent, counts_of, hold_spec,
                                      nothing_new, open_parent, print_results, refresh_done)
from kdplatform.sweep.step_view import StepProgress


def run_local(plan: SweepPlan, file: str | Path, console: Console | None = None) -> SweepOutcome:
    """Run the plan's missing trials in this process under one parent run; user errors raise (ConfigError,
    DataError, TeacherError, SweepError), Ctrl-C/SIGTERM raise KeyboardInterrupt with every run closed."""
    console = console or Console()
    check_runnable_here(plan, file)  # before anything is written (claims included)
    waited: list[str] = []
    spec_claim = hold_spec(plan, console, on_wait=waited.append)
    try:
        if waited:  # the other run/sweep of this file may have finished trials meanwhile
            refresh_done(plan)
        close_orphans_of(plan, console)
        if not plan.to_run:
            return nothing_new(plan, file, console)
        parent = open_parent(plan, "run")
        console.print(f"parent run [bold]{parent.run_id}[/]")
        try:
            rows = _run_all(plan, parent.run_id, console)
        except BaseException as e:
            status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            # a trial run the signal caught between its creation and the worker's own handler is closed here
            runs.close_children(plan.tracking_uri, plan.experiment, parent.run_id, status,
                                f"{type(e).__name__} in `kdplatform run`; run the file again to continue")
            parent.set_tags({runs.FAILURE_REASON: f"{type(e).__name__}: {tracking.redact(str(e))[:2000]}"})
            parent.finish(status)
            raise
        counts = counts_of(rows, plan, len(plan.done))
        close_parent(parent, counts, 1)
        print_results(console, plan, parent.run_id, rows, counts)
        return SweepOutcome(1 if counts["failed"] else 0, parent.run_id, None, counts, rows)
    finally:
        spec_claim.release()


def check_runnable_here(plan: SweepPlan, file: str | Path, fetch: bool = True) -> None:
    """What `kdplatform run` refuses before it writes anything, and `run --dry-run` refuses too: `search:` and
    `scheduler:` (they need Ray: SweepError), then every file the trials read and this machine's device
    (`preflight_plan`: DataError, TeacherError, DeviceError; `fetch=False`: no hub downloads)."""
    if plan.spec.search is not None or plan.spec.scheduler is not None:
        raise SweepError(f"{file}: `search:` and `scheduler:` need Ray", f"kdplatform sweep {file}")
    _refuse_ray_settings(plan, file)
    preflight_plan(plan, fetch=fetch)


# Settings only Ray applies, with why `run` cannot: each refused when it differs from its default.
# (max_concurrent_trials is a bound, which run's one trial at a time always keeps.)
_RAY_ONLY = {
    "resources": "run trains in this process on its own CPU threads and device; Ray reserves per-trial resources",
    "max_failures": "run does not retry a crashed trial (Ray does; with run, run the file again to continue)",
}


def _refuse_ray_settings(plan: SweepPlan, file: str | Path) -> None:
    """`kdplatform run` has no Ray: a Ray-only setting changed from its default would do nothing (exit 2)."""
    fields = type(plan.spec).model_fields
    for key, why in _RAY_ONLY.items():
        value, default = getattr(plan.spec, key), fields[key].get_default(call_default_factory=True)
        if value != default:
            shown = value.model_dump(exclude_defaults=True) if hasattr(value, "model_dump") else value
            raise SweepError(f"{file}: {key}: {shown} would not be applied by `kdplatform run`: {why}",
                             f"kdplatform sweep {file}, or remove {key} to run it here")


def _run_all(plan: SweepPlan, parent_id: str, console: Console) -> list[dict[str, Any]]:
    """Every trial to run, claimed first; trials claimed elsewhere are waited for at the end."""
    rows: list[dict[str, Any]] = []
    later: list[ResolvedTrial] = []
    todo = plan.to_run
    for i, trial in enumerate(todo, 1):
        held = runs.try_claim(plan.tracking_uri, plan.experiment, trial.cfg_hash)
        if held is None:
            console.print(f"[{i}/{len(todo)}] {escape(trial.run_name)}: another process is running this "
                          "config; coming back to it at the end")
            later.append(trial)
            continue
        console.rule(f"[{i}/{len(todo)}] {escape(trial.run_name)}")
        rows.append(_run_claimed(trial, held, plan, parent_id, console))
    for trial in later:
        def say(holder: str, name: str = trial.run_name) -> None:
            console.print(f"waiting for {escape(name)} ({escape(holder)})")
        held = runs.claim(plan.tracking_uri, plan.experiment, trial.cfg_hash, on_wait=say)
        console.rule(escape(trial.run_name))
        rows.append(_run_claimed(trial, held, plan, parent_id, console))
    return rows


def _run_claimed(trial: ResolvedTrial, held: runs.Claim, plan: SweepPlan, parent_id: str,
                 console: Console) -> dict[str, Any]:
    """One trial, its config claimed (released here): skipped if FINISHED meanwhile, else run with a
    per-step progress bar (its teacher's fine-tune included)."""
    from kdplatform.distill.worker import Callbacks, DivergedError, TrialSetupError, run_trial

    uri = plan.tracking_uri
    row: dict[str, Any] = {"run_name": trial.run_name, "task": trial.task, "method": trial.method,
                           "cfg_hash": trial.cfg_hash, "score": None, "reason": ""}
    try:
        done = None if plan.force else runs.finished_run(uri, plan.experiment, trial.cfg_hash)
        if done is not None:
            return {**row, "status": "SKIPPED", "run_id": done.info.run_id,
                    "score": done.data.metrics.get("dev/best_score")}
        runs.close_orphans(uri, plan.experiment, trial.cfg_hash)
        try:
            with StepProgress(console) as show:
                res = run_trial(trial, tracking_uri=uri, parent_run_id=parent_id, sweep_id=parent_id,
                                callbacks=Callbacks(on_progress=show))
        except DivergedError as e:  # the worker ended its run FAILED with the reason
            return {**row, "status": "FAILED", "reason": f"diverged: {e}"[:500]}
        except TrialSetupError as e:  # likewise; a setting that cannot act, found once the data is known
            return {**row, "status": "FAILED", "reason": f"cannot run: {e}"[:500]}
        return {**row, "status": "FINISHED", "run_id": res.run_id, "score": res.best.get("dev/best_score")}
    finally:
        held.release()
        release_memory()  # the next trial runs in this process: do not carry this one's freed heap into it
