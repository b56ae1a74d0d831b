"""kdplatform: knowledge-distillation sweeps (YAML -> trials -> Ray/MLflow -> report).

The Python API (`kdplatform/api.py`, types in `__init__.pyi`): `load_spec`, `expand`, `run_trial`,
`run_sweep`, `build_report`. They are imported on first use, so `import kdplatform` loads neither torch, Ray
nor MLflow, and the layers' own `from kdplatform import tracking` never pulls the API in (no import cycle).

>>> from kdplatform import load_spec, expand
>>> trials, notes = expand(load_spec("sweeps/quickstart.yaml"))
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["build_report", "expand", "load_spec", "run_sweep", "run_trial"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("kdplatform.api"), name)
    raise AttributeError(f"module 'kdplatform' has no attribute {name!r}")
