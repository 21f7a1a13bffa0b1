"""Label pyramids: mode downsampling, its tie rule, and chunked building that equals whole-array results."""

from __future__ import annotations

import tracemalloc

import dask
import numpy as np
import pytest
import zarr

from wsi_espnet.errors import InputError
from wsi_espnet.outputs.pyramid import build_label_pyramid, downsample_labels


def reference_mode(block: np.ndarray, factor: int) -> np.ndarray:
    """Pixel-by-pixel definition: most frequent value, ties to the smallest non-zero value."""
    out = np.zeros((-(-block.shape[0] // factor), -(-block.shape[1] // factor)), dtype=block.dtype)
    for row in range(out.shape[0]):
        for col in range(out.shape[1]):
            values, counts = np.unique(
                block[row * factor : (row + 1) * factor, col * factor : (col + 1) * factor], return_counts=True
            )
            tied = values[counts == counts.max()]
            non_zero = tied[tied != 0]
            out[row, col] = non_zero.min() if non_zero.size else 0
    return out


def smooth_labels(rows: slice, cols: slice) -> np.ndarray:
    """A deterministic mask with 8 classes, large regions and speckle, for any window of an endless plane."""
    r = np.arange(rows.start, rows.stop)[:, None]
    c = np.arange(cols.start, cols.stop)[None, :]
    return ((r // 37 + c // 53) % 7 + (r * c % 11 == 0)).astype(np.uint8)


def whole_array_pyramid(level0: np.ndarray, min_size: int) -> list[np.ndarray]:
    levels = [level0]
    while max(levels[-1].shape) > min_size:
        levels.append(downsample_labels(levels[-1]))
    return levels


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ([[1, 2], [0, 0]], 0),  # 0 has two votes, a strict majority
        ([[1, 2], [2, 0]], 2),  # plain majority
        ([[2, 1], [2, 1]], 1),  # tie between classes: the smaller one
        ([[0, 0], [3, 3]], 3),  # tie with "no tissue": tissue wins
        ([[0, 5], [9, 7]], 5),  # four-way tie: smallest non-zero
        ([[0, 0], [0, 4]], 0),
        ([[6, 6], [6, 6]], 6),
    ],
)
def test_mode_and_tie_rule(block, expected):
    assert downsample_labels(np.array(block, dtype=np.uint8)).tolist() == [[expected]]


@pytest.mark.parametrize("shape", [(8, 8), (7, 9), (1, 5), (13, 2), (1, 1)])
@pytest.mark.parametrize("factor", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint32])
def test_matches_pixel_by_pixel_definition_on_any_shape(shape, factor, dtype):
    rng = np.random.default_rng(sum(shape) * factor)
    block = rng.integers(0, 4, shape).astype(dtype)
    before = block.copy()
    result = downsample_labels(block, factor)
    assert result.dtype == block.dtype
    np.testing.assert_array_equal(result, reference_mode(block, factor))
    np.testing.assert_array_equal(block, before)


def test_edge_blocks_are_partial_not_padded():
    # The last column holds a single pixel per block: 5 must not lose to imaginary padding.
    block = np.array([[1, 1, 5], [1, 1, 5]], dtype=np.uint8)
    assert downsample_labels(block).tolist() == [[1, 5]]
    assert downsample_labels(np.array([[0, 0, 0]], dtype=np.uint8)).tolist() == [[0, 0]]


def test_never_averages():
    block = np.array([[1, 7], [7, 1]], dtype=np.uint8)  # an average would give 4, a class absent here
    assert downsample_labels(block).tolist() == [[1]]


@pytest.mark.parametrize(
    ("block", "factor", "message"),
    [
        (np.zeros((4, 4), np.float32), 2, "integer"),
        (np.zeros((4, 4, 3), np.uint8), 2, "2-D"),
        ([[1, 2]], 2, "list"),
        (np.zeros((4, 4), np.uint8), 0, "factor=0"),
        (np.zeros((4, 4), np.uint8), 1.5, "factor=1.5"),
    ],
)
def test_bad_input_is_a_user_error(block, factor, message):
    with pytest.raises(InputError, match=message):
        downsample_labels(block, factor)


@pytest.fixture
def label_group() -> zarr.Group:
    root = zarr.open_group(store=zarr.storage.MemoryStore(), mode="w")
    return root.create_group("labels/tissue_classes")


@pytest.mark.parametrize(("shape", "chunk"), [((1000, 700), 128), ((517, 1031), 100), ((300, 300), 64)])
def test_chunked_pyramid_equals_whole_array_pyramid(label_group, shape, chunk):
    level0 = smooth_labels(slice(0, shape[0]), slice(0, shape[1]))
    label_group.create_array("0", data=level0, chunks=(chunk, chunk), dimension_names=("y", "x"))

    paths = build_label_pyramid(label_group, min_size=64)

    expected = whole_array_pyramid(level0, min_size=64)
    assert paths == [str(i) for i in range(len(expected))]
    for path, want in zip(paths, expected, strict=True):
        level = label_group[path]
        assert level.shape == want.shape
        np.testing.assert_array_equal(level[...], want)
    assert max(label_group[paths[-1]].shape) <= 64 < max(label_group[paths[-2]].shape)


def test_levels_copy_chunks_codecs_and_dimension_names(label_group):
    base = label_group.create_array(
        "0",
        data=smooth_labels(slice(0, 600), slice(0, 400)),
        chunks=(128, 128),
        compressors=zarr.codecs.ZstdCodec(level=5),
        dimension_names=("y", "x"),
    )
    build_label_pyramid(label_group, min_size=100)
    for name in ("1", "2", "3"):
        level = label_group[name]
        assert level.chunks == (128, 128)
        assert level.compressors == base.compressors
        assert level.metadata.dimension_names == ("y", "x")
    assert build_label_pyramid(label_group, min_size=100, chunk=64) == ["0", "1", "2", "3"]
    assert label_group["1"].chunks == (64, 64)


def test_sharded_base_is_written_shard_by_shard(label_group):
    level0 = smooth_labels(slice(0, 900), slice(0, 640))
    label_group.create_array("0", data=level0, chunks=(64, 64), shards=(256, 256), dimension_names=("y", "x"))
    build_label_pyramid(label_group, min_size=128)
    assert label_group["1"].shards == (256, 256)
    for path, want in enumerate(whole_array_pyramid(level0, min_size=128)):
        np.testing.assert_array_equal(label_group[str(path)][...], want)


def test_small_base_gives_no_new_levels(label_group):
    label_group.create_array("0", data=np.ones((200, 256), np.uint8), chunks=(64, 64))
    assert build_label_pyramid(label_group, min_size=256) == ["0"]
    assert sorted(label_group) == ["0"]


def test_rerun_overwrites_identically(label_group):
    label_group.create_array("0", data=smooth_labels(slice(0, 500), slice(0, 500)), chunks=(128, 128))
    build_label_pyramid(label_group, min_size=100)
    first = [label_group[str(i)][...] for i in range(1, 4)]
    build_label_pyramid(label_group, min_size=100)
    for i, want in enumerate(first, start=1):
        np.testing.assert_array_equal(label_group[str(i)][...], want)


@pytest.mark.slow
def test_8k_base_is_built_chunk_by_chunk_in_bounded_memory(tmp_path):
    side, chunk = 8192, 512
    label_group = zarr.open_group(tmp_path / "mask.zarr", mode="w")  # on disk: stored bytes are not traced
    base = label_group.create_array("0", shape=(side, side), dtype=np.uint8, chunks=(chunk, chunk))
    for row in range(0, side, 1024):
        base[row : row + 1024] = smooth_labels(slice(row, row + 1024), slice(0, side))

    warm_up = zarr.open_group(store=zarr.storage.MemoryStore(), mode="w")
    warm_up.create_array("0", data=smooth_labels(slice(0, 600), slice(0, 600)), chunks=(chunk, chunk))
    with dask.config.set(scheduler="synchronous"):
        build_label_pyramid(warm_up)  # one-off imports and caches are not what is measured
        tracemalloc.start()
        try:
            paths = build_label_pyramid(label_group)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

    assert paths == ["0", "1", "2", "3", "4", "5"]
    assert label_group["5"].shape == (256, 256)
    # Level 0 alone is 64 MiB; the build holds a few 1024 x 1024 blocks at a time (about 9 MiB).
    assert peak < 16 * 2**20
    # Spot-check one window of level 1 against the whole-array definition on the same window.
    np.testing.assert_array_equal(label_group["1"][1000:1300, 2000:2300], downsample_labels(base[2000:2600, 4000:4600]))
    np.testing.assert_array_equal(label_group["5"][...], downsample_labels(label_group["4"][...]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base": "missing"}, "base='missing' is not an array"),
        ({"min_size": 0}, "min_size=0"),
        ({"chunk": -1}, "chunk=-1"),
    ],
)
def test_bad_pyramid_arguments_are_user_errors(label_group, kwargs, message):
    label_group.create_array("0", data=np.ones((10, 10), np.uint8))
    with pytest.raises(InputError, match=message):
        build_label_pyramid(label_group, **kwargs)


def test_non_integer_base_is_a_user_error(label_group):
    label_group.create_array("0", data=np.ones((10, 10), np.float32))
    with pytest.raises(InputError, match="integer"):
        build_label_pyramid(label_group)
