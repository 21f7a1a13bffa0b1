"""A whole pyramid level as a lazy Dask array, read chunk by chunk through a picklable reader."""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.delayed import delayed
from numpy.typing import NDArray

from wsi_espnet.slides.reader import SlideError, SlideReader

__all__ = ["slide_level_dask"]


def slide_level_dask(reader: SlideReader, level: int, *, chunk: int = 1024) -> da.Array:
    """Level ``level`` of ``reader``'s slide as an ``(H, W, 3)`` uint8 RGB Dask array.

    Each ``(chunk, chunk, 3)`` block (smaller at the right and bottom edges) is one
    :meth:`SlideReader.read_region` call. The reader enters the graph once, as its own key, so a
    distributed worker unpickles it, and opens the file, once rather than per block.
    """
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < reader.level_count:
        raise SlideError(f"level={level!r} out of range: {reader.path.name} has levels 0 to {reader.level_count - 1}.")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise SlideError(f"chunk={chunk!r} must be a positive number of pixels, e.g. 1024.")
    height, width = reader.level_shapes[level]
    chunks = (_sizes(height, chunk), _sizes(width, chunk), (3,))
    reader_key = delayed(reader, pure=True)
    array: da.Array = da.map_blocks(  # type: ignore[no-untyped-call]
        _read_block,
        reader_key,
        level=level,
        chunks=chunks,
        dtype=np.uint8,
        meta=np.empty((0, 0, 0), dtype=np.uint8),
        name=f"slide-level-{tokenize(reader, level, chunk)}",
    )
    return array


def _sizes(length: int, chunk: int) -> tuple[int, ...]:
    full, rest = divmod(length, chunk)
    return (chunk,) * full + ((rest,) if rest else ())


def _read_block(reader: SlideReader, *, level: int, block_info: dict[Any, Any]) -> NDArray[np.uint8]:
    (top, bottom), (left, right), _ = block_info[None]["array-location"]
    return reader.read_region(level, top, left, bottom - top, right - left)
