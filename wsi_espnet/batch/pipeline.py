"""Batch pipelines: a cohort, a model and its settings, an output folder and a Dask cluster, from YAML.

A pipeline file (``pipelines/*.yaml``, checked against ``pipeline.schema.json``; paths relative to
the file) says everything a cohort run needs::

    pipeline_version: 1
    name: local-example
    inputs: {cohort: ../data_manifests/cohort-example.yaml}   # or {slides: /scans/*.svs} (a folder or glob)
    model: espnet-breast-tumour                               # a packaged name or a checkpoint path
    segmentation: {target_mpp: 2.0, tile_size: 512, formats: [ome-zarr, ome-tiff, provenance]}
    outputs: {folder: ../cohort-masks, layout: per-slide}     # or flat (the default)
    cluster: {local: {workers: 2, threads_per_worker: 1}}    # or {scheduler: {address: tcp://host:8786}}
                                                              # or {kubernetes: {image: ..., volumes: [...]}}
    concurrent_slides: 2

:func:`pipeline_from_inputs` builds the same thing from command-line values.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from wsi_espnet.batch.cohort import Cohort, CohortSlide, cohort_from_pattern, load_cohort
from wsi_espnet.batch.kubernetes import check_shared_paths
from wsi_espnet.batch.report import FIXED_COLUMNS
from wsi_espnet.errors import InputError
from wsi_espnet.segment_slide import DEFAULT_FORMATS, SegmentOptions
from wsi_espnet.tissue_detection import TissueOptions
from wsi_espnet.yaml_documents import expand_env, read_checked_yaml, resolve_path

__all__ = ["PIPELINE_SCHEMA", "ClusterSpec", "Layout", "Pipeline", "load_pipeline", "pipeline_from_inputs"]

#: The JSON Schema of pipeline files.
PIPELINE_SCHEMA = Path(__file__).with_name("pipeline.schema.json")

Layout = Literal["flat", "per-slide"]
ClusterKind = Literal["local", "scheduler", "slurm", "pbs", "kubernetes"]
DEFAULT_CONCURRENT_SLIDES = 2


@dataclass(frozen=True)
class ClusterSpec:
    """Where the tasks run. ``kind`` local: a LocalCluster with worker processes (``settings``: workers,
    threads_per_worker, memory_limit, gpus); scheduler: an existing one (``settings``: address or file,
    task_resources); slurm / pbs: a dask-jobqueue cluster (``settings``: cores, memory, jobs, gpus, ...;
    see ``pipeline.schema.json``); kubernetes: a DaskCluster of the Dask operator (``settings``: see
    :mod:`~wsi_espnet.batch.kubernetes`)."""

    kind: ClusterKind = "local"
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pipeline:
    """A validated batch job; see the module docstring.

    options : the segmentation settings shared by every slide (``out_dir`` and ``mpp`` are set per slide).
    model : a packaged model's name or a checkpoint path; None for the packaged default.
    """

    name: str
    cohort: Cohort
    out_dir: Path
    options: SegmentOptions
    model: str | None = None
    layout: Layout = "flat"
    cluster: ClusterSpec = ClusterSpec()
    concurrent_slides: int = DEFAULT_CONCURRENT_SLIDES
    source: Path | None = None

    def __post_init__(self) -> None:
        if self.concurrent_slides < 1:
            raise InputError(f"[[concurrent_slides]] {self.concurrent_slides} must be >= 1.")
        self._check_output_names()  # a mistake in the pipeline, found before any work
        if self.cluster.kind == "kubernetes":
            reads = [slide.path for slide in self.cohort.slides]
            if self.model is not None and Path(self.model).is_absolute():
                reads.append(Path(self.model))
            check_shared_paths(self.cluster.settings, reads=reads, writes=self.out_dir)
        reserved = [c for c in self.cohort.metadata_columns if c in FIXED_COLUMNS or c.startswith("area_mm2:")]
        if reserved:
            raise InputError(
                f"cohort {self.cohort.source}: metadata key(s) {reserved} are report columns of their own; rename them."
            )

    def replace(self, **changes: Any) -> Pipeline:
        return dataclasses.replace(self, **changes)

    def slide_folder(self, slide: CohortSlide) -> Path:
        """The folder a slide's outputs go to (the output folder, or its own subfolder)."""
        return self.out_dir / slide.stem if self.layout == "per-slide" else self.out_dir

    def slide_options(self, slide: CohortSlide) -> SegmentOptions:
        """The settings of one slide's run: the shared ones, its folder and its MPP override."""
        return dataclasses.replace(self.options, out_dir=self.slide_folder(slide), mpp=slide.mpp)

    def _check_output_names(self) -> None:
        """Raise :class:`InputError` when two slides would write the same files."""
        owners: dict[str, CohortSlide] = {}
        for slide in self.cohort.slides:
            other = owners.setdefault(slide.stem, slide)
            if other is not slide:
                raise InputError(
                    f"{other.path} and {slide.path} would both write {slide.stem}.mask.zarr; rename one, or put them "
                    "in separate cohorts."
                )


