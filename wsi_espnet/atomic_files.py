"""Files that appear complete or not at all."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["replacing"]


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
