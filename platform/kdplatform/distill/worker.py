"""The distillation worker: ONE fully resolved trial, from data to a finished MLflow run.

Read `run_trial` top to bottom: prepare data, get the fine-tuned teacher, build the student (truncate /
teacher copy / other model, optionally quantized), then train through the method's stages. Each stage is
the same loop (`train_stage`): sum the configured loss terms, step, and every `eval_every` steps log each
term, the task metric on a fixed train subset and on dev, the distillation loss on both, and their gaps.

The worker knows nothing of Ray: the orchestrator passes `Callbacks` (report each eval, save a checkpoint
each epoch) and a checkpoint folder to resume from.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kdplatform import tracking
from kdplatform.config import ResolvedStage, ResolvedTrial
from kdplatform.distill import faults
from kdplatform.distill.cache import TeacherCache, feature_names, teacher_identity
from kdplatform.distill.losses import Features, needs, term_loss
from kdplatform.distill.models import (FeatureTap, embedding_mixup, forward_features, freeze, load_classifier,
                                       set_seed)
from kdplatform.distill.tasks import (TASKS, Collator, add_label_noise, compute_metrics, downsample,
                                      length_grouped_indices, load_split, tokenize)

DATA_SEED = 0  # downsampling, label noise and the train-eval subset are the same for every run of a task


class DivergedError(RuntimeError):
    """The loss became NaN/inf: the trial stops and its run is marked FAILED with this reason."""


class TrialSetupError(RuntimeError):
    """A configuration that passed validation but cannot run (e.g. a loss term that never contributes)."""


@dataclass
class Callbacks:
    """Hooks for the orchestrator (all optional). `on_checkpoint(save, info)`: call save(folder)."""

    on_eval: Callable[[int, dict[str, float]], None] | None = None
    on_checkpoint: Callable[[Callable[[Path], None], dict[str, Any]], None] | None = None


@dataclass
class TrialResult:
    run_id: str
    status: str
    best: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------ data
@dataclass
class TrialData:
    train: list[dict]
    train_eval: list[dict]
    dev: dict[str, list[dict]]  # "dev" and, for MNLI, "dev_mm"
    supplementary: list[dict]
    collator: Collator
    num_labels: int
    flipped: int = 0


def _with_labels(encodings: list[dict], labels) -> list[dict]:
    return [{**e, "label": y} for e, y in zip(encodings, labels)]


def prepare_data(trial: ResolvedTrial, tokenizer) -> TrialData:
    """Load, downsample, add label noise and tokenize (cached) the splits a trial needs."""
    spec = TASKS[trial.task]
    d = trial.data
    kw = {"source": d.source, "glue_dir": d.glue_dir}
    train = downsample(load_split(trial.task, "train", **kw), d.max_train_examples, DATA_SEED)
    flipped = 0
    if d.label_noise > 0:
        train, flipped = add_label_noise(train, d.label_noise, spec.num_labels, DATA_SEED)
    tok = lambda data: _with_labels(tokenize(data, tokenizer, d.max_seq_length), data.labels)  # noqa: E731
    train_feats = tok(train)
    eval_idx = np.random.default_rng(DATA_SEED).permutation(len(train_feats))[:d.train_eval_examples]
    dev = {s: tok(downsample(load_split(trial.task, s, **kw), d.max_dev_examples, DATA_SEED))
           for s in spec.dev_splits}
    supplementary: list[dict] = []
    for extra in d.supplementary_tasks:
        data = downsample(load_split(extra, "train", **kw), d.supplementary_examples, DATA_SEED)
        supplementary += [{**e, "label": 0.0 if spec.is_regression else 0}
                          for e in tokenize(data, tokenizer, d.max_seq_length)]
    return TrialData(train_feats, [train_feats[i] for i in sorted(eval_idx)], dev, supplementary,
                     Collator(tokenizer.pad_token_id, spec.is_regression), spec.num_labels, flipped)


def train_loader(features: list[dict], batch_size: int, collator: Collator, seed: int) -> DataLoader:
    """Length-grouped shuffled batches (similar lengths pad less), reproducible from `seed`."""
    order = length_grouped_indices([len(f["input_ids"]) for f in features], batch_size, seed)
    # `idx` (position in `features`) travels with each example: it is the teacher output cache's row
    return DataLoader([{**features[i], "idx": i} for i in order], batch_size=batch_size, shuffle=False,
                      collate_fn=collator)


def eval_loader(features: list[dict], batch_size: int, collator: Collator) -> DataLoader:
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    return DataLoader([{**features[i], "idx": i} for i in order], batch_size=batch_size, collate_fn=collator)


# ------------------------------------------------------------------------------------------ speed
def resolve_device(trial: ResolvedTrial) -> torch.device:
    want = trial.speed.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_precision(trial: ResolvedTrial, device: torch.device) -> str:
    """'bf16' or 'fp32'. auto: bf16 autocast where the hardware multiplies bf16 natively (CUDA; CPUs with
    AVX512-BF16/AMX) and the student is not quantized (bf16 rounding would blur the quantization grid); fp32
    otherwise. benchmarks/README.md: on the benchmark CPU bf16 trains ~2x faster at the same dev accuracy."""
    p = trial.speed.precision
    if p != "auto":
        return p
    if trial.bits < 32 or trial.act_bits < 32:
        return "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if _cpu_has_bf16() else "fp32"


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Model inputs to the device; `idx` stays on the host (the cache indexes numpy arrays with it)."""
    if device.type == "cpu":
        return batch
    return {k: (v if k == "idx" else v.to(device, non_blocking=True)) for k, v in batch.items()}


