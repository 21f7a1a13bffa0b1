"""Small building blocks shared by the ESP block, the comparison blocks and the ESPNet variants.

All batch norms use ``eps=1e-3`` and all convolutions have no bias, as in the original ESPNet, so
the authors' checkpoints load unchanged.
"""

from __future__ import annotations

from torch import nn

from wsi_espnet.models.config import Activation

__all__ = ["BN_EPS", "BnAct", "ConvBnAct", "make_activation"]

BN_EPS = 1e-3


def make_activation(kind: Activation, channels: int) -> nn.Module:
    """Per-channel PReLU (the paper's choice) or ReLU."""
    return nn.PReLU(channels) if kind == "prelu" else nn.ReLU(inplace=True)


class BnAct(nn.Sequential):
    """Batch norm then activation: ``(B, C, H, W) -> (B, C, H, W)``."""

    def __init__(self, channels: int, *, activation: Activation = "prelu") -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, eps=BN_EPS)
        self.act = make_activation(activation, channels)


class ConvBnAct(nn.Sequential):
    """Convolution (same padding, no bias), batch norm, activation.

    ``(B, in_channels, H, W) -> (B, out_channels, H / stride, W / stride)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        activation: Activation | None = "prelu",
    ) -> None:
        super().__init__()
        padding = (kernel_size - 1) // 2 * dilation
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,
        )
        self.norm = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.act = make_activation(activation, out_channels) if activation else nn.Identity()
