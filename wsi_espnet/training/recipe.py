"""Training recipes: every setting of a training run, with the paper's as the defaults.

A recipe is a YAML file whose keys are :class:`TrainingRecipe` fields (``wsi-espnet train --recipe``
takes a path or the name of a packaged recipe in ``wsi_espnet/training/recipes/``); command-line
options override single fields. The resolved recipe is written into the run folder.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import yaml

from wsi_espnet.errors import ConfigError, InputError

if TYPE_CHECKING:
    from wsi_espnet.training.transforms import Augmentation

__all__ = ["RECIPE_DIR", "Stage", "TrainingRecipe", "load_recipe"]

RECIPE_DIR = Path(__file__).with_name("recipes")
Stage = Literal["encoder", "decoder"]
Switch = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class TrainingRecipe:
    """Settings of a training run.

    Attributes
    ----------
    stages : the paper's two stages: "encoder" trains ESPNet-C against labels at 1/8 resolution,
        "decoder" trains the full ESPNet with its encoder initialised from the first stage's best
        weights (or from ``init``). ``["decoder"]`` alone trains (or fine-tunes) ESPNet directly.
    encoder_epochs, decoder_epochs : epochs of each stage.
    batch_size, crop_size : training batch of ``crop_size`` (height, width) crops.
    scale_range : multi-scale training: each sample is scaled by U(low, high) before cropping.
    samples_per_epoch : draw this many samples (with replacement) per epoch instead of one pass over
        the split; for datasets of a few large regions.
    lr, weight_decay, lr_step, lr_gamma : Adam with step decay (lr * gamma every lr_step epochs).
    new_layer_lr_scale : learning-rate factor for layers that ``init`` (or the encoder stage) did not
        provide, e.g. 10 to fine-tune quickly: the paper's thin decoder learns slowly at 5e-4 from scratch.
    class_weighting : "paper" weights class c by 1 / ln(1.10 + p_c), p_c its exact pixel share in
        the training split; "none" for plain cross-entropy.
    init : weights to start from (any of our checkpoints or an original .pth): layers whose shapes
        match are copied, the rest (e.g. the classifiers of another class set) are initialised anew.
    alpha2, alpha3 : network depth (paper default 2 and 8).
    val_interval : validate every this many epochs; early_stop_patience : stop after this many
        validations without a better val mIoU (None: never).
    amp, channels_last, cache_on_device : "auto" turns each on when a CUDA device is used (the
        dataset is cached on the GPU only when it takes under half of the free GPU memory).
    num_workers, cache_rate : data-loader processes; share of the decoded dataset kept in memory.
    seed : seeds weights, sampling and augmentation; with num_workers=0 a run and its resumed
        continuation produce the same weights as an uninterrupted run.
    """

    stages: tuple[Stage, ...] = ("encoder", "decoder")
    encoder_epochs: int = 300
    decoder_epochs: int = 300
    batch_size: int = 12
    crop_size: tuple[int, int] = (512, 512)
    scale_range: tuple[float, float] = (0.5, 2.0)
    samples_per_epoch: int | None = None
    lr: float = 5e-4
    weight_decay: float = 5e-4
    lr_step: int = 100
    lr_gamma: float = 0.5
    new_layer_lr_scale: float = 1.0
    class_weighting: Literal["paper", "none"] = "paper"
    init: str | None = None
    alpha2: int = 2
    alpha3: int = 8
    val_interval: int = 1
    early_stop_patience: int | None = None
    amp: Switch = "auto"
    channels_last: Switch = "auto"
    cache_on_device: Switch = "auto"
    num_workers: int = 0
    cache_rate: float = 1.0
    seed: int = 0
    stain_jitter: tuple[float, float] = (0.05, 0.02)
    colour_jitter: tuple[float, float, float] = (0.0, 0.0, 0.0)
    blur_sigma: tuple[float, float] | None = None
    jpeg_quality: tuple[int, int] | None = None
    stain_normalisation: Literal["none", "macenko"] = "none"

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "crop_size", tuple(int(v) for v in self.crop_size))
        object.__setattr__(self, "scale_range", tuple(float(v) for v in self.scale_range))
        if (
            not self.stages
            or any(s not in get_args(Stage) for s in self.stages)
            or len(set(self.stages)) != len(self.stages)
        ):
            raise ConfigError(
                f"stages={list(self.stages)} is not valid; use [encoder, decoder], [encoder] or [decoder]."
            )
        if list(self.stages) == ["decoder", "encoder"]:
            raise ConfigError("stages must be in the order [encoder, decoder].")
        for name in ("encoder_epochs", "decoder_epochs", "batch_size", "lr_step", "val_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1.")
        if len(self.crop_size) != 2 or any(v < 16 or v % 8 for v in self.crop_size):
            # 16: batch norm needs more than one value per channel at 1/8 resolution.
            raise ConfigError(f"crop_size={list(self.crop_size)} must be [height, width], multiples of 8, >= 16.")
        for stage in self.stages:
            if self.val_interval > self.epochs(stage):
                raise ConfigError(
                    f"val_interval={self.val_interval} exceeds the {self.epochs(stage)} epochs of stage {stage!r}; "
                    "the stage would never validate (nor keep a best model)."
                )
        if not 0 < self.cache_rate <= 1:
            raise ConfigError(f"cache_rate={self.cache_rate} must be in (0, 1].")
        low, high = self.scale_range if len(self.scale_range) == 2 else (0.0, -1.0)
        if not 0 < low <= high:
            raise ConfigError(f"scale_range={list(self.scale_range)} must be [low, high] with 0 < low <= high.")
        if self.new_layer_lr_scale <= 0:
            raise ConfigError(f"new_layer_lr_scale={self.new_layer_lr_scale} must be positive.")
        if not all(math.isfinite(v) for v in (self.lr, self.weight_decay, self.lr_gamma, self.new_layer_lr_scale)):
            raise ConfigError("lr, weight_decay, lr_gamma and new_layer_lr_scale must be finite numbers.")
        if self.lr <= 0 or self.weight_decay < 0 or not 0 < self.lr_gamma <= 1:
            raise ConfigError(
                f"lr={self.lr} must be > 0, weight_decay={self.weight_decay} >= 0, lr_gamma={self.lr_gamma} in (0, 1]."
            )
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ConfigError(f"samples_per_epoch={self.samples_per_epoch} must be at least 1 (or null).")
        if self.early_stop_patience is not None and self.early_stop_patience < 1:
            raise ConfigError(f"early_stop_patience={self.early_stop_patience} must be at least 1 (or null).")
        for name in ("amp", "channels_last", "cache_on_device"):
            if getattr(self, name) not in get_args(Switch):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be one of auto, on, off.")
        if self.class_weighting not in ("paper", "none"):
            raise ConfigError(f"class_weighting={self.class_weighting!r} must be 'paper' or 'none'.")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers={self.num_workers} must be >= 0.")
        if self.stain_normalisation not in ("none", "macenko"):
            raise ConfigError(f"stain_normalisation={self.stain_normalisation!r} must be 'none' or 'macenko'.")
        self._check_augmentation()

    def _check_augmentation(self) -> None:
        object.__setattr__(self, "stain_jitter", tuple(float(v) for v in self.stain_jitter))
        object.__setattr__(self, "colour_jitter", tuple(float(v) for v in self.colour_jitter))
        if len(self.stain_jitter) != 2 or not all(0 <= v < 1 for v in self.stain_jitter):
            raise ConfigError(f"stain_jitter={list(self.stain_jitter)} must be [sigma, bias], each in [0, 1).")
        if len(self.colour_jitter) != 3 or not all(0 <= v < 1 for v in self.colour_jitter):
            raise ConfigError(
                f"colour_jitter={list(self.colour_jitter)} must be [brightness, contrast, saturation], each in [0, 1)."
            )
        if self.blur_sigma is not None:
            object.__setattr__(self, "blur_sigma", tuple(float(v) for v in self.blur_sigma))
            if len(self.blur_sigma) != 2 or not 0 < self.blur_sigma[0] <= self.blur_sigma[1] <= 10:
                raise ConfigError(f"blur_sigma={list(self.blur_sigma)} must be [low, high] with 0 < low <= high <= 10.")
        if self.jpeg_quality is not None:
            object.__setattr__(self, "jpeg_quality", tuple(self.jpeg_quality))
            if (
                len(self.jpeg_quality) != 2
                or not all(isinstance(v, int) for v in self.jpeg_quality)
                or not (1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100)
            ):
                raise ConfigError(
                    f"jpeg_quality={list(self.jpeg_quality)} must be [low, high] whole numbers, "
                    "1 <= low <= high <= 100."
                )

    def augmentation(self) -> Augmentation:
        """The histology augmentations these settings ask for."""
        from wsi_espnet.training.transforms import Augmentation  # torch and MONAI only when training

        return Augmentation(
            hed_sigma=self.stain_jitter[0], hed_bias=self.stain_jitter[1], brightness=self.colour_jitter[0],
            contrast=self.colour_jitter[1], saturation=self.colour_jitter[2], blur_sigma=self.blur_sigma,
            jpeg_quality=self.jpeg_quality,
        )  # fmt: skip

    def epochs(self, stage: Stage) -> int:
        return self.encoder_epochs if stage == "encoder" else self.decoder_epochs

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    def replace(self, **changes: Any) -> TrainingRecipe:
        """A copy with ``changes`` (``None`` values are ignored, so CLI options can be passed as they are)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return _build(self.to_dict() | changes, where="options")


