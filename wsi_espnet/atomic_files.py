"""Files that appear complete or not at all."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from wsi_espnet.errors import InputError

__all__ = ["replacing", "write_atomically"]


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it over ``path`` on success, delete it on failure.

    Writers write to the yielded path, so a crash, a full disk or an exception never leaves a
    half-written file under the final name, and an existing file there survives until the new one is whole.
    """
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        yield partial
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write(partial)`` under :func:`replacing`; an ``OSError`` (full disk, no permission) becomes an InputError."""
    try:
        with replacing(path) as partial:
            write(partial)
    except OSError as exc:
        raise InputError(
            f"cannot write {str(path)!r}: {exc.strerror or exc}; choose a folder you can write to with free space."
        ) from exc
