"""Training tiles from whole slides annotated in QuPath.

QuPath's *File > Export objects as GeoJSON* writes a FeatureCollection (older versions a bare list of
Features, or one Feature) whose polygons are in level-0 pixel (x, y) coordinates and whose class is
``properties.classification.name`` (a plain string ``properties.classification`` in some versions;
``properties.name`` is the object's own name, never its class).

- :func:`read_qupath_annotations` turns such a file into :class:`Annotation` objects with class indices.
- :func:`rasterize_annotations` paints them onto any pixel grid, e.g. one tile at a target resolution.
- :func:`sample_annotated_tiles` cuts a slide into labelled training tiles at a target micrometres per
  pixel, reading pixels exactly as ``segment`` reads them at that resolution.

Rules, the same everywhere in this module:

- Only polygon annotations are labels. Features whose geometry is not a Polygon or MultiPolygon
  (points, lines, no geometry) and QuPath objects other than annotations (detections, cells, tiles,
  TMA cores) are skipped; how many, and of which kind, is logged at INFO level.
- A pixel belongs to a polygon when its centre lies inside the exterior ring and outside every hole;
  a centre exactly on a ring counts as on that ring's inside (so it is cut out by a hole).
- Where annotations overlap, the smaller one wins: annotations are painted largest area first, so a
  tumour region drawn inside a stroma outline keeps its class. Equal areas keep the file's order.
- Coordinates beyond the slide are clipped: tiles cover only annotations' parts inside the slide, and
  tile pixels past the slide's edge are white in the image and ``ignore_index`` in the labels.
  An annotation entirely outside the slide is an error (its GeoJSON most likely belongs to another image).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from skimage import draw

from wsi_espnet.errors import InputError
from wsi_espnet.geometry import Region
from wsi_espnet.slides import choose_level, open_slide, read_target_region

__all__ = [
    "AnnotatedTile",
    "Annotation",
    "rasterize_annotations",
    "read_qupath_annotations",
    "sample_annotated_tiles",
]

logger = logging.getLogger(__name__)

#: ``(N, 2)`` float64 level-0 (x, y) vertices of a closed ring, the closing vertex not repeated.
Ring = NDArray[np.float64]
#: An exterior ring and its holes.
PolygonWithHoles = tuple[Ring, tuple[Ring, ...]]

_INT16 = np.iinfo(np.int16)
_UNLABELLED_GEOMETRIES = ("Point", "MultiPoint", "LineString", "MultiLineString")


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no single truth value to compare by
class Annotation:
    """One classified polygon annotation.

    class_index : index into the class names it was read with.
    polygons : ``(exterior, holes)`` pairs; every ring a read-only ``(N, 2)`` float64 array of level-0
        (x, y) pixel coordinates with N >= 3, the closing vertex not repeated.
    feature_index : position of its Feature in the GeoJSON file, for messages; None if not from a file.
    """

    class_index: int
    polygons: tuple[PolygonWithHoles, ...]
    feature_index: int | None = None

    @cached_property
    def area(self) -> float:
        """Area in level-0 pixels squared: exteriors less their holes."""
        return sum(_ring_area(exterior) - sum(_ring_area(hole) for hole in holes) for exterior, holes in self.polygons)

    @cached_property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(x_min, y_min, x_max, y_max)`` of the exteriors, in level-0 pixels."""
        points = np.concatenate([exterior for exterior, _ in self.polygons])
        x_min, y_min = points.min(axis=0)
        x_max, y_max = points.max(axis=0)
        return float(x_min), float(y_min), float(x_max), float(y_max)


@dataclass(frozen=True, eq=False)
class AnnotatedTile:
    """One training tile on the target grid of a slide.

    image : ``(tile_size, tile_size, 3)`` uint8 RGB at the target MPP; white past the slide's edge.
    labels : ``(tile_size, tile_size)`` class indices, uint8 or int16 (see :func:`rasterize_annotations`).
    origin_xy : level-0 (x, y) of the tile's top-left corner.
    scale : level-0 pixels per tile pixel: tile pixel ``(r, c)`` covers level-0
        ``x in [origin_x + c * scale, origin_x + (c + 1) * scale)``, and the same for ``y`` with ``r``.
    slide : the slide file.
    """

    image: NDArray[np.uint8]
    labels: NDArray[np.uint8] | NDArray[np.int16]
    origin_xy: tuple[float, float]
    scale: float
    slide: Path