# ------------------------------------------------------------------------------------- loss plumbing
class StageLosses:
    """Which features a stage reads from each model, and the weighted sum of its terms."""

    def __init__(self, stage: ResolvedStage, student: nn.Module, teacher: nn.Module | None, n_student: int):
        self.stage = stage
        self.n_student = n_student
        s_qkv, t_qkv, s_out, t_out = set(), set(), set(), set()
        self.s_hidden = self.t_hidden = False
        self.needs_teacher = any(t.name != "ce" for t in stage.losses)
        for term in stage.losses:
            want = needs(term.name)
            for ls, lt in term.layer_pairs:
                if want & {"qk", "qkv"}:
                    s_qkv.add(ls), t_qkv.add(lt)
                if "attn_out" in want:
                    s_out.add(ls), t_out.add(lt)
            if "hidden" in want:
                self.s_hidden = self.t_hidden = True
        cr = stage.consistency
        if cr is not None:  # consistency compares the student's last layer on mixed vs clean inputs
            if cr.loss == "hidden_mse":
                self.s_hidden = True
            else:
                s_qkv.add(n_student)
        self.s_tap = FeatureTap(student, s_qkv, s_out)
        self.t_tap = FeatureTap(teacher, t_qkv, t_out) if teacher is not None and self.needs_teacher else None
        self.t_features = feature_names(stage.losses)  # what the teacher output cache keeps
        self.projections = self._projections(student, teacher)

    def _projections(self, student: nn.Module, teacher: nn.Module | None) -> nn.ModuleDict:
        """Learned W for hidden_mse when student and teacher widths differ (TinyBERT)."""
        proj = nn.ModuleDict()
        if teacher is None:
            return proj
        ds, dt = student.config.hidden_size, teacher.config.hidden_size
        if ds != dt:
            for term in self.stage.losses:
                if term.name == "hidden_mse":
                    for ls, _ in term.layer_pairs:
                        proj[str(ls)] = nn.Linear(ds, dt)
        return proj

    def project(self, layer: int, h: Tensor) -> Tensor:
        key = str(layer)
        return self.projections[key](h) if key in self.projections else h

    def student(self, model: nn.Module, batch: dict, mask: Tensor | None = None) -> Features:
        return forward_features(model, batch, self.s_tap, self.s_hidden, mask)

    @torch.inference_mode()
    def teacher(self, model: nn.Module, batch: dict, mask: Tensor | None = None,
                cache: TeacherCache | None = None) -> Features | None:
        """Teacher features of a batch: from `cache` when it holds them, else a forward (then stored).
        A `mask` override (mixup's union mask) means a changed input: never cached."""
        if self.t_tap is None:
            return None
        if cache is None or mask is not None:
            return forward_features(model, batch, self.t_tap, self.t_hidden, mask)
        hit = cache.lookup(batch)
        if hit is not None:
            return hit
        return cache.store(batch, forward_features(model, batch, self.t_tap, self.t_hidden))

    def terms(self, s: Features, t: Features | None, labels: Tensor | None,
              include_ce: bool = True) -> dict[str, Tensor]:
        """Unweighted value of every configured term."""
        out = {}
        for term in self.stage.losses:
            if term.name == "ce" and not include_ce:
                continue
            out[term.name] = term_loss(term.name, s, t, term.layer_pairs, temperature=term.temperature,
                                       relations=term.relations, labels=labels, project=self.project)
        return out

    def weighted(self, values: dict[str, Tensor]) -> Tensor:
        weights = {t.name: t.weight for t in self.stage.losses}
        return sum(weights[k] * v for k, v in values.items() if k in weights)

    def consistency(self, s_mix: Features, s_clean: Features, lam: float, mask: Tensor) -> Tensor:
        """CR-ILD: lam * D(S_mix, S_clean) + (1 - lam) * D(S_mix, S_clean_rev) on the student's last layer."""
        cr = self.stage.consistency
        pairs = [(self.n_student, self.n_student)]
        rev = Features(logits=s_clean.logits.flip(0), attention_mask=s_clean.attention_mask.flip(0),
                       num_heads=s_clean.num_heads,
                       hidden=tuple(h.flip(0) for h in s_clean.hidden) if s_clean.hidden else None,
                       q={k: v.flip(0) for k, v in s_clean.q.items()}, k={k: v.flip(0) for k, v in s_clean.k.items()},
                       v={k: v.flip(0) for k, v in s_clean.v.items()})
        d = lambda target: term_loss(cr.loss, s_mix, target, pairs, mask=mask)  # noqa: E731
        return lam * d(s_clean) + (1 - lam) * d(rev)

    def close(self) -> None:
        self.s_tap.remove()
        if self.t_tap is not None:
            self.t_tap.remove()


