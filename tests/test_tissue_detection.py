"""Tissue detection on real bright-field and fluorescence slides, generated blank slides, and mask geometry."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage import color

from wsi_espnet.errors import InputError
from wsi_espnet.geometry import Region
from wsi_espnet.slides import SlideReader, open_slide
from wsi_espnet.tissue_detection import TissueMask, TissueOptions, detect_tissue


@dataclass(frozen=True)
class RealSlide:
    name: str
    mpp_override: float | None
    method: str
    fraction_range: tuple[float, float]


REAL_SLIDES = [
    RealSlide("CMU-1-Small-Region.svs", None, "saturation", (0.3, 0.5)),  # H&E, one level, 0.499 um/px
    RealSlide("test3-DAPI-2-387.ndpi", None, "brightness", (0.35, 0.7)),  # DAPI fluorescence, 4 levels
    RealSlide("tcga-cr-7395-01a-01-ts1.svs", 0.5, "saturation", (0.5, 0.8)),  # H&E, no MPP in the file
]


@dataclass(frozen=True)
class Detected:
    slide: RealSlide
    reader: SlideReader
    mask: TissueMask


@pytest.fixture(scope="module", params=REAL_SLIDES, ids=lambda s: s.name)
def detected(request: pytest.FixtureRequest, shared_data: Path) -> Iterator[Detected]:
    slide: RealSlide = request.param
    with open_slide(shared_data / "slides" / slide.name, mpp=slide.mpp_override) as reader:
        assert reader.mpp is not None
        yield Detected(slide, reader, detect_tissue(reader, mpp=reader.mpp))


@pytest.fixture(scope="module")
def cmu(shared_data: Path) -> Iterator[Detected]:
    """The H&E slide: 2967 x 2220 at 0.499 um/px, so a 16x downsampled mask (185 x 138)."""
    with open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs") as reader:
        yield Detected(REAL_SLIDES[0], reader, detect_tissue(reader, mpp=0.499))


@pytest.fixture(scope="module")
def tcga(shared_data: Path) -> Iterator[Detected]:
    """Level 1 is downsampled 2.0005x, so mask pixels are 14.0035 level-0 pixels: not a whole number."""
    with open_slide(shared_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs", mpp=0.5) as reader:
        yield Detected(REAL_SLIDES[2], reader, detect_tissue(reader, mpp=0.5))


def _write_white_pyramid(path: Path) -> None:
    """A 2048 x 2048 white tiled TIFF with 4x and 16x sub-resolutions, 0.5 um/px in its resolution tags."""
    base = np.full((2048, 2048, 3), 255, dtype=np.uint8)
    options = {"tile": (256, 256), "photometric": "rgb", "compression": "zlib", "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tif:
        tif.write(base, subifds=2, resolution=(1e4 / 0.5, 1e4 / 0.5), **options)
        for factor in (4, 16):
            pixels_per_cm = 1e4 / (0.5 * factor)
            tif.write(base[::factor, ::factor], subfiletype=1, resolution=(pixels_per_cm, pixels_per_cm), **options)


@pytest.fixture(params=["pyramidal-tiff", "png"])
def white_slide(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SlideReader]:
    if request.param == "pyramidal-tiff":
        path = tmp_path / "white.tif"
        _write_white_pyramid(path)
        with open_slide(path) as reader:
            assert (reader.backend, reader.level_count, reader.mpp_source) == ("tiffslide", 3, "metadata")
            assert reader.mpp == pytest.approx(0.5)
            yield reader
    else:
        path = tmp_path / "white.png"
        Image.fromarray(np.full((600, 800, 3), 255, dtype=np.uint8)).save(path)
        with open_slide(path, backend="image", mpp=0.5) as reader:
            yield reader


# --- real slides -------------------------------------------------------------------------------------


def test_real_slide_mask(detected: Detected) -> None:
    reader, mask, slide = detected.reader, detected.mask, detected.slide
    assert reader.mpp is not None
    low, high = slide.fraction_range
    assert mask.method == slide.method
    assert low <= mask.fraction <= high
    assert mask.mask.dtype == np.bool_
    assert mask.mask.ndim == 2
    assert mask.origin == (0.0, 0.0)
    # The coarsest resolution at least as fine as the requested 8 um/px.
    assert 4.0 < mask.mpp <= TissueOptions().mask_mpp
    assert mask.mpp == pytest.approx(mask.downsample * reader.mpp)
    height, width = reader.level_shapes[0]
    assert abs(mask.mask.shape[0] - height / mask.downsample) <= 1
    assert abs(mask.mask.shape[1] - width / mask.downsample) <= 1
    slide_mm2 = height * width * (reader.mpp / 1000) ** 2
    assert mask.area_mm2() == pytest.approx(mask.fraction * slide_mm2, rel=0.02)
    assert 0 < mask.threshold < 1
    if slide.method == "saturation":
        assert mask.threshold >= TissueOptions().min_saturation


def test_mask_covers_the_stained_pixels(detected: Detected) -> None:
    """Under the mask the slide is far more saturated (bright-field) or brighter (fluorescence) than off it."""
    reader, mask = detected.reader, detected.mask
    level = reader.level_count - 1
    step = max(1, max(reader.level_shapes[level]) // 500)
    thumbnail = reader.read_level(level)[::step, ::step]
    hsv = color.rgb2hsv(thumbnail)
    feature = hsv[..., 2] if detected.slide.method == "brightness" else hsv[..., 1]
    scale = reader.level_downsamples[level] * step
    on_thumbnail = mask.sample(Region(0, 0, thumbnail.shape[0], thumbnail.shape[1]), scale)
    assert on_thumbnail.mean() == pytest.approx(mask.fraction, abs=0.03)
    assert feature[on_thumbnail].mean() > feature[~on_thumbnail].mean() + 0.1


@pytest.mark.parametrize(
    ("name", "thresholds"),
    [
        ("CMU-1-Small-Region.svs", (0.02, 0.1, 0.3, 0.6, 1.0)),
        ("test3-DAPI-2-387.ndpi", (0.02, 0.1, 0.3, 0.6, 1.0)),
    ],
)
def test_threshold_override(shared_data: Path, name: str, thresholds: tuple[float, ...]) -> None:
    with open_slide(shared_data / "slides" / name) as reader:
        assert reader.mpp is not None
        automatic = detect_tissue(reader, mpp=reader.mpp)
        masks = [detect_tissue(reader, mpp=reader.mpp, options=TissueOptions(threshold=t)) for t in thresholds]
        # The automatic threshold given explicitly reproduces the automatic mask.
        same = detect_tissue(reader, mpp=reader.mpp, options=TissueOptions(threshold=automatic.threshold))
    assert [m.threshold for m in masks] == list(thresholds)
    assert {m.method for m in masks} == {automatic.method}
    fractions = [m.fraction for m in masks]
    assert fractions == sorted(fractions, reverse=True)
    assert fractions[0] > automatic.fraction > fractions[-2]
    assert fractions[0] - fractions[-2] > 0.3
    assert fractions[-1] == 0.0  # nothing exceeds 1
    np.testing.assert_array_equal(same.mask, automatic.mask)


def test_disabled_detection_is_all_tissue(detected: Detected) -> None:
    reader = detected.reader
    assert reader.mpp is not None
    disabled = detect_tissue(reader, mpp=reader.mpp, options=TissueOptions(enabled=False))
    assert disabled.method == "disabled"
    assert math.isnan(disabled.threshold)
    assert disabled.mask.shape == detected.mask.mask.shape
    assert disabled.mask.dtype == np.bool_
    assert disabled.mask.all()
    assert disabled.fraction == 1.0
    assert (disabled.downsample, disabled.mpp) == (detected.mask.downsample, detected.mask.mpp)
    height, width = reader.level_shapes[0]
    assert disabled.region_fraction(Region(0, 0, height, width)) == 1.0


# --- generated slides ----------------------------------------------------------------------------------


def test_white_slide_has_no_tissue(white_slide: SlideReader) -> None:
    mask = detect_tissue(white_slide, mpp=0.5)
    assert mask.method == "uniform"
    assert math.isnan(mask.threshold)
    assert mask.mask.size > 0
    assert not mask.mask.any()
    assert (mask.fraction, mask.area_mm2()) == (0.0, 0.0)
    assert mask.mpp == pytest.approx(8.0)
    height, width = white_slide.level_shapes[0]
    assert mask.region_fraction(Region(0, 0, height, width)) == 0.0


@pytest.mark.parametrize(
    ("min_saturation", "threshold", "right_half_is_tissue"),
    [
        (0.05, 0.05, False),  # the default floor keeps a colour cast off the tissue mask
        (0.04, 0.04, True),
        (0.0, None, True),  # no floor: Otsu splits the two glass tones
    ],
)
def test_saturation_floor_on_tinted_glass(
    tmp_path: Path, min_saturation: float, threshold: float | None, right_half_is_tissue: bool
) -> None:
    # Left half neutral glass, right half glass with a warm cast of saturation 12/246 = 0.049.
    pixels = np.empty((600, 800, 3), dtype=np.uint8)
    pixels[:, :400] = (240, 240, 240)
    pixels[:, 400:] = (246, 240, 234)
    path = tmp_path / "tinted-glass.png"
    Image.fromarray(pixels).save(path)
    with open_slide(path, mpp=0.5) as reader:
        mask = detect_tissue(reader, mpp=0.5, options=TissueOptions(min_saturation=min_saturation))
    assert mask.method == "saturation"
    if threshold is None:
        assert 0 < mask.threshold < 12 / 246
    else:
        assert mask.threshold == threshold
    middle = mask.mask.shape[1] // 2
    assert not mask.mask[:, : middle - 1].any()
    assert mask.mask[:, middle + 1 :].all() if right_half_is_tissue else not mask.mask[:, middle + 1 :].any()


# --- mask geometry ---------------------------------------------------------------------------------------

# (top, left) in level-0 pixels, (height, width) in output pixels of `scale` level-0 pixels each.
REGIONS = [
    (0.0, 0.0, 64, 64, 1.0),  # the top-left corner
    (1500.0, 1100.0, 100, 80, 2.0),  # inside the tissue
    (1234.5, 987.25, 33, 47, 2.5),  # fractional origin and scale
    (-300.0, -120.0, 50, 40, 16.0),  # straddles the top-left edge
    (2800.0, 2100.0, 40, 60, 8.0),  # straddles the bottom-right edge of CMU
    (3400.0, 4300.0, 40, 60, 8.0),  # straddles the bottom-right edge of TCGA
    (9000.0, 9000.0, 10, 10, 4.0),  # entirely outside
    (-5000.0, 100.0, 10, 10, 4.0),  # entirely outside, before the slide
    (100.0, 200.0, 300, 200, 0.5),  # finer than level 0
    (0.0, 0.0, 200, 150, 16.0),  # the whole CMU slide at the mask's own resolution
]


@pytest.mark.parametrize("region", REGIONS, ids=str)
@pytest.mark.parametrize("slide", ["cmu", "tcga"])
def test_window_then_crop_equals_crop(
    request: pytest.FixtureRequest, slide: str, region: tuple[float, float, int, int, float]
) -> None:
    mask: TissueMask = request.getfixturevalue(slide).mask
    top, left, height, width, scale = region
    target = Region(top / scale, left / scale, height, width)
    expected = mask.sample(target, scale)
    window = mask.window(target.scaled(scale))
    assert window.mask.size <= mask.mask.size
    assert (window.downsample, window.mpp, window.method) == (mask.downsample, mask.mpp, mask.method)
    cropped = window.sample(target, scale)
    assert cropped.shape == (height, width)
    assert cropped.dtype == np.bool_
    np.testing.assert_array_equal(cropped, expected)
    # A window of a window is still the same mask.
    np.testing.assert_array_equal(window.window(target.scaled(scale)).sample(target, scale), expected)


def test_sample_reads_mask_pixels_by_their_centre(cmu: Detected) -> None:
    mask = cmu.mask
    downsample = int(mask.downsample)
    assert downsample == 16
    np.testing.assert_array_equal(mask.sample(Region(0, 0, *mask.mask.shape), downsample), mask.mask)
    np.testing.assert_array_equal(mask.sample(Region(2, 3, 20, 30), downsample), mask.mask[2:22, 3:33])
    # Half a mask pixel off the grid, output pixel centres fall on the next mask pixel's first row and column
    # (a block across the tissue's left edge, so a shift by one mask pixel shows).
    np.testing.assert_array_equal(mask.sample(Region(90.5, 40.5, 20, 30), downsample), mask.mask[91:111, 41:71])
    np.testing.assert_array_equal(
        mask.sample(Region((90 * 16 + 7.9) / 16, (40 * 16 + 7.9) / 16, 20, 30), downsample), mask.mask[90:110, 40:70]
    )
    assert (mask.mask[91:111, 41:71] != mask.mask[90:110, 40:70]).any()
    upsampled = mask.sample(Region(0, 0, 2 * mask.mask.shape[0], 2 * mask.mask.shape[1]), downsample / 2)
    np.testing.assert_array_equal(upsampled, np.repeat(np.repeat(mask.mask, 2, axis=0), 2, axis=1))
    window = mask.window(Region(800, 480, 160, 320))
    assert window.origin == (800 - 16.0, 480 - 16.0)
    np.testing.assert_array_equal(window.mask, mask.mask[49:61, 29:51])


# Row 100 of the CMU mask (level-0 rows 1600-1615) is glass up to column 53 (level-0 column 848);
# column 80 (level-0 columns 1280-1295) is glass down to row 13 (level-0 row 208).
FIRST_TISSUE_COLUMN = 848
FIRST_TISSUE_ROW = 208


@pytest.mark.parametrize(
    ("region", "has_tissue"),
    [
        ((0, 0, 64, 256), False),  # glass in the top-left corner
        ((1500, 1100, 200, 200), True),  # tissue in the middle
        ((2900, 800, 200, 200), True),  # tissue at the bottom edge, region partly outside
        ((2900, 2150, 200, 200), False),  # glass at the bottom-right corner, partly outside
        ((-100, -100, 150, 150), False),  # partly before the slide, on glass
        ((5000, 5000, 10, 10), False),  # entirely outside
        ((1600, FIRST_TISSUE_COLUMN - 100, 16, 100), False),  # ends exactly where the tissue begins
        ((1600, FIRST_TISSUE_COLUMN - 99, 16, 100), True),  # its last pixel is on the tissue
        ((FIRST_TISSUE_ROW - 100, 1280, 100, 16), False),  # ends exactly where the tissue begins
        ((FIRST_TISSUE_ROW - 99, 1280, 100, 16), True),  # its last row is on the tissue
    ],
)
def test_region_fraction_is_positive_exactly_where_crop_has_tissue(
    cmu: Detected, region: tuple[int, int, int, int], has_tissue: bool
) -> None:
    mask = cmu.mask
    assert not mask.mask[100, : FIRST_TISSUE_COLUMN // 16].any()
    assert mask.mask[100, FIRST_TISSUE_COLUMN // 16]
    assert not mask.mask[: FIRST_TISSUE_ROW // 16, 80].any()
    assert mask.mask[FIRST_TISSUE_ROW // 16, 80]
    fraction = mask.region_fraction(Region(*region))
    crop = mask.sample(Region(*region), scale=1.0)
    assert 0.0 <= fraction <= 1.0
    assert (fraction > 0) == has_tissue
    assert bool(crop.any()) == has_tissue


@pytest.mark.parametrize("region", [(0, 0, 2967, 2220), (320, 160, 640, 1600), (1600, 48, 16, 16), (0, 0, 16, 16)])
def test_region_fraction_on_mask_pixel_boundaries(cmu: Detected, region: tuple[int, int, int, int]) -> None:
    """A region made of whole mask pixels has exactly the tissue share of those pixels."""
    mask = cmu.mask
    top, left, height, width = region
    crop = mask.sample(Region(top / 16, left / 16, -(-height // 16), -(-width // 16)), 16.0)
    inside = crop[: mask.mask.shape[0] - top // 16, : mask.mask.shape[1] - left // 16]
    assert mask.region_fraction(Region(*region)) == pytest.approx(float(inside.mean()))
    assert mask.region_fraction(Region(0, 0, 2967, 2220)) == pytest.approx(mask.fraction)


# --- invalid input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mask_mpp": 0.0}, "mask_mpp=0.0 must be a positive"),
        ({"mask_mpp": -8.0}, "mask_mpp=-8.0 must be a positive"),
        ({"threshold": -0.1}, "threshold=-0.1 must be between 0 and 1"),
        ({"threshold": 1.5}, "threshold=1.5 must be between 0 and 1"),
        ({"threshold": float("nan")}, "threshold=nan must be between 0 and 1"),
        ({"mask_mpp": float("nan")}, "mask_mpp=nan"),
        ({"mask_mpp": float("inf")}, "mask_mpp=inf"),
    ],
)
def test_invalid_options(options: dict[str, float], message: str) -> None:
    with pytest.raises(InputError, match=message):
        TissueOptions(**options)


@pytest.mark.parametrize(
    "mpp",
    [
        0.0,
        -0.5,
        float("nan"),
        float("inf"),
    ],
)
def test_invalid_slide_mpp(tmp_path: Path, mpp: float) -> None:
    path = tmp_path / "small.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(path)
    with open_slide(path) as reader, pytest.raises(InputError, match=f"mpp={mpp} must be a positive number"):
        detect_tissue(reader, mpp=mpp)