# --- reading QuPath GeoJSON --------------------------------------------------------------------


def read_qupath_annotations(
    path: str | os.PathLike[str],
    class_names: Sequence[str],
    *,
    class_map: Mapping[str, str | int] | None = None,
) -> list[Annotation]:
    """The polygon annotations of a QuPath GeoJSON export, in file order.

    Parameters
    ----------
    path : a FeatureCollection, a list of Features or a single Feature, coordinates in level-0 pixels.
    class_names : our classes; an annotation's class index is its position here. QuPath class names
        match them case-insensitively.
    class_map : QuPath class name -> one of ``class_names`` or a class index, e.g. ``{"Tumor": "tumour"}``;
        keys match case-insensitively and take precedence over ``class_names``.

    Points, lines and non-annotation objects are skipped and counted in an INFO log message.

    Raises
    ------
    InputError : the file is missing or not GeoJSON of that shape; a polygon has no class, or one
        neither ``class_names`` nor ``class_map`` knows; ``class_map`` names a class that does not exist.
    """
    path = Path(path)
    names = _checked_class_names(class_names)
    lookup = _class_lookup(names, class_map)
    features = _load_features(path)
    annotations: list[Annotation] = []
    skipped: Counter[str] = Counter()
    for index, feature in enumerate(features):
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            found = feature.get("type") if isinstance(feature, dict) else type(feature).__name__
            raise InputError(f"{path}: feature {index} is not a GeoJSON Feature (found {found!r}).")
        properties = feature.get("properties") or {}
        if not isinstance(properties, dict):
            raise InputError(f"{path}: feature {index} has properties that are not a JSON object.")
        where = _describe_feature(path, index, properties)
        object_type = properties.get("objectType")
        if object_type not in (None, "annotation"):
            skipped[str(object_type)] += 1
            continue
        geometry = feature.get("geometry")
        polygons = _polygons(geometry, where)
        if not polygons:
            skipped[geometry.get("type", "?") if isinstance(geometry, dict) else "no geometry"] += 1
            continue
        class_index = _class_index(properties, lookup, names, where)
        annotations.append(Annotation(class_index=class_index, polygons=polygons, feature_index=index))
    if skipped:
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(skipped.items()))
        logger.info(
            "%s: skipped %d feature(s) that are not polygon annotations (%s); kept %d annotation(s).",
            path,
            sum(skipped.values()),
            kinds,
            len(annotations),
        )
    return annotations


def _load_features(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"annotation file {path} does not exist; check the path.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read annotation file {path}: {exc}.") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); export the "
            "annotations again from QuPath with File > Export objects as GeoJSON."
        ) from exc
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data.get("type") == "FeatureCollection" and isinstance(data.get("features"), list):
        features: list[Any] = data["features"]
        return features
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    found = data.get("type") if isinstance(data, dict) else type(data).__name__
    raise InputError(
        f"{path} holds {found!r}, not a GeoJSON FeatureCollection, list of Features or single Feature; "
        "export the annotations from QuPath with File > Export objects as GeoJSON."
    )


def _describe_feature(path: Path, index: int, properties: Mapping[str, Any]) -> str:
    name = properties.get("name")
    return f"{path}: feature {index}" + (f" ({name!r})" if isinstance(name, str) and name else "")


def _polygons(geometry: object, where: str) -> tuple[PolygonWithHoles, ...]:
    """The polygons of a geometry; empty for points, lines and a missing geometry."""
    if geometry is None:
        return ()
    if not isinstance(geometry, dict) or not isinstance(geometry.get("type"), str):
        raise InputError(f"{where} has a geometry without a GeoJSON 'type'.")
    kind = geometry["type"]
    if kind == "GeometryCollection":
        members = geometry.get("geometries")
        if not isinstance(members, list):
            raise InputError(f"{where} is a GeometryCollection without a 'geometries' list.")
        return tuple(polygon for member in members for polygon in _polygons(member, where))
    if kind in _UNLABELLED_GEOMETRIES:
        return ()
    if kind not in ("Polygon", "MultiPolygon"):
        raise InputError(f"{where} has geometry type {kind!r}, which is not GeoJSON.")
    coordinates = geometry.get("coordinates")
    if not isinstance(coordinates, list):
        raise InputError(f"{where} is a {kind} without a 'coordinates' list.")
    parts = [coordinates] if kind == "Polygon" else coordinates
    return tuple(_polygon(part, where) for part in parts)


