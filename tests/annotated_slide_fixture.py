"""A QuPath-style annotation export for the real slide CMU-1-Small-Region, reusable by any test.

CMU-1-Small-Region.svs is one level of 2220 x 2967 pixels (x, y) at 0.499 um/px. The polygons below
lie on its tissue: "tumour" over the epithelium in the middle of the section (with a hole) and a small
square inside the lower stroma outline, "stroma" as one MultiPolygon of two rectangles. The file also
holds what a real QuPath export holds besides polygon annotations: a point, a line and a detection.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

#: Level-0 (x, y) vertices; a polygon is ``[exterior, *holes]``, rings not closed.
Ring = list[tuple[float, float]]

CMU_SLIDE = Path("slides") / "CMU-1-Small-Region.svs"  # relative to the shared data folder
CMU_CLASSES = ("tumour", "stroma")

TUMOUR_WITH_HOLE: list[Ring] = [
    [(840, 1520), (1180, 1520), (1260, 1760), (1320, 2000), (840, 2000)],
    [(1000, 1640), (1120, 1640), (1120, 1760), (1000, 1760)],
]
TUMOUR_IN_STROMA: list[Ring] = [[(1100, 2400), (1300, 2400), (1300, 2600), (1100, 2600)]]
STROMA_PARTS: list[list[Ring]] = [
    [[(720, 2240), (1640, 2240), (1640, 2880), (720, 2880)]],
    [[(1000, 600), (1320, 600), (1320, 1000), (1000, 1000)]],
]


def _closed(polygon: list[Ring]) -> list[list[list[float]]]:
    return [[[float(x), float(y)] for x, y in [*ring, ring[0]]] for ring in polygon]


def write_cmu_annotations(path: Path) -> dict[str, list[list[Ring]]]:
    """Write the annotations as QuPath exports them (a FeatureCollection) and return the polygons by class.

    Feature order: the small tumour square (class as a plain string, like older QuPath), a point, the
    stroma MultiPolygon, the tumour polygon with a hole, a line and an unclassified cell detection. The
    small square precedes the stroma around it, so only painting by area keeps it tumour.
    """
    features = [
        _feature({"type": "Polygon", "coordinates": _closed(TUMOUR_IN_STROMA)}, "tumour"),
        _feature({"type": "Point", "coordinates": [1200.0, 1200.0]}, {"name": "Tumour"}),
        _feature(
            {"type": "MultiPolygon", "coordinates": [_closed(part) for part in STROMA_PARTS]},
            {"name": "Stroma", "color": [150, 200, 150]},
            name="stroma, two pieces",
        ),
        _feature(
            {"type": "Polygon", "coordinates": _closed(TUMOUR_WITH_HOLE)},
            {"name": "Tumour", "color": [200, 0, 0]},
            name="tumour region 1",
        ),
        _feature({"type": "LineString", "coordinates": [[900.0, 700.0], [1100.0, 900.0]]}, {"name": "Stroma"}),
        _feature(
            {"type": "Polygon", "coordinates": _closed([[(1400, 1200), (1410, 1200), (1410, 1210)]])},
            None,
            object_type="detection",
        ),
    ]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}, indent=1), encoding="utf-8")
    return {"tumour": [TUMOUR_IN_STROMA, TUMOUR_WITH_HOLE], "stroma": list(STROMA_PARTS)}


def _feature(
    geometry: dict[str, object],
    classification: str | dict[str, object] | None,
    *,
    name: str | None = None,
    object_type: str = "annotation",
) -> dict[str, object]:
    properties: dict[str, object] = {"objectType": object_type}
    if name is not None:
        properties["name"] = name
    if classification is not None:
        properties["classification"] = classification
    feature_id = str(uuid.uuid5(uuid.NAMESPACE_URL, json.dumps(geometry)))  # QuPath writes a UUID per object
    return {"type": "Feature", "id": feature_id, "geometry": geometry, "properties": properties}
