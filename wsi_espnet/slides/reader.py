"""Open a whole-slide image and read windows of it as (row, col) RGB arrays.

:func:`open_slide` picks the backend (tiffslide for the TIFF family, OpenSlide for DICOM WSI, MIRAX
and whatever tiffslide cannot parse, an in-memory decoder for flat PNG/JPEG/strip TIFF) and turns
every problem a user can cause into a :class:`SlideError` that names the file. The returned
:class:`SlideReader` works in (row, col) pixels of a level; OpenSlide-style (x, y) level-0
coordinates exist only inside its backends. It pickles without its file handle, so Dask workers
reopen the file themselves.
"""

from __future__ import annotations

import math
import operator
import os
import threading
import weakref
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, get_args

import numpy as np
import openslide
import tifffile
from numpy.typing import NDArray
from PIL import UnidentifiedImageError

from wsi_espnet.errors import InputError
from wsi_espnet.slides._backends import (
    BACKEND_ERRORS,
    MAX_IN_MEMORY_PIXELS,
    Backend,
    BackendMetadata,
    DamagedFileError,
    ImageBackend,
    OpenSlideBackend,
    TiffSlideBackend,
    UnsupportedSlideError,
    find_dicom_instance,
)

__all__ = ["BackendName", "SlideError", "SlideReader", "can_open", "describe_slide", "open_slide"]

BackendName = Literal["tiffslide", "openslide", "image"]

TIFF_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".qptiff")
OPENSLIDE_SUFFIXES = (".dcm", ".mrxs", ".vms", ".vmu", ".svslide")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

SUPPORTED_FORMATS = (
    "TIFF-based slides (.svs .tif .tiff .ndpi .scn .bif .qptiff), a DICOM WSI folder or one of its .dcm files, "
    "MIRAX (.mrxs), Hamamatsu VMS (.vms .vmu), Sakura (.svslide), and flat PNG/JPEG images"
)
_RECOPY = "re-copy or re-download it and compare its size or checksum with the original"


class SlideError(InputError):
    """A slide file is missing, unreadable, damaged, or lacks what the requested operation needs."""


