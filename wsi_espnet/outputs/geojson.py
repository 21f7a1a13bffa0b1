"""Mask classes as GeoJSON polygons in level-0 slide pixels, the form QuPath imports as annotations.

Each class present becomes one Feature whose geometry is a MultiPolygon: one polygon per 4-connected
region, its outline as the exterior ring and the outlines of the regions it encloses as holes.
Outlines follow pixel edges (marching squares, with each cut corner put back), so before
simplification a polygon covers exactly its pixels; only where two pixels of a class touch by a
corner alone is that corner cut, so that rings never touch.
Rings are closed and oriented as RFC 7946 asks: exteriors counter-clockwise, holes clockwise, with
orientation taken in the (x, y) plane of the coordinates as written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numpy.typing import NDArray
from skimage import measure

from wsi_espnet.atomic_files import replacing
from wsi_espnet.errors import InputError
from wsi_espnet.segmentation.label_values import NO_TISSUE, LabelClass, check_label_classes

__all__ = ["write_geojson"]

#: Decimal places kept for coordinates (in level-0 pixels).
_DECIMALS = 3

Ring = list[list[float]]
Polygon = list[Ring]


def write_geojson(
    labels: zarr.Array[Any] | NDArray[np.integer[Any]],
    path: Path,
    *,
    downsample: float,
    classes: Sequence[LabelClass],
    simplify_tolerance: float = 0.5,
    origin: tuple[float, float] = (0.0, 0.0),
) -> Path:
    """Write one QuPath annotation Feature per class present in ``labels`` and return ``path``.

    Parameters
    ----------
    labels : (H, W) integer array (zarr or numpy)
        A mask level small enough to load whole (e.g. a pyramid level of <= 64 megapixels).
    path : Path
        Output ``.geojson`` file; written under a temporary name and renamed when complete.
    downsample : float
        Level-0 pixels per pixel of ``labels``: pixel ``(row r, col c)`` covers
        ``x in [c * downsample, (c + 1) * downsample)`` and the same for ``y`` with ``r``.
    classes : sequence of LabelClass
        Classes to export; value 0 ("no tissue") and classes absent from the mask give no Feature,
        values without a class are not exported.
    simplify_tolerance : float
        Largest distance, in pixels of ``labels``, that simplification may move an outline
        (Douglas-Peucker); 0 keeps every vertex.
    origin : (float, float)
        ``(row, col)`` of ``labels[0, 0]`` on its grid when ``labels`` is a crop of a larger mask (a
        region): pixel ``(r, c)`` then covers ``x in [(c + col) * downsample, ...)``.
    """
    path = Path(path)
    if (
        not isinstance(labels, np.ndarray | zarr.Array)
        or labels.ndim != 2
        or not np.issubdtype(labels.dtype, np.integer)
    ):
        got = f"{labels.dtype} array of shape {labels.shape}" if hasattr(labels, "dtype") else type(labels).__name__
        raise InputError(f"labels must be a 2-D integer mask (zarr or numpy), got a {got}.")
    if not isinstance(downsample, int | float) or not math.isfinite(downsample) or downsample <= 0:
        raise InputError(f"downsample={downsample!r} must be a positive number of level-0 pixels per mask pixel.")
    if not isinstance(simplify_tolerance, int | float) or not simplify_tolerance >= 0:
        raise InputError(f"simplify_tolerance={simplify_tolerance!r} must be a number of pixels >= 0.")
    if len(origin) != 2 or not all(isinstance(v, int | float) and math.isfinite(v) for v in origin):
        raise InputError(f"origin={origin!r} must be a (row, col) pair of finite numbers of mask pixels.")
    check_label_classes(classes, labels.dtype)
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: folder {path.parent} does not exist.")

    mask = np.asarray(labels[...])
    features = []
    for label in classes:
        if label.value == NO_TISSUE:
            continue
        polygons = _mask_polygons(
            mask == label.value, downsample=downsample, simplify_tolerance=simplify_tolerance, origin=origin
        )
        if not polygons:
            continue
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "MultiPolygon", "coordinates": polygons},
                "properties": {
                    "objectType": "annotation",
                    "name": label.name,
                    "classification": {"name": label.name, "color": list(label.color)},
                },
            }
        )
    text = json.dumps({"type": "FeatureCollection", "features": features}, separators=(",", ":"))
    with replacing(path) as partial:
        partial.write_text(text, encoding="utf-8")
    return path


def _mask_polygons(
    mask: NDArray[np.bool_], *, downsample: float, simplify_tolerance: float, origin: tuple[float, float]
) -> list[Polygon]:
    """Outline the ``True`` regions of a ``(H, W)`` mask: one ``[exterior, hole, ...]`` per 4-connected region.

    Rings are closed lists of ``[x, y]`` in level-0 pixels (``(col, row)`` pixel edges, shifted by
    ``origin``, times ``downsample``).
    """
    polygons = []
    regions = measure.label(mask, connectivity=1)  # type: ignore[no-untyped-call]
    for region in measure.regionprops(regions):  # type: ignore[no-untyped-call]
        rows, cols = region.slice
        # Padding closes every contour; the crop holds this region only, so inner contours are its holes.
        crop = np.zeros((rows.stop - rows.start + 2, cols.stop - cols.start + 2), dtype=np.float64)
        crop[1:-1, 1:-1] = region.image
        contours = [_pixel_edges(contour, crop) for contour in measure.find_contours(crop, 0.5)]  # type: ignore[no-untyped-call]
        outer = int(np.argmax([abs(_signed_area(contour)) for contour in contours]))
        # Padded index i is row i - 1 + rows.start, and pixel edges lie half a pixel before centres.
        offset = np.array([cols.start - 0.5 + origin[1], rows.start - 0.5 + origin[0]])
        polygon = []
        for index, contour in enumerate(contours):
            ring = _simplified(contour, simplify_tolerance)
            xy = (ring[:, ::-1] + offset) * downsample
            if (_signed_area(xy) > 0) != (index == outer):
                xy = xy[::-1]
            polygon.append(np.round(xy, _DECIMALS).tolist())
        polygon.insert(0, polygon.pop(outer))
        polygons.append(polygon)
    return polygons


def _pixel_edges(contour: NDArray[np.float64], image: NDArray[np.float64]) -> NDArray[np.float64]:
    """Turn a marching-squares contour of a binary ``image`` into the pixel-edge outline it approximates.

    Marching squares joins the midpoints of pixel edges and so cuts every corner diagonally; each
    diagonal step is replaced by the pixel corner it cuts, except at saddles (two pixels touching
    only by a corner) where the cut keeps regions and holes from touching. Points on straight runs
    are dropped, so the ring starts at a corner and simplification keeps corners in place.
    """
    points = contour[:-1]
    following = contour[1:]
    row_on_edge = points[:, 0] % 1 != 0  # this point lies on a horizontal pixel edge
    corners = np.where(row_on_edge, [points[:, 0], following[:, 1]], [following[:, 0], points[:, 1]]).T
    diagonal = (points[:, 0] != following[:, 0]) & (points[:, 1] != following[:, 1])
    top, left = np.floor(corners[diagonal]).astype(np.intp).T
    block = image[top, left], image[top, left + 1], image[top + 1, left], image[top + 1, left + 1]
    saddle = (block[0] == block[3]) & (block[1] == block[2]) & (block[0] != block[1])
    use_corner = diagonal.copy()
    use_corner[diagonal] = ~saddle
    ring = np.stack([points, corners], axis=1)[np.stack([np.ones_like(use_corner), use_corner], axis=1)]
    closed = np.concatenate([ring[-1:], ring, ring[:1]])
    incoming, outgoing = ring - closed[:-2], closed[2:] - ring
    turning = incoming[:, 0] * outgoing[:, 1] != incoming[:, 1] * outgoing[:, 0]
    vertices = ring[turning]
    return np.concatenate([vertices, vertices[:1]])


def _simplified(ring: NDArray[np.float64], tolerance: float) -> NDArray[np.float64]:
    """Douglas-Peucker simplified closed ring, or the ring itself when simplifying would flatten it."""
    if tolerance == 0 or len(ring) <= 5:  # a rectangle has nothing to simplify
        return ring
    simplified: NDArray[np.float64] = measure.approximate_polygon(ring, tolerance)  # type: ignore[no-untyped-call]
    return simplified if len(simplified) >= 4 and _signed_area(simplified) != 0 else ring


def _signed_area(ring: NDArray[np.float64]) -> float:
    """Shoelace area of a closed ``(N, 2)`` ring; positive when counter-clockwise in its own axes."""
    x, y = ring[:, 0], ring[:, 1]
    return float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])) / 2
