"""Whole-image prediction: preprocessing, any image size, logits upsampling, input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsi_espnet.errors import InputError
from wsi_espnet.inference import predict, predict_logits, preprocess
from wsi_espnet.models import Preprocessing, create_model


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return create_model("espnet", num_classes=4).eval()


def test_preprocess_applies_order_mean_std_and_divisor():
    image = np.array([[[10, 20, 30]]], dtype=np.uint8)
    prep = Preprocessing(channel_order="BGR", mean=(1.0, 2.0, 3.0), std=(2.0, 4.0, 9.0), scale_divisor=10.0)
    out = preprocess(image, prep)
    assert out.shape == (1, 3, 1, 1)
    expected = [(30 - 1) / 2 / 10, (20 - 2) / 4 / 10, (10 - 3) / 9 / 10]
    assert out.flatten().tolist() == pytest.approx(expected)


@pytest.mark.parametrize("shape", [(64, 96, 3), (61, 93, 3), (5, 7, 3), (200, 13, 3)])
def test_any_image_size_gives_labels_of_the_same_size(small_model, shape):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    before = image.copy()
    result = predict(small_model, image, return_probabilities=True)
    assert result.labels.shape == shape[:2]
    assert result.labels.dtype == np.uint8
    assert result.probabilities is not None
    assert result.probabilities.shape == (4, *shape[:2])
    np.testing.assert_allclose(result.probabilities.sum(0), 1.0, rtol=1e-5)
    assert (result.probabilities.argmax(0) == result.labels).all()
    assert (image == before).all()


def test_encoder_logits_are_upsampled_not_labels():
    torch.manual_seed(0)
    model = create_model("espnet-c", num_classes=3).eval()
    image = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    assert predict(model, image).labels.shape == (48, 64)
    batch = preprocess(image, model.config.preprocessing)
    with torch.no_grad():
        low = model(batch)
    full = predict_logits(model, batch)
    assert low.shape == (1, 3, 6, 8)
    torch.testing.assert_close(full, F.interpolate(low, size=(48, 64), mode="bilinear", align_corners=False))
    # Interpolated logits vary inside an 8x8 cell, so labels are not blocky copies of the coarse ones.
    assert not torch.equal(full[0, :, 1, 1], full[0, :, 6, 6])


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (
            np.zeros((8, 8), dtype=np.uint8),
            r"expected an \(H, W, 3\) uint8 RGB array, got a uint8 array of shape \(8, 8\)",
        ),
        (np.zeros((8, 8, 3), dtype=np.float32), "got a float32 array"),
        (np.zeros((8, 8, 4), dtype=np.uint8), "image has 4 channels but the model expects 3; convert it to RGB"),
        ([[0, 0, 0]], "got a list"),
    ],
)
def test_bad_images_are_explained(small_model, image, message):
    with pytest.raises(InputError, match=message):
        predict(small_model, image)


def test_a_model_in_training_mode_is_used_in_eval_mode_and_left_untouched():
    torch.manual_seed(0)
    model = create_model("espnet", num_classes=3)
    assert model.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    image = np.random.default_rng(2).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    labels = predict(model, image).labels
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert (labels == predict(model.eval(), image).labels).all()


def test_predict_runs_in_the_model_dtype():
    torch.manual_seed(0)
    model = create_model("espnet-c", num_classes=3).eval()
    image = np.random.default_rng(3).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    result = predict(model.to(torch.bfloat16), image, return_probabilities=True)
    assert result.labels.shape == (32, 48)
    assert result.probabilities is not None
    assert result.probabilities.dtype == np.float32


def test_empty_image_is_explained(small_model):
    with pytest.raises(InputError, match=r"image of shape \(0, 5, 3\) is empty"):
        predict(small_model, np.zeros((0, 5, 3), dtype=np.uint8))
