"""Batch pipelines on a real single-node SLURM through dask-jobqueue.

`.ci/run` starts the SLURM (`.ci/slurm-single-node start DIR`, then SLURM_CONF=DIR/slurm.conf);
on a developer machine without one these tests skip, and with CI=true they fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask
import pytest
import yaml

from wsi_espnet.batch import load_pipeline, run_pipeline
from wsi_espnet.batch.clusters import job_script, open_client, task_resources
from wsi_espnet.batch.pipeline import ClusterSpec
from wsi_espnet.errors import InputError
from wsi_espnet.segment_slide import SegmentOptions, segment_slide
from wsi_espnet.segmentation import LabelStore, ProgressEvent

FAST = {"target_mpp": 4.0, "tile_size": 256, "halo": 64}
SLIDES = {"tcga-cr-7395-01a-01-ts1.svs": 0.5, "CMU-1-Small-Region.svs": None}
#: One worker job per core of the node; each job one worker process with 1 GB.
WORKER_JOB = {"cores": 1, "memory": "1GB", "walltime": "00:15:00", "interface": "lo", "start_timeout": 120}


def _slurm_partition() -> str | None:
    """The default partition of a SLURM that answers, or None."""
    if shutil.which("sinfo") is None:
        return None
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True, timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return None
    for line in done.stdout.splitlines() if done.returncode == 0 else []:
        partition, state = line.split()
        if partition.endswith("*") and state in ("idle", "mixed", "allocated"):
            return partition.rstrip("*")
    return None


@pytest.fixture(scope="module")
def partition() -> str:
    found = _slurm_partition()
    if found is None:
        reason = (
            "no SLURM answers here (sinfo missing or no idle default partition); start one with "
            "`.ci/slurm-single-node start DIR` and export SLURM_CONF=DIR/slurm.conf"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def _write(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _slurm_pipeline(root: Path, shared_data: Path, checkpoint: Path, partition: str, **job: object) -> Path:
    entries = [{"path": str(shared_data / "slides" / n), **({"mpp": m} if m else {})} for n, m in SLIDES.items()]
    _write(root / "cohort.yaml", {"cohort_version": 1, "name": "slurm-cohort", "slides": entries})
    return _write(root / "pipeline.yaml", {
        "pipeline_version": 1, "name": "slurm-batch", "inputs": {"cohort": "cohort.yaml"}, "model": str(checkpoint),
        "segmentation": FAST, "outputs": {"folder": "out"},
        "cluster": {"slurm": {"queue": partition, **WORKER_JOB, "jobs": 2, **job}}, "concurrent_slides": 2,
    })  # fmt: skip


def _labels(path: Path) -> bytes:
    return bytes(LabelStore(path).labels()[...].tobytes())


def _job_ids() -> list[str]:
    """Our worker jobs that are queued or running (not those being torn down)."""
    done = subprocess.run(["squeue", "-h", "-n", "wsi-espnet", "-t", "PD,CF,R,S", "-o", "%i"], capture_output=True,
                          text=True, check=True)  # fmt: skip
    return done.stdout.split()


def test_a_pipeline_runs_on_slurm_with_a_job_cancelled_mid_run(partition, shared_data, espnet_checkpoint, tmp_path):
    """Two worker jobs; one is scancel-ed mid-run: its tasks move to the other and every slide equals
    the single-slide run (that a replacement is submitted is checked on its own, below: a short run
    can end before it is)."""
    pipeline = load_pipeline(_slurm_pipeline(tmp_path, shared_data, espnet_checkpoint, partition))
    cancelled: list[str] = []
    lock = threading.Lock()

    def cancel_a_job(event: ProgressEvent) -> None:
        with lock:
            mid_run = event.stage == "tiles" and event.slide.startswith("tcga") and 1 <= event.done < event.total
            jobs = _job_ids() if mid_run and not cancelled else []
            if jobs:
                subprocess.run(["scancel", "--signal=KILL", "--full", jobs[0]], check=True)
                cancelled.append(jobs[0])

    report = run_pipeline(pipeline, on_progress=cancel_a_job)
    assert [o.status for o in report.outcomes] == ["ok", "ok"], [o.reason for o in report.outcomes]
    assert report.scheduler.startswith("tcp://127.0.0.1:")
    logs = sorted((tmp_path / "out" / ".batch-jobs").glob("wsi-espnet-*.err"))
    assert len(logs) >= 2, "the workers did not run as SLURM jobs writing to the job log folder"
    assert any("Registered to" in log.read_text() for log in logs)
    assert cancelled, "no tile finished before the last one, so no job was cancelled mid-run"
    assert _job_ids() == [], "the batch left worker jobs in the queue"

    for outcome in report.outcomes:
        alone = segment_slide(
            outcome.slide.path, espnet_checkpoint,
            SegmentOptions(out_dir=tmp_path / "alone", mpp=outcome.slide.mpp, **FAST),  # type: ignore[arg-type]
        )  # fmt: skip
        assert _labels(outcome.outputs["ome-zarr"]) == _labels(alone.outputs["ome-zarr"]), outcome.slide.stem


def test_a_cancelled_worker_job_is_replaced(partition, tmp_path):
    settings = {"queue": partition, **WORKER_JOB, "jobs": 1}
    # The scheduler forgets a lost worker after 1 s instead of 15 s, so adapt resubmits quickly.
    with (
        dask.config.set({"distributed.deploy.lost-worker-timeout": "1s"}),
        open_client(ClusterSpec("slurm", settings), job_log_directory=tmp_path) as client,
    ):
        client.wait_for_workers(1, timeout=120)
        (first,) = _job_ids()
        subprocess.run(["scancel", "--signal=KILL", "--full", first], check=True)
        deadline = time.monotonic() + 120
        while not [job for job in _job_ids() if job != first]:
            assert time.monotonic() < deadline, "no replacement job was submitted within 120 s"
            time.sleep(0.5)
        assert client.submit(sum, [1, 2], pure=False).result(timeout=120) == 3  # its worker joins and works
    assert _job_ids() == []


def test_the_shipped_slurm_example_equals_the_local_example_then_a_rerun_recomputes_nothing(partition, tmp_path):
    """pipelines/slurm-example.yaml and local-example.yaml, as a user runs them, on the example cohort."""
    if partition != "debug":
        pytest.skip(f"slurm-example.yaml names the partition 'debug'; this SLURM's default is {partition!r}")
    root = Path(__file__).resolve().parents[1] / "pipelines"
    env = {**os.environ, "WSI_ESPNET_BATCH_OUT": str(tmp_path)}

    def batch(name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "wsi_espnet", "batch", root / name],
                              capture_output=True, text=True, timeout=900, env=env)  # fmt: skip

    for name in ("local-example.yaml", "slurm-example.yaml"):
        done = batch(name)
        assert done.returncode == 0, done.stderr
        assert "4 segmented, 0 already complete, 0 failed" in done.stdout, done.stdout
    stores = sorted((tmp_path / "local-example").glob("*/*.mask.zarr"))
    assert len(stores) == 4
    for store in stores:
        on_slurm = tmp_path / "slurm-example" / store.relative_to(tmp_path / "local-example")
        assert _labels(on_slurm) == _labels(store), store.name
    assert list((tmp_path / "slurm-example" / ".batch-jobs").glob("wsi-espnet-*.err"))

    again = batch("slurm-example.yaml")
    assert again.returncode == 0, again.stderr
    assert "0 segmented, 4 already complete, 0 failed" in again.stdout


@pytest.mark.parametrize(("job", "message"), [
    ({"queue": "no-such-partition"}, "invalid partition"),
    ({"memory": "900TB"}, "Requested node configuration is not available"),
])  # fmt: skip
def test_a_job_slurm_refuses_is_explained_before_anything_runs(partition, tmp_path, job, message):
    settings = {"queue": partition, **WORKER_JOB, **job}
    with pytest.raises(InputError) as caught, open_client(ClusterSpec("slurm", settings), job_log_directory=tmp_path):
        pass
    assert "SLURM refuses the worker job the pipeline describes" in str(caught.value)
    assert message in str(caught.value)
    assert _job_ids() == []


def test_gpu_jobs_run_one_worker_on_their_gpu(tmp_path):
    """No SLURM needed: the settings are checked before anything is submitted."""
    spec = ClusterSpec("slurm", {**WORKER_JOB, "gpus": 1, "processes": 2})
    refused = r"gpus: 1 runs one worker process on the job's GPU, but processes: 2"
    with pytest.raises(InputError, match=refused), open_client(spec, job_log_directory=tmp_path):
        pass
    assert task_resources(ClusterSpec("slurm", {**WORKER_JOB, "gpus": 1})) == {"GPU": 1}
    assert task_resources(ClusterSpec("slurm", WORKER_JOB)) is None


@pytest.mark.parametrize(("kind", "lines"), [
    ("slurm", ["#SBATCH --gres=gpu:1", "#SBATCH --mem=", "--resources GPU=1", "#SBATCH -p gpu"]),
    ("pbs", ["#PBS -l select=1:ncpus=4:ngpus=1:mem=15gb", "--resources GPU=1", "#PBS -q gpu"]),
])  # fmt: skip
def test_gpu_job_scripts_ask_the_queue_for_one_gpu_and_tag_the_worker(tmp_path, kind, lines):
    # 16GB is 16e9 bytes: PBS sizes are whole binary units, so 15gb (rounded up) is the closest it can ask for.
    spec = ClusterSpec(kind, {"queue": "gpu", "cores": 4, "memory": "16GB", "gpus": 1, "walltime": "01:00:00"})
    script = job_script(spec, job_log_directory=tmp_path)
    for line in lines:
        assert line in script, script
    assert str(tmp_path) in script  # the jobs' logs go to the batch's log folder


def test_print_cluster_spec_shows_the_job_script_and_submits_nothing(tmp_path):
    root = Path(__file__).resolve().parents[1] / "pipelines"
    env = {**os.environ, "WSI_ESPNET_BATCH_OUT": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "wsi_espnet", "batch", root / "pbs-example.yaml",
                           "--print-cluster-spec"], capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("#!/usr/bin/env bash")
    assert "#PBS -l select=1:ncpus=8:ngpus=1:mem=32gb" in done.stdout
    assert "source /apps/venvs/wsi-espnet/bin/activate" in done.stdout
    out = Path("/scratch") / os.environ.get("USER", "me") / "cohort-2026-masks"  # the example's output folder
    assert f"{out}/.batch-jobs" in done.stdout
    assert not out.exists()  # nothing ran, nothing was written (not even the jobs' log folder)


@pytest.mark.parametrize(("example", "flags", "message"), [
    ("scheduler-example.yaml", ["--workers", "2"], "but the pipeline connects to an existing scheduler"),
    ("slurm-example.yaml", ["--threads-per-worker", "2"], "each worker job has the cluster.slurm.cores"),
])  # fmt: skip
def test_sizing_flags_that_do_not_fit_the_pipelines_cluster_are_refused(shared_data, tmp_path, example, flags,
                                                                         message):  # fmt: skip
    """Before, --workers quietly swapped a SLURM or scheduler pipeline for a local cluster."""
    root = Path(__file__).resolve().parents[1] / "pipelines"
    env = {**os.environ, "WSI_ESPNET_BATCH_OUT": str(tmp_path), "DASK_SCHEDULER_FILE": str(tmp_path / "s.json")}
    done = subprocess.run([sys.executable, "-m", "wsi_espnet", "batch", root / example, *flags], capture_output=True,
                          text=True, timeout=120, env=env)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
