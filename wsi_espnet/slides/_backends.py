"""The three pixel sources behind :class:`~wsi_espnet.slides.reader.SlideReader`.

Each backend opens one file, reports its metadata once, and reads windows that lie entirely inside
a level, in that level's (row, col) pixels. Padding, validation and user-facing messages live in
:mod:`wsi_espnet.slides.reader`; here library exceptions are left to propagate, besides
:class:`DamagedFileError` (data missing from the file) and :class:`UnsupportedSlideError` (a
readable file that cannot serve as an 8-bit RGB slide).

- :class:`TiffSlideBackend`: pyramidal TIFF family (Aperio, Hamamatsu NDPI, Leica, Ventana, generic)
  through tiffslide/tifffile.
- :class:`OpenSlideBackend`: what tiffslide cannot read (DICOM WSI, MIRAX, VMS, ...), through OpenSlide.
- :class:`ImageBackend`: a flat PNG/JPEG/strip TIFF that fits in memory, decoded once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import openslide
import tifffile
from numpy.typing import NDArray
from PIL import Image
from tiffslide import TiffSlide
from zarr.core import sync as zarr_sync

__all__ = [
    "BACKEND_ERRORS",
    "MAX_IN_MEMORY_PIXELS",
    "Backend",
    "BackendMetadata",
    "DamagedFileError",
    "ImageBackend",
    "OpenSlideBackend",
    "TiffSlideBackend",
    "UnsupportedSlideError",
    "as_rgb",
    "find_dicom_instance",
]

#: Largest image decoded whole into memory (768 MiB as RGB uint8).
MAX_IN_MEMORY_PIXELS = 2**28

#: What the backends raise for unreadable or damaged data (as opposed to bugs such as TypeError).
BACKEND_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, RuntimeError, LookupError, openslide.OpenSlideError)

# Metre-based TIFF resolution units -> micrometres per unit. Inch units are left out on purpose:
# image software writes 72/96/300 dpi by default and no slide scanner relies on them (OpenSlide
# ignores them for generic TIFF too).
_MICROMETRES_PER_UNIT: dict[int, float] = {
    tifffile.RESUNIT.CENTIMETER: 1e4,
    tifffile.RESUNIT.MILLIMETER: 1e3,
    tifffile.RESUNIT.MICROMETER: 1.0,
}


class UnsupportedSlideError(ValueError):
    """A file the backend can parse but cannot serve as an 8-bit RGB slide (the message says why)."""


class DamagedFileError(ValueError):
    """Image data the file's own directory points to is missing: a truncated or corrupted copy."""


@dataclass(frozen=True)
class BackendMetadata:
    """What a backend knows about its slide; shapes are (H, W) in pixels, level 0 first."""

    level_shapes: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp_xy: tuple[float, float] | None  # micrometres per level-0 pixel along x (columns) and y (rows)
    objective_power: float | None
    vendor: str | None
    associated_images: tuple[str, ...]
    properties: Mapping[str, str]
    damage: tuple[str, ...] = ()  # damage that spares the pyramid levels: a truncated tail, lost associated images


class Backend(Protocol):
    metadata: BackendMetadata

    def read(self, level: int, top: int, left: int, height: int, width: int) -> NDArray[np.uint8]:
        """``(height, width, 3)`` uint8 RGB; the window must lie inside the level."""
        ...

    def read_associated(self, name: str) -> NDArray[np.uint8]: ...

    def close(self) -> None: ...


def as_rgb(pixels: NDArray[Any]) -> NDArray[np.uint8]:
    """``(H, W)`` or ``(H, W, 1|2|3|4)`` uint8 -> ``(H, W, 3)`` uint8 RGB, alpha composited onto white."""
    if pixels.dtype != np.uint8:
        raise UnsupportedSlideError(f"pixels are {pixels.dtype}, but only 8-bit images are supported")
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    channels = pixels.shape[2]
    if channels not in (1, 2, 3, 4):
        raise UnsupportedSlideError(f"pixels have {channels} channels; expected gray, gray+alpha, RGB or RGBA")
    colour = pixels[:, :, :-1] if channels in (2, 4) else pixels
    if colour.shape[2] == 1:
        colour = np.repeat(colour, 3, axis=2)
    if channels in (1, 3):
        return np.ascontiguousarray(colour)
    alpha = pixels[:, :, -1:].astype(np.uint32)
    blended = (colour.astype(np.uint32) * alpha + 255 * (255 - alpha) + 127) // 255
    return blended.astype(np.uint8)


