"""Inference runtimes: torch, OpenVINO and ONNX Runtime give PyTorch's labels on real tissue; auto checks, picks, caches."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from wsi_espnet import cli
from wsi_espnet.devices import Placement, resolve
from wsi_espnet.errors import InputError
from wsi_espnet.inference import preprocess
from wsi_espnet.inference.predict import padded_forward, predict
from wsi_espnet.inference.runtimes import (
    MIN_AGREEMENT,
    RUNTIMES,
    ModelRuntime,
    available_runtimes,
    check_runtime,
    choices_file,
)
from wsi_espnet.models import load_model
from wsi_espnet.models.registry import default_model_path
from wsi_espnet.slides import open_slide

CPU = resolve("cpu", "fp32")


@pytest.fixture(scope="module")
def tissue(shared_data) -> np.ndarray:
    """A 768 x 1024 crop of real H&E (CMU-1-Small-Region.svs, level 0), with an odd-sized edge piece."""
    with open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs") as reader:
        image = reader.read_region(0, 1000, 600, 768, 1024)
    return np.ascontiguousarray(image)


@pytest.fixture()
def default_model():
    return load_model(default_model_path())


def test_cli_lists_the_same_runtimes_as_the_library():
    assert cli.RUNTIMES == RUNTIMES
    schema = json.loads((cli.Path(cli.__file__).parent / "batch" / "pipeline.schema.json").read_text())
    assert tuple(schema["properties"]["segmentation"]["properties"]["runtime"]["enum"]) == RUNTIMES


def test_a_misspelt_runtime_says_which_exist():
    with pytest.raises(InputError, match="runtime 'tensorrt' is not one of auto, torch, openvino, onnx"):
        check_runtime("tensorrt")


@pytest.mark.parametrize("name", ["openvino", "onnx"])
def test_cpu_runtimes_refuse_a_gpu_or_autocast_with_a_way_out(default_model, name):
    model, _ = default_model
    with pytest.raises(InputError, match=rf"runtime '{name}' runs on the CPU.*runtime=torch"):
        ModelRuntime(model, Placement("cuda", "fp16"), name)
    with pytest.raises(InputError, match=rf"runtime '{name}' runs fp32 only.*precision=fp32"):
        ModelRuntime(model, Placement("cpu", "bf16"), name)


@pytest.mark.parametrize("name", ["openvino", "onnx"])
def test_each_runtime_gives_pytorchs_labels_on_real_tissue(default_model, tissue, name):
    assert name in available_runtimes(), f"{name} is a dependency of the test extra"
    model, config = default_model
    batch = preprocess(tissue[:, :1020], config.preprocessing)  # 1020: padded to a multiple of 8 like a slide edge
    with torch.inference_mode():
        reference = padded_forward(model, batch).argmax(1)
        labels = padded_forward(ModelRuntime(model, CPU, name).logits, batch).argmax(1)
    assert labels.shape == reference.shape == (1, 768, 1020)
    assert (labels == reference).float().mean().item() >= MIN_AGREEMENT
    assert 0.01 < reference.float().mean().item() < 0.99  # both classes present: the comparison means something


def test_auto_checks_every_candidate_and_picks_the_fastest_that_agrees(default_model, tissue):
    model, config = default_model
    batch = preprocess(tissue, config.preprocessing)
    choices_file().unlink(missing_ok=True)
    runtime = ModelRuntime(model, CPU, "auto")
    assert runtime.choice is None  # nothing runs before the first batch
    logits = runtime.logits(batch)
    choice = runtime.choice
    assert choice is not None and choice.requested == "auto"
    assert set(choice.check) == {"torch", "openvino"}  # ONNX Runtime joins only without OpenVINO
    assert choice.check["torch"]["agreement"] == 1.0
    eligible = {n: c["seconds"] for n, c in choice.check.items() if c["agreement"] >= MIN_AGREEMENT}
    assert choice.name == min(eligible, key=eligible.__getitem__)
    assert choice.agreement == choice.check[choice.name]["agreement"]
    with torch.inference_mode():
        reference = model(batch).argmax(1)
    assert (logits.argmax(1) == reference).float().mean().item() >= MIN_AGREEMENT

    # The check is kept: a new process (here a new runtime object) on this machine runs the same path, unchecked.
    cached = json.loads(choices_file().read_text())
    assert [entry["runtime"] for entry in cached.values()] == [choice.name]
    again = ModelRuntime(model, CPU, "auto")
    again.logits(batch)
    assert again.choice == choice

    # A different window size is a different check.
    ModelRuntime(model, CPU, "auto").logits(batch[..., :512, :512])
    assert len(json.loads(choices_file().read_text())) == 2


def test_an_unreadable_choices_cache_is_checked_again(default_model, tissue):
    model, config = default_model
    choices_file().parent.mkdir(parents=True, exist_ok=True)
    choices_file().write_text("{not json")
    runtime = ModelRuntime(model, CPU, "auto")
    runtime.logits(preprocess(tissue[:256, :256], config.preprocessing))
    assert runtime.choice is not None and set(runtime.choice.check) == {"torch", "openvino"}
    assert len(json.loads(choices_file().read_text())) == 1


def test_predict_on_each_runtime_equals_torch(default_model, tissue):
    model, config = default_model
    reference = predict(model, tissue, config=config).labels
    for name in ("openvino", "onnx", "auto"):
        labels = predict(model, tissue, config=config, runtime=name).labels
        assert labels.shape == reference.shape and labels.dtype == reference.dtype
        assert (labels == reference).mean() >= MIN_AGREEMENT, name


def test_predict_command_takes_a_runtime(tmp_path, tissue):
    image = tmp_path / "tissue.png"
    Image.fromarray(tissue).save(image)
    outputs = {}
    for name in ("torch", "openvino"):
        result = subprocess.run(
            [sys.executable, "-m", "wsi_espnet", "predict", image, "--out", tmp_path / name, "--runtime", name],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        outputs[name] = np.asarray(Image.open(tmp_path / name / "tissue.labels.png"))
    assert (outputs["torch"] == outputs["openvino"]).mean() >= MIN_AGREEMENT
    bad = subprocess.run(
        [sys.executable, "-m", "wsi_espnet", "predict", image, "--out", tmp_path, "--runtime", "tensorrt"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and "invalid choice: 'tensorrt'" in bad.stderr and "Traceback" not in bad.stderr
