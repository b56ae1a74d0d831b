"""Worker-level behaviour of one training step on tiny random BERTs (teacher 4 layers, student its bottom 2,
hidden 32, 4 heads): CR-ILD embedding mixup, the consistency term and its linear ramp, the EMA target, the
forward-hook taps (Q/K/V, attention output) and Features.probs against the model's eager attention maps."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdplatform.config import TrialConfig, resolve_trial
from kdplatform.distill.losses import Features, relation_kl
from kdplatform.distill.models import freeze, load_classifier
from kdplatform.distill.objective import StageLosses, ema_update, step_terms
from kdplatform.distill.taps import FeatureTap, embedding_mixup, forward_features

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification  # noqa: E402

torch.set_num_threads(1)

VOCAB, HIDDEN, HEADS, T_LAYERS, S_LAYERS = 100, 32, 4, 4, 2
LENGTHS = [10, 7, 5, 8]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny random teacher saved like a checkpoint: config.json gives its depth to resolve_trial.
    Dropout 0 so that two passes over the same inputs are identical (the comparisons below are exact)."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=T_LAYERS, num_attention_heads=HEADS,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():  # a less uniform random init: attention maps far from flat
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(8)
            layer.attention.self.key.weight.mul_(8)
    folder = tmp_path_factory.mktemp("tiny_teacher")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return freeze(load_classifier(str(teacher_dir), 2))


@pytest.fixture()
def student(teacher_dir):
    torch.manual_seed(1)
    s = load_classifier(str(teacher_dir), 2, num_layers=S_LAYERS)  # truncate: bottom 2 layers
    s.train()
    return s


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (len(LENGTHS), max(LENGTHS)), generator=g)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1
    ids = ids * mask  # pad id 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.tensor([0, 1, 1, 0])}


def stage_for(teacher_dir, method="cr_ild", **kw):
    cfg = TrialConfig(task="sst2", method=method, teacher={"model": str(teacher_dir)}, student={"layers": S_LAYERS},
                      **kw)
    trial = resolve_trial(cfg)
    assert (trial.teacher_layers, trial.student_layers) == (T_LAYERS, S_LAYERS)
    return trial.train[0]


def features(model, batch, layers, mask=None, lam=None, hidden=False):
    """Manual pass (own tap) for reference values; `lam` applies embedding mixup."""
    tap = FeatureTap(model, set(layers))
    try:
        if lam is None:
            return forward_features(model, batch, tap, hidden, mask)
        with embedding_mixup(model, lam):
            return forward_features(model, batch, tap, hidden, mask)
    finally:
        tap.remove()


def consistency_section(names: list[str]) -> dict:
    """A `consistency:` YAML section choosing the distances D."""
    return {"losses": names}


def fl(x) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def relation_sum(s: Features, t: Features, ls, lt, mask, heads):
    return sum(relation_kl(getattr(s, r)[ls], getattr(t, r)[lt], mask, heads) for r in "qkv")


# ---------------------------------------------------------------------------------------------- (a)
def test_resolved_cr_ild_stage(teacher_dir):
    stage = stage_for(teacher_dir, consistency_weight=0.5)
    assert stage.name == "ild" and stage.mixup
    assert [(t.name, t.layer_pairs) for t in stage.losses] == [("relation_kl", [(S_LAYERS, T_LAYERS)])]
    assert stage.consistency.weight == 0.5 and stage.consistency.target == "no_grad"


def test_embedding_mixup_mixes_the_embedding_output_with_the_reversed_batch(student, batch):
    student.eval()
    clean = features(student, batch, [], hidden=True)
    lam = 0.7
    mixed = features(student, batch, [], lam=lam, hidden=True)
    e = clean.hidden[0]
    torch.testing.assert_close(mixed.hidden[0], lam * e + (1 - lam) * e.flip(0))
    assert not torch.allclose(mixed.hidden[1], clean.hidden[1])
    # the hook is gone after the context
    again = features(student, batch, [], hidden=True)
    torch.testing.assert_close(again.hidden[1], clean.hidden[1])


def test_mixup_changes_the_ild_loss_and_both_models_see_the_mix(teacher_dir, teacher, student, batch):
    stage = stage_for(teacher_dir, consistency_weight=1.0)
    plain = stage.model_copy(update={"mixup": False, "consistency": None})

    losses = StageLosses(plain, student, teacher, S_LAYERS)
    np.random.seed(0)
    values_plain, lam_plain = step_terms(plain, losses, student, teacher, None, batch, 0.5)
    losses.close()
    losses = StageLosses(stage, student, teacher, S_LAYERS)
    np.random.seed(0)
    values_mix, lam = step_terms(stage, losses, student, teacher, None, batch, 0.5)
    losses.close()

    assert lam_plain == 1.0 and 0.5 <= lam < 1.0
    w_plain, v_plain = values_plain["relation_kl"]
    w_mix, v_mix = values_mix["relation_kl"]
    assert w_plain == w_mix == 1.0
    assert abs(fl(v_mix) - fl(v_plain)) > 1e-3 * fl(v_plain)

    # no-mixup value = relation KL of the clean passes with the batch's own mask
    s, t = features(student, batch, [S_LAYERS]), features(teacher, batch, [T_LAYERS])
    torch.testing.assert_close(v_plain, relation_sum(s, t, S_LAYERS, T_LAYERS, batch["attention_mask"], HEADS))
    # mixup value = both models on lam-mixed embeddings, attention mask = union with the reversed batch
    union = batch["attention_mask"] | batch["attention_mask"].flip(0)
    s = features(student, batch, [S_LAYERS], union, lam)
    t = features(teacher, batch, [T_LAYERS], union, lam)
    assert torch.equal(s.attention_mask, union)
    torch.testing.assert_close(v_mix, relation_sum(s, t, S_LAYERS, T_LAYERS, union, HEADS))
    # mixing only the student (teacher clean) would be a different value
    t_clean = features(teacher, batch, [T_LAYERS], union)
    assert abs(fl(relation_sum(s, t_clean, S_LAYERS, T_LAYERS, union, HEADS)) - fl(v_mix)) > 1e-4


def test_lam_is_beta_1_1_folded_to_at_least_half(teacher_dir, teacher, student, batch):
    stage = stage_for(teacher_dir, consistency_weight=0.0)
    losses = StageLosses(stage, student, teacher, S_LAYERS)
    np.random.seed(7)
    raw = np.random.beta(1.0, 1.0)
    np.random.seed(7)
    _, lam = step_terms(stage, losses, student, teacher, None, batch, 0.0)
    losses.close()
    assert lam == pytest.approx(max(raw, 1 - raw))


# ---------------------------------------------------------------------------------------------- (b)
def test_consistency_term_present_positive_and_ramps_linearly(teacher_dir, teacher, student, batch):
    w = 0.8
    stage = stage_for(teacher_dir, consistency_weight=w)
    losses = StageLosses(stage, student, teacher, S_LAYERS)
    out = {}
    for progress in (0.0, 0.25, 0.5, 1.0):
        np.random.seed(11)  # the same lam at every progress
        out[progress] = step_terms(stage, losses, student, teacher, None, batch, progress)
    losses.close()
    lams = {lam for _, lam in out.values()}
    assert len(lams) == 1
    values = {p: vals["consistency"] for p, (vals, _) in out.items()}
    for p, (weight, v) in values.items():
        assert weight == pytest.approx(w * p)
        assert fl(v) > 0 and v.requires_grad
    base = fl(values[1.0][1])
    for p, (_, v) in values.items():
        assert fl(v) == pytest.approx(base, rel=1e-6)  # the ramp is in the weight, not the value
    contribution = {p: weight * fl(v) for p, (weight, v) in values.items()}
    assert contribution[0.0] == 0.0
    assert contribution[0.5] == pytest.approx(0.5 * contribution[1.0], rel=1e-6)
    assert contribution[0.25] == pytest.approx(0.25 * contribution[1.0], rel=1e-6)


def test_consistency_value_is_lam_weighted_kl_to_clean_and_reversed_clean(teacher_dir, teacher, student, batch):
    stage = stage_for(teacher_dir, consistency_weight=1.0,
                      train=[{"name": "ild", "consistency": consistency_section(["relation_kl"])}])
    losses = StageLosses(stage, student, teacher, S_LAYERS)
    np.random.seed(5)
    vals, lam = step_terms(stage, losses, student, teacher, None, batch, 1.0)
    losses.close()
    union = batch["attention_mask"] | batch["attention_mask"].flip(0)
    mix = features(student, batch, [S_LAYERS], union, lam)
    with torch.no_grad():
        clean = features(student, batch, [S_LAYERS])
    rev = Features(logits=clean.logits.flip(0), attention_mask=clean.attention_mask.flip(0), num_heads=HEADS,
                   q={k: v.flip(0) for k, v in clean.q.items()}, k={k: v.flip(0) for k, v in clean.k.items()},
                   v={k: v.flip(0) for k, v in clean.v.items()})
    own = batch["attention_mask"]  # each comparison on the target example's own tokens (as the reference)
    want = lam * relation_sum(mix, clean, S_LAYERS, S_LAYERS, own, HEADS) \
        + (1 - lam) * relation_sum(mix, rev, S_LAYERS, S_LAYERS, own.flip(0), HEADS)
    torch.testing.assert_close(vals["consistency"][1], want)


def test_consistency_gradient_reaches_the_student_only_through_the_mixed_pass(teacher_dir, teacher, student, batch):
    stage = stage_for(teacher_dir, consistency_weight=1.0)
    losses = StageLosses(stage, student, teacher, S_LAYERS)
    np.random.seed(2)
    vals, _ = step_terms(stage, losses, student, teacher, None, batch, 1.0)
    losses.close()
    vals["consistency"][1].backward()
    q = student.bert.encoder.layer[S_LAYERS - 1].attention.self.query.weight
    assert q.grad is not None and fl(q.grad.abs().sum()) > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert student.training  # the clean no-grad pass put it back in train mode


@pytest.mark.parametrize("loss", ["attention_kl", "hidden_mse"])
def test_other_consistency_distances_fire(teacher_dir, teacher, student, batch, loss):
    stage = stage_for(teacher_dir, consistency_weight=1.0,
                      train=[{"name": "ild", "consistency": consistency_section([loss])}])
    losses = StageLosses(stage, student, teacher, S_LAYERS)
    np.random.seed(3)
    vals, _ = step_terms(stage, losses, student, teacher, None, batch, 1.0)
    losses.close()
    weight, v = vals["consistency"]
    assert weight == 1.0 and fl(v) > 0 and v.requires_grad


# ---------------------------------------------------------------------------------------------- (c)
def test_ema_target_variant(teacher_dir, teacher, student, batch):
    stage = stage_for(teacher_dir, consistency_weight=1.0,
                      train=[{"name": "ild", "consistency": {"target": "ema", "ema_decay": 0.9,
                                                             **consistency_section(["relation_kl"])}}])
    assert (stage.consistency.target, stage.consistency.ema_decay) == ("ema", 0.9)
    no_grad_stage = stage.model_copy(update={"consistency": stage.consistency.model_copy(
        update={"target": "no_grad"})})
    losses = StageLosses(stage, student, teacher, S_LAYERS)
    ema = copy.deepcopy(student)  # as train_stage builds it

    def run(st, target):
        np.random.seed(13)
        vals, lam = step_terms(st, losses, student, teacher, target, batch, 1.0)
        return vals["consistency"][1], lam

    # a fresh EMA copy equals the student: same value as the no-grad target
    v_ema, lam = run(stage, ema)
    v_ng, _ = run(no_grad_stage, None)
    torch.testing.assert_close(v_ema, v_ng)
    assert ema.training  # put back after the clean pass

    # the student moves; the EMA follows by decay 0.9: ema = 0.9 ema + 0.1 student
    before = [p.detach().clone() for p in ema.parameters()]
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ema_update(ema, student, 0.9)
    for b, pe, ps in zip(before, ema.parameters(), student.parameters()):
        torch.testing.assert_close(pe, 0.9 * b + 0.1 * ps)

    v_ema, lam = run(stage, ema)
    v_ng, _ = run(no_grad_stage, None)
    assert abs(fl(v_ema) - fl(v_ng)) > 1e-5  # the target now comes from the EMA, not the student
    # and it is exactly the formula with the EMA's clean features
    union = batch["attention_mask"] | batch["attention_mask"].flip(0)
    mix = features(student, batch, [S_LAYERS], union, lam)
    with torch.no_grad():
        clean = features(ema, batch, [S_LAYERS])
    rev = Features(logits=clean.logits.flip(0), attention_mask=clean.attention_mask.flip(0), num_heads=HEADS,
                   q={k: v.flip(0) for k, v in clean.q.items()}, k={k: v.flip(0) for k, v in clean.k.items()},
                   v={k: v.flip(0) for k, v in clean.v.items()})
    own = batch["attention_mask"]  # each comparison on the target example's own tokens (as the reference)
    want = lam * relation_sum(mix, clean, S_LAYERS, S_LAYERS, own, HEADS) \
        + (1 - lam) * relation_sum(mix, rev, S_LAYERS, S_LAYERS, own.flip(0), HEADS)
    torch.testing.assert_close(v_ema, want)
    v_ema.backward()
    assert all(p.grad is None for p in ema.parameters())  # the EMA is a target, never trained
    assert any(p.grad is not None and fl(p.grad.abs().sum()) > 0 for p in student.parameters())
    losses.close()


# ---------------------------------------------------------------------------------------------- (d)
def _manual_attention(layer, h, mask):
    """q, k, v Linear outputs and the attention sub-layer output LN(W_O ctx + b + x), written out."""
    att = layer.attention.self
    q = F.linear(h, att.query.weight, att.query.bias)
    k = F.linear(h, att.key.weight, att.key.bias)
    v = F.linear(h, att.value.weight, att.value.bias)
    B, S, H = h.shape
    d = H // HEADS
    split = lambda x: x.view(B, S, HEADS, d).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / d**0.5
    scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    ctx = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(B, S, H)
    out = layer.attention.output
    attn_out = out.LayerNorm(F.linear(ctx, out.dense.weight, out.dense.bias) + h)
    return q, k, v, attn_out


def test_feature_tap_captures_qkv_and_attention_output_of_the_chosen_layers(teacher, batch):
    tap = FeatureTap(teacher, qkv_layers={1, 3}, attn_out_layers={2, 4})
    with torch.no_grad():
        out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      token_type_ids=batch["token_type_ids"], output_hidden_states=True)
    tap.remove()
    assert set(tap.q) == set(tap.k) == set(tap.v) == {1, 3}
    assert set(tap.attn_out) == {2, 4}
    layers = teacher.bert.encoder.layer
    with torch.no_grad():
        for l in (1, 2, 3, 4):
            q, k, v, ao = _manual_attention(layers[l - 1], out.hidden_states[l - 1], batch["attention_mask"])
            if l in (1, 3):
                torch.testing.assert_close(tap.q[l], q)
                torch.testing.assert_close(tap.k[l], k)
                torch.testing.assert_close(tap.v[l], v)
                # not the neighbouring layer's
                other = _manual_attention(layers[l], out.hidden_states[l], batch["attention_mask"])[0]
                assert not torch.allclose(tap.q[l], other)
            if l in (2, 4):
                torch.testing.assert_close(tap.attn_out[l], ao, atol=1e-5, rtol=1e-5)
    # removed hooks record nothing more
    tap.q.clear()
    with torch.no_grad():
        teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert tap.q == {}


def _tapped(model):
    """Modules carrying a FeatureTap hook (transformers adds its own output-capturing hooks: ignored)."""
    return [m for m in model.modules()
            if any("FeatureTap" in getattr(h, "__qualname__", "") for h in m._forward_hooks.values())]


def test_stage_losses_taps_exactly_the_mapped_layers(teacher_dir, teacher, student):
    stage = stage_for(teacher_dir, consistency_weight=1.0)
    losses = StageLosses(stage, student, teacher, S_LAYERS)
    att = lambda model, l: model.bert.encoder.layer[l - 1].attention.self  # noqa: E731
    # q, k, v of the student's layer 2 (ILD pair and the consistency term) and the teacher's layer 4
    assert _tapped(teacher) == [att(teacher, T_LAYERS).query, att(teacher, T_LAYERS).key, att(teacher, T_LAYERS).value]
    assert _tapped(student) == [att(student, S_LAYERS).query, att(student, S_LAYERS).key, att(student, S_LAYERS).value]
    losses.close()
    assert _tapped(teacher) == [] and _tapped(student) == []


# ---------------------------------------------------------------------------------------------- (e)
def test_features_probs_equal_the_eager_attention_probabilities(teacher_dir, batch):
    eager = AutoModelForSequenceClassification.from_pretrained(str(teacher_dir), attn_implementation="eager")
    eager.eval()
    with torch.no_grad():
        ref = eager(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch["token_type_ids"], output_attentions=True)
    assert len(ref.attentions) == T_LAYERS
    sdpa = load_classifier(str(teacher_dir), 2).eval()  # what the worker loads: SDPA, no attention maps
    tap = FeatureTap(sdpa, set(range(1, T_LAYERS + 1)))
    with torch.no_grad():
        feats = forward_features(sdpa, batch, tap, False)
    tap.remove()
    torch.testing.assert_close(feats.logits, ref.logits, atol=1e-5, rtol=1e-5)
    mask = batch["attention_mask"].bool()
    for l in range(1, T_LAYERS + 1):
        p, a = feats.probs(l), ref.attentions[l - 1]
        assert p.shape == a.shape == (len(LENGTHS), HEADS, max(LENGTHS), max(LENGTHS))
        for b, n in enumerate(LENGTHS):  # valid query rows: identical distributions over valid keys
            torch.testing.assert_close(p[b, :, :n], a[b, :, :n], atol=1e-6, rtol=1e-5)
        assert fl(p[~mask[:, None, None, :].expand_as(p)].abs().max()) == 0.0  # padded keys get 0
        # maps far from uniform: the comparison is not trivially true
        assert fl(a[0, :, :LENGTHS[0], :LENGTHS[0]].max()) > 2.0 / LENGTHS[0]


# ------------------------------------------------------------------------------------- dead terms
def test_a_loss_listed_twice_in_a_stage_is_refused_with_its_field(teacher_dir):
    """Two terms of one loss in one stage would silently sum (or the second would shadow the first): the
    resolver refuses it, naming the stage's losses field."""
    from kdplatform.config import ConfigError

    with pytest.raises(ConfigError) as err:
        stage_for(teacher_dir, method="custom", train=[{"name": "mine", "losses": [
            {"name": "hidden_mse", "layer_map": "last", "weight": 1.0},
            {"name": "hidden_mse", "layer_map": "1:2", "weight": 5.0}]}])
    assert "loss 'hidden_mse' is listed twice in one stage" in str(err.value)
    assert ".losses" in str(err.value)


