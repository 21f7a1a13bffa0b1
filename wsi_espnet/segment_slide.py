"""``segment_slide``: one whole-slide image in, a pyramidal class mask and its provenance out.

The facade over the engine: :func:`~wsi_espnet.segmentation.plan_slide` (level, tissue, tiles) ->
:func:`~wsi_espnet.segmentation.run_tiles` (Dask tasks into the label store, resumable) -> finalise
(:mod:`wsi_espnet.outputs`: pyramid, NGFF metadata, OME-TIFF, GeoJSON, provenance) -> store marked
complete. It owns the resume rules: a killed or cancelled run resumes from the tiles it flagged and
produces identical labels; a finished output is never replaced without ``overwrite``, and another
run's output is never resumed into. It runs on the caller's Dask ``client`` (never closed here), or
on one it starts and closes itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed import Client
from torch import nn

from wsi_espnet import __version__
from wsi_espnet.atomic_files import replacing
from wsi_espnet.devices import check_device_spec, check_precision
from wsi_espnet.errors import InputError, WsiEspnetError
from wsi_espnet.heap import keep_heap_flat
from wsi_espnet.inference.runtimes import check_runtime
from wsi_espnet.models.checkpoint_io import file_sha256, load_model, model_bytes
from wsi_espnet.models.config import ModelConfig
from wsi_espnet.models.receptive_field import HALO_SOURCE, cached_halo_for
from wsi_espnet.models.registry import resolve_model_path
from wsi_espnet.outputs.finalise import build_pyramid, write_derived_outputs, write_tissue_outputs
from wsi_espnet.outputs.paths import FORMATS, OutputPaths, prepare_out_dir
from wsi_espnet.outputs.provenance import ModelIdentity, TilingSettings, input_sha256, provenance_record
from wsi_espnet.segmentation import (
    InferenceSettings,
    LabelStore,
    ProgressCallback,
    ProgressEvent,
    SlidePlan,
    check_cancelled,
    label_classes_for,
    local_client,
    plan_slide,
    run_lock,
    run_tiles,
)
from wsi_espnet.segmentation.reliability import reliability, slide_stain_transform
from wsi_espnet.slides import open_slide
from wsi_espnet.tissue_detection import TissueOptions

__all__ = ["FORMATS", "ModelSpec", "SegmentOptions", "SegmentationResult", "segment_slide"]

DEFAULT_FORMATS = frozenset({"ome-zarr", "ome-tiff", "provenance"})

#: A model as ``segment_slide`` takes it: a checkpoint path, a packaged model's name, or a loaded model.
ModelSpec = str | os.PathLike[str] | tuple[nn.Module, ModelConfig] | None

_logger = logging.getLogger(__name__)


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
    runtime : "auto" (on a CPU, the fastest of PyTorch, OpenVINO and ONNX Runtime agreeing with PyTorch fp32 on
        the first window; see :mod:`wsi_espnet.inference.runtimes`), "torch", "openvino", "onnx".
    tissue : tissue detection options.
    overwrite : replace existing outputs (complete or not) instead of refusing / resuming.
    scheduler : address of an existing dask.distributed scheduler; None starts a local one.
    workers : threads of the local scheduler (default: CPU cores, at least 2).
    backend : slide reader backend ("auto", "tiffslide", "openslide", "image").
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
    runtime: str = "auto"
    tissue: TissueOptions = field(default_factory=TissueOptions)
    overwrite: bool = False
    scheduler: str | None = None
    workers: int | None = None
    backend: str = "auto"

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
        check_precision(self.precision)
        check_device_spec(self.device)
        check_runtime(self.runtime)
        if self.workers is not None and self.workers < 1:
            raise InputError(f"workers {self.workers} must be >= 1.")
        for name in ("mpp", "target_mpp"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise InputError(f"[[{name}]] {value} must be a positive number of micrometres per pixel.")


@dataclass(frozen=True)
class SegmentationResult:
    """What a run produced: output paths, the provenance record, and whether work was done (``skipped``)."""

    outputs: dict[str, Path]
    provenance: dict[str, Any]
    skipped: bool = False


@dataclass(frozen=True)
class _Model:
    """The model of a run: loaded (a bad checkpoint fails before any work starts), identified, shippable."""

    module: nn.Module
    config: ModelConfig
    identity: ModelIdentity
    weights: bytes | None  # the bytes workers load when there is no file to load

    @classmethod
    def resolve(cls, model: ModelSpec) -> _Model:
        if isinstance(model, tuple):
            module, config = model
            weights = model_bytes(module, config)
            sha, path, weights_to_ship = hashlib.sha256(weights).hexdigest(), None, weights
        else:
            # Absolute paths: workers on other machines or in other folders must find the same file.
            file = resolve_model_path(None if model is None else str(model)).absolute()
            module, config = load_model(file)
            sha, path, weights_to_ship = file_sha256(file), str(file.resolve()), None
        identity = ModelIdentity(config.name, path, sha, config.variant, config.num_classes, config.target_mpp)
        return cls(module, config, identity, weights_to_ship)


def segment_slide(
    slide: str | os.PathLike[str],
    model: ModelSpec = None,
    options: SegmentOptions | None = None,
    *,
    client: Client | None = None,
    on_progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    logger: logging.Logger | None = None,
    resources: Mapping[str, float] | None = None,
    worker_wait_s: float | None = None,
) -> SegmentationResult:
    """Segment ``slide`` with ``model`` (a checkpoint path, a packaged model's name, a loaded
    ``(model, config)``, or None for the packaged default); see the module docstring.

    ``client`` is a Dask client to run on (left open); without one, ``options.scheduler`` is connected
    to, or an in-process cluster started, and closed at the end. ``on_progress`` receives
    :class:`~wsi_espnet.segmentation.ProgressEvent` s; setting ``cancel`` stops the run after the tiles
    in flight (the store stays resumable) and raises :class:`~wsi_espnet.errors.Cancelled`.
    ``resources`` are Dask worker resources each tile task needs, e.g. ``{"GPU": 1}`` on a cluster
    whose GPU workers were started with ``--resources GPU=1`` (one task per GPU at a time).
    ``worker_wait_s`` is how long to wait for such a worker when the cluster has none (default
    :data:`~wsi_espnet.segmentation.running.WORKER_WAIT_S`).

    Raises :class:`~wsi_espnet.errors.WsiEspnetError` subclasses for every user mistake; outputs of
    a failed run are left marked incomplete (and resumable), never looking finished.
    """
    options = options or SegmentOptions()
    log = logger or _logger
    keep_heap_flat()  # planning, the pyramid and the writers allocate large buffers here too
    started = time.perf_counter()
    timings: dict[str, float] = {}
    slide_path = Path(slide).absolute()
    name = slide_path.name

    def report(stage: Any, done: int, total: int = 1) -> None:
        if on_progress is not None:
            on_progress(ProgressEvent(name, stage, done, total))

    check_cancelled(cancel, name)
    report("planning", 0)
    reader = open_slide(slide_path, backend=options.backend, mpp=options.mpp)  # type: ignore[arg-type]
    for sentence in reader.damage:
        log.warning("%s: %s.", name, sentence)
    resolved = _Model.resolve(model)
    config, target_mpp = resolved.config, options.target_mpp or resolved.config.target_mpp
    if options.halo is not None:
        halo, halo_source = options.halo, "given"
    else:
        halo, halo_source = cached_halo_for(resolved.module, resolved.identity.sha256), HALO_SOURCE
    out_dir = prepare_out_dir(slide_path, options.out_dir)
    paths = OutputPaths.for_slide(slide_path, out_dir)
    outputs = paths.requested(options.formats)

    with run_lock(paths.zarr):
        planned = functools.partial(
            plan_slide, reader, config, halo=halo, target_mpp=target_mpp, tolerance=options.mpp_tolerance,
            tile_size=options.tile_size,
        )  # fmt: skip
        # The run key needs only the level and tile grid: a finished run is recognised before tissue detection.
        run_key = _run_key(slide_path, resolved.identity.sha256, planned(tissue=TissueOptions(enabled=False)), options)
        store = LabelStore(paths.zarr)
        state = _existing_run(store, run_key, paths, outputs, options)
        if state is not None and state.get("status") == "complete" and all(p.exists() for p in outputs.values()):
            log.info("%s is already complete for these inputs and settings; nothing to do.", paths.zarr)
            previous = json.loads(paths.provenance.read_text()) if paths.provenance.is_file() else dict(state)
            return SegmentationResult(outputs, previous, skipped=True)
        resumed = state is not None
        was_complete = state is not None and state.get("status") == "complete"
        previous_record = (
            json.loads(paths.provenance.read_text()) if was_complete and paths.provenance.is_file() else None
        )
        checksum: dict[str, str] = {}
        checksum_thread = threading.Thread(
            target=_checksum_into, args=(slide_path, checksum, log), name="slide-checksum", daemon=True
        )
        checksum_thread.start()
        t0 = time.perf_counter()
        plan = planned(tissue=options.tissue)
        timings["tissue_detection"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        stain_normalisation = slide_stain_transform(plan, config)
        if config.stain_reference is not None and config.stain_reference.normalise and stain_normalisation is None:
            log.warning(
                "%s: too little stained tissue to estimate the slide's stain; it is not normalised, although "
                "model %s was trained on stain-normalised images.", name, config.name,
            )  # fmt: skip
        timings["stain"] = time.perf_counter() - t0
        report("planning", 1)
        try:
            if not resumed:
                # Outputs of an earlier run must not sit beside a new, unfinished store looking complete.
                for stale in paths.derived():
                    stale.unlink(missing_ok=True)
                store = LabelStore.create(
                    paths.zarr, shape=plan.tiles.shape, chunk=options.chunk_size, tile_grid=plan.tiles.grid_shape,
                    run_key=run_key, attrs={"slide": str(slide_path), "model": config.name, "version": __version__},
                )  # fmt: skip
            else:
                # No provenance may stand beside a store that is being written: an earlier complete run's
                # record is kept in memory and written again, with the longer list of outputs, at the end.
                paths.provenance.unlink(missing_ok=True)
                store.mark_running()
            write_tissue_outputs(store, plan.tissue, paths.tissue_png)
        except OSError as exc:
            raise _disk_error(exc, out_dir) from exc
        if not plan.tissue_tiles:
            log.info("no tissue found on %s (method %s); writing an empty mask.", name, plan.tissue.method)

        # "auto" device and precision are resolved on each worker, which may have a GPU the caller lacks.
        model_path = resolved.identity.path
        settings = InferenceSettings(
            model_path,
            resolved.identity.sha256,
            options.device,
            options.precision,
            channels_last=True,
            runtime=options.runtime,
            stain_transform=stain_normalisation,
        )
        t0 = time.perf_counter()
        try:
            with _client(client, options) as run_client:
                stats = run_tiles(
                    plan, settings, store, client=run_client, batch_size=options.batch_size,
                    weights=resolved.weights, on_progress=on_progress, cancel=cancel, resources=resources,
                    worker_wait_s=worker_wait_s,
                )  # fmt: skip
                timings["inference"] = time.perf_counter() - t0
                check_cancelled(cancel, name)
                report("pyramid", 0)
                t0 = time.perf_counter()
                level_paths = build_pyramid(store)
                timings["pyramid"] = time.perf_counter() - t0
                report("pyramid", 1)
                scheduler = _scheduler_name(client, options)
        except OSError as exc:
            raise _disk_error(exc, out_dir) from exc

        check_cancelled(cancel, name)
        report("writing", 0)
        t0 = time.perf_counter()
        classes = label_classes_for(config)
        try:
            finalised = write_derived_outputs(
                store, plan, level_paths, classes, paths, options.formats, keep_existing=was_complete
            )
        except OSError as exc:
            raise _disk_error(exc, out_dir) from exc
        timings["outputs"] = time.perf_counter() - t0
        trust = reliability(plan, config, store.confidence_histogram())
        for warning in trust.warnings:
            log.warning("%s: %s.", name, warning)
        checksum_thread.join()
        timings["total"] = time.perf_counter() - started

        record = provenance_record(
            plan=plan, input_checksum=checksum.get("sha256"), model=resolved.identity,
            target_mpp=plan.choice.target_mpp, stats=stats,
            tiling=TilingSettings(halo_source, options.chunk_size, options.batch_size), classes=classes,
            areas=finalised.areas, timings=timings, outputs=outputs,
            execution={
                "scheduler": scheduler, "device": list(stats.devices) or [options.device],
                "precision": list(stats.precisions) or [options.precision],
                "runtime": list(stats.runtimes) or [options.runtime], "runtime_requested": options.runtime,
                "runtime_agreement": stats.runtime_agreement, "runtime_checks": list(stats.runtime_checks),
            },
            reliability=trust.record,
        )  # fmt: skip
        if previous_record is not None:
            # The original record describes how the mask was made; only the list of outputs grows.
            record = {**previous_record, "outputs": record["outputs"], "updated": record["created"]}
        try:
            # The store is marked complete before the provenance appears: a provenance file is only ever
            # next to a complete store (a kill in between leaves it missing, and a rerun writes it).
            store.mark_complete(completed=record["created"])
            if "provenance" in options.formats:
                with replacing(paths.provenance) as partial:
                    partial.write_text(json.dumps(record, indent=2, default=str))
        except OSError as exc:
            raise _disk_error(exc, out_dir) from exc
        report("writing", 1)
        return SegmentationResult(outputs, record)


def _existing_run(
    store: LabelStore, run_key: str, paths: OutputPaths, outputs: dict[str, Path], options: SegmentOptions
) -> dict[str, Any] | None:
    """The state of the run ``store`` holds that this one may resume, or None to start afresh.

    Raises :class:`InputError` when the store (or loose outputs) belong to a run with other inputs or
    settings, unless ``overwrite``.
    """
    state = store.state()
    if options.overwrite:
        return None
    if state is None:
        existing = [str(p) for p in outputs.values() if p.exists()]
        if existing:
            raise InputError(
                f"{', '.join(existing)} already exist(s) but no matching run store does; pass [[overwrite=True]] to "
                "replace, or [[out]] for another folder."
            )
        return None
    if state.get("run_key") != run_key:
        finished = "a finished" if state.get("status") == "complete" else "an interrupted"
        raise InputError(
            f"{paths.zarr} holds {finished} run with other inputs or settings; pass [[overwrite=True]] to replace "
            "it, or [[out]] for another folder."
        )
    return state


@contextlib.contextmanager
def _client(client: Client | None, options: SegmentOptions) -> Iterator[Client]:
    """The caller's client as it is (never closed here), else a connection to ``options.scheduler``, else our own."""
    if client is not None:
        yield client
        return
    if options.scheduler:
        try:
            connected = Client(options.scheduler, timeout="20s")
        except (OSError, ValueError) as exc:  # unreachable, or not an address (e.g. an unknown scheme)
            raise InputError(
                f"cannot reach the Dask scheduler at {options.scheduler!r} ({exc}); check the address, or leave out "
                "[[scheduler]] to run locally."
            ) from exc
        with connected:
            yield connected
        return
    with local_client(options.workers) as own:
        yield own


