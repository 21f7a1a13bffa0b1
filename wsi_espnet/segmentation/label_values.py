"""The values written into a segmentation mask and what they mean.

Mask value 0 means "no tissue" (outside the tissue mask, or not analysed); model class ``c`` is
written as ``c + 1``. Keeping 0 for "nothing here" follows the OME-NGFF labels convention and lets
every viewer show glass as transparent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_espnet.errors import InputError

if TYPE_CHECKING:  # reading a mask (the napari reader) must not import torch through wsi_espnet.models
    from wsi_espnet.models.config import ModelConfig

__all__ = ["NO_TISSUE", "LabelClass", "check_label_classes", "label_classes_for"]

NO_TISSUE = 0


@dataclass(frozen=True)
class LabelClass:
    """One mask value: its integer ``value``, a human ``name`` and an RGB ``color`` (0-255 each)."""

    value: int
    name: str
    color: tuple[int, int, int]


def label_classes_for(config: ModelConfig) -> list[LabelClass]:
    """The mask's value table for a model: ``no tissue`` (0) then each model class at ``c + 1``."""
    return [LabelClass(NO_TISSUE, "no tissue", (0, 0, 0))] + [
        LabelClass(index + 1, name, tuple(color))  # type: ignore[arg-type]
        for index, (name, color) in enumerate(zip(config.class_names, config.class_colors, strict=True))
    ]


def check_label_classes(classes: Sequence[LabelClass], dtype: np.dtype[Any]) -> None:
    """Raise :class:`InputError` unless values are unique and fit ``dtype`` and colours are RGB in 0-255."""
    if not classes:
        raise InputError("classes is empty; pass the mask's value table (see label_classes_for).")
    values = [c.value for c in classes]
    if len(set(values)) != len(values):
        raise InputError(f"class values must be unique, got {values}.")
    limits = np.iinfo(dtype)
    for c in classes:
        if not limits.min <= c.value <= limits.max:
            raise InputError(f"class {c.name!r} has value {c.value}, outside the mask's {dtype} range.")
        if len(c.color) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in c.color):
            raise InputError(f"class {c.name!r} has color {c.color!r}; expected three integers in 0-255.")
