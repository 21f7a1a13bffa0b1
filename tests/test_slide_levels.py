"""Choosing the pyramid level for a target MPP, and lazy Dask arrays over a level."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest

from wsi_espnet.geometry import Region
from wsi_espnet.slides import LevelChoice, SlideError, SlideReader, choose_level, open_slide, slide_level_dask

NDPI_MPP = 0.2281750559028887  # level 0; each further level doubles it


@pytest.fixture(scope="module")
def ndpi_openslide(shared_data: Path) -> Iterator[SlideReader]:
    """Seven levels, 0.228 to 14.6 um/px."""
    with open_slide(shared_data / "slides" / "test3-DAPI-2-387.ndpi", backend="openslide") as reader:
        yield reader


@pytest.fixture(scope="module")
def ndpi_tiffslide(shared_data: Path) -> Iterator[SlideReader]:
    """The four stored levels, 0.228 to 1.83 um/px."""
    with open_slide(shared_data / "slides" / "test3-DAPI-2-387.ndpi") as reader:
        yield reader


@pytest.mark.parametrize(
    ("target_mpp", "tolerance", "level", "resample"),
    [
        (0.25, 0.1, 0, False),  # level 0 is 0.228: 8.7% finer, within tolerance
        (0.5, 0.1, 1, False),
        (1.0, 0.1, 2, False),
        (2.0, 0.1, 3, False),
        (8.0, 0.1, 5, False),
        (NDPI_MPP * 2, 0.0, 1, False),  # exact match needs no tolerance
        (NDPI_MPP * 2 / 1.1, 0.1, 1, False),  # level 1 exactly 10% coarser: the edge of tolerance
        (0.25, 0.0, 0, True),  # no tolerance: downsample level 0 by 0.25/0.228
        (0.3, 0.1, 0, True),
        (0.7, 0.1, 1, True),  # coarsest level finer than 0.7 is level 1 (0.456), never level 2 (0.913)
        (0.95, 0.1, 2, False),  # level 2 (0.913) is 3.9% finer
        (20.0, 0.1, 6, True),  # beyond the coarsest level: downsample it
        (0.1, 0.1, 0, True),  # finer than level 0: upsample, scale < 1
    ],
)
def test_choose_level_on_seven_levels(
    ndpi_openslide: SlideReader, target_mpp: float, tolerance: float, level: int, resample: bool
) -> None:
    choice = choose_level(ndpi_openslide, target_mpp, tolerance=tolerance)
    level_mpp = NDPI_MPP * 2**level
    assert (choice.level, choice.resample) == (level, resample)
    assert choice.level_mpp == pytest.approx(level_mpp)
    assert choice.target_mpp == target_mpp
    assert choice.scale == (pytest.approx(target_mpp / level_mpp) if resample else 1.0)
    assert (choice.scale < 1) == (target_mpp < NDPI_MPP * (1 - tolerance))
    height, width = ndpi_openslide.level_shapes[level]
    assert choice.target_shape == (round(height / choice.scale), round(width / choice.scale))


@pytest.mark.parametrize(
    ("target_mpp", "level", "scale"),
    [(0.5, 1, 1.0), (2.0, 3, 1.0), (4.0, 3, 4.0 / (NDPI_MPP * 8)), (14.6, 3, 14.6 / (NDPI_MPP * 8))],
)
def test_choose_level_on_four_levels(ndpi_tiffslide: SlideReader, target_mpp: float, level: int, scale: float) -> None:
    choice = choose_level(ndpi_tiffslide, target_mpp)
    assert choice.level == level
    assert choice.scale == pytest.approx(scale)


def test_choose_level_single_level_slide(shared_data: Path) -> None:
    with open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs") as reader:  # 0.499 um/px, 2967 x 2220
        assert choose_level(reader, 0.5) == LevelChoice(
            level=0, level_mpp=0.499, target_mpp=0.5, scale=1.0, resample=False, target_shape=(2967, 2220)
        )
        down = choose_level(reader, 1.0)
        assert (down.level, down.resample, down.target_shape) == (0, True, (round(2967 / (1 / 0.499)), 1108))
        up = choose_level(reader, 0.25)
        assert (up.level, up.resample) == (0, True)
        assert up.scale == pytest.approx(0.25 / 0.499)
        assert up.scale < 1
        assert up.target_shape == (round(2967 * 0.499 / 0.25), round(2220 * 0.499 / 0.25))


def test_choose_level_without_mpp_asks_for_mpp(shared_data: Path) -> None:
    path = shared_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs"
    with open_slide(path) as reader, pytest.raises(SlideError) as raised:
        choose_level(reader, 0.5)
    message = str(raised.value)
    for expected in (path.name, "no micrometres-per-pixel", "mpp=0.25", "40x", "mpp=0.5", "20x"):
        assert expected in message
    assert "--mpp 0.25 for a 40x scan" in raised.value.cli_message()
    with open_slide(path, mpp=0.5) as reader:  # levels at 0.5 and 1.0003 um/px
        choice = choose_level(reader, 1.0)
        assert (choice.level, choice.resample, choice.target_shape) == (1, False, (1783, 2221))
        assert choose_level(reader, 0.5).level == 0


@pytest.mark.parametrize(
    ("target_mpp", "tolerance", "message"),
    [
        (0.0, 0.1, "target_mpp=0.0 must be a positive number"),
        (-1.0, 0.1, "target_mpp=-1.0 must be a positive"),
        (float("nan"), 0.1, "target_mpp=nan"),
        (0.5, 1.0, r"tolerance=1.0 must be in \[0, 1\)"),
        (0.5, -0.1, "tolerance=-0.1"),
    ],
)
def test_choose_level_validates_arguments(
    ndpi_tiffslide: SlideReader, target_mpp: float, tolerance: float, message: str
) -> None:
    with pytest.raises(SlideError, match=message):
        choose_level(ndpi_tiffslide, target_mpp, tolerance=tolerance)


# --- lazy arrays ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("relative_path", "level", "chunk"),
    [
        ("slides/CMU-1-Small-Region.svs", 0, 1024),
        ("slides/tcga-cr-7395-01a-01-ts1.svs", 1, 500),
        ("slides/test3-DAPI-2-387.ndpi", 2, 300),
        ("slides/CMU-1-Small-Region-dicom", 0, 777),
    ],
)
def test_dask_level_equals_read_level(shared_data: Path, relative_path: str, level: int, chunk: int) -> None:
    with open_slide(shared_data / relative_path) as reader:
        lazy = slide_level_dask(reader, level, chunk=chunk)
        height, width = reader.level_shapes[level]
        assert lazy.shape == (height, width, 3)
        assert lazy.dtype == np.uint8
        assert lazy.chunksize == (min(chunk, height), min(chunk, width), 3)
        with dask.config.set(scheduler="threads"):
            np.testing.assert_array_equal(lazy.compute(), reader.read_level(level))


def test_dask_level_computes_in_processes(shared_data: Path) -> None:
    """Workers get the reader pickled without its handle and open the file themselves."""
    with open_slide(shared_data / "slides" / "tcga-cr-7395-01a-01-ts1.svs") as reader:
        lazy = slide_level_dask(reader, 1, chunk=1024)
        expected = reader.read_level(1)
    with dask.config.set(scheduler="processes", num_workers=2):
        np.testing.assert_array_equal(lazy.compute(), expected)


def test_dask_graph_holds_the_reader_once(shared_data: Path) -> None:
    with open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs") as reader:
        lazy = slide_level_dask(reader, 0, chunk=256)
        graph = dict(lazy.__dask_graph__())
        readers = [value for value in graph.values() if isinstance(getattr(value, "value", None), SlideReader)]
        assert len(readers) == 1
        assert len(graph) == lazy.npartitions + 1
        assert lazy.name == slide_level_dask(reader, 0, chunk=256).name  # deterministic
        assert lazy.name != slide_level_dask(reader, 0, chunk=512).name


def test_dask_level_slices_lazily(shared_data: Path) -> None:
    with open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs") as reader:
        lazy = slide_level_dask(reader, 0, chunk=512)
        window = lazy[1000:1100, 700:900].compute(scheduler="sync")
        np.testing.assert_array_equal(window, reader.read_region(0, 1000, 700, 100, 200))


def test_dask_level_validates_arguments(ndpi_tiffslide: SlideReader) -> None:
    with pytest.raises(SlideError, match=r"level=4 out of range.*levels 0 to 3"):
        slide_level_dask(ndpi_tiffslide, 4)
    with pytest.raises(SlideError, match="chunk=0 must be a positive"):
        slide_level_dask(ndpi_tiffslide, 0, chunk=0)


def test_dask_array_is_a_dask_array(ndpi_tiffslide: SlideReader) -> None:
    assert isinstance(slide_level_dask(ndpi_tiffslide, 3), da.Array)


@pytest.mark.parametrize("downsample", [1.0, 2.0, 3.99987, 4.000031, 7.9996])
@pytest.mark.parametrize("scale", [1.0, 1.8, 0.5])
def test_a_target_region_survives_the_trip_to_level0_and_back(downsample: float, scale: float) -> None:
    """Whole target pixels scaled to level 0 and back are the same pixels, not one more from rounding noise."""
    level_mpp = 0.1109 * downsample
    choice = LevelChoice(
        level=1, level_mpp=level_mpp, target_mpp=level_mpp * scale, scale=scale, resample=scale != 1.0,
        target_shape=(100_000, 100_000), level_downsample=downsample,
    )  # fmt: skip
    for region in (Region(15360, 15360, 1536, 1536), Region(0, 0, 7, 9), Region(98_463, 3, 1537, 4000)):
        assert choice.from_level0(choice.to_level0(region)) == region
    assert choice.from_level0(Region(-50, -50, 10, 10)).shape == (0, 0)  # outside the slide: nothing
