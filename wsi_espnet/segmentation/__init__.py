"""Where tiles are stitched: plan a slide, run its tiles on a Dask cluster into a label store, or one region in memory.

>>> plan = plan_slide(reader, config, halo=376)                      # doctest: +SKIP
>>> stats = run_tiles(plan, settings, store, client=client)           # doctest: +SKIP
>>> labels = segment_region(reader, model, config, Region(0, 0, 4096, 4096)).labels   # doctest: +SKIP

:func:`wsi_espnet.segment_slide.segment_slide` ties these to the outputs for one slide.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wsi_espnet.segmentation.label_store import LabelStore, run_lock
    from wsi_espnet.segmentation.label_values import NO_TISSUE, LabelClass, label_classes_for
    from wsi_espnet.segmentation.planning import SlidePlan, plan_slide, tile_groups
    from wsi_espnet.segmentation.progress import STAGES, ProgressCallback, ProgressEvent, check_cancelled
    from wsi_espnet.segmentation.region import RegionLabels, segment_region
    from wsi_espnet.segmentation.running import RunStats, local_client, run_tiles
    from wsi_espnet.segmentation.tile_inference import InferenceSettings

#: Where each name lives. Imported on first use, so that reading a mask (the napari reader,
#: ``wsi_espnet.outputs``) does not import torch and the model code with the planning and running.
_HOMES = {
    "LabelStore": "label_store", "run_lock": "label_store",
    "NO_TISSUE": "label_values", "LabelClass": "label_values", "label_classes_for": "label_values",
    "SlidePlan": "planning", "plan_slide": "planning", "tile_groups": "planning",
    "STAGES": "progress", "ProgressCallback": "progress", "ProgressEvent": "progress", "check_cancelled": "progress",
    "RegionLabels": "region", "segment_region": "region",
    "RunStats": "running", "local_client": "running", "run_tiles": "running",
    "InferenceSettings": "tile_inference",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "NO_TISSUE",
    "STAGES",
    "InferenceSettings",
    "LabelClass",
    "LabelStore",
    "ProgressCallback",
    "ProgressEvent",
    "RegionLabels",
    "RunStats",
    "SlidePlan",
    "check_cancelled",
    "label_classes_for",
    "local_client",
    "plan_slide",
    "run_lock",
    "run_tiles",
    "segment_region",
    "tile_groups",
]
