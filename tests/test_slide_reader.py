"""Opening real slides, reading windows in (row, col) pixels, and the errors bad inputs give."""

from __future__ import annotations

import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from wsi_espnet.errors import InputError
from wsi_espnet.slides import SlideError, describe_slide, open_slide

CMU_SVS = "slides/CMU-1-Small-Region.svs"
CMU_DICOM = "slides/CMU-1-Small-Region-dicom"
TCGA_SVS = "slides/tcga-cr-7395-01a-01-ts1.svs"
NDPI = "slides/test3-DAPI-2-387.ndpi"
STRIP_TIFF = "bad-inputs/strip-tiff-not-a-pyramid.tif"
MALFORMED_DICOM = "bad-inputs/malformed-wsi.dcm"


@pytest.mark.parametrize(
    ("relative_path", "backend", "expected"),
    [
        (
            CMU_SVS,
            "auto",
            {
                "backend": "tiffslide",
                "level_shapes": ((2967, 2220),),
                "mpp": 0.499,
                "vendor": "aperio",
                "objective_power": 20.0,
                "associated_images": {"label", "macro", "thumbnail"},
            },
        ),
        (
            CMU_DICOM,
            "auto",
            {
                "backend": "openslide",
                "level_shapes": ((2967, 2220),),
                "mpp": 0.499,
                "vendor": "dicom",
                "objective_power": None,
                "associated_images": {"label", "macro", "thumbnail"},
            },
        ),
        (
            TCGA_SVS,
            "auto",
            {
                "backend": "tiffslide",
                "level_shapes": ((3567, 4443), (1783, 2221)),
                "mpp": None,
                "vendor": "aperio",
                "objective_power": None,
                "associated_images": {"thumbnail"},
            },
        ),
        (
            # tiffslide serves the four levels stored in the file ...
            NDPI,
            "auto",
            {
                "backend": "tiffslide",
                "level_shapes": ((4864, 3968), (2432, 1984), (1216, 992), (608, 496)),
                "mpp": 0.2281750559028887,
                "vendor": "hamamatsu",
                "objective_power": 40.0,
                "associated_images": {"macro", "map"},
            },
        ),
        (
            # ... OpenSlide adds three more, decoded at 1/2, 1/4 and 1/8 scale from the last one.
            NDPI,
            "openslide",
            {
                "backend": "openslide",
                "level_shapes": tuple((4864 // 2**k, 3968 // 2**k) for k in range(7)),
                "mpp": 0.2281750559028887,
                "vendor": "hamamatsu",
                "objective_power": 40.0,
                "associated_images": {"macro"},
            },
        ),
        (
            STRIP_TIFF,
            "auto",
            {
                "backend": "image",
                "level_shapes": ((901, 1493),),
                "mpp": None,
                "vendor": None,
                "objective_power": None,
                "associated_images": set(),
            },
        ),
    ],
    ids=["svs", "dicom-folder", "tcga-svs-no-mpp", "ndpi-tiffslide", "ndpi-openslide", "strip-tiff"],
)
def test_opens_real_slides(shared_data: Path, relative_path: str, backend: str, expected: dict[str, object]) -> None:
    with open_slide(shared_data / relative_path, backend=backend) as reader:  # type: ignore[arg-type]
        assert reader.backend == expected["backend"]
        assert reader.level_shapes == expected["level_shapes"]
        assert reader.level_count == len(reader.level_shapes)
        assert reader.mpp == pytest.approx(expected["mpp"])
        assert reader.mpp_source == ("none" if expected["mpp"] is None else "metadata")
        assert reader.vendor == expected["vendor"]
        assert reader.objective_power == expected["objective_power"]
        assert set(reader.associated_images) == expected["associated_images"]
        assert reader.level_downsamples[0] == 1.0
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in reader.properties.items())
        for level, (height, width) in enumerate(reader.level_shapes):
            level0_height, level0_width = reader.level_shapes[0]
            assert reader.level_downsamples[level] == pytest.approx((level0_height / height + level0_width / width) / 2)


def test_mpp_property_names(shared_data: Path) -> None:
    with open_slide(shared_data / CMU_SVS) as svs, open_slide(shared_data / CMU_DICOM) as dicom:
        assert float(svs.properties["tiffslide.mpp-x"]) == pytest.approx(0.499)
        assert float(dicom.properties["openslide.mpp-y"]) == pytest.approx(0.499)


def test_level_mpp(shared_data: Path) -> None:
    with open_slide(shared_data / NDPI, backend="openslide") as reader:
        assert reader.level_mpp(0) == pytest.approx(0.228175, rel=1e-5)
        assert reader.level_mpp(6) == pytest.approx(0.2281750559028887 * 64)
        with pytest.raises(SlideError, match=r"level=7 out of range.*levels 0 to 6"):
            reader.level_mpp(7)
    with open_slide(shared_data / TCGA_SVS) as reader:
        assert reader.level_mpp(1) is None


def test_mpp_override(shared_data: Path) -> None:
    with open_slide(shared_data / TCGA_SVS, mpp=0.5) as reader:
        assert (reader.mpp, reader.mpp_source) == (0.5, "override")
        assert reader.level_mpp(1) == pytest.approx(0.5 * reader.level_downsamples[1])
    with open_slide(shared_data / CMU_SVS, mpp=0.25) as reader:
        assert (reader.mpp, reader.mpp_source) == (0.25, "override")


@pytest.mark.parametrize("bad_mpp", [0, -0.5, float("nan"), float("inf"), "0.5", True])
def test_mpp_override_must_be_positive_number(shared_data: Path, bad_mpp: object) -> None:
    with pytest.raises(SlideError, match=r"is not a positive number of micrometres per pixel.*0\.25.*40x"):
        open_slide(shared_data / CMU_SVS, mpp=bad_mpp)  # type: ignore[arg-type]


# --- pixels -------------------------------------------------------------------------------------


def test_read_region_is_row_col_against_tifffile(shared_data: Path) -> None:
    truth = tifffile.imread(shared_data / CMU_SVS, key=0)  # (H, W, 3)
    with open_slide(shared_data / CMU_SVS) as reader:
        window = reader.read_region(0, top=1000, left=300, height=70, width=190)
        np.testing.assert_array_equal(window, truth[1000:1070, 300:490])
        assert window.dtype == np.uint8
        np.testing.assert_array_equal(reader.read_level(0), truth)


def test_read_region_on_a_non_integer_downsample_level(shared_data: Path) -> None:
    """TCGA level 1 is 2.0005x smaller; level coordinates must still land on exact pixels."""
    with tifffile.TiffFile(shared_data / TCGA_SVS) as tiff:
        truth = tiff.series[0].levels[1].asarray()
    with open_slide(shared_data / TCGA_SVS) as reader:
        assert truth.shape[:2] == reader.level_shapes[1]
        for top, left in [(0, 0), (1001, 1333), (777, 2001), (1700, 2150)]:
            window = reader.read_region(1, top, left, 83, 71)
            np.testing.assert_array_equal(window, truth[top : top + 83, left : left + 71], err_msg=f"{top=} {left=}")


def test_tiffslide_and_openslide_agree_on_ndpi(shared_data: Path) -> None:
    with (
        open_slide(shared_data / NDPI) as tiff_reader,
        open_slide(shared_data / NDPI, backend="openslide") as os_reader,
    ):
        for level, (top, left) in [(0, (3000, 1200)), (2, (500, 300))]:
            np.testing.assert_array_equal(
                tiff_reader.read_region(level, top, left, 120, 200), os_reader.read_region(level, top, left, 120, 200)
            )


def test_dicom_folder_matches_svs(shared_data: Path) -> None:
    with open_slide(shared_data / CMU_SVS) as svs, open_slide(shared_data / CMU_DICOM) as dicom:
        assert dicom.level_shapes == svs.level_shapes
        a = svs.read_region(0, 1000, 800, 512, 512).astype(np.int16)
        b = dicom.read_region(0, 1000, 800, 512, 512).astype(np.int16)
        # The DICOM copy was JPEG re-encoded, so close but not identical.
        assert np.abs(a - b).mean() < 8
        assert a.std() > 20  # tissue, not blank glass


def test_one_dicom_instance_opens_the_series(shared_data: Path) -> None:
    instance = sorted((shared_data / CMU_DICOM).glob("*.dcm"))[0]
    with open_slide(instance) as reader:
        assert reader.backend == "openslide"
        assert reader.level_shapes == ((2967, 2220),)


def test_strip_tiff_pixels_match_pillow(shared_data: Path) -> None:
    truth = np.asarray(Image.open(shared_data / STRIP_TIFF).convert("RGB"))
    with open_slide(shared_data / STRIP_TIFF) as reader:
        np.testing.assert_array_equal(reader.read_level(0), truth)
        np.testing.assert_array_equal(reader.read_region(0, 800, 1400, 101, 93)[:101, :93], truth[800:901, 1400:1493])


@pytest.mark.parametrize(
    ("top", "left", "height", "width"),
    [(-50, -40, 30, 20), (2967, 0, 10, 10), (0, 2220, 10, 10), (5000, 5000, 8, 8), (-10, 2220, 5, 5)],
)
def test_window_entirely_outside_is_white(shared_data: Path, top: int, left: int, height: int, width: int) -> None:
    with open_slide(shared_data / CMU_SVS) as reader:
        window = reader.read_region(0, top, left, height, width)
    assert window.shape == (height, width, 3)
    assert (window == 255).all()


@pytest.mark.parametrize("relative_path", [CMU_SVS, CMU_DICOM, TCGA_SVS, STRIP_TIFF])
def test_window_straddling_edges_is_inside_part_plus_white(shared_data: Path, relative_path: str) -> None:
    with open_slide(shared_data / relative_path) as reader:
        level = reader.level_count - 1
        height, width = reader.level_shapes[level]
        # Overhangs the bottom-right corner by 30 rows and 50 columns.
        window = reader.read_region(level, height - 70, width - 100, 100, 150)
        inside = reader.read_region(level, height - 70, width - 100, 70, 100)
        np.testing.assert_array_equal(window[:70, :100], inside)
        assert (window[70:] == 255).all()
        assert (window[:, 100:] == 255).all()
        # Overhangs the top-left corner.
        window = reader.read_region(level, -5, -7, 20, 30)
        np.testing.assert_array_equal(window[5:, 7:], reader.read_region(level, 0, 0, 15, 23))
        assert (window[:5] == 255).all()
        assert (window[:, :7] == 255).all()


def test_empty_window(shared_data: Path) -> None:
    with open_slide(shared_data / CMU_SVS) as reader:
        assert reader.read_region(0, 10, 10, 0, 5).shape == (0, 5, 3)


def test_read_region_argument_errors(shared_data: Path) -> None:
    with open_slide(shared_data / CMU_SVS) as reader:
        with pytest.raises(SlideError, match=r"level=1 out of range.*levels 0 to 0"):
            reader.read_region(1, 0, 0, 10, 10)
        with pytest.raises(SlideError, match="cannot be negative"):
            reader.read_region(0, 0, 0, -1, 10)
        with pytest.raises(SlideError, match=r"more than the 268,435,456.*slide_level_dask"):
            reader.read_region(0, 0, 0, 16385, 16385)


def test_read_level_refuses_huge_levels(tmp_path: Path) -> None:
    path = tmp_path / "huge.tif"
    tile = np.full((1024, 1024, 3), 255, np.uint8)
    tiles = (tile for _ in range(17 * 17))
    tifffile.imwrite(path, tiles, shape=(16385, 16385, 3), dtype=np.uint8, tile=(1024, 1024), compression="zstd")
    with open_slide(path) as reader:
        assert reader.backend == "tiffslide"
        with pytest.raises(SlideError, match=r"level 0 of huge\.tif is 16385 x 16385 = 268,468,225 pixels"):
            reader.read_level(0)
        assert (reader.read_region(0, 16000, 16000, 600, 600) == 255).all()


def test_alpha_is_composited_onto_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (200, 100, 0)
    rgba[..., 3] = [[255, 0, 128], [255, 255, 0]]
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    with open_slide(path) as reader:
        assert reader.backend == "image"
        pixels = reader.read_level(0)
    np.testing.assert_array_equal(pixels[0, 0], (200, 100, 0))
    np.testing.assert_array_equal(pixels[0, 1], (255, 255, 255))
    np.testing.assert_array_equal(pixels[0, 2], np.round((np.array([200, 100, 0]) * 128 + 255 * 127) / 255))


def test_jpeg_image(tmp_path: Path, shared_data: Path) -> None:
    path = tmp_path / "patch.jpg"
    Image.fromarray(tifffile.imread(shared_data / CMU_SVS, key=0)[:300, :200]).save(path, quality=95)
    with open_slide(path, mpp=0.5) as reader:
        assert (reader.backend, reader.level_shapes, reader.mpp) == ("image", ((300, 200),), 0.5)
        np.testing.assert_array_equal(reader.read_level(0), np.asarray(Image.open(path)))


def test_associated_images(shared_data: Path) -> None:
    with open_slide(shared_data / CMU_SVS) as svs, open_slide(shared_data / CMU_DICOM) as dicom:
        label = svs.read_associated("label")
        assert label.shape == (463, 387, 3)
        assert label.dtype == np.uint8
        assert dicom.read_associated("label").shape == (463, 387, 3)
        with pytest.raises(SlideError, match=r"no associated image 'barcode'.*'thumbnail'"):
            svs.read_associated("barcode")


# --- pickling, threads, handle lifetime -----------------------------------------------------------


@pytest.mark.parametrize("relative_path", [CMU_SVS, CMU_DICOM, STRIP_TIFF])
def test_pickle_round_trip_reads_identical_pixels(shared_data: Path, relative_path: str) -> None:
    with open_slide(shared_data / relative_path, mpp=0.3) as reader:
        before = reader.read_region(0, 400, 500, 64, 96)
        copy = pickle.loads(pickle.dumps(reader))
    with copy:
        assert (copy.path, copy.backend, copy.level_shapes, copy.mpp) == (
            reader.path,
            reader.backend,
            reader.level_shapes,
            0.3,
        )
        np.testing.assert_array_equal(copy.read_region(0, 400, 500, 64, 96), before)


def test_pickle_drops_the_open_handle(shared_data: Path) -> None:
    with open_slide(shared_data / CMU_SVS) as reader:
        reader.read_region(0, 0, 0, 8, 8)
        assert len(pickle.dumps(reader)) < 20_000  # metadata only, no file contents or tile caches


@pytest.mark.parametrize("relative_path", [CMU_SVS, CMU_DICOM])
def test_concurrent_reads_equal_serial_reads(shared_data: Path, relative_path: str) -> None:
    windows = [(top, left) for top in range(0, 2900, 480) for left in range(0, 2200, 560)]
    with open_slide(shared_data / relative_path) as reader:
        serial = [reader.read_region(0, top, left, 200, 300) for top, left in windows]
        reader.close()  # the threads race to reopen it
        with ThreadPoolExecutor(max_workers=4) as pool:
            parallel = list(pool.map(lambda w: reader.read_region(0, w[0], w[1], 200, 300), windows))
    for expected, got in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(got, expected)


def test_read_after_close_reopens(shared_data: Path) -> None:
    reader = open_slide(shared_data / CMU_SVS)
    first = reader.read_region(0, 10, 10, 16, 16)
    reader.close()
    np.testing.assert_array_equal(reader.read_region(0, 10, 10, 16, 16), first)
    reader.close()


def test_describe_slide(shared_data: Path) -> None:
    with open_slide(shared_data / CMU_SVS) as reader:
        text = describe_slide(reader)
    for expected in ("CMU-1-Small-Region.svs", "tiffslide", "aperio", "2220 x 2967", "0.499 um/px", "metadata", "20x"):
        assert expected in text
    assert "label" in text
    assert "thumbnail" in text
    with open_slide(shared_data / TCGA_SVS) as reader:
        text = describe_slide(reader)
    assert "level 1: 2221 x 1783, downsample 2.001" in text
    assert "mpp:               unknown" in text
    assert "--mpp" in text


# --- bad inputs ------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match=r"missing\.svs does not exist; check the path"):
        open_slide(tmp_path / "missing.svs")


def test_slide_error_is_an_input_error() -> None:
    assert issubclass(SlideError, InputError)


@pytest.mark.parametrize("contents", [{}, {"notes.txt": b"hello"}, {"fake.dcm": b"not dicom at all"}])
def test_directory_that_is_not_dicom(tmp_path: Path, contents: dict[str, bytes]) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    with pytest.raises(
        SlideError, match=r"folder is a directory but not a DICOM whole-slide image.*\.dcm files of one"
    ):
        open_slide(folder)


def test_malformed_dicom(shared_data: Path) -> None:
    with pytest.raises(SlideError, match=r"OpenSlide cannot open .*malformed-wsi\.dcm.*image flavor.*DICOM WSI"):
        open_slide(shared_data / MALFORMED_DICOM)


@pytest.mark.parametrize("relative_path", [CMU_SVS, STRIP_TIFF])
def test_truncated_tiff_fails_at_open(shared_data: Path, tmp_path: Path, relative_path: str) -> None:
    """The SVS loses its only image directory (stored after the tiles); the strip TIFF keeps its
    directory but loses the end of its pixel data, which the offset check catches."""
    source = shared_data / relative_path
    truncated = tmp_path / source.name
    truncated.write_bytes(source.read_bytes()[: int(source.stat().st_size * 0.6)])
    with pytest.raises(SlideError, match=rf"{truncated.name} is truncated or corrupted.*re-copy or re-download"):
        open_slide(truncated)
    if relative_path == STRIP_TIFF:
        with pytest.raises(SlideError, match=r"end beyond the file's [\d,]+ bytes"):
            open_slide(truncated)


@pytest.mark.parametrize("backend", ["tiffslide", "openslide"])
def test_corrupt_tile_fails_at_read_naming_the_window(shared_data: Path, tmp_path: Path, backend: str) -> None:
    """The tile's data is zeroed (not cut off, so opening succeeds); later reads still work, which
    needs a fresh handle for OpenSlide, whose handles stay broken after an error."""
    source = shared_data / CMU_SVS
    damaged = tmp_path / "damaged.svs"
    shutil.copyfile(source, damaged)
    with tifffile.TiffFile(source) as tiff:
        page = tiff.pages.first
        offset, count = page.dataoffsets[50], page.databytecounts[50]  # tile row 5, column 0
    data = bytearray(damaged.read_bytes())
    data[offset : offset + count] = bytes(count)
    damaged.write_bytes(bytes(data))
    with open_slide(damaged, backend=backend) as reader:  # type: ignore[arg-type]
        with pytest.raises(SlideError, match=r"level 0, rows 1200:1300, columns 10:110 of .*damaged\.svs.*corrupted"):
            reader.read_region(0, 1200, 10, 100, 100)
        assert reader.read_region(0, 0, 0, 100, 100).std() > 0  # other tiles still read


def test_flat_image_too_large_for_memory(tmp_path: Path) -> None:
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, shape=(16385, 16385, 3), dtype=np.uint8)  # sparse on disk
    with pytest.raises(SlideError, match=r"flat \(untiled.*268,468,225 pixels.*vips tiffsave.*--tile --pyramid"):
        open_slide(path)


def test_unsupported_format(tmp_path: Path) -> None:
    path = tmp_path / "slide.txt"
    path.write_text("not a slide")
    with pytest.raises(SlideError, match=r"unsupported file type '\.txt'.*Supported: .*\.svs.*\.ndpi.*DICOM.*\.mrxs"):
        open_slide(path)


def test_unknown_backend(shared_data: Path) -> None:
    with pytest.raises(SlideError, match=r"backend='cucim' is not one of 'auto', 'tiffslide', 'openslide', 'image'"):
        open_slide(shared_data / CMU_SVS, backend="cucim")  # type: ignore[arg-type]


def test_tiff_suffix_that_is_not_a_tiff(tmp_path: Path) -> None:
    path = tmp_path / "slide.svs"
    path.write_bytes(b"\x89PNG not really anything")
    with pytest.raises(SlideError, match=r"slide\.svs is not a readable whole-slide image.*tiffslide says.*OpenSlide"):
        open_slide(path)
