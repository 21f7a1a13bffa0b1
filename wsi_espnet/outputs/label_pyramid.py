"""Read back the mask pyramid that ``wsi-espnet segment`` writes, from either of its two files.

Both files hold the same pyramid (level 0 is the mask at the segmentation resolution, each next
level half the size of the one before) and the same value table (0 = no tissue, model class ``c``
stored as ``c + 1``):

- ``<slide>.mask.zarr`` (OME-NGFF 0.5 on zarr v3): levels ``labels/tissue_classes/0, 1, ...``, pixel
  sizes in the NGFF ``coordinateTransformations``, names and colours in ``image-label``, and the
  run's ``status`` in the root's ``wsi_espnet`` attributes;
- ``<slide>.mask.ome.tiff``: levels in SubIFDs, the pixel size as OME ``PhysicalSizeX/Y``, names and
  colours in the ``wsi-espnet/class-names`` and ``wsi-espnet/class-colors`` MapAnnotations.

>>> pyramid = read_label_pyramid("out/slide.mask.zarr")   # doctest: +SKIP
>>> pyramid.levels[-1].compute()                          # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import re
import threading
import weakref
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dask.array as da
import numpy as np
import tifffile
import zarr
from dask.base import tokenize
from numpy.typing import NDArray

from wsi_espnet.errors import InputError
from wsi_espnet.segmentation.label_values import LabelClass, check_label_classes

__all__ = ["LabelPyramid", "is_label_pyramid", "read_label_pyramid"]

#: Where ``wsi-espnet segment`` keeps the class mask and its run record in the zarr store.
_LABEL = "tissue_classes"
_RUN_ATTRS = "wsi_espnet"
_NAMES_NAMESPACE = "wsi-espnet/class-names"
_COLORS_NAMESPACE = "wsi-espnet/class-colors"
_TIFF_SUFFIXES = (".tif", ".tiff")
_EXPECTED = "expected a <slide>.mask.zarr folder or <slide>.mask.ome.tiff file written by `wsi-espnet segment`"
#: Errors that malformed metadata raises while it is taken apart.
_MALFORMED = (KeyError, IndexError, TypeError, ValueError, AttributeError, StopIteration)
#: Errors zarr raises for a store it cannot open or parse.
_ZARR_ERRORS = (OSError, ValueError, TypeError, zarr.errors.BaseZarrError)


@dataclass(frozen=True, eq=False)
class LabelPyramid:
    """A class-mask pyramid written by ``wsi-espnet segment``; build it with :func:`read_label_pyramid`.

    Attributes
    ----------
    levels : tuple of dask.array.Array
        ``(H_i, W_i)`` uint8 mask values in (row, col) order, level 0 (the full mask) first. Lazy:
        chunks are read from the file only when computed or indexed.
    downsamples : tuple of float
        Level-0 mask pixels per pixel of each level: ``1.0``, then ``2.0``, ``4.0``, ...
    mpp : float
        Micrometres per level-0 mask pixel; level ``i`` has ``mpp * downsamples[i]``.
    classes : tuple of LabelClass
        The mask's value table (value, name, RGB colour 0-255), by increasing value.
    path : Path
        The ``.mask.zarr`` folder or ``.mask.ome.tiff`` file, as given.
    complete : bool
        False while the run writing a zarr store is still going (or was killed before it finished,
        or re-derives its outputs on a resume): its pixels may change. Always True for the OME-TIFF,
        which only exists once it has been written whole.
    source : {"ome-zarr", "ome-tiff"}
        Which of the two files ``path`` is.
    """

    levels: tuple[da.Array, ...]
    downsamples: tuple[float, ...]
    mpp: float
    classes: tuple[LabelClass, ...]
    path: Path
    complete: bool
    source: Literal["ome-zarr", "ome-tiff"]


def read_label_pyramid(path: str | os.PathLike[str]) -> LabelPyramid:
    """Open a mask written by ``wsi-espnet segment`` as a lazy pyramid, without reading its pixels.

    Parameters
    ----------
    path : str or PathLike
        A ``<slide>.mask.zarr`` folder or a ``<slide>.mask.ome.tiff`` file.

    Raises
    ------
    InputError
        ``path`` is missing or is not such a mask (another zarr store or TIFF included), its
        metadata is damaged, or the run writing the zarr store has not yet written its pyramid.
    """
    path = Path(path)
    if path.is_dir():
        return _read_zarr(path)
    if path.is_file():
        return _read_tiff(path)
    raise _not_a_mask(path, "it does not exist")


def is_label_pyramid(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` looks like a mask written by ``wsi-espnet segment``; reads metadata, no pixels.

    True for a zarr v3 folder with ``wsi_espnet`` root attributes and a ``labels/tissue_classes``
    group (even one whose run is still writing it, which :func:`read_label_pyramid` may refuse),
    and for a ``.tif``/``.tiff`` OME-TIFF with wsi-espnet class annotations. Never raises.
    """
    try:
        path = Path(path)
        if path.is_dir():
            _our_zarr_root(path)
        elif path.is_file() and path.suffix.lower() in _TIFF_SUFFIXES:
            _tiff_header(path)
        else:
            return False
    except (InputError, OSError, TypeError, ValueError):
        return False
    return True


