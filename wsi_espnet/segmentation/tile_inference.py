"""Where tiles are segmented and stitched: one Dask task per group of tiles.

A task reads its tiles' windows (tile + halo) through the picklable slide reader, runs them through
the model as one batch, keeps each window's valid centre, applies the tissue mask, and writes the
result into the label store, flagging each tile done. Tiles never share a zarr chunk, so tasks
write concurrently without locks. Because every window is snapped to the network's stride and sees
the real slide border, the stitched mask equals whole-image inference wherever the halo covers the
receptive field that matters.

The model is loaded once per worker process (cached by weights hash and device), not shipped with
each task; one model thread per process runs every forward pass while Dask's threads read and write.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from wsi_espnet.devices import resolve
from wsi_espnet.heap import keep_heap_flat
from wsi_espnet.inference.predict import class_labels, padded_forward, preprocess
from wsi_espnet.inference.runtimes import RuntimeChoice, model_runtime
from wsi_espnet.models.checkpoint_io import load_model, load_model_bytes
from wsi_espnet.models.config import ModelConfig
from wsi_espnet.segmentation.label_store import CONFIDENCE_BINS, LabelStore
from wsi_espnet.segmentation.label_values import NO_TISSUE
from wsi_espnet.segmentation.planning import sample_tissue, window_key
from wsi_espnet.slides import LevelChoice, SlideReader, read_target_region
from wsi_espnet.stain import apply_stain_transform
from wsi_espnet.tiling import Tile
from wsi_espnet.tissue_detection import TissueMask

__all__ = [
    "InferenceSettings",
    "TileGroupResult",
    "cached_model",
    "infer_windows",
    "infer_windows_with_confidence",
    "label_tiles",
    "read_window",
    "runtime_choice",
    "segment_tile_group",
]

_MODELS: dict[tuple[str, str, str, bool], tuple[nn.Module, ModelConfig]] = {}
_MODELS_LOCK = threading.Lock()
_MODEL_THREAD: ThreadPoolExecutor | None = None


def _model_thread() -> ThreadPoolExecutor:
    """The one thread per process that runs the model.

    Tasks read and write on Dask's threads, but every forward pass runs here, one at a time: memory
    stays that of one pass (the allocator does not grow a large arena per calling thread, which took
    a 40k x 40k slide from 1.9 to 3.3 GB peak), and torch keeps a single OpenMP thread team.
    """
    global _MODEL_THREAD
    with _MODELS_LOCK:
        if _MODEL_THREAD is None:
            _MODEL_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wsi-espnet-model")
        return _MODEL_THREAD


@dataclass(frozen=True)
class InferenceSettings:
    """What every task needs besides its tiles; small and picklable.

    model_path, model_sha256 : the checkpoint and its hash (the cache key: a changed file reloads). A
        model given in memory has no path; its bytes reach each task as an argument (see
        :func:`segment_tile_group`), shipped once per worker.
    device : "auto", "cpu", "cuda", "cuda:1", ... ("auto" is resolved on the worker)
    precision : "fp32", "fp16" or "bf16" (autocast; fp32 runs plain).
    channels_last : run convolutions in NHWC memory layout (faster on CPU and on tensor cores).
    runtime : "auto", "torch", "openvino" or "onnx" (see :mod:`wsi_espnet.inference.runtimes`; "auto"
        is resolved on the worker, by a check on its first window).
    stain_transform : the slide's (3, 3) OD-space stain normalisation (:func:`~wsi_espnet.stain.stain_transform`)
        applied to every window before the model, for models trained on normalised images; None: none.
    """

    model_path: str | None
    model_sha256: str
    device: str = "cpu"
    precision: str = "fp32"
    channels_last: bool = True
    runtime: str = "auto"
    stain_transform: tuple[tuple[float, float, float], ...] | None = None


@dataclass(frozen=True)
class TileGroupResult:
    """What a finished task reports: its tiles, the windows it ran, seconds spent reading and in the model,
    and the runtime that ran it (with its calibration check, under "auto")."""

    tiles: tuple[tuple[int, int], ...]
    windows: int
    device: str
    precision: str
    model_seconds: float
    read_seconds: float
    runtime: RuntimeChoice | None = None


def cached_model(settings: InferenceSettings, weights: bytes | None = None) -> tuple[nn.Module, ModelConfig]:
    """The settings' model, loaded once per process and kept in eval mode on its device.

    ``weights`` are the model's bytes when it was given in memory rather than as a file.
    """
    device = resolve(settings.device, settings.precision).device
    keep_heap_flat()  # this process reads windows and runs the model
    key = (settings.model_path or "", settings.model_sha256, device, settings.channels_last)
    with _MODELS_LOCK:
        if key not in _MODELS:
            if settings.model_path is not None:
                model, config = load_model(settings.model_path, device=device)
            elif weights is not None:
                model, config = load_model_bytes(weights, device=device)
            else:
                raise ValueError("a model given in memory needs its weights passed to the task")
            if settings.channels_last:
                model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            _MODELS[key] = (model.eval(), config)
        return _MODELS[key]


def infer_windows(
    model: nn.Module, config: ModelConfig, windows: Sequence[NDArray[np.uint8]], settings: InferenceSettings
) -> list[NDArray[np.uint8]]:
    """Class ids ``(h, w)`` uint8 for each ``(h, w, 3)`` window; same-shaped windows share one batch.

    The forward pass runs on the settings' runtime (cached with the model object; see
    :func:`~wsi_espnet.inference.runtimes.model_runtime`).
    """
    return infer_windows_with_confidence(model, config, windows, settings, confidence=False)[0]


def infer_windows_with_confidence(
    model: nn.Module,
    config: ModelConfig,
    windows: Sequence[NDArray[np.uint8]],
    settings: InferenceSettings,
    *,
    confidence: bool = True,
) -> tuple[list[NDArray[np.uint8]], list[NDArray[np.uint8]]]:
    """:func:`infer_windows`, and each window's top-class probability in whole percent ``(h, w)`` uint8
    (0-100, rounded down; an empty list when ``confidence`` is False)."""
    results: list[NDArray[np.uint8] | None] = [None] * len(windows)
    percents: list[NDArray[np.uint8] | None] = [None] * len(windows)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for index, window in enumerate(windows):
        by_shape.setdefault(window.shape, []).append(index)
    placement = resolve(settings.device, settings.precision)
    runtime = model_runtime(model, placement, settings.runtime, channels_last=settings.channels_last)
    model.eval()
    for indices in by_shape.values():
        batch = torch.cat([preprocess(windows[i], config.preprocessing) for i in indices])
        with torch.inference_mode():
            logits = padded_forward(runtime.logits, batch)
            labels = class_labels(logits).to(torch.uint8).cpu().numpy()
            if confidence:
                top = logits.float().softmax(1).amax(1).mul_(100).floor_().clamp_(0, 100)
                top_percent = top.to(torch.uint8).cpu().numpy()
            del logits
        for position, index in enumerate(indices):
            results[index] = labels[position]
            if confidence:
                percents[index] = top_percent[position]
    return [r for r in results if r is not None], [p for p in percents if p is not None]


def runtime_choice(model: nn.Module, settings: InferenceSettings) -> RuntimeChoice | None:
    """The runtime ``infer_windows`` ran ``model`` on with these settings (None before its first batch)."""
    placement = resolve(settings.device, settings.precision)
    return model_runtime(model, placement, settings.runtime, channels_last=settings.channels_last).choice


def read_window(reader: SlideReader, choice: LevelChoice, tile: Tile) -> NDArray[np.uint8]:
    """Tile's input window ``(window_height, window_width, 3)``, reflect-padded past the slide's end.

    Windows may reach up to 7 pixels past the bottom/right edge (sides are multiples of 8); there the
    slide is mirrored, exactly as whole-image inference pads (see ``predict_logits``), because ESPNet's
    huge receptive field makes even a few rows of white padding change labels far inside the slide.
    """
    height, width = choice.target_shape
    window = read_target_region(reader, choice, tile.window)
    inside_h = min(tile.window_height, height - tile.window_top)
    inside_w = min(tile.window_width, width - tile.window_left)
    if (inside_h, inside_w) == window.shape[:2]:
        return window
    pad = ((0, window.shape[0] - inside_h), (0, window.shape[1] - inside_w), (0, 0))
    inside = window[:inside_h, :inside_w]
    padded: NDArray[np.uint8]
    if pad[0][1] < inside_h and pad[1][1] < inside_w:
        padded = np.pad(inside, pad, mode="reflect")
    else:  # slides narrower than the padding itself cannot be mirrored
        padded = np.pad(inside, pad, mode="edge")
    return padded


def label_tiles(
    reader: SlideReader,
    choice: LevelChoice,
    tiles: Sequence[Tile],
    tissue: Sequence[NDArray[np.bool_] | None],
    model: nn.Module,
    config: ModelConfig,
    settings: InferenceSettings,
) -> tuple[list[NDArray[np.uint8]], list[NDArray[np.int64]], TileGroupResult]:
    """Mask values ``tile.region.shape`` uint8 for each tile: ``class + 1``, and 0 where there is no tissue;
    and each tile's confidence histogram: tissue pixels per top-class probability percent, (101,) int64.

    ``tissue[i]`` is tile i's tissue mask on the target grid (None: all tissue). Tiles sharing a
    window run it once; the windows run as one batch on the process's model thread.
    """
    start = time.perf_counter()
    unique = {window_key(t): t for t in tiles}
    windows = [read_window(reader, choice, t) for t in unique.values()]
    if settings.stain_transform is not None:
        transform = np.asarray(settings.stain_transform, dtype=np.float32)
        windows = [apply_stain_transform(w, transform) for w in windows]
    read_seconds = time.perf_counter() - start

    def run_model() -> tuple[tuple[list[NDArray[np.uint8]], list[NDArray[np.uint8]]], float]:
        began = time.perf_counter()
        return infer_windows_with_confidence(model, config, windows, settings), time.perf_counter() - began

    (labels_per_window, percent_per_window), model_seconds = _model_thread().submit(run_model).result()
    predictions = dict(zip(unique, labels_per_window, strict=True))
    percents = dict(zip(unique, percent_per_window, strict=True))
    values, histograms = [], []
    for tile, mask in zip(tiles, tissue, strict=True):
        labels = predictions[window_key(tile)][tile.crop] + np.uint8(1)
        percent = percents[window_key(tile)][tile.crop]
        if mask is not None:
            labels[~mask] = NO_TISSUE
            percent = percent[mask]
        values.append(labels)
        histograms.append(np.bincount(percent.ravel(), minlength=CONFIDENCE_BINS).astype(np.int64))
    placement = resolve(settings.device, settings.precision)
    stats = TileGroupResult(
        tuple((t.row, t.col) for t in tiles), len(windows), placement.device, placement.precision, model_seconds,
        read_seconds, runtime_choice(model, settings),
    )  # fmt: skip
    return values, histograms, stats


def segment_tile_group(
    reader: SlideReader,
    choice: LevelChoice,
    tiles: Sequence[Tile],
    tissue: Sequence[TissueMask | None],
    settings: InferenceSettings,
    store_path: str,
    weights: bytes | None = None,
) -> TileGroupResult:
    """The Dask task: :func:`label_tiles`, then write each tile into the store at ``store_path`` and flag it.

    ``tissue`` holds each tile's window of the slide's tissue mask (:meth:`SlidePlan.tissue_windows`),
    sampled onto the tile here, on the worker: a window is a few KB where the tile's mask is MBs, so
    tasks stay small on the scheduler and the driver does not compute every tile's mask.
    """
    model, config = cached_model(settings, weights)
    masks = sample_tissue(choice, tiles, tissue)
    values, histograms, stats = label_tiles(reader, choice, tiles, masks, model, config, settings)
    store = LabelStore(store_path)
    for tile, labels, histogram in zip(tiles, values, histograms, strict=True):
        store.write_tile(tile.row, tile.col, tile.top, tile.left, labels, histogram)
    return stats
