"""The dry run's "this machine" section: what the plan needs against what this machine has, before anything runs.

- GPUs: the trials' and teachers' `resources.gpu` against the GPUs torch sees here. A local Ray cluster
  without them would leave GPU trials pending forever, so `kdplatform sweep` refuses (`gpu_refusal`) unless
  `--num-gpus 0` runs them on the CPU (`cpu_only_resources`: the requests dropped).
- The hub: models and GLUE data that would be downloaded (not a local folder, a pip-packaged model or in the
  Hugging Face cache), against offline mode (HF_HUB_OFFLINE) or a hub that does not answer.
- Hours: teacher fine-tuning and student trials, from the measured throughput table `throughput.json`
  (written by benchmarks/bench_throughput.py, with its source): examples x epochs / examples per second, for
  the model's size and sequence length; a size not in the table is scaled from the nearest measured row by
  its FLOPs per example. Batches are length-grouped (little padding), so the length is the data's mean tokens
  per example (train and dev apart) where the data and the tokenizer are local, else max_seq_length (an upper
  bound); no quantization overhead: a rough figure.
- Disk: teacher checkpoints, the student models kept, hub downloads; the teacher-output cache's bound beside.

>>> for label, text, warn in machine_lines(plan, teacher_outcomes, address=None, num_gpus=None):  # doctest: +SKIP
...     print(label, text)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from kdplatform import paths
from kdplatform.config import ResolvedTrial
from kdplatform.config.models import model_depth, model_width
from kdplatform.loss_menu import needs_teacher
from kdplatform.task_table import TASKS

THROUGHPUT_TABLE = Path(__file__).with_name("throughput.json")
HUB_PROBE_S = 3.0  # how long the dry run waits for the hub to answer
VOCAB = 30522  # BERT's vocabulary: the embedding's share of a model's parameters
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


# ------------------------------------------------------------------------------------------------ GPUs
def visible_gpus() -> int:
    """CUDA GPUs torch sees here (CUDA_VISIBLE_DEVICES applies); 0 without a CUDA build of torch."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_requests(spec) -> tuple[float, float]:
    """(GPUs per student trial, GPUs per teacher task) as the sweep file asks."""
    r = spec.resources
    return r.gpu, r.teacher_gpu if r.teacher_gpu is not None else r.gpu


def gpu_refusal(spec, address: str | None, num_gpus: int | None) -> str | None:
    """Why a local sweep cannot start here (trials ask for GPUs, torch sees none, no --num-gpus), else None."""
    student, teacher = gpu_requests(spec)
    if address or num_gpus is not None or not (student or teacher) or visible_gpus():
        return None
    return (f"the trials ask for GPUs (resources: gpu {student:g} per trial, teacher_gpu {teacher:g}) and torch "
            "sees no GPU on this machine: on a local Ray cluster they would wait forever")


def cpu_only_resources(spec):
    """The spec with every GPU request dropped (`--num-gpus 0`: the trials run on the CPU)."""
    resources = spec.resources.model_copy(update={"gpu": 0.0, "teacher_gpu": 0.0})
    return spec.model_copy(update={"resources": resources})


# ------------------------------------------------------------------------------------------------- hub
def offline_setting() -> str | None:
    for var in OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def hub_answers(timeout: float = HUB_PROBE_S) -> bool:
    """Whether the hub's host accepts a TCP connection (HF_ENDPOINT, default huggingface.co:443)."""
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_models(trials: list[ResolvedTrial], teacher_trials: list[ResolvedTrial]) -> list[str]:
    """Hub ids of the models these trials would download: teachers to fine-tune and students initialised from a
    named model, when not a local folder, a pip-packaged model or already in the Hugging Face cache."""
    from kdplatform.distill.models import resolve_model

    names = [t.teacher.model for t in teacher_trials]
    names += [t.student.init for t in trials if t.student.init not in ("truncate", "teacher_copy")]
    out: list[str] = []
    for name in dict.fromkeys(names):
        ref = resolve_model(name)
        if not Path(ref).is_dir() and not _in_hf_cache(ref) and ref not in out:
            out.append(ref)
    return out


def _in_hf_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def hub_tasks(trials: list[ResolvedTrial]) -> list[str]:
    """The tasks whose GLUE data these trials read through `datasets` (the hub) rather than local files."""
    from kdplatform.distill.tasks import reads_hub

    tasks = [x for t in trials if reads_hub(t.data.source, t.data.glue_dir, t.data.hub_dataset)
             for x in (t.task, *t.data.supplementary_tasks)]
    return list(dict.fromkeys(tasks))


