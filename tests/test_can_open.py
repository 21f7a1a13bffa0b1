"""`can_open`: which paths a slide reader (the napari plugin's included) should offer to open."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from wsi_espnet.slides import can_open, open_slide

SLIDES = ["CMU-1-Small-Region.svs", "CMU-1-Small-Region-dicom", "tcga-cr-7395-01a-01-ts1.svs", "test3-DAPI-2-387.ndpi"]


@pytest.fixture(scope="module")
def out_dir(segmented_cmu: Path) -> Path:
    """The outputs of one real segmentation of the CMU slide: masks, provenance, tissue PNG."""
    return segmented_cmu


@pytest.mark.parametrize("name", SLIDES)
def test_every_real_slide_can_be_opened(shared_data, name):
    path = shared_data / "slides" / name
    assert can_open(path)
    assert can_open(str(path))
    with open_slide(path) as reader:  # and open_slide agrees
        assert reader.level_count >= 1


def test_the_slides_folder_lists_no_surprises(shared_data):
    """Everything in slides/ that can_open accepts is one of the real slides (the run log is not)."""
    accepted = sorted(p.name for p in (shared_data / "slides").iterdir() if can_open(p))
    assert accepted == sorted(SLIDES)


def test_segmentation_outputs_are_not_slides(out_dir):
    stem = "CMU-1-Small-Region"
    outputs = [out_dir / f"{stem}.mask.zarr", out_dir / f"{stem}.mask.ome.tiff", out_dir / f"{stem}.provenance.json"]
    for path in outputs:
        assert path.exists()
        assert not can_open(path), path
    assert not can_open(out_dir / f"{stem}.mask.zarr" / "labels" / "tissue_classes")  # inside the store


def test_a_renamed_copy_of_a_mask_store_is_still_not_a_slide(out_dir, tmp_path):
    """A zarr store is never a DICOM folder, whatever its name."""
    copy = shutil.copytree(out_dir / "CMU-1-Small-Region.mask.zarr", tmp_path / "renamed")
    assert not can_open(copy)


@pytest.mark.parametrize("make_path", [
    lambda tmp: tmp / "missing.svs",
    lambda tmp: tmp / "missing-folder",
    lambda tmp: _write(tmp / "notes.txt", "not a slide"),
    lambda tmp: _write(tmp / "no-suffix", "not a slide"),
    lambda tmp: _mkdir(tmp / "empty"),
    lambda tmp: _write(_mkdir(tmp / "notes") / "readme.txt", "not a slide").parent,
])  # fmt: skip
def test_what_is_not_a_slide_gives_false(tmp_path, make_path):
    assert can_open(make_path(tmp_path)) is False


def test_a_damaged_slide_with_a_slide_suffix_is_left_to_open_slide(tmp_path):
    """No pixels are read: open_slide, not can_open, says what is wrong with an empty or cut-off file."""
    assert can_open(_write(tmp_path / "empty.svs", ""))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path
