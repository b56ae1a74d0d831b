"""A disk that fills up while a fine-tuned teacher is saved (issue 14, item 6): the teacher run ends FAILED
with the reason, the half-written `.tmp<pid>` folder is removed, and `kdplatform run` exits 2 with one line
saying to free space. The full disk is real: a small tmpfs as KDP_CACHE_DIR (root only; skipped otherwise).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import tiny_sst2
from mlflow.tracking import MlflowClient

TRIAL = """
name: diskfull
task: sst2
method: kd
{tiny}
train:
  - {{name: pred, max_steps: 2, eval_every: 2, batch_size: 16}}
"""


@pytest.fixture()
def small_disk(tmp_path):
    """A 20 MB tmpfs filled up to about 1 MB free (the tiny teacher's weights are about 4 MB)."""
    mnt = tmp_path / "cache"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'not permitted'}): the disk-full case "
                    "needs root or CAP_SYS_ADMIN")
    try:
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        with open(mnt / "filler", "wb") as f:
            f.write(b"\0" * (free - (1 << 20)))
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow
def test_a_full_disk_while_saving_the_teacher_fails_its_run_cleanly(tmp_path, glue_dir, tiny_bert_dir,
                                                                    small_disk):
    cfg = tmp_path / "t.yaml"
    cfg.write_text(TRIAL.format(tiny=tiny_sst2(glue_dir, tiny_bert_dir)))
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "KDP_CACHE_DIR": str(small_disk), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "kdplatform.cli", "run", str(cfg)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "is full" in error[0] and "free space" in error[0], proc.stderr

    teachers = small_disk / "teachers"
    assert not [p for p in teachers.iterdir() if ".tmp" in p.name], list(teachers.iterdir())
    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("diskfull").experiment_id])
    (teacher,) = [r for r in runs if r.data.tags.get("kdp.role") == "teacher"]
    assert teacher.info.status == "FAILED"
    assert "No space left on device" in teacher.data.tags["kdp.failure_reason"] or \
        "StorageFull" in teacher.data.tags["kdp.failure_reason"]
    assert [r for r in runs if r.info.status == "RUNNING"] == []
    assert not [r for r in runs if r.data.tags.get("kdp.role") == "student"], "no student started"
