"""Report pages as YAML: which tables and figures a page holds, and which runs they use.

A dashboard file (see dashboards/*.yaml):

    title: Overfitting view
    description: Train vs dev curves ...      # optional, shown under the title
    order: 20                                 # optional, pages are sorted by it, then by file name
    filters: {method: [ild_last, cr_ild]}     # optional; keys: task, seed, a trial axis or a dotted param;
                                              # values: one value or a list, `*` globs allowed ("kdqat_*")
    items:
      - kind: score_curves                    # see ITEM_KINDS for every kind and its options
        group_by: [method]
      - kind: gap_bars
        metric: distill_loss
        filters: {task: rte}                  # item filters narrow the page filters

`kdplatform report` uses every file of ./dashboards (else the project's dashboards/ folder) unless
`--dashboard` names some (a path, or a name in those folders). Users add pages without code.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kdplatform.report.collect import ReportData, ReportError

FilterValue = Union[str, int, float, list[Union[str, int, float]]]


class _Item(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str | None = None
    filters: dict[str, FilterValue] = {}


class AccuracyTableItem(_Item):
    """Paper table: rows = `rows` axes (default: method + every axis that varies), columns = tasks + Avg."""
    kind: Literal["accuracy_table"]
    name: str = "accuracy"  # the stem of its table files: tables/<page>-<name>.<format>
    rows: list[str] | None = None
    metric: str = "score"
    select: Literal["best", "all"] = "best"
    value: Literal["best", "final"] = "best"  # each run's best dev value, or its last one
    baseline: str | None = "kd"  # method the difference table compares every row with; null: no such table

    @field_validator("name")
    @classmethod
    def _a_file_name(cls, v: str) -> str:
        """It names files in the report folder: a path would write outside tables/ (or fail)."""
        if not v or any(c in v for c in "/\\\0") or v in (".", "..") or v.startswith("."):
            raise ValueError(f"name {v!r} names files in the report's tables/ folder: use letters, digits, '-', "
                             "'_' and '.', without '/', '\\' or a leading '.'")
        return v


class ScoreCurvesItem(_Item):
    """Per task: train and dev `metric` against the step, per group (mean over seeds, std band)."""
    kind: Literal["score_curves"]
    group_by: list[str] = ["method"]
    metric: str = "score"


class DistillLossCurvesItem(_Item):
    """Per task: the distillation loss on train vs dev against the step."""
    kind: Literal["distill_loss_curves"]
    group_by: list[str] = ["method"]


class StageCurvesItem(_Item):
    """Per task and stage, against the step within the stage: the ILD loss on train vs dev during ILD (a
    figure of its own), then the score and the KD loss on train vs dev during prediction KD."""
    kind: Literal["stage_curves"]
    group_by: list[str] = ["method"]


class StageGapBarsItem(_Item):
    """The train-dev gap of each stage's own objective at the end of that stage, per task and group."""
    kind: Literal["stage_gap_bars"]
    group_by: list[str] = ["method"]


class GapBarsItem(_Item):
    """The train-dev gap at the end of training, per task and group, as bars."""
    kind: Literal["gap_bars"]
    group_by: list[str] = ["method"]
    metric: str = "score"


class BitsItem(_Item):
    """Per task: best dev score against weight bits (x: bits) or model size (x: size), per QAT method."""
    kind: Literal["bits"]
    x: Literal["bits", "size"] = "bits"


class HeatmapItem(_Item):
    """Per task and method: mean best dev score over a grid of two axes."""
    kind: Literal["heatmap"]
    x: str = "consistency_weight"
    y: str = "layer_map"


class ParallelCoordinatesItem(_Item):
    """Per task: every varying axis against the best dev score."""
    kind: Literal["parallel_coordinates"]


class ParamImportanceItem(_Item):
    """Per task: fANOVA importance of Optuna-searched params (only when Optuna search was used)."""
    kind: Literal["param_importance"]


class FrontierItem(_Item):
    """Per task: dev score against measured cost (`kdplatform bench`), one point per config, the Pareto front."""
    kind: Literal["frontier"]
    x: Literal["latency", "size"] = "latency"
    format: Literal["onnx_int8", "onnx_fp32", "torch_fp32"] = "onnx_int8"


