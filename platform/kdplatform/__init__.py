"""kdplatform: knowledge-distillation sweeps (YAML -> trials -> Ray/MLflow -> report).

The Python API (`kdplatform/api.py`): `load_spec`, `expand`, `run_trial`, `run_sweep`, `build_report`.
They are imported on first use, so `import kdplatform` loads neither torch, Ray nor MLflow.

>>> from kdplatform import load_spec, expand
>>> trials, notes = expand(load_spec("sweeps/quickstart.yaml"))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdplatform.api import build_report, expand, load_spec, run_sweep, run_trial

__all__ = ["build_report", "expand", "load_spec", "run_sweep", "run_trial"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from kdplatform import api

        return getattr(api, name)
    raise AttributeError(f"module 'kdplatform' has no attribute {name!r}")
