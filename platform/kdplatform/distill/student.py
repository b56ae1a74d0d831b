"""One student trial, from data to a finished MLflow run (`run_trial`).

Read `run_trial` top to bottom: get the fine-tuned teacher, prepare the data, build the student (truncate /
teacher copy / other model, optionally quantized), then train through the method's stages with the engine.
MLflow logging, the orchestrator's callbacks and fault injection are the engine's hooks.

The worker knows nothing of Ray: the orchestrator passes `Callbacks` (report each eval, save a checkpoint
each epoch) and a checkpoint folder to resume from.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from kdplatform import runs, tracking
from kdplatform.config import ResolvedTrial
from kdplatform.distill.data import TrialData, prepare_data
from kdplatform.distill.engine import (DivergedError, Hooks, LoopState, StageSettings, resolve_device,
                                       resolve_precision, train_stage)
from kdplatform.distill.export import BestSnapshot, save_models
from kdplatform.distill.faults import FaultPlan
from kdplatform.distill.models import freeze, load_classifier, set_seed
from kdplatform.distill.teacher import ensure_teacher, teacher_tokenizer


@dataclass
class Callbacks:
    """Hooks for the orchestrator (all optional). `on_checkpoint(save, info)`: call save(folder).
    `on_progress(label, step, total)` after every training step, the teacher fine-tune's included (label
    "fine-tuning teacher <task>/<model>" or "<run name> <stage>")."""

    on_eval: Callable[[int, dict[str, float]], None] | None = None
    on_checkpoint: Callable[[Callable[[Path], None], dict[str, Any]], None] | None = None
    on_progress: Callable[[str, int, int], None] | None = None


@dataclass
class TrialResult:
    run_id: str
    status: str
    best: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def build_student(trial: ResolvedTrial, teacher_dir: Path, num_labels: int, label_mean: float | None = None):
    """Student init: bottom layers of the pre-trained teacher (CR-ILD/PKD), a copy of the fine-tuned
    teacher (KD-QAT), or another model; then quantized when `bits`/`act_bits` < 32. A regression head the
    init does not provide starts at `label_mean` (see `load_classifier`)."""
    init = trial.student.init
    if init == "truncate":
        student = load_classifier(trial.teacher.model, num_labels, num_layers=trial.student_layers,
                                  regression_start=label_mean)
    elif init == "teacher_copy":
        student = load_classifier(str(teacher_dir), num_labels)
    else:
        student = load_classifier(init, num_labels, regression_start=label_mean)
    report = None
    if trial.bits < 32 or trial.act_bits < 32:
        from kdplatform.distill.quant import quantize_bert_

        report = quantize_bert_(student, trial.bits, trial.act_bits, two_bit=trial.student.two_bit,
                                quantize_embeddings=trial.student.quantize_embeddings,
                                clip=trial.student.weight_clip, act_clip=trial.student.act_clip)
    return student, report


def stage_settings(trial: ResolvedTrial) -> StageSettings:
    device = resolve_device(trial.speed.device)
    quantized = trial.bits < 32 or trial.act_bits < 32
    return StageSettings(task=trial.task, seed=trial.seed, device=device,
                         precision=resolve_precision(trial.speed.precision, quantized, device),
                         n_student=trial.student_layers, max_seq_length=trial.data.max_seq_length,
                         num_stages=len(trial.train), compile=trial.speed.compile,
                         teacher_cache=trial.speed.teacher_cache)


def run_trial(trial: ResolvedTrial, *, tracking_uri: str | None = None, parent_run_id: str | None = None,
              run_id: str | None = None, callbacks: Callbacks | None = None, resume_dir: Path | None = None,
              sweep_id: str | None = None) -> TrialResult:
    """Run one student trial and log it as one MLflow run (reattached to `run_id` when resuming)."""
    started = time.time()
    callbacks = callbacks or Callbacks()
    uri = tracking.resolve_tracking_uri(tracking_uri, trial.tracking_uri)  # a sweep's trials get the driver's
    teacher_dir = ensure_teacher(trial, uri, on_progress=callbacks.on_progress)
    set_seed(trial.seed)  # after the teacher: a fine-tune in this process must not shift the student's RNG
    tokenizer = teacher_tokenizer(teacher_dir)
    data = prepare_data(trial, tokenizer)
    teacher = freeze(load_classifier(str(teacher_dir), data.num_labels))
    student, qreport = build_student(trial, teacher_dir, data.num_labels, data.label_mean)
    state, resume_blob, snapshot = LoopState(), _load_resume(resume_dir, student), BestSnapshot()
    if resume_blob is not None:
        state = LoopState(**resume_blob["loop"])
        snapshot.state = resume_blob.get("best_student")
        run_id = run_id or resume_blob.get("run_id")
    logger = _open_run(trial, uri, run_id, parent_run_id, sweep_id)
    if resume_blob is None:
        _log_setup(logger, trial, data, qreport)
    hooks = _hooks(trial, logger, callbacks, student, state, snapshot)
    try:
        _train(trial, student, teacher, data, state, hooks, resume_blob)
        logger.add_metrics(save_models(logger, trial, student, tokenizer, snapshot), state.global_step)
    except BaseException as e:
        # a divergence, a crash (retried by the orchestrator) or Ctrl-C: the run stays reattachable
        reason = str(e)[:5000] if isinstance(e, DivergedError) else runs.INTERRUPTED_REASON \
            if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {str(e)[:4000]}"  # SystemExit: Ray's stop
        logger.set_tags({runs.FAILURE_REASON: reason})
        logger.finish("KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise
    best = {f"dev/best_{k}": v for k, v in state.best.items()}
    logger.set_tags({runs.BEST_DEV_SCORE: f"{state.best.get('score', float('nan')):.4f}"})
    logger.finish("FINISHED")
    return TrialResult(logger.run_id, "FINISHED", best, state.last, time.time() - started)


def _train(trial: ResolvedTrial, student: nn.Module, teacher: nn.Module, data: TrialData, state: LoopState,
           hooks: Hooks, resume_blob: dict | None) -> None:
    """The method's stages in order, from where a resumed run stopped."""
    settings = stage_settings(trial)
    for i, stage in enumerate(trial.train):
        if i < state.stage_index:
            continue
        blob = resume_blob if (resume_blob is not None and i == state.stage_index and state.epoch > 0) else None
        if blob is None:
            state.epoch = 0
        state.stage_index = i
        train_stage(stage, i, settings, student=student, teacher=teacher, data=data, state=state, hooks=hooks,
                    resume=blob)
        state.stage_index, state.epoch = i + 1, 0


