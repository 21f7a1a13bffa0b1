"""Choose the pyramid level to read for a model's target resolution in micrometres per pixel."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from wsi_espnet.geometry import Region
from wsi_espnet.slides.reader import SlideError, SlideReader

__all__ = ["LevelChoice", "choose_level", "read_target_region"]

# Absorbs floating-point noise in MPP ratios, e.g. 0.499 * 2 vs 0.998.
_RELATIVE_EPSILON = 1e-9


@dataclass(frozen=True)
class LevelChoice:
    """Which level to read and how to resample it to the target resolution.

    level : the pyramid level to read.
    level_mpp : that level's micrometres per pixel.
    target_mpp : the requested micrometres per pixel.
    scale : level pixels per target pixel, ``target_mpp / level_mpp``; 1.0 when no resampling is needed,
        > 1 to downsample, < 1 to upsample (only when even level 0 is coarser than the target).
    resample : True when ``scale != 1.0``.
    target_shape : ``(H, W)`` of the whole slide at ``target_mpp``, ``round(level_shape / scale)``.
    level_downsample : level-0 pixels per pixel of ``level``.

    The target grid is what the model sees and what the mask is stored on: :attr:`output_mpp` is its
    real resolution and :attr:`target_to_level0` converts it to the slide's level-0 pixels.
    """

    level: int
    level_mpp: float
    target_mpp: float
    scale: float
    resample: bool
    target_shape: tuple[int, int]
    level_downsample: float = 1.0

    @property
    def slide_mpp(self) -> float:
        """Micrometres per level-0 pixel of the slide."""
        return self.level_mpp / self.level_downsample

    @property
    def output_mpp(self) -> float:
        """Micrometres per target-grid pixel: ``target_mpp`` up to the rounding of a level used as is."""
        return self.level_mpp * self.scale

    @property
    def target_to_level0(self) -> float:
        """Level-0 pixels per target-grid pixel."""
        return self.output_mpp / self.slide_mpp

    def to_level0(self, region: Region) -> Region:
        """A target-grid region in level-0 pixels (fractional where the grids do not align)."""
        return region.scaled(self.target_to_level0)

    def from_level0(self, region: Region) -> Region:
        """The whole target-grid pixels that cover a level-0 region, clipped to the target grid."""
        covering = region.scaled(1 / self.target_to_level0).covering_pixels()
        height, width = self.target_shape
        top, left = max(0, int(covering.top)), max(0, int(covering.left))
        bottom, right = min(height, int(covering.bottom)), min(width, int(covering.right))
        return Region(top, left, max(0, bottom - top), max(0, right - left))


def choose_level(reader: SlideReader, target_mpp: float, *, tolerance: float = 0.1) -> LevelChoice:
    """The coarsest level at or finer than ``target_mpp`` (within ``tolerance``), and how to resample it.

    A level whose MPP is within ``tolerance`` (relative) of the target is used as is. Otherwise the
    chosen level is resampled: downsampled from the coarsest finer level, or, when even level 0 is
    coarser than the target, upsampled from level 0 (``scale < 1``).

    Raises
    ------
    SlideError : the slide has no MPP (and none was given to :func:`open_slide`), or ``target_mpp`` /
        ``tolerance`` is out of range.
    """
    if (
        isinstance(target_mpp, bool)
        or not isinstance(target_mpp, int | float)
        or not (math.isfinite(target_mpp) and target_mpp > 0)
    ):
        raise SlideError(f"target_mpp={target_mpp!r} must be a positive number of micrometres per pixel, e.g. 0.5.")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not 0 <= tolerance < 1:
        raise SlideError(f"tolerance={tolerance!r} must be in [0, 1), e.g. 0.1 for 10%.")
    if reader.mpp is None:
        raise SlideError(
            f"{reader.path.name} has no micrometres-per-pixel (MPP) metadata, so the level for "
            f"{target_mpp:g} um/px cannot be chosen. Pass the scan resolution explicitly with [[mpp]], "
            "e.g. [[mpp=0.25]] for a 40x scan or [[mpp=0.5]] for a 20x scan."
        )
    level_mpps = [reader.mpp * downsample for downsample in reader.level_downsamples]
    upper = target_mpp * (1 + tolerance) * (1 + _RELATIVE_EPSILON)
    finer = [level for level, mpp in enumerate(level_mpps) if mpp <= upper]
    level = max(finer, key=lambda lvl: level_mpps[lvl]) if finer else 0
    level_mpp = level_mpps[level]
    within = abs(level_mpp / target_mpp - 1) <= tolerance * (1 + _RELATIVE_EPSILON) + _RELATIVE_EPSILON
    scale = 1.0 if within else target_mpp / level_mpp
    height, width = reader.level_shapes[level]
    return LevelChoice(
        level=level,
        level_mpp=level_mpp,
        target_mpp=float(target_mpp),
        scale=scale,
        resample=scale != 1.0,
        target_shape=(max(1, round(height / scale)), max(1, round(width / scale))),
        level_downsample=reader.level_downsamples[level],
    )


def read_target_region(reader: SlideReader, choice: LevelChoice, region: Region) -> NDArray[np.uint8]:
    """A ``(height, width, 3)`` uint8 window of the slide on the *target* grid of ``choice``.

    ``region`` is in whole target-grid pixels. Without resampling this is a plain read of
    ``choice.level``; otherwise the level region under the window (plus the filter's support) is read
    and resampled with an antialiased bilinear filter whose sampling positions depend only on the
    global target grid, so neighbouring windows join without seams. Outside the slide is white.
    """
    top, left, height, width = (int(v) for v in (region.top, region.left, region.height, region.width))
    if not choice.resample:
        return reader.read_region(choice.level, top, left, height, width)
    scale = choice.scale
    margin = math.ceil(max(scale, 1.0)) + 1
    row0, col0 = math.floor(top * scale) - margin, math.floor(left * scale) - margin
    row1, col1 = math.ceil((top + height) * scale) + margin, math.ceil((left + width) * scale) + margin
    source = Image.fromarray(reader.read_region(choice.level, row0, col0, row1 - row0, col1 - col0))
    box = (left * scale - col0, top * scale - row0, (left + width) * scale - col0, (top + height) * scale - row0)
    resized = source.resize((width, height), resample=Image.Resampling.BILINEAR, box=box)
    return np.asarray(resized, dtype=np.uint8)
