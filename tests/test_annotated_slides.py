"""QuPath GeoJSON annotations -> labelled training tiles, on the real slide CMU-1-Small-Region."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from annotated_slide_fixture import (
    CMU_CLASSES,
    CMU_SLIDE,
    STROMA_PARTS,
    TUMOUR_IN_STROMA,
    TUMOUR_WITH_HOLE,
    write_cmu_annotations,
)
from numpy.typing import NDArray

from wsi_espnet.datasets.annotated_slides import (
    AnnotatedTile,
    Annotation,
    rasterize_annotations,
    read_qupath_annotations,
    sample_annotated_tiles,
)
from wsi_espnet.errors import InputError
from wsi_espnet.geometry import Region
from wsi_espnet.slides import SlideError, choose_level, open_slide, read_target_region

IGNORE = 255
TUMOUR, STROMA = 0, 1
CMU_MPP = 0.499


@pytest.fixture(scope="module")
def cmu_slide(shared_data: Path) -> Path:
    return shared_data / CMU_SLIDE


@pytest.fixture
def cmu_geojson(tmp_path: Path) -> Path:
    path = tmp_path / "CMU-1-Small-Region.geojson"
    write_cmu_annotations(path)
    return path


def write_features(path: Path, features: list[dict[str, Any]] | dict[str, Any]) -> Path:
    data = features if isinstance(features, dict) else {"type": "FeatureCollection", "features": features}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def polygon_feature(rings: list[list[tuple[float, float]]], classification: object) -> dict[str, Any]:
    coordinates = [[[x, y] for x, y in [*ring, ring[0]]] for ring in rings]
    properties = {"objectType": "annotation", "classification": classification}
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": coordinates}, "properties": properties}


def rectangle(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def shoelace(ring: list[tuple[float, float]]) -> float:
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring, [*ring[1:], ring[0]], strict=True))) / 2


def label_at(tiles: list[AnnotatedTile], x: float, y: float) -> int:
    """The label of the tile pixel covering level-0 point (x, y)."""
    for tile in tiles:
        col = math.floor((x - tile.origin_xy[0]) / tile.scale)
        row = math.floor((y - tile.origin_xy[1]) / tile.scale)
        if 0 <= row < tile.labels.shape[0] and 0 <= col < tile.labels.shape[1]:
            return int(tile.labels[row, col])
    raise AssertionError(f"no tile covers ({x}, {y})")


# --- reading ------------------------------------------------------------------------------------


def test_reads_a_qupath_export(cmu_geojson: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="wsi_espnet.datasets.annotated_slides"):
        annotations = read_qupath_annotations(cmu_geojson, CMU_CLASSES)
    # File order; the point, the line and the detection are skipped and counted.
    assert [(a.feature_index, a.class_index) for a in annotations] == [(0, TUMOUR), (2, STROMA), (3, TUMOUR)]
    assert "skipped 3 feature(s)" in caplog.text
    assert "1 LineString, 1 Point, 1 detection" in caplog.text
    small, stroma, tumour = annotations
    assert len(stroma.polygons) == 2
    assert all(holes == () for _, holes in stroma.polygons)
    (exterior, holes), = tumour.polygons  # fmt: skip
    np.testing.assert_array_equal(exterior, np.array(TUMOUR_WITH_HOLE[0], dtype=np.float64))  # closing vertex dropped
    assert len(holes) == 1
    np.testing.assert_array_equal(holes[0], np.array(TUMOUR_WITH_HOLE[1], dtype=np.float64))
    assert exterior.dtype == np.float64
    assert not exterior.flags.writeable
    assert tumour.area == pytest.approx(shoelace(TUMOUR_WITH_HOLE[0]) - shoelace(TUMOUR_WITH_HOLE[1]))
    assert stroma.bounds == (720.0, 600.0, 1640.0, 2880.0)
    assert small.area == pytest.approx(200 * 200)


@pytest.mark.parametrize("layout", ["list", "feature"])
def test_reads_a_bare_feature_list_and_a_single_feature(tmp_path: Path, layout: str) -> None:
    feature = polygon_feature([rectangle(0, 0, 10, 10)], {"name": "STROMA"})  # names match case-insensitively
    data: Any = [feature] if layout == "list" else feature
    path = tmp_path / "a.geojson"
    path.write_text(json.dumps(data), encoding="utf-8")
    (annotation,) = read_qupath_annotations(path, CMU_CLASSES)
    assert annotation.class_index == STROMA
    assert annotation.area == 100


def test_class_map_renames_qupath_classes(tmp_path: Path) -> None:
    path = write_features(
        tmp_path / "a.geojson",
        [
            polygon_feature([rectangle(0, 0, 10, 10)], {"name": "Tumor"}),
            polygon_feature([rectangle(0, 0, 10, 10)], "Connective tissue"),
            polygon_feature([rectangle(0, 0, 10, 10)], {"name": "tumour"}),
        ],
    )
    with pytest.raises(InputError, match="'Tumor'"):
        read_qupath_annotations(path, CMU_CLASSES)
    # Keys match case-insensitively; values are class names (any case) or indices; a map wins over a name.
    class_map: dict[str, str | int] = {"TUMOR": "Tumour", "connective tissue": 1, "Tumour": "stroma"}
    annotations = read_qupath_annotations(path, CMU_CLASSES, class_map=class_map)
    assert [a.class_index for a in annotations] == [TUMOUR, STROMA, STROMA]


@pytest.mark.parametrize(
    ("class_map", "message"),
    [
        (
            {"Tumor": "necrosis"},
            r"maps 'Tumor' to 'necrosis', which is neither one of the classes \['tumour', 'stroma'\]",
        ),
        ({"Tumor": 2}, "nor a class index 0 to 1"),
        ({"Tumor": True}, "maps 'Tumor' to True"),
        ({"Tumor": 0, "tumor": 1}, "to two different classes"),
    ],
)
def test_class_map_is_checked(tmp_path: Path, class_map: dict[str, Any], message: str) -> None:
    path = write_features(tmp_path / "a.geojson", [polygon_feature([rectangle(0, 0, 10, 10)], "Tumor")])
    with pytest.raises(InputError, match=message):
        read_qupath_annotations(path, CMU_CLASSES, class_map=class_map)


def test_unknown_class_names_file_feature_class_and_known_classes(tmp_path: Path) -> None:
    necrosis = polygon_feature([rectangle(0, 0, 10, 10)], {"name": "Necrosis", "color": [0, 0, 0]})
    necrosis["properties"]["name"] = "dead area"
    path = write_features(tmp_path / "a.geojson", [polygon_feature([rectangle(0, 0, 10, 10)], "Stroma"), necrosis])
    with pytest.raises(InputError) as raised:
        read_qupath_annotations(path, CMU_CLASSES)
    message = str(raised.value)
    for expected in (str(path), "feature 1", "'dead area'", "class 'Necrosis'", "'tumour', 'stroma'", "class_map"):
        assert expected in message


@pytest.mark.parametrize("classification", [None, "", {"color": [1, 2, 3]}, {"name": None}])
def test_unclassified_polygon_is_an_error(tmp_path: Path, classification: object) -> None:
    path = write_features(tmp_path / "a.geojson", [polygon_feature([rectangle(0, 0, 10, 10)], classification)])
    with pytest.raises(InputError, match=r"feature 0 is a polygon annotation without a classification.*Set its class"):
        read_qupath_annotations(path, CMU_CLASSES)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"type": "FeatureCollection", "features": [', "is not valid JSON"),
        ("", "is not valid JSON"),
        ('{"type": "Polygon", "coordinates": []}', "holds 'Polygon', not a GeoJSON FeatureCollection"),
        ("42", "holds 'int', not a GeoJSON FeatureCollection"),
        ('[{"type": "Polygon", "coordinates": []}]', r"feature 0 is not a GeoJSON Feature \(found 'Polygon'\)"),
        ('[{"type": "Feature", "geometry": {"type": "Circle"}, "properties": {}}]', "geometry type 'Circle'"),
        ('[{"type": "Feature", "geometry": {"type": "Polygon"}, "properties": {}}]', "without a 'coordinates' list"),
        (
            '[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, "a"], [1, 1]]]}}]',
            r"not a list of finite \[x, y\] positions",
        ),
        (
            '[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [0, 0]]]}}]',
            "a ring with 2 distinct vertices",
        ),
        ('[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": []}}]', "a polygon without rings"),
    ],
)
def test_malformed_files_name_the_path(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.geojson"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=message) as raised:
        read_qupath_annotations(path, CMU_CLASSES)
    assert str(path) in str(raised.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read_qupath_annotations(tmp_path / "none.geojson", CMU_CLASSES)


@pytest.mark.parametrize(
    ("class_names", "message"),
    [("tumour", "must be a non-empty list"), ([], "must be a non-empty list"), (["a", "A"], r"repeats \['A', 'a'\]")],
)
def test_class_names_are_checked(cmu_geojson: Path, class_names: Any, message: str) -> None:
    with pytest.raises(InputError, match=message):
        read_qupath_annotations(cmu_geojson, class_names)


# --- rasterizing --------------------------------------------------------------------------------


def square(
    class_index: int, x0: float, y0: float, x1: float, y1: float, *holes: list[tuple[float, float]]
) -> Annotation:
    as_array = [np.array(ring, dtype=np.float64) for ring in (rectangle(x0, y0, x1, y1), *holes)]
    return Annotation(class_index=class_index, polygons=((as_array[0], tuple(as_array[1:])),))


def test_rasterize_uses_pixel_centres() -> None:
    # Pixel (r, c) covers [c, c + 1) x [r, r + 1): a rectangle with integer corners covers exactly its pixels.
    labels = rasterize_annotations([square(3, 2, 1, 6, 4)], origin_xy=(0, 0), scale=1, shape=(6, 8), fill=IGNORE)
    expected = np.full((6, 8), IGNORE, dtype=np.uint8)
    expected[1:4, 2:6] = 3
    np.testing.assert_array_equal(labels, expected)
    assert labels.dtype == np.uint8
    # Scale 2 from origin (-1, 0): centres at x = 2c and y = 2r + 1. Centres on the outline (x = 6 and
    # y = 1) count as inside.
    labels = rasterize_annotations([square(3, 2, 1, 6, 4)], origin_xy=(-1, 0), scale=2, shape=(4, 5), fill=IGNORE)
    expected = np.full((4, 5), IGNORE, dtype=np.uint8)
    expected[0:2, 1:4] = 3
    np.testing.assert_array_equal(labels, expected)
    # Half a pixel off the centres: x in [2.6, 5.4) holds the centres 3.5 and 4.5 only.
    labels = rasterize_annotations([square(1, 2.6, 0, 5.4, 1)], origin_xy=(0, 0), scale=1, shape=(1, 8), fill=IGNORE)
    np.testing.assert_array_equal(labels[0], [IGNORE] * 3 + [1, 1] + [IGNORE] * 3)


def test_rasterize_cuts_holes_and_paints_small_annotations_last() -> None:
    ring_with_hole = square(0, 0, 0, 10, 10, rectangle(4, 4, 6, 6))
    inner = square(1, 1, 1, 3, 3)  # inside the big one, listed first
    labels = rasterize_annotations([inner, ring_with_hole], origin_xy=(0, 0), scale=1, shape=(12, 12), fill=IGNORE)
    expected = np.full((12, 12), IGNORE, dtype=np.uint8)
    expected[:10, :10] = 0
    expected[4:6, 4:6] = IGNORE
    expected[1:3, 1:3] = 1
    np.testing.assert_array_equal(labels, expected)
    # Equal areas: the later annotation wins.
    first, second = square(0, 0, 0, 4, 4), square(1, 2, 0, 6, 4)
    labels = rasterize_annotations([first, second], origin_xy=(0, 0), scale=1, shape=(4, 6), fill=IGNORE)
    np.testing.assert_array_equal(labels[0], [0, 0, 1, 1, 1, 1])


def test_rasterize_dtype_follows_fill_and_classes() -> None:
    labels = rasterize_annotations([square(1, 0, 0, 2, 2)], origin_xy=(0, 0), scale=1, shape=(3, 3), fill=-100)
    assert labels.dtype == np.int16
    assert labels[0, 0] == 1
    assert labels[2, 2] == -100
    labels = rasterize_annotations([square(300, 0, 0, 2, 2)], origin_xy=(0, 0), scale=1, shape=(3, 3), fill=0)
    assert labels.dtype == np.int16
    with pytest.raises(InputError, match=r"fill=40000 must lie in -32768\.\.32767"):
        rasterize_annotations([], origin_xy=(0, 0), scale=1, shape=(3, 3), fill=40000)
    with pytest.raises(InputError, match="scale=0 must be a positive number"):
        rasterize_annotations([], origin_xy=(0, 0), scale=0, shape=(3, 3), fill=0)


def test_rasterize_in_tiles_equals_whole(cmu_geojson: Path) -> None:
    """Tiles clip the polygons to themselves; that must not change a single pixel."""
    annotations = read_qupath_annotations(cmu_geojson, CMU_CLASSES)
    scale = 1.0 / CMU_MPP
    origin = (600.0, 500.0)
    whole = rasterize_annotations(annotations, origin_xy=origin, scale=scale, shape=(1200, 560), fill=IGNORE)
    assert set(np.unique(whole)) == {TUMOUR, STROMA, IGNORE}
    step = 97  # not a divisor: tiles of every size at every offset
    for top in range(0, 1200, step):
        for left in range(0, 560, step):
            shape = (min(step, 1200 - top), min(step, 560 - left))
            tile_origin = (origin[0] + left * scale, origin[1] + top * scale)
            tile = rasterize_annotations(annotations, origin_xy=tile_origin, scale=scale, shape=shape, fill=IGNORE)
            np.testing.assert_array_equal(tile, whole[top : top + shape[0], left : left + shape[1]])


# --- sampling tiles -----------------------------------------------------------------------------


def test_sample_grid_positions_and_labels(tmp_path: Path, cmu_slide: Path) -> None:
    # At the slide's own 0.499 um/px, target pixels are level-0 pixels. A 600 x 300 rectangle at
    # (1000, 1000) spans 3 x 2 tiles of 256 anchored at its corner; the corner tile holds
    # 88 x 44 annotated pixels (5.9%).
    geojson = write_features(tmp_path / "a.geojson", [polygon_feature([rectangle(1000, 1000, 1600, 1300)], "tumour")])
    tiles = sample_annotated_tiles(
        cmu_slide, geojson, CMU_CLASSES, target_mpp=CMU_MPP, tile_size=256, ignore_index=IGNORE,
        min_labelled_fraction=0.1,
    )  # fmt: skip
    assert [t.origin_xy for t in tiles] == [(1000, 1000), (1256, 1000), (1512, 1000), (1000, 1256), (1256, 1256)]
    assert all(t.scale == 1.0 and t.slide == cmu_slide for t in tiles)
    assert all(t.image.shape == (256, 256, 3) and t.image.dtype == np.uint8 for t in tiles)
    assert (tiles[0].labels == TUMOUR).all()
    assert tiles[0].labels.dtype == np.uint8
    bottom_left = tiles[3].labels
    assert (bottom_left[:44] == TUMOUR).all()
    assert (bottom_left[44:] == IGNORE).all()
    with open_slide(cmu_slide) as reader:
        for tile in tiles:
            x, y = (int(v) for v in tile.origin_xy)
            np.testing.assert_array_equal(tile.image, reader.read_region(0, y, x, 256, 256))

    default = sample_annotated_tiles(
        cmu_slide, geojson, CMU_CLASSES, target_mpp=CMU_MPP, tile_size=256, ignore_index=IGNORE
    )
    assert [t.origin_xy for t in default][-1] == (1512, 1256)  # 5.9% >= the default 5%
    # Unannotated slide pixels become a class, but do not count towards the labelled fraction.
    background = sample_annotated_tiles(
        cmu_slide, geojson, CMU_CLASSES, target_mpp=CMU_MPP, tile_size=256, ignore_index=IGNORE,
        unannotated=STROMA, min_labelled_fraction=0.1,
    )  # fmt: skip
    assert len(background) == 5
    assert (background[3].labels[:44] == TUMOUR).all()
    assert (background[3].labels[44:] == STROMA).all()


def test_sample_cmu_tiles_at_1_um(cmu_slide: Path, cmu_geojson: Path) -> None:
    tiles = sample_annotated_tiles(
        cmu_slide, cmu_geojson, CMU_CLASSES, target_mpp=1.0, tile_size=128, ignore_index=IGNORE
    )
    annotations = read_qupath_annotations(cmu_geojson, CMU_CLASSES)
    with open_slide(cmu_slide) as reader:
        choice = choose_level(reader, 1.0)
        assert choice.resample
        scale = choice.scale
        top0, left0 = math.floor(600 / scale), math.floor(720 / scale)  # the annotations' top-left corner
        positions = [(round(t.origin_xy[1] / scale), round(t.origin_xy[0] / scale)) for t in tiles]
        assert positions == sorted(positions)  # row-major
        assert all((top - top0) % 128 == 0 and (left - left0) % 128 == 0 for top, left in positions)
        for tile, (top, left) in zip(tiles, positions, strict=True):
            assert tile.scale == scale
            assert tile.origin_xy == (left * scale, top * scale)
            np.testing.assert_array_equal(tile.image, read_target_region(reader, choice, Region(top, left, 128, 128)))
            expected = rasterize_annotations(
                annotations, origin_xy=tile.origin_xy, scale=scale, shape=(128, 128), fill=IGNORE
            )
            np.testing.assert_array_equal(tile.labels, expected)
            assert np.count_nonzero(tile.labels != IGNORE) >= 0.05 * 128 * 128
    # Grid rows 0..8 and columns 0..3 from the corner; row 2 (y 1112 to 1369) meets no annotation, and
    # tile (3, 2) meets the tumour's bounding box but not the tumour.
    grid = [(0, 1), (0, 2), (1, 1), (1, 2), (3, 0), (3, 1), *[(row, col) for row in (4, 5) for col in range(3)]]
    grid += [(row, col) for row in (6, 7, 8) for col in range(4)]
    assert positions == [(top0 + 128 * row, left0 + 128 * col) for row, col in grid]
    everything = sample_annotated_tiles(
        cmu_slide, cmu_geojson, CMU_CLASSES, target_mpp=1.0, tile_size=128, ignore_index=IGNORE,
        min_labelled_fraction=0,
    )  # fmt: skip
    dropped = {(round(t.origin_xy[1] / scale), round(t.origin_xy[0] / scale)) for t in everything} - set(positions)
    assert dropped == {(top0 + 3 * 128, left0 + 2 * 128)}
    assert label_at(tiles, 900, 1540) == TUMOUR
    assert label_at(tiles, 1060, 1700) == IGNORE  # in the hole
    assert label_at(tiles, 1200, 2500) == TUMOUR  # the small square painted over the stroma around it
    assert label_at(tiles, 800, 2300) == STROMA
    assert label_at(tiles, 1160, 800) == STROMA
    assert label_at(tiles, 1400, 1700) == IGNORE  # right of the tumour
    # The annotations lie on tissue, not glass.
    tumour_pixels = np.concatenate([t.image[t.labels == TUMOUR] for t in tiles])
    assert tumour_pixels.mean() < 200


def paste(tiles: list[AnnotatedTile], shape: tuple[int, int]) -> NDArray[np.uint8]:
    canvas = np.full(shape, IGNORE, dtype=np.uint8)
    for tile in tiles:
        left, top = (round(v / tile.scale) for v in tile.origin_xy)
        height, width = min(shape[0] - top, tile.labels.shape[0]), min(shape[1] - left, tile.labels.shape[1])
        canvas[top : top + height, left : left + width] = tile.labels[:height, :width]
    return canvas


def test_one_and_two_um_agree(cmu_slide: Path, cmu_geojson: Path) -> None:
    canvases, scales = [], []
    with open_slide(cmu_slide) as reader:
        for target_mpp in (1.0, 2.0):
            tiles = sample_annotated_tiles(
                cmu_slide, cmu_geojson, CMU_CLASSES, target_mpp=target_mpp, tile_size=96, ignore_index=IGNORE,
                min_labelled_fraction=0,
            )  # fmt: skip
            canvases.append(paste(tiles, choose_level(reader, target_mpp).target_shape))
            scales.append(tiles[0].scale)
    assert scales[1] == pytest.approx(2 * scales[0])
    # Every annotated pixel is in some tile, so each class's pixels cover its true area at both resolutions.
    tumour_area = shoelace(TUMOUR_WITH_HOLE[0]) - shoelace(TUMOUR_WITH_HOLE[1]) + shoelace(TUMOUR_IN_STROMA[0])
    stroma_area = sum(shoelace(part[0]) for part in STROMA_PARTS) - shoelace(TUMOUR_IN_STROMA[0])
    for canvas, scale in zip(canvases, scales, strict=True):
        assert np.count_nonzero(canvas == TUMOUR) * scale**2 == pytest.approx(tumour_area, rel=0.01)
        assert np.count_nonzero(canvas == STROMA) * scale**2 == pytest.approx(stroma_area, rel=0.01)
    # Every other 1 um pixel is (up to boundary pixels) the 2 um pixel that contains it.
    fine, coarse = canvases
    fine = fine[: 2 * coarse.shape[0] : 2, : 2 * coarse.shape[1] : 2]
    coarse = coarse[: fine.shape[0], : fine.shape[1]]
    labelled = (fine != IGNORE) | (coarse != IGNORE)
    assert np.count_nonzero(fine[labelled] == coarse[labelled]) / np.count_nonzero(labelled) > 0.98


def test_annotations_past_the_slide_edge_are_clipped(tmp_path: Path, cmu_slide: Path) -> None:
    # The slide is 2220 x 2967; the rectangle reaches 2400 x 3100. The grid starts at the rectangle's
    # corner and covers only its part inside the slide: 120 columns and 117 rows, one tile.
    geojson = write_features(tmp_path / "a.geojson", [polygon_feature([rectangle(2100, 2850, 2400, 3100)], "stroma")])
    (tile,) = sample_annotated_tiles(
        cmu_slide, geojson, CMU_CLASSES, target_mpp=CMU_MPP, tile_size=256, ignore_index=IGNORE,
        unannotated=TUMOUR,
    )  # fmt: skip
    assert tile.origin_xy == (2100, 2850)
    assert (tile.labels[:117, :120] == STROMA).all()
    past_edge = np.ones((256, 256), dtype=bool)
    past_edge[:117, :120] = False
    assert (tile.labels[past_edge] == IGNORE).all()  # even with unannotated=: there is no slide there
    assert (tile.image[past_edge] == 255).all()


def test_annotation_outside_the_slide_is_an_error(tmp_path: Path, cmu_slide: Path) -> None:
    geojson = write_features(
        tmp_path / "a.geojson",
        [
            polygon_feature([rectangle(1000, 1000, 1100, 1100)], "stroma"),
            polygon_feature([rectangle(3000, 100, 3100, 200)], "stroma"),
        ],
    )
    with pytest.raises(InputError, match=r"feature 1 lies entirely outside the slide .*2220 x 2967.*another image"):
        sample_annotated_tiles(cmu_slide, geojson, CMU_CLASSES, target_mpp=1.0, tile_size=64, ignore_index=IGNORE)


def test_slide_without_mpp_needs_mpp(tmp_path: Path, shared_data: Path) -> None:
    slide = shared_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs"  # no MPP; levels at 1x and ~2x
    geojson = write_features(tmp_path / "a.geojson", [polygon_feature([rectangle(2000, 1000, 2300, 1300)], "tumour")])
    with pytest.raises(
        SlideError, match=r"no micrometres-per-pixel .* Pass the scan resolution explicitly with mpp, e\.g\. mpp=0\.25"
    ):
        sample_annotated_tiles(slide, geojson, CMU_CLASSES, target_mpp=1.0, tile_size=64, ignore_index=IGNORE)
    tiles = sample_annotated_tiles(
        slide, geojson, CMU_CLASSES, target_mpp=1.0, tile_size=64, ignore_index=IGNORE, mpp=0.5
    )
    with open_slide(slide, mpp=0.5) as reader:
        choice = choose_level(reader, 1.0)
        assert choice.level == 1
        assert not choice.resample
        downsample = reader.level_downsamples[1]
        assert tiles[0].scale == downsample
        for tile in tiles:
            left, top = (round(v / downsample) for v in tile.origin_xy)
            np.testing.assert_array_equal(tile.image, reader.read_region(1, top, left, 64, 64))
    assert sum(np.count_nonzero(t.labels == TUMOUR) for t in tiles) * downsample**2 == pytest.approx(
        300 * 300, rel=0.03
    )


def test_only_points_is_an_error(tmp_path: Path, cmu_slide: Path) -> None:
    point = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [10, 10]}, "properties": {}}
    geojson = write_features(tmp_path / "a.geojson", [point])
    assert read_qupath_annotations(geojson, CMU_CLASSES) == []
    with pytest.raises(InputError, match="holds no polygon annotations"):
        sample_annotated_tiles(cmu_slide, geojson, CMU_CLASSES, target_mpp=1.0, tile_size=64, ignore_index=IGNORE)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ignore_index": 1}, "ignore_index=1 is the index of class 'stroma'"),
        ({"ignore_index": 1.5}, "ignore_index=1.5 must be an integer"),
        ({"tile_size": 0}, "tile_size=0 must be a positive number"),
        ({"unannotated": 2}, "unannotated=2 must be None or a class index 0 to 1"),
        ({"min_labelled_fraction": 1.5}, r"min_labelled_fraction=1.5 must be in \[0, 1\]"),
        ({"target_mpp": 0.0}, "target_mpp=0.0 must be a positive number"),
    ],
)
def test_sample_arguments_are_checked(
    cmu_slide: Path, cmu_geojson: Path, options: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {"target_mpp": 1.0, "tile_size": 64, "ignore_index": IGNORE, **options}
    with pytest.raises(InputError, match=message):
        sample_annotated_tiles(cmu_slide, cmu_geojson, CMU_CLASSES, **arguments)
