"""The tile plan: tiles partition the target grid, windows hold their tile plus halo on the stride grid."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from wsi_espnet.errors import InputError
from wsi_espnet.models.espnet import TOTAL_STRIDE
from wsi_espnet.segmentation.planning import tile_groups, window_key
from wsi_espnet.tiling import Tile, TilePlan, plan_tiles

HALOS = (0, 8, 100, 376)

# (height, width), tile_size: tiny images, sides that are not multiples of 8, exact multiples,
# one pixel over and under a tile, long thin slides, many tiles.
SHAPES_AND_TILES = [
    ((1, 1), 8),
    ((5, 7), 64),
    ((8, 8), 8),
    ((16, 24), 8),
    ((100, 37), 16),
    ((256, 256), 256),
    ((257, 255), 256),
    ((512, 768), 256),
    ((1000, 1500), 256),
    ((2047, 64), 512),
    ((3000, 17), 1024),
    ((777, 1235), 64),
    ((4096, 4100), 1024),
]


def _ceil_to_stride(n: int) -> int:
    return -(-n // TOTAL_STRIDE) * TOTAL_STRIDE


def _axes(tile: Tile) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """Per axis: (tile start, tile size, window start, window size)."""
    return (
        (tile.top, tile.height, tile.window_top, tile.window_height),
        (tile.left, tile.width, tile.window_left, tile.window_width),
    )


def _check_partition(plan: TilePlan) -> None:
    height, width = plan.shape
    coverage = np.zeros((height, width), dtype=np.uint8)
    for tile in plan:
        assert tile.height > 0
        assert tile.width > 0
        assert tile.top + tile.height <= height
        assert tile.left + tile.width <= width
        coverage[tile.top : tile.top + tile.height, tile.left : tile.left + tile.width] += 1
    assert (coverage == 1).all(), "every target pixel must lie in exactly one tile"


def _check_windows(plan: TilePlan) -> None:
    """Windows hold their tile, lie on the stride grid inside the 8-padded image, and share one size."""
    for tile in plan:
        for (start, size, window_start, window_size), extent in zip(_axes(tile), plan.shape, strict=True):
            assert window_start % TOTAL_STRIDE == 0
            assert window_size % TOTAL_STRIDE == 0
            assert 0 <= window_start <= start
            assert start + size <= window_start + window_size <= _ceil_to_stride(extent)
            full = min(_ceil_to_stride(plan.tile_size + 2 * plan.halo), _ceil_to_stride(extent))
            if start + plan.tile_size >= extent and window_size != full:
                # A thin last tile: two halos before it and the slide's end after it, shorter than a full window.
                assert (window_start, window_size) == (
                    start - 2 * plan.halo,
                    _ceil_to_stride(extent) - start + 2 * plan.halo,
                )
                assert window_size < full
            else:
                assert window_size == full
    shapes = {(t.window_height, t.window_width) for t in plan}
    assert len(shapes) <= 4, f"{len(shapes)} window shapes: each costs a compiled runtime"


def _check_near_side_halo(plan: TilePlan) -> None:
    for tile in plan:
        for start, _, window_start, _ in _axes(tile):
            assert window_start <= max(start - plan.halo, 0), f"{tile} lacks {plan.halo} px before it"


def _check_far_side_halo(plan: TilePlan) -> None:
    for tile in plan:
        for (start, size, window_start, window_size), extent in zip(_axes(tile), plan.shape, strict=True):
            assert window_start + window_size >= min(start + size + plan.halo, extent), (
                f"{tile} lacks {plan.halo} px after it"
            )


@pytest.mark.parametrize("halo", HALOS)
@pytest.mark.parametrize(("shape", "tile_size"), SHAPES_AND_TILES)
def test_tiles_partition_the_grid_row_major(shape: tuple[int, int], tile_size: int, halo: int) -> None:
    plan = plan_tiles(shape, tile_size=tile_size, halo=halo)
    # The halo is rounded up to the stride so both sides of every tile get at least the asked-for context.
    assert (plan.shape, plan.tile_size, plan.halo) == (shape, tile_size, -(-halo // 8) * 8)
    rows, cols = -(-shape[0] // tile_size), -(-shape[1] // tile_size)
    assert plan.grid_shape == (rows, cols)
    assert len(plan) == rows * cols == len(list(plan))
    assert [(t.row, t.col) for t in plan] == [(r, c) for r in range(rows) for c in range(cols)]
    for tile in plan:
        assert (tile.top, tile.left) == (tile.row * tile_size, tile.col * tile_size)
        assert tile.height == min(tile_size, shape[0] - tile.top)
        assert tile.width == min(tile_size, shape[1] - tile.left)
    _check_partition(plan)


@pytest.mark.parametrize("halo", HALOS)
@pytest.mark.parametrize(("shape", "tile_size"), SHAPES_AND_TILES)
def test_windows_hold_their_tile_on_the_stride_grid(shape: tuple[int, int], tile_size: int, halo: int) -> None:
    plan = plan_tiles(shape, tile_size=tile_size, halo=halo)
    _check_windows(plan)
    _check_near_side_halo(plan)
    if halo % TOTAL_STRIDE == 0:  # other halos: see test_far_side_halo_not_a_stride_multiple
        _check_far_side_halo(plan)


@pytest.mark.parametrize(
    ("shape", "tile_size", "halo"),
    [((1024, 1024), 256, 100), ((1000, 1500), 256, 4), ((777, 1235), 64, 1), ((300, 300), 64, 3)],
)
def test_far_side_halo_not_a_stride_multiple(shape: tuple[int, int], tile_size: int, halo: int) -> None:
    _check_far_side_halo(plan_tiles(shape, tile_size=tile_size, halo=halo))


@pytest.mark.parametrize(
    ("shape", "tile_size", "halo", "window"),
    [
        ((1, 1), 8, 0, (8, 8)),
        ((5, 7), 64, 100, (8, 8)),
        ((100, 37), 512, 0, (104, 40)),
        ((300, 200), 256, 376, (304, 200)),
        ((464, 464), 256, 100, (464, 464)),
        ((1000, 1004), 256, 376, (1000, 1008)),
    ],
)
def test_window_side_is_tile_plus_halos_or_the_padded_image(
    shape: tuple[int, int], tile_size: int, halo: int, window: tuple[int, int]
) -> None:
    plan = plan_tiles(shape, tile_size=tile_size, halo=halo)
    assert {(t.window_height, t.window_width) for t in plan} == {window}


def test_thin_last_tiles_get_short_windows() -> None:
    # The breast model at 1 um/px on a 10k slide at 0.5 um/px: a 5000-px grid, tiles 1536, halo 216.
    plan = plan_tiles((5000, 5000), tile_size=1536, halo=216)
    lengths = sorted({t.window_width for t in plan})
    assert lengths == [392 + 2 * 216, 1536 + 2 * 216]
    last = plan.tiles[-1]
    assert (last.window_top, last.window_left) == (4608 - 432, 4608 - 432)
    # Window pixels per output pixel over the whole plan: 1.81 instead of 2.48 with full windows.
    window_pixels = sum(t.window_height * t.window_width for t in plan)
    assert window_pixels / 5000**2 == pytest.approx((3 * 1968 + 824) ** 2 / 5000**2)
    assert window_pixels < 0.75 * (4 * 1968) ** 2


@pytest.mark.parametrize(
    ("shape", "tile_size", "halo", "index", "window_top_left"),
    [
        # An interior tile: the window starts halo px (rounded up to the stride) before it.
        ((2048, 2048), 256, 100, 9, (152, 152)),
        # The last tile's window is shifted inward to end at the 8-padded image edge, not padded further.
        # The last tile's window is shifted inward to end at the 8-padded image edge, not padded further.
        ((1024, 1536), 256, 100, -1, (1024 - 464, 1536 - 464)),
        # A thin last tile (232 x 220 px): its window starts two halos before it and stops at the edge.
        ((1000, 1500), 256, 100, -1, (768 - 208, 1280 - 208)),
        ((1000, 1500), 256, 100, -2, (768 - 208, 1024 - 104)),
        ((1000, 1500), 256, 0, -1, (768, 1280)),
        ((1000, 1500), 256, 0, 0, (0, 0)),
    ],
)
def test_window_positions(
    shape: tuple[int, int], tile_size: int, halo: int, index: int, window_top_left: tuple[int, int]
) -> None:
    tile = plan_tiles(shape, tile_size=tile_size, halo=halo).tiles[index]
    assert (tile.window_top, tile.window_left) == window_top_left


@pytest.mark.parametrize("halo", HALOS)
@pytest.mark.parametrize(("shape", "tile_size"), SHAPES_AND_TILES)
def test_crop_cuts_the_tile_out_of_the_window(shape: tuple[int, int], tile_size: int, halo: int) -> None:
    padded_width = _ceil_to_stride(shape[1])
    for tile in plan_tiles(shape, tile_size=tile_size, halo=halo):
        # A synthetic "prediction" for the window whose every pixel holds its own target-grid index.
        rows = np.arange(tile.window_top, tile.window_top + tile.window_height)
        cols = np.arange(tile.window_left, tile.window_left + tile.window_width)
        window = rows[:, None] * padded_width + cols[None, :]
        expected = (
            np.arange(tile.top, tile.top + tile.height)[:, None] * padded_width
            + np.arange(tile.left, tile.left + tile.width)[None, :]
        )
        np.testing.assert_array_equal(window[tile.crop], expected)


def test_plan_is_immutable() -> None:
    plan = plan_tiles((64, 64), tile_size=32, halo=8)
    with pytest.raises(AttributeError):
        plan.tiles[0].top = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("shape", "tile_size", "halo", "message"),
    [
        ((0, 100), 256, 0, "cannot tile an empty 0x100 image"),
        ((100, 0), 256, 0, "cannot tile an empty 100x0 image"),
        ((-5, 100), 256, 0, "cannot tile an empty -5x100 image"),
        ((100, 100), 0, 0, "tile size 0 must be a positive multiple of 8"),
        ((100, 100), -8, 0, "tile size -8 must be a positive multiple of 8"),
        ((100, 100), 12, 0, "tile size 12 must be a positive multiple of 8"),
        ((100, 100), 7, 0, "tile size 7 must be a positive multiple of 8"),
        ((100, 100), 256, -1, "halo -1 must be >= 0 pixels"),
    ],
)
def test_invalid_arguments(shape: tuple[int, int], tile_size: int, halo: int, message: str) -> None:
    with pytest.raises(InputError, match=message):
        plan_tiles(shape, tile_size=tile_size, halo=halo)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    height=st.integers(1, 2500),
    width=st.integers(1, 2500),
    tile_size=st.integers(1, 96).map(lambda k: k * TOTAL_STRIDE),
    # Half the halos on the stride grid, where the far-side halo is checked too.
    halo=st.one_of(st.integers(0, 50).map(lambda k: k * TOTAL_STRIDE), st.integers(0, 400)),
)
def test_plan_properties(height: int, width: int, tile_size: int, halo: int) -> None:
    assume(-(-height // tile_size) * -(-width // tile_size) <= 400)
    plan = plan_tiles((height, width), tile_size=tile_size, halo=halo)
    _check_partition(plan)
    _check_windows(plan)
    _check_near_side_halo(plan)
    if halo % TOTAL_STRIDE == 0:
        _check_far_side_halo(plan)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_tile_groups_run_each_window_shape_together_largest_first(batch_size: int) -> None:
    # A 20k slide's grid at 1 um/px: full windows, the last column's and last row's, and the corner's.
    plan = plan_tiles((10000, 10000), tile_size=1536, halo=216)
    groups = tile_groups(plan.tiles, batch_size)
    order = [window_key(t)[2:] for group in groups for t in group]
    assert len(set(order)) == 4
    # Each shape appears in one run, larger shapes first; within a shape, row-major.
    runs = [shape for i, shape in enumerate(order) if i == 0 or order[i - 1] != shape]
    assert len(runs) == 4
    assert [h * w for h, w in runs] == sorted((h * w for h, w in runs), reverse=True)
    for shape in runs:
        tiles = [t for group in groups for t in group if window_key(t)[2:] == shape]
        assert [(t.row, t.col) for t in tiles] == sorted((t.row, t.col) for t in tiles)
    # Every tile exactly once, and no batch mixes shapes unless one shape ran out.
    assert sorted((t.row, t.col) for group in groups for t in group) == [(t.row, t.col) for t in plan.tiles]
    assert sum(len({window_key(t)[2:] for t in group}) > 1 for group in groups) <= 3
