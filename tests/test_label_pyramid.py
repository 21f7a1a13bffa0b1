"""Reading back the mask of a real `wsi-espnet segment` run, from its OME-Zarr store and its OME-TIFF."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr

from wsi_espnet.errors import InputError
from wsi_espnet.models.checkpoint_io import read_model_config
from wsi_espnet.outputs import LabelPyramid, is_label_pyramid, read_label_pyramid
from wsi_espnet.segmentation.label_values import label_classes_for

SLIDE = "CMU-1-Small-Region.svs"
STEM = "CMU-1-Small-Region"
NOT_A_MASK = "is not a wsi-espnet mask"
EXPECTED = "expected a <slide>.mask.zarr folder or <slide>.mask.ome.tiff file written by `wsi-espnet segment`"


@pytest.fixture(scope="module")
def out_dir(segmented_cmu: Path) -> Path:
    """One real segmentation of the CMU slide at 2 um/px: its ``.mask.zarr``, ``.mask.ome.tiff`` and provenance."""
    return segmented_cmu


@pytest.fixture(scope="module")
def zarr_path(out_dir: Path) -> Path:
    return out_dir / f"{STEM}.mask.zarr"


@pytest.fixture(scope="module")
def tiff_path(out_dir: Path) -> Path:
    return out_dir / f"{STEM}.mask.ome.tiff"


@pytest.fixture(scope="module")
def store_levels(zarr_path: Path) -> list[np.ndarray]:
    """The class-mask levels as the store holds them, read with zarr directly, largest first."""
    group = zarr.open_group(zarr_path / "labels" / "tissue_classes", mode="r")
    names = sorted((name for name in group.array_keys()), key=int)
    assert names == [str(i) for i in range(len(names))]
    return [np.asarray(group[name][...]) for name in names]


def test_zarr_levels_are_the_stores_and_halve(zarr_path, store_levels):
    pyramid = read_label_pyramid(zarr_path)
    assert isinstance(pyramid, LabelPyramid)
    assert (pyramid.source, pyramid.path, pyramid.complete) == ("ome-zarr", zarr_path, True)
    assert len(store_levels) >= 2
    assert [level.shape for level in pyramid.levels] == [level.shape for level in store_levels]
    for smaller, larger in zip(pyramid.levels[1:], pyramid.levels, strict=False):
        assert smaller.shape == tuple(-(-side // 2) for side in larger.shape)
    assert pyramid.downsamples == tuple(2.0**i for i in range(len(store_levels)))
    for level, stored in zip(pyramid.levels, store_levels, strict=True):
        assert level.dtype == np.uint8
        np.testing.assert_array_equal(level.compute(), stored)
    assert len(np.unique(store_levels[0])) > 2  # a real mask: glass and several classes


def test_levels_are_lazy_dask_arrays_that_read_windows(zarr_path, tiff_path, store_levels):
    for path in (zarr_path, tiff_path):
        pyramid = read_label_pyramid(path)
        assert all(isinstance(level, da.Array) for level in pyramid.levels)
        assert pyramid.levels[0].npartitions > 1  # chunked, not one whole-level read
        window = pyramid.levels[0][300:400, 200:260].compute()
        np.testing.assert_array_equal(window, store_levels[0][300:400, 200:260])


def test_tiff_gives_the_same_pyramid_as_the_zarr(zarr_path, tiff_path, store_levels):
    from_zarr, from_tiff = read_label_pyramid(zarr_path), read_label_pyramid(str(tiff_path))
    assert (from_tiff.source, from_tiff.path, from_tiff.complete) == ("ome-tiff", tiff_path, True)
    assert len(from_tiff.levels) == len(from_zarr.levels)
    for tiff_level, zarr_level, stored in zip(from_tiff.levels, from_zarr.levels, store_levels, strict=True):
        assert tiff_level.shape == zarr_level.shape
        np.testing.assert_array_equal(tiff_level.compute(), stored)
    np.testing.assert_array_equal(from_tiff.levels[0].compute(), from_zarr.levels[0].compute())
    assert from_tiff.classes == from_zarr.classes
    assert from_tiff.downsamples == from_zarr.downsamples
    assert from_tiff.mpp == from_zarr.mpp


def test_classes_are_the_models_value_table(zarr_path, tiff_path, espnet_checkpoint):
    expected = tuple(label_classes_for(read_model_config(espnet_checkpoint)))
    assert expected[0].name == "no tissue"
    assert len(expected) == 21  # no tissue + the 20 Cityscapes classes, at c + 1
    for path in (zarr_path, tiff_path):
        assert read_label_pyramid(path).classes == expected


def test_mpp_is_the_runs_effective_mpp(out_dir, zarr_path, tiff_path):
    record = json.loads((out_dir / f"{STEM}.provenance.json").read_text())
    effective = record["resolution"]["effective_mpp"]
    assert effective == pytest.approx(2.0, rel=0.01)
    for path in (zarr_path, tiff_path):
        assert read_label_pyramid(path).mpp == effective


def test_tiff_levels_survive_pickling(tiff_path, store_levels):
    """Dask workers get the levels pickled: the open file stays behind and is reopened there."""
    level = read_label_pyramid(tiff_path).levels[1]
    level.compute()  # the file is open now
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(level)).compute(), store_levels[1])


def test_a_store_being_rewritten_is_not_complete(zarr_path, store_levels, tmp_path):
    copy = Path(shutil.copytree(zarr_path, tmp_path / zarr_path.name))
    root = zarr.open_group(copy, mode="r+")
    root.attrs["wsi_espnet"] = {**root.attrs["wsi_espnet"], "status": "running"}
    pyramid = read_label_pyramid(copy)
    assert pyramid.complete is False
    np.testing.assert_array_equal(pyramid.levels[0].compute(), store_levels[0])
    assert is_label_pyramid(copy)


def test_a_run_that_has_not_written_its_pyramid_yet_is_refused(zarr_path, tmp_path):
    copy = Path(shutil.copytree(zarr_path, tmp_path / zarr_path.name))
    root = zarr.open_group(copy, mode="r+")
    root.attrs["wsi_espnet"] = {**root.attrs["wsi_espnet"], "status": "running"}
    labels = zarr.open_group(copy / "labels" / "tissue_classes", mode="r+")
    del labels.attrs["ome"]
    assert is_label_pyramid(copy)  # ours: the napari reader claims it and shows this message
    with pytest.raises(InputError, match=r"has not written its pyramid yet \(status 'running'\).*rerun"):
        read_label_pyramid(copy)


def test_damaged_metadata_is_a_message_not_a_key_error(zarr_path, tmp_path):
    copy = Path(shutil.copytree(zarr_path, tmp_path / zarr_path.name))
    labels = zarr.open_group(copy / "labels" / "tissue_classes", mode="r+")
    ome = dict(labels.attrs["ome"])
    labels.attrs["ome"] = {**ome, "image-label": {"colors": [{"rgba": [1, 2, 3, 255]}]}}
    with pytest.raises(InputError, match=r"is a wsi-espnet mask but cannot be read.*rerun `wsi-espnet segment`"):
        read_label_pyramid(copy)


def _plain_folder(tmp_path: Path, _: Path) -> Path:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a mask")
    return folder


def _zarr_of_someone_else(tmp_path: Path, _: Path) -> Path:
    root = zarr.open_group(tmp_path / "other.mask.zarr", mode="w", zarr_format=3)
    root.attrs["ome"] = {"version": "0.5"}
    root.create_group("labels/tissue_classes").create_array("0", shape=(64, 64), dtype="uint8")
    return tmp_path / "other.mask.zarr"


def _zarr_without_the_class_labels(tmp_path: Path, _: Path) -> Path:
    root = zarr.open_group(tmp_path / "half.zarr", mode="w", zarr_format=3)
    root.attrs["wsi_espnet"] = {"status": "complete"}
    root.create_group("labels/nuclei")
    return tmp_path / "half.zarr"


def _text_file(tmp_path: Path, _: Path) -> Path:
    (tmp_path / "slide.mask.ome.tiff").write_text("not a TIFF")
    return tmp_path / "slide.mask.ome.tiff"


@pytest.mark.parametrize(("make_path", "reason"), [
    (lambda tmp, data: tmp / "missing.mask.zarr", "it does not exist"),
    (_plain_folder, "a folder without zarr.json"),
    (_zarr_of_someone_else, "without the 'wsi_espnet' attributes"),
    (_zarr_without_the_class_labels, "without the 'labels/tissue_classes' group"),
    (lambda tmp, data: data / "bad-inputs" / "strip-tiff-not-a-pyramid.tif", "no OME-XML metadata"),
    (lambda tmp, data: data / "slides" / SLIDE, "no OME-XML metadata"),
    (_text_file, "cannot be read as an OME-TIFF"),
])  # fmt: skip
def test_what_is_not_our_mask_is_refused_with_what_was_expected(shared_data, tmp_path, make_path, reason):
    path = make_path(tmp_path, shared_data)
    with pytest.raises(InputError) as raised:
        read_label_pyramid(path)
    message = str(raised.value)
    assert message.startswith(f"{path} {NOT_A_MASK}: ")
    assert reason in message
    assert message.endswith(f"; {EXPECTED}.")
    assert not is_label_pyramid(path)


def test_is_label_pyramid_claims_only_our_outputs(out_dir, zarr_path, tiff_path, shared_data):
    assert is_label_pyramid(zarr_path)
    assert is_label_pyramid(str(tiff_path))
    assert not is_label_pyramid(out_dir / f"{STEM}.provenance.json")
    assert not is_label_pyramid(zarr_path / "labels")  # inside our store, not the store
    assert not is_label_pyramid(shared_data / "slides" / "CMU-1-Small-Region-dicom")
