"""The command line, run as a user runs it: real subprocesses, real files, exit codes and messages."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wsi_espnet.models import load_model


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsi_espnet", *map(str, args)], capture_output=True, text=True, timeout=600
    )


def test_console_script_is_installed():
    script = shutil.which("wsi-espnet")
    assert script is not None, "pip install -e . should put wsi-espnet on PATH"
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.startswith("wsi-espnet ")


def _architecture_rows(stdout: str) -> list[list[str]]:
    """The rows of the architecture table (after the packaged models' table)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Architectures"))
    return [line.split() for line in lines[start + 4 :] if line.strip()]


def test_models_lists_parameters_and_multiply_adds():
    result = run_cli("models")
    assert result.returncode == 0, result.stderr
    rows = {row[0]: row for row in _architecture_rows(result.stdout)}
    assert rows["espnet"][1:3] == ["20", "364,569"]
    assert rows["espnet-c"][1:3] == ["20", "349,449"]
    assert {"espnet-a", "espnet-b", "espnet-c-shufflenet", "espnet-c-resnet"} <= rows.keys()
    assert float(rows["espnet"][3]) > float(rows["espnet-c"][3]) > 0


def test_models_for_another_class_count_and_size():
    result = run_cli("models", "--num-classes", "8", "--height", "256", "--width", "256")
    assert result.returncode == 0, result.stderr
    espnet = _architecture_rows(result.stdout)[0]
    assert espnet[:2] == ["espnet", "8"]
    default = _architecture_rows(run_cli("models").stdout)[0]
    # 256x256 is 1/8 of 1024x512's area; fewer classes shrink the class-wide layers further.
    assert float(espnet[3]) < float(default[3]) / 8


def test_convert_weights_writes_a_loadable_checkpoint(original_weights, tmp_path):
    out = tmp_path / "camvid.safetensors"
    result = run_cli("convert-weights", original_weights / "decoder_espnet_p_2_q_8_camvid.pth", out)
    assert result.returncode == 0, result.stderr
    assert "12 classes" in result.stdout
    assert "354,517 parameters" in result.stdout
    _, config = load_model(out)
    assert config.class_names[0] == "sky"
    assert config.preprocessing.channel_order == "BGR"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["convert-weights", "{tmp}/missing.pth", "{tmp}/o.safetensors"], 3, "does not exist or is not a file"),
        (["convert-weights", "{data}/bad-inputs/malformed-wsi.dcm", "{tmp}/o.safetensors"], 3,
         "truncated or corrupted"),
        (["convert-weights", "{weights}/decoder_espnet_p_2_q_3.pth", "{tmp}/o.safetensors", "--num-classes", "8"], 3,
         "predicts 20 classes but num_classes=8"),
        (["convert-weights", "{weights}/decoder_espnet_p_2_q_3.pth", "{tmp}/no/o.safetensors"], 2,
         "does not exist; create it first"),
        (["convert-weights", "{weights}/decoder_espnet_p_2_q_3.pth", "{tmp}"], 2, "is a folder; give a file name"),
        (["export", "{weights}/decoder_espnet_p_2_q_3.pth", "--onnx", "{tmp}"], 2, "is a folder; give a file name"),
        (["models", "--num-classes", "1"], 2, "num_classes=1 must be >= 2"),
        (["export", "{weights}/decoder_espnet_p_2_q_3.pth"], 2, "say which format to export: --onnx"),
        (["models", "--height", "100"], 2, "100 must be a positive multiple of 8"),
    ],
)  # fmt: skip
def test_user_mistakes_get_a_message_and_exit_code_not_a_traceback(shared_data, tmp_path, args, code, message):
    values = {"tmp": tmp_path, "data": shared_data, "weights": shared_data / "espnet-original" / "weights"}
    result = run_cli(*(a.format(**values) for a in args))
    assert result.returncode == code
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_unwritable_output_folder_fails_cleanly(original_weights):
    # /proc refuses new files even to root, which ignores permission bits.
    result = run_cli("convert-weights", original_weights / "encoder_espnet_p_2_q_3.pth", "/proc/o.safetensors")
    assert result.returncode == 3
    assert "cannot write '/proc/o.safetensors'" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_commands_and_exit_codes():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "Exit codes" in result.stdout
    assert np.all([cmd in result.stdout for cmd in ("models", "convert-weights", "export")])


def test_a_closed_pipe_is_not_an_error():
    # The reader goes away before the command writes anything (as `wsi-espnet models | true` does).
    process = subprocess.Popen(
        [sys.executable, "-m", "wsi_espnet", "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    process.stdout.close()
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 0
    assert "Traceback" not in stderr
