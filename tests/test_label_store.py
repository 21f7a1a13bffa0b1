"""The run's zarr store: layout, resume bookkeeping, tile writes and the tissue mask."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from wsi_espnet.errors import InputError
from wsi_espnet.segmentation.label_store import CLASSES_LABEL, PROGRESS, TISSUE_LABEL, LabelStore
from wsi_espnet.tiling import plan_tiles

ATTRS = {"slide": "/slides/a.svs", "model": "espnet", "version": "0.1.0"}


def _create(path: Path, shape: tuple[int, int] = (100, 70), chunk: int = 32, **overrides: Any) -> LabelStore:
    tile_grid = (-(-shape[0] // chunk), -(-shape[1] // chunk))
    arguments = {"shape": shape, "chunk": chunk, "tile_grid": tile_grid, "run_key": "key-1", "attrs": ATTRS}
    return LabelStore.create(path, **{**arguments, **overrides})


@pytest.mark.parametrize(
    ("shape", "chunk", "tile_grid"),
    [((100, 70), 32, (4, 3)), ((1, 1), 8, (1, 1)), ((512, 256), 256, (2, 1)), ((4000, 3000), 1024, (4, 3))],
)
def test_create_layout(tmp_path: Path, shape: tuple[int, int], chunk: int, tile_grid: tuple[int, int]) -> None:
    store = LabelStore.create(
        tmp_path / "slide.zarr", shape=shape, chunk=chunk, tile_grid=tile_grid, run_key="key-1", attrs=ATTRS
    )
    assert store.path == tmp_path / "slide.zarr"
    assert store.state() == {**ATTRS, "status": "running", "run_key": "key-1"}
    root = zarr.open_group(store.path, mode="r")
    assert root.metadata.zarr_format == 3
    assert root.attrs["ome"] == {"version": "0.5"}
    assert root["labels"].attrs["ome"] == {"version": "0.5", "labels": []}

    labels = store.labels()
    assert store.group("labels", CLASSES_LABEL)["0"].shape == shape
    assert (labels.shape, labels.chunks, labels.dtype) == (shape, (chunk, chunk), np.dtype(np.uint8))
    assert tuple(labels.metadata.dimension_names) == ("y", "x")
    assert labels.fill_value == 0
    assert labels.nchunks_initialized == 0  # nothing written yet: empty chunks are implicit
    assert not np.asarray(labels[...]).any()

    progress = zarr.open_array(store.path / PROGRESS, mode="r")
    assert (progress.shape, progress.chunks) == (tile_grid, (1, 1))
    done = store.done_tiles()
    assert done.shape == tile_grid
    assert done.dtype == np.bool_
    assert not done.any()


def test_attrs_are_not_mutated(tmp_path: Path) -> None:
    attrs = dict(ATTRS)
    store = _create(tmp_path / "slide.zarr", attrs=attrs, run_key="key-2")
    assert attrs == ATTRS
    state = store.state()
    assert state is not None
    state["status"] = "edited"
    assert store.state() == {**ATTRS, "status": "running", "run_key": "key-2"}


def test_state_transitions(tmp_path: Path) -> None:
    store = _create(tmp_path / "slide.zarr")
    store.update_state(tiles_total=12, note="first")
    assert store.state() == {**ATTRS, "status": "running", "run_key": "key-1", "tiles_total": 12, "note": "first"}
    store.update_state(note="second")
    assert store.state() == {**ATTRS, "status": "running", "run_key": "key-1", "tiles_total": 12, "note": "second"}

    store.mark_complete(completed="2026-01-01T00:00:00Z")
    state = store.state()
    assert state is not None
    assert (state["status"], state["completed"], state["run_key"]) == ("complete", "2026-01-01T00:00:00Z", "key-1")

    # A resumed run re-derives outputs: the store says "running" until its new last write.
    resumed = LabelStore(tmp_path / "slide.zarr")
    resumed.mark_running()
    assert resumed.state() == {**state, "status": "running"}
    resumed.mark_complete()
    assert resumed.state() == {**state, "status": "complete"}


@pytest.mark.parametrize(
    ("shape", "tile_size", "written"),
    [
        ((100, 70), 32, [(0, 0), (3, 2), (1, 2), (3, 0)]),  # edge tiles are smaller than the chunk
        ((64, 64), 32, [(0, 0), (0, 1), (1, 0), (1, 1)]),  # every tile
        ((300, 500), 128, [(2, 3)]),  # only the bottom-right corner
        ((40, 40), 64, [(0, 0)]),  # one tile larger than the image
    ],
)
def test_write_tile_then_done_tiles(
    tmp_path: Path, shape: tuple[int, int], tile_size: int, written: list[tuple[int, int]]
) -> None:
    plan = plan_tiles(shape, tile_size=tile_size, halo=0)
    store = LabelStore.create(
        tmp_path / "slide.zarr", shape=shape, chunk=tile_size, tile_grid=plan.grid_shape, run_key="k", attrs={}
    )
    rng = np.random.default_rng(7)
    expected = np.zeros(shape, dtype=np.uint8)
    tiles = {(t.row, t.col): t for t in plan}
    for row, col in written:
        tile = tiles[row, col]
        labels = rng.integers(1, 6, (tile.height, tile.width), dtype=np.uint8)
        store.write_tile(tile.row, tile.col, tile.top, tile.left, labels)
        expected[tile.top : tile.top + tile.height, tile.left : tile.left + tile.width] = labels

    done = np.zeros(plan.grid_shape, dtype=bool)
    done[tuple(zip(*written, strict=True))] = True
    reopened = LabelStore(store.path)  # what a resumed run sees
    np.testing.assert_array_equal(reopened.done_tiles(), done)
    np.testing.assert_array_equal(np.asarray(reopened.labels()[...]), expected)
    # Only the written tiles' chunks exist on disk.
    assert reopened.labels().nchunks_initialized == len(written)


def test_rewriting_a_tile_replaces_its_labels(tmp_path: Path) -> None:
    store = _create(tmp_path / "slide.zarr", shape=(64, 64), chunk=32)
    store.write_tile(1, 0, 32, 0, np.full((32, 32), 3, dtype=np.uint8))
    store.write_tile(1, 0, 32, 0, np.full((32, 32), 5, dtype=np.uint8))
    labels = np.asarray(store.labels()[...])
    assert (labels[32:, :32] == 5).all()
    assert not labels[:32].any()
    assert not labels[:, 32:].any()
    np.testing.assert_array_equal(store.done_tiles(), [[False, False], [True, False]])


@pytest.mark.parametrize(("shape", "chunks"), [((37, 50), (37, 50)), ((3000, 100), (2048, 100)), ((1, 1), (1, 1))])
def test_write_tissue_mask(tmp_path: Path, shape: tuple[int, int], chunks: tuple[int, int]) -> None:
    store = _create(tmp_path / "slide.zarr")
    mask = np.random.default_rng(3).random(shape) > 0.5
    array = store.write_tissue_mask(mask)
    stored = zarr.open_array(store.path / "labels" / TISSUE_LABEL / "0", mode="r")
    for result in (array, stored):
        assert (result.shape, result.chunks, result.dtype) == (shape, chunks, np.dtype(np.uint8))
        assert tuple(result.metadata.dimension_names) == ("y", "x")
        np.testing.assert_array_equal(np.asarray(result[...]), mask.astype(np.uint8))
    # The class labels are untouched.
    assert store.labels().shape == (100, 70)


def test_write_tissue_mask_again_replaces_it(tmp_path: Path) -> None:
    store = _create(tmp_path / "slide.zarr")
    store.write_tissue_mask(np.ones((40, 30), dtype=bool))
    second = np.zeros((20, 25), dtype=bool)
    second[5:10, 5:10] = True
    store.write_tissue_mask(second)
    stored = zarr.open_array(store.path / "labels" / TISSUE_LABEL / "0", mode="r")
    assert stored.shape == (20, 25)
    np.testing.assert_array_equal(np.asarray(stored[...]), second.astype(np.uint8))


def test_create_replaces_an_existing_store(tmp_path: Path) -> None:
    path = tmp_path / "slide.zarr"
    old = _create(path, shape=(100, 70), chunk=32)
    old.write_tile(0, 0, 0, 0, np.full((32, 32), 4, dtype=np.uint8))
    old.write_tissue_mask(np.ones((10, 10), dtype=bool))
    old.mark_complete(completed="yesterday")
    (path / "stray.txt").write_text("left by an earlier run")

    new = _create(path, shape=(48, 80), chunk=16, run_key="key-2", attrs={"slide": "b.svs"})
    assert new.state() == {"slide": "b.svs", "status": "running", "run_key": "key-2"}
    labels = new.labels()
    assert (labels.shape, labels.chunks) == ((48, 80), (16, 16))
    assert not np.asarray(labels[...]).any()
    done = new.done_tiles()
    assert done.shape == (3, 5)
    assert not done.any()
    assert not (path / "stray.txt").exists()
    assert TISSUE_LABEL not in new.group("labels")


@pytest.mark.parametrize("kind", ["missing", "empty-folder", "file-in-place"])
def test_state_is_none_without_a_store(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "slide.zarr"
    if kind == "empty-folder":
        path.mkdir()
    elif kind == "file-in-place":
        path.write_text("not a folder")
    assert LabelStore(path).state() is None


def test_state_is_none_for_another_tools_zarr_group(tmp_path: Path) -> None:
    zarr.open_group(tmp_path / "other.zarr", mode="w").attrs["ome"] = {"version": "0.5"}
    assert LabelStore(tmp_path / "other.zarr").state() is None


def _missing(path: Path) -> Path:
    return path


def _plain_folder(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("not a zarr store")
    return path


def _zarr_array(path: Path) -> Path:
    zarr.create_array(path, shape=(3, 3), dtype="uint8")
    return path


def _garbled_metadata(path: Path) -> Path:
    path.mkdir()
    (path / "zarr.json").write_text("{ this is not json")
    return path


def _zarr_v2_group(path: Path) -> Path:
    zarr.open_group(path, mode="w", zarr_format=2)
    return path


NOT_STORES = [_missing, _plain_folder, _zarr_array, _garbled_metadata, _zarr_v2_group]


@pytest.mark.parametrize("make", [_zarr_array, _garbled_metadata], ids=lambda f: f.__name__)
def test_state_of_zarr_metadata_that_is_not_a_store(tmp_path: Path, make: Callable[[Path], Path]) -> None:
    path = make(tmp_path / "slide.zarr")
    with pytest.raises(InputError, match=r"slide\.zarr' is not a wsi-espnet output store"):
        LabelStore(path).state()


@pytest.mark.parametrize("make", NOT_STORES, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "operation",
    [
        pytest.param(lambda s: s.mark_running(), id="mark_running"),
        pytest.param(lambda s: s.mark_complete(), id="mark_complete"),
        pytest.param(lambda s: s.update_state(note="x"), id="update_state"),
        pytest.param(lambda s: s.group("labels"), id="group"),
        pytest.param(lambda s: s.write_tissue_mask(np.ones((2, 2), dtype=bool)), id="write_tissue_mask"),
    ],
)
def test_opening_a_folder_that_is_not_a_store(
    tmp_path: Path, make: Callable[[Path], Path], operation: Callable[[LabelStore], object]
) -> None:
    path = make(tmp_path / "slide.zarr")
    with pytest.raises(InputError, match=r"slide\.zarr' is not a wsi-espnet output store"):
        operation(LabelStore(path))


@pytest.mark.parametrize("operation", [LabelStore.labels, LabelStore.done_tiles], ids=lambda f: f.__name__)
def test_reading_arrays_of_a_folder_that_is_not_a_store(
    tmp_path: Path, operation: Callable[[LabelStore], object]
) -> None:
    path = _plain_folder(tmp_path / "slide.zarr")
    with pytest.raises(InputError, match=r"slide\.zarr' is not a wsi-espnet output store"):
        operation(LabelStore(path))