def _ref_attention_kl(qs, ks, qt, kt, mask, heads):
    """KL(target || mixed) of the attention distributions Q K^T / sqrt(d) over valid keys, mean over valid
    rows and heads (plain torch, from the formula)."""
    def logp(q, k):
        b, s, h = q.shape
        q, k = q.view(b, s, heads, -1).transpose(1, 2), k.view(b, s, heads, -1).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(h // heads)
        return torch.log_softmax(scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf")), dim=-1)
    ls, lt = logp(qs, ks), logp(qt, kt)
    key = mask.bool()[:, None, None, :]
    kl = torch.where(key, lt.exp() * (lt - ls), torch.zeros_like(ls)).sum(-1)  # (b, heads, s)
    rows = mask[:, None, :].float().expand_as(kl)
    return (kl * rows).sum() / rows.sum()


def _ref_hidden_mse(hs, ht, mask):
    m = mask[..., None].float()
    return (((hs - ht) ** 2) * m).sum() / (m.sum() * hs.shape[-1])


def test_default_consistency_is_last_layer_attention_kl_plus_hidden_mse(teacher_dir, teacher, student, batch):
    """CR-ILD (paper + the reference's dead branch): D = attention KL on the student's last layer + its hidden
    MSE, both to the clean pass and, weighted 1 - lam, to the reversed clean pass."""
    stage = stage_for(teacher_dir, consistency_weight=1.0)
    assert stage.consistency.losses == ["attention_kl", "hidden_mse"] and stage.consistency.ramp == "epoch"
    losses = StageLosses(stage, student, teacher, S_LAYERS)
    np.random.seed(5)
    vals, lam = step_terms(stage, losses, student, teacher, None, batch, 1.0)
    losses.close()
    union = batch["attention_mask"] | batch["attention_mask"].flip(0)
    mix = features(student, batch, [S_LAYERS], union, lam, hidden=True)
    with torch.no_grad():
        clean = features(student, batch, [S_LAYERS], hidden=True)
    L, own = S_LAYERS, batch["attention_mask"]  # each comparison on the target example's own tokens
    d = lambda f: (_ref_attention_kl(mix.q[L], mix.k[L], f(clean.q[L]), f(clean.k[L]), f(own), HEADS)  # noqa: E731
                   + _ref_hidden_mse(mix.hidden[L], f(clean.hidden[L]), f(own)))
    want = lam * d(lambda x: x) + (1 - lam) * d(lambda x: x.flip(0))
    torch.testing.assert_close(vals["consistency"][1], want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- a ramp that stays at zero
def test_an_epoch_ramp_over_one_epoch_is_refused_before_training(teacher_dir, teacher, student):
    """w * epoch / E counts epochs from 0: over a stage of one epoch the consistency term is 0 at every step."""
    from kdplatform.config import ConfigError
    from kdplatform.distill.data import TrialData
    from kdplatform.distill.engine import LoopState, StageSettings, train_stage
    from kdplatform.distill.objective import TrialSetupError

    with pytest.raises(ConfigError, match=r"train\[0\]\.epochs: .*0 at every step"):
        stage_for(teacher_dir, consistency_weight=0.5, train=[{"name": "ild", "epochs": 1}])
    assert stage_for(teacher_dir, consistency_weight=0.5, train=[{"name": "ild", "epochs": 2}]).epochs == 2
    step_ramp = {"name": "ild", "epochs": 1, "consistency": {"ramp": "step"}}  # w * step / total: ramps up
    assert stage_for(teacher_dir, consistency_weight=0.5, train=[step_ramp]).consistency.ramp == "step"

    # max_steps within the first epoch: known only with the data (8 examples, batch 4: 2 steps an epoch)
    from kdplatform.distill.tasks import Collator

    g = torch.Generator().manual_seed(5)
    examples = [{"input_ids": torch.randint(1, VOCAB, (n,), generator=g).tolist(), "attention_mask": [1] * n,
                 "token_type_ids": [0] * n, "label": i % 2} for i, n in enumerate([6, 9, 5, 7, 8, 4, 10, 6])]
    data = TrialData(train=examples, train_eval=examples[:4], dev={"dev": examples[:4]}, supplementary=[],
                     collator=Collator(0, regression=False), num_labels=2)
    settings = StageSettings(task="sst2", seed=0, device=torch.device("cpu"), precision="fp32", n_student=S_LAYERS,
                             max_seq_length=16)
    stage = stage_for(teacher_dir, consistency_weight=0.5, train=[{"name": "ild", "max_steps": 2, "batch_size": 4}])
    with pytest.raises(TrialSetupError, match="2 steps of 2 a epoch .* never contributes"):
        train_stage(stage, 0, settings, student=student, teacher=teacher, data=data, state=LoopState())
    # three steps reach the second epoch, where the ramp is 1/2: the stage trains
    stage = stage_for(teacher_dir, consistency_weight=0.5, train=[{"name": "ild", "max_steps": 3, "batch_size": 4}])
    state = LoopState()
    train_stage(stage, 0, settings, student=student, teacher=teacher, data=data, state=state)
    assert state.global_step == 3
