"""The tile plan: output tiles, and the larger input windows (tile + halo) the model sees for each.

All coordinates are (row, col) pixels of the *target* grid, the slide resampled to the model's
micrometres per pixel. Output tiles partition the target grid; their edges are multiples of the
tile size, which is a multiple of the store's chunk size, so no two tiles write the same chunk.

Each tile's window extends ``halo`` pixels beyond it, snapped to the network's stride (8) so every
window sees the same down-sampling phase as whole-image inference would, and shifted inward at the
slide's edges rather than padded, so the network meets the real border where whole-image inference
meets it too. Windows therefore have one size, except the last row's and column's when their tiles
are thin strips (those windows stop at the slide's edge: the strip plus two halos) and on slides
smaller than a window; same-sized windows batch together.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from wsi_espnet.errors import InputError
from wsi_espnet.geometry import Region

__all__ = ["DEFAULT_STRIDE", "Tile", "TilePlan", "plan_tiles"]

#: ESPNet's total stride (input pixels per pixel of its coarsest feature map); models pass their own.
DEFAULT_STRIDE = 8


@dataclass(frozen=True)
class Tile:
    """One output tile and its input window, in target-grid pixels.

    ``(row, col)`` is the tile's index in the plan's grid. The output region is
    ``[top, top + height) x [left, left + width)``; the window ``[window_top, window_top +
    window_height) x [window_left, ...)`` contains it.
    """

    row: int
    col: int
    top: int
    left: int
    height: int
    width: int
    window_top: int
    window_left: int
    window_height: int
    window_width: int

    @property
    def region(self) -> Region:
        """The output region, in target-grid pixels."""
        return Region(self.top, self.left, self.height, self.width)

    @property
    def window(self) -> Region:
        """The input window (output region + halo), in target-grid pixels."""
        return Region(self.window_top, self.window_left, self.window_height, self.window_width)

    @property
    def crop(self) -> tuple[slice, slice]:
        """Slices that cut the output region out of the window's prediction."""
        r0, c0 = self.top - self.window_top, self.left - self.window_left
        return slice(r0, r0 + self.height), slice(c0, c0 + self.width)


@dataclass(frozen=True)
class TilePlan:
    """Every tile of a ``shape`` target grid, row-major, with ``tile_size`` tiles and ``halo`` context."""

    shape: tuple[int, int]
    tile_size: int
    halo: int
    tiles: tuple[Tile, ...]

    @property
    def grid_shape(self) -> tuple[int, int]:
        """Number of tile rows and columns."""
        return -(-self.shape[0] // self.tile_size), -(-self.shape[1] // self.tile_size)

    def __iter__(self) -> Iterator[Tile]:
        return iter(self.tiles)

    def __len__(self) -> int:
        return len(self.tiles)


def _window(start: int, extent: int, tile_size: int, halo: int, stride: int) -> tuple[int, int]:
    """Window start and length along one axis for the tile starting at ``start``.

    A full window (tile + both halos) is shifted inward at the slide's edges, except the last tile's:
    when a full window would have to shift inward to end at the slide's end, the last tile's window
    starts two halos before it (as much context as a full window gives a tile, all on the side where
    the slide goes on) and stops at the slide's end, unless the tile before it already has the shifted
    window (then both share it and it runs once; so does a whole axis that one window holds). A thin
    strip at the far edge then costs its own pixels plus two halos instead of a whole window, and a plan
    has at most two window lengths per axis (the full one and the last tile's), so at most four shapes.
    """
    padded_extent = -(-extent // stride) * stride
    length = min(-(-(tile_size + 2 * halo) // stride) * stride, padded_extent)
    first = min(max(start - halo, 0), padded_extent - length)
    last_start = padded_extent - length  # where a window shifted inward to the end starts
    previous_shared = start - tile_size - halo >= last_start  # the tile before already has that window: share it
    if start + tile_size >= extent and start - 2 * halo > first and length < padded_extent and not previous_shared:
        return start - 2 * halo, padded_extent - (start - 2 * halo)
    return first, length


def plan_tiles(shape: tuple[int, int], *, tile_size: int, halo: int, stride: int = DEFAULT_STRIDE) -> TilePlan:
    """Plan the tiles of a ``shape = (height, width)`` target grid.

    ``tile_size`` must be a positive multiple of the network's ``stride`` and ``halo`` non-negative;
    the halo is rounded up to a multiple of the stride (the plan's ``halo`` is the rounded value).
    Window sides are ``tile_size + 2 * halo``, or the whole (stride-padded) grid if that is smaller, or, for
    a thin last row or column, from two halos before its tiles to the (stride-padded) grid's end.
    """
    height, width = shape
    if height <= 0 or width <= 0:
        raise InputError(f"cannot tile an empty {height}x{width} image.")
    if tile_size <= 0 or tile_size % stride:
        raise InputError(f"tile size {tile_size} must be a positive multiple of {stride}.")
    if halo < 0:
        raise InputError(f"halo {halo} must be >= 0 pixels.")
    # A stride-multiple halo keeps window starts on the stride grid with the full halo on both sides.
    halo = -(-halo // stride) * stride
    tiles = []
    for row, top in enumerate(range(0, height, tile_size)):
        tile_h = min(tile_size, height - top)
        window_top, window_h = _window(top, height, tile_size, halo, stride)
        for col, left in enumerate(range(0, width, tile_size)):
            tile_w = min(tile_size, width - left)
            window_left, window_w = _window(left, width, tile_size, halo, stride)
            tiles.append(Tile(row, col, top, left, tile_h, tile_w, window_top, window_left, window_h, window_w))
    return TilePlan((height, width), tile_size, halo, tuple(tiles))
