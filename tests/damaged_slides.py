"""A corpus of damaged slides, made from the real ones, for tests of what users feed us by mistake.

Each maker takes the real slide folder and a destination folder and writes one damaged file. The
damage is the kind copies really suffer: cut-off transfers, flipped or zeroed bytes inside a tile,
a directory that claims a size its tile table cannot hold, tile offsets pointing at the wrong bytes,
and files that are not slides at all.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

__all__ = ["DAMAGED_SLIDES", "make_damaged"]

CMU = "CMU-1-Small-Region.svs"
NDPI = "test3-DAPI-2-387.ndpi"

Maker = Callable[[Path, Path], Path]


def _truncated(fraction: float, name: str = CMU) -> Maker:
    def make(slides: Path, out: Path) -> Path:
        data = (slides / name).read_bytes()
        target = out / f"cut-{round(fraction * 100)}-{name}"
        target.write_bytes(data[: int(len(data) * fraction)])
        return target

    return make


def _tile(path: Path, page: int) -> tuple[int, int]:
    """(offset, byte count) of the middle tile of page ``page`` of ``path``."""
    with tifffile.TiffFile(path) as tiff:
        tiff_page = tiff.pages[page]
        index = len(tiff_page.dataoffsets) // 2
        return int(tiff_page.dataoffsets[index]), int(tiff_page.databytecounts[index])


def _edited(name: str, suffix: str, edit: Callable[[bytearray, Path], None]) -> Maker:
    def make(slides: Path, out: Path) -> Path:
        target = out / f"{suffix}-{name}"
        shutil.copyfile(slides / name, target)
        data = bytearray(target.read_bytes())
        edit(data, slides / name)
        target.write_bytes(bytes(data))
        return target

    return make


def _flip_tile_bytes(data: bytearray, original: Path) -> None:
    offset, count = _tile(original, 0)
    rng = random.Random(8)
    # Past the JPEG header, inside the entropy-coded scan data.
    for position in rng.sample(range(offset + count // 3, offset + count - 2), 64):
        data[position] ^= 0xFF


def _zero_tile(page: int) -> Callable[[bytearray, Path], None]:
    """Zero the middle tile of page ``page`` (a level that the tests' settings read)."""

    def edit(data: bytearray, original: Path) -> None:
        offset, count = _tile(original, page)
        data[offset : offset + count] = bytes(count)

    return edit


def _wrong_tile_offsets(data: bytearray, original: Path) -> None:
    """Every level-0 tile offset points 777 bytes late, into the middle of its own or the next tile."""
    with tifffile.TiffFile(original) as tiff:
        page = tiff.pages.first
        tag = page.tags["TileOffsets"]
        dtype = np.dtype({4: "<u4", 16: "<u8"}[tag.dtype])
        offsets = np.asarray(page.dataoffsets, dtype=np.int64) + 777
        data[tag.valueoffset : tag.valueoffset + offsets.size * dtype.itemsize] = offsets.astype(dtype).tobytes()


def _absurd_size(slides: Path, out: Path) -> Path:
    """A 7 KB tiled TIFF whose header claims 1,000,000 x 1,000,000 pixels (its tiles are not there)."""
    target = out / "absurd-size.tif"
    image = np.full((512, 512, 3), 200, dtype=np.uint8)
    tifffile.imwrite(
        target, image, tile=(256, 256), compression="jpeg", resolution=(2e4, 2e4), resolutionunit="CENTIMETER"
    )
    with tifffile.TiffFile(target, mode="r+b") as tiff:
        tiff.pages.first.tags["ImageWidth"].overwrite(1_000_000)
        tiff.pages.first.tags["ImageLength"].overwrite(1_000_000)
    return target


def _pyramid_with_zeroed_tile(slides: Path, out: Path) -> Path:
    """A three-level JPEG pyramid of the CMU tissue at 0.5 um/px whose level 1 has one zeroed tile.

    Tissue detection reads level 2, which is intact, so the damage is met only when the tiles of
    level 1 are read: inside a Dask task, as in the middle of a real run.
    """
    import tiffslide

    with tiffslide.TiffSlide(slides / CMU) as slide:
        pixels = np.asarray(slide.read_region((0, 0), 0, slide.dimensions, as_array=True))
    target = out / "pyramid-zeroed-level1.tif"
    with tifffile.TiffWriter(target) as tiff:
        for level in range(3):
            step = 2**level
            tiff.write(
                np.ascontiguousarray(pixels[::step, ::step]), tile=(256, 256), compression="jpeg",
                resolution=(2e4 / step, 2e4 / step), resolutionunit="CENTIMETER", subfiletype=int(level > 0),
            )  # fmt: skip
    data = bytearray(target.read_bytes())
    _zero_tile(1)(data, target)
    target.write_bytes(bytes(data))
    return target


def _png_renamed(slides: Path, out: Path) -> Path:
    target = out / "photo.svs"
    Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8)).save(target, format="PNG")
    return target


def _zero_bytes(slides: Path, out: Path) -> Path:
    target = out / "empty.svs"
    target.write_bytes(b"")
    return target


def _random_bytes(slides: Path, out: Path) -> Path:
    target = out / "noise.tif"
    target.write_bytes(random.Random(3).randbytes(200_000))
    return target


#: name -> maker. The names are what the tests and the closing note call each case.
DAMAGED_SLIDES: dict[str, Maker] = {
    "truncated-10%": _truncated(0.10),
    "truncated-50%": _truncated(0.50),
    "truncated-90%": _truncated(0.90),
    "truncated-99%": _truncated(0.99),
    "ndpi-truncated-90%": _truncated(0.90, NDPI),
    "flipped-bytes-in-a-tile": _edited(CMU, "flipped", _flip_tile_bytes),
    "zeroed-tile": _edited(CMU, "zeroed", _zero_tile(0)),
    "ndpi-zeroed-tile-in-level-3": _edited(NDPI, "zeroed", _zero_tile(3)),
    "pyramid-zeroed-tile-in-level-1": _pyramid_with_zeroed_tile,
    "absurd-declared-size": _absurd_size,
    "wrong-tile-offsets": _edited(CMU, "offsets", _wrong_tile_offsets),
    "png-renamed-svs": _png_renamed,
    "zero-bytes": _zero_bytes,
    "random-bytes": _random_bytes,
}


def make_damaged(name: str, slides: Path, out: Path) -> Path:
    """Write the damaged slide ``name`` (a key of :data:`DAMAGED_SLIDES`) into ``out``; returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    return DAMAGED_SLIDES[name](slides, out)