# ------------------------------------------------------------------------------------------ evaluation
@torch.inference_mode()
def evaluate(student: nn.Module, teacher: nn.Module | None, losses: StageLosses, loader: DataLoader,
             task: str, predicts: bool, teacher_cache: TeacherCache | None,
             precision: str = "fp32") -> dict[str, float]:
    """Task metrics (if the stage trains the head) and the distillation loss on one eval split.

    `teacher_cache`: the frozen teacher gives the same outputs at every eval, so they are read back."""
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    logits, labels, loss_sum, n = [], [], None, 0
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(device, precision):
            s = losses.student(student, batch)
            t = losses.teacher(teacher, batch, cache=teacher_cache) if losses.needs_teacher else None
            values = losses.terms(s, t, batch["labels"], include_ce=False)
        if values:
            bs = batch["input_ids"].shape[0]
            v = losses.weighted(values).detach().float() * bs
            loss_sum = v if loss_sum is None else loss_sum + v  # summed on the device: one sync per eval
            n += bs
        logits.append(s.logits.float())
        labels.append(batch["labels"])
    student.train(was_training)
    out = {}
    if n:
        out["distill_loss"] = float(loss_sum) / n
    if predicts:
        preds = torch.cat(logits).cpu().numpy()
        out.update(compute_metrics(task, preds, torch.cat(labels).cpu().numpy()))
    return out


# ----------------------------------------------------------------------------------------- the loop
@dataclass
class LoopState:
    stage_index: int = 0
    epoch: int = 0  # next epoch to run within the stage
    global_step: int = 0
    best: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    cache_hits: int = 0  # teacher outputs read from the cache / computed, in examples (finished stages)
    cache_misses: int = 0


