"""The GPU benchmark's FLOP count and a run of it on this CPU (small shapes; the GPU figures need a GPU).

The FLOP formula (benchmarks/flops.py) is checked against torch's own FLOP counter on a real BERT classifier:
a forward over one unpadded sequence, and a training forward + backward (3x). The benchmark then runs end to
end on the CPU with a 2-layer hidden-128 teacher, and its output table must hold every system with positive
samples/s, useful FLOP/s, MFU and peak memory.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertForSequenceClassification

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from flops import device_peak_bf16, forward_flops, kd_step_flops  # noqa: E402


def _bert(layers: int, labels: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=256, num_labels=labels, attn_implementation="eager")
    return BertForSequenceClassification(cfg)


@pytest.mark.parametrize("length", [7, 40])
def test_forward_flops_equal_torchs_count_for_an_unpadded_sequence(length):
    model = _bert(3, labels=3).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=torch.randint(5, 1000, (1, length)))
    assert forward_flops([length], layers=3, hidden=64, intermediate=256, num_labels=3) == counter.get_total_flops()


def test_a_kd_step_counts_the_teacher_forward_and_the_student_forward_and_backward():
    teacher, student = _bert(4).eval(), _bert(2).train()
    lengths = [11, 23]
    with FlopCounterMode(display=False) as counter:
        for n in lengths:  # one sequence at a time: no padding
            ids = torch.randint(5, 1000, (1, n))
            with torch.no_grad():
                teacher(input_ids=ids)
            student(input_ids=ids).logits.sum().backward()
    shape = {"hidden": 64, "intermediate": 256}
    assert kd_step_flops(lengths, {"layers": 4, **shape}, {"layers": 2, **shape}) == counter.get_total_flops()


def test_known_devices_have_their_dense_bf16_peak():
    assert device_peak_bf16("NVIDIA H200") == 989e12
    assert device_peak_bf16("NVIDIA A100-SXM4-80GB") == 312e12
    assert device_peak_bf16("NVIDIA H100 PCIe") == 756e12
    assert device_peak_bf16("Some Future GPU") is None


@pytest.mark.slow
def test_bench_gpu_runs_on_the_cpu_and_reports_every_system(tmp_path, glue_dir, minilm):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_gpu.py"), "--device", "cpu", "--small", "--tasks",
                           "sst2", "--examples", "64", "--threads", "1", "--trials", "2", "--cache-source",
                           "timed", "--batch", "8", "--glue-dir",  # 8 steps an epoch: the cache decides
                           str(glue_dir), "--tokenizer", minilm, "--work", str(tmp_path / "work"), "--json",
                           str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"].startswith("CPU")
    rows = {r["system"]: r for r in report["rows"]}
    assert set(rows) == {"worker", "worker_nocache", "plain", "ceiling", "packed x2"}
    for name, r in rows.items():
        for field in ("samples_per_s", "useful_flops", "mfu", "executed_of_peak", "peak_mem_mb", "mean_tokens"):
            assert r[field] > 0, (name, field, r)
        assert r["mfu"] < 1, (name, r)
    assert rows["packed x2"]["trials"] == 2
    worker = rows["worker"]  # timed (auto on a GPU): the row says what the cache chose and why
    assert worker["cache_source"] == ("recompute" if worker["cache_read_ms"] > worker["cache_forward_ms"] else "read")
    if worker["cache_source"] == "read":
        assert worker["executed_of_peak"] < worker["mfu"], "cached teacher forwards are not executed"
    else:
        assert worker["executed_of_peak"] == worker["mfu"]
    assert rows["plain"]["executed_of_peak"] == rows["plain"]["mfu"]
    assert rows["ceiling"]["mean_tokens"] == 128
    assert rows["worker"]["mean_tokens"] == rows["plain"]["mean_tokens"] < 128, "the same real SST-2 batches"
    for column in ("samples_per_s", "useful_TFLOP/s", "mfu", "peak_mem_mb"):
        assert column in proc.stdout, column


def _arrive(folder: str, delay: float, out) -> None:
    from bench_gpu import Barrier

    time.sleep(delay)
    Barrier(folder, n=2, timeout=60).wait()
    out.put(time.time())


def test_packed_trials_start_their_timed_windows_together(tmp_path):
    """The barrier before the timed epoch: a trial that arrives first waits for the late one, so packed trials
    are timed while they share the device, not one after the other."""
    ctx = multiprocessing.get_context("fork")  # the children only wait and touch files
    out = ctx.Queue()
    start = time.time()
    procs = [ctx.Process(target=_arrive, args=(str(tmp_path / "barrier"), delay, out)) for delay in (0.0, 1.5)]
    for p in procs:
        p.start()
    passed = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert passed[0] - start >= 1.4, "the early trial went on without waiting for the late one"
    assert passed[1] - passed[0] < 0.5
