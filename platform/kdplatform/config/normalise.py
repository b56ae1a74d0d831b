"""Settings that have no effect in a trial are set back to their defaults, with a note when the file set them.

So two trials that compute the same thing hash the same (dedupe finds them), and the researcher is told
which settings were ignored. Each rule says when a setting is read; outside that it is a no-op.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from kdplatform.config.presets import Preset
from kdplatform.config.schema import DataConfig, TrialConfig


def normalise_no_ops(cfg: TrialConfig, preset: Preset) -> tuple[TrialConfig, list[str]]:
    """A copy of `cfg` with every no-op setting at its default, and one note per explicitly set one."""
    notes: list[str] = []
    student = _reset(cfg.student, _student_no_ops(cfg), "student", notes)
    data = _reset(cfg.data, _data_no_ops(cfg, preset), "data", notes)
    teacher = cfg.teacher
    if cfg.teacher.checkpoint:
        why = "when teacher.checkpoint is set (the teacher is not fine-tuned)"
        teacher = _reset(cfg.teacher, {"finetune": why, "seed": why}, "teacher", notes)
    return cfg.model_copy(update={"student": student, "data": data, "teacher": teacher}), notes


def _student_no_ops(cfg: TrialConfig) -> dict[str, str]:
    out = {}
    if cfg.bits == 32:
        why = "at bits 32 (weights are not quantized)"
        out = {"quantize_embeddings": why, "weight_clip": why, "two_bit": why}
    elif cfg.bits != 2:
        out["two_bit"] = f"at bits {cfg.bits} (it chooses the 2-bit quantizer)"
    if cfg.act_bits == 32:
        out["act_clip"] = "at act_bits 32 (activations are not quantized)"
    return out


def _data_no_ops(cfg: TrialConfig, preset: Preset) -> dict[str, str]:
    out = {}
    supplementary = any(s.supplementary for s in preset.stages)
    if not supplementary and cfg.method != "custom":
        out["supplementary_tasks"] = f"on method {cfg.method} (it has no supplementary stage)"
    if not supplementary or not cfg.data.supplementary_tasks:
        out["supplementary_examples"] = "without supplementary tasks"
    if not cfg.data.max_train_examples and not cfg.data.label_noise:
        out["subsample_seed"] = "without max_train_examples or label_noise (nothing is drawn)"
    return out


# subsample_seed's no-op value is the neutral one ("fixed"): "run" and "fixed" are the same when nothing is
# drawn, and the neutral value keeps the hash of every trial that draws nothing (see trial.NEUTRAL_VALUES).
_NO_OP_VALUE = {(DataConfig, "subsample_seed"): "fixed"}


def _reset(section: BaseModel, no_ops: dict[str, str], name: str, notes: list[str]) -> Any:
    """`section` with the `no_ops` fields at their no-op values; a note for each one the file set."""
    if not no_ops:
        return section
    fresh = type(section)()
    update = {}
    for field, why in no_ops.items():
        value = _NO_OP_VALUE.get((type(section), field), getattr(fresh, field))
        if getattr(section, field) != value:
            update[field] = value
        if field in section.model_fields_set:  # the file says it: tell the researcher it does nothing here
            notes.append(f"{name}.{field} has no effect {why} (set to its default)")
    return section.model_copy(update=update) if update else section