def _optimizer(params: list[tuple[str, nn.Parameter]], stage: ResolvedStage) -> torch.optim.Optimizer:
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    groups = [
        {"params": [p for n, p in params if not any(nd in n for nd in no_decay)],
         "weight_decay": stage.weight_decay},
        {"params": [p for n, p in params if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
    ]
    # fused: one kernel over all parameters (CPU and CUDA); the per-tensor loop cost ~1 s/step on 2 CPU cores
    return torch.optim.AdamW(groups, lr=stage.lr, fused=True)


def train_stage(*, stage: ResolvedStage, stage_index: int, trial: ResolvedTrial, student: nn.Module,
                teacher: nn.Module | None, data: TrialData, logger: tracking.RunLogger, state: LoopState,
                callbacks: Callbacks, resume_blob: dict | None, save_state: Callable[[Path, dict], None]) -> None:
    """Train one stage: the one loop every method and the teacher fine-tune go through."""
    from transformers import get_linear_schedule_with_warmup

    device = resolve_device(trial)
    student.to(device)
    if teacher is not None:
        teacher.to(device)
    # The teacher fine-tune stays fp32: a cached teacher must not depend on which student's precision asked.
    precision = "fp32" if stage.name == "finetune" else resolve_precision(trial, device)
    # the EMA copy is made before the taps are hooked in, so it does not write into the student's taps
    ema = copy.deepcopy(student) if stage.consistency and stage.consistency.target == "ema" else None
    losses = StageLosses(stage, student, teacher, trial.student_layers)
    losses.projections.to(device)
    forward_student = _compiled(student) if trial.speed.compile and stage.name != "finetune" else student
    params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    params += [(f"proj.{n}", p) for n, p in losses.projections.named_parameters()]
    optimizer = _optimizer(params, stage)
    train_set = data.train + (data.supplementary if stage.supplementary else [])
    steps_per_epoch = math.ceil(len(train_set) / stage.batch_size)
    total = stage.max_steps or stage.epochs * steps_per_epoch
    epochs = math.ceil(total / steps_per_epoch)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(stage.warmup * total), total)
    if resume_blob is not None:
        optimizer.load_state_dict(resume_blob["optimizer"])
        scheduler.load_state_dict(resume_blob["scheduler"])
        losses.projections.load_state_dict(resume_blob["projections"])
        if ema is not None and resume_blob.get("ema") is not None:
            ema.load_state_dict(resume_blob["ema"])
    eval_bs = max(stage.batch_size, 64)
    eval_sets = {"train": eval_loader(data.train_eval, eval_bs, data.collator),
                 **{s: eval_loader(f, eval_bs, data.collator) for s, f in data.dev.items()}}
    tc = trial.speed.teacher_cache

    def open_cache(examples: list[dict], persistent: bool) -> TeacherCache | None:
        if teacher is None or not losses.needs_teacher:
            return None
        return TeacherCache.open(examples, features=losses.t_features, num_heads=teacher.config.num_attention_heads,
                                 identity=teacher_identity(getattr(teacher, "name_or_path", None)),
                                 precision=precision, max_seq_length=trial.data.max_seq_length, dtype=tc.dtype,
                                 max_bytes=int(tc.max_gb * 1e9), persistent=persistent)

    # Mixup changes the teacher's input every step: those training batches always run the teacher. Eval
    # batches are never mixed; without the disk cache they are still kept in memory for the stage.
    train_cache = open_cache(train_set, True) if tc.enabled and not stage.mixup else None
    teacher_caches = {"train": open_cache(data.train_eval, tc.enabled),
                      **{s: open_cache(f, tc.enabled) for s, f in data.dev.items()}}
    all_caches = [c for c in (train_cache, *teacher_caches.values()) if c is not None]
    window: dict[str, Tensor] = {}
    window_steps = 0
    stage_step = state.epoch * steps_per_epoch
    checked_terms = False
    fault_key = f"teacher/{trial.task}" if stage.name == "finetune" else trial.run_name

    def log_eval() -> None:
        nonlocal window, window_steps
        metrics: dict[str, float] = {"stage": float(stage_index), "lr": scheduler.get_last_lr()[0]}
        for k, v in window.items():
            metrics[f"loss/{k}"] = float(v) / max(window_steps, 1)
        window, window_steps = {}, 0
        if not all(math.isfinite(v) for k, v in metrics.items() if k.startswith("loss/")):
            raise DivergedError(f"loss became non-finite at step {state.global_step} (stage {stage.name}): "
                                + ", ".join(f"{k}={v}" for k, v in metrics.items() if k.startswith("loss/")))
        results = {s: evaluate(forward_student, teacher, losses, loader, trial.task, stage.predicts,
                               teacher_caches[s], precision) for s, loader in eval_sets.items()}
        for split, res in results.items():  # train/*, dev/* and, for MNLI, dev_mm/*
            metrics.update({f"{split}/{k}": v for k, v in res.items()})
        for k, v in results["train"].items():
            if k in results["dev"]:
                gap = results["dev"][k] - v if k == "distill_loss" else v - results["dev"][k]
                metrics[f"gap/{k}"] = gap
        if stage.predicts and stage_index == len(trial.train) - 1:
            for k, v in results["dev"].items():
                if k != "distill_loss" and v >= state.best.get(k, -math.inf):
                    state.best[k] = v
            metrics.update({f"dev/best_{k}": v for k, v in state.best.items()})
        if all_caches:
            metrics["cache/hits"] = state.cache_hits + sum(c.hits for c in all_caches)
            metrics["cache/misses"] = state.cache_misses + sum(c.misses for c in all_caches)
            metrics["cache/bytes"] = sum(c.bytes for c in all_caches)
        state.last = metrics
        logger.add_metrics(metrics, state.global_step)
        logger.flush()
        if callbacks.on_eval:
            callbacks.on_eval(state.global_step, metrics)

    student.train()
    for epoch in range(state.epoch, epochs):
        loader = train_loader(train_set, stage.batch_size, data.collator,
                              seed=trial.seed * 1000 + stage_index * 100 + epoch)
        for batch in loader:
            if stage_step >= total:
                break
            fault = faults.loss_factor(fault_key, state.global_step)
            batch = to_device(batch, device)
            with autocast(device, precision):
                values, lam = _step_losses(stage, losses, forward_student, teacher, ema, batch, stage_step / total,
                                           cache=train_cache)
            if not checked_terms:
                _check_terms(values, stage)
                checked_terms = True
            loss = sum(w * v for w, v in values.values()) * fault
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if stage.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for _, p in params], stage.max_grad_norm)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                _ema_update(ema, student, stage.consistency.ema_decay)
            for k, (w, v) in values.items():
                window[k] = window.get(k, 0.0) + v.detach()
            window["total"] = window.get("total", 0.0) + loss.detach()
            window_steps += 1
            stage_step += 1
            state.global_step += 1
            if stage.eval_every and stage_step % stage.eval_every == 0:
                log_eval()
        if window_steps and (not stage.eval_every or stage_step >= total):
            log_eval()  # end of epoch (eval_every: 0) or the last step of the stage
        state.epoch = epoch + 1
        # every epoch end but the trial's very last (a stage boundary too, so a kill in stage 2 keeps stage 1)
        if callbacks.on_checkpoint and (state.epoch < epochs or stage_index < len(trial.train) - 1):
            blob = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "projections": losses.projections.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None}
            callbacks.on_checkpoint(lambda folder: save_state(folder, blob),
                                    {"stage": stage_index, "epoch": state.epoch, "step": state.global_step})
        if stage_step >= total:
            break
    losses.close()
    for c in all_caches:
        c.close()
    state.cache_hits += sum(c.hits for c in all_caches)
    state.cache_misses += sum(c.misses for c in all_caches)


