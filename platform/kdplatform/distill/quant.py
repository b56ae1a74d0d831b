"""KD-QAT quantization: weight/activation quantizers with a straight-through estimator (STE) and
`quantize_bert_`, which turns a transformers encoder of any family in `kdplatform/families.py` into its
quantization-aware form in place.

What gets quantized (DESIGN.md section 4): the weights of Q, K, V (a fused QKV projection per third), attention
output, FFN1, FFN2 and the pooler (the family table names them),
optionally the word embeddings (per row); with `act_bits < 32` also the inputs of those linears, Q, K, V and the
attention probabilities. LayerNorm, biases, position/type embeddings and the classifier stay full precision.

Every quantizer follows one pattern: clamp to the clip range (its gradient is 1 inside, 0 outside), then add
the rounding error as a detached constant, so the forward value is quantized while the gradient is the STE's.
The full-precision "latent" weights stay the modules' `weight` Parameters: optimizers, state_dict keys and
checkpoints do not change; only forward passes see quantized values.

>>> from transformers import BertConfig, BertForSequenceClassification
>>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2,
...     num_attention_heads=4, intermediate_size=64, vocab_size=100))
>>> report = quantize_bert_(model, bits=2, act_bits=8)
>>> len(report.quantized_modules), round(report.as_metrics()["quant/fraction"], 2)   # 2 layers x 6, pooler
(13, 0.46)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kdplatform.families import Family, family_of_type

WEIGHT_BITS = (2, 4, 8, 32)
TWO_BIT_MODES = ("ternary", "uniform")
DEFAULT_CLIP = 2.5  # KD-QAT / TernaryBERT: weights and activations clipped to +-2.5
ATTN_IMPLEMENTATION = "kdp_quant_eager"



def _ste(x_clipped: Tensor, x_quantized: Tensor) -> Tensor:
    """Forward value exactly `x_quantized` (x_c - x_c.detach() is exactly 0; x_c + (x_q - x_c) would not be),
    gradient that of `x_clipped`: identity inside the clip range, 0 outside."""
    return x_quantized.detach() + (x_clipped - x_clipped.detach())


# ---------------------------------------------------------------------------------------------- quantizers
def ternarize(w: Tensor, clip: float = DEFAULT_CLIP) -> Tensor:
    """TWN ternary weights, per matrix: W clipped to +-clip, Delta = 0.7 * mean|W|,
    alpha = mean of |W| over |W| > Delta, W_q = alpha * sign(W) * 1[|W| > Delta].

    >>> ternarize(torch.tensor([0.1, -0.9, 0.5, -0.05])).tolist()   # Delta = 0.2625, alpha = 0.7
    [0.0, -0.699999988079071, 0.699999988079071, 0.0]
    """
    wc = w.clamp(-clip, clip)
    return _ste(wc, _twn(wc.detach(), dim=None))


def ternarize_rows(w: Tensor, clip: float = DEFAULT_CLIP) -> Tensor:
    """TWN with one Delta and one alpha per row (word embeddings: one row per token)."""
    wc = w.clamp(-clip, clip)
    return _ste(wc, _twn(wc.detach(), dim=-1))


def _twn(w: Tensor, dim: int | None) -> Tensor:
    a = w.abs()
    mean_abs = a.mean() if dim is None else a.mean(dim=dim, keepdim=True)
    keep = (a > 0.7 * mean_abs).to(w.dtype)
    kept = keep.sum() if dim is None else keep.sum(dim=dim, keepdim=True)
    alpha = (a * keep).sum(**({} if dim is None else {"dim": dim, "keepdim": True})) / kept.clamp(min=1)
    return alpha * torch.sign(w) * keep


def twn_levels(w: Tensor, bits: int, clip: float = DEFAULT_CLIP, *, per_row: bool = False) -> Tensor:
    """KD-QAT's 4-bit (and >= 4-bit embedding) weight quantizer, a TWN-scaled uniform grid: W clipped to +-clip,
    m = mean|W|, alpha = mean of |W| over |W| > m (per matrix, or per row), step = 2 alpha / (2^bits - 1),
    W_q = step * round(clamp(W, -alpha, alpha) / step). The straight-through gradient is 1 inside +-clip
    (not only inside +-alpha), as in the reference.

    >>> twn_levels(torch.tensor([0.1, -0.9, 0.5, -0.05]), bits=4).tolist()   # alpha = 0.7, step = 1.4 / 15
    [0.09333333373069763, -0.746666669845581, 0.46666666865348816, -0.09333333373069763]

    (-0.9 clamps to -alpha = -7.5 steps, which rounds half to even to -8 steps, as torch.round does in the
    reference too.)
    """
    wc = w.clamp(-clip, clip)
    x = wc.detach()
    a = x.abs()
    mean_abs = a.mean(dim=-1, keepdim=True) if per_row else a.mean()
    keep = (a > mean_abs).to(x.dtype)
    kept = keep.sum(dim=-1, keepdim=True) if per_row else keep.sum()
    alpha = ((a * keep).sum(dim=-1, keepdim=True) if per_row else (a * keep).sum()) / kept.clamp(min=1)
    # an all-zero matrix or row (e.g. a padding token's embedding) has step 0: its codes are 0, not 0/0 = NaN
    step = (alpha * 2 / (2**bits - 1)).clamp(min=torch.finfo(x.dtype).tiny)
    return _ste(wc, torch.round(torch.minimum(torch.maximum(x, -alpha), alpha) / step) * step)


def uniform_quantize(w: Tensor, bits: int, clip: float | None = None, *, per_row: bool = False) -> Tensor:
    """Symmetric uniform quantization: scale s = max|w| / (2^(bits-1) - 1), W_q = s * round(w / s): at most
    2^bits - 1 levels (8-bit: integers -127..127). With `clip`, w is first clamped to +-clip (zero gradient
    outside); `per_row` takes one scale per row instead of one per tensor.

    >>> uniform_quantize(torch.tensor([1.0, -0.6, 0.2]), bits=2).tolist()   # 2-bit symmetric = {-s, 0, s}
    [1.0, -1.0, 0.0]
    """
    if bits < 2:
        raise ValueError(f"uniform_quantize needs bits >= 2, got {bits}")
    wc = w if clip is None else w.clamp(-clip, clip)
    x = wc.detach()
    max_abs = x.abs().amax(dim=-1, keepdim=True) if per_row else x.abs().max()
    scale = max_abs.clamp(min=1e-12) / (2 ** (bits - 1) - 1)
    return _ste(wc, torch.round(x / scale) * scale)


def int2_quantize(w: Tensor, clip: float | None = None) -> Tensor:
    """True 2-bit uniform (two's-complement int2): the four levels {-2, -1, 0, 1} * s with s = max|w| / 2, so
    the most negative weight is exact and the positive side saturates at s. (Symmetric 2-bit uniform has only
    the three levels {-s, 0, s}: a ternary code with a max-based scale, see `uniform_quantize(w, 2)`.)"""
    wc = w if clip is None else w.clamp(-clip, clip)
    x = wc.detach()
    scale = x.abs().max().clamp(min=1e-12) / 2
    return _ste(wc, torch.round(x / scale).clamp(-2, 1) * scale)


def quantize_activation(x: Tensor, bits: int = 8, clip: float = DEFAULT_CLIP) -> Tensor:
    """Dynamic per-tensor symmetric activation quantization: clamp to +-clip, s = (2^(bits-1) - 1) / max|x|,
    x_q = round(x * s) / s (8 bits: at most 255 levels); STE with zero gradient outside the clip range.
    `bits >= 32` returns x unchanged."""
    if bits >= 32:
        return x
    xc = x.clamp(-clip, clip)
    d = xc.detach()
    scale = (2 ** (bits - 1) - 1) / d.abs().max().clamp(min=1e-12)
    return _ste(xc, torch.round(d * scale) / scale)


def quantize_weight(w: Tensor, bits: int, *, two_bit: str = "ternary", clip: float = DEFAULT_CLIP,
                    per_row: bool = False) -> Tensor:
    """The weight quantizer for a `bits` setting, as KD-QAT's reference: 32 = identity; 2 = TWN ternary (or
    int2 with two_bit="uniform"); 4 = the TWN-scaled 15-step grid (`twn_levels`); 8 = symmetric uniform per
    matrix. Word embeddings (`per_row`) at 4 and 8 bits use `twn_levels` per row, as the reference does."""
    if bits >= 32:
        return w
    if bits == 2 and two_bit == "ternary":
        return ternarize_rows(w, clip) if per_row else ternarize(w, clip)
    if bits == 2 and two_bit == "uniform" and not per_row:
        return int2_quantize(w, clip)
    if bits == 4 or (per_row and bits > 2):
        return twn_levels(w, bits, clip, per_row=per_row)
    return uniform_quantize(w, bits, clip, per_row=per_row)


# ---------------------------------------------------------------------------------------------- modules
class QuantLinear(nn.Linear):
    """nn.Linear whose forward uses quantized weights (and quantized inputs when act_bits < 32). `weight` is
    still the full-precision latent Parameter, so state_dict keys and optimizer parameters are unchanged."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 8,
                 act_bits: int = 32, two_bit: str = "ternary", clip: float = DEFAULT_CLIP,
                 act_clip: float = DEFAULT_CLIP, groups: int = 1, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.bits, self.act_bits, self.two_bit, self.clip, self.act_clip = bits, act_bits, two_bit, clip, act_clip
        self.groups = groups  # a fused projection (QKV): each block of output rows quantized as its own matrix

    @classmethod
    def from_linear(cls, linear: nn.Linear, **quant_args) -> QuantLinear:
        """A QuantLinear sharing `linear`'s Parameter objects and forward hooks (hooks keep working)."""
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta", **quant_args)
        q.weight, q.bias = linear.weight, linear.bias
        q._forward_hooks, q._forward_pre_hooks = linear._forward_hooks, linear._forward_pre_hooks
        q._forward_hooks_with_kwargs = linear._forward_hooks_with_kwargs
        q._forward_hooks_always_called = linear._forward_hooks_always_called
        q._forward_pre_hooks_with_kwargs = linear._forward_pre_hooks_with_kwargs
        q.train(linear.training)
        return q

    def forward(self, x: Tensor) -> Tensor:
        x = quantize_activation(x, self.act_bits, self.act_clip)
        return nn.functional.linear(x, self.quantized_weight(), self.bias)

    def quantized_weight(self) -> Tensor:
        """The weight the forward computes with (a fused QKV quantized per Q/K/V block). Computed on every call:
        a cache keyed on the latent weight's version counter went stale, because fused AdamW updates the
        weights without bumping it (evaluations then scored the first evaluation's weights)."""
        blocks = self.weight.chunk(self.groups, dim=0)
        return torch.cat([quantize_weight(b, self.bits, two_bit=self.two_bit, clip=self.clip) for b in blocks])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, act_bits={self.act_bits}"


