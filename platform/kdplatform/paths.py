"""Environment variables and folders: the one module that reads them.

Each function reads the environment when called (a test or a process may set a variable after import),
and nothing here runs at import time.

- `KDP_CACHE_DIR` (default `~/.cache/kdplatform`): fine-tuned teachers, teacher outputs, token cache.
- `KDP_GLUE_DIR`: a folder in the official GLUE TSV layout (`data.glue_dir` in a YAML file wins).
- `KDP_FAULTS`, `KDP_FAULTS_DIR`: fault injection rules and their once-only markers (distill/faults.py).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_root() -> Path:
    """The platform's cache folder (absolute)."""
    return Path(os.environ.get("KDP_CACHE_DIR") or Path.home() / ".cache" / "kdplatform").expanduser().resolve()


def teachers_root() -> Path:
    """Fine-tuned teachers, one folder per teacher hash."""
    return cache_root() / "teachers"


def teacher_outputs_root() -> Path:
    """The teacher output cache (distill/teacher_cache.py)."""
    return cache_root() / "teacher_outputs"


def tokens_root() -> Path:
    """Tokenized example sets (distill/tasks.py)."""
    return cache_root() / "tokens"


def glue_dir() -> str | None:
    """`KDP_GLUE_DIR`, or None when unset or empty."""
    return os.environ.get("KDP_GLUE_DIR") or None


def fault_rules() -> str:
    """`KDP_FAULTS`: `;`-separated fault injection rules (empty: none)."""
    return os.environ.get("KDP_FAULTS", "")


def fault_markers_root() -> Path:
    """Where fault rules that fire once leave their markers (survives process restarts)."""
    return Path(os.environ.get("KDP_FAULTS_DIR") or Path(tempfile.gettempdir()) / "kdp_faults")


def quiet_transformers() -> None:
    """No per-model progress bars or info logs from transformers / the hub in trial logs (set before the first
    model loads; a variable the user set wins)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
