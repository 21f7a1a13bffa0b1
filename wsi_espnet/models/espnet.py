"""ESPNet: efficient spatial pyramid of dilated convolutions for semantic segmentation.

Paper: Sachin Mehta, Mohammad Rastegari, Anat Caspi, Linda Shapiro, Hannaneh Hajishirzi,
"ESPNet: Efficient Spatial Pyramid of Dilated Convolutions for Semantic Segmentation", ECCV 2018,
https://arxiv.org/abs/1803.06815. Original implementation and checkpoints (MIT licence):
https://github.com/sacmehta/ESPNet. This is an independent implementation; the mapping of the
original checkpoints' keys onto it lives in :mod:`wsi_espnet.models.original_checkpoints`.

The variants (paper Fig. 4), all parametrised by classes, input channels, K, alpha2 and alpha3:

* ESPNet-A: strided 3x3 conv -> strided ESP -> alpha2 ESP -> strided ESP -> alpha3 ESP -> 1x1 conv.
* ESPNet-B: A plus, at levels 2 and 3, the concatenation of the strided block's output with the last
  block's output (feature reuse), each followed by BN + PReLU.
* ESPNet-C: B plus input reinforcement: the image, average-pooled to each level's resolution, is
  concatenated at levels 1 and 2. A, B and C predict at 1/8 of the input resolution.
* ESPNet: ESPNet-C plus a light decoder that brings the prediction to full resolution through
  transposed convolutions, merging level-2 and level-1 features on the way.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
from torch import Tensor, nn

from wsi_espnet.errors import InputError
from wsi_espnet.models.comparison_blocks import make_block
from wsi_espnet.models.config import ModelConfig
from wsi_espnet.models.esp_block import EspBlock, StridedEspBlock
from wsi_espnet.models.layers import BN_EPS, BnAct, ConvBnAct

__all__ = [
    "TOTAL_STRIDE",
    "EncoderFeatures",
    "EspNet",
    "EspNetEncoder",
    "InputReinforcement",
    "build_espnet",
    "check_input_size",
]

#: Input pixels per level-3 pixel: input sides must be multiples of this for the decoder's merges.
TOTAL_STRIDE = 8
LEVEL1_CHANNELS = 16
LEVEL2_CHANNELS = 64
LEVEL3_CHANNELS = 128


class InputReinforcement(nn.Module):
    """The input image average-pooled ``times`` times by 2: ``(B, C, H, W) -> (B, C, H/2**t, W/2**t)``."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.times = times
        self.pool = nn.AvgPool2d(3, stride=2, padding=1)

    def forward(self, image: Tensor) -> Tensor:
        for _ in range(self.times):
            image = self.pool(image)
        return image


class EncoderFeatures(NamedTuple):
    """Feature maps of an encoder pass, named by level (resolution 1/2, 1/4, 1/8 of the input)."""

    level1: Tensor  # (B, 16, H/2, W/2), the strided conv's output
    level1_merged: Tensor  # level1, concatenated with the reinforcing image in ESPNet-C
    level2_merged: Tensor  # (B, 64 / 128 / 131, H/4, W/4)
    level3_merged: Tensor  # (B, 128 / 256, H/8, W/8)


