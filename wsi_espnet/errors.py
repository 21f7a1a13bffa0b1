"""User-facing error types.

Every error a user can cause (a wrong path, a file that is not what it claims to be, a class count that
does not match) is raised as a subclass of :class:`WsiEspnetError` whose message says what is wrong,
what was expected and what to do. The CLI prints that message and exits with the class's exit code;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = [
    "Cancelled",
    "CheckpointError",
    "ConfigError",
    "InputError",
    "WsiEspnetError",
    "check_output_folder",
    "render_options",
]

# Library messages name an option by its Python parameter, as [[name]] or [[name=value]]; each front end
# spells it its own way (see render_options).
_OPTION = re.compile(r"\[\[([a-z][a-z0-9_]*)(?:=([^\]]+))?\]\]")


def _spell(match: re.Match[str], *, cli: bool) -> str:
    name, value = match[1], match[2]
    if not cli:
        return name if value is None else f"{name}={value}"
    flag = "--" + name.replace("_", "-")
    return flag if value in (None, "True") else f"{flag} {value}"


def render_options(text: str, *, cli: bool) -> str:
    """Spell ``text``'s options: ``[[mpp=0.25]]`` as ``--mpp 0.25`` (``cli``) or ``mpp=0.25``; ``[[overwrite=True]]``
    as ``--overwrite`` or ``overwrite=True``; ``[[out]]`` as ``--out`` or ``out``."""
    return _OPTION.sub(lambda match: _spell(match, cli=cli), text)


class WsiEspnetError(Exception):
    """Base class of errors caused by the user's input, not by a bug.

    Messages name options as ``[[name]]`` or ``[[name=value]]``: ``str(error)`` spells them as Python
    parameters, :meth:`cli_message` as the command line's flags (see :func:`render_options`).
    """

    exit_code: int = 2

    def __str__(self) -> str:
        return render_options(super().__str__(), cli=False)

    def cli_message(self) -> str:
        return render_options(super().__str__(), cli=True)


class InputError(WsiEspnetError, ValueError):
    """An argument or input file is missing, unreadable or of the wrong kind."""


class ConfigError(WsiEspnetError, ValueError):
    """A model configuration is inconsistent or incomplete."""


class CheckpointError(WsiEspnetError):
    """A weights file is missing, corrupted or does not fit the model it is loaded into."""

    exit_code = 3


class Cancelled(WsiEspnetError):  # noqa: N818 -- not "CancelledError": asyncio and distributed have their own
    """The caller asked a run to stop; what it finished is kept, marked incomplete, and resumes on a rerun."""

    exit_code = 130


def check_output_folder(path: str | os.PathLike[str]) -> None:
    """Raise :class:`InputError` unless ``path``'s folder exists and ``path`` is not itself a folder."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"output {str(path)!r} is a folder; give a file name inside it.")
    if not path.parent.is_dir():
        raise InputError(f"output folder {str(path.parent)!r} does not exist; create it first.")
