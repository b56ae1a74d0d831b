"""Worker throughput, side by side: kdplatform vs TextBrewer vs a plain PyTorch loop (not a test).

One knowledge-distillation job, three ways, on the same machine in one run:
MiniLM-L6 teacher (fine-tuned once on the subset, cached) -> its bottom 2 layers as the student, 2,048 SST-2
train examples, max length 128, batch 32, 2 epochs, logit_kd (T=1) + last-layer hidden_mse + last-layer
attention_kl, AdamW lr 1e-4, 10% warmup, clip 1.0.

- kdp, kdp_bf16: `kdplatform.distill.worker.run_trial` (dynamic padding, length-grouped batches, SDPA, the
  teacher under inference_mode and its outputs cached from the first epoch on; fp32 / bf16 autocast).
- textbrewer: TextBrewer's GeneralDistiller with the same matches, fed as its documentation shows (a DataLoader
  of dict batches padded to max length, an adaptor returning logits / hidden states / attentions, eager
  attention because it reads attention maps); the attention-KL match is registered with `register_new`.
- kdp_bf16_c16 (extra): kdp_bf16 with the teacher outputs stored as float16 (half the cache's bytes).
- textbrewer_dyn (extra): the same TextBrewer distiller fed kdplatform's dynamically padded batches, to
  separate what padding alone buys from the rest (teacher cache, SDPA, fused AdamW, bf16).
- plain: a loop in the style of the CR-ILD reference code: pad to 128, teacher recomputed every step with all
  hidden states and attentions (eager attention), fp32, `loss.item()` every step.

All systems use the same loss functions (kdplatform.distill.losses), the same student initialisation and the
same batches in the same order (kdplatform's length-grouped order; only the padding differs), so dev accuracy
compares the loops, not data order. Each system runs in its own process (peak RSS is that process's); with
--rounds 2 the order is a b c ... c b a, so load drift on a shared machine hits every system alike.
Train samples/s = examples x epochs / training wall time (from the first step, evaluation excluded);
cpu-ms/sample (process CPU time) is printed too, being less sensitive to other processes on a loaded machine.
Every system runs with the same number of torch threads (--threads, default 1: on a shared machine two OpenMP
threads that are descheduled in turn spin-wait on each other, which slows small kernels 5-10x and would
penalise whichever system has the smaller kernels).

    KDP_GLUE_DIR=../shared/data/glue python benchmarks/bench_worker.py
    python benchmarks/bench_worker.py --systems kdp,plain --examples 256 --rounds 1     # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("kdp", "kdp_bf16", "textbrewer", "plain", "textbrewer_dyn")
LR, WARMUP, WD, CLIP, TEMPERATURE = 1e-4, 0.1, 0.01, 1.0, 1.0


def trial_config(args, precision: str = "fp32", cache: bool = True, cache_dtype: str = "float32"):
    from kdplatform.config import TrialConfig, resolve_trial

    raw = {
        "name": "bench_worker", "task": "sst2", "method": "custom", "seed": args.seed,
        # subsample_seed fixed: the same subset (DATA_SEED) as the baselines' load_data and the teacher's
        "data": {"source": "glue_dir", "glue_dir": args.glue_dir, "max_train_examples": args.examples,
                 "train_eval_examples": 64, "max_seq_length": args.max_len, "subsample_seed": "fixed"},
        "teacher": {"model": "minilm-l6", "finetune": {"epochs": 3, "lr": 1e-4, "batch_size": 32, "eval_every": 0}},
        "student": {"init": "truncate", "layers": 2},
        "train": [{"name": "distill", "epochs": args.epochs, "batch_size": args.batch, "lr": LR, "warmup": WARMUP,
                   "weight_decay": WD, "max_grad_norm": CLIP, "eval_every": 0,
                   "losses": [{"name": "logit_kd", "temperature": TEMPERATURE},
                              {"name": "hidden_mse", "layer_map": "last"},
                              {"name": "attention_kl", "layer_map": "last"}]}],
        "speed": {"precision": precision, "teacher_cache": {"enabled": cache, "dtype": cache_dtype}},
    }
    if args.teacher_dir:
        raw["teacher"]["checkpoint"] = args.teacher_dir
    return resolve_trial(TrialConfig.model_validate(raw))


def ensure_bench_teacher(args) -> str:
    from kdplatform.distill.teacher import ensure_teacher

    trial = trial_config(args)
    return str(ensure_teacher(trial, f"sqlite:///{Path(args.work) / 'mlflow.db'}"))


# -------------------------------------------------------------------------------------------- children
class Clock:
    """Wall and process-CPU seconds of the training sections (evaluation subtracted)."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall += time.perf_counter() - self._w
        self.cpu += time.process_time() - self._c

    def minus(self, other: Clock) -> Clock:
        out = Clock()
        out.wall, out.cpu = self.wall - other.wall, self.cpu - other.cpu
        return out


