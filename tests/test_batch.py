"""Cohort batch jobs: schema errors that name the key, a real cohort with damaged slides on worker processes,
reruns that recompute nothing, and a worker SIGKILLed mid-run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from damaged_slides import make_damaged
from distributed import Client, LocalCluster

from wsi_espnet.batch import load_cohort, load_pipeline, pipeline_from_inputs, run_pipeline
from wsi_espnet.batch.pipeline import ClusterSpec
from wsi_espnet.cli import PARTIAL_FAILURE
from wsi_espnet.errors import InputError
from wsi_espnet.segment_slide import SegmentOptions, segment_slide
from wsi_espnet.segmentation import LabelStore, ProgressEvent

FAST = {"target_mpp": 4.0, "tile_size": 256, "halo": 64}
REAL = {
    "CMU-1-Small-Region.svs": None,
    "CMU-1-Small-Region-dicom": None,
    "tcga-cr-7395-01a-01-ts1.svs": 0.5,
    "test3-DAPI-2-387.ndpi": None,
}
DAMAGED = {"zeroed-tile": "could not read level 0", "absurd-declared-size": "but its tile table lists 4"}


def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsi_espnet", *map(str, args)], capture_output=True, text=True, timeout=600,
        env={**os.environ},
    )  # fmt: skip


def write_yaml(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def labels_of(zarr_path: Path) -> bytes:
    return bytes(LabelStore(zarr_path).labels()[...].tobytes())


@pytest.fixture(scope="module")
def references(shared_data, espnet_checkpoint, tmp_path_factory):
    """Each real slide segmented alone (what `wsi-espnet segment` does): stem -> level-0 label bytes."""
    out = tmp_path_factory.mktemp("alone")
    labels = {}
    for name, mpp in REAL.items():
        result = segment_slide(
            shared_data / "slides" / name, espnet_checkpoint, SegmentOptions(out_dir=out, mpp=mpp, **FAST)
        )
        labels[name if name.endswith("dicom") else Path(name).stem] = labels_of(result.outputs["ome-zarr"])
    return labels


@pytest.fixture(scope="module")
def cohort_job(shared_data, espnet_checkpoint, tmp_path_factory):
    """A pipeline over the four real slides and two damaged copies, run once with `wsi-espnet batch`."""
    root = tmp_path_factory.mktemp("cohort")
    damaged = {case: make_damaged(case, shared_data / "slides", root / "damaged") for case in DAMAGED}
    entries = [
        {"path": str(shared_data / "slides" / name), **({"mpp": mpp} if mpp else {}), "metadata": {"case": i}}
        for i, (name, mpp) in enumerate(REAL.items())
    ]
    entries += [{"path": f"damaged/{path.name}", "metadata": {"case": case}} for case, path in damaged.items()]
    write_yaml(root / "cohort.yaml", {"cohort_version": 1, "name": "test-cohort", "slides": entries})
    pipeline = write_yaml(root / "pipeline.yaml", {
        "pipeline_version": 1, "name": "test-batch", "inputs": {"cohort": "cohort.yaml"},
        "model": str(espnet_checkpoint), "segmentation": FAST, "outputs": {"folder": "out", "layout": "per-slide"},
        "cluster": {"local": {"workers": 2, "threads_per_worker": 1}}, "concurrent_slides": 2,
    })  # fmt: skip
    first = run_cli("batch", pipeline)
    return pipeline, root / "out", first, damaged


def test_a_cohort_runs_with_its_damaged_slides_reported_failed(cohort_job, references):
    _, out, result, damaged = cohort_job
    assert result.returncode == PARTIAL_FAILURE, result.stderr
    assert "Traceback" not in result.stderr
    assert "dashboard: http" in result.stderr
    assert "4 segmented, 0 already complete, 2 failed" in result.stdout

    rows = list(csv.DictReader((out / "test-batch.batch-report.csv").read_text().splitlines()))
    assert [row["name"] for row in rows] == [*references, *(p.stem for p in damaged.values())]
    by_name = {row["name"]: row for row in rows}
    for stem, expected in references.items():
        row = by_name[stem]
        assert row["status"] == "ok", row
        assert float(row["tissue_area_mm2"]) > 0
        assert sum(float(row[key]) for key in row if key.startswith("area_mm2:")) == pytest.approx(
            float(row["tissue_area_mm2"])
        )
        assert Path(row["output_provenance"]).is_file()
        assert 0 <= float(row["low_confidence_fraction"]) <= 1  # the street-scene model has no stain reference
        assert row["stain_distance"] == ""
        assert labels_of(out / stem / f"{stem}.mask.zarr") == expected, stem
    assert by_name["tcga-cr-7395-01a-01-ts1"]["mpp_override"] == "0.5"
    assert by_name["CMU-1-Small-Region-dicom"]["case"] == "1"
    for case, message in DAMAGED.items():
        row = by_name[damaged[case].stem]
        assert row["status"] == "failed"
        assert message in row["reason"]
        assert row["case"] == case
        assert Path(row["log"]).is_file()
        assert message in result.stderr  # the line printed for the slide

    document = json.loads((out / "test-batch.batch-report.json").read_text())
    assert document["counts"] == {"ok": 4, "failed": 2}
    assert document["scheduler"].startswith("tcp://")
    assert len(document["slides"]) == 6


def test_a_rerun_recomputes_nothing(cohort_job, references):
    pipeline, out, _, _ = cohort_job
    stores = {stem: out / stem / f"{stem}.mask.zarr" / "zarr.json" for stem in references}
    before = {stem: path.stat().st_mtime_ns for stem, path in stores.items()}
    again = run_cli("batch", pipeline)
    assert again.returncode == PARTIAL_FAILURE, again.stderr  # the damaged slides still fail, the same way
    assert "0 segmented, 4 already complete, 2 failed" in again.stdout
    rows = {row["name"]: row for row in csv.DictReader((out / "test-batch.batch-report.csv").read_text().splitlines())}
    assert {rows[stem]["status"] for stem in references} == {"skipped"}
    assert all("already complete" in rows[stem]["reason"] for stem in references)
    assert {stem: path.stat().st_mtime_ns for stem, path in stores.items()} == before
    assert float(rows["CMU-1-Small-Region"]["tissue_area_mm2"]) > 0  # areas come from the earlier provenance


def test_a_folder_of_good_slides_exits_0(shared_data, espnet_checkpoint, tmp_path, references):
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "CMU-1-Small-Region.svs").symlink_to(shared_data / "slides" / "CMU-1-Small-Region.svs")
    (slides / "notes.txt").write_text("not a slide")
    args = ["--target-mpp", 4, "--tile-size", 256, "--halo", 64, "--workers", 1, "--quiet"]
    result = run_cli("batch", "--input", slides, "--out", tmp_path / "out", "--model", espnet_checkpoint, *args)
    assert result.returncode == 0, result.stderr
    assert labels_of(tmp_path / "out" / "CMU-1-Small-Region.mask.zarr") == references["CMU-1-Small-Region"]


def test_a_worker_killed_mid_run_does_not_stop_the_batch(shared_data, espnet_checkpoint, tmp_path, references):
    names = ["tcga-cr-7395-01a-01-ts1.svs", "CMU-1-Small-Region.svs"]
    entries = [{"path": str(shared_data / "slides" / n), **({"mpp": REAL[n]} if REAL[n] else {})} for n in names]
    cohort = write_yaml(tmp_path / "cohort.yaml", {"cohort_version": 1, "slides": entries})
    pipeline = pipeline_from_inputs(cohort, tmp_path / "out", model=str(espnet_checkpoint),
                                    options=SegmentOptions(**FAST))  # fmt: skip
    killed: list[int] = []
    lock = threading.Lock()
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        pids: dict[str, int] = client.run(os.getpid)

        def kill_once(event: ProgressEvent) -> None:
            # Kill, once the TCGA slide has tiles done and tiles left, a worker that holds tasks right now, so
            # work in flight is really lost and the scheduler has to rerun it elsewhere.
            with lock:
                mid_run = event.stage == "tiles" and event.slide.startswith("tcga") and 1 <= event.done < event.total
                if mid_run and not killed:
                    busy = [address for address, keys in client.processing().items() if keys and address in pids]
                    victim = pids[busy[0] if busy else next(iter(pids))]
                    os.kill(victim, signal.SIGKILL)
                    killed.append(victim)

        report = run_pipeline(pipeline, client=client, on_progress=kill_once)
        assert killed, "no tile finished before the last one, so no worker was killed mid-run"
        # The batch may finish on the surviving worker before the scheduler has noticed the death; wait for
        # the nanny's replacement to join rather than race it.
        deadline = time.monotonic() + 60
        while True:
            try:
                alive = set(client.run(os.getpid).values())
            except (OSError, TimeoutError):  # a worker that is leaving between listing and answering
                alive = set()
            if len(alive) == 2 and killed[0] not in alive:
                break
            assert time.monotonic() < deadline, f"the killed worker ({killed[0]}) was not replaced: {alive}"
            time.sleep(0.5)
    assert [o.status for o in report.outcomes] == ["ok", "ok"], [o.reason for o in report.outcomes]
    for outcome in report.outcomes:
        assert labels_of(outcome.outputs["ome-zarr"]) == references[outcome.slide.stem]


def _pipeline(tmp_path: Path, **changes: object) -> Path:
    (tmp_path / "slides").mkdir(exist_ok=True)
    data = {"pipeline_version": 1, "inputs": {"slides": "slides"}, "outputs": {"folder": "out"}, **changes}
    return write_yaml(tmp_path / "pipeline.yaml", data)


@pytest.mark.parametrize(("changes", "message"), [
    ({"segmentation": {"tile_sise": 256}}, "line 7, segmentation.tile_sise: unknown key 'tile_sise'"),
    ({"segmentation": {"tile_size": 100}}, "segmentation.tile_size: 100 is not a multiple of 8"),
    ({"cluster": {"local": {}, "scheduler": {"address": "tcp://a:1"}}}, "at line 6, cluster"),
    ({"cluster": {"slurm": {"cores": 4}}}, "cluster.slurm: 'memory' is a required property"),
    ({"cluster": {"scheduler": {"address": "host:8786"}}}, "cluster.scheduler.address: 'host:8786' does not match"),
    ({"outputs": {"folder": "out", "layout": "nested"}}, "outputs.layout: 'nested' is not one of"),
    ({"inputs": {}}, "at line 2, inputs"),
])  # fmt: skip
def test_bad_pipelines_name_the_key(tmp_path, changes, message):
    with pytest.raises(InputError) as caught:
        load_pipeline(_pipeline(tmp_path, **changes))
    assert message in str(caught.value)
    assert "pipeline.schema.json" in str(caught.value)


def test_bad_cohort_manifests_name_the_key(shared_data, tmp_path):
    slide = str(shared_data / "slides" / "CMU-1-Small-Region.svs")
    cases = [
        ({"cohort_version": 1, "slides": [{"path": slide}, {"path": slide, "mpp": -1}]}, "line 5, slides[1].mpp"),
        ({"cohort_version": 1, "slides": [{"path": slide, "metadata": {"a": [1]}}]}, "slides[0].metadata.a"),
        ({"cohort_version": 1, "slides": [{"path": "nowhere/*.svs"}]}, "slides[0].path: 'nowhere/*.svs' matches no"),
        ({"cohort_version": 1, "slides": [{"path": slide}, {"path": slide}]}, "is already listed at slides[0]"),
        ({"cohort_version": 1, "slides": [{"path": slide, "metadata": {"status": "x"}}]}, "are report columns"),
    ]
    for data, message in cases:
        path = write_yaml(tmp_path / "cohort.yaml", data)
        with pytest.raises(InputError) as caught:
            pipeline_from_inputs(load_cohort(path).source, tmp_path / "out")
        assert message in str(caught.value), data


def test_the_cli_refuses_a_bad_pipeline_with_exit_2(tmp_path):
    result = run_cli("batch", _pipeline(tmp_path, segmentation={"tile_sise": 256}))
    assert result.returncode == 2
    assert "segmentation.tile_sise: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_job_queue_settings_are_read_with_paths_relative_to_the_pipeline(tmp_path, espnet_checkpoint):
    cluster = {"slurm": {"cores": 4, "memory": "16 GiB", "walltime": "01:00:00", "log_directory": "logs"}}
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "a.svs").write_bytes(b"")
    pipeline = load_pipeline(_pipeline(tmp_path, cluster=cluster, model=str(espnet_checkpoint)))
    assert pipeline.cluster == ClusterSpec("slurm", {**cluster["slurm"], "log_directory": str(tmp_path / "logs")})


def test_the_shipped_examples_are_valid(shared_data):
    root = Path(__file__).resolve().parents[1]
    pipeline = load_pipeline(root / "pipelines" / "local-example.yaml")
    names = [slide.path.name for slide in pipeline.cohort.slides]
    assert names == list(REAL)
    assert pipeline.cohort.slides[2].mpp == 0.5
    assert pipeline.cluster == ClusterSpec("local", {"workers": 2, "threads_per_worker": 1})


def test_a_report_that_cannot_be_written_is_explained_and_the_masks_are_kept(shared_data, espnet_checkpoint, tmp_path,
                                                                              references):  # fmt: skip
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    blocked = tmp_path / "out" / f"{slide.stem}.batch-report.csv"  # a folder where the report file goes
    (blocked / "keep").mkdir(parents=True)
    args = ["--target-mpp", 4, "--tile-size", 256, "--halo", 64, "--workers", 1, "--model", espnet_checkpoint]
    result = run_cli("batch", "--input", slide, "--out", tmp_path / "out", *args)
    assert result.returncode == 2, result.stderr
    assert "cannot write the batch report in" in result.stderr
    assert "The slides themselves ended as printed (1 ok)" in result.stderr
    assert "Traceback" not in result.stderr
    assert labels_of(tmp_path / "out" / "CMU-1-Small-Region.mask.zarr") == references["CMU-1-Small-Region"]
