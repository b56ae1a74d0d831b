"""The YAML schema (pydantic v2): what a trial or sweep file may say, with types and ranges.

Only the shape and ranges of single values are checked here; combinations (a layer map against both
depths, options a loss does not read, settings that have no effect) are checked in `resolve.py`.
"""

from __future__ import annotations

import re
import typing
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictInt, ValidationInfo, field_validator,
                      model_validator)

from kdplatform.config.presets import METHOD_NAMES
from kdplatform.loss_menu import DEFAULT_CONSISTENCY_LOSSES, LOSS_MENU, consistency_losses
from kdplatform.task_table import REGRESSION_TASKS, TASK_NAMES

WEIGHT_BITS = (2, 4, 8, 32)
AXES = ("task", "method", "layer_map", "consistency_weight", "bits", "act_bits", "map_coeff", "output_coeff")
DEFAULT_MAX_TRIALS = 5000
MAX_TRIALS_LIMIT = 20_000  # expanding and resolving takes about 1 ms per trial: a bound of ~20 s
# numpy, torch and Python's random all take seeds in [0, 2^32)
Seed = Annotated[int, Field(ge=0, lt=2**32)]
# Experiment names are printed (rich), used in MLflow filter strings and stored in a 256-character column.
MAX_NAME_LENGTH = 250


def _usable_path(v: str) -> str:
    """A name or path the file system can look up (Linux: 4096 bytes, 255 per folder name); longer ones made
    every later lookup raise."""
    if len(v.encode()) > 4096 or any(len(part.encode()) > 255 for part in v.split("/")):
        raise ValueError("too long for a path (at most 4096 bytes, 255 per folder or file name)")
    if "\0" in v:
        raise ValueError("a path cannot hold a NUL character")
    return v


PathText = Annotated[str, AfterValidator(_usable_path)]  # a model name, hub id or local folder
NAME_PATTERN = re.compile(r"[\w][\w .,:;+=@()/#%-]*")


class Strict(BaseModel):
    # inf and nan pass `gt=0` checks and only crash training later
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False, strict=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        """YAML reads true/false/yes/no/on/off as booleans, and pydantic would take them as 1/0."""
        values = v if isinstance(v, list) else [v]
        if any(isinstance(x, bool) for x in values) and not _takes_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError("YAML reads true/false/yes/no/on/off as a boolean, which this setting does not take")
        return v


def _takes_bool(annotation: Any) -> bool:
    """Whether a field's type admits a boolean anywhere (bool, Any, or a union / list holding one)."""
    if annotation is bool or annotation is Any:
        return True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True  # a section: its own fields check their values
    return any(_takes_bool(a) for a in typing.get_args(annotation) if not isinstance(a, (int, str, float)))


class DataConfig(Strict):
    source: Literal["auto", "hub", "glue_dir"] = "auto"
    glue_dir: PathText | None = None  # or env KDP_GLUE_DIR; `auto` uses it when set, else the hub
    # read through the `datasets` library instead: a dataset id on the hub (GLUE's column names for the task),
    # a local `save_to_disk` folder (DatasetDict with train / validation splits) or parquet files
    hub_dataset: PathText | None = None
    max_train_examples: int | None = Field(None, gt=0)  # deterministic downsample (CR-ILD 1k setting)
    max_dev_examples: int | None = Field(None, gt=0)
    train_eval_examples: int = Field(512, gt=0)  # fixed train subset scored at every eval (overfitting view)
    label_noise: float = Field(0.0, ge=0.0, lt=1.0)  # flip a train label to another class with this prob.
    max_seq_length: int = Field(128, ge=8, le=512)
    supplementary_tasks: list[Literal[TASK_NAMES]] = []  # type: ignore[valid-type]
    supplementary_examples: int | None = Field(None, gt=0)  # cap per supplementary task
    # Which seed draws the downsampled subset and the flipped labels: "run" = the run's seed (the CR-ILD
    # reference: each run shuffles and keeps the first N; the teacher draws with teacher.seed), "fixed" = one
    # subset for every seed (data seed 0). No effect without max_train_examples or label_noise.
    subsample_seed: Literal["fixed", "run"] = "run"