# ------------------------------------------------------------------------------------- MLflow and hooks
def _open_run(trial: ResolvedTrial, uri: str, run_id: str | None, parent_run_id: str | None,
              sweep_id: str | None) -> tracking.RunLogger:
    tags = {**runs.student_tags(trial, sweep_id or parent_run_id), runs.TORCH_THREADS: str(torch.get_num_threads())}
    return runs.open_run(uri, trial.name, trial.run_name, tags, run_id=run_id, parent_run_id=parent_run_id)


def _log_setup(logger: tracking.RunLogger, trial: ResolvedTrial, data: TrialData, qreport) -> None:
    """A new run's params, resolved config and quantization report."""
    params = trial.flat_params()
    params["data.train_examples"] = str(len(data.train))
    params["data.labels_flipped"] = str(data.flipped)
    params["data.source_used"] = data.source_used
    logger.log_params(params)
    log_train_input(logger, data)
    data.train_rows = None  # the texts are not needed for training (the features are tokenized)
    logger.log_text(yaml.safe_dump(trial.model_dump(mode="json"), sort_keys=False), "config.yaml")
    if qreport is not None:
        logger.add_metrics(qreport.as_metrics(), 0)
        logger.log_text("\n".join(qreport.quantized_modules), "quantized_modules.txt")
        logger.flush()


def log_train_input(logger: tracking.RunLogger, data: TrialData) -> None:
    """The train examples used, as the run's MLflow dataset input: name, digest, source and schema only."""
    if data.train_rows is None:
        return
    import mlflow.data
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag

    rows = data.train_rows
    frame = pd.DataFrame({"text_a": rows.text_a, **({"text_b": rows.text_b} if rows.text_b is not None else {}),
                          "label": rows.labels})
    kind, _, where = data.source_used.partition(":")
    source = where if kind != "hub" else f"hf://datasets/{where}"
    with warnings.catch_warnings():  # mlflow's hints on source types and integer columns (the schema is
        warnings.simplefilter("ignore")  # inferred lazily, when the entity is made)
        ds = mlflow.data.from_pandas(frame, source=source, name=f"{rows.task}/train", targets="label")
        entity = DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "train")])
    tracking.retry(lambda: logger.client.log_inputs(logger.run_id, datasets=[entity]), "log dataset input")


def _hooks(trial: ResolvedTrial, logger: tracking.RunLogger, callbacks: Callbacks, student: nn.Module,
           state: LoopState, snapshot: BestSnapshot) -> Hooks:
    """The engine's hooks for a student run: faults (KDP_FAULTS), MLflow metrics, the best-dev snapshot, the
    orchestrator's callbacks. Checkpoints carry the snapshot, so a resumed trial still saves its best student."""
    faults = FaultPlan(trial.run_name)

    def on_eval(step: int, metrics: dict[str, float]) -> None:
        logger.add_metrics(metrics, step)
        logger.flush()
        snapshot.offer(student, metrics)
        if callbacks.on_eval:
            callbacks.on_eval(step, metrics)

    def on_checkpoint(blob: dict[str, Any], info: dict[str, Any]) -> None:
        if snapshot.state is not None:
            blob = {**blob, "best_student": snapshot.state}
        callbacks.on_checkpoint(lambda folder: save_state(folder, student, state, logger.run_id, blob), info)

    def on_progress(stage: str, step: int, total: int) -> None:
        callbacks.on_progress(f"{trial.run_name} {stage}", step, total)

    return Hooks(on_step=faults if faults.rules else None, on_eval=on_eval,
                 on_checkpoint=on_checkpoint if callbacks.on_checkpoint else None,
                 on_progress=on_progress if callbacks.on_progress else None)


# ------------------------------------------------------------------------------------- checkpoints
def save_state(folder: Path, student: nn.Module, state: LoopState, run_id: str, blob: dict) -> None:
    """Everything a killed trial resumes from: student, loop counters, RNG states, run id, the stage's blob."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"student": student.state_dict(), "loop": state.__dict__.copy(), "torch_rng": torch.get_rng_state(),
               "numpy_rng": _np_state_tensor(), "run_id": run_id, **blob}
    tmp = folder / "state.pt.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, folder / "state.pt")
    (folder / "run.json").write_text(json.dumps({"run_id": run_id, **state.__dict__}))


def _load_resume(resume_dir: Path | None, student: nn.Module) -> dict | None:
    """Restore the student and the RNG states from a checkpoint folder; returns its blob (None: fresh run)."""
    if resume_dir is None or not (Path(resume_dir) / "state.pt").exists():
        return None
    blob = torch.load(Path(resume_dir) / "state.pt", weights_only=True)
    student.load_state_dict(blob["student"])
    torch.set_rng_state(blob["torch_rng"])
    np.random.set_state(_np_state(blob["numpy_rng"]))
    return blob


def _np_state_tensor() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached}


def _np_state(d: dict) -> tuple:
    return ("MT19937", d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])
