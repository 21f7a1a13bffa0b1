"""What ``wsi-espnet demo`` runs on: the CC0 OpenSlide sample slide and the default model.

The slide is never part of the package. It is taken from ``$WSI_ESPNET_TEST_DATA/slides`` (default
``../shared/data/slides``) or the user cache when present, and otherwise downloaded once from the
OpenSlide test-data site into the cache, its SHA-256 checked before use.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from wsi_espnet.atomic_files import replacing
from wsi_espnet.errors import InputError
from wsi_espnet.models.checkpoint_io import file_sha256

__all__ = ["SAMPLE_SHA256", "SAMPLE_URL", "cache_dir", "demo_model", "sample_slide"]

SAMPLE_NAME = "CMU-1-Small-Region.svs"
SAMPLE_URL = "https://openslide.cs.cmu.edu/download/openslide-testdata/Aperio/CMU-1-Small-Region.svs"
SAMPLE_SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
#: The interim demo model runs coarse, so the demo finishes in seconds on a laptop CPU.
DEMO_TARGET_MPP = 2.0


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/wsi-espnet`` (default ``~/.cache/wsi-espnet``)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wsi-espnet"


def _data_dir() -> Path:
    return Path(os.environ.get("WSI_ESPNET_TEST_DATA", Path("..") / "shared" / "data"))


def sample_slide(*, url: str = SAMPLE_URL, log: Callable[[str], None] = print) -> Path:
    """Path of ``CMU-1-Small-Region.svs``: local copy if present, else downloaded (checksum verified)."""
    for candidate in (_data_dir() / "slides" / SAMPLE_NAME, cache_dir() / SAMPLE_NAME):
        if candidate.is_file() and file_sha256(candidate) == SAMPLE_SHA256:
            return candidate
    target = cache_dir() / SAMPLE_NAME
    log(f"downloading the CC0 sample slide {SAMPLE_NAME} (1.9 MB) from {url} to {target}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as response, replacing(target) as partial:
            partial.write_bytes(response.read())
            if file_sha256(partial) != SAMPLE_SHA256:
                raise InputError(f"the download from {url} does not have the expected SHA-256; not using it.")
    except (urllib.error.URLError, OSError) as exc:
        raise InputError(
            f"could not fetch the sample slide from {url} ({exc}). Set WSI_ESPNET_TEST_DATA to a folder holding "
            f"slides/{SAMPLE_NAME}, or run 'wsi-espnet segment' on a slide of your own."
        ) from exc
    return target


def demo_model(*, log: Callable[[str], None] = print) -> tuple[Path, float]:
    """The model the demo uses and the micrometres per pixel to run it at.

    No trained breast model ships yet, so the demo uses the original ESPNet authors' Cityscapes
    checkpoint from the shared data folder, converted once into the cache. It is a street-scene
    model: the demo shows the pipeline, not histology classes.
    """
    from wsi_espnet.models import load_original_checkpoint, save_model

    converted = cache_dir() / "espnet-cityscapes-demo.safetensors"
    if converted.is_file():
        return converted, DEMO_TARGET_MPP
    original = _data_dir() / "espnet-original" / "weights" / "decoder_espnet_p_2_q_3.pth"
    if not original.is_file():
        raise InputError(
            "no default breast model ships with this version yet, and the original ESPNet checkpoint used in its "
            f"place was not found at {original}; set WSI_ESPNET_TEST_DATA, or run 'wsi-espnet segment SLIDE --model "
            "MODEL.safetensors'."
        )
    log("no trained breast model ships yet: the demo uses the original ESPNet Cityscapes model (street classes)")
    model, config = load_original_checkpoint(original, name="espnet-cityscapes-demo")
    converted.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, config, converted)
    return converted, DEMO_TARGET_MPP
