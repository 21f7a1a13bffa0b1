"""Planning a slide: the level for the model's MPP, the tissue mask, the tile plan, the tiles that hold tissue.

A :class:`SlidePlan` is everything a run needs to know about the slide before any tile is read; it
is small and picklable, so the same plan serves a local run, a cluster run and an in-memory region.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from wsi_espnet.errors import InputError
from wsi_espnet.geometry import Region
from wsi_espnet.models.config import ModelConfig
from wsi_espnet.models.espnet import TOTAL_STRIDE
from wsi_espnet.slides import LevelChoice, SlideReader, choose_level, read_target_region
from wsi_espnet.stain import StainEstimate, estimate_stains
from wsi_espnet.tiling import Tile, TilePlan, plan_tiles
from wsi_espnet.tissue_detection import TissueMask, TissueOptions, detect_tissue

__all__ = ["SlidePlan", "plan_slide", "sample_tissue", "tile_groups", "tiles_touching", "window_key"]

#: A slide's stain is estimated from the centres (this many target pixels square) of at most this many
#: tissue tiles spread over the slide: about 4 M pixels, read where and as the model reads them.
STAIN_SAMPLE_TILES = 16
STAIN_SAMPLE_SIDE = 512


@dataclass(frozen=True)
class SlidePlan:
    """What to read and where to write for one slide.

    reader : the slide (picklable; workers reopen the file).
    choice : the level read and the target grid (``choice.output_mpp`` um/px) the mask is stored on.
    tissue : the tissue mask over level 0.
    tiles : every tile of the target grid with its input window.
    tissue_tiles : the tiles that touch tissue, the only ones ever read.
    """

    reader: SlideReader
    choice: LevelChoice
    tissue: TissueMask
    tiles: TilePlan
    tissue_tiles: tuple[Tile, ...]

    @property
    def slide_name(self) -> str:
        return self.reader.path.name

    def tissue_masks(self, tiles: list[Tile]) -> list[NDArray[np.bool_] | None]:
        """Each tile's tissue mask on the target grid, ``tile.region.shape`` bool (None when detection is off)."""
        return sample_tissue(self.choice, tiles, self.tissue_windows(tiles))

    def tissue_windows(self, tiles: list[Tile]) -> list[TissueMask | None]:
        """The part of the tissue mask under each tile (None when detection is off), for a worker to sample."""
        if self.tissue.method == "disabled":
            return [None] * len(tiles)
        return [self.tissue.window(self.choice.to_level0(t.region)) for t in tiles]

    @functools.cached_property
    def stain(self) -> StainEstimate | None:
        """The slide's H&E stain (Macenko, :mod:`wsi_espnet.stain`) on the target grid, from the tissue of
        up to :data:`STAIN_SAMPLE_TILES` tissue tiles evenly spread over the slide (computed once per plan);
        None when the tissue holds too few stained pixels."""
        tiles = list(self.tissue_tiles[:: max(1, len(self.tissue_tiles) // STAIN_SAMPLE_TILES)][:STAIN_SAMPLE_TILES])
        pixels = [np.zeros((0, 3), dtype=np.uint8)]
        for tile, mask in zip(tiles, self.tissue_masks(tiles), strict=True):
            height, width = min(STAIN_SAMPLE_SIDE, tile.height), min(STAIN_SAMPLE_SIDE, tile.width)
            top, left = (tile.height - height) // 2, (tile.width - width) // 2
            crop = read_target_region(self.reader, self.choice, Region(tile.top + top, tile.left + left, height, width))
            if mask is not None:
                crop = crop[mask[top : top + height, left : left + width]]
            pixels.append(crop.reshape(-1, 3))
        return estimate_stains(np.concatenate(pixels))


def sample_tissue(
    choice: LevelChoice, tiles: Sequence[Tile], windows: Sequence[TissueMask | None]
) -> list[NDArray[np.bool_] | None]:
    """Each tile's tissue mask on the target grid from its window (:meth:`SlidePlan.tissue_windows`)."""
    scale = choice.target_to_level0
    return [None if w is None else w.sample(t.region, scale) for t, w in zip(tiles, windows, strict=True)]


def plan_slide(
    reader: SlideReader,
    config: ModelConfig,
    *,
    halo: int,
    target_mpp: float | None = None,
    tolerance: float = 0.1,
    tile_size: int = 1536,
    tissue: TissueOptions | TissueMask | None = None,
) -> SlidePlan:
    """Plan ``reader``'s slide for the model described by ``config``.

    Parameters
    ----------
    halo : context pixels around each tile, on the target grid (rounded up to the network's stride).
    target_mpp : micrometres per pixel to run the model at; default ``config.target_mpp``.
    tolerance : relative MPP difference within which a level is used without resampling.
    tile_size : output tile side in target pixels, a multiple of the network's stride.
    tissue : detection options (default :class:`TissueOptions`), or a mask already detected on this slide.

    Raises
    ------
    InputError : neither the model nor the caller says which MPP to run at, the slide has no MPP, or a
        size is out of range.
    """
    target = target_mpp or config.target_mpp
    if target is None:
        raise InputError(
            f"model {config.name!r} does not say which micrometres per pixel it expects; pass [[target_mpp]] "
            "(e.g. 0.5 for a model trained on 20x tiles)."
        )
    choice = choose_level(reader, target, tolerance=tolerance)
    tiles = plan_tiles(choice.target_shape, tile_size=tile_size, halo=halo, stride=TOTAL_STRIDE)
    if not isinstance(tissue, TissueMask):
        tissue = detect_tissue(reader, mpp=choice.slide_mpp, options=tissue)
    tissue_tiles = tuple(t for t in tiles if tissue.region_fraction(choice.to_level0(t.region)) > 0)
    return SlidePlan(reader, choice, tissue, tiles, tissue_tiles)


def window_key(tile: Tile) -> tuple[int, int, int, int]:
    """A tile's input window as (top, left, height, width): equal keys mean one shared model pass."""
    return tile.window_top, tile.window_left, tile.window_height, tile.window_width


def tile_groups(tiles: tuple[Tile, ...] | list[Tile], batch_size: int) -> list[list[Tile]]:
    """Fixed batches of ``batch_size`` distinct windows, with every tile each window serves.

    On slides narrower than a window several tiles share one window; grouping them lets the task run
    it once. Windows come largest shape first, each shape together (row-major within it), so a batch
    holds one shape and a runtime compiled per shape meets each shape once, largest first (the peak
    comes at the start, not late in a long slide). The grouping depends only on the plan, so a resumed
    run batches (and computes) alike.
    """
    by_window: dict[tuple[int, int, int, int], list[Tile]] = {}
    for tile in tiles:
        by_window.setdefault(window_key(tile), []).append(tile)
    windows = sorted(by_window.values(), key=lambda group: _shape_order(group[0]))
    return [[t for group in windows[i : i + batch_size] for t in group] for i in range(0, len(windows), batch_size)]


def _shape_order(tile: Tile) -> tuple[int, int, int]:
    """Sort key: larger windows first, then by height (a stable sort keeps row-major order within a shape)."""
    return -tile.window_height * tile.window_width, -tile.window_height, -tile.window_width


def tiles_touching(plan: SlidePlan, region: Region) -> list[Tile]:
    """The plan's tiles (with tissue or not) whose output region meets a target-grid ``region``."""
    return [t for t in plan.tiles if t.region.intersects(region)]
