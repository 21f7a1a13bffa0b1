"""Reports of a :class:`~wsi_espnet.evaluation.confusion.ConfusionMatrix`: text table, JSON, heat map.

The functions take the plain dict of :meth:`ConfusionMatrix.to_dict` (or its ``(C, P)`` counts), so a
report can be redrawn from a saved ``metrics.json`` without the model or the data. Files are written
atomically. The heat map is drawn with Pillow alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image, ImageDraw, ImageFont

from wsi_espnet.atomic_files import write_atomically
from wsi_espnet.errors import InputError, check_output_folder

__all__ = ["HEAT_COLORS", "format_metrics_table", "render_confusion_png", "write_metrics_json"]

RGB = tuple[int, int, int]

#: The heat map's scale: white for 0 % of a true class's pixels, dark blue for 100 %.
HEAT_COLORS: tuple[RGB, RGB] = ((255, 255, 255), (8, 48, 107))
_NO_PIXELS: RGB = (225, 225, 225)  # rows of classes absent from the ground truth
_GRID: RGB = (200, 200, 200)
_TEXT: RGB = (0, 0, 0)
_MAX_NAME = 24
_PAD = 6


def format_metrics_table(metrics: Mapping[str, Any]) -> str:
    """A plain-text table of a :meth:`ConfusionMatrix.to_dict` result.

    One line per class (name, IoU %, accuracy %, true pixels), then mean IoU, pixel accuracy and mean
    class accuracy. Classes without a value (no pixels, never predicted) show ``n/a``.
    """
    classes = metrics["classes"]
    width = max([5, *(len(str(c["name"])) for c in classes)])
    lines = [f"{'class':<{width}} {'IoU':>8} {'accuracy':>9} {'pixels':>14}"]
    lines += [
        f"{c['name']:<{width}} {_percent(c['iou']):>8} {_percent(c['accuracy']):>9} {c['pixels']:>14,}" for c in classes
    ]
    lines.append("-" * len(lines[0]))
    lines.append(
        f"mean IoU {_percent(metrics['mean_iou'])}, pixel accuracy {_percent(metrics['pixel_accuracy'])}, "
        f"mean class accuracy {_percent(metrics['mean_class_accuracy'])} over {metrics['pixels']:,} pixels"
    )
    return "\n".join(lines)


def _percent(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.2f} %"


def write_metrics_json(
    path: str | os.PathLike[str], metrics: Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> Path:
    """Write ``extra`` (what was evaluated: model, data, settings) and ``metrics`` as one JSON object.

    The keys of ``extra`` come first, then those of ``metrics``; a key in both is an error. Values
    must be plain JSON (NaN is refused: :meth:`ConfusionMatrix.to_dict` already writes it as null).
    The file is replaced atomically.
    """
    path = Path(path)
    check_output_folder(path)
    extra = dict(extra or {})
    clashes = sorted(extra.keys() & metrics.keys())
    if clashes:
        raise InputError(f"extra keys {clashes} would overwrite metrics of the same name; rename them.")
    text = json.dumps({**extra, **metrics}, indent=2, allow_nan=False) + "\n"
    write_atomically(path, lambda partial: partial.write_text(text, encoding="utf-8"))
    return path


def render_confusion_png(
    matrix: ArrayLike, class_names: Sequence[str], path: str | os.PathLike[str], *, cell_size: int | None = None
) -> Path:
    """Draw a ``(C, P)`` confusion matrix as a row-normalised heat map and write it as PNG, atomically.

    Each row (a true class) is divided by its pixel count, so a cell is the share of that class
    predicted as the column's class, coloured on :data:`HEAT_COLORS`; rows without pixels are grey.
    Cells that are large enough show the share in per cent. ``class_names`` names the columns (P
    names) or only the rows (C names; extra columns are then numbered). ``cell_size`` is the side of
    a cell in pixels (default: 48 for a few classes, down to 12 for many); the image grows by exactly
    one cell per class in each direction, plus margins for the names.
    """
    counts = np.asarray(matrix)
    if counts.ndim != 2 or counts.shape[0] == 0 or counts.shape[0] > counts.shape[1]:
        raise InputError(
            f"confusion matrix of shape {counts.shape} is not (true classes, predicted classes) with at least as "
            "many predicted classes as true ones."
        )
    if counts.dtype.kind not in "iuf" or (counts < 0).any():
        raise InputError(f"confusion matrix must hold non-negative pixel counts, not {counts.dtype} values.")
    num_true, num_predicted = counts.shape
    if len(class_names) not in (num_true, num_predicted):
        raise InputError(
            f"{len(class_names)} class names were given for a {num_true}x{num_predicted} confusion matrix; "
            f"give {num_true} or {num_predicted}."
        )
    if cell_size is None:
        cell_size = int(np.clip(640 // num_predicted, 12, 48))
    elif cell_size < 4:
        raise InputError(f"cell_size={cell_size} is too small to see; use at least 4 pixels.")
    path = Path(path)
    check_output_folder(path)
    names = [_short(str(n)) for n in class_names] + [str(j) for j in range(len(class_names), num_predicted)]
    totals = counts.sum(axis=1, keepdims=True).astype(np.float64)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    image = _draw_heat_map(shares, totals[:, 0] > 0, names, cell_size)
    write_atomically(path, lambda partial: image.save(partial, format="PNG"))
    return path


def _short(name: str) -> str:
    return name if len(name) <= _MAX_NAME else name[: _MAX_NAME - 3] + "..."


def _draw_heat_map(
    shares: np.ndarray[Any, Any], has_pixels: np.ndarray[Any, Any], names: list[str], cell: int
) -> Image.Image:
    font = ImageFont.load_default()
    num_true, num_predicted = shares.shape
    line_height = _text_size(font, "Ag")[1]
    row_label_width = max(_text_size(font, n)[0] for n in names[:num_true])
    column_label_height = max(_text_size(font, n)[0] for n in names)
    left = _PAD + line_height + _PAD + row_label_width + _PAD
    top = _PAD + line_height + _PAD + column_label_height + _PAD
    image = Image.new("RGB", (left + num_predicted * cell + _PAD, top + num_true * cell + _PAD), "white")
    draw = ImageDraw.Draw(image)
    low, high = np.array(HEAT_COLORS[0], np.float64), np.array(HEAT_COLORS[1], np.float64)
    for row in range(num_true):
        for column in range(num_predicted):
            x, y = left + column * cell, top + row * cell
            share = float(shares[row, column])
            fill = tuple(int(v) for v in np.rint(low + share * (high - low))) if has_pixels[row] else _NO_PIXELS
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=fill, outline=_GRID)
            label = "" if share == 0 else "<1%" if share < 0.005 else f"{100 * share:.0f}%"
            width, height = _text_size(font, label)
            if label and width <= cell - 4 and height <= cell - 4:
                colour = HEAT_COLORS[0] if share > 0.5 else _TEXT
                draw.text((x + (cell - width) // 2, y + (cell - height) // 2), label, fill=colour, font=font)
    for row in range(num_true):
        width, height = _text_size(font, names[row])
        draw.text((left - _PAD - width, top + row * cell + (cell - height) // 2), names[row], fill=_TEXT, font=font)
    for column, name in enumerate(names):
        name_image = _rotated_text(font, name, line_height)
        image.paste(name_image, (left + column * cell + (cell - name_image.width) // 2, top - _PAD - name_image.height))
    title_width = _text_size(font, "predicted")[0]
    draw.text((left + (num_predicted * cell - title_width) // 2, _PAD), "predicted", fill=_TEXT, font=font)
    true_title = _rotated_text(font, "true", line_height)
    image.paste(true_title, (_PAD, top + (num_true * cell - true_title.height) // 2))
    return image


def _text_size(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str) -> tuple[int, int]:
    if not text:
        return 0, 0
    _, _, right, bottom = font.getbbox(text)
    return int(right), int(bottom)


def _rotated_text(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str, line_height: int) -> Image.Image:
    """``text`` reading bottom to top, as a label image on white."""
    label = Image.new("RGB", (max(1, _text_size(font, text)[0]), line_height), "white")
    ImageDraw.Draw(label).text((0, 0), text, fill=_TEXT, font=font)
    return label.rotate(90, expand=True)
