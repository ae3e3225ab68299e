"""User-facing error types of canet.

Every error a user can cause with bad input (a data file, a config, a checkpoint) derives from
:class:`CanetError`, so a command-line front end can catch that one type and print a one-line
message instead of a traceback.
"""

from __future__ import annotations

import os


class CanetError(Exception):
    """Base of every user-facing error raised by canet."""


class DataFormatError(CanetError, ValueError):
    """An input data file is missing, unreadable or not in the expected format.

    Attributes:
        path: the file (as given by the caller, converted to ``str``).
        line: 1-based line number of the offending line, or ``None`` when the problem is not
            tied to one line (missing file, empty file, nothing usable after filtering).
        message: what was expected and what was found, without the location prefix.

    ``str(error)`` is a single line: ``"{path}:{line}: {message}"`` or ``"{path}: {message}"``.
    """

    def __init__(self, path: str | os.PathLike[str], line: int | None, message: str) -> None:
        self.path = os.fspath(path) if not isinstance(path, str) else path
        self.line = line
        # A multi-line message would break the one-line contract (log grepping, CLI output).
        self.message = " ".join(str(message).splitlines())
        super().__init__(self.path, self.line, self.message)

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.path}: {self.message}"
        return f"{self.path}:{self.line}: {self.message}"

    def __reduce__(self):  # keep the error picklable (multiprocessing data loaders)
        return (type(self), (self.path, self.line, self.message))


class CheckpointError(CanetError):
    """A checkpoint file is missing, corrupt, or incompatible with the running code or data."""


class ConfigError(CanetError, ValueError):
    """A configuration value is missing, of the wrong type, or out of its allowed range."""
