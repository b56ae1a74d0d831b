"""Teacher output cache across a sweep: 8 trials sharing one teacher, cache on vs off (not a test).

The sweep: the bench_worker job (MiniLM-L6 teacher -> 2-layer student, SST-2, max length 128, batch 32,
logit_kd + last-layer hidden_mse + attention_kl, 2 epochs) over lr {5e-5, 1e-4} x seeds {42, 43, 44, 45},
all trials through `worker.run_trial` one after the other in one process (what `kdplatform run` does; on Ray
the trials are separate processes and read the same on-disk entries). Each mode runs in its own process and
starts from a cold cache. A forward pre-hook on the teacher counts every example it sees, so "teacher
forwards per example" is measured, not inferred from the cache's own counters (printed beside it).

    KDP_GLUE_DIR=../shared/data/glue python benchmarks/bench_sweep_cache.py
    python benchmarks/bench_sweep_cache.py --examples 256 --trials 4      # a quick look
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_worker  # noqa: E402  (the shared job definition and the cached teacher)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sweep_trials(args, teacher_dir: str, cache: bool):
    from kdplatform.config import TrialConfig, resolve_trial

    out = []
    for lr, seed in itertools.islice(itertools.product((5e-5, 1e-4), (42, 43, 44, 45)), args.trials):
        raw = {
            "name": "bench_sweep", "task": "sst2", "method": "custom", "seed": seed,
            "data": {"source": "glue_dir", "glue_dir": args.glue_dir, "max_train_examples": args.examples,
                     "max_dev_examples": args.dev_examples, "train_eval_examples": 64, "max_seq_length": 128,
                     "subsample_seed": "fixed"},  # one subset for every seed: the trials share teacher inputs
            "teacher": {"model": "minilm-l6", "checkpoint": teacher_dir},
            "student": {"init": "truncate", "layers": 2},
            "train": [{"name": "distill", "epochs": 2, "batch_size": 32, "lr": lr, "eval_every": 0,
                       "losses": [{"name": "logit_kd"}, {"name": "hidden_mse", "layer_map": "last"},
                                  {"name": "attention_kl", "layer_map": "last"}]}],
            "speed": {"precision": "fp32", "teacher_cache": {"enabled": cache}},
        }
        out.append(resolve_trial(TrialConfig.model_validate(raw)))
    return out


def child(args) -> None:
    import torch

    from kdplatform.distill import student, worker
    from kdplatform.distill.teacher_cache import cache_size, default_root

    torch.set_num_threads(args.threads)
    cache = args.child == "on"
    shutil.rmtree(default_root(), ignore_errors=True)
    counter = {"examples": 0}
    real_freeze = student.freeze

    def counted_freeze(model):
        return bench_worker.count_forwards(real_freeze(model), counter) and model

    student.freeze = counted_freeze
    uri = f"sqlite:///{Path(args.work) / f'mlflow_sweep_{os.getpid()}.db'}"
    trials = sweep_trials(args, args.teacher_dir, cache)
    hits = misses = 0
    per_trial = []
    t0 = time.perf_counter()
    for trial in trials:
        before = counter["examples"]
        s = time.perf_counter()
        res = worker.run_trial(trial, tracking_uri=uri)
        per_trial.append({"seconds": time.perf_counter() - s, "teacher_forward_examples": counter["examples"] - before,
                          "dev_acc": res.last.get("dev/accuracy")})
        hits += int(res.last.get("cache/hits", 0))
        misses += int(res.last.get("cache/misses", 0))
    wall = time.perf_counter() - t0
    unique = args.examples + 64 + args.dev_examples  # train + train-eval subset + dev: every distinct teacher input
    Path(args.json).write_text(json.dumps({
        "wall_s": wall, "teacher_forward_examples": counter["examples"], "unique_examples": unique,
        "cache_hits": hits, "cache_misses": misses, "cache_bytes": cache_size(default_root()),
        "trials": per_trial}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--examples", type=int, default=512, help="train examples per trial")
    p.add_argument("--dev-examples", type=int, default=256)
    p.add_argument("--threads", type=int, default=int(os.environ.get("KDP_BENCH_THREADS", 1)))
    p.add_argument("--glue-dir", default=os.environ.get("KDP_GLUE_DIR", str(bench_worker.REPO.parent /
                                                                          "shared/data/glue")))
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "kdp_bench_worker"))
    p.add_argument("--teacher-dir", default=None, help="a fine-tuned teacher folder (default: bench_worker's)")
    p.add_argument("--teacher-examples", type=int, default=2048, help="subset bench_worker's teacher was tuned on")
    p.add_argument("--modes", default="off,on")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    os.environ["KDP_CACHE_DIR"] = str(Path(args.work) / ("cache_sweep" if args.child else "cache"))
    if args.child:
        child(args)
        return

    import torch

    torch.set_num_threads(args.threads)
    bench_worker.args_threads = args.threads
    print(f"machine: {bench_worker.machine()}", flush=True)
    if args.teacher_dir is None:
        targs = argparse.Namespace(seed=42, glue_dir=args.glue_dir, examples=args.teacher_examples, max_len=128,
                                   epochs=2, batch=32, teacher_dir=None, work=args.work)
        args.teacher_dir = bench_worker.ensure_bench_teacher(targs)
    results = {}
    for mode in [m.strip() for m in args.modes.split(",")]:
        out = Path(args.work) / f"sweep_{mode}.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--child", mode, "--json", str(out), "--trials", str(args.trials),
               "--examples", str(args.examples), "--dev-examples", str(args.dev_examples), "--threads",
               str(args.threads), "--glue-dir", args.glue_dir, "--work", args.work, "--teacher-dir",
               args.teacher_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            print(f"cache {mode}: FAILED\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", flush=True)
            continue
        results[mode] = r = json.loads(out.read_text())
        per = r["teacher_forward_examples"] / r["unique_examples"]
        print(f"cache {mode:3s}: {args.trials} trials in {r['wall_s']:7.1f} s, teacher forwards "
              f"{r['teacher_forward_examples']:6d} examples = {per:5.2f} per distinct example "
              f"({r['unique_examples']} distinct), cache hits {r['cache_hits']} misses {r['cache_misses']}, "
              f"on disk {r['cache_bytes'] / 1e6:.1f} MB; per trial (s): "
              + " ".join(f"{t['seconds']:.0f}" for t in r["trials"]), flush=True)
    if "on" in results and "off" in results:
        on, off = results["on"], results["off"]
        print(f"ratio: sweep {off['wall_s'] / on['wall_s']:.2f}x faster with the cache, teacher forwards "
              f"{off['teacher_forward_examples'] / max(on['teacher_forward_examples'], 1):.1f}x fewer")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
