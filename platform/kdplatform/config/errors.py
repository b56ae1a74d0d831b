"""ConfigError: a user mistake in a config file, named by file, YAML path (and line) and a fix."""

from __future__ import annotations

import os


class ConfigError(Exception):
    """A user mistake in a config file: printed without a traceback, exit code 2."""

    def __init__(self, file: str | os.PathLike | None, path: str, message: str, fix: str = "",
                 line: int | None = None):
        self.file, self.path, self.message, self.fix, self.line = (str(file) if file else None), path, \
            message, fix, line
        where = self.file or "<config>"
        if line is not None:
            where += f":{line}"
        text = f"{where}: {path}: {message}" if path else f"{where}: {message}"
        if fix:
            text += f"\n  fix: {fix}"
        super().__init__(text)