class SlideReader:
    """One whole-slide image, read window by window in (row, col) pixels of a pyramid level.

    Build it with :func:`open_slide`. Reads from several threads at once are safe; pickling keeps the
    path, backend and metadata and drops the open file, which is reopened on first use (also after
    :meth:`close`, and in a forked child).

    Attributes
    ----------
    path : the file (or DICOM folder) as given to :func:`open_slide`.
    backend : ``"tiffslide"``, ``"openslide"`` or ``"image"``.
    level_shapes : ``(height, width)`` in pixels per level, level 0 (full resolution) first.
    level_downsamples : level-0 pixels per level pixel (mean of the row and column factors).
    mpp : micrometres per level-0 pixel (mean of x and y); an ``mpp=`` override wins. None if unknown.
    mpp_source : ``"override"``, ``"metadata"`` or ``"none"``.
    """

    def __init__(
        self,
        path: Path,
        backend: BackendName,
        metadata: BackendMetadata,
        *,
        mpp_override: float | None = None,
        handle: Backend | None = None,
    ) -> None:
        self.path = path
        self.backend = backend
        self._metadata = metadata
        self._mpp_override = mpp_override
        self._lock = threading.Lock()
        self._handle: Backend | None = None
        self._handle_pid: int | None = None
        self._close_handle: weakref.finalize[[], SlideReader] | None = None
        if handle is not None:
            self._adopt(handle)

    # --- metadata ---------------------------------------------------------------------------------

    @property
    def level_count(self) -> int:
        return len(self._metadata.level_shapes)

    @property
    def level_shapes(self) -> tuple[tuple[int, int], ...]:
        return self._metadata.level_shapes

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._metadata.level_downsamples

    @property
    def mpp(self) -> float | None:
        if self._mpp_override is not None:
            return self._mpp_override
        if self._metadata.mpp_xy is None:
            return None
        return sum(self._metadata.mpp_xy) / 2

    @property
    def mpp_source(self) -> str:
        if self._mpp_override is not None:
            return "override"
        return "none" if self._metadata.mpp_xy is None else "metadata"

    @property
    def objective_power(self) -> float | None:
        return self._metadata.objective_power

    @property
    def vendor(self) -> str | None:
        return self._metadata.vendor

    @property
    def associated_images(self) -> tuple[str, ...]:
        return self._metadata.associated_images

    @property
    def damage(self) -> tuple[str, ...]:
        """Sentences on damage found at open time that spares the pyramid levels (e.g. a truncated tail)."""
        return self._metadata.damage

    @property
    def properties(self) -> dict[str, str]:
        """The raw metadata as the backend reports it (a copy)."""
        return dict(self._metadata.properties)

    def level_mpp(self, level: int) -> float | None:
        """Micrometres per pixel of ``level``, or None when the slide's MPP is unknown."""
        self._check_level(level)
        return None if self.mpp is None else self.mpp * self.level_downsamples[level]

    # --- pixels -----------------------------------------------------------------------------------

    def read_region(self, level: int, top: int, left: int, height: int, width: int) -> NDArray[np.uint8]:
        """Read a window of ``level`` as ``(height, width, 3)`` uint8 RGB.

        ``top``, ``left``, ``height`` and ``width`` are pixels of that level, (row, col) order. Any
        part outside the level is 255 (white, like glass), so windows may straddle or miss the edge.
        """
        self._check_level(level)
        top, left, height, width = (operator.index(v) for v in (top, left, height, width))
        if height < 0 or width < 0:
            raise SlideError(f"height={height}, width={width}: a window's size cannot be negative.")
        self._check_size(height, width, "window")
        level_height, level_width = self.level_shapes[level]
        row0, row1 = min(max(top, 0), level_height), min(max(top + height, 0), level_height)
        col0, col1 = min(max(left, 0), level_width), min(max(left + width, 0), level_width)
        if (row0, row1, col0, col1) == (top, top + height, left, left + width) and height and width:
            return self._read_inside(level, top, left, height, width)
        window = np.full((height, width, 3), 255, dtype=np.uint8)
        if row1 > row0 and col1 > col0:
            pixels = self._read_inside(level, row0, col0, row1 - row0, col1 - col0)
            window[row0 - top : row1 - top, col0 - left : col1 - left] = pixels
        return window

    def read_level(self, level: int) -> NDArray[np.uint8]:
        """The whole of ``level`` as ``(H, W, 3)`` uint8 RGB; refused above 2**28 pixels."""
        self._check_level(level)
        height, width = self.level_shapes[level]
        self._check_size(height, width, f"level {level}")
        return self.read_region(level, 0, 0, height, width)

    def read_associated(self, name: str) -> NDArray[np.uint8]:
        """An associated image (``"label"``, ``"macro"``, ``"thumbnail"``, ...) as ``(H, W, 3)`` uint8 RGB."""
        if name not in self.associated_images:
            available = ", ".join(repr(n) for n in self.associated_images) or "none"
            raise SlideError(f"{self.path} has no associated image {name!r}; it has: {available}.")
        handle = self._open_handle()
        try:
            return handle.read_associated(name)
        except BACKEND_ERRORS as exc:
            self._discard(handle)
            raise SlideError(f"could not read the associated image {name!r} of {self.path}: {exc}.") from exc

    def _read_inside(self, level: int, top: int, left: int, height: int, width: int) -> NDArray[np.uint8]:
        handle = self._open_handle()
        try:
            return handle.read(level, top, left, height, width)
        except BACKEND_ERRORS as exc:
            self._discard(handle)  # OpenSlide handles stay in an error state after a failed read
            raise SlideError(
                f"could not read level {level}, rows {top}:{top + height}, columns {left}:{left + width} of "
                f"{self.path} ({self.backend}): {exc}. The file is probably corrupted; {_RECOPY}."
            ) from exc

    def _check_level(self, level: int) -> None:
        if isinstance(level, bool) or not isinstance(level, int | np.integer) or not 0 <= level < self.level_count:
            raise SlideError(
                f"level={level!r} out of range: {self.path.name} has levels 0 to {self.level_count - 1} "
                f"(shapes {list(self.level_shapes)})."
            )

    def _check_size(self, height: int, width: int, what: str) -> None:
        if height * width > MAX_IN_MEMORY_PIXELS:
            raise SlideError(
                f"{what} of {self.path.name} is {height} x {width} = {height * width:,} pixels, more than the "
                f"{MAX_IN_MEMORY_PIXELS:,} read into memory at once; read it in windows with read_region or "
                "lazily with wsi_espnet.slides.slide_level_dask."
            )

    # --- the file handle --------------------------------------------------------------------------

    def _open_handle(self) -> Backend:
        with self._lock:
            if self._handle is None or self._handle_pid != os.getpid():
                stale = self._release()  # a forked child's copy of its parent's handle, or None
                if stale is not None:
                    stale()
                handle = _open_backend(self.path, self.backend)
                if handle.metadata.level_shapes != self.level_shapes:
                    handle.close()
                    raise SlideError(
                        f"{self.path} changed since it was opened: its levels are now "
                        f"{list(handle.metadata.level_shapes)}, were {list(self.level_shapes)}; open it again."
                    )
                self._adopt(handle)
                return handle
            return self._handle

    def _adopt(self, handle: Backend) -> None:
        self._handle, self._handle_pid = handle, os.getpid()
        # Readers that Dask workers unpickle are never closed explicitly: close their files when collected.
        self._close_handle = weakref.finalize(self, handle.close)

    def _release(self) -> weakref.finalize[[], SlideReader] | None:
        """Forget the handle (the caller holds the lock); returns what closes it."""
        close_handle = self._close_handle
        self._handle, self._handle_pid, self._close_handle = None, None, None
        return close_handle

    def _discard(self, handle: Backend) -> None:
        with self._lock:
            if self._handle is not handle:
                return  # already closed or replaced by another thread
            close_handle = self._release()
        if close_handle is not None:
            close_handle()

    def close(self) -> None:
        """Close the file; a later read reopens it."""
        with self._lock:
            close_handle = self._release()
        if close_handle is not None:
            close_handle()

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "backend": self.backend,
            "metadata": self._metadata,
            "mpp_override": self._mpp_override,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.backend = state["path"], state["backend"]
        self._metadata, self._mpp_override = state["metadata"], state["mpp_override"]
        self._lock = threading.Lock()
        self._handle, self._handle_pid, self._close_handle = None, None, None

    def __dask_tokenize__(self) -> tuple[object, ...]:
        # The file's size and modification time make a rewritten slide a new Dask key.
        try:
            stat = self.path.stat()
            version: tuple[int, int] | None = (stat.st_size, stat.st_mtime_ns)
        except OSError:
            version = None
        return ("wsi_espnet.SlideReader", str(self.path), self.backend, self._mpp_override, version)

    def __repr__(self) -> str:
        return (
            f"SlideReader({str(self.path)!r}, backend={self.backend!r}, level_shapes={list(self.level_shapes)}, "
            f"mpp={self.mpp})"
        )


