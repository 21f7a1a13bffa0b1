"""Device and precision resolution (wsi_espnet.devices): the rules shared by segment, predict, train, evaluate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_ROOT

from wsi_espnet.devices import Placement, check_device_spec, check_precision, resolve
from wsi_espnet.errors import InputError

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="the rules for a process that sees no GPU")


@no_gpu
@pytest.mark.parametrize(("device", "precision", "expected"), [
    ("auto", "auto", Placement("cpu", "fp32")),
    ("cpu", "auto", Placement("cpu", "fp32")),
    ("auto", "fp32", Placement("cpu", "fp32")),
    ("cpu", "bf16", Placement("cpu", "bf16")),
    ("cpu", "fp16", Placement("cpu", "fp16")),
])  # fmt: skip
def test_without_a_gpu_auto_is_the_cpu_in_fp32(device, precision, expected):
    assert resolve(device, precision) == expected


def test_defaults_are_auto():
    assert resolve() == resolve("auto", "auto")


@pytest.mark.parametrize(("placement", "dtype"), [
    (Placement("cpu", "fp32"), None),
    (Placement("cpu", "bf16"), torch.bfloat16),
    (Placement("cuda:1", "fp16"), torch.float16),
])  # fmt: skip
def test_placement_gives_torch_device_and_autocast_dtype(placement, dtype):
    assert placement.torch_device == torch.device(placement.device)
    assert placement.autocast_dtype is dtype


@no_gpu
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_a_gpu_this_process_does_not_see_is_an_input_error(device, precision):
    with pytest.raises(InputError) as caught:
        resolve(device, precision)
    message = str(caught.value)
    assert f"device {device!r}" in message
    assert "sees 0 CUDA GPU(s)" in message
    assert "use device=cpu or auto" in message
    assert "use --device cpu or auto" in caught.value.cli_message()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_with_a_gpu_auto_is_cuda_in_fp16_and_a_missing_index_is_refused():
    assert resolve("auto", "auto") == Placement("cuda", "fp16")
    assert resolve("cuda:0", "bf16") == Placement("cuda:0", "bf16")
    assert resolve("cpu", "auto") == Placement("cpu", "fp32")
    count = torch.cuda.device_count()
    with pytest.raises(InputError, match=rf"device 'cuda:{count}' .* sees {count} CUDA GPU"):
        resolve(f"cuda:{count}")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "CUDA", "Cpu", "cuda:", "cuda:-1", "cuda:0:1", " cpu", "mps", ""])
def test_a_misspelt_device_lists_the_valid_forms(spec):
    with pytest.raises(InputError, match=r"is not one of auto, cpu, cuda, cuda:N") as caught:
        check_device_spec(spec)
    assert repr(spec) in str(caught.value)
    with pytest.raises(InputError, match=r"is not one of auto, cpu, cuda, cuda:N"):
        resolve(spec, "fp32")


@pytest.mark.parametrize("spec", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_valid_device_spellings_pass_unchanged(spec):
    assert check_device_spec(spec) == spec


@pytest.mark.parametrize("precision", ["fp64", "FP16", "half", "float16", ""])
def test_an_unknown_precision_lists_the_valid_ones(precision):
    with pytest.raises(InputError, match=r"is not one of auto, fp32, fp16, bf16") as caught:
        check_precision(precision)
    assert repr(precision) in str(caught.value)
    with pytest.raises(InputError, match=r"is not one of auto, fp32, fp16, bf16"):
        resolve("cpu", precision)


def _predict(shared_data: Path, out: Path, device: str) -> subprocess.CompletedProcess[str]:
    image = sorted((shared_data / "street" / "camvid" / "val").glob("*.png"))[0]
    command = [sys.executable, "-m", "wsi_espnet", "predict", str(image), "--out", str(out), "--device", device]
    return subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300)


def test_predict_on_a_missing_gpu_exits_2_with_one_line(shared_data: Path, tmp_path: Path):
    result = _predict(shared_data, tmp_path, f"cuda:{torch.cuda.device_count() + 3}")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("wsi-espnet: error: device 'cuda:")
    assert "CUDA GPU(s); use --device cpu or auto" in lines[0]
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


def test_predict_with_a_misspelt_device_exits_2_with_one_line(shared_data: Path, tmp_path: Path):
    result = _predict(shared_data, tmp_path, "gpu")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "wsi-espnet: error: device 'gpu' is not one of auto, cpu, cuda, cuda:N (e.g. cuda:1)."
    ]
