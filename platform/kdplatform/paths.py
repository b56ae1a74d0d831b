"""Environment variables and folders: the one module that reads them.

Each function reads the environment when called (a test or a process may set a variable after import),
and nothing here runs at import time.

- `KDP_CACHE_DIR` (default `~/.cache/kdplatform`): fine-tuned teachers, teacher outputs, token cache.
- `KDP_GLUE_DIR`: a folder in the official GLUE TSV layout (`data.glue_dir` in a YAML file wins).
- `KDP_FAULTS`, `KDP_FAULTS_DIR`: fault injection rules and their once-only markers (distill/faults.py).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import unicodedata
from pathlib import Path

FILE_NAME_MAX = 120  # characters of a name made from data (file systems allow 255 bytes)


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


def safe_file_name(name: str, max_len: int = FILE_NAME_MAX) -> str:
    """A file name made from data (a task, method or dashboard item name): only letters, digits, `.`, `_`
    and `-`, never empty, hidden, `.`/`..` or an option (`-x`), at most `max_len` characters. Names that had
    to change get a short hash of the original, so two different names never meet in one file."""
    text = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode()
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip(".-") or "item"
    if safe != name or len(safe) > max_len:
        digest = hashlib.sha256(str(name).encode("utf-8", "surrogatepass")).hexdigest()[:8]
        safe = f"{safe[:max_len - 9].rstrip('.-') or 'item'}-{digest}"
    return safe
