"""The one rectangle type: a region of a pixel grid in (row, col) order.

Slide levels, the model's target grid, tiles and the tissue mask all speak in :class:`Region`; the
conversions between grids are in :class:`~wsi_espnet.slides.levels.LevelChoice`, nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Region"]


@dataclass(frozen=True)
class Region:
    """``[top, top + height) x [left, left + width)`` of a pixel grid, (row, col) order.

    Which grid (a slide level, level 0, the target grid of a model) is the caller's to say; fields
    are whole pixels on the grid they were made for, and may be fractional once scaled to another.
    """

    top: float
    left: float
    height: float
    width: float

    @property
    def bottom(self) -> float:
        return self.top + self.height

    @property
    def right(self) -> float:
        return self.left + self.width

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` as whole pixels (for regions on their own grid)."""
        return int(self.height), int(self.width)

    def scaled(self, factor: float) -> Region:
        """The same area on another grid, one pixel of this grid being ``factor`` pixels of that one."""
        return Region(self.top * factor, self.left * factor, self.height * factor, self.width * factor)

    def covering_pixels(self) -> Region:
        """The smallest region of whole pixels that contains this one.

        Edges within 1e-6 pixel of a whole pixel count as on it, so a region scaled to another grid
        and back does not grow by a pixel from floating-point noise.
        """
        top, left = math.floor(_snapped(self.top)), math.floor(_snapped(self.left))
        bottom, right = math.ceil(_snapped(self.bottom)), math.ceil(_snapped(self.right))
        return Region(top, left, bottom - top, right - left)

    def intersects(self, other: Region) -> bool:
        return (
            self.top < other.bottom and other.top < self.bottom and self.left < other.right and other.left < self.right
        )


def _snapped(value: float, tolerance: float = 1e-6) -> float:
    nearest = round(value)
    return float(nearest) if abs(value - nearest) <= tolerance else value
