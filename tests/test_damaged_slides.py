"""Damaged slides never hang, never print a traceback, and never leave an output that looks complete.

Every case of :data:`damaged_slides.DAMAGED_SLIDES` is made from the real slides and run through
``wsi-espnet info`` and ``wsi-espnet segment`` as a user would, each in a subprocess with a time
limit. The table says what each case must end with: exit 2 with a sentence that names the problem,
or exit 0 where the pixels the mask is made from are intact (a warning says what is missing) or
where the decoder accepts the damaged bytes, as it does for every other image viewer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from damaged_slides import DAMAGED_SLIDES, make_damaged

from wsi_espnet.segmentation.label_store import LabelStore
from wsi_espnet.slides import SlideError, open_slide

FAST = ["--tile-size", "256", "--halo", "64", "--quiet"]
#: um/px each case is segmented at (default 2). At 2 um/px the CMU copies are still read from their only
#: level (resampled) and so meet their damage, the truncated NDPI from its last intact level (2, resampled),
#: and the NDPI with a zeroed tile in level 3 reads that level as is (1.83 um/px), for tissue detection
#: and tiles alike. The pyramid's damage is in its 1 um/px level, which only a 1 um/px run reads.
TARGET_MPP = {"pyramid-zeroed-tile-in-level-1": 1.0}
#: Seconds a case may take: a hang (the absurd-size file once ran until it was killed) fails the test.
TIME_LIMIT_S = 180

#: case -> (exit code of segment, text its stderr must hold)
EXPECTED: dict[str, tuple[int, str]] = {
    "truncated-10%": (2, "is 193,895 bytes long but its first image directory is at byte 1,275,950"),
    "truncated-50%": (2, "but its first image directory is at byte"),
    "truncated-90%": (0, "warning: cut-90-CMU-1-Small-Region.svs: the file is truncated"),
    "truncated-99%": (0, "warning: cut-99-CMU-1-Small-Region.svs: the file is truncated"),
    "ndpi-truncated-90%": (0, "the file is truncated"),
    "flipped-bytes-in-a-tile": (0, ""),  # the JPEG decoder accepts the bytes (garbled pixels, as in any viewer)
    "zeroed-tile": (2, "could not read level 0"),
    "ndpi-zeroed-tile-in-level-3": (0, ""),  # NDPI restart intervals: the decoder resynchronises
    "pyramid-zeroed-tile-in-level-1": (2, "could not read level 1, rows 448:832"),
    "absurd-declared-size": (2, "which takes 15,264,649 tiles, but its tile table lists 4"),
    "wrong-tile-offsets": (2, "Not a JPEG file"),
    "png-renamed-svs": (2, "is a PNG image named '.svs'"),
    "zero-bytes": (2, "is empty (0 bytes)"),
    "random-bytes": (2, "is not a readable whole-slide image"),
}

NOISE = ("Traceback", "Task was destroyed", "Compute Failed", "invalid page offset", "shape does not match")


def test_every_corpus_case_has_an_expectation():
    assert set(EXPECTED) == set(DAMAGED_SLIDES)


def _run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsi_espnet", *map(str, args)], capture_output=True, text=True,
        timeout=TIME_LIMIT_S, env={**os.environ, "PYTHONWARNINGS": "default"},
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_damaged_slide(shared_data, espnet_checkpoint, tmp_path, case):
    slide = make_damaged(case, shared_data / "slides", tmp_path / "slides")
    code, message = EXPECTED[case]

    info = _run("info", slide)
    assert info.returncode in (0, 2), info.stderr
    assert not any(noise in info.stderr for noise in NOISE), info.stderr

    out = tmp_path / "out"
    target = ["--target-mpp", TARGET_MPP.get(case, 2.0)]
    result = _run("segment", slide, "--model", espnet_checkpoint, "--out", out, *target, *FAST)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert not any(noise in result.stderr for noise in NOISE), result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("wsi-espnet: error:")]
    stem = slide.stem
    if code == 0:
        assert not error_lines
        record = json.loads((out / f"{stem}.provenance.json").read_text())
        assert LabelStore(out / f"{stem}.mask.zarr").state()["status"] == "complete"
        assert bool(record["input"]["damage"]) == ("truncated" in case)
        return
    assert len(error_lines) == 1, result.stderr
    assert not list(out.glob("*.provenance.json"))
    assert not list(out.glob("*.ome.tiff"))
    store = LabelStore(out / f"{stem}.mask.zarr")
    if store.state() is not None:  # the run got as far as tiles: incomplete, and the log says why
        assert store.state()["status"] == "running"
        log = out / f"{stem}.segment.log"
        assert f"the full log, with the traceback for a bug report, is in {log}" in result.stderr
        assert "Traceback" in log.read_text()


def test_a_truncated_tail_spares_the_pyramid(shared_data, tmp_path):
    slide = make_damaged("truncated-90%", shared_data / "slides", tmp_path)
    with open_slide(slide) as reader, open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs") as intact:
        assert reader.associated_images == ("thumbnail",)
        assert intact.associated_images == ("thumbnail", "label", "macro")
        assert len(reader.damage) == 1
        assert "1,745,059 bytes long" in reader.damage[0]
        window = reader.read_region(0, 2000, 1500, 600, 500)
        assert np.array_equal(window, intact.read_region(0, 2000, 1500, 600, 500))
        assert intact.damage == ()


def _sparse_pyramid(path: Path, omitted: list[int]) -> Path:
    """A tiled TIFF at 0.5 um/px whose tiles ``omitted`` are left out, as scanners do with empty glass."""
    rng = np.random.default_rng(4)
    image = rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    tifffile.imwrite(path, image, tile=(256, 256), resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with tifffile.TiffFile(path, mode="r+b") as tiff:
        page = tiff.pages.first
        offsets, counts = list(page.dataoffsets), list(page.databytecounts)
        for index in omitted:
            offsets[index] = counts[index] = 0
        page.tags["TileOffsets"].overwrite(offsets)
        page.tags["TileByteCounts"].overwrite(counts)
    return path


def test_a_sparse_slide_with_omitted_tiles_still_opens(tmp_path):
    slide = _sparse_pyramid(tmp_path / "sparse.tif", omitted=[0, 5, 15])
    with open_slide(slide) as reader:
        assert reader.level_shapes == ((1024, 1024),)
        assert reader.damage == ()
        present = reader.read_region(0, 0, 256, 256, 256)  # tile 1
        assert present.std() > 50


def test_a_slide_with_every_tile_omitted_is_refused(tmp_path):
    slide = _sparse_pyramid(tmp_path / "empty-tiles.tif", omitted=list(range(16)))
    with pytest.raises(SlideError, match="none of its tiles hold data"):
        open_slide(slide)
