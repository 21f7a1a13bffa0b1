"""Batch jobs on clusters started by someone else: a scheduler given by file or address, and GPU
workers as Dask resources (tile tasks go only to workers offering GPU=1, one at a time each).

No GPU is needed: a worker process started with ``resources={"GPU": 1}`` is what `dask worker
--resources GPU=1` starts on a GPU node; which device it computes on is the engine's ``device``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dask.utils import key_split
from distributed import Client, LocalCluster, Nanny, Scheduler, SpecCluster, get_task_stream
from distributed.system import MEMORY_LIMIT

from wsi_espnet.batch import load_pipeline, pipeline_from_inputs, run_pipeline
from wsi_espnet.batch.clusters import DEFAULT_START_TIMEOUT_S, job_script, open_client, task_resources, worker_wait_s
from wsi_espnet.batch.pipeline import ClusterSpec
from wsi_espnet.errors import InputError
from wsi_espnet.segment_slide import SegmentOptions, segment_slide
from wsi_espnet.segmentation import LabelStore

#: Small tiles, so the slide makes enough tasks for both workers to get some if nothing steers them.
FAST = {"target_mpp": 2.0, "tile_size": 128, "halo": 32}


def _labels(path: Path) -> bytes:
    return bytes(LabelStore(path).labels()[...].tobytes())


@pytest.fixture
def scheduler_file(tmp_path: Path) -> Iterator[Path]:
    """A dask.distributed cluster started the way a site starts one: `dask scheduler` and `dask worker`
    processes of their own, found through a scheduler file."""
    path = tmp_path / "scheduler.json"
    dask = [sys.executable, "-m", "distributed.cli"]
    logs = (tmp_path / "scheduler.log").open("w"), (tmp_path / "worker.log").open("w")
    scheduler = subprocess.Popen([*dask[:2], "distributed.cli.dask_scheduler", "--scheduler-file", str(path),
                                  "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0"],
                                 stdout=logs[0], stderr=subprocess.STDOUT)  # fmt: skip
    worker = None
    try:
        deadline = time.monotonic() + 60
        while not (path.exists() and path.stat().st_size and "address" in path.read_text()):
            assert time.monotonic() < deadline, (tmp_path / "scheduler.log").read_text()
            time.sleep(0.2)
        worker = subprocess.Popen([*dask[:2], "distributed.cli.dask_worker", "--scheduler-file", str(path),
                                   "--nworkers", "2", "--nthreads", "1", "--host", "127.0.0.1"],
                                  stdout=logs[1], stderr=subprocess.STDOUT)  # fmt: skip
        yield path
    finally:
        for process in (worker, scheduler):
            if process is not None:
                process.terminate()
                process.wait(timeout=30)
        for log in logs:
            log.close()


def test_a_cohort_runs_on_a_scheduler_given_by_file_then_by_address(scheduler_file, shared_data,
                                                                      espnet_checkpoint, tmp_path):  # fmt: skip
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(json.dumps({
        "pipeline_version": 1, "name": "on-a-scheduler", "inputs": {"slides": str(slide)},
        "model": str(espnet_checkpoint), "segmentation": FAST, "outputs": {"folder": "out"},
        "cluster": {"scheduler": {"file": scheduler_file.name}},
    }))  # fmt: skip
    batch = [sys.executable, "-m", "wsi_espnet", "batch", str(pipeline)]
    first = subprocess.run(batch, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    address = json.loads(scheduler_file.read_text())["address"]
    assert f"1 slides on {address}" in first.stderr
    assert "1 segmented" in first.stdout
    alone = segment_slide(slide, espnet_checkpoint, SegmentOptions(out_dir=tmp_path / "alone", **FAST))
    assert _labels(tmp_path / "out" / "CMU-1-Small-Region.mask.zarr") == _labels(alone.outputs["ome-zarr"])

    again = subprocess.run([*batch, "--scheduler", address], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"1 slides on {address}" in again.stderr
    assert "0 segmented, 1 already complete" in again.stdout
    with Client(address, timeout="20s") as client:  # the command left the cluster running
        assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2


@pytest.mark.parametrize("where", ["address", "file"])
def test_an_unreachable_scheduler_is_explained(tmp_path, where):
    gone = tmp_path / "gone.json"  # a scheduler file left behind by a scheduler that has stopped
    gone.write_text(json.dumps({"address": "tcp://127.0.0.1:9", "type": "Scheduler"}))
    settings = {"address": "tcp://127.0.0.1:9"} if where == "address" else {"file": str(gone)}
    refused = r"cannot reach the Dask scheduler at '(tcp://127.0.0.1:9|the scheduler file .*gone.json)'"
    with pytest.raises(InputError, match=refused), open_client(ClusterSpec("scheduler", {**settings, "timeout": 2})):
        pass


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


def test_a_job_queue_pipeline_waits_its_start_timeout_for_workers_not_the_engines_default(
    shared_data, espnet_checkpoint, tmp_path
):
    # Worker jobs that ended at their walltime are replaced through the queue, which can take longer than
    # the engine's 120 s: a slide starting meanwhile waits as long as the pipeline lets the first job start.
    assert worker_wait_s(ClusterSpec("slurm", {"cores": 1, "memory": "1GB"})) == DEFAULT_START_TIMEOUT_S
    assert worker_wait_s(ClusterSpec("pbs", {"cores": 1, "memory": "1GB", "start_timeout": 900})) == 900
    assert worker_wait_s(ClusterSpec("kubernetes", {"image": "i", "volumes": [], "startup_timeout": 30})) == 30
    assert worker_wait_s(ClusterSpec("local", {})) is None
    assert worker_wait_s(ClusterSpec("scheduler", {"address": "tcp://h:1"})) is None

    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    spec = ClusterSpec("slurm", {"cores": 1, "memory": "1GB", "start_timeout": 1})
    with (
        LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster,  # a queue with no job running
        Client(cluster) as client,
    ):
        pipeline = pipeline_from_inputs(slide, tmp_path / "out", model=str(espnet_checkpoint),
                                        options=SegmentOptions(**FAST), cluster=spec)  # fmt: skip
        report = run_pipeline(pipeline, client=client)
    (outcome,) = report.outcomes
    assert outcome.status == "failed"
    assert "no Dask worker joined the scheduler within 1 s" in outcome.reason  # not the engine's 120 s


def test_gpu_settings_become_task_resources_and_are_checked_against_the_machine():
    assert task_resources(ClusterSpec("local", {"gpus": 2})) == {"GPU": 1}
    assert task_resources(ClusterSpec("local", {})) is None
    assert task_resources(ClusterSpec("kubernetes", {"image": "i", "volumes": [], "gpus_per_worker": 1})) == {"GPU": 1}
    assert task_resources(ClusterSpec("scheduler", {"address": "tcp://h:1", "task_resources": {"GPU": 1}})) == {
        "GPU": 1
    }
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the refusal is for machines with fewer GPUs than asked for")
    refused = r"asks for gpus: 1 in cluster.local, but this machine has 0 CUDA device"
    with pytest.raises(InputError, match=refused), open_client(ClusterSpec("local", {"gpus": 1})):
        pass


EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_shipped_pipeline_example_is_valid(shared_data, path, monkeypatch):
    monkeypatch.setenv("WSI_ESPNET_DATA", str(shared_data))  # the Kubernetes example's shared volume
    pipeline = load_pipeline(path)
    assert pipeline.name == path.stem
    assert "CMU-1-Small-Region.svs" in [s.path.name for s in pipeline.cohort.slides]
    if pipeline.cluster.kind in ("slurm", "pbs"):
        script = job_script(pipeline.cluster)
        assert "distributed.cli.dask_worker" in script
        assert ("--resources GPU=1" in script) == bool(pipeline.cluster.settings.get("gpus"))


def test_a_local_gpu_cluster_has_one_worker_per_gpu_of_this_process(monkeypatch):
    """This machine has no GPU, so the count PyTorch would report is set to 2; the workers are real
    processes, and what each sees (CUDA_VISIBLE_DEVICES), offers and may use is read back from them."""
    monkeypatch.setattr("wsi_espnet.batch.clusters._cuda_device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")  # e.g. a SLURM job that holds GPUs 5 and 7
    with open_client(ClusterSpec("local", {"gpus": 2})) as client:
        client.wait_for_workers(2, timeout=60)
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        workers = client.scheduler_info(n_workers=-1)["workers"]
    assert sorted(seen.values()) == ["5", "7"]
    assert all(w["resources"] == {"GPU": 1} for w in workers.values())
    assert all(w["memory_limit"] == MEMORY_LIMIT // 2 for w in workers.values())  # half of this machine each
    both = ClusterSpec("local", {"gpus": 2, "workers": 3})
    with (
        pytest.raises(InputError, match=r"with gpus there is one worker per GPU, so remove workers"),
        open_client(both),
    ):
        pass
