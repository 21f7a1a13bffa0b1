"""Model-only latency of every inference path, each against plain fp32 eager PyTorch measured in the same run.

Subjects (real weights on real inputs, from ``$WSI_ESPNET_TEST_DATA``, default ``../shared/data``):

- ESPNet and ESPNet-C, the authors' Cityscapes checkpoints, on a Cityscapes frame at 1024x512;
- the default model ``espnet-breast-tumour`` on CMU-1-Small-Region.svs tissue, at 1024x512 and at
  1968x1968, the window ``segment`` runs by default (a 1536-px tile and its 216-px halo).

Paths: eager fp32 (the baseline), channels_last (the ``torch`` runtime), bf16/fp16 autocast,
torch.compile, the ``openvino``, ``openvino-bf16`` (CPUs with native bf16) and ``onnx`` runtimes
of :mod:`wsi_espnet.inference.runtimes` (the shipped code), and, with ``--int8``, OpenVINO int8 by
NNCF post-training quantisation calibrated on other real crops (measured, not shipped; its
unquantised layers run at OpenVINO's default precision, bf16 on CPUs with native bf16). Each row:
median latency, the ratio to eager fp32, and the
share of pixels whose label equals eager fp32's. Last, what ``--runtime auto`` picks on that input.

    python benchmarks/model_speed.py [--repeats 5] [--device cpu|cuda] [--skip-compile] [--int8] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from wsi_espnet.devices import resolve
from wsi_espnet.inference import preprocess
from wsi_espnet.inference.runtimes import ModelRuntime, available_runtimes
from wsi_espnet.models import ModelConfig, load_model, load_original_checkpoint
from wsi_espnet.models.registry import default_model_path
from wsi_espnet.slides import open_slide

Runner = Callable[[torch.Tensor], torch.Tensor]


class Subject:
    """A model, an input batch, and real crops (never the input) to calibrate int8 on."""

    def __init__(self, name: str, model: torch.nn.Module, config: ModelConfig, batch: torch.Tensor,
                 calibration: list[torch.Tensor]) -> None:  # fmt: skip
        self.name, self.model, self.config, self.batch, self.calibration = name, model, config, batch, calibration


def load_subjects(data: Path) -> list[Subject]:
    subjects = []
    weights = data / "espnet-original" / "weights"
    frames = sorted((data / "espnet-original" / "cityscapes-samples").glob("*.png"))[:2]
    if weights.is_dir() and len(frames) == 2:
        for name, file in (("ESPNet", "decoder_espnet_p_2_q_8.pth"), ("ESPNet-C", "encoder_espnet_p_2_q_8.pth")):
            model, config = load_original_checkpoint(weights / file)
            test, other = (preprocess(np.asarray(Image.open(f).convert("RGB")), config.preprocessing) for f in frames)
            batch = F.interpolate(test, size=(512, 1024), mode="bilinear")
            calibration = [other[..., r : r + 512, c : c + 1024] for r in (0, 256, 512) for c in (0, 512, 1024)]
            subjects.append(Subject(f"{name} cityscapes 1024x512", model, config, batch, calibration))
    slide = data / "slides" / "CMU-1-Small-Region.svs"
    if slide.is_file():
        model, config = load_model(default_model_path())
        with open_slide(slide) as reader:
            image = reader.read_level(0)
        tissue = preprocess(np.ascontiguousarray(image), config.preprocessing)  # level 0, 2967 x 2220
        for height, width in ((512, 1024), (1968, 1968)):
            top, left = (tissue.shape[2] - height) // 2, (tissue.shape[3] - width) // 2
            batch = tissue[..., top : top + height, left : left + width].contiguous()
            calibration = [tissue[..., r : r + height, c : c + width] for r in (0, tissue.shape[2] - height)
                           for c in (0, tissue.shape[3] - width)]  # fmt: skip
            subjects.append(Subject(f"breast CMU tissue {width}x{height}", model, config, batch, calibration))
    if not subjects:
        sys.exit(f"no test data under {data}: set WSI_ESPNET_TEST_DATA to the shared data folder")
    return subjects


def median_seconds(run: Runner, batch: torch.Tensor, repeats: int, sync: Callable[[], None]) -> float:
    for _ in range(2):
        run(batch)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(batch)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def openvino_int8(model: torch.nn.Module, calibration: list[torch.Tensor]) -> Runner:
    """OpenVINO int8 by NNCF post-training quantisation, calibrated on real crops (measured, not shipped)."""
    import nncf
    import openvino as ov

    converted = ov.convert_model(copy.deepcopy(model).cpu(), example_input=calibration[0].contiguous())
    quantised = nncf.quantize(
        converted, nncf.Dataset([c.contiguous().numpy() for c in calibration]), preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(calibration),
    )  # fmt: skip
    request = ov.Core().compile_model(quantised, "CPU", {"PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
    return lambda x: torch.from_numpy(request.infer({0: x.numpy()})[0].copy())


def paths_for(subject: Subject, device: str, skip_compile: bool, int8: bool) -> dict[str, Runner]:
    model = subject.model

    def eager(m: torch.nn.Module, memory_format: torch.memory_format = torch.contiguous_format) -> Runner:
        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return m(x.contiguous(memory_format=memory_format))

        return run

    paths: dict[str, Runner] = {"eager fp32": eager(model)}
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    paths["channels_last (torch)"] = eager(cl_model, torch.channels_last)
    autocast_dtype = torch.bfloat16 if device == "cpu" else torch.float16

    def autocast_run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device_type=device, dtype=autocast_dtype):
            return cl_model(x.contiguous(memory_format=torch.channels_last)).float()

    paths[f"autocast {str(autocast_dtype).removeprefix('torch.')}"] = autocast_run
    if not skip_compile:
        compiled = torch.compile(cl_model, mode="max-autotune-no-cudagraphs" if device == "cuda" else "default")
        paths["torch.compile"] = eager(compiled, torch.channels_last)
    if device == "cpu":
        placement = resolve("cpu", "fp32")
        for name in ("openvino", "openvino-bf16", "onnx"):
            if name in available_runtimes():
                paths[f"runtime {name}"] = ModelRuntime(copy.deepcopy(model), placement, name).logits
        if int8 and importlib.util.find_spec("nncf") is not None:
            paths["openvino int8 (NNCF)"] = openvino_int8(model, subject.calibration)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-compile", action="store_true", help="leave out torch.compile (slow to compile)")
    parser.add_argument("--int8", action="store_true", help="also measure OpenVINO int8 (needs nncf)")
    parser.add_argument("--only", default=None, help="run only subjects whose name contains this text")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    data = Path(os.environ.get("WSI_ESPNET_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    subjects = [s for s in load_subjects(data) if args.only is None or args.only in s.name]
    device_type = torch.device(args.device).type
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}; median of {args.repeats}")  # fmt: skip
    print(f"{'subject':<31} {'path':<22} {'median ms':>10} {'vs eager':>9} {'labels = eager':>15}")
    results = []
    for subject in subjects:
        subject.model = subject.model.to(args.device).eval()
        batch = subject.batch.to(args.device)
        with torch.inference_mode():
            reference = subject.model(batch).argmax(1)
        baseline = None
        for path_name, run in paths_for(subject, device_type, args.skip_compile, args.int8).items():
            seconds = median_seconds(run, batch, args.repeats, sync)
            baseline = baseline or seconds
            agreement = (run(batch).to(reference.device).argmax(1) == reference).float().mean().item()
            results.append({"subject": subject.name, "path": path_name, "median_s": seconds,
                            "speedup": baseline / seconds, "label_agreement": agreement})  # fmt: skip
            print(f"{subject.name:<31} {path_name:<22} {seconds * 1e3:>10.1f} {baseline / seconds:>8.2f}x "
                  f"{agreement:>15.6f}")  # fmt: skip
            sys.stdout.flush()
        placement = resolve(args.device, "fp32")
        auto = ModelRuntime(copy.deepcopy(subject.model), placement, "auto")
        auto.logits(batch.cpu() if device_type == "cpu" else batch)
        assert auto.choice is not None
        checked = ", ".join(f"{n} {c['seconds'] * 1e3:.0f} ms" for n, c in auto.choice.check.items())
        print(f"{subject.name:<31} auto picks {auto.choice.name} ({checked or 'no check on this device'})")
        results.append({"subject": subject.name, "auto": auto.choice.as_record()})
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
