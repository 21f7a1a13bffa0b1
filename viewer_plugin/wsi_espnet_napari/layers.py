"""Layer data for napari: a slide as a lazy multiscale RGB image, a class mask as multiscale Labels.

Every layer is placed in micrometres: ``scale`` is the micrometres per pixel of its finest level and
``translate`` half of that, so pixel corners (not centres) sit at 0 and a mask computed at 1 um/px
lies exactly over a slide scanned at 0.25 um/px. Nothing is read here: the slide's levels are
:func:`~wsi_espnet.slides.slide_level_dask` arrays and the mask's levels are
:func:`~wsi_espnet.outputs.label_pyramid.read_label_pyramid` arrays, so napari reads only the
tiles it draws.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
import pandas as pd
from napari.utils.colormaps import DirectLabelColormap

from wsi_espnet.errors import WsiEspnetError
from wsi_espnet.outputs.label_pyramid import LabelPyramid, is_label_pyramid, read_label_pyramid
from wsi_espnet.outputs.paths import OutputPaths
from wsi_espnet.segmentation.label_values import NO_TISSUE, LabelClass
from wsi_espnet.slides import SlideReader, open_slide, slide_level_dask

if TYPE_CHECKING:  # the reader must not import torch (the engine) just to open a file
    from wsi_espnet.segmentation.region import RegionLabels

__all__ = [
    "LayerData", "labels_colormap", "labels_features", "labels_layer", "outputs_beside", "region_labels_layer",
    "slide_layer",
]  # fmt: skip

#: napari's (data, kwargs, layer type) tuple.
LayerData = tuple[Any, dict[str, Any], str]
#: What a micrometre axis is called in napari's scale bar and status bar.
UNITS = ("um", "um")
#: Slide levels are read in blocks of this many pixels (napari asks for screen-sized tiles).
SLIDE_CHUNK = 512
#: A slide's coarsest level is at most this many pixels on a side; a slide stored without levels that
#: small gets halved ones computed from its own (a napari image that is not multiscale is read whole).
OVERVIEW_SIZE = 4096


def slide_layer(slide: str | os.PathLike[str] | SlideReader, *, mpp: float | None = None) -> LayerData:
    """The slide as a lazy multiscale RGB image layer with its scale in micrometres.

    A slide without MPP metadata is shown at 1 unit per pixel (pixels, not um) unless ``mpp`` is given.
    """
    reader = slide if isinstance(slide, SlideReader) else open_slide(slide, mpp=mpp)
    levels = [slide_level_dask(reader, level, chunk=SLIDE_CHUNK) for level in range(reader.level_count)]
    # napari takes levels that shrink; some scanners store a level that does not (e.g. a same-size copy).
    levels = [levels[0], *(b for a, b in itertools.pairwise(levels) if b.shape[0] < a.shape[0])]
    while max(levels[-1].shape[:2]) > OVERVIEW_SIZE:  # a slide without (enough) pyramid: halve it lazily
        levels.append(_halved(levels[-1]))
    slide_mpp = reader.mpp
    scale = (slide_mpp, slide_mpp) if slide_mpp else (1.0, 1.0)
    kwargs: dict[str, Any] = {
        "name": reader.path.name,
        "rgb": True,
        "multiscale": True,
        "scale": scale,
        "translate": (scale[0] / 2, scale[1] / 2),
        "units": UNITS if slide_mpp else ("pixel", "pixel"),
        "axis_labels": ("y", "x"),
        "contrast_limits": (0, 255),
        "metadata": {"wsi_espnet": {"kind": "slide", "path": str(reader.path), "mpp": slide_mpp}},
    }
    return levels if len(levels) > 1 else levels[0], kwargs | {"multiscale": len(levels) > 1}, "image"


def labels_layer(mask: str | os.PathLike[str] | LabelPyramid, *, name: str | None = None) -> LayerData:
    """Our ``.mask.zarr`` / ``.mask.ome.tiff`` as multiscale Labels in micrometres, coloured and named by class.

    0 (no tissue) is transparent; each class has the colour the model card gives it, and its name is
    the layer's ``class`` feature, so napari's status bar shows it under the cursor.
    """
    pyramid = mask if isinstance(mask, LabelPyramid) else read_label_pyramid(mask)
    levels = list(pyramid.levels)
    kwargs = _labels_kwargs(
        name or _mask_name(pyramid), pyramid.classes, mpp=pyramid.mpp, origin_um=(0.0, 0.0),
        path=str(pyramid.path), complete=pyramid.complete,
    )  # fmt: skip
    return levels if len(levels) > 1 else levels[0], kwargs | {"multiscale": len(levels) > 1}, "labels"


def region_labels_layer(
    result: RegionLabels, classes: Sequence[LabelClass], *, name: str, **metadata: Any
) -> LayerData:
    """:func:`~wsi_espnet.segmentation.segment_region`'s labels as single-scale Labels lying over the slide.

    ``result.region`` is on the target grid, so its top-left corner is at ``region.top * output_mpp``
    micrometres; ``metadata`` (e.g. the run kind and class areas) joins the layer's ``wsi_espnet`` record.
    """
    mpp = result.output_mpp
    origin_um = (result.region.top * mpp, result.region.left * mpp)
    kwargs = _labels_kwargs(name, classes, mpp=mpp, origin_um=origin_um, path=None, complete=True)
    kwargs["metadata"]["wsi_espnet"] |= {"target_to_level0": result.target_to_level0, **metadata}
    return result.labels, kwargs, "labels"


def _labels_kwargs(
    name: str,
    classes: Sequence[LabelClass],
    *,
    mpp: float,
    origin_um: tuple[float, float],
    path: str | None,
    complete: bool,
) -> dict[str, Any]:
    """A class mask's Labels kwargs: pixels of ``mpp`` micrometres whose first corner is at ``origin_um``."""
    scale = (mpp, mpp)
    return {
        "name": name,
        "scale": scale,
        "translate": (origin_um[0] + scale[0] / 2, origin_um[1] + scale[1] / 2),
        "units": UNITS,
        "axis_labels": ("y", "x"),
        "colormap": labels_colormap(classes),
        "features": labels_features(classes),
        "opacity": 0.5,
        "metadata": {
            "wsi_espnet": {
                "kind": "labels", "path": path, "mpp": mpp, "complete": complete,
                "classes": [(c.value, c.name, c.color) for c in classes],
            }
        },
    }  # fmt: skip