def _polygon(rings: object, where: str) -> PolygonWithHoles:
    if not isinstance(rings, list) or not rings:
        raise InputError(f"{where} has a polygon without rings; a polygon is a list of rings, the exterior first.")
    exterior, *holes = (_ring(ring, where) for ring in rings)
    return exterior, tuple(holes)


def _ring(ring: object, where: str) -> Ring:
    try:
        points = np.array(ring, dtype=np.float64)
    except (ValueError, TypeError):
        points = np.empty((0,))
    if points.ndim != 2 or points.shape[1] not in (2, 3) or not np.isfinite(points).all():
        raise InputError(f"{where} has a ring that is not a list of finite [x, y] positions: {str(ring)[:80]}.")
    points = points[:, :2]
    if len(points) > 1 and (points[0] == points[-1]).all():
        points = points[:-1]
    if len(points) < 3:
        raise InputError(f"{where} has a ring with {len(points)} distinct vertices; a ring needs at least 3.")
    points.flags.writeable = False
    return points


def _checked_class_names(class_names: Sequence[str]) -> list[str]:
    if isinstance(class_names, str) or not isinstance(class_names, Sequence) or not class_names:
        raise InputError(f"class_names={class_names!r} must be a non-empty list of class names, e.g. ['tumour'].")
    names = list(class_names)
    if not all(isinstance(name, str) and name for name in names):
        raise InputError(f"class_names={names!r} must all be non-empty strings.")
    folded = [name.casefold() for name in names]
    duplicates = sorted({name for name in names if folded.count(name.casefold()) > 1})
    if duplicates:
        raise InputError(f"class_names={names!r} repeats {duplicates} (names are compared case-insensitively).")
    return names


def _class_lookup(names: Sequence[str], class_map: Mapping[str, str | int] | None) -> dict[str, int]:
    """Case-folded QuPath class name -> class index."""
    by_name = {name.casefold(): index for index, name in enumerate(names)}
    if class_map is None:
        return by_name
    if not isinstance(class_map, Mapping):
        raise InputError(f"class_map={class_map!r} must map QuPath class names to class names or indices.")
    mapped: dict[str, int] = {}
    for source, target in class_map.items():
        if not isinstance(source, str) or not source:
            raise InputError(f"class_map key {source!r} must be a QuPath class name.")
        if isinstance(target, str) and target.casefold() in by_name:
            index = by_name[target.casefold()]
        elif isinstance(target, int) and not isinstance(target, bool) and 0 <= target < len(names):
            index = target
        else:
            raise InputError(
                f"class_map maps {source!r} to {target!r}, which is neither one of the classes {list(names)} "
                f"nor a class index 0 to {len(names) - 1}."
            )
        if mapped.setdefault(source.casefold(), index) != index:
            raise InputError(f"class_map maps {source!r} (compared case-insensitively) to two different classes.")
    return by_name | mapped


def _class_index(properties: Mapping[str, Any], lookup: Mapping[str, int], names: Sequence[str], where: str) -> int:
    classification = properties.get("classification")
    name: object = classification
    if isinstance(classification, dict):
        name = classification.get("name")
        names_list = classification.get("names")  # some QuPath versions list a derived class's parts
        if name is None and isinstance(names_list, list) and all(isinstance(part, str) for part in names_list):
            name = ": ".join(names_list)
    known = ", ".join(repr(n) for n in names)
    if not isinstance(name, str) or not name.strip():
        raise InputError(
            f"{where} is a polygon annotation without a classification; the known classes are {known}. "
            "Set its class in QuPath (or delete it) and export again."
        )
    index = lookup.get(name.casefold())
    if index is None:
        raise InputError(
            f"{where} has class {name!r}, which is not one of the known classes {known}. Add it to class_map, "
            f"e.g. class_map={{{name!r}: {names[0]!r}}}, or rename the class in QuPath."
        )
    return index


def _ring_area(ring: Ring) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))) / 2


# --- rasterizing --------------------------------------------------------------------------------


