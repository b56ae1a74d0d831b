"""`speed.device: cuda` on a machine without a CUDA GPU: refused before anything starts (exit 2).

`kdplatform run` and `kdplatform sweep` (on its own local Ray) each print one line naming the file, the field
and the fix, no traceback, and leave the MLflow store and Ray's results uncreated. A sweep on another
cluster (`--address`) is not refused here: its nodes have their own devices.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")

SPEC = """
name: nogpu
task: sst2
teacher: {model: minilm-l6}
student: {init: truncate, layers: 2}
speed: {device: cuda}
seeds: [1]
"""


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "sweep"])
def test_cuda_without_a_gpu_is_refused_before_anything_starts(tmp_path, glue_dir, command):
    spec = tmp_path / "gpu.yaml"
    spec.write_text(SPEC)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KDP_GLUE_DIR": str(glue_dir), "KDP_CACHE_DIR": str(tmp_path / "c")}
    db = tmp_path / "mlflow.db"
    proc = subprocess.run([sys.executable, "-m", "kdplatform.cli", command, str(spec), "--tracking-uri",
                           f"sqlite:///{db}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"{spec}: speed.device: cuda, but torch sees no CUDA GPU" in err, err
    assert "fix: set speed.device: auto" in err and "Traceback" not in proc.stderr + proc.stdout
    assert not db.exists(), "nothing written: the tracking store was not even created"
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "c" / "teachers").exists()

