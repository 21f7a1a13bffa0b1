"""NGFF 0.5 label metadata: read back by ome-zarr-py's reader and validated by ome-zarr-models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader

from wsi_espnet.errors import InputError
from wsi_espnet.outputs.ome_zarr import write_ngff_label_metadata
from wsi_espnet.outputs.pyramid import build_label_pyramid
from wsi_espnet.segmentation.label_values import LabelClass

CLASSES = [
    LabelClass(0, "no tissue", (0, 0, 0)),
    LabelClass(1, "benign epithelium", (255, 0, 0)),
    LabelClass(2, "malignant epithelium", (0, 128, 255)),
]
MPP = 0.4976


def synthetic_mask() -> np.ndarray:
    mask = np.zeros((1000, 700), dtype=np.uint8)
    mask[100:400, 200:500] = 2
    mask[500:900, 50:300] = 1
    return mask


def make_store(path: Path, *, label_name: str = "tissue_classes") -> tuple[zarr.Group, list[str]]:
    """The layout the segment command creates: root, labels/, level 0, then the pyramid."""
    root = zarr.open_group(path, mode="a", zarr_format=3)
    root.attrs.update({"ome": {"version": "0.5"}, "wsi_espnet": {"model": "espnet"}})
    labels = root.require_group("labels")
    group = labels.create_group(label_name)
    group.create_array("0", data=synthetic_mask(), chunks=(256, 256), dimension_names=("y", "x"))
    return root, build_label_pyramid(group, min_size=128)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root, paths = make_store(tmp_path / "slide.zarr")
    write_ngff_label_metadata(root, label_name="tissue_classes", level_paths=paths, mpp=MPP, classes=CLASSES)
    return tmp_path / "slide.zarr"


def label_ome(store: Path, name: str = "tissue_classes") -> dict:
    return zarr.open_group(store / "labels" / name, mode="r").attrs["ome"]


def test_metadata_has_the_ngff_shapes(store):
    ome = label_ome(store)
    assert ome["version"] == "0.5"
    (multiscale,) = ome["multiscales"]
    assert multiscale["axes"] == [
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    assert [d["path"] for d in multiscale["datasets"]] == ["0", "1", "2", "3"]
    scales = [d["coordinateTransformations"] for d in multiscale["datasets"]]
    assert scales == [[{"type": "scale", "scale": [MPP * 2**i, MPP * 2**i]}] for i in range(4)]
    image_label = ome["image-label"]
    assert image_label["colors"] == [
        {"label-value": 0, "rgba": [0, 0, 0, 0]},
        {"label-value": 1, "rgba": [255, 0, 0, 255]},
        {"label-value": 2, "rgba": [0, 128, 255, 255]},
    ]
    assert image_label["properties"] == [
        {"label-value": 0, "name": "no tissue"},
        {"label-value": 1, "name": "benign epithelium"},
        {"label-value": 2, "name": "malignant epithelium"},
    ]
    assert image_label["source"] == {"image": "../../"}
    assert zarr.open_group(store / "labels", mode="r").attrs["ome"] == {"version": "0.5", "labels": ["tissue_classes"]}
    # The caller's own root attributes are untouched.
    assert zarr.open_group(store, mode="r").attrs.asdict() == {
        "ome": {"version": "0.5"},
        "wsi_espnet": {"model": "espnet"},
    }


@pytest.mark.parametrize("start", ["labels", "labels/tissue_classes"])
def test_ome_zarr_reader_finds_the_label_pyramid_with_its_data(store, start):
    location = parse_url(store / start)
    assert location is not None
    nodes = [node for node in Reader(location)() if node.data]

    (label_node,) = nodes
    assert label_node.metadata["name"] == "tissue_classes"
    assert [level.shape for level in label_node.data] == [(1000, 700), (500, 350), (250, 175), (125, 88)]
    np.testing.assert_array_equal(label_node.data[0].compute(), synthetic_mask())
    level_group = zarr.open_group(store / "labels" / "tissue_classes", mode="r")
    for index, level in enumerate(label_node.data):
        np.testing.assert_array_equal(level.compute(), level_group[str(index)][...])
    assert label_node.metadata["color"] == {0: [0, 0, 0, 0], 1: [1, 0, 0, 1], 2: [0, 128 / 255, 1, 1]}
    assert label_node.metadata["properties"][2] == {"name": "malignant epithelium"}


def test_ome_zarr_models_validates_labels_and_image_label(store):
    from ome_zarr_models.v05.image_label import ImageLabel
    from ome_zarr_models.v05.labels import Labels

    labels = Labels.from_zarr(zarr.open_group(store / "labels", mode="r"))
    assert labels.label_paths == ["tissue_classes"]
    image_label = ImageLabel.from_zarr(zarr.open_group(store / "labels" / "tissue_classes", mode="r"))
    metadata = image_label.attributes.ome
    assert metadata.image_label is not None
    assert [c.label_value for c in metadata.image_label.colors or ()] == [0, 1, 2]
    assert [d.path for d in metadata.multiscales[0].datasets] == ["0", "1", "2", "3"]


def test_registering_is_idempotent_and_keeps_other_labels(tmp_path):
    root, paths = make_store(tmp_path / "s.zarr")
    root["labels"].attrs["ome"] = {"version": "0.5", "labels": ["nuclei"]}
    for _ in range(2):
        write_ngff_label_metadata(root, label_name="tissue_classes", level_paths=paths, mpp=1.0, classes=CLASSES)
    assert zarr.open_group(tmp_path / "s.zarr" / "labels", mode="r").attrs["ome"]["labels"] == [
        "nuclei",
        "tissue_classes",
    ]


def test_level_downsample_sets_the_scales(tmp_path):
    root, paths = make_store(tmp_path / "s.zarr")
    write_ngff_label_metadata(
        root, label_name="tissue_classes", level_paths=paths[:2], mpp=0.25, classes=CLASSES, level_downsample=4.0
    )
    datasets = label_ome(tmp_path / "s.zarr")["multiscales"][0]["datasets"]
    assert [d["coordinateTransformations"][0]["scale"] for d in datasets] == [[0.25, 0.25], [1.0, 1.0]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mpp": 0.0}, "mpp=0.0"),
        ({"mpp": float("nan")}, "mpp=nan"),
        ({"level_paths": []}, "level_paths is empty"),
        ({"level_paths": ["0", "9"]}, "'labels/tissue_classes/9' is not an array"),
        ({"level_paths": ["1", "0"]}, "largest to smallest"),
        ({"label_name": "nuclei"}, "no label group 'labels/nuclei'"),
        ({"classes": [*CLASSES, LabelClass(2, "again", (1, 2, 3))]}, "unique"),
        ({"classes": [LabelClass(300, "too big", (1, 2, 3))]}, "outside the mask's uint8 range"),
        ({"classes": [LabelClass(1, "bad colour", (1, 2, 256))]}, "three integers in 0-255"),
        ({"level_downsample": 0.5}, "level_downsample=0.5"),
    ],
)
def test_bad_arguments_are_user_errors(tmp_path, kwargs, message):
    root, paths = make_store(tmp_path / "s.zarr")
    arguments = {"label_name": "tissue_classes", "level_paths": paths, "mpp": 0.5, "classes": CLASSES, **kwargs}
    with pytest.raises(InputError, match=message):
        write_ngff_label_metadata(root, **arguments)


def test_levels_without_dimension_names_are_refused(tmp_path):
    root = zarr.open_group(tmp_path / "s.zarr", mode="w", zarr_format=3)
    root.create_group("labels/tissue_classes").create_array("0", data=synthetic_mask())
    with pytest.raises(InputError, match=r"dimension_names=None.*dimension_names=\('y', 'x'\)"):
        write_ngff_label_metadata(root, label_name="tissue_classes", level_paths=["0"], mpp=0.5, classes=CLASSES)