class QuantEmbedding(nn.Embedding):
    """Word embeddings quantized per row (one scale per token: ternary TWN at 2 bits)."""

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int, clip: float = DEFAULT_CLIP) -> QuantEmbedding:
        q = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, device="meta")
        q.weight, q.bits, q.clip = emb.weight, bits, clip
        q._forward_hooks, q._forward_pre_hooks = emb._forward_hooks, emb._forward_pre_hooks
        q.train(emb.training)
        return q

    def forward(self, ids: Tensor) -> Tensor:
        # per-row quantization makes each row's code depend on that row alone, so the looked-up rows are
        # quantized after the lookup: the same values and gradients as quantizing the whole table first
        # (30k rows, every step and every eval batch) at the cost of the batch's tokens
        rows = nn.functional.embedding(ids.reshape(-1), self.weight, self.padding_idx)  # 2-D like the table
        return self.quantize_rows(rows).reshape(*ids.shape, self.embedding_dim)

    def quantize_rows(self, rows: Tensor) -> Tensor:
        """Rows of the table (all of it, or looked-up ones) as the forward quantizes them: one scale per row."""
        return quantize_weight(rows, self.bits, two_bit="ternary", clip=self.clip, per_row=True)


def quant_eager_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs) -> tuple[Tensor, Tensor]:
    """transformers' eager attention with Q, K, V and the softmax probabilities quantized to
    `module.kdp_act_bits` bits (set by `quantize_bert_`; without it, 32: plain eager attention that can record
    its maps). Returns the quantized (in training: dropped-out, then quantized, as the reference)
    probabilities as the attention weights: they are what the model attends with (and what
    `output_attentions` shows). Q and K are what the family hands the attention function (ModernBERT: after
    its rotary embedding); the mask is the family's (ModernBERT's local layers: the sliding window too).

    When a feature tap set `module.kdp_capture`, the maps the losses supervise are kept on the module as
    `module.kdp_maps = (scores, probs)`, as KD-QAT's reference returns them: the scores from the QUANTIZED
    Q and K, scaled, before the additive mask (the losses mask padding themselves; ModernBERT's local-window
    mask would put the mask's minimum into a score MSE), and their masked softmax before dropout and before
    the 8-bit quantization of the probabilities; gradients flow through the activation quantizer's STE."""
    bits, clip = getattr(module, "kdp_act_bits", 32), getattr(module, "kdp_act_clip", DEFAULT_CLIP)
    query, key, value = (quantize_activation(t, bits, clip) for t in (query, key, value))
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    softmax = nn.functional.softmax(scores if attention_mask is None else scores + attention_mask, dim=-1)
    if getattr(module, "kdp_capture", False):
        module.kdp_maps = (scores, softmax)
    # as the reference: dropout first, then the 8-bit quantization of what multiplies V
    probs = quantize_activation(nn.functional.dropout(softmax, p=dropout, training=module.training), bits, clip)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, quant_eager_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)  # same additive float mask as eager


