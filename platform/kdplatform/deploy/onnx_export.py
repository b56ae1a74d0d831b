"""A student as ONNX (`torch.onnx`) and int8 ONNX (`onnxruntime.quantization.quantize_dynamic`).

Full-precision students get ONNX Runtime's dynamic int8 quantization: weights of every MatMul and of the
embedding Gathers int8 per tensor (post-training), MatMul inputs quantized to uint8 at run time.

A QAT student is deployed as the model that was trained, not re-quantized: its quantized weights are
materialized (each quantized matrix replaced by the values its forward pass used: ternary alpha * {-1, 0, 1}
at 2 bits, step * k at 4 and 8 bits), its activation quantizers stay in the graph as they ran in training,
and each trained matrix goes int8 with the scale of the grid it was trained on (passed to ONNX Runtime as a
`TensorQuantOverrides` scale), so the int8 weights are exactly the trained codes. What cannot be carried
exactly is listed by `int8_notes` (printed at export, and in docs/deploy.md): the run-time uint8 activation
quantization ONNX Runtime adds in front of each int8 MatMul, and per-row quantized word embeddings (kept fp32).

The graph is traced with the TorchScript exporter (`dynamo=False`): about 1 s for a small BERT against 12 s
and more for the dynamo exporter here, with the same outputs; batch and sequence axes are dynamic.

Encoder families: everything here asks the model's own forward for logits and the tokenizer for its input
names; the only family-specific knowledge is which modules `quantize_bert_` quantized (QuantLinear /
QuantEmbedding instances), so a family table plugs in through `quantize_bert_` alone. All eight families of
`kdplatform/families.py` export, full precision and 2-bit (tests/test_onnx_families.py); a model the tracer
cannot follow raises ExportError (one line, exit 2 at the CLI).

>>> fp32 = export_onnx(model, tokenizer, "out/model.onnx", seq_len=64)        # doctest: +SKIP
>>> notes = export_int8(model, fp32, "out/model_int8.onnx")                   # doctest: +SKIP
"""

from __future__ import annotations

import copy
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdplatform.distill.export import ExportError
from kdplatform.distill.quant import QuantEmbedding, QuantLinear

OPSET = 17
INT8_MAX = 127
_GRID_TOL = 1e-3  # |w / scale - round(w / scale)| below this: the weight sits on the grid


class _Logits(nn.Module):
    """The classifier as a function of positional token tensors (in `names` order) returning logits."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs))).logits


def input_names(tokenizer) -> list[str]:
    """The token tensors the model takes, in the tokenizer's order (BERT: input_ids, token_type_ids,
    attention_mask; families without token types give none)."""
    return [n for n in tokenizer.model_input_names if n in ("input_ids", "token_type_ids", "attention_mask")]


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, QuantEmbedding)) and m.bits < 32 for m in model.modules())


def materialize(model: nn.Module) -> tuple[nn.Module, list[torch.Tensor]]:
    """A copy of a QAT student whose quantized weights hold the values its forward pass used (and whose
    quantizers are switched off for weights, so they are not applied twice); activation quantizers stay.
    Returns the copy and the materialized linear weight matrices. A full-precision model comes back as a
    copy with no matrices."""
    out = copy.deepcopy(model).eval()
    linears = []
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, QuantLinear) and m.bits < 32:
                m.weight.copy_(m.quantized_weight())  # per block of a fused QKV, as the forward
                m.bits = 32
                linears.append(m.weight.detach().clone())
            elif isinstance(m, QuantEmbedding) and m.bits < 32:
                m.weight.copy_(m.quantize_rows(m.weight))
                m.bits = 32
    return out, linears


def grid_scale(w: torch.Tensor | np.ndarray) -> float | None:
    """The step of the integer grid a materialized weight matrix sits on, if it fits int8: the smallest
    non-zero |w|, accepted when every w / step is an integer within +-127 (ternary: alpha; 8-bit: max/127;
    4-bit: the TWN step). None when there is no such grid.

    >>> grid_scale(np.array([0.7, -0.7, 0.0], dtype=np.float32)), grid_scale(np.array([0.3, 0.45]))
    (0.699999988079071, None)
    """
    a = np.abs(np.asarray(w, dtype=np.float64)).ravel()
    nonzero = a[a > 0]
    if nonzero.size == 0:
        return None
    step = float(nonzero.min())
    codes = a / step
    if np.abs(codes - np.round(codes)).max() > _GRID_TOL or codes.max() > INT8_MAX + _GRID_TOL:
        return None
    return float(np.float32(step))


def export_onnx(model: nn.Module, tokenizer, path: str | Path, seq_len: int) -> Path:
    """Trace `model` (a QAT student materialized first) to ONNX at `path`: inputs as the tokenizer names
    them, output `logits`, batch and sequence axes dynamic."""
    names = input_names(tokenizer)
    model = materialize(model)[0] if is_quantized(model) else model.eval()
    example = tokenizer(["an example sentence"] * 2, padding="max_length", truncation=True, max_length=seq_len,
                        return_tensors="pt")
    path = Path(path)
    try:
        with torch.no_grad(), _quiet():
            # the wrapper in eval mode: the exporter restores the wrapper's mode afterwards, and a new module's
            # (train) would switch the caller's model to training, dropout on
            torch.onnx.export(_Logits(model, names).eval(), tuple(example[n] for n in names), str(path),
                              dynamo=False, opset_version=OPSET, input_names=names, output_names=["logits"],
                              dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names},
                                            "logits": {0: "batch"}})
    except Exception as e:  # a family (or transformers version) the tracer cannot follow: one line, not a trace
        kind = getattr(model.config, "model_type", type(model).__name__)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ExportError(f"cannot export this {kind} student to ONNX with torch.onnx (opset {OPSET}): "
                          f"{type(e).__name__}: {first}; export it as a Hugging Face folder (--format hf) "
                          f"instead") from e
    return path


def export_int8(model: nn.Module, fp32_path: str | Path, path: str | Path) -> list[str]:
    """Quantize the ONNX export `fp32_path` of `model` to int8 at `path` (see the module docstring);
    returns the notes on what is not exact (empty for a full-precision student)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32_path, path = Path(fp32_path), Path(path)
    kwargs: dict = {"op_types_to_quantize": ["MatMul", "Gather"]}
    notes: list[str] = []
    if is_quantized(model):
        scales = _trained_scales(model)
        overrides, nodes = _matmul_overrides(fp32_path, scales)
        kwargs = {"op_types_to_quantize": ["MatMul"], "nodes_to_quantize": nodes,
                  "extra_options": {"TensorQuantOverrides": overrides}}
        notes = int8_notes(model, n_off_grid=sum(s is None for s in scales.values()), n_int8=len(nodes))
    with _quiet():
        quantize_dynamic(fp32_path, path, weight_type=QuantType.QInt8, per_channel=False, **kwargs)
    return notes


