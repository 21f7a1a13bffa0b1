"""Exact dataset statistics for training: class frequencies, the paper's class weights, mean and std."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from wsi_espnet.datasets.manifest import DatasetManifest
from wsi_espnet.datasets.samples import Sample, load_sample

__all__ = ["DatasetStatistics", "compute_statistics", "paper_class_weights"]


class DatasetStatistics:
    """Pixel counts per class (ignore index excluded) and per-channel mean/std on the 0-255 scale."""

    def __init__(self, class_pixels: NDArray[np.int64], mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.class_pixels = class_pixels
        self.mean = mean
        self.std = std

    @property
    def frequencies(self) -> NDArray[np.float64]:
        total = self.class_pixels.sum()
        return self.class_pixels / total if total else np.zeros(len(self.class_pixels))

    def to_dict(self, class_names: Sequence[str]) -> dict[str, object]:
        return {
            "class_pixels": {name: int(n) for name, n in zip(class_names, self.class_pixels, strict=True)},
            "mean_255": list(self.mean),
            "std_255": list(self.std),
        }


def compute_statistics(manifest: DatasetManifest, samples: Sequence[Sample]) -> DatasetStatistics:
    """One exact pass over ``samples`` at the manifest's MPP (the paper's loadData.py, done exactly)."""
    counts = np.zeros(manifest.num_classes, dtype=np.int64)
    channel_sum = np.zeros(3, dtype=np.float64)
    channel_sq = np.zeros(3, dtype=np.float64)
    pixels = 0
    for sample in samples:
        image, labels = load_sample(manifest, sample)
        valid = labels[labels < manifest.num_classes]
        counts += np.bincount(valid, minlength=manifest.num_classes)[: manifest.num_classes]
        flat = image.reshape(-1, 3).astype(np.float64)
        channel_sum += flat.sum(0)
        channel_sq += (flat**2).sum(0)
        pixels += flat.shape[0]
    mean = channel_sum / pixels
    std = np.sqrt(np.maximum(channel_sq / pixels - mean**2, 1e-6))
    return DatasetStatistics(counts, tuple(float(v) for v in mean), tuple(float(v) for v in std))


def paper_class_weights(frequencies: NDArray[np.float64], *, c: float = 1.10) -> NDArray[np.float64]:
    """ESPNet's (and ENet's) class weights ``1 / ln(c + p_class)``; absent classes get the largest weight."""
    weights: NDArray[np.float64] = 1.0 / np.log(c + np.asarray(frequencies, dtype=np.float64))
    return weights
