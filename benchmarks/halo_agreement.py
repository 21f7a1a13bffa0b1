"""Tiled inference against whole-image inference as the tile halo grows, on a real slide.

For each halo, the slide's target grid (the slide at the model's um/px) is tiled exactly as
``segment`` tiles it (``plan_tiles`` with the default tile size, each window read with the
pipeline's ``read_window``, run through ``infer_windows`` with the pipeline's settings, and cut to
``tile.crop``); every tile is run, glass included, so all pixels can be compared. Prints, per halo,
the share of pixels whose label equals whole-image inference (``wsi_espnet.inference.predict`` on
the whole region), over all pixels and over tissue pixels (``detect_tissue``), the number of
windows and their pixels per output pixel, and the tiled time against whole-image inference
measured in the same run. The automatic halo (``halo_for``) is marked. Then the effective
receptive radius at gradient masses 0.9 / 0.95 / 0.99.

Uses the original ESPNet Cityscapes checkpoint converted with ``target_mpp=0.5`` and
``CMU-1-Small-Region.svs`` from ``$WSI_ESPNET_TEST_DATA`` (default ``../shared/data``).

    python benchmarks/halo_agreement.py [--halos 0,64,128,192,256,320,384,512] [--tile-size 1536]
                                        [--slide S] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from wsi_espnet.geometry import Region
from wsi_espnet.inference import predict
from wsi_espnet.models import file_sha256, load_original_checkpoint, save_model
from wsi_espnet.models.config import ModelConfig
from wsi_espnet.models.receptive_field import DEFAULT_HALO_MASS, effective_receptive_radius, halo_for
from wsi_espnet.segmentation.tile_inference import InferenceSettings, cached_model, infer_windows, read_window
from wsi_espnet.slides import LevelChoice, SlideReader, choose_level, open_slide, read_target_region
from wsi_espnet.tiling import plan_tiles
from wsi_espnet.tissue_detection import detect_tissue

DEFAULT_HALOS = (0, 64, 128, 192, 256, 320, 384, 512)
DEFAULT_TILE_SIZE = 1536  # SegmentOptions().tile_size
MAX_REGION_PIXELS = 40_000_000  # whole-image inference must fit in memory


def data_dir() -> Path:
    return Path(os.environ.get("WSI_ESPNET_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def convert_model(folder: Path, target_mpp: float = 0.5) -> Path:
    """The original Cityscapes ESPNet checkpoint, as our .safetensors with a target um/px."""
    model, config = load_original_checkpoint(data_dir() / "espnet-original" / "weights" / "decoder_espnet_p_2_q_8.pth")
    return save_model(model, config.replace(target_mpp=target_mpp), folder / "m.safetensors")


def pipeline_settings(model_path: Path, device: str) -> InferenceSettings:
    """What ``segment_slide`` passes its tasks (fp16 autocast on CUDA, fp32 on CPU, channels_last)."""
    precision = "fp16" if device.startswith("cuda") else "fp32"
    return InferenceSettings(str(model_path.resolve()), file_sha256(model_path), device, precision, channels_last=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass(frozen=True)
class TiledRun:
    labels: NDArray[np.uint8]
    seconds: float  # reads + model + stitching
    model_seconds: float
    windows: int
    window_pixels: int


def tiled_labels(
    reader: SlideReader,
    choice: LevelChoice,
    region: Region,
    model: torch.nn.Module,
    config: ModelConfig,
    settings: InferenceSettings,
    *,
    tile_size: int,
    halo: int,
) -> TiledRun:
    """Labels of the whole target grid tiled as the pipeline tiles it (one window per model call)."""
    if (region.top, region.left, region.height, region.width) != (0, 0, *choice.target_shape):
        raise ValueError("tiled_labels covers the whole target grid, as the pipeline does")
    plan = plan_tiles(region.shape, tile_size=tile_size, halo=halo)
    out = np.zeros(region.shape, dtype=np.uint8)
    model_seconds = 0.0
    window_pixels = 0
    start = time.perf_counter()
    for tile in plan:
        window = read_window(reader, choice, tile)  # the pipeline's read, mirrored past the slide edge
        t0 = time.perf_counter()
        (prediction,) = infer_windows(model, config, [window], settings)
        model_seconds += time.perf_counter() - t0
        window_pixels += window.shape[0] * window.shape[1]
        out[tile.top : tile.top + tile.height, tile.left : tile.left + tile.width] = prediction[tile.crop]
    return TiledRun(out, time.perf_counter() - start, model_seconds, len(plan), window_pixels)


def whole_image_labels(
    reader: SlideReader, choice: LevelChoice, region: Region, model: torch.nn.Module, device: str
) -> tuple[NDArray[np.uint8], NDArray[np.uint8], float]:
    """(image, labels, seconds incl. the read) of whole-image inference on ``region``."""
    start = time.perf_counter()
    image = read_target_region(reader, choice, region)
    with torch.autocast("cuda", dtype=torch.float16, enabled=device.startswith("cuda")):
        labels = predict(model, image).labels.astype(np.uint8)
    sync(device)
    return image, labels, time.perf_counter() - start


def tissue_on_region(reader: SlideReader, choice: LevelChoice, region: Region) -> NDArray[np.bool_]:
    """The pipeline's tissue mask, nearest-sampled onto the target-grid region."""
    assert reader.mpp is not None
    tissue = detect_tissue(reader, mpp=choice.slide_mpp)
    return tissue.sample(region, choice.target_to_level0)