# --- OME-Zarr ------------------------------------------------------------------------------------


def _our_zarr_root(path: Path) -> tuple[zarr.Group, dict[str, Any]]:
    """The class-label group and the run attributes of our zarr store, or an :class:`InputError`."""
    if not (path / "zarr.json").is_file():
        raise _not_a_mask(path, "it is a folder without zarr.json, so not a zarr v3 store")
    try:
        root = zarr.open_group(path, mode="r", zarr_format=3)
    except _ZARR_ERRORS as exc:
        raise _not_a_mask(path, f"it is not a readable zarr v3 group ({exc})") from exc
    run = root.attrs.get(_RUN_ATTRS)
    if not isinstance(run, Mapping):
        raise _not_a_mask(path, f"it is a zarr store without the {_RUN_ATTRS!r} attributes a segmentation run writes")
    try:
        labels = root.get("labels")
        group = labels.get(_LABEL) if isinstance(labels, zarr.Group) else None
    except _ZARR_ERRORS as exc:
        raise _damaged(path, f"its labels/{_LABEL} group cannot be opened ({exc})") from exc
    if not isinstance(group, zarr.Group):
        raise _not_a_mask(path, f"it is a zarr store without the 'labels/{_LABEL}' group holding the mask")
    return group, dict(run)


def _read_zarr(path: Path) -> LabelPyramid:
    group, run = _our_zarr_root(path)
    status = run.get("status")
    ome: Any = group.attrs.get("ome")
    if not isinstance(ome, Mapping) or "multiscales" not in ome:
        if status != "complete":
            raise InputError(
                f"{path} is a wsi-espnet mask whose run has not written its pyramid yet (status {status!r}): "
                "wait for `wsi-espnet segment` to finish, or rerun it on the slide to resume a killed run."
            )
        raise _damaged(path, f"labels/{_LABEL} has no NGFF 'multiscales' metadata")
    try:
        level_paths, scales = _ngff_levels(ome["multiscales"][0])
        classes = _ngff_classes(ome["image-label"])
    except _MALFORMED as exc:
        raise _damaged(path, f"the NGFF metadata of labels/{_LABEL} is malformed ({exc!r})") from exc

    arrays = []
    for level_path in level_paths:
        try:
            array = group.get(level_path)
        except _ZARR_ERRORS as exc:
            raise _damaged(path, f"labels/{_LABEL}/{level_path} cannot be opened ({exc})") from exc
        if not isinstance(array, zarr.Array) or array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
            raise _damaged(path, f"labels/{_LABEL}/{level_path} is not a 2-D integer array")
        arrays.append(array)
    _check_classes(path, classes, arrays[0].dtype)

    # A rerun rewrites the root attributes, so their modification time tells Dask a rewritten store apart.
    version = _file_version(path / "zarr.json")
    levels = tuple(
        da.from_zarr(array, name=f"wsi-espnet-mask-{tokenize(str(path.absolute()), level_path, version)}")  # type: ignore[no-untyped-call]
        for level_path, array in zip(level_paths, arrays, strict=True)
    )
    mpp = (scales[0][0] + scales[0][1]) / 2
    downsamples = tuple(_snap((y / scales[0][0] + x / scales[0][1]) / 2) for y, x in scales)
    return LabelPyramid(levels, downsamples, mpp, classes, path, status == "complete", "ome-zarr")


