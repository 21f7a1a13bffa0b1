"""The ESPNet variants: exact parameter counts of the original, shapes, structure and complexity."""

from __future__ import annotations

import pytest
import torch

from wsi_espnet.errors import ConfigError
from wsi_espnet.models import count_multiply_adds, count_parameters, create_model, get_model_config, list_models
from wsi_espnet.models.comparison_blocks import make_block
from wsi_espnet.models.config import EspBlockOptions


# Measured with the authors' own code (20 classes, alpha2=2).
@pytest.mark.parametrize(
    ("name", "alpha3", "expected"),
    [
        ("espnet", 3, 202_649),
        ("espnet", 5, 267_417),
        ("espnet", 8, 364_569),
        ("espnet-c", 3, 187_529),
        ("espnet-c", 5, 252_297),
        ("espnet-c", 8, 349_449),
    ],
)
def test_parameter_counts_match_the_original_implementation(name, alpha3, expected):
    assert count_parameters(create_model(name, num_classes=20, alpha2=2, alpha3=alpha3)) == expected


def test_camvid_decoder_with_reinforced_level1_skip_has_the_released_size():
    model = create_model("espnet", num_classes=12, decoder_level1_skip="reinforced")
    assert count_parameters(model) == 354_517


@pytest.mark.parametrize(
    ("name", "in_shape", "out_shape"),
    [
        ("espnet", (2, 3, 64, 128), (2, 20, 64, 128)),
        ("espnet", (1, 3, 360, 480), (1, 20, 360, 480)),
        ("espnet-c", (1, 3, 64, 128), (1, 20, 8, 16)),
        ("espnet-c", (1, 3, 61, 93), (1, 20, 8, 12)),
        ("espnet-b", (1, 3, 64, 64), (1, 20, 8, 8)),
        ("espnet-a", (1, 3, 64, 64), (1, 20, 8, 8)),
        *((f"espnet-c-{b}", (1, 3, 64, 64), (1, 20, 8, 8)) for b in
          ("mobilenet", "shufflenet", "resnext", "inception", "asp", "resnet")),
    ],
)  # fmt: skip
def test_output_shapes(name, in_shape, out_shape):
    model = create_model(name).eval()
    with torch.no_grad():
        assert model(torch.randn(in_shape)).shape == out_shape


@pytest.mark.parametrize(("classes", "channels", "k"), [(8, 3, 5), (2, 3, 5), (2, 4, 4), (12, 1, 3)])
def test_classes_input_channels_and_k_are_parameters(classes, channels, k):
    model = create_model(
        "espnet",
        num_classes=classes,
        in_channels=channels,
        esp=EspBlockOptions(branches=k),
        preprocessing=get_model_config("espnet").preprocessing.__class__(mean=(0.0,) * channels, std=(1.0,) * channels),
    ).eval()
    with torch.no_grad():
        assert model(torch.randn(1, channels, 32, 48)).shape == (1, classes, 32, 48)
    assert len(model.encoder.level2[0].branches) == k


def test_depth_follows_alpha2_and_alpha3():
    model = create_model("espnet-c", alpha2=3, alpha3=4)
    assert len(model.level2) == 3
    assert len(model.level3) == 4


def test_variants_differ_as_the_paper_describes():
    a, b, c = create_model("espnet-a"), create_model("espnet-b"), create_model("espnet-c")
    assert a.level2_norm is None
    assert a.level3_norm is None
    assert a.reinforce1 is None
    assert b.level2_norm is not None
    assert b.reinforce1 is None
    assert c.reinforce1 is not None
    assert c.reinforce2 is not None
    assert a.classifier.in_channels == 128
    assert b.classifier.in_channels == 256
    assert c.level3_down.reduce.in_channels == 64 + 64 + 3


def test_plain_strided_convolution_downsampler_ablation():
    model = create_model("espnet-c", downsampler="conv")
    assert isinstance(model.level2_down.conv, torch.nn.Conv2d)
    assert model.level2_down.conv.stride == (2, 2)
    assert count_parameters(model) != count_parameters(create_model("espnet-c"))


@pytest.mark.parametrize("kind", ["mobilenet", "shufflenet", "resnext", "inception", "asp", "resnet", "esp"])
def test_comparison_blocks_keep_the_shape(kind):
    block = make_block(kind, 64, EspBlockOptions())
    assert block(torch.randn(2, 64, 12, 12)).shape == (2, 64, 12, 12)


def test_multiply_adds_scale_with_image_area():
    config = get_model_config("espnet")
    small = count_multiply_adds(config, height=512, width=1024)
    assert count_multiply_adds(config, height=1024, width=2048) == 4 * small
    assert count_multiply_adds(get_model_config("espnet-c"), height=512, width=1024) < small


def test_registry_lists_every_variant_and_rejects_unknown_names():
    names = [entry.name for entry in list_models()]
    assert names[:4] == ["espnet", "espnet-c", "espnet-b", "espnet-a"]
    with pytest.raises(ConfigError, match=r"unknown model 'espnet-d'.*espnet-c"):
        create_model("espnet-d")
    with pytest.raises(ConfigError, match="block='mobilenet' is only available for the encoder"):
        create_model("espnet", block="mobilenet")
