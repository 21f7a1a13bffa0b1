"""Where tiles are stitched: plan a slide, run its tiles on a Dask cluster into a label store, or one region in memory.

>>> plan = plan_slide(reader, config, halo=376)                      # doctest: +SKIP
>>> stats = run_tiles(plan, settings, store, client=client)           # doctest: +SKIP
>>> labels = segment_region(reader, model, config, Region(0, 0, 4096, 4096)).labels   # doctest: +SKIP

:func:`wsi_espnet.segment_slide.segment_slide` ties these to the outputs for one slide.
"""

from wsi_espnet.segmentation.label_store import LabelStore, run_lock
from wsi_espnet.segmentation.label_values import NO_TISSUE, LabelClass, label_classes_for
from wsi_espnet.segmentation.planning import SlidePlan, plan_slide, tile_groups
from wsi_espnet.segmentation.progress import STAGES, ProgressCallback, ProgressEvent, check_cancelled
from wsi_espnet.segmentation.region import RegionLabels, segment_region
from wsi_espnet.segmentation.running import RunStats, local_client, run_tiles
from wsi_espnet.segmentation.tile_inference import InferenceSettings

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