def _halved(level: da.Array) -> da.Array:
    """``level`` at half size (2x2 means, odd last rows/columns dropped), computed block by block."""
    height, width = (n - n % 2 for n in level.shape[:2])
    halved: da.Array = da.coarsen(np.mean, level[:height, :width], {0: 2, 1: 2})
    rounded: da.Array = da.round(halved).astype(np.uint8)
    chunked: da.Array = rounded.rechunk((SLIDE_CHUNK, SLIDE_CHUNK, 3))  # type: ignore[no-untyped-call]
    return chunked


def labels_colormap(classes: Sequence[LabelClass]) -> DirectLabelColormap:
    """Each class value in its colour, ``no tissue`` (0) and unknown values transparent."""
    colors: dict[int | None, Any] = {None: np.zeros(4)}
    for label in classes:
        rgba = np.array([*label.color, 255], dtype=float) / 255
        colors[label.value] = np.zeros(4) if label.value == NO_TISSUE else rgba
    return DirectLabelColormap(color_dict=colors)


def labels_features(classes: Sequence[LabelClass]) -> pd.DataFrame:
    """The Labels layer's feature table: one row per value, its ``class`` name (napari shows it on hover)."""
    return pd.DataFrame({"index": [c.value for c in classes], "class": [c.name for c in classes]})


def outputs_beside(slide: str | os.PathLike[str]) -> list[Path]:
    """Our masks of ``slide`` next to it (``<stem>.mask.zarr``, else ``<stem>.mask.ome.tiff``), also in a
    per-slide subfolder ``<stem>/`` as ``wsi-espnet batch`` writes them; the zarr store is preferred."""
    path = Path(slide)
    stem = path.name if path.is_dir() else path.stem
    for folder in (path.parent, path.parent / stem):
        paths = OutputPaths.for_slide(path, folder)
        for candidate in (paths.zarr, paths.ome_tiff):
            if is_label_pyramid(candidate):
                return [candidate]
    return []


def _mask_name(pyramid: LabelPyramid) -> str:
    state = "" if pyramid.complete else " (incomplete run)"
    return f"{pyramid.path.name}{state}"


def read_outputs_beside(slide: str | os.PathLike[str]) -> list[LayerData]:
    """Labels layers for :func:`outputs_beside`, skipping (not failing on) one that cannot be read."""
    layers = []
    for path in outputs_beside(slide):
        try:
            layers.append(labels_layer(path))
        except WsiEspnetError:
            continue
    return layers
