"""Progress as events: the engine says how far it is; the CLI, napari and batch jobs draw their own bars."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from wsi_espnet.errors import Cancelled

__all__ = ["STAGES", "ProgressCallback", "ProgressEvent", "Stage", "check_cancelled"]

Stage = Literal["planning", "tiles", "pyramid", "writing"]
#: The stages of a run, in order.
STAGES: tuple[Stage, ...] = ("planning", "tiles", "pyramid", "writing")


@dataclass(frozen=True)
class ProgressEvent:
    """How far one slide's run is.

    slide : the slide's file name.
    stage : what is being done now (see :data:`STAGES`).
    done, total : units of the stage finished and in all (tiles for ``"tiles"``; 0/1 or steps otherwise).
    detail : a short human note, e.g. ``"23% tissue"``.
    """

    slide: str
    stage: Stage
    done: int
    total: int
    detail: str = ""


ProgressCallback = Callable[[ProgressEvent], None]


def check_cancelled(cancel: threading.Event | None, slide: str) -> None:
    """Raise :class:`~wsi_espnet.errors.Cancelled` when ``cancel`` is set."""
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"segmentation of {slide} was cancelled; run it again to resume from the finished tiles.")
