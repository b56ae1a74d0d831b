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
    """One loss and every role the rest of the platform asks it about (nothing else decides by its name).

    - `reads`: the features it reads (a subset of FEATURES); `"labels"` in it means it needs gold labels,
      so it cannot run on mixup inputs (a mixed example has no single label).
    - `per_layer`: it takes a layer map (summed or averaged over mapped pairs by the loss's definition).
    - `options`: the term options (a subset of OPTIONS) that change what it computes.
    - `needs_teacher`: it reads teacher features (so a stage of it reads the teacher output cache).
    - `trains_head`: it trains the prediction head, so a stage with it predicts and logs dev task scores.
    - `projects_when_widths_differ`: the student's states are projected to the teacher's width when the two
      differ (without asking: the comparison would not be defined otherwise).
    - `consistency`: CR-ILD's consistency distance D may use it (on the student's last layer, mixed vs clean).
    - `definition_changes`: the recorded definition changes (`config/trial.py` DEFINITION_CHANGES, by change
      name) that concern this loss: only trials using it get them in their config hash.
    """

    name: str
    reads: frozenset[str]
    per_layer: bool
    options: frozenset[str] = frozenset()
    needs_teacher: bool = True
    trains_head: bool = False
    projects_when_widths_differ: bool = False
    consistency: bool = False
    definition_changes: tuple[str, ...] = ()
    summary: str = ""

    @property
    def reads_labels(self) -> bool:
        return "labels" in self.reads


def _info(name: str, reads: set[str], per_layer: bool, options: set[str] = frozenset(), **kw) -> LossInfo:
    return LossInfo(name, frozenset(reads), per_layer, frozenset(options), **kw)


LOSS_MENU: dict[str, LossInfo] = {i.name: i for i in [
    _info("logit_kd", {"logits"}, False, {"temperature"}, trains_head=True, definition_changes=("logit_kd",),
          summary="soft cross-entropy on logits at temperature T (x T^2); regression: MSE"),
    _info("ce", {"logits", "labels"}, False, needs_teacher=False, trains_head=True,
          summary="hard-label cross-entropy (MSE)"),
    _info("hidden_mse", {"hidden"}, True, {"include_embeddings", "projection"}, projects_when_widths_differ=True,
          consistency=True, summary="MSE of (projected) hidden states of mapped layers"),
    _info("attention_score_mse", {"qk"}, True, definition_changes=("quantized_attention_maps",),
          summary="MSE of pre-softmax attention scores"),
    _info("attention_kl", {"qk"}, True, consistency=True, summary="KL of attention distributions over valid keys"),
    _info("relation_kl", {"qkv"}, True, {"relations"}, consistency=True, summary="MiniLMv2 Q/K/V self-relation KL"),
    _info("pkd", {"hidden"}, True, {"projection"}, definition_changes=("pkd",), summary="MSE of L2-normalised [CLS] states (Patient KD)"),
    _info("attention_map_kl", {"qk"}, True, definition_changes=("quantized_attention_maps",), summary="KD-QAT 'M': attention-map KL (clamped at 1e-8)"),
    _info("attention_output_mse", {"attn_out"}, True, summary="KD-QAT 'O': attention sub-layer output MSE"),
]}

LOSS_NAMES = tuple(LOSS_MENU)


def consistency_losses() -> tuple[str, ...]:
    """The losses CR-ILD's consistency distance may sum (read at validation time, so a loss added to the menu
    with `consistency=True` is accepted at once)."""
    return tuple(n for n, i in LOSS_MENU.items() if i.consistency)


# CR-ILD's distance when a consistency section does not list its own: attention KL + hidden MSE (the paper).
DEFAULT_CONSISTENCY_LOSSES = ("attention_kl", "hidden_mse")


def trains_head(names) -> bool:
    """Whether any of these losses trains the prediction head (so the stage predicts)."""
    return any(LOSS_MENU[n].trains_head for n in names)


def needs_teacher(names) -> bool:
    """Whether any of these losses reads teacher features."""
    return any(LOSS_MENU[n].needs_teacher for n in names)
