"""The resolved trial (what the worker runs), its config hash and its MLflow params.

Config hash policy: the hash is of exactly the settings that take effect.
- Settings that have no effect are normalised to their defaults by `resolve.py` before hashing (with a note),
  so a no-op setting never makes an identical trial look new.
- Spellings of the same layer map (`[3, 6]`, `'1:3,2:6'` and `uniform` on a 2-layer student of a 6-layer
  teacher) are written one way by `resolve.py` before hashing (`layer_map.canonical_layer_map`).
- What does not change results is left out: the experiment name, the tracking store, the run-name suffix,
  which trained models are kept (`output`), where the GLUE files sit, device, compile and the teacher
  cache's size bound.
- A setting added after hashes were first published is left out of the hashed dict while it holds its
  neutral value (the value that keeps the earlier behaviour): see `NEUTRAL_VALUES`. So adding a setting
  whose default keeps today's behaviour changes no existing hash.
- When a loss or quantizer changes its definition, `DEFINITION_CHANGES` says which trials it affects; only
  those get a `definitions` entry in their hashed dict, so earlier runs of unchanged methods stay "done".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, field_serializer

from kdplatform.config.layer_map import layer_map_label
from kdplatform.config.models import model_width
from kdplatform.config.schema import (REGRESSION_TASKS, DataConfig, OutputConfig, SpeedConfig, StudentConfig,
                                     TeacherConfig)
from kdplatform.loss_menu import LOSS_MENU, needs_teacher, trains_head

# What does not change results: left out of the config hash.
NOT_HASHED = {"name", "tracking_uri", "run_suffix", "output"}  # output: which models are kept
# The teacher cache's storage precision that every hash before it was hashed assumed.
NEUTRAL_TEACHER_OUTPUTS = "float16"


class ResolvedLoss(BaseModel):
    name: str
    weight: float
    layer_map: str | None = None  # label of the spec, for params
    layer_pairs: list[tuple[int, int]] = []
    temperature: float = 1.0
    relations: list[str] = []
    # hidden_mse / pkd: learn a randomly initialised projection of student states (the reference's fit_dense)
    # even at equal widths; False: project only when the widths differ
    projection: bool = False


class ResolvedConsistency(BaseModel):
    weight: float
    losses: list[str]  # D = sum of these on the student's last layer (attention_kl, hidden_mse, relation_kl)
    ramp: str  # "epoch": weight * epoch / E (paper); "step": weight * step / total steps
    target: str
    ema_decay: float | None = None  # only with target "ema"


class ResolvedStage(BaseModel):
    name: str
    losses: list[ResolvedLoss]
    epochs: int
    max_steps: int | None
    lr: float
    batch_size: int
    warmup: float
    weight_decay: float
    max_grad_norm: float | None
    eval_every: int
    mixup: bool = False
    supplementary: bool = False
    consistency: ResolvedConsistency | None = None

    @property
    def predicts(self) -> bool:
        """Whether this stage trains the prediction head (task metrics are meaningful)."""
        return trains_head(t.name for t in self.losses)

    @property
    def reads_teacher_cache(self) -> bool:
        """Teacher outputs come from the cache in stages without mixup (mixup changes the teacher's input)."""
        return not self.mixup and needs_teacher(t.name for t in self.losses)


class ResolvedTrial(BaseModel):
    """One fully resolved trial: what the worker runs. Unused axes are None (collapsed)."""

    name: str
    tracking_uri: str | None
    task: str
    method: str
    layer_map: str | list[int] | None
    consistency_weight: float | None
    bits: int
    act_bits: int
    map_coeff: float | None
    output_coeff: float | None
    seed: int
    data: DataConfig
    teacher: TeacherConfig
    student: StudentConfig
    student_layers: int
    teacher_layers: int
    train: list[ResolvedStage]
    speed: SpeedConfig = SpeedConfig()
    output: OutputConfig = OutputConfig()
    run_suffix: str = ""  # grid values of dotted axes (e.g. 'train.pred.lr=0.0001'), so run names differ

    @field_serializer("tracking_uri")
    def _without_credentials(self, uri: str | None) -> str | None:
        """Dumps (config.yaml artifacts, Ray trial configs) never carry a password from the URI."""
        from kdplatform.tracking import redact

        return redact(uri) if uri else uri

    def uses_changed_loss(self, change: str) -> bool:
        """Whether a loss term of this trial is one the recorded definition change `change` concerns (the
        loss menu's `definition_changes`)."""
        return any(change in LOSS_MENU[t.name].definition_changes for s in self.train for t in s.losses)

    def hashed_dict(self) -> dict[str, Any]:
        """The settings that take effect, as hashed (see the module docstring for the policy)."""
        d = self.model_dump(mode="json", exclude=NOT_HASHED)
        d["data"].pop("glue_dir", None)  # where the same files sit does not change the trial
        speed = d.pop("speed")  # device, compile and the cache's size bound do not change results
        if speed["precision"] != "auto":
            d["precision"] = speed["precision"]
        outputs = self.teacher_outputs_dtype
        if outputs not in (None, NEUTRAL_TEACHER_OUTPUTS):
            d["teacher_outputs"] = outputs
        _drop_neutral(d)
        versions = definition_versions(self)
        if versions:
            d["definitions"] = versions
        return d

    @property
    def teacher_outputs_dtype(self) -> str | None:
        """Precision of the teacher outputs training reads: None when no stage reads the teacher cache."""
        if not any(s.reads_teacher_cache for s in self.train):
            return None
        cache = self.speed.teacher_cache
        return cache.dtype if cache.enabled else "float32"

    @property
    def cfg_hash(self) -> str:
        return digest(self.hashed_dict())

    @property
    def teacher_hash(self) -> str:
        return teacher_hash(self)

    @property
    def stages_label(self) -> str:
        """What the trial trains, for tables: 'ild[relation_kl+mixup+consistency] -> pred[logit_kd]'."""
        return " -> ".join(f"{s.name}[{'+'.join(x.name for x in s.losses)}{'+mixup' if s.mixup else ''}"
                           f"{'+consistency' if s.consistency else ''}]" for s in self.train)

    @property
    def run_name(self) -> str:
        parts = [self.task, self.method]
        if self.layer_map is not None:
            parts.append(layer_map_label(self.layer_map))
        if self.consistency_weight is not None:
            parts.append(f"w{self.consistency_weight:g}")
        if self.map_coeff is not None:
            parts.append(f"m{self.map_coeff:g}o{self.output_coeff:g}")
        parts += [f"b{self.bits}" + (f"a{self.act_bits}" if self.act_bits != 32 else ""), f"s{self.seed}"]
        return "/".join(parts) + (f"/{self.run_suffix}" if self.run_suffix else "")

    def flat_params(self) -> dict[str, str]:
        """Params for MLflow: dotted keys, stages by name, loss terms by name."""
        d = self.model_dump(mode="json", exclude={"tracking_uri", "train"})
        out = _flatten(d)
        for st in self.train:
            head = f"train.{st.name}"
            for k, v in st.model_dump(mode="json", exclude={"losses", "name", "consistency"}).items():
                out[f"{head}.{k}"] = v
            if st.consistency:
                out.update(_flatten(st.consistency.model_dump(), f"{head}.consistency"))
            for t in st.losses:
                out.update(_flatten(t.model_dump(mode="json", exclude={"name"}), f"{head}.loss.{t.name}"))
        out["cfg_hash"] = self.cfg_hash
        out["teacher_hash"] = self.teacher_hash
        return {k: ("" if v is None else str(v))[:6000] for k, v in out.items()}


# Settings added after the first hashes: left out of the hashed dict while they hold these values (the
# behaviour before they existed). Add an entry with each new setting whose default keeps today's behaviour.
NEUTRAL_VALUES = {
    ("data", "subsample_seed"): "fixed",  # before: one subset (data seed 0) for every run
    ("loss", "projection"): False,  # before: hidden_mse projected only when the widths differ
    ("data", "hub_dataset"): None,  # before: GLUE from the folder or nyu-mll/glue only
}


def _drop_neutral(d: dict[str, Any]) -> None:
    for (section, key), neutral in NEUTRAL_VALUES.items():
        if section == "loss":
            for stage in d["train"]:
                for term in stage["losses"]:
                    if term.get(key) == neutral:
                        term.pop(key)
        elif d[section].get(key) == neutral:
            d[section].pop(key)


REGRESSION_HEAD_START = "regression_head_start"


@dataclass(frozen=True)
class DefinitionChange:
    """A loss or quantizer whose definition changed: it enters the hash only of the trials it affects."""

    name: str
    version: int
    affects: Callable[[ResolvedTrial], bool]
    summary: str


DEFINITION_CHANGES: tuple[DefinitionChange, ...] = (
    DefinitionChange("pkd", 2, lambda t: t.uses_changed_loss("pkd"),
                     "pkd averages over the mapped layers (the reference), it summed before"),
    DefinitionChange("logit_kd", 2, lambda t: t.task in REGRESSION_TASKS and t.uses_changed_loss("logit_kd"),
                     "regression logit KD is MSE(z_s/T, z_t/T) without T^2 (the CR-ILD reference)"),
    DefinitionChange("quantized_attention_maps", 2,
                     lambda t: t.act_bits < 32 and t.uses_changed_loss("quantized_attention_maps"),
                     "attention map/score losses read the maps of the quantized Q and K (KD-QAT reference)"),
    DefinitionChange("weights_4bit", 2, lambda t: t.bits == 4, "4-bit weights use the KD-QAT reference quantizer"),
    DefinitionChange("attention_probs_after_dropout", 2, lambda t: t.act_bits < 32,
                     "quantized activations: attention probabilities are quantized after dropout (the reference)"),
    DefinitionChange("embeddings_8bit", 2, lambda t: t.bits == 8 and t.student.quantize_embeddings,
                     "8-bit quantized word embeddings use the per-row TWN-scaled grid (the reference)"),
    DefinitionChange("hidden_projection", 2, lambda t: builds_projection(t),
                     "the hidden-state projection is one linear shared by the mapped layers, normal-initialised"),
    DefinitionChange(REGRESSION_HEAD_START, 2,
                     lambda t: t.task in REGRESSION_TASKS and t.student.init != "teacher_copy",
                     "a new regression head's bias starts at the training labels' mean (it started at 0)"),
)


def widths_may_differ(trial: ResolvedTrial) -> bool:
    """Whether student and teacher hidden widths may differ: a student of another model whose width is
    not known to equal the teacher's (truncate / teacher_copy students have the teacher's width)."""
    if trial.student.init in ("truncate", "teacher_copy"):
        return False
    student = model_width(trial.student.init)
    teacher = model_width(trial.teacher.checkpoint or trial.teacher.model)
    return student is None or teacher is None or student != teacher


def builds_projection(trial: ResolvedTrial) -> bool:
    """Whether a stage learns a projection of student hidden states: a term that asks for one, or a loss the
    menu projects when the widths differ (hidden_mse) while they (may) differ."""
    terms = [t for s in trial.train for t in s.losses]
    return any(t.projection for t in terms) or (any(LOSS_MENU[t.name].projects_when_widths_differ for t in terms)
                                                and widths_may_differ(trial))


def definition_versions(trial: ResolvedTrial) -> dict[str, int]:
    """name -> version of every changed definition this trial uses (empty for trials none affects)."""
    return {c.name: c.version for c in DEFINITION_CHANGES if c.affects(trial)}


def teacher_hash(trial: Any) -> str:
    """What determines a fine-tuned teacher: task, model, fine-tune settings, seed and the train data.

    With `data.subsample_seed: run` the teacher draws its subset with its own seed (teacher.seed), as the
    reference fine-tunes the teacher in a run of its own."""
    if trial.teacher.checkpoint:
        return digest({"checkpoint": str(Path(trial.teacher.checkpoint).resolve())})
    data = trial.data.model_dump(mode="json", include={"source", "max_train_examples", "label_noise",
                                                       "max_seq_length", "subsample_seed"})
    if trial.data.hub_dataset:  # other data: another teacher (unset, the hash is unchanged)
        data["hub_dataset"] = trial.data.hub_dataset
    if data["subsample_seed"] == NEUTRAL_VALUES[("data", "subsample_seed")] or not (
            data["max_train_examples"] or data["label_noise"]):
        data.pop("subsample_seed")
    fields = {"task": trial.task, "model": trial.teacher.model, "seed": trial.teacher.seed,
              "finetune": trial.teacher.finetune.model_dump(mode="json"), "data": data}
    if trial.task in REGRESSION_TASKS:  # its new head starts at the label mean: not the teachers cached before
        fields["definitions"] = {REGRESSION_HEAD_START: 2}
    return digest(fields)


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out
