"""KD-QAT quantizers (TWN ternary, symmetric uniform, int2, activations), their STE gradients, and
`quantize_bert_` on tiny random BERTs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdplatform.distill.quant import (
    ATTN_IMPLEMENTATION, QuantEmbedding, QuantLinear, int2_quantize, quantize_activation, quantize_bert_,
    ternarize, ternarize_rows, twn_levels, uniform_quantize,
)

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

torch.set_num_threads(1)

H, I, L, V, P, T, LABELS = 32, 64, 2, 100, 64, 2, 2


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4,
                     intermediate_size=I, max_position_embeddings=P, type_vocab_size=T, num_labels=LABELS)
    return BertForSequenceClassification(cfg).eval()


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


# ---------------------------------------------------------------------------------------------- quantizers
def test_ternarize_takes_three_values_with_twn_threshold_and_alpha():
    torch.manual_seed(0)
    w = (torch.randn(64, 48) * 0.05).requires_grad_()  # the STE path must not perturb the values
    q = ternarize(w).detach()
    w = w.detach()
    delta = 0.7 * w.abs().mean()
    keep = w.abs() > delta
    alpha = w.abs()[keep].mean()
    values = torch.unique(q)
    assert len(values) == 3 and values[1] == 0 and values[0] == -values[2]  # exactly {-alpha, 0, +alpha}
    torch.testing.assert_close(values[2], alpha)
    assert torch.equal(q != 0, keep)
    assert torch.equal(torch.sign(q[keep]), torch.sign(w[keep]))
    torch.testing.assert_close(q.abs().max(), alpha)


def test_ternarize_clips_before_the_statistics():
    w = torch.tensor([[0.1, -4.0, 0.5, 3.0, -0.05, 0.0]])
    q = ternarize(w, clip=2.5)
    wc = w.clamp(-2.5, 2.5)
    keep = wc.abs() > 0.7 * wc.abs().mean()
    alpha = wc.abs()[keep].mean()
    torch.testing.assert_close(q, alpha * torch.sign(wc) * keep)


def test_ternarize_rows_has_one_alpha_per_row():
    torch.manual_seed(0)
    w = torch.randn(10, 32) * torch.linspace(0.01, 1.0, 10)[:, None]  # rows on very different scales
    q = ternarize_rows(w.requires_grad_()).detach()
    w = w.detach()
    for row_w, row_q in zip(w, q):
        keep = row_w.abs() > 0.7 * row_w.abs().mean()
        alpha = row_w.abs()[keep].mean()
        torch.testing.assert_close(row_q, alpha * torch.sign(row_w) * keep)
        assert len(torch.unique(row_q)) == 3


def test_ternarize_all_zero_matrix_stays_zero():
    assert torch.equal(ternarize(torch.zeros(3, 4)), torch.zeros(3, 4))


@pytest.mark.parametrize("bits", [4, 8])
def test_uniform_quantize_levels(bits):
    torch.manual_seed(0)
    w = torch.randn(128, 128)
    q = uniform_quantize(w.requires_grad_(), bits).detach()
    w = w.detach()
    levels = torch.unique(q)
    assert len(levels) <= 2 ** bits - 1  # symmetric: -(2^(b-1)-1) .. 2^(b-1)-1
    assert (levels > 0).sum() <= 2 ** (bits - 1) - 1
    scale = w.abs().max() / (2 ** (bits - 1) - 1)
    codes = q / scale
    torch.testing.assert_close(codes, codes.round())  # every value is an integer multiple of the scale
    torch.testing.assert_close(q.abs().max(), w.abs().max())
    assert (q - w).abs().max() <= scale / 2 + 1e-6


def test_uniform_quantize_per_row_and_clip():
    w = torch.tensor([[0.1, -0.2, 0.4], [10.0, -3.0, 1.0]])
    q = uniform_quantize(w, 8, clip=2.5, per_row=True)
    torch.testing.assert_close(q[0].abs().max(), torch.tensor(0.4))
    torch.testing.assert_close(q[1, :2], torch.tensor([2.5, -2.5]))


def test_int2_quantize_has_four_asymmetric_levels():
    torch.manual_seed(0)
    w = torch.randn(64, 64)
    q = int2_quantize(w)
    s = w.abs().max() / 2
    codes = set(torch.round(q / s).tolist() for q in torch.unique(q))
    assert codes <= {-2.0, -1.0, 0.0, 1.0} and len(codes) == 4


def test_activation_quantization_keeps_at_most_255_levels_and_clips():
    torch.manual_seed(0)
    x = torch.randn(8, 64, 128)
    q = quantize_activation(x.requires_grad_(), bits=8, clip=2.5).detach()
    assert len(torch.unique(q)) <= 255
    assert q.abs().max() <= 2.5
    inside = x.abs() < 2.4
    assert (q - x)[inside].abs().max() <= 2.5 / 127 / 2 + 1e-6
    assert len(torch.unique(quantize_activation(x, bits=4))) <= 15
    assert quantize_activation(x, bits=32) is x
    codes = q * 127 / 2.5  # max|clamped x| is the clip here
    torch.testing.assert_close(codes, codes.round())


@pytest.mark.parametrize("quantizer", [
    lambda w: ternarize(w, clip=1.0),
    lambda w: ternarize_rows(w, clip=1.0),
    lambda w: uniform_quantize(w, 4, clip=1.0),
    lambda w: uniform_quantize(w, 8, clip=1.0),
    lambda w: int2_quantize(w, clip=1.0),
    lambda w: quantize_activation(w, 8, clip=1.0),
], ids=["ternary", "ternary_rows", "uniform4", "uniform8", "int2", "activation8"])
def test_ste_gradient_is_identity_inside_clip_and_zero_outside(quantizer):
    torch.manual_seed(0)
    w = (torch.randn(16, 16) * 0.8).requires_grad_()
    upstream = torch.randn(16, 16)
    (quantizer(w) * upstream).sum().backward()
    inside = w.detach().abs() <= 1.0
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(w.grad[inside], upstream[inside])
    assert torch.all(w.grad[~inside] == 0)


# ---------------------------------------------------------------------------------------------- model
def test_bits_32_leaves_the_model_bit_identical():
    model, ref = tiny_bert(), tiny_bert()
    before = {k: v for k, v in model.state_dict().items()}
    impl = model.config._attn_implementation
    report = quantize_bert_(model, bits=32, act_bits=32)
    assert report.quantized_modules == [] and report.quantized_params == 0
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(after[k] is before[k] or after[k].data_ptr() == before[k].data_ptr() for k in before)
    assert all(torch.equal(after[k], ref.state_dict()[k]) for k in after)
    assert not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())
    assert model.config._attn_implementation == impl
    with torch.no_grad():
        assert torch.equal(model(**batch()).logits, ref(**batch()).logits)
    assert report.size_bits == 32 * report.total_params


@pytest.mark.parametrize("act_bits", [32, 8])
def test_8_bit_forward_stays_close_to_full_precision(act_bits):
    model = tiny_bert()
    with torch.no_grad():
        ref = model(**batch()).logits
        quantize_bert_(model, bits=8, act_bits=act_bits)
        out = model(**batch()).logits
    assert cosine(out, ref) > 0.99
    assert (out - ref).norm() / ref.norm() < 0.05


@pytest.mark.parametrize("two_bit,act_bits,embeddings", [("ternary", 8, True), ("uniform", 32, False)])
def test_2_bit_model_runs_and_trains(two_bit, act_bits, embeddings):
    model = tiny_bert().train()
    keys = list(model.state_dict())
    report = quantize_bert_(model, bits=2, act_bits=act_bits, two_bit=two_bit, quantize_embeddings=embeddings)
    assert list(model.state_dict()) == keys  # latent fp weights keep their names
    out = model(**batch(), labels=torch.tensor([0, 1, 1, 0]))
    assert torch.isfinite(out.logits).all()
    out.loss.backward()
    for name in report.quantized_modules:
        grad = model.get_submodule(name).weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    weight = model.bert.encoder.layer[0].attention.self.query.weight
    before = weight.detach().clone()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(weight, before)  # the optimizer updates the latent fp weight


def test_quant_linear_forward_uses_quantized_weights_and_inputs():
    model = tiny_bert()
    quantize_bert_(model, bits=2, act_bits=8)
    ffn1 = model.bert.encoder.layer[1].intermediate.dense
    assert isinstance(ffn1, QuantLinear) and isinstance(ffn1.weight, nn.Parameter)
    x = torch.randn(2, 5, H) * 2
    expected = nn.functional.linear(quantize_activation(x, 8), ternarize(ffn1.weight), ffn1.bias)
    torch.testing.assert_close(ffn1(x), expected)
    assert isinstance(model.classifier, nn.Linear) and not isinstance(model.classifier, QuantLinear)
    assert type(model.bert.embeddings.word_embeddings) is nn.Embedding


def test_evaluation_after_a_fused_adamw_step_uses_the_new_weights():
    """The worker's optimizer is fused AdamW, which updates weights without bumping their version counter:
    an evaluation after a step must compute with the stepped weights (a version-keyed cache of quantized
    weights once kept scoring the first evaluation's)."""
    model = tiny_bert()
    quantize_bert_(model, bits=8, act_bits=32, quantize_embeddings=True)
    ffn1 = model.bert.encoder.layer[1].intermediate.dense
    x = torch.randn(2, 5, H)
    with torch.no_grad():
        first = ffn1(x)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    model.train()
    model(**batch()).logits.sum().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after_step = ffn1(x)
    torch.testing.assert_close(after_step, nn.functional.linear(x, uniform_quantize(ffn1.weight, 8), ffn1.bias))
    assert not torch.equal(after_step, first)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_embedding_rows_quantized_after_lookup_equal_the_whole_table_quantized(bits):
    """Per-row codes depend on their row alone: looking up first gives the same values and the same
    gradient as quantizing the whole table and then looking up (the padding row gets no gradient)."""
    model = tiny_bert()
    quantize_bert_(model, bits=bits, act_bits=32, quantize_embeddings=True)
    emb = model.bert.embeddings.word_embeddings
    assert isinstance(emb, QuantEmbedding)
    ids = batch()["input_ids"]
    ids[0, -1] = emb.padding_idx
    out = emb(ids)
    out.pow(2).sum().backward()
    got_grad, emb.weight.grad = emb.weight.grad.clone(), None
    table = ternarize_rows(emb.weight) if bits == 2 else twn_levels(emb.weight, bits, per_row=True)
    expected = nn.functional.embedding(ids, table, emb.padding_idx)
    expected.pow(2).sum().backward()
    assert torch.equal(out, expected)
    torch.testing.assert_close(got_grad, emb.weight.grad)
    assert not got_grad[emb.padding_idx].any()


def test_attention_activations_quantized_and_mask_respected():
    model = tiny_bert()
    quantize_bert_(model, bits=8, act_bits=8)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    with torch.no_grad():
        out = model(**batch(), output_attentions=True)
    probs = out.attentions[0]
    assert probs.shape == (4, 4, 12, 12)
    assert len(torch.unique(probs)) <= 255
    assert torch.all(probs[0, :, :, 8:] == 0) and torch.all(probs[1, :, :, 5:] == 0)  # padded keys
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 4, 12), atol=0.05, rtol=0)


