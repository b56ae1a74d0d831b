"""Throughput table for the dry run's hour estimates (not a test): examples/s per model size and length.

For each BERT-like size (layers x width) and sequence length it times, on random weights (speed does not
depend on the values):
- train: one optimisation step (forward, backward, AdamW) of BertForSequenceClassification, full-length
  sequences (no padding saved: the estimate is an upper bound for GLUE, whose sentences are mostly shorter);
- forward: the same model under torch.inference_mode (a teacher's forward pass, an evaluation).

It writes the table `kdplatform sweep --dry-run` reads (platform/kdplatform/sweep/throughput.json) with its
source (machine, torch, threads, date, load average), keeping the rows of the other device: run it on a CPU
machine for the "cpu" rows, with --device cuda on a GPU machine for the "cuda" rows.

    python benchmarks/bench_throughput.py --threads 1          # this CPU: examples per core-second
    python benchmarks/bench_throughput.py --device cuda --batch 32 --steps 10
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification

TABLE = Path(__file__).resolve().parents[1] / "platform" / "kdplatform" / "sweep" / "throughput.json"
SIZES = [(12, 768), (6, 768), (6, 384), (2, 384)]  # bert-base teacher / its 6-layer cut, MiniLM-L6 / 2-layer cut
SEQ_LENGTHS = [64, 128]


def model_of(layers: int, width: int, device: str) -> BertForSequenceClassification:
    cfg = BertConfig(num_hidden_layers=layers, hidden_size=width, num_attention_heads=width // 64,
                     intermediate_size=4 * width, num_labels=2)
    return BertForSequenceClassification(cfg).to(device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_rate(step, batch: int, steps: int, device: str) -> float:
    """Examples per second over `steps` calls of `step` after one warm-up call: per second of this process's
    CPU time on a CPU (with one thread: per core-second, hardly touched by other processes sharing the
    machine), per wall-clock second on a GPU."""
    clock = time.process_time if device == "cpu" else time.perf_counter
    step()
    _sync(device)
    start = clock()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (clock() - start)


def measure(layers: int, width: int, seq: int, batch: int, steps: int, device: str) -> dict:
    torch.manual_seed(0)
    model = model_of(layers, width, device)
    ids = torch.randint(1000, 30000, (batch, seq), device=device)
    mask = torch.ones_like(ids)
    labels = torch.randint(0, 2, (batch,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def train_step() -> None:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def forward() -> None:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)

    model.train()
    train = timed_rate(train_step, batch, steps, device)
    model.eval()
    fwd = timed_rate(forward, batch, steps, device)
    return {"layers": layers, "width": width, "seq": seq, "train_examples_per_s": round(train, 2),
            "forward_examples_per_s": round(fwd, 2)}


def source_of(device: str, batch: int, steps: int) -> str:
    name = torch.cuda.get_device_name(0) if device == "cuda" else (platform.processor() or platform.machine())
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"benchmarks/bench_throughput.py on {datetime.date.today().isoformat()}: {name}, "
            f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, "
            f"batch {batch}, {steps} timed steps after 1 warm-up, "
            f"{'process CPU time' if device == 'cpu' else 'wall time'}, load average {load}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=TABLE)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for layers, width in SIZES:
        for seq in SEQ_LENGTHS:
            row = measure(layers, width, seq, args.batch, args.steps, args.device)
            print(f"{args.device} {layers:>2} layers x {width:>4} seq {seq:>3}: "
                  f"train {row['train_examples_per_s']:8.1f} ex/s   forward {row['forward_examples_per_s']:8.1f} ex/s",
                  flush=True)
            rows.append(row)
    table = json.loads(args.out.read_text()) if args.out.is_file() else {}
    table[args.device] = {"source": source_of(args.device, args.batch, args.steps),
                          "threads": torch.get_num_threads() if args.device == "cpu" else 0, "rows": rows}
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
