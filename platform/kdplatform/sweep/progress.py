"""What a sweep shows: the dry-run plan, the live progress view, and the end-of-sweep summary (rich).

The live view (a terminal) redraws a small panel: trials pending / running / done / failed, the best dev
score so far per task, an ETA and each running trial's step count (written by the trial every ~2 s, see
sweep/tune.py). Without a terminal (CI logs, tests) it prints one line per finished trial and the running
trials' step counts every 30 s.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from kdplatform import tracking

SCORE = "dev/best_score"
MAX_ROWS = 40  # trial rows shown by --dry-run before "... and N more"
STEP_LINES_S = 30.0  # without a terminal: the running trials' step counts, this often


# ------------------------------------------------------------------------------------------- the plan
def plan_tables(plan, teacher_outcomes: list, tracking_uri: str) -> list:
    """Renderables for --dry-run (and the start of a real run): counts, teachers, trials, notes."""
    from kdplatform.sweep.teachers import TO_TRAIN

    spec = plan.spec
    out: list = []
    to_run = plan.to_run
    head = Table.grid(padding=(0, 2))
    head.add_row("sweep", f"{escape(str(plan.spec_file))} (experiment '{escape(spec.name)}', spec hash "
                 f"{plan.spec_hash[:8]})")
    head.add_row("tracking", escape(tracking.redact(tracking_uri)))
    if spec.search is not None:
        s = spec.search
        head.add_row("search", f"Optuna, {s.num_samples} samples, {s.mode} {escape(s.metric)}, over "
                     f"{len(plan.trials)} grid trial(s) x {', '.join(s.space)}")
    head.add_row("trials", f"{len(plan.trials)} distinct, {len(plan.done)} already done (FINISHED in MLflow), "
                 f"[bold]{len(to_run) if spec.search is None else spec.search.num_samples} to run[/]")
    n_train = sum(o.status == TO_TRAIN for o in teacher_outcomes)
    head.add_row("teachers", f"{len(teacher_outcomes)} needed, [bold]{n_train} to train[/], "
                 f"{len(teacher_outcomes) - n_train} ready")
    r = spec.resources
    head.add_row("resources", f"{r.cpu:g} CPU, {r.gpu:g} GPU per trial; max_failures {spec.max_failures}"
                 + (f"; ASHA on {spec.scheduler.metric}" if spec.scheduler else ""))
    out.append(head)
    for n in plan.notes:
        out.append(Text(f"note: {n}", style="yellow"))

    if teacher_outcomes:
        tt = Table(title="teachers")
        for col in ("teacher hash", "task", "model", "status", "folder"):
            tt.add_column(col, overflow="fold")
        for o in teacher_outcomes:
            tt.add_row(o.teacher_hash[:8], o.trial.task, escape(o.trial.teacher.model), o.status,
                       escape(o.folder or ""))
        out.append(tt)

    table = Table(title=f"trials ({len(plan.trials)})")
    for col in ("#", "run name", "stages", "teacher", "cfg hash", "status"):
        table.add_column(col, overflow="fold")
    for i, t in enumerate(plan.trials[:MAX_ROWS], 1):
        stages = t.stages_label
        status = "[green]done[/]" if t.cfg_hash in plan.done else "to run"
        table.add_row(str(i), escape(t.run_name), escape(stages), t.teacher_hash[:8], t.cfg_hash[:8], status)
    if len(plan.trials) > MAX_ROWS:
        table.add_row("...", f"and {len(plan.trials) - MAX_ROWS} more", "", "", "", "")
    out.append(table)
    if len(plan.trials) > MAX_ROWS:
        out.append(count_table(plan))
    return out


def machine_table(plan, teacher_trials: list, *, address: str | None, num_gpus: int | None, storage=None) -> Table:
    """The dry run's "this machine" section (sweep/machine.py): GPUs, hub, estimated hours, disk."""
    from kdplatform.sweep.machine import machine_lines

    table = Table.grid(padding=(0, 2))
    table.title, table.title_justify = "this machine", "left"
    for label, text, warn in machine_lines(plan, teacher_trials, address=address, num_gpus=num_gpus,
                                           storage=storage):
        table.add_row(f"[yellow]warning[/] {label}" if warn else label, escape(text))
    return table