def rasterize_annotations(
    annotations: Sequence[Annotation],
    *,
    origin_xy: tuple[float, float],
    scale: float,
    shape: tuple[int, int],
    fill: int,
) -> NDArray[np.uint8] | NDArray[np.int16]:
    """Class indices of ``annotations`` on a pixel grid, ``fill`` where none lies.

    Parameters
    ----------
    annotations : painted largest area first, so the smaller of two overlapping annotations wins
        (equal areas: later in the sequence wins).
    origin_xy : level-0 (x, y) of the grid's top-left corner.
    scale : level-0 pixels per grid pixel: pixel ``(r, c)`` covers level-0
        ``x in [origin_x + c * scale, origin_x + (c + 1) * scale)`` and the same for ``y`` with ``r``.
    shape : ``(H, W)`` of the grid.
    fill : value of pixels outside every annotation, e.g. the ignore index.

    Returns
    -------
    ``(H, W)`` uint8 when ``fill`` and every class index fit in 0..255, else int16. A pixel takes an
    annotation's class when its centre lies inside an exterior ring and outside its holes (a centre
    exactly on a ring counts as inside that ring).
    """
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not (math.isfinite(scale) and scale > 0):
        raise InputError(f"scale={scale!r} must be a positive number of level-0 pixels per grid pixel.")
    if len(shape) != 2 or not all(isinstance(n, int | np.integer) and n >= 0 for n in shape):
        raise InputError(f"shape={shape!r} must be (height, width) in pixels.")
    if len(origin_xy) != 2 or not all(math.isfinite(v) for v in origin_xy):
        raise InputError(f"origin_xy={origin_xy!r} must be finite level-0 (x, y) coordinates.")
    values = [fill, *(annotation.class_index for annotation in annotations)]
    if not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values):
        raise InputError(f"fill={fill!r} and the class indices must be integers.")
    if not _INT16.min <= fill <= _INT16.max or not all(0 <= v <= _INT16.max for v in values[1:]):
        raise InputError(f"fill={fill} must lie in {_INT16.min}..{_INT16.max} and class indices in 0..{_INT16.max}.")
    dtype = np.uint8 if all(0 <= v <= 255 for v in values) else np.int16
    labels = np.full(shape, fill, dtype=dtype)
    height, width = (int(n) for n in shape)
    origin_x, origin_y = (float(v) for v in origin_xy)
    end_x, end_y = origin_x + width * scale, origin_y + height * scale
    for annotation in sorted(annotations, key=lambda a: -a.area):  # stable: equal areas keep their order
        x_min, y_min, x_max, y_max = annotation.bounds
        if x_max < origin_x or y_max < origin_y or x_min > end_x or y_min > end_y:
            continue
        mask = np.zeros(shape, dtype=bool)
        for exterior, holes in annotation.polygons:
            inside = _ring_mask(exterior, origin_x, origin_y, scale, (height, width))
            for hole in holes:
                inside &= ~_ring_mask(hole, origin_x, origin_y, scale, (height, width))
            mask |= inside
        labels[mask] = annotation.class_index
    return labels


def _ring_mask(ring: Ring, origin_x: float, origin_y: float, scale: float, shape: tuple[int, int]) -> NDArray[np.bool_]:
    """Pixels of an ``(H, W)`` grid whose centres lie inside (or on) ``ring``."""
    # Pixel (r, c) has its centre at level-0 (origin + (c + 0.5) * scale); skimage's polygon fills the
    # integer points inside the outline, so shift by half a pixel to make those points the centres.
    rows_cols = np.stack([(ring[:, 1] - origin_y) / scale - 0.5, (ring[:, 0] - origin_x) / scale - 0.5], axis=1)
    # skimage tests every pixel of the outline's bounding box against every vertex: clip to just outside
    # the grid first, so a large annotation costs only the vertices near this grid.
    clipped = _clip_ring(rows_cols, low=(-1.0, -1.0), high=(float(shape[0]), float(shape[1])))
    mask = np.zeros(shape, dtype=bool)
    if len(clipped) >= 3 and shape[0] and shape[1]:
        rows, cols = draw.polygon(clipped[:, 0], clipped[:, 1], shape=shape)  # type: ignore[no-untyped-call]
        mask[rows, cols] = True
    return mask


