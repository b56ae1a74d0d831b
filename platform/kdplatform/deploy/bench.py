"""`kdplatform bench RUN_ID...`: measured cost of a student on this machine, logged to its run.

For each of PyTorch fp32 (the student as trained, QAT quantizers included), ONNX fp32 and ONNX int8
(`onnx_export`): the file size on disk, the latency at batch 1 (p50, p95) and the throughput at batch 32,
both at the task's sequence length (inputs padded to `data.max_seq_length`, real dev sentences), after
`warmup` untimed calls, on a fixed number of threads. Logged as `deploy/<format>/<measure>` metrics with the
CPU name, thread count, sequence length and repetitions as `kdp.deploy.*` tags, so every number says the
machine and setting it was measured on.

>>> bench_run("sqlite:////abs/mlflow.db", RUN_ID, BenchSettings(threads=1))   # doctest: +SKIP
{'deploy/onnx_int8/latency_p50_ms': 3.1, ...}
"""

from __future__ import annotations

import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kdplatform import runs, tracking
from kdplatform.deploy.agreement import MODEL_KEYS
from kdplatform.deploy.onnx_export import export_int8, export_onnx, open_session
from kdplatform.deploy.source import fetch_student

FORMATS = ("torch_fp32", "onnx_fp32", "onnx_int8")
TAG_CPU, TAG_THREADS, TAG_SEQ, TAG_REPS = (runs.DEPLOY_CPU, runs.DEPLOY_THREADS, runs.DEPLOY_SEQ_LEN,
                                           runs.DEPLOY_REPETITIONS)


@dataclass(frozen=True)
class BenchSettings:
    threads: int = 1
    warmup: int = 5
    iters: int = 50  # timed batch-1 calls
    batch: int = 32
    batch_iters: int = 5  # timed batch-32 calls


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (else what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def inputs(tokenizer, texts: list[str], seq_len: int, n: int) -> dict[str, torch.Tensor]:
    """`n` real sentences (repeated when fewer) padded to `seq_len`: the task's sequence length."""
    texts = (texts * (n // max(len(texts), 1) + 1))[:n]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in MODEL_KEYS}


def time_calls(call: Callable[[], object], warmup: int, iters: int) -> np.ndarray:
    """Seconds of each of `iters` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    out = np.empty(iters)
    for i in range(iters):
        t = time.perf_counter()
        call()
        out[i] = time.perf_counter() - t
    return out


def measure(call_b1: Callable[[], object], call_bn: Callable[[], object], s: BenchSettings) -> dict[str, float]:
    b1 = time_calls(call_b1, s.warmup, s.iters) * 1000
    bn = time_calls(call_bn, 1, s.batch_iters)
    return {"latency_p50_ms": float(np.percentile(b1, 50)), "latency_p95_ms": float(np.percentile(b1, 95)),
            f"throughput_b{s.batch}": float(s.batch * len(bn) / bn.sum())}


def bench_run(tracking_uri: str, run_id: str, s: BenchSettings = BenchSettings(), which: str = "best",
              say: Callable[[str], None] = print) -> dict[str, float]:
    """Measure run `run_id`'s student in the three formats and log the metrics and tags to the run."""
    with tempfile.TemporaryDirectory(prefix="kdp_bench_") as tmp:
        student = fetch_student(tracking_uri, run_id, Path(tmp), which)
        model, tokenizer = student.model(), student.tokenizer()
        seq = student.trial.data.max_seq_length
        fp32 = export_onnx(model, tokenizer, Path(tmp) / "model.onnx", seq)
        int8 = Path(tmp) / "model_int8.onnx"
        export_int8(model, fp32, int8)
        from kdplatform.distill.tasks import load_split

        d = student.trial.data
        dev = load_split(student.trial.task, "dev", source=d.source, glue_dir=d.glue_dir, hub_dataset=d.hub_dataset)
        texts = dev.text_a[:s.batch]
        x1, xn = inputs(tokenizer, texts, seq, 1), inputs(tokenizer, texts, seq, s.batch)
        metrics = {"deploy/torch_fp32/size_mb": student.weights_mb(),
                   "deploy/onnx_fp32/size_mb": fp32.stat().st_size / 1e6,
                   "deploy/onnx_int8/size_mb": int8.stat().st_size / 1e6}
        threads_before = torch.get_num_threads()
        torch.set_num_threads(s.threads)
        try:
            with torch.inference_mode():
                got = measure(lambda: model(**x1), lambda: model(**xn), s)
            metrics.update({f"deploy/torch_fp32/{k}": v for k, v in got.items()})
            for fmt, path in (("onnx_fp32", fp32), ("onnx_int8", int8)):
                sess = open_session(path, s.threads)
                names = [i.name for i in sess.get_inputs()]
                f1 = {n: x1[n].numpy() for n in names}
                fn = {n: xn[n].numpy() for n in names}
                got = measure(lambda: sess.run(["logits"], f1), lambda: sess.run(["logits"], fn), s)
                metrics.update({f"deploy/{fmt}/{k}": v for k, v in got.items()})
        finally:
            torch.set_num_threads(threads_before)
    tags = {TAG_CPU: cpu_name(), TAG_THREADS: str(s.threads), TAG_SEQ: str(seq),
            TAG_REPS: f"warmup {s.warmup}, batch 1 x {s.iters}, batch {s.batch} x {s.batch_iters}"}
    log_measurements(tracking_uri, run_id, metrics, tags)
    for fmt in FORMATS:
        say(f"{run_id[:8]} {fmt:10s} {metrics[f'deploy/{fmt}/size_mb']:8.2f} MB  batch 1 p50 "
            f"{metrics[f'deploy/{fmt}/latency_p50_ms']:7.2f} ms  p95 {metrics[f'deploy/{fmt}/latency_p95_ms']:7.2f} ms"
            f"  batch {s.batch} {metrics[f'deploy/{fmt}/throughput_b{s.batch}']:7.1f} ex/s")
    return metrics


def log_measurements(tracking_uri: str, run_id: str, metrics: dict[str, float], tags: dict[str, str]) -> None:
    from mlflow.entities import Metric, RunTag

    c = tracking.client(tracking_uri)
    now = int(time.time() * 1000)
    tracking.retry(lambda: c.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                                       tags=[RunTag(k, v) for k, v in tags.items()]), "log deploy metrics")
