"""ModelConfig: validation with specific messages and a lossless JSON round trip."""

from __future__ import annotations

import json

import pytest

from wsi_espnet.errors import ConfigError
from wsi_espnet.models import ModelConfig, Preprocessing
from wsi_espnet.models.config import EspBlockOptions


def test_json_round_trip_is_lossless():
    config = ModelConfig(
        name="breast",
        num_classes=3,
        variant="espnet",
        class_names=("background", "tumour", "stroma"),
        class_colors=((0, 0, 0), (255, 0, 0), (0, 255, 0)),
        ignore_index=255,
        preprocessing=Preprocessing(channel_order="BGR", mean=(1.0, 2.0, 3.0), std=(4.0, 5.0, 6.0), scale_divisor=255),
        esp=EspBlockOptions(branches=4, hierarchical_fusion=False),
        target_mpp=0.5,
    )
    assert ModelConfig.from_json(config.to_json()) == config


def test_defaults_fill_class_names_and_distinct_colours():
    config = ModelConfig(name="x", num_classes=8)
    assert config.class_names[:2] == ("class_0", "class_1")
    assert len(set(config.class_colors)) == 8


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_classes": 1}, r"num_classes=1 must be >= 2"),
        ({"class_colors": ((0, 0, 0), (1, 2), (0, 0, 0))}, r"class colour \(1, 2\) is not valid"),
        ({"class_colors": ((0, 0, 0), (300, 0, 0), (0, 0, 0))}, r"class colour \(300, 0, 0\) is not valid"),
        ({"variant": "espnet-d"}, "variant='espnet-d' is not valid; expected one of 'espnet-a'"),
        ({"class_names": ("a", "b")}, "num_classes=3 but 2 class names"),
        ({"target_mpp": -1.0}, "target_mpp=-1.0 must be a positive"),
        ({"ignore_index": 300}, "ignore_index=300"),
        ({"in_channels": 4}, "3 mean values for in_channels=4"),
    ],
)
def test_invalid_configs_name_the_bad_value(fields, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{"name": "x", "num_classes": 3, **fields})


def test_lists_become_tuples_so_configs_stay_hashable():
    config = ModelConfig(name="x", num_classes=2, class_names=["a", "b"], class_colors=[[0, 0, 0], [1, 2, 3]])
    assert config.class_names == ("a", "b")
    assert config.class_colors == ((0, 0, 0), (1, 2, 3))
    assert hash(config) == hash(ModelConfig.from_json(config.to_json()))


def test_unknown_keys_and_future_versions_are_rejected():
    data = ModelConfig(name="x", num_classes=2).to_dict()
    with pytest.raises(ConfigError, match=r"unknown keys \['colour'\]"):
        ModelConfig.from_dict({**data, "colour": 1})
    with pytest.raises(ConfigError, match="format_version=99 is not supported"):
        ModelConfig.from_dict({**data, "format_version": 99})
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json("{")
    assert json.loads(ModelConfig(name="x", num_classes=2).to_json())["format_version"] == 1
