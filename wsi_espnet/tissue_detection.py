"""Tissue detection at low resolution, so glass is never read at full resolution nor sent to the model.

Bright-field (H&E, IHC) slides: tissue is coloured and glass is not, so the HSV saturation is
thresholded (Otsu, with a floor so a blank slide's colour cast is not "tissue"). Dark-background
(fluorescence) slides are recognised by their median brightness and thresholded on brightness
instead. A closing joins tissue fragments, then small holes are filled and specks removed, with
sizes in micrometres so the result does not depend on the scan resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import dask.array as da
import numpy as np
from numpy.typing import NDArray
from skimage import filters, morphology

from wsi_espnet.errors import InputError
from wsi_espnet.geometry import Region
from wsi_espnet.slides import SlideReader, slide_level_dask

__all__ = ["TissueMask", "TissueOptions", "detect_tissue"]

#: Levels up to this many pixels are read whole; larger ones chunk by chunk.
_READ_WHOLE_PIXELS = 1 << 26


@dataclass(frozen=True)
class TissueOptions:
    """How tissue is found.

    Attributes
    ----------
    enabled : False treats the whole slide as tissue.
    mask_mpp : micrometres per mask pixel (coarser masks are faster; 8 resolves 0.1 mm features).
    threshold : saturation (bright-field) or brightness (fluorescence) in 0-1; None = Otsu.
    min_saturation : floor for the Otsu saturation threshold on bright-field slides.
    closing_um : radius of the closing that joins tissue fragments.
    min_area_um2 : tissue pieces and holes smaller than this are dropped / filled.
    """

    enabled: bool = True
    mask_mpp: float = 8.0
    threshold: float | None = None
    min_saturation: float = 0.05
    closing_um: float = 24.0
    min_area_um2: float = 20_000.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mask_mpp) and self.mask_mpp > 0):
            raise InputError(f"tissue mask_mpp={self.mask_mpp} must be a positive number of micrometres.")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise InputError(f"tissue threshold={self.threshold} must be between 0 and 1.")


@dataclass(frozen=True)
class TissueMask:
    """A boolean (rows, cols) tissue mask over the slide; one mask pixel covers ``downsample`` level-0 pixels.

    Attributes
    ----------
    mask : (h, w) bool, True where there is tissue.
    downsample : level-0 pixels per mask pixel (same along rows and columns).
    mpp : micrometres per mask pixel.
    threshold : the threshold used (NaN when detection was disabled or nothing varied).
    method : "saturation" (bright-field), "brightness" (fluorescence), "uniform" (no contrast at all:
        no tissue) or "disabled".
    origin : level-0 (row, col) of the mask's first pixel's corner; non-zero for a :meth:`window`.
    """

    mask: NDArray[np.bool_]
    downsample: float
    mpp: float
    threshold: float
    method: str
    origin: tuple[float, float] = (0.0, 0.0)

    @property
    def fraction(self) -> float:
        """Share of the slide area that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def area_mm2(self) -> float:
        """Tissue area in square millimetres."""
        return float(self.mask.sum()) * (self.mpp / 1000.0) ** 2

    def region_fraction(self, region: Region) -> float:
        """Tissue share of a level-0 pixel ``region``.

        Every mask pixel the region touches counts, so a region with any tissue near it is never 0.
        """
        r0, c0, r1, c1 = self._bounds(region)
        window = self.mask[max(r0, 0) : max(r1, 0), max(c0, 0) : max(c1, 0)]
        return float(window.mean()) if window.size else 0.0

    def _bounds(self, region: Region) -> tuple[int, int, int, int]:
        """Mask pixel rows/cols ``[r0, r1) x [c0, c1)`` touched by a level-0 region (unclipped)."""
        top, left = region.top - self.origin[0], region.left - self.origin[1]
        r0, c0 = math.floor(top / self.downsample), math.floor(left / self.downsample)
        r1 = max(r0 + 1, math.ceil((top + region.height) / self.downsample))
        c1 = max(c0 + 1, math.ceil((left + region.width) / self.downsample))
        return r0, c0, r1, c1

    def window(self, region: Region) -> TissueMask:
        """The part of the mask under a level-0 ``region`` (plus one pixel), small enough to ship to a worker."""
        r0, c0, r1, c1 = self._bounds(region)
        r0, c0 = max(r0 - 1, 0), max(c0 - 1, 0)
        origin = (self.origin[0] + r0 * self.downsample, self.origin[1] + c0 * self.downsample)
        return replace(self, mask=self.mask[r0 : max(r1 + 1, r0), c0 : max(c1 + 1, c0)].copy(), origin=origin)

    def sample(self, region: Region, scale: float) -> NDArray[np.bool_]:
        """The mask on a grid whose pixels are ``scale`` level-0 pixels, over that grid's ``region``.

        Returns ``region.shape`` bool; nearest-neighbour: pixel (r, c) takes the mask pixel holding its centre.
        For a tile of a model's target grid, ``scale`` is :attr:`LevelChoice.target_to_level0`.
        """
        height, width = region.shape
        top, left = region.top * scale - self.origin[0], region.left * scale - self.origin[1]
        rows = ((top + (np.arange(height) + 0.5) * scale) // self.downsample).astype(np.int64)
        cols = ((left + (np.arange(width) + 0.5) * scale) // self.downsample).astype(np.int64)
        inside_r = (rows >= 0) & (rows < self.mask.shape[0])
        inside_c = (cols >= 0) & (cols < self.mask.shape[1])
        out = np.zeros((height, width), dtype=bool)
        out[np.ix_(inside_r, inside_c)] = self.mask[np.ix_(rows[inside_r], cols[inside_c])]
        return out


def _read_downsampled(reader: SlideReader, level: int, factor: int) -> NDArray[np.float32]:
    """Level ``level`` averaged over ``factor x factor`` blocks, as (h, w, 3) float32 in 0-1.

    Partial blocks at the bottom and right edges count (the level is edge-padded to whole blocks),
    so tissue touching the slide's edge is not cut off the mask.
    """
    height, width = reader.level_shapes[level]
    pad = ((0, -height % factor), (0, -width % factor), (0, 0))
    if height * width <= _READ_WHOLE_PIXELS:
        pixels = np.pad(reader.read_level(level).astype(np.float32), pad, mode="edge")
        blocks = pixels.reshape(pixels.shape[0] // factor, factor, pixels.shape[1] // factor, factor, 3)
        means: NDArray[np.float32] = blocks.mean(axis=(1, 3), dtype=np.float32) / np.float32(255)
        return means
    chunk = max(factor, 2048 // factor * factor)
    lazy = da.pad(slide_level_dask(reader, level, chunk=chunk).astype(np.float32), pad, mode="edge")  # type: ignore[no-untyped-call]
    small = da.coarsen(np.mean, lazy, {0: factor, 1: factor}, trim_excess=True)
    result: NDArray[np.float32] = np.asarray(small.compute(), dtype=np.float32) / np.float32(255)
    return result


def _saturation_brightness(rgb: NDArray[np.float32]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """HSV saturation and value of (h, w, 3) RGB in 0-1, in float32.

    The same definitions as ``skimage.color.rgb2hsv`` (S = (max - min) / max, 0 where max == min; V = max)
    without its float64 hue and copies: on a 40k slide's 2500 x 2500 mask level that is ~100 MB instead of ~400.
    """
    value: NDArray[np.float32] = rgb.max(axis=2)
    delta = value - rgb.min(axis=2)
    saturation = np.divide(delta, value, out=np.zeros_like(value), where=delta > 0)
    return saturation, value


def detect_tissue(reader: SlideReader, *, mpp: float, options: TissueOptions | None = None) -> TissueMask:
    """Find tissue on ``reader``'s slide, whose level 0 has ``mpp`` micrometres per pixel.

    Reads the coarsest level that is at least as fine as ``options.mask_mpp``, averaged down to it.
    An all-glass slide gives an all-False mask (method "uniform" or a threshold nothing exceeds).
    """
    options = options or TissueOptions()
    if not (math.isfinite(mpp) and mpp > 0):
        raise InputError(f"mpp={mpp} must be a positive number of micrometres per pixel.")
    wanted = max(1.0, options.mask_mpp / mpp)
    level = max((i for i, d in enumerate(reader.level_downsamples) if d <= wanted), default=0)
    factor = max(1, int(wanted / reader.level_downsamples[level]))
    downsample = reader.level_downsamples[level] * factor
    mask_mpp = mpp * downsample
    if not options.enabled:
        height, width = reader.level_shapes[level]
        full = np.ones((-(-height // factor), -(-width // factor)), dtype=bool)
        return TissueMask(full, downsample, mask_mpp, float("nan"), "disabled")

    saturation, brightness = _saturation_brightness(_read_downsampled(reader, level, factor))
    fluorescence = float(np.median(brightness)) < 0.35
    feature = brightness if fluorescence else saturation
    del saturation, brightness
    method = "brightness" if fluorescence else "saturation"
    if float(feature.max() - feature.min()) < 0.02 and options.threshold is None:
        return TissueMask(np.zeros(feature.shape, dtype=bool), downsample, mask_mpp, float("nan"), "uniform")
    if options.threshold is not None:
        threshold = options.threshold
    else:
        threshold = float(filters.threshold_otsu(feature))  # type: ignore[no-untyped-call]
        if not fluorescence:
            threshold = max(threshold, options.min_saturation)
    mask = feature > threshold
    radius = max(1, round(options.closing_um / mask_mpp))
    mask = morphology.closing(mask, morphology.disk(radius))  # type: ignore[no-untyped-call]
    min_pixels = max(1, round(options.min_area_um2 / mask_mpp**2))
    mask = morphology.remove_small_holes(mask, max_size=min_pixels)
    mask = morphology.remove_small_objects(mask, max_size=min_pixels)
    return TissueMask(mask.astype(bool), downsample, mask_mpp, threshold, method)