def _clip_ring(
    points: NDArray[np.float64], *, low: tuple[float, float], high: tuple[float, float]
) -> NDArray[np.float64]:
    """Sutherland-Hodgman: the closed ring ``points`` (N, 2) clipped to the box ``low <= p <= high``.

    A concave ring may come back with zero-width spurs along the box's sides; they lie on its sides,
    and :func:`_ring_mask` places those just outside the grid, where no pixel centre lies.
    """
    for axis in (0, 1):
        for bound, is_low in ((low[axis], True), (high[axis], False)):
            inside = points[:, axis] >= bound if is_low else points[:, axis] <= bound
            if inside.all():
                continue
            if not inside.any():
                return points[:0]
            following = np.roll(points, -1, axis=0)
            crossing = inside != np.roll(inside, -1)
            crossings = np.zeros_like(points)
            start, end = points[crossing], following[crossing]
            t = (bound - start[:, axis]) / (end[:, axis] - start[:, axis])
            crossings[crossing] = start + t[:, np.newaxis] * (end - start)
            crossings[crossing, axis] = bound
            # Each vertex is kept if inside, followed by where its outgoing edge crosses the bound.
            points = np.stack([points, crossings], axis=1)[np.stack([inside, crossing], axis=1)]
    return points


# --- sampling tiles -----------------------------------------------------------------------------


def sample_annotated_tiles(
    slide_path: str | os.PathLike[str],
    geojson_path: str | os.PathLike[str],
    class_names: Sequence[str],
    *,
    target_mpp: float,
    tile_size: int,
    ignore_index: int,
    unannotated: int | None = None,
    mpp: float | None = None,
    class_map: Mapping[str, str | int] | None = None,
    min_labelled_fraction: float = 0.05,
) -> list[AnnotatedTile]:
    """Labelled ``tile_size`` tiles at ``target_mpp`` over the annotated parts of a slide.

    The tiles form a regular grid without overlap on the slide's target grid (the grid ``segment``
    reads at ``target_mpp``), anchored at the top-left corner of the annotations' overall bounding
    box; a tile is kept when it meets the bounding box of at least one annotated polygon (each part
    of a MultiPolygon on its own) and at least ``min_labelled_fraction`` of its pixels lie inside
    annotations. Tiles come in row-major order.

    Parameters
    ----------
    slide_path, geojson_path : the slide and its QuPath GeoJSON export (level-0 pixel coordinates).
    class_names, class_map : as for :func:`read_qupath_annotations`.
    target_mpp : micrometres per pixel of the tiles; the level is chosen as by ``segment``.
    tile_size : side of a tile in target pixels.
    ignore_index : label of pixels outside every annotation (and past the slide's edge); must not be
        a class index. Labels are uint8 when it is in 0..255 (e.g. 255), else int16 (e.g. -100).
    unannotated : a class index for pixels of the slide outside every annotation instead of
        ``ignore_index``; it does not count as labelled for ``min_labelled_fraction``.
    mpp : micrometres per level-0 pixel, for slides whose metadata lacks it (or has it wrong).
    min_labelled_fraction : in [0, 1].

    Raises
    ------
    InputError : bad arguments or annotations (see :func:`read_qupath_annotations`), no polygon
        annotation at all, an annotation entirely outside the slide; a
        :class:`~wsi_espnet.slides.SlideError` for an unreadable slide or one without MPP and no ``mpp``.
    """
    names = _checked_class_names(class_names)
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise InputError(f"tile_size={tile_size!r} must be a positive number of pixels, e.g. 512.")
    if (
        isinstance(ignore_index, bool)
        or not isinstance(ignore_index, int)
        or not _INT16.min <= ignore_index <= _INT16.max
    ):
        raise InputError(f"ignore_index={ignore_index!r} must be an integer such as 255 or -100.")
    if 0 <= ignore_index < len(names):
        raise InputError(
            f"ignore_index={ignore_index} is the index of class {names[ignore_index]!r}; use a value outside "
            f"0..{len(names) - 1}, e.g. 255."
        )
    if unannotated is not None and (
        isinstance(unannotated, bool) or not isinstance(unannotated, int) or not 0 <= unannotated < len(names)
    ):
        raise InputError(f"unannotated={unannotated!r} must be None or a class index 0 to {len(names) - 1}.")
    if (
        isinstance(min_labelled_fraction, bool)
        or not isinstance(min_labelled_fraction, int | float)
        or not 0 <= min_labelled_fraction <= 1
    ):
        raise InputError(f"min_labelled_fraction={min_labelled_fraction!r} must be in [0, 1], e.g. 0.05.")

    geojson_path, slide_path = Path(geojson_path), Path(slide_path)
    annotations = read_qupath_annotations(geojson_path, names, class_map=class_map)
    if not annotations:
        raise InputError(
            f"{geojson_path} holds no polygon annotations to sample tiles from; export the slide's "
            "annotations (not only points or detections) from QuPath."
        )
    with open_slide(slide_path, mpp=mpp) as reader:
        choice = choose_level(reader, target_mpp)
        scale = choice.target_to_level0
        boxes = _target_boxes(annotations, scale, reader.level_shapes[0], choice.target_shape, geojson_path)
        target_height, target_width = choice.target_shape
        tiles: list[AnnotatedTile] = []
        candidates = 0
        for top, left in _grid(boxes, tile_size):
            candidates += 1
            origin_xy = (left * scale, top * scale)
            labels = rasterize_annotations(
                annotations, origin_xy=origin_xy, scale=scale, shape=(tile_size, tile_size), fill=ignore_index
            )
            in_slide = np.zeros((tile_size, tile_size), dtype=bool)
            in_slide[: max(target_height - top, 0), : max(target_width - left, 0)] = True
            labels[~in_slide] = ignore_index
            annotated = labels != ignore_index
            if np.count_nonzero(annotated) < min_labelled_fraction * tile_size * tile_size:
                continue
            if unannotated is not None:
                labels[in_slide & ~annotated] = unannotated
            image = read_target_region(reader, choice, Region(top, left, tile_size, tile_size))
            tiles.append(AnnotatedTile(image=image, labels=labels, origin_xy=origin_xy, scale=scale, slide=slide_path))
    logger.info(
        "%s: %d of %d tiles of %d px at %g um/px have at least %g of their pixels annotated.",
        slide_path.name,
        len(tiles),
        candidates,
        tile_size,
        target_mpp,
        min_labelled_fraction,
    )
    return tiles