# ----------------------------------------------------------------------------------------------- hours
@dataclass(frozen=True)
class Rate:
    train: float  # examples per second, forward + backward + optimizer step
    forward: float  # examples per second, inference only


def load_table(path: Path = THROUGHPUT_TABLE) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def flops_per_example(layers: int, width: int, seq: int) -> float:
    """Forward FLOPs of one sequence through a BERT-like encoder (projections, FFN 4x, attention)."""
    return 2.0 * layers * seq * (12 * width * width + 2 * seq * width)


def rate_for(table: dict, device: str, layers: int, width: int, seq: int) -> Rate | None:
    """Measured examples/s for this size and length, else the nearest measured row scaled by FLOPs; None when
    the table has no row for `device`."""
    rows = table.get(device, {}).get("rows", [])
    if not rows:
        return None
    want = flops_per_example(layers, width, seq)
    best = min(rows, key=lambda r: (abs(math.log(flops_per_example(r["layers"], r["width"], r["seq"]) / want)),
                                    r["width"] != width))
    scale = flops_per_example(best["layers"], best["width"], best["seq"]) / want
    return Rate(best["train_examples_per_s"] * scale, best["forward_examples_per_s"] * scale)


def train_examples(trial: ResolvedTrial) -> int:
    n = TASKS[trial.task].sizes[0]
    return min(n, trial.data.max_train_examples) if trial.data.max_train_examples else n


def dev_examples(trial: ResolvedTrial) -> int:
    n = TASKS[trial.task].sizes[1]
    return min(n, trial.data.max_dev_examples) if trial.data.max_dev_examples else n


LENGTH_SAMPLE = 2000  # examples tokenized per split for the mean length: enough for +-1 token, about a second


@dataclass(frozen=True)
class Lengths:
    train: float  # mean tokens per training example, after truncation
    dev: float
    measured: bool  # False: both are max_seq_length, the data or tokenizer not local


@lru_cache(maxsize=64)
def _mean_lengths(task: str, source: str, glue_dir: str | None, hub_dataset: str | None, model: str,
                  max_len: int) -> Lengths:
    from kdplatform.distill.models import load_tokenizer, resolve_model
    from kdplatform.distill.tasks import TASKS as SPECS, downsample, load_split, reads_hub

    def mean(tokenizer, split: str) -> float:
        data = downsample(load_split(task, split, source=source, glue_dir=glue_dir), LENGTH_SAMPLE, 0)
        texts = (list(data.text_a),) + ((list(data.text_b),) if data.text_b is not None else ())
        ids = tokenizer(*texts, truncation=True, max_length=max_len)["input_ids"]
        return sum(map(len, ids)) / max(len(ids), 1)

    upper_bound = Lengths(max_len, max_len, False)
    try:
        if reads_hub(source, glue_dir, hub_dataset) or not Path(resolve_model(model)).is_dir():
            return upper_bound  # measuring would download
        tokenizer = load_tokenizer(model)
        return Lengths(mean(tokenizer, "train"), mean(tokenizer, SPECS[task].dev_splits[0]), True)
    except Exception:  # noqa: BLE001 -- a missing split or tokenizer file: the run itself says so; an estimate
        return upper_bound  # must never break the dry run


def mean_lengths(trial: ResolvedTrial) -> Lengths:
    """Mean tokens per train and dev example of this trial's task, as its teacher's tokenizer cuts them."""
    d = trial.data
    glue_dir = d.glue_dir if d.glue_dir is not None else paths.glue_dir()  # the folder load_split would read
    glue_dir = str(glue_dir) if glue_dir is not None else None
    return _mean_lengths(trial.task, d.source, glue_dir, d.hub_dataset, trial.teacher.model, d.max_seq_length)


def teacher_seconds(trial: ResolvedTrial, table: dict, device: str) -> float | None:
    """Fine-tuning one teacher: its epochs over the train set, one dev evaluation per epoch (or per eval_every)."""
    layers, width = trial.teacher_layers, model_width(trial.teacher.model) or 768
    lengths = mean_lengths(trial)
    rate, dev_rate = (rate_for(table, device, layers, width, n) for n in (lengths.train, lengths.dev))
    if rate is None:
        return None
    ft = trial.teacher.finetune
    n = train_examples(trial)
    seen = min(n * ft.epochs, ft.max_steps * ft.batch_size) if ft.max_steps else n * ft.epochs
    evals = seen // (ft.eval_every * ft.batch_size) if ft.eval_every else ft.epochs
    return seen / rate.train + evals * dev_examples(trial) / dev_rate.forward


def student_seconds(trial: ResolvedTrial, table: dict, device: str) -> float | None:
    """One student trial: per stage, the student's training, the teacher's forward passes (once when its
    outputs are cached, every epoch under mixup) and the evaluations on dev and the train-eval subset."""
    lengths = mean_lengths(trial)
    t_width = model_width(trial.teacher.model) or 768
    s_width = t_width if trial.student.init in ("truncate", "teacher_copy") else model_width(trial.student.init)
    student = rate_for(table, device, trial.student_layers, s_width or t_width, lengths.train)
    student_dev = rate_for(table, device, trial.student_layers, s_width or t_width, lengths.dev)
    teacher = rate_for(table, device, trial.teacher_layers, t_width, lengths.train)
    if student is None or teacher is None:
        return None
    total = 0.0
    cached = trial.speed.teacher_cache.enabled
    for stage in trial.train:
        n = train_examples(trial) + (trial.data.supplementary_examples or 0) * len(trial.data.supplementary_tasks)
        seen = min(n * stage.epochs, stage.max_steps * stage.batch_size) if stage.max_steps else n * stage.epochs
        teacher_passes = n if cached and stage.reads_teacher_cache else seen
        if not needs_teacher(t.name for t in stage.losses):
            teacher_passes = 0
        evals = seen // (stage.eval_every * stage.batch_size) if stage.eval_every else stage.epochs
        scoring = dev_examples(trial) / student_dev.forward + trial.data.train_eval_examples / student.forward
        total += seen / student.train + teacher_passes / teacher.forward + evals * scoring
    return total


# ------------------------------------------------------------------------------------------------ disk
def parameters(layers: int, width: int) -> int:
    """Parameters of a BERT-like classifier: embeddings, `layers` blocks (attention + FFN 4x), pooler."""
    return (VOCAB + 512 + 2) * width + layers * (12 * width * width + 13 * width) + width * width + width


def disk_bytes(trials: list[ResolvedTrial], teacher_trials: list[ResolvedTrial], hub_ids: list[str]) -> dict:
    """Bytes the sweep writes, by kind (fp32 weights; MLflow metrics and Ray's checkpoints left out)."""
    def width_of(t: ResolvedTrial) -> int:
        return model_width(t.teacher.model) or 768

    keep = {"none": 0, "best": 1, "best+last": 2}
    teachers = sum(4 * parameters(t.teacher_layers, width_of(t)) for t in teacher_trials)
    students = sum(4 * keep[t.output.keep_models] * parameters(t.student_layers, width_of(t)) for t in trials)
    downloads = sum(4 * parameters(model_depth(h) or 12, model_width(h) or 768) for h in hub_ids)
    return {"teacher checkpoints": teachers, "student models": students, "model downloads": downloads}


def cache_bound_gb(trials: list[ResolvedTrial]) -> float:
    """The teacher-output cache's size bound (shared by every sweep on this cache folder): at most this."""
    return max((t.speed.teacher_cache.max_gb for t in trials if t.speed.teacher_cache.enabled), default=0.0)


# ---------------------------------------------------------------------------------------------- report
def _hours(seconds: float) -> str:
    h = seconds / 3600
    return f"{h:,.0f}" if h >= 10 else f"{h:.1f}" if h >= 0.1 else f"{h:.2f}"


