"""Inference runtimes: torch, OpenVINO and ONNX Runtime give PyTorch's labels on real tissue; auto checks and caches."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from wsi_espnet import cli
from wsi_espnet.devices import Placement, resolve
from wsi_espnet.errors import InputError
from wsi_espnet.inference import preprocess, runtimes
from wsi_espnet.inference.predict import class_labels, padded_forward, predict
from wsi_espnet.inference.runtimes import (
    AUTO_CANDIDATES,
    MIN_AGREEMENT,
    OPENVINO_SHAPES,
    RUNTIMES,
    ModelRuntime,
    available_runtimes,
    check_runtime,
    choices_file,
    native_bf16,
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


@pytest.fixture
def default_model():
    return load_model(default_model_path())


def test_cli_lists_the_same_runtimes_as_the_library():
    assert cli.RUNTIMES == RUNTIMES
    schema = json.loads((cli.Path(cli.__file__).parent / "batch" / "pipeline.schema.json").read_text())
    assert tuple(schema["properties"]["segmentation"]["properties"]["runtime"]["enum"]) == RUNTIMES


def test_a_misspelt_runtime_says_which_exist():
    with pytest.raises(InputError, match="runtime 'tensorrt' is not one of auto, torch, openvino, openvino-bf16, onnx"):
        check_runtime("tensorrt")


@pytest.mark.parametrize("name", ["openvino", "onnx"])
def test_cpu_runtimes_refuse_a_gpu_or_autocast_with_a_way_out(default_model, name):
    model, _ = default_model
    with pytest.raises(InputError, match=rf"runtime '{name}' runs on the CPU.*runtime=torch"):
        ModelRuntime(model, Placement("cuda", "fp16"), name)
    with pytest.raises(InputError, match=rf"runtime '{name}' runs fp32 only.*precision=fp32"):
        ModelRuntime(model, Placement("cpu", "bf16"), name)


@pytest.mark.parametrize(("name", "least_agreement"), [("openvino", 0.9999), ("onnx", 0.9999), ("openvino-bf16", 0.99)])
def test_each_runtime_gives_pytorchs_labels_on_real_tissue(default_model, tissue, name, least_agreement):
    if name == "openvino-bf16" and not native_bf16():
        pytest.skip("this CPU has no native bf16 (AVX512-BF16 or AMX), so openvino-bf16 is not offered here")
    assert name in available_runtimes(), f"{name} is a dependency of the test extra"
    model, config = default_model
    batch = preprocess(tissue[:, :1020], config.preprocessing)  # 1020: padded to a multiple of 8 like a slide edge
    with torch.inference_mode():
        reference = padded_forward(model, batch).argmax(1)
        labels = padded_forward(ModelRuntime(model, CPU, name).logits, batch).argmax(1)
    assert labels.shape == reference.shape == (1, 768, 1020)
    # fp32 paths differ from PyTorch only by summation order (OpenVINO is asked for f32: on a CPU with native
    # bf16 its default would be bf16, which flipped 5 in 10,000 pixels); bf16 may flip a few more.
    assert (labels == reference).float().mean().item() >= least_agreement
    assert 0.01 < reference.float().mean().item() < 0.99  # both classes present: the comparison means something


def test_bf16_is_offered_only_where_the_cpu_computes_it(default_model, monkeypatch):
    model, _ = default_model
    monkeypatch.setattr(runtimes, "native_bf16", lambda: False)  # this CPU's answer may be either
    assert "openvino-bf16" not in available_runtimes()
    assert "openvino" in available_runtimes()
    with pytest.raises(InputError, match=r"runtime 'openvino-bf16' needs a CPU that computes bfloat16 natively"):
        ModelRuntime(model, CPU, "openvino-bf16")


def test_auto_checks_every_candidate_and_picks_the_fastest_that_agrees(default_model, tissue):
    model, config = default_model
    batch = preprocess(tissue, config.preprocessing)
    choices_file().unlink(missing_ok=True)
    runtime = ModelRuntime(model, CPU, "auto")
    assert runtime.choice is None  # nothing runs before the first batch
    logits = runtime.logits(batch)
    choice = runtime.choice
    assert choice is not None
    assert choice.requested == "auto"
    assert set(choice.check) == set(available_runtimes()) & set(AUTO_CANDIDATES)
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

    # Any window size reuses the check: its input is always CHECK_SIDE square, so whichever window of a
    # slide a process meets first (an edge window is smaller), it runs the same path as the others.
    smaller = ModelRuntime(model, CPU, "auto")
    smaller.logits(batch[..., :512, :504])
    assert smaller.choice == choice
    assert len(json.loads(choices_file().read_text())) == 1


def test_an_unreadable_choices_cache_is_checked_again(default_model, tissue):
    model, config = default_model
    choices_file().parent.mkdir(parents=True, exist_ok=True)
    choices_file().write_text("{not json")
    runtime = ModelRuntime(model, CPU, "auto")
    runtime.logits(preprocess(tissue[:256, :256], config.preprocessing))
    assert runtime.choice is not None
    assert set(runtime.choice.check) == set(available_runtimes()) & set(AUTO_CANDIDATES)
    assert len(json.loads(choices_file().read_text())) == 1


def test_predict_on_each_runtime_equals_torch(default_model, tissue):
    model, config = default_model
    reference = predict(model, tissue, config=config).labels
    for name in ("openvino", "onnx", "auto"):
        labels = predict(model, tissue, config=config, runtime=name).labels
        assert labels.shape == reference.shape
        assert labels.dtype == reference.dtype
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
    assert bad.returncode == 2
    assert "invalid choice: 'tensorrt'" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_class_labels_is_argmax_in_either_layout(memory_format):
    logits = torch.randn(2, 5, 33, 47).contiguous(memory_format=memory_format)
    assert torch.equal(class_labels(logits), logits.argmax(1))
    assert torch.equal(class_labels(logits[0], 0), logits[0].argmax(0))


def test_openvino_serves_several_window_shapes_and_comes_back_to_an_evicted_one(default_model, tissue):
    model, config = default_model
    runtime = ModelRuntime(model, CPU, "openvino")
    shapes = [(64, 64), (128, 64), (64, 128), (128, 128), (192, 64), (64, 64)]  # 5 shapes > OPENVINO_SHAPES
    assert len(set(shapes)) > OPENVINO_SHAPES
    for height, width in shapes:
        batch = preprocess(tissue[:height, :width], config.preprocessing)
        with torch.inference_mode():
            reference = model(batch).argmax(1)
            labels = class_labels(runtime.logits(batch))
        assert labels.shape == (1, height, width)
        assert (labels == reference).float().mean().item() >= MIN_AGREEMENT


def test_segment_records_the_runtime_and_openvino_agrees_with_torch(shared_data, tmp_path):
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    masks = {}
    for name in ("torch", "openvino", "auto"):
        out = tmp_path / name
        result = subprocess.run(
            [sys.executable, "-m", "wsi_espnet", "segment", slide, "--out", out, "--runtime", name,
             "--tile-size", "512", "--quiet"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        execution = json.loads((out / "CMU-1-Small-Region.provenance.json").read_text())["execution"]
        assert execution["runtime_requested"] == name
        assert execution["runtime"] == ([name] if name != "auto" else [execution["runtime_checks"][0]["runtime"]])
        if name == "auto":
            (check,) = execution["runtime_checks"]
            assert set(check["check"]) == set(available_runtimes()) & set(AUTO_CANDIDATES)
            assert check["measured"]
            assert execution["runtime_agreement"] >= MIN_AGREEMENT
        masks[name] = zarr.open_array(out / "CMU-1-Small-Region.mask.zarr" / "labels" / "tissue_classes" / "0")[:]
    assert masks["torch"].shape == masks["openvino"].shape
    tissue_pixels = masks["torch"] > 0
    assert tissue_pixels.mean() > 0.1
    assert (masks["torch"] == masks["openvino"])[tissue_pixels].mean() >= MIN_AGREEMENT
    assert (masks["torch"] == masks["auto"])[tissue_pixels].mean() >= MIN_AGREEMENT


HEAP_PROBE = """
import ctypes, sys
import numpy as np
from wsi_espnet.heap import keep_heap_flat

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "flat":
    assert keep_heap_flat() and keep_heap_flat()  # applied, once per process