def _build(data: dict[str, Any], *, where: str) -> TrainingRecipe:
    fields = {f.name for f in dataclasses.fields(TrainingRecipe)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown recipe settings {unknown}; valid ones are: {', '.join(sorted(fields))}.")
    try:
        return TrainingRecipe(**{key: _coerce(key, value) for key, value in data.items()})
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise ConfigError(f"{where}: {exc}") from exc
        raise ConfigError(f"{where}: {exc}.") from exc


_INTS = {"encoder_epochs", "decoder_epochs", "batch_size", "lr_step", "alpha2", "alpha3", "val_interval", "num_workers",
         "seed", "samples_per_epoch", "early_stop_patience"}  # fmt: skip
_FLOATS = {"lr", "weight_decay", "lr_gamma", "new_layer_lr_scale", "cache_rate"}


def _coerce(key: str, value: Any) -> Any:
    """YAML's types -> the field's: '5e-4' (a string to YAML 1.1) is a float, on/off (booleans) stay switches."""
    if value is None:
        return None
    if key in _INTS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be a whole number.")
        return value
    if key in _FLOATS:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be a number.")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} must be a number.") from None
    if key in ("amp", "channels_last", "cache_on_device") and isinstance(value, bool):
        return "on" if value else "off"
    if key == "stages" and isinstance(value, str):
        return [value]
    if key == "crop_size":
        values = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
        if not isinstance(values, list | tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values
        ):
            raise ConfigError(f"crop_size={value!r} must be [height, width] in pixels.")
        return values
    if key in ("stain_jitter", "colour_jitter", "blur_sigma", "jpeg_quality"):
        if not isinstance(value, list | tuple) or any(isinstance(v, bool) for v in value):
            raise ConfigError(f"{key}={value!r} must be a list of numbers.")
        if key == "jpeg_quality":
            if not all(isinstance(v, int) for v in value):
                raise ConfigError(f"jpeg_quality={value!r} must be whole numbers.")
            return list(value)
        try:
            return [float(v) for v in value]
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} must be a list of numbers.") from None
    if key == "scale_range":
        if not isinstance(value, list | tuple):
            raise ConfigError(f"scale_range={value!r} must be [low, high].")
        try:
            return [float(v) for v in value]
        except (TypeError, ValueError):
            raise ConfigError(f"scale_range={value!r} must be [low, high] numbers.") from None
    return value


def load_recipe(name_or_path: str | os.PathLike[str] | None = None) -> TrainingRecipe:
    """The recipe in a YAML file, or a packaged recipe by name (default ``paper``)."""
    text = "paper" if name_or_path is None else str(name_or_path)
    path = Path(text)
    if not path.suffix and not path.exists():
        path = RECIPE_DIR / f"{text}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
            raise InputError(
                f"no recipe {text!r}; give a YAML file or one of the packaged recipes: {', '.join(names)}."
            )
    if not path.is_file():
        raise InputError(f"recipe file {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"recipe {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"recipe {str(path)!r} must be a mapping of settings, got {type(data).__name__}.")
    return _build(data, where=f"recipe {str(path)!r}")
