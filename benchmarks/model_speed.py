"""Model-only latency of ESPNet and ESPNet-C at 1024x512, eager fp32 against each faster path.

Prints, per model and path, the median latency of one 1024x512 frame, the ratio to eager fp32 measured
in the same run, and the fraction of pixels whose label equals eager fp32's. Uses the original
Cityscapes checkpoints and a real Cityscapes frame when ``$WSI_ESPNET_TEST_DATA`` (default
``../shared/data``) has them, so label agreement is measured on a meaningful segmentation; otherwise
untrained weights and a random image.

    python benchmarks/model_speed.py [--repeats 10] [--device cpu|cuda] [--skip-compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from wsi_espnet.inference import preprocess
from wsi_espnet.inference.onnx_export import export_onnx
from wsi_espnet.models import ModelConfig, create_model, load_original_checkpoint

HEIGHT, WIDTH = 512, 1024
# The authors' implementation on the project's 2-core machine, as reported in the issue: a reference
# figure only, never divided into this run's measurements.
AUTHORS_CPU_SECONDS = 4.0
Runner = Callable[[torch.Tensor], torch.Tensor]


def load_subjects(data: Path) -> tuple[list[tuple[str, torch.nn.Module, ModelConfig]], torch.Tensor, str]:
    weights = data / "espnet-original" / "weights"
    frame = data / "espnet-original" / "cityscapes-samples" / "frankfurt_000000_000294_leftImg8bit.png"
    if weights.is_dir() and frame.is_file():
        subjects = []
        for name, file in (("ESPNet", "decoder_espnet_p_2_q_8.pth"), ("ESPNet-C", "encoder_espnet_p_2_q_8.pth")):
            model, config = load_original_checkpoint(weights / file)
            subjects.append((name, model, config))
        image = np.asarray(Image.open(frame).convert("RGB"))
        batch = F.interpolate(preprocess(image, subjects[0][2].preprocessing), size=(HEIGHT, WIDTH), mode="bilinear")
        return subjects, batch, f"original Cityscapes checkpoints on {frame.name}"
    torch.manual_seed(0)
    subjects = [
        (n, create_model(r).eval(), create_model(r).config) for n, r in (("ESPNet", "espnet"), ("ESPNet-C", "espnet-c"))
    ]
    return subjects, torch.randn(1, 3, HEIGHT, WIDTH), "untrained weights on a random image (no shared data found)"


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


def paths_for(
    model: torch.nn.Module, config: ModelConfig, device: str, skip_compile: bool, tmp: Path
) -> dict[str, Runner]:
    def eager(m: torch.nn.Module, memory_format: torch.memory_format = torch.contiguous_format) -> Runner:
        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return m(x.to(memory_format=memory_format))

        return run

    paths: dict[str, Runner] = {"eager fp32": eager(model)}
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    paths["channels_last"] = eager(cl_model, torch.channels_last)

    autocast_dtype = torch.bfloat16 if device == "cpu" else torch.float16

    def autocast_run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(device_type=device, dtype=autocast_dtype):
            return model(x).float()

    paths[f"autocast {str(autocast_dtype).removeprefix('torch.')}"] = autocast_run

    if not skip_compile:
        compiled = torch.compile(model, mode="max-autotune-no-cudagraphs" if device == "cuda" else "default")
        paths["torch.compile"] = eager(compiled)

    if device == "cpu":
        with contextlib.suppress(ImportError):
            import onnxruntime as ort

            onnx_path = export_onnx(model, config, tmp / f"{config.name}.onnx", height=HEIGHT, width=WIDTH)
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
            paths["onnxruntime"] = lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-compile", action="store_true", help="leave out torch.compile (slow to compile)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    data = Path(os.environ.get("WSI_ESPNET_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    subjects, batch, source = load_subjects(data)
    batch = batch.to(args.device)
    device_type = torch.device(args.device).type
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}")  # fmt: skip
    print(f"# {source}; one {WIDTH}x{HEIGHT} frame per call, median of {args.repeats}")
    print(f"{'model':<9} {'path':<18} {'median ms':>10} {'vs eager':>9} {'labels = eager':>15}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, config in subjects:
            model = model.to(args.device).eval()
            with torch.inference_mode():
                reference = model(batch).argmax(1)
            baseline = None
            for path_name, run in paths_for(model, config, device_type, args.skip_compile, Path(tmp)).items():
                seconds = median_seconds(run, batch, args.repeats, sync)
                baseline = baseline or seconds
                agreement = (run(batch).to(reference.device).argmax(1) == reference).float().mean().item()
                results.append({"model": name, "path": path_name, "median_s": seconds, "speedup": baseline / seconds,
                                "label_agreement": agreement})  # fmt: skip
                print(
                    f"{name:<9} {path_name:<18} {seconds * 1e3:>10.1f} {baseline / seconds:>8.2f}x {agreement:>15.6f}"
                )
                sys.stdout.flush()
    if device_type == "cpu":
        print(f"# for reference, not measured here: the authors' implementation was reported at "
              f"{AUTHORS_CPU_SECONDS:.1f} s per frame on the project's 2-core CPU")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"source": source, "device": args.device, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
