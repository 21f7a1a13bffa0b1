"""MONAI dictionary transforms for training and evaluation.

Items are dicts ``{"sample": Sample}``; :class:`LoadSampled` turns them into ``"image"`` (3, H, W)
on the 0-255 scale and ``"label"`` (1, H, W) class ids, both uint8 (what the dataset caches;
``RandZoomd`` and the batch preparation make float32 copies). Training adds the paper's
multi-scale augmentation (a random scale, then a fixed-size random crop, padded with the ignore
index where the scaled image is smaller), horizontal flips, and for histology vertical flips,
90-degree rotations and the scanner/stain augmentations a recipe asks for (:class:`Augmentation`):
stain (HED) jitter, brightness/contrast/saturation jitter, Gaussian blur (focus) and JPEG
re-compression, in that order (stain, then optics, then the scanner's codec). A model trained with
stain normalisation sees every image normalised as it is loaded (:class:`LoadSampled`).
Normalisation to the network's input scale is not a transform: it happens batch-wise on the
device (:class:`wsi_espnet.training.engine.PrepareBatch`) with the model's own preprocessing, so
the training input and ``predict``'s input cannot drift apart.

Every random transform runs on the tensors' device, so with ``cache_on_device`` the whole
augmentation pipeline runs on the GPU next to the cached dataset.
"""

from __future__ import annotations

import io
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
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
from monai.utils import convert_to_dst_type
from PIL import Image

from wsi_espnet.datasets.manifest import DatasetManifest
from wsi_espnet.datasets.samples import load_sample
from wsi_espnet.stain import StainEstimate, StainReference, normalise_stains

__all__ = [
    "Augmentation",
    "LoadSampled",
    "RandBlurd",
    "RandColourJitterd",
    "RandHedJitterd",
    "RandJpegd",
    "eval_transforms",
    "train_transforms",
]

# Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB) in optical density.
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


class LoadSampled(MapTransform):
    """``{"sample": Sample}`` -> ``image`` (3, H, W) and ``label`` (1, H, W) uint8 tensors at the target MPP.

    With ``stains`` (each source's estimate) and a ``reference``, each image's stain is normalised to the
    reference (Macenko) as it is loaded, as ``segment`` normalises each slide for such a model.
    """

    def __init__(
        self,
        manifest: DatasetManifest,
        *,
        target_mpp: float | None = None,
        stains: Mapping[str, StainEstimate | None] | None = None,
        reference: StainReference | None = None,
    ) -> None:
        super().__init__(keys=["sample"])
        self.manifest = manifest
        self.target_mpp = target_mpp
        self.stains = dict(stains or {})
        self.reference = reference

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        sample = out.pop("sample")
        image, labels = load_sample(self.manifest, sample, target_mpp=self.target_mpp)
        source_stain = self.stains.get(sample.source.name)
        if self.reference is not None and source_stain is not None:
            image = normalise_stains(image, source_stain, self.reference)
        # uint8 in the cache (4 bytes per pixel instead of 16): CacheDataset keeps every result up to
        # the first random transform, so no cast may come before those; RandZoomd and PrepareBatch
        # produce float32 themselves.
        out["image"] = torch.from_numpy(image.transpose(2, 0, 1).copy())
        out["label"] = torch.from_numpy(labels[None].copy())
        out["name"] = sample.name
        return out


class _RandImaged(RandomizableTransform, MapTransform):
    """A random change of the 0-255 ``(3, H, W)`` image, on its device: :meth:`draw` picks the parameters
    (after the coin flip for ``prob``), :meth:`apply` changes one image; MONAI's MetaTensor is kept."""

    def __init__(self, keys: str, prob: float) -> None:
        MapTransform.__init__(self, keys=[keys])
        RandomizableTransform.__init__(self, prob=prob)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self.draw()

    def draw(self) -> None:
        raise NotImplementedError

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        self.randomize()
        if not self._do_transform:
            return out
        for key in self.key_iterator(out):
            image = torch.as_tensor(out[key])
            # The same tensor type throughout a batch: MONAI's collation needs every item a MetaTensor.
            out[key] = convert_to_dst_type(self.apply(image.float()), image, dtype=torch.float32)[0]
        return out


class RandHedJitterd(_RandImaged):
    """Stain augmentation (Tellez et al. 2018): perturb each H&E channel's optical density.

    ``od' = od * (1 + U(-sigma, sigma)) + U(-bias, bias)`` per stain, in the HED space of Ruifrok
    and Johnston's colour deconvolution.
    """

    def __init__(self, keys: str = "image", *, prob: float = 0.8, sigma: float = 0.05, bias: float = 0.02) -> None:
        super().__init__(keys, prob)
        self.sigma, self.bias = sigma, bias
        self._alpha = np.ones(3)
        self._beta = np.zeros(3)

    def draw(self) -> None:
        self._alpha = self.R.uniform(1 - self.sigma, 1 + self.sigma, 3)
        self._beta = self.R.uniform(-self.bias, self.bias, 3)

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        flat = image.reshape(3, -1)
        od = -torch.log10((flat + 1.0) / 256.0)
        hed = _HED_FROM_RGB.to(flat.device).T @ od
        alpha = torch.as_tensor(self._alpha, dtype=torch.float32, device=flat.device)[:, None]
        beta = torch.as_tensor(self._beta, dtype=torch.float32, device=flat.device)[:, None]
        od = _RGB_FROM_HED.to(flat.device).T @ (hed * alpha + beta)
        return (256.0 * torch.pow(10.0, -od) - 1.0).clamp(0, 255).reshape(image.shape)


