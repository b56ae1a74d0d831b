"""Taps: what the losses read from a model's forward pass.

Intermediate tensors come from the model's own outputs (hidden states) and forward hooks (Q, K, V and the
attention sub-layer output); no model code is copied, so SDPA attention stays on. Also CR-ILD's embedding
mixup, which is a forward hook too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from kdplatform.distill.losses import Features
from kdplatform.distill.models import encoder_layers, num_heads
from kdplatform.loss_menu import LOSS_MENU


def feature_names(losses: Sequence[Any], side: str = "teacher") -> set[str]:
    """The features a stage's loss terms read from one model ('student' or 'teacher'), derived from the menu's
    `reads`: 'logits', 'hidden.L', 'q.L', 'k.L', 'v.L', 'attn_out.L'. `losses` are `ResolvedLoss` objects.
    The teacher's set is also what the teacher output cache keeps."""
    names = {"logits"}
    for term in losses:
        reads = LOSS_MENU[term.name].reads
        for ls, lt in term.layer_pairs:
            layer = lt if side == "teacher" else ls
            if "hidden" in reads:
                names.add(f"hidden.{layer}")
            if "qk" in reads:
                names |= {f"q.{layer}", f"k.{layer}"}
            if "qkv" in reads:
                names |= {f"{r}.{layer}" for r in (term.relations or ("q", "k", "v"))}
            if "attn_out" in reads:
                names.add(f"attn_out.{layer}")
    return names


def layers_of(names: Iterable[str], *kinds: str) -> set[int]:
    """The layers of the named features of these kinds: layers_of({'q.3', 'hidden.2'}, 'q', 'k') == {3}."""
    return {int(n.split(".")[1]) for n in names if n.split(".")[0] in kinds}


class FeatureTap:
    """Forward hooks that record Q, K, V and attention outputs of chosen layers (1-based).

    In a layer whose attention quantizes its activations (`quant.quantize_bert_` with act_bits < 32), the
    attention scores and probabilities are also taken from where the quantized attention computes them
    (`maps`): Q and K as the hooks see them are not yet quantized, so a map recomputed from them would not be
    the map the student uses.

    >>> tap = FeatureTap(model, qkv_layers={2}, attn_out_layers=set())   # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, qkv_layers: set[int] = frozenset(),
                 attn_out_layers: set[int] = frozenset()):
        self.q: dict[int, Tensor] = {}
        self.k: dict[int, Tensor] = {}
        self.v: dict[int, Tensor] = {}
        self.attn_out: dict[int, Tensor] = {}
        self._handles = []
        self._capturing: dict[int, nn.Module] = {}  # layer -> quantized attention module keeping its maps
        layers = encoder_layers(model)
        for layer in qkv_layers:
            att = layers[layer - 1].attention.self
            if getattr(att, "kdp_act_bits", 32) < 32:
                att.kdp_capture = True
                self._capturing[layer] = att
            for name in ("q", "k", "v"):
                mod = getattr(att, {"q": "query", "k": "key", "v": "value"}[name])
                self._handles.append(mod.register_forward_hook(self._store(getattr(self, name), layer)))
        for layer in attn_out_layers:
            mod = layers[layer - 1].attention.output
            self._handles.append(mod.register_forward_hook(self._store(self.attn_out, layer)))

    @staticmethod
    def _store(dest: dict[int, Tensor], layer: int):
        def hook(_module, _inputs, output):
            dest[layer] = output[0] if isinstance(output, tuple) else output
        return hook

    def maps(self) -> dict[int, tuple[Tensor, Tensor]]:
        """(scores, probabilities) of the quantized attention layers, from the last forward pass."""
        return {layer: att.kdp_maps for layer, att in self._capturing.items() if getattr(att, "kdp_maps", None)}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for att in self._capturing.values():
            att.kdp_capture, att.kdp_maps = False, None
        self._capturing.clear()


@contextmanager
def embedding_mixup(model: nn.Module, lam: float):
    """CR-ILD mixup at the embedding output: e = lam * e_i + (1 - lam) * e_rev(i) (batch reversed)."""

    def hook(_module, _inputs, output):
        return lam * output + (1.0 - lam) * output.flip(0)

    handle = model.base_model.embeddings.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def forward_features(model: nn.Module, batch: dict[str, Tensor], tap: FeatureTap | None,
                     need_hidden: bool, attention_mask: Tensor | None = None) -> Features:
    """Run the model on a batch and collect what the losses need."""
    mask = batch["attention_mask"] if attention_mask is None else attention_mask
    inputs = {"input_ids": batch["input_ids"], "attention_mask": mask}
    if "token_type_ids" in batch:
        inputs["token_type_ids"] = batch["token_type_ids"]
    out = model(**inputs, output_hidden_states=need_hidden)
    feats = Features(logits=out.logits, attention_mask=mask, num_heads=num_heads(model),
                     hidden=out.hidden_states if need_hidden else None)
    if tap is not None:
        feats.q, feats.k, feats.v, feats.attn_out = dict(tap.q), dict(tap.k), dict(tap.v), dict(tap.attn_out)
        feats.maps = tap.maps()
    return feats
