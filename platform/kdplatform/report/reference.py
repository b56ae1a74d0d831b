"""Reference levels for a task's dev score: what always predicting the majority dev label scores.

Computed from the data, not assumed: the labels of the official GLUE dev TSV (read here with the csv module,
so the report stays free of torch, which `kdplatform.distill.tasks` imports). The folder is the runs'
`data.glue_dir` param, else KDP_GLUE_DIR; without a local copy the level is not drawn and a note says why.
Runs scored on a downsampled dev set (`data.max_dev_examples`) get the level of that same subset: the rows the
worker's `downsample` keeps with its fixed data seed (`dev_subset`). When runs of one task were scored on
different subsets with different levels, no one level applies to all of them: it is not drawn, and a note
says so.

The level uses the task's own `score` (the mean of its GLUE metrics) for a constant prediction: accuracy =
the majority share, F1 = 2p / (1 + p) when the majority is the positive class (p = its share) and 0
otherwise, MCC = 0, and Pearson/Spearman = 0 (a constant has no correlation; the worker scores it 0 too).

>>> majority_score("rte", ["entailment"] * 146 + ["not_entailment"] * 131)
0.5270758122743683
"""

from __future__ import annotations

import csv
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from kdplatform.task_table import TASKS



# The worker's fixed data seed of the dev downsample (kdplatform.distill.data.DATA_SEED). Copied, not imported:
# that module pulls in torch, which the report must not; a test holds `dev_subset` to the worker's subset.
DATA_SEED = 0


def dev_labels(task: str, glue_dir: str | os.PathLike) -> list[str]:
    """The raw label column of a task's GLUE dev file."""
    spec = TASKS[task]
    column, header = spec.tsv.label, spec.tsv.header
    path = Path(glue_dir) / spec.glue_dir / spec.tsv.files["dev"]
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: MRPC's header starts with a BOM
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if header:
            names = next(rows)
            column = names.index(column)
        return [r[column] for r in rows if len(r) > column]


def dev_subset(labels: list[str], n: int | None, seed: int = DATA_SEED) -> list[str]:
    """The dev labels a run with `data.max_dev_examples` = n was scored on: the rows the worker's
    `kdplatform.distill.tasks.downsample(dev, n, DATA_SEED)` keeps (the first n of a numpy permutation with
    that seed, in file order); all of them when n is None or not below their number."""
    if n is None or n >= len(labels):
        return labels
    keep = np.sort(np.random.default_rng(seed).permutation(len(labels))[:n])
    return [labels[i] for i in keep]


def majority_score(task: str, labels: list[str]) -> float:
    """The task's dev `score` when every prediction is the most frequent label."""
    label, count = Counter(labels).most_common(1)[0]
    share = count / len(labels)
    positive = TASKS[task].positive_label
    values = []
    for metric in TASKS[task].metrics:
        if metric == "accuracy":
            values.append(share)
        elif metric == "f1":
            values.append(2 * share / (1 + share) if label == positive else 0.0)
        else:  # mcc, pearson, spearmanr of a constant prediction
            values.append(0.0)
    return sum(values) / len(values)


def _glue_dir(runs: pd.DataFrame) -> str | None:
    col = "params.data.glue_dir"
    if col in runs.columns:
        given = [v for v in runs[col].dropna().astype(str) if v not in ("", "None")]
        if given:
            return given[0]
    return os.environ.get("KDP_GLUE_DIR") or None


def _max_dev(value) -> int | None:
    """A run's `data.max_dev_examples` param as logged ('' or 'None': the whole dev set)."""
    text = "" if value is None or pd.isna(value) else str(value).strip()
    return int(text) if text.isdigit() else None


def _dev_sizes(runs: pd.DataFrame, task: str) -> list[int | None]:
    """The distinct `data.max_dev_examples` of the task's runs (None = the whole dev set)."""
    col = "params.data.max_dev_examples"
    if col not in runs.columns:
        return [None]
    values = {_max_dev(v) for v in runs.loc[runs.task == task, col]}
    return sorted(values, key=lambda n: (n is None, n or 0))


def _fmt_size(n: int | None) -> str:
    return "all" if n is None else str(n)


def majority_levels(runs: pd.DataFrame) -> tuple[dict[str, float], list[str]]:
    """(task -> majority-class dev score, notes) for the tasks of `runs`, each on the dev subset its runs were
    scored on (see the module doc). STS-B is a regression task: its chance level (correlation 0) is given
    without reading data, whatever the subset."""
    out, notes = {}, []
    glue_dir = _glue_dir(runs)
    missing = []
    for task in sorted(set(runs.task)):
        if task not in TASKS:
            continue
        if TASKS[task].is_regression:
            out[task] = 0.0
            continue
        try:
            labels = dev_labels(task, glue_dir) if glue_dir else None
        except (OSError, ValueError, IndexError):
            labels = None
        if labels is None:
            missing.append(task)
            continue
        levels = {n: majority_score(task, dev_subset(labels, n)) for n in _dev_sizes(runs, task)}
        if len(set(levels.values())) == 1:
            out[task] = next(iter(levels.values()))
        else:  # the level of one subset would flag the runs of another wrongly
            sizes = ", ".join(f"{_fmt_size(n)}: {v * 100:.1f}" for n, v in levels.items())
            notes.append(f"majority-class level not drawn for {task}: its runs were scored on different dev "
                         f"subsets (data.max_dev_examples {sizes}), and no one level applies to all of them")
    if missing:
        notes.append(f"majority-class level not drawn for {', '.join(missing)}: no GLUE dev file found "
                     f"(set KDP_GLUE_DIR to a local GLUE folder)")
    return out, notes