def count_forwards(model, counter: dict | None = None) -> dict:
    """Count the examples that go through `model` (the teacher) with a forward pre-hook."""
    counter = counter if counter is not None else {"examples": 0}

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        counter["examples"] += int(ids.shape[0])

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return counter


def batch_order(args, n: int, lengths, epoch: int) -> list[list[int]]:
    """kdplatform's training order for this epoch (same seed formula as the worker's train_loader)."""
    from kdplatform.distill.tasks import length_grouped_indices

    order = length_grouped_indices(lengths, args.batch, args.seed * 1000 + 0 * 100 + epoch)
    return [order[i:i + args.batch] for i in range(0, n, args.batch)]


def load_data(args, tokenizer):
    from kdplatform.distill.tasks import downsample, load_split, tokenize
    from kdplatform.distill.data import DATA_SEED

    train = downsample(load_split("sst2", "train", glue_dir=args.glue_dir), args.examples, DATA_SEED)
    dev = load_split("sst2", "dev", glue_dir=args.glue_dir)
    tok = lambda d: [{**f, "label": y} for f, y in zip(tokenize(d, tokenizer, args.max_len), d.labels)]  # noqa
    return tok(train), tok(dev)


def padded(features, max_len: int, pad_id: int) -> dict:
    """Tensors padded to max_len, as TextBrewer's and the reference code's feature converters make them."""
    import torch

    out = {k: torch.full((len(features), max_len), pad_id if k == "input_ids" else 0, dtype=torch.long)
           for k in ("input_ids", "attention_mask", "token_type_ids")}
    for i, f in enumerate(features):
        for k in out:
            out[k][i, :len(f[k])] = torch.tensor(f[k])
    out["labels"] = torch.tensor([f["label"] for f in features])
    return out


def student_and_teacher(args, teacher_dir: str, attn: str):
    from transformers import AutoModelForSequenceClassification

    from kdplatform.distill.models import freeze, resolve_model, set_seed

    set_seed(args.seed)
    teacher = freeze(AutoModelForSequenceClassification.from_pretrained(teacher_dir, attn_implementation=attn))
    student = AutoModelForSequenceClassification.from_pretrained(
        resolve_model("minilm-l6"), num_labels=2, num_hidden_layers=2, attn_implementation=attn)
    return student, teacher


