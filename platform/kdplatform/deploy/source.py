"""A student run's saved model and resolved trial, fetched from MLflow into a local folder.

>>> s = fetch_student("sqlite:////abs/mlflow.db", RUN_ID, Path("tmp"))       # doctest: +SKIP
>>> s.trial.task, s.model(**batch).logits                                      # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from kdplatform import tracking
from kdplatform.config import ResolvedTrial
from kdplatform.distill.export import ExportError, export_run_model, load_student

CONFIG_ARTIFACT = "config.yaml"  # the resolved trial every student run logs (distill/student.py)


@dataclass
class RunStudent:
    run_id: str
    trial: ResolvedTrial
    folder: Path  # the Hugging Face folder (latent weights + quantization.json for a QAT student)

    def model(self):
        """The student in eval mode, quantized as it was trained (`load_student`)."""
        return load_student(self.folder)

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.folder)

    def weights_mb(self) -> float:
        """Size on disk of the PyTorch weights (the safetensors files), in MB."""
        return sum(f.stat().st_size for f in self.folder.glob("*.safetensors")) / 1e6


def fetch_student(tracking_uri: str, run_id: str, workdir: Path, which: str = "best") -> RunStudent:
    """Download run `run_id`'s model/<which> folder into `workdir`/hf and read its resolved trial.
    Raises ExportError (one line) for an unknown run or a run without a model."""
    folder = export_run_model(tracking_uri, run_id, Path(workdir) / "hf", which)
    c = tracking.client(tracking_uri)
    try:
        text = Path(c.download_artifacts(run_id, CONFIG_ARTIFACT, str(workdir))).read_text()
    except Exception as e:  # noqa: BLE001 - MLflow raises several types for a missing artifact
        raise ExportError(f"run {run_id} has no {CONFIG_ARTIFACT} artifact (logged by every student run): "
                          f"it cannot say which task and dev set to check against") from e
    return RunStudent(run_id, ResolvedTrial.model_validate(yaml.safe_load(text)), folder)
