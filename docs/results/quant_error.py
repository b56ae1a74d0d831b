"""How far each weight quantizer moves a fine-tuned teacher's encoder matrices (the KD-QAT pilot's question:
why does MPNet start at the majority class at 4 bits?). Not a test; prints one row per matrix kind.

    python docs/results/quant_error.py ~/.cache/kdplatform/teachers/<hash>     # a cached teacher folder

Per kind (mean over layers): the share of entries beyond the 4-bit grid's clip alpha (KD-QAT's TWN-scaled
grid clips at alpha = mean |W| over |W| > mean |W|), max |W| / alpha, and the relative error
||W_q - W|| / ||W|| of: the platform's 4-bit grid (`twn_levels`), a per-tensor max-scaled 4-bit grid, a
per-row max-scaled one, per-tensor 8-bit, and ternary (TWN).
"""

from __future__ import annotations

import sys
from collections import defaultdict

import torch

from kdplatform.distill.models import encoder_layers, load_classifier
from kdplatform.distill.quant import ternarize, twn_levels, uniform_quantize


def main(folder: str) -> None:
    model = load_classifier(folder, 2)
    rows = defaultdict(list)
    for i, layer in enumerate(encoder_layers(model)):
        for name, mod in layer.named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            w = mod.weight.detach()
            a = w.abs()
            alpha = a[a > a.mean()].mean()
            rel = lambda q: ((q - w).norm() / w.norm()).item()  # noqa: E731
            rows[name].append([(a > alpha).float().mean().item() * 100, (a.max() / alpha).item(),
                               rel(twn_levels(w, 4)), rel(uniform_quantize(w, 4)),
                               rel(uniform_quantize(w, 4, per_row=True)), rel(uniform_quantize(w, 8)),
                               rel(ternarize(w))])
    print("| matrix | clipped at 4 bits (%) | max/alpha | 4-bit grid | 4-bit max | 4-bit max per row | 8-bit | ternary |")
    print("|---|---|---|---|---|---|---|---|")
    for name, v in rows.items():
        m = torch.tensor(v).mean(0).tolist()
        print(f"| {name} | {m[0]:.1f} | {m[1]:.1f} | " + " | ".join(f"{x:.3f}" for x in m[2:]) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
