"""Whole-image prediction: RGB uint8 in, labels (and optionally class probabilities) out.

The model's own :class:`~wsi_espnet.models.config.Preprocessing` is applied, so callers never
normalise by hand. Inputs whose sides are not multiples of 8 are reflect-padded and the result is
cropped back; encoder variants (1/8 resolution) have their logits, not their labels, upsampled
bilinearly to the input size.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from PIL import Image
from torch import Tensor, nn

from wsi_espnet.errors import InputError
from wsi_espnet.models.config import ModelConfig, Preprocessing
from wsi_espnet.models.espnet import TOTAL_STRIDE

__all__ = [
    "Prediction",
    "class_labels",
    "normalise",
    "padded_forward",
    "predict",
    "predict_logits",
    "preprocess",
    "resize_image",
]


@dataclass(frozen=True)
class Prediction:
    """Result of :func:`predict`.

    labels : (H, W) uint8 class ids (uint16 for models with more than 256 classes).
    probabilities : (num_classes, H, W) float32 softmax probabilities, or None if not asked for.
    """

    labels: NDArray[np.integer]
    probabilities: NDArray[np.float32] | None = None


def preprocess(image: NDArray[np.uint8], preprocessing: Preprocessing) -> Tensor:
    """``(H, W, C)`` uint8 RGB image -> ``(1, C, H, W)`` float32 tensor ready for the model."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3:
        got = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InputError(f"expected an (H, W, {len(preprocessing.mean)}) uint8 RGB array, got a {got}.")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InputError(f"image of shape {image.shape} is empty; expected at least one pixel.")
    if image.shape[2] != len(preprocessing.mean):
        raise InputError(
            f"image has {image.shape[2]} channels but the model expects {len(preprocessing.mean)}; "
            "convert it to RGB (drop alpha) first."
        )
    # One float buffer, normalised in place: a 1968-px window allocated 6 temporaries of 46 MB before.
    with warnings.catch_warnings():  # a read-only array (PIL's) is fine: it is only read
        warnings.simplefilter("ignore", UserWarning)
        pixels = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)
    if preprocessing.channel_order == "BGR":
        pixels = pixels.flip(1)
    x = torch.empty(pixels.shape, dtype=torch.float32)
    x.copy_(pixels)
    scale, offset = _affine(preprocessing, x.device)
    return x.mul_(scale).add_(offset)


def normalise(images: Tensor, preprocessing: Preprocessing) -> Tensor:
    """``(B, C, H, W)`` float RGB on the 0-255 scale -> the network's input, on the images' device.

    The one place the model's normalisation is defined (:func:`_affine`): :func:`preprocess` and
    training's batches (:class:`~wsi_espnet.training.engine.PrepareBatch`) both apply it, so they cannot
    drift apart.
    """
    if preprocessing.channel_order == "BGR":
        images = images.flip(1)
    scale, offset = _affine(preprocessing, images.device)
    return images * scale + offset


def _affine(preprocessing: Preprocessing, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(x - mean) / std / divisor`` as ``x * scale + offset``, per channel, shaped ``(1, C, 1, 1)``."""
    mean = torch.tensor(preprocessing.mean, dtype=torch.float64)
    std = torch.tensor(preprocessing.std, dtype=torch.float64) * preprocessing.scale_divisor
    shape = (1, -1, 1, 1)
    return (1 / std).float().view(shape).to(device), (-mean / std).float().view(shape).to(device)


def padded_forward(network: Callable[[Tensor], Tensor], batch: Tensor) -> Tensor:
    """Logits of ``network`` for a batch of any H and W, at the batch's full resolution.

    The batch is reflect-padded to multiples of 8 (replicate-padded when too small to reflect),
    coarser (encoder, 1/8) logits are upsampled bilinearly, and the result is cropped back.
    """
    height, width = batch.shape[-2:]
    pad_h, pad_w = -height % TOTAL_STRIDE, -width % TOTAL_STRIDE
    if pad_h or pad_w:
        mode = "reflect" if pad_h < height and pad_w < width else "replicate"
        batch = F.pad(batch, (0, pad_w, 0, pad_h), mode=mode)
    logits = network(batch)
    if logits.shape[-2:] != batch.shape[-2:]:
        logits = F.interpolate(logits.float(), size=batch.shape[-2:], mode="bilinear", align_corners=False)
    return logits[..., :height, :width]


def class_labels(logits: Tensor, dim: int = 1) -> Tensor:
    """``logits.argmax(dim)``, reduced over contiguous memory: 80x faster than argmax across the channel
    planes of an NCHW tensor (0.82 s against 0.01 s for a 2-class 1968 x 1968 window on 2 cores)."""
    return logits.movedim(dim, -1).contiguous().argmax(-1)


def predict_logits(model: nn.Module, batch: Tensor) -> Tensor:
    """``(B, C, H, W)`` normalised input -> ``(B, num_classes, H, W)`` logits at full resolution.

    Any H and W: the batch is reflect-padded to multiples of 8 (replicate-padded when too small to
    reflect) and the logits are cropped back. The batch is moved to the model's device and dtype;
    the model runs in eval mode and inference mode (a model in training mode is put back afterwards,
    its batch-norm statistics untouched). Logits are returned on the model's device, in float32.
    """
    parameter = next(model.parameters())
    batch = batch.to(device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            logits = padded_forward(model, batch).float()
    finally:
        model.train(was_training)
    return logits


def predict(
    model: nn.Module,
    image: NDArray[np.uint8],
    *,
    config: ModelConfig | None = None,
    return_probabilities: bool = False,
    runtime: str = "torch",
) -> Prediction:
    """Segment one ``(H, W, 3)`` uint8 RGB image with ``model``, on the model's device.

    ``config`` defaults to ``model.config`` (set by every builder and loader). ``runtime`` is where the
    forward pass runs (:mod:`wsi_espnet.inference.runtimes`; "torch" runs the model as it is, the others
    compile it once per model object, so its weights must not change afterwards).
    """
    config = config or getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise InputError("the model carries no ModelConfig; pass config= (from load_model or create_model).")
    batch = preprocess(image, config.preprocessing)
    if runtime == "torch":
        logits = predict_logits(model, batch)[0]
    else:
        from wsi_espnet.devices import resolve
        from wsi_espnet.inference.runtimes import model_runtime

        placement = resolve(str(next(model.parameters()).device), "fp32")
        model.eval()
        with torch.inference_mode():
            logits = padded_forward(model_runtime(model, placement, runtime).logits, batch)[0].float()
    dtype = np.uint8 if config.num_classes <= 256 else np.uint16
    labels: NDArray[np.integer] = class_labels(logits, 0).to(torch.int32).cpu().numpy().astype(dtype)
    probabilities = logits.softmax(0).float().cpu().numpy() if return_probabilities else None
    return Prediction(labels=labels, probabilities=probabilities)


def resize_image(image: Image.Image, scale: float) -> Image.Image:
    """``image`` scaled by ``scale`` as training data is: box-filtered down, bilinear up."""
    width, height = image.size
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if scale < 1:
        return image.resize(size, Image.Resampling.BOX, reducing_gap=2.0)
    return image.resize(size, Image.Resampling.BILINEAR)
