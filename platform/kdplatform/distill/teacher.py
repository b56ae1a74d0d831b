"""Teacher fine-tuning, done once per teacher hash and reused (local cache and MLflow).

A teacher is keyed by what determines it (task, model, fine-tune settings, seed, train data config: see
`config.teacher_hash`). Its checkpoint lives in `<cache>/teachers/<hash>/` (`paths.teachers_root()`) and its
fine-tune, hard-label CE through the training engine, is one MLflow run with tag `kdp.role=teacher`. The folder appears
atomically (written aside, then renamed), and a file lock keeps two processes from training it twice.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

from kdplatform import paths, runs, tracking
from kdplatform.config import ResolvedLoss, ResolvedStage, ResolvedTrial
from kdplatform.distill.data import prepare_data
from kdplatform.distill.engine import Hooks, LoopState, StageSettings, resolve_device, train_stage
from kdplatform.distill.errors import TeacherError
from kdplatform.distill.faults import FaultPlan
from kdplatform.distill.models import load_classifier, load_tokenizer, set_seed
from kdplatform.distill.tasks import TASKS
from kdplatform.families import UnsupportedFamily, family_of_type

MARKER = "kdp_teacher.json"


class TeacherDiskFull(TeacherError):
    """The fine-tuned teacher could not be saved: its disk is full (the user frees space: exit 2)."""


def disk_full(e: BaseException) -> bool:
    """Whether an error (or its cause) is a full disk or quota; safetensors reports ENOSPC as text."""
    while e is not None:
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
                s in str(e) for s in ("No space left on device", "StorageFull", "Disk quota exceeded")):
            return True
        e = e.__cause__ or e.__context__
    return False


def teacher_dir(trial: ResolvedTrial) -> Path:
    if trial.teacher.checkpoint:
        return Path(trial.teacher.checkpoint).resolve()
    return paths.teachers_root() / trial.teacher_hash


def teacher_tokenizer(folder: Path):
    """The teacher folder's tokenizer, loaded once per process and folder version: the next trial of a reused
    sweep worker gets it without reading it again (0.2 s a trial). Trials only read it."""
    folder = Path(folder).resolve()
    return _tokenizer(str(folder), _file_stamps(folder))


def _file_stamps(folder: Path) -> tuple:
    """The folder's files and modification times: a folder written anew under the same path is a new entry."""
    return tuple(sorted((f.name, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file()))


@lru_cache(maxsize=4)
def _tokenizer(folder: str, stamps: tuple):
    paths.quiet_transformers()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def check_checkpoint(folder: Path, trial: ResolvedTrial) -> None:
    """A ready checkpoint must be a sequence classifier of a family in the table (`kdplatform/families.py`) for this task's number of labels."""
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise TeacherError(f"{folder}: not a model folder (no config.json); teacher.checkpoint must point at a "
                           "folder written by save_pretrained / `kdplatform teacher`")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise TeacherError(f"{cfg_file}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise TeacherError(f"{cfg_file}: not a model config (a JSON object with model_type, architectures, ...)")
    want = TASKS[trial.task].num_labels
    got = cfg.get("num_labels") or len(cfg.get("id2label", {}) or {}) or None
    archs = cfg.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise TeacherError(f"{cfg_file}: architecture {archs or cfg.get('model_type')} is not a sequence "
                           "classifier; fine-tune it first with `kdplatform teacher`")
    try:
        family_of_type(cfg.get("model_type"), str(cfg_file))
    except UnsupportedFamily as e:
        raise TeacherError(str(e)) from None
    if got is not None and got != want:
        raise TeacherError(f"{cfg_file}: {got} labels, task {trial.task} has {want}")
    if not any((folder / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise TeacherError(f"{folder}: no weights (model.safetensors)")
    check_weights_header(folder)


def check_weights_header(folder: Path) -> None:
    """Read the weights file's header only (milliseconds, no tensors loaded): a truncated or garbage file
    (an interrupted copy or download) is refused here, not as a library traceback once a run has started.
    safetensors checks that its header's tensor offsets cover the file exactly; a `.bin` is a zip archive
    whose directory sits at the end, so a truncated one cannot be opened."""
    fix = "copy the checkpoint again (or save it again with save_pretrained)"
    weights = folder / "model.safetensors"
    if weights.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(weights), framework="numpy") as f:
                if not list(f.keys()):
                    raise TeacherError(f"{weights}: holds no tensors; {fix}")
        except (SafetensorError, OSError) as e:
            raise TeacherError(f"{weights}: not a readable safetensors file ({e}; {weights.stat().st_size} "
                               f"bytes): truncated or not a weights file; {fix}") from None
        return
    import zipfile

    weights = folder / "pytorch_model.bin"
    try:
        with zipfile.ZipFile(weights) as z:
            z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise TeacherError(f"{weights}: not a readable PyTorch checkpoint ({e}): truncated or not a weights "
                           f"file; {fix}") from None


@contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def teacher_from_mlflow(tracking_uri: str, trial: ResolvedTrial) -> Path | None:
    """The folder of a FINISHED teacher run with this hash whose checkpoint still exists (another cache)."""
    try:
        run = runs.finished_teacher_run(tracking_uri, trial.name, trial.teacher_hash)
    except Exception:  # noqa: BLE001 - a store we cannot read simply has no teacher to offer
        return None
    ckpt = runs.teacher_checkpoint(run)
    return Path(ckpt) if ckpt and (Path(ckpt) / MARKER).is_file() else None


def link_into_cache(trial: ResolvedTrial, found: Path) -> Path:
    """Make a teacher found through MLflow visible at this cache's path (a symlink); returns that path."""
    target = teacher_dir(trial)
    if not (target.exists() or target.is_symlink()):
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(found, target, target_is_directory=True)
        except FileExistsError:
            pass
    return target


def ensure_teacher(trial: ResolvedTrial, tracking_uri: str, parent_run_id: str | None = None,
                   on_progress: Callable[[str, int, int], None] | None = None) -> Path:
    """The fine-tuned teacher folder for this trial: ready checkpoint, cached, found through MLflow, or
    fine-tuned now (`on_progress(label, step, total)` after each of its steps)."""
    paths.quiet_transformers()  # before transformers / huggingface_hub are first imported
    folder = teacher_dir(trial)
    if trial.teacher.checkpoint:
        check_checkpoint(folder, trial)
        return folder
    if (folder / MARKER).is_file():
        return folder
    found = teacher_from_mlflow(tracking_uri, trial)
    if found is not None:
        return link_into_cache(trial, found)
    with _lock(folder.with_suffix(".lock")):
        if (folder / MARKER).is_file():  # trained meanwhile by another process
            return folder
        return finetune_teacher(trial, tracking_uri, folder, parent_run_id, on_progress)


def finetune_stage(trial: ResolvedTrial) -> ResolvedStage:
    """The teacher's one stage: hard-label CE with the `teacher.finetune` settings."""
    ft = trial.teacher.finetune
    return ResolvedStage(name="finetune", losses=[ResolvedLoss(name="ce", weight=1.0)], epochs=ft.epochs,
                         max_steps=ft.max_steps, lr=ft.lr, batch_size=ft.batch_size, warmup=ft.warmup,
                         weight_decay=ft.weight_decay, max_grad_norm=ft.max_grad_norm, eval_every=ft.eval_every)


def finetune_settings(trial: ResolvedTrial) -> StageSettings:
    """The fine-tune runs fp32 and uncompiled: a cached teacher must not depend on which student asked."""
    return StageSettings(task=trial.task, seed=trial.teacher.seed, device=resolve_device(trial.speed.device),
                         precision="fp32", n_student=trial.teacher_layers, max_seq_length=trial.data.max_seq_length)


def finetune_teacher(trial: ResolvedTrial, tracking_uri: str, folder: Path, parent_run_id: str | None = None,
                     on_progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Fine-tune the teacher with hard-label CE through the engine; log it as a teacher run; publish the folder."""
    started = time.time()
    set_seed(trial.teacher.seed)
    tokenizer = load_tokenizer(trial.teacher.model)
    data = prepare_data(trial, tokenizer, run_seed=trial.teacher.seed)
    model = load_classifier(trial.teacher.model, data.num_labels, regression_start=data.label_mean)
    logger = _teacher_run(trial, tracking_uri, parent_run_id, len(data.train), data.source_used)
    state = LoopState()
    faults = FaultPlan(f"teacher/{trial.task}")
    hooks = Hooks(on_step=faults if faults.rules else None,
                  on_eval=lambda step, metrics: (logger.add_metrics(metrics, step), logger.flush()))
    if on_progress is not None:
        label = f"fine-tuning teacher {trial.task}/{trial.teacher.model}"
        hooks.on_progress = lambda _stage, step, total: on_progress(label, step, total)
    try:
        train_stage(finetune_stage(trial), 0, finetune_settings(trial), student=model, teacher=None, data=data,
                    state=state, hooks=hooks)
    except BaseException as e:
        logger.set_tags({runs.FAILURE_REASON: f"{type(e).__name__}: {str(e)[:4000]}"})
        logger.finish("FAILED")
        raise
    info = {"teacher_hash": trial.teacher_hash, "run_id": logger.run_id, "task": trial.task,
            "model": trial.teacher.model, "dev": {k: v for k, v in state.last.items() if k.startswith("dev/")},
            "seconds": round(time.time() - started, 1)}
    try:
        _publish(model, tokenizer, info, folder)
    except Exception as e:
        logger.set_tags({runs.FAILURE_REASON: f"saving the checkpoint failed: {type(e).__name__}: {str(e)[:4000]}"})
        logger.finish("FAILED")
        if disk_full(e):
            raise TeacherDiskFull(f"the disk holding the teacher cache {folder.parent} is full: the fine-tuned "
                                  f"teacher could not be saved (its run {logger.run_id} ended FAILED); free "
                                  "space there or point KDP_CACHE_DIR at a larger disk, then run again") from None
        raise
    logger.set_tags(runs.finished_teacher_tags(folder, state.last.get("dev/score", float("nan"))))
    logger.finish("FINISHED")
    return folder


def _teacher_run(trial: ResolvedTrial, tracking_uri: str, parent_run_id: str | None,
                 train_examples: int, source_used: str = "") -> tracking.RunLogger:
    tags = {**runs.teacher_tags(trial), runs.TORCH_THREADS: str(torch.get_num_threads())}
    logger = runs.open_run(tracking_uri, trial.name, f"{trial.task}/teacher/{trial.teacher.model}", tags,
                           parent_run_id=parent_run_id)
    params = {"task": trial.task, "teacher.model": trial.teacher.model, "teacher.seed": trial.teacher.seed,
              "teacher_hash": trial.teacher_hash, "data.train_examples": train_examples,
              "data.source_used": source_used,
              **{f"teacher.finetune.{k}": v for k, v in trial.teacher.finetune.model_dump().items()},
              **{f"data.{k}": v for k, v in trial.data.model_dump(exclude={"glue_dir"}).items()}}
    logger.log_params(params)
    return logger


def _publish(model, tokenizer, info: dict, folder: Path) -> None:
    """Write the checkpoint aside, then rename it into place: readers see a whole teacher or none (a save
    that fails, e.g. on a full disk, removes what it wrote aside)."""
    tmp = folder.parent / f".{folder.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(info, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