def _positive_float(value: object) -> float | None:
    if not isinstance(value, int | float | str) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number > 0 else None


def _mpp_pair(mpp_x: object, mpp_y: object) -> tuple[float, float] | None:
    x, y = _positive_float(mpp_x), _positive_float(mpp_y)
    if x is not None and y is not None:
        return (x, y)
    known = x if x is not None else y
    return None if known is None else (known, known)


def _as_strings(properties: Mapping[str, object]) -> dict[str, str]:
    return {key: str(value) for key, value in properties.items() if value is not None}


# --- TIFF integrity ---------------------------------------------------------------------------


class _TifffileMessages(logging.Filter):
    """Collects what tifffile logs while this thread opens a file, instead of letting it reach stderr.

    tifffile reports a broken directory chain or an odd series only through its logger; the backend
    turns those reports into its own warnings and errors, which name the file and say what to do.
    Installed once on the ``tifffile`` logger; other threads' messages pass through untouched.
    """

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        sink: list[str] | None = getattr(self._local, "sink", None)
        if sink is None:
            return True
        sink.append(record.getMessage())
        return False

    @contextlib.contextmanager
    def collect(self) -> Iterator[list[str]]:
        previous = getattr(self._local, "sink", None)
        sink: list[str] = []
        self._local.sink = sink
        try:
            yield sink
        finally:
            self._local.sink = previous


_TIFFFILE_MESSAGES = _TifffileMessages()
logging.getLogger("tifffile").addFilter(_TIFFFILE_MESSAGES)


def _chunk_ends(page: tifffile.TiffPage) -> NDArray[np.int64]:
    """Byte just past each tile or strip of ``page`` that holds data (omitted ones have no bytes)."""
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    counts = np.asarray(page.databytecounts, dtype=np.int64)
    return (offsets + counts)[counts > 0]


def _check_pyramid_page(page: tifffile.TiffPage, level: int, file_size: int) -> None:
    """Raise :class:`DamagedFileError` unless the tile table of ``page`` backs the size it declares."""
    height, width = page.imagelength, page.imagewidth
    expected, listed = math.prod(page.chunked), len(page.dataoffsets)
    if listed != expected:
        raise DamagedFileError(
            f"level {level} declares {width:,} x {height:,} pixels in {page.chunks[1]} x {page.chunks[0]} tiles, "
            f"which takes {expected:,} tiles, but its tile table lists {listed:,}"
        )
    ends = _chunk_ends(page)
    if ends.size == 0:
        raise DamagedFileError(f"level {level} declares {width:,} x {height:,} pixels but none of its tiles hold data")
    beyond = int(np.count_nonzero(ends > file_size))
    if beyond:
        raise DamagedFileError(
            f"{beyond} of {ends.size} tiles of level {level} end beyond the file's {file_size:,} bytes "
            f"(the last ends at byte {int(ends.max()):,})"
        )


def _check_has_pages(tiff: tifffile.TiffFile, file_size: int, messages: list[str]) -> None:
    if len(tiff.pages):
        return
    for message in messages:
        match = re.search(r"invalid offset to first page (\d+)", message)
        if match:
            raise DamagedFileError(
                f"it is {file_size:,} bytes long but its first image directory is at byte {int(match.group(1)):,}"
            )
    raise DamagedFileError("it holds no readable image directory")


