"""MONAI dictionary transforms for training and evaluation.

Items are dicts ``{"sample": Sample}``; :class:`LoadSampled` turns them into ``"image"`` (3, H, W)
on the 0-255 scale and ``"label"`` (1, H, W) class ids, both uint8 (what the dataset caches;
``RandZoomd`` and the batch preparation make float32 copies). Training adds the paper's
multi-scale augmentation (a random scale, then a fixed-size random crop, padded with the ignore
index where the scaled image is smaller), horizontal flips, and for histology vertical flips,
90-degree rotations and stain (HED) jitter. Normalisation is not a transform: it happens batch-wise
on the device (:class:`wsi_espnet.training.engine.PrepareBatch`) with the model's own preprocessing,
so the training input and ``predict``'s input cannot drift apart.

Every random transform runs on the tensors' device, so with ``cache_on_device`` the whole
augmentation pipeline runs on the GPU next to the cached dataset.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    MapTransform,
    RandFlipd,
    RandomizableTransform,
    RandRotate90d,
    RandSpatialCropd,
    RandZoomd,
    SpatialPadd,
    ToDeviced,
)

from wsi_espnet.datasets.manifest import DatasetManifest
from wsi_espnet.datasets.samples import load_sample

__all__ = ["LoadSampled", "RandHedJitterd", "eval_transforms", "train_transforms"]

# Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB) in optical density.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


class LoadSampled(MapTransform):
    """``{"sample": Sample}`` -> ``image`` (3, H, W) and ``label`` (1, H, W) uint8 tensors at the target MPP."""

    def __init__(self, manifest: DatasetManifest, *, target_mpp: float | None = None) -> None:
        super().__init__(keys=["sample"])
        self.manifest = manifest
        self.target_mpp = target_mpp

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        sample = out.pop("sample")
        image, labels = load_sample(self.manifest, sample, target_mpp=self.target_mpp)
        # uint8 in the cache (4 bytes per pixel instead of 16): CacheDataset keeps every result up to
        # the first random transform, so no cast may come before those; RandZoomd and PrepareBatch
        # produce float32 themselves.
        out["image"] = torch.from_numpy(image.transpose(2, 0, 1).copy())
        out["label"] = torch.from_numpy(labels[None].copy())
        out["name"] = sample.name
        return out


class RandHedJitterd(RandomizableTransform, MapTransform):
    """Stain augmentation (Tellez et al. 2018): perturb each H&E channel's optical density.

    ``od' = od * (1 + U(-sigma, sigma)) + U(-bias, bias)`` per stain, in the HED space of Ruifrok
    and Johnston's colour deconvolution; works on the 0-255 ``(3, H, W)`` image, on its device.
    """

    def __init__(self, keys: str = "image", *, prob: float = 0.8, sigma: float = 0.05, bias: float = 0.02) -> None:
        MapTransform.__init__(self, keys=[keys])
        RandomizableTransform.__init__(self, prob=prob)
        self.sigma, self.bias = sigma, bias
        self._alpha = np.ones(3)
        self._beta = np.zeros(3)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self._alpha = self.R.uniform(1 - self.sigma, 1 + self.sigma, 3)
        self._beta = self.R.uniform(-self.bias, self.bias, 3)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        self.randomize()
        if not self._do_transform:
            return out
        for key in self.key_iterator(out):
            image = torch.as_tensor(out[key])
            flat = image.float().reshape(3, -1)
            od = -torch.log10((flat + 1.0) / 256.0)
            hed = _HED_FROM_RGB.to(flat.device).T @ od
            alpha = torch.as_tensor(self._alpha, dtype=torch.float32, device=flat.device)[:, None]
            beta = torch.as_tensor(self._beta, dtype=torch.float32, device=flat.device)[:, None]
            od = _RGB_FROM_HED.to(flat.device).T @ (hed * alpha + beta)
            rgb = (256.0 * torch.pow(10.0, -od) - 1.0).clamp(0, 255)
            out[key] = rgb.reshape(image.shape)
        return out


def eval_transforms(manifest: DatasetManifest, *, target_mpp: float | None = None) -> Compose:
    """Load only: evaluation runs on whole images."""
    return Compose([LoadSampled(manifest, target_mpp=target_mpp)])


def train_transforms(
    manifest: DatasetManifest,
    *,
    crop_size: tuple[int, int],
    scale_range: tuple[float, float],
    ignore_index: int,
    device: torch.device | None = None,
) -> Compose:
    """Load (cached by the dataset), optionally move to ``device``, then augment there."""
    histology = manifest.kind == "histology"
    white_or_black = 255.0 if histology else 0.0  # glass is white; street padding is black
    transforms: list[Any] = [LoadSampled(manifest)]
    if device is not None:
        transforms.append(ToDeviced(keys=["image", "label"], device=device))
    if scale_range != (1.0, 1.0):
        transforms.append(
            RandZoomd(
                keys=["image", "label"],
                prob=1.0,
                min_zoom=scale_range[0],
                max_zoom=scale_range[1],
                mode=("bilinear", "nearest"),
                align_corners=(False, None),
                keep_size=False,
            )
        )
    transforms += [
        SpatialPadd(keys=["image"], spatial_size=crop_size, value=white_or_black),
        SpatialPadd(keys=["label"], spatial_size=crop_size, value=float(ignore_index)),
        RandSpatialCropd(keys=["image", "label"], roi_size=crop_size, random_size=False),
        RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1),
    ]
    if histology:
        transforms.append(RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0))
        if crop_size[0] == crop_size[1]:  # a rotated non-square crop would not batch
            transforms.append(RandRotate90d(keys=["image", "label"], prob=0.5, max_k=3))
        transforms.append(RandHedJitterd("image"))
    return Compose(transforms)
