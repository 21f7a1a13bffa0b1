"""ONNX export through the CLI: onnxruntime gives the same labels as PyTorch on real images."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsi_espnet.inference import preprocess
from wsi_espnet.models import ModelConfig, load_model

onnx = pytest.importorskip("onnx", reason="needs the onnx extra: pip install 'wsi-espnet[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'wsi-espnet[onnx]'")


@pytest.fixture(scope="module")
def exported(original_weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    checkpoint, onnx_path = folder / "espnet.safetensors", folder / "espnet.onnx"
    for args in (
        ["convert-weights", str(original_weights / "decoder_espnet_p_2_q_8.pth"), str(checkpoint)],
        ["export", str(checkpoint), "--onnx", str(onnx_path), "--height", "256", "--width", "512"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "wsi_espnet", *args], capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr
    return checkpoint, onnx_path


def _agree(session, model, batch):
    """Fraction of equal labels, and whether every disagreement is a near tie in PyTorch's logits."""
    onnx_logits = torch.from_numpy(session.run(None, {"image": batch.numpy()})[0])
    with torch.no_grad():
        torch_logits = model(batch)
    assert onnx_logits.shape == torch_logits.shape
    differ = onnx_logits.argmax(1) != torch_logits.argmax(1)
    top2 = torch_logits.topk(2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1])[differ]
    return 1 - differ.float().mean().item(), bool((margin < 1e-3).all())


def test_onnxruntime_labels_equal_pytorch_labels(exported, cityscapes_frame):
    checkpoint, onnx_path = exported
    model, config = load_model(checkpoint)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    # The traced size, another size (dynamic H and W) and a batch of two.
    full = preprocess(cityscapes_frame, config.preprocessing)
    batches = [
        F.interpolate(full, size=(512, 1024), mode="bilinear"),
        F.interpolate(full, size=(360, 480), mode="bilinear"),
        torch.cat([F.interpolate(full, size=(256, 512), mode="bilinear")] * 2),
    ]
    for batch in batches:
        agreement, only_near_ties = _agree(session, model, batch)
        assert agreement > 0.9999
        assert only_near_ties


def test_onnx_file_carries_the_model_config(exported):
    checkpoint, onnx_path = exported
    proto = onnx.load(str(onnx_path))
    meta = {p.key: p.value for p in proto.metadata_props}
    config = ModelConfig.from_json(meta["wsi_espnet_config"])
    assert config == load_model(checkpoint)[1]
    assert json.loads(meta["wsi_espnet_config"])["preprocessing"]["scale_divisor"] == 255


def test_export_rejects_sizes_that_are_not_multiples_of_8(exported, tmp_path):
    from wsi_espnet.errors import InputError
    from wsi_espnet.inference.onnx_export import export_onnx

    model, config = load_model(exported[0])
    with pytest.raises(InputError, match="must be positive multiples of 8"):
        export_onnx(model, config, tmp_path / "x.onnx", height=100, width=64)
    assert not np.any([p.suffix == ".onnx" for p in tmp_path.iterdir()])
