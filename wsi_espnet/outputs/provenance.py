"""The provenance record written next to every mask: what went in, how it was made, what came out."""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from wsi_espnet import __version__
from wsi_espnet.segmentation.label_values import LabelClass
from wsi_espnet.segmentation.planning import SlidePlan
from wsi_espnet.segmentation.running import RunStats

__all__ = ["ModelIdentity", "TilingSettings", "input_sha256", "provenance_record", "software_versions"]


@dataclass(frozen=True)
class ModelIdentity:
    """Which model made a mask: its name, the file it came from (None when given in memory), its weights hash."""

    name: str
    path: str | None
    sha256: str
    variant: str
    num_classes: int
    target_mpp: float | None


@dataclass(frozen=True)
class TilingSettings:
    """The run settings that shape the mask besides the plan: the halo's source, chunk and batch sizes."""

    halo_source: str
    chunk: int
    batch_size: int


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


def provenance_record(
    *,
    plan: SlidePlan,
    input_checksum: str | None,
    model: ModelIdentity,
    target_mpp: float,
    tiling: TilingSettings,
    stats: RunStats,
    classes: list[LabelClass],
    areas: dict[int, float],
    execution: dict[str, Any],
    timings: dict[str, float],
    outputs: dict[str, Path],
    command: list[str] | None = None,
    reliability: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON record written next to a mask: input, model, resolution, tiling, tissue, classes, reliability
    (confidence and stain figures, see :mod:`wsi_espnet.segmentation.reliability`), timings."""
    reader, choice, tissue = plan.reader, plan.choice, plan.tissue
    tissue_mm2 = sum(a for v, a in areas.items() if v != 0)
    return {
        "wsi_espnet_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command if command is not None else sys.argv,
        "input": {
            "path": str(reader.path.resolve()), "sha256": input_checksum, "backend": reader.backend,
            "vendor": reader.vendor, "level_shapes": reader.level_shapes, "mpp": reader.mpp,
            "mpp_source": reader.mpp_source, "objective_power": reader.objective_power,
            "damage": list(reader.damage),
        },
        "model": {
            "name": model.name, "path": model.path, "sha256": model.sha256, "variant": model.variant,
            "num_classes": model.num_classes, "target_mpp": model.target_mpp,
        },
        "resolution": {
            "target_mpp": target_mpp, "effective_mpp": choice.output_mpp, "level": choice.level,
            "level_mpp": choice.level_mpp, "resampled": choice.resample, "scale": choice.scale,
            "mask_shape": list(plan.tiles.shape),
        },
        "tiling": {
            "tile_size": plan.tiles.tile_size, "halo": plan.tiles.halo, "halo_source": tiling.halo_source,
            "chunk": tiling.chunk, "batch_size": tiling.batch_size, "tiles_total": len(plan.tiles),
            "tiles_with_tissue": len(plan.tissue_tiles), "tiles_resumed": stats.tiles_resumed,
            "windows_run": stats.windows_run,
        },
        "tissue": {
            "method": tissue.method, "threshold": None if np.isnan(tissue.threshold) else tissue.threshold,
            "mask_mpp": tissue.mpp, "detected_area_mm2": tissue.area_mm2(), "segmented_area_mm2": tissue_mm2,
            "fraction": tissue.fraction,
        },
        "classes": [
            {"value": c.value, "name": c.name, "color": list(c.color), "area_mm2": areas[c.value],
             "fraction_of_tissue": areas[c.value] / tissue_mm2 if tissue_mm2 and c.value else None}
            for c in classes
        ],
        "reliability": reliability,
        "execution": {**execution, "model_forward_s": stats.model_seconds, "read_s": stats.read_seconds},
        "timings_s": timings,
        "versions": software_versions(),
        "outputs": {name: str(path) for name, path in outputs.items()},
    }  # fmt: skip
