"""The blocks that Mehta et al. (2018, Fig. 5) compare against the ESP block inside ESPNet-C.

Each maps ``(B, C, H, W) -> (B, C, H, W)`` and can replace the ESP block at levels 2 and 3 of an
encoder variant (``ModelConfig(block=...)``), so the paper's accuracy/size/speed comparison can be
rerun with the same training loop. Widths follow the cited designs at the channel counts ESPNet uses
(64 at level 2, 128 at level 3).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wsi_espnet.models.config import BlockType, EspBlockOptions
from wsi_espnet.models.esp_block import EspBlock, branch_widths
from wsi_espnet.models.layers import BN_EPS, ConvBnAct, make_activation

__all__ = [
    "AtrousSpatialPyramidBlock",
    "HomogeneousInceptionBlock",
    "MobileNetBlock",
    "ResNeXtBlock",
    "ResNetBasicBlock",
    "ShuffleNetBlock",
    "make_block",
]


class _ResidualBlock(nn.Module):
    """``act(norm(body(x)) + x)``: the shared tail of the residual comparison blocks."""

    def __init__(self, body: nn.Module, channels: int, options: EspBlockOptions) -> None:
        super().__init__()
        self.body = body
        self.norm = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.act = make_activation(options.activation, channels)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.act(self.norm(self.body(x)) + x)
        return out


class MobileNetBlock(nn.Sequential):
    """Depth-wise separable convolution (Howard et al. 2017): depth-wise 3x3, then point-wise 1x1."""

    def __init__(self, channels: int, options: EspBlockOptions) -> None:
        super().__init__()
        self.depthwise = ConvBnAct(channels, channels, 3, groups=channels, activation=options.activation)
        self.pointwise = ConvBnAct(channels, channels, 1, activation=options.activation)


class _ChannelShuffle(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        return x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleNetBlock(_ResidualBlock):
    """ShuffleNet unit (Zhang et al. 2018), stride 1: grouped 1x1, shuffle, depth-wise 3x3, grouped 1x1."""

    def __init__(self, channels: int, options: EspBlockOptions, *, groups: int = 4) -> None:
        bottleneck = channels // 4
        body = nn.Sequential(
            ConvBnAct(channels, bottleneck, 1, groups=groups, activation=options.activation),
            _ChannelShuffle(groups),
            ConvBnAct(bottleneck, bottleneck, 3, groups=bottleneck, activation=None),
            nn.Conv2d(bottleneck, channels, 1, groups=groups, bias=False),
        )
        super().__init__(body, channels, options)


class ResNeXtBlock(_ResidualBlock):
    """ResNeXt bottleneck (Xie et al. 2017): 1x1 reduce to C/2, grouped 3x3 (cardinality 8), 1x1 expand."""

    def __init__(self, channels: int, options: EspBlockOptions, *, cardinality: int = 8) -> None:
        width = channels // 2
        body = nn.Sequential(
            ConvBnAct(channels, width, 1, activation=options.activation),
            ConvBnAct(width, width, 3, groups=cardinality, activation=options.activation),
            nn.Conv2d(width, channels, 1, bias=False),
        )
        super().__init__(body, channels, options)


class ResNetBasicBlock(_ResidualBlock):
    """ResNet basic block (He et al. 2016): two 3x3 convolutions and an identity shortcut."""

    def __init__(self, channels: int, options: EspBlockOptions) -> None:
        body = nn.Sequential(
            ConvBnAct(channels, channels, 3, activation=options.activation),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        )
        super().__init__(body, channels, options)


class _ParallelBranches(nn.Module):
    """Concatenation of parallel branches: ``(B, C, H, W) -> (B, sum of branch widths, H, W)``."""

    def __init__(self, branches: list[nn.Module]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


class HomogeneousInceptionBlock(_ResidualBlock):
    """Inception with K identical branches (Szegedy et al. 2015): each 1x1 reduce then 3x3, concatenated."""

    def __init__(self, channels: int, options: EspBlockOptions) -> None:
        branches: list[nn.Module] = [
            nn.Sequential(
                nn.Conv2d(channels, width, 1, bias=False),
                nn.Conv2d(width, width, 3, padding=1, bias=False),
            )
            for width in branch_widths(channels, options.branches)
        ]
        super().__init__(_ParallelBranches(branches), channels, options)


class AtrousSpatialPyramidBlock(_ResidualBlock):
    """Atrous spatial pyramid (Chen et al. 2018): K dilated 3x3 convolutions on the full input, no reduction."""

    def __init__(self, channels: int, options: EspBlockOptions) -> None:
        branches: list[nn.Module] = [
            nn.Conv2d(channels, width, 3, padding=2**k, dilation=2**k, bias=False)
            for k, width in enumerate(branch_widths(channels, options.branches))
        ]
        super().__init__(_ParallelBranches(branches), channels, options)


def make_block(kind: BlockType, channels: int, options: EspBlockOptions) -> nn.Module:
    """The level-2/3 block named ``kind``, mapping ``(B, channels, H, W)`` to the same shape."""
    if kind == "esp":
        return EspBlock(channels, channels, options=options)
    factories: dict[str, type[nn.Module]] = {
        "mobilenet": MobileNetBlock,
        "shufflenet": ShuffleNetBlock,
        "resnext": ResNeXtBlock,
        "inception": HomogeneousInceptionBlock,
        "asp": AtrousSpatialPyramidBlock,
        "resnet": ResNetBasicBlock,
    }
    return factories[kind](channels, options)