def use_recording_attention(model: nn.Module) -> None:
    """Run the model's attention through `quant_eager_attention` (families whose attention passes through
    transformers' AttentionInterface)."""
    _register_attention()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:
        model.config._attn_implementation = ATTN_IMPLEMENTATION


# ---------------------------------------------------------------------------------------------- report
@dataclass
class QuantReport:
    """What `quantize_bert_` did, and the model size as it would be stored quantized."""

    bits: int
    act_bits: int
    quantized_modules: list[str] = field(default_factory=list)
    quantized_params: int = 0  # weights stored at `bits` bits
    total_params: int = 0
    size_bits: int = 0  # quantized weights at `bits` bits + one fp32 scale per matrix/row; the rest fp32

    @property
    def size_mb(self) -> float:
        return self.size_bits / 8 / 1e6

    def as_metrics(self) -> dict[str, float]:
        return {"quant/params": float(self.quantized_params),
                "quant/fraction": self.quantized_params / max(self.total_params, 1),
                "model/size_mb": self.size_mb,
                "model/size_mb_fp32": self.total_params * 32 / 8 / 1e6}


def model_size_bits(model: nn.Module) -> int:
    """Storage size in bits: weights of QuantLinear/QuantEmbedding at their bit width plus one fp32 scale
    per matrix (per row for embeddings); every other parameter fp32. Shared parameters count once."""
    low_bit: dict[int, int] = {}
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)) and m.bits < 32:
            scales = m.weight.shape[0] if isinstance(m, QuantEmbedding) else m.groups
            low_bit[id(m.weight)] = m.weight.numel() * m.bits + 32 * scales
    return sum(low_bit.get(id(p), 32 * p.numel()) for p in model.parameters())