def _inspect_tiff(
    tiff: tifffile.TiffFile, pyramid: tifffile.TiffPageSeries, file_size: int, messages: list[str]
) -> tuple[tuple[str, ...], frozenset[str]]:
    """Check a TIFF slide's structure before any pixel is read.

    Raises :class:`DamagedFileError` when a pyramid level cannot be read whole: a tile table that
    cannot hold the size the level declares (tiles missing or absurd dimensions), no tile data at all,
    or tiles ending past the file's end. Scanners may omit empty tiles, so a level with some tiles
    absent still opens. Damage that spares the pyramid (a cut-off directory chain, associated images
    whose data is gone) is returned as warnings with the names of the unreadable associated images.
    """
    _check_has_pages(tiff, file_size, messages)
    for level, series_level in enumerate(pyramid.levels):
        for page in series_level.pages:
            if isinstance(page, tifffile.TiffPage):
                _check_pyramid_page(page, level, file_size)
    warnings_: list[str] = []
    for message in messages:
        match = re.search(r"invalid page offset (\d+)", message)
        if match:
            warnings_.append(
                f"the file is truncated: it is {file_size:,} bytes long but its directory chain continues at byte "
                f"{int(match.group(1)):,}, so the images stored after that (smaller pyramid levels or associated "
                "images) are missing. The pyramid levels listed are intact and are used"
            )
    unreadable: set[str] = set()
    for series in tiff.series:
        if series is pyramid:
            continue
        for page in series.pages:
            if isinstance(page, tifffile.TiffPage) and np.any(_chunk_ends(page) > file_size):
                unreadable.add(series.name.lower())
    if unreadable:
        warnings_.append(
            f"the data of the associated image(s) {', '.join(sorted(unreadable))} ends past the file's end; they "
            "are left out (the file is probably truncated)"
        )
    return tuple(warnings_), frozenset(unreadable)


# --- tiffslide ----------------------------------------------------------------------------------


class TiffSlideBackend:
    """A TIFF-based slide read through tiffslide; windows go through its zarr store.

    ``is_flat`` is True for a single-level TIFF stored in strips: an ordinary image rather than a
    tiled slide pyramid, which reads far faster through :class:`ImageBackend`.
    """

    def __init__(self, path: Path) -> None:
        with _TIFFFILE_MESSAGES.collect() as messages:
            self._slide = TiffSlide(path)
            try:
                _check_has_pages(self.tiff, path.stat().st_size, messages)
                raw = _tiffslide_properties(self._slide)
                series = self.tiff.series[int(raw["tiffslide.series-index"])]
                damage, unreadable = _inspect_tiff(self.tiff, series, path.stat().st_size, messages)
                keyframe = series.levels[0].keyframe
                self.is_flat = len(series.levels) == 1 and keyframe is not None and not keyframe.is_tiled
                self.metadata = self._describe(series, raw, damage, unreadable)
            except BaseException:
                self._slide.close()
                raise

    @property
    def tiff(self) -> tifffile.TiffFile:
        return self._slide.ts_tifffile

    def _describe(
        self,
        series: tifffile.TiffPageSeries,
        raw: Mapping[str, Any],
        damage: tuple[str, ...],
        unreadable: frozenset[str],
    ) -> BackendMetadata:
        axes = str(raw["tiffslide.series-axes"])
        channels = 1 if axes == "YX" else int(series.shape[axes.index("C" if "C" in axes else "S")])
        if series.dtype != np.uint8 or channels not in (1, 2, 3, 4):
            raise UnsupportedSlideError(
                f"its image is {series.dtype} with {channels} channels (axes {axes}); only 8-bit gray, RGB or "
                "RGBA slides are supported (multiplexed fluorescence needs channels mapped to RGB first)"
            )
        mpp_xy = _mpp_pair(raw.get("tiffslide.mpp-x"), raw.get("tiffslide.mpp-y"))
        if str(raw.get("tiff.ResolutionUnit", "")).upper() == "INCH":
            mpp_xy = None  # recovered from a dpi tag, see _MICROMETRES_PER_UNIT
        return BackendMetadata(
            level_shapes=tuple((int(h), int(w)) for w, h in self._slide.level_dimensions),
            level_downsamples=tuple(float(d) for d in self._slide.level_downsamples),
            mpp_xy=mpp_xy,
            objective_power=_positive_float(raw.get("tiffslide.objective-power")),
            vendor=raw.get("tiffslide.vendor") or None,
            associated_images=tuple(name for name in self._slide.associated_images if name not in unreadable),
            properties=_as_strings(raw),
            damage=damage,
        )

    def read(self, level: int, top: int, left: int, height: int, width: int) -> NDArray[np.uint8]:
        # tiffslide takes OpenSlide's level-0 (x, y) and maps it back with int(x / downsample); pick
        # the level-0 coordinate that lands exactly on (top, left) even for non-integer downsamples.
        downsample = self._slide.level_downsamples[level]
        x, y = _level0_coordinate(left, downsample), _level0_coordinate(top, downsample)
        try:
            pixels = self._slide.read_region((x, y), level, (width, height), as_array=True, padding=False)
        except BaseException:
            _settle_zarr_io()
            raise
        return as_rgb(np.asarray(pixels))

    def read_associated(self, name: str) -> NDArray[np.uint8]:
        return as_rgb(np.asarray(self._slide.associated_images[name]))

    def close(self) -> None:
        self._slide.close()


