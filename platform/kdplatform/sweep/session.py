"""What `kdplatform run` and `kdplatform sweep` share around their executors: the one-driver-per-spec claim,
the parent run, orphan reconciliation, "nothing new to run", and the closing summary with the report hint.

One driver per spec and store: `hold_spec` claims `sweep-<spec hash>` (runs.claim); a second `run`/`sweep`
of the same file against the same store waits for the first to end, then plans again and finds what the first
finished. Holding that claim also proves that any parent run of this spec still RUNNING belongs to a dead
process (`runs.close_orphan_parents`).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from kdplatform import runs, tracking
from kdplatform.sweep.expand import SweepPlan
from kdplatform.sweep.progress import failures_table, summary_table

RUN_TABLE_MAX = 50  # trial tables with full run ids up to this many rows (a big sweep: use `ls`/the report)


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


def command(*args: object) -> str:
    """A `kdplatform` command to print as a hint: each argument quoted for a POSIX shell, so pasting it runs
    exactly this (a name with spaces or `;` stays one argument)."""
    return shlex.join(["kdplatform", *map(str, args)])


def sweep_command(plan: SweepPlan, *flags: str, storage: Path | None = None, address: str | None = None) -> str:
    """`kdplatform sweep` of this plan again, with `flags`: the same file (absolute), overrides and store
    (and Ray folder and cluster when given), so the pasted command finds the same sweep."""
    args: list[object] = ["sweep", plan.spec_file, *plan.overrides, *flags,
                          "--tracking-uri", tracking.redact(plan.tracking_uri)]
    if storage is not None:
        args += ["--storage", storage]
    if address:
        args += ["--address", address]
    return command(*args)


def hold_spec(plan: SweepPlan, console: Console, on_wait=None) -> runs.Claim:
    """Claim this spec on its store for the life of the command, waiting (with one line, and `on_wait`)
    while another `kdplatform run`/`sweep` of the same file holds it."""
    def say(holder: str) -> None:
        if on_wait is not None:
            on_wait(holder)
        console.print(f"waiting: another kdplatform run/sweep of {escape(str(plan.spec_file))} is using "
                      f"{escape(tracking.redact(plan.tracking_uri))} ({escape(holder or 'unknown process')}); "
                      "this one continues with what is left when it ends (Ctrl-C to stop waiting)")
    return runs.claim(plan.tracking_uri, plan.experiment, f"sweep-{plan.spec_hash}", on_wait=say)


def refresh_done(plan: SweepPlan) -> None:
    """Ask the store again which configs are FINISHED (after waiting for another run/sweep of the file)."""
    if not plan.force and plan.spec.search is None:
        plan.done = runs.finished_cfg_hashes(plan.tracking_uri, plan.experiment, {t.cfg_hash for t in plan.trials})


def nothing_new(plan: SweepPlan, file: str | Path, console: Console) -> SweepOutcome:
    console.print(f"[green]nothing new to run:[/] all {len(plan.trials)} trial(s) of {escape(str(file))} "
                  f"already have a FINISHED run in experiment '{escape(plan.spec.name)}' "
                  f"({escape(tracking.redact(plan.tracking_uri))}). Run them again with --force.")
    for n in plan.notes:
        console.print(f"[yellow]note:[/] {escape(n)}")
    return SweepOutcome(0, counts={"already_done": len(plan.done)})


def close_orphans_of(plan: SweepPlan, console: Console, keep: set[str] = frozenset()) -> None:
    """Close parent runs (and their open trials) of this spec left RUNNING by dead processes."""
    closed = runs.close_orphan_parents(plan.tracking_uri, plan.experiment, plan.spec_hash, keep)
    if closed:
        console.print(f"closed {len(closed)} run(s) of this file left RUNNING by a process that is gone "
                      f"(now KILLED): {', '.join(closed)}")


def open_parent(plan: SweepPlan, runner: str, ray_experiment: Path | None = None) -> tracking.RunLogger:
    """The parent run of this invocation, with the plan's counts as params and the spec file as artifact."""
    spec = plan.spec
    axes = list(spec.search.space) if spec.search is not None else None
    parent = runs.create_parent(plan.tracking_uri, spec.name, f"{runner}/{plan.experiment_dir_name}",
                                spec_hash=plan.spec_hash, spec_file=plan.spec_file, runner=runner,
                                search_axes=axes, ray_experiment=ray_experiment)
    parent.log_params({"trials": len(plan.trials), "already_done": len(plan.done), "to_run": len(plan.to_run),
                       "search": spec.search is not None, "scheduler": spec.scheduler is not None,
                       "max_failures": spec.max_failures})
    # the file as written, with any password in a URI hidden (a `tracking_uri:` overridden on the command line)
    parent.log_text(tracking.redact(plan.spec_file.read_text()), f"spec/{plan.spec_file.name}")
    parent.log_text("\n".join(t.run_name for t in plan.to_run) + "\n", "spec/trials_to_run.txt")
    return parent