def count_table(plan) -> Table:
    """Trials per task x method (to run / total): the shape of a big grid at a glance."""
    total: Counter = Counter()
    todo: Counter = Counter()
    for t in plan.trials:
        total[(t.task, t.method)] += 1
        if t.cfg_hash not in plan.done:
            todo[(t.task, t.method)] += 1
    tasks = sorted({k[0] for k in total}, key=lambda x: list(dict.fromkeys(t.task for t in plan.trials)).index(x))
    methods = list(dict.fromkeys(t.method for t in plan.trials))
    table = Table(title="trials to run / total, per task x method")
    table.add_column("task")
    for m in methods:
        table.add_column(m, justify="right")
    for task in tasks:
        table.add_row(task, *[f"{todo[(task, m)]}/{total[(task, m)]}" if total[(task, m)] else "-" for m in methods])
    return table


# ----------------------------------------------------------------------------------------- live view
class SweepMonitor:
    """Counts and bests from Ray's trial events; rendered live in a terminal, as lines otherwise."""

    def __init__(self, console: Console, total: int, concurrency_hint: int = 1):
        self.console = console
        self.total = total
        self.started_at = time.time()
        self.running: dict[str, tuple[str, float]] = {}  # trial id -> (name, start time)
        self.status: dict[str, str] = {}  # trial id -> final status
        self.names: dict[str, str] = {}
        self.durations: list[float] = []
        self.best: dict[str, tuple[float, str]] = {}  # task -> (score, run name)
        self.last_step: dict[str, Any] = {}
        self.notes: list[str] = []
        self.results: dict[str, dict] = {}
        self.concurrency = max(1, concurrency_hint)
        self.teacher_line = ""
        self.steps: dict[str, dict] = {}  # trial id -> its live {label, step, total} (sweep/tune.py)
        self.steps_line_at = time.monotonic()
        self.live: Live | None = None

    # lifecycle
    def __enter__(self) -> SweepMonitor:
        if self.console.is_terminal:
            self.live = Live(self.render(), console=self.console, refresh_per_second=2, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.update(self.render())
            self.live.__exit__(*exc)
            self.live = None

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self.render())

    def _line(self, text: str) -> None:
        if self.live is None:
            self.console.print(text, highlight=False)

    def _steps_line_due(self) -> bool:
        """Without a terminal, step counts are printed as lines: at most every STEP_LINES_S seconds."""
        if self.live is not None or time.monotonic() - self.steps_line_at < STEP_LINES_S:
            return False
        self.steps_line_at = time.monotonic()
        return True

    # events
    def teacher_update(self, outcome, state: str) -> None:
        self.teacher_line = f"teacher {outcome.teacher_hash[:8]} ({outcome.trial.task}): {state}"
        extra = f" - {outcome.error}" if outcome.error else ""
        self._line(escape(self.teacher_line + extra))
        self.refresh()

    def teacher_steps(self, outcome, steps: dict) -> None:
        """A training teacher's live step count (sweep/teachers.py): in the view's header on a terminal, a
        line every STEP_LINES_S seconds otherwise."""
        self.teacher_line = (f"teacher {outcome.teacher_hash[:8]} ({outcome.trial.task}): fine-tuning, "
                             f"step {steps.get('step')}/{steps.get('total')}")
        if self._steps_line_due():
            self._line(escape(f"  {self.teacher_line}"))
        self.refresh()

    def already_ended(self, trial_ids: list[str]) -> None:
        """Trials a resumed sweep finds ended in Ray's saved state, by Ray's trial id: one that reports again
        this session replaces its entry, so `[done/total]` never passes the total."""
        for trial_id in trial_ids:
            self.status[trial_id] = "FINISHED"

    def trial_started(self, trial_id: str, name: str) -> None:
        self.names[trial_id] = name
        self.running[trial_id] = (name, time.time())
        self.concurrency = max(self.concurrency, len(self.running))
        self.refresh()

    def trial_result(self, trial_id: str, result: dict) -> None:
        self.last_step[trial_id] = result.get("step")
        self.results[trial_id] = result
        score, task = result.get(SCORE), result.get("kdp_task")
        if isinstance(score, (int, float)) and not math.isnan(score) and task:
            if task not in self.best or score > self.best[task][0]:
                self.best[task] = (float(score), str(result.get("kdp_run_name", "")))
        self.refresh()

    def trial_steps(self, trial_id: str, steps: dict) -> None:
        """A running trial's live step count; without a terminal, one line per running trial every
        STEP_LINES_S seconds."""
        self.steps[trial_id] = steps
        if self._steps_line_due():
            for tid, (name, _) in list(self.running.items()):
                if tid in self.steps:
                    self._line(escape(f"  running {name}: {self._step_text(tid)}"))

    def _step_text(self, trial_id: str) -> str:
        live = self.steps.get(trial_id)
        if live:
            label = str(live.get("label", "")).rsplit(" ", 1)[-1]  # the stage name
            return f"{label} {live.get('step')}/{live.get('total')}"
        return str(self.last_step.get(trial_id, "-"))

    def trial_done(self, trial_id: str, status: str, last: dict) -> None:
        name, started = self.running.pop(trial_id, (self.names.get(trial_id, trial_id), time.time()))
        self.steps.pop(trial_id, None)
        name = (last or {}).get("kdp_run_name") or name
        self.status[trial_id] = status
        if status != "SKIPPED":
            self.durations.append(time.time() - started)
        if last:
            self.results[trial_id] = last
        score = last.get(SCORE) if last else None
        done = len(self.status)
        detail = f"best dev {score:.4f}" if isinstance(score, (int, float)) else ""
        if status == "FAILED":
            detail = str(last.get("kdp_failure_reason", "") if last else "")[:120]
        self._line(escape(f"[{done}/{self.total}] {status.lower():8s} {name}  {detail}"))
        self.refresh()

    def note(self, text: str) -> None:
        self.notes.append(text)
        self._line(escape(f"note: {text}"))

    # numbers
    def counts(self) -> dict[str, int]:
        c = Counter(self.status.values())
        failed = c["FAILED"]
        done = c["FINISHED"] + c["SKIPPED"] + c["STOPPED"]
        return {"pending": max(0, self.total - len(self.status) - len(self.running)), "running": len(self.running),
                "done": done, "failed": failed, "stopped early": c["STOPPED"], "skipped": c["SKIPPED"]}

    def eta_seconds(self) -> float | None:
        if not self.durations:
            return None
        c = self.counts()
        avg = sum(self.durations) / len(self.durations)
        now = time.time()
        left_running = sum(max(0.0, avg - (now - s)) for _, s in self.running.values())
        return (c["pending"] * avg + left_running) / self.concurrency

    def render(self) -> Group:
        c = self.counts()
        head = Table.grid(padding=(0, 2))
        head.add_row(*[f"[bold]{k}[/] {v}" for k, v in c.items()])
        eta = self.eta_seconds()
        elapsed = time.time() - self.started_at
        head.add_row(f"elapsed {_dur(elapsed)}", f"ETA {_dur(eta) if eta is not None else '-'}",
                     escape(self.teacher_line))
        parts: list = [head]
        if self.best:
            bt = Table(title="best dev score so far", show_edge=False)
            for col in ("task", "score", "trial"):
                bt.add_column(col)
            for task, (score, name) in sorted(self.best.items()):
                bt.add_row(task, f"{score:.4f}", escape(name))
            parts.append(bt)
        if self.running:
            rt = Table(title="running", show_edge=False)
            for col in ("trial", "step", "for"):
                rt.add_column(col)
            now = time.time()
            for tid, (name, start) in list(self.running.items())[:12]:
                rt.add_row(escape(name), escape(self._step_text(tid)), _dur(now - start))
            parts.append(rt)
        return Group(*parts)


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ---------------------------------------------------------------------------------------------- summary
def summary_table(rows: list[dict[str, Any]], title: str) -> Table:
    """Per task x method: trials finished / failed / early-stopped and the mean best dev score."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r.get("task", "?"), r.get("method", "?"))].append(r)
    table = Table(title=title)
    for col in ("task", "method", "finished", "failed", "stopped early", "mean best dev", "best"):
        table.add_column(col, justify="right" if col not in ("task", "method") else "left")
    for (task, method), rs in sorted(groups.items()):
        scores = [r["score"] for r in rs if isinstance(r.get("score"), (int, float)) and not math.isnan(r["score"])]
        c = Counter(r["status"] for r in rs)
        table.add_row(task, method, str(c["FINISHED"] + c["SKIPPED"]), str(c["FAILED"]), str(c["STOPPED"]),
                      f"{sum(scores) / len(scores):.4f}" if scores else "-", f"{max(scores):.4f}" if scores else "-")
    return table


def failures_table(rows: list[dict[str, Any]], limit: int = 20) -> Table | None:
    failed = [r for r in rows if r["status"] == "FAILED"]
    if not failed:
        return None
    table = Table(title=f"failed trials ({len(failed)})")
    table.add_column("trial")
    table.add_column("reason", overflow="fold")
    for r in failed[:limit]:
        table.add_row(escape(r.get("run_name", "?")), escape(str(r.get("reason", ""))[:300]))
    if len(failed) > limit:
        table.add_row("...", f"and {len(failed) - limit} more")
    return table
