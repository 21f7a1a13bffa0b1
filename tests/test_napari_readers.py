"""The napari plugin's readers in a real viewer (PyQt6 under Xvfb, started by `.ci/run`): slides as lazy
multiscale images in micrometres, our masks as coloured Labels aligned to them, other files left alone."""

from __future__ import annotations

import os

import numpy as np
import pytest
from dask.callbacks import Callback

pytest.importorskip("napari", reason="the napari plugin's tests need the napari extra (pip install -e '.[test]')")
if not os.environ.get("DISPLAY") and os.environ.get("CI") != "true":
    pytest.skip("no display: run under xvfb-run (as .ci/run does) to test the napari plugin", allow_module_level=True)

from wsi_espnet_napari import get_reader

from wsi_espnet.outputs.label_pyramid import read_label_pyramid
from wsi_espnet.segment_slide import SegmentOptions, segment_slide

PLUGIN = "wsi-espnet"


class _BlockReads(Callback):  # type: ignore[misc]
    """Counts the slide blocks dask computes (``slide_level_dask``'s ``_read_block`` tasks)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = 0

    def _posttask(self, key: object, result: object, dsk: object, state: object, id: object) -> None:
        name = key[0] if isinstance(key, tuple) else key
        if isinstance(name, str) and name.startswith("slide-level-"):
            self.blocks += 1


@pytest.fixture(scope="module")
def segmented(shared_data, tmp_path_factory):
    """CMU-1-Small-Region segmented at 2 um/px (4x coarser than the slide) into a folder beside a copy."""
    folder = tmp_path_factory.mktemp("segmented")
    slide = folder / "CMU-1-Small-Region.svs"
    slide.symlink_to(shared_data / "slides" / "CMU-1-Small-Region.svs")
    result = segment_slide(slide, None, SegmentOptions(out_dir=folder, target_mpp=2.0, tile_size=512,
                                                       formats=frozenset({"ome-zarr", "ome-tiff"})))  # fmt: skip
    return slide, result


@pytest.mark.parametrize(("name", "mpp", "levels"), [
    ("CMU-1-Small-Region.svs", 0.499, 1),
    ("test3-DAPI-2-387.ndpi", 0.22817, 4),
    ("CMU-1-Small-Region-dicom", 0.499, 1),
])  # fmt: skip
def test_a_slide_opens_as_a_lazy_multiscale_image_in_micrometres(make_napari_viewer, shared_data, name, mpp, levels):
    viewer = make_napari_viewer()
    with _BlockReads() as reads:
        (layer,) = viewer.open(shared_data / "slides" / name, plugin=PLUGIN)
    assert layer.rgb
    assert layer.multiscale == (levels > 1)
    data = layer.data if layer.multiscale else [layer.data]
    assert len(data) == levels
    assert all(level.dtype == np.uint8 and level.shape[-1] == 3 for level in data)
    assert layer.scale[-1] == pytest.approx(mpp, rel=1e-3)
    assert tuple(str(u) for u in layer.units) == ("micrometer", "micrometer")
    if levels > 1:  # a pyramid: adding the layer reads at most the coarse level, never level 0 whole
        assert reads.blocks < np.prod(data[0].numblocks)


def test_nothing_is_read_until_a_level_is_drawn(make_napari_viewer, shared_data):
    """The NDPI's 4 levels are 17 blocks of 512 px at level 0: adding the layer reads none of them."""
    viewer = make_napari_viewer()
    with _BlockReads() as reads:
        (layer,) = viewer.open(shared_data / "slides" / "test3-DAPI-2-387.ndpi", plugin=PLUGIN)
        before = reads.blocks
        viewer.window._qt_window.show()  # a drawn frame reads only the tiles it shows
        viewer.reset_view()
        viewer.screenshot(canvas_only=True, flash=False)
    level0_blocks = int(np.prod(layer.data[0].numblocks))
    assert reads.blocks - before < level0_blocks, "drawing the whole slide read the full-resolution level"


