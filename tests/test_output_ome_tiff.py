"""Pyramidal OME-TIFF of a mask: one file that tifffile (OME), tiffslide and OpenSlide open as a pyramid."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
import tiffslide
import zarr
from skimage.draw import disk, polygon

from wsi_espnet.errors import InputError
from wsi_espnet.outputs.ome_tiff import write_ome_tiff
from wsi_espnet.outputs.pyramid import build_label_pyramid
from wsi_espnet.segmentation.label_values import LabelClass

MPP = 0.2527
CLASSES = [
    LabelClass(0, "no tissue", (0, 0, 0)),
    LabelClass(1, "benign epithelium", (0, 200, 0)),
    LabelClass(2, "malignant epithelium", (255, 0, 0)),
    LabelClass(3, "normal stroma", (255, 128, 255)),
    LabelClass(4, "necrosis", (40, 40, 200)),
]
UNLISTED_VALUE = 9  # present in the mask without a class: keeps its grey-ramp colour
OME = "{http://www.openmicroscopy.org/Schemas/OME/2016-06}"


def expected_rgba(values: np.ndarray) -> np.ndarray:
    """What OpenSlide renders: the class colour (grey ramp for other values), opaque."""
    lookup = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 4, axis=1)
    lookup[:, 3] = 255
    for label in CLASSES:
        lookup[label.value, :3] = label.color
    return lookup[values]


@pytest.fixture(scope="module")
def mask_levels() -> list[np.ndarray]:
    """A 3000 x 2200 mask with every class, an unlisted value, curved and odd-sized shapes; its pyramid."""
    mask = np.zeros((3000, 2200), dtype=np.uint8)
    mask[200:1700, 100:1500] = 3
    mask[disk((900, 800), 500, shape=mask.shape)] = 1
    mask[disk((900, 800), 200, shape=mask.shape)] = 2
    mask[polygon([1800, 2900, 2900], [300, 300, 2100], shape=mask.shape)] = 4
    mask[2000:2011, 1900:1907] = UNLISTED_VALUE
    root = zarr.open_group(store=zarr.storage.MemoryStore(), mode="w")
    root.create_array("0", data=mask, chunks=(1024, 1024))
    return [root[path][...] for path in build_label_pyramid(root, min_size=256)]


@pytest.fixture(scope="module")
def tiff_path(mask_levels, tmp_path_factory) -> Path:
    root = zarr.open_group(store=zarr.storage.MemoryStore(), mode="w")
    zarr_levels = [root.create_array(str(i), data=level, chunks=(700, 700)) for i, level in enumerate(mask_levels)]
    path = tmp_path_factory.mktemp("ome_tiff") / "mask.ome.tif"
    assert write_ome_tiff(zarr_levels, path, mpp=MPP, classes=CLASSES) == path
    return path


def test_pyramid_has_the_expected_levels(mask_levels):
    assert [level.shape for level in mask_levels] == [(3000, 2200), (1500, 1100), (750, 550), (375, 275), (188, 138)]


def test_tiffslide_opens_every_level_with_mask_values_and_mpp(tiff_path, mask_levels):
    with tiffslide.TiffSlide(tiff_path) as slide:
        assert slide.level_count == len(mask_levels)
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(MPP, rel=1e-9)
        assert float(slide.properties["tiffslide.mpp-y"]) == pytest.approx(MPP, rel=1e-9)
        for index, level in enumerate(mask_levels):
            assert slide.level_dimensions[index] == (level.shape[1], level.shape[0])
            region = slide.read_region((0, 0), index, slide.level_dimensions[index])
            assert region.mode == "L"  # single channel: the mask values themselves
            np.testing.assert_array_equal(np.asarray(region), level)
        # Level-0 coordinates at a coarser level, as a viewer reads them.
        window = slide.read_region((1000, 600), 2, (100, 80), as_array=True)
        np.testing.assert_array_equal(window[..., 0], mask_levels[2][150:230, 250:350])


def test_openslide_opens_every_level_with_class_colours_and_mpp(tiff_path, mask_levels):
    with openslide.OpenSlide(tiff_path) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert slide.level_count == len(mask_levels)
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(MPP, rel=1e-9)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(MPP, rel=1e-9)
        for index, level in enumerate(mask_levels):
            assert slide.level_dimensions[index] == (level.shape[1], level.shape[0])
            region = slide.read_region((0, 0), index, slide.level_dimensions[index])
            assert region.mode == "RGBA"
            np.testing.assert_array_equal(np.asarray(region), expected_rgba(level))


def test_tifffile_sees_one_ome_image_with_subifd_levels(tiff_path, mask_levels):
    with tifffile.TiffFile(tiff_path) as tif:
        assert tif.is_ome
        assert tif.is_bigtiff
        (series,) = [s for s in tif.series if s.kind == "ome"]
        assert len(series.levels) == len(mask_levels)
        for level, want in zip(series.levels, mask_levels, strict=True):
            page = level.keyframe
            assert page.is_tiled
            assert (page.tilelength, page.tilewidth) == (512, 512)
            assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
            assert page.photometric == tifffile.PHOTOMETRIC.PALETTE
            np.testing.assert_array_equal(level.asarray(), want)

    # The main IFD chain, as a non-OME reader (OpenSlide) sees it: level 0 then the reduced copies.
    with tifffile.TiffFile(tiff_path, is_ome=False) as tif:
        pages = list(tif.pages)
        assert [page.shape for page in pages] == [level.shape for level in mask_levels]
        assert [page.subfiletype for page in pages] == [0] + [1] * (len(mask_levels) - 1)
        for index, (page, want) in enumerate(zip(pages, mask_levels, strict=True)):
            assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER
            assert page.resolution == pytest.approx((1e4 / (MPP * 2**index),) * 2)
            np.testing.assert_array_equal(page.asarray(), want)
        colormap = pages[0].colormap
        assert colormap is not None
        assert tuple(colormap[:, 2] // 257) == (255, 0, 0)
        assert tuple(colormap[:, UNLISTED_VALUE] // 257) == (UNLISTED_VALUE,) * 3


def test_ome_xml_has_pixel_size_names_and_colours(tiff_path):
    with tifffile.TiffFile(tiff_path) as tif:
        ome = ET.fromstring(tif.ome_metadata or "")
    pixels = ome.find(f"{OME}Image/{OME}Pixels")
    assert pixels is not None
    assert float(pixels.get("PhysicalSizeX", "nan")) == pytest.approx(MPP)
    assert float(pixels.get("PhysicalSizeY", "nan")) == pytest.approx(MPP)
    assert pixels.get("PhysicalSizeXUnit") == "µm"
    assert (pixels.get("SizeX"), pixels.get("SizeY"), pixels.get("Type")) == ("2200", "3000", "uint8")
    assert [t.attrib for t in pixels.iter(f"{OME}TiffData")] == [{"IFD": "0", "PlaneCount": "1"}]
    maps = {
        annotation.get("Namespace"): {m.get("K"): m.text for m in annotation.iter(f"{OME}M")}
        for annotation in ome.iter(f"{OME}MapAnnotation")
    }
    assert maps["wsi-espnet/class-names"] == {str(c.value): c.name for c in CLASSES}
    assert maps["wsi-espnet/class-colors"]["2"] == "#FF0000"


def test_numpy_levels_and_a_single_level(tmp_path):
    mask = np.zeros((40, 70), dtype=np.uint8)
    mask[10:30, 5:50] = 2
    path = write_ome_tiff([mask], tmp_path / "one.ome.tif", mpp=1.0, classes=CLASSES, tile=16, compression="zstd")
    with tiffslide.TiffSlide(path) as slide:
        assert slide.level_count == 1
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (70, 40), as_array=True)[..., 0], mask)
    with openslide.OpenSlide(path) as slide:
        assert slide.level_count == 1


class FailingLevel(np.ndarray):
    """A level whose lower half cannot be read, like a store that disappears mid-write."""

    def __getitem__(self, key):
        rows = key[0] if isinstance(key, tuple) else key
        if isinstance(rows, slice) and (rows.start or 0) >= 32:
            raise OSError("store went away")
        return super().__getitem__(key)


def test_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    path = tmp_path / "mask.ome.tif"
    path.write_bytes(b"previous result")
    level = np.zeros((64, 64), dtype=np.uint8).view(FailingLevel)
    with pytest.raises(OSError, match="store went away"):
        write_ome_tiff([level], path, mpp=0.5, classes=CLASSES, tile=16)
    assert path.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.ome.tif"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"levels": []}, "levels is empty"),
        ({"levels": [np.zeros((8, 8), np.uint16)]}, "level 0 must be a 2-D uint8 mask"),
        ({"levels": [np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)]}, "must be half of level 0"),
        ({"mpp": -1.0}, "mpp=-1.0"),
        ({"tile": 100}, "tile=100"),
        ({"compression": "jpeg"}, "compression='jpeg'"),
        ({"classes": [LabelClass(256, "too big", (0, 0, 0))]}, "outside the mask's uint8 range"),
        ({"path": Path("/nonexistent/folder/mask.ome.tif")}, "does not exist"),
    ],
)
def test_bad_arguments_are_user_errors(tmp_path, kwargs, message):
    arguments = {
        "levels": [np.zeros((32, 32), np.uint8)],
        "path": tmp_path / "mask.ome.tif",
        "mpp": 0.5,
        "classes": CLASSES,
        **kwargs,
    }
    levels, path = arguments.pop("levels"), arguments.pop("path")
    with pytest.raises(InputError, match=message):
        write_ome_tiff(levels, path, **arguments)
    assert not any(tmp_path.iterdir())
