"""Useful model FLOPs of a distillation step, device peaks, and a measured matmul peak (benchmark helper).

Needs only torch (the GPU benchmark imports it on machines without the rest of kdplatform's dependencies).

Model FLOPs of one BERT encoder forward, counted per sequence from its NON-PADDING length L (a multiply-add
is 2 FLOPs; embeddings, layer norms, softmax and activations are left out, as in the usual MFU accounting):

    per layer:  L * (8 h^2 + 4 h f)        Q, K, V and output projections (4 h x h), FFN (h x f and f x h)
              + 4 L^2 h                    attention scores Q K^T and the weighted sum A V
    per model:  layers * (per layer) + 2 h^2 + 2 h n_labels     pooler and classifier (once per sequence)

with h the hidden size, f the intermediate size. A KD training step counts the teacher forward once and the
student forward and backward (backward = 2 x forward):

    useful FLOPs = forward_flops(teacher) + 3 * forward_flops(student)

It is a MODEL-FLOPs count (as MFU uses): what the job needs per example, not what the hardware executes.
Padding tokens are not counted (a loop that pads to 128 does more arithmetic for the same useful work),
and the teacher forward counts even when the teacher output cache serves it (a cache that skips work
raises useful FLOP/s, as it should: the job is done sooner).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, in FLOP/s.
DEVICE_PEAK_BF16 = {
    "H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
    "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12, "RTX 4090": 165e12,
}


def forward_flops(lengths: Iterable[int], layers: int, hidden: int, intermediate: int, num_labels: int = 2) -> int:
    """Model FLOPs of one encoder forward over sequences of these non-padding lengths (module docstring)."""
    total = 0
    for n in lengths:
        per_layer = n * (8 * hidden * hidden + 4 * hidden * intermediate) + 4 * n * n * hidden
        total += layers * per_layer + 2 * hidden * hidden + 2 * hidden * num_labels
    return total


def kd_step_flops(lengths: list[int], teacher: dict, student: dict, num_labels: int = 2) -> int:
    """Useful FLOPs of one KD step: teacher forward + student forward and backward. `teacher`/`student`:
    {"layers", "hidden", "intermediate"} (e.g. from a transformers config: `shape_of(config)`)."""
    return forward_flops(lengths, num_labels=num_labels, **teacher) + \
        3 * forward_flops(lengths, num_labels=num_labels, **student)


def shape_of(config) -> dict:
    """{"layers", "hidden", "intermediate"} of a BERT-like transformers config."""
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
            "intermediate": config.intermediate_size}


def device_peak_bf16(name: str) -> float | None:
    """A GPU's dense bf16 peak from its torch device name (e.g. 'NVIDIA H200'), None when unknown."""
    for key in sorted(DEVICE_PEAK_BF16, key=len, reverse=True):  # 'H100 SXM' before 'H100'
        if key.lower() in name.lower():
            return DEVICE_PEAK_BF16[key]
    return None


def matmul_peak(dtype, device: str = "cpu", n: int = 2048, repeats: int = 10) -> dict:
    """Measured FLOP/s of torch.matmul on n x n matrices: the best of `repeats` (the peak this device reaches
    here, the least disturbed by other processes) and the median."""
    import torch

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.matmul(a, b)  # warm-up: kernels chosen, memory touched
    times = []
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    flops = 2 * n ** 3
    times.sort()
    return {"dtype": str(dtype).replace("torch.", ""), "n": n, "best_flops": flops / times[0],
            "median_flops": flops / times[len(times) // 2]}