def _ngff_levels(multiscale: Mapping[str, Any]) -> tuple[list[str], list[tuple[float, float]]]:
    """Level paths and their (y, x) pixel sizes in micrometres, from one NGFF ``multiscales`` entry."""
    axes = [(axis["name"], axis.get("unit")) for axis in multiscale["axes"]]
    if axes != [("y", "micrometer"), ("x", "micrometer")]:
        raise ValueError(f"axes {axes} are not (y, x) in micrometer")
    paths, scales = [], []
    for dataset in multiscale["datasets"]:
        scale = next(t["scale"] for t in dataset["coordinateTransformations"] if t["type"] == "scale")
        y, x = (float(v) for v in scale)
        if not all(math.isfinite(v) and v > 0 for v in (y, x)):
            raise ValueError(f"scale {scale} of level {dataset['path']!r} is not two positive numbers")
        paths.append(str(dataset["path"]))
        scales.append((y, x))
    if not paths:
        raise ValueError("no datasets")
    return paths, scales


def _ngff_classes(image_label: Mapping[str, Any]) -> tuple[LabelClass, ...]:
    names = {int(p["label-value"]): str(p["name"]) for p in image_label.get("properties", [])}
    colors = {int(c["label-value"]): _rgb(c["rgba"][:3]) for c in image_label.get("colors", [])}
    return _value_table(names, colors)


# --- OME-TIFF ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TiffHeader:
    shapes: tuple[tuple[int, int], ...]
    chunks: tuple[tuple[int, int], ...]
    mpp: float
    classes: tuple[LabelClass, ...]


