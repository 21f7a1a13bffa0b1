"""OME-NGFF 0.5 metadata for the mask pyramid stored as a ``labels`` image in a zarr v3 store.

Layout (https://ngff.openmicroscopy.org/0.5/#labels-md)::

    <name>.zarr/                  root group; its attributes are not written here
      labels/                     {"ome": {"version": "0.5", "labels": [<label_name>, ...]}}
        <label_name>/             {"ome": {"version": "0.5", "multiscales": [...], "image-label": {...}}}
          0, 1, ...               uint8 (y, x) arrays from largest to smallest

The mask is on the slide's own pixel grid, so ``image-label.source.image`` is ``"../../"`` (the
spec's default), the place of an image of the slide. The root holds no image (no ``multiscales``),
so NGFF readers that start at the root find nothing: ome-zarr-py (and napari-ome-zarr, which uses
it) must be pointed at ``<name>.zarr/labels`` or ``<name>.zarr/labels/<label_name>``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from wsi_espnet.errors import InputError
from wsi_espnet.segmentation.label_values import NO_TISSUE, LabelClass, check_label_classes

__all__ = ["NGFF_VERSION", "write_ngff_label_metadata"]

NGFF_VERSION = "0.5"

#: Axis order of every level, matching the arrays' ``dimension_names``.
_AXES = ("y", "x")


def write_ngff_label_metadata(
    root: zarr.Group,
    *,
    label_name: str,
    level_paths: Sequence[str],
    mpp: float,
    classes: Sequence[LabelClass],
    level_downsample: float = 2.0,
) -> None:
    """Describe ``root/labels/<label_name>`` as an NGFF 0.5 multiscale label image and register it.

    Parameters
    ----------
    root : zarr.Group
        The store's root group (zarr v3); ``labels/<label_name>/<path>`` must already hold each level
        as a 2-D integer array with ``dimension_names == ("y", "x")``.
    label_name : str
        Name of the label image inside ``labels/``.
    level_paths : sequence of str
        Level array paths relative to the label group, largest first (as from
        :func:`~wsi_espnet.outputs.pyramid.build_label_pyramid`).
    mpp : float
        Level-0 pixel size in micrometres (the same along y and x).
    classes : sequence of LabelClass
        Mask values with names and colours; value 0 ("no tissue") is written fully transparent.
    level_downsample : float
        Size ratio between consecutive levels; level ``i`` has pixel size ``mpp * level_downsample**i``.

    Notes
    -----
    ``label_name`` is added to the ``labels`` list of ``labels/`` (existing entries kept, no
    duplicates), so writing the same label twice is harmless. Attributes outside the ``"ome"`` key
    are left untouched.
    """
    if not isinstance(mpp, int | float) or not math.isfinite(mpp) or mpp <= 0:
        raise InputError(f"mpp={mpp!r} must be a positive number of micrometres per level-0 pixel.")
    if not isinstance(level_downsample, int | float) or not math.isfinite(level_downsample) or level_downsample < 1:
        raise InputError(f"level_downsample={level_downsample!r} must be a number >= 1.")
    if not level_paths:
        raise InputError("level_paths is empty; pass at least the full-resolution level, e.g. ['0'].")
    labels_group = root.get("labels")
    label_group = labels_group.get(label_name) if isinstance(labels_group, zarr.Group) else None
    if not isinstance(labels_group, zarr.Group) or not isinstance(label_group, zarr.Group):
        raise InputError(f"no label group 'labels/{label_name}' in the store; write its levels before their metadata.")
    _check_levels(label_group, label_name, level_paths)
    check_label_classes(classes, label_group[level_paths[0]].dtype)  # type: ignore[union-attr]

    multiscale: dict[str, Any] = {
        "name": label_name,
        "axes": [{"name": axis, "type": "space", "unit": "micrometer"} for axis in _AXES],
        "datasets": [
            {
                "path": path,
                "coordinateTransformations": [{"type": "scale", "scale": [mpp * level_downsample**index] * 2}],
            }
            for index, path in enumerate(level_paths)
        ],
        "type": "mode",
        "metadata": {
            "description": "Most frequent value of each 2 x 2 block; ties go to the smallest non-zero value.",
            "method": "wsi_espnet.outputs.pyramid.downsample_labels",
        },
    }
    image_label: dict[str, Any] = {
        "version": NGFF_VERSION,
        "colors": [{"label-value": c.value, "rgba": [*c.color, 0 if c.value == NO_TISSUE else 255]} for c in classes],
        "properties": [{"label-value": c.value, "name": c.name} for c in classes],
        "source": {"image": "../../"},
    }
    label_group.attrs["ome"] = {"version": NGFF_VERSION, "multiscales": [multiscale], "image-label": image_label}

    existing = labels_group.attrs.get("ome")
    labels_ome: dict[str, Any] = dict(existing) if isinstance(existing, Mapping) else {}
    registered = list(labels_ome.get("labels", []))
    if label_name not in registered:
        registered.append(label_name)
    labels_group.attrs["ome"] = {**labels_ome, "version": NGFF_VERSION, "labels": registered}


def _check_levels(label_group: zarr.Group, label_name: str, level_paths: Sequence[str]) -> None:
    """Levels exist, are 2-D integer (y, x) arrays and shrink from first to last."""
    previous: tuple[int, ...] | None = None
    for path in level_paths:
        level = label_group.get(path)
        where = f"'labels/{label_name}/{path}'"
        if not isinstance(level, zarr.Array):
            raise InputError(f"level {where} is not an array in the store; found {sorted(label_group)}.")
        if level.ndim != 2 or not np.issubdtype(level.dtype, np.integer):
            raise InputError(
                f"level {where} must be a 2-D integer (y, x) label array, got {level.dtype} of shape {level.shape}."
            )
        dimension_names = level.metadata.dimension_names if level.metadata.zarr_format == 3 else None
        if dimension_names is None or tuple(dimension_names) != _AXES:
            raise InputError(
                f"level {where} has dimension_names={dimension_names!r}; NGFF 0.5 needs them to match the axes "
                f"{_AXES!r}: create the array with dimension_names={_AXES!r} (zarr v3)."
            )
        if previous is not None and any(side > before for side, before in zip(level.shape, previous, strict=True)):
            raise InputError(
                f"level {where} of shape {level.shape} is larger than the level before it {previous}; "
                "pass level_paths from largest to smallest."
            )
        previous = level.shape
