"""GLUE tasks: specs, loading (local TSV or the hub), subsampling, label noise, metrics, tokenization.

Everything a worker needs to turn a task name into batches and a dev score:

>>> dev = load_split("rte", "dev", glue_dir="../shared/data/glue")       # doctest: +SKIP
>>> len(dev), dev.text_b is not None, sorted(set(dev.labels))           # doctest: +SKIP
(277, True, [0, 1])
>>> train = downsample(load_split("rte", "train"), 1000, seed=42)        # doctest: +SKIP
>>> feats = tokenize(train, tokenizer, max_length=128)                   # doctest: +SKIP
>>> batch = Collator(tokenizer.pad_token_id, regression=False)(
...     [{**f, "label": y} for f, y in zip(feats[:32], train.labels[:32])])  # doctest: +SKIP
>>> compute_metrics("rte", logits, dev.labels)["score"]                  # doctest: +SKIP

Local files follow the layout of the official GLUE download script (``<glue_dir>/RTE/train.tsv``, ...).
Those files carry raw double quotes inside fields, so they are read with ``csv.QUOTE_NONE``; every problem in
them raises :class:`DataError` naming the file, the line and a fix.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from kdplatform import paths
from kdplatform.distill.errors import DataError
from kdplatform.task_table import TASKS, TaskSpec, TsvColumns

log = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"
SPLITS = ("train", "dev", "dev_mm")
_CACHE_FORMAT = 1  # bump when the on-disk token cache layout changes, so old files are not misread


# ------------------------------------------------------------------------------------------------ specs
# The task table (names, folders, columns, labels, metrics) is `kdplatform/task_table.py`: torch-free, so the
# config layer and the report read the same one.


def get_task(task: str) -> TaskSpec:
    """The spec of `task`, or a DataError listing the known names."""
    try:
        return TASKS[task]
    except KeyError:
        raise DataError(f"unknown task '{task}'", fix=f"use one of: {', '.join(TASKS)}") from None


def primary_metric(task: str) -> str:
    """The key model selection uses: always "score" (GLUE convention: mean of the task's metrics)."""
    return get_task(task).primary_metric


def metric_names(task: str) -> tuple[str, ...]:
    """Every key `compute_metrics(task, ...)` returns, the task's own metrics first, then "score"."""
    return (*get_task(task).metrics, "score")


# ------------------------------------------------------------------------------------------------- data
@dataclass
class TaskData:
    """One split of one task, column by column."""

    task: str
    split: str
    text_a: list[str]
    text_b: list[str] | None
    labels: list[int] | list[float]
    source: str  # the file read, or "hub:nyu-mll/glue/<config>/<split>", "disk:<folder>/<split>", ...
    origin: str = ""  # the source without the split, as logged (`data.source_used`): "glue_dir:<folder>", ...

    def __len__(self) -> int:
        return len(self.text_a)

    def select(self, indices: Sequence[int]) -> TaskData:
        """A new TaskData with the rows at `indices`, in that order."""
        idx = [int(i) for i in indices]
        return replace(self, text_a=[self.text_a[i] for i in idx],
                       text_b=None if self.text_b is None else [self.text_b[i] for i in idx],
                       labels=[self.labels[i] for i in idx])


_STSB_RANGE = (0.0, 5.0)
_GLUE_DIR_FIX = ("set KDP_GLUE_DIR (or data.glue_dir) to a folder in the official GLUE layout "
                 "(<dir>/RTE/train.tsv, <dir>/MNLI/dev_matched.tsv, ...), or use data.source: hub")


def _check_split(spec: TaskSpec, split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' for task '{spec.name}'", fix=f"use one of: {', '.join(SPLITS)}")
    if split == "dev_mm" and "dev_mm" not in spec.dev_splits:
        raise DataError(f"task '{spec.name}' has no 'dev_mm' split (only MNLI has a mismatched dev set)",
                        fix="use split 'dev'")


def reads_hub(source: str, glue_dir: str | os.PathLike | None = None, hub_dataset: str | None = None) -> bool:
    """Whether `load_split` with these settings reads through `datasets` (a hub id or folder) rather than
    GLUE TSV files: `hub_dataset` given, source "hub", or "auto" with no folder (argument or KDP_GLUE_DIR)."""
    folder = glue_dir if glue_dir is not None else paths.glue_dir()
    return bool(hub_dataset) or source == "hub" or (source == "auto" and folder is None)


def load_split(task: str, split: str, *, source: str = "auto", glue_dir: str | os.PathLike | None = None,
               hub_dataset: str | None = None) -> TaskData:
    """Load `split` ("train", "dev", "dev_mm") of `task`.

    `hub_dataset` (a dataset id, a `save_to_disk` folder or parquet files) is read through `datasets` when
    given. Else source "auto": the `glue_dir` argument, else env KDP_GLUE_DIR, else the hub; "glue_dir": a
    local folder is required; "hub": `datasets.load_dataset("nyu-mll/glue", config)`.
    """
    spec = get_task(task)
    _check_split(spec, split)
    if source not in ("auto", "glue_dir", "hub"):
        raise DataError(f"unknown data source '{source}'", fix="use one of: auto, glue_dir, hub")
    if hub_dataset:
        return _load_hub(spec, split, hub_dataset)
    if reads_hub(source, glue_dir):
        return _load_hub(spec, split)
    folder = glue_dir if glue_dir is not None else paths.glue_dir()
    if folder is None:
        raise DataError(f"data.source is 'glue_dir' but no folder was given for task '{task}'", fix=_GLUE_DIR_FIX)
    return _load_tsv(spec, split, Path(folder).expanduser())


def _load_tsv(spec: TaskSpec, split: str, root: Path) -> TaskData:
    # GLUE fields can be long (QNLI/MNLI paragraphs): lift the csv module's 128 KiB field limit
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    fmt = spec.tsv
    path = root / spec.glue_dir / fmt.files[split]
    if not path.is_file():
        hint = ""
        if not root.is_dir():
            hint = f" (the folder {root} does not exist)"
        # no file= prefix: the message already names the expected path
        raise DataError(f"missing file for task '{spec.name}' split '{split}': expected {path}{hint}",
                        fix=_GLUE_DIR_FIX)
    text_a: list[str] = []
    text_b: list[str] | None = [] if fmt.text_b is not None else None
    labels: list[Any] = []
    skipped: list[int] = []
    # utf-8-sig drops the byte-order mark MRPC's header starts with; QUOTE_NONE keeps raw quotes in the text.
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        if fmt.header:
            header = next(_rows(reader, path), None)
            if header is None:
                raise DataError("the file is empty (expected a header line)", file=path, line=1,
                                fix="restore the file from the official GLUE download")
            cols = {name.strip(): i for i, name in enumerate(header)}
            wanted = [c for c in (fmt.text_a, fmt.text_b, fmt.label) if c is not None]
            missing = [c for c in wanted if c not in cols]
            if missing:
                raise DataError(f"header has no column {', '.join(repr(m) for m in missing)} "
                                f"(found: {', '.join(repr(h) for h in header)})", file=path, line=1,
                                fix=f"the {spec.glue_dir} files need a tab-separated header with columns "
                                    f"{', '.join(repr(w) for w in wanted)}, as the official GLUE files have")
            n_fields = len(header)
            ia, ib, il = cols[fmt.text_a], (cols[fmt.text_b] if fmt.text_b is not None else None), cols[fmt.label]
        else:
            n_fields = fmt.n_fields
            ia, ib, il = fmt.text_a, fmt.text_b, fmt.label
        for row in _rows(reader, path):
            line = reader.line_num  # no quoting, so one record = one physical line
            if not row or row == [""]:
                continue  # a blank line (e.g. a trailing one) carries no example
            if len(row) != n_fields:
                if fmt.skip_malformed:
                    skipped.append(line)
                    continue
                raise DataError(f"expected {n_fields} tab-separated fields, found {len(row)}", file=path, line=line,
                                fix="each line needs exactly one value per column; a tab inside a sentence or a "
                                    "cut-off line breaks this: fix or remove that line")
            labels.append(_parse_label(spec, fmt, row[il], path, line))
            text_a.append(row[ia])
            if text_b is not None:
                text_b.append(row[ib])
    if skipped:
        log.warning("%s: skipped %d malformed line(s) with the wrong number of fields (first: %s)",
                    path, len(skipped), ", ".join(map(str, skipped[:5])))
    if not text_a:
        raise DataError("the file holds no examples", file=path, fix="restore the file from the official GLUE download")
    return TaskData(spec.name, split, text_a, text_b, labels, str(path), f"glue_dir:{root.resolve()}")


def _rows(reader: Any, path: Path) -> Any:
    """Iterate csv rows, turning decoding and csv errors into DataErrors that name the line."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"unreadable line: {exc}", file=path, line=reader.line_num,
                            fix="lines must be tab-separated text ending in \\n; remove stray carriage returns "
                                "or NUL bytes") from exc
        except UnicodeDecodeError as exc:
            # the text layer decodes in chunks, so find the bad byte's line in the raw bytes instead
            raw = path.read_bytes()
            try:
                raw.decode("utf-8-sig")
                line = reader.line_num + 1
            except UnicodeDecodeError as whole:
                line = raw.count(b"\n", 0, whole.start) + 1
            raise DataError(f"not valid UTF-8 text ({exc.reason})", file=path, line=line,
                            fix="re-encode the file as UTF-8") from exc
        yield row


def _parse_label(spec: TaskSpec, fmt: TsvColumns, raw: str, path: Path, line: int) -> int | float:
    value = raw.strip()
    if fmt.labels is None:  # regression score
        try:
            score = float(value)
        except ValueError:
            score = math.nan
        lo, hi = _STSB_RANGE
        if not (lo <= score <= hi):  # also catches nan
            raise DataError(f"bad {spec.name} score {raw!r}: expected a number in [{lo:g}, {hi:g}]", file=path,
                            line=line, fix="the score column must hold the similarity score as a float, e.g. 3.800")
        return score
    if value not in fmt.labels:
        raise DataError(f"bad {spec.name} label {raw!r}: expected one of {', '.join(fmt.labels)}", file=path,
                        line=line, fix="fix the label on that line, or check that the file belongs to this task")
    return fmt.labels[value]


def _hub_split(spec: TaskSpec, split: str) -> str:
    """Our split name -> the `datasets` one (GLUE's names: train / validation, MNLI's validation_matched...)."""
    return spec.hub_splits.get(split, split)


def dataset_origin(ref: str) -> tuple[str, Path | None]:
    """What `data.hub_dataset` names: ("disk", folder) for a `save_to_disk` folder, ("parquet", path) for a
    parquet file or a folder of them, ("hub", None) for a dataset id."""
    path = Path(ref).expanduser()
    if path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
        return "disk", path.resolve()
    if path.suffix == ".parquet" or (path.is_dir() and any(path.rglob("*.parquet"))):
        return "parquet", path.resolve()
    if path.exists() or ref.startswith((".", "/", "~")):
        raise DataError(f"data.hub_dataset: {ref} is neither a `datasets` folder (save_to_disk: dataset_dict.json) "
                        "nor parquet files", fix="point it at a folder written by DatasetDict.save_to_disk, "
                        "a folder of <split>*.parquet files, or a dataset id on the hub")
    return "hub", None


def _parquet_files(root: Path, hub_split: str) -> list[str]:
    """A split's parquet files: `<split>.parquet`, `<split>-*.parquet` (the hub's layout) or `<split>/*.parquet`."""
    if root.is_file():
        return [str(root)] if hub_split == "train" else []
    found = {*root.rglob(f"{hub_split}.parquet"), *root.rglob(f"{hub_split}-*.parquet"),
             *root.rglob(f"{hub_split}/*.parquet")}
    return sorted(str(f) for f in found)


def _open_dataset(spec: TaskSpec, hub_split: str, ref: str) -> tuple[Any, str, str]:
    """(the split as a `datasets.Dataset`, where it came from for messages, the source for params)."""
    import datasets  # only here: the local path must not need it

    kind, path = dataset_origin(ref)
    if kind == "disk":
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if hub_split not in ds:
                raise DataError(f"data.hub_dataset: {path} has splits {sorted(ds)}, not '{hub_split}'",
                                fix=f"save a DatasetDict with a '{hub_split}' split")
            ds = ds[hub_split]
        elif hub_split != "train":
            raise DataError(f"data.hub_dataset: {path} is one Dataset; a trial also needs '{hub_split}'",
                            fix="save a DatasetDict with train and validation splits")
        return ds, f"disk:{path}/{hub_split}", f"disk:{path}"
    if kind == "parquet":
        files = _parquet_files(path, hub_split)
        if not files:
            raise DataError(f"data.hub_dataset: no parquet files for split '{hub_split}' under {path}",
                            fix=f"name them {hub_split}.parquet, {hub_split}-00000-of-00001.parquet or "
                                f"{hub_split}/*.parquet")
        ds = datasets.load_dataset("parquet", data_files={hub_split: files}, split=hub_split)
        return ds, f"parquet:{path}/{hub_split}", f"parquet:{path}"
    config = spec.hub_config if ref == HUB_DATASET else None
    name = f"{ref}/{config}" if config else ref
    try:
        ds = datasets.load_dataset(ref, config, split=hub_split)
    except Exception as exc:  # network, auth, cache: all mean "no data from the hub"
        raise DataError(f"could not load hub:{name}/{hub_split}: {type(exc).__name__}: {exc}",
                        fix="check the network / HF_HUB_OFFLINE, or point KDP_GLUE_DIR (data.glue_dir) at a "
                            "local folder in the official GLUE layout") from exc
    return ds, f"hub:{name}/{hub_split}", f"hub:{name}"


def _load_hub(spec: TaskSpec, split: str, ref: str = HUB_DATASET) -> TaskData:
    """A split through the `datasets` library: a hub id, a `save_to_disk` folder or parquet files, with the
    GLUE hub's column names for the task (the table's `hub_columns` and `label`)."""
    ds, where, origin = _open_dataset(spec, _hub_split(spec, split), ref)
    col_a, col_b = spec.hub_columns
    missing = [c for c in (col_a, col_b, "label") if c is not None and c not in ds.column_names]
    if missing:
        raise DataError(f"{where}: no column(s) {missing} (it has {ds.column_names})",
                        fix=f"task {spec.name} reads columns {[c for c in (col_a, col_b) if c]} and 'label'")
    text_a = [str(t) for t in ds[col_a]]
    text_b = [str(t) for t in ds[col_b]] if col_b is not None else None
    if spec.is_regression:
        labels: list[Any] = [float(y) for y in ds["label"]]
    else:
        labels = [int(y) for y in ds["label"]]
        bad = [y for y in labels if not 0 <= y < spec.num_labels]
        if bad:  # the hub's test splits carry -1: refuse them rather than train on them
            raise DataError(f"{where}: {len(bad)} label(s) outside 0..{spec.num_labels - 1} (e.g. {bad[0]})",
                            fix="use the train or dev split; GLUE test labels are not public")
    return TaskData(spec.name, split, text_a, text_b, labels, where, origin)


# ----------------------------------------------------------------------------- subsampling and noise
def downsample(data: TaskData, n: int | None, seed: int) -> TaskData:
    """Keep `n` rows picked by `numpy.random.Generator(seed).permutation`, in their original order.

    `n` None or >= len(data) returns `data` unchanged (CR-ILD's 1,000-example setting uses n=1000).
    """
    if n is None or n >= len(data):
        return data
    if n < 1:
        raise ValueError(f"downsample: n must be >= 1 or None, got {n}")
    keep = np.sort(np.random.default_rng(seed).permutation(len(data))[:n])
    return data.select(keep.tolist())


def add_label_noise(data: TaskData, rate: float, num_labels: int, seed: int) -> tuple[TaskData, int]:
    """Flip each label with probability `rate` to a different class chosen uniformly; return (data, n_flipped).

    Regression tasks have no classes to flip to and raise DataError.
    """
    if num_labels < 2 or (data.task in TASKS and TASKS[data.task].is_regression):
        raise DataError(f"label noise is not supported for regression task '{data.task}'",
                        fix="set data.label_noise: 0 for this task")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"add_label_noise: rate must be in [0, 1], got {rate}")
    labels = np.asarray(data.labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
        raise DataError(f"labels of '{data.task}' lie outside 0..{num_labels - 1}", fix="check num_labels")
    rng = np.random.default_rng(seed)
    flip = rng.random(len(labels)) < rate
    # An offset in 1..C-1 added modulo C lands uniformly on one of the OTHER classes, never the same one.
    offsets = rng.integers(1, num_labels, size=len(labels))
    noisy = np.where(flip, (labels + offsets) % num_labels, labels)
    return replace(data, labels=noisy.tolist()), int(flip.sum())


# ------------------------------------------------------------------------------------------------ metrics
def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def _safe_corr(fn: Any, a: np.ndarray, b: np.ndarray) -> float:
    """A scipy correlation that is 0.0 (not nan) when it is undefined: constant input or < 2 points."""
    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(fn(a, b)[0])
    return 0.0 if math.isnan(value) else value


def compute_metrics(task: str, predictions: Any, labels: Any) -> dict[str, float]:
    """GLUE metrics of `predictions` (logits (N, C); (N,) or (N, 1) scores for STS-B) against `labels`.

    Returns the task's metrics ("accuracy", "f1", "mcc", "pearson", "spearmanr") plus "score", their mean.
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    spec = get_task(task)
    preds = _to_numpy(predictions)
    y = _to_numpy(labels)
    if spec.is_regression:
        preds = preds.astype(np.float64).reshape(len(preds), -1) if preds.ndim else preds.reshape(1, 1)
        if preds.shape[1] != 1:
            raise ValueError(f"{task}: expected scores of shape (N,) or (N, 1), got {tuple(preds.shape)}")
        preds = preds[:, 0]
        y = y.astype(np.float64).reshape(-1)
    else:
        if preds.ndim == 2:
            if preds.shape[1] != spec.num_labels:
                raise ValueError(f"{task}: expected logits of shape (N, {spec.num_labels}), got {tuple(preds.shape)}")
            preds = preds.argmax(axis=1)
        elif preds.ndim != 1:
            raise ValueError(f"{task}: expected logits (N, C) or class ids (N,), got shape {tuple(preds.shape)}")
        preds = preds.astype(np.int64)
        y = y.astype(np.int64).reshape(-1)
    if len(preds) != len(y):
        raise ValueError(f"{task}: {len(preds)} predictions but {len(y)} labels")
    if len(y) == 0:
        raise ValueError(f"{task}: no examples to score")

    out: dict[str, float] = {}
    for name in spec.metrics:
        if name == "accuracy":
            out[name] = float(accuracy_score(y, preds))
        elif name == "f1":
            out[name] = float(f1_score(y, preds, pos_label=1, zero_division=0.0))
        elif name == "mcc":
            out[name] = float(matthews_corrcoef(y, preds))
        elif name == "pearson":
            out[name] = _safe_corr(pearsonr, preds, y)
        elif name == "spearmanr":
            out[name] = _safe_corr(spearmanr, preds, y)
        else:  # a TaskSpec names a metric this function does not know: a bug, not bad data
            raise AssertionError(f"no implementation for metric '{name}'")
    out["score"] = float(np.mean([out[m] for m in spec.metrics]))
    return out


# ------------------------------------------------------------------------------------------- tokenization
_TOKEN_KEYS = ("input_ids", "token_type_ids", "attention_mask")
_MEMORY_CACHE: dict[str, dict[str, np.ndarray]] = {}


def _cache_key(data: TaskData, tokenizer: Any, max_length: int) -> str:
    texts = hashlib.sha256(json.dumps([data.text_a, data.text_b], ensure_ascii=False).encode("utf-8")).hexdigest()
    ident = {
        "format": _CACHE_FORMAT,
        "tokenizer": str(getattr(tokenizer, "name_or_path", "")),
        "class": type(tokenizer).__name__,
        "vocab": len(tokenizer),
        "task": data.task,
        "split": data.split,
        "max_length": int(max_length),
        "texts": texts,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode("utf-8")).hexdigest()


def _encode(data: TaskData, tokenizer: Any, max_length: int, chunk: int = 2048) -> dict[str, np.ndarray]:
    """Tokenize without padding; store each key flat (int32) with shared row offsets."""
    rows: dict[str, list[list[int]]] = {}
    for start in range(0, len(data), chunk):
        a = data.text_a[start:start + chunk]
        b = data.text_b[start:start + chunk] if data.text_b is not None else None
        enc = tokenizer(a, b, truncation="longest_first" if b is not None else True, max_length=max_length,
                        padding=False, return_attention_mask=True)
        for key in _TOKEN_KEYS:
            if key in enc:
                rows.setdefault(key, []).extend(enc[key])
    lengths = np.array([len(r) for r in rows["input_ids"]], dtype=np.int64)
    arrays = {"offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)}
    for key, values in rows.items():
        arrays[key] = np.fromiter((t for r in values for t in r), dtype=np.int32, count=int(lengths.sum()))
    return arrays


def _decode(arrays: dict[str, np.ndarray]) -> list[dict[str, list[int]]]:
    offsets = arrays["offsets"].tolist()
    flat = {k: arrays[k].tolist() for k in _TOKEN_KEYS if k in arrays}
    # Fresh lists every call: callers may add a "label" or mutate, and must not poison the cache.
    return [{k: v[offsets[i]:offsets[i + 1]] for k, v in flat.items()} for i in range(len(offsets) - 1)]


def _write_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)  # readers see the old file or the whole new one, never half of it
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tokenize(data: TaskData, tokenizer: Any, max_length: int, cache_dir: str | os.PathLike | None = None
             ) -> list[dict[str, list[int]]]:
    """Per-example `input_ids`, `attention_mask` (and `token_type_ids` if the tokenizer makes them), unpadded.

    Pairs are truncated "longest_first" to `max_length`. Results are cached in memory and on disk under
    `<cache_dir or KDP_CACHE_DIR or ~/.cache/kdplatform>/tokens/<sha256>.npz` (numpy, no pickle).
    """
    key = _cache_key(data, tokenizer, max_length)
    arrays = _MEMORY_CACHE.get(key)
    if arrays is None:
        folder = Path(cache_dir).expanduser() / "tokens" if cache_dir is not None else paths.tokens_root()
        path = folder / f"{key}.npz"
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as npz:
                    arrays = {k: npz[k] for k in npz.files}
                if "offsets" not in arrays or "input_ids" not in arrays:
                    raise ValueError("missing arrays")
            except Exception as exc:  # a corrupt cache file only costs a re-tokenization
                log.warning("token cache %s unreadable (%s); tokenizing again", path, exc)
                arrays = None
        if arrays is None:
            arrays = _encode(data, tokenizer, max_length)
            try:
                _write_atomic(path, arrays)
            except OSError as exc:  # a read-only cache folder must not stop training
                log.warning("could not write token cache %s: %s", path, exc)
        _MEMORY_CACHE[key] = arrays
    return _decode(arrays)


def clear_token_cache() -> None:
    """Forget the in-process token cache (the disk cache stays)."""
    _MEMORY_CACHE.clear()


# ------------------------------------------------------------------------------------------------ batching
class Collator:
    """Pads a list of tokenized examples to the longest one in the batch (dynamic padding)."""

    def __init__(self, pad_token_id: int, regression: bool):
        self.pad_token_id = int(pad_token_id)
        self.regression = regression

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("Collator: empty batch")
        width = max(len(f["input_ids"]) for f in features)
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "token_type_ids": 0}
        batch: dict[str, torch.Tensor] = {}
        for key, pad in pads.items():
            if key not in features[0]:
                continue  # e.g. RoBERTa/DistilBERT tokenizers give no token_type_ids, and their models reject them
            out = torch.full((len(features), width), pad, dtype=torch.long)
            for i, f in enumerate(features):
                seq = f[key]
                out[i, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
            batch[key] = out
        if "attention_mask" not in batch:  # tokenizers always give one, but hand-built features may not
            lengths = torch.tensor([len(f["input_ids"]) for f in features])
            batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
        label_key = "label" if "label" in features[0] else ("labels" if "labels" in features[0] else None)
        if label_key is not None:  # unlabeled (supplementary) batches carry no labels
            batch["labels"] = torch.tensor([f[label_key] for f in features],
                                           dtype=torch.float if self.regression else torch.long)
        if "idx" in features[0]:  # position in the example set: the teacher output cache's row
            batch["idx"] = torch.tensor([f["idx"] for f in features], dtype=torch.long)
        return batch


def length_grouped_indices(lengths: Sequence[int], batch_size: int, seed: int) -> list[int]:
    """A permutation of range(len(lengths)): shuffled, then sorted by length (longest first) within
    mega-batches of 50 * batch_size, so consecutive batches hold similar lengths and pad little."""
    if batch_size < 1:
        raise ValueError(f"length_grouped_indices: batch_size must be >= 1, got {batch_size}")
    lens = np.asarray(lengths, dtype=np.int64)
    perm = np.random.default_rng(seed).permutation(len(lens))
    mega = 50 * batch_size
    out: list[int] = []
    for start in range(0, len(perm), mega):
        chunk = perm[start:start + mega]
        # stable sort on -length: equal lengths keep their shuffled order, so the result depends on the seed
        out.extend(chunk[np.argsort(-lens[chunk], kind="stable")].tolist())
    return out


__all__ = [
    "TASKS", "TaskSpec", "TaskData", "DataError", "SPLITS", "HUB_DATASET", "get_task", "load_split", "downsample",
    "add_label_noise", "compute_metrics", "primary_metric", "metric_names", "tokenize", "clear_token_cache",
    "Collator", "length_grouped_indices",
]
