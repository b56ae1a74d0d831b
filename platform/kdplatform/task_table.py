"""The GLUE task table: every fact about a task, in one place and free of torch.

Data loading (`kdplatform/distill/tasks.py`), the config schema (which task names exist, which are
regression), the report (task order and labels, `report/collect.py`) and the majority-class reference row
(`report/reference.py`) all read this table; nothing else lists task names. Adding a task = one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_BINARY = {"0": 0, "1": 1}
_NLI2 = {"entailment": 0, "not_entailment": 1}
_TRAIN_DEV = {"train": "train.tsv", "dev": "dev.tsv"}
_HUB_SPLITS = {"train": "train", "dev": "validation"}


@dataclass(frozen=True)
class TsvColumns:
    """Where the columns sit in one task's official GLUE TSV files."""

    text_a: str | int  # header name, or an index for files without a header (CoLA)
    text_b: str | int | None
    label: str | int
    labels: dict[str, int] | None  # raw value -> id; None = float score (STS-B)
    header: bool = True
    n_fields: int | None = None  # only for header-less files
    files: dict[str, str] = field(default_factory=lambda: dict(_TRAIN_DEV))  # split -> file name
    # The GLUE baselines (and transformers' QqpProcessor) skip QQP rows that are cut short; so do we, and say
    # how many, instead of failing a 364k-row file over a handful of broken lines.
    skip_malformed: bool = False


@dataclass(frozen=True)
class TaskSpec:
    """One GLUE task: names, where its data is, its columns, labels and metrics."""

    name: str  # the name a YAML file uses
    glue_dir: str  # folder in the official GLUE layout, e.g. "SST-2"; also the task's label in the report
    hub_config: str  # config name in the `nyu-mll/glue` hub dataset
    num_labels: int  # 1 = regression (STS-B)
    metrics: tuple[str, ...]  # GLUE metrics; the dev `score` (the primary metric) is their mean
    tsv: TsvColumns
    hub_columns: tuple[str, str | None]  # (text_a, text_b) of the hub dataset; its labels are ids already
    dev_splits: tuple[str, ...] = ("dev",)
    label_names: tuple[str, ...] = ()  # id -> name, in the GLUE / `datasets` order; () for regression
    positive_label: str | None = None  # raw dev label F1 counts as positive (tasks scored with F1)
    hub_splits: dict[str, str] = field(default_factory=lambda: dict(_HUB_SPLITS))  # our split -> hub split
    # official GLUE split sizes (nyu-mll/glue dataset card): train, dev examples (MNLI: both dev sets); the dry
    # run's hour and disk estimates read them
    sizes: tuple[int, int] = (0, 0)

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def is_pair(self) -> bool:
        return self.tsv.text_b is not None

    @property
    def label(self) -> str:
        """The task's name in tables and figures (GLUE's own spelling)."""
        return self.glue_dir

    @property
    def primary_metric(self) -> str:
        """The key model selection uses: always "score" (GLUE convention: the mean of the task's metrics)."""
        return "score"


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("cola", "CoLA", "cola", 2, ("mcc",), TsvColumns(3, None, 1, _BINARY, header=False, n_fields=4),
             ("sentence", None), label_names=("unacceptable", "acceptable"), positive_label="1", sizes=(8551, 1043)),
    TaskSpec("sst2", "SST-2", "sst2", 2, ("accuracy",), TsvColumns("sentence", None, "label", _BINARY),
             ("sentence", None), label_names=("negative", "positive"), positive_label="1", sizes=(67349, 872)),
    TaskSpec("mrpc", "MRPC", "mrpc", 2, ("f1", "accuracy"), TsvColumns("#1 String", "#2 String", "Quality", _BINARY),
             ("sentence1", "sentence2"), label_names=("not_equivalent", "equivalent"), positive_label="1",
             sizes=(3668, 408)),
    TaskSpec("stsb", "STS-B", "stsb", 1, ("pearson", "spearmanr"),
             TsvColumns("sentence1", "sentence2", "score", None), ("sentence1", "sentence2"), sizes=(5749, 1500)),
    TaskSpec("qqp", "QQP", "qqp", 2, ("f1", "accuracy"),
             TsvColumns("question1", "question2", "is_duplicate", _BINARY, skip_malformed=True),
             ("question1", "question2"), label_names=("not_duplicate", "duplicate"), positive_label="1",
             sizes=(363846, 40430)),
    TaskSpec("mnli", "MNLI", "mnli", 3, ("accuracy",),
             TsvColumns("sentence1", "sentence2", "gold_label", {"entailment": 0, "neutral": 1, "contradiction": 2},
                        files={"train": "train.tsv", "dev": "dev_matched.tsv", "dev_mm": "dev_mismatched.tsv"}),
             ("premise", "hypothesis"), dev_splits=("dev", "dev_mm"),
             label_names=("entailment", "neutral", "contradiction"),
             hub_splits={"train": "train", "dev": "validation_matched", "dev_mm": "validation_mismatched"},
             sizes=(392702, 19647)),
    TaskSpec("qnli", "QNLI", "qnli", 2, ("accuracy",), TsvColumns("question", "sentence", "label", _NLI2),
             ("question", "sentence"), label_names=("entailment", "not_entailment"), sizes=(104743, 5463)),
    TaskSpec("rte", "RTE", "rte", 2, ("accuracy",), TsvColumns("sentence1", "sentence2", "label", _NLI2),
             ("sentence1", "sentence2"), label_names=("entailment", "not_entailment"), sizes=(2490, 277)),
    TaskSpec("wnli", "WNLI", "wnli", 2, ("accuracy",), TsvColumns("sentence1", "sentence2", "label", _BINARY),
             ("sentence1", "sentence2"), label_names=("not_entailment", "entailment"), sizes=(635, 71)),
]}

TASK_NAMES = tuple(TASKS)  # in GLUE's order: the report's column order too
REGRESSION_TASKS = tuple(n for n, t in TASKS.items() if t.is_regression)
