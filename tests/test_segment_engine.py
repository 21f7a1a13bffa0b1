"""The engine as a library: regions in memory, progress events, cancel and resume, a caller's cluster, model forms."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import FAST, SMALL_TILES
from distributed import Client, LocalCluster

from wsi_espnet.errors import Cancelled, InputError
from wsi_espnet.geometry import Region
from wsi_espnet.models import load_model
from wsi_espnet.segment_slide import SegmentOptions, segment_slide
from wsi_espnet.segmentation import STAGES, LabelStore, ProgressEvent, plan_slide, segment_region
from wsi_espnet.slides import open_slide


@pytest.fixture(scope="module")
def cmu(shared_data):
    return shared_data / "slides" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def reference(segmented_cmu):
    """What ``segment_slide`` (run by ``wsi-espnet segment``) stored for CMU with FAST: its labels and provenance."""
    labels = LabelStore(segmented_cmu / "CMU-1-Small-Region.mask.zarr").labels()[...]
    return np.asarray(labels), json.loads((segmented_cmu / "CMU-1-Small-Region.provenance.json").read_text())


@pytest.mark.parametrize(
    "level0_region",
    [
        Region(1000, 700, 900, 800),  # across tile boundaries in the middle of the tissue
        Region(0, 0, 2967, 2220),  # the whole slide
        Region(2500, -300, 1000, 1500),  # past the bottom and left edges (tissue there): clipped to the slide
    ],
)
def test_segment_region_equals_what_segment_slide_stores(cmu, espnet_checkpoint, reference, level0_region):
    stored, provenance = reference
    model, config = load_model(espnet_checkpoint)
    with open_slide(cmu) as reader:
        result = segment_region(reader, model, config, level0_region, **FAST)
    region = result.region
    assert result.output_mpp == pytest.approx(provenance["resolution"]["effective_mpp"])
    assert result.halo == provenance["tiling"]["halo"]
    assert result.labels.shape == region.shape
    assert (region.top, region.left) >= (0, 0)
    assert region.bottom <= stored.shape[0]
    assert region.right <= stored.shape[1]
    expected = stored[int(region.top) : int(region.bottom), int(region.left) : int(region.right)]
    assert (expected > 0).any()  # the region holds tissue, so the comparison means something
    np.testing.assert_array_equal(result.labels, expected)
    # The region covers the level-0 pixels asked for (where they are inside the slide).
    scale = result.target_to_level0
    assert region.top * scale <= max(level0_region.top, 0) + scale
    assert region.left * scale <= max(level0_region.left, 0) + scale


def test_segment_region_outside_the_slide_is_refused(cmu, espnet_checkpoint):
    model, config = load_model(espnet_checkpoint)
    with open_slide(cmu) as reader, pytest.raises(InputError, match=r"holds no pixel of CMU-1-Small-Region\.svs"):
        segment_region(reader, model, config, Region(5000, 5000, 100, 100), **FAST)


def test_progress_events_come_in_stage_order(cmu, espnet_checkpoint, reference, tmp_path):
    events: list[ProgressEvent] = []
    segment_slide(cmu, espnet_checkpoint, SegmentOptions(out_dir=tmp_path, **FAST), on_progress=events.append)
    stages = [e.stage for e in events]
    assert stages[0] == "planning"
    assert [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s] == list(STAGES)
    tiles = [e for e in events if e.stage == "tiles"]
    total = reference[1]["tiling"]["tiles_with_tissue"]
    assert {e.total for e in tiles} == {total}
    assert [e.done for e in tiles] == sorted(e.done for e in tiles)
    assert (tiles[0].done, tiles[-1].done) == (0, total)
    assert all(e.slide == "CMU-1-Small-Region.svs" for e in events)
    assert "tissue" in tiles[0].detail


def test_cancel_midway_then_resume_gives_identical_labels(cmu, espnet_checkpoint, small_tiles_reference, tmp_path):
    # One task at a time over CMU's 20 tissue tiles (SMALL_TILES): the cancel lands with tiles done and left.
    options = SegmentOptions(out_dir=tmp_path, **SMALL_TILES)
    cancel = threading.Event()

    def cancel_after_five(event: ProgressEvent) -> None:
        if event.stage == "tiles" and event.done >= 5:
            cancel.set()

    with pytest.raises(Cancelled, match="cancelled; run it again to resume"):
        segment_slide(cmu, espnet_checkpoint, options, on_progress=cancel_after_five, cancel=cancel)
    store = LabelStore(tmp_path / "CMU-1-Small-Region.mask.zarr")
    assert store.state()["status"] == "running"
    done = int(store.done_tiles().sum())
    assert done >= 5
    assert not (tmp_path / "CMU-1-Small-Region.provenance.json").exists()
    assert not (tmp_path / "CMU-1-Small-Region.mask.ome.tiff").exists()

    resumed = segment_slide(cmu, espnet_checkpoint, options)
    assert resumed.provenance["tiling"]["tiles_resumed"] == done
    assert done < resumed.provenance["tiling"]["tiles_with_tissue"]
    # An uninterrupted run with the same options, shared with the other stop-and-resume tests.
    assert store.labels()[...].tobytes() == small_tiles_reference.tobytes()
    # The confidence figure counts the resumed tiles too: one histogram entry per tissue pixel of the mask.
    confidence = resumed.provenance["reliability"]["confidence"]
    assert confidence["tissue_pixels"] == int(np.count_nonzero(small_tiles_reference))


@pytest.mark.slow
def test_two_slides_at_once_on_one_caller_owned_cluster_with_worker_processes(
    shared_data, cmu, espnet_checkpoint, reference, tmp_path
):
    ndpi = shared_data / "slides" / "test3-DAPI-2-387.ndpi"
    alone = segment_slide(ndpi, espnet_checkpoint, SegmentOptions(out_dir=tmp_path / "alone", **FAST))
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
        ThreadPoolExecutor(2) as pool,
    ):
        futures = [
            pool.submit(segment_slide, slide, espnet_checkpoint, SegmentOptions(out_dir=tmp_path / "shared", **FAST),
                        client=client)
            for slide in (cmu, ndpi)
        ]  # fmt: skip
        results = [f.result() for f in futures]
        assert client.status == "running"  # not closed by segment_slide
        assert client.submit(sum, [1, 2]).result() == 3
    assert results[0].provenance["execution"]["scheduler"] == cluster.scheduler_address
    cmu_labels = LabelStore(results[0].outputs["ome-zarr"]).labels()[...]
    assert cmu_labels.tobytes() == reference[0].tobytes()
    ndpi_labels = LabelStore(results[1].outputs["ome-zarr"]).labels()[...]
    assert ndpi_labels.tobytes() == LabelStore(alone.outputs["ome-zarr"]).labels()[...].tobytes()


def test_a_loaded_model_and_a_packaged_name_work_like_a_path(cmu, espnet_checkpoint, reference, tmp_path):
    model, config = load_model(espnet_checkpoint)
    loaded = segment_slide(cmu, (model, config), SegmentOptions(out_dir=tmp_path / "loaded", **FAST))
    assert loaded.provenance["model"]["path"] is None
    assert LabelStore(loaded.outputs["ome-zarr"]).labels()[...].tobytes() == reference[0].tobytes()

    packaged = segment_slide(cmu, "espnet-breast-tumour", SegmentOptions(out_dir=tmp_path / "packaged", **FAST))
    assert packaged.provenance["model"]["name"] == "espnet-breast-tumour"
    assert packaged.provenance["model"]["path"].endswith("espnet-breast-tumour.safetensors")


def test_plan_slide_skips_glass(cmu, espnet_checkpoint):
    _, config = load_model(espnet_checkpoint)
    with open_slide(cmu) as reader:
        plan = plan_slide(reader, config, halo=64, target_mpp=2.0, tile_size=256)
    assert plan.choice.output_mpp == pytest.approx(2.0, rel=0.01)
    assert plan.choice.target_to_level0 == pytest.approx(plan.choice.output_mpp / reader.mpp)
    assert 0 < len(plan.tissue_tiles) < len(plan.tiles)
    for tile in plan.tiles:
        touches = plan.tissue.region_fraction(plan.choice.to_level0(tile.region)) > 0
        assert touches == (tile in plan.tissue_tiles)


def test_library_errors_name_parameters_and_the_cli_names_flags(cmu, espnet_checkpoint, tmp_path):
    options = SegmentOptions(out_dir=tmp_path, **FAST)
    segment_slide(cmu, espnet_checkpoint, options)
    other = SegmentOptions(out_dir=tmp_path, target_mpp=2.0, tile_size=512, halo=64)
    with pytest.raises(InputError) as caught:
        segment_slide(cmu, espnet_checkpoint, other)
    assert "pass overwrite=True to replace it, or out for another folder" in str(caught.value)
    assert "--" not in str(caught.value)
    assert "pass --overwrite to replace it, or --out for another folder" in caught.value.cli_message()
