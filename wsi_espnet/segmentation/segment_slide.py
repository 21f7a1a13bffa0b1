"""``segment``: one whole-slide image in, a pyramidal class mask and its provenance out.

slide -> level for the model's MPP -> tissue mask -> tile plan (halo from the receptive field) ->
Dask tasks (read windows, batched ESPNet, keep valid centres, write zarr chunks, flag tiles) ->
label pyramid -> OME-Zarr metadata, OME-TIFF, GeoJSON -> provenance -> store marked complete.

Runs on a local in-process Dask cluster by default, or on any dask.distributed scheduler. A killed
run resumes from the tiles it flagged and produces identical labels; finished outputs are never
replaced without ``overwrite``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import torch
from distributed import Client, KilledWorker, LocalCluster, as_completed
from numpy.typing import NDArray
from PIL import Image
from torch import nn
from tqdm import tqdm

from wsi_espnet import __version__
from wsi_espnet.atomic_files import replacing
from wsi_espnet.errors import InputError, WsiEspnetError
from wsi_espnet.models.checkpoint_io import file_sha256, load_model
from wsi_espnet.models.receptive_field import DEFAULT_HALO_MASS, halo_for
from wsi_espnet.outputs.geojson import write_geojson
from wsi_espnet.outputs.label_classes import LabelClass, label_classes_for
from wsi_espnet.outputs.ome_tiff import write_ome_tiff
from wsi_espnet.outputs.ome_zarr import write_ngff_label_metadata
from wsi_espnet.outputs.pyramid import build_label_pyramid
from wsi_espnet.segmentation.label_store import CLASSES_LABEL, TISSUE_LABEL, LabelStore, run_lock
from wsi_espnet.segmentation.provenance import input_sha256, software_versions
from wsi_espnet.segmentation.tile_inference import InferenceSettings, TileGroupResult, segment_tile_group, window_key
from wsi_espnet.slides import LevelChoice, SlideReader, choose_level, open_slide
from wsi_espnet.tiling import Tile, TilePlan, plan_tiles
from wsi_espnet.tissue_detection import TissueMask, TissueOptions, detect_tissue

__all__ = ["FORMATS", "SegmentOptions", "SegmentationResult", "segment_slide"]

FORMATS = ("ome-zarr", "ome-tiff", "geojson", "provenance")
DEFAULT_FORMATS = frozenset({"ome-zarr", "ome-tiff", "provenance"})
#: How long a run waits for the first worker of an external cluster.
_WORKER_WAIT_S = 120
#: The GeoJSON is traced on the first pyramid level at most this many pixels.
_GEOJSON_MAX_PIXELS = 1 << 26


@dataclass(frozen=True)
class SegmentOptions:
    """Settings of one ``segment`` run; the defaults are what the CLI uses.

    out_dir : output folder (default: next to the slide). Created if missing.
    formats : subset of :data:`FORMATS`; the OME-Zarr store is always kept (it is the working store).
    mpp : the slide's level-0 micrometres per pixel, overriding (or replacing missing) metadata.
    target_mpp : resolution to run the model at; default the model's own ``target_mpp``.
    mpp_tolerance : relative MPP difference within which a level is used without resampling.
    tile_size : output tile side in target pixels (a multiple of ``chunk``).
    chunk : zarr chunk side of the mask (default: the largest divisor of the tile size up to 512).
    halo : context pixels around each tile; None derives it from the model's receptive field.
    batch_size : tiles per model call.
    device : "auto" (CUDA when present), "cpu", "cuda", "cuda:N".
    precision : "auto" (fp16 autocast on CUDA, fp32 on CPU), "fp32", "fp16", "bf16".
    tissue : tissue detection options.
    overwrite : replace existing outputs (complete or not) instead of refusing / resuming.
    scheduler : address of an existing dask.distributed scheduler; None starts a local one.
    workers : threads of the local scheduler (default: CPU cores, at least 2).
    backend : slide reader backend ("auto", "tiffslide", "openslide", "image").
    progress : show a progress bar on stderr.
    """

    out_dir: Path | None = None
    formats: frozenset[str] = DEFAULT_FORMATS
    mpp: float | None = None
    target_mpp: float | None = None
    mpp_tolerance: float = 0.1
    tile_size: int = 1536
    chunk: int | None = None
    halo: int | None = None
    batch_size: int = 1
    device: str = "auto"
    precision: str = "auto"
    tissue: TissueOptions = field(default_factory=TissueOptions)
    overwrite: bool = False
    scheduler: str | None = None
    workers: int | None = None
    backend: str = "auto"
    progress: bool = True

    @property
    def chunk_size(self) -> int:
        """The zarr chunk side in effect (``chunk`` or its default)."""
        if self.chunk:
            return self.chunk
        return max(side for side in range(8, 513, 8) if self.tile_size % side == 0)

    def __post_init__(self) -> None:
        if self.out_dir is not None:
            object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "formats", frozenset(self.formats))
        unknown = set(self.formats) - set(FORMATS)
        if unknown:
            raise InputError(f"unknown output format(s) {sorted(unknown)}; choose from {', '.join(FORMATS)}.")
        if self.tile_size <= 0 or self.tile_size % 8:
            raise InputError(f"tile size {self.tile_size} must be a positive multiple of 8.")
        chunk = self.chunk_size
        if chunk <= 0 or chunk % 8:
            raise InputError(f"chunk {chunk} must be a positive multiple of 8.")
        if self.tile_size % chunk:
            raise InputError(f"tile size {self.tile_size} must be a multiple of the chunk size {chunk}.")
        if self.halo is not None and self.halo < 0:
            raise InputError(f"halo {self.halo} must be >= 0 pixels.")
        if self.batch_size < 1:
            raise InputError(f"batch size {self.batch_size} must be >= 1.")
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise InputError(f"precision {self.precision!r} is not one of auto, fp32, fp16, bf16.")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise InputError(f"device {self.device!r} is not one of auto, cpu, cuda, cuda:N (e.g. cuda:1).")
        if self.workers is not None and self.workers < 1:
            raise InputError(f"workers {self.workers} must be >= 1.")
        for name in ("mpp", "target_mpp"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise InputError(
                    f"{name.replace('_', '-')} {value} must be a positive number of micrometres per pixel."
                )


@dataclass(frozen=True)
class SegmentationResult:
    """What a run produced: output paths, the provenance record, and whether work was done."""

    outputs: dict[str, Path]
    provenance: dict[str, Any]
    skipped: bool = False


@dataclass(frozen=True)
class _OutputPaths:
    zarr: Path
    ome_tiff: Path
    geojson: Path
    provenance: Path
    tissue_png: Path

    @classmethod
    def for_slide(cls, slide: Path, out_dir: Path) -> _OutputPaths:
        stem = slide.name if slide.is_dir() else slide.stem
        return cls(
            zarr=out_dir / f"{stem}.mask.zarr",
            ome_tiff=out_dir / f"{stem}.mask.ome.tiff",
            geojson=out_dir / f"{stem}.mask.geojson",
            provenance=out_dir / f"{stem}.provenance.json",
            tissue_png=out_dir / f"{stem}.tissue.png",
        )

    def requested(self, formats: frozenset[str]) -> dict[str, Path]:
        paths = {"ome-zarr": self.zarr, "ome-tiff": self.ome_tiff, "geojson": self.geojson}
        chosen = {name: path for name, path in paths.items() if name in formats or name == "ome-zarr"}
        chosen["tissue-mask"] = self.tissue_png
        if "provenance" in formats:
            chosen["provenance"] = self.provenance
        return chosen


def _prepare_out_dir(slide: Path, out_dir: Path | None) -> Path:
    out_dir = (out_dir or slide.parent).absolute()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".wsi-espnet-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(
            f"cannot write to output folder {str(out_dir)!r}: {exc.strerror or exc}; pass --out with a folder you "
            "can write to."
        ) from exc
    return out_dir


def _halo(model: nn.Module, sha256: str, options: SegmentOptions) -> tuple[int, str]:
    if options.halo is not None:
        return options.halo, "given"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "wsi-espnet" / "halo.json"
    key = f"{sha256}:{DEFAULT_HALO_MASS}"
    with contextlib.suppress(OSError, ValueError):
        cached = json.loads(cache.read_text())
        if isinstance(cached.get(key), int):
            return int(cached[key]), f"effective receptive field ({DEFAULT_HALO_MASS:.0%} of gradient mass)"
    halo = halo_for(model)
    with contextlib.suppress(OSError, ValueError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        existing = json.loads(cache.read_text()) if cache.is_file() else {}
        with replacing(cache) as partial:
            partial.write_text(json.dumps({**existing, key: halo}))
    return halo, f"effective receptive field ({DEFAULT_HALO_MASS:.0%} of gradient mass)"


def _run_key(slide: Path, model_sha: str, choice: LevelChoice, plan: TilePlan, options: SegmentOptions) -> str:
    stat = slide.stat()
    fingerprint = {
        "slide": str(slide.resolve()),
        "slide_size": stat.st_size,
        "slide_mtime_ns": stat.st_mtime_ns,
        "model": model_sha,
        "choice": dataclasses.asdict(choice),
        "tile_size": plan.tile_size,
        "halo": plan.halo,
        "chunk": options.chunk_size,
        "batch_size": options.batch_size,
        "tissue": dataclasses.asdict(options.tissue),
        "mpp": options.mpp,
        "device": options.device,
        "precision": options.precision,
    }
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def _dask_client(options: SegmentOptions) -> Iterator[Client]:
    if options.scheduler:
        try:
            client = Client(options.scheduler, timeout="20s")
        except OSError as exc:
            raise InputError(
                f"cannot reach the Dask scheduler at {options.scheduler!r} ({exc}); check the address, or leave out "
                "--scheduler to run locally."
            ) from exc
        with client:
            yield client
        return
    threads = options.workers or max(2, os.cpu_count() or 1)
    # In-process: the model is loaded once and shared; one thread runs it while the others read and write.
    with LocalCluster(
        n_workers=1, threads_per_worker=threads, processes=False, dashboard_address=":0",
        silence_logs=logging.CRITICAL,  # worker errors reach the caller as exceptions; the CLI logs the rest
    ) as cluster, Client(cluster) as client:  # fmt: skip
        yield client


def _tile_groups(tissue_tiles: list[Tile], batch_size: int) -> list[list[Tile]]:
    """Fixed batches of ``batch_size`` distinct windows, with every tissue tile each window serves.

    On slides narrower than a window several tiles share one window; grouping them lets the task run
    it once. The grouping depends only on the plan, so a resumed run batches (and computes) alike.
    """
    by_window: dict[tuple[int, int, int, int], list[Tile]] = {}
    for tile in tissue_tiles:
        by_window.setdefault(window_key(tile), []).append(tile)
    windows = list(by_window.values())
    return [[t for tiles in windows[i : i + batch_size] for t in tiles] for i in range(0, len(windows), batch_size)]


def _class_areas(store: LabelStore, classes: list[LabelClass], mpp: float) -> dict[int, float]:
    """Area in mm^2 of each mask value, counted chunk by chunk on level 0."""
    labels = da.from_zarr(store.labels())  # type: ignore[no-untyped-call]
    counts = da.bincount(labels.ravel(), minlength=256).compute()
    pixel_mm2 = (mpp / 1000.0) ** 2
    return {c.value: float(counts[c.value]) * pixel_mm2 for c in classes}


def _write_tissue_outputs(store: LabelStore, tissue: TissueMask, png: Path) -> None:
    store.write_tissue_mask(tissue.mask)
    write_ngff_label_metadata(
        store.group(mode="r+"),
        label_name=TISSUE_LABEL,
        level_paths=["0"],
        mpp=tissue.mpp,
        classes=[LabelClass(0, "glass", (0, 0, 0)), LabelClass(1, "tissue", (0, 200, 0))],
    )
    with replacing(png) as partial:
        Image.fromarray(tissue.mask.astype(np.uint8) * 255).save(partial, format="PNG")


def segment_slide(
    slide: str | os.PathLike[str],
    model_path: str | os.PathLike[str],
    options: SegmentOptions | None = None,
    *,
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
) -> SegmentationResult:
    """Segment ``slide`` with the checkpoint at ``model_path``; see the module docstring.

    Raises :class:`~wsi_espnet.errors.WsiEspnetError` subclasses for every user mistake; outputs of
    a failed run are left marked incomplete (and resumable), never looking finished.
    """
    options = options or SegmentOptions()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    # Absolute paths: workers on other machines or in other folders must find the same files.
    slide_path, model_path = Path(slide).absolute(), Path(model_path).absolute()
    reader = open_slide(slide_path, backend=options.backend, mpp=options.mpp)  # type: ignore[arg-type]
    for sentence in reader.damage:
        log(f"warning: {slide_path.name}: {sentence}.")
    model, config = load_model(model_path)  # a full load: a bad checkpoint fails here, before any work starts
    model_sha = file_sha256(model_path)
    target_mpp = options.target_mpp or config.target_mpp
    if target_mpp is None:
        raise InputError(
            f"model {config.name!r} does not say which micrometres per pixel it expects; pass --target-mpp "
            "(e.g. 0.5 for a model trained on 20x tiles)."
        )
    choice = choose_level(reader, target_mpp, tolerance=options.mpp_tolerance)
    level0_mpp = choice.level_mpp / reader.level_downsamples[choice.level]  # choose_level needs an MPP
    out_dir = _prepare_out_dir(slide_path, options.out_dir)
    paths = _OutputPaths.for_slide(slide_path, out_dir)
    halo, halo_source = _halo(model, model_sha, options)
    del model  # workers load their own copy; the client needs it only for the halo
    plan = plan_tiles(choice.target_shape, tile_size=options.tile_size, halo=halo)
    run_key = _run_key(slide_path, model_sha, choice, plan, options)
    outputs = paths.requested(options.formats)

    with run_lock(paths.zarr):
        store = LabelStore(paths.zarr)
        state = store.state()
        if state is not None and not options.overwrite:
            if state.get("run_key") != run_key:
                raise InputError(
                    f"{paths.zarr} holds {'a finished' if state.get('status') == 'complete' else 'an interrupted'} run "
                    "with other inputs or settings; pass --overwrite to replace it, or --out for another folder."
                )
            if state.get("status") == "complete" and all(p.exists() for p in outputs.values()):
                log(
                    f"{paths.zarr} is already complete for these inputs and settings; nothing to do "
                    "(--overwrite redoes it)."
                )
                previous = json.loads(paths.provenance.read_text()) if paths.provenance.is_file() else dict(state)
                return SegmentationResult(outputs, previous, skipped=True)
        elif state is None and not options.overwrite:
            existing = [str(p) for p in outputs.values() if p.exists()]
            if existing:
                raise InputError(
                    f"{', '.join(existing)} already exist(s) but no matching run store does; pass --overwrite to "
                    "replace, or --out for another folder."
                )
        resumed = state is not None and not options.overwrite
        classes = label_classes_for(config)
        effective_mpp = choice.level_mpp * choice.scale
        checksum: dict[str, str] = {}
        checksum_thread = threading.Thread(
            target=lambda: checksum.update(sha256=input_sha256(slide_path)), name="slide-checksum", daemon=True
        )
        checksum_thread.start()

        t0 = time.perf_counter()
        tissue = detect_tissue(reader, mpp=level0_mpp, options=options.tissue)
        timings["tissue_detection"] = time.perf_counter() - t0
        level0_per_target = effective_mpp / level0_mpp
        tissue_tiles = [
            t
            for t in plan
            if tissue.region_fraction(*(v * level0_per_target for v in (t.top, t.left, t.height, t.width))) > 0
        ]
        was_complete = resumed and state is not None and state.get("status") == "complete"
        try:
            if not resumed:
                # Outputs of an earlier run must not sit beside a new, unfinished store looking complete.
                for stale in (paths.ome_tiff, paths.geojson, paths.provenance, paths.tissue_png):
                    stale.unlink(missing_ok=True)
                store = LabelStore.create(
                    paths.zarr, shape=plan.shape, chunk=options.chunk_size, tile_grid=plan.grid_shape, run_key=run_key,
                    attrs={"slide": str(slide_path), "model": config.name, "version": __version__},
                )  # fmt: skip
            else:
                store.mark_running()
            _write_tissue_outputs(store, tissue, paths.tissue_png)
        except OSError as exc:
            raise _disk_error(exc, out_dir) from exc
        if not tissue_tiles:
            log(f"no tissue found on {slide_path.name} (method {tissue.method}); writing an empty mask.")

        done = store.done_tiles()
        groups = [g for g in _tile_groups(tissue_tiles, options.batch_size) if not all(done[t.row, t.col] for t in g)]
        tiles_resumed = sum(1 for t in tissue_tiles if done[t.row, t.col])
        # "auto" device and precision are resolved on each worker, which may have a GPU the client lacks.
        settings = InferenceSettings(str(model_path), model_sha, options.device, options.precision, channels_last=True)
        t0 = time.perf_counter()
        model_seconds = read_seconds = 0.0
        windows_run = 0
        try:
            with _dask_client(options) as client:
                jobs = _TileJobs(reader, choice, tissue, level0_per_target, settings, paths.zarr)
                results = _run_groups(
                    client, jobs, groups, total=len(tissue_tiles), done=tiles_resumed, show=options.progress,
                    description=f"segmenting ({tissue.fraction:.0%} tissue)",
                )  # fmt: skip
                windows_run = sum(r.windows for r in results)
                model_seconds = sum(r.model_seconds for r in results)
                read_seconds = sum(r.read_seconds for r in results)
                timings["inference"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                level_paths = build_label_pyramid(store.group("labels", CLASSES_LABEL, mode="r+"), min_size=256)
                timings["pyramid"] = time.perf_counter() - t0
        except OSError as exc:
            raise _disk_error(exc, out_dir) from exc

        t0 = time.perf_counter()
        try:
            write_ngff_label_metadata(
                store.group(mode="r+"), label_name=CLASSES_LABEL, level_paths=level_paths, mpp=effective_mpp,
                classes=classes,
            )  # fmt: skip
            levels = [store.labels(int(p)) for p in level_paths]
            # A complete run asked for more formats keeps the files it already has.
            if "ome-tiff" in options.formats and not (was_complete and paths.ome_tiff.exists()):
                write_ome_tiff(levels, paths.ome_tiff, mpp=effective_mpp, classes=classes)
            if "geojson" in options.formats and not (was_complete and paths.geojson.exists()):
                index = next(
                    (i for i, lvl in enumerate(levels) if lvl.shape[0] * lvl.shape[1] <= _GEOJSON_MAX_PIXELS), -1
                )
                write_geojson(levels[index], paths.geojson, downsample=level0_per_target * 2**index, classes=classes)
            areas = _class_areas(store, classes, effective_mpp)
        except OSError as exc:
            raise _disk_error(exc, out_dir) from exc
        timings["outputs"] = time.perf_counter() - t0
        checksum_thread.join()
        timings["total"] = time.perf_counter() - started

        tissue_mm2 = sum(a for v, a in areas.items() if v != 0)
        record: dict[str, Any] = {
            "wsi_espnet_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": sys.argv,
            "input": {
                "path": str(slide_path.resolve()), "sha256": checksum.get("sha256"), "backend": reader.backend,
                "vendor": reader.vendor, "level_shapes": reader.level_shapes, "mpp": reader.mpp,
                "mpp_source": reader.mpp_source, "objective_power": reader.objective_power,
                "damage": list(reader.damage),
            },
            "model": {
                "name": config.name, "path": str(model_path.resolve()), "sha256": model_sha, "variant": config.variant,
                "num_classes": config.num_classes, "target_mpp": config.target_mpp,
            },
            "resolution": {
                "target_mpp": target_mpp, "effective_mpp": effective_mpp, "level": choice.level,
                "level_mpp": choice.level_mpp, "resampled": choice.resample, "scale": choice.scale,
                "mask_shape": list(plan.shape),
            },
            "tiling": {
                "tile_size": plan.tile_size, "halo": plan.halo, "halo_source": halo_source, "chunk": options.chunk_size,
                "batch_size": options.batch_size, "tiles_total": len(plan), "tiles_with_tissue": len(tissue_tiles),
                "tiles_resumed": tiles_resumed, "windows_run": windows_run,
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
            "execution": {
                "scheduler": options.scheduler or "local",
                "device": sorted({r.device for r in results}) or [options.device],
                "precision": sorted({r.precision for r in results}) or [options.precision],
                "model_forward_s": model_seconds, "read_s": read_seconds,
            },
            "timings_s": timings,
            "versions": software_versions(),
            "outputs": {name: str(path) for name, path in outputs.items()},
        }  # fmt: skip
        if was_complete and paths.provenance.is_file():
            # The original record describes how the mask was made; only the list of outputs grows.
            record = {
                **json.loads(paths.provenance.read_text()),
                "outputs": record["outputs"],
                "updated": record["created"],
            }
        try:
            # The store is marked complete before the provenance appears: a provenance file is only ever
            # next to a complete store (a kill in between leaves it missing, and a rerun writes it).
            store.mark_complete(completed=record["created"])
            if "provenance" in options.formats:
                with replacing(paths.provenance) as partial:
                    partial.write_text(json.dumps(record, indent=2, default=str))
        except OSError as exc:
            raise _disk_error(exc, out_dir) from exc
        return SegmentationResult(outputs, record)


@dataclass(frozen=True)
class _TileJobs:
    """Everything a tile-group task needs besides its tiles, and how to submit one."""

    reader: SlideReader
    choice: LevelChoice
    tissue: TissueMask
    level0_per_target: float
    settings: InferenceSettings
    store_path: Path

    def tissue_masks(self, group: list[Tile]) -> list[NDArray[np.bool_] | None]:
        """Each tile's tissue mask at tile resolution (None when detection is off)."""
        if self.tissue.method == "disabled":
            return [None] * len(group)
        scale = self.level0_per_target
        return [
            self.tissue.window(t.top * scale, t.left * scale, t.height * scale, t.width * scale).crop_to(
                t.top * scale, t.left * scale, t.height, t.width, scale
            )
            for t in group
        ]

    def submit(self, client: Client, group: list[Tile]) -> Any:
        return client.submit(
            segment_tile_group, self.reader, self.choice, group, self.tissue_masks(group), self.settings,
            str(self.store_path), pure=False,
        )  # fmt: skip


