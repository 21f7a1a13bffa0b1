"""Shared fixtures: where the real test data lives, and the models built from it."""

from __future__ import annotations

import os
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
