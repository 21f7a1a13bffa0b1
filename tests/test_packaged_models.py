"""The trained models shipped in the package: listed, documented, used by default, and still as good."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_espnet.cli import main
from wsi_espnet.datasets.manifest import load_manifest
from wsi_espnet.evaluation.evaluate import evaluate_split
from wsi_espnet.models import load_model
from wsi_espnet.models.registry import DEFAULT_MODEL, default_model_path, list_packaged_models, resolve_model_path

MANIFESTS = Path(__file__).resolve().parent.parent / "data_manifests"


@pytest.fixture(autouse=True)
def _data(shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSI_ESPNET_TEST_DATA", str(shared_data))


def test_both_trained_models_ship_with_model_cards():
    packaged = {m.name: m for m in list_packaged_models()}
    assert next(iter(packaged)) == DEFAULT_MODEL == "espnet-breast-tumour"
    assert set(packaged) == {"espnet-breast-tumour", "espnet-camvid"}
    breast, camvid = packaged["espnet-breast-tumour"], packaged["espnet-camvid"]
    assert breast.config.class_names == ("other tissue", "tumour")
    assert breast.config.target_mpp == 1.0
    assert camvid.config.num_classes == 11
    assert camvid.config.target_mpp is None
    for model in packaged.values():
        card = model.card.read_text()
        for section in ("## Training data", "## Recipe", "## Metrics", "## Known limits", "## Licence", "Hardware"):
            assert section in card, (model.name, section)
        assert load_model(model.path)[1] == model.config
    assert default_model_path() == breast.path
    assert resolve_model_path("espnet-camvid") == camvid.path


def test_models_command_lists_the_trained_models(capsys: pytest.CaptureFixture[str]):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "espnet-breast-tumour" in out
    assert "[default]" in out
    assert "espnet-camvid" in out
    assert "espnet-c-mobilenet" in out  # the architectures are still listed


def test_segment_uses_the_breast_model_by_default(shared_data: Path, tmp_path: Path):
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    assert main(["segment", str(slide), "--out", str(tmp_path), "--quiet"]) == 0
    record = json.loads((tmp_path / "CMU-1-Small-Region.provenance.json").read_text())
    assert record["model"]["name"] == DEFAULT_MODEL
    assert record["resolution"]["target_mpp"] == 1.0
    names = [c["name"] for c in record["classes"]]
    assert names[1:] == ["other tissue", "tumour"]


def test_packaged_camvid_model_segments_camvid(shared_data: Path, tmp_path: Path):
    frame = sorted((shared_data / "street" / "camvid" / "val").glob("*.png"))[0]
    assert main(["predict", str(frame), "--model", "espnet-camvid", "--out", str(tmp_path)]) == 0
    labels = np.asarray(Image.open(tmp_path / f"{frame.stem}.labels.png"))
    truth = np.asarray(Image.open(frame.parent.parent / "valannot" / frame.name))
    valid = truth != 11
    assert np.mean(labels[valid] == truth[valid]) > 0.8


def test_default_breast_model_keeps_its_held_out_quality():
    """Regression guard on the held-out split named in the model card (figures there)."""
    model, config = load_model(default_model_path())
    confusion = evaluate_split(model, config, load_manifest(MANIFESTS / "breast-tumour.yaml"), "val")
    assert confusion.pixel_accuracy() > 0.75
    assert confusion.mean_iou() > 0.6