def optimizer_and_schedule(model, total: int):
    import torch
    from transformers import get_linear_schedule_with_warmup

    no_decay = ("bias", "LayerNorm.weight")
    groups = [{"params": [p for n, p in model.named_parameters() if not any(x in n for x in no_decay)],
               "weight_decay": WD},
              {"params": [p for n, p in model.named_parameters() if any(x in n for x in no_decay)],
               "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR)
    return opt, get_linear_schedule_with_warmup, {"num_warmup_steps": int(WARMUP * total),
                                                  "num_training_steps": total}


def dev_accuracy(model, dev: dict, batch: int = 128) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(dev["labels"]), batch):
            sl = slice(i, i + batch)
            logits = model(input_ids=dev["input_ids"][sl], attention_mask=dev["attention_mask"][sl],
                           token_type_ids=dev["token_type_ids"][sl]).logits
            correct += int((logits.argmax(-1) == dev["labels"][sl]).sum())
    return correct / len(dev["labels"])


def run_kdp(args, teacher_dir: str, precision: str, cache_dtype: str = "float32") -> dict:
    from kdplatform.distill import engine, objective, student, worker
    from kdplatform.distill.teacher_cache import default_root

    shutil.rmtree(default_root(), ignore_errors=True)  # a cold teacher-output cache: epoch 1 computes it
    train_clock, eval_clock = Clock(), Clock()
    real_stage, real_eval, real_step = student.train_stage, engine.evaluate, objective.step_terms
    started = {}

    def timed_stage(*a, **kw):  # from the first training step to the end of the stage (setup excluded)
        out = real_stage(*a, **kw)
        train_clock.wall += time.perf_counter() - started["wall"]
        train_clock.cpu += time.process_time() - started["cpu"]
        return out

    def timed_step(*a, **kw):
        if not started:
            started.update(wall=time.perf_counter(), cpu=time.process_time())
        return real_step(*a, **kw)

    def timed_eval(*a, **kw):  # evaluation time and the teacher forwards it makes are not training's
        before = counter["examples"]
        with eval_clock:
            out = real_eval(*a, **kw)
        eval_forwards["examples"] += counter["examples"] - before
        return out

    counter, eval_forwards = {"examples": 0}, {"examples": 0}
    real_freeze = student.freeze  # run_trial freezes exactly one model: the teacher

    def counted_freeze(model):
        return count_forwards(real_freeze(model), counter) and model

    student.train_stage, engine.evaluate, student.freeze = timed_stage, timed_eval, counted_freeze
    objective.step_terms = timed_step
    trial = trial_config(args, precision=precision, cache_dtype=cache_dtype)
    result = worker.run_trial(trial, tracking_uri=f"sqlite:///{Path(args.work) / f'mlflow_{os.getpid()}.db'}")
    t = train_clock.minus(eval_clock)
    return {"train_s": t.wall, "cpu_s": t.cpu, "dev_acc": result.last["dev/accuracy"],
            "teacher_forward_examples": counter["examples"] - eval_forwards["examples"],
            "cache_hits": result.last.get("cache/hits", 0),
            "cache_misses": result.last.get("cache/misses", 0)}


def run_textbrewer(args, teacher_dir: str, dynamic: bool = False) -> dict:
    import textbrewer
    from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig
    from torch.utils.data import DataLoader, Dataset

    from kdplatform.distill import losses as kdl
    from kdplatform.distill.teacher import teacher_tokenizer

    tok = teacher_tokenizer(Path(teacher_dir))
    train, dev = load_data(args, tok)
    tr, dv = padded(train, args.max_len, tok.pad_token_id), padded(dev, args.max_len, tok.pad_token_id)
    student, teacher = student_and_teacher(args, teacher_dir, "eager")
    lengths = [len(f["input_ids"]) for f in train]

    class Padded(Dataset):
        def __len__(self):
            return len(train)

        def __getitem__(self, i):
            if dynamic:
                return {k: train[i][k] for k in ("input_ids", "attention_mask", "token_type_ids")}
            return {k: tr[k][i] for k in ("input_ids", "attention_mask", "token_type_ids")}

    clock = Clock()

    class SameBatches:  # kdplatform's batches, epoch after epoch (a batch_sampler)
        epoch = 0

        def __iter__(self):
            if self.epoch == 0:  # the clock starts at the first batch (setup excluded, as for the others)
                clock._w, clock._c = time.perf_counter(), time.process_time()
            batches = batch_order(args, len(train), lengths, self.epoch)
            self.epoch += 1
            return iter(batches)

        def __len__(self):
            return math.ceil(len(train) / args.batch)

    from kdplatform.distill.tasks import Collator

    # textbrewer_dyn: the same distiller fed kdplatform's dynamically padded batches (what padding alone buys)
    loader = DataLoader(Padded(), batch_sampler=SameBatches(),
                        collate_fn=Collator(tok.pad_token_id, regression=False) if dynamic else None)

    def adaptor(batch, outputs):
        return {"logits": outputs.logits, "hidden": outputs.hidden_states, "attention": outputs.attentions,
                "inputs_mask": batch["attention_mask"]}

    textbrewer.presets.register_new("match_Loss", "attention_kl",
                                    lambda s, t, mask=None: kdl.attention_kl(s, t, mask))
    distill_config = DistillationConfig(
        temperature=TEMPERATURE, kd_loss_type="ce", kd_loss_weight=1, hard_label_weight=0,
        intermediate_matches=[{"layer_T": 6, "layer_S": 2, "feature": "hidden", "loss": "hidden_mse", "weight": 1},
                              {"layer_T": 5, "layer_S": 1, "feature": "attention", "loss": "attention_kl",
                               "weight": 1}])
    out_dir = tempfile.mkdtemp(dir=args.work, prefix="textbrewer_")
    train_config = TrainingConfig(device="cpu", output_dir=out_dir, log_dir=None)
    distiller = GeneralDistiller(train_config=train_config, distill_config=distill_config, model_T=teacher,
                                 model_S=student, adaptor_T=adaptor, adaptor_S=adaptor)
    opt, sched_cls, sched_args = optimizer_and_schedule(student, len(loader) * args.epochs)
    counter = count_forwards(teacher)
    with distiller:
        distiller.train(opt, loader, num_epochs=args.epochs, scheduler_class=sched_cls, scheduler_args=sched_args,
                        max_grad_norm=CLIP, callback=None, output_hidden_states=True, output_attentions=True)
    clock.__exit__()
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"train_s": clock.wall, "cpu_s": clock.cpu, "dev_acc": dev_accuracy(student, dv),
            "teacher_forward_examples": counter["examples"]}


