"""The original authors' checkpoints: strict loading, exact reproduction, and clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from original_reference import original_forward
from PIL import Image

from wsi_espnet.errors import CheckpointError
from wsi_espnet.inference import predict, preprocess
from wsi_espnet.models import count_parameters, load_original_checkpoint

RELEASED = {
    "decoder_espnet_p_2_q_3.pth": ("espnet", 3, 20, 202_649),
    "decoder_espnet_p_2_q_5.pth": ("espnet", 5, 20, 267_417),
    "decoder_espnet_p_2_q_8.pth": ("espnet", 8, 20, 364_569),
    "decoder_espnet_p_2_q_8_camvid.pth": ("espnet", 8, 12, 354_517),
    "encoder_espnet_p_2_q_3.pth": ("espnet-c", 3, 20, 187_529),
    "encoder_espnet_p_2_q_5.pth": ("espnet-c", 5, 20, 252_297),
    "encoder_espnet_p_2_q_8.pth": ("espnet-c", 8, 20, 349_449),
}


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("filename", sorted(RELEASED))
def test_every_released_checkpoint_loads_strictly(original_weights, filename):
    variant, alpha3, classes, params = RELEASED[filename]
    model, config = load_original_checkpoint(original_weights / filename)
    assert (config.variant, config.alpha2, config.alpha3, config.num_classes) == (variant, 2, alpha3, classes)
    assert count_parameters(model) == params
    assert not model.training
    assert config.preprocessing.channel_order == "BGR"
    assert config.preprocessing.scale_divisor == 255
    # Every tensor of the file is used exactly once (strict load, nothing left over).
    file_tensors = sum(v.numel() for v in _state(original_weights / filename).values())
    ours = sum(v.numel() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked"))
    assert ours == file_tensors


@pytest.mark.parametrize(
    "filename", ["decoder_espnet_p_2_q_8.pth", "decoder_espnet_p_2_q_3.pth", "encoder_espnet_p_2_q_8.pth"]
)
def test_cityscapes_models_reproduce_the_original_dataflow_exactly(original_weights, cityscapes_frame, filename):
    model, config = load_original_checkpoint(original_weights / filename)
    # The authors' evaluation: normalise at 2048x1024, resize to 1024x512 (a 2x2 mean), run.
    image = F.interpolate(preprocess(cityscapes_frame, config.preprocessing), size=(512, 1024), mode="bilinear")
    with torch.no_grad():
        ours = model(image)
        reference = original_forward(image, _state(original_weights / filename))
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert torch.equal(ours.argmax(1), reference.argmax(1))


def test_cityscapes_segmentation_is_right_where_the_scene_is_unambiguous(original_weights, cityscapes_frame, tmp_path):
    model, config = load_original_checkpoint(original_weights / "decoder_espnet_p_2_q_8.pth")
    labels = predict(model, cityscapes_frame).labels
    assert labels.shape == cityscapes_frame.shape[:2]
    road, building = config.class_names.index("road"), config.class_names.index("building")
    assert np.mean(labels[600:880, 600:1400] == road) > 0.9  # the road ahead
    assert np.mean(labels[50:400, 50:500] == building) > 0.8  # the house on the left
    palette = np.array(config.class_colors, dtype=np.uint8)
    Image.fromarray(palette[labels]).save(tmp_path / "cityscapes-colour.png")
    with Image.open(tmp_path / "cityscapes-colour.png") as written:
        assert written.size == (2048, 1024)

    encoder, _ = load_original_checkpoint(original_weights / "encoder_espnet_p_2_q_8.pth")
    assert np.mean(predict(encoder, cityscapes_frame).labels == labels) > 0.75


def test_camvid_checkpoint_reproduces_and_segments_camvid(original_weights, shared_data):
    path = original_weights / "decoder_espnet_p_2_q_8_camvid.pth"
    model, config = load_original_checkpoint(path)
    assert config.decoder_level1_skip == "reinforced"
    assert config.class_names[-1] == "void"
    assert config.ignore_index == 11
    images = sorted((shared_data / "street" / "camvid" / "val").glob("*.png"))[:4]
    correct = total = 0
    for image_path in images:
        image = np.asarray(Image.open(image_path).convert("RGB"))
        truth = np.asarray(Image.open(image_path.parent.parent / "valannot" / image_path.name))
        labels = predict(model, image).labels
        valid = truth != config.ignore_index
        correct += int(np.sum(labels[valid] == truth[valid]))
        total += int(valid.sum())
    assert correct / total > 0.85
    batch = preprocess(image, config.preprocessing)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), original_forward(batch, _state(path)), rtol=0, atol=1e-5)


def test_data_parallel_prefix_is_accepted(original_weights, tmp_path):
    state = _state(original_weights / "encoder_espnet_p_2_q_3.pth")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "dp.pth")
    model, _ = load_original_checkpoint(tmp_path / "dp.pth")
    assert count_parameters(model) == 187_529


def test_class_count_mismatch_is_reported(original_weights):
    with pytest.raises(CheckpointError, match="predicts 20 classes but num_classes=8 was asked for"):
        load_original_checkpoint(original_weights / "decoder_espnet_p_2_q_8.pth", num_classes=8)
    with pytest.raises(CheckpointError, match="dataset='camvid' has 12 classes"):
        load_original_checkpoint(original_weights / "decoder_espnet_p_2_q_8.pth", dataset="camvid")


def test_a_checkpoint_of_another_network_is_rejected(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match=r"'fc\.weight' is not part of an original ESPNet checkpoint"):
        load_original_checkpoint(tmp_path / "resnet.pth")


def test_a_truncated_checkpoint_is_reported_as_corrupted(original_weights, tmp_path):
    data = (original_weights / "decoder_espnet_p_2_q_8.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_original_checkpoint(tmp_path / "cut.pth")


def test_a_dicom_file_is_not_a_checkpoint(shared_data, tmp_path):
    shutil.copy(shared_data / "bad-inputs" / "malformed-wsi.dcm", tmp_path / "weights.pth")
    with pytest.raises(CheckpointError, match=r"cannot read .* as a PyTorch checkpoint"):
        load_original_checkpoint(tmp_path / "weights.pth")


class _Payload:
    """Stands for an arbitrary pickled object, which weights-only loading must refuse."""


def test_pickled_objects_are_never_unpickled(tmp_path):
    torch.save({"level1.conv.weight": torch.zeros(1), "payload": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_original_checkpoint(tmp_path / "evil.pth")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_original_checkpoint(tmp_path / "nope.pth")


def test_an_empty_file_is_reported(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_original_checkpoint(tmp_path / "empty.pth")


def test_a_safetensors_file_is_not_an_original_checkpoint(tmp_path):
    from safetensors.torch import save_file

    save_file({"level1.conv.weight": torch.zeros(16, 3, 3, 3)}, str(tmp_path / "x.safetensors"))
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:-20])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_original_checkpoint(tmp_path / "cut.pth")


def test_non_string_keys_are_reported(tmp_path):
    torch.save({1: torch.zeros(1)}, tmp_path / "ints.pth")
    with pytest.raises(CheckpointError, match="not a state dict of tensors"):
        load_original_checkpoint(tmp_path / "ints.pth")


def test_an_incomplete_checkpoint_is_reported(original_weights, tmp_path):
    state = _state(original_weights / "decoder_espnet_p_2_q_3.pth")
    torch.save({k: v for k, v in state.items() if not k.startswith("conv.")}, tmp_path / "no-merge.pth")
    with pytest.raises(CheckpointError, match="without its level-1 merge"):
        load_original_checkpoint(tmp_path / "no-merge.pth")
    torch.save({k: v for k, v in state.items() if ".level3." not in k}, tmp_path / "no-level3.pth")
    with pytest.raises(CheckpointError, match="0 level-3 ESP blocks"):
        load_original_checkpoint(tmp_path / "no-level3.pth")
