"""Reference levels for a task's dev score: what always predicting the majority dev label scores.

Computed from the data, not assumed: the labels of the official GLUE dev TSV (read here with the csv module,
so the report stays free of torch, which `kdplatform.distill.tasks` imports). The folder is the runs'
`data.glue_dir` param, else KDP_GLUE_DIR; without a local copy the level is not drawn and a note says why.

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

import pandas as pd

# task -> (folder, dev file, label column (header name or index), has header, positive label for F1)
DEV_FILES = {
    "cola": ("CoLA", "dev.tsv", 1, False, "1"), "sst2": ("SST-2", "dev.tsv", "label", True, "1"),
    "mrpc": ("MRPC", "dev.tsv", "Quality", True, "1"), "stsb": ("STS-B", "dev.tsv", "score", True, None),
    "qqp": ("QQP", "dev.tsv", "is_duplicate", True, "1"), "mnli": ("MNLI", "dev_matched.tsv", "gold_label", True, None),
    "qnli": ("QNLI", "dev.tsv", "label", True, None), "rte": ("RTE", "dev.tsv", "label", True, None),
    "wnli": ("WNLI", "dev.tsv", "label", True, None),
}
# Each task's GLUE metrics, as the worker's `score` averages them.
TASK_METRICS = {"cola": ("mcc",), "sst2": ("accuracy",), "mrpc": ("f1", "accuracy"),
                "stsb": ("pearson", "spearmanr"), "qqp": ("f1", "accuracy"), "mnli": ("accuracy",),
                "qnli": ("accuracy",), "rte": ("accuracy",), "wnli": ("accuracy",)}


def dev_labels(task: str, glue_dir: str | os.PathLike) -> list[str]:
    """The raw label column of a task's GLUE dev file."""
    folder, name, column, header, _ = DEV_FILES[task]
    path = Path(glue_dir) / folder / name
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: MRPC's header starts with a BOM
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if header:
            names = next(rows)
            column = names.index(column)
        return [r[column] for r in rows if len(r) > column]


def majority_score(task: str, labels: list[str]) -> float:
    """The task's dev `score` when every prediction is the most frequent label."""
    label, count = Counter(labels).most_common(1)[0]
    share = count / len(labels)
    positive = DEV_FILES[task][4]
    values = []
    for metric in TASK_METRICS[task]:
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


def majority_levels(runs: pd.DataFrame) -> tuple[dict[str, float], list[str]]:
    """(task -> majority-class dev score, notes) for the tasks of `runs`. STS-B is a regression task: its
    chance level (correlation 0) is given without reading data."""
    out, notes = {}, []
    glue_dir = _glue_dir(runs)
    missing = []
    for task in sorted(set(runs.task)):
        if task not in DEV_FILES:
            continue
        if task == "stsb":
            out[task] = 0.0
            continue
        try:
            out[task] = majority_score(task, dev_labels(task, glue_dir)) if glue_dir else None
        except (OSError, ValueError, IndexError):
            out[task] = None
        if out[task] is None:
            missing.append(task)
            del out[task]
    if missing:
        notes.append(f"majority-class level not drawn for {', '.join(missing)}: no GLUE dev file found "
                     f"(set KDP_GLUE_DIR to a local GLUE folder)")
    return out, notes