def _compiled(model: nn.Module) -> nn.Module:
    """`torch.compile` for the student's forward passes (dynamic shapes: dynamic padding varies the length).
    Parameters, optimizer and checkpoints keep using the plain module."""
    return torch.compile(model, dynamic=True)


def _step_losses(stage: ResolvedStage, losses: StageLosses, student: nn.Module, teacher: nn.Module | None,
                 ema: nn.Module | None, batch: dict, progress: float, cache: TeacherCache | None = None
                 ) -> tuple[dict[str, tuple[float, Tensor]], float]:
    """The weighted terms of one training step: {name: (weight, value)}."""
    if not stage.mixup:
        t = losses.teacher(teacher, batch, cache=cache)
        s = losses.student(student, batch)
        weights = {term.name: term.weight for term in stage.losses}
        return {k: (weights[k], v) for k, v in losses.terms(s, t, batch["labels"]).items()}, 1.0
    # CR-ILD mixup: teacher and student both see the mixed embeddings, attention mask = union.
    lam = float(np.random.beta(1.0, 1.0))
    lam = max(lam, 1.0 - lam)
    union = batch["attention_mask"] | batch["attention_mask"].flip(0)
    with embedding_mixup(teacher, lam):
        t = losses.teacher(teacher, batch, union)
    with embedding_mixup(student, lam):
        s = losses.student(student, batch, union)
    weights = {term.name: term.weight for term in stage.losses}
    out = {k: (weights[k], v) for k, v in losses.terms(s, t, None, include_ce=False).items()}
    cr = stage.consistency
    if cr is not None:
        target = ema if ema is not None else student
        was_training = target.training
        target.eval()  # clean target without dropout, no gradient
        with torch.no_grad():
            if ema is not None:
                tap = FeatureTap(ema, {losses.n_student} if cr.loss != "hidden_mse" else set())
                clean = forward_features(ema, batch, tap, cr.loss == "hidden_mse")
                tap.remove()
            else:
                clean = losses.student(student, batch)
        target.train(was_training)
        # linear ramp w * (progress through the stage), CR-ILD's w * epoch / E at step granularity
        out["consistency"] = (cr.weight * progress, losses.consistency(s, clean, lam, union))
    return out, lam