class FinetuneConfig(Strict):
    epochs: int = Field(3, gt=0)
    max_steps: int | None = Field(None, gt=0)
    lr: float = Field(2e-5, gt=0)
    batch_size: int = Field(32, gt=0)
    warmup: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    eval_every: int = Field(0, ge=0)  # 0: once per epoch


class TeacherConfig(Strict):
    model: PathText = "bert-base-uncased"
    checkpoint: PathText | None = None  # a ready fine-tuned checkpoint folder: skips fine-tuning
    finetune: FinetuneConfig = FinetuneConfig()
    seed: Seed = 42


class StudentConfig(Strict):
    init: PathText = "truncate"  # truncate | teacher_copy | a model name or path
    layers: int | None = Field(None, gt=0)  # truncate: bottom N layers; None = the teacher's depth
    quantize_embeddings: bool = False  # KD-QAT: word embeddings ternarised per row
    two_bit: Literal["ternary", "uniform"] = "ternary"  # bits: 2 = TWN ternary (KD-QAT) or 4-level uniform
    weight_clip: float = Field(2.5, gt=0)  # +-clip of weights before quantization (KD-QAT: 2.5)
    act_clip: float = Field(2.5, gt=0)  # +-clip of activations (KD-QAT: 2.5; raise it for models with large Q/K)


class LossTermConfig(Strict):
    name: str  # a loss of the menu (checked when validated, so an entry added to the menu is accepted at once)
    weight: float = Field(1.0, gt=0)  # zero would be a term that never contributes: rejected
    layer_map: str | list[StrictInt] | None = None  # None: the trial's layer_map axis
    temperature: float = Field(1.0, gt=0)
    relations: list[Literal["q", "k", "v"]] = ["q", "k", "v"]
    include_embeddings: bool = False
    # hidden_mse / pkd: True = learn a randomly initialised linear projection of the student's states before
    # the loss (the reference's fit_dense), False = project only when the widths differ; None = the preset's
    projection: bool | None = None

    @field_validator("name")
    @classmethod
    def _on_the_menu(cls, v: str) -> str:
        if v not in LOSS_MENU:
            raise ValueError(f"unknown loss '{v}': use one of {', '.join(LOSS_MENU)} (`kdplatform losses`)")
        return v


class ConsistencyConfig(Strict):
    """CR-ILD's consistency term D(student on mixed input, student on clean input), on the last layer.

    Default = the paper (and the reference's unused code): attention KL + hidden-state MSE, ramped by epoch.
    `relation_kl` (Q/K/V relations) and `ramp: step` (per optimizer step) are kdplatform's options."""

    losses: list[str] = Field(default_factory=lambda: list(DEFAULT_CONSISTENCY_LOSSES), min_length=1)
    ramp: Literal["epoch", "step"] = "epoch"  # weight * epoch / E (paper), or * step / total steps
    target: Literal["no_grad", "ema"] = "no_grad"
    ema_decay: float = Field(0.999, gt=0, lt=1)

    @field_validator("losses")
    @classmethod
    def _consistency_losses(cls, v: list[str]) -> list[str]:
        allowed = consistency_losses()
        for name in v:
            if name not in allowed:
                raise ValueError(f"'{name}' is not a consistency distance: use {', '.join(allowed)}")
        return v


class StageConfig(Strict):
    """Overrides for one stage of the method (matched by name), or a full stage for `method: custom`."""

    name: str
    losses: list[LossTermConfig] | None = None
    epochs: int | None = Field(None, gt=0)
    max_steps: int | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)
    warmup: float | None = Field(None, ge=0, le=1)
    weight_decay: float | None = Field(None, ge=0)
    max_grad_norm: float | None = Field(None, gt=0)
    eval_every: int | None = Field(None, ge=0)
    mixup: bool | None = None
    consistency: ConsistencyConfig | None = None


