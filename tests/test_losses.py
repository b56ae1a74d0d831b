"""The loss menu (distill/losses.py) against independent references written from DESIGN.md section 4.

Every reference below loops explicitly (numpy, float64) over batch, heads, query rows and the example's
valid tokens, so it shares no code path with the torch implementation. Each loss is also checked to be
independent of padding (extra padded positions filled with garbage leave the value unchanged), to be 0 (or
at its minimum) when student == teacher, and to send gradient to the student's valid positions only.
"""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdplatform.distill import losses as L
from kdplatform.distill.losses import (
    EPS_MAP, TERMS, Features, attention_kl, attention_map_kl, attention_output_mse, attention_score_mse, ce,
    hidden_mse, logit_kd, loss, pkd, relation_kl, term_loss,
)

torch.set_num_threads(1)

LENGTHS = [5, 3, 4]  # valid tokens per example: different lengths so padding matters
S, HEADS = 6, 2


# ------------------------------------------------------------------------------------------ helpers
def mask_for(lengths, s=S) -> torch.Tensor:
    m = torch.zeros(len(lengths), s, dtype=torch.long)
    for b, n in enumerate(lengths):
        m[b, :n] = 1
    return m


def rand(*shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32)


def rand_probs(lengths, heads=HEADS, s=S, seed=0, zeros_in_block=False) -> torch.Tensor:
    """Attention probabilities as a real masked softmax gives them: each row is a distribution over the
    example's valid keys (padded keys exactly 0); padded query rows too (as HF does)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.zeros(len(lengths), heads, s, s)
    for b, n in enumerate(lengths):
        logits = torch.randn(heads, s, n, generator=g) * 2
        p[b, :, :, :n] = torch.softmax(logits, dim=-1)
        if zeros_in_block:  # exact zeros inside the valid block (needs the 1e-8 clamp)
            p[b, :, 0, :n] = 0.0
            p[b, :, 0, 0] = 1.0
    return p


def pad_with_garbage(x: torch.Tensor, dims: tuple[int, ...], extra: int, lengths, seed=99) -> torch.Tensor:
    """Append `extra` positions along each of `dims` and overwrite every padded position (old padding
    included) with large garbage; valid entries are kept."""
    g = torch.Generator().manual_seed(seed)
    shape = list(x.shape)
    for d in dims:
        shape[d] += extra
    out = torch.randn(*shape, generator=g) * 37.0 + 5.0
    out = out.abs() if x.min() >= 0 else out  # probabilities stay non-negative garbage
    for b, n in enumerate(lengths):
        idx = [b] + [slice(None)] * (x.dim() - 1)
        for d in dims:
            idx[d] = slice(0, n)
        out[tuple(idx)] = x[tuple(idx)]
    return out


def np64(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def softmax_np(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


# ------------------------------------------------------------------------------- references (numpy)
def ref_logit_kd(zs, zt, T):
    zs, zt = np64(zs), np64(zt)
    B, C = zs.shape
    if C == 1:  # CR-ILD reference (DistillKL, regression): MSE of z / T, no T^2
        return sum((zs[b, 0] / T - zt[b, 0] / T) ** 2 for b in range(B)) / B
    total = 0.0
    for b in range(B):
        pt = softmax_np(zt[b] / T)
        log_ps = np.log(softmax_np(zs[b] / T))
        total += -sum(pt[c] * log_ps[c] for c in range(C))
    return total / B * T**2


def ref_ce(logits, labels):
    z = np64(logits)
    B, C = z.shape
    if C == 1:
        y = labels.double().numpy()
        return sum((z[b, 0] - y[b]) ** 2 for b in range(B)) / B
    return sum(-math.log(softmax_np(z[b])[int(labels[b])]) for b in range(B)) / B


def ref_token_mse(hs, ht, lengths):
    """hidden_mse / attention_output_mse: mean of squared differences over valid tokens and units."""
    hs, ht = np64(hs), np64(ht)
    total, count = 0.0, 0
    for b, n in enumerate(lengths):
        for i in range(n):
            for d in range(hs.shape[-1]):
                total += (hs[b, i, d] - ht[b, i, d]) ** 2
                count += 1
    return total / count


def ref_score_mse(ss, st, lengths):
    ss, st = np64(ss), np64(st)
    total, count = 0.0, 0
    for b, n in enumerate(lengths):
        for h in range(ss.shape[1]):
            for i in range(n):
                for j in range(n):
                    total += (ss[b, h, i, j] - st[b, h, i, j]) ** 2
                    count += 1
    return total / count


def kl_row(pt, ps, eps_t=None, eps_s=None):
    """KL(t || s) of one row given as python lists; optional clamps."""
    out = 0.0
    for a, c in zip(pt, ps):
        if eps_t is not None:
            a = max(a, eps_t)
        if eps_s is not None:
            c = max(c, eps_s)
        if a > 0:
            out += a * (math.log(a) - math.log(c))
    return out


def ref_attention_kl(ps, pt, lengths):
    """Rows over valid keys; mean over valid query rows, heads and batch."""
    ps, pt = np64(ps), np64(pt)
    total, rows = 0.0, 0
    for b, n in enumerate(lengths):
        for h in range(ps.shape[1]):
            for i in range(n):
                total += kl_row(pt[b, h, i, :n], ps[b, h, i, :n], eps_s=1e-12)
                rows += 1
    return total / rows


def ref_relation(x, n, heads):
    """Per head: softmax over the n valid keys of X X^T / sqrt(d_head), for the n valid rows."""
    x = np64(x)
    d = x.shape[-1] // heads
    out = []
    for h in range(heads):
        xh = x[:n, h * d:(h + 1) * d]
        r = np.zeros((n, n))
        for i in range(n):
            scores = np.array([sum(xh[i, u] * xh[j, u] for u in range(d)) / math.sqrt(d) for j in range(n)])
            r[i] = softmax_np(scores)
        out.append(r)
    return out


def ref_relation_kl(xs, xt, lengths, heads):
    total, rows = 0.0, 0
    for b, n in enumerate(lengths):
        rs, rt = ref_relation(xs[b], n, heads), ref_relation(xt[b], n, heads)
        for h in range(heads):
            for i in range(n):
                total += kl_row(rt[h][i], rs[h][i])
                rows += 1
    return total / rows


def ref_pkd(cs, ct):
    cs, ct = np64(cs), np64(ct)
    total = 0.0
    for b in range(cs.shape[0]):
        u = cs[b] / math.sqrt(sum(v * v for v in cs[b]))
        w = ct[b] / math.sqrt(sum(v * v for v in ct[b]))
        total += sum((u[d] - w[d]) ** 2 for d in range(len(u)))
    return total / cs.size


def ref_attention_map_kl(ps, pt, lengths):
    """KD-QAT 'M': clamp both at 1e-8, valid n x n block, sum keys, sum valid rows / n, mean batch x heads."""
    ps, pt = np64(ps), np64(pt)
    B, heads = ps.shape[:2]
    total = 0.0
    for b, n in enumerate(lengths):
        for h in range(heads):
            per_rows = sum(kl_row(pt[b, h, i, :n], ps[b, h, i, :n], eps_t=EPS_MAP, eps_s=EPS_MAP)
                           for i in range(n))
            total += per_rows / n
    return total / (B * heads)


def ref_scores(q, k, heads):
    """Per head X_q X_k^T / sqrt(d_head) for all positions, (B, heads, S, S)."""
    q, k = np64(q), np64(k)
    B, s, width = q.shape
    d = width // heads
    out = np.zeros((B, heads, s, s))
    for b in range(B):
        for h in range(heads):
            for i in range(s):
                for j in range(s):
                    out[b, h, i, j] = sum(q[b, i, h * d + u] * k[b, j, h * d + u] for u in range(d)) / math.sqrt(d)
    return out


def close(a, b, tol=1e-5):
    return pytest.approx(b, rel=tol, abs=tol) == float(a.detach() if isinstance(a, torch.Tensor) else a)


# ------------------------------------------------------------------------------------------ registry
def test_registry_is_exactly_the_menu():
    from kdplatform.loss_menu import FEATURES, LOSS_MENU

    assert set(TERMS) == set(LOSS_MENU)  # one registered function per menu entry, none beside it
    assert set(LOSS_MENU) >= {"logit_kd", "ce", "hidden_mse", "attention_score_mse", "attention_kl",
                              "relation_kl", "pkd", "attention_map_kl", "attention_output_mse"}
    for info in LOSS_MENU.values():
        assert info.reads <= set(FEATURES)


def test_registering_a_name_outside_the_menu_or_twice_is_refused():
    with pytest.raises(KeyError, match="not in the menu"):
        loss("no_such_loss")
    with pytest.raises(KeyError, match="registered twice"):
        loss("pkd")(lambda s, t, pairs, x: s.logits.sum())


def test_module_doctest_passes():
    assert doctest.testmod(L, verbose=False).failed == 0


# ------------------------------------------------------------------------------------------ logit_kd
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_logit_kd_matches_soft_cross_entropy_times_T_squared(T):
    zs, zt = rand(5, 3, seed=1) * 3, rand(5, 3, seed=2) * 3
    assert close(logit_kd(zs, zt, temperature=T), ref_logit_kd(zs, zt, T))


def test_logit_kd_scaling_is_exactly_T_squared_of_the_tempered_soft_ce():
    zs, zt = rand(4, 5, seed=3), rand(4, 5, seed=4)
    # the tempered soft CE without the factor: logit_kd at T=1 on logits divided by T
    for T in (2.0, 3.0):
        unscaled = float(logit_kd(zs / T, zt / T, temperature=1.0))
        assert close(logit_kd(zs, zt, temperature=T), T**2 * unscaled)


def test_logit_kd_T_squared_keeps_gradient_scale_at_high_temperature():
    # Hinton et al.: the soft-target gradient scales as 1/T^2, so the T^2 factor keeps it O(1).
    zt = rand(8, 4, seed=5) * 0.5
    zs0 = rand(8, 4, seed=6) * 0.5
    norms = []
    for T in (4.0, 8.0, 16.0):
        zs = zs0.clone().requires_grad_(True)
        logit_kd(zs, zt, temperature=T).backward()
        norms.append(float(zs.grad.norm()))
    assert max(norms) / min(norms) < 1.2  # without T^2 the ratio would be ~16


def test_logit_kd_at_student_equal_teacher_is_the_entropy_minimum_with_zero_gradient():
    z = rand(4, 3, seed=7)
    zs = z.clone().requires_grad_(True)
    T = 2.0
    val = logit_kd(zs, z, temperature=T)
    p = torch.softmax(z.double() / T, -1)
    entropy = float(-(p * p.log()).sum(-1).mean()) * T**2  # soft CE = H(p_t) + KL: KL part is 0
    assert close(val, entropy)
    val.backward()
    assert float(zs.grad.abs().max()) < 1e-6


def test_logit_kd_regression_is_mse_of_logits_over_t_without_t_squared():
    zs, zt = rand(6, 1, seed=8), rand(6, 1, seed=9)
    for T in (1.0, 2.0, 4.0):
        assert close(logit_kd(zs, zt, temperature=T), ref_logit_kd(zs, zt, T))
    plain = float(((zs - zt) ** 2).mean())
    assert close(logit_kd(zs, zt, temperature=2.0), plain / 4)  # 1/T^2 of the plain MSE, not T^2 of it
    assert float(logit_kd(zt, zt)) == 0.0


def test_ce_matches_reference_classification_and_regression():
    z = rand(5, 3, seed=10)
    y = torch.tensor([0, 2, 1, 1, 0])
    assert close(ce(z, y), ref_ce(z, y))
    zr, yr = rand(5, 1, seed=11), rand(5, seed=12)
    assert close(ce(zr, yr), ref_ce(zr, yr))


# ----------------------------------------------------------------------- token-wise MSE terms
@pytest.mark.parametrize("fn", [hidden_mse, attention_output_mse])
def test_token_mse_matches_reference_and_ignores_padding(fn):
    hs, ht = rand(3, S, 4, seed=13), rand(3, S, 4, seed=14)
    m = mask_for(LENGTHS)
    val = fn(hs, ht, m)
    assert close(val, ref_token_mse(hs, ht, LENGTHS))
    hs2 = pad_with_garbage(hs, (1,), 3, LENGTHS, seed=1)
    ht2 = pad_with_garbage(ht, (1,), 3, LENGTHS, seed=2)
    assert close(fn(hs2, ht2, mask_for(LENGTHS, S + 3)), float(val))
    assert float(fn(ht, ht, m)) == 0.0


# ------------------------------------------------------------------------------ attention scores
def test_attention_score_mse_matches_reference_and_ignores_padding():
    ss, st = rand(3, HEADS, S, S, seed=15) * 3, rand(3, HEADS, S, S, seed=16) * 3
    m = mask_for(LENGTHS)
    val = attention_score_mse(ss, st, m)
    assert close(val, ref_score_mse(ss, st, LENGTHS))
    ss2 = pad_with_garbage(ss, (2, 3), 4, LENGTHS, seed=3)
    st2 = pad_with_garbage(st, (2, 3), 4, LENGTHS, seed=4)
    # e.g. the -10000 additive mask that TinyBERT's raw scores carry at padded keys
    ss2[0, :, :, 7:] = -1e4
    assert close(attention_score_mse(ss2, st2, mask_for(LENGTHS, S + 4)), float(val))
    assert float(attention_score_mse(st, st, m)) == 0.0


# ---------------------------------------------------------------------------------- attention KL
def test_attention_kl_matches_reference_and_ignores_padding():
    ps, pt = rand_probs(LENGTHS, seed=17), rand_probs(LENGTHS, seed=18)
    m = mask_for(LENGTHS)
    val = attention_kl(ps, pt, m)
    assert close(val, ref_attention_kl(ps, pt, LENGTHS))
    ps2 = pad_with_garbage(ps, (2, 3), 3, LENGTHS, seed=5)
    pt2 = pad_with_garbage(pt, (2, 3), 3, LENGTHS, seed=6)
    assert close(attention_kl(ps2, pt2, mask_for(LENGTHS, S + 3)), float(val))
    assert abs(float(attention_kl(pt, pt, m))) < 1e-6


def test_attention_kl_is_a_mean_over_valid_rows_not_a_sum():
    # every valid row has the same KL k: the mean over rows is k whatever the lengths
    pt = torch.zeros(2, 1, 4, 4)
    ps = torch.zeros(2, 1, 4, 4)
    for b, n in enumerate([2, 4]):
        pt[b, 0, :, 0], pt[b, 0, :, 1] = 0.9, 0.1
        ps[b, 0, :, 0], ps[b, 0, :, 1] = 0.5, 0.5
    k = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert close(attention_kl(ps, pt, mask_for([2, 4], 4)), k)


# --------------------------------------------------------------------------------- relation KL
def test_relation_kl_matches_reference_and_ignores_padding():
    xs, xt = rand(3, S, 8, seed=19), rand(3, S, 8, seed=20)
    m = mask_for(LENGTHS)
    val = relation_kl(xs, xt, m, num_heads=2)
    assert close(val, ref_relation_kl(xs, xt, LENGTHS, 2))
    xs2 = pad_with_garbage(xs, (1,), 3, LENGTHS, seed=7)
    xt2 = pad_with_garbage(xt, (1,), 3, LENGTHS, seed=8)
    assert close(relation_kl(xs2, xt2, mask_for(LENGTHS, S + 3), num_heads=2), float(val))
    assert abs(float(relation_kl(xt, xt, m, num_heads=2))) < 1e-6


def test_relation_kl_teacher_and_student_of_different_widths():
    # MiniLMv2: both split into the same number of relation heads, each with its own d_head scaling
    xs, xt = rand(3, S, 8, seed=21), rand(3, S, 24, seed=22)
    m = mask_for(LENGTHS)
    for heads in (2, 4):
        assert close(relation_kl(xs, xt, m, num_heads=heads), ref_relation_kl(xs, xt, LENGTHS, heads))


def test_relation_kl_uses_d_head_not_width_for_scaling():
    # with one relation head vs two, the same tensors give different values (d_head = width / heads)
    xs, xt = rand(2, 4, 8, seed=23), rand(2, 4, 8, seed=24)
    m = mask_for([4, 3], 4)
    assert float(relation_kl(xs, xt, m, 1)) != pytest.approx(float(relation_kl(xs, xt, m, 2)))
    assert close(relation_kl(xs, xt, m, 1), ref_relation_kl(xs, xt, [4, 3], 1))


# ------------------------------------------------------------------------------------------ pkd
def test_pkd_matches_reference_and_is_scale_invariant():
    cs, ct = rand(4, 6, seed=25), rand(4, 6, seed=26)
    val = pkd(cs, ct)
    assert close(val, ref_pkd(cs, ct))
    scale = torch.tensor([[0.1], [3.0], [7.0], [100.0]])
    assert close(pkd(cs * scale, ct / scale), float(val))  # L2-normalised first
    assert abs(float(pkd(ct, ct * 5))) < 1e-7


def test_pkd_term_reads_fp16_cached_teacher_states_under_bf16_autocast():
    """The teacher output cache stores float16; a CPU bf16 step must still stack and compare them."""
    s, t = make_features(31), make_features(32)
    t.hidden = tuple(h.half() for h in t.hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        val = term_loss("pkd", s, t, [(1, 2), (3, 3)])
    want = (ref_pkd(s.hidden[1][:, 0], t.hidden[2][:, 0].float())
            + ref_pkd(s.hidden[3][:, 0], t.hidden[3][:, 0].float())) / 2
    assert close(val, want)


# ---------------------------------------------------------------------------- attention map KL
def test_attention_map_kl_matches_reference_and_ignores_padding():
    ps, pt = rand_probs(LENGTHS, seed=27), rand_probs(LENGTHS, seed=28)
    m = mask_for(LENGTHS)
    val = attention_map_kl(ps, pt, m)
    assert close(val, ref_attention_map_kl(ps, pt, LENGTHS))
    ps2 = pad_with_garbage(ps, (2, 3), 5, LENGTHS, seed=9)
    pt2 = pad_with_garbage(pt, (2, 3), 5, LENGTHS, seed=10)
    assert close(attention_map_kl(ps2, pt2, mask_for(LENGTHS, S + 5)), float(val))
    assert abs(float(attention_map_kl(pt, pt, m))) < 1e-6


def test_attention_map_kl_clamps_both_maps_at_1e_8():
    ps = rand_probs(LENGTHS, seed=29, zeros_in_block=True)
    pt = rand_probs(LENGTHS, seed=30, zeros_in_block=True)
    ps[:, :, 1, 0] = 0.0  # student gives exactly 0 where the teacher has mass: log(0) without the clamp
    m = mask_for(LENGTHS)
    val = attention_map_kl(ps, pt, m)
    assert math.isfinite(float(val))
    assert close(val, ref_attention_map_kl(ps, pt, LENGTHS))
    # a single entry: teacher 1 vs student 0 contributes log(1 / 1e-8) = 18.42...
    t = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    s = torch.tensor([[[[0.0, 1.0], [0.5, 0.5]]]])
    expected = (1.0 * math.log(1.0 / EPS_MAP) + EPS_MAP * math.log(EPS_MAP / 1.0)) / 2
    assert close(attention_map_kl(s, t, torch.ones(1, 2, dtype=torch.long)), expected)


def test_attention_map_kl_divides_the_row_sum_by_n():
    # every valid row has KL k: summed over n rows and divided by n gives k for every length
    for n in (1, 2, 5):
        pt = torch.zeros(1, 1, 6, 6)
        ps = torch.zeros(1, 1, 6, 6)
        pt[0, 0, :, 0], ps[0, 0, :, 0] = 1.0, 0.25
        if n > 1:
            pt[0, 0, :, 0], pt[0, 0, :, 1] = 0.75, 0.25
            ps[0, 0, :, 0], ps[0, 0, :, 1] = 0.25, 0.75
            k = 0.75 * math.log(3) + 0.25 * math.log(1 / 3)
        else:
            k = math.log(4)
        # the block's other keys are 0 in both maps: clamped to 1e-8 each, they add 1e-8 * log 1 = 0
        got = attention_map_kl(ps, pt, mask_for([n], 6))
        expected = ref_attention_map_kl(ps, pt, [n])
        assert close(got, expected)
        assert close(got, k, tol=1e-6)


# --------------------------------------------------------------------------------------- gradients
def _grad_cases():
    m = mask_for(LENGTHS)
    return [
        ("hidden_mse", lambda s, t: hidden_mse(s, t, m), (3, S, 4)),
        ("attention_output_mse", lambda s, t: attention_output_mse(s, t, m), (3, S, 4)),
        ("attention_score_mse", lambda s, t: attention_score_mse(s, t, m), (3, HEADS, S, S)),
        ("relation_kl", lambda s, t: relation_kl(s, t, m, 2), (3, S, 8)),
        # the leaf is the probability map itself (as Features.probs hands it over)
        ("attention_kl", lambda s, t: attention_kl(s, t, m), "probs"),
        ("attention_map_kl", lambda s, t: attention_map_kl(s, t, m), "probs"),
    ]


@pytest.mark.parametrize("name,fn,shape", _grad_cases(), ids=[c[0] for c in _grad_cases()])
def test_gradient_reaches_student_valid_positions_only(name, fn, shape):
    if shape == "probs":
        shape = (3, HEADS, S, S)
        s = pad_with_garbage(rand_probs(LENGTHS, seed=31), (2, 3), 0, LENGTHS).requires_grad_(True)
        t = rand_probs(LENGTHS, seed=32).requires_grad_(True)
    else:
        s = rand(*shape, seed=31).requires_grad_(True)
        t = rand(*shape, seed=32).requires_grad_(True)
    loss = fn(s, t.detach())  # the worker hands over teacher features without a graph
    loss.backward()
    g = s.grad
    assert torch.isfinite(g).all()
    valid = torch.zeros(shape, dtype=torch.bool)
    for b, n in enumerate(LENGTHS):
        if len(shape) == 3:
            valid[b, :n] = True
        else:  # (B, heads, S, S): only the valid n x n block carries gradient
            valid[b, :, :n, :n] = True
    assert float(g[valid].abs().sum()) > 0
    assert float(g[~valid].abs().max()) == 0.0, f"{name}: padded positions receive gradient"


def _inference_cases():
    m = mask_for(LENGTHS)
    probs = lambda seed: rand_probs(LENGTHS, seed=seed)  # noqa: E731
    return [
        pytest.param("logit_kd", lambda t: logit_kd(rand(3, 4, seed=1).requires_grad_(), t, 2.0),
                     lambda: rand(3, 4, seed=2), id="logit_kd"),
        pytest.param("hidden_mse", lambda t: hidden_mse(rand(3, S, 4, seed=1).requires_grad_(), t, m),
                     lambda: rand(3, S, 4, seed=2), id="hidden_mse"),
        pytest.param("pkd", lambda t: pkd(rand(3, 4, seed=1).requires_grad_(), t),
                     lambda: rand(3, 4, seed=2), id="pkd"),
        pytest.param("attention_score_mse",
                     lambda t: attention_score_mse(rand(3, HEADS, S, S, seed=1).requires_grad_(), t, m),
                     lambda: rand(3, HEADS, S, S, seed=2), id="attention_score_mse"),
        pytest.param("relation_kl", lambda t: relation_kl(rand(3, S, 8, seed=1).requires_grad_(), t, m, 2),
                     lambda: rand(3, S, 8, seed=2), id="relation_kl"),
        pytest.param("attention_map_kl", lambda t: attention_map_kl(probs(1).requires_grad_(), t, m),
                     lambda: probs(2), id="attention_map_kl"),
        pytest.param("attention_kl", lambda t: attention_kl(probs(1).requires_grad_(), t, m),
                     lambda: probs(2), id="attention_kl"),
    ]


@pytest.mark.parametrize("name,loss_of_teacher,make_teacher", _inference_cases())
def test_teacher_tensors_from_inference_mode_are_accepted(name, loss_of_teacher, make_teacher):
    """The worker computes teacher features under torch.inference_mode(); a pure loss must take them as
    targets (no gradient to them) and still backpropagate into the student."""
    with torch.inference_mode():
        t = make_teacher()
    loss_of_teacher(t).backward()


def test_logit_kd_and_pkd_gradient_goes_to_student():
    zs = rand(4, 3, seed=33).requires_grad_(True)
    with torch.inference_mode():
        zt = rand(4, 3, seed=34)
    logit_kd(zs, zt, 2.0).backward()
    assert zs.grad.abs().sum() > 0
    cs = rand(4, 5, seed=35).requires_grad_(True)
    pkd(cs, rand(4, 5, seed=36)).backward()
    assert cs.grad.abs().sum() > 0


# ---------------------------------------------------------------------------- Features, term_loss
def make_features(seed, width=8, heads=2, layers=3, lengths=LENGTHS, s=S, labels=3):
    g = torch.Generator().manual_seed(seed)
    r = lambda *sh: torch.randn(*sh, generator=g)  # noqa: E731
    f = Features(logits=r(len(lengths), labels), attention_mask=mask_for(lengths, s), num_heads=heads,
                 hidden=tuple(r(len(lengths), s, width) for _ in range(layers + 1)))
    for layer in range(1, layers + 1):
        f.q[layer], f.k[layer], f.v[layer] = r(len(lengths), s, width), r(len(lengths), s, width), \
            r(len(lengths), s, width)
        f.attn_out[layer] = r(len(lengths), s, width)
    return f


def test_features_scores_and_probs_match_reference():
    f = make_features(40)
    for layer in (1, 3):
        ref = ref_scores(f.q[layer], f.k[layer], f.num_heads)
        np.testing.assert_allclose(f.scores(layer).double().numpy(), ref, rtol=1e-5, atol=1e-5)
        p = f.probs(layer).double().numpy()
        for b, n in enumerate(LENGTHS):
            for h in range(f.num_heads):
                for i in range(S):  # every query row (padded ones too) is a distribution over valid keys
                    np.testing.assert_allclose(p[b, h, i, :n], softmax_np(ref[b, h, i, :n]), rtol=1e-5,
                                               atol=1e-6)
                    assert np.all(p[b, h, i, n:] == 0.0)


def test_term_loss_dispatch_sums_the_registered_function_over_pairs():
    s, t = make_features(41, layers=2), make_features(42, layers=4)
    m = s.attention_mask
    pairs = [(1, 2), (2, 4)]
    expected = {
        "hidden_mse": sum(float(hidden_mse(s.hidden[a], t.hidden[b], m)) for a, b in pairs),
        "attention_score_mse": sum(float(attention_score_mse(s.scores(a), t.scores(b), m)) for a, b in pairs),
        "attention_kl": sum(float(attention_kl(s.probs(a), t.probs(b), m)) for a, b in pairs),
        "attention_map_kl": sum(float(attention_map_kl(s.probs(a), t.probs(b), m)) for a, b in pairs),
        "attention_output_mse": sum(float(attention_output_mse(s.attn_out[a], t.attn_out[b], m))
                                    for a, b in pairs),
        "relation_kl": sum(float(relation_kl(getattr(s, r)[a], getattr(t, r)[b], m, t.num_heads))
                           for a, b in pairs for r in "qkv"),
    }
    for name, want in expected.items():
        assert close(term_loss(name, s, t, pairs), want), name
    # against the independent references too, for the mapped layers (not the same-index ones)
    assert close(term_loss("attention_map_kl", s, t, [(2, 4)]),
                 ref_attention_map_kl(s.probs(2), t.probs(4), LENGTHS))
    assert close(term_loss("relation_kl", s, t, [(1, 3)], relations=["k"]),
                 ref_relation_kl(s.k[1], t.k[3], LENGTHS, 2))
    assert close(term_loss("hidden_mse", s, t, [(0, 0)]), ref_token_mse(s.hidden[0], t.hidden[0], LENGTHS))


def test_term_loss_logits_terms_projection_and_mask_override():
    s, t = make_features(43), make_features(44)
    labels = torch.tensor([0, 2, 1])
    assert close(term_loss("ce", s, None, [], labels=labels), ref_ce(s.logits, labels))
    assert close(term_loss("logit_kd", s, t, [], temperature=2.0), ref_logit_kd(s.logits, t.logits, 2.0))
    # project(name, h) is applied to the student's hidden state before the MSE
    seen = []

    def project(name, h):
        seen.append(name)
        return h * 2.0

    assert close(term_loss("hidden_mse", s, t, [(1, 2)], project=project),
                 ref_token_mse(s.hidden[1] * 2.0, t.hidden[2], LENGTHS))
    assert seen == ["hidden_mse"]
    # an explicit mask (the mixup union) replaces the student's
    union = mask_for([6, 6, 6])
    assert close(term_loss("hidden_mse", s, t, [(1, 1)], mask=union),
                 ref_token_mse(s.hidden[1], t.hidden[1], [6, 6, 6]))


def ref_pkd_stacked(s_layers, t_layers):
    """CR-ILD reference PKD_Loss(normalize=True) on [CLS] vectors stacked over the mapped layers: L2-normalise
    each vector, then one MSE over (batch, layers, units)."""
    su = np.stack([np64(h[:, 0]) for h in s_layers], axis=1)
    tu = np.stack([np64(h[:, 0]) for h in t_layers], axis=1)
    su = su / np.linalg.norm(su, axis=-1, keepdims=True)
    tu = tu / np.linalg.norm(tu, axis=-1, keepdims=True)
    return float(((su - tu) ** 2).mean())


def test_pkd_term_averages_over_the_mapped_layers_as_the_reference():
    s, t = make_features(49, layers=3), make_features(50, layers=6)
    pairs = [(1, 2), (2, 4), (3, 6)]
    want = ref_pkd_stacked([s.hidden[a] for a, _ in pairs], [t.hidden[b] for _, b in pairs])
    assert close(term_loss("pkd", s, t, pairs), want)
    one = ref_pkd_stacked([s.hidden[1]], [t.hidden[2]])
    assert close(term_loss("pkd", s, t, [(1, 2)]), one)
    # a projection applies to the student's [CLS] state before the normalisation
    got = term_loss("pkd", s, t, pairs, project=lambda name, h: h.flip(-1) * 3.0)
    assert close(got, ref_pkd_stacked([s.hidden[a].flip(-1) for a, _ in pairs], [t.hidden[b] for _, b in pairs]))


def test_relation_kl_term_with_different_widths_uses_the_teachers_head_count():
    s = make_features(45, width=8, heads=2)
    t = make_features(46, width=16, heads=4)
    got = term_loss("relation_kl", s, t, [(3, 3)], relations=["q"])
    assert close(got, ref_relation_kl(s.q[3], t.q[3], LENGTHS, 4))


def test_term_loss_errors():
    s = make_features(47)
    with pytest.raises(ValueError, match="teacher"):
        term_loss("hidden_mse", s, None, [(1, 1)])
    with pytest.raises(KeyError, match="unknown loss term"):
        term_loss("no_such_loss", s, make_features(48), [(1, 1)])


# ------------------------------------------------------------------------------- random shapes
@settings(max_examples=25, deadline=None)
@given(lengths=st.lists(st.integers(1, 5), min_size=1, max_size=3), extra=st.integers(0, 2),
       heads=st.sampled_from([1, 2]), seed=st.integers(0, 10_000))
def test_masked_losses_match_references_for_random_lengths(lengths, extra, heads, seed):
    s = max(lengths) + extra
    m = mask_for(lengths, s)
    ps, pt = rand_probs(lengths, heads, s, seed), rand_probs(lengths, heads, s, seed + 1)
    assert close(attention_map_kl(ps, pt, m), ref_attention_map_kl(ps, pt, lengths), tol=1e-4)
    assert close(attention_kl(ps, pt, m), ref_attention_kl(ps, pt, lengths), tol=1e-4)
    xs, xt = rand(len(lengths), s, 4, seed=seed), rand(len(lengths), s, 6 * heads, seed=seed + 2)
    assert close(relation_kl(xs, xt, m, heads), ref_relation_kl(xs, xt, lengths, heads), tol=1e-4)
    ss, stt = rand(len(lengths), heads, s, s, seed=seed + 3), rand(len(lengths), heads, s, s, seed=seed + 4)
    assert close(attention_score_mse(ss, stt, m), ref_score_mse(ss, stt, lengths), tol=1e-4)
    assert close(hidden_mse(xs, xs.flip(-1), m), ref_token_mse(xs, xs.flip(-1), lengths), tol=1e-4)
