"""Fidelity of the worker to the two reference codebases (docs/fidelity.md), each against an oracle written
from the reference's definition in plain torch or numpy, never by calling the code under test:

- KD-QAT's attention losses supervise the maps of the QUANTIZED attention (scores from quantized Q and K),
  with the gradient through the activation quantizer's straight-through estimator;
- KD-QAT's 4-bit weight quantizer (`TwnQuantizer_mx`: a TWN-scaled 15-step grid), per matrix and per row;
- the learned projection (TinyBERT's `fit_dense`) present or absent as configured;
- CR-ILD's consistency distance D and its epoch ramp (epochs counted from 0).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdplatform.config import ResolvedLoss, ResolvedStage
from kdplatform.distill.losses import Features, term_loss
from kdplatform.distill.objective import StageLosses, consistency_ramp
from kdplatform.distill.quant import quantize_bert_, quantize_weight
from kdplatform.distill.taps import FeatureTap, forward_features

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

torch.set_num_threads(1)
CLIP = 0.5  # small on purpose: many Q/K activations of the tiny model lie beyond it
LENGTHS = [7, 4, 6]


def tiny_bert(seed: int, hidden: int = 16, layers: int = 2) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    return BertForSequenceClassification(cfg)


def tiny_batch() -> dict:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 50, (len(LENGTHS), max(LENGTHS)), generator=g)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


# ------------------------------------------------------------------------------ oracle: quantized attention
def ref_act_quant(x: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
    """KD-QAT SymQuantizer (layerwise): clip to +-clip, s = (2^(b-1) - 1) / max|x|, round(x s) / s; the
    backward passes the gradient where -clip < x < clip and zeroes it elsewhere."""
    xc = torch.where(x < clip, x, torch.full_like(x, clip))
    xc = torch.where(xc > -clip, xc, torch.full_like(x, -clip))
    s = (2 ** (bits - 1) - 1) / xc.detach().abs().max()
    q = torch.round(xc.detach() * s) / s
    inside = ((x > -clip) & (x < clip)).to(x.dtype)
    return q + (x - x.detach()) * inside  # value q, gradient 1 inside the clip, 0 outside


def ref_map_kl(ps: torch.Tensor, pt: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """KD-QAT 'M' (main.py): clamp both at 1e-8, KL over each example's valid n x n block, rows summed and
    divided by n, mean over batch and heads."""
    b, h, s, _ = ps.shape
    mask = torch.zeros(b, h, s, s)
    for i, n in enumerate(lengths):
        mask[i, :, :n, :n] = 1.0
    n = torch.tensor(lengths, dtype=torch.float32).view(-1, 1)
    st, tt = ps.clamp_min(1e-8), pt.clamp_min(1e-8)
    kl = ((tt * (tt.log() - st.log()) * mask).sum(-1).sum(-1)) / n
    return kl.mean()


def ref_quantized_attention_grad(model, x: torch.Tensor, mask: torch.Tensor, t_probs: torch.Tensor, bits: int
                                 ) -> tuple[torch.Tensor, float]:
    """The map loss of layer 1 and its gradient wrt W_Q, by hand from the layer's input x: quantized input
    of the Q/K linears, Q and K, then quantized Q and K per tensor, scores, softmax over valid keys."""
    att = model.bert.encoder.layer[0].attention.self
    wq = att.query.weight.detach().clone().requires_grad_(True)
    xq = ref_act_quant(x, bits, CLIP)
    q = xq @ wq.T + att.query.bias.detach()
    k = xq @ att.key.weight.detach().T + att.key.bias.detach()
    split = lambda y: y.view(y.shape[0], y.shape[1], 2, -1).transpose(1, 2)  # noqa: E731
    q, k = split(q), split(k)
    beyond = float(((q.abs() > CLIP).float().mean() + (k.abs() > CLIP).float().mean()) / 2)
    qq, kq = ref_act_quant(q, bits, CLIP), ref_act_quant(k, bits, CLIP)
    scores = qq @ kq.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    loss = ref_map_kl(torch.softmax(scores, dim=-1), t_probs, LENGTHS)
    loss.backward()
    return wq.grad, beyond


def teacher_maps(batch: dict) -> Features:
    g = torch.Generator().manual_seed(11)
    b, s = batch["input_ids"].shape
    logits = torch.randn(b, 2, s, s, generator=g) * 3
    probs = torch.softmax(logits.masked_fill(~batch["attention_mask"].bool()[:, None, None, :], float("-inf")), -1)
    return Features(logits=torch.zeros(b, 2), attention_mask=batch["attention_mask"], num_heads=2,
                    maps={1: (logits, probs)})


@pytest.mark.parametrize("bits", [8, 4])
def test_attention_map_loss_gradient_is_the_quantized_attentions(bits):
    model = tiny_bert(0)
    with torch.no_grad():  # spread Q and K beyond the clip
        model.bert.encoder.layer[0].attention.self.query.weight.mul_(20)
        model.bert.encoder.layer[0].attention.self.key.weight.mul_(20)
    quantize_bert_(model, bits=32, act_bits=bits, act_clip=CLIP)
    model.train()
    batch = tiny_batch()
    layer_input = {}
    model.bert.encoder.layer[0].attention.self.query.register_forward_pre_hook(
        lambda m, args: layer_input.setdefault("x", args[0].detach()))
    tap = FeatureTap(model, {1})
    s = forward_features(model, batch, tap, False)
    t = teacher_maps(batch)
    loss = term_loss("attention_map_kl", s, t, [(1, 1)])
    loss.backward()
    got = model.bert.encoder.layer[0].attention.self.query.weight.grad.clone()
    tap.remove()
    want, beyond = ref_quantized_attention_grad(model, layer_input["x"], batch["attention_mask"], t.maps[1][1], bits)
    assert beyond > 0.15  # the clip matters: a good share of Q/K values lie beyond it
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # the loss value is the quantized map's too
    assert float(loss) == pytest.approx(float(ref_map_kl(s.maps[1][1].detach(), t.maps[1][1], LENGTHS)), rel=1e-5)
    # the map recomputed from the pre-quantization Q and K (what the hooks see) is a different map
    recomputed = Features(logits=s.logits, attention_mask=s.attention_mask, num_heads=2, q=s.q, k=s.k)
    assert not torch.allclose(recomputed.probs(1), s.probs(1), atol=1e-3)


def test_full_precision_activations_read_the_same_map_from_q_and_k():
    """act_bits 32: nothing to capture, the map from the hooked Q and K is the model's own."""
    model = tiny_bert(1)
    quantize_bert_(model, bits=8, act_bits=32)
    tap = FeatureTap(model, {1})
    s = forward_features(model, tiny_batch(), tap, False)
    tap.remove()
    assert s.maps == {}
    model.set_attn_implementation("eager")  # to read the model's own attention probabilities
    batch = tiny_batch()
    out = model(**batch, output_attentions=True)
    m = batch["attention_mask"].bool()
    valid = (m[:, None, :, None] & m[:, None, None, :]).expand_as(s.probs(1))
    torch.testing.assert_close(s.probs(1)[valid], out.attentions[0][valid], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ oracle: 4-bit weights
def ref_twn_mx(w: np.ndarray, bits: int, clip: float, per_row: bool) -> np.ndarray:
    """KD-QAT TwnQuantizer_mx (mean_scale 1): clip, m = mean|W|, alpha = mean|W| over |W| > m,
    step = 2 alpha / (2^bits - 1), round(clamp(W, -alpha, alpha) / step) * step. In float32 as the reference
    runs: a weight clamped to alpha sits at 7.5 steps, where float32 and float64 round differently."""
    w = np.clip(w.astype(np.float32), np.float32(-clip), np.float32(clip))
    rows = w if per_row else w.reshape(1, -1)
    out = np.empty_like(rows)
    for i, r in enumerate(rows):
        m = np.abs(r).mean(dtype=np.float32)
        alpha = np.abs(r[np.abs(r) > m]).mean(dtype=np.float32)
        step = np.float32(alpha * np.float32(2)) / np.float32(2**bits - 1)
        out[i] = np.round(np.clip(r, -alpha, alpha) / step) * step  # numpy rounds half to even, as torch
    return out.reshape(w.shape)


@pytest.mark.parametrize("per_row", [False, True])
def test_4bit_weights_equal_the_reference_quantizer(per_row):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 40, generator=g) * 0.8
    w[0, 0], w[1, 1] = 3.0, -4.0  # beyond the 2.5 clip
    got = quantize_weight(w, 4, clip=2.5, per_row=per_row)
    want = ref_twn_mx(w.numpy(), 4, 2.5, per_row)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    for group in (got.numpy() if per_row else got.numpy().reshape(1, -1)):  # one grid per matrix / row
        assert len(np.unique(group)) <= 2**4 + 1
    # straight-through gradient: 1 inside +-clip (also between alpha and clip), 0 outside
    wg = w.clone().requires_grad_(True)
    quantize_weight(wg, 4, clip=2.5, per_row=per_row).sum().backward()
    np.testing.assert_array_equal(wg.grad.numpy(), (w.abs() < 2.5).float().numpy())


