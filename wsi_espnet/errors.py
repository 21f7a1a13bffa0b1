"""User-facing error types.

Every error a user can cause (a wrong path, a file that is not what it claims to be, a class count that
does not match) is raised as a subclass of :class:`WsiEspnetError` whose message says what is wrong,
what was expected and what to do. The CLI prints that message and exits with the class's exit code;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CheckpointError", "ConfigError", "InputError", "WsiEspnetError", "check_output_folder"]


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


def check_output_folder(path: str | os.PathLike[str]) -> None:
    """Raise :class:`InputError` unless ``path``'s folder exists and ``path`` is not itself a folder."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"output {str(path)!r} is a folder; give a file name inside it.")
    if not path.parent.is_dir():
        raise InputError(f"output folder {str(path.parent)!r} does not exist; create it first.")
