"""Per-step progress of `kdplatform run`: a rich progress bar per training stage on a terminal, plain
periodic lines otherwise (logs, CI).

It is the worker's `Callbacks.on_progress(label, step, total)`: called after every training step, so it only
does work when something is shown (a bar redraws at most a few times a second; a line at each 10% or every
30 s, whichever comes first).
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

LINE_EVERY_S = 30.0


class StepProgress:
    """`with StepProgress(console) as show: run_trial(..., callbacks=Callbacks(on_progress=show))`."""

    def __init__(self, console: Console, line_every_s: float = LINE_EVERY_S):
        self.console = console
        self.line_every_s = line_every_s
        self.bar: Progress | None = None
        self.label: str | None = None
        self.task_id = None
        self.last_line_at = 0.0
        self.last_tenth = 0

    def __enter__(self) -> StepProgress:
        if self.console.is_terminal:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                console=self.console, transient=False)
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def __call__(self, label: str, step: int, total: int) -> None:
        if label != self.label:
            self._start(label, total)
        if self.bar is not None:
            self.bar.update(self.task_id, completed=step, total=total)
            return
        now, tenth = time.monotonic(), step * 10 // max(total, 1)  # whole tenths: no float drift
        if step >= total or tenth > self.last_tenth or now - self.last_line_at >= self.line_every_s:
            self.console.print(f"  {escape(label)}: step {step}/{total} ({step / max(total, 1):.0%})",
                               highlight=False, soft_wrap=True)
            self.last_line_at, self.last_tenth = now, tenth

    def _start(self, label: str, total: int) -> None:
        self.label = label
        if self.bar is not None:
            self.task_id = self.bar.add_task(escape(label), total=total)
        else:
            self.console.print(f"{escape(label)} ...  ({total} steps)", highlight=False, soft_wrap=True)
            self.last_line_at, self.last_tenth = time.monotonic(), 0