class TeacherCacheConfig(Strict):
    """Teacher outputs computed once per (teacher, example set, precision) and reused across epochs and trials
    (`<KDP_CACHE_DIR>/teacher_outputs`, memory-mapped, least-recently-used entries evicted past `max_gb`).
    Stages with mixup never use it (the teacher's input changes every step)."""

    enabled: bool = True
    max_gb: float = Field(20.0, gt=0)  # bound on the whole teacher_outputs folder
    # storage of the cached outputs: float16 halves the bytes at the same dev accuracy (benchmarks/README.md);
    # a feature that overflows float16 is not cached. float32 reproduces a run without the cache exactly.
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    # how a complete cache gives outputs back: timed times a few reads against the teacher forward they replace
    # and keeps the faster (on a GPU the forward can beat reading many per-token features from host memory);
    # auto is timed on a GPU and read on a CPU (there a read measured 35-200x faster than a MiniLM-L6 forward,
    # and timing cost 5-8% of a short run); read / recompute fix it. Values are the same up to float rounding
    # either way (not in the cfg hash).
    source: Literal["auto", "timed", "read", "recompute"] = "auto"


class SpeedConfig(Strict):
    """How a trial runs. `precision` and the teacher cache's `dtype` (when a stage reads the cache) change
    numbers and enter the cfg hash; device, compile and the cache's size bound do not."""

    # auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), fp32 for quantized
    # students and elsewhere; the teacher fine-tune always runs fp32
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available
    compile: bool = False  # torch.compile the student (dynamic shapes)
    teacher_cache: TeacherCacheConfig = TeacherCacheConfig()


class OutputConfig(Strict):
    """What a finished student trial keeps: its best-dev student, also the last one, or none (MLflow artifacts
    `model/best/`, `model/last/`). Does not change results: left out of the config hash."""

    keep_models: Literal["none", "best", "best+last"] = "best"


class TrialConfig(Strict):
    name: str = Field("kdplatform", min_length=1, max_length=MAX_NAME_LENGTH)  # the MLflow experiment
    tracking_uri: str | None = None
    task: Literal[TASK_NAMES] = "sst2"  # type: ignore[valid-type]
    method: Literal[METHOD_NAMES] = "kd"  # type: ignore[valid-type]
    layer_map: str | list[StrictInt] | None = None  # None: the method's default
    consistency_weight: float | None = Field(None, ge=0)
    bits: Literal[WEIGHT_BITS] = 32  # type: ignore[valid-type]
    act_bits: int = 32
    map_coeff: float | None = Field(None, ge=0)
    output_coeff: float | None = Field(None, ge=0)
    seed: Seed = 42
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    train: list[StageConfig] = []
    speed: SpeedConfig = SpeedConfig()
    output: OutputConfig = OutputConfig()

    @field_validator("name")
    @classmethod
    def _printable_name(cls, v: str) -> str:
        if not NAME_PATTERN.fullmatch(v):
            raise ValueError("an experiment name takes letters, digits, spaces and . , : ; + = @ ( ) / # % _ -, "
                             "starting with a letter or digit (no brackets, quotes or control characters)")
        return v

    @field_validator("act_bits")
    @classmethod
    def _act_bits(cls, v: int) -> int:
        if v != 32 and not 2 <= v <= 16:
            raise ValueError("act_bits must be 32 (off) or between 2 and 16")
        return v


class SearchDimension(Strict):
    """One sampled axis of `search.space`: a float range, an integer range or a list of choices."""

    type: Literal["uniform", "loguniform", "randint", "choice"]
    low: float | None = None
    high: float | None = None  # randint: exclusive, as in Ray
    values: list[Any] | None = None  # choice: scalars only (Optuna stores categorical values)

    @model_validator(mode="after")
    def _check(self) -> SearchDimension:
        if self.type == "choice":
            if not self.values or self.low is not None or self.high is not None:
                raise ValueError("type 'choice' takes a non-empty `values` list and no low/high")
            if any(isinstance(v, (list, dict)) for v in self.values):
                raise ValueError("choice values must be scalars (write a layer map as a string such as "
                                 "'2,4,6')")
        else:
            if self.low is None or self.high is None or self.values is not None:
                raise ValueError(f"type '{self.type}' takes `low` and `high` (and no values)")
            if not self.low < self.high:
                raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError("loguniform needs low > 0")
        return self


