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

import math
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import openslide
import tifffile
from numpy.typing import NDArray
from PIL import Image
from tiffslide import TiffSlide

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


def _check_tiff_complete(tiff: tifffile.TiffFile, file_size: int) -> None:
    """Raise :class:`DamagedFileError` unless every tile or strip of every page of every series ends within the file.

    Checked at open time so that a cut-off copy fails at once instead of midway through a slide.
    """
    if len(tiff.pages) == 0:
        raise DamagedFileError("it holds no readable image directory")
    for series in tiff.series:
        for level_index, level in enumerate(series.levels):
            for page in level.pages:
                if page is None:
                    continue
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                ends = (offsets + counts)[counts > 0]
                if ends.size and int(ends.max()) > file_size:
                    beyond = int(np.count_nonzero(ends > file_size))
                    raise DamagedFileError(
                        f"{beyond} of {ends.size} tiles/strips of level {level_index} of image {series.name!r} "
                        f"end beyond the file's {file_size} bytes (the last ends at byte {int(ends.max())})"
                    )


# --- tiffslide ----------------------------------------------------------------------------------


class TiffSlideBackend:
    """A TIFF-based slide read through tiffslide; windows go through its zarr store.

    ``is_flat`` is True for a single-level TIFF stored in strips: an ordinary image rather than a
    tiled slide pyramid, which reads far faster through :class:`ImageBackend`.
    """

    def __init__(self, path: Path) -> None:
        self._slide = TiffSlide(path)
        try:
            _check_tiff_complete(self.tiff, path.stat().st_size)
            with warnings.catch_warnings():
                # tiffslide says this for every NDPI file; it reads NDPI pixels, levels, MPP and
                # objective power correctly, which is all we use.
                warnings.filterwarnings(
                    "ignore", message="hamamatsu-format metadata parsing only partially", category=UserWarning
                )
                raw = self._slide.properties
            series = self.tiff.series[int(raw["tiffslide.series-index"])]
            keyframe = series.levels[0].keyframe
            self.is_flat = len(series.levels) == 1 and keyframe is not None and not keyframe.is_tiled
            self.metadata = self._describe(series, raw)
        except BaseException:
            self._slide.close()
            raise

    @property
    def tiff(self) -> tifffile.TiffFile:
        return self._slide.ts_tifffile

    def _describe(self, series: tifffile.TiffPageSeries, raw: Mapping[str, Any]) -> BackendMetadata:
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
            associated_images=tuple(self._slide.associated_images),
            properties=_as_strings(raw),
        )

    def read(self, level: int, top: int, left: int, height: int, width: int) -> NDArray[np.uint8]:
        # tiffslide takes OpenSlide's level-0 (x, y) and maps it back with int(x / downsample); pick
        # the level-0 coordinate that lands exactly on (top, left) even for non-integer downsamples.
        downsample = self._slide.level_downsamples[level]
        x, y = _level0_coordinate(left, downsample), _level0_coordinate(top, downsample)
        pixels = self._slide.read_region((x, y), level, (width, height), as_array=True, padding=False)
        return as_rgb(np.asarray(pixels))

    def read_associated(self, name: str) -> NDArray[np.uint8]:
        return as_rgb(np.asarray(self._slide.associated_images[name]))

    def close(self) -> None:
        self._slide.close()


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
        )

    def _read_header(self) -> tuple[int, int, tuple[float, float] | None, dict[str, str]]:
        if self._is_tiff:
            with tifffile.TiffFile(self._path) as tiff:
                _check_tiff_complete(tiff, self._path.stat().st_size)
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
