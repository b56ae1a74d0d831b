"""Other libraries' console messages go to a log file, not the user's view.

MLflow logs "Creating initial MLflow database tables..." (and alembic its migrations) on a store's first use,
and `mlflow ui`'s server prints Starlette/uvicorn deprecation warnings: none of it is ours to show, none of it
needs the user, all of it may help someone debugging. It goes to `<KDP_CACHE_DIR>/logs/`, and the command
names the file when a warning or an error was written there (`run` and `sweep`, whose summary ends with the
places to look, when anything was).

>>> path = send_library_logs_to_file()        # doctest: +SKIP
>>> ... ; if wrote_library_log(): print(f"library messages: {path}")   # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from kdplatform import paths

LIBRARY_LOGGERS = ("mlflow", "alembic")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _CountingFileHandler(logging.FileHandler):
    """Opens the file on the first record (a dry run that logs nothing writes nothing) and counts the warnings
    and errors among them (INFO lines such as alembic's on every store open are kept, not announced)."""

    def __init__(self, path: Path):
        super().__init__(path, delay=True)
        self.records = self.warnings = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1
        self.warnings += record.levelno >= logging.WARNING
        if self.stream is None:  # first record: the folder may not exist yet
            Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        super().emit(record)


def logs_dir() -> Path:
    return paths.cache_root() / "logs"


def send_library_logs_to_file(name: str = "libraries.log") -> Path:
    """Route the LIBRARY_LOGGERS' records (INFO and up) to `logs_dir()/name` instead of the console."""
    # MLflow adds its console handler when imported: before its import, ask it not to (importing it here just to
    # replace the handler cost every command ~1.6 s of CPU, a mistyped file's refusal included); after, the
    # loop below replaces the handler.
    if "mlflow" not in sys.modules:
        os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    path = logs_dir() / name
    for logger_name in LIBRARY_LOGGERS:
        logger = logging.getLogger(logger_name)
        for h in list(logger.handlers):
            if not isinstance(h, _CountingFileHandler):
                logger.removeHandler(h)
        if not logger.handlers:
            handler = _CountingFileHandler(path)
            handler.setFormatter(logging.Formatter(_FORMAT))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return path


def wrote_library_log(warnings_only: bool = True) -> bool:
    """Whether this process has written a library warning or error (or, with `warnings_only=False`, any
    record) to the log file."""
    return any(isinstance(h, _CountingFileHandler) and (h.warnings if warnings_only else h.records)
               for name in LIBRARY_LOGGERS for h in logging.getLogger(name).handlers)
