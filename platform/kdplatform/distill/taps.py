"""Taps: what the losses read from a model's forward pass.

Intermediate tensors come from the model's own outputs (hidden states) and forward hooks (Q, K, V, the
attention sub-layer output, attention maps) at the module paths of the model's family
(`kdplatform/families.py`); no model code is copied, so SDPA attention stays on wherever no loss needs maps
the family cannot give otherwise. Also CR-ILD's embedding mixup, which is a forward hook too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from kdplatform.distill.losses import Features
from kdplatform.distill.models import encoder_layers, family_of, num_heads
from kdplatform.distill.quant import ATTN_IMPLEMENTATION, use_recording_attention
from kdplatform.families import FAMILIES, Family
from kdplatform.loss_menu import LOSS_MENU

PROB_FLOOR = 1e-30  # log of a probability the softmax made exactly 0 (a masked key): finite, never read


def attention_feature_names(family: Family, layer: int) -> set[str]:
    """What a loss on one layer's attention scores/probabilities reads: Q and K where softmax(QK^T/sqrt(d) + mask)
    is the model's attention (family maps "recompute"), else the model's own maps ('map.L')."""
    return {f"q.{layer}", f"k.{layer}"} if family.maps == "recompute" else {f"map.{layer}"}


def feature_names(losses: Sequence[Any], side: str = "teacher", family: Family = FAMILIES["bert"]) -> set[str]:
    """The features a stage's loss terms read from one model ('student' or 'teacher') of `family`, derived from
    the menu's `reads`: 'logits', 'hidden.L', 'q.L', 'k.L', 'v.L', 'attn_out.L', 'map.L'. `losses` are
    `ResolvedLoss` objects. The teacher's set is also what the teacher output cache keeps."""
    names = {"logits"}
    for term in losses:
        reads = LOSS_MENU[term.name].reads
        for ls, lt in term.layer_pairs:
            layer = lt if side == "teacher" else ls
            if "hidden" in reads:
                names.add(f"hidden.{layer}")
            if "qk" in reads:
                names |= attention_feature_names(family, layer)
            if "qkv" in reads:
                names |= {f"{r}.{layer}" for r in (term.relations or ("q", "k", "v"))}
            if "attn_out" in reads:
                names.add(f"attn_out.{layer}")
    return names


def layers_of(names: Iterable[str], *kinds: str) -> set[int]:
    """The layers of the named features of these kinds: layers_of({'q.3', 'hidden.2'}, 'q', 'k') == {3}."""
    return {int(n.split(".")[1]) for n in names if n.split(".")[0] in kinds}