def _check_terms(values: dict[str, tuple[float, Tensor]], stage: ResolvedStage) -> None:
    """Refuse silently dead terms: every configured term must have a value that depends on the student."""
    for term in stage.losses:
        if term.name not in values:
            raise TrialSetupError(f"stage '{stage.name}': loss term '{term.name}' produced no value")
        _, v = values[term.name]
        if not v.requires_grad:
            raise TrialSetupError(f"stage '{stage.name}': loss term '{term.name}' does not depend on the student "
                                  "(no gradient path), so it would never contribute")


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(p.detach(), alpha=1 - decay)


# ---------------------------------------------------------------------------------------- the trial
def build_student(trial: ResolvedTrial, teacher_dir: Path, num_labels: int):
    """Student init: bottom layers of the pre-trained teacher (CR-ILD/PKD), a copy of the fine-tuned
    teacher (KD-QAT), or another model; then quantized when `bits`/`act_bits` < 32."""
    init = trial.student.init
    if init == "truncate":
        student = load_classifier(trial.teacher.model, num_labels, num_layers=trial.student_layers)
    elif init == "teacher_copy":
        student = load_classifier(str(teacher_dir), num_labels)
    else:
        student = load_classifier(init, num_labels)
    report = None
    if trial.bits < 32 or trial.act_bits < 32:
        from kdplatform.distill.quant import quantize_bert_

        report = quantize_bert_(student, trial.bits, trial.act_bits, two_bit=trial.student.two_bit,
                                quantize_embeddings=trial.student.quantize_embeddings,
                                clip=trial.student.weight_clip, act_clip=trial.student.act_clip)
    return student, report