def _span(seconds: float) -> str:
    days = seconds / 86400
    return f"{days:,.0f} days" if days >= 2 else f"{seconds / 3600:.1f} hours"


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def machine_lines(plan, teacher_trials: list[ResolvedTrial], *, address: str | None, num_gpus: int | None,
                  storage: Path | None = None) -> list[tuple[str, str, bool]]:
    """(label, text, is_warning) rows of the dry run's "this machine" section."""
    rows: list[tuple[str, str, bool]] = []
    trials = plan.to_run
    student_gpu, teacher_gpu = gpu_requests(plan.spec)
    gpus = 0 if address else visible_gpus()
    if address:
        rows.append(("GPUs", f"the cluster at {address} brings its own (not checked here)", False))
    elif num_gpus == 0 and (student_gpu or teacher_gpu):
        rows.append(("GPUs", "--num-gpus 0: the trials' GPU requests are dropped, everything runs on the CPU", True))
    elif gpu_refusal(plan.spec, address, num_gpus):
        rows.append(("GPUs", f"none visible, but each trial asks {student_gpu:g} GPU and each teacher "
                     f"{teacher_gpu:g}: `kdplatform sweep` refuses to start here (on a local Ray cluster they "
                     "would wait forever); add --num-gpus 0 to run them on the CPU (hours below), or run on a "
                     "GPU machine or join a cluster with --address", True))
    else:
        rows.append(("GPUs", f"{gpus} visible; each trial asks {student_gpu:g}, each teacher {teacher_gpu:g}", False))

    models, tasks = hub_models(trials, teacher_trials), hub_tasks(trials)
    if models or tasks:
        wants = ", ".join([*models, *([f"GLUE data for {', '.join(tasks)} (nyu-mll/glue)"] if tasks else [])])
        offline = offline_setting()
        if offline:
            rows.append(("hub", f"would download {wants}, but {offline} is set: those loads fail; fix: "
                         "set KDP_GLUE_DIR to a local GLUE copy, point teacher.model at a local folder, or run "
                         f"without {offline} on a machine that reaches the hub", True))
        elif not hub_answers():
            rows.append(("hub", f"would download {wants}, but the hub does not answer from here "
                         f"({os.environ.get('HF_ENDPOINT') or 'huggingface.co'}:443); fix: set KDP_GLUE_DIR to a "
                         "local GLUE copy and point teacher.model at a local folder, or run where the hub is "
                         "reachable", True))
        else:
            rows.append(("hub", f"will download {wants}", False))
    else:
        rows.append(("hub", "nothing to download: data and models are local", False))

    rows += _hour_rows(trials, teacher_trials, use_gpu=bool(gpus and (student_gpu or teacher_gpu)
                                                             and num_gpus != 0))
    by_kind = disk_bytes(trials, teacher_trials, models)
    total = sum(by_kind.values())
    parts = ", ".join(f"{k} {_gb(v)}" for k, v in by_kind.items() if v)
    folder = Path(storage or ".").resolve()
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    cache = cache_bound_gb(trials)
    cache_text = f", plus the teacher-output cache (at most {cache:g} GB, shared)" if cache else ""
    rows.append(("disk", f"about {_gb(total)} ({parts or 'nothing'}){cache_text}; {_gb(free)} free under "
                 f"{folder}", total > free))
    return rows


def _length_note(trials: list[ResolvedTrial]) -> str:
    """The sequence lengths the hours assume, per task: measured means, or max_seq_length as an upper bound."""
    parts = []
    for task, lengths in dict((t.task, mean_lengths(t)) for t in trials).items():
        parts.append(f"{task} {lengths.train:.0f}/{lengths.dev:.0f}" + (
            "" if lengths.measured else " (max_seq_length, an upper bound: data or tokenizer not local)"))
    return "mean tokens per train/dev example " + ", ".join(parts)


def _hour_rows(trials: list[ResolvedTrial], teacher_trials: list[ResolvedTrial], use_gpu: bool) -> list:
    table = load_table()
    out = []
    for device, label in (("cpu", "CPU"), ("cuda", "GPU")):
        t_s = [teacher_seconds(t, table, device) for t in teacher_trials]
        s_s = [student_seconds(t, table, device) for t in trials]
        if any(x is None for x in t_s + s_s) or (not t_s and not s_s):
            text = "no GPU measurement in the throughput table" if device == "cuda" else \
                "no CPU measurement in the throughput table"
            if t_s or s_s:
                out.append((f"{label} hours", text, False))
            continue
        threads = table[device].get("threads", 0)
        unit = "GPU-h" if device == "cuda" else "core-h" if threads == 1 else f"h at {threads} threads"
        text = f"teachers {_hours(sum(t_s))} {unit} ({len(t_s)} to train), students {_hours(sum(s_s))} {unit} " \
               f"({len(s_s)} trials)"
        if device == "cpu" and threads == 1:  # core-hours spread over this machine's cores, at best
            text += f"; on this machine's {os.cpu_count()} cores about {_span(sum(t_s + s_s) / os.cpu_count())}"
        text += f"; from {table[device]['source'].split(':')[0]}; {_length_note(trials or teacher_trials)}"
        out.append((f"{label} hours", text, device == "cpu" and not use_gpu and sum(t_s + s_s) > 24 * 3600))
    return out
