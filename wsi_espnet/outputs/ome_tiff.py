"""Pyramidal OME-TIFF of the mask that OME readers, tiffslide and OpenSlide all open as a pyramid.

Layout (BigTIFF; every image tiled, compressed, 8-bit palette)::

    IFD 0        level 0, OME-XML in ImageDescription, SubIFDs -> levels 1..n-1
    IFD 1..n-1   levels 1..n-1 again, NewSubfileType = reduced resolution

OME-TIFF keeps a pyramid in SubIFDs (as tifffile and tiffslide read it, and Bio-Formats, which
QuPath uses, per the OME-TIFF specification), but OpenSlide's generic-TIFF driver only follows the
main IFD chain. Writing the reduced levels in both
places satisfies both; the OME-XML references IFD 0 only, so OME readers ignore the copies. The cost
is the reduced levels stored twice: at most a third more than level 0 alone, little for label masks,
which compress by orders of magnitude.

Pixels are the mask values (see :mod:`wsi_espnet.segmentation.label_values`), stored as a palette image
whose colour map holds the class colours (values without a class keep a grey ramp), so viewers
show class colours while the values stay intact: tiffslide and tifffile return the values,
OpenSlide (which renders to RGBA) returns each class's colour. Pixel size is written twice: as
OME-XML ``PhysicalSizeX/Y`` in micrometres and as TIFF ``X/YResolution`` in pixels per centimetre
on every level (what non-OME readers, OpenSlide and tiffslide included, use). Class names and
colours are also in two OME-XML ``MapAnnotation``s keyed by mask value.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import zarr
from numpy.typing import NDArray

from wsi_espnet import __version__
from wsi_espnet.atomic_files import replacing
from wsi_espnet.errors import InputError
from wsi_espnet.segmentation.label_values import LabelClass, check_label_classes

__all__ = ["COMPRESSIONS", "write_ome_tiff"]

#: Tile compressions that tifffile, tiffslide and OpenSlide all decode.
COMPRESSIONS = ("zlib", "zstd", "lzw", "packbits", "none")

_MICROMETRES_PER_CENTIMETRE = 10_000.0


def write_ome_tiff(
    levels: Sequence[zarr.Array[Any] | NDArray[np.uint8]],
    path: Path,
    *,
    mpp: float,
    classes: Sequence[LabelClass],
    tile: int = 512,
    compression: str = "zlib",
) -> Path:
    """Write mask levels as a tiled, compressed, pyramidal OME-TIFF and return ``path``.

    Parameters
    ----------
    levels : sequence of (H_i, W_i) uint8 arrays (zarr or numpy)
        Level 0 first; each next level halves the previous one (``floor`` or ``ceil`` of half).
        Read one band of ``tile`` rows at a time, never whole.
    path : Path
        Output file, conventionally ``*.ome.tif``. Written under a temporary name in the same
        folder and renamed when complete, so ``path`` never holds a partial file.
    mpp : float
        Level-0 pixel size in micrometres; level ``i`` is written with ``mpp * 2**i``.
    classes : sequence of LabelClass
        Names and colours of the mask values (0-255).
    tile : int
        Tile side in pixels, a multiple of 16.
    compression : str
        One of :data:`COMPRESSIONS`.
    """
    path = Path(path)
    _check_arguments(levels, path, mpp=mpp, tile=tile, compression=compression)
    check_label_classes(classes, np.dtype(np.uint8))

    height, width = levels[0].shape
    colormap = np.tile(np.arange(256, dtype=np.uint16) * 257, (3, 1))
    for label in classes:
        colormap[:, label.value] = np.array(label.color, dtype=np.uint16) * 257
    options: dict[str, Any] = {
        "tile": (tile, tile),
        "compression": None if compression == "none" else compression,
        "photometric": "palette",
        "colormap": colormap,
        "resolutionunit": "CENTIMETER",
        "metadata": None,  # the OME-XML below is the only description
        "software": f"wsi-espnet {__version__}",
    }

    def write_level(tiff: tifffile.TiffWriter, index: int, **extra: Any) -> None:
        level = levels[index]
        pixels_per_cm = _MICROMETRES_PER_CENTIMETRE / (mpp * 2**index)
        tiff.write(
            _tiles(level, tile),
            shape=level.shape,
            dtype=np.uint8,
            resolution=(pixels_per_cm, pixels_per_cm),
            subfiletype=0 if index == 0 else 1,
            **options,
            **extra,
        )

    with replacing(path) as partial, tifffile.TiffWriter(partial, bigtiff=True, ome=False) as tiff:
        omexml = _ome_xml(height, width, mpp=mpp, classes=classes, name=path.name)
        write_level(tiff, 0, subifds=len(levels) - 1, description=omexml.encode())
        for index in range(1, len(levels)):  # SubIFDs of IFD 0, for OME readers
            write_level(tiff, index)
        for index in range(1, len(levels)):  # main IFD chain, for OpenSlide
            write_level(tiff, index)
    return path


def _tiles(level: zarr.Array[Any] | NDArray[np.uint8], tile: int) -> Iterator[NDArray[np.uint8]]:
    """Row-major ``(tile, tile)`` tiles (smaller at the right and bottom edges), one band in memory."""
    rows, cols = level.shape
    for top in range(0, rows, tile):
        band = np.asarray(level[top : top + tile, :])
        for left in range(0, cols, tile):
            yield band[:, left : left + tile]


def _ome_xml(height: int, width: int, *, mpp: float, classes: Sequence[LabelClass], name: str) -> str:
    omexml = tifffile.OmeXml(Creator=f"wsi-espnet {__version__}")
    omexml.addimage(
        dtype=np.uint8,
        shape=(height, width),
        storedshape=(1, 1, 1, height, width, 1),
        axes="YX",
        Name=name,
        Description="Tissue class mask: each pixel value is a class (0 = no tissue); reduced levels in SubIFDs.",
        PhysicalSizeX=mpp,
        PhysicalSizeXUnit="µm",
        PhysicalSizeY=mpp,
        PhysicalSizeYUnit="µm",
        Channel={"Name": "tissue class"},
        MapAnnotation=[
            {
                "Namespace": "wsi-espnet/class-names",
                "Description": "mask value -> tissue class name",
                "Value": {str(c.value): c.name for c in classes},
            },
            {
                "Namespace": "wsi-espnet/class-colors",
                "Description": "mask value -> display colour, as in the TIFF colour map",
                "Value": {str(c.value): "#{:02X}{:02X}{:02X}".format(*c.color) for c in classes},
            },
        ],
    )
    return omexml.tostring(declaration=True)


def _check_arguments(
    levels: Sequence[zarr.Array[Any] | NDArray[np.uint8]], path: Path, *, mpp: float, tile: int, compression: str
) -> None:
    if not levels:
        raise InputError("levels is empty; pass at least the full-resolution mask.")
    previous: tuple[int, ...] | None = None
    for index, level in enumerate(levels):
        if not isinstance(level, np.ndarray | zarr.Array) or level.ndim != 2 or level.dtype != np.uint8:
            got = f"{level.dtype} array of shape {level.shape}" if hasattr(level, "dtype") else type(level).__name__
            raise InputError(f"level {index} must be a 2-D uint8 mask (zarr or numpy), got a {got}.")
        if previous is not None and not all(
            before // 2 <= side <= -(-before // 2) for side, before in zip(level.shape, previous, strict=True)
        ):
            raise InputError(
                f"level {index} has shape {level.shape} but must be half of level {index - 1} {previous}; "
                "pass a 2x pyramid such as build_label_pyramid's."
            )
        previous = level.shape
    if not isinstance(mpp, int | float) or not math.isfinite(mpp) or mpp <= 0:
        raise InputError(f"mpp={mpp!r} must be a positive number of micrometres per level-0 pixel.")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 16 or tile % 16:
        raise InputError(f"tile={tile!r} must be a positive multiple of 16 (TIFF tiles), e.g. 512.")
    if compression not in COMPRESSIONS:
        raise InputError(f"compression={compression!r} is not supported; choose one of {', '.join(COMPRESSIONS)}.")
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: folder {path.parent} does not exist.")