# ------------------------------------------------------------------------------ projection (fit_dense)
def stage_with(name: str, projection: bool, pairs=((1, 2), (2, 4))) -> ResolvedStage:
    term = ResolvedLoss(name=name, weight=1.0, layer_map="uniform", layer_pairs=list(pairs), projection=projection)
    return ResolvedStage(name="ild", losses=[term], epochs=1, max_steps=None, lr=1e-4, batch_size=4, warmup=0.0,
                         weight_decay=0.0, max_grad_norm=None, eval_every=0)


@pytest.mark.parametrize("name", ["hidden_mse", "pkd"])
def test_projection_present_and_absent_as_configured(name):
    student, teacher = tiny_bert(2, layers=2), tiny_bert(3, layers=4)
    torch.manual_seed(0)
    on = StageLosses(stage_with(name, True), student, teacher, 2)
    off = StageLosses(stage_with(name, False), student, teacher, 2)
    on.close(), off.close()
    assert list(off.projections) == []
    proj = on.projections[name]
    assert (proj.in_features, proj.out_features) == (16, 16)  # learned even at equal widths (reference fit_dense)
    assert float(proj.bias.abs().max()) == 0.0 and 0.01 < float(proj.weight.std()) < 0.03  # normal(0, 0.02)
    s = Features(logits=torch.zeros(2, 2), attention_mask=torch.ones(2, 3, dtype=torch.long), num_heads=2,
                 hidden=tuple(torch.randn(2, 3, 16) for _ in range(3)))
    t = Features(logits=torch.zeros(2, 2), attention_mask=s.attention_mask, num_heads=2,
                 hidden=tuple(torch.randn(2, 3, 16) for _ in range(5)))
    got = term_loss(name, s, t, [(1, 2)], project=on.project)
    hs = s.hidden[1] @ proj.weight.detach().T + proj.bias.detach()
    if name == "hidden_mse":
        want = ((hs - t.hidden[2]) ** 2).mean()
    else:
        want = ((F.normalize(hs[:, 0], dim=-1) - F.normalize(t.hidden[2][:, 0], dim=-1)) ** 2).mean()
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_hidden_mse_always_projects_when_widths_differ():
    student, teacher = tiny_bert(2, hidden=16), tiny_bert(3, hidden=32, layers=4)
    losses = StageLosses(stage_with("hidden_mse", False), student, teacher, 2)
    losses.close()
    assert (losses.projections["hidden_mse"].in_features, losses.projections["hidden_mse"].out_features) == (16, 32)


# ------------------------------------------------------------------------------ consistency ramp
def test_epoch_ramp_is_epoch_over_epochs_counted_from_zero():
    """CR-ILD: w_ic * (args.epoch / num_train_epochs), args.epoch = 0, 1, ... (run_finetune.py)."""
    cr = SimpleNamespace(ramp="epoch")
    got = [consistency_ramp(cr, step, steps_per_epoch=10, total=30) for step in range(30)]
    assert got == [0.0] * 10 + [1 / 3] * 10 + [2 / 3] * 10
    step_ramp = SimpleNamespace(ramp="step")
    assert consistency_ramp(step_ramp, 15, 10, 30) == 0.5