def test_a_segmented_slide_opens_with_its_mask_aligned(make_napari_viewer, segmented):
    slide, result = segmented
    viewer = make_napari_viewer()
    image, labels = viewer.open(slide, plugin=PLUGIN)
    pyramid = read_label_pyramid(result.outputs["ome-zarr"])
    assert labels.multiscale
    assert len(labels.data) == len(pyramid.levels) >= 2
    assert labels.data[0].shape == pyramid.levels[0].shape
    # The mask (2 um/px) covers the same micrometres as the slide (0.499 um/px), corner to corner.
    slide_extent = np.array(image.data.shape[:2]) * image.scale
    mask_extent = np.array(labels.data[0].shape) * labels.scale
    assert np.abs(mask_extent - slide_extent).max() <= labels.scale.max()
    assert image.translate == pytest.approx(image.scale / 2)
    assert labels.translate == pytest.approx(labels.scale / 2)
    # Class colours and names, 0 transparent.
    for label in pyramid.classes:
        rgba = labels.colormap.map(np.array([label.value]))[0]
        if label.value == 0:
            assert rgba[3] == 0
        else:
            assert np.allclose(rgba[:3] * 255, label.color, atol=1)
            assert rgba[3] == 1
    assert list(labels.features["class"]) == [c.name for c in pyramid.classes]


@pytest.mark.parametrize("output", ["ome-zarr", "ome-tiff"])
def test_a_mask_opens_on_its_own_as_labels(make_napari_viewer, segmented, output):
    _, result = segmented
    viewer = make_napari_viewer()
    (labels,) = viewer.open(result.outputs[output], plugin=PLUGIN)
    assert labels.data[0].dtype == np.uint8
    assert labels.scale[-1] == pytest.approx(2.0)
    assert set(np.unique(np.asarray(labels.data[-1]))) <= {
        c.value for c in read_label_pyramid(result.outputs[output]).classes
    }


def test_paths_that_are_not_ours_are_left_to_other_readers(tmp_path, shared_data):
    import zarr

    other = tmp_path / "other.zarr"
    zarr.create_array(other, shape=(4, 4), dtype="uint8")
    (tmp_path / "notes.txt").write_text("not a slide")
    (tmp_path / "photo.png").write_bytes((shared_data / "espnet-original" / "cityscapes-samples").joinpath(
        "frankfurt_000000_000294_leftImg8bit.png").read_bytes())  # fmt: skip
    for path in (other, tmp_path / "notes.txt", tmp_path / "photo.png", tmp_path / "missing.svs"):
        assert get_reader(str(path)) is None, path
    assert get_reader([str(other), str(other)]) is None


def test_a_slide_stored_without_a_pyramid_gets_lazy_halved_levels(tmp_path):
    """napari reads a non-multiscale image whole; a 4608 px single-level TIFF is shown as 2 levels."""
    import tifffile
    from wsi_espnet_napari import slide_layer

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4608, 4100, 3), dtype=np.uint8)
    path = tmp_path / "flat.tif"
    tifffile.imwrite(
        path, pixels, tile=(256, 256), photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER"
    )
    data, kwargs, kind = slide_layer(path, mpp=0.5)
    assert kind == "image"
    assert kwargs["multiscale"]
    assert [level.shape for level in data] == [(4608, 4100, 3), (2304, 2050, 3)]
    expected = pixels[:512, :512].reshape(256, 2, 256, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    assert np.array_equal(np.asarray(data[1][:256, :256]), expected)


def test_a_damaged_slide_is_refused_with_the_libraries_message(make_napari_viewer, shared_data):
    """napari shows a reader's ValueError as its message: ours, not a traceback from OpenSlide."""
    bad = shared_data / "bad-inputs" / "malformed-wsi.dcm"
    reader = get_reader(str(bad))
    assert reader is not None  # a .dcm is ours to try, so the user hears why it cannot be opened
    with pytest.raises(ValueError, match=r"OpenSlide cannot open .*malformed-wsi.dcm") as caught:
        reader(str(bad))
    assert "Expected a slide in a format OpenSlide reads" in str(caught.value)
    viewer = make_napari_viewer()
    with pytest.raises(Exception, match=r"OpenSlide cannot open"):
        viewer.open(bad, plugin=PLUGIN)
    assert len(viewer.layers) == 0