def _tiff_header(path: Path) -> _TiffHeader:
    """Everything but the pixels of a mask OME-TIFF, or an :class:`InputError` if it is not one."""
    try:
        with tifffile.TiffFile(path) as tiff:
            if not tiff.is_ome or not tiff.ome_metadata:
                raise _not_a_mask(path, "it has no OME-XML metadata")
            ome = ET.fromstring(tiff.ome_metadata)
            maps = {
                annotation.get("Namespace"): {m.get("K", ""): m.text or "" for m in annotation.iterfind(".//{*}M")}
                for annotation in ome.iterfind(".//{*}MapAnnotation")
            }
            if _NAMES_NAMESPACE not in maps:
                raise _not_a_mask(path, f"its OME-XML has no {_NAMES_NAMESPACE!r} annotation of mask values")
            series = tiff.series[0]
            if series.axes != "YX" or series.dtype != np.uint8:
                raise _damaged(path, f"its image is {series.dtype} with axes {series.axes!r}, not a (Y, X) uint8 mask")
            shapes = tuple((int(level.shape[0]), int(level.shape[1])) for level in series.levels)
            chunks = tuple(_chunk_shape(level) for level in series.levels)
            colormap = tiff.pages.first.colormap
    except InputError:
        raise
    except (tifffile.TiffFileError, OSError, ValueError, IndexError, ET.ParseError) as exc:
        raise _not_a_mask(path, f"it cannot be read as an OME-TIFF ({exc})") from exc
    try:
        mpp = _ome_mpp(ome)
        names = {int(value): name for value, name in maps[_NAMES_NAMESPACE].items()}
        colors = {int(value): _hex_rgb(text) for value, text in maps.get(_COLORS_NAMESPACE, {}).items()}
        if colormap is not None:  # the palette, for values the colour annotation lacks
            colors.update({v: _rgb(colormap[:, v] // 257) for v in names if v not in colors and 0 <= v < 256})
        classes = _value_table(names, colors)
    except _MALFORMED as exc:
        raise _damaged(path, f"its OME-XML metadata is malformed ({exc!r})") from exc
    _check_classes(path, classes, np.dtype(np.uint8))
    return _TiffHeader(shapes, chunks, mpp, classes)


def _read_tiff(path: Path) -> LabelPyramid:
    header = _tiff_header(path)
    version = _file_version(path)
    levels = tuple(
        da.from_array(  # type: ignore[no-untyped-call]
            _TiffLevel(path, index, shape),
            chunks=chunk,
            name=f"wsi-espnet-mask-{tokenize(str(path.absolute()), index, version)}",
            asarray=False,
            fancy=False,
            meta=np.empty((0, 0), dtype=np.uint8),
        )
        for index, (shape, chunk) in enumerate(zip(header.shapes, header.chunks, strict=True))
    )
    height, width = header.shapes[0]
    downsamples = tuple(_downsample(height, width, *shape) for shape in header.shapes)
    return LabelPyramid(levels, downsamples, header.mpp, header.classes, path, True, "ome-tiff")


def _ome_mpp(ome: ET.Element) -> float:
    pixels = ome.find("{*}Image/{*}Pixels")
    if pixels is None:
        raise ValueError("no Image/Pixels element")
    sizes = []
    for axis in ("X", "Y"):
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        if unit not in ("µm", "um"):
            raise ValueError(f"PhysicalSize{axis}Unit is {unit!r}, not µm")
        size = float(pixels.get(f"PhysicalSize{axis}", "nan"))
        if not (math.isfinite(size) and size > 0):
            raise ValueError(f"PhysicalSize{axis} is missing or not positive")
        sizes.append(size)
    return (sizes[0] + sizes[1]) / 2


def _chunk_shape(level: tifffile.TiffPageSeries) -> tuple[int, int]:
    """The level's tile (or strip) shape, clipped to the level: one Dask chunk per stored chunk."""
    page = level.keyframe
    rows, cols = (512, 512) if page is None else page.chunks[:2]
    return max(1, min(int(rows), int(level.shape[0]))), max(1, min(int(cols), int(level.shape[1])))


def _downsample(height: int, width: int, level_height: int, level_width: int) -> float:
    """Level-0 pixels per level pixel: the integer factor the level was halved by, else the mean ratio."""
    ratio = (height / level_height + width / level_width) / 2
    factor = round(ratio)
    if factor >= 1 and all(
        side // factor <= level_side <= -(-side // factor)
        for side, level_side in ((height, level_height), (width, level_width))
    ):
        return float(factor)
    return ratio


class _TiffLevel:
    """One level of a mask OME-TIFF as a read-only array for :func:`dask.array.from_array`.

    The file is opened (through tifffile's zarr store) on the first read in each process and closed
    when this object is collected; pickling drops the open file, so Dask workers reopen it.
    """

    dtype = np.dtype(np.uint8)
    ndim = 2

    def __init__(self, path: Path, level: int, shape: tuple[int, int]) -> None:
        self.path, self.level, self.shape = path, level, shape
        self._forget()

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._array: zarr.Array[Any] | None = None
        self._pid: int | None = None

    def _open(self) -> zarr.Array[Any]:
        with self._lock:
            if self._array is None or self._pid != os.getpid():
                with tifffile.TiffFile(self.path) as tiff:  # the store reopens the file for its reads
                    store = tiff.series[0].aszarr(level=self.level)
                weakref.finalize(self, store.close)
                array = zarr.open_array(store, mode="r")
                if array.shape != self.shape:
                    raise InputError(
                        f"{self.path} changed since it was opened: level {self.level} is now {array.shape}, "
                        f"was {self.shape}; read it again with read_label_pyramid."
                    )
                self._array, self._pid = array, os.getpid()
            return self._array

    def __getitem__(self, key: Any) -> NDArray[np.uint8]:
        return np.asarray(self._open()[key], dtype=np.uint8)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "level": self.level, "shape": self.shape}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.level, self.shape = state["path"], state["level"], state["shape"]
        self._forget()


# --- shared --------------------------------------------------------------------------------------


def _value_table(names: Mapping[int, str], colors: Mapping[int, tuple[int, int, int]]) -> tuple[LabelClass, ...]:
    """One class per value named or coloured; a missing name is ``"value <v>"``, a missing colour grey."""
    return tuple(
        LabelClass(value, names.get(value, f"value {value}"), colors.get(value, (value % 256,) * 3))
        for value in sorted({*names, *colors})
    )


def _rgb(values: Any) -> tuple[int, int, int]:
    red, green, blue = (int(v) for v in values)
    return red, green, blue


def _hex_rgb(text: str) -> tuple[int, int, int]:
    if not re.fullmatch(r"#[0-9A-Fa-f]{6}", text):
        raise ValueError(f"colour {text!r} is not #RRGGBB")
    return int(text[1:3], 16), int(text[3:5], 16), int(text[5:7], 16)


def _check_classes(path: Path, classes: tuple[LabelClass, ...], dtype: np.dtype[Any]) -> None:
    try:
        check_label_classes(classes, dtype)
    except InputError as exc:
        raise _damaged(path, f"its value table is invalid: {exc}") from exc


def _snap(value: float) -> float:
    """``value`` rounded to the nearest integer when it is one up to floating-point noise."""
    nearest = round(value)
    return float(nearest) if abs(value - nearest) <= 1e-9 * max(1.0, abs(value)) else value


def _file_version(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _not_a_mask(path: Path, reason: str) -> InputError:
    return InputError(f"{path} is not a wsi-espnet mask: {reason}; {_EXPECTED}.")


def _damaged(path: Path, reason: str) -> InputError:
    return InputError(
        f"{path} is a wsi-espnet mask but cannot be read: {reason}. It may be damaged or from an "
        "incompatible version; rerun `wsi-espnet segment` on the slide to write it again."
    )