def _run_groups(
    client: Client, jobs: _TileJobs, groups: list[list[Tile]], *, total: int, done: int, description: str, show: bool
) -> list[TileGroupResult]:
    """Submit the tile groups with a bounded number in flight; update the progress bar as they finish."""
    results: list[TileGroupResult] = []
    pending = iter(groups)
    if groups and not client.nthreads():
        try:
            client.wait_for_workers(1, timeout=_WORKER_WAIT_S)
        except TimeoutError as exc:
            raise InputError(
                f"no Dask worker joined the scheduler within {_WORKER_WAIT_S} s; start workers (or check the "
                "cluster), then rerun the same command to resume."
            ) from exc
    in_flight = max(2, 2 * sum(client.nthreads().values()))
    futures = as_completed([jobs.submit(client, g) for g in _take(pending, in_flight)])
    with tqdm(
        total=total, initial=done, unit="tile", disable=not show, file=sys.stderr, desc=description,
        dynamic_ncols=True,
    ) as bar:  # fmt: skip
        for future in futures:
            try:
                result: TileGroupResult = future.result()
            except KilledWorker as exc:
                _drain(futures)
                raise InputError(
                    "a Dask worker died while segmenting (most often it ran out of memory); lower --tile-size or "
                    "--batch-size, or give workers more memory, then rerun the same command to resume."
                ) from exc
            except torch.OutOfMemoryError as exc:
                _drain(futures)
                raise InputError(
                    "the GPU ran out of memory; lower --batch-size or --tile-size, then rerun the command to resume."
                ) from exc
            except BaseException:
                _drain(futures)
                raise
            results.append(result)
            bar.update(len(result.tiles))
            for group in _take(pending, 1):
                futures.add(jobs.submit(client, group))
    return results


def _drain(futures: as_completed) -> None:
    """Let the tasks already submitted finish (their errors are dropped) before the failure is raised.

    Running tasks cannot be stopped mid-write; closing the cluster under them would leave zarr writes
    in flight and print their tracebacks. The tiles they finish are flagged, so a rerun has less to do.
    """
    for future in futures:  # a second Ctrl-C (KeyboardInterrupt) stops the wait
        with contextlib.suppress(Exception):
            future.result()


def _take(iterator: Iterator[list[Tile]], count: int) -> list[list[Tile]]:
    taken = []
    for _ in range(count):
        item = next(iterator, None)
        if item is None:
            break
        taken.append(item)
    return taken


def _disk_error(exc: OSError, out_dir: Path) -> WsiEspnetError:
    if exc.errno == errno.ENOSPC:
        return InputError(
            f"the disk holding {str(out_dir)!r} is full ({exc}); free space or pass --out elsewhere, then rerun the "
            "same command to resume. The output is marked incomplete."
        )
    return InputError(f"cannot write outputs in {str(out_dir)!r}: {exc}. The output is marked incomplete.")
