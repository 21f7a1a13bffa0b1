"""Segmenting one region of a slide in memory: no store, no Dask, the same labels a whole-slide run writes.

The region's labels come from the very tiles and windows a whole-slide run with the same tile size
and halo would compute (the plan's global tile grid), so they equal what ``segment_slide`` stores
for those pixels, bit for bit; only the tiles that meet the region are run.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from torch import nn

from wsi_espnet.errors import InputError
from wsi_espnet.geometry import Region
from wsi_espnet.models.checkpoint_io import model_sha256
from wsi_espnet.models.config import ModelConfig
from wsi_espnet.models.receptive_field import HALO_SOURCE, cached_halo_for
from wsi_espnet.segmentation.planning import SlidePlan, plan_slide, tile_groups, tiles_touching
from wsi_espnet.segmentation.progress import ProgressCallback, ProgressEvent, check_cancelled
from wsi_espnet.segmentation.reliability import slide_stain_transform
from wsi_espnet.segmentation.tile_inference import InferenceSettings, label_tiles
from wsi_espnet.slides import SlideReader
from wsi_espnet.tissue_detection import TissueMask, TissueOptions

__all__ = ["RegionLabels", "measured_halo", "segment_region"]


@dataclass(frozen=True)
class RegionLabels:
    """The mask over a region, on the model's target grid.

    labels : ``region.shape`` uint8 mask values (0 no tissue, model class ``c`` as ``c + 1``).
    region : where ``labels`` lie on the target grid (whole pixels covering the requested region).
    output_mpp : micrometres per label pixel.
    target_to_level0 : level-0 slide pixels per label pixel (the label at ``(r, c)`` covers level-0
        rows from ``(region.top + r) * target_to_level0``).
    halo, halo_source : the context used around each tile, and where its size came from.
    """

    labels: NDArray[np.uint8]
    region: Region
    output_mpp: float
    target_to_level0: float
    halo: int
    halo_source: str


def segment_region(
    reader: SlideReader,
    model: nn.Module,
    config: ModelConfig,
    region: Region,
    *,
    target_mpp: float | None = None,
    tolerance: float = 0.1,
    halo: int | None = None,
    tissue: TissueOptions | TissueMask | None = None,
    tile_size: int = 1536,
    batch_size: int = 1,
    precision: str = "auto",
    plan: SlidePlan | None = None,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> RegionLabels:
    """Segment the part of ``reader``'s slide under ``region``, given in **level-0** pixels.

    ``model`` runs where its weights are (in eval mode, as :func:`~wsi_espnet.models.load_model` returns
    it), at ``precision`` ("auto": fp16 autocast on CUDA, fp32 on CPU, as ``segment_slide``).
    ``halo`` defaults to the one ``segment_slide`` measures for the model (cached by its weights);
    ``tissue`` to detecting it. A ``plan`` from an earlier call on the same slide and settings skips the
    planning. Equal to ``segment_slide``'s labels for the same pixels when ``tile_size``, ``halo``,
    ``target_mpp``, ``tolerance``, ``batch_size``, precision and the tissue options are the same.

    Raises
    ------
    InputError : the region lies outside the slide or is empty; see also :func:`plan_slide`.
    Cancelled : ``cancel`` was set (checked between tiles).
    """
    halo_source = "given"
    if halo is None:
        halo, halo_source = measured_halo(model, config), HALO_SOURCE
    if plan is None:
        plan = plan_slide(
            reader, config, halo=halo, target_mpp=target_mpp, tolerance=tolerance, tile_size=tile_size, tissue=tissue
        )
    target = plan.choice.from_level0(region)
    if target.height <= 0 or target.width <= 0:
        level0_height, level0_width = reader.level_shapes[0]
        raise InputError(
            f"region {region} holds no pixel of {reader.path.name}, whose level 0 is {level0_height} x "
            f"{level0_width} (rows x columns); give a region in level-0 pixels inside the slide."
        )
    wanted = {(t.row, t.col) for t in tiles_touching(plan, target)}
    # The slide run's own batches (not a regrouping of the subset), so every window is computed alike.
    groups = [g for g in tile_groups(plan.tissue_tiles, batch_size) if any((t.row, t.col) in wanted for t in g)]
    total = sum(len(g) for g in groups)
    top, left = int(target.top), int(target.left)
    labels = np.zeros(target.shape, dtype=np.uint8)
    device = str(next(model.parameters()).device)
    settings = InferenceSettings(
        None, "in-memory", device, precision, channels_last=True, stain_transform=slide_stain_transform(plan, config)
    )
    done = 0
    for group in groups:
        check_cancelled(cancel, reader.path.name)
        values, _, _ = label_tiles(reader, plan.choice, group, plan.tissue_masks(group), model, config, settings)
        for tile, tile_labels in zip(group, values, strict=True):
            overlap = _overlap(tile.region, target)
            if overlap is None:
                continue
            rows, cols = overlap
            labels[rows.start - top : rows.stop - top, cols.start - left : cols.stop - left] = tile_labels[
                rows.start - tile.top : rows.stop - tile.top, cols.start - tile.left : cols.stop - tile.left
            ]
        done += len(group)
        if on_progress is not None:
            on_progress(ProgressEvent(reader.path.name, "tiles", done, total))
    return RegionLabels(
        labels, target, plan.choice.output_mpp, plan.choice.target_to_level0, plan.tiles.halo, halo_source
    )


def measured_halo(model: nn.Module, config: ModelConfig) -> int:
    """The halo ``segment_slide`` measures for ``model`` (cached by its weights), for a region run or a
    plan made ahead of one: measured on a CPU fp32 copy, as a GPU's TF32 could round it otherwise."""
    cpu_model = copy.deepcopy(model).cpu()
    return cached_halo_for(cpu_model, model_sha256(cpu_model, config))


def _overlap(a: Region, b: Region) -> tuple[slice, slice] | None:
    top, left = max(int(a.top), int(b.top)), max(int(a.left), int(b.left))
    bottom, right = min(int(a.bottom), int(b.bottom)), min(int(a.right), int(b.right))
    if bottom <= top or right <= left:
        return None
    return slice(top, bottom), slice(left, right)
