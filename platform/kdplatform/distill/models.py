"""Teacher and student models from `transformers`: where their weights come from and how they are loaded.
What the losses read from them is tapped in `taps.py`; where a family keeps its parts is `kdplatform/families.py`."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from kdplatform import paths
from kdplatform.config import MODEL_ALIASES
from kdplatform.distill.packaged_models import assembled_model
from kdplatform.families import Family, family_of_type


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
    if alias.get("wheels"):
        folder = assembled_model(alias["wheels"])
        if folder is not None:
            return str(folder)
    pkg = alias.get("package")
    if pkg:
        try:
            return str(importlib.import_module(pkg).get_model_path())
        except ImportError:
            pass  # not installed: fall back to the hub id
    return alias["hub"]


def load_tokenizer(name_or_path: str):
    paths.quiet_transformers()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name_or_path))


def load_classifier(name_or_path: str, num_labels: int, num_layers: int | None = None, *,
                    regression_start: float | None = None) -> nn.Module:
    """A sequence classifier from pretrained weights; `num_layers` keeps only the bottom layers. Loaded with
    its family's attention implementation (SDPA where the family supports it, else eager).

    `regression_start`: for a regression head the checkpoint does not provide (one output), the output
    bias starts at this value (the training labels' mean) instead of 0. Why: a new head on an encoder whose
    pooler was never trained (sentence-transformers checkpoints: MiniLM, MPNet) outputs about 0.01 while
    STS-B labels average 2.7, and Adam moves a bias by about lr per step (0.03 in 300 steps at 1e-4), so
    the MSE's gradient spends the fine-tune shifting every prediction up instead of ranking them."""
    paths.quiet_transformers()
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model(name_or_path)
    config = AutoConfig.from_pretrained(path, num_labels=num_labels)
    family = family_of_type(config.model_type, str(name_or_path))
    if num_labels == 1:
        config.problem_type = "regression"
    if num_layers is not None:
        config.num_hidden_layers = num_layers  # every family's config maps this name to its depth key
        for key in family.per_layer_config:
            setattr(config, key, getattr(config, key)[:num_layers])
    model, info = AutoModelForSequenceClassification.from_pretrained(
        path, config=config, attn_implementation=family.attn_implementation, output_loading_info=True)
    if regression_start is not None and num_labels == 1:
        start_regression_head(model, info["missing_keys"], regression_start)
    return model


def start_regression_head(model: nn.Module, missing_keys, value: float) -> None:
    """Set the bias of the new one-output head (its output layer: a Linear with one output whose bias is
    among `missing_keys`, the weights the checkpoint lacked) to `value`; nothing when there is none."""
    for name in missing_keys:
        module_name, _, leaf = name.rpartition(".")
        if leaf != "bias":
            continue
        module = model.get_submodule(module_name)
        if isinstance(module, nn.Linear) and module.out_features == 1:
            with torch.no_grad():
                module.bias.fill_(value)
            return


def family_of(model: nn.Module) -> Family:
    return family_of_type(model.config.model_type)


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.base_model.get_submodule(family_of(model).layers)


def num_heads(model: nn.Module) -> int:
    return model.config.num_attention_heads


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