class FrontierTableItem(_Item):
    """The Pareto-front configs of each task (and the teacher's score) as a table."""
    kind: Literal["frontier_table"]
    name: str = "frontier"
    x: Literal["latency", "size"] = "latency"
    format: Literal["onnx_int8", "onnx_fp32", "torch_fp32"] = "onnx_int8"


Item = Annotated[Union[AccuracyTableItem, ScoreCurvesItem, DistillLossCurvesItem, StageCurvesItem,
                       StageGapBarsItem, GapBarsItem, BitsItem, HeatmapItem, ParallelCoordinatesItem,
                       ParamImportanceItem, FrontierItem, FrontierTableItem], Field(discriminator="kind")]
ITEM_KINDS = ("accuracy_table", "score_curves", "distill_loss_curves", "stage_curves", "stage_gap_bars",
              "gap_bars", "bits", "heatmap", "parallel_coordinates", "param_importance", "frontier",
              "frontier_table")


class Dashboard(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str
    description: str = ""
    order: int = 100
    filters: dict[str, FilterValue] = {}
    items: list[Item] = Field(min_length=1)
    name: str = ""  # the file stem (set on load)
    source: str = ""

    def history_keys(self) -> list[str]:
        """Metric histories the items need (beyond the defaults)."""
        keys: list[str] = []
        for item in self.items:
            metric = getattr(item, "metric", "score")
            if item.kind == "accuracy_table" and metric != "score":
                keys.append(f"dev/{metric}")
            if item.kind in ("score_curves", "gap_bars"):
                keys += [f"train/{metric}", f"dev/{metric}", f"gap/{metric}"]
        return keys


# Fallback copies of dashboards/*.yaml for an installation without the project folder (a test keeps them
# equal to the files).
BUILTIN_DASHBOARDS = {
    "paper_table": """\
title: Accuracy comparison
description: >-
  Best dev score of each run, mean ± std over seeds (x100) with the number of seeds, the teacher and the
  majority-class level as reference rows, best student per column in bold, as in the CR-ILD and KD-QAT
  papers; then each method's difference to the baseline (kd) with a 95% confidence interval. Rows hold
  every axis that varies; for searched params the best config is shown.
order: 10
items:
  - kind: accuracy_table
    baseline: kd
  - kind: accuracy_table
    name: final
    title: Final dev score (last evaluation)
    value: final
    baseline: null
""",
    "overfitting": """\
title: Overfitting view
description: >-
  Per stage, train vs dev of the stage's own objective against the step within the stage: the ILD loss
  during intermediate-layer distillation, the score and the KD loss during prediction KD (dashed = train
  subset, solid = dev). Then the whole run, every run shifted so that its prediction KD starts at the marked
  stage boundary (one-stage kd starts there), with the teacher's dev score and the majority-class level, and
  the gap at the end of each stage. Mean over seeds; bands and bars are one std (none where a single seed
  ran).
order: 20
items:
  - kind: stage_curves
  - kind: score_curves
  - kind: stage_gap_bars
  - kind: gap_bars
    metric: score
""",
    "quantization": """\
title: Quantization (QAT)
description: Best dev score against weight bits and against model size for each QAT method.
order: 30
items:
  - kind: bits
    x: bits
  - kind: bits
    x: size
""",
    "frontier": """\
title: Accuracy-cost frontier
description: >-
  Best dev score of every student config (depth x method x bits, mean over seeds, error bars one std)
  against its measured cost on the machine that ran `kdplatform bench` (see each run's kdp.deploy.* tags:
  CPU, threads, sequence length): batch-1 latency and size on disk of the int8 ONNX export. The dotted line
  is the Pareto front (no other config is both cheaper and better); its points are listed in the tables.
  The dashed line is the teacher's dev score.
order: 50
items:
  - kind: frontier
    x: latency
  - kind: frontier_table
    name: frontier-latency
    x: latency
  - kind: frontier
    x: size
  - kind: frontier_table
    name: frontier-size
    x: size
""",
    "sweep_overview": """\
title: Sweep overview
description: >-
  Consistency weight x layer map, every axis against the best dev score, and the importance of each
  searched parameter when the sweep used Optuna.
order: 40
items:
  - kind: heatmap
    x: consistency_weight
    y: layer_map
  - kind: parallel_coordinates
  - kind: param_importance
""",
}


def _format_error(e: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid dashboard"]
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p in ITEM_KINDS))
        msg = err["msg"]
        if err["type"] == "union_tag_invalid":
            msg = f"unknown kind {err['input'].get('kind')!r}; kinds: {', '.join(ITEM_KINDS)}"
        elif err["type"] == "union_tag_not_found":
            msg = f"an item needs a `kind` ({', '.join(ITEM_KINDS)})"
        lines.append(f"  {loc or '<top>'}: {msg}")
    return "\n".join(lines)