large = np.ones(16 << 20, dtype=np.uint8)
del large  # glibc's dynamic threshold now rises to 16 MiB
before = libc.mallinfo2().hblkhd
buffer = np.ones(2 << 20, dtype=np.uint8)
print(libc.mallinfo2().hblkhd - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the heap setting is glibc's")
def test_large_buffers_stay_mapped_after_a_larger_one_is_freed():
    """Without the fixed threshold, freeing 16 MiB raises glibc's threshold and 2 MiB comes from an arena."""
    mapped = {}
    for mode in ("default", "flat"):  # fresh processes: no other thread allocates meanwhile
        result = subprocess.run([sys.executable, "-c", HEAP_PROBE, mode], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        mapped[mode] = int(result.stdout)
    # With glibc's dynamic threshold (here: mapped["default"] == 0; some environments fix it already) the
    # 2 MiB buffer comes from an arena; with keep_heap_flat it is always mapped, so freeing returns it.
    assert mapped["flat"] >= 2 << 20
    assert mapped["flat"] >= mapped["default"]


def test_openvino_sends_no_usage_telemetry(tmp_path):
    # OpenVINO's import and converter send usage events (and write ~/intel) unless the user opted out.
    code = (
        "import sys, torch\n"
        "from wsi_espnet.devices import resolve\n"
        "from wsi_espnet.inference.runtimes import ModelRuntime\n"
        "from wsi_espnet.models import load_model\n"
        "from wsi_espnet.models.registry import default_model_path\n"
        "model, _ = load_model(default_model_path())\n"
        "ModelRuntime(model, resolve('cpu', 'fp32'), 'openvino').logits(torch.zeros(1, 3, 64, 64))\n"
        "assert sys.modules.get('openvino_telemetry') is None, 'the telemetry package was imported'\n"
    )
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("CI", None)  # OpenVINO stays quiet in CI on its own; a user's machine is not CI
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "intel").exists(), "OpenVINO wrote its telemetry id and stats into HOME"


def test_processes_starting_together_share_one_check(tmp_path):
    # A batch's workers start at once on a fresh machine: one checks, the others wait and read its choice
    # (checking each for itself, they could pick different paths by a few milliseconds).
    code = (
        "import json, torch\n"
        "from wsi_espnet.devices import resolve\n"
        "from wsi_espnet.inference.runtimes import ModelRuntime\n"
        "from wsi_espnet.models import load_model\n"
        "from wsi_espnet.models.registry import default_model_path\n"
        "torch.set_num_threads(1)\n"
        "model, _ = load_model(default_model_path())\n"
        "runtime = ModelRuntime(model, resolve('cpu', 'fp32'), 'auto')\n"
        "runtime.logits(torch.rand(1, 3, 256, 256))\n"
        "print(json.dumps(runtime.choice.as_record()))\n"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    command = [sys.executable, "-c", code]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)]
    processes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True))
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err for _, err in outputs]
    first, second = (json.loads(out.splitlines()[-1]) for out, _ in outputs)
    assert first["check"] == second["check"]  # the same measured timings: one check, not two
    assert first["runtime"] == second["runtime"]
    assert len(json.loads((tmp_path / "wsi-espnet" / "runtime-choices.json").read_text())) == 1
