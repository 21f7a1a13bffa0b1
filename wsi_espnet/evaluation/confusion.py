"""One global confusion matrix over a whole dataset, and the metrics read from it.

Segmentation metrics are ratios of pixel counts summed over every image: an IoU averaged per image
(or per batch, as the original ESPNet training loop did) weights a 20-pixel pole in one frame as much
as a whole road in another and is not the published metric. :class:`ConfusionMatrix` therefore only
ever adds counts; IoU and accuracies are computed from the totals when asked for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from wsi_espnet.errors import InputError

__all__ = ["ConfusionMatrix"]

LabelArray = Tensor | NDArray[Any]


class ConfusionMatrix:
    """Pixel counts of (true class, predicted class), accumulated over any number of images.

    Parameters
    ----------
    num_classes : C, the classes of the ground truth (rows ``0..C-1``); metrics are per row class.
    num_predicted : P >= C, the classes a model can output (columns ``0..P-1``); defaults to C.
        Outputs ``C..P-1`` (e.g. a model's own "void" class) exist only as misses of the true class.
    ignore_index : target value of unlabelled pixels (e.g. 255, or CamVid's void 11), which are not
        counted. It must not be one of the C counted classes.

    The running ``(C, P)`` int64 counts live on the device of the last :meth:`update`, so GPU
    predictions are counted without copying them to the host.
    """

    def __init__(self, num_classes: int, *, num_predicted: int | None = None, ignore_index: int | None = None) -> None:
        num_predicted = num_classes if num_predicted is None else num_predicted
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise InputError(f"num_classes={num_classes!r} must be a positive integer.")
        if isinstance(num_predicted, bool) or not isinstance(num_predicted, int) or num_predicted < num_classes:
            raise InputError(
                f"num_predicted={num_predicted!r} must be an integer >= num_classes={num_classes}; the model's "
                "outputs include every true class."
            )
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            raise InputError(
                f"ignore_index={ignore_index} is one of the counted classes 0..{num_classes - 1}; count only the "
                f"labelled classes (for a void class last: ConfusionMatrix({num_classes - 1}, "
                f"num_predicted={num_predicted}, ignore_index={num_classes - 1}), whose void predictions count as "
                "misses) or give ignore_index a value outside them."
            )
        self.num_classes = num_classes
        self.num_predicted = num_predicted
        self.ignore_index = ignore_index
        self._counts = torch.zeros((num_classes, num_predicted), dtype=torch.int64)

    def __repr__(self) -> str:
        return (
            f"ConfusionMatrix(num_classes={self.num_classes}, num_predicted={self.num_predicted}, "
            f"ignore_index={self.ignore_index}, pixels={int(self._counts.sum())})"
        )

    def update(self, predicted: LabelArray, target: LabelArray) -> None:
        """Count one batch: ``predicted`` and ``target`` class ids of the same shape, any shape.

        Both may be torch tensors (counted with ``torch.bincount`` on their device) or numpy arrays, of
        any integer dtype. Pixels whose target is ``ignore_index`` are skipped. Raises
        :class:`InputError`, counting nothing, for a target outside ``0..C-1`` that is not the ignore
        index, a prediction outside ``0..P-1``, float inputs (logits or probabilities instead of class
        ids) or mismatched shapes.
        """
        predicted_ids = _class_ids(predicted, "predicted")
        target_ids = _class_ids(target, "target")
        if predicted_ids.shape != target_ids.shape:
            raise InputError(
                f"predicted has shape {tuple(predicted_ids.shape)} but target has shape {tuple(target_ids.shape)}; "
                "pass class ids of the same pixels (e.g. logits.argmax(1) for (B, C, H, W) logits)."
            )
        device = _common_device(predicted, target)
        predicted_ids = predicted_ids.reshape(-1).to(device=device, dtype=torch.int64)
        target_ids = target_ids.reshape(-1).to(device=device, dtype=torch.int64)
        if self.ignore_index is not None:
            counted = target_ids != self.ignore_index
            predicted_ids, target_ids = predicted_ids[counted], target_ids[counted]
        bad_target = (target_ids < 0) | (target_ids >= self.num_classes)
        bad_predicted = (predicted_ids < 0) | (predicted_ids >= self.num_predicted)
        if bool((bad_target.any() | bad_predicted.any()).item()):  # one host sync per batch, not two
            self._raise_out_of_range(target_ids[bad_target], predicted_ids[bad_predicted])
        pairs = target_ids * self.num_predicted + predicted_ids
        counts = torch.bincount(pairs, minlength=self.num_classes * self.num_predicted)
        if self._counts.device != counts.device:
            self._counts = self._counts.to(counts.device)
        self._counts += counts.reshape(self.num_classes, self.num_predicted)

    def _raise_out_of_range(self, bad_target: Tensor, bad_predicted: Tensor) -> None:
        if bad_target.numel():
            values = sorted({int(v) for v in torch.unique(bad_target)[:5]})
            ignore = "" if self.ignore_index is None else f" and is not the ignore index {self.ignore_index}"
            raise InputError(
                f"target value {values[0]} (of {values}) is outside the classes 0..{self.num_classes - 1}{ignore}; "
                "check the label encoding, or pass ignore_index= for the value that marks unlabelled pixels."
            )
        values = sorted({int(v) for v in torch.unique(bad_predicted)[:5]})
        raise InputError(
            f"predicted value {values[0]} (of {values}) is outside the model outputs 0..{self.num_predicted - 1}; "
            "pass num_predicted= with the model's class count."
        )

    def reset(self) -> None:
        """Forget every count (for example between epochs)."""
        self._counts.zero_()

    def merge(self, other: ConfusionMatrix) -> None:
        """Add ``other``'s counts to these (e.g. matrices from several workers or data loaders)."""
        if not isinstance(other, ConfusionMatrix):
            raise InputError(f"can only merge another ConfusionMatrix, not a {type(other).__name__}.")
        mine = (self.num_classes, self.num_predicted, self.ignore_index)
        theirs = (other.num_classes, other.num_predicted, other.ignore_index)
        if mine != theirs:
            raise InputError(
                f"cannot merge a matrix with (num_classes, num_predicted, ignore_index)={theirs} into one with {mine}; "
                "count both with the same settings."
            )
        self._counts += other._counts.to(self._counts.device)

    @property
    def device(self) -> torch.device:
        """Where the running counts live: the device of the last :meth:`update` (CPU before any)."""
        return self._counts.device

    @property
    def matrix(self) -> NDArray[np.int64]:
        """``(C, P)`` int64 copy of the counts: rows are true classes, columns predicted classes."""
        matrix: NDArray[np.int64] = self._counts.cpu().numpy().astype(np.int64, copy=True)
        return matrix

    def _true_positives_and_totals(self) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        matrix = self.matrix.astype(np.float64)
        true_positives = np.diagonal(matrix).copy()
        true_totals = matrix.sum(axis=1)  # every pixel of the class, wherever it was predicted
        predicted_totals = matrix[:, : self.num_classes].sum(axis=0)
        return true_positives, true_totals, predicted_totals

    def iou(self) -> NDArray[np.float64]:
        """``(C,)`` intersection over union per class; NaN for a class neither present nor predicted."""
        true_positives, true_totals, predicted_totals = self._true_positives_and_totals()
        return _ratio(true_positives, true_totals + predicted_totals - true_positives)

    def mean_iou(self) -> float:
        """Mean IoU over the classes that occur in the target or the prediction (NaN if none do)."""
        return _nan_mean(self.iou())

    def class_accuracy(self) -> NDArray[np.float64]:
        """``(C,)`` recall per class: correctly predicted / true pixels; NaN for classes without pixels."""
        true_positives, true_totals, _ = self._true_positives_and_totals()
        return _ratio(true_positives, true_totals)

    def mean_class_accuracy(self) -> float:
        """Mean recall over the classes that have pixels (NaN if none do)."""
        return _nan_mean(self.class_accuracy())

    def pixel_accuracy(self) -> float:
        """Correctly predicted / all counted pixels (NaN before anything was counted)."""
        true_positives, true_totals, _ = self._true_positives_and_totals()
        total = true_totals.sum()
        return float(true_positives.sum() / total) if total else math.nan

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """The metrics and counts as plain JSON types, NaN written as ``None``.

        ``class_names`` names the C true classes; a model's P names are accepted too (the first C are
        used). Keys: ``mean_iou``, ``pixel_accuracy``, ``mean_class_accuracy``, ``pixels`` (counted),
        ``classes`` (``index``, ``name``, ``iou``, ``accuracy``, ``pixels`` per class) and
        ``confusion_matrix`` (C lists of P counts). Ratios are fractions in 0..1, not percentages.
        """
        if class_names is None:
            class_names = [f"class_{i}" for i in range(self.num_classes)]
        if len(class_names) not in (self.num_classes, self.num_predicted):
            raise InputError(
                f"{len(class_names)} class names were given for a matrix of {self.num_classes} classes "
                f"({self.num_predicted} predicted); give one name per class."
            )
        matrix = self.matrix
        iou, accuracy = self.iou(), self.class_accuracy()
        classes = [
            {
                "index": index,
                "name": str(class_names[index]),
                "iou": _json_float(iou[index]),
                "accuracy": _json_float(accuracy[index]),
                "pixels": int(matrix[index].sum()),
            }
            for index in range(self.num_classes)
        ]
        return {
            "mean_iou": _json_float(self.mean_iou()),
            "pixel_accuracy": _json_float(self.pixel_accuracy()),
            "mean_class_accuracy": _json_float(self.mean_class_accuracy()),
            "pixels": int(matrix.sum()),
            "classes": classes,
            "confusion_matrix": matrix.tolist(),
        }


def _class_ids(values: LabelArray, name: str) -> Tensor:
    """A tensor view (numpy: a CPU copy) of integer class ids; floats are refused."""
    if isinstance(values, Tensor):
        if values.dtype.is_floating_point or values.dtype.is_complex:
            raise InputError(
                f"{name} is a {values.dtype} tensor; pass integer class ids (e.g. logits.argmax(1)), not scores."
            )
        return values.detach()
    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "iub":
            raise InputError(f"{name} is a {values.dtype} array; pass integer class ids, not scores.")
        return torch.from_numpy(values.astype(np.int64))
    raise InputError(f"{name} must be a torch tensor or a numpy array of class ids, not a {type(values).__name__}.")


def _common_device(*values: LabelArray) -> torch.device:
    devices = {v.device for v in values if isinstance(v, Tensor)}
    if len(devices) > 1:
        raise InputError(f"predicted and target are on different devices ({sorted(map(str, devices))}); move one.")
    return devices.pop() if devices else torch.device("cpu")


def _ratio(numerator: NDArray[np.float64], denominator: NDArray[np.float64]) -> NDArray[np.float64]:
    out = np.full(numerator.shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _nan_mean(values: NDArray[np.float64]) -> float:
    present = values[~np.isnan(values)]
    return float(present.mean()) if present.size else math.nan


def _json_float(value: float | np.floating[Any]) -> float | None:
    return None if math.isnan(value) else float(value)