def counts_of(rows: list[dict[str, Any]], plan: SweepPlan, already_done: int) -> dict[str, int]:
    """The summary's numbers. A SKIPPED row is a trial found FINISHED in the store when it was about to run
    (it finished before an interruption, or in another run of the file): already done, not run now."""
    skipped = sum(r["status"] == "SKIPPED" for r in rows)
    return {"trials": len(plan.trials), "already_done": already_done + skipped, "ran": len(rows) - skipped,
            "finished": sum(r["status"] == "FINISHED" for r in rows),
            "failed": sum(r["status"] == "FAILED" for r in rows),
            "stopped_early": sum(r["status"] == "STOPPED" for r in rows)}


def close_parent(parent: tracking.RunLogger, counts: dict[str, int], session: int) -> None:
    parent.add_metrics({f"sweep/{k}": v for k, v in counts.items()}, session)
    parent.set_tags({runs.FAILED_TRIALS: counts["failed"], runs.FINISHED_TRIALS: counts["finished"]})
    parent.finish("FINISHED")


def trials_table(rows: list[dict[str, Any]]) -> Table:
    """Each trial this invocation ran, with its full MLflow run id."""
    table = Table(title="trials")
    for col in ("run name", "status", "best dev score"):
        table.add_column(col, overflow="fold")
    table.add_column("run id", no_wrap=True, min_width=32)  # whole, to paste into `mlflow`/`report --sweep`
    for r in rows:
        score = r.get("score")
        status = r["status"] if r["status"] != "FAILED" else "[red]FAILED[/]"
        table.add_row(escape(str(r.get("run_name", "?"))), status,
                      f"{score:.4f}" if isinstance(score, (int, float)) else "-", r.get("run_id") or "-")
    return table


REPORT_ENV = ("KDP_GLUE_DIR",)  # what `report` reads besides the store: GLUE dev labels (majority-class level)


def report_env() -> str:
    """The environment settings of this run that `kdplatform report` reads, as `NAME=value ` words to put
    before the command, so the hint works pasted into another shell."""
    return "".join(f"{k}={shlex.quote(v)} " for k in REPORT_ENV if (v := os.environ.get(k)))


def print_results(console: Console, plan: SweepPlan, parent_id: str, rows: list[dict[str, Any]],
                  counts: dict[str, int]) -> None:
    """The closing summary shared by `run` and `sweep`: per task x method, failures, trials with run ids, and
    where to read the results."""
    spec = plan.spec
    console.print(summary_table(rows, f"{spec.name}: {counts['finished']} finished, {counts['failed']} "
                                f"failed, {counts['stopped_early']} stopped early; {counts['already_done']} were "
                                "already done"))
    ft = failures_table(rows)
    if ft is not None:
        console.print(ft)
    if 0 < len(rows) <= RUN_TABLE_MAX:
        console.print(trials_table(rows))
    redacted = tracking.redact(plan.tracking_uri)
    console.print(f"MLflow: parent run {parent_id} in experiment '{escape(spec.name)}' ({escape(redacted)})")
    report = report_env() + command("report", "--experiment", spec.name, "--sweep", parent_id,
                                    "--tracking-uri", redacted)
    console.print(f"Open the report: [bold]{escape(report)}[/]", soft_wrap=True)  # one line, to paste