def _segment_options(raw: dict[str, Any], *, overwrite: bool) -> SegmentOptions:
    tissue = TissueOptions(enabled=raw.get("tissue_detection", True), threshold=raw.get("tissue_threshold"))
    return SegmentOptions(
        formats=frozenset(raw.get("formats", DEFAULT_FORMATS)),
        target_mpp=raw.get("target_mpp"),
        mpp_tolerance=raw.get("mpp_tolerance", 0.1),
        tile_size=raw.get("tile_size", 1536),
        halo=raw.get("halo"),
        batch_size=raw.get("batch_size", 1),
        device=raw.get("device", "auto"),
        precision=raw.get("precision", "auto"),
        runtime=raw.get("runtime", "auto"),
        tissue=tissue,
        overwrite=overwrite,
    )


def _model(base: Path, text: str | None, where: str) -> str | None:
    """A checkpoint path relative to ``base`` when that file exists, else the text (a packaged name)."""
    if text is None:
        return None
    path = resolve_path(base, text, where=where)
    return str(path) if path.exists() else text


def load_pipeline(path: str | os.PathLike[str]) -> Pipeline:
    """Read and validate a pipeline file and its cohort (slides are not opened yet)."""
    path = Path(path).expanduser().absolute()
    raw = read_checked_yaml(path, PIPELINE_SCHEMA, kind="pipeline")
    base, where = path.parent, f"pipeline {str(path)!r}"
    inputs = raw["inputs"]
    if "cohort" in inputs:
        cohort = load_cohort(resolve_path(base, inputs["cohort"], where=f"{where} inputs.cohort"))
    else:
        text = expand_env(inputs["slides"], where=f"{where} inputs.slides")  # before the test: ${DATA}/slides
        cohort = cohort_from_pattern(text if Path(text).expanduser().is_absolute() else str(base / text))
    outputs = raw["outputs"]
    try:
        options = _segment_options(raw.get("segmentation", {}), overwrite=outputs.get("overwrite", False))
    except InputError as exc:
        raise InputError(f"{where} segmentation: {exc}") from exc
    (kind, settings), *_ = raw.get("cluster", {"local": {}}).items()
    settings = dict(settings)
    for key in ("file", "log_directory"):  # paths relative to the pipeline file (read on this machine)
        if key in settings:
            settings[key] = str(resolve_path(base, settings[key], where=f"{where} cluster.{kind}.{key}"))
    if kind == "kubernetes":
        settings["volumes"] = [
            {**volume, "mount_path": expand_env(volume["mount_path"], where=f"{where} cluster.kubernetes.volumes[{i}]")}
            for i, volume in enumerate(settings["volumes"])
        ]
    return Pipeline(
        name=raw.get("name", path.stem),
        cohort=cohort,
        out_dir=resolve_path(base, outputs["folder"], where=f"{where} outputs.folder"),
        options=options,
        model=_model(base, raw.get("model"), f"{where} model"),
        layout=outputs.get("layout", "flat"),
        cluster=ClusterSpec(kind, dict(settings)),
        concurrent_slides=raw.get("concurrent_slides", DEFAULT_CONCURRENT_SLIDES),
        source=path,
    )


def pipeline_from_inputs(
    inputs: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    model: str | None = None,
    options: SegmentOptions | None = None,
    layout: Layout = "flat",
    cluster: ClusterSpec | None = None,
    concurrent_slides: int = DEFAULT_CONCURRENT_SLIDES,
) -> Pipeline:
    """A pipeline without a file: ``inputs`` is a cohort manifest (.yaml/.yml), a folder or a glob."""
    text = str(inputs)
    is_manifest = text.lower().endswith((".yaml", ".yml"))
    cohort = load_cohort(text) if is_manifest else cohort_from_pattern(text)
    return Pipeline(
        name=cohort.name,
        cohort=cohort,
        out_dir=Path(out_dir).expanduser().absolute(),
        options=options or SegmentOptions(),
        model=model,
        layout=layout,
        cluster=cluster or ClusterSpec(),
        concurrent_slides=concurrent_slides,
    )