# ---------------------------------------------------------------------------------------------- model
def quantize_bert_(model: nn.Module, bits: int, act_bits: int = 32, *, two_bit: str = "ternary",
                   quantize_embeddings: bool = False, clip: float = DEFAULT_CLIP,
                   act_clip: float = DEFAULT_CLIP) -> QuantReport:
    """Make a transformers encoder (a family of `kdplatform/families.py`) quantization-aware, in place, and
    report what was quantized.

    bits: 2 (ternary TWN, or int2 with two_bit="uniform"), 4 (TWN-scaled 15-step grid), 8 (symmetric
    uniform) or 32 (weights fp32).
    act_bits: 32 (off) or 2..16: inputs of the quantized linears, Q, K, V and attention probabilities; only
    where the family's attention passes through transformers' attention interface (else ValueError).
    quantize_embeddings: word embeddings per row (ternary TWN at bits=2 whatever two_bit says, else `twn_levels`).
    clip / act_clip: the +-clip of weights / activations (KD-QAT: 2.5; pretrained models with large Q/K
    activations lose much at 2.5 before any training).
    The linears keep their attribute paths and hooks, so the feature taps' forward hooks fire as before; note such a hook sees Q/K/V before their activation quantization,
    which happens inside the attention function; the losses read the quantized maps from there (`kdp_maps`).
    With bits=32 and act_bits=32 the model is not touched.
    """
    if bits not in WEIGHT_BITS:
        raise ValueError(f"bits must be one of {WEIGHT_BITS}, got {bits}")
    if not (act_bits == 32 or 2 <= act_bits <= 16):
        raise ValueError(f"act_bits must be 32 (off) or between 2 and 16, got {act_bits}")
    if two_bit not in TWO_BIT_MODES:
        raise ValueError(f"two_bit must be one of {TWO_BIT_MODES}, got {two_bit!r}")
    if any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules()):
        raise ValueError("model is already quantized")
    family = family_of_type(model.config.model_type)
    if act_bits < 32 and not family.attention_interface:
        raise ValueError(f"act_bits={act_bits}: the {family.name} family's attention does not pass through "
                         "transformers' attention interface, so its activations cannot be quantized there; use "
                         "act_bits=32")

    report = QuantReport(bits, act_bits, total_params=sum(p.numel() for p in model.parameters()))
    if bits == 32 and act_bits == 32:
        report.size_bits = model_size_bits(model)
        return report

    base = model.base_model
    prefix = f"{model.base_model_prefix}." if base is not model else ""
    _replace_linears(base, family, prefix, report, bits=bits, act_bits=act_bits, two_bit=two_bit, clip=clip,
                     act_clip=act_clip)
    if quantize_embeddings and bits < 32:
        parent_name, _, attr = family.word_embeddings.rpartition(".")
        parent = base.get_submodule(parent_name)
        setattr(parent, attr, QuantEmbedding.from_embedding(getattr(parent, attr), bits, clip))
        report.quantized_modules.append(f"{prefix}{family.word_embeddings}")
        report.quantized_params += getattr(parent, attr).weight.numel()

    if act_bits < 32:
        for layer in base.get_submodule(family.layers):
            att = layer.get_submodule(family.attention)
            att.kdp_act_bits, att.kdp_act_clip = act_bits, act_clip
        use_recording_attention(model)

    report.size_bits = model_size_bits(model)
    return report


def _replace_linears(base: nn.Module, family: Family, prefix: str, report: QuantReport, **quant_args) -> None:
    """Swap the quantized linears (every encoder layer's family linears and a BERT-style pooler's dense) for
    QuantLinears; a fused QKV projection is quantized per third (one scale each for Q, K and V)."""
    n_layers = len(base.get_submodule(family.layers))
    targets = [f"{family.layers}.{i}.{path}" for i in range(n_layers) for path in family.linears()]
    if isinstance(getattr(base, "pooler", None), nn.Module) and isinstance(getattr(base.pooler, "dense", None),
                                                                           nn.Linear):
        targets.append("pooler.dense")
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = base.get_submodule(parent_name)
        linear = getattr(parent, attr)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{prefix}{name} is a {type(linear).__name__}, expected nn.Linear")
        groups = 3 if family.qkv and name.endswith("." + family.qkv) else 1
        setattr(parent, attr, QuantLinear.from_linear(linear, groups=groups, **quant_args))
        report.quantized_modules.append(prefix + name)
        if quant_args["bits"] < 32:
            report.quantized_params += linear.weight.numel()
