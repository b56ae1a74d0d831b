"""Teacher and student models from `transformers`, and the taps that expose what the losses read.

Intermediate tensors come from the model's own outputs (hidden states) and forward hooks (Q, K, V and
the attention sub-layer output); no model code is copied, so SDPA attention stays on.
"""

from __future__ import annotations

import importlib
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from kdplatform.config import MODEL_ALIASES
from kdplatform.distill.losses import Features

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no per-trial "Loading weights" bars in logs


def resolve_model(name: str) -> str:
    """A registry name, a local folder or a hub id -> what `from_pretrained` takes.

    >>> resolve_model("bert-base-uncased")
    'google-bert/bert-base-uncased'
    """
    if Path(name).is_dir():
        return str(Path(name).resolve())
    alias = MODEL_ALIASES.get(name)
    if alias is None:
        return name
    pkg = alias.get("package")
    if pkg:
        try:
            return str(importlib.import_module(pkg).get_model_path())
        except ImportError:
            pass  # not installed: fall back to the hub id
    return alias["hub"]


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name_or_path))


def load_classifier(name_or_path: str, num_labels: int, num_layers: int | None = None) -> nn.Module:
    """A sequence classifier from pretrained weights; `num_layers` keeps only the bottom layers."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model(name_or_path)
    config = AutoConfig.from_pretrained(path, num_labels=num_labels)
    if num_labels == 1:
        config.problem_type = "regression"
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    return AutoModelForSequenceClassification.from_pretrained(path, config=config, attn_implementation="sdpa")


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.base_model.encoder.layer


def num_heads(model: nn.Module) -> int:
    return model.config.num_attention_heads


class FeatureTap:
    """Forward hooks that record Q, K, V and attention outputs of chosen layers (1-based).

    >>> tap = FeatureTap(model, qkv_layers={2}, attn_out_layers=set())   # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, qkv_layers: set[int] = frozenset(),
                 attn_out_layers: set[int] = frozenset()):
        self.q: dict[int, Tensor] = {}
        self.k: dict[int, Tensor] = {}
        self.v: dict[int, Tensor] = {}
        self.attn_out: dict[int, Tensor] = {}
        self._handles = []
        layers = encoder_layers(model)
        for layer in qkv_layers:
            att = layers[layer - 1].attention.self
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

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


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
    return feats


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def set_seed(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