class EspNetEncoder(nn.Module):
    """ESPNet-A, -B or -C: ``(B, in_channels, H, W) -> (B, num_classes, H/8, W/8)`` logits.

    ``variant="espnet"`` builds the ESPNet-C structure that :class:`EspNet` wraps.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        reinforced = config.variant in ("espnet-c", "espnet")
        self.concatenates = config.variant != "espnet-a"
        activation = config.esp.activation
        image_channels = config.in_channels if reinforced else 0

        def downsampler(in_channels: int, out_channels: int) -> nn.Module:
            if config.downsampler == "conv":
                return ConvBnAct(in_channels, out_channels, 3, stride=2, activation=activation)
            return StridedEspBlock(in_channels, out_channels, options=config.esp)

        self.level1 = ConvBnAct(config.in_channels, LEVEL1_CHANNELS, 3, stride=2, activation=activation)
        self.reinforce1 = InputReinforcement(1) if reinforced else None
        self.reinforce2 = InputReinforcement(2) if reinforced else None
        self.level1_norm = BnAct(LEVEL1_CHANNELS + image_channels, activation=activation) if reinforced else None

        self.level2_down = downsampler(LEVEL1_CHANNELS + image_channels, LEVEL2_CHANNELS)
        self.level2 = nn.Sequential(
            *(make_block(config.block, LEVEL2_CHANNELS, config.esp) for _ in range(config.alpha2))
        )
        level2_width = LEVEL2_CHANNELS * (2 if self.concatenates else 1) + image_channels
        self.level2_norm = BnAct(level2_width, activation=activation) if self.concatenates else None

        self.level3_down = downsampler(level2_width, LEVEL3_CHANNELS)
        self.level3 = nn.Sequential(
            *(make_block(config.block, LEVEL3_CHANNELS, config.esp) for _ in range(config.alpha3))
        )
        level3_width = LEVEL3_CHANNELS * (2 if self.concatenates else 1)
        self.level3_norm = BnAct(level3_width, activation=activation) if self.concatenates else None
        self.classifier = nn.Conv2d(level3_width, config.num_classes, 1, bias=False)
        self.level2_width = level2_width

    def forward_features(self, image: Tensor) -> EncoderFeatures:
        """Run levels 1-3 on a normalised ``(B, in_channels, H, W)`` float tensor."""
        level1 = self.level1(image)
        level1_merged = level1
        if self.level1_norm is not None and self.reinforce1 is not None:
            level1_merged = self.level1_norm(torch.cat([level1, self.reinforce1(image)], dim=1))

        level2_down = self.level2_down(level1_merged)
        level2 = self.level2(level2_down)
        level2_merged = level2
        if self.level2_norm is not None:
            parts = [level2, level2_down]
            if self.reinforce2 is not None:
                parts.append(self.reinforce2(image))
            level2_merged = self.level2_norm(torch.cat(parts, dim=1))

        level3_down = self.level3_down(level2_merged)
        level3 = self.level3(level3_down)
        level3_merged = level3
        if self.level3_norm is not None:
            # The original concatenates the strided output first here, unlike at level 2.
            level3_merged = self.level3_norm(torch.cat([level3_down, level3], dim=1))
        return EncoderFeatures(level1, level1_merged, level2_merged, level3_merged)

    def forward(self, image: Tensor) -> Tensor:
        """``(B, in_channels, H, W) -> (B, num_classes, ceil(H/8), ceil(W/8))`` logits."""
        logits: Tensor = self.classifier(self.forward_features(image).level3_merged)
        return logits


class EspNet(nn.Module):
    """ESPNet: ESPNet-C with the light decoder, ``(B, in_channels, H, W) -> (B, num_classes, H, W)``.

    H and W must be multiples of 8 (:func:`wsi_espnet.inference.predict` pads to that).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        classes = config.num_classes
        activation = config.esp.activation
        self.encoder = EspNetEncoder(config)
        self.encoder_logits_norm = nn.BatchNorm2d(classes, eps=BN_EPS)
        self.up_level3 = nn.ConvTranspose2d(classes, classes, 2, stride=2, bias=False)
        self.level2_project = nn.Conv2d(self.encoder.level2_width, classes, 1, bias=False)
        self.merge_level2 = nn.Sequential(
            BnAct(2 * classes, activation=activation),
            # With fewer classes than branches (e.g. a binary tumour model) each branch still needs a channel.
            EspBlock(
                2 * classes,
                classes,
                options=replace(config.esp, branches=min(config.esp.branches, classes)),
                residual=False,
            ),
        )
        self.up_level2 = nn.Sequential(
            nn.ConvTranspose2d(classes, classes, 2, stride=2, bias=False),
            BnAct(classes, activation=activation),
        )
        skip_channels = LEVEL1_CHANNELS + (config.in_channels if config.decoder_level1_skip == "reinforced" else 0)
        self.merge_level1 = ConvBnAct(skip_channels + classes, classes, 3, activation=activation)
        self.up_level1 = nn.ConvTranspose2d(classes, classes, 2, stride=2, bias=False)

    def forward(self, image: Tensor) -> Tensor:
        """``(B, in_channels, H, W) -> (B, num_classes, H, W)`` logits, H and W multiples of 8."""
        features = self.encoder.forward_features(image)
        level3 = self.up_level3(self.encoder_logits_norm(self.encoder.classifier(features.level3_merged)))
        level2 = self.up_level2(self.merge_level2(torch.cat([self.level2_project(features.level2_merged), level3], 1)))
        skip = features.level1 if self.config.decoder_level1_skip == "conv" else features.level1_merged
        logits: Tensor = self.up_level1(self.merge_level1(torch.cat([level2, skip], dim=1)))
        return logits


def build_espnet(config: ModelConfig) -> EspNetEncoder | EspNet:
    """The untrained network that ``config`` describes (weights from PyTorch's default init)."""
    return EspNet(config) if config.variant == "espnet" else EspNetEncoder(config)


def check_input_size(height: int, width: int) -> None:
    """Raise :class:`InputError` unless both sides are positive multiples of :data:`TOTAL_STRIDE`."""
    if height <= 0 or width <= 0 or height % TOTAL_STRIDE or width % TOTAL_STRIDE:
        raise InputError(f"height={height}, width={width}: both must be positive multiples of {TOTAL_STRIDE}.")
