"""End to end, as a user would: a fresh quickstart store (the real MiniLM-L6 teacher, real SST-2, tiny
overrides), its kd student and a 2-bit QAT student exported to ONNX int8 through the command line, both
loaded in onnxruntime, the agreement printed (>= 99% of dev labels for kd), the int8 file smaller than the
fp32 one, and `kdplatform bench` logging the batch-1 latency, read back from MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import cli_env

ort = pytest.importorskip("onnxruntime")
REPO = Path(__file__).resolve().parents[1]
TINY = ["data.max_train_examples=200", "data.max_dev_examples=128", "teacher.finetune.epochs=1",
        "train=[{name: pred, epochs: 1, lr: 5.0e-4, batch_size: 32, eval_every: 7}]", "grid.method=[kd]"]


def _cli(tmp_path: Path, glue_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = cli_env(tmp_path, KDP_GLUE_DIR=str(glue_dir))
    proc = subprocess.run([sys.executable, "-m", "kdplatform.cli", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.e2e
def test_quickstart_kd_and_2bit_students_deploy_as_onnx_int8(tmp_path, glue_dir, minilm):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    quickstart = str(REPO / "sweeps" / "quickstart.yaml")
    _cli(tmp_path, glue_dir, "run", quickstart, *TINY, "--tracking-uri", store)
    _cli(tmp_path, glue_dir, "run", quickstart, *TINY, "bits=2", "act_bits=8", "--tracking-uri", store)
    c = MlflowClient(store)
    students = {r.data.params["bits"]: r.info.run_id for r in
                c.search_runs([e.experiment_id for e in c.search_experiments()], "tags.`kdp.role` = 'student'")}
    assert set(students) == {"32", "2"}

    for bits, run_id in students.items():
        dest = tmp_path / f"deployed_b{bits}"
        floor = "0.99" if bits == "32" else "0"  # the kd student must agree; the QAT one is reported
        out = _cli(tmp_path, glue_dir, "export", run_id, str(dest), "--format", "onnx", "--int8",
                   "--min-agreement", floor, "--tracking-uri", store).stdout
        assert "model_int8.onnx: 128 dev examples, label agreement" in out
        info = json.loads((dest / "agreement.json").read_text())
        if bits == "32":
            assert info["agreement"]["model_int8.onnx"]["label_agreement"] >= 0.99
        assert (dest / "model_int8.onnx").stat().st_size < (dest / "model.onnx").stat().st_size
        from transformers import AutoTokenizer

        enc = AutoTokenizer.from_pretrained(dest)(["a gorgeous , witty movie ."], return_tensors="np")
        s = ort.InferenceSession(str(dest / "model_int8.onnx"), providers=["CPUExecutionProvider"])
        logits = s.run(["logits"], {i.name: enc[i.name].astype(np.int64) for i in s.get_inputs()})[0]
        assert logits.shape == (1, 2) and np.isfinite(logits).all()

    _cli(tmp_path, glue_dir, "bench", *students.values(), "--iters", "10", "--batch-iters", "2",
         "--tracking-uri", store)
    for run_id in students.values():
        run = c.get_run(run_id)
        assert run.data.metrics["deploy/onnx_int8/latency_p50_ms"] > 0
        assert run.data.tags["kdp.deploy.threads"] == "1"