def open_slide(
    path: str | os.PathLike[str],
    *,
    backend: Literal["auto", "tiffslide", "openslide", "image"] = "auto",
    mpp: float | None = None,
) -> SlideReader:
    """Open a whole-slide image (or a DICOM WSI folder) for reading.

    Parameters
    ----------
    path : the slide file, or the folder holding a DICOM WSI series.
    backend : ``"auto"`` picks by file type: tiffslide for TIFF-based slides (OpenSlide if tiffslide
        cannot parse the file), OpenSlide for DICOM, MIRAX, VMS and Sakura, and the in-memory
        ``"image"`` reader for PNG/JPEG and for flat, single-level strip TIFFs.
    mpp : micrometres per level-0 pixel, overriding (or standing in for) the file's metadata.

    Raises
    ------
    SlideError : the path is missing, of an unsupported type, truncated or otherwise unreadable.
    """
    path = Path(path)
    mpp = _validated_mpp(mpp, path)
    choices = ("auto", *get_args(BackendName))
    if backend not in choices:
        raise SlideError(f"backend={backend!r} is not one of {', '.join(repr(c) for c in choices)}; use 'auto'.")
    if not path.exists():
        raise SlideError(f"{path} does not exist; check the path (and that the drive or share is mounted).")
    if path.is_file() and path.stat().st_size == 0:
        raise SlideError(f"{path} is empty (0 bytes): the copy or download did not complete; {_RECOPY}.")
    name: BackendName
    if backend == "auto":
        name, handle = _open_auto(path)
    else:
        name = backend
        handle = _open_backend(path, name)
    return SlideReader(path, name, handle.metadata, mpp_override=mpp, handle=handle)


