"""The user errors of data and teachers, torch-free: the CLI catches them without importing torch (a refused
config file costs well under a second), and `tasks` and `teacher` raise them."""

from __future__ import annotations

import os


class DataError(ValueError):
    """A data file or split that cannot be used; the message names the file, the line and a fix."""

    def __init__(self, message: str, *, file: str | os.PathLike | None = None, line: int | None = None,
                 fix: str = ""):
        self.file = str(file) if file is not None else None
        self.line = line
        self.reason = message
        self.fix = fix
        where = ""
        if self.file is not None:
            where = f"{self.file}:{line}: " if line is not None else f"{self.file}: "
        text = where + message
        if fix:
            text += f"\n  fix: {fix}"
        super().__init__(text)


class TeacherError(ValueError):
    """A teacher checkpoint that cannot be used (missing, wrong architecture or task)."""