def run_trial(trial: ResolvedTrial, *, tracking_uri: str | None = None, parent_run_id: str | None = None,
              run_id: str | None = None, callbacks: Callbacks | None = None, resume_dir: Path | None = None,
              sweep_id: str | None = None) -> TrialResult:
    """Run one student trial and log it as one MLflow run (reattached to `run_id` when resuming)."""
    from kdplatform.distill.teacher import ensure_teacher, teacher_tokenizer

    started = time.time()
    callbacks = callbacks or Callbacks()
    uri = tracking.absolute_uri(tracking_uri or trial.tracking_uri or tracking.default_tracking_uri())
    teacher_dir = ensure_teacher(trial, uri)
    set_seed(trial.seed)  # after the teacher: a fine-tune in this process must not shift the student's RNG
    tokenizer = teacher_tokenizer(teacher_dir)
    data = prepare_data(trial, tokenizer)
    teacher = freeze(load_classifier(str(teacher_dir), data.num_labels))
    student, qreport = build_student(trial, teacher_dir, data.num_labels)

    resume_blob, state = None, LoopState()
    if resume_dir is not None and (Path(resume_dir) / "state.pt").exists():
        resume_blob = torch.load(Path(resume_dir) / "state.pt", weights_only=True)
        student.load_state_dict(resume_blob["student"])
        state = LoopState(**resume_blob["loop"])
        torch.set_rng_state(resume_blob["torch_rng"])
        np.random.set_state(_np_state(resume_blob["numpy_rng"]))
        run_id = run_id or resume_blob.get("run_id")

    tags = {tracking.ROLE: "student", tracking.CFG_HASH: trial.cfg_hash, tracking.TEACHER_HASH: trial.teacher_hash,
            "kdp.task": trial.task, "kdp.method": trial.method, "kdp.seed": str(trial.seed),
            "kdp.bits": str(trial.bits)}
    if sweep_id or parent_run_id:
        tags[tracking.SWEEP] = sweep_id or parent_run_id
    logger = tracking.RunLogger(uri, trial.name, trial.run_name, tags, run_id=run_id, parent_run_id=parent_run_id)
    if resume_blob is None:
        params = trial.flat_params()
        params["data.train_examples"] = str(len(data.train))
        params["data.labels_flipped"] = str(data.flipped)
        logger.log_params(params)
        logger.log_text(yaml.safe_dump(trial.model_dump(mode="json"), sort_keys=False), "config.yaml")
        if qreport is not None:
            logger.add_metrics(qreport.as_metrics(), 0)
            logger.log_text("\n".join(qreport.quantized_modules), "quantized_modules.txt")
            logger.flush()

    def save_state(folder: Path, blob: dict) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        payload = {"student": student.state_dict(), "loop": state.__dict__.copy(),
                   "torch_rng": torch.get_rng_state(), "numpy_rng": _np_state_tensor(), "run_id": logger.run_id,
                   **blob}
        tmp = folder / "state.pt.tmp"
        torch.save(payload, tmp)
        os.replace(tmp, folder / "state.pt")
        (folder / "run.json").write_text(json.dumps({"run_id": logger.run_id, **state.__dict__}))

    try:
        for i, stage in enumerate(trial.train):
            if i < state.stage_index:
                continue
            blob = resume_blob if (resume_blob is not None and i == state.stage_index and state.epoch > 0) else None
            if blob is None:
                state.epoch = 0
            state.stage_index = i
            train_stage(stage=stage, stage_index=i, trial=trial, student=student, teacher=teacher, data=data,
                        logger=logger, state=state, callbacks=callbacks, resume_blob=blob, save_state=save_state)
            state.stage_index, state.epoch = i + 1, 0
    except DivergedError as e:
        logger.set_tags({"kdp.failure_reason": str(e)[:5000]})
        logger.finish("FAILED")
        raise
    except BaseException as e:
        # a crash (retried by the orchestrator) or Ctrl-C: the run stays reattachable, marked FAILED/KILLED
        logger.set_tags({"kdp.failure_reason": f"{type(e).__name__}: {str(e)[:4000]}"})
        logger.finish("KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED")
        raise
    best = {f"dev/best_{k}": v for k, v in state.best.items()}
    logger.set_tags({"kdp.best_dev_score": f"{state.best.get('score', float('nan')):.4f}"})
    logger.finish("FINISHED")
    return TrialResult(logger.run_id, "FINISHED", best, state.last, time.time() - started)


def _np_state_tensor() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached}


def _np_state(d: dict) -> tuple:
    return ("MT19937", d["keys"].numpy().astype(np.uint32), d["pos"], d["has_gauss"], d["cached"])
