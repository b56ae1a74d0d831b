"""The loss menu as data: every loss name a YAML file may use, what it reads, which options apply to it.

Pure data (no torch): the config layer validates and resolves loss terms from it, the worker plans its
feature taps and the teacher output cache from it, and `kdplatform/distill/losses.py` registers exactly one
function per entry (a test checks the two agree). Adding a loss = one entry here + one registered function.

When a loss's definition changes, the config layer records it (with the trials it affects) so that only
those trials' config hashes change.
"""

from __future__ import annotations

from dataclasses import dataclass

# Features a loss can read from a forward pass (per mapped layer where `per_layer`):
#   logits, labels, hidden (hidden states incl. embeddings at 0), qk (query/key projections -> attention
#   scores/probabilities), qkv (query/key/value for relations), attn_out (attention sub-layer output).
FEATURES = ("logits", "labels", "hidden", "qk", "qkv", "attn_out")

# Term options of `LossTermConfig` and the losses each one applies to.
OPTIONS = ("temperature", "relations", "include_embeddings", "projection")


@dataclass(frozen=True)
class LossInfo:
    name: str
    reads: frozenset[str]  # subset of FEATURES
    per_layer: bool  # takes a layer map (summed or averaged over mapped pairs by the loss's definition)
    options: frozenset[str] = frozenset()  # subset of OPTIONS that change what this loss computes
    needs_teacher: bool = True
    summary: str = ""


def _info(name: str, reads: set[str], per_layer: bool, options: set[str] = frozenset(), **kw) -> LossInfo:
    return LossInfo(name, frozenset(reads), per_layer, frozenset(options), **kw)


LOSS_MENU: dict[str, LossInfo] = {i.name: i for i in [
    _info("logit_kd", {"logits"}, False, {"temperature"},
          summary="soft cross-entropy on logits at temperature T (x T^2); regression: MSE"),
    _info("ce", {"logits", "labels"}, False, needs_teacher=False, summary="hard-label cross-entropy (MSE)"),
    _info("hidden_mse", {"hidden"}, True, {"include_embeddings", "projection"},
          summary="MSE of (projected) hidden states of mapped layers"),
    _info("attention_score_mse", {"qk"}, True, summary="MSE of pre-softmax attention scores"),
    _info("attention_kl", {"qk"}, True, summary="KL of attention distributions over valid keys"),
    _info("relation_kl", {"qkv"}, True, {"relations"}, summary="MiniLMv2 Q/K/V self-relation KL"),
    _info("pkd", {"hidden"}, True, {"projection"}, summary="MSE of L2-normalised [CLS] states (Patient KD)"),
    _info("attention_map_kl", {"qk"}, True, summary="KD-QAT 'M': attention-map KL (clamped at 1e-8)"),
    _info("attention_output_mse", {"attn_out"}, True, summary="KD-QAT 'O': attention sub-layer output MSE"),
]}

LOSS_NAMES = tuple(LOSS_MENU)