def run_plain(args, teacher_dir: str) -> dict:
    import torch

    from kdplatform.distill import losses as kdl
    from kdplatform.distill.teacher import teacher_tokenizer

    tok = teacher_tokenizer(Path(teacher_dir))
    train, dev = load_data(args, tok)
    tr, dv = padded(train, args.max_len, tok.pad_token_id), padded(dev, args.max_len, tok.pad_token_id)
    student, teacher = student_and_teacher(args, teacher_dir, "eager")
    lengths = [len(f["input_ids"]) for f in train]
    steps = math.ceil(len(train) / args.batch) * args.epochs
    opt, sched_cls, sched_args = optimizer_and_schedule(student, steps)
    sched = sched_cls(opt, **sched_args)
    counter = count_forwards(teacher)
    clock = Clock()
    tr_loss = 0.0
    with clock:
        student.train()
        for epoch in range(args.epochs):
            for idx in batch_order(args, len(train), lengths, epoch):
                batch = {k: tr[k][idx] for k in ("input_ids", "attention_mask", "token_type_ids")}
                with torch.no_grad():
                    t = teacher(**batch, output_hidden_states=True, output_attentions=True)
                s = student(**batch, output_hidden_states=True, output_attentions=True)
                mask = batch["attention_mask"]
                loss = (kdl.logit_kd(s.logits, t.logits, TEMPERATURE)
                        + kdl.hidden_mse(s.hidden_states[2], t.hidden_states[6], mask)
                        + kdl.attention_kl(s.attentions[1], t.attentions[5], mask))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), CLIP)
                opt.step()
                sched.step()
                opt.zero_grad()
                tr_loss += loss.item()  # the reference code logs the running loss every step
    return {"train_s": clock.wall, "cpu_s": clock.cpu, "dev_acc": dev_accuracy(student, dv),
            "teacher_forward_examples": counter["examples"]}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would include the parent's before exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.child == "kdp":
        res = run_kdp(args, args.teacher_dir, "fp32")
    elif args.child == "kdp_bf16":
        res = run_kdp(args, args.teacher_dir, "bf16")
    elif args.child == "kdp_bf16_c16":  # teacher outputs stored as float16 (half the bytes)
        res = run_kdp(args, args.teacher_dir, "bf16", cache_dtype="float16")
    elif args.child == "textbrewer":
        res = run_textbrewer(args, args.teacher_dir)
    elif args.child == "textbrewer_dyn":
        res = run_textbrewer(args, args.teacher_dir, dynamic=True)
    elif args.child == "plain":
        res = run_plain(args, args.teacher_dir)
    else:
        raise SystemExit(f"unknown system {args.child}")
    res["peak_rss_mb"] = peak_rss_mb()
    res["samples"] = args.examples * args.epochs
    Path(args.json).write_text(json.dumps(res))