def _checksum_into(slide: Path, checksum: dict[str, str], log: logging.Logger) -> None:
    """The slide's SHA-256 into ``checksum`` (run beside the tiles); a file that cannot be read leaves it unset."""
    try:
        checksum["sha256"] = input_sha256(slide)
    except OSError as exc:
        log.warning(
            "%s: could not checksum the input for the provenance (%s); its sha256 is left empty.", slide.name, exc
        )


def _scheduler_name(client: Client | None, options: SegmentOptions) -> str:
    if client is not None:
        return str(client.scheduler_info().get("address", "client"))
    return options.scheduler or "local"


def _run_key(slide: Path, model_sha: str, plan: SlidePlan, options: SegmentOptions) -> str:
    """A fingerprint of the inputs and settings: a store is only ever resumed by the run that started it."""
    stat = slide.stat()
    choice = plan.choice
    fingerprint = {
        "slide": str(slide.resolve()),
        "slide_size": stat.st_size,
        "slide_mtime_ns": stat.st_mtime_ns,
        "model": model_sha,
        "choice": {
            "level": choice.level, "level_mpp": choice.level_mpp, "target_mpp": choice.target_mpp,
            "scale": choice.scale, "resample": choice.resample, "target_shape": choice.target_shape,
        },
        "tile_size": plan.tiles.tile_size,
        "halo": plan.tiles.halo,
        # Where every window lies, so a store started by a release that placed windows otherwise is not resumed.
        "windows": hashlib.sha256(repr([t.window for t in plan.tiles]).encode()).hexdigest(),
        "chunk": options.chunk_size,
        "batch_size": options.batch_size,
        "tissue": dataclasses.asdict(options.tissue),
        "mpp": options.mpp,
        "device": options.device,
        "precision": options.precision,
        "runtime": options.runtime,
        # The store's layout: 2 adds the per-tile confidence histograms, so an older store is never resumed.
        "store_layout": 2,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


def _disk_error(exc: OSError, out_dir: Path) -> WsiEspnetError:
    if exc.errno == errno.ENOSPC:
        return InputError(
            f"the disk holding {str(out_dir)!r} is full ({exc}); free space or choose another [[out]] folder, then "
            "rerun the same command to resume. The output is marked incomplete."
        )
    return InputError(f"cannot write outputs in {str(out_dir)!r}: {exc}. The output is marked incomplete.")
