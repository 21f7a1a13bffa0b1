"""`wsi-espnet evaluate` gives the mIoU the authors' own model and metric give on the same CamVid frames."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from original_reference import original_forward
from PIL import Image

from wsi_espnet.cli import main

FRAMES = 12  # the first val frames; the whole split is measured in the closing note, not in CI
VOID = 11


def _manifest(tmp_path: Path, camvid: Path, names: list[str]) -> Path:
    classes = "\n".join(f"  - {{name: c{i}}}" for i in range(11))
    text = f"""manifest_version: 1
name: camvid-subset
kind: street
classes:
{classes}
ignore_index: {VOID}
sources:
  - layout: paired_folders
    root: {camvid}
    splits:
      val: {{images: val, masks: valannot, files: {json.dumps(names)}}}
"""
    path = tmp_path / "camvid-subset.yaml"
    path.write_text(text)
    return path


def _reference_miou(camvid: Path, names: list[str], weights: Path) -> tuple[float, np.ndarray]:
    """The authors' network (their key names, functional) and a global histogram, void excluded."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    # Their loadData.py statistics of CamVid train, BGR, then their extra division by 255.
    mean = np.array([110.33, 108.41, 105.03])  # rounded: the difference moves no label here
    std = np.array([72.13, 72.69, 69.90])
    hist = np.zeros((11, 12), dtype=np.int64)
    for name in names:
        rgb = np.asarray(Image.open(camvid / "val" / f"{name}.png").convert("RGB")).astype(np.float64)
        truth = np.asarray(Image.open(camvid / "valannot" / f"{name}.png")).astype(np.int64)
        x = ((rgb[..., ::-1] - mean) / std / 255.0).transpose(2, 0, 1)[None]
        with torch.no_grad():
            predicted = original_forward(torch.from_numpy(x.copy()).float(), state).argmax(1)[0].numpy()
        valid = truth != VOID
        hist += np.bincount(truth[valid] * 12 + predicted[valid], minlength=11 * 12).reshape(11, 12)
    tp = np.diag(hist[:, :11]).astype(np.float64)
    union = hist.sum(1) + hist[:, :11].sum(0) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return float(np.nanmean(iou)), iou


def test_evaluate_reproduces_the_original_model_and_metric(shared_data, original_weights, tmp_path, capsys):
    camvid = shared_data / "street" / "camvid"
    names = sorted(p.stem for p in (camvid / "val").glob("*.png"))[:FRAMES]
    weights = original_weights / "decoder_espnet_p_2_q_8_camvid.pth"
    manifest = _manifest(tmp_path, camvid, names)
    assert main(["evaluate", str(manifest), "--model", str(weights), "--out", str(tmp_path), "--quiet"]) == 0
    assert "mean IoU" in capsys.readouterr().out
    report = json.loads(next(tmp_path.glob("*evaluation_val.json")).read_text())
    expected_miou, expected_iou = _reference_miou(camvid, names, weights)
    assert report["mean_iou"] > 0.5  # the released model is good on CamVid
    assert abs(report["mean_iou"] - expected_miou) < 2e-4
    ours = np.array([np.nan if c["iou"] is None else c["iou"] for c in report["classes"]])
    np.testing.assert_allclose(ours, expected_iou, atol=2e-3)