class SearchConfig(Strict):
    """Optuna sampling on top of the grid: each sample picks a grid trial and draws every `space` axis."""

    num_samples: int = Field(..., gt=0)
    metric: str = "dev/best_score"  # a key the worker reports at each eval
    mode: Literal["max", "min"] = "max"
    seed: Seed | None = None  # the sampler's seed (reproducible proposals)
    space: dict[str, SearchDimension] = Field(..., min_length=1)  # axis or dotted key -> distribution


class SchedulerConfig(Strict):
    """ASHA early stopping on a metric the worker reports at each eval."""

    metric: str = "dev/score"
    mode: Literal["max", "min"] = "max"
    time_attr: Literal["step", "training_iteration"] = "step"  # training_iteration counts evals
    grace_period: int = Field(100, gt=0)
    reduction_factor: float = Field(3.0, gt=1)
    max_t: int | None = Field(None, gt=0)  # None: never stop a trial for its length alone
    brackets: int = Field(1, gt=0)


class ResourcesConfig(Strict):
    """Ray resources of one trial; teachers use the same unless teacher_cpu / teacher_gpu say otherwise."""

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)  # fractional (0.25, 0.5) packs several students on one GPU
    teacher_cpu: float | None = Field(None, gt=0)
    teacher_gpu: float | None = Field(None, ge=0)

    @field_validator("gpu", "teacher_gpu")
    @classmethod
    def _whole_above_one(cls, v: float | None) -> float | None:
        if v is not None and v > 1 and v != int(v):
            raise ValueError("more than one GPU must be a whole number (fractions only below 1)")
        return v


class ConditionalOverride(Strict):
    """Settings applied to the trials whose resolved values match `when` (after the grid is applied)."""

    when: dict[str, Any] = Field(..., min_length=1)  # setting key -> value (all must match)
    set: dict[str, Any] = Field(..., min_length=1)  # setting key -> value

    @model_validator(mode="after")
    def _keys(self) -> ConditionalOverride:
        for key in [*self.when, *self.set]:
            if not is_setting_key(key):
                raise ValueError(f"unknown key '{key}': not a trial setting (write dotted paths such as "
                                 "data.max_seq_length or train.qat.eval_every)")
        return self


def is_setting_key(key: str) -> bool:
    """A top-level trial field or a dotted path to a field (`train.<stage>.<field>` for stages)."""
    parts = key.split(".")
    model: type[BaseModel] = TrialConfig
    if parts[0] == "train" and len(parts) >= 3:
        model, parts = StageConfig, parts[2:]
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if i < len(parts) - 1:  # a section (or an optional one, e.g. consistency) to descend into
            subs = [t for t in (field.annotation, *typing.get_args(field.annotation))
                    if isinstance(t, type) and issubclass(t, BaseModel)]
            if not subs:
                return False
            model = subs[0]
    return True


class SweepSpec(TrialConfig):
    seeds: list[Seed] = Field(default_factory=lambda: [42], min_length=1)
    grid: dict[str, list[Any]] = {}
    max_trials: int = Field(DEFAULT_MAX_TRIALS, gt=0, le=MAX_TRIALS_LIMIT)  # refuse larger grids (a typo guard)
    search: SearchConfig | None = None  # Optuna sampling (used by `kdplatform sweep`)
    scheduler: SchedulerConfig | None = None  # ASHA early stopping (used by `kdplatform sweep`)
    resources: ResourcesConfig = ResourcesConfig()  # per-trial Ray resources
    max_concurrent_trials: int | None = Field(None, gt=0)
    max_failures: int = Field(1, ge=0)
    # settings that depend on others: [{when: {task: cola}, set: {data.max_seq_length: 64}}]
    # (each is checked against every trial: the bound keeps that to seconds at MAX_TRIALS_LIMIT trials)
    overrides: list[ConditionalOverride] = Field([], max_length=200)
    source_file: str | None = Field(None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _seed_or_seeds(cls, data: Any) -> Any:
        """Trials take their seeds from `seeds`: a lone `seed:` becomes that list (yaml_io refuses both at once)."""
        if isinstance(data, dict) and "seed" in data and "seeds" not in data:
            data = {**data, "seeds": [data["seed"]]}
        return data
