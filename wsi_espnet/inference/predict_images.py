"""Segment ordinary image files (PNG, JPEG, TIFF, ...) and write label and overlay PNGs.

For photographs, screenshots and fields of view that fit in memory; whole-slide images go through
``wsi-espnet segment`` instead. Each ``NAME.ext`` gives ``NAME.labels.png`` (pixel values are class
ids; a palette PNG coloured with the model's class colours, or 16-bit grey for more than 256 classes)
and ``NAME.overlay.png`` (the image blended with the class colours).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError
from torch import nn

from wsi_espnet.atomic_files import write_atomically
from wsi_espnet.errors import InputError
from wsi_espnet.inference.predict import predict, resize_image
from wsi_espnet.inference.runtimes import check_runtime
from wsi_espnet.models.config import ModelConfig

__all__ = ["PredictedImage", "predict_image_files"]

#: Relative MPP difference below which an image is used at its own scale.
MPP_TOLERANCE = 0.01


@dataclass(frozen=True)
class PredictedImage:
    """What :func:`predict_image_files` wrote for one input.

    source : the input image. labels_path, overlay_path : the PNGs written.
    shape : (H, W) of the input and of both outputs, in pixels.
    scale : factor the image was resized by for the model (1.0: predicted at its own size).
    class_pixels : pixels of each class 0..num_classes-1 in the labels.
    """

    source: Path
    labels_path: Path
    overlay_path: Path
    shape: tuple[int, int]
    scale: float
    class_pixels: tuple[int, ...]

    @property
    def class_fractions(self) -> tuple[float, ...]:
        """Share of the image's pixels per class (sums to 1)."""
        total = sum(self.class_pixels)
        return tuple(count / total for count in self.class_pixels)


def predict_image_files(
    model: nn.Module,
    config: ModelConfig,
    paths: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    mpp: float | None = None,
    alpha: float = 0.5,
    runtime: str = "torch",
) -> list[PredictedImage]:
    """Segment each image file in ``paths`` with ``model`` (on its device) and write its PNGs to ``out_dir``.

    Parameters
    ----------
    model, config : a model and its :class:`ModelConfig` (as :func:`~wsi_espnet.models.load_model` returns).
    paths : image files Pillow reads (PNG, JPEG, TIFF, ...); converted to RGB, transparency onto white.
        Their file stems must differ, since outputs are named after them.
    out_dir : output folder, created if missing. Existing outputs are replaced, each file whole.
    mpp : micrometres per pixel of the images. When given and the model has a ``target_mpp`` that
        differs by more than 1 %, each image is resampled (antialiased) to the model's scale, segmented
        there, and the labels are resized back (nearest neighbour). Without it images are used as they are.
    alpha : opacity of the class colours in the overlay, 0 (image only) to 1 (colours only).
    runtime : where the model runs ("auto", "torch", "openvino", "onnx"; see
        :mod:`wsi_espnet.inference.runtimes`); "auto" checks the paths on the first image.

    Every input is checked (exists, is an image, unique stem) before the first one is segmented.
    Raises :class:`InputError` with what to fix otherwise.
    """
    check_runtime(runtime)
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha={alpha} is not an opacity; give a value from 0 (image only) to 1 (colours only).")
    if mpp is not None and not 0 < mpp < math.inf:
        raise InputError(f"mpp={mpp} must be a positive number of micrometres per pixel.")
    sources = [Path(p) for p in paths]
    if not sources:
        raise InputError("no images were given; pass one or more image files.")
    by_stem: dict[str, Path] = {}
    for source in sources:
        if source.stem in by_stem:
            raise InputError(
                f"{str(by_stem[source.stem])!r} and {str(source)!r} would both write {source.stem}.labels.png; "
                "rename one of them or segment them into different output folders."
            )
        by_stem[source.stem] = source
        _check_image_file(source)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"cannot create output folder {str(out)!r}: {exc.strerror or exc}; choose a folder you can write to."
        ) from exc
    scale = 1.0
    if mpp is not None and config.target_mpp is not None and abs(mpp / config.target_mpp - 1) > MPP_TOLERANCE:
        scale = mpp / config.target_mpp
    return [_predict_one(model, config, source, out, scale=scale, alpha=alpha, runtime=runtime) for source in sources]


def _check_image_file(path: Path) -> None:
    """Open the header only, so a bad 10th input is reported before the 1st is segmented."""
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise InputError(f"image {str(path)!r} {what}; give the path of an image file (PNG, JPEG, TIFF, ...).")
    try:
        with Image.open(path):
            pass
    except UnidentifiedImageError as exc:
        raise InputError(
            f"{str(path)!r} is not an image file Pillow can read; give a PNG, JPEG or TIFF image "
            "(for whole-slide images use 'wsi-espnet segment')."
        ) from exc
    except Image.DecompressionBombError as exc:
        raise InputError(f"{str(path)!r} is too large to read whole ({exc}); use 'wsi-espnet segment' for it.") from exc
    except OSError as exc:
        raise InputError(
            f"cannot read {str(path)!r}: {exc.strerror or exc}; check the file and its permissions."
        ) from exc


def _read_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
            return image.convert("RGB")
    except (OSError, ValueError) as exc:  # truncated or corrupt pixel data; Pillow raises both
        raise InputError(f"cannot decode {str(path)!r} ({exc}); the file is truncated or corrupted.") from exc


def _predict_one(
    model: nn.Module, config: ModelConfig, source: Path, out_dir: Path, *, scale: float, alpha: float, runtime: str
) -> PredictedImage:
    image = _read_rgb(source)
    width, height = image.size
    model_input = image
    if scale != 1.0:
        model_input = resize_image(image, scale)  # exactly as the training data was resampled
    labels = predict(model, np.asarray(model_input), config=config, runtime=runtime).labels
    if labels.shape != (height, width):
        labels = np.asarray(Image.fromarray(labels).resize((width, height), resample=Image.Resampling.NEAREST))
    labels_path = out_dir / f"{source.stem}.labels.png"
    overlay_path = out_dir / f"{source.stem}.overlay.png"
    label_image = _label_image(labels, config)
    overlay = Image.fromarray(_overlay(np.asarray(image), labels, config, alpha))
    write_atomically(labels_path, lambda partial: label_image.save(partial, format="PNG"))
    write_atomically(overlay_path, lambda partial: overlay.save(partial, format="PNG"))
    counts = np.bincount(labels.ravel(), minlength=config.num_classes)
    return PredictedImage(
        source=source,
        labels_path=labels_path,
        overlay_path=overlay_path,
        shape=(height, width),
        scale=scale,
        class_pixels=tuple(int(c) for c in counts),
    )


def _label_image(labels: NDArray[np.integer], config: ModelConfig) -> Image.Image:
    """Class ids as pixel values: palette PNG in the class colours, or 16-bit grey past 256 classes."""
    if config.num_classes > 256:
        return Image.fromarray(labels.astype(np.uint16))
    image = Image.fromarray(labels.astype(np.uint8))
    image.putpalette([value for color in config.class_colors for value in color])  # "L" -> "P", ids kept
    return image


def _overlay(
    image: NDArray[np.uint8], labels: NDArray[np.integer], config: ModelConfig, alpha: float
) -> NDArray[np.uint8]:
    """``(H, W, 3)`` uint8: ``(1 - alpha) * image + alpha * class colour``."""
    colors: NDArray[np.float32] = np.asarray(config.class_colors, dtype=np.float32)[labels]
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colors
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
