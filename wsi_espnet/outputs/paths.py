"""Where a slide's outputs go: one naming scheme for ``segment``, batch jobs and the napari plugin."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from wsi_espnet.errors import InputError

__all__ = ["FORMATS", "OutputPaths", "prepare_out_dir"]

#: The output formats a run can be asked for; the OME-Zarr store is always kept (it is the working store).
FORMATS = ("ome-zarr", "ome-tiff", "geojson", "provenance")


@dataclass(frozen=True)
class OutputPaths:
    """The files of one slide's outputs in one folder (``<stem>`` is the slide's name without suffix)."""

    zarr: Path
    ome_tiff: Path
    geojson: Path
    provenance: Path
    tissue_png: Path
    log: Path

    @classmethod
    def for_slide(cls, slide: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> OutputPaths:
        slide = Path(slide)
        return cls._named(slide.name if slide.is_dir() else slide.stem, Path(out_dir))

    @classmethod
    def for_mask(cls, mask: str | os.PathLike[str]) -> OutputPaths:
        """The outputs of the run that wrote ``mask`` (its ``<stem>.mask.zarr`` or ``<stem>.mask.ome.tiff``)."""
        mask = Path(mask)
        for suffix in (".mask.zarr", ".mask.ome.tiff"):
            if mask.name.endswith(suffix) and len(mask.name) > len(suffix):
                return cls._named(mask.name.removesuffix(suffix), mask.parent)
        raise InputError(f"{mask} is not named <slide>.mask.zarr or <slide>.mask.ome.tiff as our masks are.")

    @classmethod
    def _named(cls, stem: str, out_dir: Path) -> OutputPaths:
        return cls(
            zarr=out_dir / f"{stem}.mask.zarr",
            ome_tiff=out_dir / f"{stem}.mask.ome.tiff",
            geojson=out_dir / f"{stem}.mask.geojson",
            provenance=out_dir / f"{stem}.provenance.json",
            tissue_png=out_dir / f"{stem}.tissue.png",
            log=out_dir / f"{stem}.segment.log",
        )

    def requested(self, formats: frozenset[str]) -> dict[str, Path]:
        """Output name -> path for the files a run with ``formats`` leaves (the store and tissue PNG always)."""
        paths = {"ome-zarr": self.zarr, "ome-tiff": self.ome_tiff, "geojson": self.geojson}
        chosen = {name: path for name, path in paths.items() if name in formats or name == "ome-zarr"}
        chosen["tissue-mask"] = self.tissue_png
        if "provenance" in formats:
            chosen["provenance"] = self.provenance
        return chosen

    def derived(self) -> tuple[Path, ...]:
        """The files made from the store, which must not outlive it."""
        return self.ome_tiff, self.geojson, self.provenance, self.tissue_png


def prepare_out_dir(slide: Path, out_dir: Path | None) -> Path:
    """The absolute output folder (default: the slide's), created and checked writable."""
    out_dir = (out_dir or slide.parent).absolute()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # A unique probe name: slides of one batch run in threads of one process (and on hosts sharing the
        # folder), and a shared name let one run delete another's probe mid-check.
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".wsi-espnet-write-test-"):
            pass
    except OSError as exc:
        raise InputError(
            f"cannot write to output folder {str(out_dir)!r}: {exc.strerror or exc}; give an output folder you "
            "can write to."
        ) from exc
    return out_dir
