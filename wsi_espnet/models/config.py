"""The configuration that travels with a model's weights.

A :class:`ModelConfig` says everything needed to rebuild the network (variant, depth, block type,
ablation switches) and to use it correctly (class names and colours, input normalisation and channel
order, the micrometres-per-pixel a histology model was trained at). It is frozen and JSON-serialisable,
so a checkpoint never leaves preprocessing to be guessed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from wsi_espnet.errors import ConfigError
from wsi_espnet.stain import StainReference

__all__ = [
    "BlockType",
    "EspBlockOptions",
    "ModelConfig",
    "Preprocessing",
    "Variant",
]

Variant = Literal["espnet-a", "espnet-b", "espnet-c", "espnet"]
BlockType = Literal["esp", "mobilenet", "shufflenet", "resnext", "inception", "asp", "resnet"]
Activation = Literal["prelu", "relu"]
Downsampler = Literal["esp", "conv"]
Level1Skip = Literal["conv", "reinforced"]
ChannelOrder = Literal["RGB", "BGR"]

CONFIG_FORMAT_VERSION = 1

#: ImageNet statistics on the 0-255 scale: a neutral default for newly trained models.
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


def _check_choice(name: str, value: object, allowed: object) -> None:
    choices = get_args(allowed)
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; expected one of {', '.join(map(repr, choices))}.")


@dataclass(frozen=True)
class EspBlockOptions:
    """Switches of the ESP block, one per ablation in Mehta et al. (2018), Sec. 4.

    Attributes
    ----------
    branches : K, the number of parallel dilated 3x3 convolutions (dilation rates 2**(k-1)).
    hierarchical_fusion : add branch outputs cumulatively before concatenation (removes gridding).
    residual : add the block's input to its output when the shapes allow it.
    dilated : False replaces the dilated convolutions by standard 3x3 ones (the paper's SPC-s).
    reduce_kernel_size : 1 for the paper's point-wise reduction, 3 for the 3x3 alternative.
    activation : "prelu" (per channel, as in the paper) or "relu".
    """

    branches: int = 5
    hierarchical_fusion: bool = True
    residual: bool = True
    dilated: bool = True
    reduce_kernel_size: int = 1
    activation: Activation = "prelu"

    def __post_init__(self) -> None:
        if self.branches < 1:
            raise ConfigError(f"branches={self.branches} must be >= 1 (the paper uses K=5).")
        if self.reduce_kernel_size not in (1, 3):
            raise ConfigError(f"reduce_kernel_size={self.reduce_kernel_size} is not valid; expected 1 or 3.")
        _check_choice("activation", self.activation, Activation)


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB uint8 image becomes the network's input tensor.

    ``x = (image[..., order] - mean) / std / scale_divisor``, with ``mean`` and ``std`` on the 0-255
    scale and listed in ``channel_order``. The original ESPNet checkpoints need BGR order and
    ``scale_divisor=255`` on top of the standardisation; newly trained models use 1.
    """

    channel_order: ChannelOrder = "RGB"
    mean: tuple[float, float, float] = IMAGENET_MEAN_255
    std: tuple[float, float, float] = IMAGENET_STD_255
    scale_divisor: float = 1.0

    def __post_init__(self) -> None:
        _check_choice("channel_order", self.channel_order, ChannelOrder)
        if len(self.mean) != len(self.std):
            raise ConfigError(f"mean has {len(self.mean)} values but std has {len(self.std)}; give one per channel.")
        if any(s <= 0 for s in self.std) or self.scale_divisor <= 0:
            raise ConfigError(f"std={self.std} and scale_divisor={self.scale_divisor} must be positive.")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and usage of one ESPNet model; stored next to its weights.

    Attributes
    ----------
    name : registry or user name of the model.
    variant : "espnet-a", "espnet-b", "espnet-c" (all output at 1/8 resolution) or "espnet"
        (ESPNet-C plus the light decoder, full resolution).
    num_classes, in_channels : output classes and input image channels.
    alpha2, alpha3 : number of blocks repeated at levels 2 and 3 (paper default 2 and 8).
    block : the block repeated at levels 2 and 3; "esp" or one of the paper's Fig. 5 comparisons.
    esp : ESP block ablation switches.
    downsampler : "esp" (strided ESP block) or "conv" (plain strided 3x3 convolution, ablation c).
    decoder_level1_skip : features the decoder merges at level 1: "conv" (the 16 level-1 conv
        channels, as in the released Cityscapes checkpoints) or "reinforced" (those plus the
        reinforcing RGB, 16 + in_channels, as in the released CamVid checkpoint).
    class_names, class_colors : one name and one RGB colour per output class.
    ignore_index : the class id that means "not labelled", if the model has one.
    preprocessing : input normalisation, see :class:`Preprocessing`.
    target_mpp : micrometres per pixel the model expects (histology models), else None.
    stain_reference : the H&E stain of the training data (histology models trained by ``train``), which
        ``segment`` measures each slide against and, where the model asks, normalises it to; else None.
    description : one line for ``wsi-espnet models``.
    """

    name: str
    num_classes: int
    variant: Variant = "espnet"
    in_channels: int = 3
    alpha2: int = 2
    alpha3: int = 8
    block: BlockType = "esp"
    esp: EspBlockOptions = field(default_factory=EspBlockOptions)
    downsampler: Downsampler = "esp"
    decoder_level1_skip: Level1Skip = "conv"
    class_names: tuple[str, ...] = ()
    class_colors: tuple[tuple[int, int, int], ...] = ()
    ignore_index: int | None = None
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    target_mpp: float | None = None
    stain_reference: StainReference | None = None
    description: str = ""

    def __post_init__(self) -> None:
        _check_choice("variant", self.variant, Variant)
        _check_choice("block", self.block, BlockType)
        _check_choice("downsampler", self.downsampler, Downsampler)
        _check_choice("decoder_level1_skip", self.decoder_level1_skip, Level1Skip)
        if self.num_classes < 2:
            raise ConfigError(f"num_classes={self.num_classes} must be >= 2 (e.g. tumour and other tissue).")
        if self.in_channels < 1:
            raise ConfigError(f"in_channels={self.in_channels} must be >= 1.")
        if self.alpha2 < 0 or self.alpha3 < 0:
            raise ConfigError(f"alpha2={self.alpha2}, alpha3={self.alpha3} must be >= 0.")
        if self.variant == "espnet" and self.block != "esp":
            raise ConfigError(
                f"block={self.block!r} is only available for the encoder variants; "
                "use variant='espnet-c' for the paper's block comparison."
            )
        if len(self.preprocessing.mean) != self.in_channels:
            raise ConfigError(
                f"preprocessing has {len(self.preprocessing.mean)} mean values for in_channels={self.in_channels}."
            )
        # Stored as tuples whatever was passed, so the config stays hashable and immutable.
        object.__setattr__(self, "class_names", tuple(self.class_names) or default_class_names(self.num_classes))
        object.__setattr__(
            self, "class_colors", tuple(tuple(c) for c in self.class_colors) or default_palette(self.num_classes)
        )
        for color in self.class_colors:
            if len(color) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in color):
                raise ConfigError(f"class colour {color!r} is not valid; expected three integers 0-255 (R, G, B).")
        if len(self.class_names) != self.num_classes or len(self.class_colors) != self.num_classes:
            raise ConfigError(
                f"num_classes={self.num_classes} but {len(self.class_names)} class names and "
                f"{len(self.class_colors)} colours were given; give one of each per class."
            )
        if self.ignore_index is not None and not 0 <= self.ignore_index < 256:
            raise ConfigError(f"ignore_index={self.ignore_index} must be in 0..255 or None.")
        if self.target_mpp is not None and self.target_mpp <= 0:
            raise ConfigError(f"target_mpp={self.target_mpp} must be a positive number of micrometres per pixel.")

    @property
    def output_stride(self) -> int:
        """Input pixels per output pixel: 8 for the encoder variants, 1 for ESPNet."""
        return 1 if self.variant == "espnet" else 8

    def replace(self, **changes: Any) -> ModelConfig:
        """Return a copy with ``changes`` applied (validated like a new config)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, with a format version."""
        data = dataclasses.asdict(self)
        data["format_version"] = CONFIG_FORMAT_VERSION
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys and newer format versions are errors."""
        data = dict(data)
        version = data.pop("format_version", CONFIG_FORMAT_VERSION)
        if version != CONFIG_FORMAT_VERSION:
            raise ConfigError(
                f"model config format_version={version} is not supported by this wsi-espnet "
                f"(it reads version {CONFIG_FORMAT_VERSION}); upgrade wsi-espnet."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model config has unknown keys {unknown}; known keys are {sorted(known)}.")
        try:
            data["esp"] = EspBlockOptions(**data.get("esp", {}))
            prep = dict(data.get("preprocessing", {}))
            for key in ("mean", "std"):
                if key in prep:
                    prep[key] = tuple(prep[key])
            data["preprocessing"] = Preprocessing(**prep)
            if data.get("stain_reference") is not None:
                data["stain_reference"] = StainReference(**data["stain_reference"])
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"model config is malformed: {exc}.") from exc

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"model config is not valid JSON: {exc}.") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"model config must be a JSON object, got {type(data).__name__}.")
        return cls.from_dict(data)


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """``class_0``, ``class_1``, ... for models whose classes were not named."""
    return tuple(f"class_{i}" for i in range(num_classes))


def default_palette(num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """Distinct, deterministic RGB colours for ``num_classes`` classes (class 0 is black)."""
    colors: list[tuple[int, int, int]] = [(0, 0, 0)]
    for i in range(1, num_classes):
        # Bit-interleaved palette (as in PASCAL VOC): neighbouring ids get very different colours.
        r = g = b = 0
        label = i
        for shift in range(7, -1, -1):
            r |= ((label >> 0) & 1) << shift
            g |= ((label >> 1) & 1) << shift
            b |= ((label >> 2) & 1) << shift
            label >>= 3
        colors.append((r, g, b))
    return tuple(colors[:num_classes])