# -------------------------------------------------------------------------------------------- parent
def machine() -> str:
    import platform

    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({args_threads} threads), "
            f"python {platform.python_version()}, load average at start {load:.1f}")


args_threads = 2


def main() -> None:
    global args_threads
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--examples", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--rounds", type=int, default=1, help="2: run a b c, then c b a (fair under load drift)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("KDP_BENCH_THREADS", 1)),
                   help="torch threads per system (1: on a shared, loaded machine two threads spin-wait on each "
                        "other and small kernels run 5-10x slower)")
    p.add_argument("--glue-dir", default=os.environ.get("KDP_GLUE_DIR", str(REPO.parent / "shared/data/glue")))
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "kdp_bench_worker"),
                   help="teacher cache, MLflow store and scratch (kept between runs: the teacher is trained once)")
    p.add_argument("--teacher-dir", default=None, help="use this fine-tuned teacher folder")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args_threads = args.threads
    Path(args.work).mkdir(parents=True, exist_ok=True)
    os.environ["KDP_CACHE_DIR"] = str(Path(args.work) / "cache")
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    if args.child:
        child(args)
        return

    import torch

    torch.set_num_threads(args.threads)
    print(f"machine: {machine()}", flush=True)
    t0 = time.time()
    teacher_dir = args.teacher_dir or ensure_bench_teacher(args)
    print(f"teacher: {teacher_dir} (ready after {time.time() - t0:.0f} s)", flush=True)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    order = []
    for r in range(args.rounds):
        order += systems if r % 2 == 0 else systems[::-1]
    results: dict[str, list[dict]] = {s: [] for s in systems}
    for name in order:
        out = Path(args.work) / f"result_{name}.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--child", name, "--teacher-dir", teacher_dir, "--json", str(out),
               "--examples", str(args.examples), "--epochs", str(args.epochs), "--max-len", str(args.max_len),
               "--batch", str(args.batch), "--seed", str(args.seed), "--glue-dir", args.glue_dir,
               "--work", args.work, "--threads", str(args.threads)]
        started = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            print(f"{name}: FAILED\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", flush=True)
            continue
        res = json.loads(out.read_text())
        results[name].append(res)
        print(f"  ran {name}: {res['samples'] / res['train_s']:.1f} samples/s, dev acc {res['dev_acc']:.4f} "
              f"({time.time() - started:.0f} s with loading and eval; load average {os.getloadavg()[0]:.1f})",
              flush=True)

    summary = {}
    for name, runs in results.items():
        if not runs:
            continue
        samples = sum(r["samples"] for r in runs)
        summary[name] = {
            "samples_per_s": samples / sum(r["train_s"] for r in runs),
            "cpu_ms_per_sample": 1000 * sum(r["cpu_s"] for r in runs) / samples,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "dev_acc": sum(r["dev_acc"] for r in runs) / len(runs),
            "teacher_fwd_per_example": runs[0]["teacher_forward_examples"] / args.examples,
            "runs": len(runs),
        }
    print(f"\nworker benchmark: MiniLM-L6 -> 2 layers, SST-2 {args.examples} ex, len {args.max_len}, batch "
          f"{args.batch}, {args.epochs} epochs, logit_kd + hidden_mse + attention_kl (last layer)")
    for name, s in summary.items():
        print(f"{name:11s} {s['samples_per_s']:8.1f} train samples/s  {s['cpu_ms_per_sample']:7.1f} cpu-ms/sample  "
              f"peak RSS {s['peak_rss_mb']:6.0f} MB  dev acc {s['dev_acc']:.4f}  "
              f"teacher fwd/train example {s['teacher_fwd_per_example']:.2f}  (runs: {s['runs']})")
    for ours in ("kdp", "kdp_bf16"):
        for other in ("textbrewer", "plain", "textbrewer_dyn"):
            if ours in summary and other in summary:
                a, b = summary[ours], summary[other]
                print(f"ratio {ours}/{other}: {a['samples_per_s'] / b['samples_per_s']:.2f}x samples/s "
                      f"({b['cpu_ms_per_sample'] / a['cpu_ms_per_sample']:.2f}x by CPU time), "
                      f"dev acc {100 * (a['dev_acc'] - b['dev_acc']):+.2f} points")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "summary": summary, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