def _target_boxes(
    annotations: Sequence[Annotation],
    scale: float,
    level0_shape: tuple[int, int],
    target_shape: tuple[int, int],
    geojson_path: Path,
) -> list[tuple[int, int, int, int]]:
    """Each polygon's bounding box, clipped to the slide, as target-grid ``(top, left, bottom, right)``.

    Boxes are per polygon rather than per annotation, so the distant parts of one MultiPolygon do
    not pull the glass between them into the grid.
    """
    height, width = level0_shape
    boxes = []
    for annotation in annotations:
        inside = 0
        for exterior, _ in annotation.polygons:
            (x_min, y_min), (x_max, y_max) = exterior.min(axis=0), exterior.max(axis=0)
            if x_max <= 0 or y_max <= 0 or x_min >= width or y_min >= height:
                continue
            inside += 1
            top = min(math.floor(max(y_min, 0) / scale), target_shape[0] - 1)
            left = min(math.floor(max(x_min, 0) / scale), target_shape[1] - 1)
            bottom = min(math.ceil(min(y_max, height) / scale), target_shape[0])
            right = min(math.ceil(min(x_max, width) / scale), target_shape[1])
            boxes.append((top, left, max(bottom, top + 1), max(right, left + 1)))
        if not inside:
            x_min, y_min, x_max, y_max = annotation.bounds
            raise InputError(
                f"{geojson_path}: feature {annotation.feature_index} lies entirely outside the slide "
                f"(x {x_min:g} to {x_max:g}, y {y_min:g} to {y_max:g}; the slide is {width} x {height} level-0 "
                "pixels). Was the GeoJSON exported from another image?"
            )
    return boxes


def _grid(boxes: Sequence[tuple[int, int, int, int]], tile_size: int) -> list[tuple[int, int]]:
    """Row-major ``(top, left)`` of the grid tiles that meet a box; the grid starts at the boxes' top-left."""
    top0, left0 = min(box[0] for box in boxes), min(box[1] for box in boxes)
    bottom, right = max(box[2] for box in boxes), max(box[3] for box in boxes)
    return [
        (top, left)
        for top in range(top0, bottom, tile_size)
        for left in range(left0, right, tile_size)
        if any(top < b[2] and top + tile_size > b[0] and left < b[3] and left + tile_size > b[1] for b in boxes)
    ]
