"""Export a model to ONNX with dynamic batch, height and width (multiples of 8).

The model config is stored in the ONNX file's metadata (key ``wsi_espnet_config``), so a runtime
that only has the ``.onnx`` file still knows the classes and the input preprocessing. Needs the
``onnx`` extra (``pip install 'wsi-espnet[onnx]'``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_espnet.atomic_files import replacing
from wsi_espnet.errors import InputError, check_output_folder
from wsi_espnet.models.checkpoint_io import CONFIG_METADATA_KEY
from wsi_espnet.models.config import ModelConfig
from wsi_espnet.models.espnet import TOTAL_STRIDE, check_input_size

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
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None:
        raise InputError("ONNX export needs the onnx extra: pip install 'wsi-espnet[onnx]'.")
    check_input_size(height, width)
    path = Path(path)
    check_output_folder(path)
    batch = torch.export.Dim("batch", min=1, max=1024)
    rows, cols = torch.export.Dim("rows_div8", min=1, max=8192), torch.export.Dim("cols_div8", min=1, max=8192)
    parameter = next(model.parameters())
    example = torch.zeros(1, config.in_channels, height, width, device=parameter.device, dtype=parameter.dtype)
    was_training = model.training
    onnx_logger = logging.getLogger("torch.onnx")
    log_level = onnx_logger.level
    model.eval()
    try:
        _export(
            model,
            example,
            path,
            {"image": {0: batch, 2: TOTAL_STRIDE * rows, 3: TOTAL_STRIDE * cols}},
            config,
            onnx_logger,
        )
    except OSError as exc:
        raise InputError(f"cannot write {str(path)!r}: {exc.strerror or exc}; choose a writable folder.") from exc
    finally:
        model.train(was_training)
        onnx_logger.setLevel(log_level)
    return path


def _export(
    model: nn.Module, example: torch.Tensor, path: Path, dynamic_shapes: dict[str, Any], config: ModelConfig,
    logger: logging.Logger,
) -> None:  # fmt: skip
    import onnx

    with replacing(path) as tmp_path:
        # The exporter reports progress on stdout and warns about unrelated optional packages.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logger.setLevel(logging.ERROR)
            torch.onnx.export(
                model,
                (example,),
                str(tmp_path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                external_data=False,
            )
        proto = onnx.load(str(tmp_path))
        entry = proto.metadata_props.add()
        entry.key, entry.value = CONFIG_METADATA_KEY, config.to_json()
        onnx.save(proto, str(tmp_path))
