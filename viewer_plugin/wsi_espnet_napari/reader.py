"""napari readers: a whole-slide image (any file or DICOM folder our slide reader opens) as a lazy
multiscale image plus the masks found beside it, or one of our masks as Labels.

:func:`get_reader` returns None for anything else, so napari's other readers (napari-ome-zarr,
the builtins) get every ``.zarr`` folder and ``.tif`` that is not ours.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from wsi_espnet.errors import WsiEspnetError
from wsi_espnet.outputs.label_pyramid import is_label_pyramid
from wsi_espnet.slides import can_open
from wsi_espnet_napari.layers import LayerData, labels_layer, read_outputs_beside, slide_layer

__all__ = ["get_reader", "read_mask", "read_slide"]

Reader = Callable[[str | list[str]], list[LayerData]]
#: Paths our slide reader could open but napari's own readers show as well as we would.
_NOT_OURS = frozenset({".zarr", ".png", ".jpg", ".jpeg"})


def get_reader(path: str | list[str]) -> Reader | None:
    """napari's reader hook: a reader for ``path`` when it is a mask of ours or a slide, else None."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    target = Path(path)
    if is_label_pyramid(target):
        return read_mask
    if target.suffix.lower() in _NOT_OURS:  # other zarr stores, flat images: napari-ome-zarr's and the builtins'
        return None
    if can_open(target):
        return read_slide
    return None


def read_slide(path: str | list[str]) -> list[LayerData]:
    """The slide, then any mask of ours beside it (so opening a segmented slide shows its mask)."""
    source = _one(path)
    try:
        slide = slide_layer(source)
    except WsiEspnetError as exc:  # a damaged file: napari shows the message, not a traceback
        raise ValueError(exc.cli_message()) from exc
    return [slide, *read_outputs_beside(source)]


def read_mask(path: str | list[str]) -> list[LayerData]:
    """One ``.mask.zarr`` / ``.mask.ome.tiff`` as a Labels layer."""
    try:
        return [labels_layer(_one(path))]
    except WsiEspnetError as exc:
        raise ValueError(exc.cli_message()) from exc


def _one(path: str | list[str]) -> str | os.PathLike[str]:
    return path[0] if isinstance(path, list) else path
