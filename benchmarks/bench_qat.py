"""What a QAT student's quantizers cost per forward pass and per training step (not a test).

A BERT-base-shaped classifier built from a config (no download: vocabulary 30,522, width 768, 12 heads, FFN
3072, 6 layers), fp32 and quantized by `quantize_bert_` at --bits with quantized word embeddings (the KD-QAT
presets' setting), on a CoLA-like batch: 32 x 16 tokens for evaluation, 16 x 16 for a training step (forward,
backward). One torch thread, medians of --reps passes after 2 warm-up passes, systems interleaved.

- fp32: the plain model.
- qat: the quantized model as the worker runs it: every forward quantizes each linear's weight, and the
  word embeddings per row after the lookup (only the batch's rows).
- parts: what the quantizers themselves cost, timed alone: every quantized linear's weight quantized once
  (what every forward pays), the whole word-embedding table quantized per row (what every forward paid
  before the lookup came first) and only a batch's rows.

    python benchmarks/bench_qat.py                  # 8 bits
    python benchmarks/bench_qat.py --bits 2 --reps 5
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from transformers import AutoModelForSequenceClassification, BertConfig

from kdplatform.distill.quant import QuantEmbedding, QuantLinear, quantize_bert_


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=3072, num_labels=2)
    return AutoModelForSequenceClassification.from_config(config)


def _batch(n: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (n, 16), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _median(fn, reps: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    fp32 = _model()
    qat = copy.deepcopy(fp32)
    quantize_bert_(qat, args.bits, 32, quantize_embeddings=True)
    eval_batch, train_batch = _batch(32), _batch(16)

    def evaluate(model):
        model.eval()
        with torch.no_grad():
            model(**eval_batch)

    def step(model):
        model.train()
        model.zero_grad(set_to_none=True)
        model(**train_batch).logits.sum().backward()

    rows = {}
    for name, model in (("fp32", fp32), ("qat", qat)):
        rows[name] = (_median(lambda: evaluate(model), args.reps), _median(lambda: step(model), args.reps))
    linears = [m for m in qat.modules() if isinstance(m, QuantLinear)]
    emb = next(m for m in qat.modules() if isinstance(m, QuantEmbedding))
    rows_ids = eval_batch["input_ids"]
    parts = {
        "every linear's weight": _median(lambda: [m.quantized_weight() for m in linears], args.reps),
        "whole embedding table": _median(lambda: emb.quantize_rows(emb.weight), args.reps),
        "a batch's embedding rows": _median(lambda: emb.quantize_rows(emb.weight[rows_ids.reshape(-1)]), args.reps),
    }
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, "
          f"{args.bits}-bit weights, quantized embeddings")
    print(f"{'system':8s} {'eval batch 32x16 (ms)':>22s} {'train step 16x16 (ms)':>22s}")
    for name, (ev, st) in rows.items():
        print(f"{name:8s} {ev * 1e3:22.1f} {st * 1e3:22.1f}")
    print(f"qat/fp32: eval {rows['qat'][0] / rows['fp32'][0]:.2f}x, train step {rows['qat'][1] / rows['fp32'][1]:.2f}x")
    for what, t in parts.items():
        print(f"quantizing {what}: {t * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