def test_hooks_on_original_paths_still_fire():
    model = tiny_bert()
    seen = []
    model.bert.encoder.layer[0].attention.self.query.register_forward_hook(lambda m, i, o: seen.append("q_before"))
    quantize_bert_(model, bits=4, act_bits=8)
    layer = model.bert.encoder.layer[1]
    layer.attention.self.key.register_forward_hook(lambda m, i, o: seen.append("k"))
    layer.attention.output.register_forward_hook(lambda m, i, o: seen.append(("attn_out", o.shape)))
    with torch.no_grad():
        model(**batch())
    assert seen == ["q_before", "k", ("attn_out", (4, 12, H))]


@pytest.mark.parametrize("bits,embeddings", [(2, False), (4, False), (8, True), (2, True)])
def test_report_counts_and_size(bits, embeddings):
    model = tiny_bert()
    report = quantize_bert_(model, bits=bits, act_bits=8, quantize_embeddings=embeddings)
    # Independent count from the config.
    embedding_params = V * H + P * H + T * H + 2 * H
    layer_params = 4 * (H * H + H) + (H * I + I) + (I * H + H) + 2 * (2 * H)
    total = embedding_params + L * layer_params + (H * H + H) + (H * LABELS + LABELS)
    matrices = L * (4 * H * H + 2 * H * I) + H * H  # Q, K, V, attn out, FFN1, FFN2 per layer + pooler
    scales = 6 * L + 1
    if embeddings:
        matrices, scales = matrices + V * H, scales + V
    assert report.total_params == total == sum(p.numel() for p in model.parameters())
    assert report.quantized_params == matrices
    assert len(report.quantized_modules) == 6 * L + 1 + embeddings
    expected_bits = matrices * bits + 32 * scales + 32 * (total - matrices)
    assert report.size_bits == expected_bits
    metrics = report.as_metrics()
    assert metrics["quant/params"] == matrices
    assert metrics["quant/fraction"] == pytest.approx(matrices / total)
    assert metrics["model/size_mb"] == pytest.approx(expected_bits / 8 / 1e6)
    assert metrics["model/size_mb_fp32"] == pytest.approx(total * 4 / 1e6)


def test_activation_only_quantization_counts_no_low_bit_weights():
    model = tiny_bert()
    report = quantize_bert_(model, bits=32, act_bits=8)
    assert len(report.quantized_modules) == 6 * L + 1 and report.quantized_params == 0
    assert report.size_bits == 32 * report.total_params
    with torch.no_grad():
        assert torch.isfinite(model(**batch()).logits).all()


def test_invalid_settings_raise():
    with pytest.raises(ValueError, match="bits"):
        quantize_bert_(tiny_bert(), bits=3)
    with pytest.raises(ValueError, match="act_bits"):
        quantize_bert_(tiny_bert(), bits=8, act_bits=1)
    with pytest.raises(ValueError, match="two_bit"):
        quantize_bert_(tiny_bert(), bits=2, two_bit="binary")
    model = tiny_bert()
    quantize_bert_(model, bits=8)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_bert_(model, bits=8)


def test_deepcopy_of_quantized_model_matches():
    model = tiny_bert()
    quantize_bert_(model, bits=2, act_bits=8)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(clone(**batch()).logits, model(**batch()).logits)