def agreement(a: NDArray[np.uint8], b: NDArray[np.uint8], mask: NDArray[np.bool_] | None = None) -> float:
    same = a == b
    if mask is None:
        return float(same.mean())
    return float(same[mask].mean()) if mask.any() else float("nan")


def warm_up(model: torch.nn.Module, config: ModelConfig, settings: InferenceSettings) -> None:
    """One small call, so the first timed call does not pay for one-off allocations and kernel choice."""
    infer_windows(model, config, [np.full((512, 512, 3), 200, dtype=np.uint8)], settings)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slide", type=Path, default=None, help="slide (default CMU-1-Small-Region.svs)")
    parser.add_argument("--halos", default=",".join(map(str, DEFAULT_HALOS)), help="comma-separated halos (px)")
    parser.add_argument("--tile-size", type=int, default=DEFAULT_TILE_SIZE)
    parser.add_argument("--target-mpp", type=float, default=0.5)
    parser.add_argument("--masses", default="0.9,0.95,0.99", help="gradient masses for the receptive radius")
    parser.add_argument("--probe-size", type=int, default=1024, help="probe side for the receptive radius")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    slide = args.slide or data_dir() / "slides" / "CMU-1-Small-Region.svs"
    if not slide.exists():
        print(f"{slide} not found; set WSI_ESPNET_TEST_DATA or pass --slide", file=sys.stderr)
        return 2
    reader = open_slide(slide)
    choice = choose_level(reader, args.target_mpp)
    region = Region(0, 0, *choice.target_shape)
    if region.height * region.width > MAX_REGION_PIXELS:
        parser.error(f"region {region} has more than {MAX_REGION_PIXELS:,} pixels; pass a coarser --target-mpp")
    halos = [int(h) for h in args.halos.split(",") if h.strip()]
    masses = [float(m) for m in args.masses.split(",") if m.strip()]

    with tempfile.TemporaryDirectory() as tmp:
        model_path = convert_model(Path(tmp), args.target_mpp)
        settings = pipeline_settings(model_path, args.device)
        model, config = cached_model(settings)
        t0 = time.perf_counter()
        auto_halo = halo_for(model)
        halo_seconds = time.perf_counter() - t0
        if auto_halo not in halos:
            halos = sorted([*halos, auto_halo])

        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {args.device} {settings.precision} channels_last")  # fmt: skip
        print(f"# {slide.name}: level {choice.level} ({choice.level_mpp:.4g} um/px, resample {choice.resample}), "
              f"region {region.height}x{region.width} at {args.target_mpp} um/px; tile {args.tile_size}; "
              f"auto halo {auto_halo} ({DEFAULT_HALO_MASS:.0%} mass, computed in {halo_seconds:.1f} s)")  # fmt: skip
        warm_up(model, config, settings)
        _, reference, whole_seconds = whole_image_labels(reader, choice, region, model, args.device)
        tissue = tissue_on_region(reader, choice, region)
        print(f"# whole-image inference: {whole_seconds:.2f} s (read + predict); tissue {tissue.mean():.1%} "
              f"of the region; every tile is run (glass too), one window per model call")  # fmt: skip
        header = (
            f"{'halo':>9} {'windows':>7} {'win px/px':>9} {'agree all':>10} {'agree tissue':>12} "
            f"{'diff px':>9} {'tiled s':>8} {'model s':>8} {'vs whole':>9}"
        )
        print(header)
        rows = []
        for halo in halos:
            run = tiled_labels(reader, choice, region, model, config, settings, tile_size=args.tile_size, halo=halo)
            row = {
                "halo": halo, "auto": halo == auto_halo, "windows": run.windows,
                "window_pixels_per_pixel": run.window_pixels / (region.height * region.width),
                "agree_all": agreement(run.labels, reference), "agree_tissue": agreement(run.labels, reference, tissue),
                "differing_pixels": int((run.labels != reference).sum()), "tiled_s": run.seconds,
                "model_s": run.model_seconds, "vs_whole": run.seconds / whole_seconds,
            }  # fmt: skip
            rows.append(row)
            label = f"{halo}{' auto' if row['auto'] else ''}"
            print(f"{label:>9} {run.windows:>7} {row['window_pixels_per_pixel']:>9.2f} {row['agree_all']:>10.6f} "
                  f"{row['agree_tissue']:>12.6f} {row['differing_pixels']:>9} {run.seconds:>8.2f} "
                  f"{run.model_seconds:>8.2f} {row['vs_whole']:>8.2f}x")  # fmt: skip
            sys.stdout.flush()

        # The limit of an unbounded halo: one window over the whole grid, through the pipeline's own path.
        whole_tile = -(-max(region.height, region.width) // 8) * 8
        limit_run = tiled_labels(reader, choice, region, model, config, settings, tile_size=whole_tile, halo=0)
        limit = {
            "agree_all": agreement(limit_run.labels, reference),
            "agree_tissue": agreement(limit_run.labels, reference, tissue),
        }
        print(f"{'one tile':>9} {'1':>7} {'':>9} {limit['agree_all']:>10.6f} {limit['agree_tissue']:>12.6f} "
              f"{int((limit_run.labels != reference).sum()):>9}   (one window over the whole grid)")  # fmt: skip

        print(f"# effective receptive radius (Chebyshev, input px) of the centre pixel, probe {args.probe_size}px")
        print(f"{'mass':>6} {'radius':>7} {'halo (x8)':>9} {'s':>6}")
        radii = []
        for mass in masses:
            t0 = time.perf_counter()
            radius = effective_receptive_radius(model, mass=mass, probe_size=args.probe_size)
            seconds = time.perf_counter() - t0
            capped = radius >= args.probe_size // 2
            radii.append({"mass": mass, "radius": radius, "capped": capped, "seconds": seconds})
            print(f"{mass:>6.2f} {radius:>7}{'+' if capped else ' '} {-(-radius // 8) * 8:>9} {seconds:>6.1f}"
                  f"{'  (capped at probe/2: pass a larger --probe-size)' if capped else ''}")  # fmt: skip

    if args.json:
        args.json.write_text(json.dumps({
            "slide": str(slide), "region": region.__dict__, "tile_size": args.tile_size, "auto_halo": auto_halo,
            "whole_image_s": whole_seconds, "tissue_fraction": float(tissue.mean()), "halos": rows, "unbounded": limit,
            "radii": radii,
        }, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
