"""The efficient spatial pyramid (ESP) block and its strided, down-sampling form.

An ESP block (Mehta et al. 2018, Sec. 3.1) factorises a standard convolution as
reduce -> split -> transform -> merge:

1. a point-wise convolution reduces N input channels to d = N // K;
2. K parallel 3x3 convolutions with dilation rates 2**(k-1), k = 1..K, transform the reduced map
   (the first branch takes the remaining N - (K-1)*d channels when K does not divide N);
3. hierarchical feature fusion (HFF) adds the outputs of branches 2..K cumulatively before they are
   concatenated, which removes the gridding artefacts of large dilation rates;
4. a residual connection adds the input when shapes match; batch norm and PReLU finish the block.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wsi_espnet.errors import ConfigError
from wsi_espnet.models.config import EspBlockOptions
from wsi_espnet.models.layers import BN_EPS, make_activation

__all__ = ["EspBlock", "StridedEspBlock", "branch_widths"]


def branch_widths(out_channels: int, branches: int) -> list[int]:
    """Output channels of each of the ``branches`` parallel convolutions; they sum to ``out_channels``."""
    width = out_channels // branches
    if width == 0:
        raise ConfigError(
            f"out_channels={out_channels} is smaller than branches={branches}; each branch needs a channel, "
            f"so use at most {out_channels} branches."
        )
    return [out_channels - (branches - 1) * width] + [width] * (branches - 1)


class EspBlock(nn.Module):
    """ESP block ``(B, in_channels, H, W) -> (B, out_channels, H / stride, W / stride)``.

    Parameters
    ----------
    in_channels, out_channels : channel counts; the residual is used only when they are equal
        and ``stride`` is 1.
    stride : 2 makes the reduction a strided 3x3 convolution (the strided ESP block).
    options : ablation switches, see :class:`~wsi_espnet.models.config.EspBlockOptions`.
    residual : overrides ``options.residual`` (the decoder uses a block without one).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        options: EspBlockOptions | None = None,
        residual: bool | None = None,
    ) -> None:
        super().__init__()
        options = options or EspBlockOptions()
        widths = branch_widths(out_channels, options.branches)
        reduced = widths[-1]
        reduce_kernel = 3 if stride > 1 else options.reduce_kernel_size
        self.reduce = nn.Conv2d(
            in_channels, reduced, reduce_kernel, stride=stride, padding=(reduce_kernel - 1) // 2, bias=False
        )
        rates = [2**k if options.dilated else 1 for k in range(options.branches)]
        self.branches = nn.ModuleList(
            nn.Conv2d(reduced, width, 3, padding=rate, dilation=rate, bias=False)
            for width, rate in zip(widths, rates, strict=True)
        )
        self.dilation_rates = tuple(rates)
        self.hierarchical_fusion = options.hierarchical_fusion
        wants_residual = options.residual if residual is None else residual
        self.residual = wants_residual and stride == 1 and in_channels == out_channels
        self.norm = nn.BatchNorm2d(out_channels, eps=BN_EPS)
        self.act = make_activation(options.activation, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        reduced = self.reduce(x)
        outputs = [branch(reduced) for branch in self.branches]
        if self.hierarchical_fusion:
            # Branch 1 (dilation 1) stays apart; branches 2..K are summed cumulatively.
            for k in range(2, len(outputs)):
                outputs[k] = outputs[k] + outputs[k - 1]
        merged = torch.cat(outputs, dim=1)
        if self.residual:
            merged = merged + x
        out: Tensor = self.act(self.norm(merged))
        return out


class StridedEspBlock(EspBlock):
    """Down-sampling ESP block: strided 3x3 reduction, no residual, ``(B, C, H, W) -> (B, C', H/2, W/2)``."""

    def __init__(self, in_channels: int, out_channels: int, *, options: EspBlockOptions | None = None) -> None:
        super().__init__(in_channels, out_channels, stride=2, options=options, residual=False)
