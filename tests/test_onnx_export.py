"""ONNX and int8 export of student runs, and `kdplatform bench`, on tiny real trials (the tiny random BERT of
conftest fine-tuned on 32 real SST-2 / STS-B examples): the exported files load in onnxruntime and predict
what the PyTorch student predicts, a QAT student's int8 weights are exactly its trained ternary codes (checked
against the TWN formula computed here from the latent weights), a failed agreement check writes nothing and
exits 2, and the bench metrics are read back from MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import cli_env, tiny_sst2, write_yaml

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

TRIAL = """name: onnx_{task}
task: {task}
method: kd
bits: {bits}
act_bits: {act_bits}
{tiny}
train:
  - {{name: pred, max_steps: 4, eval_every: 2, batch_size: 16, lr: 5.0e-4}}
speed: {{precision: fp32}}
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('onnx_store') / 'mlflow.db'}"


def _trial_run(tmp_path: Path, store: str, glue_dir: Path, teacher: Path, task: str = "sst2", bits: int = 32,
               act_bits: int = 32) -> str:
    from kdplatform.config import load_trials
    from kdplatform.distill.worker import run_trial

    text = TRIAL.format(task=task, bits=bits, act_bits=act_bits, tiny=tiny_sst2(glue_dir, teacher, seq=32, layers=2))
    _, trials, _ = load_trials(write_yaml(tmp_path / f"{task}_{bits}.yaml", text))
    return run_trial(trials[0], tracking_uri=store).run_id


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory, store, glue_dir, tiny_bert_dir) -> str:
    return _trial_run(tmp_path_factory.mktemp("kd"), store, glue_dir, tiny_bert_dir)


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory, store, glue_dir, tiny_bert_dir) -> str:
    return _trial_run(tmp_path_factory.mktemp("qat"), store, glue_dir, tiny_bert_dir, bits=2, act_bits=8)


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdplatform.cli", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=cli_env(tmp_path))


def _ort_logits(path: Path, folder: Path, texts: list[str]) -> np.ndarray:
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(folder)(texts, padding=True, return_tensors="np")
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(["logits"], {i.name: enc[i.name].astype(np.int64) for i in s.get_inputs()})[0]


TEXTS = ["a gorgeous, witty, seductive movie .", "the plot is nothing but boilerplate clichés", "it 's a film"]


@pytest.mark.slow
def test_kd_student_exports_to_onnx_int8_through_the_cli(tmp_path, store, kd_run):
    from kdplatform.distill.export import export_run_model, load_student

    dest = tmp_path / "deployed"
    proc = _cli(tmp_path, "export", kd_run, str(dest), "--format", "onnx", "--int8", "--tracking-uri", store)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "model_int8.onnx: 32 dev examples, label agreement" in proc.stdout
    info = json.loads((dest / "agreement.json").read_text())
    assert info["agreement"]["model.onnx"]["label_agreement"] == 1.0
    assert info["agreement"]["model.onnx"]["max_abs_diff"] < 1e-4
    assert info["agreement"]["model_int8.onnx"]["examples"] == 32
    assert (dest / "model_int8.onnx").stat().st_size < (dest / "model.onnx").stat().st_size / 2

    # independent of the export's own check: ORT on fresh sentences against the PyTorch student
    model = load_student(export_run_model(store, kd_run, tmp_path / "hf"))
    enc = {k: torch.tensor(v) for k, v in
           __import__("transformers").AutoTokenizer.from_pretrained(dest)(TEXTS, padding=True).items()}
    with torch.no_grad():
        ref = model(**enc).logits.numpy()
    np.testing.assert_allclose(_ort_logits(dest / "model.onnx", dest, TEXTS), ref, atol=1e-4)
    assert np.abs(_ort_logits(dest / "model_int8.onnx", dest, TEXTS) - ref).max() < 0.05


