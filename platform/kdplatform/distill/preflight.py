"""Preflight: check every file a list of trials will read, before anything starts or touches MLflow.

Config files are validated by `config.load_trials`; this checks what they point at: each GLUE split a trial
loads (train, dev, dev_mm, supplementary tasks: header, field counts and every label, with the file and line
of the first problem) and each ready teacher checkpoint (`teacher.checkpoint`: a BERT-like sequence
classifier with the task's number of labels and weights). A mistake in a data file thus costs seconds, not a
night: `kdplatform run`, `teacher` and `sweep` call `preflight(trials)` first and exit 2 on its errors.

>>> preflight(trials)   # raises DataError or TeacherError; returns None when everything is usable  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

from kdplatform import paths
from kdplatform.config import ResolvedTrial


def data_splits(trial: ResolvedTrial) -> list[tuple[str, str]]:
    """The (task, split) pairs `data.prepare_data` loads for this trial."""
    from kdplatform.distill.tasks import TASKS

    splits = [(trial.task, "train"), *((trial.task, s) for s in TASKS[trial.task].dev_splits)]
    return splits + [(extra, "train") for extra in trial.data.supplementary_tasks]


def preflight(trials: Sequence[ResolvedTrial]) -> None:
    """Raise `TeacherError` / `DataError` (user errors: exit code 2) for the first unusable input.

    Each distinct checkpoint and each distinct (task, split, data source) is checked once. Teachers that
    will be fine-tuned are not loaded here (that is the teacher stage's job); their data is checked.
    """
    from kdplatform.distill.tasks import load_split
    from kdplatform.distill.teacher import TeacherError, check_checkpoint, teacher_dir

    seen_ckpt: set[str] = set()
    for t in trials:
        if t.teacher.checkpoint:
            folder = teacher_dir(t)
            key = f"{folder}|{t.task}"
            if key not in seen_ckpt:
                seen_ckpt.add(key)
                try:
                    check_checkpoint(folder, t)
                except TeacherError as e:
                    raise TeacherError(f"teacher.checkpoint: {e}") from None
    seen_split: set[tuple] = set()
    for t in trials:
        glue = t.data.glue_dir or paths.glue_dir()
        for task, split in data_splits(t):
            key = (task, split, t.data.source, glue, t.data.hub_dataset)
            if key in seen_split:
                continue
            seen_split.add(key)
            load_split(task, split, source=t.data.source, glue_dir=t.data.glue_dir, hub_dataset=t.data.hub_dataset)
