"""User-facing error types.

Every error a user can cause (a wrong path, a file that is not what it claims to be, a class count that
does not match) is raised as a subclass of :class:`WsiEspnetError` whose message says what is wrong,
what was expected and what to do. The CLI prints that message and exits with the class's exit code;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "ConfigError", "InputError", "WsiEspnetError"]


class WsiEspnetError(Exception):
    """Base class of errors caused by the user's input, not by a bug."""

    exit_code: int = 2


class InputError(WsiEspnetError, ValueError):
    """An argument or input file is missing, unreadable or of the wrong kind."""


class ConfigError(WsiEspnetError, ValueError):
    """A model configuration is inconsistent or incomplete."""


class CheckpointError(WsiEspnetError):
    """A weights file is missing, corrupted or does not fit the model it is loaded into."""

    exit_code = 3
