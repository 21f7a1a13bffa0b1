"""GeoJSON export: geometry in level-0 pixels, holes, orientation, QuPath fields, round trip to the mask."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from skimage.draw import disk, polygon

from wsi_espnet.errors import InputError
from wsi_espnet.outputs.geojson import write_geojson
from wsi_espnet.segmentation.label_values import LabelClass

CLASSES = [
    LabelClass(0, "no tissue", (0, 0, 0)),
    LabelClass(1, "benign epithelium", (0, 200, 0)),
    LabelClass(2, "malignant epithelium", (255, 0, 0)),
    LabelClass(3, "necrosis", (40, 40, 200)),
]


def signed_area(ring: list[list[float]]) -> float:
    xy = np.asarray(ring)
    return float(np.dot(xy[:-1, 0], xy[1:, 1]) - np.dot(xy[1:, 0], xy[:-1, 1])) / 2


def multipolygon_area(coordinates) -> float:
    return sum(signed_area(ring) for poly in coordinates for ring in poly)


def rasterise(coordinates, shape: tuple[int, int], downsample: float) -> np.ndarray:
    """Pixels of ``shape`` whose centres fall inside the MultiPolygon (level-0 coordinates)."""
    mask = np.zeros(shape, dtype=bool)
    for poly in coordinates:
        for index, ring in enumerate(poly):
            xy = np.asarray(ring) / downsample - 0.5  # pixel edges -> pixel-centre indices
            rows, cols = polygon(xy[:, 1], xy[:, 0], shape=shape)
            mask[rows, cols] = index == 0
    return mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def read_features(path: Path) -> dict[str, dict]:
    collection = json.loads(path.read_text(encoding="utf-8"))
    assert collection["type"] == "FeatureCollection"
    return {feature["properties"]["classification"]["name"]: feature for feature in collection["features"]}


def square_with_hole() -> np.ndarray:
    mask = np.zeros((60, 80), dtype=np.uint8)
    mask[10:50, 20:70] = 1
    mask[20:35, 30:45] = 0
    return mask


@pytest.mark.parametrize("downsample", [1.0, 4.0, 2.5])
def test_square_with_hole_maps_pixel_edges_to_level0_coordinates(tmp_path, downsample):
    mask = square_with_hole()
    path = write_geojson(mask, tmp_path / "mask.geojson", downsample=downsample, classes=CLASSES)

    feature = read_features(path)["benign epithelium"]
    assert feature["geometry"]["type"] == "MultiPolygon"
    ((exterior, hole),) = feature["geometry"]["coordinates"]
    d = downsample
    # Pixel (row r, col c) covers x in [c d, (c + 1) d): the outline lies on those edges exactly.
    assert {tuple(p) for p in exterior} == {(20 * d, 10 * d), (70 * d, 10 * d), (70 * d, 50 * d), (20 * d, 50 * d)}
    assert {tuple(p) for p in hole} == {(30 * d, 20 * d), (45 * d, 20 * d), (45 * d, 35 * d), (30 * d, 35 * d)}
    assert exterior[0] == exterior[-1]
    assert hole[0] == hole[-1]
    assert signed_area(exterior) > 0 > signed_area(hole)  # RFC 7946: exterior counter-clockwise
    assert multipolygon_area(feature["geometry"]["coordinates"]) == pytest.approx(np.count_nonzero(mask) * d**2)


def test_curved_shapes_keep_area_within_the_simplification_tolerance_and_round_trip(tmp_path):
    # Region sizes as at the pyramid level the caller exports (hundreds of pixels across).
    mask = np.zeros((500, 700), dtype=np.uint8)
    mask[disk((250, 250), 200, shape=mask.shape)] = 1
    mask[disk((250, 250), 110, shape=mask.shape)] = 2  # a hole in class 1 filled by class 2
    mask[disk((270, 230), 25, shape=mask.shape)] = 0  # a hole in class 2
    mask[polygon([250, 450, 250, 50], [460, 580, 690, 580], shape=mask.shape)] = 3
    downsample, tolerance = 8.0, 1.0

    path = write_geojson(mask, tmp_path / "m.geojson", downsample=downsample, classes=CLASSES)

    features = read_features(path)
    assert set(features) == {"benign epithelium", "malignant epithelium", "necrosis"}
    for label in CLASSES[1:]:
        coordinates = features[label.name]["geometry"]["coordinates"]
        pixels = mask == label.value
        perimeter = sum(np.abs(np.diff(np.asarray(ring), axis=0)).sum() for poly in coordinates for ring in poly)
        assert multipolygon_area(coordinates) == pytest.approx(
            pixels.sum() * downsample**2, abs=perimeter * tolerance * downsample
        )
        assert iou(rasterise(coordinates, mask.shape, downsample), pixels) >= 0.99
        for poly in coordinates:
            assert signed_area(poly[0]) > 0
            assert all(signed_area(hole) < 0 for hole in poly[1:])
            assert all(ring[0] == ring[-1] and len(ring) >= 4 for ring in poly)
    assert len(features["benign epithelium"]["geometry"]["coordinates"][0]) == 2  # exterior and one hole
    assert len(features["malignant epithelium"]["geometry"]["coordinates"][0]) == 2


def test_no_simplification_reproduces_the_mask_exactly(tmp_path):
    rng = np.random.default_rng(3)
    mask = (rng.random((120, 90)) < 0.35).astype(np.uint8) * 2
    mask[40:80, 20:70] = 2
    path = write_geojson(mask, tmp_path / "m.geojson", downsample=1.0, classes=CLASSES, simplify_tolerance=0)
    coordinates = read_features(path)["malignant epithelium"]["geometry"]["coordinates"]
    np.testing.assert_array_equal(rasterise(coordinates, mask.shape, 1.0), mask == 2)
    # Outlines follow pixel edges except where pixels touch by a corner only (1/8 pixel cut there).
    assert multipolygon_area(coordinates) == pytest.approx((mask == 2).sum(), rel=0.01)


def test_regions_touching_by_a_corner_stay_separate_valid_rings(tmp_path):
    mask = np.zeros((6, 6), dtype=np.uint8)
    mask[1, 1] = mask[2, 2] = 1  # two pixels touching at one corner
    mask[3:5, 3:5] = 1
    mask[3, 3] = 0  # a notch whose corner touches the outside diagonally: no hole
    path = write_geojson(mask, tmp_path / "m.geojson", downsample=1.0, classes=CLASSES, simplify_tolerance=0)
    coordinates = read_features(path)["benign epithelium"]["geometry"]["coordinates"]
    assert len(coordinates) == 3
    assert all(len(poly) == 1 for poly in coordinates)  # no holes
    for poly in coordinates:
        ring = [tuple(p) for p in poly[0][:-1]]
        assert len(ring) == len(set(ring))  # no ring touches itself
    np.testing.assert_array_equal(rasterise(coordinates, mask.shape, 1.0), mask == 1)


def test_qupath_fields_and_absent_classes(tmp_path):
    mask = np.zeros((30, 30), dtype=np.uint8)
    mask[5:10, 5:10] = 3
    mask[20:25, 5:25] = 1
    store = zarr.open_group(store=zarr.storage.MemoryStore(), mode="w")
    labels = store.create_array("2", data=mask, chunks=(16, 16))

    path = write_geojson(labels, tmp_path / "slide.geojson", downsample=16.0, classes=CLASSES)

    collection = json.loads(path.read_text(encoding="utf-8"))
    assert [f["properties"]["classification"]["name"] for f in collection["features"]] == [
        "benign epithelium",
        "necrosis",
    ]  # class 2 is absent, class 0 is never exported
    for feature in collection["features"]:
        assert feature["type"] == "Feature"
        properties = feature["properties"]
        assert properties["objectType"] == "annotation"
        label = next(c for c in CLASSES if c.name == properties["classification"]["name"])
        assert properties["classification"]["color"] == list(label.color)
        assert properties["name"] == label.name


def test_empty_mask_gives_an_empty_collection(tmp_path):
    path = write_geojson(np.zeros((10, 10), np.uint8), tmp_path / "m.geojson", downsample=1.0, classes=CLASSES)
    assert json.loads(path.read_text(encoding="utf-8")) == {"type": "FeatureCollection", "features": []}


def test_existing_file_is_replaced_without_leftovers(tmp_path):
    path = tmp_path / "m.geojson"
    path.write_text("old", encoding="utf-8")
    write_geojson(square_with_hole(), path, downsample=1.0, classes=CLASSES)
    assert read_features(path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.geojson"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": np.zeros((4, 4), np.float32)}, "2-D integer mask"),
        ({"labels": np.zeros((4, 4, 3), np.uint8)}, "2-D integer mask"),
        ({"downsample": 0}, "downsample=0"),
        ({"simplify_tolerance": -1.0}, "simplify_tolerance=-1.0"),
        ({"classes": [LabelClass(1, "x", (300, 0, 0))]}, "0-255"),
        ({"path": Path("/nonexistent/folder/m.geojson")}, "does not exist"),
    ],
)
def test_bad_arguments_are_user_errors(tmp_path, kwargs, message):
    arguments = {
        "labels": np.zeros((4, 4), np.uint8),
        "path": tmp_path / "m.geojson",
        "downsample": 1.0,
        "classes": CLASSES,
        **kwargs,
    }
    labels, path = arguments.pop("labels"), arguments.pop("path")
    with pytest.raises(InputError, match=message):
        write_geojson(labels, path, **arguments)
