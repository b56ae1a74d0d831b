"""What one stage optimizes: its loss terms, the features they read from each model, and one step's values.

`StageLosses` plans the taps from the loss menu (what each term reads, at which layers), owns the learned
projections, and evaluates the terms; `step_terms` is one training step's weighted terms, including CR-ILD's
embedding mixup and consistency regularization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn

from kdplatform.config import ResolvedStage
from kdplatform.distill.losses import Features, term_loss
from kdplatform.distill.models import family_of
from kdplatform.distill.taps import (embedding_mixup, feature_names, forward_features,
                                     layers_of, tap_features)
from kdplatform.distill.teacher_cache import TeacherCache
from kdplatform.loss_menu import LOSS_MENU, needs_teacher


class TrialSetupError(RuntimeError):
    """A configuration that passed validation but cannot run (e.g. a loss term that never contributes)."""


def consistency_losses(cr) -> list[str]:
    """The distances D sums (default: attention KL + hidden MSE on the student's last layer, as CR-ILD)."""
    return list(cr.losses)


def consistency_features(cr, n_student: int, student: nn.Module) -> set[str]:
    """Student features the consistency distances read on the student's last layer."""
    terms = [_LastLayerTerm(n, [(n_student, n_student)]) for n in consistency_losses(cr)]
    return feature_names(terms, "student", family_of(student)) - {"logits"}


@dataclass(frozen=True)
class _LastLayerTerm:
    """A consistency distance as `feature_names` reads a term: its name, one (last, last) layer pair."""

    name: str
    layer_pairs: list[tuple[int, int]]
    relations: tuple[str, ...] = ()


def consistency_ramp(cr, step: int, steps_per_epoch: int, total: int) -> float:
    """The ramp factor of the consistency weight at a stage step. "epoch" (CR-ILD): epoch / E with the epoch
    counted from 0, as the reference's `args.epoch` (so the first epoch has no consistency term); "step":
    step / total steps."""
    if cr.ramp == "epoch":
        epochs = math.ceil(total / steps_per_epoch)
        return (step // steps_per_epoch) / epochs
    return step / total


class StageLosses:
    """Which features a stage reads from each model, and the weighted sum of its terms."""

    def __init__(self, stage: ResolvedStage, student: nn.Module, teacher: nn.Module | None, n_student: int):
        self.stage = stage
        self.n_student = n_student
        self.needs_teacher = needs_teacher(t.name for t in stage.losses)
        s_names = feature_names(stage.losses, "student", family_of(student))
        if stage.consistency is not None:  # consistency compares the student's last layer, mixed vs clean
            s_names |= consistency_features(stage.consistency, n_student, student)
        self.t_features: list[str] = []  # what the teacher output cache keeps
        if teacher is not None:
            self.t_features = sorted(feature_names(stage.losses, "teacher", family_of(teacher)))
        self.s_hidden = bool(layers_of(s_names, "hidden"))
        self.t_hidden = bool(layers_of(self.t_features, "hidden"))
        self.s_tap = tap_features(student, s_names)
        self.t_tap = None
        if teacher is not None and self.needs_teacher:
            self.t_tap = tap_features(teacher, self.t_features)
        self.projections = self._projections(student, teacher)

    def _projections(self, student: nn.Module, teacher: nn.Module | None) -> nn.ModuleDict:
        """One learned W per projected term, shared by its mapped layers (TinyBERT's `fit_dense`): when the
        term asks for it (`projection`, the TinyBERT/PKD presets) or when the widths differ for a loss the
        menu projects then (hidden_mse).
        Initialised as the reference's: normal(0, initializer_range) weights, zero bias."""
        proj = nn.ModuleDict()
        if teacher is None:
            return proj
        ds, dt = student.config.hidden_size, teacher.config.hidden_size
        for term in self.stage.losses:
            info = LOSS_MENU[term.name]
            wanted = term.projection and "projection" in info.options
            if wanted or (info.projects_when_widths_differ and ds != dt):
                linear = nn.Linear(ds, dt)
                nn.init.normal_(linear.weight, mean=0.0, std=student.config.initializer_range)
                nn.init.zeros_(linear.bias)
                proj[term.name] = linear
        return proj

    def project(self, name: str, h: Tensor) -> Tensor:
        return self.projections[name](h) if name in self.projections else h

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
        return cache.fetch(batch, lambda: forward_features(model, batch, self.t_tap, self.t_hidden))

    def terms(self, s: Features, t: Features | None, labels: Tensor | None,
              include_labelled: bool = True) -> dict[str, Tensor]:
        """Unweighted value of every configured term (`include_labelled=False`: without those that read gold
        labels, as on mixup inputs)."""
        out = {}
        for term in self.stage.losses:
            if LOSS_MENU[term.name].reads_labels and not include_labelled:
                continue
            out[term.name] = term_loss(term.name, s, t, term.layer_pairs, temperature=term.temperature,
                                       relations=term.relations, labels=labels, project=self.project)
        return out

    def weighted(self, values: dict[str, Tensor]) -> Tensor:
        weights = {t.name: t.weight for t in self.stage.losses}
        return sum(weights[k] * v for k, v in values.items() if k in weights)

    def consistency(self, s_mix: Features, s_clean: Features, lam: float) -> Tensor:
        """CR-ILD: lam * D(S_mix, S_clean) + (1 - lam) * D(S_mix, S_clean_rev) on the student's last layer,
        D the sum of the configured distances. As in the reference, each comparison is made on the target
        example's own tokens: both attention distributions over its valid keys, rows and tokens its valid ones."""
        pairs = [(self.n_student, self.n_student)]
        names = consistency_losses(self.stage.consistency)

        def d(target: Features) -> Tensor:
            mixed = replace(s_mix, attention_mask=target.attention_mask)
            return sum(term_loss(n, mixed, target, pairs) for n in names)

        return lam * d(s_clean) + (1 - lam) * d(s_clean.flipped())

    def close(self) -> None:
        self.s_tap.remove()
        if self.t_tap is not None:
            self.t_tap.remove()


def step_terms(stage: ResolvedStage, losses: StageLosses, student: nn.Module, teacher: nn.Module | None,
               ema: nn.Module | None, batch: dict, progress: float, cache: TeacherCache | None = None
               ) -> tuple[dict[str, tuple[float, Tensor]], float]:
    """The weighted terms of one training step, {name: (weight, value)}, and the mixup lambda (1 without).
    `progress`: the consistency ramp factor (`consistency_ramp`)."""
    weights = {term.name: term.weight for term in stage.losses}
    if not stage.mixup:
        t = losses.teacher(teacher, batch, cache=cache)
        s = losses.student(student, batch)
        return {k: (weights[k], v) for k, v in losses.terms(s, t, batch["labels"]).items()}, 1.0
    # CR-ILD mixup: teacher and student both see the mixed embeddings, attention mask = union.
    lam = float(np.random.beta(1.0, 1.0))
    lam = max(lam, 1.0 - lam)
    union = batch["attention_mask"] | batch["attention_mask"].flip(0)
    with embedding_mixup(teacher, lam):
        t = losses.teacher(teacher, batch, union)
    with embedding_mixup(student, lam):
        s = losses.student(student, batch, union)
    out = {k: (weights[k], v) for k, v in losses.terms(s, t, None, include_labelled=False).items()}
    cr = stage.consistency
    if cr is not None:
        clean = clean_student_features(losses, student, ema, batch)
        # w * ramp: CR-ILD's w * epoch / E (see consistency_ramp)
        out["consistency"] = (cr.weight * progress, losses.consistency(s, clean, lam))
    return out, lam


@torch.no_grad()
def clean_student_features(losses: StageLosses, student: nn.Module, ema: nn.Module | None, batch: dict
                           ) -> Features:
    """The consistency target: the student (or its EMA copy) on the clean batch, without dropout or gradient."""
    target = ema if ema is not None else student
    was_training = target.training
    target.eval()
    if ema is not None:
        names = consistency_features(losses.stage.consistency, losses.n_student, ema)
        tap = tap_features(ema, names)
        clean = forward_features(ema, batch, tap, bool(layers_of(names, "hidden")))
        tap.remove()
    else:
        clean = losses.student(student, batch)
    target.train(was_training)
    return clean


def check_terms(values: dict[str, tuple[float, Tensor]], stage: ResolvedStage) -> None:
    """Refuse silently dead terms: every configured term must have a value that depends on the student."""
    for term in stage.losses:
        if term.name not in values:
            raise TrialSetupError(f"stage '{stage.name}': loss term '{term.name}' produced no value")
        _, v = values[term.name]
        if not v.requires_grad:
            raise TrialSetupError(f"stage '{stage.name}': loss term '{term.name}' does not depend on the student "
                                  "(no gradient path), so it would never contribute")


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(p.detach(), alpha=1 - decay)