def test_qat_student_int8_weights_are_its_trained_ternary_codes(tmp_path, store, qat_run):
    from onnx import numpy_helper

    from kdplatform.deploy.package import export_deployable
    from kdplatform.distill.export import export_run_model

    out = export_deployable(store, qat_run, tmp_path / "q", int8=True, min_agreement=0.0, say=lambda _: None)
    assert any("uint8" in n for n in out.notes)  # the one inexact part, said
    graph = onnx.load(str(out.folder / "model_int8.onnx")).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    int8 = {n[:-len("_quantized")]: a for n, a in init.items() if n.endswith("_quantized") and a.dtype == np.int8}

    # TWN from the formula, on the latent weights the run saved: alpha = mean |W| over |W| > 0.7 mean |W|
    from safetensors.torch import load_file

    latent = load_file(export_run_model(store, qat_run, tmp_path / "hf") / "model.safetensors")
    expected = {}
    for name, w in latent.items():
        if name.endswith(".weight") and "encoder.layer" in name and w.dim() == 2:
            a = w.clamp(-2.5, 2.5).abs().double()
            keep = a > 0.7 * a.mean()
            alpha = (a * keep).sum() / keep.sum()
            codes = (torch.sign(w) * keep).t().numpy().astype(np.int8)  # ONNX holds W^T
            expected[name] = (codes, float(alpha))
    assert len(int8) == len(expected) == 12  # 2 layers x (Q, K, V, attention out, FFN in, FFN out)
    matched = 0
    for base, codes in int8.items():
        scale = float(init[f"{base}_scale"])
        hits = [n for n, (c, alpha) in expected.items() if c.shape == codes.shape and np.array_equal(c, codes)]
        assert len(hits) == 1, base
        assert scale == pytest.approx(expected[hits[0]][1], rel=1e-5)
        assert set(np.unique(codes)) <= {-1, 0, 1}
        matched += 1
    assert matched == 12
    assert out.agreement["model.onnx"]["label_agreement"] == 1.0


@pytest.mark.slow
def test_failed_agreement_writes_nothing_and_exits_2(tmp_path, store, glue_dir, tiny_bert_dir):
    run_id = _trial_run(tmp_path, store, glue_dir, tiny_bert_dir, task="stsb")
    dest = tmp_path / "nope"
    proc = _cli(tmp_path, "export", run_id, str(dest), "--format", "onnx", "--int8", "--max-abs-diff", "0",
                "--tracking-uri", store)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "max abs diff" in proc.stderr and "nothing written" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not dest.exists() and not list(tmp_path.glob(".kdp_onnx_*"))
    # the same regression student passes at a threshold above its measured difference
    ok = _cli(tmp_path, "export", run_id, str(dest), "--format", "onnx", "--int8", "--max-abs-diff", "1",
              "--tracking-uri", store)
    assert ok.returncode == 0, ok.stderr
    assert "label_agreement" not in json.loads((dest / "agreement.json").read_text())["agreement"]["model.onnx"]


@pytest.mark.parametrize("args, message", [
    (["--int8"], "--int8 needs --format onnx"),
    (["--format", "tflite"], "--format takes hf or onnx"),
])
def test_bad_export_options_are_one_line(tmp_path, store, args, message):
    proc = _cli(tmp_path, "export", "0" * 32, str(tmp_path / "x"), *args, "--tracking-uri", store)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # a PyTorch, ONNX fp32 and int8 timing of two students (about 8 s)
def test_bench_logs_sizes_latencies_and_machine_to_the_run(tmp_path, store, kd_run, qat_run):
    from kdplatform.deploy.bench import BenchSettings, bench_run

    settings = BenchSettings(threads=1, warmup=1, iters=5, batch_iters=1)
    for run_id in (kd_run, qat_run):
        bench_run(store, run_id, settings, say=lambda _: None)
        run = MlflowClient(store).get_run(run_id)
        m, tags = run.data.metrics, run.data.tags
        for fmt in ("torch_fp32", "onnx_fp32", "onnx_int8"):
            assert m[f"deploy/{fmt}/size_mb"] > 0
            assert 0 < m[f"deploy/{fmt}/latency_p50_ms"] <= m[f"deploy/{fmt}/latency_p95_ms"]
            assert m[f"deploy/{fmt}/throughput_b32"] > 0
        if run_id == kd_run:  # the QAT student's int8 file keeps its fp32 embeddings, most of a tiny model
            assert m["deploy/onnx_int8/size_mb"] < m["deploy/onnx_fp32/size_mb"] / 2
        assert tags["kdp.deploy.threads"] == "1" and tags["kdp.deploy.seq_len"] == "32"
        assert tags["kdp.deploy.cpu"]
    bad = "0" * 32
    before = MlflowClient(store).get_run(kd_run).data.metrics["deploy/onnx_fp32/latency_p50_ms"]
    proc = _cli(tmp_path, "bench", bad, kd_run, "--iters", "2", "--warmup", "0", "--batch-iters", "1",
                "--tracking-uri", store)
    assert proc.returncode == 2 and "no run" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert f"1 of 2 runs not measured: {bad}" in proc.stderr
    # the bad id first did not stop the good one: it was measured again and logged
    history = MlflowClient(store).get_metric_history(kd_run, "deploy/onnx_fp32/latency_p50_ms")
    assert len(history) == 2 and before in [h.value for h in history], history