class FeatureTap:
    """Forward hooks that record Q, K, V, attention outputs and attention maps of chosen layers (1-based), at
    the module paths of the model's family (`kdplatform/families.py`).

    - Q, K, V: the outputs of the family's projections, (B, S, H); a fused QKV projection (ModernBERT) is split
      into its thirds, so its Q and K are taken before the rotary embedding.
    - attention output: the output of the family's `attn_out_tap` module, LN(W_O ctx + b + x).
    - maps (`map_layers`), the (scores, probabilities) the model attends with: from the recording attention
      function (family maps "interface"; the model runs it while tapped) or the input of the probabilities'
      dropout module (maps "probs_dropout"). "recompute" families need no map tap (see `Features.probs`).
    In a layer whose attention quantizes its activations (`quant.quantize_bert_` with act_bits < 32), the maps
    of its Q/K layers are also recorded where the quantized attention computes them: Q and K as the hooks see
    them are not yet quantized, so a map recomputed from them would not be the map the student uses.

    >>> tap = FeatureTap(model, qkv_layers={2}, attn_out_layers=set())   # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, qkv_layers: set[int] = frozenset(),
                 attn_out_layers: set[int] = frozenset(), map_layers: set[int] = frozenset()):
        self.q: dict[int, Tensor] = {}
        self.k: dict[int, Tensor] = {}
        self.v: dict[int, Tensor] = {}
        self.attn_out: dict[int, Tensor] = {}
        self._probs: dict[int, Tensor] = {}  # maps read from a probabilities dropout's input
        self._handles = []
        self._capturing: dict[int, nn.Module] = {}  # layer -> attention module keeping its maps (kdp_maps)
        self._model, self._restore_attn = model, None
        # a forward starts afresh: each hook keeps the first call of a forward (DeBERTa with share_att_key calls
        # query_proj / key_proj again on the relative position embeddings after the tokens' projections)
        self._handles.append(model.register_forward_pre_hook(lambda _m, _a: self._clear()))
        family = self.family = family_of(model)
        layers = encoder_layers(model)
        for layer in qkv_layers:
            att = layers[layer - 1].get_submodule(family.attention)
            if getattr(att, "kdp_act_bits", 32) < 32:
                self._capture(model, att, layer)
            if family.qkv:
                fused = layers[layer - 1].get_submodule(family.qkv)
                self._handles.append(fused.register_forward_hook(self._store_split(layer)))
                continue
            for name, path in (("q", family.query), ("k", family.key), ("v", family.value)):
                mod = layers[layer - 1].get_submodule(path)
                self._handles.append(mod.register_forward_hook(self._store(getattr(self, name), layer)))
        for layer in attn_out_layers:
            mod = layers[layer - 1].get_submodule(family.attn_out_tap)
            self._handles.append(mod.register_forward_hook(self._store(self.attn_out, layer)))
        for layer in map_layers:
            if family.maps == "interface":
                self._capture(model, layers[layer - 1].get_submodule(family.attention), layer)
            elif family.maps == "probs_dropout":
                mod = layers[layer - 1].get_submodule(family.probs_dropout)
                self._handles.append(mod.register_forward_hook(self._store_input(self._probs, layer)))

    def _capture(self, model: nn.Module, att: nn.Module, layer: int) -> None:
        """Have this layer's attention record its maps; the model runs the recording attention function."""
        att.kdp_capture = True
        self._capturing[layer] = att
        if model.config._attn_implementation != ATTN_IMPLEMENTATION:
            self._restore_attn = model.config._attn_implementation
            use_recording_attention(model)

    def _clear(self) -> None:
        for d in (self.q, self.k, self.v, self.attn_out, self._probs):
            d.clear()

    @staticmethod
    def _store(dest: dict[int, Tensor], layer: int):
        def hook(_module, _inputs, output):
            if layer not in dest:
                dest[layer] = output[0] if isinstance(output, tuple) else output
        return hook

    @staticmethod
    def _store_input(dest: dict[int, Tensor], layer: int):
        def hook(_module, inputs, _output):
            if layer not in dest:
                dest[layer] = inputs[0]
        return hook

    def _store_split(self, layer: int):
        def hook(_module, _inputs, output):
            if layer not in self.q:
                self.q[layer], self.k[layer], self.v[layer] = output.chunk(3, dim=-1)
        return hook

    def maps(self) -> dict[int, tuple[Tensor, Tensor]]:
        """(scores, probabilities) per tapped layer from the last forward pass (see `Features.scores`)."""
        out = {layer: att.kdp_maps for layer, att in self._capturing.items() if getattr(att, "kdp_maps", None)}
        for layer, probs in self._probs.items():
            out[layer] = (torch.log(probs.float().clamp_min(PROB_FLOOR)), probs)
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for att in self._capturing.values():
            att.kdp_capture, att.kdp_maps = False, None
        self._capturing.clear()
        if self._restore_attn is not None:
            self._model.set_attn_implementation(self._restore_attn)
            self._restore_attn = None


def tap_features(model: nn.Module, names: Iterable[str]) -> FeatureTap:
    """A tap recording the named features ('q.2', 'attn_out.3', 'map.4', ...) of a model."""
    names = set(names)
    return FeatureTap(model, layers_of(names, "q", "k", "v"), layers_of(names, "attn_out"),
                      layers_of(names, "map"))


@contextmanager
def embedding_mixup(model: nn.Module, lam: float):
    """CR-ILD mixup at the embedding output: e = lam * e_i + (1 - lam) * e_rev(i) (batch reversed)."""

    def hook(_module, _inputs, output):
        return lam * output + (1.0 - lam) * output.flip(0)

    handle = model.base_model.get_submodule(family_of(model).embeddings).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def forward_features(model: nn.Module, batch: dict[str, Tensor], tap: FeatureTap | None,
                     need_hidden: bool, attention_mask: Tensor | None = None) -> Features:
    """Run the model on a batch and collect what the losses need."""
    mask = batch["attention_mask"] if attention_mask is None else attention_mask
    inputs = {"input_ids": batch["input_ids"], "attention_mask": mask}
    if "token_type_ids" in batch and family_of(model).token_type_ids:
        inputs["token_type_ids"] = batch["token_type_ids"]
    out = model(**inputs, output_hidden_states=need_hidden)
    feats = Features(logits=out.logits, attention_mask=mask, num_heads=num_heads(model),
                     hidden=out.hidden_states if need_hidden else None)
    if tap is not None:
        feats.q, feats.k, feats.v, feats.attn_out = dict(tap.q), dict(tap.k), dict(tap.v), dict(tap.attn_out)
        feats.maps = tap.maps()
    return feats
