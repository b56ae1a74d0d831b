"""Students out: a finished trial's best-dev (and last) student as a Hugging Face folder, logged to its run.

The best student is the one of the last stage's evaluation with the best dev score: its weights are copied to
CPU memory at each improvement (`BestSnapshot`), and saved once the trial ends, with `save_pretrained`, the
tokenizer and, for a quantized student, `quantization.json` (the `quantize_bert_` settings and the packed
size). The folder holds the full-precision latent weights: `load_student(folder)` rebuilds the quantized
model from them, so it predicts exactly as the trial evaluated it.

>>> model = load_student("exported/")           # doctest: +SKIP
>>> model(**tokenizer("a fine film", return_tensors="pt")).logits   # doctest: +SKIP
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdplatform import runs, tracking
from kdplatform.config import ResolvedTrial
from kdplatform.distill.quant import model_size_bits, quantize_bert_

QUANT_FILE = "quantization.json"
MODEL_TAG = runs.MODEL_TAG  # tag: the artifact URI of the saved folder (kdp.model.best, kdp.model.last)
ARTIFACT_DIR = "model/{which}"
LOAD_HINT = ("a quantized student: load it with `from kdplatform.distill.export import load_student; "
             "model = load_student(FOLDER)` (plain from_pretrained gives the full-precision latent weights)")


class BestSnapshot:
    """The student's weights at the best dev score so far (copied to CPU only when the score improves)."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] | None = None
        self.score: float | None = None

    def offer(self, student: nn.Module, metrics: dict[str, float]) -> bool:
        """Take a copy when this eval set the best score (`dev/best_score` exists in the last stage only)."""
        best, score = metrics.get("dev/best_score"), metrics.get("dev/score")
        if best is None or score is None or score < best:
            return False
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in student.state_dict().items()}
        self.score = score
        return True


def quant_settings(trial: ResolvedTrial) -> dict[str, Any] | None:
    """The `quantize_bert_` arguments of a quantized student (None when it is full precision)."""
    if trial.bits >= 32 and trial.act_bits >= 32:
        return None
    s = trial.student
    return {"bits": trial.bits, "act_bits": trial.act_bits, "two_bit": s.two_bit, "clip": s.weight_clip,
            "act_clip": s.act_clip, "quantize_embeddings": s.quantize_embeddings}


def packed_mb(student: nn.Module) -> float:
    """Stored size: quantized weights at their bit width plus one fp32 scale per matrix (per row for
    embeddings), everything else fp32."""
    return model_size_bits(student) / 8 / 1e6


def save_student(student: nn.Module, tokenizer, folder: Path, quant: dict[str, Any] | None) -> Path:
    """`save_pretrained` + tokenizer (+ quantization.json) into `folder`; returns it."""
    folder = Path(folder)
    student.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if quant is not None:
        info = {**quant, "packed_mb": packed_mb(student), "load": LOAD_HINT}
        (folder / QUANT_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return folder


def load_student(folder: str | Path) -> nn.Module:
    """A saved student in eval mode, quantized again when its folder holds quantization.json."""
    from transformers import AutoModelForSequenceClassification

    folder = Path(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    qfile = folder / QUANT_FILE
    if qfile.is_file():
        q = json.loads(qfile.read_text())
        quantize_bert_(model, q["bits"], q["act_bits"], two_bit=q["two_bit"], clip=q["clip"],
                       act_clip=q["act_clip"], quantize_embeddings=q["quantize_embeddings"])
    return model.eval()


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 1e6


def save_models(logger: tracking.RunLogger, trial: ResolvedTrial, student: nn.Module, tokenizer,
                snapshot: BestSnapshot) -> dict[str, float]:
    """Log the models `output.keep_models` asks for as run artifacts (model/best, model/last) and tag each
    folder's URI; returns the size metrics. The last student is saved first: saving the best one loads the
    snapshot into `student`."""
    keep = trial.output.keep_models
    quant = quant_settings(trial)
    metrics = {"model/packed_mb": packed_mb(student)}
    wanted = [] if keep == "none" else ["last", "best"] if keep == "best+last" else ["best"]
    tags = {}
    for which in wanted:
        if which == "best":
            if snapshot.state is None:
                tags[runs.MODEL_NOTE] = "no best-dev student: the last stage evaluated no dev score"
                continue
            student.load_state_dict(snapshot.state)
        with tempfile.TemporaryDirectory(prefix="kdp_model_") as tmp:
            folder = save_student(student, tokenizer, Path(tmp) / which, quant)
            metrics[f"model/{which}_artifact_mb"] = folder_mb(folder)
            path = ARTIFACT_DIR.format(which=which)
            tracking.retry(lambda: logger.client.log_artifacts(logger.run_id, str(folder), path), "log model")
        uri = tracking.retry(lambda: logger.client.get_run(logger.run_id), "read run").info.artifact_uri
        tags[MODEL_TAG.format(which=which)] = f"{uri}/{path}"
    if tags:
        logger.set_tags(tags)
    return metrics


# ------------------------------------------------------------------------------------- `kdplatform export`
class ExportError(ValueError):
    """An export that cannot be done (unknown run, no model artifact, a non-empty destination): one line."""


def export_run_model(tracking_uri: str, run_id: str, dest: Path, which: str = "best") -> Path:
    """Download a run's `model/<which>` artifact into `dest` (a new or empty folder); a quantized student
    gets a README.md saying how to load it. Returns `dest`."""
    import shutil

    from mlflow.exceptions import MlflowException

    from kdplatform import runs

    where = tracking.redact(tracking_uri)
    if runs.store_missing(tracking_uri):
        raise ExportError(f"no tracking store at {where}: pass --tracking-uri (the store the run was logged to)")
    c = tracking.client(tracking_uri)
    try:
        run = c.get_run(run_id)
    except MlflowException as e:
        raise ExportError(f"no run {run_id!r} in {where} (student run ids: `kdplatform ls --sweep PARENT_RUN_ID`; "
                          "parent run ids: `kdplatform ls`)") from e
    path = ARTIFACT_DIR.format(which=which)
    if not c.list_artifacts(run_id, path):
        role = run.data.tags.get(runs.ROLE, "unknown")
        raise ExportError(f"run {run_id} ({role}) has no {path} artifact: students save it when they finish, "
                          f"as output.keep_models says ('best' by default; 'best+last' for the last one)")
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ExportError(f"{dest} exists and is not an empty folder: name a new one")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".kdp_export_", dir=dest.parent) as tmp:
        got = Path(c.download_artifacts(run_id, path, tmp))
        if dest.exists():
            dest.rmdir()
        shutil.move(str(got), dest)  # whole, or not at all: nothing half-written in dest
    if (dest / QUANT_FILE).is_file():
        (dest / "README.md").write_text(f"Student of MLflow run {run_id} ({run.info.run_name}): {LOAD_HINT}.\n")
    return dest