def _tiffslide_properties(slide: TiffSlide, attempts: int = 3) -> Mapping[str, Any]:
    """tiffslide's properties, without the notice it gives for every NDPI file.

    tiffslide reads NDPI pixels, levels, MPP and objective power correctly, which is all we use. The
    warnings filters are process-wide and ``catch_warnings`` is not thread-safe: another thread's
    ``catch_warnings`` (a library's, on a Dask worker) can drop ours or briefly turn warnings into
    errors, so a notice that arrives as an exception is retried (the properties are parsed anew).
    """
    for _ in range(attempts - 1):
        with contextlib.suppress(UserWarning):
            return _properties_without_ndpi_notice(slide)
    return _properties_without_ndpi_notice(slide)


def _properties_without_ndpi_notice(slide: TiffSlide) -> Mapping[str, Any]:
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="hamamatsu-format metadata parsing only partially", category=UserWarning
        )
        return slide.properties


def _settle_zarr_io(timeout: float = 10.0) -> None:
    """Wait until zarr's I/O loop has finished the chunk reads of a read that failed.

    tiffslide reads through zarr, which decodes a window's tiles concurrently; when one tile fails,
    the read raises at once while its sibling tasks are still running. Closing the file under them,
    or exiting, then prints tracebacks and "Task was destroyed but it is pending!" for each.
    """

    async def settle() -> None:
        current = asyncio.current_task()
        pending = [task for task in asyncio.all_tasks() if task is not current]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    with contextlib.suppress(Exception):
        zarr_sync.sync(settle())


def _level0_coordinate(level_coordinate: int, downsample: float) -> int:
    """Smallest level-0 coordinate ``c`` with ``int(c / downsample) == level_coordinate``."""
    candidate = math.ceil(level_coordinate * downsample)
    while candidate > 0 and int((candidate - 1) / downsample) == level_coordinate:
        candidate -= 1
    while int(candidate / downsample) < level_coordinate:
        candidate += 1
    return candidate


# --- OpenSlide ----------------------------------------------------------------------------------


