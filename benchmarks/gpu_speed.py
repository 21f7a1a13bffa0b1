"""GPU figures in one script, for the short GPU sessions: model, end to end, and JPEG decode.

1. Model only, 1024x512 frames of the default model (``espnet-breast-tumour``) at batch 1, 8 and 32:
   megapixels/s for fp32, fp32 channels_last, fp16 and bf16 autocast (channels_last), torch.compile
   (fp16, channels_last) and CUDA graphs (fp16, channels_last, captured by hand), and the share of
   labels equal to fp32's on a real tissue batch (CMU-1-Small-Region.svs) for each.
2. End to end: ``wsi-espnet segment --device cuda`` on a generated slide (``make_large_slide.py``),
   output megapixels/s, and its ratio to the best model-only rate (goal >= 0.70).
3. JPEG decode of the slide's own 512x512 tiles: torchvision's nvJPEG ``decode_jpeg(device="cuda")``
   in batches against imagecodecs on the CPU cores, in megapixels/s (skipped without torchvision).

Reference (the issue, H100, the authors' code): fp32 batch 8 = 412 MP/s, fp16 + channels_last 355 MP/s;
nvJPEG about 1.5 GP/s. Goals: model >= 1000 MP/s, end to end >= 70 % of the model's rate.

    python benchmarks/gpu_speed.py [--slide-size 20000] [--batches 1,8,32] [--skip-compile] [--json out.json]
    python benchmarks/gpu_speed.py --device cpu --batches 1 --slide-size 10000 --skip-compile   # dry run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_large_slide import ensure_slide
from model_speed import median_seconds
from segment_runs import run_segment

from wsi_espnet.inference import preprocess
from wsi_espnet.models import load_model
from wsi_espnet.models.registry import default_model_path
from wsi_espnet.slides import open_slide

HEIGHT, WIDTH = 512, 1024
Runner = Callable[[torch.Tensor], torch.Tensor]


def model_paths(model: torch.nn.Module, device: str, skip_compile: bool) -> dict[str, Callable[[int], Runner]]:
    """Per path, a factory taking the batch size (CUDA graphs are captured per shape)."""
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    half = torch.float16 if device == "cuda" else torch.bfloat16

    def plain(m: torch.nn.Module, fmt: torch.memory_format, dtype: torch.dtype | None) -> Callable[[int], Runner]:
        def make(_: int) -> Runner:
            def run(x: torch.Tensor) -> torch.Tensor:
                with torch.inference_mode(), torch.autocast(device, dtype or torch.float32, enabled=dtype is not None):
                    return m(x.contiguous(memory_format=fmt))

            return run

        return make

    paths = {
        "fp32": plain(model, torch.contiguous_format, None),
        "fp32 channels_last": plain(cl, torch.channels_last, None),
        f"{str(half).removeprefix('torch.')} autocast cl": plain(cl, torch.channels_last, half),
    }
    if device == "cuda":
        paths["bf16 autocast cl"] = plain(cl, torch.channels_last, torch.bfloat16)
    if not skip_compile:
        compiled = torch.compile(cl, mode="max-autotune-no-cudagraphs" if device == "cuda" else "default")
        paths["torch.compile fp16 cl" if device == "cuda" else "torch.compile"] = plain(
            compiled, torch.channels_last, half if device == "cuda" else None
        )
    if device == "cuda":

        def graphed(batch_size: int) -> Runner:
            static = torch.zeros(batch_size, 3, HEIGHT, WIDTH, device=device).contiguous(
                memory_format=torch.channels_last
            )
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.inference_mode(), torch.autocast("cuda", torch.float16):
                for _ in range(3):
                    cl(static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.inference_mode(), torch.autocast("cuda", torch.float16):
                output = cl(static)

            def run(x: torch.Tensor) -> torch.Tensor:
                static.copy_(x)
                graph.replay()
                return output

            return run

        paths["CUDA graph fp16 cl"] = graphed
    return paths


def tissue_batch(data: Path, batch_size: int, config: Any, device: str) -> torch.Tensor:
    """``batch_size`` real 1024x512 tissue crops of CMU-1-Small-Region.svs (level 0), normalised."""
    with open_slide(data / "slides" / "CMU-1-Small-Region.svs") as reader:
        image = reader.read_level(0)
    crops = []
    for index in range(batch_size):
        top = (index * 97) % (image.shape[0] - HEIGHT)
        left = (index * 53) % (image.shape[1] - WIDTH)
        crops.append(preprocess(np.ascontiguousarray(image[top : top + HEIGHT, left : left + WIDTH]), config))
    return torch.cat(crops).to(device)


def jpeg_decode(slide: Path, device: str, tiles: int = 512) -> dict[str, float]:
    """Megapixels/s decoding the slide's level-0 JPEG tiles: imagecodecs on the CPU, nvJPEG on the GPU."""
    import imagecodecs

    with tifffile.TiffFile(slide) as tiff:
        page = tiff.pages[0]
        jpeg_tables = page.jpegtables
        handle = tiff.filehandle
        encoded = []
        for offset, count in list(zip(page.dataoffsets, page.databytecounts, strict=True))[:tiles]:
            handle.seek(offset)
            encoded.append(handle.read(count))
    pixels = len(encoded) * page.tilewidth * page.tilelength / 1e6
    began = time.perf_counter()
    for data in encoded:
        imagecodecs.jpeg_decode(data, tables=jpeg_tables)
    result = {"cpu imagecodecs MP/s (1 thread)": pixels / (time.perf_counter() - began)}
    try:
        from torchvision.io import decode_jpeg
    except ImportError:
        print("# torchvision is not installed: GPU JPEG decode skipped (pip install torchvision)")
        return result
    if device == "cuda" and jpeg_tables is None:
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in encoded]
        for size in (1, 32):
            for i in range(0, min(len(tensors), 64), size):
                decode_jpeg(tensors[i : i + size], device="cuda")
            torch.cuda.synchronize()
            began = time.perf_counter()
            for i in range(0, len(tensors), size):
                decode_jpeg(tensors[i : i + size], device="cuda")
            torch.cuda.synchronize()
            result[f"nvJPEG batch {size} MP/s"] = pixels / (time.perf_counter() - began)
    elif device == "cuda":
        print("# the tiles use shared JPEG tables (abbreviated streams): nvJPEG needs whole streams, skipped")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--slide-size", type=int, default=20000, help="generated slide for the end-to-end run")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here; run on the GPU machine, or --device cpu for a dry run")
    data = Path(os.environ.get("WSI_ESPNET_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    device = args.device
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}; model-only frames {WIDTH}x{HEIGHT}")
    model, config = load_model(default_model_path(), device=device)
    results: dict[str, Any] = {"device": name, "model": [], "end_to_end": None, "jpeg": None}
    best = 0.0
    print(f"{'path':<24} {'batch':>5} {'ms':>9} {'MP/s':>9} {'labels = fp32':>14}")
    for batch_size in (int(b) for b in args.batches.split(",")):
        batch = tissue_batch(data, batch_size, config.preprocessing, device)
        with torch.inference_mode():
            reference = model(batch).argmax(1)
        for path, factory in model_paths(model, device, args.skip_compile).items():
            run = factory(batch_size)
            seconds = median_seconds(run, batch, args.repeats, sync)
            rate = batch_size * HEIGHT * WIDTH / 1e6 / seconds
            agreement = (run(batch).argmax(1) == reference).float().mean().item()
            best = max(best, rate)
            results["model"].append({"path": path, "batch": batch_size, "seconds": seconds, "mp_per_s": rate,
                                     "agreement": agreement})  # fmt: skip
            print(f"{path:<24} {batch_size:>5} {seconds * 1e3:>9.2f} {rate:>9.1f} {agreement:>14.6f}", flush=True)

    slide = ensure_slide(args.slide_size)
    with tempfile.TemporaryDirectory() as tmp:
        run = run_segment(slide, Path(tmp) / "out", "--device", device)
        shutil.rmtree(Path(tmp) / "out")
    rate = run.output_megapixels / run.seconds
    results["end_to_end"] = {"slide": slide.name, "seconds": run.seconds, "mp_per_s": rate, "of_model": rate / best,
                             "peak_rss_mib": run.peak_rss_mib}  # fmt: skip
    print(f"segment {slide.name} on {device}: {run.seconds:.1f} s = {rate:.1f} MP/s, {rate / best:.2f} of the best "
          f"model-only rate {best:.0f} MP/s (goal >= 0.70); peak RSS {run.peak_rss_mib:.0f} MiB")  # fmt: skip

    results["jpeg"] = jpeg_decode(slide, device)
    for key, value in results["jpeg"].items():
        print(f"JPEG decode, {key}: {value:.0f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
