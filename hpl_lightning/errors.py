"""A user's mistakes, as one small hierarchy. Every entry point prints them as one line and exits with status 2
(``hpl_lightning.console.one_line_errors``); anything else is a bug and keeps its traceback.

- ``UserError``: something a person can fix, found before any work is spent on it.
  - ``DataError``: a file or record that breaks the data contract; the message names file, line and field.
  - ``UsageError``: an option, path or combination of settings that cannot work.

They subclass ``ValueError`` so library callers that catch bad values keep working.
"""

from __future__ import annotations

import os


class UserError(ValueError):
    """Bad input a person can fix; the message says what and where (no traceback needed)."""


class DataError(UserError):
    """A record that violates the data contract; the message names file, line and field."""

    def __init__(self, path: str | os.PathLike | None, line: int | None, field: str | None, problem: str):
        self.path, self.line, self.field, self.problem = (str(path) if path else None), line, field, problem
        where = ":".join(str(p) for p in (self.path, self.line) if p is not None) or "<record>"
        super().__init__(f"{where}: field '{field}': {problem}" if field else f"{where}: {problem}")


class UsageError(UserError):
    """An option, path or combination of settings that cannot work (an unknown name, a missing input file)."""
