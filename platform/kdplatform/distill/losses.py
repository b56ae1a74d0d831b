"""The loss menu: small pure functions over tensors, registered by name (DESIGN.md section 4).

Shapes: logits (B, C); hidden states and attention outputs (B, S, H); attention scores/probabilities
(B, heads, S, S); `attention_mask` (B, S) of 0/1 for valid tokens. Every function returns a scalar and
averages over valid (non-padding) positions only, so a value never depends on how a batch was padded.
A layer-wise term's reduction over its mapped layer pairs is part of its definition (see each registered term).

The menu (`kdplatform/loss_menu.py`: name -> what it reads, per layer or not, options) is the one table of
losses. Each menu entry has exactly one term function here, registered with `@loss(name)`; `term_loss`
dispatches through that registry, and the feature taps and the teacher output cache read the menu's `reads`.

>>> import torch
>>> s, t = torch.randn(4, 3), torch.randn(4, 3)
>>> float(logit_kd(t, t, temperature=2.0)) >= 0
True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from kdplatform.loss_menu import LOSS_MENU

EPS_MAP = 1e-8  # KD-QAT clamps both attention maps at 1e-8 before the log


def _valid_mean(x: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of a (B, S, ...) tensor over valid tokens and every trailing unit."""
    m = attention_mask.to(x.dtype).reshape(*attention_mask.shape, *([1] * (x.dim() - 2)))
    units = x[0, 0].numel()
    return (x * m).sum() / (m.sum() * units).clamp_min(1)


def _pair_mask(attention_mask: Tensor) -> Tensor:
    """(B, 1, S, S) mask of valid (query, key) pairs."""
    m = attention_mask.bool()
    return (m[:, None, :, None] & m[:, None, None, :])


