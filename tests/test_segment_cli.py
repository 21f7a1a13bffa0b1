"""`wsi-espnet segment / info / demo` as a user runs them: every real slide, bad inputs, kill and resume."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tiffslide
import zarr
from conftest import FAST as FAST_OPTIONS
from conftest import SMALL_TILES, as_flags

from wsi_espnet.demo import SAMPLE_SHA256, sample_slide
from wsi_espnet.errors import InputError
from wsi_espnet.segmentation.label_store import LabelStore

FAST = [*as_flags(FAST_OPTIONS), "--quiet"]  # the settings of conftest.segmented_cmu


def run_cli(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsi_espnet", *map(str, args)], capture_output=True, text=True, timeout=600,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


SLIDES = {
    "CMU-1-Small-Region.svs": [],
    "CMU-1-Small-Region-dicom": [],
    "tcga-cr-7395-01a-01-ts1.svs": ["--mpp", "0.5"],
    "test3-DAPI-2-387.ndpi": [],
}


@pytest.mark.parametrize("name", sorted(SLIDES))
def test_segment_every_real_slide(shared_data, espnet_checkpoint, tmp_path, name):
    slide = shared_data / "slides" / name
    result = run_cli("segment", slide, "--model", espnet_checkpoint, "--out", tmp_path, *SLIDES[name], *FAST)
    assert result.returncode == 0, result.stderr
    stem = slide.name if slide.is_dir() else slide.stem
    record = json.loads((tmp_path / f"{stem}.provenance.json").read_text())
    effective = record["resolution"]["effective_mpp"]
    assert effective == pytest.approx(2.0, rel=0.1)  # a level within 10% is used as is (the NDPI's 1.82)
    with tiffslide.TiffSlide(tmp_path / f"{stem}.mask.ome.tiff") as mask:
        assert float(mask.properties["tiffslide.mpp-x"]) == pytest.approx(effective)
        assert mask.dimensions == tuple(reversed(record["resolution"]["mask_shape"]))


@pytest.mark.parametrize(("name", "expected"), [
    ("CMU-1-Small-Region.svs", ["2220 x 2967", "0.499", "macro"]),
    ("CMU-1-Small-Region-dicom", ["2220 x 2967", "openslide"]),
    ("tcga-cr-7395-01a-01-ts1.svs", ["4443 x 3567", "2221 x 1783"]),
    ("test3-DAPI-2-387.ndpi", ["0.228"]),
])  # fmt: skip
def test_info_describes_each_slide(shared_data, name, expected):
    result = run_cli("info", shared_data / "slides" / name)
    assert result.returncode == 0, result.stderr
    for text in expected:
        assert text in result.stdout


def _not_a_dicom_folder(tmp_path: Path, _: Path) -> Path:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a slide")
    return folder


def _truncated_svs(tmp_path: Path, data: Path) -> Path:
    original = (data / "slides" / "CMU-1-Small-Region.svs").read_bytes()
    (tmp_path / "cut.svs").write_bytes(original[: len(original) * 6 // 10])
    return tmp_path / "cut.svs"


def _copy(name: str):
    return lambda tmp_path, data: shutil.copy(data / name, tmp_path / Path(name).name)


@pytest.mark.parametrize(("make_slide", "extra", "code", "message"), [
    (lambda tmp, data: tmp / "missing.svs", [], 2, "does not exist"),
    (_not_a_dicom_folder, [], 2, "not a DICOM"),
    (_copy("bad-inputs/malformed-wsi.dcm"), [], 2, "malformed-wsi.dcm"),
    (_truncated_svs, [], 2, "truncated or corrupted"),
    (_copy("slides/tcga-cr-7395-01a-01-ts1.svs"), [], 2, "--mpp"),
    (_copy("slides/CMU-1-Small-Region.svs"), ["--out", "/proc/wsi-espnet-out"], 2, "cannot write to output folder"),
])  # fmt: skip
def test_bad_input_gets_a_message_and_leaves_nothing_complete(
    shared_data, espnet_checkpoint, tmp_path, make_slide, extra, code, message
):
    slide = Path(make_slide(tmp_path, shared_data))
    out = ["--out", tmp_path / "out"] if not extra else []
    result = run_cli("segment", slide, "--model", espnet_checkpoint, *out, *extra, *FAST)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("*.provenance.json"))
    assert not list(tmp_path.rglob("*.ome.tiff"))


def test_a_model_that_is_not_a_checkpoint(shared_data, tmp_path):
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    bad_model = shared_data / "bad-inputs" / "strip-tiff-not-a-pyramid.tif"
    beside = slide.parent / "CMU-1-Small-Region.segment.log"
    before = beside.stat().st_mtime_ns if beside.exists() else None
    result = run_cli("segment", slide, "--model", bad_model, "--out", tmp_path, *FAST)  # not beside the slide
    assert result.returncode == 3
    assert "cannot read" in result.stderr
    assert (beside.stat().st_mtime_ns if beside.exists() else None) == before  # the shared data is left alone


def test_output_of_a_model_with_other_classes_is_not_mixed_in(shared_data, segmented_cmu, original_weights, tmp_path):
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    shutil.copytree(segmented_cmu, tmp_path, dirs_exist_ok=True)  # a finished FAST run of the 20-class model
    camvid = tmp_path / "camvid.safetensors"
    assert run_cli("convert-weights", original_weights / "decoder_espnet_p_2_q_8_camvid.pth", camvid).returncode == 0
    result = run_cli("segment", slide, "--model", camvid, "--out", tmp_path, *FAST)
    assert result.returncode == 2
    assert "with other inputs or settings; pass --overwrite" in result.stderr
    record = json.loads((tmp_path / "CMU-1-Small-Region.provenance.json").read_text())
    assert record["model"]["num_classes"] == 20
    overwritten = run_cli("segment", slide, "--model", camvid, "--out", tmp_path, "--overwrite", *FAST)
    assert overwritten.returncode == 0, overwritten.stderr
    assert json.loads((tmp_path / "CMU-1-Small-Region.provenance.json").read_text())["model"]["num_classes"] == 12


def test_a_killed_run_resumes_to_identical_labels(shared_data, espnet_checkpoint, small_tiles_reference, tmp_path):
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    # SMALL_TILES as flags: one task at a time over 20 tissue tiles, so the kill lands with tiles done and left.
    args = ["segment", slide, "--model", espnet_checkpoint, *as_flags(SMALL_TILES), "--quiet"]

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "wsi_espnet", *map(str, args), "--out", str(killed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    progress = killed / "CMU-1-Small-Region.mask.zarr" / "wsi_espnet_progress"
    deadline = time.monotonic() + 300
    done = 0
    while time.monotonic() < deadline and process.poll() is None:
        if (progress / "zarr.json").is_file():
            done = int(np.sum(zarr.open_array(progress, mode="r")[...]))
            if done >= 5:
                break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert done >= 5, "the run finished or stalled before it could be killed mid-way"
    store = LabelStore(killed / "CMU-1-Small-Region.mask.zarr")
    assert store.state()["status"] == "running"
    left = int((~store.done_tiles()).sum())
    assert left > 0
    assert not (killed / "CMU-1-Small-Region.provenance.json").exists()
    assert not (killed / "CMU-1-Small-Region.mask.ome.tiff").exists()

    resumed = run_cli(*args, "--out", killed)
    assert resumed.returncode == 0, resumed.stderr
    record = json.loads((killed / "CMU-1-Small-Region.provenance.json").read_text())
    assert record["tiling"]["tiles_resumed"] >= 5
    # ``left`` above counts glass tiles too, which are never flagged: the resumed run must have had tissue to do.
    assert record["tiling"]["tiles_resumed"] < record["tiling"]["tiles_with_tissue"]
    # The labels of an uninterrupted run with the same options (made once, shared with the other resume tests).
    assert store.labels()[...].tobytes() == small_tiles_reference.tobytes()


def test_demo_segments_the_sample_slide(tmp_path):
    result = run_cli("demo", "--out", tmp_path, "--quiet")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "CMU-1-Small-Region.mask.ome.tiff").is_file()
    assert json.loads((tmp_path / "CMU-1-Small-Region.provenance.json").read_text())["input"]["sha256"] == SAMPLE_SHA256


def test_sample_slide_download_checks_its_checksum(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WSI_ESPNET_TEST_DATA", str(tmp_path / "no-data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = shared_data / "slides" / "CMU-1-Small-Region.svs"
    messages: list[str] = []
    path = sample_slide(url=source.as_uri(), log=messages.append)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SAMPLE_SHA256
    assert any("downloading" in m for m in messages)
    path.unlink()
    wrong = tmp_path / "wrong.svs"
    wrong.write_bytes(b"not the slide")
    with pytest.raises(InputError, match="does not have the expected SHA-256"):
        sample_slide(url=wrong.as_uri(), log=messages.append)
    assert not path.exists()
