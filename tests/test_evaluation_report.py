"""Reports of a confusion matrix: the text table, the JSON file and the PNG heat map."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from skimage.measure import label, regionprops

from wsi_espnet.errors import InputError
from wsi_espnet.evaluation import ConfusionMatrix, format_metrics_table, render_confusion_png, write_metrics_json
from wsi_espnet.evaluation.report import HEAT_COLORS


@pytest.fixture
def metrics():
    matrix = ConfusionMatrix(3, num_predicted=4)
    matrix.update(np.array([0, 0, 1, 1, 3, 1]), np.array([0, 0, 0, 1, 1, 1]))
    return matrix.to_dict(["road", "pedestrian crossing", "tree", "void"])


def test_table_has_one_line_per_class_and_the_means(metrics):
    lines = format_metrics_table(metrics).splitlines()
    assert lines[0].split() == ["class", "IoU", "accuracy", "pixels"]
    # road: TP 2 of 3 true, predicted twice: IoU 2/3, accuracy 2/3. pedestrian crossing: TP 2, 3 true, 3 predicted.
    assert lines[1].split() == ["road", "66.67", "%", "66.67", "%", "3"]
    assert lines[2].split() == ["pedestrian", "crossing", "50.00", "%", "66.67", "%", "3"]
    assert lines[3].split() == ["tree", "n/a", "n/a", "0"]
    assert set(lines[4]) == {"-"}
    assert lines[5] == "mean IoU 58.33 %, pixel accuracy 66.67 %, mean class accuracy 66.67 % over 6 pixels"
    assert len({len(line) for line in lines[:5]}) == 1  # columns line up


def test_metrics_json_holds_extra_then_metrics_and_replaces_the_file(metrics, tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    assert write_metrics_json(path, metrics, {"model": "camvid.safetensors", "images": 2}) == path
    data = json.loads(path.read_text())
    assert list(data)[:3] == ["model", "images", "mean_iou"]
    assert data["classes"][2]["iou"] is None
    assert {k: v for k, v in data.items() if k not in ("model", "images")} == metrics
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_metrics_json_refuses_clashes_and_keeps_the_old_file_on_failure(metrics, tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(InputError, match=r"extra keys \['pixels'\] would overwrite metrics"):
        write_metrics_json(path, metrics, {"pixels": 1})
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_metrics_json(path, metrics, {"loss": float("nan")})
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    with pytest.raises(InputError, match="does not exist; create it first"):
        write_metrics_json(tmp_path / "missing" / "metrics.json", metrics)


def _dark_cells(path):
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    return regionprops(label((pixels == HEAT_COLORS[1]).all(axis=2)))


def test_perfect_matrix_has_the_darkest_colour_on_the_diagonal_only(tmp_path):
    path = render_confusion_png(np.diag([50, 20, 5, 1]), ["sky", "road", "car", "tree"], tmp_path / "cm.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.mode == "RGB"
    cells = [cell for cell in _dark_cells(path) if cell.area > 100]  # a cell minus its white "100%" text
    assert len(cells) == 4
    rows, columns = zip(*(cell.centroid for cell in cells), strict=True)
    steps = np.diff(sorted(rows)), np.diff(sorted(columns))
    # One cell per class, equally spaced along a diagonal of square cells.
    assert np.ptp(steps[0]) < 2
    assert np.allclose(steps[0], steps[1], atol=2)
    for cell in cells:
        top, left, bottom, right = cell.bbox
        assert abs((bottom - top) - (right - left)) <= 1


def _size(path):
    with Image.open(path) as image:
        return image.size


def test_image_grows_by_one_cell_per_class(tmp_path):
    sizes = {}
    for count in (3, 6):
        names = [f"c{i}" for i in range(count)]
        sizes[count] = _size(
            render_confusion_png(np.eye(count, dtype=int), names, tmp_path / f"{count}.png", cell_size=30)
        )
    assert sizes[6][0] - sizes[3][0] == 3 * 30
    assert sizes[6][1] - sizes[3][1] == 3 * 30
    # A model's extra "void" output adds a column, not a row.
    wide = render_confusion_png(np.ones((3, 4), dtype=int), ["c0", "c1", "c2"], tmp_path / "w.png", cell_size=30)
    assert _size(wide) == (sizes[3][0] + 30, sizes[3][1])
    # Automatic cells shrink for many classes, but the picture still grows.
    many = render_confusion_png(np.eye(40, dtype=int), list(map(str, range(40))), tmp_path / "m.png")
    assert _size(many)[0] > sizes[6][0]


def test_shares_are_per_true_class_and_empty_rows_are_grey(tmp_path):
    # Row a: 1 of 4 pixels right (25 %, 75 %); row b: all 1000 right (100 %); row c: no pixels.
    matrix = np.array([[1, 3, 0], [0, 1000, 0], [0, 0, 0]])
    path = render_confusion_png(matrix, ["a", "b", "c"], tmp_path / "cm.png", cell_size=40)
    assert len([cell for cell in _dark_cells(path) if cell.area > 100]) == 1  # b's cell, not a's 3 pixels
    with Image.open(path) as image:
        grey = (np.asarray(image) == (225, 225, 225)).all(axis=2)
    assert grey.sum() > 3 * 36 * 36  # the three cells of the class without pixels


@pytest.mark.parametrize(
    ("matrix", "names", "message"),
    [
        (np.ones(3), ["a"], r"shape \(3,\) is not \(true classes, predicted classes\)"),
        (np.ones((3, 2)), ["a", "b", "c"], r"shape \(3, 2\) is not"),
        (-np.eye(2), ["a", "b"], "must hold non-negative pixel counts"),
        (np.eye(2), ["a"], "1 class names were given for a 2x2 confusion matrix; give 2 or 2"),
    ],
)
def test_bad_matrices_are_explained(tmp_path, matrix, names, message):
    with pytest.raises(InputError, match=message):
        render_confusion_png(matrix, names, tmp_path / "cm.png")
    assert not list(tmp_path.iterdir())
