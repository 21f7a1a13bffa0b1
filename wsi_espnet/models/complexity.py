"""Model size and cost: learnable parameters and multiply-adds."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from wsi_espnet.models.config import ModelConfig
from wsi_espnet.models.espnet import build_espnet, check_input_size

__all__ = ["count_multiply_adds", "count_parameters"]


def count_parameters(model: nn.Module) -> int:
    """Number of learnable parameters (batch-norm running statistics excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_multiply_adds(config: ModelConfig, *, height: int = 512, width: int = 1024) -> int:
    """Multiply-adds of the convolutions for one ``(height, width)`` image.

    Counted on the meta device (no memory, no compute), so it is cheap for any input size.
    Batch norm, activations and additions are not counted, as is usual for this figure.
    ``height`` and ``width`` must be positive multiples of the network's total stride, 8.
    """
    check_input_size(height, width)
    with torch.device("meta"):
        model = build_espnet(config).eval()
        image = torch.empty(1, config.in_channels, height, width)
    counter = FlopCounterMode(display=False)
    with counter:
        model(image)
    return counter.get_total_flops() // 2