def int8_notes(model: nn.Module, n_off_grid: int = 0, n_int8: int | None = None) -> list[str]:
    """One line per way the int8 graph of a QAT student differs from the trained model."""
    linears = [m for m in model.modules() if isinstance(m, QuantLinear) and m.bits < 32]
    notes = []
    act_bits = {m.act_bits for m in linears}
    if act_bits & set(range(2, 32)):
        notes.append(f"not exact: ONNX Runtime quantizes each int8 MatMul's input to uint8 per tensor at run "
                     f"time, after the trained {'/'.join(map(str, sorted(act_bits)))}-bit symmetric "
                     f"activation quantizer (kept in the graph)")
    else:
        notes.append("not exact: the student trained fp32 activations; ONNX Runtime quantizes each int8 "
                     "MatMul's input to uint8 per tensor at run time (post-training)")
    if n_off_grid:
        notes.append(f"not exact: {n_off_grid} quantized matrices sit on no int8 grid; ONNX Runtime's own "
                     f"per-tensor scale was used for them")
    if n_int8 is not None and n_int8 < len(linears):
        notes.append(f"{len(linears) - n_int8} of {len(linears)} trained quantized matrices are not MatMuls "
                     f"in the graph (e.g. the pooler as Gemm) and stay fp32 with their trained values")
    if any(isinstance(m, QuantEmbedding) and m.bits < 32 for m in model.modules()):
        notes.append("not int8: the word embeddings were trained quantized per row; int8 Gather is per tensor, "
                     "so they stay fp32 holding their trained quantized values (exact, not smaller)")
    return notes


def open_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session; `threads` fixes the intra-op thread count (one inter-op thread)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _trained_scales(model: nn.Module) -> dict[str, float | None]:
    """Digest of each materialized linear weight as ONNX holds it (transposed, [in, out]) -> its grid step."""
    _, linears = materialize(model)
    return {_digest(w.t().contiguous().numpy()): grid_scale(w.numpy()) for w in linears}


def _matmul_overrides(fp32_path: Path, scales: dict[str, float | None]) -> tuple[dict, list[str]]:
    """TensorQuantOverrides (the trained scale, zero point 0) for the MatMul weights that are trained
    quantized matrices, and the names of those MatMul nodes."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(fp32_path)).graph
    init = {t.name: t for t in graph.initializer}
    overrides, nodes = {}, []
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in init:
            continue
        key = _digest(numpy_helper.to_array(init[node.input[1]]))
        if key not in scales:
            continue
        nodes.append(node.name)
        if scales[key] is not None:
            overrides[node.input[1]] = [{"scale": np.float32(scales[key]), "zero_point": np.int8(0)}]
    return overrides, nodes


def _digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return hashlib.sha1(str(a.shape).encode() + a.tobytes()).hexdigest()


class _quiet:
    """Silence the exporters' and the quantizer's warnings (deprecation, pre-processing advice)."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")
        self._level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        logging.getLogger().setLevel(self._level)
        return self._w.__exit__(*exc)
