"""The training engine: set up a stage, then run its loop. Every method's stages and the teacher fine-tune
go through `train_stage`.

The engine knows nothing of MLflow, Ray or files: the caller passes `Hooks` (`on_step` before each step,
e.g. fault injection; `on_eval` with each evaluation's metrics; `on_checkpoint` with what to save at each
epoch end) and `StageSettings` (how to run: device, precision, compile, which task's metrics).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kdplatform.config import ResolvedStage, TeacherCacheConfig
from kdplatform.distill import objective
from kdplatform.distill.data import TrialData, eval_loader, train_loader
from kdplatform.distill.objective import StageLosses, TrialSetupError, check_terms, consistency_ramp, ema_update
from kdplatform.distill.tasks import compute_metrics
from kdplatform.distill.teacher_cache import TeacherCache, teacher_identity


class DivergedError(RuntimeError):
    """The loss became NaN/inf: the trial stops and its run is marked FAILED with this reason."""


@dataclass
class Hooks:
    """What the caller does around the loop (all optional).
    on_step(global_step) -> factor the step's loss is multiplied by (1.0: unchanged);
    on_eval(global_step, metrics); on_checkpoint(state_blob, info) at every epoch end but the run's last;
    on_progress(stage name, steps done in the stage, the stage's total steps) after each step (cheap: the
    caller decides how often to show it)."""

    on_step: Callable[[int], float] | None = None
    on_eval: Callable[[int, dict[str, float]], None] | None = None
    on_checkpoint: Callable[[dict[str, Any], dict[str, Any]], None] | None = None
    on_progress: Callable[[str, int, int], None] | None = None


@dataclass(frozen=True)
class StageSettings:
    """How a stage runs (not what it optimizes: that is the `ResolvedStage`)."""

    task: str
    seed: int  # batch order: seed * 1000 + stage index * 100 + epoch
    device: torch.device
    precision: str  # "fp32" or "bf16"
    n_student: int  # the student's depth (consistency reads its last layer)
    max_seq_length: int
    num_stages: int = 1  # best dev scores are tracked in the last stage
    compile: bool = False
    teacher_cache: TeacherCacheConfig = field(default_factory=lambda: TeacherCacheConfig(enabled=False))


@dataclass
class LoopState:
    stage_index: int = 0
    epoch: int = 0  # next epoch to run within the stage
    global_step: int = 0
    best: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    cache_hits: int = 0  # teacher outputs read from the cache / computed, in examples (finished stages)
    cache_misses: int = 0


# ------------------------------------------------------------------------------------------ devices
def resolve_device(want: str) -> torch.device:
    """speed.device ('auto', 'cuda', 'cpu') -> a device: auto means CUDA when available."""
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_precision(want: str, quantized: bool, device: torch.device) -> str:
    """'bf16' or 'fp32'. auto: bf16 autocast where the hardware multiplies bf16 natively (CUDA; CPUs with
    AVX512-BF16/AMX) and the student is not quantized (bf16 rounding would blur the quantization grid); fp32
    otherwise. benchmarks/README.md: on the benchmark CPU bf16 trains ~2x faster at the same dev accuracy."""
    if want != "auto":
        return want
    if quantized:
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


# ------------------------------------------------------------------------------------------ evaluation
@torch.inference_mode()
def evaluate(student: nn.Module, teacher: nn.Module | None, losses: StageLosses, loader, task: str,
             predicts: bool, teacher_cache: TeacherCache | None, precision: str = "fp32") -> dict[str, float]:
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
            values = losses.terms(s, t, batch["labels"], include_labelled=False)
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


# ------------------------------------------------------------------------------------------ one stage
def _optimizer(params: list[tuple[str, nn.Parameter]], stage: ResolvedStage) -> torch.optim.Optimizer:
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight")
    groups = [
        {"params": [p for n, p in params if not any(nd in n for nd in no_decay)],
         "weight_decay": stage.weight_decay},
        {"params": [p for n, p in params if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
    ]
    # fused: one kernel over all parameters (CPU and CUDA); the per-tensor loop cost ~1 s/step on 2 CPU cores
    return torch.optim.AdamW(groups, lr=stage.lr, fused=True)


class StageRun:
    """A stage set up to train: models on the device, losses and taps, optimizer and schedule, eval sets and
    teacher output caches, and the running counters of the loop."""

    def __init__(self, stage: ResolvedStage, index: int, settings: StageSettings, student: nn.Module,
                 teacher: nn.Module | None, data: TrialData, resume: dict | None):
        from transformers import get_linear_schedule_with_warmup

        self.stage, self.index, self.settings, self.data = stage, index, settings, data
        self.student, self.teacher = student.to(settings.device), teacher
        if teacher is not None:
            teacher.to(settings.device)
        # the EMA copy is made before the taps are hooked in, so it does not write into the student's taps
        self.ema = copy.deepcopy(student) if stage.consistency and stage.consistency.target == "ema" else None
        self.losses = StageLosses(stage, student, teacher, settings.n_student)
        self.losses.projections.to(settings.device)
        self.forward_student = torch.compile(student, dynamic=True) if settings.compile else student
        self.params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        self.params += [(f"proj.{n}", p) for n, p in self.losses.projections.named_parameters()]
        self.optimizer = _optimizer(self.params, stage)
        self.train_set = data.train + (data.supplementary if stage.supplementary else [])
        self.steps_per_epoch = math.ceil(len(self.train_set) / stage.batch_size)
        self.total = stage.max_steps or stage.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total / self.steps_per_epoch)
        cr = stage.consistency
        if cr is not None and cr.ramp == "epoch" and self.epochs < 2:  # max_steps within one epoch
            raise TrialSetupError(f"stage '{stage.name}': consistency is ramped as w * epoch / E from epoch 0, and "
                                  f"this stage trains {self.total} steps of {self.steps_per_epoch} a epoch (1 epoch), "
                                  "so it is 0 at every step and never contributes: raise max_steps above one epoch, "
                                  "or set the stage's consistency: {ramp: step}")
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, int(stage.warmup * self.total), self.total)
        if resume is not None:
            self._resume(resume)
        eval_bs = max(stage.batch_size, 64)
        self.eval_sets = {"train": eval_loader(data.train_eval, eval_bs, data.collator),
                          **{s: eval_loader(f, eval_bs, data.collator) for s, f in data.dev.items()}}
        self._open_caches()
        self.window: dict[str, Tensor] = {}
        self.window_steps = 0
        self.step = 0  # steps done in this stage
        self.checked_terms = False

    def _resume(self, blob: dict) -> None:
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        self.losses.projections.load_state_dict(blob["projections"])
        if self.ema is not None and blob.get("ema") is not None:
            self.ema.load_state_dict(blob["ema"])

    def _open_caches(self) -> None:
        """Mixup changes the teacher's input every step: those training batches always run the teacher. Eval
        batches are never mixed; without the disk cache they are still kept in memory for the stage."""
        tc, teacher = self.settings.teacher_cache, self.teacher

        def open_cache(examples: list[dict], persistent: bool) -> TeacherCache | None:
            if teacher is None or not self.losses.needs_teacher:
                return None
            if any(f.startswith("map.") for f in self.losses.t_features):
                return None  # a family's own attention maps (S x S per head) are not per-token features
            return TeacherCache.open(examples, features=self.losses.t_features,
                                     num_heads=teacher.config.num_attention_heads,
                                     identity=teacher_identity(getattr(teacher, "name_or_path", None)),
                                     precision=self.settings.precision, max_seq_length=self.settings.max_seq_length,
                                     dtype=tc.dtype, max_bytes=int(tc.max_gb * 1e9), persistent=persistent,
                                     source=tc.source)

        self.train_cache = open_cache(self.train_set, True) if tc.enabled and not self.stage.mixup else None
        self.eval_caches = {"train": open_cache(self.data.train_eval, tc.enabled),
                            **{s: open_cache(f, tc.enabled) for s, f in self.data.dev.items()}}
        self.caches = [c for c in (self.train_cache, *self.eval_caches.values()) if c is not None]

    def batches(self, epoch: int):
        seed = self.settings.seed * 1000 + self.index * 100 + epoch
        return train_loader(self.train_set, self.stage.batch_size, self.data.collator, seed=seed)

    @property
    def done(self) -> bool:
        return self.step >= self.total

    def train_step(self, batch: dict, state: LoopState, hooks: Hooks) -> None:
        """One optimizer step on a batch; the terms' values are summed into the logging window."""
        factor = hooks.on_step(state.global_step) if hooks.on_step else 1.0
        device, precision = self.settings.device, self.settings.precision
        batch = to_device(batch, device)
        cr = self.stage.consistency
        ramp = consistency_ramp(cr, self.step, self.steps_per_epoch, self.total) if cr is not None else 0.0
        with autocast(device, precision):
            values, _ = objective.step_terms(self.stage, self.losses, self.forward_student, self.teacher,
                                             self.ema, batch, ramp, cache=self.train_cache)
        if not self.checked_terms:
            check_terms(values, self.stage)
            self.checked_terms = True
        loss = sum(w * v for w, v in values.values()) * factor
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.stage.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.params], self.stage.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            ema_update(self.ema, self.student, self.stage.consistency.ema_decay)
        for k, (w, v) in values.items():
            self.window[k] = self.window.get(k, 0.0) + v.detach()
        self.window["total"] = self.window.get("total", 0.0) + loss.detach()
        self.window_steps += 1
        self.step += 1
        state.global_step += 1

    def eval_metrics(self, state: LoopState) -> dict[str, float]:
        """The window's mean loss terms, then every eval split's metrics and distillation loss, and the gaps."""
        metrics: dict[str, float] = {"stage": float(self.index), "lr": self.scheduler.get_last_lr()[0]}
        for k, v in self.window.items():
            metrics[f"loss/{k}"] = float(v) / max(self.window_steps, 1)
        self.window, self.window_steps = {}, 0
        losses = {k: v for k, v in metrics.items() if k.startswith("loss/")}
        if not all(math.isfinite(v) for v in losses.values()):
            raise DivergedError(f"loss became non-finite at step {state.global_step} (stage {self.stage.name}): "
                                + ", ".join(f"{k}={v}" for k, v in losses.items()))
        results = {s: evaluate(self.forward_student, self.teacher, self.losses, loader, self.settings.task,
                               self.stage.predicts, self.eval_caches[s], self.settings.precision)
                   for s, loader in self.eval_sets.items()}
        for split, res in results.items():  # train/*, dev/* and, for MNLI, dev_mm/*
            metrics.update({f"{split}/{k}": v for k, v in res.items()})
        for k, v in results["train"].items():
            if k in results["dev"]:
                metrics[f"gap/{k}"] = results["dev"][k] - v if k == "distill_loss" else v - results["dev"][k]
        if self.stage.predicts and self.index == self.settings.num_stages - 1:
            for k, v in results["dev"].items():
                if k != "distill_loss" and v >= state.best.get(k, -math.inf):
                    state.best[k] = v
            metrics.update({f"dev/best_{k}": v for k, v in state.best.items()})
        if self.caches:
            metrics["cache/hits"] = state.cache_hits + sum(c.hits for c in self.caches)
            metrics["cache/misses"] = state.cache_misses + sum(c.misses for c in self.caches)
            metrics["cache/bytes"] = sum(c.bytes for c in self.caches)
        if self.train_cache is not None and math.isfinite(self.train_cache.read_s):  # what timing chose, and why
            metrics["cache/read_ms"] = 1e3 * self.train_cache.read_s
            metrics["cache/forward_ms"] = 1e3 * self.train_cache.forward_s
            metrics["cache/recompute"] = float(self.train_cache.source == "recompute")
        return metrics

    def log_eval(self, state: LoopState, hooks: Hooks) -> None:
        state.last = self.eval_metrics(state)
        if hooks.on_eval:
            hooks.on_eval(state.global_step, state.last)

    def checkpoint_blob(self) -> dict[str, Any]:
        """The stage's own state to save besides the student (optimizer, schedule, projections, EMA)."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "projections": self.losses.projections.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def close(self, state: LoopState) -> None:
        self.losses.close()
        for c in self.caches:
            c.close()
        state.cache_hits += sum(c.hits for c in self.caches)
        state.cache_misses += sum(c.misses for c in self.caches)


def train_stage(stage: ResolvedStage, index: int, settings: StageSettings, *, student: nn.Module,
                teacher: nn.Module | None, data: TrialData, state: LoopState, hooks: Hooks | None = None,
                resume: dict | None = None) -> None:
    """Train one stage from `state.epoch`: step through the batches, evaluate every `eval_every` steps (or at
    each epoch end when 0) and at the stage's last step, offer a checkpoint at each epoch end."""
    hooks = hooks or Hooks()
    run = StageRun(stage, index, settings, student, teacher, data, resume)
    run.step = state.epoch * run.steps_per_epoch
    try:
        student.train()
        for epoch in range(state.epoch, run.epochs):
            for batch in run.batches(epoch):
                if run.done:
                    break
                run.train_step(batch, state, hooks)
                if hooks.on_progress:
                    hooks.on_progress(stage.name, run.step, run.total)
                if stage.eval_every and run.step % stage.eval_every == 0:
                    run.log_eval(state, hooks)
            if run.window_steps and (not stage.eval_every or run.done):
                run.log_eval(state, hooks)  # end of epoch (eval_every: 0) or the last step of the stage
            state.epoch = epoch + 1
            # every epoch end but the run's very last (a stage boundary too, so a kill in stage 2 keeps stage 1)
            if hooks.on_checkpoint and (state.epoch < run.epochs or index < settings.num_stages - 1):
                hooks.on_checkpoint(run.checkpoint_blob(),
                                    {"stage": index, "epoch": state.epoch, "step": state.global_step})
            if run.done:
                break
    finally:
        run.close(state)
