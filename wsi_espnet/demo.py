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
#: Used only if the default model states no micrometres per pixel (the packaged one does: 1.0).
DEMO_TARGET_MPP = 1.0


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
    """The model the demo uses (the packaged default breast model) and the MPP to run it at."""
    from wsi_espnet.models.checkpoint_io import read_model_config
    from wsi_espnet.models.registry import default_model_path

    path = default_model_path()
    config = read_model_config(path)
    mpp = config.target_mpp or DEMO_TARGET_MPP
    log(f"model {config.name}: {', '.join(config.class_names)} at {mpp:g} um/px")
    return path, float(mpp)