class RandColourJitterd(_RandImaged):
    """Brightness, contrast and saturation jitter.

    Each factor is drawn from U(1 - x, 1 + x): brightness scales the image, contrast scales its
    distance from the image's mean grey, saturation its distance from each pixel's grey (ITU-R 601 luma).
    """

    def __init__(
        self, keys: str = "image", *, prob: float = 0.8, brightness: float = 0.0, contrast: float = 0.0,
        saturation: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__(keys, prob)
        self.ranges = (brightness, contrast, saturation)
        self._factors = np.ones(3)

    def draw(self) -> None:
        self._factors = np.array([self.R.uniform(1 - x, 1 + x) for x in self.ranges])

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        brightness, contrast, saturation = (float(f) for f in self._factors)
        luma = torch.tensor([0.299, 0.587, 0.114], device=image.device)
        image = image * brightness
        grey = torch.einsum("chw,c->hw", image, luma)
        image = (image - grey.mean()) * contrast + grey.mean()
        grey = torch.einsum("chw,c->hw", image, luma)
        return ((image - grey) * saturation + grey).clamp(0, 255)


class RandBlurd(_RandImaged):
    """Gaussian blur with sigma ~ U(low, high) pixels (out-of-focus scanning)."""

    def __init__(self, keys: str = "image", *, prob: float = 0.3, sigma: tuple[float, float] = (0.5, 1.5)) -> None:
        super().__init__(keys, prob)
        self.sigma = sigma
        self._sigma = sigma[0]

    def draw(self) -> None:
        self._sigma = float(self.R.uniform(*self.sigma))

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        radius = max(1, int(np.ceil(3 * self._sigma)))
        x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=image.device)
        kernel = torch.exp(-(x**2) / (2 * self._sigma**2))
        kernel = (kernel / kernel.sum()).repeat(image.shape[0], 1)
        blurred = torch.nn.functional.pad(image[None], (radius, radius, radius, radius), mode="reflect")
        blurred = torch.nn.functional.conv2d(blurred, kernel[:, None, None, :], groups=image.shape[0])
        blurred = torch.nn.functional.conv2d(blurred, kernel[:, None, :, None], groups=image.shape[0])
        return blurred[0]


class RandJpegd(_RandImaged):
    """JPEG re-compression at quality ~ U(low, high) (scanners store tiles as JPEG); through Pillow, on the CPU."""

    def __init__(self, keys: str = "image", *, prob: float = 0.3, quality: tuple[int, int] = (50, 95)) -> None:
        super().__init__(keys, prob)
        self.quality = quality
        self._quality = quality[1]

    def draw(self) -> None:
        self._quality = int(self.R.randint(self.quality[0], self.quality[1] + 1))

    def apply(self, image: torch.Tensor) -> torch.Tensor:
        pixels = image.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=self._quality)
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        return torch.from_numpy(decoded.transpose(2, 0, 1).copy()).to(image.device).float()


@dataclass(frozen=True)
class Augmentation:
    """The scanner and stain augmentations of a histology recipe (0 or None turns one off).

    hed_sigma, hed_bias : stain (HED) jitter, see :class:`RandHedJitterd`.
    brightness, contrast, saturation : see :class:`RandColourJitterd`.
    blur_sigma : (low, high) Gaussian blur sigma in pixels, or None.
    jpeg_quality : (low, high) JPEG quality, or None.
    """

    hed_sigma: float = 0.05
    hed_bias: float = 0.02
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    blur_sigma: tuple[float, float] | None = None
    jpeg_quality: tuple[int, int] | None = None

    def transforms(self) -> list[Any]:
        steps: list[Any] = []
        if self.hed_sigma or self.hed_bias:
            steps.append(RandHedJitterd("image", sigma=self.hed_sigma, bias=self.hed_bias))
        if self.brightness or self.contrast or self.saturation:
            steps.append(RandColourJitterd("image", brightness=self.brightness, contrast=self.contrast,
                                           saturation=self.saturation))  # fmt: skip
        if self.blur_sigma is not None:
            steps.append(RandBlurd("image", sigma=self.blur_sigma))
        if self.jpeg_quality is not None:
            steps.append(RandJpegd("image", quality=self.jpeg_quality))
        return steps


def eval_transforms(
    manifest: DatasetManifest,
    *,
    target_mpp: float | None = None,
    stains: Mapping[str, StainEstimate | None] | None = None,
    reference: StainReference | None = None,
) -> Compose:
    """Load (and normalise the stain, given ``stains`` and ``reference``) only: evaluation runs on whole images."""
    return Compose([LoadSampled(manifest, target_mpp=target_mpp, stains=stains, reference=reference)])


def train_transforms(
    manifest: DatasetManifest,
    *,
    crop_size: tuple[int, int],
    scale_range: tuple[float, float],
    ignore_index: int,
    device: torch.device | None = None,
    augmentation: Augmentation | None = None,
    stains: Mapping[str, StainEstimate | None] | None = None,
    reference: StainReference | None = None,
) -> Compose:
    """Load (cached by the dataset; stain-normalised given ``stains`` and ``reference``), optionally move to
    ``device``, then augment there."""
    histology = manifest.kind == "histology"
    white_or_black = 255.0 if histology else 0.0  # glass is white; street padding is black
    transforms: list[Any] = [LoadSampled(manifest, stains=stains, reference=reference)]
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
        transforms += (augmentation or Augmentation()).transforms()
    return Compose(transforms)
