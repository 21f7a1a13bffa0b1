"""Finalising a run: from the label store's level 0 to the pyramid, NGFF metadata, OME-TIFF, GeoJSON and areas.

Every step reads the store chunk by chunk; nothing here holds a whole level in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
from numpy.typing import NDArray
from PIL import Image

from wsi_espnet.atomic_files import replacing
from wsi_espnet.outputs.geojson import write_geojson
from wsi_espnet.outputs.ome_tiff import write_ome_tiff
from wsi_espnet.outputs.ome_zarr import write_ngff_label_metadata
from wsi_espnet.outputs.paths import OutputPaths
from wsi_espnet.outputs.pyramid import build_label_pyramid
from wsi_espnet.segmentation.label_store import CLASSES_LABEL, TISSUE_LABEL, LabelStore
from wsi_espnet.segmentation.label_values import LabelClass
from wsi_espnet.segmentation.planning import SlidePlan
from wsi_espnet.tissue_detection import TissueMask

__all__ = [
    "FinalisedOutputs", "build_pyramid", "class_areas", "geojson_level", "label_areas", "write_derived_outputs",
    "write_tissue_outputs",
]  # fmt: skip

#: The GeoJSON is traced on the first pyramid level at most this many pixels.
GEOJSON_MAX_PIXELS = 1 << 26
#: Pyramids go down until the longest side is at most this many pixels.
PYRAMID_MIN_SIZE = 256


@dataclass(frozen=True)
class FinalisedOutputs:
    """The pyramid's level paths in the store and the area in mm^2 of each mask value."""

    level_paths: list[str]
    areas: dict[int, float]


def write_tissue_outputs(store: LabelStore, tissue: TissueMask, png: Path) -> None:
    """The tissue mask as the store's ``labels/tissue`` label image, and as a PNG picture."""
    store.write_tissue_mask(tissue.mask)
    write_ngff_label_metadata(
        store.group(mode="r+"),
        label_name=TISSUE_LABEL,
        level_paths=["0"],
        mpp=tissue.mpp,
        classes=[LabelClass(0, "glass", (0, 0, 0)), LabelClass(1, "tissue", (0, 200, 0))],
    )
    with replacing(png) as partial:
        Image.fromarray(tissue.mask.astype(np.uint8) * 255).save(partial, format="PNG")


def build_pyramid(store: LabelStore) -> list[str]:
    """Mode-downsampled levels of the class mask, down to :data:`PYRAMID_MIN_SIZE`; returns their paths."""
    return build_label_pyramid(store.group("labels", CLASSES_LABEL, mode="r+"), min_size=PYRAMID_MIN_SIZE)


def write_derived_outputs(
    store: LabelStore,
    plan: SlidePlan,
    level_paths: list[str],
    classes: list[LabelClass],
    paths: OutputPaths,
    formats: frozenset[str],
    *,
    keep_existing: bool = False,
) -> FinalisedOutputs:
    """NGFF metadata for the pyramid, the OME-TIFF and GeoJSON asked for in ``formats``, and the class areas.

    ``keep_existing`` keeps files a complete earlier run already wrote (a rerun asked for more formats).
    """
    mpp = plan.choice.output_mpp
    write_ngff_label_metadata(
        store.group(mode="r+"), label_name=CLASSES_LABEL, level_paths=level_paths, mpp=mpp, classes=classes
    )
    levels = [store.labels(int(p)) for p in level_paths]
    if "ome-tiff" in formats and not (keep_existing and paths.ome_tiff.exists()):
        write_ome_tiff(levels, paths.ome_tiff, mpp=mpp, classes=classes)
    if "geojson" in formats and not (keep_existing and paths.geojson.exists()):
        index = geojson_level([lvl.shape for lvl in levels])
        downsample = plan.choice.target_to_level0 * 2**index
        write_geojson(levels[index], paths.geojson, downsample=downsample, classes=classes)
    return FinalisedOutputs(level_paths, class_areas(store, classes, mpp))


def geojson_level(shapes: Sequence[tuple[int, ...]]) -> int:
    """Index of the pyramid level the GeoJSON is traced on: the first of at most :data:`GEOJSON_MAX_PIXELS`
    pixels (over its last two axes), else the last."""
    fitting = (i for i, shape in enumerate(shapes) if shape[-2] * shape[-1] <= GEOJSON_MAX_PIXELS)
    return next(fitting, len(shapes) - 1)


def class_areas(store: LabelStore, classes: list[LabelClass], mpp: float) -> dict[int, float]:
    """Area in mm^2 of each mask value, counted chunk by chunk on level 0."""
    return label_areas(da.from_zarr(store.labels()), classes, mpp)  # type: ignore[no-untyped-call]


def label_areas(labels: NDArray[np.uint8] | da.Array, classes: Sequence[LabelClass], mpp: float) -> dict[int, float]:
    """Area in mm^2 of each class's value in a ``(H, W)`` uint8 mask of ``mpp`` micrometres per pixel
    (numpy, or dask counted chunk by chunk)."""
    if isinstance(labels, da.Array):
        counts = da.bincount(labels.ravel(), minlength=256).compute()  # type: ignore[no-untyped-call]
    else:
        counts = np.bincount(np.ravel(labels), minlength=256)
    pixel_mm2 = (mpp / 1000.0) ** 2
    return {c.value: float(counts[c.value]) * pixel_mm2 for c in classes}
