"""What the tests that drive a real `kdplatform sweep` on a local Ray cluster share: one tiny sweep file (one
kd trial of a 2-layer student on 64 real SST-2 examples, a ready teacher checkpoint so no fine-tune runs), the
ready checkpoint, the driver's environment (offline, a private Ray temp folder), its command line, and the
clean-up and wait that every such test needs."""

from __future__ import annotations

import glob
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_env

TINY_SWEEP_SPEC = """
name: {name}
task: sst2
method: kd
data: {{glue_dir: {glue}, source: glue_dir, max_train_examples: 64, max_dev_examples: 32,
        train_eval_examples: 32, max_seq_length: 32}}
teacher: {{checkpoint: {ckpt}, model: {teacher}}}
student: {{init: truncate, layers: 2}}
train:
  - {{name: pred, epochs: 2, batch_size: 16, eval_every: 2}}
seeds: [1]
resources: {{cpu: 1}}
"""


def teacher_checkpoint(tiny_bert_dir: Path, folder: Path) -> Path:
    """A ready teacher checkpoint (random weights, 2 labels) built from the tiny BERT: no teacher fine-tune."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    BertForSequenceClassification(BertConfig.from_pretrained(tiny_bert_dir, num_labels=2)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(folder)
    return folder


def sweep_env(tmp_path: Path, ray_tmp: Path, **extra: str) -> dict[str, str]:
    """The driver's environment: a user's (`conftest.cli_env`), with Ray's session under `ray_tmp`, the cache
    under `tmp_path` and no MLflow settings of the caller's shell; plus `extra`."""
    shell = {k: v for k, v in cli_env(tmp_path).items() if not k.startswith("MLFLOW_")}
    return {**shell, "RAY_TMPDIR": str(ray_tmp), "KDP_CACHE_DIR": str(tmp_path / "cache"), **extra}


def sweep_cmd(spec: Path, uri: str, *more: str) -> list[str]:
    return [sys.executable, "-m", "kdplatform.cli", "sweep", str(spec), "--tracking-uri", uri, "--num-cpus", "1",
            *more]


def kill_session_leftovers(ray_tmp: Path) -> None:
    """Ray processes of this test that outlived it (only if the test failed half-way)."""
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            if str(ray_tmp) in Path(cmdline).read_text():
                os.kill(int(Path(cmdline).parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def sleep_until_checkpointed(tmp_path: Path, driver, log: Path) -> None:
    """Wait until a trial under tmp_path/ray_results has checkpointed and Ray has saved its experiment state
    after it (so a resume finds the checkpoint); fail with the driver's log after 300 s."""
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        ckpts = glob.glob(str(tmp_path / "ray_results" / "*" / "*" / "checkpoint_*"))
        states = glob.glob(str(tmp_path / "ray_results" / "*" / "experiment_state-*.json"))
        if ckpts and states and max(map(os.path.getmtime, states)) > os.path.getmtime(ckpts[0]):
            return
        time.sleep(0.2)
    pytest.fail("no trial checkpointed: " + log.read_text()[-3000:])