def parse_dashboard(text: str, name: str, source: str) -> Dashboard:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ReportError(f"{source}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ReportError(f"{source}: a dashboard is a mapping with `title` and `items`")
    try:
        dash = Dashboard.model_validate(raw)
    except ValidationError as e:
        raise ReportError(_format_error(e, source)) from e
    dash.name, dash.source = name, source
    return dash


def dashboard_dirs() -> list[Path]:
    """Where dashboard files are looked up: ./dashboards, then the project's dashboards/ folder."""
    project = Path(__file__).resolve().parents[3] / "dashboards"
    dirs = [Path.cwd() / "dashboards", project]
    return [d for i, d in enumerate(dirs) if d.is_dir() and d.resolve() not in [x.resolve() for x in dirs[:i]]]


def load_dashboard(ref: str) -> Dashboard:
    """A dashboard by path or by name (looked up in `dashboard_dirs()`, then the built-ins)."""
    path = Path(ref)
    candidates = [path] if path.suffix in (".yaml", ".yml") or path.exists() else []
    for d in dashboard_dirs():
        candidates += [d / ref, d / f"{ref}.yaml", d / f"{ref}.yml"]
    for c in candidates:
        if c.is_file():
            return parse_dashboard(c.read_text(encoding="utf-8"), c.stem, str(c))
    stem = path.stem if path.suffix in (".yaml", ".yml") else ref
    if stem in BUILTIN_DASHBOARDS and not path.parent.name:
        return parse_dashboard(BUILTIN_DASHBOARDS[stem], stem, f"<builtin {stem}>")
    known = sorted({p.stem for d in dashboard_dirs() for p in d.glob("*.y*ml")} | set(BUILTIN_DASHBOARDS))
    raise ReportError(f"dashboard {ref!r} not found (a YAML path, or one of: {', '.join(known)})")


def default_dashboards() -> list[Dashboard]:
    """Every dashboard of the first dashboards folder found, sorted by `order` then name; the built-ins
    when there is none."""
    for d in dashboard_dirs():
        files = sorted(p for p in d.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        if files:
            dashes = [parse_dashboard(p.read_text(encoding="utf-8"), p.stem, str(p)) for p in files]
            return sorted(dashes, key=lambda x: (x.order, x.name))
    dashes = [parse_dashboard(t, n, f"<builtin {n}>") for n, t in BUILTIN_DASHBOARDS.items()]
    return sorted(dashes, key=lambda x: (x.order, x.name))


def load_dashboards(refs: list[str] | None) -> list[Dashboard]:
    if not refs:
        return default_dashboards()
    return [load_dashboard(r) for r in refs]


# ------------------------------------------------------------------------------------------- filters
def filter_column(key: str, runs: pd.DataFrame) -> str | None:
    for col in (key, f"params.{key}"):
        if col in runs.columns:
            return col
    return None


def apply_filters(data: ReportData, *filter_sets: dict[str, Any]) -> tuple[ReportData, list[str]]:
    """Runs matching every filter (values: one or a list, `*`/`?` globs); notes for unknown keys."""
    mask = pd.Series(True, index=data.runs.index)
    notes = []
    for filters in filter_sets:
        for key, want in filters.items():
            col = filter_column(key, data.runs)
            if col is None:
                notes.append(f"filter {key!r}: no run has this axis or param")
                mask &= False
                continue
            wants = [str(w) for w in (want if isinstance(want, list) else [want])]
            values = data.runs[col].fillna("").astype(str)
            hit = pd.Series(False, index=values.index)
            for w in wants:
                hit |= values.map(lambda v, w=w: fnmatch.fnmatchcase(v, w)) if any(ch in w for ch in "*?[") \
                    else values == w
            mask &= hit
    return data.subset(mask), notes


def describe_filters(filters: dict[str, Any]) -> str:
    parts = []
    for key, want in filters.items():
        wants = want if isinstance(want, list) else [want]
        parts.append(f"{key} in {', '.join(str(w) for w in wants)}")
    return "; ".join(parts)

