"""Where on the slide the widget runs: the part of the slide image on the canvas, or the shapes drawn
over it, as level-0 pixel regions.

napari places every layer in micrometres (see :mod:`.layers`): a layer's ``scale`` is its micrometres
per pixel and ``translate`` puts pixel corners where they belong, so world ``w`` lies at level-0
pixel edge ``(w - corner) / scale`` with ``corner = translate - scale / 2``. Only scale and translate
are used (layers are not rotated or sheared); outlines are ``(N, 2)`` float arrays of level-0
``(row, col)`` pixel edges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from skimage.draw import polygon2mask

from wsi_espnet.errors import InputError
from wsi_espnet.geometry import Region

__all__ = ["SlideFrame", "outline_mask", "outline_region", "shape_outlines", "view_region", "visible_region"]

#: Points on the outline of a drawn ellipse.
_ELLIPSE_POINTS = 128
#: Shape types with an inside.
_AREA_SHAPES = ("rectangle", "ellipse", "polygon")


@dataclass(frozen=True)
class SlideFrame:
    """Where a slide image layer's level-0 pixels lie in napari's world (micrometres).

    scale : ``(y, x)`` micrometres per level-0 pixel.
    corner : world ``(y, x)`` of level-0 pixel (0, 0)'s top-left corner.
    shape : level-0 ``(height, width)`` in pixels.
    """

    scale: tuple[float, float]
    corner: tuple[float, float]
    shape: tuple[int, int]

    @classmethod
    def of(cls, layer: Any) -> SlideFrame:
        """The frame of a napari Image layer of a slide (multiscale or not)."""
        scale = np.asarray(layer.scale[-2:], dtype=float)
        corner = np.asarray(layer.translate[-2:], dtype=float) - scale / 2
        level0 = layer.data[0] if layer.multiscale else layer.data
        height, width = np.shape(level0)[:2]
        return cls((scale[0], scale[1]), (corner[0], corner[1]), (int(height), int(width)))

    def to_level0(self, world: NDArray[np.floating[Any]]) -> NDArray[np.float64]:
        """World ``(N, 2)`` ``(y, x)`` micrometres -> level-0 ``(row, col)`` pixel edges."""
        level0: NDArray[np.float64] = (np.asarray(world, dtype=float) - self.corner) / np.asarray(self.scale)
        return level0

    def covering(self, outline: NDArray[np.floating[Any]]) -> Region | None:
        """The whole level-0 pixels around an outline, clipped to the slide; None when it misses the slide."""
        top, left = np.floor(outline.min(axis=0) + 1e-6)
        bottom, right = np.ceil(outline.max(axis=0) - 1e-6)
        top, left = max(0, int(top)), max(0, int(left))
        bottom, right = min(self.shape[0], int(bottom)), min(self.shape[1], int(right))
        if bottom <= top or right <= left:
            return None
        return Region(top, left, bottom - top, right - left)


def view_region(frame: SlideFrame, *, center: tuple[float, float], zoom: float, canvas_size: tuple[int, int]) -> Region:
    """The level-0 pixels of the slide on a canvas of ``canvas_size`` ``(height, width)`` screen pixels
    showing world ``center`` ``(y, x)`` at ``zoom`` screen pixels per micrometre.

    Raises :class:`InputError` when the slide is out of view.
    """
    half = np.asarray(canvas_size, dtype=float) / zoom / 2
    corners = np.array([np.asarray(center) - half, np.asarray(center) + half])
    region = frame.covering(frame.to_level0(corners))
    if region is None:
        raise InputError("the slide is not in view; pan or zoom to it (View > Reset view), then run again.")
    return region


def visible_region(viewer: Any, slide: Any) -> Region:
    """The level-0 pixels of the ``slide`` image layer that ``viewer``'s canvas shows now (2D view)."""
    if viewer.dims.ndisplay != 2:
        raise InputError("the visible region needs the 2D view; switch off 3D display, then run again.")
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari >= 0.9 : older
    canvas_size = viewer.canvas.size if hasattr(viewer, "canvas") else viewer._canvas_size
    center = tuple(camera.center[-2:])
    return view_region(SlideFrame.of(slide), center=center, zoom=float(camera.zoom), canvas_size=tuple(canvas_size))


def shape_outlines(shapes: Any, frame: SlideFrame) -> list[NDArray[np.float64]]:
    """The outlines of a Shapes layer's rectangles, ellipses and polygons in level-0 ``(row, col)`` pixels.

    Raises :class:`InputError` when the layer has no shapes or holds lines or paths (they enclose nothing).
    """
    if len(shapes.data) == 0:
        raise InputError(f"shapes layer {shapes.name!r} is empty; draw rectangles, ellipses or polygons on it.")
    kinds = sorted({kind for kind in shapes.shape_type if kind not in _AREA_SHAPES})
    if kinds:
        raise InputError(
            f"shapes layer {shapes.name!r} holds {' and '.join(kinds)} shapes, which enclose no area; draw "
            f"rectangles, ellipses or polygons instead."
        )
    scale = np.asarray(shapes.scale[-2:], dtype=float)
    translate = np.asarray(shapes.translate[-2:], dtype=float)
    outlines = []
    for vertices, kind in zip(shapes.data, shapes.shape_type, strict=True):
        world = np.asarray(vertices, dtype=float)[:, -2:] * scale + translate
        outlines.append(frame.to_level0(_ellipse(world) if kind == "ellipse" else world))
    return outlines


def outline_region(outline: NDArray[np.float64], frame: SlideFrame) -> Region:
    """The bounding box of a level-0 outline in whole pixels, clipped to the slide."""
    region = frame.covering(outline)
    if region is None:
        raise InputError("a drawn shape lies outside the slide; draw the shapes over the slide.")
    return region


def outline_mask(outline: NDArray[np.float64], region: Region, target_to_level0: float) -> NDArray[np.bool_]:
    """Which pixels of ``region`` (on a target grid of ``target_to_level0`` level-0 pixels per pixel) have
    their centres inside a level-0 ``outline``; ``(region.height, region.width)`` bool."""
    on_grid = outline / target_to_level0 - np.array([region.top, region.left]) - 0.5  # pixel centres at integers
    mask: NDArray[np.bool_] = polygon2mask(region.shape, on_grid)  # type: ignore[no-untyped-call]
    return mask


def _ellipse(corners: NDArray[np.float64]) -> NDArray[np.float64]:
    """The ellipse napari draws in a box of four corners (in order round the box), as a polygon."""
    center = corners.mean(axis=0)
    half_a, half_b = (corners[1] - corners[0]) / 2, (corners[3] - corners[0]) / 2
    angles = np.linspace(0, 2 * math.pi, _ELLIPSE_POINTS, endpoint=False)[:, None]
    outline: NDArray[np.float64] = center + np.cos(angles) * half_a + np.sin(angles) * half_b
    return outline
