"""segment_slide end to end on real slides: stitching exactness, every output in its reader, resume, Dask."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys

import numpy as np
import openslide
import pytest
import tiffslide
from conftest import FAST, SMALL_TILES, white_slide
from distributed import LocalCluster

from wsi_espnet.errors import InputError
from wsi_espnet.geometry import Region
from wsi_espnet.inference import predict
from wsi_espnet.models import load_model
from wsi_espnet.segment_slide import SegmentOptions, segment_slide
from wsi_espnet.segmentation.label_store import LabelStore
from wsi_espnet.segmentation.planning import window_key
from wsi_espnet.slides import choose_level, open_slide, read_target_region
from wsi_espnet.tiling import plan_tiles
from wsi_espnet.tissue_detection import detect_tissue


@pytest.fixture(scope="module")
def cmu(shared_data):
    return shared_data / "slides" / "CMU-1-Small-Region.svs"


def _labels(result) -> np.ndarray:
    return np.asarray(LabelStore(result.outputs["ome-zarr"]).labels()[...])


@pytest.mark.slow
def test_stitched_labels_equal_whole_image_inference(cmu, espnet_checkpoint, tmp_path):
    # The automatic halo, at 0.7 um/px (CMU resampled from level 0 to 2115 x 1583) in 960-px tiles: four
    # distinct windows in a 2 x 2 grid, each shifted inward at the slide's bottom or right edge, as the
    # default 1536-px tiles give at the slide's own 0.499 um/px, for half the pixels. Each tile boundary
    # between two windows has at least the halo (408 px or more) of context on both sides, and the third
    # row of tiles shares the second row's window. A coarser grid cannot keep four distinct windows with
    # that much context: at 1 um/px the slide is narrower than one tile plus two halos.
    target_mpp = 0.7
    result = segment_slide(
        cmu, espnet_checkpoint, SegmentOptions(out_dir=tmp_path, target_mpp=target_mpp, tile_size=960)
    )
    stitched = _labels(result)
    tiling = result.provenance["tiling"]
    assert tiling["tiles_with_tissue"] == 6

    reader = open_slide(cmu)
    choice = choose_level(reader, target_mpp)
    assert choice.resample
    plan = plan_tiles(choice.target_shape, tile_size=960, halo=tiling["halo"])
    assert len({window_key(t) for t in plan}) == 4  # the 2 x 2 windows this test is about
    assert tiling["windows_run"] == 4  # tiles sharing a window run it once

    whole = read_target_region(reader, choice, Region(0, 0, *choice.target_shape))
    model, _ = load_model(espnet_checkpoint)
    reference = predict(model, whole).labels + np.uint8(1)
    tissue_mask = detect_tissue(reader, mpp=choice.slide_mpp)
    tissue = tissue_mask.sample(Region(0, 0, *choice.target_shape), choice.target_to_level0)
    reference[~tissue] = 0

    agreement = float(np.mean(stitched == reference))
    on_tissue = float(np.mean(stitched[tissue] == reference[tissue]))
    print(f"stitched vs whole-image inference: {agreement:.6%} of pixels, {on_tissue:.6%} of tissue pixels")
    assert agreement >= 0.995
    assert on_tissue >= 0.995


#: CMU at 2 um/px (resampled from level 0): a 740 x 554 mask in 3 x 3 tiles, a three-level pyramid, every
#: output format. (At 1 um/px, GeoJSON alone took 15 s for the street-scene model's thousands of regions.)
FULL_RUN = {"target_mpp": 2.0, "tile_size": 256, "halo": 96, "formats": frozenset(
    {"ome-zarr", "ome-tiff", "geojson", "provenance"})}  # fmt: skip
#: mm^2 of one mask pixel.
PIXEL_MM2 = (FULL_RUN["target_mpp"] * 1e-3) ** 2


@pytest.fixture(scope="module")
def full_run(cmu, espnet_checkpoint, tmp_path_factory):
    """CMU segmented with the :data:`FULL_RUN` settings."""
    return segment_slide(cmu, espnet_checkpoint, SegmentOptions(out_dir=tmp_path_factory.mktemp("full"), **FULL_RUN))


def test_provenance_records_inputs_settings_and_areas(full_run, cmu, espnet_checkpoint):
    record = json.loads(full_run.outputs["provenance"].read_text())
    assert record["input"]["sha256"] == hashlib.sha256(cmu.read_bytes()).hexdigest()
    assert record["model"]["sha256"] == hashlib.sha256(espnet_checkpoint.read_bytes()).hexdigest()
    assert record["resolution"]["resampled"] is True
    assert record["resolution"]["effective_mpp"] == pytest.approx(2.0)
    assert record["resolution"]["mask_shape"] == [740, 554]
    assert (record["tiling"]["tile_size"], record["tiling"]["halo"]) == (256, 96)
    assert record["versions"]["torch"]
    assert record["versions"]["zarr"]
    assert record["timings_s"]["total"] >= record["timings_s"]["inference"] > 0
    labels = _labels(full_run)
    for entry in record["classes"]:
        assert entry["area_mm2"] == pytest.approx(np.sum(labels == entry["value"]) * PIXEL_MM2)
    assert record["tissue"]["segmented_area_mm2"] == pytest.approx(np.sum(labels > 0) * PIXEL_MM2)
    assert 0.2 < record["tissue"]["fraction"] < 0.6
    assert LabelStore(full_run.outputs["ome-zarr"]).state()["status"] == "complete"


def test_ome_zarr_opens_with_ome_zarr_reader(full_run):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    location = parse_url(str(full_run.outputs["ome-zarr"] / "labels"))
    nodes = [node for node in Reader(location)() if node.data]
    classes = next(node for node in nodes if node.zarr.path.rstrip("/").endswith("tissue_classes"))
    assert len(classes.data) >= 3
    np.testing.assert_array_equal(np.asarray(classes.data[0]), _labels(full_run))
    assert np.asarray(classes.data[-1]).shape[0] <= 256


def test_ome_tiff_opens_as_a_pyramid_with_its_mpp(full_run):
    path = full_run.outputs["ome-tiff"]
    levels = len(LabelStore(full_run.outputs["ome-zarr"]).group("labels", "tissue_classes"))
    with tiffslide.TiffSlide(path) as slide:
        assert slide.level_count == levels
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(2.0)
        region = np.asarray(slide.read_region((0, 0), 0, slide.dimensions, as_array=True))
        values = region[..., 0] if region.ndim == 3 else region
        np.testing.assert_array_equal(values, _labels(full_run))
    with openslide.OpenSlide(path) as slide:
        assert slide.level_count == levels
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(2.0)


def test_geojson_polygons_are_in_level0_slide_coordinates(full_run, cmu):
    collection = json.loads(full_run.outputs["geojson"].read_text())
    assert collection["type"] == "FeatureCollection"
    names = {f["properties"]["classification"]["name"] for f in collection["features"]}
    record = json.loads(full_run.outputs["provenance"].read_text())
    present = {c["name"] for c in record["classes"] if c["value"] and c["area_mm2"] > 0}
    assert names == present
    points = np.array([p for f in collection["features"] for poly in f["geometry"]["coordinates"] for ring in poly
                       for p in ring])  # fmt: skip
    with tiffslide.TiffSlide(cmu) as slide:
        width, height = slide.dimensions
    assert points[:, 0].min() >= 0
    assert points[:, 0].max() <= width + 1
    assert points[:, 1].min() >= 0
    assert points[:, 1].max() <= height + 1
    assert points[:, 0].max() > width / 2  # level-0 pixels, not mask pixels (the mask is a quarter as wide)


def test_tissue_mask_is_saved(full_run):
    assert full_run.outputs["tissue-mask"].is_file()
    store = LabelStore(full_run.outputs["ome-zarr"])
    tissue = np.asarray(store.group("labels", "tissue")["0"][...])
    assert set(np.unique(tissue)) == {0, 1}


def test_a_complete_output_is_kept_and_other_settings_are_refused(full_run, cmu, espnet_checkpoint):
    out_dir = full_run.outputs["ome-zarr"].parent
    again = segment_slide(cmu, espnet_checkpoint, SegmentOptions(out_dir=out_dir, **FULL_RUN))
    assert again.skipped
    with pytest.raises(InputError, match="holds a finished run with other inputs or settings; pass overwrite=True"):
        segment_slide(cmu, espnet_checkpoint, SegmentOptions(out_dir=out_dir, target_mpp=2.0, tile_size=512))


def test_tiles_sharing_a_window_run_it_once(cmu, espnet_checkpoint, tmp_path):
    # 1 um/px: a 1481 x 1108 grid; 768-px tiles with a 176-px halo need 1120-px windows, wider than the
    # (8-padded) 1112-px grid, so the two tiles of each row share one window.
    options = SegmentOptions(out_dir=tmp_path, target_mpp=1.0, tile_size=768, chunk=256, halo=176)
    tiling = segment_slide(cmu, espnet_checkpoint, options).provenance["tiling"]
    assert tiling["tiles_with_tissue"] == 4
    assert tiling["windows_run"] == 2


def test_a_slide_without_tissue_gives_an_empty_mask(espnet_checkpoint, tmp_path, caplog):
    slide = white_slide(tmp_path / "glass.tif")
    with caplog.at_level(logging.INFO, logger="wsi_espnet"):
        result = segment_slide(
            slide, espnet_checkpoint, SegmentOptions(out_dir=tmp_path / "out", target_mpp=1.0, halo=64)
        )
    assert not _labels(result).any()
    assert any("no tissue found" in m for m in caplog.messages)
    assert result.provenance["tissue"]["segmented_area_mm2"] == 0
    assert result.outputs["ome-tiff"].is_file()


def test_a_full_disk_leaves_the_output_incomplete_and_resumable(
    cmu, espnet_checkpoint, small_tiles_reference, tmp_path, monkeypatch
):
    options = SegmentOptions(out_dir=tmp_path, **SMALL_TILES)  # 20 tissue tiles: the disk fills after 3
    write_tile = LabelStore.write_tile
    calls = []

    def fill_up(self, *args):
        calls.append(args)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        write_tile(self, *args)

    monkeypatch.setattr(LabelStore, "write_tile", fill_up)
    with pytest.raises(InputError, match=r"is full .*resume\. The output is marked incomplete"):
        segment_slide(cmu, espnet_checkpoint, options)
    store = LabelStore(tmp_path / "CMU-1-Small-Region.mask.zarr")
    assert store.state()["status"] == "running"
    done_before = int(store.done_tiles().sum())
    assert 0 < done_before <= 3
    assert not (tmp_path / "CMU-1-Small-Region.mask.ome.tiff").exists()
    assert not (tmp_path / "CMU-1-Small-Region.provenance.json").exists()

    monkeypatch.setattr(LabelStore, "write_tile", write_tile)
    resumed = segment_slide(cmu, espnet_checkpoint, options)
    assert resumed.provenance["tiling"]["tiles_resumed"] == done_before
    np.testing.assert_array_equal(_labels(resumed), small_tiles_reference)  # an uninterrupted run's labels


@pytest.mark.slow
def test_a_dask_cluster_with_worker_processes_gives_the_same_labels(cmu, espnet_checkpoint, segmented_cmu, tmp_path):
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        remote = segment_slide(
            cmu, espnet_checkpoint,
            SegmentOptions(out_dir=tmp_path / "cluster", scheduler=cluster.scheduler_address, **FAST),
        )  # fmt: skip
    assert remote.provenance["execution"]["scheduler"].startswith("tcp://")
    local = LabelStore(segmented_cmu / "CMU-1-Small-Region.mask.zarr")  # a run on the in-process cluster
    assert local.state()["status"] == "complete"
    np.testing.assert_array_equal(_labels(remote), local.labels()[...])


def test_a_foreign_folder_in_the_way_is_never_deleted(cmu, espnet_checkpoint, tmp_path):
    foreign = tmp_path / "CMU-1-Small-Region.mask.zarr"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone else's data")
    with pytest.raises(InputError, match=r"already exist.*pass overwrite=True"):
        segment_slide(cmu, espnet_checkpoint, SegmentOptions(out_dir=tmp_path, target_mpp=2.0))
    assert (foreign / "notes.txt").read_text() == "someone else's data"


@pytest.mark.parametrize(("field", "value", "message"), [
    ("device", "gpu", "device 'gpu' is not one of auto, cpu, cuda, cuda:N"),
    ("workers", 0, "workers 0 must be >= 1"),
    ("target_mpp", 0.0, "target_mpp 0.0 must be a positive number"),
    ("mpp", float("nan"), "mpp nan must be a positive number"),
    ("tile_size", 100, "tile size 100 must be a positive multiple of 8"),
])  # fmt: skip
def test_invalid_options_are_explained(field, value, message):
    with pytest.raises(InputError, match=message):
        SegmentOptions(**{field: value})


def test_a_second_run_on_the_same_store_waits_its_turn(cmu, espnet_checkpoint, tmp_path):
    lock = tmp_path / "CMU-1-Small-Region.mask.zarr.lock"
    lock.write_text(f"{socket.gethostname()}:{os.getpid()}")  # a live holder: this test process
    options = SegmentOptions(out_dir=tmp_path, target_mpp=2.0, tile_size=256, halo=64)
    with pytest.raises(InputError, match=r"another wsi-espnet run .* is writing CMU-1-Small-Region\.mask\.zarr"):
        segment_slide(cmu, espnet_checkpoint, options)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(f"{socket.gethostname()}:{finished.stdout.strip()}")  # left by a process that is gone
    segment_slide(cmu, espnet_checkpoint, options)
    assert not lock.exists()


def test_adding_a_format_to_a_complete_run_keeps_its_record(cmu, espnet_checkpoint, tmp_path):
    options = {"out_dir": tmp_path, "target_mpp": 2.0, "tile_size": 256, "halo": 64}
    first = segment_slide(cmu, espnet_checkpoint, SegmentOptions(**options))
    tiff_written = first.outputs["ome-tiff"].stat().st_mtime_ns
    formats = frozenset({"ome-zarr", "ome-tiff", "geojson", "provenance"})
    second = segment_slide(cmu, espnet_checkpoint, SegmentOptions(formats=formats, **options))
    record = json.loads(second.outputs["provenance"].read_text())
    assert record["timings_s"] == first.provenance["timings_s"]
    assert record["tiling"]["windows_run"] == first.provenance["tiling"]["windows_run"] > 0
    assert "updated" in record
    assert second.outputs["geojson"].is_file()
    assert second.outputs["ome-tiff"].stat().st_mtime_ns == tiff_written
