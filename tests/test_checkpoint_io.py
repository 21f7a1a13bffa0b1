"""Our .safetensors checkpoint format: lossless round trip, atomic writes, clear errors."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest
import torch
from safetensors.torch import save_file

from wsi_espnet.errors import CheckpointError, InputError
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


def test_saving_never_leaves_partial_files(converted, tmp_path, monkeypatch):
    model, config, _ = converted
    save_model(model, config, tmp_path / "a.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
    with pytest.raises(InputError, match=r"must end in \.safetensors"):
        save_model(model, config, tmp_path / "a.pth")
    with pytest.raises(InputError, match="does not exist; create it first"):
        save_model(model, config, tmp_path / "missing" / "a.safetensors")

    def full_disk(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device; choose a folder"):
        save_model(model, config, tmp_path / "b.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_weights_that_do_not_fit_the_config_are_refused_before_writing(converted, tmp_path):
    model, config, _ = converted
    with pytest.raises(CheckpointError, match="do not fit the espnet that config"):
        save_model(model, config.replace(alpha3=5), tmp_path / "wrong.safetensors")
    assert not (tmp_path / "wrong.safetensors").exists()


def test_wrapped_models_are_saved_unwrapped(converted, tmp_path):
    model, config, _ = converted
    path = save_model(torch.nn.DataParallel(model), config, tmp_path / "dp.safetensors")
    loaded, _ = load_model(path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_untrained_model_round_trip_and_hash(tmp_path):
    config = get_model_config("espnet", num_classes=3)
    torch.manual_seed(1)
    model = create_model("espnet", num_classes=3)
    first = save_model(model, config, tmp_path / "first.safetensors")
    assert file_sha256(first) == hashlib.sha256(first.read_bytes()).hexdigest()
    loaded, loaded_config = load_model(first)
    assert loaded_config == config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


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


def test_strip_tiff_is_not_a_checkpoint(shared_data):
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(shared_data / "bad-inputs" / "strip-tiff-not-a-pyramid.tif")