def logit_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Soft cross-entropy -sum softmax(z_t/T) log softmax(z_s/T), times T^2, batch mean.

    Regression (one output, STS-B): MSE(z_s / T, z_t / T), without T^2, as CR-ILD's reference (`DistillKL`);
    at T = 1 (KD-QAT) it is the plain MSE of the predictions.
    """
    if student_logits.shape[-1] == 1:
        return F.mse_loss(student_logits.float() / temperature, teacher_logits.float() / temperature)
    t = F.softmax(teacher_logits.float() / temperature, dim=-1)
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return -(t * log_s).sum(-1).mean() * temperature**2


def ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Hard-label cross-entropy; MSE for regression (one output)."""
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def hidden_mse(student_hidden: Tensor, teacher_hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """MSE of hidden states (already projected to the teacher's width), over valid tokens and units."""
    return _valid_mean((student_hidden.float() - teacher_hidden.float()) ** 2, attention_mask)


def attention_score_mse(student_scores: Tensor, teacher_scores: Tensor, attention_mask: Tensor) -> Tensor:
    """MSE of pre-softmax attention scores (TernaryBERT 'S').

    Averaged over valid (query, key) pairs and heads. TinyBERT's reference zeroes masked entries and averages
    over all S x S entries, which makes the value depend on padding; here masked pairs are left out instead.
    """
    pm = _pair_mask(attention_mask).expand_as(student_scores)
    diff = torch.where(pm, student_scores.float() - teacher_scores.float(), 0.0)
    return (diff**2).sum() / pm.sum().clamp_min(1)


def _row_kl(teacher_probs: Tensor, student_logp: Tensor, attention_mask: Tensor) -> Tensor:
    """KL(t || s) per query row summed over valid keys; mean over valid rows, heads and batch."""
    key_valid = attention_mask.bool()[:, None, None, :]
    t = teacher_probs.detach().float().clone()  # also accepts tensors made under inference_mode
    kl = torch.where(key_valid, t * (torch.log(t.clamp_min(1e-12)) - student_logp), 0.0).sum(-1)  # (B,h,S)
    rows = attention_mask.to(kl.dtype)[:, None, :].expand_as(kl)
    return (kl * rows).sum() / rows.sum().clamp_min(1)


def attention_kl(student_probs: Tensor, teacher_probs: Tensor, attention_mask: Tensor) -> Tensor:
    """KL between teacher and student attention distributions, rows over valid keys (TinyBERT in CR-ILD)."""
    return _row_kl(teacher_probs, torch.log(student_probs.float().clamp_min(1e-12)), attention_mask)


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, S, H) -> (B, heads, S, H/heads)."""
    b, s, h = x.shape
    return x.view(b, s, num_heads, h // num_heads).transpose(1, 2)


def masked_scores(x_query: Tensor, x_key: Tensor, num_heads: int) -> Tensor:
    """Scaled dot products per head, X_q X_k^T / sqrt(d_head), shape (B, heads, S, S)."""
    q, k = split_heads(x_query, num_heads), split_heads(x_key, num_heads)
    return q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])


def masked_log_softmax(scores: Tensor, attention_mask: Tensor) -> Tensor:
    key_valid = attention_mask.bool()[:, None, None, :]
    return F.log_softmax(scores.masked_fill(~key_valid, torch.finfo(scores.dtype).min), dim=-1)


def relation_kl(student_x: Tensor, teacher_x: Tensor, attention_mask: Tensor, num_heads: int) -> Tensor:
    """MiniLMv2 self-attention relation KL for one of Q, K or V.

    R = softmax(X X^T / sqrt(d_head)) per relation head over valid keys; KL(R_t || R_s) averaged over
    valid rows. Teacher and student may differ in width; both are split into `num_heads` relation heads.
    """
    log_rs = masked_log_softmax(masked_scores(student_x, student_x, num_heads), attention_mask)
    log_rt = masked_log_softmax(masked_scores(teacher_x, teacher_x, num_heads), attention_mask)
    return _row_kl(log_rt.exp(), log_rs, attention_mask)


def pkd(student_cls: Tensor, teacher_cls: Tensor) -> Tensor:
    """Patient KD: MSE between L2-normalised [CLS] vectors, (B, H) or stacked layers (B, L, H): the mean over
    every layer, example and unit, i.e. the mean of the per-layer MSEs (CR-ILD's `PKD_Loss`)."""
    return F.mse_loss(F.normalize(student_cls.float(), dim=-1), F.normalize(teacher_cls.float(), dim=-1))


def attention_map_kl(student_probs: Tensor, teacher_probs: Tensor, attention_mask: Tensor) -> Tensor:
    """KD-QAT attention-map loss 'M'.

    KL(A_t, A_s) with both maps clamped >= 1e-8, restricted to each example's valid n x n block: summed
    over keys, summed over valid query rows and divided by n, then averaged over batch and heads.
    """
    pm = _pair_mask(attention_mask)  # (B,1,S,S)
    t = teacher_probs.float().clamp_min(EPS_MAP)
    s = student_probs.float().clamp_min(EPS_MAP)
    kl = torch.where(pm, t * (t.log() - s.log()), 0.0).sum(dim=(-1, -2))  # (B, heads)
    n = attention_mask.sum(-1).to(kl.dtype).clamp_min(1)[:, None]
    return (kl / n).mean()


def attention_output_mse(student_out: Tensor, teacher_out: Tensor, attention_mask: Tensor) -> Tensor:
    """KD-QAT attention-output loss 'O': MSE of LN(W_O ctx + b + x), mean over valid tokens and units."""
    return _valid_mean((student_out.float() - teacher_out.float()) ** 2, attention_mask)


# ------------------------------------------------------------------------------------- the registry
@dataclass
class Features:
    """What one forward pass exposes to the losses. Layers are 1-based; hidden[0] is the embedding output."""

    logits: Tensor
    attention_mask: Tensor
    num_heads: int
    hidden: tuple[Tensor, ...] | None = None
    q: dict[int, Tensor] = field(default_factory=dict)
    k: dict[int, Tensor] = field(default_factory=dict)
    v: dict[int, Tensor] = field(default_factory=dict)
    attn_out: dict[int, Tensor] = field(default_factory=dict)
    # (scores, probabilities) as the model computed them (taps.FeatureTap): a quantized attention (from
    # quantized Q and K), or a family whose scores hold position terms (kdplatform/families.py, maps)
    maps: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def scores(self, layer: int) -> Tensor:
        """Pre-softmax attention scores, per family (docs/families.md); padded keys are only ever read through
        masks. BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT: Q K^T / sqrt(d_head) (from quantized Q and K
        where the quantized attention records them). ModernBERT: the same after the rotary embedding, before
        any mask (pairs outside a local layer's window keep their dot products). MPNet, DeBERTa: log of the model's
        probabilities, i.e. its scores (with the relative-position / disentangled terms) minus their row
        log-sum-exp over valid keys: these families do not expose the softmax input without copying their code."""
        if layer in self.maps:
            return self.maps[layer][0].float()
        return masked_scores(self.q[layer], self.k[layer], self.num_heads)

    def probs(self, layer: int) -> Tensor:
        """Attention probabilities over valid keys: the model's own where recorded, else softmax of `scores`
        (exactly the model's for families without position terms in the scores)."""
        if layer in self.maps:
            return self.maps[layer][1].float()
        return masked_log_softmax(self.scores(layer), self.attention_mask).exp()

    def flipped(self) -> Features:
        """The same features with the batch reversed (CR-ILD's mixup partner)."""
        flip = lambda d: {k: v.flip(0) for k, v in d.items()}  # noqa: E731
        return Features(logits=self.logits.flip(0), attention_mask=self.attention_mask.flip(0),
                        num_heads=self.num_heads, hidden=tuple(h.flip(0) for h in self.hidden) if self.hidden else None,
                        q=flip(self.q), k=flip(self.k), v=flip(self.v), attn_out=flip(self.attn_out),
                        maps={k: (s.flip(0), p.flip(0)) for k, (s, p) in self.maps.items()})


@dataclass
class TermInputs:
    """Everything but the two models' features that a term may read."""

    attention_mask: Tensor
    labels: Tensor | None = None
    temperature: float = 1.0
    relations: tuple[str, ...] | list[str] = ("q", "k", "v")
    # (loss name, student hidden state) -> the term's learned projection of it (or it unchanged)
    project: Callable[[str, Tensor], Tensor] | None = None


Term = Callable[[Features, "Features | None", list[tuple[int, int]], TermInputs], Tensor]
TERMS: dict[str, Term] = {}


def loss(name: str) -> Callable[[Term], Term]:
    """Register the term function of a menu entry (`kdplatform/loss_menu.py`); one function per entry."""
    if name not in LOSS_MENU:
        raise KeyError(f"loss {name!r} is not in the menu (kdplatform/loss_menu.py); add its entry there first")

    def deco(fn: Term) -> Term:
        if name in TERMS:
            raise KeyError(f"loss {name!r} is registered twice")
        TERMS[name] = fn
        return fn

    return deco


def term_loss(name: str, s: Features, t: Features | None, pairs: list[tuple[int, int]], *,
              temperature: float = 1.0, relations: tuple[str, ...] | list[str] = ("q", "k", "v"),
              labels: Tensor | None = None, project: Callable[[str, Tensor], Tensor] | None = None,
              mask: Tensor | None = None) -> Tensor:
    """Value of one configured term: its registered function on the mapped layer pairs. `mask` overrides the
    student's attention mask (mixup's union mask)."""
    if name not in TERMS:
        raise KeyError(f"unknown loss term {name!r}; registered: {sorted(TERMS)}")
    if LOSS_MENU[name].needs_teacher and t is None:
        raise ValueError(f"loss {name!r} needs teacher features")
    inputs = TermInputs(s.attention_mask if mask is None else mask, labels, temperature, relations, project)
    return TERMS[name](s, t, pairs, inputs)


def _summed(pairs: list[tuple[int, int]], like: Tensor, value: Callable[[int, int], Tensor]) -> Tensor:
    """Sum of `value(student_layer, teacher_layer)` over the mapped pairs (float32)."""
    total = like.new_zeros((), dtype=torch.float32)
    for ls, lt in pairs:
        total = total + value(ls, lt)
    return total


def _student_hidden(name: str, s: Features, layer: int, x: TermInputs) -> Tensor:
    h = s.hidden[layer]
    return x.project(name, h) if x.project else h


# ------------------------------------------------------------------------------------- the terms
@loss("ce")
def ce_term(s, t, pairs, x):
    return ce(s.logits, x.labels)


@loss("logit_kd")
def logit_kd_term(s, t, pairs, x):
    return logit_kd(s.logits, t.logits, x.temperature)


@loss("hidden_mse")
def hidden_mse_term(s, t, pairs, x):
    return _summed(pairs, s.logits, lambda ls, lt: hidden_mse(_student_hidden("hidden_mse", s, ls, x),
                                                              t.hidden[lt], x.attention_mask))


@loss("pkd")
def pkd_term(s, t, pairs, x):
    """Averaged over the mapped layers (the reference stacks them), not summed."""
    # float first: teacher states read from the fp16 output cache cannot be stacked under CPU bf16 autocast
    student = torch.stack([_student_hidden("pkd", s, ls, x)[:, 0].float() for ls, _ in pairs], dim=1)
    return pkd(student, torch.stack([t.hidden[lt][:, 0].float() for _, lt in pairs], dim=1))


@loss("attention_score_mse")
def attention_score_mse_term(s, t, pairs, x):
    return _summed(pairs, s.logits, lambda ls, lt: attention_score_mse(s.scores(ls), t.scores(lt),
                                                                       x.attention_mask))


@loss("attention_kl")
def attention_kl_term(s, t, pairs, x):
    return _summed(pairs, s.logits, lambda ls, lt: attention_kl(s.probs(ls), t.probs(lt), x.attention_mask))


@loss("attention_map_kl")
def attention_map_kl_term(s, t, pairs, x):
    return _summed(pairs, s.logits, lambda ls, lt: attention_map_kl(s.probs(ls), t.probs(lt), x.attention_mask))


@loss("attention_output_mse")
def attention_output_mse_term(s, t, pairs, x):
    return _summed(pairs, s.logits, lambda ls, lt: attention_output_mse(s.attn_out[ls], t.attn_out[lt],
                                                                        x.attention_mask))


@loss("relation_kl")
def relation_kl_term(s, t, pairs, x):
    total = s.logits.new_zeros((), dtype=torch.float32)
    for ls, lt in pairs:
        for r in x.relations:
            total = total + relation_kl(getattr(s, r)[ls], getattr(t, r)[lt], x.attention_mask, t.num_heads)
    return total
