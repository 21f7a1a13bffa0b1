"""Cohorts: the slides of a batch job, from a cohort manifest (YAML) or a folder / glob.

A cohort manifest (checked against ``cohort.schema.json``) lists slides by path or glob, relative to
the manifest, each with an optional micrometres-per-pixel override and free metadata that the batch
report carries as columns::

    cohort_version: 1
    name: example
    slides:
      - path: ${WSI_ESPNET_TEST_DATA:-../../shared/data}/slides/CMU-1-Small-Region.svs
        metadata: {patient: P01, site: skin}
      - path: ${WSI_ESPNET_TEST_DATA:-../../shared/data}/slides/tcga-cr-7395-01a-01-ts1.svs
        mpp: 0.5                  # the file has no MPP metadata
      - path: scans/*.ndpi        # a glob: every match, sorted, with this entry's mpp and metadata

A path that does not exist is kept (the slide is reported failed, the others run); a glob that
matches nothing, or a slide listed twice, is an error in the manifest.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_espnet.errors import InputError
from wsi_espnet.slides import can_open
from wsi_espnet.yaml_documents import expand_env, read_checked_yaml, resolve_path

__all__ = ["COHORT_SCHEMA", "Cohort", "CohortSlide", "cohort_from_pattern", "load_cohort"]

#: The JSON Schema of cohort manifests.
COHORT_SCHEMA = Path(__file__).with_name("cohort.schema.json")
_GLOB_CHARACTERS = frozenset("*?[")


@dataclass(frozen=True)
class CohortSlide:
    """One slide of a cohort: its absolute path, MPP override (None: from the file) and metadata."""

    path: Path
    mpp: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def stem(self) -> str:
        """The name its outputs are given (``<stem>.mask.zarr``): a folder's name, or the file's without suffix."""
        return self.path.name if self.path.is_dir() else self.path.stem


@dataclass(frozen=True)
class Cohort:
    """The slides of a batch job, in order; ``source`` is the manifest, folder or glob they came from."""

    name: str
    source: str
    slides: tuple[CohortSlide, ...]

    @property
    def metadata_columns(self) -> tuple[str, ...]:
        """Every metadata key, in order of first appearance."""
        columns: dict[str, None] = {}
        for slide in self.slides:
            columns.update(dict.fromkeys(slide.metadata))
        return tuple(columns)


def load_cohort(path: str | os.PathLike[str]) -> Cohort:
    """Read and validate a cohort manifest; globs are expanded now (slides are not opened)."""
    path = Path(path).expanduser().absolute()
    raw = read_checked_yaml(path, COHORT_SCHEMA, kind="cohort manifest")
    slides: list[CohortSlide] = []
    seen: dict[Path, str] = {}
    for i, entry in enumerate(raw["slides"]):
        where = f"cohort manifest {str(path)!r} slides[{i}].path"
        text = entry["path"]
        if _GLOB_CHARACTERS & set(text):
            pattern = resolve_path(path.parent, text, where=where)
            matches = [Path(p) for p in sorted(glob.glob(str(pattern))) if can_open(p)]
            if not matches:
                raise InputError(f"{where}: {text!r} matches no slide ({pattern}); fix the pattern or drop the entry.")
        else:
            matches = [resolve_path(path.parent, text, where=where)]
        for match in matches:
            if match in seen:
                raise InputError(f"{where}: {str(match)!r} is already listed at {seen[match]}; list each slide once.")
            seen[match] = f"slides[{i}]"
            slides.append(CohortSlide(match, entry.get("mpp"), dict(entry.get("metadata", {}))))
    return Cohort(raw.get("name", path.stem), str(path), tuple(slides))


def cohort_from_pattern(pattern: str | os.PathLike[str]) -> Cohort:
    """Every slide in a folder (files and DICOM WSI folders that :func:`~wsi_espnet.slides.can_open`
    accepts, sorted), or every slide a glob matches."""
    text = expand_env(str(pattern), where="the input")
    folder = Path(text).expanduser()
    if folder.is_dir() and not can_open(folder):
        candidates = sorted(folder.iterdir())
        name = folder.absolute().name
    elif _GLOB_CHARACTERS & set(text):
        candidates = [Path(p) for p in sorted(glob.glob(str(Path(text).expanduser())))]
        name = "cohort"
    else:
        candidates = [folder]
        name = folder.stem
    slides = tuple(CohortSlide(p.absolute()) for p in candidates if can_open(p))
    if not slides:
        raise InputError(
            f"no slide found in {text!r}; give a folder of slides, a glob such as 'scans/*.svs', or a cohort manifest "
            "(.yaml)."
        )
    return Cohort(name, text, slides)
