"""Shared fixtures: where the real test data lives, and the models built from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import Image

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``$WSI_ESPNET_TEST_DATA`` or ``../shared/data``; skipped when absent, an error when ``CI=true``."""
    root = Path(os.environ.get("WSI_ESPNET_TEST_DATA", PROJECT_ROOT.parent / "shared" / "data"))
    if not root.is_dir():
        message = f"real test data not found at {root}; set WSI_ESPNET_TEST_DATA to the shared data folder"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return root


@pytest.fixture(scope="session")
def original_weights(shared_data: Path) -> Path:
    return shared_data / "espnet-original" / "weights"


@pytest.fixture(scope="session")
def cityscapes_frame(shared_data: Path) -> NDArray[np.uint8]:
    """A real 2048x1024 Cityscapes validation frame, (1024, 2048, 3) uint8 RGB."""
    path = shared_data / "espnet-original" / "cityscapes-samples" / "frankfurt_000000_000294_leftImg8bit.png"
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="session")
def espnet_checkpoint(original_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The original Cityscapes ESPNet (alpha3=3) in our format: the model the segmentation tests use.

    It is a street-scene model, so its classes mean nothing on tissue, but it is a real trained
    ESPNet with the real receptive field, which is what tiling, stitching and resuming depend on.
    """
    from wsi_espnet.models import load_original_checkpoint, save_model

    model, config = load_original_checkpoint(original_weights / "decoder_espnet_p_2_q_3.pth")
    return save_model(model, config, tmp_path_factory.mktemp("models") / "espnet-q3.safetensors")


#: The quick settings the end-to-end tests segment CMU with: 2 um/px, 256-px tiles, a 64-px halo.
FAST = {"target_mpp": 2.0, "tile_size": 256, "halo": 64}

#: CMU in small tiles, one task at a time: 20 of its 30 tiles hold tissue, so a run can be stopped part-way
#: (killed, cancelled, out of disk) with tiles done and tiles left, and each run takes seconds.
SMALL_TILES = {"target_mpp": 2.0, "tile_size": 128, "halo": 96, "workers": 1}


def as_flags(options: dict[str, float | int]) -> list[str]:
    """``wsi-espnet segment`` flags for SegmentOptions fields: ``{"tile_size": 128}`` -> ``["--tile-size", "128"]``."""
    return [arg for key, value in options.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


@pytest.fixture(scope="session")
def small_tiles_reference(
    shared_data: Path, espnet_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> NDArray[np.uint8]:
    """CMU's level-0 labels from one uninterrupted :data:`SMALL_TILES` run (read-only).

    What every stopped and resumed run with those settings must reproduce: computed once for the tests
    that stop runs in different ways (``wsi-espnet segment`` maps its flags onto the same options).
    """
    from wsi_espnet.segment_slide import SegmentOptions, segment_slide
    from wsi_espnet.segmentation.label_store import LabelStore

    options = SegmentOptions(out_dir=tmp_path_factory.mktemp("small-tiles"), **SMALL_TILES)
    result = segment_slide(shared_data / "slides" / "CMU-1-Small-Region.svs", espnet_checkpoint, options)
    labels = np.asarray(LabelStore(result.outputs["ome-zarr"]).labels()[...])
    labels.flags.writeable = False
    return labels


@pytest.fixture(scope="session")
def segmented_cmu(shared_data: Path, espnet_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of one real ``wsi-espnet segment`` run of CMU with :data:`FAST`: mask store, OME-TIFF,
    provenance, tissue PNG. Shared by the tests that only read a real run's outputs: copy before changing.
    """
    out = tmp_path_factory.mktemp("segmented")
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    command = ["segment", slide, "--model", espnet_checkpoint, "--out", out, *as_flags(FAST), "--quiet"]
    result = subprocess.run(
        [sys.executable, "-m", "wsi_espnet", *map(str, command)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the halo cache and demo downloads out of the user's ~/.cache during tests."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))


def white_slide(path: Path, *, size: int = 2048, mpp: float = 0.5) -> Path:
    """Write an all-glass tiled pyramidal TIFF (two levels) with ``mpp`` in its resolution tags."""
    import tifffile

    image = np.full((size, size, 3), 245, dtype=np.uint8)
    resolution = (1e4 / mpp, 1e4 / mpp)
    with tifffile.TiffWriter(path) as tiff:
        tiff.write(image, tile=(256, 256), resolution=resolution, resolutionunit="CENTIMETER", subfiletype=0)
        half = image[::2, ::2]
        tiff.write(half, tile=(256, 256), resolution=(resolution[0] / 2, resolution[1] / 2),
                   resolutionunit="CENTIMETER", subfiletype=1)  # fmt: skip
    return path
