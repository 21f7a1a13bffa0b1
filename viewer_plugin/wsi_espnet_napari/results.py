"""The widget's runs and what it does with their results, without Qt: segmenting regions in memory
(:func:`~wsi_espnet.segmentation.segment_region`) or the whole slide to disk
(:func:`~wsi_espnet.segment_slide.segment_slide`) into Labels layer data, a result layer's class areas,
and its export to GeoJSON for QuPath.

Region runs and whole-slide runs made with the same :class:`RunSettings` give the same labels for the
same pixels: both use the same tile size, the halo measured for the model, and the engine's defaults
for everything else.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from torch import nn

from wsi_espnet.errors import InputError
from wsi_espnet.geometry import Region
from wsi_espnet.models import load_model
from wsi_espnet.models.config import ModelConfig
from wsi_espnet.models.registry import resolve_model_path
from wsi_espnet.outputs.finalise import geojson_level, label_areas
from wsi_espnet.outputs.geojson import write_geojson
from wsi_espnet.outputs.paths import OutputPaths
from wsi_espnet.segment_slide import DEFAULT_FORMATS, SegmentOptions, segment_slide
from wsi_espnet.segmentation.label_values import LabelClass, label_classes_for
from wsi_espnet.segmentation.planning import SlidePlan, plan_slide
from wsi_espnet.segmentation.progress import ProgressCallback, ProgressEvent
from wsi_espnet.segmentation.region import RegionLabels, measured_halo, segment_region
from wsi_espnet.slides import open_slide
from wsi_espnet_napari.layers import LayerData, labels_layer, region_labels_layer
from wsi_espnet_napari.regions import outline_mask

__all__ = [
    "REGION_PLANS", "REGION_TILE_SIZE", "RegionPlans", "RunKind", "RunSettings", "export_geojson",
    "layer_class_areas", "layer_classes",
    "segment_regions", "segment_whole_slide",
]  # fmt: skip

#: Where a run segments: the visible region, the drawn shapes, or the whole slide (to disk).
RunKind = Literal["view", "shapes", "slide"]
#: Tile side (target pixels) of the widget's runs: smaller than the CLI's 1536, so a region's first
#: result comes quickly; whole-slide runs from the widget use it too, so both agree pixel for pixel.
REGION_TILE_SIZE = 512
#: The most target pixels a region run holds in memory (8192 x 8192); larger areas go to disk.
MAX_REGION_PIXELS = 1 << 26
#: Names of the result layers of region runs (each run replaces the layer of its kind).
RESULT_NAMES: dict[RunKind, str] = {"view": "ESPNet: visible region", "shapes": "ESPNet: drawn shapes"}


@dataclass(frozen=True)
class RunSettings:
    """What a run uses: ``model`` (a packaged model's name or a ``.safetensors`` path), ``target_mpp``
    (micrometres per label pixel; None for the model's own) and ``tile_size`` (target pixels)."""

    model: str
    target_mpp: float | None = None
    tile_size: int = REGION_TILE_SIZE


def segment_regions(
    slide: str | os.PathLike[str],
    settings: RunSettings,
    regions: Sequence[Region],
    *,
    kind: RunKind,
    outlines: Sequence[NDArray[np.float64]] | None = None,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> LayerData:
    """Segment level-0 ``regions`` of ``slide`` in memory into one single-scale Labels layer over them.

    With ``outlines`` (level-0 ``(row, col)`` polygons, one per region), label pixels whose centres lie
    outside every outline are 0. The layer's ``wsi_espnet`` metadata holds the run ``kind``, the
    level-0 regions and the class areas in mm^2 of what it shows.
    """
    slide = Path(slide)
    model, config = load_run_model(settings.model)
    if on_progress is not None:
        on_progress(ProgressEvent(slide.name, "planning", 0, 1))
    plan = REGION_PLANS.plan(slide, settings, model, config)
    _check_size(regions, settings, config, plan.reader.mpp)
    results = []
    for index, region in enumerate(regions):
        detail = f"region {index + 1} of {len(regions)}" if len(regions) > 1 else ""
        relay = None if on_progress is None else _with_detail(on_progress, detail)
        results.append(
            segment_region(
                plan.reader, model, config, region, target_mpp=settings.target_mpp, tile_size=settings.tile_size,
                plan=plan, on_progress=relay, cancel=cancel,
            )
        )  # fmt: skip
    merged = _merged(results, outlines)
    classes = label_classes_for(config)
    areas = label_areas(merged.labels, classes, merged.output_mpp)
    return region_labels_layer(
        merged, classes, name=RESULT_NAMES[kind], run=kind, slide=str(slide), areas_mm2=areas,
        level0_regions=[(r.top, r.left, r.height, r.width) for r in regions],
    )  # fmt: skip


def segment_whole_slide(
    slide: str | os.PathLike[str],
    settings: RunSettings,
    *,
    out_dir: str | os.PathLike[str] | None = None,
    formats: frozenset[str] = DEFAULT_FORMATS,
    overwrite: bool = False,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> LayerData:
    """Segment the whole slide to disk as ``wsi-espnet segment`` does (into ``out_dir``, default beside
    the slide; resumed when interrupted) and return its ``.mask.zarr`` as a multiscale Labels layer (its
    metadata carries the run's class areas and reliability warnings)."""
    options = SegmentOptions(
        out_dir=None if out_dir is None else Path(out_dir), formats=formats, target_mpp=settings.target_mpp,
        tile_size=settings.tile_size, overwrite=overwrite,
    )  # fmt: skip
    result = segment_slide(slide, settings.model, options, on_progress=on_progress, cancel=cancel)
    data, kwargs, kind = labels_layer(result.outputs["ome-zarr"])
    classes = result.provenance.get("classes")
    areas = _recorded_areas(classes) if classes else None
    warnings = (result.provenance.get("reliability") or {}).get("warnings", [])
    kwargs["metadata"]["wsi_espnet"] |= {
        "run": "slide", "slide": str(Path(slide)), "areas_mm2": areas, "warnings": list(warnings),
    }  # fmt: skip
    return data, kwargs, kind


def layer_classes(layer: Any) -> list[LabelClass] | None:
    """The value table of one of our Labels layers (from the reader or a run), else None."""
    record = layer.metadata.get("wsi_espnet", {})
    if record.get("kind") != "labels":
        return None
    return [LabelClass(int(value), str(name), tuple(color)) for value, name, color in record["classes"]]


def layer_class_areas(layer: Any) -> dict[int, float] | None:
    """Area in mm^2 of each class value of one of our Labels layers: recorded by the run that made it,
    else read from the provenance beside its mask file; None when neither is known."""
    record = layer.metadata.get("wsi_espnet", {})
    if record.get("areas_mm2") is not None:
        return {int(value): float(area) for value, area in record["areas_mm2"].items()}
    if not record.get("path"):
        return None
    try:
        provenance = OutputPaths.for_mask(record["path"]).provenance
        return _recorded_areas(json.loads(provenance.read_text())["classes"])
    except (InputError, OSError, ValueError, KeyError, TypeError):
        return None


def export_geojson(labels: Any, slide: Any, path: str | os.PathLike[str]) -> Path:
    """Write one of our Labels layers as QuPath GeoJSON (one MultiPolygon per class) in level-0 pixels of
    the ``slide`` image layer it lies over, and return ``path``.

    A multiscale layer is traced on the level :func:`~wsi_espnet.outputs.finalise.geojson_level` picks,
    as ``segment`` traces its GeoJSON.
    """
    classes = layer_classes(labels)
    if classes is None:
        raise InputError(f"layer {labels.name!r} is not a wsi-espnet mask; choose a result or mask layer to export.")
    levels = list(labels.data) if labels.multiscale else [labels.data]
    index = geojson_level([level.shape for level in levels])
    # Levels halve (mode-downsampled 2 x 2 blocks), as the pyramid writer makes them.
    level_scale = np.asarray(labels.scale[-2:], dtype=float) * 2**index
    slide_scale = np.asarray(slide.scale[-2:], dtype=float)
    corner = np.asarray(labels.translate[-2:]) - np.asarray(labels.scale[-2:]) / 2
    slide_corner = np.asarray(slide.translate[-2:]) - slide_scale / 2
    origin = (corner - slide_corner) / level_scale
    downsample = level_scale / slide_scale
    if not np.isclose(downsample[0], downsample[1], rtol=1e-6):
        raise InputError(f"layer {labels.name!r} has unequal pixel sizes {tuple(level_scale)}; cannot export it.")
    mask = np.asarray(levels[index])
    return write_geojson(
        mask, Path(path), downsample=float(downsample[1]), classes=classes,
        origin=(float(origin[0]), float(origin[1])),
    )  # fmt: skip


class RegionPlans:
    """The slide plans of recent region runs, each with its open reader: panning and running again on the
    same slide and settings skips tissue detection and planning (2.1-2.5 s of a 9.4 s view run on a
    40,000 px slide). A plan is reused only for the same file (path, size and modification time), model
    file version, target MPP and tile size, so it is the plan ``segment_region`` would make itself.
    """

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._plans: dict[tuple[Any, ...], SlidePlan] = {}
        self._lock = threading.Lock()

    def plan(self, slide: Path, settings: RunSettings, model: nn.Module, config: ModelConfig) -> SlidePlan:
        key = (_file_version(slide), _file_version(resolve_model_path(settings.model)), settings.target_mpp,
               settings.tile_size)  # fmt: skip
        with self._lock:
            cached = self._plans.pop(key, None)
            if cached is None:
                reader = open_slide(slide)
                try:
                    cached = plan_slide(
                        reader, config, halo=measured_halo(model, config), target_mpp=settings.target_mpp,
                        tile_size=settings.tile_size,
                    )  # fmt: skip
                except BaseException:
                    reader.close()
                    raise
            self._plans[key] = cached  # the most recent last
            while len(self._plans) > self.size:
                oldest = next(iter(self._plans))
                self._plans.pop(oldest).reader.close()
            return cached

    def clear(self) -> None:
        """Close every cached plan's reader and forget the plans."""
        with self._lock:
            for plan in self._plans.values():
                plan.reader.close()
            self._plans.clear()


#: The plans the widget's region runs share.
REGION_PLANS = RegionPlans()


def _file_version(path: Path) -> tuple[str, int, int]:
    """A file's (absolute path, size, modification time); zeros when it cannot be read (the caller explains)."""
    try:
        stat = path.stat()
    except OSError:
        return str(path.absolute()), 0, 0
    return str(path.absolute()), stat.st_size, stat.st_mtime_ns


def load_run_model(model: str) -> tuple[nn.Module, ModelConfig]:
    """A packaged model's name or a checkpoint path, loaded once per file version (reused by later runs)."""
    path = resolve_model_path(model).absolute()
    try:
        modified = path.stat().st_mtime_ns
    except OSError:
        modified = 0  # load_model says what is wrong with the path
    return _load_model(path, modified)


@functools.lru_cache(maxsize=2)
def _load_model(path: Path, modified: int) -> tuple[nn.Module, ModelConfig]:
    return load_model(path)


def _check_size(regions: Sequence[Region], settings: RunSettings, config: ModelConfig, mpp: float | None) -> None:
    target_mpp = settings.target_mpp or config.target_mpp
    if not (mpp and target_mpp):
        return  # the engine names what is missing
    top, left = min(r.top for r in regions), min(r.left for r in regions)
    bottom, right = max(r.bottom for r in regions), max(r.right for r in regions)
    pixels = (bottom - top) * (right - left) * (mpp / target_mpp) ** 2
    if pixels > MAX_REGION_PIXELS:
        side = int(np.sqrt(MAX_REGION_PIXELS))
        raise InputError(
            f"the area to segment is {pixels / 1e6:.0f} megapixels at {target_mpp:g} um/px, more than the "
            f"{side} x {side} a region run holds in memory; zoom in, draw smaller shapes, or run the whole slide "
            "(written to disk)."
        )


def _recorded_areas(classes: Sequence[dict[str, Any]]) -> dict[int, float]:
    """Class value -> mm^2 from a provenance record's ``classes`` list."""
    return {int(c["value"]): float(c["area_mm2"]) for c in classes}


def _with_detail(on_progress: ProgressCallback, detail: str) -> ProgressCallback:
    def relay(event: ProgressEvent) -> None:
        on_progress(ProgressEvent(event.slide, event.stage, event.done, event.total, detail or event.detail))

    return relay


def _merged(results: Sequence[RegionLabels], outlines: Sequence[NDArray[np.float64]] | None) -> RegionLabels:
    """The regions' labels on one target-grid array over all of them, 0 outside ``outlines`` (if given)."""
    top = min(int(r.region.top) for r in results)
    left = min(int(r.region.left) for r in results)
    bottom = max(int(r.region.bottom) for r in results)
    right = max(int(r.region.right) for r in results)
    labels = np.zeros((bottom - top, right - left), dtype=np.uint8)
    for index, result in enumerate(results):
        rows = slice(int(result.region.top) - top, int(result.region.bottom) - top)
        cols = slice(int(result.region.left) - left, int(result.region.right) - left)
        values = result.labels
        if outlines is not None:
            inside = outline_mask(outlines[index], result.region, result.target_to_level0)
            # Overlapping regions hold equal labels (one tile grid), so each adds only what lies inside its shape.
            labels[rows, cols] = np.where(inside, values, labels[rows, cols])
        else:
            labels[rows, cols] = values
    return dataclasses.replace(results[0], labels=labels, region=Region(top, left, bottom - top, right - left))