def _validated_mpp(mpp: object, path: Path) -> float | None:
    if mpp is None:
        return None
    value = float(mpp) if isinstance(mpp, int | float | np.floating) and not isinstance(mpp, bool) else math.nan
    if not (math.isfinite(value) and value > 0):
        raise SlideError(
            f"mpp={mpp!r} for {path.name} is not a positive number of micrometres per pixel; "
            "use e.g. 0.25 for a 40x scan or 0.5 for a 20x scan."
        )
    return value


def _open_auto(path: Path) -> tuple[BackendName, Backend]:
    suffix = path.suffix.lower()
    if path.is_dir() or suffix in OPENSLIDE_SUFFIXES:
        return "openslide", _open_backend(path, "openslide")
    if suffix in IMAGE_SUFFIXES:
        return "image", _open_backend(path, "image")
    if suffix not in TIFF_SUFFIXES:
        raise SlideError(
            f"{path} has the unsupported file type {path.suffix or '(no suffix)'!r}. Supported: {SUPPORTED_FORMATS}."
        )
    disguised = _image_format_by_content(path)
    if disguised:
        raise SlideError(
            f"{path} is a {disguised} image named {path.suffix!r}, not a whole-slide image. Rename it to "
            f".{disguised.lower()} to segment it as a flat image (with [[mpp]]), or use the original slide file."
        )
    try:
        tiff_backend = TiffSlideBackend(path)
    except DamagedFileError as exc:
        raise _damaged(path, exc) from exc
    except UnsupportedSlideError as exc:
        raise SlideError(f"{path} cannot be used as a slide: {exc}.") from exc
    except Exception as tiffslide_exc:  # tiffslide raises many types on files it cannot parse; try OpenSlide
        try:
            return "openslide", OpenSlideBackend(path)
        except (openslide.OpenSlideError, UnsupportedSlideError) as openslide_exc:
            raise SlideError(
                f"{path} is not a readable whole-slide image: tiffslide says {tiffslide_exc!r}, OpenSlide says "
                f"{openslide_exc!r}. It may be truncated or corrupted ({_RECOPY}), or not a slide at all. "
                f"Supported: {SUPPORTED_FORMATS}."
            ) from openslide_exc
    if tiff_backend.is_flat:
        tiff_backend.close()
        return "image", _open_backend(path, "image")
    return "tiffslide", tiff_backend


_MAGIC_NUMBERS = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}


def _image_format_by_content(path: Path) -> str | None:
    """The image format (PNG or JPEG) that the file's first bytes show, whatever its name; else None."""
    try:
        with path.open("rb") as stream:
            head = stream.read(8)
    except OSError:
        return None
    return next((name for magic, name in _MAGIC_NUMBERS.items() if head.startswith(magic)), None)


def _open_backend(path: Path, name: BackendName) -> Backend:
    """Open ``path`` with the named backend, turning every failure into a :class:`SlideError`."""
    try:
        if name == "tiffslide":
            return TiffSlideBackend(path)
        if name == "openslide":
            return OpenSlideBackend(path)
        return ImageBackend(path)
    except DamagedFileError as exc:
        raise _damaged(path, exc) from exc
    except UnsupportedSlideError as exc:
        if path.is_dir():
            raise _not_dicom_folder(path, str(exc)) from exc
        if name == "image":
            raise SlideError(
                f"{path} cannot be read as a single image: {exc}. Convert it to a tiled pyramidal TIFF, e.g. "
                f"`vips tiffsave {path.name} slide.tif --tile --pyramid --compression jpeg`, and open that."
            ) from exc
        raise SlideError(f"{path} cannot be used as a slide: {exc}.") from exc
    except openslide.OpenSlideError as exc:
        if path.is_dir():
            raise _not_dicom_folder(path, f"OpenSlide rejects its DICOM files: {exc}") from exc
        raise SlideError(
            f"OpenSlide cannot open {path}: {exc}. Expected a slide in a format OpenSlide reads (for .dcm: one "
            f"instance of a DICOM WSI series, with the rest of the series in the same folder); it may be truncated "
            f"or corrupted ({_RECOPY}), or exported incompletely."
        ) from exc
    except (tifffile.TiffFileError, UnidentifiedImageError) as exc:
        raise SlideError(
            f"{path} cannot be read with backend={name!r}: {exc}. Try backend='auto'; "
            f"it may be truncated or corrupted ({_RECOPY})."
        ) from exc
    except BACKEND_ERRORS as exc:
        raise SlideError(
            f"{path} cannot be read with backend={name!r}: {exc!r}. Try backend='auto'; if that fails too, "
            f"the file may be truncated or corrupted ({_RECOPY})."
        ) from exc


