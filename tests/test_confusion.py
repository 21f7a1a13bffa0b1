"""The global confusion matrix: hand-computed counts and metrics, inputs, and why it is global."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from wsi_espnet.errors import InputError
from wsi_espnet.evaluation import ConfusionMatrix

# Six pixels, three classes: true 0 0 1 1 2 2, predicted 0 1 1 1 2 0.
TARGET = np.array([[0, 0, 1], [1, 2, 2]])
PREDICTED = np.array([[0, 1, 1], [1, 2, 0]])


def test_hand_computed_counts_and_metrics():
    matrix = ConfusionMatrix(3)
    matrix.update(PREDICTED, TARGET)
    np.testing.assert_array_equal(matrix.matrix, [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    assert matrix.matrix.dtype == np.int64
    # IoU = TP / (true + predicted - TP): class 0: 1/(2+2-1), class 1: 2/(2+3-2), class 2: 1/(2+1-1).
    np.testing.assert_allclose(matrix.iou(), [1 / 3, 2 / 3, 1 / 2])
    assert matrix.mean_iou() == pytest.approx(0.5)
    assert matrix.pixel_accuracy() == pytest.approx(4 / 6)
    np.testing.assert_allclose(matrix.class_accuracy(), [1 / 2, 1, 1 / 2])
    assert matrix.mean_class_accuracy() == pytest.approx(2 / 3)


def test_global_matrix_is_not_the_mean_of_per_image_ious():
    # Image A: 99 pixels of class 0 and one of class 1, all predicted 0. Image B: 100 pixels of class 1, all right.
    images = [
        (np.zeros(100, dtype=np.uint8), np.array([0] * 99 + [1], dtype=np.uint8)),
        (np.ones(100, dtype=np.uint8), np.ones(100, dtype=np.uint8)),
    ]
    per_image = []
    total = ConfusionMatrix(2)
    for predicted, target in images:
        single = ConfusionMatrix(2)
        single.update(predicted, target)
        per_image.append(single.mean_iou())
        total.update(predicted, target)
    # Per image: A has IoUs 0.99 and 0 (mean 0.495), B has class 1 only (1.0): average 0.7475.
    assert per_image == pytest.approx([0.495, 1.0])
    assert np.mean(per_image) == pytest.approx(0.7475)
    # Globally the one missed pixel barely matters: 99/100 and 100/101.
    np.testing.assert_allclose(total.iou(), [99 / 100, 100 / 101])
    assert total.mean_iou() == pytest.approx((0.99 + 100 / 101) / 2)
    assert abs(total.mean_iou() - np.mean(per_image)) > 0.2


def test_ignored_pixels_are_not_counted():
    matrix = ConfusionMatrix(3, ignore_index=255)
    target = np.array([0, 255, 1, 255, 2], dtype=np.uint8)
    predicted = np.array([0, 2, 1, 0, 1], dtype=np.uint8)
    matrix.update(predicted, target)
    np.testing.assert_array_equal(matrix.matrix, [[1, 0, 0], [0, 1, 0], [0, 1, 0]])
    assert matrix.to_dict()["pixels"] == 3


def test_extra_predicted_outputs_count_only_as_misses():
    # A CamVid-style model: two labelled classes plus its own "void" output 2, which is also the ignore value.
    matrix = ConfusionMatrix(2, num_predicted=3, ignore_index=2)
    matrix.update(np.array([2, 1, 0, 2]), np.array([0, 1, 1, 2]))
    np.testing.assert_array_equal(matrix.matrix, [[0, 0, 1], [1, 1, 0]])
    # Class 0: TP 0, 1 true, predicted once (by the class-1 pixel): IoU 0. Class 1: TP 1 of union 2.
    np.testing.assert_allclose(matrix.iou(), [0.0, 0.5])
    np.testing.assert_allclose(matrix.class_accuracy(), [0.0, 0.5])
    assert matrix.pixel_accuracy() == pytest.approx(1 / 3)


def test_torch_and_numpy_inputs_give_the_same_counts():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, (2, 17, 23))
    predicted = rng.integers(0, 5, (2, 17, 23))
    from_numpy, from_torch, mixed = ConfusionMatrix(5), ConfusionMatrix(5), ConfusionMatrix(5)
    from_numpy.update(predicted.astype(np.uint8), target.astype(np.int32))
    from_torch.update(torch.from_numpy(predicted), torch.from_numpy(target).to(torch.uint8))
    mixed.update(torch.from_numpy(predicted), target)
    np.testing.assert_array_equal(from_torch.matrix, from_numpy.matrix)
    np.testing.assert_array_equal(mixed.matrix, from_numpy.matrix)
    assert from_numpy.matrix.sum() == target.size
    assert from_torch.device == torch.device("cpu")


def test_merge_adds_counts_and_reset_clears_them():
    rng = np.random.default_rng(1)
    batches = [(rng.integers(0, 4, 50), rng.integers(0, 4, 50)) for _ in range(4)]
    whole, first, second = ConfusionMatrix(4), ConfusionMatrix(4), ConfusionMatrix(4)
    for index, (predicted, target) in enumerate(batches):
        whole.update(predicted, target)
        (first if index < 2 else second).update(predicted, target)
    first.merge(second)
    np.testing.assert_array_equal(first.matrix, whole.matrix)
    whole.reset()
    assert whole.matrix.sum() == 0
    with pytest.raises(InputError, match=r"cannot merge a matrix with .*\(3, 3, None\) into one with \(4, 4, None\)"):
        first.merge(ConfusionMatrix(3))


def test_matrix_is_a_copy():
    matrix = ConfusionMatrix(2)
    matrix.update(np.array([0, 1]), np.array([0, 1]))
    copy = matrix.matrix
    copy[:] = 100
    np.testing.assert_array_equal(matrix.matrix, np.eye(2))


def test_empty_and_absent_classes_give_nan_without_warnings():
    matrix = ConfusionMatrix(3)
    assert math.isnan(matrix.mean_iou())
    assert math.isnan(matrix.pixel_accuracy())
    assert math.isnan(matrix.mean_class_accuracy())
    matrix.update(np.array([0, 0, 1]), np.array([0, 1, 1]))
    iou = matrix.iou()
    assert math.isnan(iou[2])  # class 2 neither occurs nor is predicted
    assert matrix.mean_iou() == pytest.approx((1 / 2 + 1 / 2) / 2)


def test_to_dict_is_plain_json_with_null_for_nan():
    matrix = ConfusionMatrix(3, num_predicted=4)
    matrix.update(np.array([0, 3, 1]), np.array([0, 0, 1]))
    data = matrix.to_dict(["a", "b", "c", "void"])
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert data["classes"][2] == {"index": 2, "name": "c", "iou": None, "accuracy": None, "pixels": 0}
    assert data["classes"][0] == {"index": 0, "name": "a", "iou": 0.5, "accuracy": 0.5, "pixels": 2}
    assert data["confusion_matrix"] == [[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert data["pixels"] == 3
    assert data["pixel_accuracy"] == pytest.approx(2 / 3)
    assert data["mean_iou"] == pytest.approx(0.75)
    assert data["mean_class_accuracy"] == pytest.approx(0.75)
    assert [c["name"] for c in matrix.to_dict()["classes"]] == ["class_0", "class_1", "class_2"]
    with pytest.raises(InputError, match="2 class names were given for a matrix of 3 classes"):
        matrix.to_dict(["a", "b"])


@pytest.mark.parametrize(
    ("predicted", "target", "message"),
    [
        (np.array([0, 1]), np.array([0, 7]), r"target value 7 \(of \[7\]\) is outside the classes 0..2 and is not the "
         r"ignore index 255; check the label encoding"),
        (np.array([0, 1, 1]), np.array([-1, 9, 7]), r"target value -1 \(of \[-1, 7, 9\]\) is outside the classes"),
        (np.array([0, 5]), np.array([0, 1]), r"predicted value 5 \(of \[5\]\) is outside the model outputs 0..2; "
         "pass num_predicted="),
        (np.array([0.2, 0.8]), np.array([0, 1]), "predicted is a float64 array; pass integer class ids"),
        (torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), r"predicted is a torch.float32 tensor; "
         r"pass integer class ids \(e.g. logits.argmax\(1\)\)"),
        (np.zeros((4, 4), dtype=np.uint8), np.zeros((4, 5), dtype=np.uint8), r"predicted has shape \(4, 4\) but "
         r"target has shape \(4, 5\)"),
        ([0, 1], np.array([0, 1]), "predicted must be a torch tensor or a numpy array of class ids, not a list"),
    ],
)  # fmt: skip
def test_bad_inputs_are_explained_and_nothing_is_counted(predicted, target, message):
    matrix = ConfusionMatrix(3, ignore_index=255)
    with pytest.raises(InputError, match=message):
        matrix.update(predicted, target)
    assert matrix.matrix.sum() == 0


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((0,), {}, "num_classes=0 must be a positive integer"),
        ((3,), {"num_predicted": 2}, "num_predicted=2 must be an integer >= num_classes=3"),
        ((12,), {"ignore_index": 11}, r"ignore_index=11 is one of the counted classes 0..11; count only the labelled "
         r"classes \(for a void class last: ConfusionMatrix\(11, num_predicted=12, ignore_index=11\)"),
    ],
)  # fmt: skip
def test_inconsistent_settings_are_refused(args, kwargs, message):
    with pytest.raises(InputError, match=message):
        ConfusionMatrix(*args, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_counts_stay_on_the_gpu_and_match_the_cpu():
    rng = np.random.default_rng(2)
    target, predicted = rng.integers(0, 6, (3, 64, 64)), rng.integers(0, 7, (3, 64, 64))
    on_gpu, on_cpu = ConfusionMatrix(6, num_predicted=7), ConfusionMatrix(6, num_predicted=7)
    on_gpu.update(torch.from_numpy(predicted).cuda(), torch.from_numpy(target).cuda())
    on_cpu.update(predicted, target)
    assert on_gpu.device.type == "cuda"
    np.testing.assert_array_equal(on_gpu.matrix, on_cpu.matrix)
    with pytest.raises(InputError, match="different devices"):
        on_gpu.update(torch.from_numpy(predicted).cuda(), torch.from_numpy(target))


def test_real_camvid_labels_match_a_brute_force_count(shared_data):
    """Ground truth of two real CamVid frames against each other, as a stand-in prediction."""
    annotations = sorted((shared_data / "street" / "camvid" / "valannot").glob("*.png"))[:2]
    first, second = (np.asarray(Image.open(p)) for p in annotations)
    matrix = ConfusionMatrix(11, num_predicted=12, ignore_index=11)
    matrix.update(torch.from_numpy(second.copy()), torch.from_numpy(first.copy()))
    expected = np.zeros((11, 12), dtype=np.int64)
    counted = first != 11
    np.add.at(expected, (first[counted], second[counted]), 1)
    np.testing.assert_array_equal(matrix.matrix, expected)
    assert matrix.matrix.sum() == counted.sum() > 0.9 * first.size
