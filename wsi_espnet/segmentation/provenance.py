"""The provenance record written next to every mask: what went in, how it was made, what came out."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import sys
from pathlib import Path
from typing import Any

__all__ = ["input_sha256", "software_versions"]

_PACKAGES = (
    "wsi-espnet", "torch", "numpy", "zarr", "dask", "distributed", "tiffslide", "tifffile", "openslide-python",
    "openslide-bin", "scikit-image", "safetensors",
)  # fmt: skip


def input_sha256(path: Path) -> str:
    """SHA-256 of a slide's bytes; for a folder (DICOM WSI), of its files' bytes in name order."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def software_versions() -> dict[str, Any]:
    """Versions of Python, the platform and the packages that shape the result."""
    versions: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions
