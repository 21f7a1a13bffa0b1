"""GPU workers as Dask resources: tile tasks go only to workers offering GPU=1, one at a time each.

No GPU is needed: a worker process started with ``resources={"GPU": 1}`` is what `dask worker
--resources GPU=1` starts on a GPU node; which device it computes on is the engine's ``device``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dask.utils import key_split
from distributed import Client, Nanny, Scheduler, SpecCluster, get_task_stream

from wsi_espnet.batch import pipeline_from_inputs, run_pipeline
from wsi_espnet.batch.clusters import open_client, task_resources
from wsi_espnet.batch.pipeline import ClusterSpec
from wsi_espnet.errors import InputError
from wsi_espnet.segment_slide import SegmentOptions, segment_slide
from wsi_espnet.segmentation import LabelStore

#: Small tiles, so the slide makes enough tasks for both workers to get some if nothing steers them.
FAST = {"target_mpp": 2.0, "tile_size": 128, "halo": 32}


def _labels(path: Path) -> bytes:
    return bytes(LabelStore(path).labels()[...].tobytes())


def test_tile_tasks_run_only_on_the_workers_that_offer_a_gpu(shared_data, espnet_checkpoint, tmp_path):
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    workers = {
        "gpu-worker": {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1}}},
        "cpu-worker": {"cls": Nanny, "options": {"nthreads": 1}},
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
    with SpecCluster(workers=workers, scheduler=scheduler) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        names = {address: info["name"] for address, info in client.scheduler_info(n_workers=-1)["workers"].items()}
        spec = ClusterSpec("scheduler", {"address": cluster.scheduler_address, "task_resources": {"GPU": 1}})
        pipeline = pipeline_from_inputs(slide, tmp_path / "out", model=str(espnet_checkpoint),
                                        options=SegmentOptions(**FAST), cluster=spec)  # fmt: skip
        with get_task_stream(client) as stream:
            report = run_pipeline(pipeline, client=client)
    assert [o.status for o in report.outcomes] == ["ok"], report.outcomes[0].reason
    tile_tasks = [t for t in stream.data if key_split(t["key"]) == "segment_tile_group"]
    assert tile_tasks, "no tile task was recorded"
    assert {names[t["worker"]] for t in tile_tasks} == {"gpu-worker"}
    alone = segment_slide(slide, espnet_checkpoint, SegmentOptions(out_dir=tmp_path / "alone", **FAST))
    assert _labels(report.outcomes[0].outputs["ome-zarr"]) == _labels(alone.outputs["ome-zarr"])


def test_tasks_that_need_a_resource_no_worker_offers_are_explained(shared_data, espnet_checkpoint, tmp_path,
                                                                   monkeypatch):  # fmt: skip
    monkeypatch.setattr("wsi_espnet.segmentation.running.WORKER_WAIT_S", 2)
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    with open_client(ClusterSpec("local", {"workers": 1})) as client:
        spec = ClusterSpec("scheduler", {"address": client.scheduler.address, "task_resources": {"GPU": 1}})
        pipeline = pipeline_from_inputs(slide, tmp_path / "out", model=str(espnet_checkpoint),
                                        options=SegmentOptions(**FAST), cluster=spec)  # fmt: skip
        report = run_pipeline(pipeline, client=client)
    (outcome,) = report.outcomes
    assert outcome.status == "failed"
    assert "no Dask worker offers the resources the tasks need (GPU=1)" in outcome.reason
    assert "dask worker --resources GPU=1" in outcome.reason


def test_gpu_settings_become_task_resources_and_are_checked_against_the_machine():
    assert task_resources(ClusterSpec("local", {"gpus": 2})) == {"GPU": 1}
    assert task_resources(ClusterSpec("local", {})) is None
    assert task_resources(ClusterSpec("scheduler", {"address": "tcp://h:1", "task_resources": {"GPU": 1}})) == {
        "GPU": 1
    }
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the refusal is for machines with fewer GPUs than asked for")
    refused = r"asks for gpus=1 but this machine has 0 CUDA device"
    with pytest.raises(InputError, match=refused), open_client(ClusterSpec("local", {"gpus": 1})):
        pass
