"""Preflight: check every file a list of trials will read, before anything starts or touches MLflow.

Config files are validated by `config.load_trials`; this checks what they point at: each GLUE split a trial
loads (train, dev, dev_mm, supplementary tasks: header, field counts and every label, with the file and line
of the first problem) and each ready teacher checkpoint (`teacher.checkpoint`: a BERT-like sequence
classifier with the task's number of labels and weights). A mistake in a data file thus costs seconds, not a
night: `kdplatform run`, `teacher` and `sweep` call `preflight(trials)` first and exit 2 on its errors.
Trials that will run on this machine (`run`, `teacher`, a sweep on its own local Ray) are also checked for
their device: `speed.device: cuda` where torch sees no CUDA GPU is a `DeviceError`.

>>> preflight(trials)   # raises DataError, TeacherError or DeviceError; None when all is usable  # doctest: +SKIP
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


class DeviceError(ValueError):
    """A device the config asks for that this machine does not have (a user error: exit code 2)."""


def check_device(trials: Sequence[ResolvedTrial]) -> None:
    """`speed.device: cuda` needs a CUDA GPU visible to torch here; `auto` falls back to the CPU."""
    if not any(t.speed.device == "cuda" for t in trials):
        return
    import torch

    if not torch.cuda.is_available():
        raise DeviceError("speed.device: cuda, but torch sees no CUDA GPU on this machine "
                          "(torch.cuda.is_available() is False)\n  fix: set speed.device: auto (CUDA when "
                          "available) or cpu, or run on a machine with a GPU")


def preflight(trials: Sequence[ResolvedTrial], *, runs_here: bool = True, fetch: bool = True) -> None:
    """Raise `DeviceError` / `TeacherError` / `DataError` (user errors: exit code 2) for the first unusable
    input.

    `runs_here=False` (a sweep on another Ray cluster, whose nodes have their own devices) skips the device
    check. `fetch=False` (`--dry-run`) skips data that would come from the hub: a dry run must not download
    GLUE. Each distinct checkpoint and each distinct (task, split, data source) is checked once. Teachers
    that will be fine-tuned are not loaded here (that is the teacher stage's job); their data is checked.
    """
    if runs_here:
        check_device(trials)
    from kdplatform.distill.tasks import load_split, reads_hub
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
        if not fetch and reads_hub(t.data.source, t.data.glue_dir, t.data.hub_dataset):
            continue
        glue = t.data.glue_dir or paths.glue_dir()
        for task, split in data_splits(t):
            key = (task, split, t.data.source, glue, t.data.hub_dataset)
            if key in seen_split:
                continue
            seen_split.add(key)
            load_split(task, split, source=t.data.source, glue_dir=t.data.glue_dir, hub_dataset=t.data.hub_dataset)