def _damaged(path: Path, exc: DamagedFileError) -> SlideError:
    return SlideError(f"{path} is truncated or corrupted: {exc}. Probably an incomplete copy; {_RECOPY}.")


def _not_dicom_folder(path: Path, reason: str) -> SlideError:
    return SlideError(
        f"{path} is a directory but not a DICOM whole-slide image: {reason}. A valid input is a slide file "
        f"({SUPPORTED_FORMATS}) or a folder holding the .dcm files of one DICOM WSI series."
    )


def describe_slide(reader: SlideReader) -> str:
    """Multi-line, human-readable summary of a slide (what ``wsi-espnet info SLIDE`` prints)."""
    lines = [
        f"path:              {reader.path}",
        f"backend:           {reader.backend}",
        f"vendor:            {reader.vendor or 'unknown'}",
        f"levels:            {reader.level_count} (width x height, downsample, um/px)",
    ]
    for level, ((height, width), downsample) in enumerate(
        zip(reader.level_shapes, reader.level_downsamples, strict=True)
    ):
        level_mpp = reader.level_mpp(level)
        mpp_text = "unknown" if level_mpp is None else f"{level_mpp:.4g} um/px"
        lines.append(f"  level {level}: {width} x {height}, downsample {downsample:.4g}, {mpp_text}")
    if reader.mpp is None:
        lines.append("mpp:               unknown (no metadata; pass --mpp, e.g. 0.25 for 40x or 0.5 for 20x)")
    else:
        lines.append(f"mpp:               {reader.mpp:.4g} um/px (source: {reader.mpp_source})")
    power = reader.objective_power
    lines.append(f"objective power:   {'unknown' if power is None else f'{power:g}x'}")
    lines.append(f"associated images: {', '.join(reader.associated_images) or 'none'}")
    lines.extend(f"warning:           {sentence}." for sentence in reader.damage)
    return "\n".join(lines)


#: Endings of the masks ``wsi-espnet segment`` writes: outputs, never slides.
_MASK_OUTPUT_ENDINGS = (".mask.zarr", ".mask.ome.tiff", ".mask.ome.tif")


def can_open(path: str | os.PathLike[str]) -> bool:
    """Whether :func:`open_slide` would pick a backend for ``path``, judged without decoding it.

    True for an existing file with a supported suffix (TIFF family, OpenSlide formats, PNG/JPEG)
    and for a folder holding a DICOM instance (only file headers are read to find one). No pixels
    are read, so a damaged slide (empty, truncated) still gives True and :func:`open_slide` then says
    what is wrong. False, never an error, for a missing path, an unsupported suffix, a zarr store,
    and the masks ``wsi-espnet segment`` writes (``<slide>.mask.zarr``, ``<slide>.mask.ome.tiff``).
    """
    try:
        path = Path(path)
        if path.name.lower().endswith(_MASK_OUTPUT_ENDINGS):
            return False
        if path.is_dir():
            is_zarr = any((path / name).exists() for name in ("zarr.json", ".zgroup", ".zarray"))
            return not is_zarr and find_dicom_instance(path) is not None
        suffixes = (*TIFF_SUFFIXES, *OPENSLIDE_SUFFIXES, *IMAGE_SUFFIXES)
        return path.is_file() and path.suffix.lower() in suffixes
    except (OSError, TypeError, ValueError):
        return False
