"""One task table (`kdplatform/task_table.py`): data loading, the config, the report and the majority-class
row read it, and no other module lists task names."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO
from kdplatform.task_table import REGRESSION_TASKS, TASK_NAMES, TASKS

PACKAGE = REPO / "platform" / "kdplatform"
# The table itself, and the method presets whose per-task settings (CR-ILD's epochs) are keyed by task.
OWNERS = {PACKAGE / "task_table.py", PACKAGE / "config" / "presets.py"}


def _task_lists(path) -> list[str]:
    """Tuples, lists, sets and dicts in `path` that hold two or more task names: a second task list."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        items = node.keys if isinstance(node, ast.Dict) else node.elts if isinstance(
            node, (ast.Tuple, ast.List, ast.Set)) else []
        names = [c.value for c in items if isinstance(c, ast.Constant) and c.value in TASKS]
        if len(names) >= 2:
            hits.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {names}")
    return hits


def test_no_module_but_the_table_lists_tasks():
    assert [h for p in sorted(PACKAGE.rglob("*.py")) if p not in OWNERS for h in _task_lists(p)] == []
    assert _task_lists(PACKAGE / "config" / "presets.py")  # the scan does see a list when there is one


def test_every_reader_sees_the_table():
    from kdplatform.config import REGRESSION_TASKS as config_regression, TASK_NAMES as config_names
    from kdplatform.distill import tasks
    from kdplatform.report.collect import TASK_LABELS, TASK_ORDER

    assert config_names == TASK_ORDER == TASK_NAMES == tuple(TASKS)
    assert config_regression == REGRESSION_TASKS == ("stsb",)
    assert TASK_LABELS["sst2"] == "SST-2" and TASK_LABELS["stsb"] == "STS-B"
    assert tasks.TASKS is TASKS
    assert {n: tasks.metric_names(n) for n in TASKS} == {n: (*t.metrics, "score") for n, t in TASKS.items()}


def test_the_table_and_the_report_import_no_torch():
    code = ("import sys, kdplatform.task_table, kdplatform.report.reference, kdplatform.report.collect; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_majority_row_reads_labels_and_metrics_from_the_table(glue_dir):
    from kdplatform.report.reference import dev_labels, majority_score

    labels = dev_labels("mrpc", glue_dir)  # MRPC: F1 on positive label "1" and accuracy, averaged
    share = labels.count("1") / len(labels)
    assert share > 0.5 and TASKS["mrpc"].positive_label == "1"
    assert majority_score("mrpc", labels) == (2 * share / (1 + share) + share) / 2
    assert len(dev_labels("cola", glue_dir)) == 1043  # header-less file, label in column 1 (the table's)
