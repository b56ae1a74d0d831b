"""Live step counts from a sweep's Ray workers to the driver's view, through small side files.

A student trial (sweep/tune.py) or a teacher fine-tune (sweep/teachers.py) writes `{label, step, total}` to
its file at most every `EVERY_S` seconds and at a stage's last step; the driver reads the files of what is
running. A `tune.report` per step would add a result row per step (and advance `training_iteration`, which
ASHA counts), and a teacher is a Ray task that cannot report at all. The files are not visible across nodes:
the view then shows what the trial's reports say.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

EVERY_S = 2.0


def step_file(folder: str | os.PathLike | None, name: str | None, create: bool = True) -> Path | None:
    """`<folder>/<name>.json`, the folder made if needed for a writer (None: no live steps, e.g. another
    node's path); a reader (`create=False`) polling every second makes nothing."""
    if not folder or not name:
        return None
    if create:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError:
            return None
    return Path(folder) / f"{name}.json"


class StepWriter:
    """The worker's `on_progress(label, step, total)`, written to `path` (atomically, throttled)."""

    def __init__(self, path: Path | None, every_s: float = EVERY_S):
        self.path, self.every_s = path, every_s
        self.written_at = -float("inf")

    def __call__(self, label: str, step: int, total: int) -> None:
        now = time.monotonic()
        if self.path is None or (now - self.written_at < self.every_s and step < total):
            return
        self.written_at = now
        tmp = self.path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"label": label, "step": step, "total": total}))
            os.replace(tmp, self.path)
        except OSError:  # the view is a nicety: never fail a trial over it
            pass


def read_steps(path: Path | None) -> dict[str, Any] | None:
    """The last step count written to `path` ({label, step, total}), or None."""
    try:
        return json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        return None
