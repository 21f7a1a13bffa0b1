"""Export a model to ONNX with dynamic batch, height and width (multiples of 8).

The model config is stored in the ONNX file's metadata (key ``wsi_espnet_config``), so a runtime
that only has the ``.onnx`` file still knows the classes and the input preprocessing. Needs the
``onnx`` extra (``pip install 'wsi-espnet[onnx]'``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from wsi_espnet.errors import InputError
from wsi_espnet.models.checkpoint_io import CONFIG_METADATA_KEY
from wsi_espnet.models.config import ModelConfig

__all__ = ["export_onnx"]

INPUT_NAME = "image"
OUTPUT_NAME = "logits"


def export_onnx(
    model: nn.Module,
    config: ModelConfig,
    path: str | os.PathLike[str],
    *,
    height: int = 512,
    width: int = 1024,
) -> Path:
    """Write ``model`` as ONNX to ``path``; returns the path.

    The graph takes ``image``: ``(B, in_channels, H, W)`` float32, already normalised (see
    ``config.preprocessing``), H and W multiples of 8, and returns ``logits``: ``(B, classes, H', W')``
    with ``H' = H / config.output_stride``. ``height`` and ``width`` only shape the tracing example.
    """
    try:
        import onnx
    except ImportError as exc:
        raise InputError("ONNX export needs the onnx extra: pip install 'wsi-espnet[onnx]'.") from exc
    if height % 8 or width % 8 or height <= 0 or width <= 0:
        raise InputError(f"height={height}, width={width}: both must be positive multiples of 8.")
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"output folder {str(path.parent)!r} does not exist; create it first.")
    batch = torch.export.Dim("batch", min=1, max=1024)
    rows, cols = torch.export.Dim("rows_div8", min=1, max=8192), torch.export.Dim("cols_div8", min=1, max=8192)
    example = torch.zeros(1, config.in_channels, height, width)
    model = model.eval()
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tmp_path = Path(tmp) / path.name
        # The exporter reports progress on stdout and warns about unrelated optional packages.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            torch.onnx.export(
                model,
                (example,),
                str(tmp_path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamo=True,
                dynamic_shapes={"image": {0: batch, 2: 8 * rows, 3: 8 * cols}},
                external_data=False,
            )
        proto = onnx.load(str(tmp_path))
        entry = proto.metadata_props.add()
        entry.key, entry.value = CONFIG_METADATA_KEY, config.to_json()
        onnx.save(proto, str(tmp_path))
        os.replace(tmp_path, path)
    return path
