"""The ESP block: widths, dilation rates, hierarchical fusion, residual and ablation switches."""

from __future__ import annotations

import pytest
import torch

from wsi_espnet.errors import ConfigError
from wsi_espnet.models.config import EspBlockOptions
from wsi_espnet.models.esp_block import EspBlock, StridedEspBlock, branch_widths


@pytest.mark.parametrize(
    ("out_channels", "branches", "expected"),
    [(64, 5, [16, 12, 12, 12, 12]), (128, 5, [28, 25, 25, 25, 25]), (40, 5, [8, 8, 8, 8, 8]), (24, 5, [8, 4, 4, 4, 4]),
     (64, 4, [16, 16, 16, 16]), (7, 1, [7])],
)  # fmt: skip
def test_branch_widths_give_the_remainder_to_the_first_branch(out_channels, branches, expected):
    assert branch_widths(out_channels, branches) == expected
    assert sum(expected) == out_channels


def test_branch_widths_reject_more_branches_than_channels():
    with pytest.raises(ConfigError, match="smaller than branches=5; each branch needs a channel, so use at most 3"):
        branch_widths(3, 5)


@pytest.mark.parametrize(
    ("block", "in_shape", "out_shape"),
    [
        (EspBlock(64, 64), (2, 64, 33, 17), (2, 64, 33, 17)),
        (EspBlock(40, 20, residual=False), (1, 40, 16, 16), (1, 20, 16, 16)),
        (StridedEspBlock(19, 64), (1, 19, 32, 48), (1, 64, 16, 24)),
        (StridedEspBlock(131, 128), (1, 131, 15, 9), (1, 128, 8, 5)),
        (EspBlock(64, 64, options=EspBlockOptions(branches=3, reduce_kernel_size=3)), (1, 64, 8, 8), (1, 64, 8, 8)),
    ],
)
def test_shapes(block, in_shape, out_shape):
    assert block(torch.randn(in_shape)).shape == out_shape


def test_dilation_rates_are_powers_of_two_unless_standard_convolutions_are_asked_for():
    assert EspBlock(64, 64).dilation_rates == (1, 2, 4, 8, 16)
    assert EspBlock(64, 64, options=EspBlockOptions(branches=3)).dilation_rates == (1, 2, 4)
    assert EspBlock(64, 64, options=EspBlockOptions(dilated=False)).dilation_rates == (1, 1, 1, 1, 1)
    assert [b.dilation[0] for b in EspBlock(64, 64).branches] == [1, 2, 4, 8, 16]


def _manual_forward(block: EspBlock, x: torch.Tensor, *, fuse: bool) -> torch.Tensor:
    reduced = block.reduce(x)
    outs = [branch(reduced) for branch in block.branches]
    if fuse:
        # Branch k (k >= 2) becomes the sum of branches 2..k.
        outs = [outs[0]] + [sum(outs[1 : k + 1]) for k in range(1, len(outs))]
    merged = torch.cat(outs, 1)
    if block.residual:
        merged = merged + x
    return block.act(block.norm(merged))


@pytest.mark.parametrize("hierarchical_fusion", [True, False])
def test_hierarchical_fusion_sums_branches_two_to_k_cumulatively(hierarchical_fusion):
    torch.manual_seed(0)
    block = EspBlock(64, 64, options=EspBlockOptions(hierarchical_fusion=hierarchical_fusion)).eval()
    x = torch.randn(1, 64, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(block(x), _manual_forward(block, x, fuse=hierarchical_fusion))
        assert not torch.allclose(block(x), _manual_forward(block, x, fuse=not hierarchical_fusion))


def test_residual_only_where_shapes_allow_and_when_enabled():
    assert EspBlock(64, 64).residual
    assert not EspBlock(64, 64, options=EspBlockOptions(residual=False)).residual
    assert not EspBlock(40, 20).residual
    assert not StridedEspBlock(64, 64).residual


def test_activation_and_reduction_switches_change_the_layers():
    relu = EspBlock(64, 64, options=EspBlockOptions(activation="relu"))
    assert isinstance(relu.act, torch.nn.ReLU)
    assert isinstance(EspBlock(64, 64).act, torch.nn.PReLU)
    assert EspBlock(64, 64, options=EspBlockOptions(reduce_kernel_size=3)).reduce.kernel_size == (3, 3)
    assert EspBlock(64, 64).reduce.kernel_size == (1, 1)
    assert StridedEspBlock(64, 128).reduce.kernel_size == (3, 3)
    assert StridedEspBlock(64, 128).reduce.stride == (2, 2)