def find_dicom_instance(folder: Path) -> Path | None:
    """One file of ``folder`` that OpenSlide recognises as DICOM (it then finds the rest of the series)."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    files.sort(key=lambda p: p.suffix.lower() != ".dcm")  # try *.dcm first; DICOM files may lack a suffix
    for file in files:
        try:
            if openslide.OpenSlide.detect_format(file) == "dicom":
                return file
        except openslide.OpenSlideError:
            continue
    return None


class OpenSlideBackend:
    """A slide read through OpenSlide. OpenSlide handles are safe to share between threads."""

    def __init__(self, path: Path) -> None:
        target = path
        if path.is_dir():
            instance = find_dicom_instance(path)
            if instance is None:
                raise UnsupportedSlideError("the folder holds no file that OpenSlide recognises as DICOM")
            target = instance
        self._slide = openslide.OpenSlide(target)
        try:
            self.metadata = self._describe()
        except BaseException:
            self._slide.close()
            raise

    def _describe(self) -> BackendMetadata:
        raw = self._slide.properties
        return BackendMetadata(
            level_shapes=tuple((int(h), int(w)) for w, h in self._slide.level_dimensions),
            level_downsamples=tuple(float(d) for d in self._slide.level_downsamples),
            mpp_xy=_mpp_pair(raw.get(openslide.PROPERTY_NAME_MPP_X), raw.get(openslide.PROPERTY_NAME_MPP_Y)),
            objective_power=_positive_float(raw.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)),
            vendor=raw.get(openslide.PROPERTY_NAME_VENDOR) or None,
            associated_images=tuple(self._slide.associated_images),
            properties=dict(raw),
        )

    def read(self, level: int, top: int, left: int, height: int, width: int) -> NDArray[np.uint8]:
        # OpenSlide divides level-0 (x, y) by the downsample in floating point; exact for integer
        # downsamples, within a fraction of a pixel otherwise.
        downsample = self._slide.level_downsamples[level]
        location = (round(left * downsample), round(top * downsample))
        return as_rgb(np.asarray(self._slide.read_region(location, level, (width, height))))

    def read_associated(self, name: str) -> NDArray[np.uint8]:
        return as_rgb(np.asarray(self._slide.associated_images[name]))

    def close(self) -> None:
        self._slide.close()


# --- flat images ---------------------------------------------------------------------------------


class ImageBackend:
    """A single-level PNG, JPEG or strip TIFF; the header is read at open, the pixels on first use."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._pixels: NDArray[np.uint8] | None = None
        self._lock = threading.Lock()
        self._is_tiff = path.suffix.lower() in (".tif", ".tiff") or _starts_like_tiff(path)
        self._damage: tuple[str, ...] = ()
        height, width, mpp_xy, properties = self._read_header()
        if height * width > MAX_IN_MEMORY_PIXELS:
            raise UnsupportedSlideError(
                f"it is a flat (untiled, single-level) image of {width} x {height} = {height * width:,} pixels, "
                f"more than the {MAX_IN_MEMORY_PIXELS:,} that are decoded whole into memory"
            )
        self.metadata = BackendMetadata(
            level_shapes=((height, width),),
            level_downsamples=(1.0,),
            mpp_xy=mpp_xy,
            objective_power=None,
            vendor=None,
            associated_images=(),
            properties=properties,
            damage=self._damage,
        )

    def _read_header(self) -> tuple[int, int, tuple[float, float] | None, dict[str, str]]:
        if self._is_tiff:
            with _TIFFFILE_MESSAGES.collect() as messages, tifffile.TiffFile(self._path) as tiff:
                self._damage, _ = _inspect_tiff(tiff, tiff.series[0], self._path.stat().st_size, messages)
                page = tiff.pages.first
                properties = {"image.format": "TIFF", "tiff.ImageDescription": page.description}
                return page.imagelength, page.imagewidth, _tiff_mpp(page), properties
        try:
            with Image.open(self._path) as image:
                width, height = image.size
                return height, width, None, {"image.format": str(image.format)}
        except Image.DecompressionBombError as exc:
            raise UnsupportedSlideError(f"Pillow refuses to open an image this large ({exc})") from exc

    def _decode(self) -> NDArray[np.uint8]:
        if self._is_tiff:
            with tifffile.TiffFile(self._path) as tiff:
                series = tiff.series[0]
                pixels = series.asarray()
                if series.axes.startswith("S"):  # planar RGB
                    pixels = np.moveaxis(pixels, 0, -1)
            return as_rgb(pixels)
        with Image.open(self._path) as image:
            has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            return as_rgb(np.asarray(image.convert("RGBA" if has_alpha else "RGB")))

    def _image(self) -> NDArray[np.uint8]:
        with self._lock:
            if self._pixels is None:
                self._pixels = self._decode()
            return self._pixels

    def read(self, level: int, top: int, left: int, height: int, width: int) -> NDArray[np.uint8]:
        return self._image()[top : top + height, left : left + width].copy()

    def read_associated(self, name: str) -> NDArray[np.uint8]:
        raise KeyError(name)

    def close(self) -> None:
        with self._lock:
            self._pixels = None


def _starts_like_tiff(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _tiff_mpp(page: tifffile.TiffPage) -> tuple[float, float] | None:
    scale = _MICROMETRES_PER_UNIT.get(page.resolutionunit)
    if scale is None:
        return None
    x_resolution, y_resolution = page.get_resolution()
    return _mpp_pair(scale / x_resolution if x_resolution else None, scale / y_resolution if y_resolution else None)
