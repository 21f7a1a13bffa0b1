"""Our .safetensors checkpoint format: lossless round trip, atomic writes, clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from wsi_espnet.errors import CheckpointError
from wsi_espnet.inference import predict
from wsi_espnet.models import (
    create_model,
    file_sha256,
    get_model_config,
    load_model,
    load_original_checkpoint,
    save_model,
)


@pytest.fixture(scope="module")
def converted(original_weights, tmp_path_factory):
    """The original Cityscapes ESPNet (alpha3=3) converted to our format."""
    model, config = load_original_checkpoint(original_weights / "decoder_espnet_p_2_q_3.pth")
    path = save_model(model, config, tmp_path_factory.mktemp("ckpt") / "espnet-cityscapes.safetensors")
    return model, config, path


def test_converted_checkpoint_round_trips_config_weights_and_predictions(converted, cityscapes_frame):
    model, config, path = converted
    loaded, loaded_config = load_model(path)
    assert loaded_config == config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    image = cityscapes_frame[::4, ::4].copy()
    assert (predict(loaded, image).labels == predict(model, image).labels).all()


def test_load_model_also_takes_original_pth_files(original_weights):
    _model, config = load_model(original_weights / "encoder_espnet_p_2_q_3.pth")
    assert config.variant == "espnet-c"


def test_saving_never_leaves_partial_files(converted, tmp_path):
    model, config, _ = converted
    save_model(model, config, tmp_path / "a.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
    with pytest.raises(CheckpointError, match=r"must end in \.safetensors"):
        save_model(model, config, tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match="does not exist; create it first"):
        save_model(model, config, tmp_path / "missing" / "a.safetensors")


def test_untrained_model_round_trip_changes_hash_with_weights(tmp_path):
    config = get_model_config("espnet", num_classes=3)
    torch.manual_seed(1)
    first = save_model(create_model("espnet", num_classes=3), config, tmp_path / "first.safetensors")
    torch.manual_seed(2)
    second = save_model(create_model("espnet", num_classes=3), config, tmp_path / "second.safetensors")
    assert file_sha256(first) != file_sha256(second)
    assert load_model(first)[1].num_classes == 3


def test_class_count_mismatch(converted):
    with pytest.raises(CheckpointError, match=r"predicts 20 classes .*road.* but num_classes=8"):
        load_model(converted[2], num_classes=8)


def test_truncated_checkpoint(converted, tmp_path):
    data = converted[2].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated, corrupted or of another kind"):
        load_model(tmp_path / "cut.safetensors")


def test_safetensors_from_elsewhere_is_rejected(tmp_path):
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="without a wsi-espnet model config"):
        load_model(tmp_path / "other.safetensors")


def test_weights_that_do_not_fit_their_config(converted, tmp_path):
    model, config, _ = converted
    wrong = config.replace(alpha3=5)
    save_model(model, wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(CheckpointError, match="do not fit the espnet its config describes"):
        load_model(tmp_path / "wrong.safetensors")


def test_strip_tiff_is_not_a_checkpoint(shared_data):
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(shared_data / "bad-inputs" / "strip-tiff-not-a-pyramid.tif")
