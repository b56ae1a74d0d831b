"""`data.hub_dataset` end to end: a trial whose data is a local `datasets` folder (real SST-2 rows saved with
`save_to_disk` here), trained with `kdplatform run` and read back with the plain mlflow client."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import write_yaml

TRIAL = """
name: hubdata
task: sst2
method: kd
data: {{hub_dataset: {dataset}, max_dev_examples: 64, train_eval_examples: 32, max_seq_length: 32}}
teacher: {{model: {teacher}, finetune: {{epochs: 1, max_steps: 2, batch_size: 16}}}}
student: {{init: truncate, layers: 2}}
train:
  - {{name: pred, max_steps: 2, batch_size: 16}}
"""


def _save_sst2_rows(glue_dir: Path, folder: Path) -> None:
    """A DatasetDict (train 300 rows, validation 100 rows) from the real SST-2 TSVs, in the hub's columns."""
    import datasets
    import pandas as pd

    def frame(name: str, n: int):
        df = pd.read_csv(glue_dir / "SST-2" / name, sep="\t", quoting=3).head(n)
        return datasets.Dataset.from_pandas(df[["sentence", "label"]], preserve_index=False)

    datasets.DatasetDict({"train": frame("train.tsv", 300), "validation": frame("dev.tsv", 100)}).save_to_disk(folder)


def test_hub_dataset_enters_the_config_and_teacher_hashes_only_when_set(tmp_path) -> None:
    from kdplatform.config import NEUTRAL_VALUES, load_trials

    base = "name: h\ntask: sst2\nmethod: kd\n"
    plain = load_trials(write_yaml(tmp_path / "a.yaml", base))[1][0]
    other = load_trials(write_yaml(tmp_path / "b.yaml", base + "data: {hub_dataset: /data/sst2}\n"))[1][0]
    assert NEUTRAL_VALUES[("data", "hub_dataset")] is None
    assert "hub_dataset" not in plain.hashed_dict()["data"]  # unset: every earlier hash stays as it was
    assert other.hashed_dict()["data"]["hub_dataset"] == "/data/sst2"
    assert other.cfg_hash != plain.cfg_hash and other.teacher_hash != plain.teacher_hash


@pytest.mark.slow
def test_run_reads_a_local_datasets_folder_and_logs_the_source(tmp_path, glue_dir, tiny_bert_dir, mlflow_uri):
    folder = tmp_path / "sst2_rows"
    _save_sst2_rows(glue_dir, folder)
    cfg = write_yaml(tmp_path / "trial.yaml", TRIAL.format(dataset=folder, teacher=tiny_bert_dir))
    env = {**os.environ, "KDP_GLUE_DIR": str(tmp_path / "no_glue_here")}  # the folder must be what is read
    proc = subprocess.run([sys.executable, "-m", "kdplatform.cli", "run", str(cfg), "--tracking-uri", mlflow_uri],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    c = MlflowClient(mlflow_uri)
    exp = c.get_experiment_by_name("hubdata")
    runs = {r.data.tags["kdp.role"]: r for r in c.search_runs([exp.experiment_id])}
    student, teacher = runs["student"], runs["teacher"]
    assert student.info.status == "FINISHED"
    p = student.data.params
    assert p["data.source_used"] == f"disk:{folder}" and p["data.hub_dataset"] == str(folder)
    assert p["data.train_examples"] == "300"
    assert teacher.data.params["data.source_used"] == f"disk:{folder}"
    # the train set as an MLflow dataset input: name, digest, source and size, not the rows
    inputs = c.get_run(student.info.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    ds = inputs[0].dataset
    assert ds.name == "sst2/train" and str(folder) in ds.source and '"num_rows": 300' in ds.profile
    assert [t.value for t in inputs[0].tags if t.key == "mlflow.data.context"] == ["train"]
    assert 0.0 <= student.data.metrics["dev/accuracy"] <= 1.0

    # the Python API's report on this small real store (HTML only: no browser needed)
    from kdplatform import build_report

    summary = build_report(mlflow_uri, tmp_path / "report", experiment="hubdata", formats="html")
    assert summary["runs"] == 1 and Path(summary["index"]).is_file()
